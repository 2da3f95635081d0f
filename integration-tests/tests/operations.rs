//! Operating the broker: `bulwark-broker ctl` over the owner-only control socket (sessions,
//! kick, bans, reload), the audit file (JSON lines, rotation, no secrets) and the audit
//! counters under `$SYS/broker/audit/...`.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use bulwark_integration_tests::mqtt::{options, Client, QoS, Via};
use bulwark_integration_tests::{bin_path, run_with_timeout, BrokerConfig, TestBroker};

const T: Duration = Duration::from_secs(15);

struct Ops {
    b: TestBroker,
    socket: std::path::PathBuf,
    audit: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn start() -> Ops {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ctl.sock");
    let audit = dir.path().join("audit.log");
    let b = TestBroker::start(BrokerConfig {
        extra: format!(
            "[ctl]\nsocket = {socket:?}\n[audit]\nfile = {audit:?}\nmax_file_bytes = 4096\nmax_files = 2\n[sys]\ninterval_secs = 1\n"
        ),
        ..BrokerConfig::default()
    });
    b.process
        .wait_log(T, |v| v["message"] == "control socket ready")
        .expect("control socket");
    Ops {
        b,
        socket,
        audit,
        _dir: dir,
    }
}

fn ctl(ops: &Ops, args: &[&str]) -> (i32, String, String) {
    let (status, out, err) = run_with_timeout(
        Command::new(bin_path("bulwark-broker"))
            .arg("ctl")
            .arg("--socket")
            .arg(&ops.socket)
            .args(args),
        T,
    );
    (status.unwrap().code().unwrap(), out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_lists_kicks_bans_and_reloads() {
    let ops = start();
    let b = &ops.b;
    let mode = std::fs::metadata(&ops.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket is owner-only");

    let cert = b.pki.client("gw-1");
    let via = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&cert)));
    let mut dev = Client::connect(options("gw-1", &via)).await.unwrap();
    dev.subscribe("a/#", QoS::AtMostOnce).await;
    dev.subscribe("b/#", QoS::AtMostOnce).await;
    let _anon = Client::connect(options("anon-1", &Via::Tcp(b.addr("tcp"))))
        .await
        .unwrap();

    let (code, out, err) = ctl(&ops, &["--json", "sessions"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let sessions = v["sessions"].as_array().unwrap();
    let gw = sessions
        .iter()
        .find(|s| s["client_id"] == "gw-1")
        .expect("gw-1 listed");
    assert_eq!(gw["identity"], "gw-1");
    assert_eq!(gw["listener"], "tls");
    assert_eq!(gw["tls_version"], "TLSv1.3");
    assert_eq!(gw["subscriptions"], 2);
    let anon = sessions
        .iter()
        .find(|s| s["client_id"] == "anon-1")
        .expect("anon listed");
    assert!(anon["identity"].is_null());
    assert!(anon["tls_version"].is_null());
    // The table form too.
    let (code, out, _) = ctl(&ops, &["sessions"]);
    assert_eq!(code, 0);
    assert!(out.contains("gw-1") && out.contains("TLSv1.3"), "{out}");

    let (code, out, err) = ctl(&ops, &["kick", "gw-1"]);
    assert_eq!(code, 0, "{out}{err}");
    b.process.wait_audit("kicked", &[("client_id", "gw-1")]);
    b.process
        .wait_audit("disconnect", &[("client_id", "gw-1"), ("reason", "kicked")]);
    let (code, _, err) = ctl(&ops, &["kick", "nobody"]);
    assert_eq!(code, 1);
    assert!(err.contains("no connected client"), "{err}");

    let (code, _, _) = ctl(&ops, &["ban", "192.0.2.9", "--seconds", "120"]);
    assert_eq!(code, 0);
    let (code, out, _) = ctl(&ops, &["bans"]);
    assert_eq!(code, 0);
    assert!(out.contains("192.0.2.9"), "{out}");
    let (code, _, _) = ctl(&ops, &["unban", "192.0.2.9"]);
    assert_eq!(code, 0);
    let (code, out, _) = ctl(&ops, &["bans"]);
    assert!(out.contains("no bans in force"), "{out}");
    let (code2, _, err) = ctl(&ops, &["unban", "192.0.2.9"]);
    assert_eq!((code, code2), (0, 1), "{err}");

    let (code, out, _) = ctl(&ops, &["reload"]);
    assert_eq!(code, 0, "{out}");
    b.process
        .wait_audit("reload", &[("what", "tls"), ("listener", "tls")]);

    // An unreachable socket is a clear error.
    let (status, _, err) = run_with_timeout(
        Command::new(bin_path("bulwark-broker")).args([
            "ctl",
            "--socket",
            "/nonexistent/ctl.sock",
            "sessions",
        ]),
        T,
    );
    assert_eq!(status.unwrap().code(), Some(1));
    assert!(err.contains("cannot reach the broker"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_file_is_json_lines_rotated_and_free_of_secrets() {
    let ops = start();
    let b = &ops.b;
    // Credentials on the anonymous loopback listener are ignored, and must never be logged.
    for i in 0..40 {
        let mut o = options(&format!("c{i}"), &Via::Tcp(b.addr("tcp")));
        o.set_credentials("someone", "hunter2-secret");
        let c = Client::connect(o).await.unwrap();
        c.disconnect().await;
    }
    b.process.wait_audit("disconnect", &[("client_id", "c39")]);
    let mode = std::fs::metadata(&ops.audit).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let rotated = ops.audit.with_extension("log.1");
    assert!(rotated.exists(), "rotated at max_file_bytes");
    assert!(!ops.audit.with_extension("log.3").exists(), "max_files = 2");
    let mut events = 0;
    for path in [&ops.audit, &rotated] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            !text.contains("hunter2"),
            "passwords never reach the audit log"
        );
        assert!(std::fs::metadata(path).unwrap().len() <= 4096 + 1024);
        for line in text.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).expect("one JSON object per line");
            assert_eq!(v["target"], "audit");
            assert!(v["event"].is_string(), "{line}");
            events += 1;
        }
    }
    assert!(events >= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_counters_are_published_under_sys() {
    let ops = start();
    let b = &ops.b;
    // One refused connection, so connect_refused is counted.
    let mut raw = bulwark_integration_tests::RawClient::connect(b.addr("tcp"));
    raw.send(&bulwark_integration_tests::unhex(
        "10 0c 00 04 4d 51 54 54 04 02 00 00 00 00",
    ))
    .unwrap();
    let _ = raw.expect_close(T);
    b.process.wait_audit("connect_refused", &[]);
    let mut s = Client::connect(options("sys", &Via::Tcp(b.addr("tcp"))))
        .await
        .unwrap();
    s.subscribe("$SYS/broker/audit/+", QoS::AtMostOnce).await;
    let deadline = tokio::time::Instant::now() + T;
    let mut seen = std::collections::HashMap::new();
    while tokio::time::Instant::now() < deadline
        && !(seen.contains_key("connect_refused") && seen.contains_key("connect"))
    {
        if let Some(p) = s.next_publish(Duration::from_secs(3)).await {
            let name = p.topic.rsplit('/').next().unwrap().to_string();
            let n: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
            seen.insert(name, n);
        }
    }
    assert!(
        seen.get("connect_refused").copied().unwrap_or(0) >= 1,
        "{seen:?}"
    );
    assert!(seen.get("connect").copied().unwrap_or(0) >= 1, "{seen:?}");
}
