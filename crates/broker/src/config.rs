//! Broker configuration: a strict TOML file (unknown keys are errors), defaults for every
//! bound, and [`Config::validate`], which runs before anything binds. Every error names
//! the file, the key and what to do about it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Exit code for a bad configuration (EX_CONFIG would be 78; 64 is EX_USAGE, which the
/// design fixes for every start-up refusal caused by the operator's input).
pub const EXIT_BAD_CONFIG: i32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the configuration file: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// One or more listeners; each enforces its own transport and authentication settings.
    #[serde(rename = "listener", default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub persistence: PersistenceConfig,
    #[serde(default)]
    pub sys: SysConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub reload: ReloadConfig,
    #[serde(default)]
    pub abuse: crate::abuse::AbuseConfig,
    #[serde(default)]
    pub auth: crate::auth::AuthConfig,
    #[serde(default)]
    pub audit: crate::audit::AuditConfig,
    #[serde(default)]
    pub ctl: crate::ctl::CtlConfig,
    /// The Prometheus endpoint; off by default, loopback only unless opted out.
    #[serde(default)]
    pub metrics: crate::metrics::MetricsConfig,
    /// The tunnel relay (`/tunnel/v1` on the wss listeners); off by default.
    #[serde(default)]
    pub tunnel: bulwark_tunnel::relay::RelayConfig,
    /// Where the configuration was read from (for error messages); not a TOML key.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// MQTT over plain TCP. Loopback addresses only, unless explicitly allowed.
    Tcp,
    /// MQTT over TLS (port 8883).
    Tls,
    /// MQTT over WebSocket over TLS (port 443, path `/mqtt`, subprotocol `mqtt`).
    Wss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertificates {
    /// Every client must present a certificate signed by `client_ca_file`.
    Required,
    /// A certificate is verified if presented; clients without one need another way in.
    Optional,
    /// Client certificates are not requested.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// A name for logs; defaults to the transport and address.
    #[serde(default)]
    pub name: Option<String>,
    /// Address and port to bind, e.g. "0.0.0.0:8883" or "127.0.0.1:1883".
    pub bind: SocketAddr,
    pub transport: Transport,
    /// TLS settings; required for `tls` and `wss`, forbidden for `tcp`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// HTTP path of the MQTT WebSocket endpoint (`wss` only).
    #[serde(default = "default_ws_path")]
    pub ws_path: String,
    /// Accept clients that present no client certificate. Off by default; allowed only
    /// on loopback addresses unless `allow_anonymous_on_network` is also set.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Explicit opt-out: accept anonymous clients on a network-reachable address.
    #[serde(default)]
    pub allow_anonymous_on_network: bool,
    /// Explicit opt-out: plain TCP on a network-reachable address (a warning is logged at
    /// every start).
    #[serde(default)]
    pub allow_plaintext_on_network: bool,
    /// Where a client's identity comes from on this listener.
    #[serde(default)]
    pub identity: IdentitySource,
}

/// Where a client's identity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    /// The verified client certificate; a username, if sent, must equal it.
    Certificate,
    /// Username and password from the password file.
    Password,
    /// Both: a verified certificate and a password for a username equal to it.
    CertificateAndPassword,
    /// The certificate when one is presented, otherwise username and password.
    #[default]
    CertificateOrPassword,
}

