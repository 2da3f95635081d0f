//! The reverse tunnel end to end: the broker's relay, the agent's device side and the
//! `bulwark-tunnel` operator CLI (or the `bulwark_tunnel::operator` library the CLI is
//! built on), with a real OpenSSH server, an HTTP server and echo/sink servers behind the
//! gateway. Covers the tests of issue 5 and SECURITY-CASES X1–X3.
//!
//! Every wait is on an event (a log or audit line, a line of the CLI's output, bytes
//! received, a process exit), bounded; the only sleeps are in the memory sampler and in
//! tests whose subject is a timeout (configured to 1–2 s).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bulwark_integration_tests::mqtt::{self, Via};
use bulwark_integration_tests::{
    bin_path, free_port, run_with_timeout, BrokerConfig, BrokerProcess, SshServer, TestBroker,
};
use bulwark_tunnel::operator::{self, OpenSession, OperatorConfig};
use bulwark_tunnel::proto::{ErrorCode, Offer, Reply, Request};
use bulwark_tunnel::{mux, ws};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

/// The latency measurements run alone, the other tests side by side: on two shared cores a
/// parallel test's burst would otherwise be measured as the tunnel's latency.
static ALONE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn side_by_side() -> std::sync::RwLockReadGuard<'static, ()> {
    ALONE.read().unwrap_or_else(|e| e.into_inner())
}

fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    ALONE.write().unwrap_or_else(|e| e.into_inner())
}

// -- set-up ----------------------------------------------------------------------------

struct Setup {
    broker: TestBroker,
    agent: BrokerProcess,
    wss_port: u16,
    _dirs: Vec<tempfile::TempDir>,
}

/// A broker with the relay, and no agent (the test plays the device where it must).
struct Bare {
    broker: TestBroker,
    wss_port: u16,
    _dirs: Vec<tempfile::TempDir>,
}

fn acl(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("acl.conf");
    std::fs::write(
        &p,
        format!(
            "{}\nuser alice\ntopic write $tunnel/gw-1/open/ssh\ntopic write $tunnel/gw-1/open/web\ntopic write $tunnel/gw-9/open/ssh\n\nuser bob\ntopic read devices/#\n\nuser watcher\ntopic read devices/+/health\n",
            bulwark_protocol::acl::DEFAULT_DEVICE_RULES
        ),
    )
    .unwrap();
    p
}

/// A broker with the relay on its wss listener. `auth_extra` goes in `[auth]`,
/// `tunnel_extra` in `[tunnel]`.
fn start_broker(client_certificates: &'static str, auth_extra: &str, tunnel_extra: &str) -> Bare {
    let acl_dir = tempfile::tempdir().unwrap();
    let wss_port = free_port();
    let broker = TestBroker::start(BrokerConfig {
        ports: HashMap::from([("wss", wss_port)]),
        client_certificates,
        extra: format!(
            "[auth]\nacl_file = {:?}\n{auth_extra}[tunnel]\nenabled = true\npublic_url = \"wss://localhost:{wss_port}/tunnel/v1\"\n{tunnel_extra}",
            acl(acl_dir.path())
        ),
        ..BrokerConfig::default()
    });
    Bare {
        broker,
        wss_port,
        _dirs: vec![acl_dir],
    }
}

/// Broker with the relay on its wss listener; agent gw-1 with `services` allowed.
fn setup(services: &str, tunnel_extra: &str) -> Setup {
    setup_with(services, tunnel_extra, "")
}

/// [`setup`] with `agent_tunnel_extra` in the agent's `[tunnel]` table.
fn setup_with(services: &str, tunnel_extra: &str, agent_tunnel_extra: &str) -> Setup {
    let Bare {
        broker,
        wss_port,
        mut _dirs,
    } = start_broker("required", "", tunnel_extra);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = cert_paths(&broker, "gw-1");
    let config = format!(
        "device_id = \"gw-1\"\n[uplink]\nbrokers = [\"mqtts://localhost:{}\"]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nbackoff_min_ms = 100\n[queue]\npath = {:?}\n[ingest]\nsocket = {:?}\n[tunnel]\nenabled = true\n{agent_tunnel_extra}[tunnel.services]\n{services}\n",
        broker.addr("tls").port(),
        broker.pki.ca_path,
        cert,
        key,
        dir.path().join("queue"),
        dir.path().join("ingest.sock"),
    );
    // The agent subscribes to its offers right after CONNACK, and publishes its first
    // health report right after that SUBSCRIBE: once a watcher gets that report, the
    // broker has the subscription (it handles a connection's packets in order). An offer
    // published before would be lost (the operator would wait offer_ttl_secs).
    let rt = rt();
    let via = Via::Tls(broker.addr("tls"), tls_as(&broker, Some("watcher")));
    let mut watcher = rt.block_on(async {
        let mut c = mqtt::Client::connect(mqtt::options("watcher", &via))
            .await
            .unwrap();
        c.subscribe("devices/gw-1/health", mqtt::QoS::AtMostOnce)
            .await;
        c
    });
    let agent = BrokerProcess::spawn_agent(&config, dir.path());
    agent
        .wait_log(T, |v| v["message"] == "uplink connected")
        .unwrap_or_else(|| panic!("agent did not connect:\n{}", agent.log_text()));
    rt.block_on(async {
        watcher
            .next_publish(T)
            .await
            .unwrap_or_else(|| panic!("no health report from the agent:\n{}", agent.log_text()));
        watcher.disconnect().await;
    });
    _dirs.push(dir);
    Setup {
        broker,
        agent,
        wss_port,
        _dirs,
    }
}

/// The certificate and key of `name`, issued once per PKI (a CLI started earlier may be
/// reading the files, so they are never rewritten).
fn cert_paths(broker: &TestBroker, name: &str) -> (PathBuf, PathBuf) {
    let dir = broker.pki.dir.path();
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    if !cert.exists() {
        let c = broker.pki.client(name);
        assert_eq!((&c.cert_path, &c.key_path), (&cert, &key));
    }
    (cert, key)
}

