//! Test harness for Bulwark's end-to-end tests: a throw-away PKI made with bulwark-pki, the
//! real `bulwark-broker` binary started as a child process on port 0 with a generated
//! configuration, and helpers for rumqttc, raw MQTT bytes and the mosquitto/paho clients.
//!
//! Tests synchronise on events: the broker's JSON log lines (listening, connect, ...) and
//! MQTT acknowledgements, never on sleeps.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bulwark_pki::CertificateAuthority;

/// Where the workspace's binaries are (target/<profile>/), found from the test binary.
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!(
        "BULWARK_{}_BIN",
        name.replace('-', "_").to_uppercase()
    )) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not found; build it first with `cargo build --workspace --bins` (make test does)",
        p.display()
    );
    p
}

/// Workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A client's certificate and key on disk.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub name: String,
    pub serial: u64,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A throw-away PKI in a temporary directory: a root CA, a server certificate for
/// localhost/127.0.0.1, and client certificates on demand.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
    pub ca_path: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// An empty CRL at first; [`TestPki::revoke`] rewrites it.
    pub crl_path: PathBuf,
    crl_number: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::new_root("Bulwark Test CA").expect("CA");
        let server = ca
            .issue_server("bulwark-test-broker", &["localhost", "127.0.0.1"])
            .expect("server cert");
        let ca_path = dir.path().join("ca.pem");
        let server_cert = dir.path().join("server.pem");
        let server_key = dir.path().join("server.key");
        std::fs::write(&ca_path, ca.cert_pem()).unwrap();
        std::fs::write(&server_cert, &server.cert_pem).unwrap();
        write_private(&server_key, &server.key_pem);
        let crl_path = dir.path().join("crl.pem");
        std::fs::write(&crl_path, ca.crl_pem(&[], 1).unwrap()).unwrap();
        TestPki {
            dir,
            ca,
            ca_path,
            server_cert,
            server_key,
            crl_path,
            crl_number: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Rewrites the CRL (atomically, by rename) so that it revokes exactly `serials`.
    pub fn revoke(&self, serials: &[u64]) {
        let n = self
            .crl_number
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let tmp = self.dir.path().join("crl.pem.tmp");
        std::fs::write(&tmp, self.ca.crl_pem(serials, n).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.crl_path).unwrap();
    }

    /// Replaces the server certificate and key (atomically) with a fresh pair.
    pub fn rotate_server_cert(&self, cn: &str) {
        let server = self
            .ca
            .issue_server(cn, &["localhost", "127.0.0.1"])
            .expect("server cert");
        let tmp = self.dir.path().join("server.tmp");
        write_private(&tmp, &server.key_pem);
        std::fs::rename(&tmp, &self.server_key).unwrap();
        std::fs::write(&tmp, &server.cert_pem).unwrap();
        std::fs::rename(&tmp, &self.server_cert).unwrap();
    }

    /// Issues a client certificate with common name `cn`.
    pub fn client(&self, cn: &str) -> ClientCert {
        let c = self.ca.issue_client(cn).expect("client cert");
        let cert_path = self.dir.path().join(format!("{cn}.pem"));
        let key_path = self.dir.path().join(format!("{cn}.key"));
        std::fs::write(&cert_path, &c.cert_pem).unwrap();
        write_private(&key_path, &c.key_pem);
        ClientCert {
            name: cn.to_string(),
            serial: c.serial,
            cert_path,
            key_path,
            cert_pem: c.cert_pem,
            key_pem: c.key_pem,
        }
    }

    /// rustls client configuration trusting this CA, with `client` as client certificate.
    pub fn rustls_client_config(&self, client: Option<&ClientCert>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        let ca_der = rustls_pki_types::CertificateDer::from(self.ca.cert_der());
        roots.add(ca_der).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            Some(c) => {
                let certs: Vec<_> = rustls_pemfile_certs(&c.cert_pem);
                let key = rustls_pemfile_key(&c.key_pem);
                b.with_client_auth_cert(certs, key).unwrap()
            }
            None => b.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn rustls_pemfile_key(pem: &str) -> rustls_pki_types::PrivateKeyDer<'static> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
}

pub fn write_private(path: &Path, contents: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(contents.as_bytes()).unwrap();
}

/// Builds broker configurations for tests. Listeners bind 127.0.0.1:0; names are
/// `tls`, `wss` and `tcp`.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub tls: bool,
    pub wss: bool,
    pub tcp: bool,
    /// `required`, `optional` or `none` for the TLS listeners.
    pub client_certificates: &'static str,
    /// Anonymous access on the TLS listeners (they are on loopback).
    pub tls_anonymous: bool,
    /// Extra TOML appended verbatim (e.g. a `[limits]` table).
    pub extra: String,
    pub durability: &'static str,
    pub persistence: bool,
    /// Fixed ports instead of 0 (for restarts that must keep the same address).
    pub ports: HashMap<&'static str, u16>,
    /// Give the TLS listeners the PKI's CRL.
    pub crl: bool,
    /// Run the broker on one CPU (`taskset`), where its runtime is single-threaded.
    pub one_cpu: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            tls: true,
            wss: true,
            tcp: true,
            client_certificates: "required",
            tls_anonymous: false,
            extra: String::new(),
            durability: "sync",
            persistence: true,
            ports: HashMap::new(),
            crl: false,
            one_cpu: false,
        }
    }
}

