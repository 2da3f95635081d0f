//! `bulwark-broker doctor`: checks a deployment against the security checklist of
//! DESIGN.md and prints each item as PASS, WARN or FAIL with what to do about it.

use std::fmt;
use std::path::Path;

use crate::config::{
    check_private_dir, check_private_file, ClientCertificates, Config, Durability, IdentitySource,
    Transport,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

/// One checklist item's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub item: &'static str,
    pub status: Status,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {:<20} {}", self.status, self.item, self.detail)
    }
}

fn finding(item: &'static str, status: Status, detail: impl Into<String>) -> Finding {
    Finding {
        item,
        status,
        detail: detail.into(),
    }
}

/// Runs every check on the configuration file at `path`.
pub fn check(path: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    let config = match Config::load_for_doctor(path) {
        Ok(c) => {
            out.push(finding(
                "config",
                Status::Pass,
                format!("{} is valid", path.display()),
            ));
            c
        }
        Err(e) => {
            out.push(finding("config", Status::Fail, e.to_string()));
            return out;
        }
    };
    out.push(network_ports(&config));
    out.push(tls_everywhere(&config));
    out.push(client_authentication(&config));
    out.push(anonymous(&config));
    out.push(passwords(&config));
    out.push(acl(&config));
    out.push(revocation(&config));
    out.push(file_permissions(&config));
    out.push(persistence(&config));
    out
}

fn network_listeners(c: &Config) -> impl Iterator<Item = &crate::config::ListenerConfig> {
    c.listeners.iter().filter(|l| !l.is_loopback())
}

fn network_ports(c: &Config) -> Finding {
    let wrong: Vec<String> = network_listeners(c)
        .filter(|l| {
            !matches!(
                (l.transport, l.bind.port()),
                (Transport::Tls, 8883) | (Transport::Wss, 443)
            )
        })
        .map(|l| format!("{} ({:?} on {})", l.display_name(), l.transport, l.bind))
        .collect();
    if wrong.is_empty() {
        finding(
            "network-ports",
            Status::Pass,
            "network-reachable listeners are only MQTT/TLS on 8883 and WebSocket/TLS on 443",
        )
    } else {
        finding(
            "network-ports",
            Status::Fail,
            format!(
                "network-reachable listeners outside 8883 (tls) and 443 (wss): {}; bind them to loopback or move them",
                wrong.join(", ")
            ),
        )
    }
}

fn tls_everywhere(c: &Config) -> Finding {
    let plain: Vec<String> = network_listeners(c)
        .filter(|l| l.transport == Transport::Tcp)
        .map(|l| l.display_name())
        .collect();
    if plain.is_empty() {
        finding(
            "tls-everywhere",
            Status::Pass,
            "every network-reachable listener uses TLS",
        )
    } else {
        finding(
            "tls-everywhere",
            Status::Fail,
            format!(
                "plain TCP on the network: {}; use transport = \"tls\"",
                plain.join(", ")
            ),
        )
    }
}

fn client_authentication(c: &Config) -> Finding {
    let mut weak = Vec::new();
    let mut password_only = Vec::new();
    for l in network_listeners(c) {
        let certs = l
            .tls
            .as_ref()
            .map(|t| t.client_certificates)
            .unwrap_or(ClientCertificates::None);
        match (certs, l.identity) {
            (ClientCertificates::Required, _) => {}
            // The identity source itself demands a verified certificate.
            (
                ClientCertificates::Optional,
                IdentitySource::Certificate | IdentitySource::CertificateAndPassword,
            ) => {}
            (_, IdentitySource::Password | IdentitySource::CertificateOrPassword)
                if c.auth.passwords.is_some() =>
            {
                password_only.push(l.display_name())
            }
            _ => weak.push(l.display_name()),
        }
    }
    if !weak.is_empty() {
        finding(
            "client-auth",
            Status::Fail,
            format!(
                "listeners with neither client certificates nor passwords: {}",
                weak.join(", ")
            ),
        )
    } else if !password_only.is_empty() {
        finding(
            "client-auth",
            Status::Warn,
            format!(
                "listeners where a password alone lets a client in: {}; require client certificates where the clients can carry them",
                password_only.join(", ")
            ),
        )
    } else {
        finding(
            "client-auth",
            Status::Pass,
            "every network-reachable listener requires a client certificate",
        )
    }
}

