//! The `bulwark-broker` command line: `check-config` verdicts and exit codes, refusal of
//! insecure listeners before anything binds, and SIGTERM/SIGINT shutdown.

use std::process::Command;
use std::time::Duration;

use bulwark_integration_tests::{bin_path, run_with_timeout, BrokerConfig, TestBroker, TestPki};

fn check(config: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, config).unwrap();
    let (status, out, err) = run_with_timeout(
        Command::new(bin_path("bulwark-broker"))
            .arg("check-config")
            .arg(&path),
        Duration::from_secs(10),
    );
    (status.unwrap().code().unwrap(), out, err)
}

#[test]
fn check_config_accepts_the_test_and_dev_configs() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().unwrap();
    let (code, out, err) = check(&BrokerConfig::default().render(&pki, data.path()));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("OK (3 listeners)"), "{out}");
}

#[test]
fn check_config_names_file_key_and_fix() {
    let cases: &[(&str, &str)] = &[
        (
            "[[listener]]\nbind = \"0.0.0.0:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\n",
            "listener[0].bind",
        ),
        (
            "[[listener]]\nbind = \"0.0.0.0:8883\"\ntransport = \"tls\"\n[listener.tls]\ncert_file = \"missing.pem\"\nkey_file = \"missing.key\"\n",
            "listener[0].tls.cert_file",
        ),
        (
            "[[listener]]\nbind = \"127.0.0.1:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\nallow_anonymus = true\n",
            "unknown field `allow_anonymus`",
        ),
        ("[limits]\nmax_packet_size = 0\n[[listener]]\nbind = \"127.0.0.1:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\n", "limits.max_packet_size"),
        ("", "no listener configured"),
    ];
    for (config, expected) in cases {
        let (code, out, err) = check(config);
        assert_eq!(code, 64, "{config}: {out}{err}");
        assert!(err.contains("broker.toml"), "names the file: {err}");
        assert!(err.contains(expected), "expected {expected:?} in {err}");
    }
}

#[test]
fn run_refuses_insecure_listener_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "[[listener]]\nbind = \"0.0.0.0:0\"\ntransport = \"tcp\"\nallow_anonymous = true\n",
    )
    .unwrap();
    let (status, _, err) = run_with_timeout(
        Command::new(bin_path("bulwark-broker"))
            .args(["run", "--config"])
            .arg(&path),
        Duration::from_secs(10),
    );
    assert_eq!(status.unwrap().code(), Some(64));
    assert!(
        err.contains("allow_plaintext_on_network"),
        "says how to opt out: {err}"
    );
}

#[test]
fn sigterm_and_sigint_shut_down_cleanly() {
    for signal in ["-TERM", "-INT"] {
        let mut b = TestBroker::start(BrokerConfig::default());
        Command::new("kill")
            .args([signal, &b.process.pid().to_string()])
            .status()
            .unwrap();
        let status = b.process.wait_exit(Duration::from_secs(20)).expect("exit");
        assert!(status.success(), "{signal}: {status:?}");
        assert!(
            b.process.log_text().contains("shutdown complete"),
            "store flushed before exit"
        );
    }
}

/// The text log written to a pipe (journald, a log file) is plain text: no terminal colour
/// codes around levels and field names.
#[test]
fn text_log_to_a_pipe_has_no_colour_codes() {
    use std::io::{BufRead as _, BufReader};
    use std::process::Stdio;
    let pki = TestPki::new();
    let data = tempfile::tempdir().unwrap();
    let path = data.path().join("broker.toml");
    std::fs::write(&path, BrokerConfig::default().render(&pki, data.path())).unwrap();
    let mut child = Command::new(bin_path("bulwark-broker"))
        .args(["--log-format", "text", "run", "--config"])
        .arg(&path)
        .env("BULWARK_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|l: &String| l.contains("listening")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = seen.join("\n");
    assert!(text.contains("listening"), "no listening line: {text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a piped log: {text:?}"
    );
    assert!(text.contains("INFO"), "{text}");
}
