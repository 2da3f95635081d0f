//! The Debian mosquitto clients (`mosquitto_pub`, `mosquitto_sub`, libmosquitto 2.0) against
//! the real broker binary: QoS 0/1/2, retained messages, wills on SIGKILL, persistent
//! sessions across restarts (SIGTERM and kill -9), TLS with and without client
//! certificates, and the `$SYS` tree (readable, never writable).
//!
//! Background subscribers are synchronised without sleeps: each subscribes, among its
//! filters, to a topic holding a retained "ready" marker published beforehand; once it
//! prints the marker, its SUBSCRIBE is in effect. A message that must *not* arrive is
//! checked by publishing a later message on the same connection path and asserting that
//! only the later one was printed (one connection delivers in order).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bulwark_integration_tests::{
    require_program, run_with_timeout, BrokerConfig, ClientCert, TestBroker,
};

const T: Duration = Duration::from_secs(15);

/// `mosquitto_sub` output format used where QoS and the retain flag matter.
const FMT: &str = "%t|%q|%r|%p";

fn require_mosquitto() {
    require_program("mosquitto_sub", "apt-get install mosquitto-clients");
    require_program("mosquitto_pub", "apt-get install mosquitto-clients");
}

/// `prog` with the connection arguments for `listener` of `b`: CA, host name matching the
/// server certificate, port, client id and (optionally) a client certificate.
fn mosq(
    prog: &str,
    b: &TestBroker,
    listener: &str,
    cert: Option<&ClientCert>,
    client_id: &str,
) -> Command {
    let mut c = Command::new(prog);
    c.arg("--cafile")
        .arg(&b.pki.ca_path)
        .args(["-h", "localhost", "-p"])
        .arg(b.addr(listener).port().to_string())
        .args(["-i", client_id]);
    if let Some(cert) = cert {
        c.arg("--cert")
            .arg(&cert.cert_path)
            .arg("--key")
            .arg(&cert.key_path);
    }
    c
}

/// Runs a finite mosquitto command; returns (exit status, stdout, stderr).
fn run(cmd: &mut Command) -> (Option<ExitStatus>, String, String) {
    run_with_timeout(cmd, T)
}

/// Runs `mosquitto_pub` over TLS with `cert` and asserts it succeeded.
fn publish(b: &TestBroker, cert: Option<&ClientCert>, client_id: &str, args: &[&str]) {
    let (status, out, err) = run(mosq("mosquitto_pub", b, "tls", cert, client_id).args(args));
    assert!(
        status.is_some_and(|s| s.success()),
        "mosquitto_pub {args:?} failed: {status:?}\nstdout: {out}\nstderr: {err}\nbroker log:\n{}",
        b.process.log_text()
    );
}

/// Lines a background process printed, and whether its stdout reached EOF.
type Lines = Arc<(Mutex<(Vec<String>, bool)>, Condvar)>;

/// A background `mosquitto_sub` whose stdout lines are collected as they arrive.
struct Sub {
    name: String,
    child: Child,
    lines: Lines,
    stderr: Arc<Mutex<String>>,
}

impl Sub {
    fn spawn(name: &str, mut cmd: Command) -> Sub {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let lines: Lines = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
        let out = child.stdout.take().unwrap();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let (m, cv) = &*l2;
                m.lock().unwrap().0.push(line);
                cv.notify_all();
            }
            let (m, cv) = &*l2;
            m.lock().unwrap().1 = true;
            cv.notify_all();
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let e2 = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                e2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Sub {
            name: name.to_string(),
            child,
            lines,
            stderr,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.0.lock().unwrap().0.clone()
    }