impl BrokerConfig {
    pub fn render(&self, pki: &TestPki, data_dir: &Path) -> String {
        let mut s = String::new();
        let port = |n: &str| self.ports.get(n).copied().unwrap_or(0);
        let tls_table = |s: &mut String| {
            s.push_str(&format!(
                "[listener.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\nclient_certificates = {:?}\n",
                pki.server_cert, pki.server_key, pki.ca_path, self.client_certificates
            ));
            if self.crl {
                s.push_str(&format!("crl_file = {:?}\n", pki.crl_path));
            }
        };
        // Listeners with a fixed port first: the broker binds them in this order, and a
        // port-0 listener bound before could be given the fixed port (free when the test
        // chose it) by the kernel.
        let mut names = vec!["tls", "wss", "tcp"];
        names.sort_by_key(|n| port(n) == 0);
        for name in names {
            // (listed, allow_anonymous, TLS settings)
            let (listed, anonymous, tls) = match name {
                "tls" => (self.tls, self.tls_anonymous, true),
                "wss" => (self.wss, self.tls_anonymous, true),
                _ => (self.tcp, true, false),
            };
            if !listed {
                continue;
            }
            s.push_str(&format!(
                "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:{}\"\ntransport = \"{name}\"\nallow_anonymous = {anonymous}\n",
                port(name)
            ));
            if tls {
                tls_table(&mut s);
            }
        }
        s.push_str(&format!(
            "[persistence]\nenabled = {}\npath = {:?}\ndurability = {:?}\nflush_interval_ms = 50\n",
            self.persistence,
            data_dir.join("store"),
            self.durability
        ));
        s.push_str(&self.extra);
        s
    }

    pub fn listener_count(&self) -> usize {
        usize::from(self.tls) + usize::from(self.wss) + usize::from(self.tcp)
    }
}

#[derive(Default)]
struct LogState {
    lines: Vec<serde_json::Value>,
    closed: bool,
}

/// A `bulwark-broker run` child process with its JSON log collected.
pub struct BrokerProcess {
    child: Child,
    log: Arc<(Mutex<LogState>, Condvar)>,
    pub addrs: HashMap<String, SocketAddr>,
    pub config_path: PathBuf,
}

impl std::fmt::Debug for BrokerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerProcess")
            .field("pid", &self.child.id())
            .field("addrs", &self.addrs)
            .finish()
    }
}

