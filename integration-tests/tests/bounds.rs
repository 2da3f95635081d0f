//! The configurable bounds of `[limits]`, each exercised against the real broker binary
//! with a small configured value: connections, packet sizes, the CONNECT deadline,
//! keepalive, client id length, the in-flight window, session queues (count and bytes),
//! session expiry, retained messages (count and bytes), subscriptions per client, topic
//! levels, a subscriber that stops reading (write timeout, drops, bounded memory), and
//! session ownership by certificate identity (SECURITY-CASES A5).
//!
//! Most tests speak raw MQTT so that they see exactly what the broker sends. "Nothing more
//! arrives" is proved with a ping barrier, not a sleep: the broker handles a connection's
//! packets in order and writes everything it drained after handling a batch, so once the
//! answer to a second PINGREQ is read, everything the broker was willing to send before it
//! has been read too.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bulwark_integration_tests::mqtt::{options, Client, QoS, Via};
use bulwark_integration_tests::{
    hex, metrics_addr, BrokerConfig, RawClient, TestBroker, METRICS_ON,
};

const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Broker and log helpers

/// A broker with a tcp listener (and the tls one if `tls`), `[limits]` set to `limits`
/// and `more` TOML appended after it.
fn start_with(limits: &str, more: &str, tls: bool) -> TestBroker {
    TestBroker::start(BrokerConfig {
        tls,
        wss: false,
        extra: format!("[limits]\n{limits}\n{more}"),
        ..BrokerConfig::default()
    })
}

fn start(limits: &str) -> TestBroker {
    start_with(limits, "", false)
}

fn is_audit(v: &serde_json::Value, event: &str, fields: &[(&str, &str)]) -> bool {
    v["target"] == "audit"
        && v["event"] == event
        && fields.iter().all(|(k, val)| v[*k].as_str() == Some(*val))
}

fn audit_count(b: &TestBroker, event: &str, fields: &[(&str, &str)]) -> usize {
    b.process.count_log(|v| is_audit(v, event, fields))
}

