//! The edge agent under faults, as real processes against the real broker:
//! - S1: `kill -9` at every phase of a record's life (received, flushed, published, acked),
//!   a hundred times over one store: every record a producer was told "accepted" arrives
//!   at least once, first arrivals in order per series, and the store reopens cleanly;
//! - S3: the disk budget reached while the broker is unreachable: every record is still
//!   accepted, the oldest are dropped, counted and logged, the newest are delivered in order
//!   once the broker is reachable;
//! - T1: a broker presenting a certificate valid for another host name, and a CA file that
//!   is garbage: the agent never connects, on every attempt, and says why.
//!
//! Everything synchronises on the agent's and broker's JSON log lines and on received
//! messages, never on sleeps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_agent::ingest::{send_stream, Reply};
use bulwark_integration_tests::mqtt::{options, Client, Event, Incoming, QoS, Via};
use bulwark_integration_tests::{
    bin_path, run_with_timeout, write_private, BrokerConfig, BrokerProcess, ClientCert, TestBroker,
    TestPki,
};
use serde_json::Value;
use tokio::sync::watch;

/// Timeout for a single expected event (start-up, a log line, a message).
const T: Duration = Duration::from_secs(30);

/// S1: rounds per crash phase.
const ROUNDS_PER_PHASE: usize = 75;
/// S1: the phases of a record's life (`bulwark_agent::crash_point::Phase`).
const PHASES: [&str; 4] = ["received", "flushed", "published", "acked"];
/// S1: the crash point is armed at the n-th hit, n pseudo-random in 1..=MAX_HIT.
const MAX_HIT: u64 = 8;
/// S1: the series the producers write (one producer each).
const SERIES: [&str; 2] = ["s/a", "s/b"];
/// S1: records per producer and round at most (the crash usually comes first).
const LINES_PER_ROUND: u64 = 160;
/// Request lines per `send_stream` call: small, so the producer notices the crash of each
/// round quickly.
const BATCH: u64 = 32;

// ----- helpers -----

/// ACL: the default device rules, plus the `historian` user reading all telemetry; with
/// `anonymous_read`, anonymous clients (the plain-TCP listener) may read telemetry too.
fn acl(dir: &Path, anonymous_read: bool) -> PathBuf {
    let p = dir.join("acl.conf");
    let anon = if anonymous_read {
        "topic read devices/+/data/#\n"
    } else {
        ""
    };
    std::fs::write(
        &p,
        format!(
            "{anon}{}\nuser historian\nclientid *\ntopic read devices/+/data/#\n",
            bulwark_protocol::acl::DEFAULT_DEVICE_RULES
        ),
    )
    .unwrap();
    p
}

fn broker_config(acl_path: &Path) -> BrokerConfig {
    BrokerConfig {
        wss: false,
        // The test subscriber (debug build, loaded machine) may lag a fast drain: a deep
        // queue so the broker never drops what the agent delivered.
        extra: format!("[auth]\nacl_file = {acl_path:?}\n[limits]\nmax_queued_messages = 1000000\nmax_queued_bytes = 268435456\n"),
        ..BrokerConfig::default()
    }
}

fn agent_config(
    device: &str,
    brokers: &[String],
    ca: &Path,
    cert: &ClientCert,
    dir: &Path,
    queue_extra: &str,
) -> String {
    format!(
        "device_id = {device:?}\n[uplink]\nbrokers = {brokers:?}\nca_file = {ca:?}\ncert_file = {:?}\nkey_file = {:?}\nbackoff_min_ms = 100\nbackoff_max_ms = 1000\n[queue]\npath = {:?}\n{queue_extra}[ingest]\nsocket = {:?}\n",
        cert.cert_path,
        cert.key_path,
        dir.join("queue"),
        dir.join("ingest.sock"),
    )
}

fn wait_ready(agent: &BrokerProcess) {
    agent
        .wait_log(T, |v| v["message"] == "ingest socket ready")
        .unwrap_or_else(|| panic!("agent did not start:\n{}", agent.log_text()));
}

