//! The edge agent against the real broker: records handed to `bulwark-agent send` arrive
//! as telemetry envelopes on `devices/<id>/data/<series>` over TLS with the device
//! certificate; the broker killed in the middle of the stream (S4) loses nothing; the
//! agent process has no listening TCP or UDP socket while it works.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use bulwark_integration_tests::mqtt::{options, Client, QoS, Via};
use bulwark_integration_tests::{
    bin_path, run_with_timeout, BrokerConfig, BrokerProcess, TestBroker,
};

const T: Duration = Duration::from_secs(20);

struct Agent {
    process: BrokerProcess,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn acl(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("acl.conf");
    std::fs::write(
        &p,
        format!(
            "{}\nuser historian\nclientid *\ntopic read devices/+/data/#\n\nuser ops\nclientid *\ntopic read devices/+/#\ntopic write devices/+/cmd/#\n",
            bulwark_protocol::acl::DEFAULT_DEVICE_RULES
        ),
    )
    .unwrap();
    p
}

fn start_agent(b: &TestBroker, device: &str, brokers: &[String]) -> Agent {
    start_agent_in(tempfile::tempdir().unwrap(), b, device, brokers, "", "")
}

/// Starts an agent whose files live in `dir` (reused across restarts); `uplink_extra` lines
/// go into `[uplink]`, `extra` (whole tables) at the end of the configuration.
fn start_agent_in(
    dir: tempfile::TempDir,
    b: &TestBroker,
    device: &str,
    brokers: &[String],
    uplink_extra: &str,
    extra: &str,
) -> Agent {
    let cert = b.pki.client(device);
    let socket = dir.path().join("ingest.sock");
    let config = format!(
        "device_id = {device:?}\n[uplink]\nbrokers = {brokers:?}\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nbackoff_min_ms = 100\nbackoff_max_ms = 1000\n{uplink_extra}\n[queue]\npath = {:?}\n[ingest]\nsocket = {:?}\n{extra}\n",
        b.pki.ca_path,
        cert.cert_path,
        cert.key_path,
        dir.path().join("queue"),
        socket
    );
    let process = BrokerProcess::spawn_agent(&config, dir.path());
    process
        .wait_log(T, |v| v["message"] == "ingest socket ready")
        .unwrap_or_else(|| panic!("agent did not start:\n{}", process.log_text()));
    Agent {
        process,
        socket,
        _dir: dir,
    }
}

fn send(agent: &Agent, series: &str, json: &str) -> u64 {
    let (status, out, err) = run_with_timeout(
        Command::new(bin_path("bulwark-agent")).args([
            "send",
            "--socket",
            agent.socket.to_str().unwrap(),
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

fn broker_config(acl_path: &std::path::Path) -> BrokerConfig {
    BrokerConfig {
        extra: format!("[auth]\nacl_file = {acl_path:?}\n"),
        ..BrokerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_arrive_as_envelopes_and_the_agent_listens_on_nothing() {
    let acl_dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(broker_config(&acl(acl_dir.path())));
    let hist = b.pki.client("historian");
    let via = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&hist)));
    let mut sub = Client::connect(options("historian-1", &via)).await.unwrap();
    sub.subscribe("devices/+/data/#", QoS::AtLeastOnce).await;

    let agent = start_agent(
        &b,
        "gw-1",
        &[format!("mqtts://localhost:{}", b.addr("tls").port())],
    );
    let s1 = send(&agent, "line1/temp", "21.5");
    let s2 = send(&agent, "line1/pressure", "{\"bar\":2.1}");
    assert!(s2 > s1, "sequence numbers increase");

    let mut got = Vec::new();
    for _ in 0..2 {
        let p = sub.next_publish(T).await.expect("telemetry");
        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        got.push((p.topic.clone(), v));
    }
    assert_eq!(got[0].0, "devices/gw-1/data/line1/temp");
    assert_eq!(got[0].1["device"], "gw-1");
    assert_eq!(got[0].1["seq"], s1);
    assert_eq!(got[0].1["series"], "line1/temp");
    assert_eq!(got[0].1["payload"], 21.5);
    assert_eq!(got[0].1["historical"], false);
    assert_eq!(got[1].0, "devices/gw-1/data/line1/pressure");
    assert_eq!(got[1].1["payload"]["bar"], 2.1);

    // A producer cannot leave its namespace.
    let (status, _, err) = run_with_timeout(
        Command::new(bin_path("bulwark-agent")).args([
            "send",
            "--socket",
            agent.socket.to_str().unwrap(),
            "--series",
            "../gw-2/x",
            "--json",
            "1",
        ]),
        T,
    );
    assert!(!status.unwrap().success());
    assert!(err.contains("'.' or '..'"), "{err}");

    // No listening TCP or UDP socket in the agent process while it is connected and working.
    let own = bulwark_agent::exposure::own_listening_sockets(agent.process.pid()).unwrap();
    assert!(own.is_empty(), "the agent listens on {own:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_stream_loses_nothing() {
    let acl_dir = tempfile::tempdir().unwrap();
    let mut b = TestBroker::start(broker_config(&acl(acl_dir.path())));
    let agent = start_agent(
        &b,
        "gw-2",
        &[format!("mqtts://localhost:{}", b.addr("tls").port())],
    );

    // The historian keeps a persistent session so nothing published while it reconnects
    // is missed.
    let hist = b.pki.client("historian");
    let mk = |b: &TestBroker| {
        let mut o = options(
            "historian-2",
            &Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&hist))),
        );
        o.set_clean_session(false);
        o
    };
    let mut sub = Client::connect(mk(&b)).await.unwrap();
    sub.subscribe("devices/gw-2/data/#", QoS::AtLeastOnce).await;

    let mut sent = BTreeSet::new();
    for i in 0..40 {
        sent.insert(send(&agent, "s/a", &i.to_string()));
    }
    // Crash the broker with records possibly in flight, then keep producing while it is down.
    b.restart(true);
    for i in 40..80 {
        sent.insert(send(&agent, "s/a", &i.to_string()));
    }
    // What the first connection received before the crash is in its event channel.
    let mut seen = BTreeSet::new();
    while let Some(p) = sub.next_publish(Duration::from_millis(200)).await {
        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        seen.insert(v["seq"].as_u64().unwrap());
    }
    let mut sub = Client::connect(mk(&b)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < sent.len() && tokio::time::Instant::now() < deadline {
        if let Some(p) = sub.next_publish(Duration::from_secs(5)).await {
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            seen.insert(v["seq"].as_u64().unwrap());
        }
    }
    let missing: Vec<_> = sent.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "lost {missing:?}; agent log:\n{}",
        agent.process.log_text()
    );
}

fn json(p: &bulwark_integration_tests::mqtt::Publish) -> serde_json::Value {
    serde_json::from_slice(&p.payload)
        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {:?}", p.topic, p.payload))
}

/// Waits for a PUBLISH on `topic` (others are skipped).
async fn next_on(sub: &mut Client, topic: &str) -> bulwark_integration_tests::mqtt::Publish {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match sub.next_publish(left).await {
            Some(p) if p.topic == topic => return p,
            Some(_) => {}
            None => panic!("nothing on {topic} within {T:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_health_and_commands() {
    let acl_dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(broker_config(&acl(acl_dir.path())));
    let ops = b.pki.client("ops");
    let via = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&ops)));
    let mut sub = Client::connect(options("ops-1", &via)).await.unwrap();
    for f in [
        "devices/gw-3/status",
        "devices/gw-3/health",
        "devices/gw-3/cmd-result/#",
    ] {
        sub.subscribe(f, QoS::AtLeastOnce).await;
    }
    // A socket the network can reach, planted on this host: the agent must report it.
    let planted = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let planted_port = planted.local_addr().unwrap().port();

    let brokers = [format!("mqtts://localhost:{}", b.addr("tls").port())];
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_path_buf();
    let mut agent = start_agent_in(
        dir,
        &b,
        "gw-3",
        &brokers,
        "",
        "[health]\ninterval_secs = 3600\n",
    );

    let online = next_on(&mut sub, "devices/gw-3/status").await;
    assert!(online.retain || json(&online)["state"] == "online");
    assert_eq!(json(&online)["state"], "online");

    // A health report at connect, with queue figures, host figures and the planted socket.
    let health = json(&next_on(&mut sub, "devices/gw-3/health").await);
    assert_eq!(health["device"], "gw-3");
    assert!(health["queue"]["records"].is_u64(), "{health}");
    assert_eq!(health["queue"]["drops"], 0);
    assert!(
        health["host"]["mem_total_bytes"].as_u64().unwrap() > 0,
        "{health}"
    );
    assert!(health["host"]["uptime_secs"].is_u64(), "{health}");
    let exposed = health["exposure"]["exposed"].as_array().unwrap();
    assert!(
        exposed.iter().any(|s| s["addr"]
            .as_str()
            .is_some_and(|a| a.ends_with(&format!(":{planted_port}")))),
        "planted port {planted_port} not reported: {health}"
    );
    assert!(
        agent.process.count_log(|v| v["event"] == "host_exposed") >= 1,
        "no host_exposed event at start"
    );

    // ping answers with the request id; health returns the report.
    sub.publish(
        "devices/gw-3/cmd/ping",
        QoS::AtLeastOnce,
        false,
        br#"{"id":"r-1"}"#,
    )
    .await;
    let r = json(&next_on(&mut sub, "devices/gw-3/cmd-result/ping").await);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["id"], "r-1");
    assert_eq!(r["result"]["pong"], true);
    sub.publish("devices/gw-3/cmd/health", QoS::AtLeastOnce, false, b"")
        .await;
    let r = json(&next_on(&mut sub, "devices/gw-3/cmd-result/health").await);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["device"], "gw-3");
    assert!(r["result"]["queue"]["bytes"].is_u64(), "{r}");

    // Anything else is refused, answered and audited.
    sub.publish(
        "devices/gw-3/cmd/reboot",
        QoS::AtLeastOnce,
        false,
        br#"{"id":9}"#,
    )
    .await;
    let r = json(&next_on(&mut sub, "devices/gw-3/cmd-result/reboot").await);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["id"], 9);
    assert!(r["error"].as_str().unwrap().contains("not allowed"), "{r}");
    agent
        .process
        .wait_log(T, |v| {
            v["event"] == "command_refused" && v["command"] == "reboot"
        })
        .expect("command_refused audit event");
    drop(planted);

    // kill -9: the broker publishes the will (retained offline).
    agent.process.kill9();
    let off = json(&next_on(&mut sub, "devices/gw-3/status").await);
    assert_eq!(off["state"], "offline");
    assert_eq!(off["reason"], "connection lost");
    // A new subscriber sees the retained state.
    let mut late = Client::connect(options("ops-2", &via)).await.unwrap();
    late.subscribe("devices/gw-3/status", QoS::AtLeastOnce)
        .await;
    let p = next_on(&mut late, "devices/gw-3/status").await;
    assert!(p.retain);
    assert_eq!(json(&p)["state"], "offline");

    // Back online; a clean stop says offline itself (no will after DISCONNECT).
    let dir = tempfile::TempDir::new_in(dir_path.parent().unwrap()).unwrap();
    let mut agent = start_agent_in(dir, &b, "gw-3", &brokers, "", "");
    assert_eq!(
        json(&next_on(&mut sub, "devices/gw-3/status").await)["state"],
        "online"
    );
    assert!(agent.process.terminate().success());
    let off = json(&next_on(&mut sub, "devices/gw-3/status").await);
    assert_eq!(off["state"], "offline");
    assert_eq!(off["reason"], "agent stopped");
}