impl BrokerProcess {
    /// Writes `config` to `dir/broker.toml`, starts the broker and waits until every one
    /// of its `listeners` logged "listening".
    pub fn start(config: &str, dir: &Path, listeners: usize) -> BrokerProcess {
        Self::start_on(config, dir, listeners, false)
    }

    /// [`BrokerProcess::start`], on one CPU if `one_cpu` (see [`BrokerConfig::one_cpu`]).
    pub fn start_on(config: &str, dir: &Path, listeners: usize, one_cpu: bool) -> BrokerProcess {
        let mut p = Self::spawn_program("bulwark-broker", "broker.toml", config, dir, &[], one_cpu);
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.addrs.len() < listeners {
            let found = p.wait_log(deadline.saturating_duration_since(Instant::now()), |v| {
                v["message"] == "listening"
                    && !p_contains(
                        &p_addrs_names(&p.addrs),
                        v["listener"].as_str().unwrap_or(""),
                    )
            });
            match found {
                Some(v) => {
                    let name = v["listener"].as_str().unwrap().to_string();
                    let addr = v["addr"].as_str().unwrap().parse().unwrap();
                    p.addrs.insert(name, addr);
                }
                None => panic!(
                    "broker did not start listening; exit: {:?}; log:\n{}",
                    p.child.try_wait(),
                    p.log_text()
                ),
            }
        }
        p
    }

    /// Starts the broker without waiting for anything (for start-up failure tests).
    pub fn spawn(config: &str, dir: &Path) -> BrokerProcess {
        Self::spawn_program("bulwark-broker", "broker.toml", config, dir, &[], false)
    }

    /// Starts `bulwark-agent run` with `config` (written to `dir/agent.toml`); its JSON log
    /// is collected like the broker's.
    pub fn spawn_agent(config: &str, dir: &Path) -> BrokerProcess {
        Self::spawn_program("bulwark-agent", "agent.toml", config, dir, &[], false)
    }

    /// [`BrokerProcess::spawn_agent`] with extra environment variables (e.g. the agent's
    /// `BULWARK_AGENT_CRASH_POINT` test hook).
    pub fn spawn_agent_with_env(config: &str, dir: &Path, env: &[(&str, &str)]) -> BrokerProcess {
        Self::spawn_program("bulwark-agent", "agent.toml", config, dir, env, false)
    }

