//! Authorization end to end (SECURITY-CASES.md, "Authentication and authorization", and
//! P14 for `$tunnel`): the real broker binary with an ACL file, clients identified by the
//! CN of their certificate, exact packets wherever a return code matters.
//!
//! - A1: `%u`/`%c` never grant anything to identities or client ids `#`, `+` or `a/b`.
//! - A2: `#` needs an explicit grant and never yields `$SYS`; `$SYS` needs its own grant.
//! - Deny wins over grants in either order (subscribe and publish).
//! - A4: wills checked at CONNECT (CONNACK 5) and again when they fire (dropped, audited).
//! - A7: an ACL file without rules, or with a malformed line, stops the broker at start-up.
//! - ACL hot reload: live subscriptions revoked, queued messages of an offline session
//!   filtered, a malformed file keeps the last good ACL.
//! - `clientid` rules; an empty client id becomes the identity.
//! - A8/A9: each listener enforces its own authentication; wss follows the same ACL as tls.
//! - P14: a client PUBLISH to `$tunnel/...` closes the connection even with a grant.
//! - `bulwark-broker acl check`: exit codes and explanations.
//!
//! Nothing waits on sleeps: audit events and acknowledgements order everything, and a
//! message that must not arrive is proven absent by a later marker arriving first.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_integration_tests::mqtt::{self, options, Client, Via};
use bulwark_integration_tests::{
    bin_path, run_with_timeout, BrokerConfig, BrokerProcess, ClientCert, TestBroker,
};
use bulwark_protocol::{
    decode, encode, ConnAck, Connect, ConnectReturnCode, DecodeLimits, LastWill, Packet,
    ProtocolLevel, Publish, QoS, Subscribe, SubscribeReturnCode, TopicFilter, TopicName,
};
use bytes::{Bytes, BytesMut};

const T: Duration = Duration::from_secs(10);

const OK1: SubscribeReturnCode = SubscribeReturnCode::Success(QoS::AtLeastOnce);
const FAIL: SubscribeReturnCode = SubscribeReturnCode::Failure;

// ---------------------------------------------------------------------------------------
// ACL files and brokers
// ---------------------------------------------------------------------------------------