/// S2: after an outage the backlog drains at `backlog_drain_per_sec`, marked historical,
/// while new records go out at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_drains_at_its_rate_while_live_data_flows() {
    let acl_dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(broker_config(&acl(acl_dir.path())));
    let hist = b.pki.client("historian");
    let via = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&hist)));
    let mut sub = Client::connect(options("historian-4", &via)).await.unwrap();
    sub.subscribe("devices/gw-4/data/#", QoS::AtLeastOnce).await;

    // No broker reachable: a port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let uplink = "historical_after_secs = 1\nbacklog_drain_per_sec = 20\nmax_inflight = 8\n";
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_path_buf();
    let mut agent = start_agent_in(
        dir,
        &b,
        "gw-4",
        &[format!("mqtts://localhost:{dead_port}")],
        uplink,
        "",
    );
    const BACKLOG: u64 = 60;
    let mut backlog = BTreeSet::new();
    for i in 0..BACKLOG {
        backlog.insert(send(&agent, "s/old", &i.to_string()));
    }
    assert!(agent.process.terminate().success());
    // The backlog must be older than historical_after_secs when the link comes back.
    std::thread::sleep(Duration::from_millis(1500));

    // Same queue, reachable broker.
    let config = std::fs::read_to_string(dir_path.join("agent.toml"))
        .unwrap()
        .replace(
            &format!("mqtts://localhost:{dead_port}"),
            &format!("mqtts://localhost:{}", b.addr("tls").port()),
        );
    let process = BrokerProcess::spawn_agent(&config, &dir_path);
    process
        .wait_log(T, |v| v["message"] == "uplink connected")
        .unwrap_or_else(|| panic!("agent did not connect:\n{}", process.log_text()));
    agent.process = process;
    let live = send(&agent, "s/new", "1");

    let start = std::time::Instant::now();
    let mut live_at = None;
    let mut last_backlog_at = None;
    let mut seen = BTreeSet::new();
    while seen.len() < backlog.len() || live_at.is_none() {
        let p = sub
            .next_publish(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("stalled after {} backlog records", seen.len()));
        let v = json(&p);
        let seq = v["seq"].as_u64().unwrap();
        if seq == live {
            assert_eq!(v["historical"], false);
            live_at.get_or_insert(seen.len());
        } else {
            assert!(backlog.contains(&seq), "unexpected seq {seq}");
            assert_eq!(v["historical"], true, "{v}");
            if seen.insert(seq) {
                last_backlog_at = Some(start.elapsed());
            }
        }
    }
    let elapsed = last_backlog_at.unwrap();
    println!(
        "backlog of {BACKLOG} drained in {elapsed:?} at 20/s; live record arrived after {} backlog records",
        live_at.unwrap()
    );
    // The bucket starts with 8 tokens (the window): the rest goes at 20/s.
    assert!(
        elapsed >= Duration::from_secs_f64((BACKLOG - 8) as f64 / 20.0 * 0.8),
        "backlog drained too fast: {elapsed:?}"
    );
    assert!(
        live_at.unwrap() < (BACKLOG as usize) / 2,
        "the live record waited behind the backlog"
    );
    agent
        .process
        .wait_log(T, |v| v["message"] == "backlog drained")
        .expect("backlog drained log line");
}