/// A port on 127.0.0.1 nobody listens on.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// One telemetry envelope as the subscriber saw it.
#[derive(Debug, Clone)]
struct Arrival {
    seq: u64,
    series: String,
    payload: Value,
}

#[derive(Default)]
struct Collected {
    arrivals: Vec<Arrival>,
    /// Envelopes that did not parse or came from another device.
    bad: Vec<String>,
    /// The subscriber's connection ended.
    ended: Option<String>,
}

/// Collects every PUBLISH the subscriber receives, for the whole test; `changed` ticks
/// after each one.
struct Collector {
    state: Arc<Mutex<Collected>>,
    changed: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    fn start(mut sub: Client, device: &'static str) -> Collector {
        let state = Arc::new(Mutex::new(Collected::default()));
        let (tx, changed) = watch::channel(0u64);
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let ev = sub.events.recv().await;
                let mut s = st.lock().unwrap();
                match ev {
                    Some(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                        match serde_json::from_slice::<Value>(&p.payload) {
                            Ok(v)
                                if v["device"] == device
                                    && v["seq"].is_u64()
                                    && v["series"].is_string()
                                    && p.topic
                                        == format!(
                                            "devices/{device}/data/{}",
                                            v["series"].as_str().unwrap()
                                        ) =>
                            {
                                s.arrivals.push(Arrival {
                                    seq: v["seq"].as_u64().unwrap(),
                                    series: v["series"].as_str().unwrap().to_string(),
                                    payload: v["payload"].clone(),
                                })
                            }
                            _ => s.bad.push(format!(
                                "{}: {}",
                                p.topic,
                                String::from_utf8_lossy(&p.payload)
                            )),
                        }
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => s.ended = Some(e),
                    None => s.ended = Some("event loop ended".into()),
                }
                let ended = s.ended.is_some();
                drop(s);
                tx.send_modify(|n| *n += 1);
                if ended {
                    return;
                }
            }
        });
        Collector {
            state,
            changed,
            task,
        }
    }

    /// Waits until `cond` holds (checked after every message) or `timeout` passes.
    async fn wait_until(&mut self, timeout: Duration, cond: impl Fn(&Collected) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let s = self.state.lock().unwrap();
                if cond(&s) {
                    return true;
                }
                if s.ended.is_some() {
                    return false;
                }
            }
            match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return cond(&self.state.lock().unwrap()),
            }
        }
    }

    fn snapshot(&self) -> Vec<Arrival> {
        self.state.lock().unwrap().arrivals.clone()
    }

    fn check_healthy(&self) {
        let s = self.state.lock().unwrap();
        assert!(s.bad.is_empty(), "unexpected messages: {:?}", s.bad);
        assert!(s.ended.is_none(), "subscriber lost: {:?}", s.ended);
    }
}

/// What producers were told.
#[derive(Default)]
struct Told {
    /// seq → (series, payload) of every record answered "accepted".
    accepted: BTreeMap<u64, (String, Value)>,
    rejected: Vec<String>,
    /// A sequence number answered twice.
    reused: Vec<String>,
}

