//! bulwark-bench: the load generator behind `make bench` (the role emqtt-bench plays for
//! EMQX). It drives an MQTT 3.1.1 broker on this machine through one scenario and prints
//! one JSON line with the result.
//!
//! Layout:
//! - [`cli`]: the command line (common options + one subcommand per scenario).
//! - [`client`]: the loopback-only [`client::Target`] (TCP or mutual TLS) and
//!   [`client::Conn`], one MQTT connection with batched writes.
//! - [`wire`]: PUBLISH templates stamped per message, in-place PUBLISH parsing, packet ids,
//!   all on top of `bulwark_protocol::codec`.
//! - [`payload`]: the (publisher, sequence, send time) id at the start of each payload.
//! - [`tally`]: exact loss and duplicate accounting; [`percentile`]: exact percentiles.
//! - [`sysstat`]: CPU and memory of this process and of the broker, from /proc.
//! - [`scenario`]: fan-in, fan-out, latency, conn-scale, handshake, retained.
//! - [`report`]: the JSON result line.
#![forbid(unsafe_code)]

mod cli;
mod client;
mod payload;
mod percentile;
mod report;
mod scenario;
mod sysstat;
mod tally;
mod wire;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Scenario};
use client::{Target, TlsOptions};
use payload::Clock;
use scenario::Run;

/// A mistake on the command line or in the files it names: exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let started = tokio::time::Instant::now();
    Clock::origin();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulwark-bench: error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli, started));
    // Tasks aborted at the deadline may still hold sockets; do not wait for them.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bulwark-bench: error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

async fn run(cli: Cli, started: tokio::time::Instant) -> Result<String> {
    let c = &cli.common;
    client::check_loopback(&c.host)?;
    if let Some(pid) = c.broker_pid {
        sysstat::check_broker_pid(pid)?;
    }
    if !c.tls && (c.ca.is_some() || c.cert.is_some() || c.key.is_some()) {
        return Err(UsageError("--ca, --cert and --key only apply with --tls".into()).into());
    }
    if c.password.is_some() && c.username.is_none() {
        return Err(UsageError("--password needs --username (MQTT 3.1.1 §3.1.2.9)".into()).into());
    }
    let tls = c.tls.then(|| TlsOptions {
        ca: c.ca.as_deref(),
        cert: c.cert.as_deref(),
        key: c.key.as_deref(),
        server_name: &c.server_name,
    });
    let target = Target::new(&c.host, c.port, tls, c.username.clone(), c.password.clone()).await?;
    let run = Run {
        target: Arc::new(target),
        deadline: started + Duration::from_secs(c.max_seconds),
        label: c.label.clone(),
        broker_pid: c.broker_pid,
        client_prefix: c.client_prefix.clone(),
    };
    match &cli.scenario {
        Scenario::FanIn(a) => scenario::fan::fan_in(&run, a).await,
        Scenario::FanOut(a) => scenario::fan::fan_out(&run, a).await,
        Scenario::Latency(a) => scenario::latency::latency(&run, a).await,
        Scenario::ConnScale(a) => scenario::connections::conn_scale(&run, a).await,
        Scenario::Handshake(a) => scenario::connections::handshake(&run, a).await,
        Scenario::Retained(a) => scenario::retained::retained(&run, a).await,
    }
}
