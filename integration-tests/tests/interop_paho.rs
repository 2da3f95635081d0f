//! Eclipse paho-mqtt 2.x (Python) against the real broker binary, over TLS with client
//! certificates, over secure WebSocket (path /mqtt) and over TLS without a client
//! certificate. The scenarios live in `integration-tests/paho/interop.py`; each run prints
//! one JSON line and exits 0 only on success.

use std::process::Command;
use std::time::Duration;

use bulwark_integration_tests::{
    require_program, run_with_timeout, workspace_root, BrokerConfig, ClientCert, TestBroker,
};

const PIP_HINT: &str = "pip install 'paho-mqtt>=2,<3'";

fn require_paho() {
    require_program("python3", "apt-get install python3");
    let (status, out, err) = run_with_timeout(
        Command::new("python3").args(["-c", "import paho.mqtt.client"]),
        Duration::from_secs(20),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the Python paho-mqtt client is not installed: {PIP_HINT}\n{out}{err}"
    );
}

/// Where the script connects: listener name, paho transport, client certificate.
#[derive(Clone, Copy)]
struct Target<'a> {
    listener: &'static str,
    transport: &'static str,
    cert: Option<&'a ClientCert>,
}

fn tls(cert: &ClientCert) -> Target<'_> {
    Target {
        listener: "tls",
        transport: "tcp",
        cert: Some(cert),
    }
}

fn wss(cert: &ClientCert) -> Target<'_> {
    Target {
        listener: "wss",
        transport: "websockets",
        cert: Some(cert),
    }
}