    fn spawn_program(
        bin: &str,
        file: &str,
        config: &str,
        dir: &Path,
        env: &[(&str, &str)],
        one_cpu: bool,
    ) -> BrokerProcess {
        let config_path = dir.join(file);
        std::fs::write(&config_path, config).unwrap();
        let mut command = if one_cpu {
            // taskset executes the program in its own process: the pid stays the broker's.
            let mut c = Command::new("taskset");
            c.args(["-c", &first_allowed_cpu()]).arg(bin_path(bin));
            c
        } else {
            Command::new(bin_path(bin))
        };
        let mut child = command
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config_path)
            .env("BULWARK_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new((Mutex::new(LogState::default()), Condvar::new()));
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "message": line, "raw": true }));
                let (m, cv) = &*l2;
                m.lock().unwrap().lines.push(v);
                cv.notify_all();
            }
            let (m, cv) = &*l2;
            m.lock().unwrap().closed = true;
            cv.notify_all();
        });
        BrokerProcess {
            child,
            log,
            addrs: HashMap::new(),
            config_path,
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .addrs
            .get(listener)
            .unwrap_or_else(|| panic!("no listener {listener}: {:?}", self.addrs))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line matching `pred` (including lines already seen).
    pub fn wait_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.log;
        let mut checked = 0;
        loop {
            // `pred` runs without the lock held, so it may call other log methods.
            let (new, closed) = {
                let st = m.lock().unwrap();
                (st.lines[checked..].to_vec(), st.closed)
            };
            checked += new.len();
            if let Some(v) = new.into_iter().find(|v| pred(v)) {
                return Some(v);
            }
            if closed {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let st = m.lock().unwrap();
            if st.lines.len() == checked && !st.closed {
                drop(cv.wait_timeout(st, deadline - now).unwrap());
            }
        }
    }

    /// Number of log lines matching `pred` so far.
    pub fn count_log(&self, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
        self.log
            .0
            .lock()
            .unwrap()
            .lines
            .iter()
            .filter(|v| pred(v))
            .count()
    }

    /// Waits for an audit event with `event` = `name` (and every `fields` pair equal).
    pub fn wait_audit(&self, name: &str, fields: &[(&str, &str)]) -> serde_json::Value {
        self.wait_log(Duration::from_secs(20), |v| {
            v["target"] == "audit"
                && v["event"] == name
                && fields.iter().all(|(k, val)| v[*k].as_str() == Some(*val))
        })
        .unwrap_or_else(|| {
            panic!(
                "no audit event {name} {fields:?}; log:\n{}",
                self.log_text()
            )
        })
    }

    pub fn log_text(&self) -> String {
        let st = self.log.0.lock().unwrap();
        st.lines
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(Duration::from_secs(30))
            .expect("broker did not exit within 30 s of SIGTERM")
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn p_addrs_names(addrs: &HashMap<String, SocketAddr>) -> Vec<String> {
    addrs.keys().cloned().collect()
}

fn p_contains(names: &[String], n: &str) -> bool {
    names.iter().any(|x| x == n)
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test broker: PKI, data directory and the process.
pub struct TestBroker {
    pub pki: TestPki,
    pub data: tempfile::TempDir,
    pub config: BrokerConfig,
    pub process: BrokerProcess,
}

impl std::fmt::Debug for TestBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBroker")
            .field("process", &self.process)
            .finish()
    }
}

impl TestBroker {
    pub fn start(config: BrokerConfig) -> TestBroker {
        let pki = TestPki::new();
        let data = tempfile::tempdir().unwrap();
        let text = config.render(&pki, data.path());
        let process =
            BrokerProcess::start_on(&text, data.path(), config.listener_count(), config.one_cpu);
        TestBroker {
            pki,
            data,
            config,
            process,
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.process.addr(listener)
    }

    /// Restarts the broker on the same ports and store. `kill9` = crash instead of SIGTERM.
    pub fn restart(&mut self, kill9: bool) {
        if kill9 {
            self.process.kill9();
        } else {
            let status = self.process.terminate();
            assert!(status.success(), "broker exit status {status:?}");
        }
        let mut cfg = self.config.clone();
        for name in ["tls", "wss", "tcp"] {
            if let Some(a) = self.process.addrs.get(name) {
                cfg.ports.insert(name, a.port());
            }
        }
        let text = cfg.render(&self.pki, self.data.path());
        self.process =
            BrokerProcess::start_on(&text, self.data.path(), cfg.listener_count(), cfg.one_cpu);
    }
}

/// A raw MQTT connection for byte-level tests.
#[derive(Debug)]
pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient { stream }
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads exactly `n` bytes within `timeout`.
    pub fn read_exact(&mut self, n: usize, timeout: Duration) -> std::io::Result<Vec<u8>> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Waits until the broker closes the connection, returning whatever it sent before.
    /// `Err` if it is still open after `timeout`.
    pub fn expect_close(&mut self, timeout: Duration) -> Result<Vec<u8>, String> {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Err(format!(
                        "connection still open after {timeout:?}; received {}",
                        hex(&got)
                    ))
                }
                Err(e) => return Err(format!("read error {e}")),
            }
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses "10 0c 00 04 4d 51" (spaces optional) into bytes.
pub fn unhex(s: &str) -> Vec<u8> {
    let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(clean.len() % 2 == 0, "odd hex: {s}");
    (0..clean.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&clean[i..i + 2], 16).unwrap())
        .collect()
}

/// A minimal CONNECT (MQTT 3.1.1, clean session, keepalive 60) for `client_id`.
pub fn connect_bytes(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut out = vec![0x10, body.len() as u8];
    out.extend(body);
    out
}

