//! The `bulwark-tunnel` command's settings: an optional strict TOML file (unknown keys are
//! errors; paths in it are relative to the file) under the command-line options, which win.
//! Errors name the file (or the option), the key and the fix.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_tunnel::ws::RelayUrl;
use serde::Deserialize;

/// Exit code for a bad configuration or bad usage.
pub const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the configuration file: {source}; fix the path given with --config", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", file.display())]
    Parse { file: PathBuf, message: String },
    /// `origin` is the file, or "command line".
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
    #[error("no broker to connect to: give --broker wss://HOST:PORT, or put broker = \"wss://HOST:PORT\" in {}", file.display())]
    NoBroker { file: PathBuf },
}

/// The config file as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The relay: `wss://HOST:PORT` (path `/tunnel/v1` implied).
    pub broker: Option<String>,
    /// The CA that signed the broker's certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// Also trust the operating system's CA certificates.
    pub use_system_roots: Option<bool>,
    /// The operator's client certificate and key (PEM).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Without a certificate: the username (the password is never in the file).
    pub username: Option<String>,
    pub connect_timeout_secs: Option<u64>,
    pub max_streams: Option<usize>,
}

impl FileConfig {
    /// Reads and parses `path`; relative paths in it become relative to its directory.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let mut c: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: path.to_path_buf(),
            message: parse_message(&text, &e),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.ca_file, &mut c.cert_file, &mut c.key_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
    }
}

/// One line for a TOML error: where (line number and text) and what.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim_end().replace('\n', " ");
    let Some(span) = e.span() else {
        return what;
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    if line.is_empty() {
        format!("line {line_no}: {what}")
    } else {
        format!("line {line_no} ({line}): {what}")
    }
}

/// The command-line options that can also be in the file.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub broker: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub username: Option<String>,
    /// `--config FILE`: must exist when given.
    pub config: Option<PathBuf>,
}

/// The merged settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub relay: RelayUrl,
    pub ca_file: Option<PathBuf>,
    pub use_system_roots: bool,
    pub cert: Option<(PathBuf, PathBuf)>,
    pub username: Option<String>,
    pub connect_timeout: Duration,
    pub max_streams: usize,
    /// The config file that was read, if any.
    pub file: Option<PathBuf>,
}

pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 15;
pub const DEFAULT_MAX_STREAMS: usize = 64;
const MAX_MAX_STREAMS: usize = 1024;

/// `$XDG_CONFIG_HOME/bulwark/tunnel.toml`, else `$HOME/.config/bulwark/tunnel.toml` (from
/// the given variables; XDG says a relative `XDG_CONFIG_HOME` is ignored).
pub fn default_config_path(xdg_config_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    let base = match xdg_config_home.map(PathBuf::from) {
        Some(x) if x.is_absolute() => x,
        _ => home
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".config"),
    };
    base.join("bulwark").join("tunnel.toml")
}

/// The default path from this process's environment.
pub fn default_config_path_from_env() -> PathBuf {
    default_config_path(
        std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()),
        std::env::var_os("HOME"),
    )
}

/// Reads the file (`--config`, or `default_file` if it exists) and merges `flags` over it.
pub fn resolve(flags: &Flags, default_file: &Path) -> Result<Settings, ConfigError> {
    let file = match &flags.config {
        Some(f) => Some((f.clone(), FileConfig::load(f)?)),
        None if default_file.is_file() => {
            Some((default_file.to_path_buf(), FileConfig::load(default_file)?))
        }
        None => None,
    };
    merge(flags, file, default_file)
}

