//! Figures for the agent's note, not pass/fail gates (speed is checked by `make bench`):
//! records/s accepted through the ingest socket with each durability setting, and records/s
//! drained to the real broker. Run with
//! `cargo test --release -p bulwark-integration-tests --test agent_rates -- --ignored --nocapture`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bulwark_integration_tests::mqtt::{options, Client, QoS, Via};
use bulwark_integration_tests::{BrokerConfig, BrokerProcess, TestBroker};

const T: Duration = Duration::from_secs(60);
const PRODUCERS: usize = 8;
const RECORDS: usize = 40_000;

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

fn config(b: &TestBroker, dir: &std::path::Path, broker: &str, durability: &str) -> String {
    let cert = b.pki.client("gw-r");
    format!(
        "device_id = \"gw-r\"\n[uplink]\nbrokers = [{broker:?}]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nbackoff_min_ms = 100\nbackoff_max_ms = 200\nmax_inflight = 256\nhistorical_after_secs = 3600\n[queue]\npath = {:?}\ndurability = {durability:?}\n[ingest]\nsocket = {:?}\n",
        b.pki.ca_path,
        cert.cert_path,
        cert.key_path,
        dir.join("queue"),
        dir.join("ingest.sock"),
    )
}

/// `PRODUCERS` connections, each sending its share pipelined; returns records/s accepted.
async fn ingest(socket: &std::path::Path) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let socket = socket.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let mut text = String::new();
            for i in 0..RECORDS / PRODUCERS {
                text.push_str(&format!(
                    "{{\"series\":\"p{p}/v\",\"payload\":{{\"i\":{i},\"value\":21.5}}}}\n"
                ));
            }
            let s = bulwark_agent::ingest::send_stream(&socket, text.as_bytes(), |_, _| {})
                .await
                .unwrap();
            assert_eq!(s.accepted, RECORDS / PRODUCERS);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    RECORDS as f64 / start.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn ingest_and_drain_rates() {
    let acl_dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(BrokerConfig {
        extra: format!("[auth]\nacl_file = {:?}\n", acl(acl_dir.path())),
        ..BrokerConfig::default()
    });
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("mqtts://localhost:{}", dead.local_addr().unwrap().port());
    drop(dead);
    let mut rates = Vec::new();
    for durability in ["flush", "fsync"] {
        let dir = tempfile::tempdir().unwrap();
        let agent =
            BrokerProcess::spawn_agent(&config(&b, dir.path(), &dead_url, durability), dir.path());
        agent
            .wait_log(T, |v| v["message"] == "ingest socket ready")
            .unwrap();
        rates.push((durability, ingest(&dir.path().join("ingest.sock")).await));
        if durability == "fsync" {
            continue;
        }
        // Drain the flush queue to the broker.
        drop(agent);
        let hist = b.pki.client("historian");
        let via = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&hist)));
        let mut sub = Client::connect(options("historian-r", &via)).await.unwrap();
        sub.subscribe("devices/gw-r/data/#", QoS::AtLeastOnce).await;
        let url = format!("mqtts://localhost:{}", b.addr("tls").port());
        let start = Instant::now();
        let _agent =
            BrokerProcess::spawn_agent(&config(&b, dir.path(), &url, durability), dir.path());
        let mut seen = HashSet::new();
        while seen.len() < RECORDS {
            let p = sub.next_publish(T).await.expect("drain stalled");
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            seen.insert(v["seq"].as_u64().unwrap());
        }
        let drain = RECORDS as f64 / start.elapsed().as_secs_f64();
        rates.push(("drain to broker (incl. agent start)", drain));
    }
    for (what, r) in rates {
        println!("{what}: {r:.0} records/s ({RECORDS} records, {PRODUCERS} producers)");
    }
}