impl IdentitySource {
    pub fn accepts_password(self) -> bool {
        !matches!(self, IdentitySource::Certificate)
    }
    pub fn needs_password(self) -> bool {
        matches!(
            self,
            IdentitySource::Password | IdentitySource::CertificateAndPassword
        )
    }
    pub fn needs_certificate(self) -> bool {
        matches!(
            self,
            IdentitySource::Certificate | IdentitySource::CertificateAndPassword
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain (leaf first).
    pub cert_file: PathBuf,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM file with the CA certificates that sign client certificates.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    #[serde(default = "default_client_certificates")]
    pub client_certificates: ClientCertificates,
    /// PEM file with the CRL(s) of the client CA. Revoked certificates are refused at the
    /// handshake; when the file changes, connected holders of newly revoked certificates
    /// are disconnected.
    #[serde(default)]
    pub crl_file: Option<PathBuf>,
    /// Which certificate field is the client's identity.
    #[serde(default)]
    pub identity_field: CertificateField,
}

/// The certificate field that names a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertificateField {
    /// Subject common name.
    #[default]
    Cn,
    /// First DNS name of the subject alternative names.
    SanDns,
    /// First URI of the subject alternative names.
    SanUri,
}

/// Every bound the broker enforces. Defaults are sized for a plant-scale deployment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open client connections at once; further connections are closed on accept.
    pub max_connections: usize,
    /// Largest MQTT packet accepted, in bytes (fixed header included).
    pub max_packet_size: usize,
    /// Largest first packet (CONNECT) before the client is authenticated, in bytes.
    pub max_connect_packet_size: usize,
    /// Seconds from TCP accept to a complete CONNECT (covers TLS and WebSocket handshakes).
    pub connect_timeout_secs: u64,
    /// Largest keepalive a client may ask for, in seconds; larger ones are refused.
    pub max_keepalive_secs: u16,
    /// Whether a keepalive of 0 (no keepalive at all) is accepted.
    pub allow_zero_keepalive: bool,
    /// Longest client identifier accepted, in bytes.
    pub max_client_id_len: usize,
    /// QoS 1 and 2 messages sent to one client and not yet acknowledged.
    pub max_inflight: usize,
    /// Messages queued for one session (online and slow, or offline and persistent).
    pub max_queued_messages: usize,
    /// Bytes of payload queued for one session.
    pub max_queued_bytes: usize,
    /// Seconds a persistent session is kept while its client stays away (0 = forever).
    pub session_expiry_secs: u64,
    /// Retained messages kept broker-wide.
    pub max_retained_messages: usize,
    /// Bytes of retained payload kept broker-wide.
    pub max_retained_bytes: usize,
    /// Subscriptions one client may hold.
    pub max_subscriptions_per_client: usize,
    /// Levels (`/`-separated) in a topic name or filter.
    pub max_topic_levels: usize,
    /// Seconds a write to a client may take before the client is considered stuck and
    /// disconnected (a subscriber that stops reading).
    pub write_timeout_secs: u64,
    /// Milliseconds a plain-TCP connection may be idle (nothing read, nothing to send)
    /// before it gives up its task and waits in the parking lot, which keeps far less
    /// memory per connection. A new connection is parked right after CONNACK if it has
    /// nothing to do. `0` parks whenever a connection is idle.
    pub park_idle_after_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_packet_size: 1024 * 1024,
            max_connect_packet_size: 64 * 1024,
            connect_timeout_secs: 10,
            max_keepalive_secs: 3600,
            allow_zero_keepalive: false,
            max_client_id_len: 256,
            max_inflight: 32,
            max_queued_messages: 1000,
            max_queued_bytes: 16 * 1024 * 1024,
            session_expiry_secs: 7 * 24 * 3600,
            max_retained_messages: 100_000,
            max_retained_bytes: 256 * 1024 * 1024,
            max_subscriptions_per_client: 1000,
            max_topic_levels: 32,
            write_timeout_secs: 30,
            park_idle_after_ms: 1000,
        }
    }
}