/// Runs a command with a timeout, returning (status, stdout, stderr).
pub fn run_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> (Option<ExitStatus>, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status, t1.join().unwrap(), t2.join().unwrap())
}

/// Asserts that an external client program is installed, saying how to install it.
/// `[metrics]` on a free loopback port (port 0: the address comes from the log).
pub const METRICS_ON: &str = "[metrics]\nenabled = true\nbind = \"127.0.0.1:0\"\n";

/// The metrics endpoint's address, from the broker's "serving metrics" log line.
pub fn metrics_addr(p: &BrokerProcess) -> SocketAddr {
    let v = p
        .wait_log(Duration::from_secs(15), |v| {
            v["message"] == "serving metrics"
        })
        .unwrap_or_else(|| panic!("no \"serving metrics\" line; log:\n{}", p.log_text()));
    v["addr"].as_str().unwrap().parse().unwrap()
}

pub fn require_program(name: &str, install_hint: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{name} is not installed: {install_hint} (.ci/run installs it)"
    );
}

/// rumqttc helpers: a client whose event loop runs in a task and forwards every event.
pub mod mqtt {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    pub use rumqttc::{
        AsyncClient, ConnectReturnCode, Event, Incoming, LastWill, MqttOptions, Publish, QoS,
        TlsConfiguration, Transport,
    };
    use tokio::sync::mpsc;

    /// How a test client reaches the broker.
    #[derive(Clone)]
    pub enum Via {
        Tcp(SocketAddr),
        Tls(SocketAddr, Arc<rustls::ClientConfig>),
        /// WebSocket over TLS: address and path.
        Wss(SocketAddr, Arc<rustls::ClientConfig>),
    }

    pub fn options(client_id: &str, via: &Via) -> MqttOptions {
        let mut o = match via {
            Via::Tcp(a) => MqttOptions::new(client_id, a.ip().to_string(), a.port()),
            Via::Tls(a, tls) => {
                let mut o = MqttOptions::new(client_id, "localhost", a.port());
                o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    tls.clone(),
                )));
                o
            }
            Via::Wss(a, tls) => {
                let mut o = MqttOptions::new(
                    client_id,
                    format!("wss://localhost:{}/mqtt", a.port()),
                    a.port(),
                );
                o.set_transport(Transport::wss_with_config(TlsConfiguration::Rustls(
                    tls.clone(),
                )));
                o
            }
        };
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1 << 20, 1 << 20);
        o
    }

    /// A connected client and the stream of its events.
    pub struct Client {
        pub client: AsyncClient,
        pub events: mpsc::UnboundedReceiver<Result<Event, String>>,
        pub session_present: bool,
        task: tokio::task::JoinHandle<()>,
    }

    impl Client {
        /// Connects and waits for CONNACK. `Err` with the reason if refused or failed.
        pub async fn connect(opts: MqttOptions) -> Result<Client, String> {
            let (client, mut eventloop) = AsyncClient::new(opts, 1000);
            let (tx, mut events) = mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(ev) => {
                            if tx.send(Ok(ev)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                            return;
                        }
                    }
                }
            });
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Err(_) => return Err("no CONNACK within 15 s".into()),
                    Ok(None) => return Err("event loop ended".into()),
                    Ok(Some(Err(e))) => return Err(e),
                    Ok(Some(Ok(Event::Incoming(Incoming::ConnAck(ack))))) => {
                        if ack.code != ConnectReturnCode::Success {
                            return Err(format!("refused: {:?}", ack.code));
                        }
                        return Ok(Client {
                            client,
                            events,
                            session_present: ack.session_present,
                            task,
                        });
                    }
                    Ok(Some(Ok(_))) => {}
                }
            }
        }

        /// Waits for the next incoming PUBLISH.
        pub async fn next_publish(&mut self, timeout: Duration) -> Option<Publish> {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(Event::Incoming(Incoming::Publish(p))))) => return Some(p),
                    Ok(Some(Ok(_))) => {}
                    _ => return None,
                }
            }
        }

        /// Waits for an incoming packet matching `pred`.
        pub async fn wait_incoming(
            &mut self,
            timeout: Duration,
            pred: impl Fn(&Incoming) -> bool,
        ) -> Option<Incoming> {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(Event::Incoming(p)))) if pred(&p) => return Some(p),
                    Ok(Some(Ok(_))) => {}
                    _ => return None,
                }
            }
        }

        /// Subscribes and waits for the SUBACK.
        pub async fn subscribe(
            &mut self,
            filter: &str,
            qos: QoS,
        ) -> Vec<rumqttc::SubscribeReasonCode> {
            self.client.subscribe(filter, qos).await.unwrap();
            match self
                .wait_incoming(Duration::from_secs(10), |p| {
                    matches!(p, Incoming::SubAck(_))
                })
                .await
            {
                Some(Incoming::SubAck(a)) => a.return_codes,
                _ => panic!("no SUBACK for {filter}"),
            }
        }

        /// Publishes and, for QoS 1/2, waits for the PUBACK/PUBCOMP.
        pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
            self.client
                .publish(topic, qos, retain, payload.to_vec())
                .await
                .unwrap();
            let want: fn(&Incoming) -> bool = match qos {
                QoS::AtMostOnce => return,
                QoS::AtLeastOnce => |p| matches!(p, Incoming::PubAck(_)),
                QoS::ExactlyOnce => |p| matches!(p, Incoming::PubComp(_)),
            };
            assert!(
                self.wait_incoming(Duration::from_secs(10), want)
                    .await
                    .is_some(),
                "no acknowledgement for {topic} at {qos:?}"
            );
        }

        /// Sends DISCONNECT and waits for the event loop to finish.
        pub async fn disconnect(mut self) {
            let _ = self.client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(Ok(_)) = self.events.recv().await {}
            })
            .await;
            self.task.abort();
        }

        /// Drops the network connection without DISCONNECT (an abnormal end).
        pub fn drop_connection(self) {
            self.task.abort();
        }
    }
}