/// Waits until at least `n` audit events match. The log is read from the broker's stderr
/// by a thread, so a count taken right after an acknowledgement may lag behind.
fn wait_audit_count(b: &TestBroker, event: &str, fields: &[(&str, &str)], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while audit_count(b, event, fields) < n {
        assert!(
            Instant::now() < deadline,
            "expected {n} audit events {event} {fields:?}; log:\n{}",
            b.process.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The broker's log lines so far, parsed, in the order the broker wrote them.
fn log_lines(b: &TestBroker) -> Vec<serde_json::Value> {
    b.process
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

// ---------------------------------------------------------------------------------------
// Raw MQTT 3.1.1 encoding

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn mqtt_str(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// CONNECT for `id` with `keepalive` seconds and the clean-session flag, optionally a
/// QoS 0 will on `will_topic`.
fn connect_pkt_full(id: &[u8], keepalive: u16, clean: bool, will_topic: Option<&str>) -> Vec<u8> {
    let mut flags = if clean { 0x02 } else { 0 };
    if will_topic.is_some() {
        flags |= 0x04;
    }
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags];
    body.extend_from_slice(&keepalive.to_be_bytes());
    body.extend(mqtt_str(id));
    if let Some(t) = will_topic {
        body.extend(mqtt_str(t.as_bytes()));
        body.extend(mqtt_str(b"gone"));
    }
    packet(0x10, &body)
}

fn connect_pkt(id: &str, keepalive: u16, clean: bool) -> Vec<u8> {
    connect_pkt_full(id.as_bytes(), keepalive, clean, None)
}

fn publish_pkt(topic: &str, payload: &[u8], qos: u8, pkid: u16, retain: bool) -> Vec<u8> {
    let mut body = mqtt_str(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | u8::from(retain), &body)
}

fn subscribe_pkt(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for (f, q) in filters {
        body.extend(mqtt_str(f.as_bytes()));
        body.push(*q);
    }
    packet(0x82, &body)
}

fn unsubscribe_pkt(pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for f in filters {
        body.extend(mqtt_str(f.as_bytes()));
    }
    packet(0xa2, &body)
}

fn puback_pkt(pkid: u16) -> Vec<u8> {
    let mut v = vec![0x40, 2];
    v.extend_from_slice(&pkid.to_be_bytes());
    v
}

const PINGREQ: [u8; 2] = [0xc0, 0];
const DISCONNECT: [u8; 2] = [0xe0, 0];
const CONNACK_OK: [u8; 4] = [0x20, 2, 0, 0];
const CONNACK_OK_SESSION: [u8; 4] = [0x20, 2, 1, 0];
const CONNACK_ID_REJECTED: [u8; 4] = [0x20, 2, 0, 2];

// ---------------------------------------------------------------------------------------
// Raw MQTT decoding and a small client

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pub {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    pkid: Option<u16>,
    retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pkt {
    ConnAck { session_present: bool, code: u8 },
    Publish(Pub),
    PubAck(u16),
    SubAck { pkid: u16, codes: Vec<u8> },
    UnsubAck(u16),
    PingResp,
    Other { first: u8, body: Vec<u8> },
}

fn parse(first: u8, body: Vec<u8>) -> Pkt {
    let id = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match first >> 4 {
        2 if body.len() == 2 => Pkt::ConnAck {
            session_present: body[0] & 1 == 1,
            code: body[1],
        },
        3 => {
            let qos = (first >> 1) & 3;
            let tl = id(&body) as usize;
            let topic = String::from_utf8(body[2..2 + tl].to_vec()).expect("utf-8 topic");
            let mut at = 2 + tl;
            let pkid = (qos > 0).then(|| {
                at += 2;
                id(&body[at - 2..])
            });
            Pkt::Publish(Pub {
                topic,
                payload: body[at..].to_vec(),
                qos,
                pkid,
                retain: first & 1 == 1,
            })
        }
        4 => Pkt::PubAck(id(&body)),
        9 => Pkt::SubAck {
            pkid: id(&body),
            codes: body[2..].to_vec(),
        },
        11 => Pkt::UnsubAck(id(&body)),
        13 => Pkt::PingResp,
        _ => Pkt::Other { first, body },
    }
}

/// A raw MQTT connection: buffered reads, packet-level helpers.
struct Mq {
    r: BufReader<TcpStream>,
    w: TcpStream,
    next_pkid: u16,
}

impl Mq {
    fn from_stream(s: TcpStream) -> Mq {
        s.set_nodelay(true).unwrap();
        Mq {
            w: s.try_clone().unwrap(),
            r: BufReader::with_capacity(64 * 1024, s),
            next_pkid: 1,
        }
    }

    fn tcp(addr: SocketAddr) -> Mq {
        Mq::from_stream(RawClient::connect(addr).stream)
    }

    /// Connects and sends CONNECT; returns the client and the 4 CONNACK bytes.
    fn open(addr: SocketAddr, connect: &[u8]) -> (Mq, Vec<u8>) {
        let mut m = Mq::tcp(addr);
        m.send(connect);
        let ack = m.read_bytes(4, T).expect("CONNACK");
        (m, ack)
    }

    /// A clean session, keepalive 60, that must be accepted.
    fn connect_ok(addr: SocketAddr, id: &str) -> Mq {
        let (m, ack) = Mq::open(addr, &connect_pkt(id, 60, true));
        assert_eq!(ack, CONNACK_OK, "CONNACK for {id}");
        m
    }

    fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).expect("send to broker");
    }

    fn read_bytes(&mut self, n: usize, timeout: Duration) -> std::io::Result<Vec<u8>> {
        self.r.get_ref().set_read_timeout(Some(timeout))?;
        let mut buf = vec![0; n];
        self.r.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn read_pkt(&mut self, timeout: Duration) -> std::io::Result<Pkt> {
        let first = self.read_bytes(1, timeout)?[0];
        let mut len = 0usize;
        let mut mul = 1usize;
        loop {
            let b = self.read_bytes(1, timeout)?[0];
            len += usize::from(b & 0x7f) * mul;
            mul *= 128;
            if b & 0x80 == 0 {
                break;
            }
        }
        let body = self.read_bytes(len, timeout)?;
        Ok(parse(first, body))
    }

    fn expect_pkt(&mut self, what: &str) -> Pkt {
        self.read_pkt(T)
            .unwrap_or_else(|e| panic!("expected {what} from the broker: {e}"))
    }

    fn expect_publish(&mut self) -> Pub {
        match self.expect_pkt("PUBLISH") {
            Pkt::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    fn pkid(&mut self) -> u16 {
        let id = self.next_pkid;
        self.next_pkid += 1;
        id
    }

    fn subscribe(&mut self, filters: &[(&str, u8)]) -> Vec<u8> {
        let id = self.pkid();
        self.send(&subscribe_pkt(id, filters));
        match self.expect_pkt("SUBACK") {
            Pkt::SubAck { pkid, codes } if pkid == id => codes,
            other => panic!("expected SUBACK {id}, got {other:?}"),
        }
    }

    fn unsubscribe(&mut self, filters: &[&str]) {
        let id = self.pkid();
        self.send(&unsubscribe_pkt(id, filters));
        assert_eq!(self.expect_pkt("UNSUBACK"), Pkt::UnsubAck(id));
    }

    /// QoS 1 PUBLISH, waiting for its PUBACK (the broker has routed it by then).
    fn publish1(&mut self, topic: &str, payload: &[u8], retain: bool) {
        let id = self.pkid();
        self.send(&publish_pkt(topic, payload, 1, id, retain));
        assert_eq!(
            self.expect_pkt("PUBACK"),
            Pkt::PubAck(id),
            "PUBACK for {topic}"
        );
    }

    /// Two PINGREQ/PINGRESP round trips; returns every PUBLISH received meanwhile. After
    /// it, everything the broker was willing to send has arrived.
    fn barrier(&mut self) -> Vec<Pub> {
        let mut got = Vec::new();
        for _ in 0..2 {
            self.send(&PINGREQ);
            loop {
                match self.expect_pkt("PINGRESP") {
                    Pkt::PingResp => break,
                    Pkt::Publish(p) => got.push(p),
                    other => panic!("unexpected packet before PINGRESP: {other:?}"),
                }
            }
        }
        got
    }

    fn assert_nothing_more(&mut self, context: &str) {
        let extra = self.barrier();
        assert!(
            extra.is_empty(),
            "{context}: nothing more expected, got {:?}",
            topics(&extra)
        );
    }

    /// Waits until the broker closes the connection; returns what it sent before.
    fn expect_close(&mut self, timeout: Duration) -> Result<Vec<u8>, String> {
        self.r.get_ref().set_read_timeout(Some(timeout)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.r.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(got),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(format!(
                        "still open after {timeout:?}; received {}",
                        hex(&got)
                    ))
                }
                Err(e) => return Err(format!("read error {e}")),
            }
        }
    }

    fn disconnect(mut self) {
        self.send(&DISCONNECT);
        self.expect_close(T).expect("closed after DISCONNECT");
    }
}

fn topics(p: &[Pub]) -> Vec<String> {
    p.iter().map(|p| p.topic.clone()).collect()
}

// ---------------------------------------------------------------------------------------
// 1. max_connections

#[test]
fn max_connections_closes_the_extra_connection_at_accept() {
    let b = start_with("max_connections = 3", "", true);
    let tcp = b.addr("tcp");
    let mut clients: Vec<Mq> = (0..3)
        .map(|i| Mq::connect_ok(tcp, &format!("c{i}")))
        .collect();

    // The 4th connection is closed at once, with no CONNACK.
    let t0 = Instant::now();
    let mut fourth = Mq::tcp(tcp);
    let _ = fourth.w.write_all(&connect_pkt("c3", 60, true)); // may already be closed
    let got = fourth
        .expect_close(Duration::from_secs(5))
        .expect("the 4th connection must be closed");
    assert!(
        got.is_empty(),
        "no CONNACK for a connection over the cap: {}",
        hex(&got)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "closed at accept, not at the CONNECT deadline: {:?}",
        t0.elapsed()
    );
    let peer = fourth.w.local_addr().unwrap().to_string();
    b.process
        .wait_audit("connection_limit", &[("listener", "tcp"), ("peer", &peer)]);
    assert_eq!(audit_count(&b, "connection_limit", &[]), 1);
    assert_eq!(audit_count(&b, "connect", &[("client_id", "c3")]), 0);

    // The cap is broker-wide: another listener is full too.
    let mut on_tls = RawClient::connect(b.addr("tls"));
    on_tls
        .expect_close(Duration::from_secs(5))
        .expect("over-cap TLS connection closed");
    b.process
        .wait_audit("connection_limit", &[("listener", "tls")]);

    // The three admitted clients are still served.
    for c in &mut clients {
        c.assert_nothing_more("admitted client");
    }

    // One leaves; a new client gets in (the permit is released when its task ends, so
    // retry briefly until it is).
    clients.remove(0).disconnect();
    b.process.wait_audit("disconnect", &[("client_id", "c0")]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let newcomer = loop {
        let mut m = Mq::tcp(tcp);
        let _ = m.w.write_all(&connect_pkt("c4", 60, true));
        match m.read_bytes(4, Duration::from_secs(2)) {
            Ok(ack) if ack == CONNACK_OK => break m,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no room for a new client 5 s after one left: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    b.process.wait_audit("connect", &[("client_id", "c4")]);

    // Back at 3: the next one is refused again.
    let mut again = Mq::tcp(tcp);
    let peer = again.w.local_addr().unwrap().to_string();
    again
        .expect_close(Duration::from_secs(5))
        .expect("over cap again");
    b.process.wait_audit("connection_limit", &[("peer", &peer)]);
    drop(newcomer);
}

// ---------------------------------------------------------------------------------------
// 2. max_packet_size (and max_connect_packet_size)

#[test]
fn max_packet_size_closes_oversized_publish_from_its_header() {
    const MAX: usize = 2048;
    let b = start(&format!("max_packet_size = {MAX}"));
    let tcp = b.addr("tcp");
    let mut sub = Mq::connect_ok(tcp, "sub");
    assert_eq!(sub.subscribe(&[("big/#", 0)]), vec![0]);

    // Exactly at the bound (fixed header included): delivered.
    let topic = "big/t";
    let fixed_header = 3; // type byte + 2-byte remaining length for 128..16383
    let payload_at_bound = vec![b'x'; MAX - fixed_header - 2 - topic.len()];
    let at_bound = publish_pkt(topic, &payload_at_bound, 0, 0, false);
    assert_eq!(at_bound.len(), MAX);
    let mut publ = Mq::connect_ok(tcp, "pub");
    publ.send(&at_bound);
    let got = sub.expect_publish();
    assert_eq!(
        (got.topic.as_str(), got.payload.len()),
        (topic, payload_at_bound.len())
    );
    publ.assert_nothing_more("publisher after a packet at the bound");

    // One byte over: the connection is closed and nothing is routed.
    let over = publish_pkt(topic, &vec![b'y'; payload_at_bound.len() + 1], 0, 0, false);
    assert_eq!(over.len(), MAX + 1);
    publ.send(&over);
    publ.expect_close(T)
        .expect("PUBLISH over max_packet_size must close the connection");
    let e = b
        .process
        .wait_audit("protocol_error", &[("client_id", "pub")]);
    assert!(
        e["detail"].as_str().unwrap_or("").contains("2049"),
        "detail names the size: {e}"
    );
    b.process.wait_audit(
        "disconnect",
        &[("client_id", "pub"), ("reason", "protocol_error")],
    );
    sub.assert_nothing_more("oversized PUBLISH must not be delivered");

    // Only the header of a 100 MB PUBLISH: closed without waiting for the body.
    let rss_before = rss_kib(b.process.pid());
    let mut huge = Mq::connect_ok(tcp, "huge");
    let mut header = vec![0x30];
    varint(100 * 1024 * 1024, &mut header);
    header.extend(mqtt_str(b"big/huge"));
    let t0 = Instant::now();
    huge.send(&header);
    huge.expect_close(Duration::from_secs(3))
        .expect("a 100 MB PUBLISH header must close the connection at once");
    assert!(t0.elapsed() < Duration::from_secs(3));
    let e = b
        .process
        .wait_audit("protocol_error", &[("client_id", "huge")]);
    assert!(
        e["detail"]
            .as_str()
            .unwrap_or("")
            .contains(&(100 * 1024 * 1024 + 5).to_string()),
        "{e}"
    );
    let grown = rss_kib(b.process.pid()).saturating_sub(rss_before);
    assert!(grown < 10 * 1024, "RSS grew by {grown} KiB");
    // The subscriber is unaffected.
    sub.assert_nothing_more("after the 100 MB header");
    let mut p2 = Mq::connect_ok(tcp, "pub2");
    p2.publish1("big/ok", b"fine", false);
    assert_eq!(sub.expect_publish().topic, "big/ok");
}

#[test]
fn max_connect_packet_size_caps_the_first_packet() {
    // Long client ids are allowed here, so the CONNECT size is the only bound in play.
    let b = start("max_connect_packet_size = 512\nmax_client_id_len = 1000");
    let tcp = b.addr("tcp");
    // A CONNECT header declaring 100 KB: closed from the header, no CONNACK.
    let mut m = Mq::tcp(tcp);
    let mut header = vec![0x10];
    varint(100 * 1024, &mut header);
    header.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60]);
    m.send(&header);
    let got = m
        .expect_close(Duration::from_secs(3))
        .expect("oversized CONNECT closes the connection");
    assert!(got.is_empty(), "no CONNACK: {}", hex(&got));
    let e = b.process.wait_audit("protocol_error", &[]);
    assert!(e["error"].as_str().unwrap_or("").contains("512"), "{e}");
    // A complete CONNECT of 513 bytes (a long client id): also closed.
    let id = "i".repeat(513 - 15); // 1 + 2 (fixed header) + 10 + 2 + id
    let big = connect_pkt(&id, 60, true);
    assert_eq!(big.len(), 513);
    let mut m = Mq::tcp(tcp);
    m.send(&big);
    let got = m.expect_close(T).expect("closed");
    assert!(got.is_empty(), "no CONNACK: {}", hex(&got));
    // At the bound: accepted.
    let id = "i".repeat(512 - 15);
    let ok = connect_pkt(&id, 60, true);
    assert_eq!(ok.len(), 512);
    let (_m, ack) = Mq::open(tcp, &ok);
    assert_eq!(ack, CONNACK_OK);
}

// ---------------------------------------------------------------------------------------
// 3. connect_timeout_secs

/// Trickles `bytes` one at a time every `every` until the broker closes the connection.
/// Returns (time from connect to close, bytes sent, bytes received).
fn trickle_until_closed(
    addr: SocketAddr,
    bytes: &[u8],
    every: Duration,
) -> (Duration, usize, Vec<u8>) {
    let t0 = Instant::now();
    let mut s = RawClient::connect(addr).stream;
    s.set_read_timeout(Some(every)).unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 256];
    let mut i = 0;
    loop {
        if i < bytes.len() {
            if s.write_all(&bytes[i..i + 1]).is_err() {
                return (t0.elapsed(), i, received);
            }
            i += 1;
        }
        match s.read(&mut buf) {
            Ok(0) => return (t0.elapsed(), i, received),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (t0.elapsed(), i, received),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read error {e}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "connection still open after 15 s"
        );
    }
}

#[test]
fn connect_timeout_closes_slow_connect_and_unstarted_tls() {
    let b = start_with("connect_timeout_secs = 2", "", true);
    let tcp = b.addr("tcp");
    let tls = b.addr("tls");
    let window = Duration::from_millis(1900)..Duration::from_millis(3500);

    // All three probes run at once, so the test takes one deadline.
    let slow_connect = std::thread::spawn(move || {
        // 36 bytes at one byte per 250 ms would take 9 s.
        let connect = connect_pkt("trickle-0123456789abcd", 60, true);
        let r = trickle_until_closed(tcp, &connect, Duration::from_millis(250));
        (connect.len(), r)
    });
    let no_handshake = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut c = RawClient::connect(tls);
        let r = c.expect_close(Duration::from_secs(8));
        (t0.elapsed(), r)
    });
    let partial_handshake = std::thread::spawn(move || {
        // A TLS record header announcing a ClientHello that never comes.
        let t0 = Instant::now();
        let mut c = RawClient::connect(tls);
        c.send(&[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01]).unwrap();
        let r = c.expect_close(Duration::from_secs(8));
        (t0.elapsed(), r)
    });

    let (total, (elapsed, sent, received)) = slow_connect.join().unwrap();
    assert!(
        sent < total,
        "closed only after the whole CONNECT was sent ({sent}/{total} bytes)"
    );
    assert!(received.is_empty(), "no CONNACK: {}", hex(&received));
    assert!(
        window.contains(&elapsed),
        "slow CONNECT closed after {elapsed:?}, expected about 2 s"
    );

    for (what, (elapsed, r)) in [
        ("TLS handshake never started", no_handshake.join().unwrap()),
        (
            "TLS handshake never finished",
            partial_handshake.join().unwrap(),
        ),
    ] {
        let got = r.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(got.is_empty(), "{what}: received {}", hex(&got));
        assert!(
            window.contains(&elapsed),
            "{what}: closed after {elapsed:?}, expected about 2 s"
        );
    }
    let deadline = Instant::now() + T;
    while audit_count(&b, "connect_timeout", &[]) < 3 {
        assert!(
            Instant::now() < deadline,
            "expected 3 connect_timeout audits; log:\n{}",
            b.process.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = b.process.wait_audit("connect_timeout", &[]);
    assert_eq!(e["timeout_secs"], 2, "{e}");
    // A normal client is unaffected.
    Mq::connect_ok(tcp, "normal").disconnect();
}

// ---------------------------------------------------------------------------------------
// 4. max_keepalive_secs and allow_zero_keepalive

#[test]
fn max_keepalive_and_zero_keepalive_are_refused() {
    let b = start("max_keepalive_secs = 100");
    let tcp = b.addr("tcp");
    for (ka, id) in [(101u16, "ka101"), (65535, "ka65535"), (0, "ka0")] {
        let (mut m, ack) = Mq::open(tcp, &connect_pkt(id, ka, true));
        assert_eq!(ack, CONNACK_ID_REJECTED, "keepalive {ka}");
        let rest = m.expect_close(T).expect("closed after the refusal");
        assert!(
            rest.is_empty(),
            "keepalive {ka}: more after CONNACK: {}",
            hex(&rest)
        );
        let e = b
            .process
            .wait_audit("connect_refused", &[("client_id", id)]);
        let detail = e["detail"].as_str().unwrap_or("");
        let want = if ka == 0 {
            "allow_zero_keepalive"
        } else {
            "max_keepalive_secs"
        };
        assert!(detail.contains(want), "keepalive {ka}: {e}");
        assert_eq!(e["reason"], "identifier rejected");
    }
    let (m, ack) = Mq::open(tcp, &connect_pkt("ka100", 100, true));
    assert_eq!(ack, CONNACK_OK, "keepalive 100 is at the bound");
    m.disconnect();
    b.process.wait_audit("connect", &[("client_id", "ka100")]);
    assert_eq!(
        audit_count(&b, "connect", &[]),
        1,
        "only keepalive 100 got in"
    );

    let b = start("allow_zero_keepalive = true");
    let (mut m, ack) = Mq::open(b.addr("tcp"), &connect_pkt("ka0", 0, true));
    assert_eq!(ack, CONNACK_OK, "keepalive 0 with allow_zero_keepalive");
    assert!(m.subscribe(&[("x", 0)]) == vec![0]);
    m.disconnect();
}

// ---------------------------------------------------------------------------------------
// 5. max_inflight

#[test]
fn max_inflight_holds_back_qos1_until_acknowledged() {
    let b = start("max_inflight = 3");
    let tcp = b.addr("tcp");
    let mut sub = Mq::connect_ok(tcp, "slowack");
    assert_eq!(sub.subscribe(&[("inf/#", 1)]), vec![1]);
    let mut publ = Mq::connect_ok(tcp, "pub");
    for i in 0..6 {
        publ.publish1(&format!("inf/{i}"), format!("{i}").as_bytes(), false);
    }
    // Every message is queued by now; exactly 3 are sent, and nothing more.
    let first = sub.barrier();
    assert_eq!(topics(&first), ["inf/0", "inf/1", "inf/2"]);
    assert!(first.iter().all(|p| p.qos == 1 && p.pkid.is_some()));
    let mut ids: Vec<u16> = first.iter().map(|p| p.pkid.unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct packet ids");

    // An acknowledgement for an unknown packet id does not open the window.
    let unknown = (1..).find(|i| !ids.contains(i)).unwrap();
    sub.send(&puback_pkt(unknown));
    sub.assert_nothing_more("PUBACK for an unknown packet id");

    // One PUBACK: exactly one more.
    sub.send(&puback_pkt(ids[0]));
    let next = sub.barrier();
    assert_eq!(topics(&next), ["inf/3"]);

    // The rest.
    sub.send(&puback_pkt(ids[1]));
    sub.send(&puback_pkt(ids[2]));
    sub.send(&puback_pkt(next[0].pkid.unwrap()));
    let rest = sub.barrier();
    assert_eq!(topics(&rest), ["inf/4", "inf/5"]);
    for p in &rest {
        sub.send(&puback_pkt(p.pkid.unwrap()));
    }
    sub.assert_nothing_more("all acknowledged");
}

// ---------------------------------------------------------------------------------------
// 6. max_queued_messages and max_queued_bytes

/// A persistent session subscribed to `filter` at QoS 1, then gone (DISCONNECT).
fn leave_persistent_session(b: &TestBroker, id: &str, filter: &str) {
    let (mut m, ack) = Mq::open(b.addr("tcp"), &connect_pkt(id, 60, false));
    assert_eq!(ack, CONNACK_OK, "first connect of {id}");
    assert_eq!(m.subscribe(&[(filter, 1)]), vec![1]);
    m.disconnect();
    b.process.wait_audit("disconnect", &[("client_id", id)]);
}

/// Resumes a persistent session, collects what was queued, acknowledges it.
fn resume_and_collect(b: &TestBroker, id: &str) -> (Mq, Vec<Pub>) {
    let (mut m, ack) = Mq::open(b.addr("tcp"), &connect_pkt(id, 60, false));
    assert_eq!(ack, CONNACK_OK_SESSION, "{id}: session present");
    let got = m.barrier();
    for p in &got {
        m.send(&puback_pkt(p.pkid.expect("QoS 1")));
    }
    (m, got)
}

fn queue_full_dropped_values(b: &TestBroker, id: &str) -> Vec<u64> {
    log_lines(b)
        .into_iter()
        .filter(|l| is_audit(l, "queue_full", &[("client_id", id)]))
        .map(|l| l["dropped"].as_u64().expect("dropped is a number"))
        .collect()
}

#[test]
fn max_queued_messages_and_bytes_bound_an_offline_session() {
    let b = start_with(
        "max_queued_messages = 5\nmax_queued_bytes = 10000",
        "[sys]\ninterval_secs = 1\n",
        false,
    );
    let tcp = b.addr("tcp");

    // Count bound: 10 published, the first 5 kept.
    leave_persistent_session(&b, "offline-q", "q/#");
    let mut publ = Mq::connect_ok(tcp, "pub");
    for i in 0..10 {
        publ.publish1(&format!("q/{i}"), format!("m{i}").as_bytes(), false);
    }
    let e = b
        .process
        .wait_audit("queue_full", &[("client_id", "offline-q")]);
    assert_eq!(e["dropped"], 1, "{e}");
    b.process
        .wait_log(T, |v| {
            is_audit(v, "queue_full", &[("client_id", "offline-q")]) && v["dropped"] == 4
        })
        .expect("queue_full with dropped = 4");
    // Logged when the dropped count is a power of two: 1, 2, 4 of 5 drops.
    assert_eq!(queue_full_dropped_values(&b, "offline-q"), vec![1, 2, 4]);

    // $SYS/broker/messages/dropped counts the 5 drops.
    let mut sys = Mq::connect_ok(tcp, "sys-reader");
    assert_eq!(
        sys.subscribe(&[("$SYS/broker/messages/dropped", 0)]),
        vec![0]
    );
    let deadline = Instant::now() + T;
    let dropped = loop {
        let p = sys.expect_publish();
        let n: u64 = String::from_utf8(p.payload).unwrap().parse().unwrap();
        if n >= 5 || Instant::now() > deadline {
            break n;
        }
    };
    assert_eq!(dropped, 5, "$SYS/broker/messages/dropped");

    let (mut m, got) = resume_and_collect(&b, "offline-q");
    assert_eq!(
        topics(&got),
        ["q/0", "q/1", "q/2", "q/3", "q/4"],
        "first 5, in order"
    );
    assert!(got.iter().all(|p| p.qos == 1));
    m.assert_nothing_more("only 5 were queued");
    // The queue has room again.
    publ.publish1("q/live", b"live", false);
    let p = m.expect_publish();
    assert_eq!(p.topic, "q/live");
    m.send(&puback_pkt(p.pkid.unwrap()));
    m.disconnect();

    // Byte bound: 3000-byte payloads, 10000 bytes allowed: 3 fit.
    leave_persistent_session(&b, "offline-b", "b/#");
    for i in 0..6 {
        publ.publish1(&format!("b/{i}"), &vec![b'0' + i as u8; 3000], false);
    }
    b.process
        .wait_audit("queue_full", &[("client_id", "offline-b")]);
    let (mut m, got) = resume_and_collect(&b, "offline-b");
    assert_eq!(
        topics(&got),
        ["b/0", "b/1", "b/2"],
        "3 x 3000 bytes fit in 10000"
    );
    assert!(got.iter().all(|p| p.payload.len() == 3000));
    m.assert_nothing_more("the byte bound");
    // A small message fits after the queue drained.
    publ.publish1("b/small", b"s", false);
    assert_eq!(m.expect_publish().topic, "b/small");
}

// ---------------------------------------------------------------------------------------
// 7. session_expiry_secs

#[test]
fn session_expiry_removes_sessions_that_stay_away() {
    let b = start("session_expiry_secs = 2");
    let tcp = b.addr("tcp");
    let mut publ = Mq::connect_ok(tcp, "pub");
    leave_persistent_session(&b, "roamer", "exp/#");

    // Back before expiry: present, with what was queued meanwhile.
    publ.publish1("exp/1", b"1", false);
    let (m, got) = resume_and_collect(&b, "roamer");
    assert_eq!(topics(&got), ["exp/1"]);
    m.disconnect();
    let away = Instant::now();
    publ.publish1("exp/2", b"2", false);

    // Away longer than the expiry: removed.
    let line = b
        .process
        .wait_log(T, |v| {
            v["message"] == "persistent session expired" && v["client_id"] == "roamer"
        })
        .unwrap_or_else(|| {
            panic!(
                "session not expired within 10 s; log:\n{}",
                b.process.log_text()
            )
        });
    let after = away.elapsed();
    // Expiry is checked once a second against whole Unix seconds, so it may come up to a
    // second early (observed: 1.9 s); not earlier than that, and not much later than 2 s.
    assert!(
        after > Duration::from_millis(900) && after < Duration::from_millis(4000),
        "expired {after:?} after the client left: {line}"
    );
    eprintln!("session expired {after:?} after the client left");

    let (mut m, ack) = Mq::open(tcp, &connect_pkt("roamer", 60, false));
    assert_eq!(ack, CONNACK_OK, "session_present = 0 after expiry");
    m.assert_nothing_more("the queued message went with the session");
    // The subscription went too.
    publ.publish1("exp/3", b"3", false);
    m.assert_nothing_more("subscription removed with the session");
}

// ---------------------------------------------------------------------------------------
// 8. max_retained_messages and max_retained_bytes

/// The retained messages a new subscriber to `#` receives.
fn retained_set(addr: SocketAddr) -> Vec<(String, Vec<u8>)> {
    let mut m = Mq::connect_ok(addr, "retained-reader");
    assert_eq!(m.subscribe(&[("#", 0)]), vec![0]);
    let got = m.barrier();
    assert!(got.iter().all(|p| p.retain), "retain flag on subscribe");
    m.disconnect();
    let mut v: Vec<_> = got.into_iter().map(|p| (p.topic, p.payload)).collect();
    v.sort();
    v
}

fn rset(items: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    items
        .iter()
        .map(|(t, p)| (t.to_string(), p.to_vec()))
        .collect()
}

#[test]
fn max_retained_messages_and_bytes() {
    // `$SYS` updates are off here so that they cannot use up the budget (see
    // `retained_budget_is_not_used_up_by_sys_topics`).
    let b = start_with(
        "max_retained_messages = 3\nmax_retained_bytes = 1000",
        "[sys]\ninterval_secs = 0\n",
        false,
    );
    let tcp = b.addr("tcp");
    let mut publ = Mq::connect_ok(tcp, "pub");
    let mut live = Mq::connect_ok(tcp, "live");
    assert_eq!(live.subscribe(&[("r/#", 0)]), vec![0]);
    for t in ["r/1", "r/2", "r/3"] {
        publ.publish1(t, t.as_bytes(), true);
    }
    assert_eq!(audit_count(&b, "retained_limit", &[]), 0);
    publ.publish1("r/4", b"r/4", true);
    b.process.wait_audit("retained_limit", &[("topic", "r/4")]);
    assert_eq!(
        retained_set(tcp),
        rset(&[("r/1", b"r/1"), ("r/2", b"r/2"), ("r/3", b"r/3")])
    );
    // The refused message was still routed to live subscribers.
    assert_eq!(
        topics(&live.barrier()),
        ["r/1", "r/2", "r/3", "r/4"],
        "live delivery is not affected by the retained bound"
    );

    // Replacing an existing topic at the bound works.
    publ.publish1("r/2", b"new", true);
    assert_eq!(
        retained_set(tcp),
        rset(&[("r/1", b"r/1"), ("r/2", b"new"), ("r/3", b"r/3")])
    );
    assert_eq!(audit_count(&b, "retained_limit", &[]), 1);

    // Clearing frees room.
    publ.publish1("r/1", b"", true);
    publ.publish1("r/4", b"r/4", true);
    assert_eq!(
        retained_set(tcp),
        rset(&[("r/2", b"new"), ("r/3", b"r/3"), ("r/4", b"r/4")])
    );
    assert_eq!(audit_count(&b, "retained_limit", &[]), 1);

    // Bytes: clear all, then 600 + 500 > 1000.
    for t in ["r/2", "r/3", "r/4"] {
        publ.publish1(t, b"", true);
    }
    assert!(retained_set(tcp).is_empty());
    publ.publish1("big/1", &[b'a'; 600], true);
    publ.publish1("big/2", &[b'b'; 500], true);
    b.process
        .wait_audit("retained_limit", &[("topic", "big/2")]);
    assert_eq!(retained_set(tcp), rset(&[("big/1", &[b'a'; 600])]));
    // Exactly at the byte bound: 600 + 400.
    publ.publish1("big/2", &[b'b'; 400], true);
    assert_eq!(
        retained_set(tcp),
        rset(&[("big/1", &[b'a'; 600]), ("big/2", &[b'b'; 400])])
    );
    // Replacing with a larger payload that would exceed the bytes is refused and keeps
    // the old message; a smaller one is stored.
    publ.publish1("big/1", &[b'c'; 601], true);
    b.process
        .wait_audit("retained_limit", &[("topic", "big/1")]);
    assert_eq!(
        retained_set(tcp),
        rset(&[("big/1", &[b'a'; 600]), ("big/2", &[b'b'; 400])])
    );
    publ.publish1("big/1", &[b'd'; 100], true);
    assert_eq!(
        retained_set(tcp),
        rset(&[("big/1", &[b'd'; 100]), ("big/2", &[b'b'; 400])])
    );
}

#[test]
fn retained_budget_is_not_used_up_by_sys_topics() {
    // With the default `$SYS` interval, the broker's own figures are retained messages
    // too. A small user budget must still hold the user's retained messages.
    let b = start("max_retained_messages = 3");
    let tcp = b.addr("tcp");
    // Wait until `$SYS` has been published at least once (the first update is at start).
    let mut sys = Mq::connect_ok(tcp, "sys-reader");
    assert_eq!(sys.subscribe(&[("$SYS/broker/version", 0)]), vec![0]);
    let v = sys.read_pkt(Duration::from_secs(15));
    assert!(matches!(v, Ok(Pkt::Publish(_))), "no $SYS update: {v:?}");
    let mut publ = Mq::connect_ok(tcp, "pub");
    for t in ["r/1", "r/2", "r/3"] {
        publ.publish1(t, t.as_bytes(), true);
    }
    let retained = retained_set(tcp);
    // For the failure message: which topics were refused (the log may lag a little).
    let refused: Vec<String> = log_lines(&b)
        .iter()
        .filter(|v| is_audit(v, "retained_limit", &[]))
        .map(|v| v["topic"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(
        retained,
        rset(&[("r/1", b"r/1"), ("r/2", b"r/2"), ("r/3", b"r/3")]),
        "the user's retained messages must fit in max_retained_messages = 3; \
         retained_limit audits so far for: {refused:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 9. max_subscriptions_per_client

#[test]
fn max_subscriptions_per_client() {
    let b = start("max_subscriptions_per_client = 4");
    let tcp = b.addr("tcp");
    let mut m = Mq::connect_ok(tcp, "subs");
    assert_eq!(
        m.subscribe(&[("s/1", 0), ("s/2", 0), ("s/3", 0), ("s/4", 0)]),
        vec![0, 0, 0, 0]
    );
    assert_eq!(m.subscribe(&[("s/5", 0)]), vec![0x80], "5th filter");
    let e = b.process.wait_audit(
        "subscribe_refused",
        &[("client_id", "subs"), ("filter", "s/5")],
    );
    assert!(
        e["reason"]
            .as_str()
            .unwrap_or("")
            .contains("max_subscriptions_per_client"),
        "{e}"
    );
    // Re-subscribing an existing filter is allowed (and updates its QoS).
    assert_eq!(m.subscribe(&[("s/2", 1)]), vec![1]);
    // Mixed: existing granted, new refused.
    assert_eq!(m.subscribe(&[("s/1", 0), ("s/6", 0)]), vec![0, 0x80]);
    b.process.wait_audit(
        "subscribe_refused",
        &[("client_id", "subs"), ("filter", "s/6")],
    );
    assert_eq!(
        audit_count(&b, "subscribe_refused", &[]),
        2,
        "only s/5 and s/6 refused"
    );

    // The refused filter really is not subscribed.
    let mut publ = Mq::connect_ok(tcp, "pub");
    publ.publish1("s/5", b"no", false);
    publ.publish1("s/2", b"yes", false);
    let got = m.barrier();
    assert_eq!(topics(&got), ["s/2"]);
    assert_eq!(got[0].qos, 1, "s/2 re-subscribed at QoS 1");
    m.send(&puback_pkt(got[0].pkid.unwrap()));

    // Unsubscribing frees a slot.
    m.unsubscribe(&["s/3"]);
    assert_eq!(m.subscribe(&[("s/5", 0)]), vec![0]);
    publ.publish1("s/5", b"now", false);
    assert_eq!(m.expect_publish().topic, "s/5");
}

// ---------------------------------------------------------------------------------------
// 10. max_topic_levels

#[test]
fn max_topic_levels_for_publish_subscribe_and_will() {
    let b = start("max_topic_levels = 4");
    let tcp = b.addr("tcp");
    let mut sub = Mq::connect_ok(tcp, "lv-sub");
    assert_eq!(
        sub.subscribe(&[("a/b/c/d/e", 0), ("a/b/c/d", 0), ("a/b/+/#", 0)]),
        vec![0x80, 0, 0]
    );
    let e = b
        .process
        .wait_audit("subscribe_refused", &[("filter", "a/b/c/d/e")]);
    assert_eq!(e["reason"], "too many topic levels");

    let mut publ = Mq::connect_ok(tcp, "lv-pub");
    publ.publish1("a/b/c/d", b"4 levels", false);
    assert_eq!(topics(&sub.barrier()), ["a/b/c/d"]);

    // 5 levels: protocol error, connection closed, nothing routed (a/b/+/# would match).
    publ.send(&publish_pkt("a/b/c/d/e", b"5 levels", 1, 99, false));
    let got = publ.expect_close(T).expect("5-level PUBLISH closes");
    assert!(got.is_empty(), "no PUBACK: {}", hex(&got));
    let e = b
        .process
        .wait_audit("protocol_error", &[("client_id", "lv-pub")]);
    assert!(
        e["detail"]
            .as_str()
            .unwrap_or("")
            .contains("max_topic_levels"),
        "{e}"
    );
    b.process.wait_audit(
        "disconnect",
        &[("client_id", "lv-pub"), ("reason", "protocol_error")],
    );
    sub.assert_nothing_more("5-level PUBLISH must not be routed");

    // A will topic with 5 levels is refused at CONNECT.
    let (mut m, ack) = Mq::open(
        tcp,
        &connect_pkt_full(b"lv-will", 60, true, Some("w/x/y/z/5")),
    );
    assert_eq!(ack, [0x20, 2, 0, 5], "will topic with 5 levels");
    m.expect_close(T).expect("closed");
    let (m, ack) = Mq::open(
        tcp,
        &connect_pkt_full(b"lv-will4", 60, true, Some("w/x/y/z")),
    );
    assert_eq!(ack, CONNACK_OK, "will topic with 4 levels");
    m.disconnect();
}

// ---------------------------------------------------------------------------------------
// 11. max_client_id_len

#[test]
fn max_client_id_len_counts_bytes() {
    let b = start("max_client_id_len = 8");
    let tcp = b.addr("tcp");
    for id in ["123456789", "éééé1"] {
        assert_eq!(id.len(), 9);
        let (mut m, ack) = Mq::open(tcp, &connect_pkt(id, 60, true));
        assert_eq!(ack, CONNACK_ID_REJECTED, "{id:?} is 9 bytes");
        m.expect_close(T).expect("closed after the refusal");
        let e = b
            .process
            .wait_audit("connect_refused", &[("client_id", id)]);
        assert!(
            e["detail"]
                .as_str()
                .unwrap_or("")
                .contains("max_client_id_len"),
            "{e}"
        );
    }
    for id in ["12345678", "éééé"] {
        assert_eq!(id.len(), 8);
        let (m, ack) = Mq::open(tcp, &connect_pkt(id, 60, true));
        assert_eq!(ack, CONNACK_OK, "{id:?} is 8 bytes");
        m.disconnect();
    }
}

// ---------------------------------------------------------------------------------------
// 12. A subscriber that stops reading (max_queued_messages, write_timeout_secs)

/// A TCP connection with a small receive buffer, so that a client that does not read
/// pushes back on the broker quickly.
fn connect_small_rcvbuf(addr: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        let stream = s.connect(addr).await.unwrap();
        let std = stream.into_std().unwrap();
        std.set_nonblocking(false).unwrap();
        std
    })
}

#[test]
fn slow_subscriber_is_bounded_and_does_not_stall_others() {
    const MESSAGES: u64 = 20_000;
    const BATCH: u64 = 50; // well under the normal subscriber's queue of 100
    let b = start("max_queued_messages = 100\nwrite_timeout_secs = 2");
    let tcp = b.addr("tcp");
    let pid = b.process.pid();

    // The stuck subscriber: subscribes, then never reads again.
    let mut stuck = Mq::from_stream(connect_small_rcvbuf(tcp));
    stuck.send(&connect_pkt("stuck", 60, true));
    assert_eq!(stuck.read_bytes(4, T).unwrap(), CONNACK_OK);
    assert_eq!(stuck.subscribe(&[("load/#", 0)]), vec![0]);

    // The normal subscriber reads everything in a thread and reports sequence numbers.
    let mut normal = Mq::connect_ok(tcp, "normal");
    assert_eq!(normal.subscribe(&[("load/#", 0)]), vec![0]);
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let reader = std::thread::spawn(move || loop {
        match normal.read_pkt(Duration::from_secs(20)) {
            Ok(Pkt::Publish(p)) => {
                let seq = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                if tx.send(seq).is_err() || seq == MESSAGES - 1 {
                    return normal;
                }
            }
            Ok(other) => panic!("normal subscriber got {other:?}"),
            Err(e) => panic!("normal subscriber: {e}"),
        }
    });

    let mut publ = Mq::connect_ok(tcp, "loader");
    let rss_start = rss_kib(pid);
    let mut rss_max = rss_start;
    let started = Instant::now();
    let mut expected = 0u64;
    let mut worst_batch = Duration::ZERO;
    let mut payload = vec![b'p'; 1024];
    let mut buf = Vec::with_capacity((BATCH as usize) * 1100);
    for batch in 0..MESSAGES / BATCH {
        // Paced to 5 messages per ms (about 4 s in all), so that traffic flows before,
        // during and after the stuck subscriber's 2 s write timeout.
        let due = started + Duration::from_micros(batch * BATCH * 200);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        buf.clear();
        for i in 0..BATCH {
            let seq = batch * BATCH + i;
            payload[..8].copy_from_slice(&seq.to_be_bytes());
            buf.extend(publish_pkt("load/x", &payload, 0, 0, false));
        }
        let t = Instant::now();
        publ.send(&buf);
        // The normal subscriber receives the whole batch, in order, promptly.
        while expected < (batch + 1) * BATCH {
            let seq = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|e| {
                panic!(
                    "normal subscriber stalled at {expected} of {MESSAGES} ({e}) after {:?}",
                    started.elapsed()
                )
            });
            assert_eq!(
                seq, expected,
                "normal subscriber: in order, nothing dropped"
            );
            expected += 1;
        }
        worst_batch = worst_batch.max(t.elapsed());
        if batch % 20 == 0 {
            rss_max = rss_max.max(rss_kib(pid));
        }
    }
    let elapsed = started.elapsed();
    reader
        .join()
        .expect("normal subscriber got the last message");
    rss_max = rss_max.max(rss_kib(pid));
    eprintln!(
        "{MESSAGES} x 1 KiB in {elapsed:?}; slowest batch of {BATCH}: {worst_batch:?}; \
         broker RSS {rss_start} KiB -> max {rss_max} KiB"
    );
    assert!(
        worst_batch < Duration::from_millis(1500),
        "a batch of {BATCH} took {worst_batch:?} to reach the normal subscriber (the \
         write timeout is 2 s)"
    );
    assert!(
        rss_max - rss_start < 50 * 1024,
        "broker RSS grew by {} KiB",
        rss_max - rss_start
    );

    // The stuck subscriber overflowed its queue and was disconnected while the traffic
    // still flowed: before the loader (which sent its last message after the normal
    // subscriber had everything else) left.
    publ.disconnect();
    b.process
        .wait_audit("disconnect", &[("client_id", "loader")]);
    let e = b
        .process
        .wait_audit("queue_full", &[("client_id", "stuck")]);
    assert_eq!(e["dropped"], 1);
    b.process
        .wait_audit("write_timeout", &[("client_id", "stuck")]);
    b.process.wait_audit(
        "disconnect",
        &[("client_id", "stuck"), ("reason", "write_timeout")],
    );
    assert_eq!(
        audit_count(&b, "queue_full", &[("client_id", "normal")]),
        0,
        "the normal subscriber never dropped anything"
    );
    assert_eq!(audit_count(&b, "write_timeout", &[]), 1);
    let lines = log_lines(&b);
    let pos = |event: &str, id: &str| {
        lines
            .iter()
            .position(|v| is_audit(v, event, &[("client_id", id)]))
            .unwrap()
    };
    assert!(
        pos("write_timeout", "stuck") < pos("disconnect", "loader"),
        "the stuck subscriber was only disconnected after the traffic ended"
    );
    drop(stuck);
}

// ---------------------------------------------------------------------------------------
// 13. Session ownership by identity (SECURITY-CASES A5)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_of_another_identity_is_refused_and_owner_keeps_session() {
    let b = start_with("", "", true);
    let a_cert = b.pki.client("dev-a");
    let b_cert = b.pki.client("dev-b");
    let via_a = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&a_cert)));
    let via_b = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&b_cert)));
    let persistent = |via: &Via| {
        let mut o = options("dev-a", via);
        o.set_clean_session(false);
        o
    };
    let plc = b.pki.client("plc");
    let mut publ = Client::connect(options(
        "plc",
        &Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&plc))),
    ))
    .await
    .unwrap();

    let mut a = Client::connect(persistent(&via_a)).await.unwrap();
    a.subscribe("a5/#", QoS::AtLeastOnce).await;
    b.process
        .wait_audit("connect", &[("client_id", "dev-a"), ("identity", "dev-a")]);

    // dev-b with dev-a's client id, persistent or clean: refused with CONNACK 2.
    for clean in [false, true] {
        let mut o = persistent(&via_b);
        o.set_clean_session(clean);
        let err = Client::connect(o)
            .await
            .err()
            .expect("dev-b must not get dev-a's session");
        assert!(err.contains("BadClientId"), "clean={clean}: {err}");
    }
    let e = b.process.wait_audit(
        "connect_refused",
        &[
            ("client_id", "dev-a"),
            ("identity", "dev-b"),
            ("reason", "identifier rejected"),
        ],
    );
    assert!(
        e["detail"]
            .as_str()
            .unwrap_or("")
            .contains("another identity"),
        "{e}"
    );
    wait_audit_count(&b, "connect_refused", &[("identity", "dev-b")], 2);

    // dev-a was not kicked and still receives.
    publ.publish("a5/x", QoS::AtLeastOnce, false, b"for a")
        .await;
    let p = a.next_publish(T).await.expect("dev-a still receives");
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("a5/x", &b"for a"[..]));
    while let Ok(ev) = a.events.try_recv() {
        assert!(ev.is_ok(), "dev-a's connection failed: {ev:?}");
    }
    assert_eq!(audit_count(&b, "disconnect", &[("client_id", "dev-a")]), 0);

    // dev-a goes away; its offline session is still not dev-b's.
    a.disconnect().await;
    b.process
        .wait_audit("disconnect", &[("client_id", "dev-a")]);
    publ.publish("a5/y", QoS::AtLeastOnce, false, b"queued")
        .await;
    let err = Client::connect(persistent(&via_b))
        .await
        .err()
        .expect("dev-b refused while dev-a's session is offline");
    assert!(err.contains("BadClientId"), "{err}");

    // dev-a comes back to its session and what was queued for it.
    let mut a = Client::connect(persistent(&via_a)).await.unwrap();
    assert!(a.session_present, "dev-a keeps its session");
    let p = a.next_publish(T).await.expect("queued for dev-a");
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("a5/y", &b"queued"[..]));
    a.disconnect().await;
    publ.disconnect().await;
}