/// One producer: sends `lines` records of `series` (payload from `payload(i)`, i from 1) over
/// the ingest socket, pipelined in connections of [`BATCH`] lines, until all are sent or
/// the agent stops answering (killed). Replies received before the break count.
async fn produce(
    socket: PathBuf,
    series: &'static str,
    lines: u64,
    payload: impl Fn(u64) -> Value + Send + Sync + Clone + 'static,
    told: Arc<Mutex<Told>>,
) -> u64 {
    let mut next = 1u64;
    let mut answered = 0u64;
    while next <= lines {
        let end = (next + BATCH - 1).min(lines);
        let mut input = Vec::new();
        for i in next..=end {
            let line = serde_json::json!({ "series": series, "payload": payload(i) });
            writeln!(input, "{line}").unwrap();
        }
        let first = next;
        let told2 = told.clone();
        let pl = payload.clone();
        let result = send_stream(
            &socket,
            std::io::Cursor::new(input),
            move |lineno, reply| {
                let i = first + lineno as u64 - 1;
                let mut t = told2.lock().unwrap();
                match reply {
                    Reply::Accepted { seq } => {
                        if let Some(old) = t.accepted.insert(seq, (series.to_string(), pl(i))) {
                            t.reused
                                .push(format!("seq {seq}: {old:?} then {series} #{i}"));
                        }
                    }
                    Reply::Rejected { error } => t.rejected.push(format!("{series} #{i}: {error}")),
                }
            },
        )
        .await;
        match result {
            Ok(s) => answered += s.accepted as u64 + s.rejected as u64,
            // The agent died (or was never there): stop.
            Err(_) => break,
        }
        next = end + 1;
    }
    answered
}

/// The process's log lines matching `pred`.
fn log_lines(p: &BrokerProcess, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    p.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| pred(v))
        .collect()
}