/// Runs `scenario`; returns (success, the JSON result line, stdout + stderr).
fn paho(
    b: &TestBroker,
    t: Target<'_>,
    scenario: &str,
    client_id: &str,
    extra: &[&str],
) -> (bool, serde_json::Value, String) {
    let script = workspace_root().join("integration-tests/paho/interop.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .arg(scenario)
        .args(["--host", "localhost", "--port"])
        .arg(b.addr(t.listener).port().to_string())
        .args(["--transport", t.transport, "--ca"])
        .arg(&b.pki.ca_path)
        .args(["--client-id", client_id, "--prefix"])
        .arg(format!("paho/{client_id}"))
        .args(extra);
    if let Some(c) = t.cert {
        cmd.arg("--cert")
            .arg(&c.cert_path)
            .arg("--key")
            .arg(&c.key_path);
    }
    let (status, out, err) = run_with_timeout(&mut cmd, Duration::from_secs(40));
    let result = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or(serde_json::Value::Null);
    let ok = status.is_some_and(|s| s.success()) && result["ok"] == true;
    (
        ok,
        result,
        format!("status {status:?}\nstdout: {out}\nstderr: {err}"),
    )
}

/// Runs `scenario` and asserts that it succeeded; returns its JSON result.
fn paho_ok(
    b: &TestBroker,
    t: Target<'_>,
    scenario: &str,
    client_id: &str,
    extra: &[&str],
) -> serde_json::Value {
    let (ok, result, output) = paho(b, t, scenario, client_id, extra);
    assert!(
        ok,
        "paho {scenario} over {} failed: {result}\n{output}\nbroker log:\n{}",
        t.transport,
        b.process.log_text()
    );
    result
}

fn qos(b: &TestBroker, t: Target<'_>, id: &str) {
    let r = paho_ok(b, t, "qos", id, &[]);
    assert_eq!(r["delivered"], 8, "{r}");
    // The broker saw the subscriber connect with the expected identity.
    let ev = b
        .process
        .wait_audit("connect", &[("client_id", &format!("{id}-sub2"))]);
    assert_eq!(
        ev["identity"].as_str(),
        Some(t.cert.map_or("", |c| c.name.as_str())),
        "{ev}"
    );
}

fn will(b: &TestBroker, t: Target<'_>, id: &str) {
    paho_ok(b, t, "will", id, &[]);
    // The broker's own account: a clean DISCONNECT from the polite client, an abnormal
    // end for the dropped one, and exactly one will published.
    b.process.wait_audit(
        "disconnect",
        &[
            ("client_id", &format!("{id}-polite")),
            ("reason", "client_disconnect"),
        ],
    );
    let d = b
        .process
        .wait_audit("disconnect", &[("client_id", &format!("{id}-crashy"))]);
    assert_ne!(d["reason"], "client_disconnect", "{d}");
    let wills = |who: &str| {
        let topic = format!("paho/{id}/status/{who}");
        b.process
            .count_log(|v| v["message"] == "publishing will" && v["topic"] == topic.as_str())
    };
    assert_eq!(wills("polite"), 0, "no will after DISCONNECT");
    assert_eq!(wills("crashy"), 1, "one will after the socket was dropped");
}

/// Subscribes with clean_session=False, disconnects, has 5 messages published while it is
/// offline, optionally restarts the broker, and checks that the session got them.
fn persistent(mut b: TestBroker, t: Target<'_>, restart: Option<bool>) {
    let id = format!("paho-hist-{}", t.transport);
    let r = paho_ok(&b, t, "persistent-setup", &id, &[]);
    assert_eq!(r["session_present"], false, "{r}");
    // Another client publishes to the same prefix (topics are paho/<client id>/...).
    paho_ok(&b, t, "publish", &id, &["--count", "5"]);
    if let Some(kill9) = restart {
        b.restart(kill9);
    }
    let r = paho_ok(&b, t, "persistent-check", &id, &["--count", "5"]);
    assert_eq!(r["session_present"], true, "{r}");
}

#[test]
fn paho_tls_client_certificates_qos_0_1_2() {
    require_paho();
    let b = TestBroker::start(BrokerConfig::default());
    let c = b.pki.client("paho-app");
    qos(&b, tls(&c), "tls-qos");
}

#[test]
fn paho_wss_qos_0_1_2() {
    require_paho();
    let b = TestBroker::start(BrokerConfig::default());
    let c = b.pki.client("paho-ws");
    qos(&b, wss(&c), "wss-qos");
}

#[test]
fn paho_tls_retained_set_replace_clear() {
    require_paho();
    let b = TestBroker::start(BrokerConfig::default());
    let c = b.pki.client("paho-app");
    paho_ok(&b, tls(&c), "retained", "tls-ret", &[]);
}

#[test]
fn paho_wss_retained_set_replace_clear() {
    require_paho();
    let b = TestBroker::start(BrokerConfig::default());
    let c = b.pki.client("paho-ws");
    paho_ok(&b, wss(&c), "retained", "wss-ret", &[]);
}

#[test]
fn paho_tls_will_on_dropped_socket_only() {
    require_paho();
    let b = TestBroker::start(BrokerConfig::default());
    let c = b.pki.client("paho-app");
    will(&b, tls(&c), "tls-will");
}

#[test]
fn paho_wss_will_on_dropped_socket_only() {
    require_paho();
    let b = TestBroker::start(BrokerConfig::default());
    let c = b.pki.client("paho-ws");
    will(&b, wss(&c), "wss-will");
}

#[test]
fn paho_tls_persistent_session_while_offline() {
    require_paho();
    let b = TestBroker::start(BrokerConfig::default());
    let c = b.pki.client("paho-hist");
    persistent(b, tls(&c), None);
}

#[test]
fn paho_tls_persistent_session_across_graceful_restart() {
    require_paho();
    let b = TestBroker::start(BrokerConfig::default());
    let c = b.pki.client("paho-hist");
    persistent(b, tls(&c), Some(false));
}

#[test]
fn paho_tls_persistent_session_across_kill9() {
    require_paho();
    let b = TestBroker::start(BrokerConfig::default());
    let c = b.pki.client("paho-hist");
    persistent(b, tls(&c), Some(true));
}

#[test]
fn paho_wss_persistent_session_across_graceful_restart() {
    require_paho();
    let b = TestBroker::start(BrokerConfig::default());
    let c = b.pki.client("paho-hist");
    persistent(b, wss(&c), Some(false));
}

#[test]
fn paho_tls_without_client_certificate() {
    require_paho();
    // Optional certificates plus anonymous access (loopback): paho without a certificate
    // gets in, over TLS and over secure WebSocket.
    let b = TestBroker::start(BrokerConfig {
        client_certificates: "optional",
        tls_anonymous: true,
        ..BrokerConfig::default()
    });
    let anon = Target {
        listener: "tls",
        transport: "tcp",
        cert: None,
    };
    qos(&b, anon, "anon-qos");
    paho_ok(&b, anon, "retained", "anon-ret", &[]);

    // On the default listener (certificates required) the same client cannot connect.
    let strict = TestBroker::start(BrokerConfig::default());
    let (ok, result, output) = paho(&strict, anon, "connect", "no-cert", &[]);
    assert!(!ok, "connected without a certificate: {result}\n{output}");
    assert_eq!(result["ok"], false, "{result}\n{output}");
    strict.process.wait_audit("tls_handshake_failed", &[]);
    assert_eq!(
        strict.process.count_log(|v| v["event"] == "connect"),
        0,
        "no client connected"
    );
}