/// The built-in sources through the real agent: an exec source's JSON output and a tailed
/// file's lines arrive as envelopes; after a restart the tail resumes where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_tail_sources_publish() {
    let acl_dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(broker_config(&acl(acl_dir.path())));
    let hist = b.pki.client("historian");
    let via = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&hist)));
    let mut sub = Client::connect(options("historian-5", &via)).await.unwrap();
    sub.subscribe("devices/gw-5/data/#", QoS::AtLeastOnce).await;

    let files = tempfile::tempdir().unwrap();
    let tailed = files.path().join("values.jsonl");
    std::fs::write(
        &tailed,
        "{\"series\":\"plc/a\",\"payload\":1}\nnot json\n{\"series\":\"plc/a\",\"payload\":2}\n",
    )
    .unwrap();
    let extra = format!(
        "[[source.exec]]\nseries = \"host/answer\"\ncommand = [\"/bin/echo\", \"{{\\\"v\\\":42}}\"]\ninterval_secs = 3600\n\n[[source.tail]]\npath = {tailed:?}\npoll_interval_ms = 50\n"
    );
    let brokers = [format!("mqtts://localhost:{}", b.addr("tls").port())];
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_path_buf();
    let mut agent = start_agent_in(dir, &b, "gw-5", &brokers, "", &extra);

    let mut tail_values = Vec::new();
    // (seq, payload) of every tailed line delivered before the restart.
    let mut tail_records = Vec::new();
    let mut exec_seen = false;
    while !(exec_seen && tail_values.len() >= 2) {
        let p = sub.next_publish(T).await.unwrap_or_else(|| {
            panic!(
                "missing source records; agent log:\n{}",
                agent.process.log_text()
            )
        });
        let v = json(&p);
        match p.topic.as_str() {
            "devices/gw-5/data/host/answer" => {
                assert_eq!(v["payload"]["v"], 42, "{v}");
                exec_seen = true;
            }
            "devices/gw-5/data/plc/a" => {
                tail_values.push(v["payload"].as_i64().unwrap());
                tail_records.push((v["seq"].clone(), v["payload"].clone()));
            }
            t => panic!("unexpected topic {t}"),
        }
    }
    assert_eq!(tail_values, [1, 2]);

    // Stop, append, start again: only the new line is read from the file. A record the
    // broker had not acknowledged when the agent stopped is sent again from the agent's
    // queue (at least once), with its old sequence number; a line read again from the
    // file would come with a new one.
    assert!(agent.process.terminate().success());
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&tailed)
        .unwrap()
        .write_all(b"{\"series\":\"plc/a\",\"payload\":3}\n")
        .unwrap();
    let config = std::fs::read_to_string(dir_path.join("agent.toml")).unwrap();
    agent.process = BrokerProcess::spawn_agent(&config, &dir_path);
    loop {
        let p = sub.next_publish(T).await.expect("the appended line");
        if p.topic == "devices/gw-5/data/plc/a" {
            let v = json(&p);
            if tail_records.contains(&(v["seq"].clone(), v["payload"].clone())) {
                continue; // redelivered from the queue
            }
            assert_eq!(
                v["payload"],
                3,
                "an old line was read from the file again: {v}\n{}",
                agent.process.log_text()
            );
            break;
        }
    }
}
