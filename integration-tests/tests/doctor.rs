//! `bulwark-broker doctor --config FILE` against deployments generated in temporary
//! directories: a deployment that follows the checklist passes every item, and one
//! deliberate weakness at a time fails (or warns about) exactly the item that covers it.
//!
//! The doctor only reads files, so the fixtures name the production addresses
//! (0.0.0.0:8883 and 0.0.0.0:443) without binding anything.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bulwark_integration_tests::{bin_path, run_with_timeout, TestPki};

const ITEMS: [&str; 10] = [
    "config",
    "network-ports",
    "tls-everywhere",
    "client-auth",
    "anonymous",
    "passwords",
    "acl",
    "revocation",
    "file-permissions",
    "persistence",
];

/// A deployment on disk: certificates, CRL, ACL (0644), password file (0600, made with
/// `bulwark-broker passwd add`) and store directory (0700).
struct Deployment {
    pki: TestPki,
    dir: tempfile::TempDir,
    acl: PathBuf,
    passwd: PathBuf,
    store: PathBuf,
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Deployment {
    fn new() -> Deployment {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let acl = dir.path().join("acl.conf");
        std::fs::write(
            &acl,
            "# devices write their own tree; the historian reads everything\npattern readwrite devices/%u/#\nuser historian\ntopic read devices/#\n",
        )
        .unwrap();
        set_mode(&acl, 0o644);
        let passwd = dir.path().join("passwd");
        let mut child = Command::new(bin_path("bulwark-broker"))
            .args(["passwd", "add"])
            .arg(&passwd)
            .arg("historian")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bulwark-broker passwd add");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"historian-pass\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "passwd add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::metadata(&passwd).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let store = dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        set_mode(&store, 0o700);
        Deployment {
            pki,
            dir,
            acl,
            passwd,
            store,
        }
    }

    /// A TLS or WSS listener with the deployment's certificates. `opts` are extra listener
    /// keys; `client_certificates` and `crl` shape the `[listener.tls]` table.
    fn listener(
        &self,
        name: &str,
        bind: &str,
        transport: &str,
        opts: &str,
        client_certificates: &str,
        crl: bool,
    ) -> String {
        let mut s = format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\ntransport = \"{transport}\"\n{opts}[listener.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\nclient_certificates = \"{client_certificates}\"\n",
            self.pki.server_cert, self.pki.server_key, self.pki.ca_path
        );
        if crl {
            s.push_str(&format!("crl_file = {:?}\n", self.pki.crl_path));
        }
        s
    }

    /// The production listeners of the checklist: MQTT/TLS on 8883 and WebSocket/TLS on
    /// 443, client certificates required and checked against the CRL.
    fn mqtts(&self) -> String {
        self.listener("mqtts", "0.0.0.0:8883", "tls", "", "required", true)
    }

    fn wss(&self) -> String {
        self.listener("wss", "0.0.0.0:443", "wss", "", "required", true)
    }

    /// A loopback debugging listener, which no network item looks at.
    fn local_debug() -> &'static str {
        "[[listener]]\nname = \"local-debug\"\nbind = \"127.0.0.1:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\n"
    }

    fn persistence(&self, durability: &str) -> String {
        format!(
            "[persistence]\nenabled = true\npath = {:?}\ndurability = \"{durability}\"\n",
            self.store
        )
    }

    fn auth(&self, acl: bool, passwords: bool) -> String {
        let mut s = String::from("[auth]\n");
        if acl {
            s.push_str(&format!("acl_file = {:?}\n", self.acl));
        }
        if passwords {
            s.push_str(&format!("[auth.passwords]\nfile = {:?}\n", self.passwd));
        }
        s
    }

    /// The deployment that follows the checklist.
    fn good(&self) -> String {
        format!(
            "{}{}{}{}{}",
            self.mqtts(),
            self.wss(),
            Self::local_debug(),
            self.persistence("sync"),
            self.auth(true, true)
        )
    }

    fn doctor(&self, config: &str) -> Report {
        let path = self.dir.path().join("broker.toml");
        std::fs::write(&path, config).unwrap();
        let (status, out, err) = run_with_timeout(
            Command::new(bin_path("bulwark-broker"))
                .args(["doctor", "--config"])
                .arg(&path),
            Duration::from_secs(20),
        );
        let code = status
            .and_then(|s| s.code())
            .unwrap_or_else(|| panic!("doctor did not finish: {out}{err}"));
        let mut items = BTreeMap::new();
        for line in out.lines() {
            let mut words = line.split_whitespace();
            let (Some(status), Some(item)) = (words.next(), words.next()) else {
                continue;
            };
            if !matches!(status, "PASS" | "WARN" | "FAIL") {
                continue;
            }
            let detail = words.collect::<Vec<_>>().join(" ");
            let previous = items.insert(item.to_string(), (status.to_string(), detail));
            assert!(previous.is_none(), "item {item} printed twice:\n{out}");
        }
        Report {
            code,
            items,
            text: format!("{out}{err}\n--- config:\n{config}"),
        }
    }
}