/// The first CPU this process may run on (`Cpus_allowed_list` in /proc/self/status).
fn first_allowed_cpu() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .and_then(|v| {
            v.trim()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .map(str::to_string)
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "0".to_string())
}

/// A free TCP port on 127.0.0.1 (bound and released; for configurations that must name
/// their port before the process starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real OpenSSH server on a loopback port, for this user, with a key pair made for the
/// test (public-key login only). Stopped when dropped.
pub struct SshServer {
    child: Child,
    pub port: u16,
    /// The client's private key: `ssh -i KEY`.
    pub client_key: PathBuf,
    pub user: String,
    _dir: tempfile::TempDir,
}

impl SshServer {
    pub fn start() -> SshServer {
        require_program(
            "ssh",
            "apt-get install openssh-client openssh-server (.ci/run does)",
        );
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "/usr/sbin/sshd missing: apt-get install openssh-server (.ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in ["host_key", "client_key"] {
            let (status, out, err) = run_with_timeout(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(d.join(key)),
                Duration::from_secs(20),
            );
            assert!(status.unwrap().success(), "ssh-keygen: {out}{err}");
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        // Privilege separation needs this directory when sshd runs as root.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin prohibit-password\nLogLevel VERBOSE\n",
            d.join("host_key").display(),
            d.join("authorized_keys").display(),
            d.join("sshd.pid").display(),
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        SshServer {
            child,
            port,
            client_key: d.join("client_key"),
            user,
            _dir: dir,
        }
    }

    /// `ssh` options for a non-interactive login with the test key and no host-key prompt.
    pub fn client_args(&self) -> Vec<String> {
        let mut v = self.login_args();
        v.extend(["-o".into(), "LogLevel=ERROR".into()]);
        v
    }

    /// [`SshServer::client_args`] without the log level (for an ssh whose `-v` output is
    /// read).
    pub fn login_args(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.client_key.display().to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
        ]
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
