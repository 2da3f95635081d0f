//! The `bulwark-broker` command.

use std::path::PathBuf;
use std::process::ExitCode;

use bulwark_broker::config::{Config, EXIT_BAD_CONFIG};
use bulwark_broker::Broker;
use clap::{Parser, Subcommand, ValueEnum};

/// Bulwark MQTT broker: MQTT 3.1.1 over TLS (8883) and secure WebSocket (443), with
/// client certificates, persistent sessions and bounded everything.
#[derive(Debug, Parser)]
#[command(
    name = "bulwark-broker",
    version,
    after_help = "\
Examples:
  bulwark-broker check-config /etc/bulwark/broker.toml
  bulwark-broker run --config /etc/bulwark/broker.toml
  bulwark-broker run --config deploy/dev/broker.toml --log-format json

Exit codes: 0 clean shutdown, 64 bad configuration or TLS material, 1 other start-up failure."
)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the broker and serve until SIGTERM or SIGINT (Ctrl-C).
    Run {
        /// The broker's TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Read and validate a configuration file, then exit: 0 if it is usable, 64 if not.
    CheckConfig {
        /// The TOML configuration file to check.
        file: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: OK ({} listener{})",
                    file.display(),
                    c.listeners.len(),
                    if c.listeners.len() == 1 { "" } else { "s" }
                );
                for l in &c.listeners {
                    println!("  {} {:?} on {}", l.display_name(), l.transport, l.bind);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_BAD_CONFIG as u8)
            }
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG as u8);
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(run(config))
        }
    }
}

async fn run(config: Config) -> ExitCode {
    let broker = match Broker::start(config).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("start-up failed: {e}");
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install the SIGTERM handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    broker.shutdown().await;
    ExitCode::SUCCESS
}
