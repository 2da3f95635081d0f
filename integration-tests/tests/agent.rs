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
            "{}\nuser historian\nclientid *\ntopic read devices/+/data/#\n",
            bulwark_protocol::acl::DEFAULT_DEVICE_RULES
        ),
    )
    .unwrap();
    p
}

fn start_agent(b: &TestBroker, device: &str, brokers: &[String]) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let cert = b.pki.client(device);
    let socket = dir.path().join("ingest.sock");
    let config = format!(
        "device_id = {device:?}\n[uplink]\nbrokers = {brokers:?}\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nbackoff_min_ms = 100\nbackoff_max_ms = 1000\n[queue]\npath = {:?}\n[ingest]\nsocket = {:?}\n",
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
