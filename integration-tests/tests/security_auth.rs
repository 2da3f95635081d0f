//! Authentication, brute force, file permissions, TLS versions and descriptor exhaustion
//! against the real broker binary (SECURITY-CASES A10, T4, F1, R2; DESIGN.md "Identity and
//! authorization"):
//!
//! - a Mosquitto password file works as it is, and each entry is rewritten as argon2id at
//!   the user's first login; wrong passwords and unknown users get CONNACK 4, audited
//!   without the password;
//! - the identity sources of a listener (certificate, password, both, either);
//! - A10: three failures ban the address (closed at accept) and the username (refused from
//!   anywhere), other users are unaffected, and every ban ends;
//! - the password file is reloaded while running: removed users are disconnected, added
//!   users log in, a broken file is refused and the last good one stays in force;
//! - F1: a key file, password file or store directory open to others stops the start;
//! - T4: TLS 1.0, 1.1 and NULL ciphers fail the handshake, TLS 1.2 and 1.3 complete;
//! - R2: the broker survives EMFILE at accept and serves again afterwards.
//!
//! Tests synchronise on CONNACKs, audit events and log lines; only the ban tests wait for
//! time itself to pass.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_integration_tests::mqtt::{options, Client, QoS, Via};
use bulwark_integration_tests::{
    bin_path, require_program, run_with_timeout, BrokerConfig, BrokerProcess, ClientCert,
    TestBroker, TestPki,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const T: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Configuration and password-file helpers
// ---------------------------------------------------------------------------------------

/// A plain-TCP listener on loopback that takes passwords only (no anonymous clients).
fn tcp_password_listener(name: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\ntransport = \"tcp\"\nallow_anonymous = false\n"
    )
}

/// A TLS listener on loopback with the test PKI; `identity` = None keeps the default
/// (`certificate-or-password`).
fn tls_listener(
    pki: &TestPki,
    name: &str,
    client_certificates: &str,
    identity: Option<&str>,
) -> String {
    let mut s = format!(
        "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\ntransport = \"tls\"\nallow_anonymous = false\n"
    );
    if let Some(i) = identity {
        s.push_str(&format!("identity = \"{i}\"\n"));
    }
    s.push_str(&format!(
        "[listener.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\nclient_certificates = \"{client_certificates}\"\n",
        pki.server_cert, pki.server_key, pki.ca_path
    ));
    s
}

fn passwords_table(file: &Path) -> String {
    format!("[auth.passwords]\nfile = {file:?}\n")
}

const NO_PERSISTENCE: &str = "[persistence]\nenabled = false\n";

/// `bulwark-broker passwd add FILE USER` with the password on standard input.
fn passwd_add(file: &Path, user: &str, password: &str) {
    let mut child = Command::new(bin_path("bulwark-broker"))
        .args(["passwd", "add"])
        .arg(file)
        .arg(user)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bulwark-broker passwd add");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "passwd add {user}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn passwd_delete(file: &Path, user: &str) {
    let (status, out, err) = run_with_timeout(
        Command::new(bin_path("bulwark-broker"))
            .args(["passwd", "delete"])
            .arg(file)
            .arg(user),
        T,
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "passwd delete {user}: {status:?}\nstdout: {out}\nstderr: {err}"
    );
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The hash stored for `user` in a password file.
fn stored_hash(file: &Path, user: &str) -> Option<String> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
        l.strip_prefix(user)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::to_string)
    })
}

/// Waits until at least `n` log lines match `pred` (a log event, not a delay).
fn wait_count(b: &BrokerProcess, what: &str, n: usize, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if b.count_log(&pred) >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} log lines {what}; log:\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_audit(v: &serde_json::Value, event: &str) -> bool {
    v["target"] == "audit" && v["event"] == event
}

// ---------------------------------------------------------------------------------------
// Raw MQTT over any stream: CONNECT with credentials, CONNACK code or closed
// ---------------------------------------------------------------------------------------

/// What became of a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// CONNACK 0.
    Accepted,
    /// CONNACK with this return code.
    Refused(u8),
    /// The connection ended without a CONNACK.
    Closed,
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// An MQTT 3.1.1 CONNECT (clean session, keepalive 60) with optional username and password.
fn connect_packet(client_id: &str, user: Option<&str>, password: Option<&str>) -> Vec<u8> {
    assert!(
        password.is_none() || user.is_some(),
        "MQTT 3.1.1 forbids a password without a username"
    );
    let mut flags = 0x02u8;
    let mut payload = Vec::new();
    put_str(&mut payload, client_id.as_bytes());
    if let Some(u) = user {
        flags |= 0x80;
        put_str(&mut payload, u.as_bytes());
    }
    if let Some(p) = password {
        flags |= 0x40;
        put_str(&mut payload, p.as_bytes());
    }
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60];
    body.extend(payload);
    let mut out = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

