//! Persistence through real processes and real sled files: nothing acknowledged is lost to
//! kill -9 with `sync` durability (many publishers sharing flushes), `periodic` durability
//! keeps state across a graceful restart, a corrupt store is moved aside, a locked store
//! or an unknown format version stops start-up without touching the store.

use std::time::Duration;

use bulwark_integration_tests::mqtt::{options, Client, QoS, Via};
use bulwark_integration_tests::{BrokerConfig, BrokerProcess, TestBroker};

const T: Duration = Duration::from_secs(15);

async fn retained_topics(addr: std::net::SocketAddr, filter: &str, expect: usize) -> Vec<String> {
    let mut c = Client::connect(options("reader", &Via::Tcp(addr)))
        .await
        .unwrap();
    c.subscribe(filter, QoS::AtLeastOnce).await;
    let mut got = Vec::new();
    while got.len() < expect {
        match c.next_publish(Duration::from_secs(5)).await {
            Some(p) => {
                assert!(p.retain);
                got.push(p.topic.clone());
            }
            None => break,
        }
    }
    got.sort();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_nothing_acknowledged_with_sync_durability() {
    let mut b = TestBroker::start(BrokerConfig::default());
    let addr = b.addr("tcp");
    // An offline persistent subscriber, so every message is also queued on disk.
    let mut o = options("hist", &Via::Tcp(addr));
    o.set_clean_session(false);
    let s = Client::connect(o.clone()).await.unwrap();
    let mut s = s;
    s.subscribe("plant/#", QoS::AtLeastOnce).await;
    s.disconnect().await;

    // Four publishers at once: their PUBACKs share flushes (group commit).
    let per = 50;
    let mut tasks = Vec::new();
    for p in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(options(&format!("plc{p}"), &Via::Tcp(addr)))
                .await
                .unwrap();
            for i in 0..per {
                c.publish(&format!("plant/p{p}/{i:03}"), QoS::AtLeastOnce, true, b"v")
                    .await;
            }
            c.drop_connection();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every PUBACK has been received: crash now.
    b.restart(true);
    let addr = b.addr("tcp");
    let got = retained_topics(addr, "plant/#", 4 * per).await;
    assert_eq!(
        got.len(),
        4 * per,
        "every acknowledged retained message survived kill -9"
    );

    let mut o = options("hist", &Via::Tcp(addr));
    o.set_clean_session(false);
    let mut s = Client::connect(o).await.unwrap();
    assert!(s.session_present);
    let mut n = 0;
    while s.next_publish(Duration::from_secs(5)).await.is_some() {
        n += 1;
        if n == 4 * per {
            break;
        }
    }
    // The queue is bounded by limits.max_queued_messages (1000 by default): all 200 fit.
    assert_eq!(
        n,
        4 * per,
        "every acknowledged queued message survived kill -9"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_durability_survives_graceful_restart() {
    let mut b = TestBroker::start(BrokerConfig {
        durability: "periodic",
        ..BrokerConfig::default()
    });
    let mut c = Client::connect(options("p", &Via::Tcp(b.addr("tcp"))))
        .await
        .unwrap();
    for i in 0..10 {
        c.publish(&format!("cfg/{i}"), QoS::AtLeastOnce, true, b"x")
            .await;
    }
    c.disconnect().await;
    b.restart(false);
    assert_eq!(retained_topics(b.addr("tcp"), "cfg/#", 10).await.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_disabled_keeps_nothing() {
    let mut b = TestBroker::start(BrokerConfig {
        persistence: false,
        ..BrokerConfig::default()
    });
    let mut c = Client::connect(options("p", &Via::Tcp(b.addr("tcp"))))
        .await
        .unwrap();
    c.publish("cfg/a", QoS::AtLeastOnce, true, b"x").await;
    c.disconnect().await;
    b.restart(false);
    assert!(retained_topics(b.addr("tcp"), "cfg/#", 1).await.is_empty());
    assert!(!b.data.path().join("store").exists(), "no store is created");
}

#[test]
fn locked_store_stops_second_broker_and_is_not_moved() {
    let b = TestBroker::start(BrokerConfig::default());
    // A second broker, other ports, same store directory.
    let text = BrokerConfig::default().render(&b.pki, b.data.path());
    let dir2 = tempfile::tempdir().unwrap();
    let mut second = BrokerProcess::spawn(&text, dir2.path());
    let status = second.wait_exit(T).expect("second broker must exit");
    assert_eq!(status.code(), Some(1));
    let log = second.log_text();
    assert!(log.contains("locked by another running broker"), "{log}");
    assert!(
        log.contains(&b.data.path().join("store").display().to_string()),
        "{log}"
    );
    let names: Vec<String> = std::fs::read_dir(b.data.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("corrupt")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_store_is_moved_aside_and_broker_starts_empty() {
    let mut b = TestBroker::start(BrokerConfig::default());
    let mut c = Client::connect(options("p", &Via::Tcp(b.addr("tcp"))))
        .await
        .unwrap();
    c.publish("cfg/a", QoS::AtLeastOnce, true, b"x").await;
    c.disconnect().await;
    b.process.terminate();
    // Overwrite the store's data files with garbage.
    let store = b.data.path().join("store");
    for entry in std::fs::read_dir(&store).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() && p.file_name().unwrap() != "conf" {
            std::fs::write(&p, vec![0xa5u8; 4096]).unwrap();
        }
    }
    let text = b.config.render(&b.pki, b.data.path());
    let p = BrokerProcess::start(&text, b.data.path(), b.config.listener_count());
    let ev = p.wait_audit("store_corrupt", &[]);
    assert!(
        ev["moved_to"].as_str().unwrap().contains("store.corrupt-"),
        "{ev}"
    );
    let moved = std::fs::read_dir(b.data.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("store.corrupt-")
        })
        .count();
    assert_eq!(
        moved, 1,
        "the corrupt store is kept for inspection, not wiped"
    );
    // And it serves.
    let mut c = Client::connect(options("p2", &Via::Tcp(p.addr("tcp"))))
        .await
        .unwrap();
    c.subscribe("x", QoS::AtMostOnce).await;
}

#[test]
fn unknown_format_version_stops_startup_with_exit_64() {
    let b = TestBroker::start(BrokerConfig::default());
    drop(b.process);
    let store = b.data.path().join("store");
    {
        let db = sled::open(&store).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format_version", &7u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let text = b.config.render(&b.pki, b.data.path());
    let mut p = BrokerProcess::spawn(&text, b.data.path());
    let status = p.wait_exit(T).expect("must exit");
    assert_eq!(status.code(), Some(64));
    let log = p.log_text();
    assert!(log.contains("format version 7"), "{log}");
    assert!(store.exists(), "the store is left where it is");
}
