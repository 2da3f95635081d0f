//! The Prometheus endpoint (`[metrics]`) of the real broker binary:
//!
//! - a scrape reports the connections, messages and bytes a client caused, its
//!   subscription and queue figures, and the audit counters of a client refused at the TLS
//!   handshake (certificate from another CA) and of a refused CONNECT;
//! - only `GET /metrics` is served (404 elsewhere, 405 for other methods), one request per
//!   connection; at most 8 connections at once, and a silent one is cut off after 5 s;
//! - the endpoint is off by default; on a listener's port, 8883, 443 or a network address
//!   without `allow_on_network` the configuration is refused (exit 64, naming
//!   `metrics.bind`), and a network address with the opt-out is served with a warning.
//!
//! Tests synchronise on log lines and scrapes (polled until the figures arrive: the audit
//! line can be written a moment before its counter moves), never on sleeps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bulwark_integration_tests::mqtt::{options, Client, QoS, Via};
use bulwark_integration_tests::{
    bin_path, connect_bytes, metrics_addr, run_with_timeout, BrokerConfig, BrokerProcess,
    RawClient, TestBroker, TestPki, METRICS_ON,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(15);

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// Sends `request` as is and reads the response to the end (the server closes).
async fn http(addr: SocketAddr, request: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("the endpoint closes after its response")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let (headers, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head: {text:?}"));
    let status = headers
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {headers:?}"));
    Reply {
        status,
        headers: headers.to_string(),
        body: body.to_string(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n"),
    )
    .await
}

/// Samples of a scrape by series (`name` or `name{labels}`).
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l:?}"));
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200, "{}\n{}", r.headers, r.body);
    samples(&r.body)
}

fn audit(event: &str) -> String {
    format!("bulwark_audit_events_total{{event=\"{event}\"}}")
}