/// `bulwark-tunnel` with the broker and CA, as `operator` (certificate) or without
/// credentials.
fn cli(broker: &TestBroker, wss_port: u16, operator: Option<&str>) -> Command {
    let mut cmd = Command::new(bin_path("bulwark-tunnel"));
    cmd.args(["--broker", &format!("wss://localhost:{wss_port}")])
        .arg("--ca-file")
        .arg(&broker.pki.ca_path)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("BULWARK_TUNNEL_PASSWORD")
        .env("HOME", "/nonexistent")
        .env("NO_COLOR", "1");
    if let Some(op) = operator {
        let (cert, key) = cert_paths(broker, op);
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    cmd
}

fn tunnel_cmd(s: &Setup, operator: &str) -> Command {
    cli(&s.broker, s.wss_port, Some(operator))
}

fn relay_url(wss_port: u16) -> ws::RelayUrl {
    ws::RelayUrl::parse(&format!("wss://localhost:{wss_port}/tunnel/v1")).unwrap()
}

/// TLS trusting the test CA, presenting `who`'s certificate if given.
fn tls_as(broker: &TestBroker, who: Option<&str>) -> Arc<rustls::ClientConfig> {
    let paths = who.map(|w| cert_paths(broker, w));
    operator::client_tls(
        Some(&broker.pki.ca_path),
        false,
        paths.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .unwrap()
}

/// The operator library's configuration, as `who` (certificate) or without credentials.
fn op_config(broker: &TestBroker, wss_port: u16, who: Option<&str>) -> OperatorConfig {
    OperatorConfig {
        relay: relay_url(wss_port),
        tls: tls_as(broker, who),
        username: None,
        password: None,
        connect_timeout: Duration::from_secs(10),
        max_streams: 64,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn logs(s: &Setup) -> String {
    format!(
        "agent:\n{}\nbroker:\n{}",
        s.agent.log_text(),
        s.broker.process.log_text()
    )
}

// -- a CLI child process ----------------------------------------------------------------

/// Lines collected so far, and whether the stream ended.
type Lines = Arc<(Mutex<(Vec<String>, bool)>, Condvar)>;

/// A `bulwark-tunnel` child whose stderr lines are collected; killed when dropped.
struct CliProc {
    child: Child,
    lines: Lines,
}

impl CliProc {
    fn spawn(cmd: &mut Command) -> CliProc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let lines: Lines = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                l2.0.lock().unwrap().0.push(line);
                l2.1.notify_all();
            }
            l2.0.lock().unwrap().1 = true;
            l2.1.notify_all();
        });
        CliProc { child, lines }
    }

    /// Waits for a stderr line matching `pred`.
    fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.lines;
        let mut st = m.lock().unwrap();
        loop {
            if let Some(l) = st.0.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if st.1 || now >= deadline {
                return None;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    fn stderr(&self) -> String {
        self.lines.0.lock().unwrap().0.join("\n")
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM (the CLI's normal way to close a tunnel) and the exit status.
    fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(T)
            .expect("bulwark-tunnel did not exit on SIGTERM")
    }
}

impl Drop for CliProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bulwark-tunnel open` on an ephemeral loopback port, once it says "forwarding".
fn open_cli(s: &Setup, operator: &str, service: &str) -> (CliProc, SocketAddr) {
    let p = CliProc::spawn(tunnel_cmd(s, operator).args([
        "open",
        "--device",
        "gw-1",
        "--service",
        service,
        "--listen",
        "127.0.0.1:0",
    ]));
    let line = p
        .wait_line(T, |l| l.starts_with("forwarding "))
        .unwrap_or_else(|| panic!("no 'forwarding' line:\n{}\n{}", p.stderr(), logs(s)));
    // "forwarding 127.0.0.1:PORT -> gw-1/web (session ...); Ctrl-C to close"
    let addr = line["forwarding ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{line}: {e}"));
    (p, addr)
}

// -- servers behind the gateway ---------------------------------------------------------

/// A loopback server standing for a service on the gateway. The first byte of a
/// connection picks what it does: `E` echo; `S` sink (reads to EOF, counting); `N` then a
/// u64 (big endian) length: reads that many bytes, checks them against [`bulk_pattern`]
/// and answers `K` if every byte is intact (`X` if not).
struct TargetServer {
    port: u16,
    /// Bytes received in `S` and `N` mode.
    sunk: Arc<AtomicU64>,
    /// Connections accepted.
    accepted: Arc<AtomicU64>,
}

fn target_server() -> TargetServer {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let sunk = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let (s2, a2) = (sunk.clone(), accepted.clone());
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            a2.fetch_add(1, Ordering::SeqCst);
            let sunk = s2.clone();
            std::thread::spawn(move || {
                let _ = c.set_nodelay(true);
                let mut mode = [0u8];
                if c.read_exact(&mut mode).is_err() {
                    return;
                }
                let mut buf = vec![0u8; 256 * 1024];
                match mode[0] {
                    b'E' => loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if c.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    },
                    b'S' => loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                sunk.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                    },
                    b'N' => {
                        let mut len = [0u8; 8];
                        if c.read_exact(&mut len).is_err() {
                            return;
                        }
                        let mut left = u64::from_be_bytes(len);
                        let pattern = bulk_pattern();
                        let (mut at, mut intact) = (0usize, true);
                        while left > 0 {
                            let want = buf.len().min(left as usize);
                            match c.read(&mut buf[..want]) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    intact &= buf[..n] == pattern[at..at + n];
                                    at = (at + n) % BULK_PERIOD;
                                    left -= n as u64;
                                    sunk.fetch_add(n as u64, Ordering::Relaxed);
                                }
                            }
                        }
                        let _ = c.write_all(if intact { b"K" } else { b"X" });
                    }
                    _ => {}
                }
            });
        }
    });
    TargetServer {
        port,
        sunk,
        accepted,
    }
}

/// The body the test HTTP server sends for `GET /N`.
fn http_body(n: usize) -> Vec<u8> {
    format!("response {n}: {}\n", "abcdefghij".repeat(n % 50 + 1)).into_bytes()
}

/// 8 MiB of a pattern that catches reordering or loss.
fn big_body() -> Vec<u8> {
    (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// A tiny HTTP/1.0 server: `GET /N` → [`http_body`], `GET /big` → [`big_body`].
fn http_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let big = Arc::new(big_body());
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let big = big.clone();
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req);
                let path = req.split(' ').nth(1).unwrap_or("/");
                let body = match path {
                    "/big" => big.to_vec(),
                    p => match p[1..].parse::<usize>() {
                        Ok(n) => http_body(n),
                        Err(_) => {
                            let _ = c.write_all(b"HTTP/1.0 404 Not Found\r\n\r\n");
                            return;
                        }
                    },
                };
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(head.as_bytes());
                let _ = c.write_all(&body);
            });
        }
    });
    port
}

/// `GET path` over HTTP/1.0 at `addr`: the status line and the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(String, Vec<u8>), String> {
    let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(format!("GET {path} HTTP/1.0\r\nHost: gw-1\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    c.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {} bytes", resp.len()))?;
    let head = String::from_utf8_lossy(&resp[..end]).to_string();
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, resp[end + 4..].to_vec()))
}

/// One echo round trip on a std socket (in `E` mode).
fn echo_round_trip(c: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    c.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back)?;
    assert_eq!(back, msg);
    Ok(())
}

/// A connection in echo mode, checked with one round trip.
fn echo_conn(addr: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(b"E").unwrap();
    echo_round_trip(&mut c, b"hello through the tunnel").unwrap();
    c
}

/// Echo round trips on a tunnel stream until it fails; returns how many succeeded.
async fn echo_until_closed(mut s: mux::MuxStream, counter: Arc<AtomicU64>) -> u64 {
    if s.write_all(b"E").await.is_err() {
        return 0;
    }
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    loop {
        if s.write_all(&msg).await.is_err() || s.read_exact(&mut back).await.is_err() {
            return counter.load(Ordering::SeqCst);
        }
        assert_eq!(back, msg);
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

// -- the test as the device -------------------------------------------------------------

/// The device side played by the test: an MQTT session with gw-1's certificate that
/// receives the offers, and WebSocket joins with any certificate.
struct FakeDevice {
    mqtt: mqtt::Client,
}

impl FakeDevice {
    async fn connect(b: &Bare, id: &str) -> FakeDevice {
        let via = Via::Tls(b.broker.addr("tls"), tls_as(&b.broker, Some(id)));
        let mut mqtt = mqtt::Client::connect(mqtt::options(id, &via))
            .await
            .expect("device MQTT connection");
        let codes = mqtt
            .subscribe(&format!("$tunnel/{id}/notify"), mqtt::QoS::AtLeastOnce)
            .await;
        assert!(
            matches!(codes[0], rumqttc::SubscribeReasonCode::Success(_)),
            "{codes:?}"
        );
        FakeDevice { mqtt }
    }

    async fn offer(&mut self) -> (Offer, mqtt::Publish) {
        let p = self
            .mqtt
            .next_publish(Duration::from_secs(10))
            .await
            .expect("no offer on the notify topic");
        let o: Offer = serde_json::from_slice(&p.payload).expect("offer JSON");
        (o, p)
    }
}

/// Sends a device's first message to the relay with `identity`'s certificate.
async fn device_request(b: &Bare, identity: &str, req: &Request) -> (ws::ClientWs, Reply) {
    ws::connect(
        &relay_url(b.wss_port),
        tls_as(&b.broker, Some(identity)),
        req,
        Duration::from_secs(10),
    )
    .await
    .expect("relay connection")
}

fn accept(o: &Offer, token: &str) -> Request {
    Request::Accept {
        session: o.session.clone(),
        token: token.to_string(),
    }
}

/// Serves a joined device connection: every stream the operator opens echoes.
fn serve_echo(dev: ws::ClientWs) -> tokio::task::JoinHandle<Result<(), String>> {
    let io = ws::WsBytes::new(dev, Arc::new(ws::Activity::default()));
    tokio::spawn(mux::serve(io, mux::yamux_config(8), |s| {
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(s);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }))
}

/// One message through a new stream of `session` and back.
async fn stream_echo(session: &OpenSession, msg: &[u8]) -> Vec<u8> {
    let mut s = session.client.open().await.expect("open a stream");
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(T, s.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .unwrap();
    back
}

fn code_of(r: &Result<OpenSession, operator::OperatorError>) -> Option<ErrorCode> {
    match r {
        Ok(_) => None,
        Err(e) => e.code,
    }
}

// -- measurement helpers ----------------------------------------------------------------

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Period of the bulk transfers' byte pattern: a prime, so that it never lines up with a
/// buffer, frame or record size on the way.
const BULK_PERIOD: usize = 65_521;
/// Largest single write or read of a bulk transfer.
const BULK_CHUNK: usize = 256 * 1024;

/// The bytes a bulk transfer (`N` mode) carries: byte `i` is `pattern[i % BULK_PERIOD]`;
/// the slice is one chunk longer than the period so that any chunk is one sub-slice.
fn bulk_pattern() -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut p: Vec<u8> = (0..BULK_PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        while p.len() < BULK_PERIOD + BULK_CHUNK {
            let k = (BULK_PERIOD + BULK_CHUNK - p.len()).min(BULK_PERIOD);
            p.extend_from_within(..k);
        }
        p
    })
}

/// Sends `bytes` one way (`N` mode) and waits for the far end's check that every byte
/// arrived intact: MiB/s.
fn bulk_mib_s(addr: SocketAddr, bytes: u64) -> f64 {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let start = Instant::now();
    bulk_send(&mut c, bytes);
    bytes as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64()
}

/// The `N` mode exchange on a connected socket: header, `bytes` of [`bulk_pattern`], and
/// the far end's `K`.
fn bulk_send(c: &mut TcpStream, bytes: u64) {
    c.write_all(b"N").unwrap();
    c.write_all(&bytes.to_be_bytes()).unwrap();
    let pattern = bulk_pattern();
    let (mut left, mut at) = (bytes, 0usize);
    while left > 0 {
        let n = left.min(BULK_CHUNK as u64) as usize;
        c.write_all(&pattern[at..at + n]).unwrap();
        at = (at + n) % BULK_PERIOD;
        left -= n as u64;
    }
    let mut k = [0u8];
    c.read_exact(&mut k).unwrap();
    assert_eq!(&k, b"K", "the bulk transfer arrived corrupted");
}

/// `streams` connections each send `bytes` at once (`N` mode): aggregate MiB/s from the
/// first connect to the last acknowledgement.
fn parallel_bulk_mib_s(addr: SocketAddr, streams: usize, bytes: u64) -> f64 {
    let start = Instant::now();
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.set_nodelay(true).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
                bulk_send(&mut c, bytes);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    (streams as u64 * bytes) as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64()
}

// -- tests ------------------------------------------------------------------------------

#[test]
fn ssh_command_runs_on_the_gateway_through_the_tunnel() {
    let _side_by_side = side_by_side();
    let sshd = SshServer::start();
    let s = setup(&format!("ssh = \"127.0.0.1:{}\"", sshd.port), "");
    let proxy = {
        let c = tunnel_cmd(&s, "alice");
        let mut parts = vec![c.get_program().to_string_lossy().to_string()];
        parts.extend(c.get_args().map(|a| a.to_string_lossy().to_string()));
        parts.extend(["stdio", "--device", "gw-1", "--service", "ssh"].map(String::from));
        parts.join(" ")
    };
    let (status, out, err) = run_with_timeout(
        Command::new("ssh")
            .args(sshd.client_args())
            .arg("-o")
            .arg(format!("ProxyCommand={proxy}"))
            .arg(format!("{}@gw-1", sshd.user))
            .arg("echo tunnel-ok; hostname"),
        T,
    );
    assert!(
        status.map(|s| s.success()).unwrap_or(false),
        "ssh failed: {out}{err}\nagent:\n{}\nbroker:\n{}",
        s.agent.log_text(),
        s.broker.process.log_text()
    );
    assert!(out.starts_with("tunnel-ok\n"), "{out}");
    s.broker.process.wait_audit(
        "tunnel_open",
        &[
            ("operator", "alice"),
            ("device", "gw-1"),
            ("service", "ssh"),
        ],
    );
    s.broker
        .process
        .wait_audit("tunnel_close", &[("operator", "alice")]);
}

/// A web UI on the gateway through `bulwark-tunnel open`: 24 parallel requests, each with
/// its own body, and one 8 MiB body, all intact.
#[test]
fn http_parallel_requests_through_the_tunnel() {
    let _side_by_side = side_by_side();
    let http = http_server();
    let s = setup(&format!("web = \"127.0.0.1:{http}\""), "");
    let (mut open, addr) = open_cli(&s, "alice", "web");
    let started = Instant::now();
    let handles: Vec<_> = (0..24usize)
        .map(|n| std::thread::spawn(move || (n, http_get(addr, &format!("/{n}")))))
        .collect();
    let big = std::thread::spawn(move || http_get(addr, "/big"));
    for h in handles {
        let (n, r) = h.join().unwrap();
        let (status, body) = r.unwrap_or_else(|e| panic!("GET /{n}: {e}\n{}", logs(&s)));
        assert_eq!(status, "HTTP/1.0 200 OK", "GET /{n}");
        assert_eq!(body, http_body(n), "GET /{n}: wrong body");
    }
    let (status, body) = big.join().unwrap().unwrap();
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert_eq!(body.len(), 8 * 1024 * 1024);
    assert!(body == big_body(), "the 8 MiB body changed on the way");
    println!(
        "24 parallel requests and 8 MiB through one session: {:?}",
        started.elapsed()
    );
    // One session carried every request; the relay counts the bytes.
    let opened = s
        .broker
        .process
        .wait_audit("tunnel_open", &[("operator", "alice"), ("service", "web")]);
    assert_eq!(
        open.terminate().code(),
        Some(0),
        "SIGTERM closes the tunnel:\n{}",
        open.stderr()
    );
    assert!(open.stderr().contains("closing the tunnel"));
    let closed = s.broker.process.wait_audit(
        "tunnel_close",
        &[("session", opened["session"].as_str().unwrap())],
    );
    assert!(
        closed["bytes_to_operator"].as_u64().unwrap() > 8 * 1024 * 1024,
        "{closed}"
    );
    assert_eq!(
        s.broker
            .process
            .count_log(|v| v["target"] == "audit" && v["event"] == "tunnel_open"),
        1
    );
}

/// X1: a service the gateway does not allow is refused by the device (which dials nothing
/// local); a session token works once only, a wrong one never, and an offer nobody takes
/// up in time leaves the operator with `token_expired`.
#[test]
fn token_replay_and_service_not_allowed_are_refused() {
    let _side_by_side = side_by_side();
    // (a) Service not on the agent's allow-list: only ssh is, the operator asks for web
    // (which alice has a grant for).
    let canary = TcpListener::bind("127.0.0.1:0").unwrap();
    canary.set_nonblocking(true).unwrap();
    let s = setup(
        &format!(
            "ssh = \"127.0.0.1:{}\"",
            canary.local_addr().unwrap().port()
        ),
        "",
    );
    let (status, out, err) = run_with_timeout(
        tunnel_cmd(&s, "alice").args([
            "open",
            "--device",
            "gw-1",
            "--service",
            "web",
            "--listen",
            "127.0.0.1:0",
        ]),
        T,
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}{err}");
    assert!(err.contains("service_not_allowed"), "{err}");
    assert!(err.contains("[tunnel.services]"), "{err}");
    assert!(err.contains("hint: "), "{err}");
    let refused = s.broker.process.wait_audit(
        "tunnel_refused",
        &[
            ("reason", "service_not_allowed"),
            ("role", "operator"),
            ("operator", "alice"),
            ("device", "gw-1"),
            ("service", "web"),
        ],
    );
    s.broker.process.wait_audit(
        "tunnel_refused",
        &[
            ("reason", "service_not_allowed"),
            ("role", "device"),
            ("session", refused["session"].as_str().unwrap()),
        ],
    );
    s.agent.wait_audit(
        "tunnel_refused",
        &[
            ("reason", "service_not_allowed"),
            ("service", "web"),
            ("operator", "alice"),
        ],
    );
    assert_eq!(
        s.agent.count_log(|v| v["event"] == "tunnel_open"),
        0,
        "{}",
        s.agent.log_text()
    );
    assert_eq!(
        s.broker.process.count_log(|v| v["event"] == "tunnel_open"),
        0
    );
    assert!(
        matches!(canary.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the device connected to a local service"
    );
    drop(s);

    // (b) Replay: the test is the device gw-1 (its MQTT session receives the offer).
    let b = start_broker("required", "", "");
    let rt = rt();
    rt.block_on(async {
        let mut dev = FakeDevice::connect(&b, "gw-1").await;
        let cfg = op_config(&b.broker, b.wss_port, Some("alice"));
        let opening = tokio::spawn(async move { operator::open(&cfg, "gw-1", "ssh").await });
        let (offer, publish) = dev.offer().await;
        assert_eq!(publish.qos, mqtt::QoS::AtLeastOnce);
        assert!(!publish.retain);
        assert_eq!(publish.topic, "$tunnel/gw-1/notify");
        assert_eq!(offer.service, "ssh");
        assert_eq!(offer.operator, "alice");
        assert_eq!(offer.relay_url, relay_url(b.wss_port).url());
        assert_eq!(offer.expires_in_secs, 60);
        assert_eq!(offer.token.len(), 43);

        // A wrong token for the right session.
        let (_, r) = device_request(&b, "gw-1", &accept(&offer, &"A".repeat(43))).await;
        assert_eq!(r.code, Some(ErrorCode::TokenInvalid), "{r:?}");
        // The right one: joined.
        let (joined, r) = device_request(&b, "gw-1", &accept(&offer, &offer.token)).await;
        assert!(r.ok, "{r:?}");
        assert_eq!(r.session.as_deref(), Some(offer.session.as_str()));
        let _served = serve_echo(joined);
        // The same token again, while the session runs.
        let (_, r) = device_request(&b, "gw-1", &accept(&offer, &offer.token)).await;
        assert_eq!(r.code, Some(ErrorCode::TokenInvalid), "{r:?}");
        assert!(r.error.unwrap().contains("single use"));
        // A refusal with the used token cannot end the session either.
        let refuse = Request::Refuse {
            session: offer.session.clone(),
            token: offer.token.clone(),
            reason: bulwark_tunnel::proto::RefuseReason::ServiceNotAllowed,
        };
        let (_, r) = device_request(&b, "gw-1", &refuse).await;
        assert_eq!(r.code, Some(ErrorCode::TokenInvalid), "{r:?}");

        // The operator's session is the one the real token opened, and carries data.
        let session = opening.await.unwrap().expect("operator open");
        assert_eq!(session.session, offer.session);
        assert_eq!(stream_echo(&session, b"still mine").await, b"still mine");
        drop(session);
        // (Blocking here is fine: this is the runtime's block_on thread, not a worker.)
        let closed = b
            .broker
            .process
            .wait_audit("tunnel_close", &[("session", offer.session.as_str())]);
        assert_eq!(closed["reason"], "operator closed");
        // After the session: unknown.
        let (_, r) = device_request(&b, "gw-1", &accept(&offer, &offer.token)).await;
        assert_eq!(r.code, Some(ErrorCode::TokenInvalid), "{r:?}");
        assert!(r.error.unwrap().contains("unknown or finished session"));
    });
    // The last refusal's audit line (the log arrives through a pipe), then the count.
    b.broker.process.wait_log(T, |v| {
        v["event"] == "tunnel_refused"
            && v["detail"]
                .as_str()
                .is_some_and(|d| d.contains("unknown or finished session"))
    });
    let refusals = b.broker.process.count_log(|v| {
        v["event"] == "tunnel_refused"
            && v["reason"] == "token_invalid"
            && v["role"] == "device"
            && v["device"] == "gw-1"
    });
    assert_eq!(refusals, 4, "{}", b.broker.process.log_text());
    // Tokens never reach the log.
    assert_eq!(
        b.broker
            .process
            .count_log(|v| v.to_string().contains("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")),
        0
    );
    drop(b);

    // (c) An offer nobody accepts within offer_ttl_secs = 1.
    let b = start_broker("required", "", "offer_ttl_secs = 1\n");
    rt.block_on(async {
        let mut dev = FakeDevice::connect(&b, "gw-1").await;
        let cfg = op_config(&b.broker, b.wss_port, Some("alice"));
        let started = Instant::now();
        let opening = tokio::spawn(async move { operator::open(&cfg, "gw-1", "ssh").await });
        let (offer, _) = dev.offer().await;
        assert_eq!(offer.expires_in_secs, 1);
        let r = tokio::time::timeout(Duration::from_secs(10), opening)
            .await
            .expect("the operator waited past the offer's expiry")
            .unwrap();
        let waited = started.elapsed();
        assert_eq!(code_of(&r), Some(ErrorCode::TokenExpired), "{r:?}");
        assert!(
            r.unwrap_err().message.contains("did not join within 1 s"),
            "message"
        );
        assert!(waited >= Duration::from_millis(900), "{waited:?}");
        // Accepting after the expiry: the session is gone.
        let (_, r) = device_request(&b, "gw-1", &accept(&offer, &offer.token)).await;
        assert!(!r.ok);
        assert_eq!(r.code, Some(ErrorCode::TokenInvalid), "{r:?}");
    });
    b.broker.process.wait_audit(
        "tunnel_refused",
        &[
            ("reason", "token_expired"),
            ("operator", "alice"),
            ("device", "gw-1"),
        ],
    );
}

/// X1: an operator without the grant, without credentials (or with a wrong password), or
/// asking for a device that is not connected.
#[test]
fn operator_without_grant_is_refused() {
    let _side_by_side = side_by_side();
    // Client certificates optional (and passwords configured) so that an operator without
    // a certificate reaches the relay's own authentication.
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let mut add = Command::new(bin_path("bulwark-broker"))
        .args(["passwd", "add"])
        .arg(&passwd)
        .arg("carol")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(b"carol-pass\n")
        .unwrap();
    assert!(add.wait().unwrap().success());
    let b = start_broker(
        "optional",
        &format!("[auth.passwords]\nfile = {passwd:?}\n"),
        "",
    );
    let broker = &b.broker;
    let open_args = [
        "open",
        "--device",
        "gw-1",
        "--service",
        "ssh",
        "--listen",
        "127.0.0.1:0",
    ];

    // bob: authenticated, no grant.
    let (status, out, err) =
        run_with_timeout(cli(broker, b.wss_port, Some("bob")).args(open_args), T);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}{err}");
    assert!(err.contains("no_grant"), "{err}");
    assert!(err.contains("$tunnel/gw-1/open/ssh"), "{err}");
    assert!(err.contains("hint: "), "{err}");
    broker.process.wait_audit(
        "tunnel_refused",
        &[
            ("operator", "bob"),
            ("reason", "no_grant"),
            ("device", "gw-1"),
            ("service", "ssh"),
        ],
    );
    // The same with stdio (ssh's ProxyCommand): stdout stays clean.
    let (status, out, err) = run_with_timeout(
        cli(broker, b.wss_port, Some("bob")).args([
            "stdio",
            "--device",
            "gw-1",
            "--service",
            "ssh",
        ]),
        T,
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}{err}");
    assert!(out.is_empty() && err.contains("no_grant"), "{out}|{err}");

    // No credentials at all: the CLI stops before connecting (exit 64).
    let (status, out, err) = run_with_timeout(cli(broker, b.wss_port, None).args(open_args), T);
    assert_eq!(status.and_then(|s| s.code()), Some(64), "{out}{err}");
    assert!(
        err.contains("no credentials") && err.contains("--cert"),
        "{err}"
    );
    // A client without credentials (the library, bypassing the CLI's check): auth_failed.
    let rt = rt();
    let r = rt.block_on(operator::open(
        &op_config(broker, b.wss_port, None),
        "gw-1",
        "ssh",
    ));
    assert_eq!(code_of(&r), Some(ErrorCode::AuthFailed), "{r:?}");
    broker.process.wait_audit(
        "tunnel_refused",
        &[("reason", "auth_failed"), ("role", "operator")],
    );
    // A wrong password: auth_failed, exit 1.
    let (status, out, err) = run_with_timeout(
        cli(broker, b.wss_port, None)
            .args(["--username", "carol"])
            .env("BULWARK_TUNNEL_PASSWORD", "wrong")
            .args(open_args),
        T,
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}{err}");
    assert!(err.contains("auth_failed"), "{err}");
    broker.process.wait_audit(
        "tunnel_refused",
        &[("reason", "auth_failed"), ("operator", "carol")],
    );
    // The right password, but no grant.
    let (status, out, err) = run_with_timeout(
        cli(broker, b.wss_port, None)
            .args(["--username", "carol"])
            .env("BULWARK_TUNNEL_PASSWORD", "carol-pass")
            .args(open_args),
        T,
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}{err}");
    assert!(err.contains("no_grant"), "{err}");
    broker.process.wait_audit(
        "tunnel_refused",
        &[("reason", "no_grant"), ("operator", "carol")],
    );

    // alice has a grant for gw-9, which is not connected.
    let (status, out, err) = run_with_timeout(
        cli(broker, b.wss_port, Some("alice")).args([
            "open",
            "--device",
            "gw-9",
            "--service",
            "ssh",
            "--listen",
            "127.0.0.1:0",
        ]),
        T,
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}{err}");
    assert!(err.contains("device_offline"), "{err}");
    broker.process.wait_audit(
        "tunnel_refused",
        &[
            ("reason", "device_offline"),
            ("operator", "alice"),
            ("device", "gw-9"),
        ],
    );
    assert_eq!(broker.process.count_log(|v| v["event"] == "tunnel_open"), 0);
}

/// X2: gw-2's certificate cannot join a session offered to gw-1 (the session stays for
/// gw-1), nor open one to gw-1 as an operator.
#[test]
fn device_certificate_for_another_device_is_refused() {
    let _side_by_side = side_by_side();
    let b = start_broker("required", "", "");
    let rt = rt();
    rt.block_on(async {
        let mut dev = FakeDevice::connect(&b, "gw-1").await;
        let cfg = op_config(&b.broker, b.wss_port, Some("alice"));
        let opening = tokio::spawn(async move { operator::open(&cfg, "gw-1", "ssh").await });
        let (offer, _) = dev.offer().await;
        // gw-2 with gw-1's valid token: accept, and refuse (which would end the offer).
        let (_, r) = device_request(&b, "gw-2", &accept(&offer, &offer.token)).await;
        assert_eq!(r.code, Some(ErrorCode::WrongDevice), "{r:?}");
        let refuse = Request::Refuse {
            session: offer.session.clone(),
            token: offer.token.clone(),
            reason: bulwark_tunnel::proto::RefuseReason::ServiceNotAllowed,
        };
        let (_, r) = device_request(&b, "gw-2", &refuse).await;
        assert_eq!(r.code, Some(ErrorCode::WrongDevice), "{r:?}");
        assert!(!opening.is_finished(), "the operator was answered");
        // The session is still there for gw-1.
        let (joined, r) = device_request(&b, "gw-1", &accept(&offer, &offer.token)).await;
        assert!(r.ok, "{r:?}");
        let _served = serve_echo(joined);
        let session = opening.await.unwrap().expect("operator open");
        assert_eq!(stream_echo(&session, b"gw-1 here").await, b"gw-1 here");

        // gw-2's certificate as an operator towards gw-1: devices have no grant.
        let r = operator::open(
            &op_config(&b.broker, b.wss_port, Some("gw-2")),
            "gw-1",
            "ssh",
        )
        .await;
        assert_eq!(code_of(&r), Some(ErrorCode::NoGrant), "{r:?}");
        drop(session);
    });
    let p = &b.broker.process;
    p.wait_audit("tunnel_open", &[("device", "gw-1"), ("operator", "alice")]);
    p.wait_audit(
        "tunnel_refused",
        &[
            ("operator", "gw-2"),
            ("reason", "no_grant"),
            ("device", "gw-1"),
        ],
    );
    // Both refusals came before those lines.
    let wrong = p.count_log(|v| {
        v["event"] == "tunnel_refused"
            && v["reason"] == "wrong_device"
            && v["role"] == "device"
            && v["device"] == "gw-2"
    });
    assert_eq!(wrong, 2, "{}", p.log_text());
}

/// X3: idle and over-age sessions are closed by the relay (the device notices) and by the
/// device (the relay notices).
#[test]
fn idle_and_over_age_sessions_are_closed_by_relay_and_device() {
    let _side_by_side = side_by_side();
    let target = target_server();
    let services = format!("web = \"127.0.0.1:{}\"", target.port);
    let rt = rt();
    for relay_side in [true, false] {
        let limits = "idle_timeout_secs = 1\nmax_session_secs = 2\n";
        let s = if relay_side {
            setup_with(&services, limits, "")
        } else {
            setup_with(&services, "", limits)
        };
        let cfg = op_config(&s.broker, s.wss_port, Some("alice"));
        let counter = Arc::new(AtomicU64::new(0));
        let (mut idle, busy, echo) = rt.block_on(async {
            let idle = operator::open(&cfg, "gw-1", "web").await.unwrap();
            let busy = operator::open(&cfg, "gw-1", "web").await.unwrap();
            let stream = busy.client.open().await.unwrap();
            let echo = tokio::spawn(echo_until_closed(stream, counter.clone()));
            (idle, busy, echo)
        });
        let started = Instant::now();
        let (closer, other) = if relay_side {
            (&s.broker.process, &s.agent)
        } else {
            (&s.agent, &s.broker.process)
        };
        // The idle session: closed after ~1 s by the side with the limit...
        let c = closer.wait_audit(
            "tunnel_close",
            &[
                ("session", idle.session.as_str()),
                ("reason", "idle timeout"),
            ],
        );
        let d = c["duration_secs"].as_f64().unwrap();
        assert!((0.9..6.0).contains(&d), "idle close after {d} s");
        // ...and the other side notices.
        let o = other
            .wait_log(T, |v| {
                v["event"] == "tunnel_close" && v["session"] == idle.session.as_str()
            })
            .unwrap_or_else(|| panic!("no tunnel_close on the other side\n{}", logs(&s)));
        let expected: &[&str] = if relay_side {
            &["closed", "connection lost"]
        } else {
            &["device closed"]
        };
        assert!(
            expected.contains(&o["reason"].as_str().unwrap()),
            "other side's reason: {o}"
        );
        let why = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), idle.closed())
                .await
                .expect("the operator did not notice the close")
        });
        println!(
            "idle ({}): closer {c}\n  other side {o}\n  operator: {why}",
            if relay_side { "relay" } else { "device" }
        );
        // The busy session: traffic all along, closed at the maximum lifetime.
        let c = closer.wait_audit(
            "tunnel_close",
            &[
                ("session", busy.session.as_str()),
                ("reason", "maximum session lifetime"),
            ],
        );
        let d = c["duration_secs"].as_f64().unwrap();
        assert!((1.9..8.0).contains(&d), "over-age close after {d} s");
        let o = other
            .wait_log(T, |v| {
                v["event"] == "tunnel_close" && v["session"] == busy.session.as_str()
            })
            .unwrap_or_else(|| panic!("no tunnel_close on the other side\n{}", logs(&s)));
        assert!(
            expected.contains(&o["reason"].as_str().unwrap()),
            "other side's reason: {o}"
        );
        let trips = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), echo).await })
            .expect("the echo loop did not end with the session")
            .unwrap();
        assert!(
            trips > 20,
            "only {trips} round trips: traffic was not flowing"
        );
        assert!(started.elapsed() < Duration::from_secs(15));
        println!(
            "over-age ({}): {trips} echo round trips, closer {c}\n  other side {o}",
            if relay_side { "relay" } else { "device" }
        );
        drop(busy);
    }
}

/// Relay limits: streams per session (a third TCP connection is reset, the first two go
/// on, and a freed slot is usable again) and sessions per device.
#[test]
fn stream_and_session_limits_are_enforced_by_the_relay() {
    let _side_by_side = side_by_side();
    let target = target_server();
    let s = setup(
        &format!("web = \"127.0.0.1:{}\"", target.port),
        "max_streams_per_session = 2\nmax_sessions_per_device = 1\n",
    );
    let (_open, addr) = open_cli(&s, "alice", "web");
    let mut c1 = echo_conn(addr);
    let mut c2 = echo_conn(addr);
    assert_eq!(target.accepted.load(Ordering::SeqCst), 2);
    // The third: reset by the relay, never reaches the device.
    let mut c3 = TcpStream::connect(addr).unwrap();
    c3.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    let _ = c3.write_all(b"Ethird");
    let mut buf = [0u8; 16];
    match c3.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("third stream not refused: {other:?}\n{}", logs(&s)),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    s.broker.process.wait_log(T, |v| {
        v["message"] == "tunnel stream refused: tunnel.max_streams_per_session reached"
    });
    // The first two still work.
    echo_round_trip(&mut c1, b"one").unwrap();
    echo_round_trip(&mut c2, b"two").unwrap();
    assert_eq!(target.accepted.load(Ordering::SeqCst), 2);
    // Closing one frees its slot (once the close went both ways).
    c1.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c1.read_to_end(&mut rest).unwrap();
    let mut c4 = echo_conn(addr);
    echo_round_trip(&mut c4, b"four").unwrap();
    echo_round_trip(&mut c2, b"two again").unwrap();

    // A second session to gw-1 while this one is open.
    let (status, out, err) = run_with_timeout(
        tunnel_cmd(&s, "alice").args(["stdio", "--device", "gw-1", "--service", "web"]),
        T,
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}{err}");
    assert!(
        err.contains("(limit)") && err.contains("max_sessions_per_device"),
        "{err}"
    );
    s.broker.process.wait_audit(
        "tunnel_refused",
        &[("reason", "limit"), ("operator", "alice")],
    );
    echo_round_trip(&mut c2, b"unaffected").unwrap();
}

/// The agent records open and close through its store-and-forward queue; an application
/// allowed to read devices/# gets them on devices/gw-1/audit.
#[test]
fn agent_audit_reaches_subscribers_through_the_queue() {
    let _side_by_side = side_by_side();
    let target = target_server();
    let s = setup(&format!("web = \"127.0.0.1:{}\"", target.port), "");
    let rt = rt();
    let via = Via::Tls(s.broker.addr("tls"), tls_as(&s.broker, Some("bob")));
    let mut bob = rt.block_on(async {
        let mut c = mqtt::Client::connect(mqtt::options("bob", &via))
            .await
            .unwrap();
        c.subscribe("devices/gw-1/audit", mqtt::QoS::AtLeastOnce)
            .await;
        c
    });
    let (mut open, addr) = open_cli(&s, "alice", "web");
    let mut c = echo_conn(addr);
    echo_round_trip(&mut c, &[7u8; 1000]).unwrap();
    drop(c);
    assert_eq!(open.terminate().code(), Some(0));
    let opened = s.broker.process.wait_audit("tunnel_open", &[]);
    let session = opened["session"].as_str().unwrap().to_string();
    let events = rt.block_on(async {
        let mut got = Vec::new();
        while got.len() < 2 {
            let p = bob
                .next_publish(T)
                .await
                .unwrap_or_else(|| panic!("audit records missing; got {got:?}"));
            assert_eq!(p.topic, "devices/gw-1/audit");
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            got.push(v);
        }
        got
    });
    for e in &events {
        assert_eq!(e["series"], "$audit", "{e}");
        assert_eq!(e["device"], "gw-1", "{e}");
        assert!(e["seq"].is_u64(), "{e}");
        assert_eq!(e["payload"]["session"], session.as_str(), "{e}");
        assert_eq!(e["payload"]["service"], "web", "{e}");
        assert_eq!(e["payload"]["operator"], "alice", "{e}");
    }
    assert_eq!(events[0]["payload"]["event"], "tunnel_open");
    let close = &events[1]["payload"];
    assert_eq!(close["event"], "tunnel_close", "{close}");
    assert!(
        close["bytes_from_operator"].as_u64().unwrap() >= 1025,
        "{close}"
    );
    assert!(
        close["bytes_to_operator"].as_u64().unwrap() >= 1024,
        "{close}"
    );
    assert_eq!(close["streams"], 1, "{close}");
    assert!(close["duration_secs"].is_f64(), "{close}");
    assert!(close["reason"].is_string(), "{close}");
    println!("agent's audit records: {events:?}");
}

/// `list` shows the open session to its operator (and whoever has the grant), not to bob.
#[test]
fn list_shows_open_sessions_to_granted_operators_only() {
    let _side_by_side = side_by_side();
    let target = target_server();
    let s = setup(&format!("web = \"127.0.0.1:{}\"", target.port), "");
    let (_open, addr) = open_cli(&s, "alice", "web");
    let mut c = echo_conn(addr);
    echo_round_trip(&mut c, &[1u8; 100]).unwrap();
    let list = |who: &str, json: bool| {
        let mut cmd = tunnel_cmd(&s, who);
        cmd.arg("list");
        if json {
            cmd.arg("--json");
        }
        let (status, out, err) = run_with_timeout(&mut cmd, T);
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{who}: {out}{err}");
        out
    };
    let alice: serde_json::Value = serde_json::from_str(&list("alice", true)).unwrap();
    let sessions = alice.as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{alice}");
    let one = &sessions[0];
    assert_eq!(one["device"], "gw-1");
    assert_eq!(one["service"], "web");
    assert_eq!(one["operator"], "alice");
    assert_eq!(one["state"], "open");
    assert!(one["bytes_to_device"].as_u64().unwrap() > 100, "{one}");
    assert!(one["bytes_to_operator"].as_u64().unwrap() > 100, "{one}");
    let opened = s.broker.process.wait_audit("tunnel_open", &[]);
    assert_eq!(one["session"], opened["session"]);
    let table = list("alice", false);
    assert!(
        table.starts_with("SESSION") && table.contains("alice"),
        "{table}"
    );
    let bob: serde_json::Value = serde_json::from_str(&list("bob", true)).unwrap();
    assert_eq!(
        bob,
        serde_json::json!([]),
        "bob sees sessions he has no grant for"
    );
    assert_eq!(list("bob", false), "no tunnel sessions\n");
}

/// yamux sends a stream's SYN with its first frame, so streams opened one after the other
/// may start sending in the other order (two browser connections, two ssh sessions): the
/// relay must take that, and both streams work.
#[test]
fn streams_may_start_sending_in_any_order() {
    let _side_by_side = side_by_side();
    let target = target_server();
    let s = setup(&format!("web = \"127.0.0.1:{}\"", target.port), "");
    let cfg = op_config(&s.broker, s.wss_port, Some("alice"));
    let rt = rt();
    let result = rt.block_on(async {
        let session = operator::open(&cfg, "gw-1", "web").await.unwrap();
        let first = session.client.open().await.unwrap();
        let second = session.client.open().await.unwrap();
        let mut out = Vec::new();
        // The second stream speaks first.
        for (mut st, msg) in [(second, &b"Esecond"[..]), (first, &b"Efirst"[..])] {
            let r = async {
                st.write_all(msg).await?;
                let mut back = vec![0u8; msg.len() - 1];
                tokio::time::timeout(Duration::from_secs(10), st.read_exact(&mut back))
                    .await
                    .map_err(|_| std::io::Error::other("no echo within 10 s"))??;
                Ok::<_, std::io::Error>(back)
            }
            .await;
            out.push(r.map_err(|e| e.to_string()));
        }
        out
    });
    assert_eq!(
        result,
        vec![Ok(b"second".to_vec()), Ok(b"first".to_vec())],
        "\n{}",
        logs(&s)
    );
    assert_eq!(
        s.broker
            .process
            .count_log(|v| v["event"] == "tunnel_protocol_error"),
        0
    );
}

/// Issue point 7: one stream pushes data as fast as it can while another does small echo
/// round trips on the same session; the round trips stay fast and the broker's memory
/// bounded.
#[test]
fn busy_stream_does_not_stall_another() {
    let _alone = alone();
    let target = target_server();
    let s = setup(&format!("web = \"127.0.0.1:{}\"", target.port), "");
    let pid = s.broker.process.pid();
    let cfg = op_config(&s.broker, s.wss_port, Some("alice"));
    let rt = rt();
    let session = rt.block_on(operator::open(&cfg, "gw-1", "web")).unwrap();
    let base_rss = vm_rss_kib(pid);
    let base_agent = vm_rss_kib(s.agent.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(base_rss));
    let peak_agent = Arc::new(AtomicU64::new(base_agent));
    let sampler = {
        let (stop, peak, peak_agent, agent_pid) = (
            stop.clone(),
            peak.clone(),
            peak_agent.clone(),
            s.agent.pid(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(vm_rss_kib(pid), Ordering::SeqCst);
                peak_agent.fetch_max(vm_rss_kib(agent_pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let push_for = Duration::from_secs(3);
    let (mut rtts, pushed, push_secs) = rt.block_on(async {
        let mut a = session.client.open().await.unwrap();
        let mut b = session.client.open().await.unwrap();
        // In opening order (see streams_may_start_sending_in_any_order).
        a.write_all(b"S").await.unwrap();
        b.write_all(b"E").await.unwrap();
        let (warm_tx, warm_rx) = tokio::sync::oneshot::channel();
        let stop_a = stop.clone();
        let pusher = tokio::spawn(async move {
            let chunk = vec![0x5au8; 64 * 1024];
            let start = Instant::now();
            let mut pushed = 0u64;
            let mut warm = Some(warm_tx);
            while !stop_a.load(Ordering::SeqCst) {
                if let Err(e) = a.write_all(&chunk).await {
                    return Err(format!("after {pushed} bytes: {e}"));
                }
                pushed += chunk.len() as u64;
                if pushed >= 4 * 1024 * 1024 {
                    if let Some(w) = warm.take() {
                        let _ = w.send(());
                    }
                }
            }
            a.shutdown().await.map_err(|e| e.to_string())?;
            Ok((pushed, start.elapsed()))
        });
        // Measure once A runs at full speed.
        if tokio::time::timeout(T, warm_rx).await.unwrap().is_err() {
            panic!(
                "the busy stream failed: {:?}\n{}",
                pusher.await.unwrap(),
                logs(&s)
            );
        }
        let start = Instant::now();
        let mut rtts = Vec::new();
        let mut back = [0u8; 64];
        while start.elapsed() < push_for || rtts.len() < 200 {
            let msg = [rtts.len() as u8; 64];
            let t = Instant::now();
            b.write_all(&msg).await.unwrap();
            tokio::time::timeout(T, b.read_exact(&mut back))
                .await
                .expect("echo stalled behind the busy stream")
                .unwrap();
            rtts.push(t.elapsed());
            assert_eq!(back, msg);
        }
        stop.store(true, Ordering::SeqCst);
        let (pushed, secs) = pusher
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("the busy stream failed: {e}\n{}", logs(&s)));
        (rtts, pushed, secs)
    });
    sampler.join().unwrap();
    let delivered = target.sunk.load(Ordering::SeqCst);
    rtts.sort();
    let (p50, p99, max) = (
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99),
        *rtts.last().unwrap(),
    );
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let rise = peak.load(Ordering::SeqCst).saturating_sub(base_rss);
    let rise_agent = peak_agent.load(Ordering::SeqCst).saturating_sub(base_agent);
    println!(
        "busy stream: {:.1} MiB pushed in {:.2} s = {:.1} MiB/s (delivered {:.1} MiB)\n\
         echo stream: {} round trips of 64 B, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n\
         broker VmRSS: {:.1} MiB before, peak +{:.1} MiB; agent VmRSS: {:.1} MiB before, peak +{:.1} MiB",
        mib(pushed),
        push_secs.as_secs_f64(),
        mib(pushed) / push_secs.as_secs_f64(),
        mib(delivered),
        rtts.len(),
        ms(p50),
        ms(p99),
        ms(max),
        base_rss as f64 / 1024.0,
        rise as f64 / 1024.0,
        base_agent as f64 / 1024.0,
        rise_agent as f64 / 1024.0,
    );
    assert!(rtts.len() >= 200);
    assert!(
        p99 < Duration::from_millis(50),
        "p99 round trip {:.2} ms while another stream is busy",
        ms(p99)
    );
    assert!(rise < 64 * 1024, "broker grew by {} KiB", rise);
    assert!(delivered > 4 * 1024 * 1024);
    drop(session);
}

/// CPU time (user + system, all threads) the processes `pids` have used so far, in seconds.
fn cpu_secs(pids: &[u32]) -> f64 {
    // USER_HZ: sysconf(_SC_CLK_TCK), 100 on Linux.
    const TICKS: f64 = 100.0;
    pids.iter()
        .map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command (which is in parentheses and may hold spaces).
            let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            (t(11) + t(12)) as f64 / TICKS
        })
        .sum()
}

/// The processes of the sshd under test (the listener and its session children).
fn sshd_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sshd")
        })
        .collect()
}

/// `ssh -N -L` from a free local port to `target_port` through `sshd`, with `cipher` and
/// the `extra` options, once it listens: the process (its `-v` output on stderr) and the
/// local address.
fn ssh_forward(
    sshd: &SshServer,
    cipher: &str,
    target_port: u16,
    extra: &[&str],
) -> (CliProc, SocketAddr) {
    let port = free_port();
    let ssh = CliProc::spawn(
        Command::new("ssh")
            .args(["-N", "-v", "-c", cipher, "-p", &sshd.port.to_string()])
            .args(sshd.login_args())
            .args(extra)
            .args([
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                &format!("127.0.0.1:{port}:127.0.0.1:{target_port}"),
                &format!("{}@127.0.0.1", sshd.user),
            ]),
    );
    ssh.wait_line(T, |l| l.contains("Local forwarding listening on 127.0.0.1"))
        .unwrap_or_else(|| panic!("ssh {extra:?} -L did not start:\n{}", ssh.stderr()));
    (ssh, ([127, 0, 0, 1], port).into())
}

/// The processes whose parent is `pid` (ssh's ProxyCommand).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                // The parent is the second field after the command (in parentheses).
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// `n` echo round trips of 64 bytes on each of `addrs`, one path after the other in every
/// turn: sorted round-trip times per address.
fn interleaved_rtts(addrs: &[SocketAddr], n: usize) -> Vec<Vec<Duration>> {
    let mut conns: Vec<TcpStream> = addrs
        .iter()
        .map(|a| {
            let mut c = TcpStream::connect(a).unwrap();
            c.set_nodelay(true).unwrap();
            c.set_read_timeout(Some(T)).unwrap();
            c.write_all(b"E").unwrap();
            echo_round_trip(&mut c, &[1u8; 64]).unwrap();
            c
        })
        .collect();
    let mut out = vec![Vec::with_capacity(n); addrs.len()];
    for i in 0..n {
        for (c, v) in conns.iter_mut().zip(out.iter_mut()) {
            let t = Instant::now();
            echo_round_trip(c, &[i as u8; 64]).unwrap();
            v.push(t.elapsed());
        }
    }
    for v in &mut out {
        v.sort();
    }
    out
}

/// One figure as a JSON line that starts with `{"scenario":` (what `make bench` collects),
/// then the path, then `fields` (an object).
fn figure_line(scenario: &str, path: &str, fields: serde_json::Value) -> String {
    let rest = fields.to_string();
    format!(
        "{{\"scenario\":{},\"path\":{},{}",
        serde_json::Value::from(scenario),
        serde_json::Value::from(path),
        &rest[1..]
    )
}

/// Median of a few figures (the upper middle one for an even count).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Measurement, run by hand (and by `make bench`):
/// `cargo test --release -p bulwark-integration-tests --test tunnel throughput_and_latency_vs_ssh_forwarding -- --ignored --nocapture`.
///
/// To the same target, directly (loopback), through the tunnel (`bulwark-tunnel open`) and
/// through `ssh -L` with ssh's fastest cipher (aes128-gcm), and through `ssh -L` by way of
/// a jump host (`ssh-J`: the relayed shape, four TCP hops and two encrypted legs, like the
/// tunnel's; a figure beside the target, not the target): throughput of one stream
/// (256 MiB one way) and of eight parallel streams (8 × 64 MiB, aggregate), and 2,000 echo
/// round trips of 64 bytes (p50, p99, and p50 minus the direct p50 of the same round; the
/// paths take turns round trip by round trip). The paths take turns in a rotating order
/// over the rounds (3); every figure is the median over the rounds, printed as one JSON
/// line starting with `{"scenario":`, with the CPU time the path's own processes spent per
/// MiB. Every bulk transfer is checked byte for byte by the target.
///
/// Environment: `BULWARK_TUNNEL_BENCH_ROUNDS`, `BULWARK_TUNNEL_BENCH_MIB` (one stream),
/// `BULWARK_TUNNEL_BENCH_PARALLEL_MIB` (each of the eight), `BULWARK_TUNNEL_BENCH_RTTS`,
/// `BULWARK_TUNNEL_BENCH_PATHS` (comma-separated subset of `direct,bulwark-tunnel,ssh-L,ssh-J`),
/// `BULWARK_TUNNEL_BENCH_WAIT_SECS` (a pause after start-up, e.g. to attach a profiler to
/// the process ids printed on stderr).
#[test]
#[ignore]
fn throughput_and_latency_vs_ssh_forwarding() {
    let _alone = alone();
    let rounds: usize = env_or("BULWARK_TUNNEL_BENCH_ROUNDS", 3).max(1);
    let one_bytes = env_or("BULWARK_TUNNEL_BENCH_MIB", 256u64) * 1024 * 1024;
    let par_streams = 8usize;
    let par_bytes = env_or("BULWARK_TUNNEL_BENCH_PARALLEL_MIB", 64u64) * 1024 * 1024;
    let n_rtt: usize = env_or("BULWARK_TUNNEL_BENCH_RTTS", 2000);
    let only: Option<String> = std::env::var("BULWARK_TUNNEL_BENCH_PATHS").ok();
    let target = target_server();
    let target_addr: SocketAddr = ([127, 0, 0, 1], target.port).into();
    let sshd = SshServer::start();
    let s = setup(&format!("web = \"127.0.0.1:{}\"", target.port), "");
    let (open, tunnel_addr) = open_cli(&s, "alice", "web");
    let cipher = "aes128-gcm@openssh.com";
    let (ssh, ssh_addr) = ssh_forward(&sshd, cipher, target.port, &[]);
    assert!(
        ssh.stderr().contains(&format!("cipher: {cipher}")),
        "ssh did not negotiate {cipher}:\n{}",
        ssh.stderr()
    );
    // The same forwarding through a jump host (`ssh -J`, spelled out as the ProxyCommand
    // it stands for, so that the jump leg uses the same key and cipher): the relayed
    // shape of the tunnel. The bytes go client → ssh → (pipe) ssh -W → sshd (the jump
    // host) → sshd (the target host) → target: four TCP hops, both legs encrypted.
    let proxy = format!(
        "ProxyCommand=ssh -c {cipher} -p {} {} -W %h:%p {}@127.0.0.1",
        sshd.port,
        sshd.login_args().join(" "),
        sshd.user
    );
    let (ssh_jump, jump_addr) = ssh_forward(&sshd, cipher, target.port, &["-o", &proxy]);
    eprintln!(
        "pids: broker={} agent={} cli={} ssh={} ssh-J={}",
        s.broker.process.pid(),
        s.agent.pid(),
        open.child.id(),
        ssh.child.id(),
        ssh_jump.child.id()
    );
    let wait = env_or("BULWARK_TUNNEL_BENCH_WAIT_SECS", 0u64);
    if wait > 0 {
        std::thread::sleep(Duration::from_secs(wait));
    }
    let tunnel_pids = vec![s.broker.process.pid(), s.agent.pid(), open.child.id()];
    let ssh_client_pid = ssh.child.id();
    let jump_client_pid = ssh_jump.child.id();
    // The processes that carry a path's bytes (besides this test's client and target).
    // sshd's session processes of the other ssh path sit idle meanwhile.
    let path_pids = |name: &str| -> Vec<u32> {
        match name {
            "bulwark-tunnel" => tunnel_pids.clone(),
            "ssh-L" => {
                let mut v = sshd_pids();
                v.push(ssh_client_pid);
                v
            }
            "ssh-J" => {
                let mut v = sshd_pids();
                v.push(jump_client_pid);
                v.extend(children_of(jump_client_pid));
                v
            }
            _ => Vec::new(),
        }
    };
    let paths: Vec<(&str, SocketAddr)> = [
        ("direct", target_addr),
        ("bulwark-tunnel", tunnel_addr),
        ("ssh-L", ssh_addr),
        ("ssh-J", jump_addr),
    ]
    .into_iter()
    .filter(|(name, _)| {
        *name == "direct"
            || only
                .as_deref()
                .is_none_or(|o| o.split(',').any(|p| p.trim() == *name))
    })
    .collect();
    // Per path: one-stream MiB/s, parallel MiB/s, p50 ms, p99 ms, added p50 ms; one entry
    // per round.
    let mut one: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut par: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut p50: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut p99: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut added: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut cpu_one: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut cpu_par: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        let mut order = paths.clone();
        order.rotate_left(round % paths.len());
        for (name, addr) in &order {
            let pids = path_pids(name);
            let cpu0 = cpu_secs(&pids);
            let t1 = bulk_mib_s(*addr, one_bytes);
            let cpu1 = cpu_secs(&pids);
            let t8 = parallel_bulk_mib_s(*addr, par_streams, par_bytes);
            let cpu8 = cpu_secs(&pids);
            // CPU milliseconds the path's processes spent per MiB carried.
            let per_mib = |cpu: f64, bytes: u64| cpu * 1000.0 / (bytes as f64 / (1024.0 * 1024.0));
            let (c1, c8) = (
                per_mib(cpu1 - cpu0, one_bytes),
                per_mib(cpu8 - cpu1, par_streams as u64 * par_bytes),
            );
            eprintln!(
                "round {round} {name:<15} 1 stream {t1:>8.1} MiB/s ({c1:.2} cpu-ms/MiB)  {par_streams} streams {t8:>8.1} MiB/s ({c8:.2} cpu-ms/MiB)"
            );
            cpu_one.entry(name).or_default().push(c1);
            cpu_par.entry(name).or_default().push(c8);
            one.entry(name).or_default().push(t1);
            par.entry(name).or_default().push(t8);
        }
        // Round trips take turns across the paths (in this round's order), so that a
        // moment of load elsewhere on the machine weighs on every path alike.
        let addrs: Vec<SocketAddr> = order.iter().map(|(_, a)| *a).collect();
        let all = interleaved_rtts(&addrs, n_rtt);
        let direct_p50 = ms(percentile(
            &all[order.iter().position(|(n, _)| *n == "direct").unwrap()],
            0.5,
        ));
        for ((name, _), r) in order.iter().zip(&all) {
            let (a, b) = (ms(percentile(r, 0.5)), ms(percentile(r, 0.99)));
            eprintln!("round {round} {name:<15} rtt p50 {a:.3} ms p99 {b:.3} ms");
            p50.entry(name).or_default().push(a);
            p99.entry(name).or_default().push(b);
            added.entry(name).or_default().push(a - direct_p50);
        }
    }
    println!(
        "{:<16} {:>14} {:>14} {:>9} {:>9} {:>12}",
        "path (median)",
        "1 stream MiB/s",
        format!("{par_streams} streams"),
        "p50 ms",
        "p99 ms",
        "added p50"
    );
    for (name, _) in &paths {
        println!(
            "{name:<16} {:>14.1} {:>14.1} {:>9.3} {:>9.3} {:>12.3}",
            median(&one[name]),
            median(&par[name]),
            median(&p50[name]),
            median(&p99[name]),
            median(&added[name])
        );
    }
    let list = |v: &[f64]| {
        serde_json::json!(v
            .iter()
            .map(|x| (x * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>())
    };
    for (name, _) in &paths {
        for (streams, bytes, figures, cpu) in [
            (1, one_bytes, &one, &cpu_one),
            (par_streams, par_bytes, &par, &cpu_par),
        ] {
            println!(
                "{}",
                figure_line(
                    "tunnel-throughput",
                    name,
                    serde_json::json!({
                        "streams": streams,
                        "bytes_per_stream": bytes,
                        "mib_per_s": (median(&figures[name]) * 10.0).round() / 10.0,
                        "rounds": rounds,
                        "runs": list(&figures[name]),
                        // CPU the path's own processes used per MiB (not the client's and
                        // target's): the tunnel's broker, agent and CLI; ssh and sshd.
                        "path_cpu_ms_per_mib": (median(&cpu[name]) * 1000.0).round() / 1000.0,
                    })
                )
            );
        }
        println!(
            "{}",
            figure_line(
                "tunnel-rtt",
                name,
                serde_json::json!({
                    "message_bytes": 64,
                    "round_trips": n_rtt,
                    "p50_ms": (median(&p50[name]) * 1000.0).round() / 1000.0,
                    "p99_ms": (median(&p99[name]) * 1000.0).round() / 1000.0,
                    "added_p50_ms": (median(&added[name]) * 1000.0).round() / 1000.0,
                    "rounds": rounds,
                    "p50_runs": list(&p50[name]),
                    "p99_runs": list(&p99[name]),
                })
            )
        );
    }
    drop(ssh_jump);
    drop(ssh);
    drop(open);
}
