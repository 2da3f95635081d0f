//! The `bulwark-tunnel` command: the operator's side of the reverse tunnel.

mod cli_config;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use bulwark_tunnel::operator::{self, OpenSession, OperatorConfig, OperatorError};
use bulwark_tunnel::proto::{valid_name, ErrorCode, SessionInfo};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cli_config::{Flags, Settings, EXIT_BAD_CONFIG};

/// The environment variable that holds the password (never a command-line option: other
/// users of the computer could read it in the process list).
const PASSWORD_ENV: &str = "BULWARK_TUNNEL_PASSWORD";

/// Bulwark tunnel: reach SSH or the web page of a gateway that accepts no inbound
/// connection.
///
/// The gateway's agent keeps an outbound connection to the broker. When you open a tunnel,
/// the broker's relay checks that you have a grant for that device and service, asks the
/// gateway to dial back, and joins the two: your local port (or ssh's ProxyCommand) then
/// reaches the service on the gateway, for example its SSH server at 127.0.0.1:22. All
/// traffic goes over TLS to the broker (wss, usually port 443); the gateway opens no port.
#[derive(Debug, Parser)]
#[command(
    name = "bulwark-tunnel",
    version,
    after_help = "\
Examples:
  # SSH to gateway gw-17 through local port 2222 (leave it running, use a second terminal):
  bulwark-tunnel open --device gw-17 --service ssh --listen 127.0.0.1:2222
  ssh -p 2222 admin@127.0.0.1

  # SSH in one step: ssh starts the tunnel itself
  ssh -o ProxyCommand='bulwark-tunnel stdio --device gw-17 --service ssh' admin@gw-17

  # The gateway's web page: then browse to http://127.0.0.1:8080
  bulwark-tunnel open --device gw-17 --service web --listen 127.0.0.1:8080

  # Tunnel sessions you may see
  bulwark-tunnel list

Settings: ~/.config/bulwark/tunnel.toml (or --config FILE) is read if it exists, e.g.
  broker = \"wss://broker.plant.example:443\"
  ca_file = \"ca.pem\"             # paths are relative to the file
  cert_file = \"operator.pem\"
  key_file = \"operator.key\"
  # or, without a certificate: username = \"alice\"
  # also: use_system_roots = true, connect_timeout_secs = 15, max_streams = 64
Command-line options win over the file. With --username and no certificate, the password
is taken from BULWARK_TUNNEL_PASSWORD or asked for on the terminal.