fn anonymous(c: &Config) -> Finding {
    let anon: Vec<String> = network_listeners(c)
        .filter(|l| l.allow_anonymous)
        .map(|l| l.display_name())
        .collect();
    if anon.is_empty() {
        finding(
            "anonymous",
            Status::Pass,
            "no anonymous access from the network",
        )
    } else {
        finding(
            "anonymous",
            Status::Fail,
            format!(
                "anonymous clients accepted from the network on: {}",
                anon.join(", ")
            ),
        )
    }
}

fn passwords(c: &Config) -> Finding {
    match &c.auth.passwords {
        None => finding(
            "passwords",
            Status::Warn,
            "no password file: applications can only authenticate with certificates ([auth.passwords] file = ...)",
        ),
        Some(p) => match p.load_file() {
            Ok(f) => finding(
                "passwords",
                Status::Pass,
                format!("{}: {} user(s)", p.file.display(), f.len()),
            ),
            Err(e) => finding("passwords", Status::Fail, e.to_string()),
        },
    }
}

fn acl(c: &Config) -> Finding {
    match &c.auth.acl_file {
        None => finding(
            "acl",
            Status::Fail,
            "no ACL file: every authenticated client may publish and subscribe to every topic; set [auth] acl_file",
        ),
        Some(p) => match crate::auth::load_acl(p) {
            Ok(a) if a.rule_count() == 0 => finding(
                "acl",
                Status::Fail,
                format!("{}: no rules, so every client is denied everything", p.display()),
            ),
            Ok(a) => finding(
                "acl",
                Status::Pass,
                format!("{}: {} rule(s), default deny", p.display(), a.rule_count()),
            ),
            Err(e) => finding("acl", Status::Fail, e),
        },
    }
}

fn revocation(c: &Config) -> Finding {
    let missing: Vec<String> = c
        .listeners
        .iter()
        .filter(|l| {
            l.tls.as_ref().is_some_and(|t| {
                t.client_certificates != ClientCertificates::None && t.crl_file.is_none()
            })
        })
        .map(|l| l.display_name())
        .collect();
    if missing.is_empty() {
        finding(
            "revocation",
            Status::Pass,
            "every listener that takes client certificates checks a CRL",
        )
    } else {
        finding(
            "revocation",
            Status::Warn,
            format!(
                "no crl_file on: {}; a stolen device certificate could not be revoked",
                missing.join(", ")
            ),
        )
    }
}

fn file_permissions(c: &Config) -> Finding {
    let mut problems = Vec::new();
    for l in &c.listeners {
        if let Some(t) = &l.tls {
            if let Err(e) = check_private_file(&t.key_file) {
                problems.push(e);
            }
        }
    }
    if let Some(p) = &c.auth.passwords {
        if let Err(e) = check_private_file(&p.file) {
            problems.push(e);
        }
    }
    if let Some(a) = &c.auth.acl_file {
        if let Some(mode) = crate::config::file_mode(a) {
            if mode & 0o022 != 0 {
                problems.push(format!(
                    "{} is writable by group or others (mode {mode:04o}); run `chmod 644 {}`",
                    a.display(),
                    a.display()
                ));
            }
        }
    }
    if c.persistence.enabled && c.persistence.path.exists() {
        if let Err(e) = check_private_dir(&c.persistence.path) {
            problems.push(e);
        }
    }
    if problems.is_empty() {
        finding(
            "file-permissions",
            Status::Pass,
            "keys, password file and store are private",
        )
    } else {
        finding("file-permissions", Status::Fail, problems.join("; "))
    }
}

fn persistence(c: &Config) -> Finding {
    let p = &c.persistence;
    match (p.enabled, p.durability) {
        (false, _) => finding(
            "persistence",
            Status::Warn,
            "persistence disabled: retained messages and offline sessions are lost on restart",
        ),
        (true, Durability::Periodic) => finding(
            "persistence",
            Status::Warn,
            format!(
                "periodic durability: a crash can lose up to {} ms of acknowledged messages",
                p.flush_interval_ms
            ),
        ),
        (true, Durability::Sync) => finding(
            "persistence",
            Status::Pass,
            "sync durability: nothing acknowledged is lost to a crash",
        ),
    }
}
