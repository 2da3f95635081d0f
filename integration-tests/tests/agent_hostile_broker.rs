//! P11: the edge agent against a hostile broker. A fake broker inside the test (TLS with the
//! test PKI's server certificate for localhost, client certificates required and verified
//! against the test CA) speaks just enough MQTT 3.1.1 by hand:
//! - it answers the agent's SUBSCRIBE with malformed SUBACKs and never acknowledges the
//!   agent's data: the agent must drop the connection, reconnect, stay alive, and lose no
//!   record (delivered later through the real broker from the same queue directory);
//! - it floods the agent with PUBLISH packets (commands at QoS 0 and 1, 64 KiB payloads,
//!   unrelated topics): the agent's memory must stay bounded, its command answers within
//!   `commands.max_per_minute`, and it must still work afterwards.
//!
//! Everything synchronises on packets the fake broker sees and on the agent's JSON log.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_integration_tests::mqtt::{options, Client, QoS, Via};
use bulwark_integration_tests::{
    bin_path, hex, run_with_timeout, BrokerConfig, BrokerProcess, TestBroker, TestPki,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio_rustls::server::TlsStream;

const T: Duration = Duration::from_secs(20);

// ----- agent helpers (as in tests/agent.rs) -----

fn acl(dir: &Path) -> PathBuf {
    let p = dir.join("acl.conf");
    std::fs::write(
        &p,
        format!(
            "{}\nuser historian\nclientid *\ntopic read devices/+/data/#\n",
            bulwark_protocol::acl::DEFAULT_DEVICE_RULES
        ),
    )
    .unwrap();
    p
}

fn broker_config(acl_path: &Path) -> BrokerConfig {
    BrokerConfig {
        wss: false,
        extra: format!("[auth]\nacl_file = {acl_path:?}\n"),
        ..BrokerConfig::default()
    }
}

/// An agent configuration whose files live in `dir`; `{PORT}` stands for the broker port.
fn agent_config_template(pki: &TestPki, device: &str, dir: &Path) -> String {
    let cert = pki.client(device);
    format!(
        "device_id = {device:?}\n[uplink]\nbrokers = [\"mqtts://localhost:{{PORT}}\"]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nbackoff_min_ms = 100\nbackoff_max_ms = 1000\n[queue]\npath = {:?}\n[ingest]\nsocket = {:?}\n",
        pki.ca_path,
        cert.cert_path,
        cert.key_path,
        dir.join("queue"),
        dir.join("ingest.sock"),
    )
}

fn start_agent(template: &str, port: u16, dir: &Path, env: &[(&str, &str)]) -> BrokerProcess {
    let config = template.replace("{PORT}", &port.to_string());
    let p = BrokerProcess::spawn_agent_with_env(&config, dir, env);
    p.wait_log(T, |v| v["message"] == "ingest socket ready")
        .unwrap_or_else(|| panic!("agent did not start:\n{}", p.log_text()));
    p
}

fn send(socket: &Path, series: &str, json: &str) -> u64 {
    let (status, out, err) = run_with_timeout(
        Command::new(bin_path("bulwark-agent")).args([
            "send",
            "--socket",
            socket.to_str().unwrap(),
            "--series",
            series,
            "--json",
            json,
        ]),
        T,
    );
    assert!(status.unwrap().success(), "send failed: {out}{err}");
    out.trim()
        .strip_prefix("accepted seq ")
        .unwrap_or_else(|| panic!("unexpected output {out:?}"))
        .parse()
        .unwrap()
}

fn alive(p: &mut BrokerProcess) -> bool {
    p.wait_exit(Duration::ZERO).is_none()
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ----- the fake broker: TLS and hand-made MQTT 3.1.1 -----

type Tls = TlsStream<TcpStream>;
type Handler = Arc<dyn Fn(usize, Tls) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

fn tls_acceptor(pki: &TestPki) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(&std::fs::read(&pki.server_cert).unwrap())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(&std::fs::read(&pki.server_key).unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&std::fs::read(&pki.ca_path).unwrap()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TLS listener on 127.0.0.1 handing each connection (numbered from 1) to `handler`.
struct FakeBroker {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeBroker {
    async fn start(pki: &TestPki, handler: Handler) -> FakeBroker {
        let acceptor = tls_acceptor(pki);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut n = 0;
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                n += 1;
                let (acceptor, handler) = (acceptor.clone(), handler.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(tls) => {
                            assert!(
                                tls.get_ref().1.peer_certificates().is_some(),
                                "no client certificate"
                            );
                            handler(n, tls).await
                        }
                        Err(e) => eprintln!("fake broker: connection {n}: TLS handshake: {e}"),
                    }
                });
            }
        });
        FakeBroker { port, task }
    }
}