    /// Waits until a printed line equals `want`.
    fn wait_line(&self, b: &TestBroker, want: &str) {
        let deadline = Instant::now() + T;
        let (m, cv) = &*self.lines;
        let mut st = m.lock().unwrap();
        loop {
            if st.0.iter().any(|l| l == want) {
                return;
            }
            let now = Instant::now();
            if st.1 || now >= deadline {
                let lines = st.0.clone();
                drop(st);
                panic!(
                    "{}: no line {want:?}; printed {lines:?}; stderr: {}\nbroker log:\n{}",
                    self.name,
                    self.stderr.lock().unwrap(),
                    b.process.log_text()
                );
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// SIGKILL: the client gets no chance to send DISCONNECT.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `mosquitto_sub` in the background over TLS, subscribed to `filters` plus
/// `ready_topic` (which must hold the retained payload "ready"), and returns once it has
/// connected (audit `connect`) and printed the marker (its SUBSCRIBE is in effect).
/// `ready_line` is how the marker is printed with `args`' output format.
fn background_sub(
    b: &TestBroker,
    cert: Option<&ClientCert>,
    client_id: &str,
    filters: &[&str],
    args: &[&str],
    ready_line: &str,
) -> Sub {
    let mut cmd = mosq("mosquitto_sub", b, "tls", cert, client_id);
    for f in filters {
        cmd.args(["-t", f]);
    }
    // A subscriber never outlives a test; -W makes sure of it even if Drop does not run.
    cmd.args(["-W", "40"]).args(args);
    let sub = Sub::spawn(client_id, cmd);
    b.process.wait_audit("connect", &[("client_id", client_id)]);
    sub.wait_line(b, ready_line);
    sub
}

#[test]
fn tls_client_certificates_qos_0_1_2() {
    require_mosquitto();
    let b = TestBroker::start(BrokerConfig::default());
    let sub_cert = b.pki.client("mq-sub");
    let pub_cert = b.pki.client("mq-pub");
    publish(
        &b,
        Some(&pub_cert),
        "marker",
        &["-t", "plant/ready", "-m", "ready", "-r", "-q", "1"],
    );
    // Two subscribers to the same filter, at QoS 2 and QoS 1; the retained marker was
    // published at QoS 1 and is delivered at min(1, subscription QoS) = 1 to both.
    let s2 = background_sub(
        &b,
        Some(&sub_cert),
        "sub-q2",
        &["plant/#"],
        &["-q", "2", "-F", FMT],
        "plant/ready|1|1|ready",
    );
    let s1 = background_sub(
        &b,
        Some(&sub_cert),
        "sub-q1",
        &["plant/#"],
        &["-q", "1", "-F", FMT],
        "plant/ready|1|1|ready",
    );
    b.process.wait_audit(
        "connect",
        &[("client_id", "sub-q2"), ("identity", "mq-sub")],
    );

    let mut want2 = vec!["plant/ready|1|1|ready".to_string()];
    let mut want1 = want2.clone();
    for qos in 0..3u8 {
        let topic = format!("plant/line1/m{qos}");
        let payload = format!("v{qos} with spaces");
        publish(
            &b,
            Some(&pub_cert),
            &format!("pub-{qos}"),
            &["-t", &topic, "-m", &payload, "-q", &qos.to_string()],
        );
        // Delivered at min(publish QoS, subscription QoS), live (retain flag 0).
        let l2 = format!("{topic}|{qos}|0|{payload}");
        let l1 = format!("{topic}|{}|0|{payload}", qos.min(1));
        s2.wait_line(&b, &l2);
        s1.wait_line(&b, &l1);
        want2.push(l2);
        want1.push(l1);
    }

    // A 200 kB payload at QoS 2 (several TLS records, several reads).
    let dir = tempfile::tempdir().unwrap();
    let big: String = (0..20_000).map(|i| format!("{:010}", i)).collect();
    let big_path = dir.path().join("big.txt");
    std::fs::write(&big_path, &big).unwrap();
    publish(
        &b,
        Some(&pub_cert),
        "pub-big",
        &[
            "-t",
            "plant/big",
            "-f",
            big_path.to_str().unwrap(),
            "-q",
            "2",
        ],
    );
    let l2 = format!("plant/big|2|0|{big}");
    s2.wait_line(&b, &l2);
    want2.push(l2);

    assert_eq!(
        s2.lines(),
        want2,
        "QoS 2 subscriber: every message once, in order"
    );
    s1.wait_line(&b, &format!("plant/big|1|0|{big}"));
    want1.push(format!("plant/big|1|0|{big}"));
    assert_eq!(
        s1.lines(),
        want1,
        "QoS 1 subscriber: every message once, in order"
    );
}

#[test]
fn retained_set_replace_clear() {
    require_mosquitto();
    let b = TestBroker::start(BrokerConfig::default());
    let app = b.pki.client("mq-app");
    let c = Some(&app);
    publish(&b, c, "r-1", &["-t", "cfg/a", "-m", "one", "-r", "-q", "1"]);
    publish(&b, c, "r-2", &["-t", "cfg/a", "-m", "two", "-r", "-q", "2"]);
    publish(&b, c, "r-3", &["-t", "cfg/b", "-m", "bee", "-r", "-q", "1"]);
    // QoS 0 has no acknowledgement; the broker handles a connection's packets in order,
    // so its audit `disconnect` (after the DISCONNECT packet) orders the PUBLISH before it.
    publish(
        &b,
        c,
        "r-4",
        &["-t", "cfg/c", "-m", "zero", "-r", "-q", "0"],
    );
    b.process.wait_audit(
        "disconnect",
        &[("client_id", "r-4"), ("reason", "client_disconnect")],
    );

    // A new subscriber gets the latest retained message per topic, with the retain flag,
    // at min(stored QoS, subscription QoS).
    let (status, out, err) = run(mosq("mosquitto_sub", &b, "tls", c, "reader-1")
        .args(["-t", "cfg/+", "-q", "1", "-C", "3", "-W", "10", "-F", FMT]));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} {out} {err}"
    );
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    assert_eq!(
        got,
        vec!["cfg/a|1|1|two", "cfg/b|1|1|bee", "cfg/c|0|1|zero"]
    );

    // Live publishes to a subscribed topic arrive with retain = 0, the clearing one too.
    let s = background_sub(
        &b,
        c,
        "reader-2",
        &["cfg/a"],
        &["-q", "1", "-F", FMT],
        "cfg/a|1|1|two",
    );
    publish(
        &b,
        c,
        "r-5",
        &["-t", "cfg/a", "-m", "three", "-r", "-q", "1"],
    );
    s.wait_line(&b, "cfg/a|1|0|three");
    publish(&b, c, "r-6", &["-t", "cfg/a", "-n", "-r", "-q", "1"]);
    s.wait_line(&b, "cfg/a|1|0|");
    assert_eq!(
        s.lines(),
        vec!["cfg/a|1|1|two", "cfg/a|1|0|three", "cfg/a|1|0|"]
    );

    // After the clear, a new subscription to cfg/a gets nothing retained: its subscriber
    // sees cfg/b's retained message (its ready marker) and then only a later live cfg/a.
    let s3 = background_sub(
        &b,
        c,
        "reader-3",
        &["cfg/a", "cfg/b"],
        &["-q", "1", "-F", FMT],
        "cfg/b|1|1|bee",
    );
    publish(&b, c, "r-7", &["-t", "cfg/a", "-m", "live", "-q", "1"]);
    s3.wait_line(&b, "cfg/a|1|0|live");
    assert_eq!(
        s3.lines(),
        vec!["cfg/b|1|1|bee", "cfg/a|1|0|live"],
        "a cleared retained message must not be delivered"
    );
}

#[test]
fn will_on_sigkill_not_on_normal_exit() {
    require_mosquitto();
    let b = TestBroker::start(BrokerConfig::default());
    let ops = b.pki.client("mq-ops");
    let dev = b.pki.client("mq-dev");
    publish(
        &b,
        Some(&ops),
        "m-1",
        &["-t", "watch/ready", "-m", "ready", "-r", "-q", "1"],
    );
    publish(
        &b,
        Some(&ops),
        "m-2",
        &["-t", "polite/go", "-m", "go", "-r", "-q", "1"],
    );
    let watcher = background_sub(
        &b,
        Some(&ops),
        "watcher",
        &["status/#", "watch/ready"],
        &["-q", "1", "-v"],
        "watch/ready ready",
    );

    // A subscriber with a will that exits normally after one message (-C 1): it sends
    // DISCONNECT, so its will is discarded.
    let (status, out, err) = run(
        mosq("mosquitto_sub", &b, "tls", Some(&dev), "polite").args([
            "-t",
            "polite/go",
            "-C",
            "1",
            "-W",
            "10",
            "--will-topic",
            "status/polite",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
        ]),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} {out} {err}"
    );
    assert_eq!(out.trim_end(), "go");
    b.process.wait_audit(
        "disconnect",
        &[("client_id", "polite"), ("reason", "client_disconnect")],
    );

    // A subscriber with a retained will, killed with SIGKILL: the will is published.
    let mut crashy = Sub::spawn("crashy", {
        let mut c = mosq("mosquitto_sub", &b, "tls", Some(&dev), "crashy");
        c.args([
            "-t",
            "crashy/in",
            "-W",
            "40",
            "--will-topic",
            "status/crashy",
            "--will-payload",
            "offline",
            "--will-qos",
            "1",
            "--will-retain",
        ]);
        c
    });
    b.process.wait_audit("connect", &[("client_id", "crashy")]);
    crashy.kill9();
    watcher.wait_line(&b, "status/crashy offline");
    assert_eq!(
        watcher.lines(),
        vec!["watch/ready ready", "status/crashy offline"],
        "only the killed client's will is published"
    );
    let d = b
        .process
        .wait_audit("disconnect", &[("client_id", "crashy")]);
    assert_ne!(d["reason"], "client_disconnect", "{d}");
    let wills = |topic: &str| {
        b.process
            .count_log(|v| v["message"] == "publishing will" && v["topic"] == topic)
    };
    assert_eq!(wills("status/polite"), 0, "no will after DISCONNECT");
    assert_eq!(wills("status/crashy"), 1, "one will after SIGKILL");

    // The will was retained (and at its QoS 1).
    let (status, out, err) = run(mosq("mosquitto_sub", &b, "tls", Some(&ops), "late").args([
        "-t",
        "status/crashy",
        "-q",
        "1",
        "-C",
        "1",
        "-W",
        "10",
        "-F",
        FMT,
    ]));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} {out} {err}"
    );
    assert_eq!(out.trim_end(), "status/crashy|1|1|offline");
}