/// An ACL file in its own temporary directory, mode 0644.
struct AclFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write_with_mode(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl AclFile {
    fn new(text: &str) -> AclFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl.conf");
        write_with_mode(&path, text, 0o644);
        AclFile { _dir: dir, path }
    }

    /// Replaces the file atomically (temporary file, then rename), so the broker never
    /// reads half of it.
    fn replace(&self, text: &str) {
        let tmp = self.path.with_extension("tmp");
        write_with_mode(&tmp, text, 0o644);
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    fn toml(&self) -> String {
        format!("[auth]\nacl_file = {:?}\n", self.path)
    }
}

/// The default test broker (tls and wss with required client certificates, anonymous tcp
/// on loopback) with `acl` and the extra TOML `more`.
fn start(acl: &AclFile, more: &str) -> TestBroker {
    TestBroker::start(BrokerConfig {
        extra: format!("{more}{}", acl.toml()),
        ..BrokerConfig::default()
    })
}

/// A client certificate whose CN is `cn` (any string: `#`, `+`, `a/b`), as a rustls
/// client configuration. Nothing is written to disk, so `/` in the CN is fine.
fn identity(b: &TestBroker, cn: &str) -> Arc<rustls::ClientConfig> {
    let c = b.pki.ca.issue_client(cn).expect("client certificate");
    let cert = ClientCert {
        name: cn.to_string(),
        serial: c.serial,
        cert_path: PathBuf::new(),
        key_path: PathBuf::new(),
        cert_pem: c.cert_pem,
        key_pem: c.key_pem,
    };
    b.pki.rustls_client_config(Some(&cert))
}

/// Waits for an audit event `name` with every `fields` pair equal and `extra` true.
fn wait_audit_where(
    b: &TestBroker,
    name: &str,
    fields: &[(&str, &str)],
    extra: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    b.process
        .wait_log(Duration::from_secs(20), |v| {
            v["target"] == "audit"
                && v["event"] == name
                && fields.iter().all(|(k, val)| v[*k].as_str() == Some(*val))
                && extra(v)
        })
        .unwrap_or_else(|| {
            panic!(
                "no audit event {name} {fields:?} (with the extra condition); log:\n{}",
                b.process.log_text()
            )
        })
}

/// The listener a connection's log line belongs to (from the `conn` span).
fn listener_of(v: &serde_json::Value) -> Option<&str> {
    v["span"]["listener"].as_str()
}

// ---------------------------------------------------------------------------------------
// A raw MQTT client over TCP or TLS
// ---------------------------------------------------------------------------------------

trait Io: Read + Write + Send {}
impl<S: Read + Write + Send> Io for S {}

/// A byte-exact MQTT 3.1.1 client. Publishes that arrive while it waits for an
/// acknowledgement are kept, in order, for [`Peer::next_publish`].
struct Peer {
    name: String,
    io: Box<dyn Io>,
    /// The socket under `io`, for read timeouts and abrupt closes.
    sock: TcpStream,
    buf: BytesMut,
    pending: VecDeque<Publish>,
    pkid: u16,
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl Peer {
    fn tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>, name: &str) -> Peer {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_nodelay(true).unwrap();
        let server = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(config, server).unwrap();
        let stream = rustls::StreamOwned::new(conn, sock.try_clone().unwrap());
        Peer {
            name: name.to_string(),
            io: Box::new(stream),
            sock,
            buf: BytesMut::new(),
            pending: VecDeque::new(),
            pkid: 0,
        }
    }

    fn next_pkid(&mut self) -> u16 {
        self.pkid = self.pkid % 60_000 + 1;
        self.pkid
    }

    fn send(&mut self, p: &Packet) {
        let mut b = BytesMut::new();
        encode(p, &mut b).unwrap();
        self.io.write_all(&b).unwrap();
        self.io.flush().unwrap();
    }

    /// Sends CONNECT and returns the CONNACK.
    fn connect(&mut self, c: Connect) -> ConnAck {
        self.send(&Packet::Connect(c));
        match self.try_recv(T) {
            Some(Packet::ConnAck(a)) => a,
            other => panic!("{}: expected CONNACK, got {other:?}", self.name),
        }
    }

    fn try_recv(&mut self, timeout: Duration) -> Option<Packet> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = decode(&mut self.buf, &DecodeLimits::default())
                .unwrap_or_else(|e| panic!("{}: invalid packet from the broker: {e}", self.name))
            {
                return Some(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.io.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(_) => return None,
            }
        }
    }

    fn recv(&mut self) -> Packet {
        self.try_recv(T)
            .unwrap_or_else(|| panic!("{}: no packet from the broker within {T:?}", self.name))
    }

    /// SUBSCRIBE (QoS 1 each) and the SUBACK's return codes.
    fn subscribe(&mut self, filters: &[&str]) -> Vec<SubscribeReturnCode> {
        let pkid = self.next_pkid();
        self.send(&Packet::Subscribe(Subscribe {
            pkid,
            filters: filters
                .iter()
                .map(|f| (TopicFilter::new(*f).unwrap(), QoS::AtLeastOnce))
                .collect(),
        }));
        loop {
            match self.recv() {
                Packet::SubAck(a) => {
                    assert_eq!(a.pkid, pkid);
                    return a.return_codes;
                }
                Packet::Publish(p) => self.pending.push_back(p),
                other => panic!("{}: expected SUBACK, got {other:?}", self.name),
            }
        }
    }

    /// QoS 1 PUBLISH; waits for its PUBACK (which the broker also sends for a PUBLISH the
    /// ACL refuses: MQTT 3.1.1 has no negative acknowledgement).
    fn publish(&mut self, topic: &str, payload: &str) {
        let pkid = self.next_pkid();
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TopicName::new(topic).unwrap(),
            pkid: Some(pkid),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }));
        loop {
            match self.recv() {
                Packet::PubAck(id) if id == pkid => return,
                Packet::Publish(p) => self.pending.push_back(p),
                other => panic!(
                    "{}: expected PUBACK {pkid} for {topic}, got {other:?}",
                    self.name
                ),
            }
        }
    }

    /// The next PUBLISH (acknowledged if QoS 1).
    fn try_next_publish(&mut self, timeout: Duration) -> Option<Publish> {
        let p = match self.pending.pop_front() {
            Some(p) => p,
            None => loop {
                match self.try_recv(timeout)? {
                    Packet::Publish(p) => break p,
                    Packet::PingResp => {}
                    other => panic!("{}: expected PUBLISH, got {other:?}", self.name),
                }
            },
        };
        if let (QoS::AtLeastOnce, Some(id)) = (p.qos, p.pkid) {
            self.send(&Packet::PubAck(id));
        }
        Some(p)
    }

    fn next_publish(&mut self) -> Publish {
        self.try_next_publish(T)
            .unwrap_or_else(|| panic!("{}: no PUBLISH within {T:?}", self.name))
    }

    /// Asserts that the next message is on `topic` (nothing else came before it).
    fn assert_next(&mut self, topic: &str) -> Publish {
        let p = self.next_publish();
        assert_eq!(
            p.topic.as_str(),
            topic,
            "{}: expected {topic} next, got {} (payload {:?})",
            self.name,
            p.topic.as_str(),
            String::from_utf8_lossy(&p.payload)
        );
        p
    }

    /// Waits until the broker closes the connection; returns the packets it sent first.
    fn expect_closed(&mut self, timeout: Duration) -> Vec<Packet> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: the connection is still open after {timeout:?}",
                self.name
            );
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.io.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_timeout(&e) => {}
                // Reset, TLS alert or EOF without close_notify: closed.
                Err(_) => break,
            }
        }
        let mut out: Vec<Packet> = self.pending.drain(..).map(Packet::Publish).collect();
        while let Ok(Some(p)) = decode(&mut self.buf, &DecodeLimits::default()) {
            out.push(p);
        }
        out
    }

    /// Drops the connection without DISCONNECT (an abnormal end: the will fires).
    fn drop_abruptly(self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    /// DISCONNECT (a normal end: no will).
    fn disconnect(mut self) {
        self.send(&Packet::Disconnect);
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

fn connect_packet(client_id: &str, clean_session: bool, will: Option<LastWill>) -> Connect {
    Connect {
        protocol: ProtocolLevel::V311,
        clean_session,
        keep_alive: 60,
        client_id: client_id.to_string(),
        will,
        username: None,
        password: None,
    }
}

fn will(topic: &str, retain: bool) -> LastWill {
    LastWill {
        topic: TopicName::new(topic).unwrap(),
        payload: Bytes::from_static(b"offline"),
        qos: QoS::AtLeastOnce,
        retain,
    }
}

/// Identity `cn` over TLS with client id `client_id`; CONNACK 0 expected.
fn device(b: &TestBroker, cn: &str, client_id: &str) -> Peer {
    device_with(b, cn, connect_packet(client_id, true, None))
}

fn device_with(b: &TestBroker, cn: &str, c: Connect) -> Peer {
    let label = format!("{cn} (client id {:?})", c.client_id);
    let mut p = Peer::tls(b.addr("tls"), identity(b, cn), &label);
    let ack = p.connect(c);
    assert_eq!(
        ack.code,
        ConnectReturnCode::Accepted,
        "{label} refused; log:\n{}",
        b.process.log_text()
    );
    p
}

/// Identity `cn` over TLS sending `c`; returns the CONNACK code (the connection is closed
/// afterwards when it is a refusal).
fn connack_code(b: &TestBroker, cn: &str, c: Connect) -> ConnectReturnCode {
    let label = format!("{cn} (client id {:?})", c.client_id);
    let mut p = Peer::tls(b.addr("tls"), identity(b, cn), &label);
    let code = p.connect(c).code;
    if code != ConnectReturnCode::Accepted {
        p.expect_closed(T);
    }
    code
}

// ---------------------------------------------------------------------------------------
// A1
// ---------------------------------------------------------------------------------------

#[test]
fn a1_wildcard_and_slash_identities_get_nothing_from_patterns() {
    let acl = AclFile::new(
        "# A1: %u and %c must only ever name the literal identity / client id\n\
         pattern readwrite devices/%u/#\n\
         pattern readwrite clients/%c/#\n\
         user watcher\n\
         topic read devices/#\n\
         topic read clients/#\n\
         user tool\n\
         clientid *\n",
    );
    let b = start(&acl, "");
    let mut watcher = device(&b, "watcher", "watcher");
    assert_eq!(watcher.subscribe(&["devices/#", "clients/#"]), [OK1, OK1]);

    for cn in ["#", "+", "a/b"] {
        let mut p = device(&b, cn, cn);
        // `devices/+/#` or `devices/a/b/#` would contain these if substituted literally.
        assert_eq!(
            p.subscribe(&["devices/#", "devices/+/data/x", "devices/a/b/x"]),
            [FAIL, FAIL, FAIL],
            "identity {cn:?}"
        );
        b.process.wait_audit(
            "acl_denied",
            &[
                ("action", "subscribe"),
                ("identity", cn),
                ("filter", "devices/#"),
            ],
        );
        for topic in ["devices/gw-1/data/x", "devices/a/b/x"] {
            p.publish(topic, &format!("from {cn}"));
            b.process.wait_audit(
                "acl_denied",
                &[("action", "publish"), ("identity", cn), ("topic", topic)],
            );
        }
    }

    // A normal identity: its own subtree, nobody else's.
    let mut gw1 = device(&b, "gw-1", "gw-1");
    assert_eq!(gw1.subscribe(&["devices/gw-1/#", "devices/#"]), [OK1, FAIL]);
    gw1.publish("devices/gw-1/data/x", "from gw-1");
    // Everything the odd identities published was acknowledged before this: had any of it
    // been routed, the watcher would have received it first.
    let got = watcher.assert_next("devices/gw-1/data/x");
    assert_eq!(&got.payload[..], b"from gw-1");
    gw1.publish("devices/gw-2/data/x", "gw-1 into gw-2");
    b.process.wait_audit(
        "acl_denied",
        &[
            ("action", "publish"),
            ("identity", "gw-1"),
            ("topic", "devices/gw-2/data/x"),
        ],
    );
    gw1.publish("devices/gw-1/data/end", "marker");
    watcher.assert_next("devices/gw-1/data/end");

    // %c: a client id `+` (allowed by `clientid *`) gets nothing from `clients/%c/#`.
    let mut plus = device(&b, "tool", "+");
    assert_eq!(plus.subscribe(&["clients/+/x", "clients/#"]), [FAIL, FAIL]);
    plus.publish("clients/t1/x", "from client id +");
    b.process.wait_audit(
        "acl_denied",
        &[
            ("action", "publish"),
            ("client_id", "+"),
            ("topic", "clients/t1/x"),
        ],
    );
    let mut t1 = device(&b, "tool", "t1");
    assert_eq!(t1.subscribe(&["clients/t1/#"]), [OK1]);
    t1.publish("clients/t1/x", "from t1");
    let got = watcher.assert_next("clients/t1/x");
    assert_eq!(&got.payload[..], b"from t1");
}

// ---------------------------------------------------------------------------------------
// A2
// ---------------------------------------------------------------------------------------

#[test]
fn a2_hash_needs_an_explicit_grant_and_never_yields_sys() {
    let acl = AclFile::new(
        "user app\n\
         topic read plant/#\n\
         user admin\n\
         topic read #\n\
         user ops\n\
         topic read $SYS/#\n\
         user pub\n\
         topic write #\n",
    );
    let b = start(&acl, "[sys]\ninterval_secs = 1\n");

    let mut app = device(&b, "app", "app");
    assert_eq!(
        app.subscribe(&["#", "+/#", "$SYS/#", "plant/#"]),
        [FAIL, FAIL, FAIL, OK1]
    );
    b.process.wait_audit(
        "acl_denied",
        &[
            ("action", "subscribe"),
            ("identity", "app"),
            ("filter", "#"),
        ],
    );

    let mut admin = device(&b, "admin", "admin");
    // `#` is granted; `$SYS/#` is not covered by it.
    assert_eq!(admin.subscribe(&["#", "$SYS/#"]), [OK1, FAIL]);

    let mut publ = device(&b, "pub", "pub");
    publ.publish("plant/line1/temp", "21.5");
    admin.assert_next("plant/line1/temp");
    app.assert_next("plant/line1/temp");
    publ.publish("office/door", "open");
    admin.assert_next("office/door");

    // A `$SYS` round happens after admin subscribed `#`: ops sees a live (not retained)
    // `$SYS/broker/protocol_errors`, the last figure of a round.
    let mut ops = device(&b, "ops", "ops");
    assert_eq!(ops.subscribe(&["$SYS/#"]), [OK1]);
    let mut saw_version = false;
    let deadline = Instant::now() + T;
    loop {
        assert!(Instant::now() < deadline, "no live $SYS round within {T:?}");
        let p = ops.next_publish();
        assert!(p.topic.as_str().starts_with("$SYS/"), "{:?}", p.topic);
        if p.topic.as_str() == "$SYS/broker/version" {
            assert!(
                String::from_utf8_lossy(&p.payload).starts_with("bulwark-broker"),
                "{:?}",
                p.payload
            );
            saw_version = true;
        }
        if p.topic.as_str() == "$SYS/broker/protocol_errors" && !p.retain && saw_version {
            break;
        }
    }

    publ.publish("plant/marker", "after a $SYS round");
    admin.assert_next("plant/marker");
    app.assert_next("plant/marker");
}

// ---------------------------------------------------------------------------------------
// Deny wins
// ---------------------------------------------------------------------------------------

#[test]
fn deny_wins_over_grants_in_either_order() {
    let acl = AclFile::new(
        "user u1\n\
         topic readwrite plant/#\n\
         topic deny plant/secret/#\n\
         user u2\n\
         topic deny plant/secret/#\n\
         topic readwrite plant/#\n\
         user auditor\n\
         topic read plant/#\n\
         user pub\n\
         topic write plant/#\n",
    );
    let b = start(&acl, "");
    let mut auditor = device(&b, "auditor", "auditor");
    assert_eq!(auditor.subscribe(&["plant/#"]), [OK1]);
    let mut publ = device(&b, "pub", "pub");

    for u in ["u1", "u2"] {
        let mut c = device(&b, u, u);
        assert_eq!(
            c.subscribe(&[
                "plant/#",
                "plant/line1/#",
                "plant/secret/x",
                "plant/+/x",
                "+/secret/#",
            ]),
            [FAIL, OK1, FAIL, FAIL, FAIL],
            "{u}: a filter intersecting the deny is refused, one inside the grant is not"
        );
        b.process.wait_audit(
            "acl_denied",
            &[
                ("action", "subscribe"),
                ("identity", u),
                ("filter", "plant/#"),
            ],
        );
        // Reading through the granted filter works.
        publ.publish("plant/line1/temp", u);
        auditor.assert_next("plant/line1/temp");
        c.assert_next("plant/line1/temp");

        // Writing: denied under plant/secret, allowed elsewhere under plant.
        c.publish("plant/secret/x", &format!("{u} leaks"));
        b.process.wait_audit(
            "acl_denied",
            &[
                ("action", "publish"),
                ("identity", u),
                ("topic", "plant/secret/x"),
            ],
        );
        c.publish("plant/line1/status", &format!("{u} ok"));
        let got = auditor.assert_next("plant/line1/status");
        assert_eq!(got.payload, format!("{u} ok").as_bytes());
        c.assert_next("plant/line1/status");
    }
}

// ---------------------------------------------------------------------------------------
// A4
// ---------------------------------------------------------------------------------------

#[test]
fn a4_wills_are_checked_at_connect_and_again_when_they_fire() {
    let acl = AclFile::new(
        "pattern write devices/%u/status\n\
         pattern write devices/%u/data/#\n\
         user watcher\n\
         topic read devices/#\n",
    );
    let b = start(&acl, "[reload]\nwatch_interval_secs = 1\n");

    // Refused at CONNECT: a topic without a write grant (also retained), and `$SYS`.
    let forbidden = connack_code(
        &b,
        "gw-1",
        connect_packet("gw-1", true, Some(will("plant/forbidden", false))),
    );
    assert_eq!(forbidden, ConnectReturnCode::NotAuthorized);
    b.process.wait_audit(
        "acl_denied",
        &[
            ("action", "will"),
            ("identity", "gw-1"),
            ("topic", "plant/forbidden"),
        ],
    );
    let retained = connack_code(
        &b,
        "gw-1",
        connect_packet("gw-1", true, Some(will("devices/gw-2/status", true))),
    );
    assert_eq!(retained, ConnectReturnCode::NotAuthorized);
    b.process.wait_audit(
        "acl_denied",
        &[
            ("action", "will"),
            ("identity", "gw-1"),
            ("topic", "devices/gw-2/status"),
        ],
    );
    let sys = connack_code(
        &b,
        "gw-1",
        connect_packet("gw-1", true, Some(will("$SYS/x", false))),
    );
    assert_eq!(sys, ConnectReturnCode::NotAuthorized);
    wait_audit_where(
        &b,
        "connect_refused",
        &[("client_id", "gw-1"), ("reason", "not authorized")],
        |v| v["detail"].as_str().is_some_and(|d| d.contains('$')),
    );

    let mut watcher = device(&b, "watcher", "watcher");
    assert_eq!(watcher.subscribe(&["devices/#"]), [OK1]);
    let gw1 = device_with(
        &b,
        "gw-1",
        connect_packet("gw-1", true, Some(will("devices/gw-1/status", false))),
    );
    let gw2 = device_with(
        &b,
        "gw-2",
        connect_packet("gw-2", true, Some(will("devices/gw-2/status", false))),
    );

    // gw-1 loses the grant for its will topic; gw-2 keeps it through its own block.
    acl.replace(
        "pattern write devices/%u/data/#\n\
         user gw-2\n\
         topic write devices/gw-2/status\n\
         user watcher\n\
         topic read devices/#\n",
    );
    b.process.wait_audit("reload", &[("what", "acl")]);

    gw1.drop_abruptly();
    b.process.wait_audit(
        "will_dropped",
        &[("client_id", "gw-1"), ("topic", "devices/gw-1/status")],
    );
    gw2.drop_abruptly();
    // gw-2's will is published; gw-1's, which would have come first, was not.
    let got = watcher.assert_next("devices/gw-2/status");
    assert_eq!(&got.payload[..], b"offline");
}

// ---------------------------------------------------------------------------------------
// A7
// ---------------------------------------------------------------------------------------

fn startup_config(acl: &Path) -> String {
    format!(
        "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\ntransport = \"tcp\"\n\
         allow_anonymous = true\n[persistence]\nenabled = false\n[auth]\nacl_file = {acl:?}\n"
    )
}

#[test]
fn a7_acl_without_rules_or_with_a_bad_line_stops_the_broker() {
    let cases: &[(&str, &str, u32, &[&str])] = &[
        (
            "only comments",
            "# nothing but comments\n\n   # indented comment\n",
            0o644,
            &["no rules"],
        ),
        ("empty", "", 0o644, &["no rules"]),
        (
            "bad access word",
            "user gw-1\ntopic reed a/b c\n",
            0o644,
            &["line 2", "reed"],
        ),
        (
            "unknown directive",
            "topic read a/#\n# a comment\nbogus x\n",
            0o644,
            &["line 3", "bogus"],
        ),
        (
            "invalid filter",
            "user gw-1\n\ntopic read a/#/b\n",
            0o644,
            &["line 3", "a/#/b"],
        ),
        (
            "group-writable",
            "topic read a/#\n",
            0o664,
            &["writable by group or others"],
        ),
    ];
    for (what, text, mode, needles) in cases {
        let dir = tempfile::tempdir().unwrap();
        let acl = dir.path().join("acl.conf");
        write_with_mode(&acl, text, *mode);
        let mut p = BrokerProcess::spawn(&startup_config(&acl), dir.path());
        let status = p
            .wait_exit(T)
            .unwrap_or_else(|| panic!("{what}: the broker did not exit; log:\n{}", p.log_text()));
        assert_eq!(
            status.code(),
            Some(64),
            "{what}: exit status; log:\n{}",
            p.log_text()
        );
        let acl_name = acl.display().to_string();
        let line = p.wait_log(T, |v| {
            v["message"].as_str().is_some_and(|m| {
                m.contains(acl_name.as_str()) && needles.iter().all(|n| m.contains(n))
            })
        });
        assert!(
            line.is_some(),
            "{what}: no message naming {acl_name} and {needles:?}; log:\n{}",
            p.log_text()
        );
        assert_eq!(
            p.count_log(|v| v["message"] == "listening"),
            0,
            "{what}: nothing may listen"
        );
    }

    // Control: the same configuration with a usable ACL starts.
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl.conf");
    write_with_mode(&acl, "topic read a/#\n", 0o644);
    let _ok = BrokerProcess::start(&startup_config(&acl), dir.path(), 1);
}

// ---------------------------------------------------------------------------------------
// ACL hot reload
// ---------------------------------------------------------------------------------------

const RELOAD_V1: &str = "user pub\n\
    topic write plant/#\n\
    topic write status/#\n\
    topic write q/#\n\
    user hist\n\
    topic read plant/#\n\
    topic read status/#\n\
    user hist2\n\
    topic read q/#\n";

const RELOAD_V2: &str = "user pub\n\
    topic write plant/#\n\
    topic write status/#\n\
    topic write q/#\n\
    user hist\n\
    topic read plant/line1/#\n\
    topic read status/#\n\
    user hist2\n\
    topic read q/keep\n";

#[test]
fn acl_reload_revokes_subscriptions_filters_queued_messages_and_survives_a_bad_file() {
    let acl = AclFile::new(RELOAD_V1);
    let b = start(&acl, "[reload]\nwatch_interval_secs = 1\n");
    let mut publ = device(&b, "pub", "pub");

    let mut hist = device(&b, "hist", "hist");
    assert_eq!(hist.subscribe(&["plant/#", "status/#"]), [OK1, OK1]);
    publ.publish("plant/a", "before");
    hist.assert_next("plant/a");

    // hist2: a persistent session, offline with two queued QoS 1 messages.
    let mut hist2 = device_with(&b, "hist2", connect_packet("hist2", false, None));
    assert_eq!(hist2.subscribe(&["q/#"]), [OK1]);
    hist2.disconnect();
    b.process.wait_audit(
        "disconnect",
        &[("client_id", "hist2"), ("reason", "client_disconnect")],
    );
    publ.publish("q/secret", "read grant removed before reconnect");
    publ.publish("q/keep", "still readable");

    acl.replace(RELOAD_V2);
    b.process.wait_audit("reload", &[("what", "acl")]);
    b.process.wait_audit(
        "subscription_revoked",
        &[("client_id", "hist"), ("filter", "plant/#")],
    );
    b.process.wait_audit(
        "subscription_revoked",
        &[("client_id", "hist2"), ("filter", "q/#")],
    );
    assert_eq!(
        b.process.count_log(|v| v["event"] == "subscription_revoked"
            && v["client_id"] == "hist"
            && v["filter"] == "status/#"),
        0,
        "a subscription the new ACL still grants stays"
    );

    // The revoked live subscription no longer delivers.
    publ.publish("plant/b", "after the reload");
    publ.publish("status/m1", "marker");
    hist.assert_next("status/m1");
    // New subscriptions follow the new ACL.
    assert_eq!(hist.subscribe(&["plant/#", "plant/line1/#"]), [FAIL, OK1]);
    publ.publish("plant/line1/x", "granted");
    hist.assert_next("plant/line1/x");

    // The offline session gets only what it may still read: q/secret was queued first.
    let mut hist2 = Peer::tls(b.addr("tls"), identity(&b, "hist2"), "hist2 (resumed)");
    let ack = hist2.connect(connect_packet("hist2", false, None));
    assert_eq!(ack.code, ConnectReturnCode::Accepted);
    assert!(ack.session_present, "the persistent session was kept");
    let got = hist2.assert_next("q/keep");
    assert_eq!(&got.payload[..], b"still readable");

    // A malformed file: the last good ACL (v2) stays, nothing of the new text applies.
    acl.replace(&format!(
        "{RELOAD_V2}user hist\ntopic read #\n# the next line does not parse\nbogus x\n"
    ));
    let failed = b.process.wait_audit("reload_failed", &[("what", "acl")]);
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("line 13") && error.contains("acl.conf"),
        "the error names the file and the line: {failed}"
    );
    assert_eq!(
        hist.subscribe(&["#", "plant/#", "plant/line1/#"]),
        [FAIL, FAIL, OK1],
        "v2 is still in force"
    );
    publ.publish("plant/line1/y", "v2 grants still work");
    hist.assert_next("plant/line1/y");
    publ.publish("status/m2", "marker");
    hist.assert_next("status/m2");
}

// ---------------------------------------------------------------------------------------
// Client ids
// ---------------------------------------------------------------------------------------

#[test]
fn client_ids_must_match_the_identity_or_a_clientid_rule() {
    let acl = AclFile::new(
        "pattern write devices/%u/data/#\n\
         user historian\n\
         clientid historian-*\n\
         topic read devices/#\n",
    );
    let b = start(&acl, "");

    let code = connack_code(&b, "gw-1", connect_packet("gw-2", true, None));
    assert_eq!(code, ConnectReturnCode::IdentifierRejected);
    b.process.wait_audit(
        "acl_denied",
        &[
            ("action", "connect"),
            ("identity", "gw-1"),
            ("client_id", "gw-2"),
        ],
    );
    let code = connack_code(&b, "gw-1", connect_packet("gw-1-spare", true, None));
    assert_eq!(code, ConnectReturnCode::IdentifierRejected);

    let mut hist = device(&b, "historian", "historian-a");
    b.process.wait_audit(
        "connect",
        &[("identity", "historian"), ("client_id", "historian-a")],
    );
    // The `clientid` lines replace the default: the bare identity is not listed.
    let code = connack_code(&b, "historian", connect_packet("historian", true, None));
    assert_eq!(code, ConnectReturnCode::IdentifierRejected);
    b.process.wait_audit(
        "acl_denied",
        &[
            ("action", "connect"),
            ("identity", "historian"),
            ("client_id", "historian"),
        ],
    );

    // An empty client id becomes the identity (and the ACL sees that client id).
    let mut gw1 = device(&b, "gw-1", "");
    b.process
        .wait_audit("connect", &[("identity", "gw-1"), ("client_id", "gw-1")]);
    assert_eq!(hist.subscribe(&["devices/#"]), [OK1]);
    gw1.publish("devices/gw-1/data/t", "from the empty client id");
    hist.assert_next("devices/gw-1/data/t");

    // Without an ACL file any client id is accepted.
    let open = TestBroker::start(BrokerConfig::default());
    let mut p = Peer::tls(open.addr("tls"), identity(&open, "gw-1"), "gw-1 (no ACL)");
    let ack = p.connect(connect_packet("anything-at-all", true, None));
    assert_eq!(ack.code, ConnectReturnCode::Accepted);
    open.process.wait_audit(
        "connect",
        &[("identity", "gw-1"), ("client_id", "anything-at-all")],
    );
}

// ---------------------------------------------------------------------------------------
// A8 / A9
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a8_a9_each_listener_enforces_its_own_auth_and_wss_follows_the_acl() {
    use rumqttc::SubscribeReasonCode;
    let acl = AclFile::new(
        "topic readwrite public/#\n\
         pattern readwrite devices/%u/#\n\
         user watcher\n\
         topic read devices/#\n",
    );
    let b = start(&acl, "");
    let no_cert = b.pki.rustls_client_config(None);
    for (listener, via) in [
        ("tls", Via::Tls(b.addr("tls"), no_cert.clone())),
        ("wss", Via::Wss(b.addr("wss"), no_cert.clone())),
    ] {
        let r = Client::connect(options("anon", &via)).await;
        assert!(
            r.is_err(),
            "{listener}: a client without a certificate got in"
        );
        wait_audit_where(&b, "tls_handshake_failed", &[], |v| {
            listener_of(v) == Some(listener)
        });
    }
    assert_eq!(
        b.process.count_log(|v| v["event"] == "connect"),
        0,
        "no anonymous connection was accepted on tls or wss"
    );

    // The loopback tcp listener is anonymous, and anonymous clients get the rules before
    // the first `user` line only (no patterns).
    let mut anon = Client::connect(options("anon-tcp", &Via::Tcp(b.addr("tcp"))))
        .await
        .expect("anonymous tcp");
    assert_eq!(
        anon.subscribe("public/#", mqtt::QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(mqtt::QoS::AtLeastOnce)]
    );
    assert_eq!(
        anon.subscribe("devices/#", mqtt::QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Failure]
    );
    anon.publish("public/hello", mqtt::QoS::AtLeastOnce, false, b"hi")
        .await;
    assert_eq!(anon.next_publish(T).await.unwrap().topic, "public/hello");
    b.process
        .wait_audit("connect", &[("client_id", "anon-tcp"), ("identity", "")]);

    // The same ACL on wss as on tls.
    let mut watcher = Client::connect(options(
        "watcher",
        &Via::Tls(b.addr("tls"), identity(&b, "watcher")),
    ))
    .await
    .unwrap();
    assert_eq!(
        watcher.subscribe("devices/#", mqtt::QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(mqtt::QoS::AtLeastOnce)]
    );
    let mut gw1 = Client::connect(options(
        "gw-1",
        &Via::Wss(b.addr("wss"), identity(&b, "gw-1")),
    ))
    .await
    .unwrap();
    assert_eq!(
        gw1.subscribe("devices/#", mqtt::QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Failure]
    );
    gw1.publish("devices/gw-2/data/x", mqtt::QoS::AtLeastOnce, false, b"no")
        .await;
    wait_audit_where(
        &b,
        "acl_denied",
        &[
            ("action", "publish"),
            ("identity", "gw-1"),
            ("topic", "devices/gw-2/data/x"),
        ],
        |v| listener_of(v) == Some("wss"),
    );
    gw1.publish("devices/gw-1/data/x", mqtt::QoS::AtLeastOnce, false, b"yes")
        .await;
    let got = watcher.next_publish(T).await.expect("delivery");
    assert_eq!(
        got.topic, "devices/gw-1/data/x",
        "the denied one was not routed"
    );

    // A wrong client id is refused on wss as on tls.
    let refused = Client::connect(options(
        "gw-1-other",
        &Via::Wss(b.addr("wss"), identity(&b, "gw-1")),
    ))
    .await;
    assert!(refused.is_err());
    wait_audit_where(
        &b,
        "acl_denied",
        &[("action", "connect"), ("client_id", "gw-1-other")],
        |v| listener_of(v) == Some("wss"),
    );
}

// ---------------------------------------------------------------------------------------
// P14: $tunnel
// ---------------------------------------------------------------------------------------

#[test]
fn p14_client_publish_to_tunnel_topic_closes_the_connection_despite_a_grant() {
    let acl = AclFile::new(
        "pattern read $tunnel/%u/notify\n\
         pattern read devices/%u/cmd/#\n\
         user op\n\
         topic readwrite $tunnel/#\n\
         topic write devices/+/cmd/#\n",
    );
    let b = start(&acl, "");
    let mut gw1 = device(&b, "gw-1", "gw-1");
    assert_eq!(
        gw1.subscribe(&["$tunnel/gw-1/notify", "devices/gw-1/cmd/#"]),
        [OK1, OK1]
    );

    let mut op = device(&b, "op", "op");
    let pkid = op.next_pkid();
    op.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: TopicName::new("$tunnel/gw-1/notify").unwrap(),
        pkid: Some(pkid),
        payload: Bytes::from_static(b"{\"session\":\"forged\"}"),
    }));
    let sent = op.expect_closed(T);
    assert!(
        sent.is_empty(),
        "nothing (no PUBACK) before the close: {sent:?}"
    );
    b.process.wait_audit(
        "publish_refused",
        &[("client_id", "op"), ("topic", "$tunnel/gw-1/notify")],
    );

    let mut op = device(&b, "op", "op");
    op.publish("devices/gw-1/cmd/reboot", "marker");
    gw1.assert_next("devices/gw-1/cmd/reboot");
}

