//! The compose topology end to end (deploy/docker-compose.yml): two field gateways behind a
//! firewall, the broker in the DMZ, the consumer and the operator on the enterprise network,
//! all from the images deploy/docker/build-images.sh makes without a registry.
//!
//! Scenarios, in this order, on one topology (each asserts; they synchronise on records
//! arriving in the consumer's file and on log lines, never on sleeps, except the deliberate
//! one-minute outage):
//! 1. telemetry from both gateways arrives complete (readings 1, 2, 3, ... with none
//!    missing) and in order;
//! 2. an ssh command runs on each gateway through the reverse tunnel, from the operator on
//!    the enterprise network, and the relay audits it;
//! 3. a port scan from the field network finds 8883 and 443 open on the broker's address and
//!    nothing else, nothing on the firewall and nothing on the gateways; inside, the broker
//!    listens on those two ports only and the gateways on loopback only;
//! 4. a client without a certificate, one with a certificate from another CA, and a device
//!    publishing into another device's namespace are refused and audited, and the consumer
//!    never sees the forged record;
//! 5. the broker is restarted mid-stream (`docker restart`) and nothing is lost;
//! 6. gateway gw-2 is cut off its network for 60 s (`docker network disconnect`); its
//!    backlog arrives afterwards, marked historical, and nothing is lost.
//!
//! Run with `make compose-test` (which `make test` runs), or
//! `cargo test --workspace --test compose -- --ignored --test-threads=1 --nocapture` (or with
//! `-p bulwark-integration-tests` instead of `--workspace`).
//! The test is `#[ignore]`d so that `cargo test --workspace` does not run it a second time.
//! It builds the images if one is missing (`BULWARK_COMPOSE_BUILD=1`: always), brings the
//! topology up under its own project name and networks, and tears it down when it ends,
//! passed or failed (a project left by a killed run is removed by the next one).
//!
//! Without Docker the test FAILS, saying why: CI must run it. A developer without Docker
//! can opt out with `BULWARK_SKIP_COMPOSE=1`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bulwark_integration_tests::{bin_path, connect_bytes, workspace_root};
use serde_json::Value;

const IMAGES: [&str; 5] = ["broker", "gateway", "firewall", "consumer", "probe"];
const GATEWAYS: [&str; 2] = ["gw-1", "gw-2"];
const OUT_FILE: &str = "/var/lib/bulwark-consumer/received.jsonl";
/// The deliberate outage of scenario 6, as the issue says: a minute.
const OUTAGE: Duration = Duration::from_secs(60);

