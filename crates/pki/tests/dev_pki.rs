//! The on-disk development PKI: layout, file modes, idempotence, issuing and revocation.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bulwark_pki::{CertRole, CertificateAuthority, DevPki, DEFAULT_SERVER_NAMES};
use x509_parser::prelude::*;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn der_of(path: &Path) -> Vec<u8> {
    let text = fs::read(path).unwrap();
    let (_, block) = x509_parser::pem::parse_x509_pem(&text).unwrap();
    block.contents
}

/// Every file under `dir` with its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(path.clone(), fs::read(&path).unwrap());
            }
        }
    }
    out
}

struct Crl {
    number: u64,
    serials: Vec<u64>,
    dates: Vec<i64>,
}

/// Parses crl.pem and checks its signature against ca.pem.
fn read_crl(pki: &DevPki) -> Crl {
    let ca_der = der_of(&pki.ca_path());
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    let crl_der = der_of(&pki.crl_path());
    let (_, crl) = CertificateRevocationList::from_der(&crl_der).unwrap();
    crl.verify_signature(ca.public_key())
        .expect("CRL signed by ca.pem");
    Crl {
        number: u64::try_from(crl.crl_number().expect("CRL number")).unwrap(),
        serials: crl
            .iter_revoked_certificates()
            .map(|r| u64::try_from(r.serial()).unwrap())
            .collect(),
        dates: crl
            .iter_revoked_certificates()
            .map(|r| r.revocation_date.timestamp())
            .collect(),
    }
}

fn cert_serial(path: &Path) -> u64 {
    let der = der_of(path);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    u64::try_from(cert.serial.clone()).unwrap()
}

fn verify_with_ca(pki: &DevPki, cert: &Path) {
    let ca_der = der_of(&pki.ca_path());
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    let der = der_of(cert);
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();
    leaf.verify_signature(Some(ca.public_key()))
        .unwrap_or_else(|e| panic!("{}: not signed by ca.pem: {e}", cert.display()));
}

#[test]
fn ensure_creates_the_layout_with_safe_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs/dev");
    let (pki, report) =
        DevPki::ensure_with_report(&dir, DEFAULT_SERVER_NAMES, &["press-7", "hmi"]).unwrap();
    assert_eq!(pki.dir, dir);
    assert!(report.found.is_empty());
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);

    assert_eq!(pki.ca_path(), dir.join("ca.pem"));
    assert_eq!(pki.server_cert_path(), dir.join("server.pem"));
    assert_eq!(pki.server_key_path(), dir.join("server.key"));
    assert_eq!(pki.client_cert_path("hmi"), dir.join("clients/hmi.pem"));
    assert_eq!(pki.client_key_path("hmi"), dir.join("clients/hmi.key"));
    assert_eq!(pki.crl_path(), dir.join("crl.pem"));

    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("clients")), 0o700);
    for key in [
        dir.join("ca.key"),
        pki.server_key_path(),
        pki.client_key_path("press-7"),
        pki.client_key_path("hmi"),
    ] {
        assert_eq!(mode(&key), 0o600, "{}", key.display());
        assert!(report.created.contains(&key));
    }
    for public in [
        pki.ca_path(),
        pki.server_cert_path(),
        pki.client_cert_path("press-7"),
        pki.client_cert_path("hmi"),
        pki.crl_path(),
        dir.join("revoked.txt"),
    ] {
        assert_eq!(mode(&public), 0o644, "{}", public.display());
        assert!(report.created.contains(&public));
    }

    for cert in [
        pki.server_cert_path(),
        pki.client_cert_path("press-7"),
        pki.client_cert_path("hmi"),
    ] {
        verify_with_ca(&pki, &cert);
    }

    // The server certificate covers the requested names.
    let server = pki.list().unwrap().remove(1);
    assert_eq!(server.role, CertRole::Server);
    for name in DEFAULT_SERVER_NAMES {
        assert!(server.covers_name(name), "{name}");
    }

    // Empty CRL, number 1; empty revoked.txt.
    let crl = read_crl(&pki);
    assert_eq!(crl.number, 1);
    assert!(crl.serials.is_empty());
    assert_eq!(fs::read_to_string(dir.join("revoked.txt")).unwrap(), "");

    // No temp files left behind.
    let names: Vec<String> = snapshot(&dir)
        .keys()
        .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "ca.key",
            "ca.pem",
            "clients/hmi.key",
            "clients/hmi.pem",
            "clients/press-7.key",
            "clients/press-7.pem",
            "crl.pem",
            "revoked.txt",
            "server.key",
            "server.pem"
        ]
    );
}

