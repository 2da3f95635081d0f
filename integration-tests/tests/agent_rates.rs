//! The agent's performance figures, measured on real processes (speed is checked by
//! `make bench`, which keeps the lines of stdout that start with `{"scenario":`):
//! - `agent-ingest`: records/s accepted through the Unix ingest socket by [`PRODUCERS`]
//!   connections at once, each pipelining (a writer streams request lines, a reader takes
//!   the replies as they come), with `durability = "flush"` (target 30 000) and `"fsync"`
//!   (target 20 000);
//! - `agent-drain`: records/s of a backlog drained to the real broker at QoS 1, as a
//!   subscriber receives them (target 30 000);
//! - `agent-rss`: the agent's resident memory with 1 million records queued (target 64 MiB),
//!   after ingesting them and after a restart that reopens the store.
//!
//! Each figure is one JSON line on stdout. The assertions check correctness only: every
//! request answered once, accepted, in order per connection, and every accepted record
//! delivered. Run with
//! `cargo test --release -p bulwark-integration-tests --test agent_rates -- --ignored --nocapture --test-threads 1`
//! (the agent and broker binaries of the same profile must be built:
//! `cargo build --release --workspace --bins`).
//!
//! The agents run at log level `info`, as in production: at `debug` rumqttc logs every
//! publish.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulwark_integration_tests::mqtt::{options, Client, QoS, Via};
use bulwark_integration_tests::{BrokerConfig, BrokerProcess, TestBroker};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const T: Duration = Duration::from_secs(60);
/// The measurements take turns even when the test harness runs them in parallel (they
/// would share the machine's cores otherwise).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Producer connections at once.
const PRODUCERS: usize = 8;
/// Records per ingest measurement (all producers together).
const RECORDS: usize = 200_000;
/// Records queued for the memory figure.
const RSS_RECORDS: usize = 1_000_000;
/// Request lines a producer writes per `write_all`.
const WRITE_LINES: usize = 256;

const INGEST_FLUSH_TARGET: f64 = 30_000.0;
const INGEST_FSYNC_TARGET: f64 = 20_000.0;
const DRAIN_TARGET: f64 = 30_000.0;
const RSS_TARGET_KB: u64 = 64 * 1024;

/// The uplink's in-flight window in these runs.
const MAX_INFLIGHT: u16 = 256;
/// The backlog lane's rate cap in the drain run. The default (1 000/s, `uplink.
/// backlog_drain_per_sec`) deliberately keeps a backlog from crowding out live data after an
/// outage; the measurement lifts it to see what the agent itself can drain.
const DRAIN_CAP_PER_SEC: u32 = 1_000_000;

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

/// The broker, with room for the whole drain in the subscriber's session (by default a
/// session that falls 1 000 messages behind loses messages) and a wide window towards it,
/// so that the test's subscriber does not hold the figure down.
fn start_broker(acl_dir: &Path) -> TestBroker {
    TestBroker::start(BrokerConfig {
        extra: format!(
            "[auth]\nacl_file = {:?}\n[limits]\nmax_queued_messages = {}\nmax_queued_bytes = {}\nmax_inflight = 1024\n",
            acl(acl_dir),
            2 * RECORDS,
            1024 * 1024 * 1024
        ),
        ..BrokerConfig::default()
    })
}

fn config(b: &TestBroker, dir: &Path, broker: &str, durability: &str) -> String {
    let cert = b.pki.client("gw-r");
    format!(
        "device_id = \"gw-r\"\n[uplink]\nbrokers = [{broker:?}]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nbackoff_min_ms = 100\nbackoff_max_ms = 200\nmax_inflight = {MAX_INFLIGHT}\nhistorical_after_secs = 1\nbacklog_drain_per_sec = {DRAIN_CAP_PER_SEC}\n[queue]\npath = {:?}\ndurability = {durability:?}\n[ingest]\nsocket = {:?}\n",
        b.pki.ca_path,
        cert.cert_path,
        cert.key_path,
        dir.join("queue"),
        dir.join("ingest.sock"),
    )
}

/// An `mqtts://` URL where nothing listens: the agent queues everything.
fn dead_url() -> String {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("mqtts://localhost:{}", dead.local_addr().unwrap().port());
    drop(dead);
    url
}

fn spawn_agent(config: &str, dir: &Path) -> BrokerProcess {
    let agent = BrokerProcess::spawn_agent_with_env(config, dir, &[("BULWARK_LOG", "info")]);
    agent
        .wait_log(T, |v| v["message"] == "ingest socket ready")
        .unwrap_or_else(|| panic!("agent did not start; log:\n{}", agent.log_text()));
    agent
}

/// A field of `/proc/<pid>/status` in kB.
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    let hz = 100; // USER_HZ on Linux
    Duration::from_millis(ticks * 1000 / hz)
}