/// A command's output, for messages.
fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `cmd` with `stdin` as its standard input, killing it after `timeout`.
fn run(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let s = child.wait().unwrap();
            eprintln!("compose test: {cmd:?} killed after {timeout:?}");
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    Output {
        status,
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
}

fn docker(args: &[&str]) -> Output {
    run(
        Command::new("docker").args(args),
        b"",
        Duration::from_secs(300),
    )
}

fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(o.status.success(), "docker {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Polls `f` every 250 ms until it returns `Some`, or fails with `what` after `timeout`.
fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Docker must be there: this test is not optional in CI.
fn require_docker() {
    let o = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output();
    match o {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "Docker is not usable here, so the compose scenarios cannot run (CI must run them).\n\
             `docker version` said:\n{}\nStart the Docker daemon (and be allowed to use it), or \
             set BULWARK_SKIP_COMPOSE=1 to skip these scenarios on a development machine.",
            text(&o)
        ),
        Err(e) => panic!(
            "The docker command is not available ({e}), so the compose scenarios cannot run (CI \
             must run them). Install Docker and docker-compose (Debian: apt-get install docker.io \
             docker-compose), or set BULWARK_SKIP_COMPOSE=1 to skip these scenarios on a \
             development machine."
        ),
    }
}

fn image_tag() -> String {
    std::env::var("BULWARK_TAG").unwrap_or_else(|_| "local".into())
}

/// Builds the images with deploy/docker/build-images.sh if one is missing.
fn ensure_images() {
    let tag = image_tag();
    let missing: Vec<String> = IMAGES
        .iter()
        .map(|i| format!("bulwark/{i}:{tag}"))
        .filter(|i| !docker(&["image", "inspect", i]).status.success())
        .collect();
    let forced = std::env::var("BULWARK_COMPOSE_BUILD").as_deref() == Ok("1");
    if missing.is_empty() && !forced {
        return;
    }
    eprintln!(
        "compose test: building the images ({})",
        if forced {
            "BULWARK_COMPOSE_BUILD=1".to_string()
        } else {
            format!("missing: {}", missing.join(", "))
        }
    );
    let t = Instant::now();
    let status = Command::new(workspace_root().join("deploy/docker/build-images.sh"))
        .env("TAG", &tag)
        .stdin(Stdio::null())
        .status()
        .expect("run deploy/docker/build-images.sh");
    assert!(status.success(), "deploy/docker/build-images.sh failed");
    eprintln!("compose test: images built in {:.0?}", t.elapsed());
}

/// First two octets for this run's three /24 networks: 10.N with N unused by any network.
fn free_net_prefix() -> String {
    let ids = docker_ok(&["network", "ls", "-q"]);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    let mut args = vec![
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
    ];
    args.extend(ids.iter().copied());
    let used = docker_ok(&args);
    (232..=254)
        .map(|n| format!("10.{n}"))
        .find(|p| {
            !used
                .split_whitespace()
                .any(|s| s.starts_with(&format!("{p}.")))
        })
        .expect("no free 10.232-254.x.x range for the test networks")
}

/// Removes topologies left behind by test runs that were killed (their process is gone).
fn remove_stale_projects() {
    let out = docker_ok(&[
        "ps",
        "-a",
        "--format",
        "{{.Label \"com.docker.compose.project\"}}",
    ]);
    let stale: BTreeSet<&str> = out
        .lines()
        .filter_map(|p| Some((p, p.strip_prefix("bulwarkct")?.parse::<u32>().ok()?)))
        .filter(|(_, pid)| !Path::new(&format!("/proc/{pid}")).exists())
        .map(|(p, _)| p)
        .collect();
    for p in stale {
        eprintln!("compose test: removing {p}, left by an earlier run");
        let _ = run(
            Command::new(workspace_root().join("deploy/docker/compose.sh"))
                .args(["-f", "deploy/docker-compose.yml", "-p", p])
                .args(["down", "-v", "--remove-orphans", "-t", "1"])
                .current_dir(workspace_root()),
            b"",
            Duration::from_secs(120),
        );
    }
}

/// One telemetry record as the consumer wrote it.
#[derive(Debug, Clone)]
struct Record {
    device: String,
    seq: u64,
    series: String,
    historical: bool,
    /// The producer's reading number (series line1/counter).
    n: Option<u64>,
    topic: String,
}

/// The running topology; `docker-compose down -v` when dropped, whatever happened.
struct Topology {
    project: String,
    net: String,
    state: tempfile::TempDir,
    ids: HashMap<String, String>,
    started: Instant,
}

impl Topology {
    fn compose_cmd(&self) -> Command {
        let root = workspace_root();
        let mut c = Command::new(root.join("deploy/docker/compose.sh"));
        c.current_dir(&root)
            .args(["-f", "deploy/docker-compose.yml", "-p", &self.project])
            .env("BULWARK_NET", &self.net)
            .env("BULWARK_STATE", self.state.path())
            .env("BULWARK_TAG", image_tag());
        c
    }

    fn compose(&self, args: &[&str]) -> String {
        let o = run(self.compose_cmd().args(args), b"", Duration::from_secs(300));
        assert!(o.status.success(), "compose {args:?} failed: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn up() -> Topology {
        let started = Instant::now();
        remove_stale_projects();
        let t = Topology {
            project: format!("bulwarkct{}", std::process::id()),
            net: free_net_prefix(),
            state: tempfile::tempdir().unwrap(),
            ids: HashMap::new(),
            started,
        };
        let o = run(
            Command::new(workspace_root().join("deploy/docker/compose-certs.sh"))
                .arg(t.state.path())
                .env("BULWARK_PKI_BIN", bin_path("bulwark-pki")),
            b"",
            Duration::from_secs(60),
        );
        assert!(o.status.success(), "compose-certs.sh: {}", text(&o));
        t
    }

    /// Starts `services` and remembers their container ids.
    fn start(&mut self, services: &[&str]) {
        let mut args = vec!["up", "-d", "--no-build"];
        args.extend(services);
        self.compose(&args);
        for s in services {
            let id = self.compose(&["ps", "-q", s]).trim().to_string();
            assert!(!id.is_empty(), "no container for service {s}");
            self.ids.insert(s.to_string(), id);
        }
    }

    fn id(&self, service: &str) -> &str {
        self.ids
            .get(service)
            .unwrap_or_else(|| panic!("service {service} not started"))
    }

    /// `ip` of the topology: `ip("2.10")` = the broker's DMZ address.
    fn ip(&self, host: &str) -> String {
        format!("{}.{host}", self.net)
    }

    /// `docker exec [-u user] [-i] <service> args...` with `stdin`.
    fn exec_as(&self, user: Option<&str>, service: &str, args: &[&str], stdin: &[u8]) -> Output {
        let mut c = Command::new("docker");
        c.args(["exec", "-i"]);
        if let Some(u) = user {
            c.args(["-u", u]);
        }
        c.arg(self.id(service)).args(args);
        run(&mut c, stdin, Duration::from_secs(120))
    }

    fn exec(&self, service: &str, args: &[&str]) -> String {
        let o = self.exec_as(None, service, args, b"");
        assert!(
            o.status.success(),
            "docker exec {service} {args:?}: {}",
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The container's log (stdout and stderr), one entry per line.
    fn log(&self, service: &str) -> Vec<String> {
        let o = docker(&["logs", self.id(service)]);
        let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&o.stderr));
        s.lines().map(str::to_string).collect()
    }

    /// The broker's JSON log lines (both runs, if it was restarted).
    fn broker_log(&self) -> Vec<Value> {
        self.log("broker")
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Audit events `event` whose fields equal `fields` and satisfy `pred`.
    fn audit(&self, event: &str, fields: &[(&str, &str)], pred: impl Fn(&Value) -> bool) -> usize {
        self.broker_log()
            .iter()
            .filter(|v| {
                v["target"] == "audit"
                    && v["event"] == event
                    && fields.iter().all(|(k, x)| v[*k].as_str() == Some(*x))
                    && pred(v)
            })
            .count()
    }

    fn wait_audit(&self, event: &str, fields: &[(&str, &str)], pred: impl Fn(&Value) -> bool) {
        wait_for(
            Duration::from_secs(30),
            &format!("audit event {event} {fields:?} in the broker's log"),
            || (self.audit(event, fields, &pred) > 0).then_some(()),
        );
    }

    /// What the consumer wrote so far.
    fn received(&self) -> Vec<Record> {
        let o = self.exec_as(None, "consumer", &["cat", OUT_FILE], b"");
        if !o.status.success() {
            return Vec::new(); // not created yet
        }
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("consumer wrote a line that is not JSON ({e}): {l}")
                });
                Record {
                    device: v["device"].as_str().unwrap_or_default().to_string(),
                    seq: v["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {l}")),
                    series: v["series"].as_str().unwrap_or_default().to_string(),
                    historical: v["historical"].as_bool().unwrap_or(false),
                    n: v["payload"]["n"].as_u64(),
                    topic: v["topic"].as_str().unwrap_or_default().to_string(),
                }
            })
            .collect()
    }

    /// The last reading the gateway's producer handed to its agent.
    fn produced(&self, gw: &str) -> u64 {
        let o = self.exec_as(None, gw, &["cat", "/run/producer/last"], b"");
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Waits until the consumer has every reading of `gw` up to at least `n`.
    fn wait_readings(&self, gw: &str, n: u64, timeout: Duration) -> Vec<Record> {
        wait_for(
            timeout,
            &format!("the consumer to have readings 1..={n} of {gw}"),
            || {
                let r = self.received();
                let got: BTreeSet<u64> = readings(&r, gw).iter().map(|r| r.n.unwrap()).collect();
                (1..=n).all(|i| got.contains(&i)).then_some(r)
            },
        )
    }

    fn counter_readings(&self, gw: &str) -> usize {
        readings(&self.received(), gw).len()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("compose test failed; the last lines of each container's log:");
            for (service, id) in &self.ids {
                let o = docker(&["logs", "--tail", "40", id]);
                eprintln!(
                    "----- {service}\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        let t = Instant::now();
        let o = run(
            self.compose_cmd()
                .args(["down", "-v", "--remove-orphans", "-t", "10"]),
            b"",
            Duration::from_secs(180),
        );
        if !o.status.success() {
            eprintln!("compose down failed: {}", text(&o));
        }
        eprintln!(
            "compose test: topology {} removed in {:.1?}; {:.1?} since the start",
            self.project,
            t.elapsed(),
            self.started.elapsed()
        );
    }
}

/// The producer's readings from `gw`, in the order the consumer wrote them.
fn readings<'a>(records: &'a [Record], gw: &str) -> Vec<&'a Record> {
    records
        .iter()
        .filter(|r| r.device == gw && r.series == "line1/counter")
        .collect()
}

