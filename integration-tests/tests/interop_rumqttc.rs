//! rumqttc against the real broker binary: QoS 0/1/2, retained messages, wills, persistent
//! sessions across restarts (SIGTERM and kill -9), over TLS with and without client
//! certificates and over secure WebSocket.

use std::time::Duration;

use bulwark_integration_tests::mqtt::{options, Client, LastWill, QoS, Via};
use bulwark_integration_tests::{BrokerConfig, TestBroker};

const T: Duration = Duration::from_secs(10);

fn tls(b: &TestBroker, cn: &str) -> Via {
    let c = b.pki.client(cn);
    Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&c)))
}

fn wss(b: &TestBroker, cn: &str) -> Via {
    let c = b.pki.client(cn);
    Via::Wss(b.addr("wss"), b.pki.rustls_client_config(Some(&c)))
}

async fn connect(id: &str, via: &Via) -> Client {
    Client::connect(options(id, via)).await.unwrap()
}

async fn qos_roundtrip(b: &TestBroker, sub_via: Via, pub_via: Via) {
    let mut sub = connect("sub", &sub_via).await;
    sub.subscribe("plant/#", QoS::ExactlyOnce).await;
    let mut publ = connect("pub", &pub_via).await;
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        publ.publish(
            &format!("plant/line1/m{i}"),
            qos,
            false,
            format!("v{i}").as_bytes(),
        )
        .await;
    }
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        let p = sub.next_publish(T).await.expect("delivery");
        assert_eq!(p.topic, format!("plant/line1/m{i}"));
        assert_eq!(&p.payload[..], format!("v{i}").as_bytes());
        assert_eq!(
            p.qos, qos,
            "delivered at the publish QoS (subscription is QoS 2)"
        );
        assert!(!p.retain);
    }
    publ.disconnect().await;
    sub.disconnect().await;
    let _ = b;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_qos_0_1_2() {
    let b = TestBroker::start(BrokerConfig::default());
    qos_roundtrip(&b, tls(&b, "app-sub"), tls(&b, "app-pub")).await;
    // The broker saw the certificate identities.
    b.process.wait_audit("connect", &[("identity", "app-sub")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_websocket_qos_0_1_2_and_mixed_transports() {
    let b = TestBroker::start(BrokerConfig::default());
    qos_roundtrip(&b, wss(&b, "ws-sub"), wss(&b, "ws-pub")).await;
    // A WebSocket subscriber receives what a TLS publisher sends.
    qos_roundtrip(&b, wss(&b, "ws-sub2"), tls(&b, "tls-pub")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_client_certificate() {
    // Optional certificates plus anonymous access (loopback): a client with no certificate
    // gets in; on a `required` listener it cannot even finish the handshake.
    let b = TestBroker::start(BrokerConfig {
        client_certificates: "optional",
        tls_anonymous: true,
        ..BrokerConfig::default()
    });
    let anon = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(None));
    qos_roundtrip(&b, anon.clone(), tls(&b, "with-cert")).await;

    let strict = TestBroker::start(BrokerConfig::default());
    let anon = Via::Tls(strict.addr("tls"), strict.pki.rustls_client_config(None));
    let err = Client::connect(options("anon", &anon))
        .await
        .err()
        .expect("refused");
    assert!(!err.is_empty());
    strict.process.wait_audit("tls_handshake_failed", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_set_replace_clear() {
    let b = TestBroker::start(BrokerConfig::default());
    let mut p = connect("pub", &tls(&b, "app")).await;
    p.publish("cfg/a", QoS::AtLeastOnce, true, b"one").await;
    p.publish("cfg/a", QoS::AtLeastOnce, true, b"two").await;
    p.publish("cfg/b", QoS::AtMostOnce, true, b"bee").await;
    // QoS 0 has no acknowledgement: a QoS 1 publish after it orders it.
    p.publish("cfg/sync", QoS::AtLeastOnce, false, b"").await;

    let mut s = connect("s1", &tls(&b, "app")).await;
    s.subscribe("cfg/+", QoS::AtLeastOnce).await;
    let mut got = vec![];
    for _ in 0..2 {
        let m = s.next_publish(T).await.expect("retained delivery");
        assert!(
            m.retain,
            "retained messages carry the retain flag on subscribe"
        );
        got.push((m.topic.clone(), m.payload.to_vec()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("cfg/a".into(), b"two".to_vec()),
            ("cfg/b".into(), b"bee".to_vec())
        ]
    );
    // A live publish to a subscribed topic is delivered with retain = 0.
    p.publish("cfg/a", QoS::AtLeastOnce, true, b"three").await;
    let m = s.next_publish(T).await.unwrap();
    assert_eq!(&m.payload[..], b"three");
    assert!(!m.retain);
    // Clear with an empty payload.
    p.publish("cfg/a", QoS::AtLeastOnce, true, b"").await;
    let m = s.next_publish(T).await.unwrap();
    assert!(m.payload.is_empty());
    s.disconnect().await;

    let mut s2 = connect("s2", &tls(&b, "app")).await;
    s2.subscribe("cfg/a", QoS::AtLeastOnce).await;
    p.publish("cfg/a-marker", QoS::AtLeastOnce, false, b"")
        .await;
    s2.subscribe("cfg/a-marker", QoS::AtLeastOnce).await;
    p.publish("cfg/a-marker", QoS::AtLeastOnce, false, b"m")
        .await;
    let m = s2.next_publish(T).await.unwrap();
    assert_eq!(
        m.topic, "cfg/a-marker",
        "cleared retained message must not be delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_on_abnormal_end_only() {
    let b = TestBroker::start(BrokerConfig::default());
    let mut watcher = connect("watcher", &tls(&b, "ops")).await;
    watcher.subscribe("status/#", QoS::AtLeastOnce).await;

    // Clean DISCONNECT: no will.
    let mut o = options("polite", &tls(&b, "polite"));
    o.set_last_will(LastWill::new(
        "status/polite",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let polite = Client::connect(o).await.unwrap();
    polite.disconnect().await;

    // Connection dropped without DISCONNECT: the will is published.
    let mut o = options("crashy", &tls(&b, "crashy"));
    o.set_last_will(LastWill::new(
        "status/crashy",
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    let crashy = Client::connect(o).await.unwrap();
    crashy.drop_connection();

    let m = watcher.next_publish(T).await.expect("will");
    assert_eq!(
        m.topic, "status/crashy",
        "only the abnormal end publishes a will"
    );
    assert_eq!(&m.payload[..], b"offline");
    // A retained will is retained.
    let mut late = connect("late", &tls(&b, "ops2")).await;
    late.subscribe("status/crashy", QoS::AtLeastOnce).await;
    let m = late.next_publish(T).await.expect("retained will");
    assert!(m.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_on_keepalive_timeout() {
    let b = TestBroker::start(BrokerConfig::default());
    let mut watcher = connect("watcher", &tls(&b, "ops")).await;
    watcher.subscribe("status/#", QoS::AtLeastOnce).await;
    // A raw client with keepalive 1 s that then goes silent (no PINGREQ).
    let mut raw = bulwark_integration_tests::RawClient::connect(b.addr("tcp"));
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0b0000_0110, 0, 1];
    for s in ["silent", "status/silent", "timeout"] {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend(body);
    raw.send(&pkt).unwrap();
    assert_eq!(raw.read_exact(4, T).unwrap(), vec![0x20, 2, 0, 0]);
    let started = std::time::Instant::now();
    let m = watcher
        .next_publish(T)
        .await
        .expect("will after keepalive timeout");
    assert_eq!(m.topic, "status/silent");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "1.5 x keepalive"
    );
    b.process
        .wait_audit("disconnect", &[("reason", "keepalive_timeout")]);
}

async fn persistent_session_survives_restart(kill9: bool) {
    let mut b = TestBroker::start(BrokerConfig::default());
    let sub_cert = b.pki.client("historian");
    let via = |b: &TestBroker| Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&sub_cert)));
    let persistent = |v: &Via| {
        let mut o = options("historian", v);
        o.set_clean_session(false);
        o
    };
    let mut s = Client::connect(persistent(&via(&b))).await.unwrap();
    assert!(!s.session_present);
    s.subscribe("line/#", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut p = connect("pub", &tls(&b, "plc")).await;
    for i in 0..5 {
        p.publish(
            &format!("line/{i}"),
            QoS::AtLeastOnce,
            false,
            format!("{i}").as_bytes(),
        )
        .await;
    }
    p.publish("line/r", QoS::AtLeastOnce, true, b"kept").await;
    p.disconnect().await;

    b.restart(kill9);

    let mut s = Client::connect(persistent(&via(&b))).await.unwrap();
    assert!(s.session_present, "the session survived the restart");
    let mut got = vec![];
    for _ in 0..6 {
        let m = s
            .next_publish(T)
            .await
            .expect("queued message after restart");
        got.push(m.topic.clone());
    }
    let expected: Vec<String> = (0..5)
        .map(|i| format!("line/{i}"))
        .chain(["line/r".to_string()])
        .collect();
    assert_eq!(got, expected, "queued in order, nothing lost");
    // The subscription itself survived too.
    let mut p = connect("pub2", &tls(&b, "plc")).await;
    p.publish("line/after", QoS::AtLeastOnce, false, b"x").await;
    assert_eq!(s.next_publish(T).await.unwrap().topic, "line/after");
    // And the retained message.
    let mut r = connect("reader", &tls(&b, "reader")).await;
    r.subscribe("line/r", QoS::AtMostOnce).await;
    assert_eq!(&r.next_publish(T).await.unwrap().payload[..], b"kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_survives_graceful_restart() {
    persistent_session_survives_restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_survives_kill9_with_sync_durability() {
    persistent_session_survives_restart(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_by_same_client_id() {
    let b = TestBroker::start(BrokerConfig::default());
    let v = tls(&b, "dev-1");
    let mut first = connect("dev-1", &v).await;
    let _second = connect("dev-1", &v).await;
    // The first connection is closed by the broker.
    let closed = tokio::time::timeout(T, async {
        loop {
            match first.events.recv().await {
                Some(Err(_)) | None => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "old connection must be closed on takeover");
    b.process
        .wait_audit("disconnect", &[("reason", "session_taken_over")]);
}