/// Merges `flags` over `file` (`flags` win) and checks the result. `default_file` is only
/// named in the message when no broker is given anywhere.
pub fn merge(
    flags: &Flags,
    file: Option<(PathBuf, FileConfig)>,
    default_file: &Path,
) -> Result<Settings, ConfigError> {
    let (path, fc) = match file {
        Some((p, c)) => (Some(p), c),
        None => (None, FileConfig::default()),
    };
    let file_origin = || {
        path.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let invalid = |from_flag: bool, flag: &str, key: &str, message: String| {
        if from_flag {
            ConfigError::Invalid {
                origin: "command line".into(),
                key: flag.into(),
                message,
            }
        } else {
            ConfigError::Invalid {
                origin: file_origin(),
                key: key.into(),
                message,
            }
        }
    };

    let (broker, broker_from_flag) = match (&flags.broker, &fc.broker) {
        (Some(b), _) => (b.clone(), true),
        (None, Some(b)) => (b.clone(), false),
        (None, None) => {
            return Err(ConfigError::NoBroker {
                file: path.clone().unwrap_or_else(|| default_file.to_path_buf()),
            })
        }
    };
    let relay = RelayUrl::parse(&broker).map_err(|e| {
        invalid(
            broker_from_flag,
            "--broker",
            "broker",
            format!("{e}; write it as wss://HOST:PORT, e.g. wss://broker.plant.example:443"),
        )
    })?;

    let ca_file = flags.ca_file.clone().or(fc.ca_file);
    let use_system_roots = fc.use_system_roots.unwrap_or(false);

    let cert = match (&flags.cert, &fc.cert_file, &flags.key, &fc.key_file) {
        (Some(c), _, Some(k), _) => Some((c.clone(), k.clone())),
        (Some(c), _, None, Some(k)) => Some((c.clone(), k.clone())),
        (None, Some(c), Some(k), _) => Some((c.clone(), k.clone())),
        (None, Some(c), None, Some(k)) => Some((c.clone(), k.clone())),
        (None, None, None, None) => None,
        (Some(_), _, None, None) => {
            return Err(invalid(
                true,
                "--cert",
                "cert_file",
                "a certificate needs its private key: give --key FILE too (or key_file in the config file)".into(),
            ))
        }
        (None, Some(_), None, None) => {
            return Err(invalid(
                false,
                "--cert",
                "cert_file",
                "a certificate needs its private key: add key_file = \"...\" (or give --key FILE)"
                    .into(),
            ))
        }
        (None, None, Some(_), _) => {
            return Err(invalid(
                true,
                "--key",
                "key_file",
                "a private key needs its certificate: give --cert FILE too (or cert_file in the config file)".into(),
            ))
        }
        (None, None, None, Some(_)) => {
            return Err(invalid(
                false,
                "--key",
                "key_file",
                "a private key needs its certificate: add cert_file = \"...\" (or give --cert FILE)"
                    .into(),
            ))
        }
    };

    let (username, username_from_flag) = match (&flags.username, &fc.username) {
        (Some(u), _) => (Some(u.clone()), true),
        (None, u) => (u.clone(), false),
    };
    if username.as_deref().is_some_and(|u| u.trim().is_empty()) {
        return Err(invalid(
            username_from_flag,
            "--username",
            "username",
            "the username is empty: give your broker username, or leave it out and use a certificate".into(),
        ));
    }

    let timeout = fc
        .connect_timeout_secs
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECS);
    if !(1..=600).contains(&timeout) {
        return Err(invalid(
            false,
            "",
            "connect_timeout_secs",
            format!("{timeout} is out of range: use 1 to 600 seconds (default {DEFAULT_CONNECT_TIMEOUT_SECS})"),
        ));
    }
    let max_streams = fc.max_streams.unwrap_or(DEFAULT_MAX_STREAMS);
    if !(1..=MAX_MAX_STREAMS).contains(&max_streams) {
        return Err(invalid(
            false,
            "",
            "max_streams",
            format!("{max_streams} is out of range: use 1 to {MAX_MAX_STREAMS} (default {DEFAULT_MAX_STREAMS})"),
        ));
    }

    Ok(Settings {
        relay,
        ca_file,
        use_system_roots,
        cert,
        username,
        connect_timeout: Duration::from_secs(timeout),
        max_streams,
        file: path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("tunnel.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    const NOWHERE: &str = "/nonexistent/bulwark/tunnel.toml";

    #[test]
    fn file_alone_with_defaults_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            r#"
broker = "wss://broker.plant.example"
ca_file = "ca.pem"
cert_file = "certs/operator.pem"
key_file = "/etc/bulwark/operator.key"
"#,
        );
        let s = resolve(
            &Flags {
                config: Some(f.clone()),
                ..Flags::default()
            },
            Path::new(NOWHERE),
        )
        .unwrap();
        assert_eq!(s.relay.url(), "wss://broker.plant.example:443/tunnel/v1");
        assert_eq!(s.ca_file, Some(dir.path().join("ca.pem")));
        assert_eq!(
            s.cert,
            Some((
                dir.path().join("certs/operator.pem"),
                PathBuf::from("/etc/bulwark/operator.key")
            ))
        );
        assert_eq!(s.connect_timeout, Duration::from_secs(15));
        assert_eq!(s.max_streams, 64);
        assert!(!s.use_system_roots);
        assert_eq!(s.username, None);
        assert_eq!(s.file, Some(f));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            r#"
broker = "wss://file.example:8443"
ca_file = "ca.pem"
cert_file = "op.pem"
key_file = "op.key"
username = "filer"
use_system_roots = true
connect_timeout_secs = 5
max_streams = 8
"#,
        );
        let flags = Flags {
            broker: Some("wss://flag.example:9443/custom".into()),
            ca_file: Some("my-ca.pem".into()),
            cert: Some("me.pem".into()),
            key: None,
            username: Some("alice".into()),
            config: Some(f),
        };
        let s = resolve(&flags, Path::new(NOWHERE)).unwrap();
        assert_eq!(s.relay.url(), "wss://flag.example:9443/custom");
        // Flag paths stay relative to the working directory.
        assert_eq!(s.ca_file, Some(PathBuf::from("my-ca.pem")));
        // --cert alone replaces the file's certificate; the key still comes from the file.
        assert_eq!(
            s.cert,
            Some((PathBuf::from("me.pem"), dir.path().join("op.key")))
        );
        assert_eq!(s.username.as_deref(), Some("alice"));
        assert!(s.use_system_roots);
        assert_eq!(s.connect_timeout, Duration::from_secs(5));
        assert_eq!(s.max_streams, 8);
    }

    #[test]
    fn default_file_is_used_only_if_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let flags = Flags {
            broker: Some("wss://b.example".into()),
            ..Flags::default()
        };
        let missing = dir.path().join("tunnel.toml");
        let s = resolve(&flags, &missing).unwrap();
        assert_eq!(s.file, None);
        let f = write(dir.path(), "username = \"bob\"\n");
        let s = resolve(&flags, &f).unwrap();
        assert_eq!(s.file, Some(f));
        assert_eq!(s.username.as_deref(), Some("bob"));
    }

    #[test]
    fn a_missing_config_file_given_with_config_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("nope.toml");
        let e = resolve(
            &Flags {
                broker: Some("wss://b.example".into()),
                config: Some(f.clone()),
                ..Flags::default()
            },
            Path::new(NOWHERE),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Read { .. }), "{msg}");
        assert!(msg.contains(&f.display().to_string()), "{msg}");
        assert!(msg.contains("--config"), "{msg}");
    }

    #[test]
    fn unknown_key_names_the_file_the_key_and_the_valid_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "broker = \"wss://b\"\nbrokr = \"wss://c\"\n");
        let e = resolve(
            &Flags {
                config: Some(f.clone()),
                ..Flags::default()
            },
            Path::new(NOWHERE),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Parse { .. }), "{msg}");
        assert!(msg.starts_with(&f.display().to_string()), "{msg}");
        assert!(msg.contains("line 2 (brokr = \"wss://c\")"), "{msg}");
        assert!(msg.contains("unknown field `brokr`"), "{msg}");
        assert!(msg.contains("use_system_roots"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        // A wrong type too.
        let f = write(dir.path(), "broker = \"wss://b\"\nmax_streams = \"many\"\n");
        let msg = FileConfig::load(&f).unwrap_err().to_string();
        assert!(msg.contains("line 2 (max_streams = \"many\")"), "{msg}");
    }

    #[test]
    fn missing_broker_says_how_to_give_one() {
        let e = resolve(&Flags::default(), Path::new(NOWHERE)).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::NoBroker { .. }), "{msg}");
        assert!(msg.contains("--broker wss://HOST:PORT"), "{msg}");
        assert!(msg.contains(NOWHERE), "{msg}");
        // With a file that lacks it, the message names that file.
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "ca_file = \"ca.pem\"\n");
        let msg = resolve(
            &Flags {
                config: Some(f.clone()),
                ..Flags::default()
            },
            Path::new(NOWHERE),
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains(&f.display().to_string()), "{msg}");
    }

    #[test]
    fn bad_values_name_their_origin_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "broker = \"https://b.example\"\n");
        let flags = Flags {
            config: Some(f.clone()),
            ..Flags::default()
        };
        let msg = resolve(&flags, Path::new(NOWHERE)).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{}: broker:", f.display())),
            "{msg}"
        );
        assert!(msg.contains("wss://HOST:PORT"), "{msg}");
        let msg = resolve(
            &Flags {
                broker: Some("b.example:443".into()),
                ..flags.clone()
            },
            Path::new(NOWHERE),
        )
        .unwrap_err()
        .to_string();
        assert!(msg.starts_with("command line: --broker:"), "{msg}");

        let msg = resolve(
            &Flags {
                broker: Some("wss://b".into()),
                cert: Some("c.pem".into()),
                ..Flags::default()
            },
            Path::new(NOWHERE),
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("--cert") && msg.contains("--key"), "{msg}");

        let f = write(
            dir.path(),
            "broker = \"wss://b\"\nkey_file = \"k.pem\"\nmax_streams = 0\n",
        );
        let msg = FileConfig::load(&f)
            .and_then(|c| merge(&Flags::default(), Some((f.clone(), c)), Path::new(NOWHERE)))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("key_file") && msg.contains("cert_file"),
            "{msg}"
        );
        let f = write(dir.path(), "broker = \"wss://b\"\nmax_streams = 0\n");
        let msg = resolve(
            &Flags {
                config: Some(f),
                ..Flags::default()
            },
            Path::new(NOWHERE),
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("max_streams: 0 is out of range"), "{msg}");
        let msg = resolve(
            &Flags {
                broker: Some("wss://b".into()),
                username: Some(" ".into()),
                ..Flags::default()
            },
            Path::new(NOWHERE),
        )
        .unwrap_err()
        .to_string();
        assert!(msg.starts_with("command line: --username:"), "{msg}");
    }

    #[test]
    fn default_path() {
        assert_eq!(
            default_config_path(Some("/xdg".into()), Some("/home/u".into())),
            PathBuf::from("/xdg/bulwark/tunnel.toml")
        );
        assert_eq!(
            default_config_path(None, Some("/home/u".into())),
            PathBuf::from("/home/u/.config/bulwark/tunnel.toml")
        );
        assert_eq!(
            default_config_path(Some("relative".into()), Some("/home/u".into())),
            PathBuf::from("/home/u/.config/bulwark/tunnel.toml")
        );
    }
}