#[test]
fn ensure_is_idempotent_and_only_adds_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    DevPki::ensure(&dir, &["localhost"], &["press-7"]).unwrap();
    let before = snapshot(&dir);

    let (_, report) = DevPki::ensure_with_report(&dir, &["localhost"], &["press-7"]).unwrap();
    assert!(report.created.is_empty(), "{:?}", report.created);
    assert_eq!(report.found.len(), before.len());
    assert_eq!(snapshot(&dir), before, "second ensure changed files");

    // A new client and different server names: only the client is added, with the same CA.
    let (pki, report) =
        DevPki::ensure_with_report(&dir, &["localhost", "gw.plant"], &["press-7", "hmi"]).unwrap();
    let after = snapshot(&dir);
    for (path, bytes) in &before {
        assert_eq!(after.get(path), Some(bytes), "{} changed", path.display());
    }
    assert_eq!(
        report.created,
        [pki.client_cert_path("hmi"), pki.client_key_path("hmi")]
    );
    assert!(
        report.warnings.iter().any(|w| w.contains("gw.plant")),
        "{:?}",
        report.warnings
    );
    verify_with_ca(&pki, &pki.client_cert_path("hmi"));
}

#[test]
fn ensure_refuses_half_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let pki = DevPki::ensure(&dir, &["localhost"], &[]).unwrap();
    fs::remove_file(pki.server_key_path()).unwrap();
    let before = snapshot(&dir);
    let err = DevPki::ensure(&dir, &["localhost"], &[]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("server.key is missing"), "{msg}");
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn ensure_warns_about_readable_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let pki = DevPki::ensure(&dir, &["localhost"], &[]).unwrap();
    fs::set_permissions(pki.ca_key_path(), fs::Permissions::from_mode(0o644)).unwrap();
    let (_, report) = DevPki::ensure_with_report(&dir, &["localhost"], &[]).unwrap();
    assert!(
        report.warnings.iter().any(|w| w.contains("chmod 600")),
        "{:?}",
        report.warnings
    );
}

#[test]
fn issue_client_creates_files_once() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&tmp.path().join("pki"), &["localhost"], &[]).unwrap();

    pki.issue_client("scada-hmi").unwrap();
    assert_eq!(mode(&pki.client_key_path("scada-hmi")), 0o600);
    assert_eq!(mode(&pki.client_cert_path("scada-hmi")), 0o644);
    verify_with_ca(&pki, &pki.client_cert_path("scada-hmi"));
    let info = pki.client_info("scada-hmi").unwrap();
    assert_eq!(info.common_name, "scada-hmi");
    assert!(!info.revoked);

    let before = snapshot(&pki.dir);
    let err = pki.issue_client("scada-hmi").unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(snapshot(&pki.dir), before);

    assert!(pki.issue_client("../ca").is_err());
    assert_eq!(pki.client_names().unwrap(), ["scada-hmi"]);
}