/// Bytes of the files under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            disk_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// One producer: writes `count` request lines as fast as the socket takes them while a
/// reader takes the replies. Returns the sequence numbers, in reply order, after checking
/// that every line was accepted and the numbers increase (the connection's order is kept).
async fn produce(socket: PathBuf, producer: usize, count: usize) -> Vec<u64> {
    let stream = UnixStream::connect(&socket).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut buf = String::with_capacity(WRITE_LINES * 64);
        let mut i = 0;
        while i < count {
            buf.clear();
            for _ in 0..WRITE_LINES.min(count - i) {
                use std::fmt::Write as _;
                let _ = writeln!(
                    buf,
                    "{{\"series\":\"p{producer}/v\",\"payload\":{{\"i\":{i},\"value\":21.5}}}}"
                );
                i += 1;
            }
            wr.write_all(buf.as_bytes()).await.unwrap();
        }
        wr.shutdown().await.unwrap();
    });
    let mut lines = BufReader::with_capacity(64 * 1024, rd).lines();
    let mut seqs = Vec::with_capacity(count);
    while let Some(line) = tokio::time::timeout(T, lines.next_line())
        .await
        .expect("no reply in time")
        .unwrap()
    {
        // {"ok":true,"seq":N}
        let seq = line
            .strip_prefix("{\"ok\":true,\"seq\":")
            .and_then(|s| s.strip_suffix('}'))
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("producer {producer}: unexpected reply {line:?}"));
        if let Some(&last) = seqs.last() {
            assert!(seq > last, "producer {producer}: seq {seq} after {last}");
        }
        seqs.push(seq);
    }
    writer.await.unwrap();
    assert_eq!(seqs.len(), count, "producer {producer}: replies");
    seqs
}

/// `PRODUCERS` connections sending `records` together; returns the accepted sequence
/// numbers and the elapsed time.
async fn ingest(socket: &Path, records: usize) -> (HashSet<u64>, Duration) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let share = records / PRODUCERS + usize::from(p < records % PRODUCERS);
            tokio::spawn(produce(socket.to_path_buf(), p, share))
        })
        .collect();
    let mut all = HashSet::with_capacity(records);
    for t in tasks {
        for seq in t.await.unwrap() {
            assert!(all.insert(seq), "seq {seq} given twice");
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(all.len(), records);
    (all, elapsed)
}

/// The `timestamp` of a JSON log line (`2026-11-27T10:00:00.123456Z`), in seconds since
/// the epoch.
fn log_time(line: &serde_json::Value) -> f64 {
    let ts = line["timestamp"].as_str().expect("timestamp");
    let bad = || -> ! { panic!("timestamp {ts:?}") };
    let (date, clock) = ts
        .strip_suffix('Z')
        .and_then(|t| t.split_once('T'))
        .unwrap_or_else(|| bad());
    let num = |s: &str| s.parse::<i64>().unwrap_or_else(|_| bad());
    let d: Vec<i64> = date.split('-').map(num).collect();
    let c: Vec<&str> = clock.split(':').collect();
    let (y, m, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
    // Days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs: f64 = c[2].parse().unwrap_or_else(|_| bad());
    (days * 86_400 + num(c[0]) * 3600 + num(c[1]) * 60) as f64 + secs
}

/// `seq` and `historical` of a telemetry envelope (both come before the payload).
fn envelope_seq(payload: &[u8]) -> (u64, bool) {
    let text = std::str::from_utf8(payload).expect("envelope is UTF-8");
    let field = |name: &str| {
        let at = text
            .find(name)
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        &text[at + name.len()..]
    };
    let seq = field("\"seq\":");
    let digits = seq.bytes().take_while(u8::is_ascii_digit).count();
    let seq = seq[..digits]
        .parse()
        .unwrap_or_else(|_| panic!("seq in {text}"));
    (seq, field("\"historical\":").starts_with("true"))
}

fn cpu_percent(cpu: Duration, wall: Duration) -> f64 {
    (cpu.as_secs_f64() / wall.as_secs_f64() * 1000.0).round() / 10.0
}

/// Ingest with each durability, then the flush run's records drained to the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand or by make bench"]
async fn ingest_and_drain_rates() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let acl_dir = tempfile::tempdir().unwrap();
    let b = start_broker(acl_dir.path());
    let dead = dead_url();
    for (durability, target) in [
        ("flush", INGEST_FLUSH_TARGET),
        ("fsync", INGEST_FSYNC_TARGET),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = spawn_agent(&config(&b, dir.path(), &dead, durability), dir.path());
        let pid = agent.pid();
        let cpu0 = cpu_time(pid);
        let (accepted, elapsed) = ingest(&dir.path().join("ingest.sock"), RECORDS).await;
        let cpu = cpu_time(pid).saturating_sub(cpu0);
        let rate = RECORDS as f64 / elapsed.as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "scenario": "agent-ingest",
                "durability": durability,
                "producers": PRODUCERS,
                "records": RECORDS,
                "elapsed_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
                "records_per_s": rate.round(),
                "agent_cpu_percent": cpu_percent(cpu, elapsed),
                "target": target,
            })
        );
        if durability == "fsync" {
            continue;
        }

        // Drain the flush run's queue to the broker: every record is older than
        // historical_after_secs by now, so all of it is backlog.
        assert_eq!(agent.terminate().code(), Some(0));
        drop(agent);
        std::thread::sleep(Duration::from_millis(1100));
        let hist = b.pki.client("historian");
        let via = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&hist)));
        let mut sub = Client::connect(options("historian-r", &via)).await.unwrap();
        sub.subscribe("devices/gw-r/data/#", QoS::AtLeastOnce).await;
        let url = format!("mqtts://localhost:{}", b.addr("tls").port());
        let start = Instant::now();
        let agent = BrokerProcess::spawn_agent_with_env(
            &config(&b, dir.path(), &url, durability),
            dir.path(),
            &[("BULWARK_LOG", "info")],
        );
        let pid = agent.pid();
        let mut seen = HashSet::with_capacity(RECORDS);
        let mut first: Option<(Instant, Duration)> = None;
        let mut historical = 0usize;
        while seen.len() < RECORDS {
            let p = sub.next_publish(T).await.unwrap_or_else(|| {
                panic!(
                    "drain stalled at {} of {RECORDS}; agent log:\n{}",
                    seen.len(),
                    agent.log_text()
                )
            });
            if first.is_none() {
                first = Some((Instant::now(), cpu_time(pid)));
            }
            let (seq, is_historical) = envelope_seq(&p.payload);
            assert!(accepted.contains(&seq), "seq {seq} was never accepted");
            historical += usize::from(is_historical);
            seen.insert(seq);
        }
        let (t0, cpu0) = first.unwrap();
        let elapsed = t0.elapsed();
        let cpu = cpu_time(pid).saturating_sub(cpu0);
        assert_eq!(seen, accepted, "every accepted record arrives");
        assert_eq!(historical, RECORDS, "the whole queue was backlog");
        let rate = RECORDS as f64 / elapsed.as_secs_f64();
        // The agent's own view: from its connection to the last backlog record handed to
        // the MQTT client (at most max_inflight records before the last PUBACK).
        let at = |message: &str| {
            let line = agent
                .wait_log(T, |v| v["message"] == message)
                .unwrap_or_else(|| panic!("no {message:?} in the agent's log"));
            log_time(&line)
        };
        let agent_secs = at("backlog drained") - at("uplink connected");
        println!(
            "{}",
            serde_json::json!({
                "scenario": "agent-drain",
                "qos": 1,
                "records": RECORDS,
                "elapsed_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
                "elapsed_incl_start_s": (start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
                "records_per_s": rate.round(),
                "agent_records_per_s": (RECORDS as f64 / agent_secs).round(),
                "agent_cpu_percent": cpu_percent(cpu, elapsed),
                "max_inflight": MAX_INFLIGHT,
                "backlog_drain_per_sec": DRAIN_CAP_PER_SEC,
                "target": DRAIN_TARGET,
            })
        );
        drop(agent);
        sub.disconnect().await;
    }
}

