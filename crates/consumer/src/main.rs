//! The `bulwark-consumer` command.

use std::path::PathBuf;
use std::process::ExitCode;

use bulwark_consumer::{BrokerUrl, ConsumerOptions, EXIT_BAD_CONFIG};
use clap::Parser;

/// Bulwark consumer: receives the gateways' telemetry from the broker over mutual TLS,
/// drops duplicates by (device, seq), appends each new record to a JSON-lines file and
/// prints it.
#[derive(Debug, Parser)]
#[command(
    name = "bulwark-consumer",
    version,
    after_help = "\
Examples:
  bulwark-consumer --broker mqtts://localhost:8883 --ca-file certs/dev/ca.pem \\
      --cert certs/dev/clients/app1.pem --key certs/dev/clients/app1.key --out data/consumer.jsonl
  # status and health as well (printed, not written):
  bulwark-consumer ... --topic 'devices/+/data/#' --topic 'devices/+/status' --topic 'devices/+/health'

Output file: one JSON object per line, the telemetry envelope plus \"topic\" and \"received\":
  {\"v\":1,\"device\":\"gw-1\",\"seq\":1234,\"series\":\"line1/temp\",\"ts\":\"...\",\"historical\":false,\"payload\":21.5,\"topic\":\"devices/gw-1/data/line1/temp\",\"received\":\"...\"}
The session is persistent (clean session off): the broker keeps messages while the consumer
is away. Records already in the file are not written again after a restart.

Exit codes: 0 stopped (SIGINT/SIGTERM), 1 failure (the message says why), 64 bad usage or configuration."
)]
struct Cli {
    /// The broker: mqtts://HOST:PORT (or wss://HOST:PORT/mqtt).
    #[arg(long, value_name = "URL")]
    broker: String,
    /// The CA certificate (PEM) that signed the broker's certificate.
    #[arg(long, value_name = "FILE")]
    ca_file: PathBuf,
    /// This application's client certificate (PEM); its identity needs read grants in the
    /// broker's ACL.
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// MQTT client id; the broker keeps this session (and its queued messages) under it.
    #[arg(long, value_name = "ID", default_value = "bulwark-consumer")]
    client_id: String,
    /// Topic filter to subscribe to, QoS 1 (repeat for several). Telemetry on
    /// devices/<id>/data/... is written to --out; anything else is only printed.
    #[arg(
        long = "topic",
        value_name = "FILTER",
        default_value = "devices/+/data/#"
    )]
    topics: Vec<String>,
    /// Append each new record to this file as one JSON line.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Start a fresh session that the broker forgets at disconnect (for a quick look:
    /// messages sent while the consumer is away are then not kept for it).
    #[arg(long)]
    clean_session: bool,
    /// Print nothing per message (errors and connection events still go to stderr).
    #[arg(long)]
    quiet: bool,
}

fn bad_config(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

fn check_filter(f: &str) -> Result<(), String> {
    bulwark_protocol::topic::TopicFilter::new(f)
        .map(|_| ())
        .map_err(|e| format!("--topic {f:?} is not a valid topic filter: {e}"))
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let broker = match BrokerUrl::parse(&cli.broker) {
        Ok(b) => b,
        Err(e) => return bad_config(e),
    };
    if cli.client_id.is_empty() || cli.client_id.len() > 256 {
        return bad_config("--client-id must be 1 to 256 bytes");
    }
    for f in &cli.topics {
        if let Err(e) = check_filter(f) {
            return bad_config(e);
        }
    }
    let options = ConsumerOptions {
        broker,
        ca_file: cli.ca_file,
        cert: cli.cert,
        key: cli.key,
        client_id: cli.client_id,
        topics: cli.topics,
        out: cli.out,
        quiet: cli.quiet,
        clean_session: cli.clean_session,
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: cannot handle SIGTERM: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        match bulwark_consumer::run(options, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(e.exit_code())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "bulwark-consumer",
            "--broker",
            "mqtts://localhost:8883",
            "--ca-file",
            "ca.pem",
            "--cert",
            "a.pem",
            "--key",
            "a.key",
        ])
        .unwrap();
        assert_eq!(c.topics, ["devices/+/data/#"]);
        assert_eq!(c.client_id, "bulwark-consumer");
        let c = Cli::try_parse_from([
            "bulwark-consumer",
            "--broker",
            "mqtts://localhost:8883",
            "--ca-file",
            "ca.pem",
            "--cert",
            "a.pem",
            "--key",
            "a.key",
            "--topic",
            "devices/+/status",
            "--topic",
            "devices/+/data/#",
        ])
        .unwrap();
        assert_eq!(c.topics, ["devices/+/status", "devices/+/data/#"]);
        assert!(check_filter("devices/+/data/#").is_ok());
        assert!(check_filter("devices/#/x").is_err());
    }
}
