//! The reverse tunnel end to end: the broker's relay, the agent's device side and the
//! `bulwark-tunnel` operator CLI, with a real OpenSSH server behind the gateway.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use bulwark_integration_tests::{
    bin_path, free_port, run_with_timeout, BrokerConfig, BrokerProcess, SshServer, TestBroker,
};

const T: Duration = Duration::from_secs(30);

struct Setup {
    broker: TestBroker,
    agent: BrokerProcess,
    wss_port: u16,
    _dirs: Vec<tempfile::TempDir>,
}

fn acl(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("acl.conf");
    std::fs::write(
        &p,
        format!(
            "{}\nuser alice\ntopic write $tunnel/gw-1/open/ssh\ntopic write $tunnel/gw-1/open/web\n\nuser bob\ntopic read devices/#\n",
            bulwark_protocol::acl::DEFAULT_DEVICE_RULES
        ),
    )
    .unwrap();
    p
}

/// Broker with the relay on its wss listener; agent gw-1 with `services` allowed.
fn setup(services: &str, tunnel_extra: &str) -> Setup {
    let acl_dir = tempfile::tempdir().unwrap();
    let wss_port = free_port();
    let broker = TestBroker::start(BrokerConfig {
        ports: HashMap::from([("wss", wss_port)]),
        extra: format!(
            "[auth]\nacl_file = {:?}\n[tunnel]\nenabled = true\npublic_url = \"wss://localhost:{wss_port}/tunnel/v1\"\n{tunnel_extra}",
            acl(acl_dir.path())
        ),
        ..BrokerConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cert = broker.pki.client("gw-1");
    let config = format!(
        "device_id = \"gw-1\"\n[uplink]\nbrokers = [\"mqtts://localhost:{}\"]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nbackoff_min_ms = 100\n[queue]\npath = {:?}\n[ingest]\nsocket = {:?}\n[tunnel]\nenabled = true\n[tunnel.services]\n{services}\n",
        broker.addr("tls").port(),
        broker.pki.ca_path,
        cert.cert_path,
        cert.key_path,
        dir.path().join("queue"),
        dir.path().join("ingest.sock"),
    );
    let agent = BrokerProcess::spawn_agent(&config, dir.path());
    agent
        .wait_log(T, |v| v["message"] == "uplink connected")
        .unwrap_or_else(|| panic!("agent did not connect:\n{}", agent.log_text()));
    Setup {
        broker,
        agent,
        wss_port,
        _dirs: vec![acl_dir, dir],
    }
}

fn tunnel_cmd(s: &Setup, operator: &str) -> Command {
    let c = s.broker.pki.client(operator);
    let mut cmd = Command::new(bin_path("bulwark-tunnel"));
    cmd.args(["--broker", &format!("wss://localhost:{}", s.wss_port)])
        .arg("--ca-file")
        .arg(&s.broker.pki.ca_path)
        .arg("--cert")
        .arg(&c.cert_path)
        .arg("--key")
        .arg(&c.key_path)
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", "/nonexistent");
    cmd
}

#[test]
fn ssh_command_runs_on_the_gateway_through_the_tunnel() {
    let sshd = SshServer::start();
    let s = setup(&format!("ssh = \"127.0.0.1:{}\"", sshd.port), "");
    let proxy = {
        let c = tunnel_cmd(&s, "alice");
        let mut parts = vec![c.get_program().to_string_lossy().to_string()];
        parts.extend(c.get_args().map(|a| a.to_string_lossy().to_string()));
        parts.extend(["stdio", "--device", "gw-1", "--service", "ssh"].map(String::from));
        parts.join(" ")
    };
    let (status, out, err) = run_with_timeout(
        Command::new("ssh")
            .args(sshd.client_args())
            .arg("-o")
            .arg(format!("ProxyCommand={proxy}"))
            .arg(format!("{}@gw-1", sshd.user))
            .arg("echo tunnel-ok; hostname"),
        T,
    );
    assert!(
        status.map(|s| s.success()).unwrap_or(false),
        "ssh failed: {out}{err}\nagent:\n{}\nbroker:\n{}",
        s.agent.log_text(),
        s.broker.process.log_text()
    );
    assert!(out.starts_with("tunnel-ok\n"), "{out}");
    s.broker.process.wait_audit(
        "tunnel_open",
        &[
            ("operator", "alice"),
            ("device", "gw-1"),
            ("service", "ssh"),
        ],
    );
    s.broker
        .process
        .wait_audit("tunnel_close", &[("operator", "alice")]);
}