fn val(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

/// Scrapes until every `(series, at least)` holds; panics with the last scrape after `T`.
async fn scrape_until(addr: SocketAddr, want: &[(String, f64)]) -> HashMap<String, f64> {
    let deadline = Instant::now() + T;
    loop {
        let m = scrape(addr).await;
        let missing: Vec<_> = want
            .iter()
            .filter(|(s, min)| val(&m, s) < *min)
            .map(|(s, min)| format!("{s} = {} (want >= {min})", val(&m, s)))
            .collect();
        if missing.is_empty() {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "figures did not arrive: {missing:?}\nlast scrape: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_reports_traffic_and_audit_counters() {
    let b = TestBroker::start(BrokerConfig {
        extra: METRICS_ON.into(),
        ..BrokerConfig::default()
    });
    let addr = metrics_addr(&b.process);
    assert!(addr.ip().is_loopback(), "{addr}");

    let first = get(addr, "/metrics").await;
    assert_eq!(first.status, 200);
    let lower = first.headers.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: text/plain; version=0.0.4"),
        "{}",
        first.headers
    );
    assert!(lower.contains("connection: close"), "{}", first.headers);
    for family in [
        "# TYPE bulwark_connections_total counter",
        "# TYPE bulwark_clients_connected gauge",
        "# TYPE bulwark_messages_received_total counter",
        "# TYPE bulwark_bytes_sent_total counter",
        "# TYPE bulwark_queued_messages gauge",
        "# TYPE bulwark_sessions_persistent gauge",
        "# TYPE bulwark_audit_events_total counter",
        "# HELP bulwark_connections_total ",
    ] {
        assert!(
            first.body.lines().any(|l| l.starts_with(family)),
            "missing {family:?}:\n{}",
            first.body
        );
    }
    let before = samples(&first.body);
    for s in [
        "bulwark_connections_total",
        "bulwark_messages_received_total",
    ] {
        assert_eq!(val(&before, s), 0.0, "{s} before any client");
    }

    // A subscriber and a publisher: 5 messages in, 5 out, over 100 bytes each way.
    let via = Via::Tcp(b.addr("tcp"));
    let mut sub = Client::connect(options("metrics-sub", &via)).await.unwrap();
    sub.subscribe("m/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(options("metrics-pub", &via)).await.unwrap();
    for i in 0..5 {
        publisher
            .publish("m/x", QoS::AtLeastOnce, false, &[i; 100])
            .await;
    }
    for _ in 0..5 {
        sub.next_publish(T).await.expect("message delivered");
    }

    // Refused at the TLS handshake: a certificate from another CA.
    let other = TestPki::new();
    let stranger = other.client("stranger");
    let tls = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&stranger)));
    assert!(Client::connect(options("stranger", &tls)).await.is_err());
    b.process.wait_audit("tls_handshake_failed", &[]);

    // Refused at CONNECT: keepalive 0 is not allowed by default.
    let mut raw = RawClient::connect(b.addr("tcp"));
    let mut connect = connect_bytes("ka0");
    connect[10] = 0;
    connect[11] = 0;
    raw.send(&connect).unwrap();
    assert_eq!(raw.read_exact(4, T).unwrap(), [0x20, 2, 0, 2]);
    b.process
        .wait_audit("connect_refused", &[("client_id", "ka0")]);

    let m = scrape_until(
        addr,
        &[
            ("bulwark_clients_connected".into(), 2.0),
            ("bulwark_connections_total".into(), 2.0),
            ("bulwark_connections_refused_total".into(), 1.0),
            ("bulwark_messages_received_total".into(), 5.0),
            ("bulwark_messages_sent_total".into(), 5.0),
            ("bulwark_bytes_received_total".into(), 500.0),
            ("bulwark_bytes_sent_total".into(), 500.0),
            ("bulwark_subscriptions".into(), 1.0),
            ("bulwark_sessions".into(), 2.0),
            (audit("connect"), 2.0),
            (audit("tls_handshake_failed"), 1.0),
            (audit("connect_refused"), 1.0),
        ],
    )
    .await;
    for s in [
        "bulwark_uptime_seconds",
        "bulwark_queued_messages",
        "bulwark_queued_bytes",
        "bulwark_queue_depth_max",
        "bulwark_sessions_persistent",
        "bulwark_retained_messages",
        "bulwark_retained_bytes",
        "bulwark_messages_dropped_total",
    ] {
        assert!(m.contains_key(s), "{s} missing: {m:?}");
    }
    assert!(
        m.keys()
            .any(|k| k.starts_with("bulwark_build_info{version=")),
        "{m:?}"
    );
    assert!(
        !m.contains_key("bulwark_tunnel_sessions"),
        "no relay, no tunnel figure"
    );

    sub.disconnect().await;
    publisher.disconnect().await;
    scrape_until(addr, &[(audit("disconnect"), 2.0)]).await;
    let m = scrape(addr).await;
    assert_eq!(val(&m, "bulwark_clients_connected"), 0.0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_get_metrics_is_served() {
    let b = TestBroker::start(BrokerConfig {
        extra: METRICS_ON.into(),
        ..BrokerConfig::default()
    });
    let addr = metrics_addr(&b.process);
    for path in ["/", "/metrics/", "/metricsx", "/mqtt", "/tunnel/v1"] {
        let r = get(addr, path).await;
        assert_eq!(r.status, 404, "{path}: {}", r.headers);
        assert!(!r.body.contains("bulwark_"), "{path}: {}", r.body);
    }
    assert_eq!(get(addr, "/metrics?name[]=x").await.status, 200);
    for method in ["POST", "PUT", "DELETE", "HEAD"] {
        let r = http(
            addr,
            &format!("{method} /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 405, "{method}");
        assert!(r.headers.contains("Allow: GET"), "{}", r.headers);
    }
    assert_eq!(http(addr, "garbage\r\n\r\n").await.status, 400);
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Fill: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(http(addr, &huge).await.status, 431);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_and_silent_ones_cut_off() {
    let b = TestBroker::start(BrokerConfig {
        extra: METRICS_ON.into(),
        ..BrokerConfig::default()
    });
    let addr = metrics_addr(&b.process);
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let opened = Instant::now();
    // The ninth is closed at accept, without an answer.
    let mut ninth = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(T, ninth.read_to_end(&mut buf))
        .await
        .expect("ninth connection closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf));
    assert!(opened.elapsed() < Duration::from_secs(4), "closed at once");
    // The silent ones are cut off after 5 s, without an answer.
    for mut s in idle {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(T, s.read_to_end(&mut buf))
            .await
            .expect("silent connection cut off");
        assert!(r.is_err() || buf.is_empty(), "{buf:?}");
    }
    let waited = opened.elapsed();
    assert!(
        (Duration::from_millis(4500)..Duration::from_secs(12)).contains(&waited),
        "cut off after {waited:?}, expected about 5 s"
    );
    // Then scrapes are served again.
    scrape(addr).await;
}

#[test]
fn metrics_are_off_by_default_and_a_network_address_is_an_explicit_opt_out() {
    let b = TestBroker::start(BrokerConfig::default());
    assert_eq!(
        b.process.count_log(|v| v["message"] == "serving metrics"),
        0
    );
    drop(b);
    let b = TestBroker::start(BrokerConfig {
        extra: "[metrics]\nenabled = true\nbind = \"0.0.0.0:0\"\nallow_on_network = true\n".into(),
        ..BrokerConfig::default()
    });
    let addr = metrics_addr(&b.process);
    assert!(addr.ip().is_unspecified(), "{addr}");
    b.process
        .wait_log(T, |v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("allow_on_network"))
        })
        .unwrap_or_else(|| panic!("no warning; log:\n{}", b.process.log_text()));
}

fn check_config(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, config).unwrap();
    let (status, out, err) = run_with_timeout(
        Command::new(bin_path("bulwark-broker"))
            .arg("check-config")
            .arg(&path),
        Duration::from_secs(10),
    );
    (status.unwrap().code().unwrap(), format!("{out}{err}"))
}

#[test]
fn metrics_never_share_a_port_and_stay_on_loopback_unless_opted_out() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().unwrap();
    let cfg = BrokerConfig {
        ports: HashMap::from([("tls", 18883), ("wss", 18443), ("tcp", 11883)]),
        ..BrokerConfig::default()
    };
    let base = cfg.render(&pki, data.path());
    let with = |metrics: &str| format!("{base}[metrics]\nenabled = true\n{metrics}");

    let (code, out) = check_config(&with("bind = \"127.0.0.1:9184\"\n"));
    assert_eq!(code, 0, "{out}");

    for (bind, listener) in [
        ("127.0.0.1:11883", "tcp"),
        ("127.0.0.2:18883", "tls"),
        ("[::1]:18443", "wss"),
    ] {
        let (code, out) = check_config(&with(&format!("bind = \"{bind}\"\n")));
        assert_eq!(code, 64, "{bind}: {out}");
        assert!(
            out.contains("metrics.bind") && out.contains(&format!("({listener})")),
            "{bind}: {out}"
        );
    }
    for port in [8883, 443] {
        let (code, out) = check_config(&with(&format!(
            "bind = \"127.0.0.1:{port}\"\nallow_on_network = true\n"
        )));
        assert_eq!(code, 64, "{port}: {out}");
        assert!(
            out.contains("metrics.bind")
                && out.contains("metrics must never share the public ports"),
            "{port}: {out}"
        );
    }
    let (code, out) = check_config(&with("bind = \"0.0.0.0:9184\"\n"));
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("metrics.bind") && out.contains("allow_on_network"),
        "{out}"
    );
    let (code, out) = check_config(&with("bind = \"0.0.0.0:9184\"\nallow_on_network = true\n"));
    assert_eq!(code, 0, "{out}");
    // Disabled, the address is not in force and not checked.
    let (code, out) = check_config(&format!(
        "{base}[metrics]\nenabled = false\nbind = \"0.0.0.0:11883\"\n"
    ));
    assert_eq!(code, 0, "{out}");

    // `run` refuses the same configuration before binding anything.
    let mut p = BrokerProcess::spawn(&with("bind = \"0.0.0.0:9184\"\n"), data.path());
    let status = p.wait_exit(T).expect("broker exits");
    assert_eq!(status.code(), Some(64), "{}", p.log_text());
    assert_eq!(p.count_log(|v| v["message"] == "listening"), 0);
}