Exit codes: 0 done, 1 failure (the message says why), 64 bad configuration or usage."
)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line (on stderr; more detail
    /// with BULWARK_LOG=debug).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// How to reach the broker and who you are; each overrides the config file.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection (each overrides the config file)")]
struct ConnArgs {
    /// The broker's tunnel address, wss://HOST:PORT (the path /tunnel/v1 is implied).
    #[arg(long, global = true, value_name = "wss://HOST:PORT")]
    broker: Option<String>,
    /// The CA certificate (PEM) that signed the broker's certificate.
    #[arg(long, global = true, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Your operator certificate (PEM); needs --key.
    #[arg(long, global = true, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, global = true, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Your broker username, if you have no certificate (password: BULWARK_TUNNEL_PASSWORD,
    /// or asked for).
    #[arg(long, global = true, value_name = "NAME")]
    username: Option<String>,
    /// The settings file [default: $XDG_CONFIG_HOME/bulwark/tunnel.toml, else
    /// ~/.config/bulwark/tunnel.toml, if it exists].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Which service on which gateway.
#[derive(Debug, Args)]
#[command(next_help_heading = "Tunnel")]
struct Target {
    /// The gateway's device id, e.g. gw-17.
    #[arg(long, value_name = "ID")]
    device: String,
    /// The service, by the name the gateway allows it under, e.g. ssh or web.
    #[arg(long, value_name = "NAME")]
    service: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open a tunnel and forward a local port to the service until Ctrl-C.
    ///
    /// Every connection to the local port goes to the service on the gateway. The command
    /// runs until Ctrl-C (or SIGTERM), or until the relay or the gateway ends the session.
    #[command(after_help = "\
Examples:
  bulwark-tunnel open --device gw-17 --service ssh --listen 127.0.0.1:2222
  # then, in another terminal:
  ssh -p 2222 admin@127.0.0.1

  bulwark-tunnel open --device gw-17 --service web --listen 127.0.0.1:8080
  # then browse to http://127.0.0.1:8080")]
    Open {
        #[command(flatten)]
        target: Target,
        /// The local address to listen on: 127.0.0.1:PORT (or just PORT).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Allow --listen on an address other computers can reach. Whoever connects to it
        /// then uses the tunnel with your rights: only for a deliberate reason.
        #[arg(long)]
        allow_remote_listen: bool,
    },
    /// Carry one connection over stdin and stdout (for ssh's ProxyCommand).
    ///
    /// Nothing but the service's data is written to stdout; messages go to stderr.
    #[command(after_help = "\
Example:
  ssh -o ProxyCommand='bulwark-tunnel stdio --device gw-17 --service ssh' admin@gw-17

For every ssh call to a gateway, in ~/.ssh/config:
  Host gw-*
    ProxyCommand bulwark-tunnel stdio --device %n --service ssh")]
    Stdio {
        #[command(flatten)]
        target: Target,
    },
    /// List the tunnel sessions you may see (who has which gateway open, since when).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().flatten_event(true).init(),
    }
}

/// One thread: every message through the tunnel wakes this process (a socket each way);
/// with a pool of workers, each wake-up also handed the work from one worker to another
/// (a futex round trip per message).
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn bad_config(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return if e.use_stderr() {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // stdio: ssh shows our stderr in the user's terminal; only warnings and errors there.
    let level = match cli.command {
        Command::Stdio { .. } => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, level);

    // Usage checks before anything is read or asked for.
    let mut listen = None;
    match &cli.command {
        Command::Open {
            target,
            listen: l,
            allow_remote_listen,
        } => {
            if let Err(e) = check_target(target) {
                return bad_config(e);
            }
            match parse_listen(l).and_then(|a| check_listen(a, *allow_remote_listen, target)) {
                Ok(a) => listen = Some(a),
                Err(e) => return bad_config(e),
            }
        }
        Command::Stdio { target } => {
            if let Err(e) = check_target(target) {
                return bad_config(e);
            }
        }
        Command::List { .. } => {}
    }

    let flags = Flags {
        broker: cli.conn.broker,
        ca_file: cli.conn.ca_file,
        cert: cli.conn.cert,
        key: cli.conn.key,
        username: cli.conn.username,
        config: cli.conn.config,
    };
    let settings = match cli_config::resolve(&flags, &cli_config::default_config_path_from_env()) {
        Ok(s) => s,
        Err(e) => return bad_config(e),
    };
    if let Some(f) = &settings.file {
        tracing::debug!(file = %f.display(), "settings file read");
    }
    let password = match password(&settings, std::env::var(PASSWORD_ENV).ok(), |p: &str| {
        rpassword::prompt_password(p)
    }) {
        Ok(p) => p,
        Err(e) => return bad_config(e),
    };
    let cfg = match operator_config(&settings, password) {
        Ok(c) => c,
        Err(e) => return bad_config(e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match cli.command {
        Command::Open { target, .. } => {
            let listen = listen.expect("checked above");
            rt.block_on(open(cfg, target, listen))
        }
        Command::Stdio { target } => rt.block_on(stdio(cfg, target)),
        Command::List { json } => rt.block_on(list(cfg, json)),
    }
}

fn check_target(t: &Target) -> Result<(), String> {
    for (flag, v) in [("--device", &t.device), ("--service", &t.service)] {
        if !valid_name(v) {
            return Err(format!(
                "{flag} {v:?}: a name is one word of at most 128 bytes, without '/', '+', '#', spaces or control characters, and not starting with '$'"
            ));
        }
    }
    Ok(())
}

/// `127.0.0.1:2222`, `[::1]:2222`, `localhost:2222` or just `2222` (loopback).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let port = s.strip_prefix("localhost:").unwrap_or(s);
    port.parse::<u16>()
        .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
        .map_err(|_| {
            format!(
                "--listen {s:?}: give a local address and port, e.g. 127.0.0.1:2222 (or just 2222)"
            )
        })
}

/// A listener on another address than loopback lets anyone who reaches this computer use
/// the tunnel with the operator's rights: only with `--allow-remote-listen`.
fn check_listen(addr: SocketAddr, allow_remote: bool, t: &Target) -> Result<SocketAddr, String> {
    if addr.ip().is_loopback() || allow_remote {
        return Ok(addr);
    }
    Err(format!(
        "--listen {addr}: other computers can connect to that address, and whoever does gets into {}/{} with your rights (the relay checks who opened the tunnel, not who uses your port). Listen on 127.0.0.1:{} instead, or add --allow-remote-listen if you really mean to share it",
        t.device,
        t.service,
        addr.port()
    ))
}

/// The password to send: from `env`, or asked for when a username is set and no
/// certificate is given. `None` without a username.
fn password(
    s: &Settings,
    env: Option<String>,
    prompt: impl FnOnce(&str) -> std::io::Result<String>,
) -> Result<Option<String>, String> {
    let Some(user) = &s.username else {
        return Ok(None);
    };
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return Ok(Some(p));
    }
    if s.cert.is_some() {
        // The certificate says who the operator is.
        return Ok(None);
    }
    prompt(&format!("Password for {user} at {}: ", s.relay.host))
        .map(Some)
        .map_err(|e| {
            format!("cannot ask for the password of {user} ({e}): set {PASSWORD_ENV}, or use a certificate (--cert/--key)")
        })
}

fn operator_config(s: &Settings, password: Option<String>) -> Result<OperatorConfig, String> {
    if s.cert.is_none() && s.username.is_none() {
        return Err(format!(
            "no credentials: give your operator certificate with --cert FILE --key FILE (or cert_file/key_file in {}), or --username NAME with the password in {PASSWORD_ENV}",
            s.file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_else(|| "the settings file".into())
        ));
    }
    let tls = operator::client_tls(
        s.ca_file.as_deref(),
        s.use_system_roots,
        s.cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .map_err(|e| {
        if e.contains("--ca-file") {
            e
        } else {
            let file = s
                .file
                .as_ref()
                .map(|f| format!(" in {}", f.display()))
                .unwrap_or_default();
            format!(
                "{e}; check --ca-file, --cert and --key (or ca_file, cert_file and key_file{file})"
            )
        }
    })?;
    Ok(OperatorConfig {
        relay: s.relay.clone(),
        tls,
        username: s.username.clone(),
        password,
        connect_timeout: s.connect_timeout,
        max_streams: s.max_streams,
    })
}

/// The message for a failed tunnel operation: `error:` and the relay's (or the local)
/// reason, then what to do where that helps.
fn describe(e: &OperatorError) -> String {
    let hint = match e.code {
        Some(ErrorCode::AuthFailed) => Some(
            "give --cert/--key (your operator certificate), or --username with BULWARK_TUNNEL_PASSWORD (or type the password when asked)",
        ),
        Some(ErrorCode::NoGrant) => Some(
            "check the spelling of --device and --service; otherwise ask the broker's administrator for the grant",
        ),
        Some(ErrorCode::DeviceOffline) => Some(
            "check the device id given with --device; if it is right, the gateway is off or has no network connection",
        ),
        Some(ErrorCode::ServiceNotAllowed) => Some(
            "check --service: the gateway allows only the services listed in its agent configuration",
        ),
        Some(ErrorCode::TokenExpired) => Some(
            "try again; if it happens again, the gateway's agent cannot reach the broker or has the tunnel switched off",
        ),
        Some(ErrorCode::Limit) => Some("`bulwark-tunnel list` shows the open sessions"),
        Some(ErrorCode::BadRequest) => Some(
            "check --device and --service; if they are right, this program and the broker may be of different versions",
        ),
        Some(ErrorCode::Unavailable) => {
            Some("the broker cannot serve the tunnel right now; try again in a minute")
        }
        Some(ErrorCode::TokenInvalid | ErrorCode::WrongDevice) => Some(
            "the gateway could not join the session; try again, and if it persists ask its administrator to check the agent's log",
        ),
        None => {
            let m = &e.message;
            if m.starts_with("TLS with") {
                Some("check that --ca-file is the CA that signed the broker's certificate, and that --broker names the host in that certificate")
            } else if m.starts_with("cannot reach") || m.starts_with("no connection to") {
                Some("check the host and port in --broker, and that this network may reach the broker (firewall, proxy)")
            } else if m.starts_with("WebSocket upgrade") {
                Some("check that --broker points at the broker's tunnel port, and that the broker has the tunnel relay switched on")
            } else {
                None
            }
        }
    };
    let mut s = format!("error: {e}");
    if let Some(h) = hint {
        s.push_str("\n  hint: ");
        s.push_str(h);
    }
    s
}

/// What to run once the port forwards, for well-known services.
fn usage_hint(service: &str, device: &str, local: SocketAddr) -> String {
    match service {
        "ssh" => format!(
            "connect with: ssh -p {} -o HostKeyAlias={device} USER@{}",
            local.port(),
            local.ip()
        ),
        "web" | "http" => format!("open http://{local} in a browser"),
        "https" => format!("open https://{local} in a browser"),
        _ => format!("point your program at {local}"),
    }
}

/// Waits for Ctrl-C or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Opens the session, unless interrupted first (then `Err(SUCCESS)`).
async fn open_session(
    cfg: &OperatorConfig,
    target: &Target,
    stop: Option<std::pin::Pin<&mut dyn std::future::Future<Output = ()>>>,
) -> Result<OpenSession, ExitCode> {
    let opening = operator::open(cfg, &target.device, &target.service);
    let result = match stop {
        Some(stop) => tokio::select! {
            r = opening => r,
            _ = stop => {
                eprintln!("interrupted before the tunnel was open");
                return Err(ExitCode::SUCCESS);
            }
        },
        None => opening.await,
    };
    result.map_err(|e| {
        eprintln!("{}", describe(&e));
        ExitCode::FAILURE
    })
}

async fn open(cfg: OperatorConfig, target: Target, listen: SocketAddr) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "error: cannot listen on {listen}: {e}; pick another port with --listen (another program may use this one)"
            );
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(listen);
    eprintln!(
        "opening {}/{} through {}; waiting for the gateway to join...",
        target.device,
        target.service,
        cfg.relay.url()
    );
    let stop = interrupted();
    tokio::pin!(stop);
    let session = match open_session(&cfg, &target, Some(stop.as_mut())).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    eprintln!(
        "forwarding {local} -> {}/{} (session {}); Ctrl-C to close",
        target.device, target.service, session.session
    );
    eprintln!("{}", usage_hint(&target.service, &target.device, local));
    tokio::select! {
        why = operator::forward(session, listener) => {
            eprintln!(
                "error: {}/{}: {why}\n  hint: the relay ends idle or over-long sessions, and the gateway may have restarted; run the command again to reopen",
                target.device, target.service
            );
            ExitCode::FAILURE
        }
        _ = &mut stop => {
            eprintln!("closing the tunnel");
            ExitCode::SUCCESS
        }
    }
}

async fn stdio(cfg: OperatorConfig, target: Target) -> ExitCode {
    let session = match open_session(&cfg, &target, None).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    tracing::info!(session = %session.session, device = %target.device, service = %target.service, "tunnel open");
    match operator::stdio(session).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

async fn list(cfg: OperatorConfig, json: bool) -> ExitCode {
    match operator::list(&cfg).await {
        Ok(sessions) => {
            if json {
                match serde_json::to_string_pretty(&sessions) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", table(&sessions));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// The sessions as a text table (or a line saying there are none).
fn table(sessions: &[SessionInfo]) -> String {
    if sessions.is_empty() {
        return "no tunnel sessions\n".into();
    }
    let header = [
        "SESSION",
        "DEVICE",
        "SERVICE",
        "OPERATOR",
        "STATE",
        "OPENED",
        "BYTES (TO DEVICE / BACK)",
    ];
    let rows: Vec<[String; 7]> = sessions
        .iter()
        .map(|s| {
            [
                s.session.clone(),
                s.device.clone(),
                s.service.clone(),
                s.operator.clone(),
                s.state.clone(),
                s.opened.clone(),
                format!(
                    "{} / {}",
                    human_bytes(s.bytes_to_device),
                    human_bytes(s.bytes_to_operator)
                ),
            ]
        })
        .collect();
    let mut width: [usize; 7] = header.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for r in &rows {
        line(&r.each_ref().map(|c| c.as_str()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_tunnel::ws::RelayUrl;
    use clap::CommandFactory;

    fn target() -> Target {
        Target {
            device: "gw-17".into(),
            service: "ssh".into(),
        }
    }

    fn settings(username: Option<&str>, cert: bool) -> Settings {
        Settings {
            relay: RelayUrl::parse("wss://broker.example").unwrap(),
            ca_file: None,
            use_system_roots: false,
            cert: cert.then(|| ("c.pem".into(), "k.pem".into())),
            username: username.map(String::from),
            connect_timeout: std::time::Duration::from_secs(15),
            max_streams: 64,
            file: None,
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_explains_and_gives_examples() {
        let help = Cli::command().render_long_help().to_string();
        for s in [
            "accepts no inbound",
            "ssh -o ProxyCommand='bulwark-tunnel stdio --device gw-17 --service ssh' admin@gw-17",
            "ssh -p 2222 admin@127.0.0.1",
            "--service web --listen 127.0.0.1:8080",
            "http://127.0.0.1:8080",
            "BULWARK_TUNNEL_PASSWORD",
            "64 bad configuration",
        ] {
            assert!(help.contains(s), "help lacks {s:?}:\n{help}");
        }
    }

    #[test]
    fn global_options_go_before_or_after_the_subcommand() {
        let c = Cli::try_parse_from([
            "bulwark-tunnel",
            "--broker",
            "wss://b",
            "open",
            "--device",
            "gw-17",
            "--service",
            "ssh",
            "--listen",
            "2222",
            "--username",
            "alice",
        ])
        .unwrap();
        assert_eq!(c.conn.broker.as_deref(), Some("wss://b"));
        assert_eq!(c.conn.username.as_deref(), Some("alice"));
        assert!(matches!(c.command, Command::Open { .. }));
        // There is no password option.
        let e = Cli::try_parse_from(["bulwark-tunnel", "list", "--password", "x"]).unwrap_err();
        assert!(e.use_stderr());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("2222").unwrap().to_string(), "127.0.0.1:2222");
        assert_eq!(
            parse_listen("localhost:8080").unwrap().to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(parse_listen("[::1]:22").unwrap().to_string(), "[::1]:22");
        assert!(parse_listen("example.com:22")
            .unwrap_err()
            .contains("127.0.0.1:2222"));
        let t = target();
        assert!(check_listen(parse_listen("127.0.0.1:2222").unwrap(), false, &t).is_ok());
        assert!(check_listen(parse_listen("[::1]:2222").unwrap(), false, &t).is_ok());
        let e = check_listen(parse_listen("0.0.0.0:2222").unwrap(), false, &t).unwrap_err();
        assert!(e.contains("--allow-remote-listen"), "{e}");
        assert!(e.contains("gw-17/ssh"), "{e}");
        assert!(e.contains("127.0.0.1:2222"), "{e}");
        assert!(check_listen(parse_listen("0.0.0.0:2222").unwrap(), true, &t).is_ok());
    }

    #[test]
    fn device_and_service_names_are_checked() {
        assert!(check_target(&target()).is_ok());
        let e = check_target(&Target {
            device: "gw/17".into(),
            service: "ssh".into(),
        })
        .unwrap_err();
        assert!(e.starts_with("--device"), "{e}");
    }

    #[test]
    fn password_from_env_or_prompt_only_when_needed() {
        let never = |_: &str| -> std::io::Result<String> { panic!("prompted") };
        assert_eq!(password(&settings(None, false), None, never), Ok(None));
        assert_eq!(
            password(&settings(Some("alice"), false), Some("pw".into()), never),
            Ok(Some("pw".into()))
        );
        assert_eq!(
            password(&settings(Some("alice"), true), None, never),
            Ok(None)
        );
        let asked = password(&settings(Some("alice"), false), Some(String::new()), |p| {
            assert!(p.contains("alice") && p.contains("broker.example"), "{p}");
            Ok("typed".into())
        });
        assert_eq!(asked, Ok(Some("typed".into())));
        let e = password(&settings(Some("alice"), false), None, |_| {
            Err(std::io::Error::other("no terminal"))
        })
        .unwrap_err();
        assert!(e.contains(PASSWORD_ENV), "{e}");
    }

    #[test]
    fn no_credentials_is_a_configuration_error() {
        let e = operator_config(&settings(None, false), None).unwrap_err();
        assert!(e.contains("--cert") && e.contains("--username"), "{e}");
    }

    #[test]
    fn error_messages_include_the_relays_text_and_a_hint() {
        let e = OperatorError {
            code: Some(ErrorCode::AuthFailed),
            message: "bad password for alice".into(),
        };
        let m = describe(&e);
        assert!(
            m.starts_with("error: bad password for alice (auth_failed)"),
            "{m}"
        );
        assert!(
            m.contains("--cert/--key") && m.contains("BULWARK_TUNNEL_PASSWORD"),
            "{m}"
        );
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::AuthFailed,
            ErrorCode::NoGrant,
            ErrorCode::DeviceOffline,
            ErrorCode::ServiceNotAllowed,
            ErrorCode::TokenInvalid,
            ErrorCode::TokenExpired,
            ErrorCode::WrongDevice,
            ErrorCode::Limit,
            ErrorCode::Unavailable,
        ] {
            let m = describe(&OperatorError {
                code: Some(code),
                message: "the relay's words".into(),
            });
            assert!(m.starts_with("error: the relay's words"), "{m}");
            assert!(m.contains(code.as_str()), "{m}");
            assert!(m.contains("hint: "), "{m}");
        }
        let m = describe(&OperatorError {
            code: None,
            message: "TLS with broker.example: invalid peer certificate: UnknownIssuer".into(),
        });
        assert!(m.contains("--ca-file"), "{m}");
        let m = describe(&OperatorError {
            code: None,
            message: "cannot reach b:443: connection refused".into(),
        });
        assert!(m.contains("--broker"), "{m}");
        let m = describe(&OperatorError {
            code: None,
            message: "something else".into(),
        });
        assert_eq!(m, "error: something else");
    }

    #[test]
    fn hints_per_service() {
        let a: SocketAddr = "127.0.0.1:2222".parse().unwrap();
        assert_eq!(
            usage_hint("ssh", "gw-17", a),
            "connect with: ssh -p 2222 -o HostKeyAlias=gw-17 USER@127.0.0.1"
        );
        assert_eq!(
            usage_hint("web", "gw-17", "127.0.0.1:8080".parse().unwrap()),
            "open http://127.0.0.1:8080 in a browser"
        );
        assert!(usage_hint("modbus", "gw-17", a).contains("127.0.0.1:2222"));
    }

    #[test]
    fn session_table() {
        assert_eq!(table(&[]), "no tunnel sessions\n");
        let t = table(&[SessionInfo {
            session: "abc".into(),
            device: "gw-17".into(),
            service: "ssh".into(),
            operator: "alice".into(),
            opened: "2025-01-02T03:04:05Z".into(),
            state: "open".into(),
            bytes_to_device: 100,
            bytes_to_operator: 3 * 1024 * 1024,
        }]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert!(
            lines[0].starts_with("SESSION  DEVICE  SERVICE  OPERATOR"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("abc      gw-17   ssh      alice"),
            "{t}"
        );
        assert!(lines[1].ends_with("100 B / 3.0 MiB"), "{t}");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