const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBSCRIBE: u8 = 8;
const PINGREQ: u8 = 12;
const DISCONNECT: u8 = 14;
const CONNACK_OK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
const PINGRESP: [u8; 2] = [0xd0, 0x00];

/// Reads one packet: (first byte, body). `None` at a clean end of stream.
async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let first = match r.read_u8().await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut len = 0usize;
    for i in 0..4 {
        let b = r.read_u8().await?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return Err(std::io::Error::other(
                "remaining length longer than 4 bytes",
            ));
        }
    }
    if len > 4 << 20 {
        return Err(std::io::Error::other(format!("packet of {len} bytes")));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    Ok(Some((first, body)))
}

fn put_packet(out: &mut Vec<u8>, first: u8, body: &[u8]) {
    out.push(first);
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
}

fn put_publish(out: &mut Vec<u8>, topic: &str, qos: u8, pkid: u16, payload: &[u8]) {
    let mut body = Vec::with_capacity(4 + topic.len() + payload.len());
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    put_packet(out, 0x30 | (qos << 1), &body);
}

#[derive(Debug, Clone)]
struct Publish {
    topic: String,
    qos: u8,
    pkid: u16,
    payload: Vec<u8>,
}

fn parse_publish(first: u8, body: &[u8]) -> Publish {
    let qos = (first >> 1) & 3;
    let tl = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + tl].to_vec()).unwrap();
    let mut at = 2 + tl;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([body[at], body[at + 1]]);
        at += 2;
    }
    Publish {
        topic,
        qos,
        pkid,
        payload: body[at..].to_vec(),
    }
}

fn puback(pkid: u16) -> Vec<u8> {
    let p = pkid.to_be_bytes();
    vec![0x40, 0x02, p[0], p[1]]
}

/// CONNECT's client id (MQTT 3.1.1: protocol name, level, flags, keepalive, client id).
fn connect_client_id(body: &[u8]) -> String {
    let nl = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let at = 2 + nl + 4;
    let il = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
    String::from_utf8_lossy(&body[at + 2..at + 2 + il]).into_owned()
}

/// SUBSCRIBE: packet id and (filter, qos) pairs.
fn parse_subscribe(body: &[u8]) -> (u16, Vec<(String, u8)>) {
    let pkid = u16::from_be_bytes([body[0], body[1]]);
    let mut at = 2;
    let mut filters = Vec::new();
    while at + 2 <= body.len() {
        let l = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
        let f = String::from_utf8_lossy(&body[at + 2..at + 2 + l]).into_owned();
        filters.push((f, body[at + 2 + l]));
        at += 3 + l;
    }
    (pkid, filters)
}

type PacketRx = mpsc::Receiver<std::io::Result<(u8, Vec<u8>)>>;

