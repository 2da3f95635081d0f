//! The `bulwark-agent` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bulwark_agent::config::{AgentConfig, Durability, EXIT_BAD_CONFIG};
use bulwark_agent::ingest::{self, IngestRecord, IngestServer, Reply};
use bulwark_agent::queue::{
    GroupCommit, GroupCommitOptions, NewRecord, QueueOptions, SledQueue, UplinkQueue,
};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::{watch, Notify};

/// Bulwark edge agent: keeps every record local programs hand it on disk until the broker
/// has acknowledged it, over an outbound-only TLS connection with the device certificate.
/// The gateway listens on no network port.
#[derive(Debug, Parser)]
#[command(
    name = "bulwark-agent",
    version,
    after_help = "\
Examples:
  bulwark-agent run --config /etc/bulwark/agent.toml
  bulwark-agent send --series line1/temp --json 21.5
  echo '{\"series\":\"line1/pressure\",\"payload\":{\"bar\":2.1}}' | bulwark-agent send --file -
  bulwark-agent exposure

Exit codes: 0 done, 1 failure (the message says why), 64 bad configuration."
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
    /// Run the agent until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and exit (0 usable, 64 not).
    CheckConfig { file: PathBuf },
    /// Hand records to the running agent over its Unix socket (for shell scripts). Each is
    /// answered with its sequence number once it is safely on disk.
    Send {
        /// The agent's ingest socket.
        #[arg(long, default_value = "/run/bulwark-agent/ingest.sock")]
        socket: PathBuf,
        /// Series name under devices/<id>/data/, e.g. line1/temp.
        #[arg(long, required_unless_present = "file")]
        series: Option<String>,
        /// The payload as JSON, e.g. 21.5 or '{"bar":2.1}'.
        #[arg(long, conflicts_with_all = ["text", "file"])]
        json: Option<String>,
        /// The payload as a text string.
        #[arg(long, conflicts_with = "file")]
        text: Option<String>,
        /// Measurement time (RFC 3339 or Unix milliseconds); default: when the agent gets it.
        #[arg(long, conflicts_with = "file")]
        ts: Option<String>,
        /// Read request lines (JSON objects, one per line) from a file, or - for stdin.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// List the listening network sockets of this host that are reachable from the network
    /// (an edge gateway should have none).
    Exposure {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => match AgentConfig::load(&file) {
            Ok(c) => {
                println!("{}: OK (device {})", file.display(), c.device_id);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_BAD_CONFIG as u8)
            }
        },
        Command::Run { config } => {
            let config = match AgentConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG as u8);
                }
            };
            match runtime() {
                Ok(rt) => rt.block_on(run(config)),
                Err(code) => code,
            }
        }
        Command::Send {
            socket,
            series,
            json,
            text,
            ts,
            file,
        } => match runtime() {
            Ok(rt) => rt.block_on(send(socket, series, json, text, ts, file)),
            Err(code) => code,
        },
        Command::Exposure { json } => match bulwark_agent::exposure::ExposureReport::collect() {
            Ok(r) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                } else {
                    println!("{r}");
                }
                if r.is_clean() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("error: reading /proc/net: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn send(
    socket: PathBuf,
    series: Option<String>,
    json: Option<String>,
    text: Option<String>,
    ts: Option<String>,
    file: Option<PathBuf>,
) -> ExitCode {
    if let Some(f) = file {
        let print = |line: usize, r: Reply| match r {
            Reply::Accepted { seq } => println!("{line}: accepted seq {seq}"),
            Reply::Rejected { error } => eprintln!("{line}: rejected: {error}"),
        };
        let summary = if f.as_os_str() == "-" {
            let stdin = tokio::io::BufReader::new(tokio::io::stdin());
            ingest::send_stream(&socket, stdin, print).await
        } else {
            match tokio::fs::File::open(&f).await {
                Ok(file) => {
                    ingest::send_stream(&socket, tokio::io::BufReader::new(file), print).await
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", f.display());
                    return ExitCode::FAILURE;
                }
            }
        };
        return match summary {
            Ok(s) if s.rejected == 0 => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {}: {e}", socket.display());
                ExitCode::FAILURE
            }
        };
    }
    let series = series.unwrap_or_default();
    let line =
        match ingest::request_from_args(&series, json.as_deref(), text.as_deref(), ts.as_deref()) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
    match ingest::send(&socket, [line]).await {
        Ok(replies) => match replies.first() {
            Some(Reply::Accepted { seq }) => {
                println!("accepted seq {seq}");
                ExitCode::SUCCESS
            }
            Some(Reply::Rejected { error }) => {
                eprintln!("rejected: {error}");
                ExitCode::FAILURE
            }
            None => {
                eprintln!("error: no reply from the agent");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!(
                "error: cannot reach the agent at {}: {e}; is it running, and may you use its socket?",
                socket.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// Writes ingested records through the group commit and wakes the uplink.
#[derive(Clone)]
struct QueueSink {
    commit: GroupCommit,
}

impl QueueSink {
    fn new_record(r: IngestRecord, now_ms: u64) -> NewRecord {
        NewRecord {
            series: r.series,
            ts_ms: r.ts_ms.unwrap_or(now_ms),
            payload: r.payload,
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ingest::RecordSink for QueueSink {
    fn accept(
        &self,
        r: IngestRecord,
    ) -> impl std::future::Future<Output = Result<u64, String>> + Send {
        let fut = self
            .commit
            .submit(vec![QueueSink::new_record(r, unix_ms())]);
        async move {
            match fut.await {
                Ok(seqs) => seqs
                    .first()
                    .copied()
                    .ok_or_else(|| "not stored".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    }

    /// One submission for the whole batch, queued at once (so batches are stored in call
    /// order); one refused record does not refuse the others.
    fn accept_batch(
        &self,
        records: Vec<IngestRecord>,
    ) -> impl std::future::Future<Output = Vec<Result<u64, String>>> + Send {
        let n = records.len();
        let now_ms = unix_ms();
        let fut = self.commit.submit_each(
            records
                .into_iter()
                .map(|r| QueueSink::new_record(r, now_ms))
                .collect(),
        );
        async move {
            match fut.await {
                Ok(each) => each
                    .into_iter()
                    .map(|r| r.map_err(|e| e.to_string()))
                    .collect(),
                Err(e) => vec![Err(e.to_string()); n],
            }
        }
    }
}

/// Logs, at start, any listening socket of this host that the network can reach.
fn report_exposure() {
    match bulwark_agent::exposure::ExposureReport::collect() {
        Ok(r) if r.is_clean() => tracing::info!(
            loopback_only = r.loopback_only,
            "exposure check: no listening socket reachable from the network"
        ),
        Ok(r) => r.audit(),
        Err(e) => tracing::warn!(error = %e, "exposure check: cannot read /proc/net"),
    }
}

async fn run(config: AgentConfig) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    bulwark_agent::crash_point::init();
    let config = Arc::new(config);
    let q = &config.queue;
    let options = QueueOptions {
        cache_capacity_bytes: q.cache_capacity_bytes,
        max_bytes: q.max_bytes,
        durability: match q.durability {
            Durability::Flush => bulwark_agent::queue::Durability::Flush,
            Durability::Fsync => bulwark_agent::queue::Durability::Fsync,
        },
        ..QueueOptions::default()
    };
    let path = q.path.clone();
    let opened = tokio::task::spawn_blocking(move || SledQueue::open(&path, options)).await;
    let (queue, report) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: opening the queue: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(aside) = &report.moved_aside {
        tracing::error!(
            target: "audit",
            event = "queue_corrupt",
            moved_to = %aside.display(),
            detail = report.corruption.as_deref().unwrap_or(""),
            "the queue store was corrupt: moved aside for inspection, starting empty"
        );
    }
    tracing::info!(
        device = %config.device_id,
        records = report.records,
        next_seq = report.next_seq,
        drops = report.drops,
        "queue open"
    );
    let queue: Arc<dyn UplinkQueue> = Arc::new(queue);
    let wake = Arc::new(Notify::new());
    let commit = GroupCommit::start(queue.clone(), GroupCommitOptions::default(), wake.clone());
    let server = match IngestServer::bind(&config.ingest.socket, config.socket_mode()) {
        Ok(s) => s.with_limits(ingest::IngestLimits {
            max_pending_lines: config.ingest.max_pending_lines,
            max_pending_bytes: config.ingest.max_pending_bytes,
            ..ingest::IngestLimits::default()
        }),
        Err(e) => {
            eprintln!(
                "error: ingest socket {}: {e}",
                config.ingest.socket.display()
            );
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(socket = %config.ingest.socket.display(), "ingest socket ready");
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (status_tx, _status) = watch::channel(bulwark_agent::uplink::UplinkStatus::default());
    report_exposure();
    let health = bulwark_agent::health::HealthCollector::new(
        &config.device_id,
        config.queue.path.clone(),
        config.queue.max_bytes,
    );
    // Tunnel audit records go through the same group commit as telemetry.
    let tunnel = bulwark_agent::tunnel::TunnelAgent::new(&config, commit.clone());
    let uplink = tokio::spawn(bulwark_agent::uplink::run(
        config.clone(),
        queue.clone(),
        wake.clone(),
        status_tx,
        shutdown.clone(),
        health,
        tunnel,
    ));
    let sink = QueueSink { commit };
    let mut sources = tokio::task::JoinSet::new();
    for exec in config.sources.exec.iter().cloned() {
        tracing::info!(series = %exec.series, command = ?exec.command, interval_secs = exec.interval_secs, "exec source");
        sources.spawn(bulwark_agent::sources::run_exec(
            exec,
            Arc::new(sink.clone()),
            shutdown.clone(),
        ));
    }
    for tail in config.sources.tail.iter().cloned() {
        tracing::info!(file = %tail.path.display(), "tail source");
        sources.spawn(bulwark_agent::sources::run_tail(
            tail,
            config.tail_state_dir(),
            Arc::new(sink.clone()),
            shutdown.clone(),
        ));
    }
    let ingest = tokio::spawn(server.serve(sink, shutdown.clone()));
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    let _ = shutdown_tx.send(true);
    let _ = ingest.await;
    while sources.join_next().await.is_some() {}
    let _ = uplink.await;
    if let Err(e) = queue.flush() {
        tracing::error!(error = %e, "final queue flush failed");
    }
    tracing::info!("agent stopped");
    ExitCode::SUCCESS
}