// ---------------------------------------------------------------------------------------
// 14. park_idle_after_ms: idle plain-TCP connections wait without a task

/// One sample of the Prometheus endpoint.
fn gauge(metrics: SocketAddr, name: &str) -> u64 {
    let mut s = TcpStream::connect(metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the scrape:\n{text}"))
}

/// Waits until exactly `n` connections are parked (scrapes polled; the gauge moves when a
/// connection's idle time runs out).
fn wait_parked(metrics: SocketAddr, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = gauge(metrics, "bulwark_connections_parked");
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} parked connections, the broker reports {now}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn parked_connections_are_woken_by_deliveries_packets_close_and_takeover() {
    parked_connections_are_woken(false, "");
}

/// The same on one CPU: a resumed connection is served before its park timer can send it
/// back to the lot.
#[test]
fn parked_connections_are_woken_on_one_cpu() {
    parked_connections_are_woken(true, "");
}

/// The same with a pool of three workers (`[runtime] threads = 3`).
#[test]
fn parked_connections_are_woken_on_three_worker_threads() {
    parked_connections_are_woken(false, "[runtime]\nthreads = 3\n");
}

fn parked_connections_are_woken(one_cpu: bool, runtime: &str) {
    let b = TestBroker::start(BrokerConfig {
        tls: false,
        wss: false,
        extra: format!("[limits]\npark_idle_after_ms = 50\n{METRICS_ON}{runtime}"),
        one_cpu,
        ..BrokerConfig::default()
    });
    let metrics = metrics_addr(&b.process);
    let addr = b.addr("tcp");
    let mut sub = Mq::connect_ok(addr, "park-sub");
    assert_eq!(sub.subscribe(&[("park/#", 1)]), vec![1]);
    let mut publ = Mq::connect_ok(addr, "park-pub");
    wait_parked(metrics, 2);

    // A message for a parked subscriber: the publisher's packet and the delivery each
    // wake a parked connection.
    publ.publish1("park/1", b"hello", false);
    let p = sub.expect_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("park/1", &b"hello"[..])
    );
    sub.send(&puback_pkt(p.pkid.expect("QoS 1")));

    // A packet on a parked connection is read and answered.
    wait_parked(metrics, 2);
    sub.send(&PINGREQ);
    assert_eq!(sub.expect_pkt("PINGRESP"), Pkt::PingResp);

    // A parked client that goes away without DISCONNECT: its will is published.
    let (will, ack) = Mq::open(
        addr,
        &connect_pkt_full(b"park-will", 60, true, Some("park/will")),
    );
    assert_eq!(ack, CONNACK_OK);
    wait_parked(metrics, 3);
    drop(will);
    let p = sub.expect_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("park/will", &b"gone"[..])
    );
    b.process.wait_audit(
        "disconnect",
        &[("client_id", "park-will"), ("reason", "connection_closed")],
    );

    // A parked connection whose session is taken over is closed.
    wait_parked(metrics, 2);
    let _new = Mq::connect_ok(addr, "park-sub");
    sub.r.get_ref().set_read_timeout(Some(T)).unwrap();
    let mut rest = Vec::new();
    let n = sub.r.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "nothing more for the old connection: {}", hex(&rest));
    b.process.wait_audit(
        "disconnect",
        &[("client_id", "park-sub"), ("reason", "session_taken_over")],
    );
    publ.send(&DISCONNECT);
}