/// Reads packets in a task (so the handler can `select!` on them safely).
fn spawn_reader<R: AsyncRead + Unpin + Send + 'static>(r: R) -> PacketRx {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut r = BufReader::with_capacity(64 * 1024, r);
        loop {
            match read_packet(&mut r).await {
                Ok(Some(p)) => {
                    if tx.send(Ok(p)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    rx
}

// ----- test 1: malformed SUBACKs -----

#[derive(Debug, Clone)]
enum Ev {
    Connected {
        conn: usize,
        client_id: String,
    },
    Subscribe {
        conn: usize,
        filters: Vec<(String, u8)>,
    },
    Publish {
        conn: usize,
        p: Publish,
    },
    MalformedSubAck {
        conn: usize,
        bytes: Vec<u8>,
    },
    Disconnect {
        conn: usize,
    },
    Closed {
        conn: usize,
        how: String,
    },
}

/// What the malformed-SUBACK broker sends for the SUBSCRIBE on connection `conn`
/// (`None`: never answer). Connection 1 answers only once the test says so.
fn malformed_suback(conn: usize, pkid: u16) -> Option<Vec<u8>> {
    let p = pkid.to_be_bytes();
    match conn {
        // Return code 0x05: not a valid SUBACK return code in MQTT 3.1.1.
        1 => Some(vec![0x90, 0x03, p[0], p[1], 0x05]),
        // Remaining length 2: a packet id and no return code at all.
        2 => Some(vec![0x90, 0x02, p[0], p[1]]),
        // Remaining length 0: not even a packet id.
        3 => Some(vec![0x90, 0x00]),
        // From then on the SUBSCRIBE is never answered and the agent stays connected.
        _ => None,
    }
}

async fn malformed_suback_conn(
    conn: usize,
    tls: Tls,
    ev: mpsc::UnboundedSender<Ev>,
    mut release: watch::Receiver<bool>,
) {
    let (r, mut w) = tokio::io::split(tls);
    let mut packets = spawn_reader(r);
    let mut held: Option<u16> = None;
    loop {
        tokio::select! {
            p = packets.recv() => match p {
                Some(Ok((first, body))) => match first >> 4 {
                    CONNECT => {
                        w.write_all(&CONNACK_OK).await.unwrap();
                        let _ = ev.send(Ev::Connected { conn, client_id: connect_client_id(&body) });
                    }
                    SUBSCRIBE => {
                        let (pkid, filters) = parse_subscribe(&body);
                        let _ = ev.send(Ev::Subscribe { conn, filters });
                        if conn == 1 && !*release.borrow_and_update() {
                            held = Some(pkid);
                        } else if let Some(bytes) = malformed_suback(conn, pkid) {
                            w.write_all(&bytes).await.unwrap();
                            let _ = ev.send(Ev::MalformedSubAck { conn, bytes });
                        }
                    }
                    // Never acknowledged: the records must stay in the agent's queue.
                    PUBLISH => {
                        let _ = ev.send(Ev::Publish { conn, p: parse_publish(first, &body) });
                    }
                    PINGREQ => w.write_all(&PINGRESP).await.unwrap(),
                    DISCONNECT => {
                        let _ = ev.send(Ev::Disconnect { conn });
                        let _ = w.shutdown().await;
                        return;
                    }
                    _ => {}
                },
                Some(Err(e)) => {
                    let _ = ev.send(Ev::Closed { conn, how: e.to_string() });
                    return;
                }
                None => {
                    let _ = ev.send(Ev::Closed { conn, how: "end of stream".into() });
                    return;
                }
            },
            r = release.changed(), if held.is_some() => {
                r.unwrap();
                let bytes = malformed_suback(conn, held.take().unwrap()).unwrap();
                w.write_all(&bytes).await.unwrap();
                let _ = ev.send(Ev::MalformedSubAck { conn, bytes });
            }
        }
    }
}

/// Every event the fake broker reported so far.
struct Events {
    rx: mpsc::UnboundedReceiver<Ev>,
    all: Vec<Ev>,
}

impl Events {
    /// Waits until `pred` holds over all events so far.
    async fn until(&mut self, what: &str, pred: impl Fn(&[Ev]) -> bool) {
        let deadline = tokio::time::Instant::now() + T;
        while !pred(&self.all) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => self.all.push(e),
                _ => panic!(
                    "fake broker: {what} did not happen; events:\n{:#?}",
                    self.all
                ),
            }
        }
    }
}

fn data_seqs(events: &[Ev], on_conn: usize, device: &str) -> BTreeSet<u64> {
    let prefix = format!("devices/{device}/data/");
    events
        .iter()
        .filter_map(|e| match e {
            Ev::Publish { conn, p } if *conn == on_conn && p.topic.starts_with(&prefix) => {
                assert_eq!(p.qos, 1, "records go out at QoS 1");
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                v["seq"].as_u64()
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_suback_makes_the_agent_reconnect_with_its_buffer_intact() {
    const DEVICE: &str = "gw-p11a";
    const RECORDS: u64 = 30;
    let started = Instant::now();
    let acl_dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(broker_config(&acl(acl_dir.path())));

    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (release_tx, release_rx) = watch::channel(false);
    let handler: Handler = Arc::new(move |conn, tls| {
        Box::pin(malformed_suback_conn(
            conn,
            tls,
            ev_tx.clone(),
            release_rx.clone(),
        ))
    });
    let fake = FakeBroker::start(&b.pki, handler).await;
    let mut events = Events {
        rx: ev_rx,
        all: Vec::new(),
    };

    let dir = tempfile::tempdir().unwrap();
    let template = agent_config_template(&b.pki, DEVICE, dir.path());
    let mut agent = start_agent(&template, fake.port, dir.path(), &[]);
    let socket = dir.path().join("ingest.sock");

    // Connection 1: CONNACK given, the SUBSCRIBE held; the records go out and are not acked.
    events
        .until("CONNECT and SUBSCRIBE on connection 1", |e| {
            e.iter().any(|e| {
                matches!(e, Ev::Subscribe { conn: 1, filters }
                    if filters == &[(format!("devices/{DEVICE}/cmd/#"), 1)])
            })
        })
        .await;
    assert!(events
        .all
        .iter()
        .any(|e| matches!(e, Ev::Connected { conn: 1, client_id } if client_id == DEVICE)));
    let mut accepted = BTreeSet::new();
    for i in 0..RECORDS {
        accepted.insert(send(&socket, "p11/a", &i.to_string()));
    }
    events
        .until("every record published on connection 1", |e| {
            data_seqs(e, 1, DEVICE).is_superset(&accepted)
        })
        .await;

    // The malformed SUBACKs: the agent must drop each connection and come back.
    release_tx.send(true).unwrap();
    for conn in 1..=3 {
        events
            .until(&format!("the agent closing connection {conn}"), |e| {
                e.iter()
                    .any(|e| matches!(e, Ev::Closed { conn: c, .. } if *c == conn))
            })
            .await;
        events
            .until(&format!("CONNECT on connection {}", conn + 1), |e| {
                e.iter()
                    .any(|e| matches!(e, Ev::Connected { conn: c, .. } if *c == conn + 1))
            })
            .await;
    }
    // Connection 4 (SUBSCRIBE never answered): everything unacknowledged is sent again.
    events
        .until("every record sent again on connection 4", |e| {
            data_seqs(e, 4, DEVICE).is_superset(&accepted)
        })
        .await;
    let down_errors: Vec<String> = {
        let text = agent.log_text();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["message"] == "uplink down")
            .map(|l| l["error"].as_str().unwrap_or("").to_string())
            .collect()
    };
    for (conn, bytes) in events.all.iter().filter_map(|e| match e {
        Ev::MalformedSubAck { conn, bytes } => Some((conn, bytes)),
        _ => None,
    }) {
        println!("connection {conn}: malformed SUBACK {}", hex(bytes));
    }
    for (conn, how) in events.all.iter().filter_map(|e| match e {
        Ev::Closed { conn, how } => Some((conn, how)),
        _ => None,
    }) {
        println!("connection {conn}: the agent closed it ({how})");
    }
    println!("agent 'uplink down' errors: {down_errors:#?}");
    assert!(
        down_errors.len() >= 3,
        "expected an 'uplink down' per malformed SUBACK; log:\n{}",
        agent.log_text()
    );
    assert!(alive(&mut agent), "the agent died:\n{}", agent.log_text());
    assert!(
        !events
            .all
            .iter()
            .any(|e| matches!(e, Ev::Disconnect { conn } if *conn <= 3)),
        "the agent should drop the connection, not DISCONNECT cleanly"
    );

    // Buffer intact: stop the agent, start it again on the same queue against the real
    // broker, and a historian receives every accepted record.
    let hist = b.pki.client("historian");
    let via = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&hist)));
    let mut sub = Client::connect(options("historian-p11", &via))
        .await
        .unwrap();
    sub.subscribe(&format!("devices/{DEVICE}/data/#"), QoS::AtLeastOnce)
        .await;
    let status = agent.terminate();
    assert!(
        status.success(),
        "agent exit {status:?}:\n{}",
        agent.log_text()
    );
    drop(fake);
    let agent = start_agent(&template, b.addr("tls").port(), dir.path(), &[]);
    let mut seen = BTreeSet::new();
    while !seen.is_superset(&accepted) {
        let p = sub.next_publish(T).await.unwrap_or_else(|| {
            panic!(
                "missing {:?}; agent log:\n{}",
                accepted.difference(&seen).collect::<Vec<_>>(),
                agent.log_text()
            )
        });
        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        seen.insert(v["seq"].as_u64().unwrap());
    }
    println!(
        "{} records accepted, all delivered after 3 malformed SUBACKs ({} connections to the fake broker); {:?}",
        accepted.len(),
        events
            .all
            .iter()
            .filter(|e| matches!(e, Ev::Connected { .. }))
            .count(),
        started.elapsed()
    );
}

// ----- test 2: PUBLISH storm -----

const STORM_PACKETS: u64 = 200_000;
const BIG: usize = 64 * 1024;

#[derive(Default)]
struct Storm {
    go: AtomicBool,
    go_notify: Notify,
    changed: Notify,
    connects: AtomicU64,
    subscribed: AtomicU64,
    closed: AtomicU64,
    flood_started: AtomicBool,
    flood_done: AtomicBool,
    sent: AtomicU64,
    sent_qos1: AtomicU64,
    sent_bytes: AtomicU64,
    /// PUBACKs the agent sent for the flood's QoS 1 publishes.
    agent_pubacks: AtomicU64,
    results: AtomicU64,
    results_ok: AtomicU64,
    results_rate_limited: AtomicU64,
    other_publishes: AtomicU64,
    pingreqs: AtomicU64,
    data: Mutex<Vec<u64>>,
    inject: Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>,
}

impl Storm {
    fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::SeqCst)
    }

    async fn until(&self, what: &str, timeout: Duration, pred: impl Fn(&Storm) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !pred(self) {
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "fake broker: {what} did not happen within {timeout:?}; sent {} (QoS 1: {}), agent PUBACKs {}, results {}, closed {}",
                    Storm::get(&self.sent),
                    Storm::get(&self.sent_qos1),
                    Storm::get(&self.agent_pubacks),
                    Storm::get(&self.results),
                    Storm::get(&self.closed)
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.changed.notified()).await;
        }
    }
}