impl Limits {
    pub fn park_idle_after(&self) -> Duration {
        Duration::from_millis(self.park_idle_after_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// A retained message or a message queued for a persistent session is on disk before
    /// the PUBACK/PUBREC that acknowledges it (group commit: one flush serves many).
    Sync,
    /// Flush every `flush_interval_ms` (like Mosquitto's autosave); a crash can lose the
    /// last interval.
    Periodic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersistenceConfig {
    /// Keep retained messages and persistent sessions across restarts.
    pub enabled: bool,
    /// Directory of the store (created 0700).
    pub path: PathBuf,
    pub durability: Durability,
    /// Flush interval for `periodic` durability, in milliseconds.
    pub flush_interval_ms: u64,
    /// Memory the store may use for its page cache, in bytes.
    pub cache_capacity_bytes: u64,
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        PersistenceConfig {
            enabled: true,
            path: PathBuf::from("/var/lib/bulwark/broker"),
            durability: Durability::Sync,
            flush_interval_ms: 1000,
            cache_capacity_bytes: 32 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SysConfig {
    /// Seconds between updates of the `$SYS/broker/...` topics (0 disables them).
    pub interval_secs: u64,
}

impl Default for SysConfig {
    fn default() -> Self {
        SysConfig { interval_secs: 10 }
    }
}

/// Most threads `[runtime] threads` may ask for.
pub const MAX_THREADS: usize = 256;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Threads serving client connections: 1 (every connection on the main thread), N (a
    /// pool of N workers) or 0 (one worker per CPU the broker may run on).
    pub threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { threads: 1 }
    }
}

impl RuntimeConfig {
    /// The number of threads to serve connections on: `threads`, or with 0 one per CPU
    /// the process may run on (its affinity mask and cgroup quota, as `taskset`,
    /// `CPUAffinity=` and container limits set them).
    pub fn thread_count(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(MAX_THREADS)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Seconds between checks of the TLS, CRL, password and ACL files for changes
    /// (0: reload only on SIGHUP).
    pub watch_interval_secs: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch_interval_secs: 2,
        }
    }
}

/// Mode bits of a file, for permission checks.
pub fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// A file holding a secret must not be readable or writable by group or others (F1).
pub fn check_private_file(path: &Path) -> Result<(), String> {
    match file_mode(path) {
        Some(mode) if mode & 0o077 != 0 => Err(format!(
            "{} is accessible by group or others (mode {mode:04o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        )),
        _ => Ok(()),
    }
}

/// A directory holding data must be private to the broker's user (F1).
pub fn check_private_dir(path: &Path) -> Result<(), String> {
    match file_mode(path) {
        Some(mode) if mode & 0o077 != 0 => Err(format!(
            "{} is accessible by group or others (mode {mode:04o}); run `chmod 700 {}`",
            path.display(),
            path.display()
        )),
        _ => Ok(()),
    }
}

fn default_ws_path() -> String {
    "/mqtt".to_string()
}

fn default_client_certificates() -> ClientCertificates {
    ClientCertificates::Required
}

impl ListenerConfig {
    pub fn display_name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("{:?}@{}", self.transport, self.bind).to_lowercase(),
        }
    }

    pub fn is_loopback(&self) -> bool {
        self.bind.ip().is_loopback()
    }
}

impl Config {
    /// Reads, parses and validates `path`. Relative paths inside the file are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text strictly, without validation or path resolution.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.source = file.to_path_buf();
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for l in &mut self.listeners {
            if let Some(tls) = &mut l.tls {
                fix(&mut tls.cert_file);
                fix(&mut tls.key_file);
                if let Some(ca) = &mut tls.client_ca_file {
                    fix(ca);
                }
                if let Some(crl) = &mut tls.crl_file {
                    fix(crl);
                }
            }
        }
        fix(&mut self.persistence.path);
        if let Some(a) = &mut self.auth.acl_file {
            fix(a);
        }
        if let Some(a) = &mut self.audit.file {
            fix(a);
        }
        if let Some(c) = &mut self.ctl.socket {
            fix(c);
        }
        if let Some(p) = &mut self.auth.passwords {
            fix(&mut p.file);
        }
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Checks everything that can be checked before binding: listener combinations,
    /// secure-default opt-outs, files that must exist, and bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_inner(true)
    }

    /// Reads, parses and validates `path` without the checks of the files it names
    /// (permissions, password and ACL contents), which `doctor` reports item by item.
    pub fn load_for_doctor(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate_inner(false)?;
        Ok(config)
    }

    fn validate_inner(&self, check_files: bool) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(self.invalid(
                "listener",
                "no listener configured; add a [[listener]] table, e.g. bind = \"0.0.0.0:8883\", transport = \"tls\"",
            ));
        }
        if self.runtime.threads > MAX_THREADS {
            return Err(self.invalid(
                "runtime.threads",
                format!(
                    "{} threads asked for; at most {MAX_THREADS} (1: everything on the main thread, 0: one per CPU)",
                    self.runtime.threads
                ),
            ));
        }
        let passwords = self.auth.passwords.is_some();
        let mut seen = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("listener[{i}]");
            if l.bind.port() != 0 && !seen.insert(l.bind) {
                return Err(self.invalid(
                    format!("{key}.bind"),
                    format!(
                        "{} is used by two listeners; give each its own port",
                        l.bind
                    ),
                ));
            }
            match (l.transport, &l.tls) {
                (Transport::Tcp, Some(_)) => {
                    return Err(self.invalid(
                        format!("{key}.tls"),
                        "a tcp listener takes no [listener.tls] table; use transport = \"tls\" for MQTT over TLS",
                    ))
                }
                (Transport::Tls | Transport::Wss, None) => {
                    return Err(self.invalid(
                        format!("{key}.tls"),
                        "a tls or wss listener needs a [listener.tls] table with cert_file and key_file (development material: `make certs`)",
                    ))
                }
                _ => {}
            }
            if l.transport == Transport::Tcp && !l.is_loopback() && !l.allow_plaintext_on_network {
                return Err(self.invalid(
                    format!("{key}.bind"),
                    format!(
                        "plain TCP on the network-reachable address {} is refused; use transport = \"tls\", bind a loopback address, or set allow_plaintext_on_network = true to opt out",
                        l.bind
                    ),
                ));
            }
            if l.allow_anonymous && !l.is_loopback() && !l.allow_anonymous_on_network {
                return Err(self.invalid(
                    format!("{key}.allow_anonymous"),
                    format!(
                        "anonymous clients on the network-reachable address {} are refused; require client certificates, bind a loopback address, or set allow_anonymous_on_network = true to opt out",
                        l.bind
                    ),
                ));
            }
            if l.transport == Transport::Wss && !l.ws_path.starts_with('/') {
                return Err(self.invalid(
                    format!("{key}.ws_path"),
                    "must start with '/', e.g. \"/mqtt\"",
                ));
            }
            if let Some(tls) = &l.tls {
                for (k, p) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
                    if !p.is_file() {
                        return Err(self.invalid(
                            format!("{key}.tls.{k}"),
                            format!(
                                "{}: no such file; generate development material with `make certs`",
                                p.display()
                            ),
                        ));
                    }
                }
                match (tls.client_certificates, &tls.client_ca_file) {
                    (ClientCertificates::None, _) => {}
                    (_, None) => {
                        return Err(self.invalid(
                            format!("{key}.tls.client_ca_file"),
                            "client certificates are requested but no client_ca_file is set; name the CA that signs client certificates, or set client_certificates = \"none\"",
                        ))
                    }
                    (_, Some(ca)) if !ca.is_file() => {
                        return Err(self.invalid(
                            format!("{key}.tls.client_ca_file"),
                            format!("{}: no such file", ca.display()),
                        ))
                    }
                    _ => {}
                }
                if let Some(crl) = &tls.crl_file {
                    if !crl.is_file() {
                        return Err(self.invalid(
                            format!("{key}.tls.crl_file"),
                            format!(
                                "{}: no such file; `bulwark-pki init` writes an empty CRL",
                                crl.display()
                            ),
                        ));
                    }
                    if tls.client_certificates == ClientCertificates::None {
                        return Err(self.invalid(
                            format!("{key}.tls.crl_file"),
                            "a CRL needs client certificates; remove crl_file or request client certificates",
                        ));
                    }
                }
                let key_ok = if check_files {
                    check_private_file(&tls.key_file)
                } else {
                    Ok(())
                };
                if let Err(e) = key_ok {
                    return Err(self.invalid(format!("{key}.tls.key_file"), e));
                }
                let cert_auth = tls.client_certificates == ClientCertificates::Required;
                if !cert_auth && !l.allow_anonymous && !passwords {
                    return Err(self.invalid(
                        format!("{key}.tls.client_certificates"),
                        "clients without a certificate could never log in on this listener; use client_certificates = \"required\", configure [auth.passwords], or allow_anonymous = true on a loopback listener",
                    ));
                }
                if l.identity.needs_certificate()
                    && tls.client_certificates == ClientCertificates::None
                {
                    return Err(self.invalid(
                        format!("{key}.identity"),
                        "this identity source needs client certificates, but client_certificates = \"none\"",
                    ));
                }
            } else {
                if l.identity.needs_certificate() {
                    return Err(self.invalid(
                        format!("{key}.identity"),
                        "a tcp listener has no client certificates; use identity = \"password\" or a tls listener",
                    ));
                }
                if !l.allow_anonymous && !passwords {
                    return Err(self.invalid(
                        format!("{key}.allow_anonymous"),
                        "a tcp listener has no client certificates; configure [auth.passwords], or set allow_anonymous = true (loopback only), or use transport = \"tls\"",
                    ));
                }
            }
            if l.identity.needs_password() && !passwords {
                return Err(self.invalid(
                    format!("{key}.identity"),
                    "this identity source needs passwords; add [auth.passwords] with file = ...",
                ));
            }
        }
        if check_files && self.persistence.enabled && self.persistence.path.exists() {
            if let Err(e) = check_private_dir(&self.persistence.path) {
                return Err(self.invalid("persistence.path", e));
            }
        }
        let lim = &self.limits;
        let positive: [(&str, usize); 9] = [
            ("limits.max_connections", lim.max_connections),
            ("limits.max_packet_size", lim.max_packet_size),
            (
                "limits.max_connect_packet_size",
                lim.max_connect_packet_size,
            ),
            ("limits.max_client_id_len", lim.max_client_id_len),
            ("limits.max_inflight", lim.max_inflight),
            ("limits.max_queued_messages", lim.max_queued_messages),
            ("limits.max_queued_bytes", lim.max_queued_bytes),
            (
                "limits.max_subscriptions_per_client",
                lim.max_subscriptions_per_client,
            ),
            ("limits.max_topic_levels", lim.max_topic_levels),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(self.invalid(k, "must be greater than 0"));
            }
        }
        if lim.max_packet_size < 16 || lim.max_packet_size > 268_435_460 {
            return Err(self.invalid(
                "limits.max_packet_size",
                "must be between 16 and 268435460 bytes (the MQTT maximum)",
            ));
        }
        if lim.max_inflight > 65_535 {
            return Err(self.invalid("limits.max_inflight", "must be at most 65535"));
        }
        if let Some(pc) = &self.auth.passwords {
            pc.validate().map_err(|e| {
                self.invalid(format!("auth.passwords.{}", e.key), e.message.clone())
            })?;
            if check_files {
                crate::auth::load_passwords(pc)
                    .map_err(|e| self.invalid("auth.passwords.file", e))?;
            }
        }
        if let Some(acl) = &self.auth.acl_file {
            if check_files {
                crate::auth::load_acl(acl).map_err(|e| self.invalid("auth.acl_file", e))?;
            }
        }
        for (i, a) in self.abuse.allow_list.iter().enumerate() {
            if let Err(e) = crate::abuse::Network::parse(a) {
                return Err(self.invalid(format!("abuse.allow_list[{i}]"), e));
            }
        }
        if let Err((key, message)) = self.metrics.validate(&self.listeners) {
            return Err(self.invalid(key, message));
        }
        if let Err((key, message)) = self.tunnel.validate() {
            return Err(self.invalid(key, message));
        }
        if self.tunnel.enabled && !self.listeners.iter().any(|l| l.transport == Transport::Wss) {
            return Err(self.invalid(
                "tunnel.enabled",
                "the relay is served on wss listeners, and there is none; add a [[listener]] with transport = \"wss\" (port 443)",
            ));
        }
        if self.abuse.max_auth_failures == 0 {
            return Err(self.invalid("abuse.max_auth_failures", "must be at least 1"));
        }
        if self.abuse.max_tracked == 0 {
            return Err(self.invalid("abuse.max_tracked", "must be at least 1"));
        }
        if lim.write_timeout_secs == 0 {
            return Err(self.invalid("limits.write_timeout_secs", "must be at least 1"));
        }
        if lim.connect_timeout_secs == 0 {
            return Err(self.invalid("limits.connect_timeout_secs", "must be at least 1"));
        }
        if self.persistence.enabled
            && self.persistence.durability == Durability::Periodic
            && self.persistence.flush_interval_ms == 0
        {
            return Err(self.invalid(
                "persistence.flush_interval_ms",
                "must be at least 1 with durability = \"periodic\"",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let c = Config::parse(text, Path::new("test.toml"))?;
        c.validate()?;
        Ok(c)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = err("[[listener]]\nbind = \"127.0.0.1:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\nfoo = 1\n");
        assert!(e.contains("unknown field `foo`"), "{e}");
        let e = err("[limits]\nmax_conections = 5\n");
        assert!(e.contains("max_conections"), "{e}");
    }

    #[test]
    fn loopback_anonymous_tcp_is_accepted_with_defaults() {
        let c = parse("[[listener]]\nbind = \"127.0.0.1:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\n").unwrap();
        assert_eq!(c.limits.max_packet_size, 1024 * 1024);
        assert_eq!(c.persistence.durability, Durability::Sync);
    }

    #[test]
    fn plaintext_on_network_needs_opt_out() {
        let e = err("[[listener]]\nbind = \"0.0.0.0:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\nallow_anonymous_on_network = true\n");
        assert!(e.contains("allow_plaintext_on_network"), "{e}");
        let e = err("[[listener]]\nbind = \"0.0.0.0:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\nallow_plaintext_on_network = true\n");
        assert!(e.contains("allow_anonymous_on_network"), "{e}");
        parse("[[listener]]\nbind = \"0.0.0.0:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\nallow_plaintext_on_network = true\nallow_anonymous_on_network = true\n").unwrap();
    }

    #[test]
    fn tcp_listener_without_anonymous_is_refused() {
        let e = err("[[listener]]\nbind = \"127.0.0.1:1883\"\ntransport = \"tcp\"\n");
        assert!(e.contains("listener[0].allow_anonymous"), "{e}");
    }

    #[test]
    fn tls_listener_needs_files() {
        let e = err("[[listener]]\nbind = \"0.0.0.0:8883\"\ntransport = \"tls\"\n");
        assert!(e.contains("needs a [listener.tls] table"), "{e}");
        let e = err("[[listener]]\nbind = \"0.0.0.0:8883\"\ntransport = \"tls\"\n[listener.tls]\ncert_file = \"/nonexistent/s.pem\"\nkey_file = \"/nonexistent/s.key\"\n");
        assert!(
            e.contains("listener[0].tls.cert_file") && e.contains("make certs"),
            "{e}"
        );
    }

    #[test]
    fn zero_bounds_are_refused() {
        let e = err("[[listener]]\nbind = \"127.0.0.1:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\n[limits]\nmax_inflight = 0\n");
        assert!(e.contains("limits.max_inflight"), "{e}");
    }

    #[test]
    fn duplicate_bind_is_refused() {
        let e = err("[[listener]]\nbind = \"127.0.0.1:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\n[[listener]]\nbind = \"127.0.0.1:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\n");
        assert!(e.contains("used by two listeners"), "{e}");
    }

    #[test]
    fn runtime_threads_default_to_one_and_are_bounded() {
        let tcp = "[[listener]]\nbind = \"127.0.0.1:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\n";
        let c = parse(tcp).unwrap();
        assert_eq!(c.runtime.threads, 1);
        assert_eq!(c.runtime.thread_count(), 1);
        let c = parse(&format!("{tcp}[runtime]\nthreads = 0\n")).unwrap();
        assert_eq!(
            c.runtime.thread_count(),
            std::thread::available_parallelism()
                .unwrap()
                .get()
                .min(MAX_THREADS)
        );
        let c = parse(&format!("{tcp}[runtime]\nthreads = 3\n")).unwrap();
        assert_eq!(c.runtime.thread_count(), 3);
        let e = err(&format!("{tcp}[runtime]\nthreads = 257\n"));
        assert!(
            e.contains("runtime.threads") && e.contains("at most 256"),
            "{e}"
        );
        let e = err(&format!("{tcp}[runtime]\nworkers = 2\n"));
        assert!(e.contains("workers"), "{e}");
    }
}