fn is_corrupt_event(v: &Value) -> bool {
    v["event"] == "queue_corrupt" || v["message"].as_str().is_some_and(|m| m.contains("corrupt"))
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ----- S1 -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_at_every_phase_loses_no_accepted_record() {
    let started = Instant::now();
    let acl_dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(broker_config(&acl(acl_dir.path(), false)));
    let hist = b.pki.client("historian");
    let mut o = options(
        "historian-s1",
        &Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&hist))),
    );
    o.set_clean_session(false);
    let mut sub = Client::connect(o).await.unwrap();
    sub.subscribe("devices/gw-1/data/#", QoS::AtLeastOnce).await;
    let mut collector = Collector::start(sub, "gw-1");

    let dir = tempfile::tempdir().unwrap();
    let cert = b.pki.client("gw-1");
    let config = agent_config(
        "gw-1",
        &[format!("mqtts://localhost:{}", b.addr("tls").port())],
        &b.pki.ca_path,
        &cert,
        dir.path(),
        "",
    );
    let socket = dir.path().join("ingest.sock");
    let told = Arc::new(Mutex::new(Told::default()));
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut reached: BTreeMap<&str, usize> = BTreeMap::new();
    let mut not_reached = Vec::new();
    let mut errors = Vec::new();
    let mut queued_at_open = Vec::new();
    let rounds = ROUNDS_PER_PHASE * PHASES.len();

    for round in 0..rounds {
        let phase = PHASES[round % PHASES.len()];
        let n = 1 + xorshift(&mut rng) % MAX_HIT;
        let spec = format!("{phase}:{n}");
        let mut agent = BrokerProcess::spawn_agent_with_env(
            &config,
            dir.path(),
            &[(bulwark_agent::crash_point::ENV, spec.as_str())],
        );
        wait_ready(&agent);
        let open = agent
            .wait_log(T, |v| v["message"] == "queue open")
            .expect("queue open logged before the socket is ready");
        queued_at_open.push(open["records"].as_u64().unwrap_or(0));
        assert_eq!(
            agent.count_log(is_corrupt_event),
            0,
            "round {round} ({spec}): the store did not reopen cleanly:\n{}",
            agent.log_text()
        );

        let producers: Vec<_> = SERIES
            .iter()
            .map(|&series| {
                let r = round as u64;
                tokio::spawn(produce(
                    socket.clone(),
                    series,
                    LINES_PER_ROUND,
                    move |i| Value::from(r * 10_000 + i),
                    told.clone(),
                ))
            })
            .collect();

        let hit = agent.wait_log(T, |v| {
            v["message"] == "crash point reached" && v["phase"] == phase
        });
        agent.kill9();
        for p in producers {
            tokio::time::timeout(T, p)
                .await
                .unwrap_or_else(|_| {
                    panic!("round {round} ({spec}): a producer hung after the kill")
                })
                .unwrap();
        }
        match hit {
            Some(v) => {
                assert_eq!(v["hit"].as_u64(), Some(n), "{v}");
                *reached.entry(phase).or_default() += 1;
            }
            None => not_reached.push(format!("round {round} ({spec})")),
        }
        errors.extend(
            log_lines(&agent, |v| v["level"] == "ERROR")
                .into_iter()
                .map(|v| format!("round {round} ({spec}): {v}")),
        );
    }

    // Once more without the hook: everything accepted must come out.
    let agent = BrokerProcess::spawn_agent(&config, dir.path());
    wait_ready(&agent);
    assert_eq!(agent.count_log(is_corrupt_event), 0, "{}", agent.log_text());
    let accepted = told.lock().unwrap().accepted.clone();
    let want: BTreeSet<u64> = accepted.keys().copied().collect();
    let drained = collector
        .wait_until(Duration::from_secs(120), |c| {
            let got: BTreeSet<u64> = c.arrivals.iter().map(|a| a.seq).collect();
            want.is_subset(&got)
        })
        .await;
    collector.check_healthy();
    let arrivals = collector.snapshot();
    errors.extend(
        log_lines(&agent, |v| v["level"] == "ERROR")
            .into_iter()
            .map(|v| format!("final run: {v}")),
    );

    // Report.
    let unique: BTreeSet<u64> = arrivals.iter().map(|a| a.seq).collect();
    println!(
        "S1: {rounds} rounds in {:.1} s; crash point reached per phase: {reached:?}; \
         accepted records: {}; delivered: {} ({} distinct, {} duplicates); \
         delivered though never acknowledged to a producer: {}; records queued at each \
         reopen: max {}",
        started.elapsed().as_secs_f64(),
        accepted.len(),
        arrivals.len(),
        unique.len(),
        arrivals.len() - unique.len(),
        unique.difference(&want).count(),
        queued_at_open.iter().max().unwrap_or(&0),
    );

    // The crash point was reached in every round.
    assert!(
        not_reached.is_empty(),
        "crash point not reached in {not_reached:?}"
    );
    for phase in PHASES {
        assert_eq!(
            reached.get(phase).copied().unwrap_or(0),
            ROUNDS_PER_PHASE,
            "{phase}"
        );
    }
    {
        let t = told.lock().unwrap();
        assert!(t.rejected.is_empty(), "rejected: {:?}", t.rejected);
        assert!(
            t.reused.is_empty(),
            "a sequence number was handed out twice: {:?}",
            t.reused
        );
    }
    assert!(
        accepted.len() >= rounds,
        "too few records accepted to mean anything: {}",
        accepted.len()
    );

    // Every accepted record arrived, with its own series and payload.
    let missing: Vec<u64> = want.difference(&unique).copied().collect();
    assert!(
        drained && missing.is_empty(),
        "{} accepted record(s) never arrived, e.g. {:?}; final agent log:\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        agent.log_text()
    );
    let mut first_content: HashMap<u64, &Arrival> = HashMap::new();
    for a in &arrivals {
        if let Some((series, payload)) = accepted.get(&a.seq) {
            assert_eq!(
                (&a.series, &a.payload),
                (series, payload),
                "seq {} arrived with other content than was accepted",
                a.seq
            );
        }
        // A sequence number is never reused for other content, accepted or not.
        let first = first_content.entry(a.seq).or_insert(a);
        assert_eq!(
            (&first.series, &first.payload),
            (&a.series, &a.payload),
            "seq {} delivered with two different contents",
            a.seq
        );
    }
    // In order per series (first arrivals).
    let mut seen = BTreeSet::new();
    let mut last: HashMap<&str, u64> = HashMap::new();
    for a in &arrivals {
        if !seen.insert(a.seq) {
            continue;
        }
        if let Some(prev) = last.insert(a.series.as_str(), a.seq) {
            assert!(
                a.seq > prev,
                "series {}: seq {} first arrived after seq {prev}",
                a.series,
                a.seq
            );
        }
    }
    assert!(errors.is_empty(), "the agent logged errors: {errors:#?}");
}