/// A `mosquitto_sub -c` session gets what was published while it was offline, optionally
/// across a broker restart (`Some(kill9)`).
fn persistent_session(restart: Option<bool>) {
    require_mosquitto();
    let mut b = TestBroker::start(BrokerConfig::default());
    let hist = b.pki.client("historian");
    let plc = b.pki.client("plc");
    publish(
        &b,
        Some(&plc),
        "m-1",
        &["-t", "hist/ready", "-m", "ready", "-r", "-q", "1"],
    );
    let sub = |b: &TestBroker, count: &str| {
        run(mosq("mosquitto_sub", b, "tls", Some(&hist), "hist").args([
            "-c",
            "-q",
            "1",
            "-t",
            "line/#",
            "-t",
            "hist/ready",
            "-v",
            "-C",
            count,
            "-W",
            "15",
        ]))
    };
    // First connection: subscribes, prints the retained marker (so the subscription is in
    // effect), and exits normally after -C 1, leaving its session behind.
    let (status, out, err) = sub(&b, "1");
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} {out} {err}"
    );
    assert_eq!(out.trim_end(), "hist/ready ready");
    b.process.wait_audit(
        "disconnect",
        &[("client_id", "hist"), ("reason", "client_disconnect")],
    );

    let mut want = vec![];
    for i in 0..6 {
        let qos = if i == 5 { "2" } else { "1" };
        let topic = format!("line/{i}");
        let payload = format!("m{i}");
        publish(
            &b,
            Some(&plc),
            &format!("p-{i}"),
            &["-t", &topic, "-m", &payload, "-q", qos],
        );
        want.push(format!("{topic} {payload}"));
    }

    if let Some(kill9) = restart {
        b.restart(kill9);
    }

    // Second connection: the queued messages, in order, plus the retained marker again
    // (mosquitto_sub subscribes again on every connection).
    let (status, out, err) = sub(&b, "7");
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\nstdout: {out}\nstderr: {err}\nbroker log:\n{}",
        b.process.log_text()
    );
    let lines: Vec<&str> = out.lines().collect();
    let queued: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("line/"))
        .collect();
    assert_eq!(queued, want, "queued while offline, in order, once");
    assert!(lines.contains(&"hist/ready ready"), "{lines:?}");
    let resumed = b.process.wait_log(T, |v| {
        v["target"] == "audit"
            && v["event"] == "connect"
            && v["client_id"] == "hist"
            && v["clean_session"] == false
            && v["session_present"] == true
    });
    assert!(
        resumed.is_some(),
        "the second connection must resume the session (session_present = 1); log:\n{}",
        b.process.log_text()
    );
}