/// Complete and in order: for each gateway the readings are exactly 1..=max, each once, on
/// the gateway's own topic, and the live (not historical) records arrive with growing seq
/// and reading numbers. Historical records are checked by [`check_lanes`]: a live record
/// that turns 30 s old on its way out is marked historical too, so their order is the
/// agent's two lanes', not the flag's.
fn check_stream(records: &[Record]) {
    for gw in GATEWAYS {
        let rs = readings(records, gw);
        assert!(!rs.is_empty(), "no readings from {gw}");
        let mut seen = BTreeMap::new();
        for r in &rs {
            let n = r.n.unwrap_or_else(|| panic!("reading without n: {r:?}"));
            assert_eq!(
                r.topic,
                format!("devices/{gw}/data/line1/counter"),
                "record on the wrong topic: {r:?}"
            );
            if let Some(prev) = seen.insert(n, r.seq) {
                panic!(
                    "reading {n} of {gw} arrived twice (seq {prev} and {})",
                    r.seq
                );
            }
        }
        let max = *seen.keys().last().unwrap();
        let missing: Vec<u64> = (1..=max).filter(|n| !seen.contains_key(n)).collect();
        assert!(
            missing.is_empty(),
            "{gw}: readings missing before {max}: {missing:?}"
        );
        let live: Vec<&&Record> = rs.iter().filter(|r| !r.historical).collect();
        assert_increasing(&live, &format!("{gw}'s live records"));
    }
    let mut keys = BTreeSet::new();
    for r in records {
        assert!(
            keys.insert((r.device.clone(), r.seq)),
            "the consumer wrote ({}, {}) twice",
            r.device,
            r.seq
        );
    }
}