/// Resident memory with a million records queued (nothing drains: the broker is
/// unreachable), after ingesting them and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand or by make bench"]
async fn memory_with_a_million_records_queued() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let acl_dir = tempfile::tempdir().unwrap();
    let b = start_broker(acl_dir.path());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&b, dir.path(), &dead_url(), "flush");
    let mut agent = spawn_agent(&cfg, dir.path());
    let (_, elapsed) = ingest(&dir.path().join("ingest.sock"), RSS_RECORDS).await;
    let report = |phase: &str, agent: &BrokerProcess, extra: serde_json::Value| {
        let pid = agent.pid();
        let mut v = serde_json::json!({
            "scenario": "agent-rss",
            "phase": phase,
            "records_queued": RSS_RECORDS,
            "rss_kb": proc_status_kb(pid, "VmRSS:"),
            "rss_peak_kb": proc_status_kb(pid, "VmHWM:"),
            "disk_bytes": disk_bytes(&dir.path().join("queue")),
            "target_kb": RSS_TARGET_KB,
        });
        if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        println!("{v}");
    };
    report(
        "after-ingest",
        &agent,
        serde_json::json!({ "ingest_records_per_s": (RSS_RECORDS as f64 / elapsed.as_secs_f64()).round() }),
    );
    assert_eq!(agent.terminate().code(), Some(0));
    drop(agent);
    let start = Instant::now();
    let agent = spawn_agent(&cfg, dir.path());
    let open = agent
        .wait_log(T, |v| v["message"] == "queue open")
        .expect("queue open");
    assert_eq!(open["records"], RSS_RECORDS as u64);
    report(
        "after-restart",
        &agent,
        serde_json::json!({ "start_s": (start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0 }),
    );
}

#[test]
fn log_timestamps_are_read_as_unix_seconds() {
    let line = serde_json::json!({ "timestamp": "2026-11-27T19:10:37.333146Z" });
    assert!((log_time(&line) - 1_795_806_637.333_146).abs() < 1e-6);
    let line = serde_json::json!({ "timestamp": "1970-01-01T00:00:00Z" });
    assert_eq!(log_time(&line), 0.0);
    let line = serde_json::json!({ "timestamp": "2024-02-29T12:00:00.5Z" });
    assert!((log_time(&line) - 1_709_208_000.5).abs() < 1e-6);
}