// ----- S3 -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_budget_drops_oldest_counts_and_recovers() {
    const PRODUCERS: [&str; 3] = ["big/p0", "big/p1", "big/p2"];
    const PER_PRODUCER: u64 = 1000;
    let acl_dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(broker_config(&acl(acl_dir.path(), false)));
    let hist = b.pki.client("historian");
    let mut sub = Client::connect(options(
        "historian-s3",
        &Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&hist))),
    ))
    .await
    .unwrap();
    sub.subscribe("devices/gw-3/data/#", QoS::AtLeastOnce).await;
    let mut collector = Collector::start(sub, "gw-3");

    // The broker is unreachable: everything piles up in a 1 MiB queue.
    let dir = tempfile::tempdir().unwrap();
    let cert = b.pki.client("gw-3");
    let queue = "max_bytes = 1048576\n";
    let offline = agent_config(
        "gw-3",
        &[format!("mqtts://localhost:{}", dead_port())],
        &b.pki.ca_path,
        &cert,
        dir.path(),
        queue,
    );
    let mut agent = BrokerProcess::spawn_agent(&offline, dir.path());
    wait_ready(&agent);
    let told = Arc::new(Mutex::new(Told::default()));
    let pad = "x".repeat(1000);
    let producers: Vec<_> = PRODUCERS
        .iter()
        .map(|&series| {
            let pad = pad.clone();
            tokio::spawn(produce(
                dir.path().join("ingest.sock"),
                series,
                PER_PRODUCER,
                move |i| serde_json::json!({ "i": i, "pad": pad }),
                told.clone(),
            ))
        })
        .collect();
    for p in producers {
        let answered = tokio::time::timeout(Duration::from_secs(120), p)
            .await
            .expect("producer finished")
            .unwrap();
        assert_eq!(answered, PER_PRODUCER);
    }
    let accepted = {
        let t = told.lock().unwrap();
        assert!(
            t.rejected.is_empty(),
            "policy drop-oldest refused: {:?}",
            &t.rejected[..1]
        );
        assert!(t.reused.is_empty(), "{:?}", t.reused);
        t.accepted.clone()
    };
    let total = PRODUCERS.len() * PER_PRODUCER as usize;
    assert_eq!(accepted.len(), total, "every record accepted");
    assert!(
        agent.count_log(|v| v["message"] == "uplink down") > 0,
        "the broker was meant to be unreachable:\n{}",
        agent.log_text()
    );

    // The queue reported what it dropped: the oldest records, counted.
    let drop_lines = log_lines(&agent, |v| {
        v["message"] == "queue disk budget reached: dropped the oldest records"
    });
    assert!(
        !drop_lines.is_empty(),
        "no drop reported:\n{}",
        agent.log_text()
    );
    let mut dropped = BTreeSet::new();
    let mut counted = 0;
    for v in &drop_lines {
        let (first, last) = (
            v["first_seq"].as_u64().unwrap(),
            v["last_seq"].as_u64().unwrap(),
        );
        counted += v["dropped"].as_u64().unwrap();
        assert_eq!(v["max_bytes"].as_u64(), Some(1048576), "{v}");
        dropped.extend(first..=last);
    }
    let total_drops = drop_lines.last().unwrap()["total_drops"].as_u64().unwrap();
    assert_eq!(counted, total_drops, "the drop counter adds up");
    assert_eq!(
        dropped.len() as u64,
        total_drops,
        "drop ranges match the counts"
    );
    let oldest: BTreeSet<u64> = accepted.keys().copied().take(dropped.len()).collect();
    assert_eq!(dropped, oldest, "the oldest records were the ones dropped");
    assert!(
        (total as u64) - total_drops < 1100 && total_drops > 1500,
        "about 1 MiB of ~1 KiB records kept: {total_drops} of {total} dropped"
    );
    let status = agent.terminate();
    assert!(
        status.success(),
        "agent exit {status:?}:\n{}",
        agent.log_text()
    );

    // Back online: the queue reopens with the drop count, and the newest records arrive.
    let online = agent_config(
        "gw-3",
        &[format!("mqtts://localhost:{}", b.addr("tls").port())],
        &b.pki.ca_path,
        &cert,
        dir.path(),
        queue,
    );
    let agent = BrokerProcess::spawn_agent(&online, dir.path());
    wait_ready(&agent);
    let open = agent.wait_log(T, |v| v["message"] == "queue open").unwrap();
    assert_eq!(open["drops"].as_u64(), Some(total_drops), "{open}");
    assert_eq!(
        open["records"].as_u64(),
        Some(total as u64 - total_drops),
        "{open}"
    );
    let kept: BTreeSet<u64> = accepted.keys().copied().skip(dropped.len()).collect();
    let arrived = collector
        .wait_until(Duration::from_secs(60), |c| {
            let got: BTreeSet<u64> = c.arrivals.iter().map(|a| a.seq).collect();
            kept.is_subset(&got)
        })
        .await;
    collector.check_healthy();
    let arrivals = collector.snapshot();
    let unique: BTreeSet<u64> = arrivals.iter().map(|a| a.seq).collect();
    println!(
        "S3: {total} accepted, {total_drops} dropped (oldest, in {} log lines), {} delivered \
         ({} distinct)",
        drop_lines.len(),
        arrivals.len(),
        unique.len()
    );
    assert!(
        arrived,
        "kept records missing: {:?}",
        kept.difference(&unique).take(10).collect::<Vec<_>>()
    );
    assert_eq!(
        unique, kept,
        "exactly the records kept arrive (none dropped comes back)"
    );
    assert_eq!(
        unique.len() as u64 + total_drops,
        total as u64,
        "delivered + dropped = accepted"
    );
    let firsts: Vec<u64> = {
        let mut seen = BTreeSet::new();
        arrivals
            .iter()
            .map(|a| a.seq)
            .filter(|s| seen.insert(*s))
            .collect()
    };
    assert!(firsts.windows(2).all(|w| w[0] < w[1]), "delivered in order");
    for a in &arrivals {
        let (series, payload) = &accepted[&a.seq];
        assert_eq!((&a.series, &a.payload), (series, payload), "seq {}", a.seq);
    }
}