/// The doctor's verdicts, item → (status, detail).
struct Report {
    code: i32,
    items: BTreeMap<String, (String, String)>,
    text: String,
}

impl Report {
    fn detail(&self, item: &str) -> &str {
        &self.items[item].1
    }

    /// Every item printed exactly once; the `expected` ones have the given status and all
    /// others PASS; the exit code is 1 exactly when something FAILs.
    fn assert(&self, expected: &[(&str, &str)]) {
        let printed: Vec<&str> = self.items.keys().map(String::as_str).collect();
        let mut all = ITEMS.to_vec();
        all.sort_unstable();
        assert_eq!(printed, all, "items printed:\n{}", self.text);
        for item in ITEMS {
            let want = expected
                .iter()
                .find(|(i, _)| *i == item)
                .map(|(_, s)| *s)
                .unwrap_or("PASS");
            assert_eq!(
                self.items[item].0, want,
                "item {item}: expected {want}:\n{}",
                self.text
            );
        }
        let fails = expected.iter().any(|(_, s)| *s == "FAIL");
        assert_eq!(
            self.code,
            i32::from(fails),
            "exit code (1 iff any FAIL):\n{}",
            self.text
        );
    }
}

#[test]
fn a_deployment_that_follows_the_checklist_passes_every_item() {
    let d = Deployment::new();
    let r = d.doctor(&d.good());
    r.assert(&[]);
    assert!(r.text.contains(": no failures"), "{}", r.text);
    assert!(r.detail("passwords").contains("1 user"), "{}", r.text);
}

#[test]
fn network_ports_fails_for_a_listener_outside_8883_and_443() {
    let d = Deployment::new();
    let config = format!(
        "{}{}{}{}{}",
        d.mqtts(),
        d.wss(),
        d.listener("odd-port", "0.0.0.0:9999", "tls", "", "required", true),
        d.persistence("sync"),
        d.auth(true, true)
    );
    let r = d.doctor(&config);
    r.assert(&[("network-ports", "FAIL")]);
    assert!(r.detail("network-ports").contains("9999"), "{}", r.text);
}

#[test]
fn a_loopback_listener_on_another_port_is_not_a_network_port() {
    let d = Deployment::new();
    let config = format!(
        "{}{}{}{}{}",
        d.mqtts(),
        d.wss(),
        d.listener("local-tls", "127.0.0.1:9999", "tls", "", "required", true),
        d.persistence("sync"),
        d.auth(true, true)
    );
    d.doctor(&config).assert(&[]);
}

#[test]
fn tls_everywhere_fails_for_plain_tcp_on_the_network() {
    let d = Deployment::new();
    // Plain TCP on the network, with passwords and without anonymous clients so that the
    // `anonymous` item stays clean. Two other items necessarily go with it: a tcp listener
    // is never "tls on 8883 or wss on 443" (network-ports FAIL), and it carries no client
    // certificates, so a password alone lets a client in (client-auth WARN).
    let config = format!(
        "{}{}[[listener]]\nname = \"plain\"\nbind = \"0.0.0.0:1883\"\ntransport = \"tcp\"\nallow_plaintext_on_network = true\n{}{}",
        d.mqtts(),
        d.wss(),
        d.persistence("sync"),
        d.auth(true, true)
    );
    let r = d.doctor(&config);
    r.assert(&[
        ("tls-everywhere", "FAIL"),
        ("network-ports", "FAIL"),
        ("client-auth", "WARN"),
    ]);
    assert!(r.detail("tls-everywhere").contains("plain"), "{}", r.text);
}

#[test]
fn client_auth_warns_when_a_password_alone_lets_a_client_in() {
    let d = Deployment::new();
    // Certificates optional on 8883 (with passwords configured): a weaker listener, not an
    // open one.
    let config = format!(
        "{}{}{}{}",
        d.listener("mqtts", "0.0.0.0:8883", "tls", "", "optional", true),
        d.wss(),
        d.persistence("sync"),
        d.auth(true, true)
    );
    let r = d.doctor(&config);
    r.assert(&[("client-auth", "WARN")]);
    assert!(r.detail("client-auth").contains("mqtts"), "{}", r.text);
}

#[test]
fn client_auth_fails_when_neither_certificates_nor_passwords_guard_a_listener() {
    let d = Deployment::new();
    // The only way past validation to a network listener with neither certificates nor
    // passwords is an anonymous one, so `anonymous` fails with it, and without a password
    // file `passwords` warns. Certificates "none" means no CRL, so `revocation` passes.
    let config = format!(
        "{}{}{}{}",
        d.listener(
            "mqtts",
            "0.0.0.0:8883",
            "tls",
            "allow_anonymous = true\nallow_anonymous_on_network = true\n",
            "none",
            false
        ),
        d.wss(),
        d.persistence("sync"),
        d.auth(true, false)
    );
    let r = d.doctor(&config);
    r.assert(&[
        ("client-auth", "FAIL"),
        ("anonymous", "FAIL"),
        ("passwords", "WARN"),
    ]);
}