#[test]
fn persistent_session_gets_messages_published_while_offline() {
    persistent_session(None);
}

#[test]
fn persistent_session_survives_graceful_restart() {
    persistent_session(Some(false));
}

#[test]
fn persistent_session_survives_kill9_with_sync_durability() {
    persistent_session(Some(true));
}

#[test]
fn tls_without_client_certificate() {
    require_mosquitto();
    // Optional certificates plus anonymous access (loopback): mosquitto without --cert
    // connects, publishes and subscribes.
    let b = TestBroker::start(BrokerConfig {
        client_certificates: "optional",
        tls_anonymous: true,
        ..BrokerConfig::default()
    });
    let with_cert = b.pki.client("mq-cert");
    publish(
        &b,
        None,
        "m-1",
        &["-t", "anon/ready", "-m", "ready", "-r", "-q", "1"],
    );
    let s = background_sub(
        &b,
        None,
        "anon-sub",
        &["anon/#"],
        &["-q", "2", "-F", FMT],
        "anon/ready|1|1|ready",
    );
    let ev = b
        .process
        .wait_audit("connect", &[("client_id", "anon-sub")]);
    assert_eq!(ev["identity"], "", "no certificate, no identity: {ev}");
    publish(
        &b,
        None,
        "anon-pub",
        &["-t", "anon/x", "-m", "from-anon", "-q", "2"],
    );
    s.wait_line(&b, "anon/x|2|0|from-anon");
    publish(
        &b,
        Some(&with_cert),
        "cert-pub",
        &["-t", "anon/y", "-m", "from-cert", "-q", "1"],
    );
    s.wait_line(&b, "anon/y|1|0|from-cert");
    assert_eq!(
        s.lines(),
        vec![
            "anon/ready|1|1|ready",
            "anon/x|2|0|from-anon",
            "anon/y|1|0|from-cert"
        ]
    );

    // On the default listener (certificates required) the same client is refused.
    let strict = TestBroker::start(BrokerConfig::default());
    let (status, out, err) = run(mosq("mosquitto_pub", &strict, "tls", None, "no-cert")
        .args(["-t", "x", "-m", "y", "-q", "1"]));
    assert!(
        status.is_some_and(|s| !s.success()),
        "mosquitto_pub without a certificate must fail: {status:?} {out} {err}"
    );
    strict.process.wait_audit("tls_handshake_failed", &[]);
    assert_eq!(
        strict.process.count_log(|v| v["event"] == "connect"),
        0,
        "no client connected"
    );
}

