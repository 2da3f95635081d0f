//! conn-scale (broker memory per idle connection) and handshake (connection setup rate).

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use tokio::time::{sleep_until, Instant};

use super::{bounded, progress, Run};
use crate::cli::{ConnScaleArgs, HandshakeArgs};
use crate::percentile::nearest_rank;
use crate::report::{json_line, rate, round3};
use crate::sysstat::{self, CpuMeter};
use crate::UsageError;

/// Wait after the last connect before reading the broker's memory.
const SETTLE: Duration = Duration::from_secs(2);
/// Interval between memory readings while waiting for them to agree.
const RSS_POLL: Duration = Duration::from_millis(500);
/// Longest wait for two agreeing readings after [`SETTLE`].
const RSS_POLL_MAX: Duration = Duration::from_secs(5);
/// How long a closing handshake client waits for the broker to close after DISCONNECT.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// File descriptors kept free besides the clients (stdio, runtime, /proc reads).
const SPARE_FDS: u64 = 10;

#[derive(Debug, Serialize)]
struct ConnScaleFields {
    clients: u64,
    connected: u64,
    failed: u64,
    connects_per_s: f64,
    rss_before_kb: u64,
    rss_after_kb: u64,
    bytes_per_conn: Option<f64>,
}

#[derive(Debug, Serialize)]
struct HandshakeFields {
    connections: u64,
    failed: u64,
    handshakes_per_s: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

/// `bulwark-bench conn-scale`.
pub async fn conn_scale(run: &Run, args: &ConnScaleArgs) -> Result<String> {
    let Some(pid) = run.broker_pid else {
        return Err(UsageError(
            "conn-scale needs --broker-pid PID: it measures the broker's memory per connection"
                .into(),
        )
        .into());
    };
    let clients = u64::from(args.clients);
    if let Some(limit) = sysstat::raise_nofile_limit()? {
        if clients + SPARE_FDS > limit {
            return Err(UsageError(format!(
                "--clients {clients} needs {} open files but RLIMIT_NOFILE allows {limit}; \
                 raise the hard limit (ulimit -Hn) or use fewer clients",
                clients + SPARE_FDS
            ))
            .into());
        }
    }
    progress(format_args!(
        "conn-scale: {clients} {} clients, {} connects at a time",
        run.target.transport(),
        args.concurrency
    ));
    let rss_before = sysstat::rss_kb(pid)?;
    let cpu = CpuMeter::start(run.broker_pid);
    let start = Instant::now();
    let result = bounded(
        clients as usize,
        args.concurrency as usize,
        run.deadline,
        |i| {
            let target = run.target.clone();
            let id = run.client_id("conn", i);
            async move { target.connect(id).await }
        },
    )
    .await;
    let connect_time = start.elapsed();
    let cpu = cpu.stop();
    let mut conns = Vec::with_capacity(result.done.len());
    let mut failed = result.unfinished as u64;
    let mut first_error = None;
    for r in result.done {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        progress(format_args!("{failed} connects failed; first: {e:#}"));
    }
    let connected = conns.len() as u64;
    progress(format_args!(
        "{connected} connected in {:.3} s; waiting for the broker's memory to settle",
        connect_time.as_secs_f64()
    ));
    let mut timed_out = result.timed_out;
    let rss_after = if timed_out {
        sysstat::rss_kb(pid)?
    } else {
        let (rss, settled_in_time) = settled_rss(pid, run.deadline).await?;
        timed_out |= !settled_in_time;
        rss
    };
    for conn in conns {
        conn.disconnect().await;
    }
    let bytes_per_conn = (connected > 0)
        .then(|| round3((rss_after as f64 - rss_before as f64) * 1024.0 / connected as f64));
    let common = run.common("conn-scale", None, connect_time, cpu, timed_out);
    json_line(
        &common,
        &ConnScaleFields {
            clients,
            connected,
            failed,
            connects_per_s: rate(connected, connect_time.as_secs_f64()),
            rss_before_kb: rss_before,
            rss_after_kb: rss_after,
            bytes_per_conn,
        },
    )
}

/// VmRSS after [`SETTLE`], once two readings [`RSS_POLL`] apart agree (within 0.1 %), or
/// the last reading after [`RSS_POLL_MAX`]. `false` when the deadline cut the wait short.
async fn settled_rss(pid: u32, deadline: Instant) -> Result<(u64, bool)> {
    let settle_end = Instant::now() + SETTLE;
    sleep_until(settle_end.min(deadline)).await;
    let mut last = sysstat::rss_kb(pid)?;
    let poll_end = Instant::now() + RSS_POLL_MAX;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok((last, false));
        }
        if now >= poll_end {
            return Ok((last, true));
        }
        sleep_until((now + RSS_POLL).min(deadline)).await;
        let rss = sysstat::rss_kb(pid)?;
        let stable = rss.abs_diff(last) <= (rss / 1000).max(16);
        last = rss;
        if stable {
            return Ok((last, true));
        }
    }
}

/// `bulwark-bench handshake`.
pub async fn handshake(run: &Run, args: &HandshakeArgs) -> Result<String> {
    let connections = u64::from(args.connections);
    progress(format_args!(
        "handshake: {connections} {} connections, {} at a time",
        run.target.transport(),
        args.concurrency
    ));
    let cpu = CpuMeter::start(run.broker_pid);
    let start = Instant::now();
    let result = bounded(
        connections as usize,
        args.concurrency as usize,
        run.deadline,
        |i| {
            let target = run.target.clone();
            let id = run.client_id("hs", i);
            async move {
                let began = Instant::now();
                let conn = target.connect(id).await?;
                let took = began.elapsed();
                conn.disconnect_and_wait(CLOSE_GRACE).await;
                Ok(took)
            }
        },
    )
    .await;
    let elapsed = start.elapsed();
    let cpu = cpu.stop();
    let mut times_ns = Vec::with_capacity(result.done.len());
    let mut failed = result.unfinished as u64;
    let mut first_error = None;
    for r in result.done {
        match r {
            Ok(t) => times_ns.push(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        progress(format_args!("{failed} handshakes failed; first: {e:#}"));
    }
    times_ns.sort_unstable();
    let ms = |ns: Option<u64>| ns.map(|v| round3(v as f64 / 1e6));
    let ok = times_ns.len() as u64;
    progress(format_args!(
        "handshake: {ok} ok, {failed} failed in {:.3} s",
        elapsed.as_secs_f64()
    ));
    let common = run.common("handshake", None, elapsed, cpu, result.timed_out);
    json_line(
        &common,
        &HandshakeFields {
            connections,
            failed,
            handshakes_per_s: rate(ok, elapsed.as_secs_f64()),
            p50_ms: ms(nearest_rank(&times_ns, 50.0)),
            p99_ms: ms(nearest_rank(&times_ns, 99.0)),
        },
    )
}