/// The `i`-th packet of the flood.
fn storm_packet(out: &mut Vec<u8>, s: &Storm, device: &str, i: u64, big: &[u8]) {
    let kind = i % 20;
    let ping = format!("devices/{device}/cmd/ping");
    let (topic, qos, payload): (String, u8, Vec<u8>) = match kind {
        // Large payloads, to the agent's namespace (a command "x") and elsewhere.
        19 if (i / 20) % 2 == 0 => (format!("devices/{device}/cmd/x"), 0, big.to_vec()),
        19 => ("plant/line1/bulk".to_string(), 0, big.to_vec()),
        // Unrelated topics the agent never subscribed to.
        18 => (format!("devices/other-{i}/cmd/ping"), 0, b"{}".to_vec()),
        0..=8 => (ping, 0, format!("{{\"id\":{i}}}").into_bytes()),
        _ => (ping, 1, format!("{{\"id\":{i}}}").into_bytes()),
    };
    let pkid = (i % 65_535) as u16 + 1;
    put_publish(out, &topic, qos, pkid, &payload);
    s.sent.fetch_add(1, Ordering::Relaxed);
    if qos == 1 {
        s.sent_qos1.fetch_add(1, Ordering::Relaxed);
    }
}

async fn storm_conn(conn: usize, tls: Tls, s: Arc<Storm>, device: String) {
    let (r, mut w) = tokio::io::split(tls);
    let (ctrl_tx, mut ctrl_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    *s.inject.lock().unwrap() = Some(ctrl_tx.clone());
    let flood_here = conn == 1;

    let ws = s.clone();
    let wdevice = device.clone();
    let writer = tokio::spawn(async move {
        if flood_here {
            // Control packets until the test says go.
            loop {
                if ws.go.load(Ordering::SeqCst) {
                    break;
                }
                tokio::select! {
                    c = ctrl_rx.recv() => match c {
                        Some(c) => { if w.write_all(&c).await.is_err() { return; } }
                        None => return,
                    },
                    _ = ws.go_notify.notified() => {}
                }
            }
            ws.flood_started.store(true, Ordering::SeqCst);
            let big = vec![b'x'; BIG];
            let mut batch = Vec::with_capacity(256 * 1024);
            for i in 0..STORM_PACKETS {
                storm_packet(&mut batch, &ws, &wdevice, i, &big);
                if batch.len() >= 128 * 1024 || i + 1 == STORM_PACKETS {
                    while let Ok(c) = ctrl_rx.try_recv() {
                        batch.extend_from_slice(&c);
                    }
                    ws.sent_bytes
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    if w.write_all(&batch).await.is_err() {
                        ws.flood_done.store(true, Ordering::SeqCst);
                        ws.changed.notify_one();
                        return;
                    }
                    batch.clear();
                }
            }
            ws.flood_done.store(true, Ordering::SeqCst);
            ws.changed.notify_one();
        }
        while let Some(c) = ctrl_rx.recv().await {
            if w.write_all(&c).await.is_err() {
                return;
            }
        }
    });

    let mut r = BufReader::with_capacity(64 * 1024, r);
    let result_prefix = format!("devices/{device}/cmd-result/");
    let data_prefix = format!("devices/{device}/data/");
    loop {
        let (first, body) = match read_packet(&mut r).await {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => break,
        };
        match first >> 4 {
            CONNECT => {
                let _ = ctrl_tx.send(CONNACK_OK.to_vec());
                s.connects.fetch_add(1, Ordering::SeqCst);
            }
            SUBSCRIBE => {
                let (pkid, _) = parse_subscribe(&body);
                let p = pkid.to_be_bytes();
                let _ = ctrl_tx.send(vec![0x90, 0x03, p[0], p[1], 0x01]);
                s.subscribed.fetch_add(1, Ordering::SeqCst);
            }
            PUBLISH => {
                let p = parse_publish(first, &body);
                if p.qos == 1 {
                    let _ = ctrl_tx.send(puback(p.pkid));
                }
                if p.topic.starts_with(&result_prefix) {
                    s.results.fetch_add(1, Ordering::SeqCst);
                    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    if v["ok"] == true {
                        s.results_ok.fetch_add(1, Ordering::SeqCst);
                    } else if v["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("too many commands"))
                    {
                        s.results_rate_limited.fetch_add(1, Ordering::SeqCst);
                    }
                } else if p.topic.starts_with(&data_prefix) {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    s.data.lock().unwrap().push(v["seq"].as_u64().unwrap());
                } else {
                    s.other_publishes.fetch_add(1, Ordering::SeqCst);
                }
            }
            PUBACK => {
                s.agent_pubacks.fetch_add(1, Ordering::SeqCst);
            }
            PINGREQ => {
                let _ = ctrl_tx.send(PINGRESP.to_vec());
                s.pingreqs.fetch_add(1, Ordering::SeqCst);
            }
            DISCONNECT => break,
            _ => {}
        }
        s.changed.notify_one();
    }
    s.closed.fetch_add(1, Ordering::SeqCst);
    s.changed.notify_one();
    *s.inject.lock().unwrap() = None;
    drop(ctrl_tx);
    let _ = writer.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_storm_keeps_agent_memory_bounded() {
    const DEVICE: &str = "gw-p11b";
    const MAX_PER_MINUTE: u64 = 60;
    const RESULT_MARGIN: u64 = 10;
    const RSS_MARGIN_KIB: u64 = 64 * 1024;
    let started = Instant::now();
    let pki = TestPki::new();
    let storm = Arc::new(Storm::default());
    let s2 = storm.clone();
    let handler: Handler =
        Arc::new(move |conn, tls| Box::pin(storm_conn(conn, tls, s2.clone(), DEVICE.to_string())));
    let fake = FakeBroker::start(&pki, handler).await;

    let dir = tempfile::tempdir().unwrap();
    let template = agent_config_template(&pki, DEVICE, dir.path());
    // info: the per-packet debug lines would only slow the agent's stderr down.
    let mut agent = start_agent(&template, fake.port, dir.path(), &[("BULWARK_LOG", "info")]);
    let socket = dir.path().join("ingest.sock");
    let pid = agent.pid();
    agent
        .wait_log(T, |v| v["message"] == "uplink connected")
        .unwrap_or_else(|| panic!("agent did not connect:\n{}", agent.log_text()));
    // Status and the health report at connect, both acked.
    storm
        .until("SUBSCRIBE, status and health", T, |s| {
            Storm::get(&s.subscribed) >= 1 && Storm::get(&s.other_publishes) >= 2
        })
        .await;
    let before = vm_rss_kib(pid).expect("VmRSS");

    // Sample VmRSS while the storm lasts.
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let (sampling, peak) = (sampling.clone(), peak.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while sampling.load(Ordering::SeqCst) {
                if let Some(kib) = vm_rss_kib(pid) {
                    peak.fetch_max(kib, Ordering::SeqCst);
                    samples += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            samples
        })
    };

    let flood_start = Instant::now();
    storm.go.store(true, Ordering::SeqCst);
    storm.go_notify.notify_one();
    // The storm is over when every packet is written and the agent has acknowledged every
    // QoS 1 one (it reads in order, so it has read everything), or the connection ended.
    storm
        .until(
            "the agent working through the storm",
            Duration::from_secs(45),
            |s| {
                s.flood_done.load(Ordering::SeqCst)
                    && (Storm::get(&s.agent_pubacks) >= Storm::get(&s.sent_qos1)
                        || Storm::get(&s.closed) > 0)
            },
        )
        .await;
    let flood_time = flood_start.elapsed();
    let after_storm = vm_rss_kib(pid);

    // Still working: a record sent now is published (and acked by the fake broker).
    let seq = send(&socket, "p11/after", "1");
    storm
        .until("the record sent after the storm", T, |s| {
            s.data.lock().unwrap().contains(&seq)
        })
        .await;
    // A command sent now is still acknowledged at the MQTT level, and ignored without an
    // answer (the minute's budget is spent).
    let pubacks_before = Storm::get(&storm.agent_pubacks);
    let results_before = Storm::get(&storm.results);
    {
        let mut p = Vec::new();
        put_publish(
            &mut p,
            &format!("devices/{DEVICE}/cmd/ping"),
            1,
            1,
            br#"{"id":"after-storm"}"#,
        );
        let tx = storm.inject.lock().unwrap().clone();
        tx.expect("connection to the fake broker").send(p).unwrap();
    }
    storm
        .until("the PUBACK of a command sent after the storm", T, |s| {
            Storm::get(&s.agent_pubacks) > pubacks_before
        })
        .await;
    agent
        .wait_log(T, |v| v["event"] == "command_rate_limited")
        .expect("a command_rate_limited audit line");
    let rate_limited_logged = agent.count_log(|v| v["event"] == "command_rate_limited");
    sampling.store(false, Ordering::SeqCst);
    let samples = sampler.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    let alive_now = alive(&mut agent);
    let refused_logged = agent.count_log(|v| v["event"] == "command_refused");
    let dropped_logged = agent.count_log(|v| v["message"] == "control message dropped");
    let downs = agent.count_log(|v| v["message"] == "uplink down");

    let g = Storm::get;
    println!(
        "storm: {} packets ({} at QoS 1, {:.1} MiB) in {flood_time:?}; agent PUBACKs {}; connections {} (closed {})",
        g(&storm.sent),
        g(&storm.sent_qos1),
        g(&storm.sent_bytes) as f64 / (1 << 20) as f64,
        g(&storm.agent_pubacks),
        g(&storm.connects),
        g(&storm.closed),
    );
    println!(
        "agent VmRSS: before {before} KiB, peak {peak} KiB (+{} KiB), after storm {after_storm:?} KiB; {samples} samples",
        peak.saturating_sub(before)
    );
    println!(
        "cmd-result PUBLISHes from the agent: {} (ok {}, refused as rate-limited {}); command_refused log lines {refused_logged}; 'control message dropped' {dropped_logged}; 'uplink down' {downs}; PINGREQs {}",
        g(&storm.results),
        g(&storm.results_ok),
        g(&storm.results_rate_limited),
        g(&storm.pingreqs),
    );
    for what in ["command_refused", "control message dropped"] {
        if let Some(v) = agent.wait_log(Duration::ZERO, |v| {
            v["event"] == what && v["reason"].as_str().is_some_and(|r| r.contains("too many"))
                || v["message"] == what
        }) {
            println!("e.g. {v}");
        }
    }
    println!("runtime {:?}", started.elapsed());

    assert!(alive_now, "the agent died:\n{}", agent.log_text());
    assert!(
        peak <= before + RSS_MARGIN_KIB,
        "agent memory grew from {before} KiB to {peak} KiB during the storm"
    );
    assert!(
        g(&storm.results_ok) <= MAX_PER_MINUTE,
        "{} commands answered ok in one minute (max_per_minute = {MAX_PER_MINUTE})",
        g(&storm.results_ok)
    );
    assert!(
        g(&storm.results) <= MAX_PER_MINUTE + RESULT_MARGIN,
        "the agent sent {} cmd-result PUBLISHes for a storm of {} commands: the rate limit \
         (max_per_minute = {MAX_PER_MINUTE}) bounds answers, but every refusal is answered too \
         ({} 'too many commands' refusals, {refused_logged} command_refused audit lines)",
        g(&storm.results),
        g(&storm.sent),
        g(&storm.results_rate_limited)
    );
    assert_eq!(
        g(&storm.results),
        results_before,
        "a command over the rate was answered"
    );
    // Sampled: about log2(commands over the rate) lines, not one per command.
    assert!(
        rate_limited_logged <= 64,
        "{rate_limited_logged} command_rate_limited lines for one storm"
    );
    assert!(
        dropped_logged <= 64,
        "{dropped_logged} 'control message dropped' lines for one storm"
    );
    assert!(agent.terminate().success());
}