// ----- T1 -----

/// "uplink down" lines of the agent whose error satisfies `pred`.
fn uplink_down(v: &Value, pred: impl Fn(&str) -> bool) -> bool {
    v["message"] == "uplink down" && v["error"].as_str().is_some_and(pred)
}

/// Waits until the agent has logged at least `n` failed attempts, and checks every failed
/// attempt so far failed for the expected reason (`pred` on its error text).
fn wait_failed_attempts(agent: &BrokerProcess, n: usize, pred: impl Fn(&str) -> bool + Copy) {
    let found = agent.wait_log(T, |v| {
        uplink_down(v, pred) && agent.count_log(|v| uplink_down(v, pred)) >= n
    });
    let found = found.unwrap_or_else(|| {
        panic!(
            "fewer than {n} attempts failed as expected:\n{}",
            agent.log_text()
        )
    });
    println!("attempt refused: {}", found["error"]);
    let all = agent.count_log(|v| v["message"] == "uplink down");
    let expected = agent.count_log(|v| uplink_down(v, pred));
    assert_eq!(
        all,
        expected,
        "an attempt failed otherwise:\n{}",
        agent.log_text()
    );
    assert_eq!(
        agent.count_log(|v| v["message"] == "uplink connected"),
        0,
        "{}",
        agent.log_text()
    );
}

