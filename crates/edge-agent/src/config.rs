//! The agent's configuration: one strict TOML file (unknown keys are errors), a default for
//! every bound, validated before anything starts; errors name the file, the key and the fix.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Exit code for a bad configuration.
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The device id: the identity in the device certificate (CN), and the `<id>` in
    /// `devices/<id>/...`.
    pub device_id: String,
    pub uplink: UplinkConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub commands: CommandsConfig,
    /// Built-in sources: `[[source.exec]]`, `[[source.tail]]` (see `bulwark_agent::sources`).
    #[serde(default, rename = "source")]
    pub sources: crate::sources::SourcesConfig,
    /// Remote sessions through the broker's tunnel relay (`[tunnel]`, `[tunnel.services]`);
    /// off unless `enabled = true`. See `bulwark_agent::tunnel`.
    #[serde(default)]
    pub tunnel: bulwark_tunnel::device::DeviceTunnelConfig,
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Brokers in order of preference: `mqtts://host:8883` or `wss://host:443/mqtt`. The
    /// agent fails over to the next one when a connection attempt fails.
    pub brokers: Vec<String>,
    /// PEM CA certificates that sign the broker's certificate. Without it the system's
    /// roots are used (`use_system_roots = true` must then be set explicitly).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub use_system_roots: bool,
    /// The device certificate (PEM) and its key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u16,
    /// QoS 1 publishes sent and not yet acknowledged.
    #[serde(default = "default_inflight")]
    pub max_inflight: u16,
    /// Reconnect back-off: starts at the minimum, doubles up to the maximum, with jitter.
    #[serde(default = "default_backoff_min")]
    pub backoff_min_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Seconds for TCP, TLS and CONNACK together.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Records older than this when they are sent are marked `historical`. Records that
    /// waited in the queue longer than this when a connection comes up are the backlog,
    /// drained at `backlog_drain_per_sec` beside the live data.
    #[serde(default = "default_historical")]
    pub historical_after_secs: u64,
    /// Backlog records sent per second after an outage, on top of live data (which is never
    /// held back by the backlog).
    #[serde(default = "default_drain")]
    pub backlog_drain_per_sec: u32,
}

/// The periodic health report on `devices/<id>/health`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Seconds between reports while connected (also sent at every connect).
    pub interval_secs: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { interval_secs: 60 }
    }
}

/// Built-in commands the agent accepts on `devices/<id>/cmd/<name>`.
pub const BUILTIN_COMMANDS: &[&str] = &["ping", "health"];

/// Remote commands.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// The commands this gateway answers; others are refused and reported. Only built-in
    /// commands can be listed: the agent never runs a command it received as text.
    pub allow: Vec<String>,
    /// Commands answered per minute; more are ignored without an answer (a flood must not
    /// become a flood of answers) and counted in a sampled `command_rate_limited` audit line.
    pub max_per_minute: u32,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            allow: BUILTIN_COMMANDS.iter().map(|s| s.to_string()).collect(),
            max_per_minute: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// sled's flush (survives a crash of the agent, not a power cut). The default: it
    /// keeps ingest fast, and most gateways lose power rarely next to how often software
    /// restarts.
    #[default]
    Flush,
    /// Also fsync the store's files before acknowledging a producer (survives power
    /// loss; fewer records/s).
    Fsync,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Directory of the store-and-forward queue (created 0700).
    pub path: PathBuf,
    pub durability: Durability,
    /// Disk budget; when full, the oldest telemetry is dropped and counted.
    pub max_bytes: u64,
    /// Memory the store may use for its page cache.
    pub cache_capacity_bytes: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            path: PathBuf::from("/var/lib/bulwark-agent/queue"),
            durability: Durability::Flush,
            max_bytes: 1024 * 1024 * 1024,
            cache_capacity_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// The Unix socket local producers write to (never a network socket).
    pub socket: PathBuf,
    /// Permissions of the socket, octal as a string ("0660").
    pub socket_mode: String,
    /// Request lines of one connection read and not yet answered; reading pauses at this
    /// many (see `bulwark_agent::ingest::IngestLimits::max_pending_lines`).
    pub max_pending_lines: usize,
    /// Bytes of request lines of one connection read and not yet answered; reading pauses
    /// at this many.
    pub max_pending_bytes: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            socket: PathBuf::from("/run/bulwark-agent/ingest.sock"),
            socket_mode: "0660".into(),
            max_pending_lines: crate::ingest::DEFAULT_MAX_PENDING_LINES,
            max_pending_bytes: crate::ingest::DEFAULT_MAX_PENDING_BYTES,
        }
    }
}

fn default_keepalive() -> u16 {
    30
}
fn default_inflight() -> u16 {
    64
}
fn default_backoff_min() -> u64 {
    500
}
fn default_backoff_max() -> u64 {
    30_000
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_historical() -> u64 {
    300
}
fn default_drain() -> u32 {
    1000
}

/// A broker the agent can dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerUrl {
    /// MQTT over TLS.
    Mqtts { host: String, port: u16 },
    /// MQTT over WebSocket over TLS; `url` is the whole `wss://...` URL.
    Wss {
        url: String,
        host: String,
        port: u16,
    },
}

