//! Authentication and authorization of clients.
//!
//! - [`passwords`]: the password file (argon2id, with Mosquitto `$7$`/`$6$` entries accepted
//!   and upgraded at login) and the bounded async [`passwords::Verifier`].
//! - [`Authority`]: what the connection tasks and the router ask — the current ACL (the
//!   `bulwark_protocol::acl` engine over the configured file) and the password verifier —
//!   and hot reload of both files. A reload that fails keeps the last good version.

pub mod passwords;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bulwark_protocol::acl::{AclFile, Decision, Principal};
use bulwark_protocol::{TopicFilter, TopicName};
use serde::Deserialize;

use self::passwords::{PasswordConfig, PasswordFile, Verifier};
use crate::reload::FileWatch;

/// `[auth]` in the broker configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// ACL file (Mosquitto syntax plus explicit deny, default deny, `clientid` rules and
    /// tunnel grants). Without one, every authenticated client may use every topic that
    /// does not start with `$` (and read `$SYS`): a warning at every start, a FAIL in
    /// `doctor`.
    #[serde(default)]
    pub acl_file: Option<PathBuf>,
    /// Username/password authentication: `[auth.passwords]` with `file = ...`.
    #[serde(default)]
    pub passwords: Option<PasswordConfig>,
}

/// What applies when no ACL file is configured.
const ALLOW_ALL: &str = "\
topic readwrite #
topic read $SYS/#
pattern readwrite #
pattern read $SYS/#
";

/// Reads and parses an ACL file; the error names the file and the line. A file without
/// rules is refused: it would deny everything, which is never what an operator meant.
pub fn load_acl(path: &Path) -> Result<AclFile, String> {
    // Who can write the ACL can grant themselves anything: checked at start and at
    // every reload.
    if let Some(mode) = crate::config::file_mode(path) {
        if mode & 0o022 != 0 {
            return Err(format!(
                "{} is writable by group or others (mode {mode:04o}); run `chmod 644 {}`",
                path.display(),
                path.display()
            ));
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the ACL file: {e}", path.display()))?;
    let acl = AclFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if acl.rule_count() == 0 {
        return Err(format!(
            "{}: the ACL file has no rules, so every client would be denied everything; add rules (see the README's ACL section)",
            path.display()
        ));
    }
    Ok(acl)
}

/// A change that a reload made.
#[derive(Debug)]
pub enum AuthReload {
    AclReloaded { rules: usize },
    AclFailed(String),
    PasswordsReloaded { removed: Vec<String> },
    PasswordsFailed(String),
}

/// The broker's authentication and authorization state, shared by every connection.
#[derive(Debug)]
pub struct Authority {
    acl: RwLock<Arc<AclFile>>,
    acl_path: Option<PathBuf>,
    acl_watch: FileWatch,
    verifier: Option<Verifier>,
    passwords: Option<PasswordConfig>,
    password_watch: FileWatch,
}

impl Authority {
    /// Loads the configured files. Errors name the file and line.
    pub fn from_config(config: &AuthConfig) -> Result<Authority, String> {
        let acl = match &config.acl_file {
            Some(p) => load_acl(p)?,
            None => AclFile::parse(ALLOW_ALL).map_err(|e| e.to_string())?,
        };
        let verifier = match &config.passwords {
            Some(pc) => {
                let file = pc.load_file().map_err(|e| e.to_string())?;
                Some(Verifier::new(Arc::new(RwLock::new(file)), pc))
            }
            None => None,
        };
        Ok(Authority {
            acl: RwLock::new(Arc::new(acl)),
            acl_watch: FileWatch::new(config.acl_file.as_deref()),
            acl_path: config.acl_file.clone(),
            verifier,
            password_watch: FileWatch::new(config.passwords.as_ref().map(|p| p.file.as_path())),
            passwords: config.passwords.clone(),
        })
    }

    /// Everything allowed to authenticated clients (tests and embedding).
    pub fn allow_all() -> Authority {
        Authority::from_config(&AuthConfig::default()).expect("built-in rules parse")
    }

    /// Whether an ACL file is configured (otherwise the allow-all rules apply).
    pub fn has_acl_file(&self) -> bool {
        self.acl_path.is_some()
    }

    pub fn acl(&self) -> Arc<AclFile> {
        self.acl.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn verifier(&self) -> Option<&Verifier> {
        self.verifier.as_ref()
    }

    /// CONNECT: may this identity use this client id? Without an ACL file any client id is
    /// accepted.
    pub fn check_connect(&self, identity: Option<&str>, client_id: &str) -> Option<Decision> {
        if !self.has_acl_file() {
            return None;
        }
        Some(self.acl().check_connect(identity, client_id))
    }

    pub fn check_publish(&self, who: &Principal<'_>, topic: &TopicName) -> Decision {
        self.acl().check_publish(who, topic)
    }

    pub fn check_subscribe(&self, who: &Principal<'_>, filter: &TopicFilter) -> Decision {
        self.acl().check_subscribe(who, filter)
    }

    pub fn may_read(&self, who: &Principal<'_>, topic: &TopicName) -> bool {
        self.acl().allows_read(who, topic)
    }

    /// Reloads the ACL and password files if they changed (or `force`).
    pub fn reload_if_changed(&self, force: bool) -> Vec<AuthReload> {
        let mut out = Vec::new();
        if let Some(path) = &self.acl_path {
            if self.acl_watch.changed(force) {
                match load_acl(path) {
                    Ok(acl) => {
                        let rules = acl.rule_count();
                        *self.acl.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(acl);
                        out.push(AuthReload::AclReloaded { rules });
                    }
                    Err(e) => out.push(AuthReload::AclFailed(e)),
                }
            }
        }
        if let (Some(pc), Some(verifier)) = (&self.passwords, &self.verifier) {
            if self.password_watch.changed(force) {
                match pc.load_file() {
                    Ok(new) => {
                        let mut guard = verifier.file().write().unwrap_or_else(|p| p.into_inner());
                        let removed = guard
                            .users()
                            .into_iter()
                            .filter(|u| !new.contains(u))
                            .map(str::to_string)
                            .collect();
                        *guard = new;
                        out.push(AuthReload::PasswordsReloaded { removed });
                    }
                    Err(e) => out.push(AuthReload::PasswordsFailed(e.to_string())),
                }
            }
        }
        out
    }

    /// Whether `user` is (still) in the password file.
    pub fn has_user(&self, user: &str) -> bool {
        self.verifier.as_ref().is_some_and(|v| {
            v.file()
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(user)
        })
    }
}

/// Reads a whole password file for `check-config`/`doctor`.
pub fn load_passwords(config: &PasswordConfig) -> Result<PasswordFile, String> {
    config.load_file().map_err(|e| e.to_string())
}