/// The publishes a subscriber has received so far (without waiting).
fn received_now(sub: &mut Client) -> usize {
    let mut n = 0;
    while let Ok(ev) = sub.events.try_recv() {
        if matches!(ev, Ok(Event::Incoming(Incoming::Publish(_)))) {
            n += 1;
        }
    }
    n
}

async fn send_one(socket: &Path, series: &str, payload: Value) -> u64 {
    let line = serde_json::json!({ "series": series, "payload": payload }).to_string();
    let replies = bulwark_agent::ingest::send(socket, [line]).await.unwrap();
    match &replies[..] {
        [Reply::Accepted { seq }] => *seq,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_certificate_for_another_host_is_refused() {
    // A broker whose certificate, signed by the agent's own CA, is valid for another host.
    let pki = TestPki::new();
    let other = pki
        .ca
        .issue_server("other.example", &["other.example"])
        .unwrap();
    write_private(&pki.server_key, &other.key_pem);
    std::fs::write(&pki.server_cert, &other.cert_pem).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut cfg = broker_config(&acl(data.path(), true));
    cfg.extra.push_str("[reload]\nwatch_interval_secs = 1\n");
    let broker = BrokerProcess::start(
        &cfg.render(&pki, data.path()),
        data.path(),
        cfg.listener_count(),
    );

    // The subscriber uses the loopback plain-TCP listener (its TLS would fail the same way).
    let mut sub = Client::connect(options("watcher", &Via::Tcp(broker.addr("tcp"))))
        .await
        .unwrap();
    sub.subscribe("devices/gw-1/data/#", QoS::AtLeastOnce).await;

    let dir = tempfile::tempdir().unwrap();
    let cert = pki.client("gw-1");
    let config = agent_config(
        "gw-1",
        &[format!("mqtts://localhost:{}", broker.addr("tls").port())],
        &pki.ca_path,
        &cert,
        dir.path(),
        "",
    );
    let agent = BrokerProcess::spawn_agent(&config, dir.path());
    wait_ready(&agent);
    let seq = send_one(&dir.path().join("ingest.sock"), "t1/x", Value::from(1)).await;

    let name_error = |e: &str| {
        e.contains("not valid for name") && e.contains("localhost") && e.contains("other.example")
    };
    wait_failed_attempts(&agent, 2, name_error);
    broker.wait_audit("tls_handshake_failed", &[]);
    assert_eq!(
        broker.count_log(|v| v["event"] == "connect" && v["client_id"] == "gw-1"),
        0,
        "the broker accepted the agent:\n{}",
        broker.log_text()
    );
    assert_eq!(received_now(&mut sub), 0, "a record got through");

    // Control: the same broker with a certificate for localhost is accepted at once.
    let reloads = broker.count_log(|v| v["event"] == "reload" && v["what"] == "tls");
    pki.rotate_server_cert("bulwark-test-broker");
    broker
        .wait_log(T, |v| {
            v["event"] == "reload"
                && v["what"] == "tls"
                && broker.count_log(|v| v["event"] == "reload" && v["what"] == "tls") > reloads
        })
        .unwrap_or_else(|| panic!("no TLS reload:\n{}", broker.log_text()));
    agent
        .wait_log(T, |v| v["message"] == "uplink connected")
        .unwrap_or_else(|| panic!("{}", agent.log_text()));
    let p = sub
        .next_publish(T)
        .await
        .expect("the record, once the name matches");
    let v: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v["seq"], seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_ca_file_fails_every_attempt() {
    let data = tempfile::tempdir().unwrap();
    let b = TestBroker::start(broker_config(&acl(data.path(), true)));
    let mut sub = Client::connect(options("watcher", &Via::Tcp(b.addr("tcp"))))
        .await
        .unwrap();
    sub.subscribe("devices/gw-1/data/#", QoS::AtLeastOnce).await;
    let cert = b.pki.client("gw-1");
    let broker_url = format!("mqtts://localhost:{}", b.addr("tls").port());

    let variants: [(&str, &[u8], &str); 3] = [
        (
            "binary",
            b"\x00\xff\xfe garbage, not a certificate\n",
            "contains no certificate",
        ),
        (
            "bad base64",
            b"-----BEGIN CERTIFICATE-----\n!!! not base64 !!!\n-----END CERTIFICATE-----\n",
            "not a PEM certificate file",
        ),
        (
            "not DER",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
            "unusable CA certificate",
        ),
    ];
    for (i, (what, garbage, why)) in variants.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, garbage).unwrap();
        let config = agent_config(
            "gw-1",
            std::slice::from_ref(&broker_url),
            &ca,
            &cert,
            dir.path(),
            "",
        );
        let config_path = dir.path().join("agent.toml");
        std::fs::write(&config_path, &config).unwrap();
        let (status, out, err) = run_with_timeout(
            Command::new(bin_path("bulwark-agent"))
                .arg("check-config")
                .arg(&config_path),
            T,
        );
        let status = status.expect("check-config finished");
        let mut agent = BrokerProcess::spawn_agent(&config, dir.path());
        if status.success() {
            // check-config only checks that the CA file exists; `run` reads it on every
            // connection attempt, and every attempt fails, naming the file and the reason.
            assert!(out.contains("OK"), "{out}{err}");
            println!("{what}: check-config accepts the CA file; run fails every attempt");
            wait_ready(&agent);
            let ca_text = ca.display().to_string();
            let pred =
                |e: &str| e.contains("TLS material") && e.contains(&ca_text) && e.contains(why);
            let seq = send_one(&dir.path().join("ingest.sock"), "t1/ca", Value::from(i)).await;
            wait_failed_attempts(&agent, 2, pred);
            assert_eq!(
                b.process
                    .count_log(|v| v["event"] == "connect" && v["client_id"] == "gw-1"),
                0,
                "{what}: {}",
                b.process.log_text()
            );
            assert_eq!(received_now(&mut sub), 0, "{what}: a record got through");
            if i == variants.len() - 1 {
                // Control: the real CA put in place is picked up by the next attempt.
                std::fs::write(&ca, b.pki.ca.cert_pem()).unwrap();
                agent
                    .wait_log(T, |v| v["message"] == "uplink connected")
                    .unwrap_or_else(|| panic!("{}", agent.log_text()));
                let p = sub
                    .next_publish(T)
                    .await
                    .expect("the record, once the CA is good");
                let v: Value = serde_json::from_slice(&p.payload).unwrap();
                assert_eq!(v["seq"], seq);
            }
        } else {
            // check-config refuses the file: `run` must refuse to start the same way.
            assert_eq!(status.code(), Some(64), "{what}: {out}{err}");
            println!("{what}: check-config refuses the CA file: {}", err.trim());
            assert!(err.contains("ca_file"), "{what}: {err}");
            let exit = agent.wait_exit(T).expect("run refused the configuration");
            assert_eq!(exit.code(), Some(64), "{what}: {}", agent.log_text());
        }
        agent.kill9();
    }
}

// ----- the ingest client when the agent dies -----

/// `send_stream` with more than 64 lines to send, against an agent that dies after reading
/// 64 of them without answering: it returns an error instead of waiting forever (its writer
/// once waited for room in the in-flight channel after the reader had stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_stream_returns_when_the_agent_dies_with_64_requests_unanswered() {
    use tokio::io::AsyncBufReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut lines = tokio::io::BufReader::new(stream).lines();
        for _ in 0..64 {
            lines.next_line().await.unwrap().unwrap();
        }
        // The "agent" dies without answering.
    });
    let mut input = Vec::new();
    for i in 0..200 {
        writeln!(input, "{{\"series\":\"a\",\"payload\":{i}}}").unwrap();
    }
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        send_stream(&path, std::io::Cursor::new(input), |_, _| {}),
    )
    .await;
    server.await.unwrap();
    let result = result.expect("send_stream returned after the agent died");
    assert!(result.is_err(), "{result:?}");
}