/// Seq and reading numbers grow along `records`.
fn assert_increasing(records: &[&&Record], what: &str) {
    for w in records.windows(2) {
        assert!(
            w[0].seq < w[1].seq && w[0].n < w[1].n,
            "{what} out of order: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
}

/// After a reconnect the agent sends two lanes, each in order: the backlog (seq up to the
/// `backlog_until_seq` it logged at connect, every record marked historical) and live
/// records (the rest), which may overtake the backlog. `after` = records written before the
/// reconnect, `boundary` = the logged seq (None: no backlog, one lane).
fn check_lanes(records: &[Record], gw: &str, after: usize, boundary: Option<u64>) {
    let rs = readings(&records[after.min(records.len())..], gw);
    let (backlog, live): (Vec<&&Record>, Vec<&&Record>) = rs
        .iter()
        .partition(|r| boundary.is_some_and(|b| r.seq <= b));
    assert_increasing(&backlog, &format!("{gw}'s backlog"));
    assert_increasing(&live, &format!("{gw}'s live records after the reconnect"));
    if let Some(r) = backlog.iter().find(|r| !r.historical) {
        panic!("{gw}: a backlog record is not marked historical: {r:?}");
    }
}

/// `backlog_until_seq` of `gw`'s agent's `n`-th "uplink connected" log line (counted from 1).
fn backlog_boundary(t: &Topology, gw: &str, n: usize) -> Option<u64> {
    let connects: Vec<Value> = t
        .log(gw)
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "uplink connected")
        .collect();
    let v = connects
        .get(n - 1)
        .unwrap_or_else(|| panic!("{gw} logged only {} uplink connections", connects.len()));
    let b = v["backlog_until_seq"].as_str().unwrap_or("None");
    b.strip_prefix("Some(")
        .and_then(|x| x.strip_suffix(')'))
        .map(|x| {
            x.parse()
                .unwrap_or_else(|e| panic!("backlog_until_seq {b}: {e}"))
        })
}

fn uplink_connects(t: &Topology, gw: &str) -> usize {
    t.log(gw)
        .iter()
        .filter(|l| l.contains("\"uplink connected\""))
        .count()
}

fn scenario(name: &str, f: impl FnOnce()) {
    eprintln!("compose test: {name} ...");
    let t = Instant::now();
    f();
    eprintln!("compose test: {name}: ok ({:.1?})", t.elapsed());
}

/// MQTT PUBLISH, QoS 1.
fn publish_qos1(topic: &str, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.extend_from_slice(payload);
    let mut out = vec![0x32];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

fn envelope(device: &str, seq: u64, series: &str, payload: &str) -> Vec<u8> {
    format!(
        "{{\"v\":1,\"device\":\"{device}\",\"seq\":{seq},\"series\":\"{series}\",\"ts\":\"2026-01-01T00:00:00Z\",\"historical\":false,\"payload\":{payload}}}"
    )
    .into_bytes()
}

/// An MQTT client from the probe (a machine on the field network that is not a gateway):
/// `openssl s_client` to broker.bulwark.test:8883 with `cert` (files in the probe) or none,
/// sending `bytes`. Returns the bytes the broker sent back.
fn probe_mqtt(t: &Topology, cert: Option<(&str, &str)>, bytes: &[u8]) -> Vec<u8> {
    let mut cmd = String::from(
        "openssl s_client -quiet -connect broker.bulwark.test:8883 -servername broker.bulwark.test \
         -CAfile /certs/ca.pem -verify_return_error",
    );
    if let Some((c, k)) = cert {
        cmd.push_str(&format!(" -cert {c} -key {k}"));
    }
    cmd.push_str(" 2>/dev/null | od -An -tx1 -v");
    let o = t.exec_as(None, "probe", &["sh", "-c", &cmd], bytes);
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Copies a host file into the probe (as /tmp/NAME).
fn copy_to_probe(t: &Topology, src: &Path, name: &str) -> String {
    let dest = format!("/tmp/{name}");
    let data = std::fs::read(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
    let o = t.exec_as(
        None,
        "probe",
        &["sh", "-c", &format!("cat > {dest}")],
        &data,
    );
    assert!(o.status.success(), "copy to probe: {}", text(&o));
    dest
}

fn telemetry_complete_and_in_order(t: &Topology) {
    for gw in GATEWAYS {
        let n = wait_for(
            Duration::from_secs(60),
            &format!("{gw}'s producer to hand over 25 readings"),
            || Some(t.produced(gw)).filter(|&n| n >= 25),
        );
        let r = t.wait_readings(gw, n, Duration::from_secs(60));
        eprintln!(
            "  {gw}: readings 1..={n} received (the consumer has {} records)",
            r.len()
        );
    }
    let records = t.received();
    check_stream(&records);
    // Nothing waited 30 s yet: every record is live, so check_stream saw the whole order.
    assert!(
        records.iter().all(|r| !r.historical),
        "historical records before any outage"
    );
}

fn ssh_through_the_tunnel(t: &Topology) {
    for gw in GATEWAYS {
        let before = t.audit(
            "tunnel_close",
            &[("operator", "alice"), ("device", gw)],
            |_| true,
        );
        let o = t.exec_as(
            Some("operator"),
            "consumer",
            &["ssh", gw, "echo tunnel-ok; hostname; id -un"],
            b"",
        );
        assert!(
            o.status.success(),
            "ssh {gw} through the tunnel: {}",
            text(&o)
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            format!("tunnel-ok\n{gw}\nadmin\n"),
            "ssh {gw}: {}",
            text(&o)
        );
        t.wait_audit(
            "tunnel_open",
            &[("operator", "alice"), ("device", gw), ("service", "ssh")],
            |_| true,
        );
        wait_for(
            Duration::from_secs(30),
            "the relay's tunnel_close audit event",
            || {
                (t.audit(
                    "tunnel_close",
                    &[("operator", "alice"), ("device", gw)],
                    |_| true,
                ) > before)
                    .then_some(())
            },
        );
    }
}

/// Open TCP ports per host in nmap's greppable output.
fn nmap_open_ports(out: &str) -> BTreeMap<String, Vec<u16>> {
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let Some(rest) = line.strip_prefix("Host: ") else {
            continue;
        };
        let Some((host, ports)) = rest.split_once("Ports:") else {
            continue;
        };
        let host = host.split_whitespace().next().unwrap_or("").to_string();
        // "443/open/tcp//https///, 8883/open/tcp//...<TAB>Ignored State: filtered (65533)"
        let ports = ports.trim_start().split('\t').next().unwrap_or("");
        let open: Vec<u16> = ports
            .split(',')
            .filter_map(|p| {
                let f: Vec<&str> = p.trim().split('/').collect();
                (f.len() > 2 && f[1] == "open")
                    .then(|| f[0].trim().parse().ok())
                    .flatten()
            })
            .collect();
        m.insert(host, open);
    }
    m
}

fn port_scan_from_the_field(t: &Topology) {
    let broker = t.ip("2.10");
    let firewall = t.ip("1.2");
    let gw1 = t.ip("1.11");
    let gw2 = t.ip("1.12");
    // A SYN scan of every TCP port; filtered ports time out, so nmap paces itself at 25k
    // probes per second and retries once (the four hosts take about 20 s).
    let out = t.exec(
        "probe",
        &[
            "nmap",
            "-n",
            "-Pn",
            "-sS",
            "-p-",
            "--min-rate",
            "25000",
            "--max-retries",
            "1",
            "--max-rtt-timeout",
            "200ms",
            "-oG",
            "-",
            &broker,
            &firewall,
            &gw1,
            &gw2,
        ],
    );
    let open = nmap_open_ports(&out);
    let expect = BTreeMap::from([
        (broker.clone(), vec![443, 8883]),
        (firewall, vec![]),
        (gw1, vec![]),
        (gw2, vec![]),
    ]);
    assert_eq!(
        open, expect,
        "open ports seen from the field; nmap said:\n{out}"
    );

    // Inside: the broker listens on 8883 and 443 only (anything else on loopback, if at
    // all); the gateways on loopback only (sshd on 127.0.0.1:22).
    let listening = |service: &str| -> Vec<String> {
        t.exec(service, &["ss", "-Hltnu"])
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .filter(|a| !a.starts_with("127.") && !a.starts_with("[::1]"))
            .collect()
    };
    let mut b = listening("broker");
    b.sort();
    assert_eq!(
        b,
        vec!["0.0.0.0:443".to_string(), "0.0.0.0:8883".to_string()],
        "the broker's network listeners"
    );
    for gw in GATEWAYS {
        assert_eq!(
            listening(gw),
            Vec::<String>::new(),
            "{gw}'s network listeners"
        );
    }
}

fn rogue_clients_refused(t: &Topology) {
    let probe_peer = format!("{}:", t.ip("1.50"));
    let from_probe = |v: &Value| v["peer"].as_str().unwrap_or("").starts_with(&probe_peer);
    let tls_failures = || t.audit("tls_handshake_failed", &[], from_probe);

    // 1. No client certificate.
    let before = tls_failures();
    let got = probe_mqtt(t, None, &connect_bytes("rogue-1"));
    assert!(
        !contains(&got, &[0x20, 0x02]),
        "a client without a certificate got a CONNACK: {got:02x?}"
    );
    wait_for(
        Duration::from_secs(30),
        "tls_handshake_failed for the client without a certificate",
        || (tls_failures() > before).then_some(()),
    );

    // 2. A certificate with a gateway's name, from another CA.
    let foreign = tempfile::tempdir().unwrap();
    let o = run(
        Command::new(bin_path("bulwark-pki"))
            .args(["init", "--dir"])
            .arg(foreign.path())
            .args(["--client", "gw-1"]),
        b"",
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "bulwark-pki init: {}", text(&o));
    let c = copy_to_probe(t, &foreign.path().join("clients/gw-1.pem"), "foreign.pem");
    let k = copy_to_probe(t, &foreign.path().join("clients/gw-1.key"), "foreign.key");
    let before = tls_failures();
    let got = probe_mqtt(t, Some((&c, &k)), &connect_bytes("gw-1"));
    assert!(
        !contains(&got, &[0x20, 0x02]),
        "a certificate from another CA got a CONNACK: {got:02x?}"
    );
    wait_for(
        Duration::from_secs(30),
        "tls_handshake_failed for the certificate from another CA",
        || (tls_failures() > before).then_some(()),
    );

    // 3. A genuine device (gw-3, issued now like any new device) publishing into gw-1's
    //    namespace, then into its own. The broker acknowledges and drops the first
    //    (MQTT 3.1.1 has no negative PUBACK) and audits it; the second reaches the consumer,
    //    which proves the first would have arrived before it had it been let through.
    let pki = t.state.path().join("certs");
    let o = run(
        Command::new(bin_path("bulwark-pki"))
            .args(["issue-client", "gw-3", "--dir"])
            .arg(&pki),
        b"",
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "bulwark-pki issue-client: {}", text(&o));
    let c = copy_to_probe(t, &pki.join("clients/gw-3.pem"), "gw-3.pem");
    let k = copy_to_probe(t, &pki.join("clients/gw-3.key"), "gw-3.key");
    let forged_seq = 999_999_999;
    let mut bytes = connect_bytes("gw-3");
    bytes.extend(publish_qos1(
        "devices/gw-1/data/line1/counter",
        1,
        &envelope("gw-1", forged_seq, "line1/counter", "{\"n\":999999999}"),
    ));
    bytes.extend(publish_qos1(
        "devices/gw-3/data/marker",
        2,
        &envelope("gw-3", 1, "marker", "\"after the forged record\""),
    ));
    bytes.extend([0xe0, 0x00]); // DISCONNECT
    let got = probe_mqtt(t, Some((&c, &k)), &bytes);
    assert!(
        contains(&got, &[0x20, 0x02, 0x00, 0x00]),
        "gw-3 was not accepted: {got:02x?}"
    );
    assert!(
        contains(&got, &[0x40, 0x02, 0x00, 0x01]) && contains(&got, &[0x40, 0x02, 0x00, 0x02]),
        "no PUBACKs for gw-3's two publishes: {got:02x?}"
    );
    t.wait_audit(
        "acl_denied",
        &[
            ("action", "publish"),
            ("identity", "gw-3"),
            ("topic", "devices/gw-1/data/line1/counter"),
        ],
        |_| true,
    );
    let records = wait_for(
        Duration::from_secs(30),
        "gw-3's marker record at the consumer",
        || {
            let r = t.received();
            r.iter()
                .any(|r| r.device == "gw-3" && r.series == "marker")
                .then_some(r)
        },
    );
    assert!(
        !records.iter().any(|r| r.seq == forged_seq),
        "the forged record reached the consumer"
    );
}

fn broker_restart_mid_stream(t: &Topology) {
    let listening = || {
        t.broker_log()
            .iter()
            .filter(|v| v["message"] == "listening")
            .count()
    };
    let connects = |identity: &str| t.audit("connect", &[("identity", identity)], |_| true);
    let before_listening = listening();
    let before: Vec<usize> = GATEWAYS.iter().map(|g| connects(g)).collect();
    let consumer_resumed = || {
        t.audit("connect", &[("identity", "app1")], |v| {
            v["session_present"] == true
        })
    };
    let resumed_before = consumer_resumed();
    let produced_before: Vec<u64> = GATEWAYS.iter().map(|g| t.produced(g)).collect();

    let r = Instant::now();
    docker_ok(&["restart", "-t", "30", t.id("broker")]);
    eprintln!("  docker restart took {:.1?}", r.elapsed());
    wait_for(
        Duration::from_secs(60),
        "the restarted broker to listen on both ports",
        || (listening() >= before_listening + 2).then_some(()),
    );
    for (gw, b) in GATEWAYS.iter().zip(&before) {
        wait_for(
            Duration::from_secs(60),
            &format!("{gw} to reconnect to the restarted broker"),
            || (connects(gw) > *b).then_some(()),
        );
    }
    wait_for(
        Duration::from_secs(60),
        "the consumer to resume its persistent session",
        || (consumer_resumed() > resumed_before).then_some(()),
    );
    for (gw, b) in GATEWAYS.iter().zip(&produced_before) {
        // Readings made while the broker was away, and some after.
        let n = wait_for(
            Duration::from_secs(60),
            &format!("{gw}'s producer to go on"),
            || Some(t.produced(gw)).filter(|&n| n > b + 10),
        );
        t.wait_readings(gw, n, Duration::from_secs(90));
        eprintln!("  {gw}: readings 1..={n} received across the restart");
    }
    let records = t.received();
    check_stream(&records);
    // A few seconds away: nothing became backlog, so the live order covers everything.
    assert!(
        records.iter().all(|r| !r.historical),
        "historical records after a restart of a few seconds"
    );
}

fn gateway_cut_off_for_a_minute(t: &Topology) {
    let gw = "gw-2";
    let network = format!("{}_field", t.project);
    let before = t.counter_readings(gw);
    let other_before = t.counter_readings("gw-1");
    let connects_before = uplink_connects(t, gw);
    docker_ok(&["network", "disconnect", &network, t.id(gw)]);
    let cut = Instant::now();
    eprintln!("  {gw} disconnected from {network}; waiting {OUTAGE:?} (deliberately)");
    std::thread::sleep(OUTAGE / 2);
    let halfway = t.counter_readings(gw);
    std::thread::sleep(OUTAGE.saturating_sub(cut.elapsed()));
    let at_end = t.counter_readings(gw);
    let produced = t.produced(gw);
    assert_eq!(
        halfway, at_end,
        "{gw} records arrived while it was cut off ({halfway} then {at_end})"
    );
    assert!(
        t.counter_readings("gw-1") > other_before,
        "gw-1's telemetry stopped while only gw-2 was cut off"
    );
    let queued = produced.saturating_sub(at_end as u64);
    assert!(
        queued >= 100,
        "{gw} queued only {queued} readings during the outage (producer at {produced})"
    );
    eprintln!(
        "  {gw}: {before} readings before, {at_end} after {OUTAGE:?}; producer at {produced}"
    );

    let written_before = t.received().len();
    docker_ok(&[
        "network",
        "connect",
        "--ip",
        &t.ip("1.12"),
        &network,
        t.id(gw),
    ]);
    let back = Instant::now();
    let r = t.wait_readings(gw, produced, Duration::from_secs(180));
    eprintln!(
        "  {gw}: the backlog (readings up to {produced}) arrived {:.1?} after the link came back",
        back.elapsed()
    );
    let historical = readings(&r, gw).iter().filter(|r| r.historical).count();
    assert!(
        historical > 0,
        "no reading of {gw} was marked historical after a {OUTAGE:?} outage \
         (historical_after_secs = 30 in deploy/docker/gateway/agent.toml.in)"
    );
    eprintln!("  {gw}: {historical} readings arrived marked historical");
    let records = t.received();
    check_stream(&records);
    // The lanes of the connection that carried the backlog (if the old TCP connection
    // survived the outage, there is no new one and the records went out in one lane).
    let connects = uplink_connects(t, gw);
    let boundary = (connects > connects_before)
        .then(|| backlog_boundary(t, gw, connects_before + 1))
        .flatten();
    eprintln!(
        "  {gw}: {} new uplink connection(s), backlog up to seq {boundary:?}",
        connects - connects_before
    );
    check_lanes(&records, gw, written_before, boundary);
}

#[test]
#[ignore = "needs Docker: run by `make compose-test` (and so by `make test`)"]
fn compose_topology_end_to_end() {
    if std::env::var("BULWARK_SKIP_COMPOSE").as_deref() == Ok("1") {
        eprintln!("compose test: SKIPPED because BULWARK_SKIP_COMPOSE=1");
        return;
    }
    require_docker();
    let start = Instant::now();
    ensure_images();
    let mut t = Topology::up();
    eprintln!(
        "compose test: project {}, networks {}.1-3.0/24",
        t.project, t.net
    );

    // The consumer subscribes before the gateways start, so it gets every reading from 1.
    t.start(&["firewall", "broker", "consumer", "probe"]);
    wait_for(
        Duration::from_secs(60),
        "the consumer's subscription at the broker",
        || {
            let o = t.exec_as(
                None,
                "broker",
                &[
                    "bulwark-broker",
                    "ctl",
                    "--socket",
                    "/run/bulwark/ctl.sock",
                    "sessions",
                ],
                b"",
            );
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.first() == Some(&"bulwark-consumer")
                        && f.last().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0) > 0
                })
                .then_some(())
        },
    );
    t.start(&["gw-1", "gw-2"]);
    eprintln!("compose test: topology up in {:.1?}", start.elapsed());

    scenario(
        "telemetry from both gateways, complete and in order",
        || telemetry_complete_and_in_order(&t),
    );
    scenario("ssh command on each gateway through the tunnel", || {
        ssh_through_the_tunnel(&t)
    });
    scenario("port scan from the field network", || {
        port_scan_from_the_field(&t)
    });
    scenario(
        "clients without a valid certificate, device outside its namespace",
        || rogue_clients_refused(&t),
    );
    scenario("broker restarted mid-stream", || {
        broker_restart_mid_stream(&t)
    });
    scenario("gateway cut off its network for a minute", || {
        gateway_cut_off_for_a_minute(&t)
    });
    let records = t.received();
    eprintln!(
        "compose test: all scenarios passed in {:.1?}; the consumer has {} records ({} from gw-1, {} from gw-2)",
        start.elapsed(),
        records.len(),
        readings(&records, "gw-1").len(),
        readings(&records, "gw-2").len()
    );
}
