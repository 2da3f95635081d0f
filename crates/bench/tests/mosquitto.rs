//! Runs the built `bulwark-bench` against a real mosquitto on a free loopback port and
//! checks the result lines: exact delivery at QoS 1 for fan-in, fan-out, latency and
//! retained. Skips (with a message) when /usr/sbin/mosquitto is not installed.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const BENCH: &str = env!("CARGO_BIN_EXE_bulwark-bench");

/// A mosquitto process, killed on drop.
struct Broker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts mosquitto and returns once it reports that it is running (all listeners open),
/// or panics with its output if it exits first.
fn start_mosquitto() -> Option<Broker> {
    if !Path::new(MOSQUITTO).exists() {
        eprintln!("skipping: {MOSQUITTO} is not installed (apt-get install mosquitto)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    // max_queued_messages 0: no per-client queue limit, so QoS 1 must arrive exactly.
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 0\nset_tcp_nodelay true\nlog_dest stderr\n\
             log_type error\nlog_type notice\nlog_type information\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning mosquitto");
    // Forward mosquitto's log lines; the channel closes when it exits.
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            // "mosquitto version 2.0.11 running": every listener is open.
            Ok(line) if line.contains(" running") => break,
            Ok(line) => log.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("mosquitto did not start ({e}): {}", log.join("\n"));
            }
        }
    }
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("mosquitto accepts connections");
    Some(Broker {
        child,
        port,
        _dir: dir,
    })
}

fn bench(broker: &Broker, args: &[&str]) -> Output {
    let port = broker.port.to_string();
    let pid = broker.child.id().to_string();
    Command::new(BENCH)
        .args([
            "--port",
            &port,
            "--broker-pid",
            &pid,
            "--label",
            "mosquitto",
        ])
        .args(["--max-seconds", "60"])
        .args(args)
        .output()
        .expect("running bulwark-bench")
}

/// The single JSON line on stdout of a successful run.
fn result_line(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one line on stdout: {stdout}\n{stderr}"
    );
    let v: Value = serde_json::from_str(lines[0]).expect("stdout is JSON");
    for field in [
        "scenario",
        "broker",
        "transport",
        "qos",
        "duration_s",
        "gen_cpu_pct",
        "broker_cpu_pct",
        "broker_rss_kb",
        "timed_out",
    ] {
        assert!(v.get(field).is_some(), "missing {field}: {v}");
    }
    assert_eq!(v["broker"], "mosquitto");
    assert_eq!(v["transport"], "tcp");
    assert_eq!(v["timed_out"], false, "{v}");
    assert!(v["broker_rss_kb"].as_u64().unwrap() > 0, "{v}");
    assert!(v["broker_cpu_pct"].is_number(), "{v}");
    v
}

fn assert_exact(v: &Value) {
    assert!(v["sent"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["received"], v["sent"], "{v}");
    assert_eq!(v["lost"], 0, "{v}");
}

#[test]
fn scenarios_against_mosquitto() {
    let Some(broker) = start_mosquitto() else {
        return;
    };

    let v = result_line(&bench(
        &broker,
        &[
            "fan-in",
            "--qos",
            "1",
            "--publishers",
            "4",
            "--messages",
            "2000",
        ],
    ));
    assert_eq!(v["scenario"], "fan-in");
    assert_eq!(v["qos"], 1);
    assert_eq!(v["sent"], 2000);
    assert_eq!(
        (v["publishers"].as_u64(), v["subscribers"].as_u64()),
        (Some(4), Some(1))
    );
    assert_exact(&v);
    assert!(v["msgs_per_s"].as_f64().unwrap() > 0.0, "{v}");

    let v = result_line(&bench(
        &broker,
        &[
            "fan-out",
            "--qos",
            "1",
            "--subscribers",
            "4",
            "--messages",
            "500",
        ],
    ));
    assert_eq!(v["scenario"], "fan-out");
    assert_eq!(v["sent"], 2000, "500 messages x 4 subscribers");
    assert_exact(&v);
    assert_eq!(v["duplicates"], 0);

    let v = result_line(&bench(
        &broker,
        &[
            "latency",
            "--qos",
            "1",
            "--rate",
            "500",
            "--messages",
            "500",
        ],
    ));
    assert_eq!(v["scenario"], "latency");
    assert_exact(&v);
    let p50 = v["p50_us"].as_f64().unwrap();
    assert!(p50 > 0.0, "{v}");
    assert!(v["p99_us"].as_f64().unwrap() >= p50, "{v}");
    assert!(
        v["max_us"].as_f64().unwrap() >= v["p999_us"].as_f64().unwrap(),
        "{v}"
    );
    // 500 messages at 500/s take about a second on an absolute schedule.
    assert!(v["duration_s"].as_f64().unwrap() >= 0.9, "{v}");

    let v = result_line(&bench(
        &broker,
        &["retained", "--topics", "50", "--subscribers", "3"],
    ));
    assert_eq!(v["scenario"], "retained");
    assert_eq!(v["sent"], 150);
    assert_exact(&v);

    // The retained messages were cleared: a second run sees exactly its own again.
    let v = result_line(&bench(
        &broker,
        &["retained", "--topics", "20", "--subscribers", "2"],
    ));
    assert_eq!(v["sent"], 40);
    assert_exact(&v);

    let v = result_line(&bench(&broker, &["handshake", "--connections", "50"]));
    assert_eq!(v["scenario"], "handshake");
    assert_eq!(v["qos"], Value::Null);
    assert_eq!(v["failed"], 0);
    assert!(v["p50_ms"].as_f64().unwrap() > 0.0, "{v}");

    let v = result_line(&bench(
        &broker,
        &["conn-scale", "--clients", "50", "--concurrency", "10"],
    ));
    assert_eq!(v["scenario"], "conn-scale");
    assert_eq!(v["connected"], 50);
    assert!(v["rss_after_kb"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn non_loopback_host_is_refused() {
    let out = Command::new(BENCH)
        .args(["--host", "192.0.2.7", "fan-in", "--messages", "10"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--host"), "{stderr}");
}

#[test]
fn conn_scale_needs_broker_pid() {
    let out = Command::new(BENCH)
        .args(["conn-scale", "--clients", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--broker-pid"), "{stderr}");
}