// ---------------------------------------------------------------------------------------
// 15. [runtime] threads: the main thread alone, or a pool of workers

/// The names of the broker process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// Six clients, each subscribed to its own topic, each publishing to every other one:
/// every client gets its own PUBACKs and the five others' messages.
fn everyone_hears_everyone(addr: SocketAddr) {
    const N: usize = 6;
    let mut clients: Vec<Mq> = (0..N)
        .map(|i| Mq::connect_ok(addr, &format!("threads-{i}")))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.subscribe(&[(&format!("threads/{i}"), 1)]), vec![1]);
    }
    let mut sent_ids: Vec<Vec<u16>> = vec![Vec::new(); N];
    for (from, c) in clients.iter_mut().enumerate() {
        for to in (0..N).filter(|&to| to != from) {
            let id = c.pkid();
            sent_ids[from].push(id);
            c.send(&publish_pkt(
                &format!("threads/{to}"),
                from.to_string().as_bytes(),
                1,
                id,
                false,
            ));
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        // Its own PUBACKs and the others' messages, in whatever order they come.
        let (mut acks, mut senders) = (Vec::new(), Vec::new());
        while acks.len() + senders.len() < 2 * (N - 1) {
            match c.expect_pkt("PUBACK or PUBLISH") {
                Pkt::PubAck(id) => acks.push(id),
                Pkt::Publish(p) => {
                    assert_eq!(p.topic, format!("threads/{i}"));
                    c.send(&puback_pkt(p.pkid.expect("QoS 1")));
                    senders.push(String::from_utf8(p.payload).unwrap());
                }
                other => panic!("client {i}: unexpected {other:?}"),
            }
        }
        acks.sort();
        assert_eq!(acks, sent_ids[i], "client {i}");
        senders.sort();
        let want: Vec<String> = (0..N).filter(|&f| f != i).map(|f| f.to_string()).collect();
        assert_eq!(senders, want, "client {i}");
    }
}