#[test]
fn revoke_puts_the_serial_into_the_crl_and_increments_the_number() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&tmp.path().join("pki"), &["localhost"], &["a", "b", "c"]).unwrap();
    let serial_a = cert_serial(&pki.client_cert_path("a"));
    let serial_b = cert_serial(&pki.client_cert_path("b"));
    let serial_c = cert_serial(&pki.client_cert_path("c"));

    pki.revoke("a").unwrap();
    let crl = read_crl(&pki);
    assert_eq!(crl.number, 2);
    assert_eq!(crl.serials, [serial_a]);
    assert_eq!(pki.revoked_serials().unwrap(), [serial_a]);
    assert_eq!(
        fs::read_to_string(pki.dir.join("revoked.txt")).unwrap(),
        format!("{serial_a}\n")
    );
    assert_eq!(mode(&pki.crl_path()), 0o644);

    std::thread::sleep(std::time::Duration::from_millis(1100));
    pki.revoke("b").unwrap();
    let crl2 = read_crl(&pki);
    assert_eq!(crl2.number, 3);
    assert_eq!(crl2.serials, [serial_a, serial_b]);
    assert!(!crl2.serials.contains(&serial_c));
    // The first revocation keeps its original date.
    assert_eq!(crl2.dates[0], crl.dates[0]);
    assert!(crl2.dates[1] > crl2.dates[0]);

    // Revoking again does not duplicate the serial but re-signs the CRL.
    pki.revoke("b").unwrap();
    let crl3 = read_crl(&pki);
    assert_eq!(crl3.number, 4);
    assert_eq!(crl3.serials, [serial_a, serial_b]);
    assert_eq!(pki.revoked_serials().unwrap(), [serial_a, serial_b]);

    // list() reports revocation from the CRL.
    let revoked: Vec<(CertRole, bool)> = pki
        .list()
        .unwrap()
        .into_iter()
        .map(|c| (c.role, c.revoked))
        .collect();
    assert_eq!(
        revoked,
        [
            (CertRole::Ca, false),
            (CertRole::Server, false),
            (CertRole::Client("a".into()), true),
            (CertRole::Client("b".into()), true),
            (CertRole::Client("c".into()), false),
        ]
    );

    // No temp files left behind.
    assert!(snapshot(&pki.dir).keys().all(|p| !p
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with('.')));

    // A later ensure keeps the CRL.
    let before = snapshot(&pki.dir);
    DevPki::ensure(&pki.dir, &["localhost"], &["a", "b", "c"]).unwrap();
    assert_eq!(snapshot(&pki.dir), before);
}

#[test]
fn deleted_crl_is_recreated_from_revoked_txt() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&tmp.path().join("pki"), &["localhost"], &["a"]).unwrap();
    pki.revoke("a").unwrap();
    fs::remove_file(pki.crl_path()).unwrap();
    DevPki::ensure(&pki.dir, &["localhost"], &[]).unwrap();
    let crl = read_crl(&pki);
    assert_eq!(crl.serials, [cert_serial(&pki.client_cert_path("a"))]);
}

#[test]
fn errors_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("empty");
    fs::create_dir(&dir).unwrap();
    let pki = DevPki { dir: dir.clone() };

    let err = format!("{:#}", pki.issue_client("x").unwrap_err());
    assert!(err.contains("ca.pem: no such file"), "{err}");
    assert!(
        err.contains(&format!(
            "run `bulwark-pki init --dir {}` first",
            dir.display()
        )),
        "{err}"
    );
    let err = format!("{:#}", pki.revoke("x").unwrap_err());
    assert!(err.contains("bulwark-pki init"), "{err}");

    let err = format!("{:#}", DevPki::open(&tmp.path().join("nope")).unwrap_err());
    assert!(err.contains("bulwark-pki init --dir"), "{err}");

    let pki = DevPki::ensure(&dir, &["localhost"], &[]).unwrap();
    let err = format!("{:#}", pki.revoke("ghost").unwrap_err());
    assert!(err.contains("clients/ghost.pem: no such file"), "{err}");
    assert!(err.contains("bulwark-pki show"), "{err}");
}

#[test]
fn dev_ca_can_be_loaded_with_from_pem() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&tmp.path().join("pki"), &["localhost"], &[]).unwrap();
    let ca = CertificateAuthority::from_pem(
        &fs::read_to_string(pki.ca_path()).unwrap(),
        &fs::read_to_string(pki.ca_key_path()).unwrap(),
    )
    .unwrap();
    assert_eq!(ca.cert_der(), der_of(&pki.ca_path()));
    assert_eq!(ca.cert_der(), pki.load_ca().unwrap().cert_der());
}