/// Sends CONNECT and reads the CONNACK (or the end of the connection).
async fn mqtt_connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    client_id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> Outcome {
    if s.write_all(&connect_packet(client_id, user, password))
        .await
        .is_err()
    {
        return Outcome::Closed;
    }
    let _ = s.flush().await;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(T, s.read_exact(&mut buf)).await {
        Err(_) => panic!("{client_id}: neither CONNACK nor close within {T:?}"),
        Ok(Err(_)) => Outcome::Closed,
        Ok(Ok(_)) => {
            assert_eq!(
                buf[..2],
                [0x20, 0x02],
                "{client_id}: not a CONNACK: {buf:02x?}"
            );
            match buf[3] {
                0 => Outcome::Accepted,
                code => Outcome::Refused(code),
            }
        }
    }
}

/// A TCP connection to `to` from the loopback address `local` (127.0.0.x).
async fn tcp_from(local: &str, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(local.parse().unwrap(), 0))
        .unwrap_or_else(|e| panic!("bind {local}: {e}"));
    let s = sock
        .connect(to)
        .await
        .unwrap_or_else(|e| panic!("connect {local} -> {to}: {e}"));
    s.set_nodelay(true).unwrap();
    s
}

/// CONNECT over plain TCP from `local`; returns the outcome and the stream (kept open).
async fn login_from(
    local: &str,
    to: SocketAddr,
    client_id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> (Outcome, TcpStream) {
    let mut s = tcp_from(local, to).await;
    let o = mqtt_connect(&mut s, client_id, user, password).await;
    (o, s)
}

/// CONNECT over TLS, optionally with a client certificate.
async fn tls_login(
    pki: &TestPki,
    to: SocketAddr,
    cert: Option<&ClientCert>,
    client_id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> Outcome {
    let connector = tokio_rustls::TlsConnector::from(pki.rustls_client_config(cert));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = TcpStream::connect(to).await.unwrap();
    let mut tls = match tokio::time::timeout(T, connector.connect(name, tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => return Outcome::Closed,
        Err(_) => panic!("{client_id}: TLS handshake did not finish within {T:?}"),
    };
    mqtt_connect(&mut tls, client_id, user, password).await
}

/// Waits until the broker closes `s` (EOF or reset). `false` if still open after `T`.
async fn closed_by_broker(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// PINGREQ → PINGRESP on an established raw connection.
async fn ping(s: &mut TcpStream) -> bool {
    if s.write_all(&[0xc0, 0x00]).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 2];
    matches!(
        tokio::time::timeout(T, s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if buf == [0xd0, 0x00]
    )
}

/// A deployment in a temporary directory: PKI, password file, broker.
struct Deployment {
    pki: TestPki,
    dir: tempfile::TempDir,
    passwd: PathBuf,
}

impl Deployment {
    fn new() -> Deployment {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        Deployment { pki, dir, passwd }
    }

    fn start(&self, config: &str, listeners: usize) -> BrokerProcess {
        BrokerProcess::start(config, self.dir.path(), listeners)
    }
}

// ---------------------------------------------------------------------------------------
// 1. Mosquitto password file: migration, upgrade at login, refusals
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_password_file_works_and_is_upgraded_to_argon2id_at_login() {
    require_program("mosquitto_passwd", "apt-get install mosquitto");
    require_program("mosquitto_pub", "apt-get install mosquitto-clients");
    let d = Deployment::new();
    let file = d.passwd.clone();
    for args in [
        vec!["-c", "-b", file.to_str().unwrap(), "alice", "secret1"],
        vec!["-b", file.to_str().unwrap(), "bob", "secret2"],
    ] {
        let (status, out, err) = run_with_timeout(Command::new("mosquitto_passwd").args(&args), T);
        assert!(
            status.is_some_and(|s| s.success()),
            "mosquitto_passwd {args:?}: {status:?} {out} {err}"
        );
    }
    set_mode(&file, 0o600);
    let before = stored_hash(&file, "alice").expect("alice in the mosquitto file");
    assert!(
        before.starts_with("$7$") || before.starts_with("$6$"),
        "mosquitto_passwd wrote a Mosquitto hash: {before}"
    );

    let config = format!(
        "{}{NO_PERSISTENCE}{}",
        tcp_password_listener("tcp"),
        passwords_table(&file)
    );
    let b = d.start(&config, 1);
    let addr = b.addr("tcp");

    // bob (also a Mosquitto entry) subscribes with rumqttc.
    let mut o = options("mig-bob", &Via::Tcp(addr));
    o.set_credentials("bob", "secret2");
    let mut bob = Client::connect(o)
        .await
        .expect("bob logs in with his Mosquitto password");
    bob.subscribe("mig/t", QoS::AtLeastOnce).await;

    // alice publishes with mosquitto_pub and her Mosquitto password.
    let pub_cmd = |id: &str, user: &str, pass: &str, msg: &str| {
        let mut c = Command::new("mosquitto_pub");
        c.args(["-h", "127.0.0.1", "-p"])
            .arg(addr.port().to_string())
            .args([
                "-i", id, "-u", user, "-P", pass, "-q", "1", "-t", "mig/t", "-m", msg,
            ]);
        c
    };
    let (status, out, err) =
        run_with_timeout(&mut pub_cmd("mig-alice", "alice", "secret1", "m1"), T);
    assert!(
        status.is_some_and(|s| s.success()),
        "mosquitto_pub as alice: {status:?} {out} {err}\nlog:\n{}",
        b.log_text()
    );
    let p = bob
        .next_publish(T)
        .await
        .expect("alice's message delivered");
    assert_eq!(&p.payload[..], b"m1");

    // The upgrade happens right after the successful login.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = stored_hash(&file, "alice").unwrap_or_default();
        if h.starts_with("$argon2id$") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's entry not upgraded: {h}\nlog:\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        stored_hash(&file, "bob").unwrap().starts_with("$argon2id$"),
        "bob logged in first, so his entry is upgraded too"
    );
    assert_eq!(mode_of(&file), 0o600, "the rewritten file is 0600");
    // The new hash verifies the same password.
    let (status, out, err) =
        run_with_timeout(&mut pub_cmd("mig-alice2", "alice", "secret1", "m2"), T);
    assert!(
        status.is_some_and(|s| s.success()),
        "alice after the upgrade: {status:?} {out} {err}"
    );
    assert_eq!(&bob.next_publish(T).await.expect("m2").payload[..], b"m2");

    // Wrong password and unknown user: CONNACK 4 (mosquitto_pub fails and says so; a raw
    // client reads the byte), audited, the password never in the log.
    for (id, user, pass) in [
        ("mig-wrong", "alice", "Wr0ng-Pa55-QX7"),
        ("mig-unknown", "mallory", "Unkn0wn-Pa55-ZK4"),
    ] {
        let (status, out, err) = run_with_timeout(&mut pub_cmd(id, user, pass, "nope"), T);
        let status = status.expect("mosquitto_pub finished");
        assert!(
            !status.success(),
            "{user}/{pass} must be refused: {out} {err}"
        );
        assert!(
            err.contains("bad user name or password"),
            "mosquitto_pub reports CONNACK 4: {err}"
        );
        b.wait_audit("auth_failure", &[("username", user)]);
        b.wait_audit(
            "connect_refused",
            &[("client_id", id), ("reason", "bad username or password")],
        );
        // The exact CONNACK byte, from a raw client.
        let (o, _s) = login_from(
            "127.0.0.1",
            addr,
            &format!("{id}-raw"),
            Some(user),
            Some(pass),
        )
        .await;
        assert_eq!(o, Outcome::Refused(4), "{user}: CONNACK 4");
    }
    // Nothing from the refused publishers: the next message bob gets is alice's next one.
    let (status, out, err) =
        run_with_timeout(&mut pub_cmd("mig-alice3", "alice", "secret1", "m3"), T);
    assert!(status.is_some_and(|s| s.success()), "{out} {err}");
    assert_eq!(&bob.next_publish(T).await.expect("m3").payload[..], b"m3");
    let log = b.log_text();
    for secret in ["Wr0ng-Pa55-QX7", "Unkn0wn-Pa55-ZK4", "secret1", "secret2"] {
        assert!(
            !log.contains(secret),
            "the log contains the password {secret:?}:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. Identity sources
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_identity_source_takes_exactly_its_credentials() {
    let d = Deployment::new();
    passwd_add(&d.passwd, "op1", "op1-pass");
    passwd_add(&d.passwd, "app1", "app1-pass");
    let config = format!(
        "{}{}{}{NO_PERSISTENCE}{}",
        tls_listener(&d.pki, "both", "required", Some("certificate-and-password")),
        tls_listener(&d.pki, "pw", "optional", Some("password")),
        tls_listener(&d.pki, "either", "optional", None),
        passwords_table(&d.passwd)
    );
    let b = d.start(&config, 3);
    let op1 = d.pki.client("op1");
    let pki = &d.pki;

    // certificate-and-password
    let both = b.addr("both");
    assert_eq!(
        tls_login(
            pki,
            both,
            Some(&op1),
            "cap-ok",
            Some("op1"),
            Some("op1-pass")
        )
        .await,
        Outcome::Accepted,
        "cert op1 + username op1 + right password"
    );
    b.wait_audit("connect", &[("client_id", "cap-ok"), ("identity", "op1")]);
    assert_eq!(
        tls_login(
            pki,
            both,
            Some(&op1),
            "cap-other-user",
            Some("app1"),
            Some("app1-pass")
        )
        .await,
        Outcome::Refused(4),
        "username differs from the certificate CN, even with that user's right password"
    );
    assert_eq!(
        tls_login(
            pki,
            both,
            Some(&op1),
            "cap-wrong",
            Some("op1"),
            Some("not-op1-pass")
        )
        .await,
        Outcome::Refused(4),
        "right certificate, wrong password"
    );
    assert_eq!(
        tls_login(pki, both, Some(&op1), "cap-nopw", None, None).await,
        Outcome::Refused(4),
        "right certificate, no password"
    );

    // password only: a certificate is not an identity here
    let pw = b.addr("pw");
    assert_eq!(
        tls_login(pki, pw, Some(&op1), "pw-cert-only", None, None).await,
        Outcome::Refused(5),
        "certificate without password on identity = password"
    );
    assert_eq!(
        tls_login(
            pki,
            pw,
            Some(&op1),
            "pw-cert-app1",
            Some("app1"),
            Some("app1-pass")
        )
        .await,
        Outcome::Accepted,
        "with a password the user is the username, whatever the certificate says"
    );
    b.wait_audit(
        "connect",
        &[("client_id", "pw-cert-app1"), ("identity", "app1")],
    );
    assert_eq!(
        tls_login(pki, pw, None, "pw-app1", Some("app1"), Some("app1-pass")).await,
        Outcome::Accepted
    );
    assert_eq!(
        tls_login(pki, pw, None, "pw-app1-wrong", Some("app1"), Some("nope")).await,
        Outcome::Refused(4)
    );

    // certificate-or-password (the default) with optional certificates
    let either = b.addr("either");
    assert_eq!(
        tls_login(pki, either, Some(&op1), "cop-cert", None, None).await,
        Outcome::Accepted,
        "certificate alone"
    );
    b.wait_audit("connect", &[("client_id", "cop-cert"), ("identity", "op1")]);
    assert_eq!(
        tls_login(pki, either, None, "cop-pw", Some("app1"), Some("app1-pass")).await,
        Outcome::Accepted,
        "no certificate, username and password"
    );
    b.wait_audit("connect", &[("client_id", "cop-pw"), ("identity", "app1")]);
    assert_eq!(
        tls_login(pki, either, None, "cop-nothing", None, None).await,
        Outcome::Refused(5),
        "no certificate and no password"
    );
    assert_eq!(
        tls_login(pki, either, None, "cop-wrong", Some("app1"), Some("nope")).await,
        Outcome::Refused(4)
    );
    for id in ["cap-other-user", "cap-wrong", "pw-cert-only", "cop-nothing"] {
        b.wait_audit("connect_refused", &[("client_id", id)]);
        assert_eq!(
            b.count_log(|v| is_audit(v, "connect") && v["client_id"] == id),
            0,
            "{id} never connected"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. A10: brute force from one address, and against one username
// ---------------------------------------------------------------------------------------

const BANS: &str =
    "[abuse]\nallow_list = []\nmax_auth_failures = 3\nban_secs = 2\nban_max_secs = 4\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_from_one_address_bans_it_for_a_while() {
    let d = Deployment::new();
    passwd_add(&d.passwd, "alice", "alice-pass");
    passwd_add(&d.passwd, "bob", "bob-pass");
    let config = format!(
        "{}{NO_PERSISTENCE}{}{BANS}",
        tcp_password_listener("tcp"),
        passwords_table(&d.passwd)
    );
    let b = d.start(&config, 1);
    let addr = b.addr("tcp");

    for i in 0..3 {
        let (o, _) = login_from(
            "127.0.0.1",
            addr,
            &format!("bf-{i}"),
            Some("alice"),
            Some("guess"),
        )
        .await;
        assert_eq!(o, Outcome::Refused(4), "attempt {i}");
    }
    let banned_at = Instant::now();
    let ban = b.wait_audit("ban", &[("address", "127.0.0.1")]);
    assert_eq!(
        ban["seconds"].as_u64(),
        Some(2),
        "first ban = ban_secs: {ban}"
    );
    // The same three failures were against one username.
    b.wait_audit("ban", &[("username", "alice")]);

    // The banned address is closed at accept, even with the right password.
    let (o, _) = login_from(
        "127.0.0.1",
        addr,
        "bf-right",
        Some("alice"),
        Some("alice-pass"),
    )
    .await;
    assert_eq!(o, Outcome::Closed, "banned address gets no CONNACK");
    // Closed at accept: its CONNECT was never read. (`banned_connection` is sampled at
    // powers of two of the refused-connection counter; this is refusal number 4.)
    let ev = b.wait_audit("banned_connection", &[]);
    assert!(
        ev["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with("127.0.0.1:"),
        "{ev}"
    );
    assert_eq!(
        b.count_log(|v| v["target"] == "audit" && v["client_id"] == "bf-right"),
        0,
        "no CONNECT of the banned connection was processed"
    );

    // Another user from another address is unaffected; the attacked user is refused there.
    let (o, mut bob) = login_from("127.0.0.2", addr, "bf-bob", Some("bob"), Some("bob-pass")).await;
    assert_eq!(
        o,
        Outcome::Accepted,
        "bob from 127.0.0.2 while 127.0.0.1 is banned"
    );
    let (o, _) = login_from(
        "127.0.0.2",
        addr,
        "bf-alice2",
        Some("alice"),
        Some("alice-pass"),
    )
    .await;
    assert_eq!(
        o,
        Outcome::Refused(4),
        "alice's username is banned from any address"
    );
    assert!(ping(&mut bob).await, "bob keeps being served");

    // The ban ends (connections from the banned address are closed at accept and count no
    // failures, so polling does not extend it).
    let deadline = banned_at + Duration::from_secs(6);
    let mut refused = 0;
    let after = loop {
        let (o, _) = login_from(
            "127.0.0.1",
            addr,
            "bf-later",
            Some("alice"),
            Some("alice-pass"),
        )
        .await;
        match o {
            Outcome::Accepted => break banned_at.elapsed(),
            Outcome::Closed => refused += 1,
            Outcome::Refused(c) => panic!("unexpected CONNACK {c} after the address ban"),
        }
        assert!(
            Instant::now() < deadline,
            "127.0.0.1 still banned {:?} after a 2 s ban; log:\n{}",
            banned_at.elapsed(),
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(refused > 0, "the ban was in force for a while");
    assert!(
        after >= Duration::from_millis(1500),
        "the ban lasted about ban_secs, not {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_against_one_username_bans_it_everywhere_but_never_for_ever() {
    let d = Deployment::new();
    passwd_add(&d.passwd, "carol", "carol-pass");
    passwd_add(&d.passwd, "dave", "dave-pass");
    let config = format!(
        "{}{NO_PERSISTENCE}{}{BANS}",
        tcp_password_listener("tcp"),
        passwords_table(&d.passwd)
    );
    let b = d.start(&config, 1);
    let addr = b.addr("tcp");

    for local in ["127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        let (o, _) = login_from(local, addr, "ub", Some("carol"), Some("guess")).await;
        assert_eq!(o, Outcome::Refused(4), "from {local}");
    }
    let banned_at = Instant::now();
    let ban = b.wait_audit("ban", &[("username", "carol")]);
    assert_eq!(ban["seconds"].as_u64(), Some(2), "{ban}");
    assert_eq!(
        b.count_log(|v| is_audit(v, "ban") && v.get("address").is_some()),
        0,
        "one failure per address bans no address"
    );

    // While banned: the right password from a fresh address is refused; dave is not.
    let (o, _) = login_from(
        "127.0.0.6",
        addr,
        "ub-carol",
        Some("carol"),
        Some("carol-pass"),
    )
    .await;
    assert_eq!(o, Outcome::Refused(4), "banned username, right password");
    let (o, _) = login_from(
        "127.0.0.6",
        addr,
        "ub-dave",
        Some("dave"),
        Some("dave-pass"),
    )
    .await;
    assert_eq!(o, Outcome::Accepted, "other users are unaffected");

    // After the ban: accepted. (Waits for the ban to run out rather than polling, so the
    // test does not depend on how attempts during a ban are treated.)
    tokio::time::sleep_until((banned_at + Duration::from_millis(2300)).into()).await;
    let (o, _) = login_from(
        "127.0.0.7",
        addr,
        "ub-carol2",
        Some("carol"),
        Some("carol-pass"),
    )
    .await;
    assert_eq!(
        o,
        Outcome::Accepted,
        "the username ban expired; log:\n{}",
        b.log_text()
    );

    // Repeat offences double the ban up to ban_max_secs and no further. Attempts made
    // while banned are refused but do not extend the ban (else an attacker could lock the
    // real user out for as long as the attack lasts), so each round waits for the ban
    // before it to end.
    let mut n = 8;
    for (round, expected) in [(2usize, 4u64), (3, 4)] {
        if round == 3 {
            // Three more wrong guesses during the 4 s ban: refused, not counted.
            for _ in 0..3 {
                let local = format!("127.0.0.{n}");
                n += 1;
                let (o, _) =
                    login_from(&local, addr, "ub-during", Some("carol"), Some("guess")).await;
                assert_eq!(o, Outcome::Refused(4));
            }
            tokio::time::sleep(Duration::from_millis(4300)).await;
            assert_eq!(
                ban_seconds(&b, "carol").len(),
                2,
                "attempts during a ban start no new ban"
            );
            let (o, _) = login_from(
                &format!("127.0.0.{n}"),
                addr,
                "ub-carol3",
                Some("carol"),
                Some("carol-pass"),
            )
            .await;
            n += 1;
            assert_eq!(
                o,
                Outcome::Accepted,
                "the ban was not extended by the attempts during it"
            );
        }
        for _ in 0..3 {
            let local = format!("127.0.0.{n}");
            n += 1;
            let (o, _) = login_from(&local, addr, "ub-again", Some("carol"), Some("guess")).await;
            assert_eq!(o, Outcome::Refused(4));
        }
        wait_count(&b, "another ban of carol", round, |v| {
            is_audit(v, "ban") && v["username"] == "carol"
        });
        let seconds = ban_seconds(&b, "carol");
        assert_eq!(
            seconds.last().copied(),
            Some(expected),
            "ban lengths {seconds:?}"
        );
    }
    assert_eq!(
        ban_seconds(&b, "carol"),
        vec![2, 4, 4],
        "never above ban_max_secs"
    );
    assert_eq!(
        b.count_log(|v| is_audit(v, "ban") && v.get("address").is_some()),
        0,
        "no address was banned"
    );
}

fn ban_seconds(b: &BrokerProcess, user: &str) -> Vec<u64> {
    let text = b.log_text();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| is_audit(v, "ban") && v["username"] == user)
        .filter_map(|v| v["seconds"].as_u64())
        .collect()
}

// ---------------------------------------------------------------------------------------
// 4. Password file hot reload
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_file_changes_apply_while_running() {
    let d = Deployment::new();
    passwd_add(&d.passwd, "alice", "alice-pass");
    passwd_add(&d.passwd, "bob", "bob-pass");
    let config = format!(
        "{}{NO_PERSISTENCE}{}[reload]\nwatch_interval_secs = 1\n",
        tcp_password_listener("tcp"),
        passwords_table(&d.passwd)
    );
    let b = d.start(&config, 1);
    let addr = b.addr("tcp");
    let reloads =
        |b: &BrokerProcess| b.count_log(|v| is_audit(v, "reload") && v["what"] == "passwords");

    let (o, mut alice) = login_from(
        "127.0.0.1",
        addr,
        "hr-alice",
        Some("alice"),
        Some("alice-pass"),
    )
    .await;
    assert_eq!(o, Outcome::Accepted);
    let (o, mut bob) = login_from("127.0.0.1", addr, "hr-bob", Some("bob"), Some("bob-pass")).await;
    assert_eq!(o, Outcome::Accepted);

    // Delete bob: he is disconnected, alice is not.
    let r0 = reloads(&b);
    passwd_delete(&d.passwd, "bob");
    let ev = b.wait_audit("user_removed", &[("identity", "bob")]);
    assert_eq!(ev["client_id"], "hr-bob", "{ev}");
    wait_count(&b, "reload what=passwords", r0 + 1, |v| {
        is_audit(v, "reload") && v["what"] == "passwords"
    });
    assert!(closed_by_broker(&mut bob).await, "bob's connection closed");
    assert!(ping(&mut alice).await, "alice stays connected");
    assert_eq!(b.count_log(|v| is_audit(v, "user_removed")), 1, "only bob");
    let (o, _) = login_from("127.0.0.1", addr, "hr-bob2", Some("bob"), Some("bob-pass")).await;
    assert_eq!(o, Outcome::Refused(4), "bob can no longer log in");

    // Add carol: she logs in without a restart.
    let r1 = reloads(&b);
    passwd_add(&d.passwd, "carol", "carol-pass");
    wait_count(&b, "reload after passwd add", r1 + 1, |v| {
        is_audit(v, "reload") && v["what"] == "passwords"
    });
    let (o, _) = login_from(
        "127.0.0.1",
        addr,
        "hr-carol",
        Some("carol"),
        Some("carol-pass"),
    )
    .await;
    assert_eq!(
        o,
        Outcome::Accepted,
        "new user after reload; log:\n{}",
        b.log_text()
    );

    // A broken file is refused; the last good one stays in force.
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&d.passwd)
            .unwrap();
        f.write_all(b"this line has no colon\n").unwrap();
    }
    assert_eq!(mode_of(&d.passwd), 0o600);
    let ev = b.wait_audit("reload_failed", &[("what", "passwords")]);
    let err = ev["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("line 3") && err.contains("no ':'"),
        "the error names the line: {ev}"
    );
    for (id, user, pass) in [
        ("hr-alice2", "alice", "alice-pass"),
        ("hr-carol2", "carol", "carol-pass"),
    ] {
        let (o, _) = login_from("127.0.0.1", addr, id, Some(user), Some(pass)).await;
        assert_eq!(o, Outcome::Accepted, "{user} after the failed reload");
    }
    let (o, _) = login_from("127.0.0.1", addr, "hr-bob3", Some("bob"), Some("bob-pass")).await;
    assert_eq!(o, Outcome::Refused(4), "bob stays removed");
    assert!(ping(&mut alice).await, "alice still connected");
}

// ---------------------------------------------------------------------------------------
// 5. F1: secrets and data open to others stop the start
// ---------------------------------------------------------------------------------------

#[test]
fn files_open_to_others_stop_the_start() {
    let d = Deployment::new();
    let dir = d.dir.path();
    passwd_add(&d.passwd, "alice", "alice-pass");
    let key = dir.join("server.key");
    std::fs::copy(&d.pki.server_key, &key).unwrap();
    let store = dir.join("store");
    std::fs::create_dir(&store).unwrap();
    let config = format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\ntransport = \"tls\"\n[listener.tls]\ncert_file = {:?}\nkey_file = {key:?}\nclient_ca_file = {:?}\nclient_certificates = \"required\"\n{}[persistence]\nenabled = true\npath = {store:?}\n{}",
        d.pki.server_cert,
        d.pki.ca_path,
        tcp_password_listener("tcp"),
        passwords_table(&d.passwd)
    );
    let cases: [(&Path, u32, &str); 3] = [
        (&key, 0o644, "chmod 600"),
        (&d.passwd, 0o644, "chmod 600"),
        (&store, 0o755, "chmod 700"),
    ];
    for (path, mode, fix) in cases {
        set_mode(&key, 0o600);
        set_mode(&d.passwd, 0o600);
        set_mode(&store, 0o700);
        set_mode(path, mode);
        let mut p = BrokerProcess::spawn(&config, dir);
        let status = p
            .wait_exit(T)
            .unwrap_or_else(|| panic!("broker started with {} mode {mode:o}", path.display()));
        // The exit can be seen before the reader thread has collected stderr: wait for
        // the message (or the end of stderr).
        let message = p.wait_log(T, |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains(fix) && m.contains(path.to_str().unwrap()))
        });
        let log = p.log_text();
        assert_eq!(status.code(), Some(64), "{}: {log}", path.display());
        assert!(
            message.is_some(),
            "{} mode {mode:o}: the message names the file and says {fix:?}:\n{log}",
            path.display()
        );
        assert_eq!(
            mode_of(path),
            mode,
            "the broker does not change modes itself"
        );
    }
    // Control: with private files the same configuration starts.
    set_mode(&key, 0o600);
    set_mode(&d.passwd, 0o600);
    set_mode(&store, 0o700);
    let mut p = BrokerProcess::start(&config, dir, 2);
    assert!(p.terminate().success());
}

// ---------------------------------------------------------------------------------------
// 6. T4: TLS versions and ciphers
// ---------------------------------------------------------------------------------------

#[test]
fn old_tls_versions_and_null_ciphers_fail_the_handshake() {
    require_program("openssl", "apt-get install openssl");
    let b = TestBroker::start(BrokerConfig {
        wss: false,
        tcp: false,
        persistence: false,
        ..BrokerConfig::default()
    });
    let p = &b.process;
    let port = b.addr("tls").port().to_string();
    let client = b.pki.client("t4-client");
    let s_client = |args: &[&str], cert: bool| {
        let mut c = Command::new("openssl");
        c.args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-servername", "localhost", "-CAfile"])
            .arg(&b.pki.ca_path)
            .args(args);
        if cert {
            c.arg("-cert")
                .arg(&client.cert_path)
                .arg("-key")
                .arg(&client.key_path);
        }
        let (status, out, err) = run_with_timeout(&mut c, T);
        (status.expect("s_client finished"), out, err)
    };
    let failed = |p: &BrokerProcess| p.count_log(|v| is_audit(v, "tls_handshake_failed"));
    let before_connect = |p: &BrokerProcess| {
        p.count_log(|v| {
            v["message"] == "closed before CONNECT"
                || v["message"] == "connection failed before CONNECT"
        })
    };

    // Refused. `DEFAULT:@SECLEVEL=0` makes OpenSSL 3 offer TLS 1.0/1.1 (and NULL ciphers)
    // at all: at its default security level some builds refuse to send such a ClientHello
    // ("no protocols available"), which would prove nothing about the broker.
    let refused: [(&str, &[&str]); 3] = [
        ("TLS 1.0", &["-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"]),
        ("TLS 1.1", &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]),
        ("NULL ciphers", &["-tls1_2", "-cipher", "NULL:@SECLEVEL=0"]),
    ];
    for (what, args) in refused {
        let n = failed(p);
        let (status, out, err) = s_client(args, true);
        assert!(
            !err.contains("no protocols available") && !err.contains("no cipher match"),
            "{what}: openssl did not even offer it, the test proves nothing: {err}"
        );
        assert!(
            !status.success(),
            "{what}: handshake completed:\n{out}\n{err}"
        );
        assert!(
            out.contains("Cipher is (NONE)"),
            "{what}: no cipher negotiated:\n{out}"
        );
        wait_count(p, "tls_handshake_failed", n + 1, |v| {
            is_audit(v, "tls_handshake_failed")
        });
    }

    // Completed, with the client certificate verified by the broker.
    for (what, flag, banner) in [
        ("TLS 1.2", "-tls1_2", "New, TLSv1.2, Cipher is "),
        ("TLS 1.3", "-tls1_3", "New, TLSv1.3, Cipher is "),
    ] {
        let (n_failed, n_ok) = (failed(p), before_connect(p));
        let (status, out, err) = s_client(&[flag], true);
        assert!(status.success(), "{what}: {out}\n{err}");
        assert!(out.contains(banner), "{what}: {out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{what}: {out}");
        // The broker accepted the certificate and waited for CONNECT until s_client closed.
        wait_count(p, "closed before CONNECT", n_ok + 1, |v| {
            v["message"] == "closed before CONNECT"
                || v["message"] == "connection failed before CONNECT"
        });
        assert_eq!(failed(p), n_failed, "{what}: no handshake failure logged");
    }
    // Control: without a client certificate TLS 1.2 does not complete on this listener.
    let (status, out, _) = s_client(&["-tls1_2"], false);
    assert!(
        !status.success(),
        "TLS 1.2 without a client certificate: {out}"
    );
}

// ---------------------------------------------------------------------------------------
// 7. R2: connection flood up to the file-descriptor limit
// ---------------------------------------------------------------------------------------

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_survives_emfile_and_serves_again() {
    require_program("prlimit", "apt-get install util-linux");
    let mut b = TestBroker::start(BrokerConfig {
        tls: false,
        wss: false,
        persistence: false,
        extra: "[limits]\nmax_connections = 1000\n".into(),
        ..BrokerConfig::default()
    });
    let pid = b.process.pid();
    // A low descriptor limit on the running broker (as `ulimit -n 64` would at start).
    let (status, out, err) = run_with_timeout(
        Command::new("prlimit")
            .arg("--pid")
            .arg(pid.to_string())
            .arg("--nofile=64:64"),
        T,
    );
    assert!(status.is_some_and(|s| s.success()), "prlimit: {out} {err}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("64")),
        "{limits}"
    );
    let base = open_fds(pid);
    assert!(base < 40, "broker already uses {base} descriptors");

    let addr = b.addr("tcp");
    // The kernel completes these handshakes into the listen backlog; the broker accepts
    // until it runs out of descriptors.
    let mut flood: Vec<std::net::TcpStream> = (0..120)
        .map(|i| {
            std::net::TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("flood connection {i}: {e}"))
        })
        .collect();
    let ev = b
        .process
        .wait_log(T, |v| v["message"] == "accept failed")
        .unwrap_or_else(|| {
            panic!(
                "no 'accept failed' (EMFILE) logged:\n{}",
                b.process.log_text()
            )
        });
    let e = ev["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("Too many open files") || e.contains("os error 24"),
        "EMFILE: {ev}"
    );
    assert!(
        b.process.wait_exit(Duration::ZERO).is_none(),
        "broker still running"
    );

    // While at the limit, an already accepted connection is served.
    {
        use std::io::{Read, Write as _};
        let first = &mut flood[0];
        first.set_read_timeout(Some(T)).unwrap();
        first
            .write_all(&connect_packet("r2-early", None, None))
            .unwrap();
        let mut ack = [0u8; 4];
        first.read_exact(&mut ack).expect("CONNACK while at EMFILE");
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    }

    drop(flood);
    let mut c = Client::connect(options("r2-after", &Via::Tcp(addr)))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "client after the flood: {e}\nlog:\n{}",
                b.process.log_text()
            )
        });
    c.subscribe("r2/t", QoS::AtLeastOnce).await;
    c.publish("r2/t", QoS::AtLeastOnce, false, b"after-flood")
        .await;
    let p = c.next_publish(T).await.expect("round trip after EMFILE");
    assert_eq!(&p.payload[..], b"after-flood");
    assert!(
        b.process.wait_exit(Duration::ZERO).is_none(),
        "broker still running"
    );
    c.disconnect().await;
}