#[test]
fn sys_version_readable_and_sys_publish_refused() {
    require_mosquitto();
    let b = TestBroker::start(BrokerConfig::default());
    let app = b.pki.client("mq-app");
    let c = Some(&app);
    let (status, out, err) = run(mosq("mosquitto_sub", &b, "tls", c, "sys-reader").args([
        "-t",
        "$SYS/broker/version",
        "-C",
        "1",
        "-W",
        "15",
    ]));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} {out} {err}"
    );
    assert!(out.starts_with("bulwark-broker"), "{out:?}");

    publish(
        &b,
        c,
        "m-1",
        &["-t", "sysw/ready", "-m", "ready", "-r", "-q", "1"],
    );
    let watcher = background_sub(
        &b,
        c,
        "sys-watch",
        &["$SYS/x", "sysw/ready", "sysw/after"],
        &["-v"],
        "sysw/ready ready",
    );

    // QoS 1: the broker closes the connection instead of acknowledging; mosquitto_pub
    // reports the lost connection with a non-zero exit status.
    let (status, out, err) = run(mosq("mosquitto_pub", &b, "tls", c, "forger-1")
        .args(["-t", "$SYS/x", "-m", "forged", "-q", "1", "-r"]));
    assert!(
        status.is_some_and(|s| !s.success()),
        "a refused QoS 1 publish must fail: {status:?} {out} {err}"
    );
    b.process.wait_audit(
        "publish_refused",
        &[("client_id", "forger-1"), ("topic", "$SYS/x")],
    );
    b.process.wait_audit(
        "disconnect",
        &[("client_id", "forger-1"), ("reason", "protocol_error")],
    );
    // QoS 0: mosquitto_pub may finish before it notices, but the broker refuses it alike.
    let _ = run(mosq("mosquitto_pub", &b, "tls", c, "forger-0")
        .args(["-t", "$SYS/x", "-m", "forged0", "-q", "0"]));
    b.process.wait_audit(
        "publish_refused",
        &[("client_id", "forger-0"), ("topic", "$SYS/x")],
    );

    // Nothing was delivered: the subscriber sees only a later message.
    publish(
        &b,
        c,
        "m-2",
        &["-t", "sysw/after", "-m", "after", "-q", "1"],
    );
    watcher.wait_line(&b, "sysw/after after");
    assert_eq!(
        watcher.lines(),
        vec!["sysw/ready ready", "sysw/after after"]
    );
    // And nothing was retained: a new subscriber to $SYS/x gets only the live message.
    let late = background_sub(
        &b,
        c,
        "sys-late",
        &["$SYS/x", "sysw/ready", "sysw/after"],
        &["-v"],
        "sysw/ready ready",
    );
    publish(
        &b,
        c,
        "m-3",
        &["-t", "sysw/after", "-m", "after2", "-q", "1"],
    );
    late.wait_line(&b, "sysw/after after2");
    assert_eq!(late.lines(), vec!["sysw/ready ready", "sysw/after after2"]);
}