#[test]
fn anonymous_fails_for_anonymous_access_from_the_network() {
    let d = Deployment::new();
    // Certificates stay required, so client-auth passes; the opt-out alone is flagged
    // (a later change of client_certificates would open the listener: A8).
    let config = format!(
        "{}{}{}{}",
        d.listener(
            "mqtts",
            "0.0.0.0:8883",
            "tls",
            "allow_anonymous = true\nallow_anonymous_on_network = true\n",
            "required",
            true
        ),
        d.wss(),
        d.persistence("sync"),
        d.auth(true, true)
    );
    let r = d.doctor(&config);
    r.assert(&[("anonymous", "FAIL")]);
    assert!(r.detail("anonymous").contains("mqtts"), "{}", r.text);
}

#[test]
fn passwords_warns_without_a_password_file() {
    let d = Deployment::new();
    let config = format!(
        "{}{}{}{}{}",
        d.mqtts(),
        d.wss(),
        Deployment::local_debug(),
        d.persistence("sync"),
        d.auth(true, false)
    );
    d.doctor(&config).assert(&[("passwords", "WARN")]);
}

#[test]
fn acl_fails_without_an_acl_file() {
    let d = Deployment::new();
    let config = format!(
        "{}{}{}{}",
        d.mqtts(),
        d.wss(),
        d.persistence("sync"),
        d.auth(false, true)
    );
    let r = d.doctor(&config);
    r.assert(&[("acl", "FAIL")]);
    assert!(r.detail("acl").contains("acl_file"), "{}", r.text);
}

#[test]
fn revocation_warns_without_a_crl() {
    let d = Deployment::new();
    let config = format!(
        "{}{}{}{}",
        d.listener("mqtts", "0.0.0.0:8883", "tls", "", "required", false),
        d.wss(),
        d.persistence("sync"),
        d.auth(true, true)
    );
    let r = d.doctor(&config);
    r.assert(&[("revocation", "WARN")]);
    assert!(r.detail("revocation").contains("mqtts"), "{}", r.text);
}

#[test]
fn persistence_warns_for_periodic_durability_and_when_disabled() {
    let d = Deployment::new();
    let base = format!("{}{}{}", d.mqtts(), d.wss(), d.auth(true, true));
    let r = d.doctor(&format!("{base}{}", d.persistence("periodic")));
    r.assert(&[("persistence", "WARN")]);
    assert!(r.detail("persistence").contains("periodic"), "{}", r.text);
    let r = d.doctor(&format!("{base}[persistence]\nenabled = false\n"));
    r.assert(&[("persistence", "WARN")]);
    assert!(r.detail("persistence").contains("disabled"), "{}", r.text);
}

/// A store directory that group and others can enter is a file-permissions problem. The
/// doctor should name it under its own item and still check everything else.
#[test]
fn file_permissions_fails_for_a_store_directory_open_to_others() {
    let d = Deployment::new();
    set_mode(&d.store, 0o755);
    let r = d.doctor(&d.good());
    r.assert(&[("file-permissions", "FAIL")]);
    assert!(
        r.detail("file-permissions").contains("chmod 700"),
        "{}",
        r.text
    );
}

/// Whatever item reports it, the doctor never passes a deployment whose secrets or data are
/// open to others, and says how to fix it.
#[test]
fn insecure_files_never_pass() {
    let d = Deployment::new();
    let key = d.dir.path().join("server.key");
    std::fs::copy(&d.pki.server_key, &key).unwrap();
    set_mode(&key, 0o600);
    let good = d.good().replace(
        &format!("key_file = {:?}", d.pki.server_key),
        &format!("key_file = {key:?}"),
    );
    assert!(good.contains(&format!("key_file = {key:?}")));
    d.doctor(&good).assert(&[]);
    let cases: [(&Path, u32, &str); 4] = [
        (&key, 0o644, "chmod 600"),
        (&d.passwd, 0o640, "chmod 600"),
        (&d.acl, 0o666, "chmod 644"),
        (&d.store, 0o755, "chmod 700"),
    ];
    for (path, bad, fix) in cases {
        let good_mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
        set_mode(path, bad);
        let r = d.doctor(&good);
        set_mode(path, good_mode);
        assert_eq!(
            r.code,
            1,
            "{} mode {bad:o} must fail:\n{}",
            path.display(),
            r.text
        );
        let named = r.items.values().any(|(status, detail)| {
            status == "FAIL" && detail.contains(path.to_str().unwrap()) && detail.contains(fix)
        });
        assert!(
            named,
            "{} mode {bad:o}: a FAIL line names it and says {fix:?}:\n{}",
            path.display(),
            r.text
        );
    }
    d.doctor(&good).assert(&[]);
}