impl BrokerUrl {
    pub fn parse(s: &str) -> Result<BrokerUrl, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("{s:?}: expected mqtts://HOST:PORT or wss://HOST:PORT/PATH"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("{s:?}: bad port {p:?}"))?,
                ),
            ),
            _ => (authority.to_string(), None),
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        match scheme {
            "mqtts" | "ssl" => {
                if !path.is_empty() {
                    return Err(format!("{s:?}: mqtts:// URLs take no path"));
                }
                Ok(BrokerUrl::Mqtts {
                    host,
                    port: port.unwrap_or(8883),
                })
            }
            "wss" => Ok(BrokerUrl::Wss {
                url: if path.is_empty() {
                    format!("{s}/mqtt")
                } else {
                    s.to_string()
                },
                host,
                port: port.unwrap_or(443),
            }),
            "mqtt" | "tcp" | "ws" => Err(format!(
                "{s:?}: plaintext is refused; use mqtts:// (port 8883) or wss:// (port 443)"
            )),
            other => Err(format!(
                "{s:?}: unknown scheme {other:?}; use mqtts:// or wss://"
            )),
        }
    }

    pub fn host(&self) -> &str {
        match self {
            BrokerUrl::Mqtts { host, .. } | BrokerUrl::Wss { host, .. } => host,
        }
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerUrl::Mqtts { host, port } => write!(f, "mqtts://{host}:{port}"),
            BrokerUrl::Wss { url, .. } => f.write_str(url),
        }
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let mut c: AgentConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        c.source = path.to_path_buf();
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(ca) = &mut c.uplink.ca_file {
            fix(ca);
        }
        fix(&mut c.uplink.cert_file);
        fix(&mut c.uplink.key_file);
        fix(&mut c.queue.path);
        fix(&mut c.ingest.socket);
        c.sources.resolve_paths(base);
        c.validate()?;
        Ok(c)
    }

    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    pub fn broker_urls(&self) -> Vec<BrokerUrl> {
        self.uplink
            .brokers
            .iter()
            .filter_map(|b| BrokerUrl::parse(b).ok())
            .collect()
    }

    /// Where tail sources keep their file positions: `tail-positions` beside the queue.
    pub fn tail_state_dir(&self) -> PathBuf {
        self.queue.path.with_file_name("tail-positions")
    }

    pub fn socket_mode(&self) -> u32 {
        u32::from_str_radix(self.ingest.socket_mode.trim_start_matches("0o"), 8).unwrap_or(0o660)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let id = &self.device_id;
        if id.is_empty() || id.contains(['/', '+', '#', '\0']) || id.starts_with('$') {
            return Err(self.invalid(
                "device_id",
                "must be non-empty and must not contain '/', '+', '#' or start with '$' (it becomes a topic level)",
            ));
        }
        if self.uplink.brokers.is_empty() {
            return Err(self.invalid(
                "uplink.brokers",
                "no broker; add e.g. brokers = [\"mqtts://broker.example:8883\"]",
            ));
        }
        for (i, b) in self.uplink.brokers.iter().enumerate() {
            BrokerUrl::parse(b).map_err(|e| self.invalid(&format!("uplink.brokers[{i}]"), e))?;
        }
        match (&self.uplink.ca_file, self.uplink.use_system_roots) {
            (None, false) => return Err(self.invalid(
                "uplink.ca_file",
                "name the CA that signs the broker's certificate, or set use_system_roots = true",
            )),
            (Some(ca), _) if !ca.is_file() => {
                return Err(
                    self.invalid("uplink.ca_file", format!("{}: no such file", ca.display()))
                )
            }
            _ => {}
        }
        for (k, p) in [
            ("uplink.cert_file", &self.uplink.cert_file),
            ("uplink.key_file", &self.uplink.key_file),
        ] {
            if !p.is_file() {
                return Err(self.invalid(k, format!("{}: no such file; the device certificate comes from your PKI (`bulwark-pki issue-client DEVICE` in development)", p.display())));
            }
        }
        if self.uplink.max_inflight == 0 {
            return Err(self.invalid("uplink.max_inflight", "must be at least 1"));
        }
        if self.uplink.backoff_min_ms == 0
            || self.uplink.backoff_max_ms < self.uplink.backoff_min_ms
        {
            return Err(self.invalid(
                "uplink.backoff_max_ms",
                "backoff_min_ms must be at least 1 and backoff_max_ms at least backoff_min_ms",
            ));
        }
        if self.queue.max_bytes < 1024 * 1024 {
            return Err(self.invalid("queue.max_bytes", "must be at least 1048576 (1 MiB)"));
        }
        if self.uplink.backlog_drain_per_sec == 0 {
            return Err(self.invalid("uplink.backlog_drain_per_sec", "must be at least 1"));
        }
        if let Err((key, message)) = self.sources.validate() {
            return Err(self.invalid(&key, message));
        }
        if let Err((key, message)) = self.tunnel.validate() {
            return Err(self.invalid(&key, message));
        }
        if self.health.interval_secs == 0 {
            return Err(self.invalid("health.interval_secs", "must be at least 1"));
        }
        for (i, c) in self.commands.allow.iter().enumerate() {
            if !BUILTIN_COMMANDS.contains(&c.as_str()) {
                return Err(self.invalid(
                    &format!("commands.allow[{i}]"),
                    format!(
                        "{c:?} is not a built-in command; built-in: {}",
                        BUILTIN_COMMANDS.join(", ")
                    ),
                ));
            }
        }
        if self.ingest.max_pending_lines == 0 {
            return Err(self.invalid("ingest.max_pending_lines", "must be at least 1"));
        }
        if self.ingest.max_pending_bytes == 0 {
            return Err(self.invalid("ingest.max_pending_bytes", "must be at least 1"));
        }
        if u32::from_str_radix(self.ingest.socket_mode.trim_start_matches("0o"), 8).is_err() {
            return Err(self.invalid("ingest.socket_mode", "must be an octal mode like \"0660\""));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `extra` after a minimal valid configuration and loads it.
    fn load_with(extra: &str) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "gw.pem", "gw.key"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let text = format!(
            "device_id = \"gw-1\"\n[uplink]\nbrokers = [\"mqtts://b.example:8883\", \"wss://relay.example/mqtt\"]\n\
             ca_file = \"ca.pem\"\ncert_file = \"gw.pem\"\nkey_file = \"gw.key\"\n{extra}"
        );
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        AgentConfig::load(&path)
    }

    fn invalid_key(extra: &str) -> String {
        match load_with(extra) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{extra}: {other:?}"),
        }
    }

    #[test]
    fn tunnel_table() {
        // Off by default, and allowed to be enabled without services.
        let c = load_with("").unwrap();
        assert!(!c.tunnel.enabled);
        assert_eq!(c.tunnel.max_sessions, 2);
        let c = load_with("[tunnel]\nenabled = true\n").unwrap();
        assert!(c.tunnel.enabled && c.tunnel.services.is_empty());
        let c = load_with(
            "[tunnel]\nenabled = true\nmax_sessions = 1\n[tunnel.services]\nssh = \"127.0.0.1:22\"\nweb = \"unix:/run/ui.sock\"\n",
        )
        .unwrap();
        assert_eq!(c.tunnel.max_sessions, 1);
        assert_eq!(c.tunnel.services.len(), 2);
        assert_eq!(
            c.broker_urls().iter().map(|u| u.host()).collect::<Vec<_>>(),
            ["b.example", "relay.example"]
        );
        // Validated even while disabled, and the error names the key.
        assert_eq!(
            invalid_key("[tunnel.services]\nplc = \"192.168.1.10:502\"\n"),
            "tunnel.services.plc"
        );
        assert_eq!(
            invalid_key("[tunnel]\nenabled = true\nidle_timeout_secs = 0\n"),
            "tunnel.idle_timeout_secs"
        );
        let e = load_with("[tunnel]\nenabled = true\nmax_sessions = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tunnel.max_sessions: must be at least 1"), "{e}");
        // Strict: unknown keys are errors.
        assert!(matches!(
            load_with("[tunnel]\nenable = true\n"),
            Err(ConfigError::Parse { .. })
        ));
        // A source can never write the reserved audit series.
        assert_eq!(
            invalid_key("[[source.exec]]\nseries = \"$audit\"\ncommand = [\"/bin/true\"]\n"),
            "source.exec[0].series"
        );
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            BrokerUrl::parse("mqtts://broker.example:8883").unwrap(),
            BrokerUrl::Mqtts {
                host: "broker.example".into(),
                port: 8883
            }
        );
        assert_eq!(
            BrokerUrl::parse("mqtts://broker.example").unwrap(),
            BrokerUrl::Mqtts {
                host: "broker.example".into(),
                port: 8883
            }
        );
        let w = BrokerUrl::parse("wss://b.example/mqtt").unwrap();
        assert_eq!(
            w,
            BrokerUrl::Wss {
                url: "wss://b.example/mqtt".into(),
                host: "b.example".into(),
                port: 443
            }
        );
        assert_eq!(
            BrokerUrl::parse("wss://b:8443").unwrap().to_string(),
            "wss://b:8443/mqtt"
        );
        assert!(BrokerUrl::parse("mqtt://b:1883")
            .unwrap_err()
            .contains("plaintext is refused"));
        assert!(BrokerUrl::parse("mqtts://:8883").is_err());
        assert!(BrokerUrl::parse("mqtts://b:99999").is_err());
        assert!(BrokerUrl::parse("b:8883").is_err());
    }
}