// ---------------------------------------------------------------------------------------
// bulwark-broker acl check
// ---------------------------------------------------------------------------------------

fn acl_check(acl: &Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(bin_path("bulwark-broker"));
    cmd.args(["acl", "check", "--acl"]).arg(acl).args(args);
    let (status, out, err) = run_with_timeout(&mut cmd, T);
    let status = status.unwrap_or_else(|| panic!("acl check {args:?} did not finish"));
    (status.code().expect("exit code"), out, err)
}

#[test]
fn acl_check_command_explains_decisions() {
    let acl = AclFile::new(
        "# test ACL\n\
         user gw-1\n\
         topic deny devices/gw-1/data/secret/#\n\
         pattern readwrite devices/%u/data/#\n\
         user historian\n\
         topic read devices/+/data/#\n",
    );
    let p = &acl.path;
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--user", "gw-1", "devices/gw-1/data/temp", "write"],
            0,
            "allowed by line 4: `pattern readwrite devices/%u/data/#`",
        ),
        (
            &["--user", "gw-1", "devices/gw-1/data/secret/k", "read"],
            1,
            "denied by line 3: `topic deny devices/gw-1/data/secret/#`",
        ),
        (
            &["--user", "gw-2", "devices/gw-1/data/temp", "write"],
            1,
            "denied: no rule grants it (default deny)",
        ),
        (
            &["--user", "historian", "devices/+/data/#", "subscribe"],
            0,
            "allowed by line 6: `topic read devices/+/data/#`",
        ),
        (
            &["--user", "historian", "devices/gw-1/data/temp", "subscribe"],
            0,
            "allowed by line 6: `topic read devices/+/data/#`",
        ),
        (
            &["--user", "historian", "devices/#", "subscribe"],
            1,
            "denied: no rule grants it (default deny)",
        ),
        (
            &["--user", "gw-1", "devices/gw-1/data/#", "subscribe"],
            1,
            "denied by line 3: `topic deny devices/gw-1/data/secret/#`",
        ),
        (
            &["--user", "a/b", "devices/a/b/data/x", "write"],
            1,
            "denied: no rule grants it (default deny)",
        ),
        (
            &["--user", "gw-1", "$tunnel/gw-1/notify", "write"],
            1,
            "denied: clients never publish to `$` topics",
        ),
        (
            &["devices/gw-1/data/temp", "read"],
            1,
            "denied: no rule grants it (default deny)",
        ),
    ];
    for (args, code, text) in cases {
        let (got, out, err) = acl_check(p, args);
        assert_eq!(
            (got, out.trim()),
            (*code, *text),
            "acl check {args:?}; stderr: {err}"
        );
    }

    let bad = AclFile::new("user gw-1\ntopic read devices/#\ntopic reed a/b c\n");
    let (got, out, err) = acl_check(&bad.path, &["--user", "gw-1", "devices/x", "read"]);
    assert_eq!(got, 64, "stdout {out:?} stderr {err:?}");
    assert!(
        err.contains(&bad.path.display().to_string()) && err.contains("line 3"),
        "names the file and the line: {err}"
    );
    let empty = AclFile::new("# no rules\n");
    let (got, _, err) = acl_check(&empty.path, &["--user", "gw-1", "devices/x", "read"]);
    assert_eq!(got, 64, "{err}");
    assert!(err.contains("no rules"), "{err}");
}