#[test]
fn runtime_threads_serve_on_the_main_thread_or_a_pool_of_workers() {
    // The default: everything on the main thread, no worker pool.
    let b = start("");
    b.process
        .wait_log(T, |v| {
            v["message"] == "serving connections on 1 thread ([runtime] threads)"
        })
        .expect("the thread count in the log");
    let names = thread_names(b.process.pid());
    assert!(
        !names.iter().any(|n| n == "bulwark-worker"),
        "a worker pool with the default [runtime] threads = 1: {names:?}"
    );
    everyone_hears_everyone(b.addr("tcp"));

    // threads = 3: a pool of three workers (its helper threads for blocking work, such
    // as opening the store, carry the same name).
    let b = start_with("", "[runtime]\nthreads = 3\n", false);
    b.process
        .wait_log(T, |v| {
            v["message"] == "serving connections on 3 threads ([runtime] threads)"
        })
        .expect("the thread count in the log");
    let workers = thread_names(b.process.pid())
        .into_iter()
        .filter(|n| n == "bulwark-worker")
        .count();
    assert!(workers >= 3, "{workers} bulwark-worker threads");
    everyone_hears_everyone(b.addr("tcp"));
}

#[test]
fn parked_connections_keep_their_keepalive_and_close_on_shutdown() {
    let mut b = start_with("park_idle_after_ms = 0", METRICS_ON, false);
    let metrics = metrics_addr(&b.process);
    let addr = b.addr("tcp");
    // Keepalive 1 s: closed after 1.5 s without a packet, parked or not.
    let started = Instant::now();
    let (mut quiet, ack) = Mq::open(addr, &connect_pkt("park-quiet", 1, true));
    assert_eq!(ack, CONNACK_OK);
    let mut idle = Mq::connect_ok(addr, "park-idle");
    wait_parked(metrics, 2);
    quiet.r.get_ref().set_read_timeout(Some(T)).unwrap();
    let mut rest = Vec::new();
    assert_eq!(quiet.r.read_to_end(&mut rest).unwrap_or(0), 0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}, before 1.5 keepalive periods"
    );
    b.process.wait_audit(
        "disconnect",
        &[("client_id", "park-quiet"), ("reason", "keepalive_timeout")],
    );

    // Shutdown closes parked connections too, and the broker exits cleanly.
    wait_parked(metrics, 1);
    let status = b.process.terminate();
    assert!(status.success(), "{status:?}");
    idle.r.get_ref().set_read_timeout(Some(T)).unwrap();
    let mut rest = Vec::new();
    assert_eq!(idle.r.read_to_end(&mut rest).unwrap_or(0), 0);
}
