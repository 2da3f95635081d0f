//! Built-in local data sources: telemetry the agent produces itself, without a separate
//! producer program writing to the ingest socket.
//!
//! Every source hands its records to the same queue as the ingest socket does, so they are
//! stored durably and uplinked like any other telemetry. Sources are configured under the
//! `[source]` table of the agent's configuration file; each key has the default shown.
//!
//! # `[[source.exec]]`: run a command periodically
//!
//! ```toml
//! [[source.exec]]
//! series = "gateway/sensors"              # required: the series the output is published as
//! command = ["/usr/bin/sensors", "-j"]    # required: program and arguments
//! interval_secs = 60                      # run every 60 s; the first run is at start-up
//! timeout_secs = 10                       # a run taking longer is killed (and gives no record)
//! max_output_bytes = 65536                # more output than this is an error (and no record)
//! ```
//!
//! `command` is run directly, never through a shell: `command = ["sh", "-c", "..."]` if you
//! need one. It gets no standard input, and runs in its own process group so that a timeout
//! kills whatever it started too. When it exits with status 0, its standard output becomes one
//! record: the JSON value it printed if the output is JSON (`21.5`, `{"v":1}`, `true`, ...),
//! otherwise the output as a JSON string with surrounding whitespace removed, or raw bytes
//! (`payload_b64`) if it is not UTF-8. A command that cannot be started, exits with another
//! status, runs into the timeout or prints too much gives no record; the agent logs a warning
//! with the series, the command, the reason and the first 512 bytes of its standard error.
//! Runs never overlap: when a run takes longer than the interval, the next one starts when it
//! ends.
//!
//! # `[[source.tail]]`: follow a file of JSON lines
//!
//! ```toml
//! [[source.tail]]
//! path = "/var/log/plc/values.jsonl"      # required; relative to the configuration file
//! poll_interval_ms = 500                  # how often to look for new lines
//! max_line_bytes = 262144                 # longer lines are skipped (with a warning)
//! ```
//!
//! Each line of the file is one request in the ingest socket's format (see
//! [`crate::ingest`]), e.g. `{"series":"line1/temp","payload":21.5}`. A line is read once it
//! ends with a newline; a line that does not parse is skipped with a warning naming
//! `file:offset` and the problem. Lines are submitted in file order, one at a time; when
//! the agent cannot take a record (e.g. its queue is busy) the same line is retried after a
//! back-off of up to 5 s, so no line is skipped.
//!
//! The position after the last line handled is kept in a small state file in the agent's
//! state directory (`tail-<hash of the path>.json`, mode 0600, replaced atomically), so after
//! a restart, a crash or `kill -9` tailing resumes where it stopped: every line is delivered
//! at least once; a line may be delivered again only if the agent stopped between queueing it
//! and recording the position. The state remembers which file it belongs to (inode and a
//! fingerprint of its first bytes); if the file was replaced while the agent was stopped it
//! is read from the start.
//!
//! The file may be missing at start-up (the agent waits for it). When it is truncated
//! (shorter than the position reached), reading starts again from its beginning. When it is
//! replaced, e.g. renamed away by log rotation and created anew, the rest of the old file is
//! read first, then the new file from its beginning. Two tail sources may not name the same
//! file.
//!
//! # Host figures
//!
//! [`HostSampler`] reads CPU use, load, memory, uptime (from `/proc`) and the space on the
//! filesystem holding a given path, for the agent's health report ([`HostFigures`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_protocol::envelope::Payload;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::Instrument as _;

use crate::ingest::{parse_line, validate_series, IngestLimits, IngestRecord, RecordSink};

/// Default `interval_secs` of an exec source.
pub const DEFAULT_EXEC_INTERVAL_SECS: u64 = 60;
/// Default `timeout_secs` of an exec source.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 10;
/// Default `max_output_bytes` of an exec source: 64 KiB.
pub const DEFAULT_EXEC_MAX_OUTPUT_BYTES: usize = 64 * 1024;
/// Default `poll_interval_ms` of a tail source.
pub const DEFAULT_TAIL_POLL_INTERVAL_MS: u64 = 500;
/// Default `max_line_bytes` of a tail source: 256 KiB, as for the ingest socket.
pub const DEFAULT_TAIL_MAX_LINE_BYTES: usize = crate::ingest::DEFAULT_MAX_LINE_BYTES;
/// Largest `max_output_bytes` and `max_line_bytes` accepted: 16 MiB.
pub const MAX_BUFFER_BYTES: usize = 16 * 1024 * 1024;

/// How much of a failed command's standard error goes into the log.
const STDERR_HEAD_BYTES: usize = 512;
/// First and longest wait before a tail source offers a refused record again.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A tail source reads the file in chunks of this size ...
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// ... and at most this much before handing the lines found over.
const READ_BUDGET_BYTES: usize = 1024 * 1024;
/// Bytes at the start of a tailed file whose hash the state file keeps.
const FINGERPRINT_BYTES: u64 = 1024;
/// While a backlog is read, the tail position is made durable (fsync) at least this often.
const SYNC_EVERY: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// The `[source]` table: the built-in sources to run.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    /// `[[source.exec]]`: commands run periodically.
    #[serde(default)]
    pub exec: Vec<ExecSourceConfig>,
    /// `[[source.tail]]`: files of JSON lines followed.
    #[serde(default)]
    pub tail: Vec<TailSourceConfig>,
}

/// One `[[source.exec]]`: a command whose output is a record.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSourceConfig {
    /// The series the output is published as (`devices/<id>/data/<series>`).
    pub series: String,
    /// Program and arguments, run directly (never through a shell).
    pub command: Vec<String>,
    /// Seconds between the starts of two runs; default 60. The first run is at start-up.
    #[serde(default = "default_exec_interval_secs")]
    pub interval_secs: u64,
    /// Seconds a run may take before it is killed; default 10.
    #[serde(default = "default_exec_timeout_secs")]
    pub timeout_secs: u64,
    /// Most bytes of standard output; more is an error. Default 65536.
    #[serde(default = "default_exec_max_output_bytes")]
    pub max_output_bytes: usize,
}

/// One `[[source.tail]]`: a file of JSON lines in the ingest request format.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TailSourceConfig {
    /// The file; a relative path is relative to the configuration file's directory.
    pub path: PathBuf,
    /// Milliseconds between looks for new lines when the file has none; default 500.
    #[serde(default = "default_tail_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Longest line, newline excluded; longer lines are skipped. Default 262144.
    #[serde(default = "default_tail_max_line_bytes")]
    pub max_line_bytes: usize,
}

fn default_exec_interval_secs() -> u64 {
    DEFAULT_EXEC_INTERVAL_SECS
}
fn default_exec_timeout_secs() -> u64 {
    DEFAULT_EXEC_TIMEOUT_SECS
}
fn default_exec_max_output_bytes() -> usize {
    DEFAULT_EXEC_MAX_OUTPUT_BYTES
}
fn default_tail_poll_interval_ms() -> u64 {
    DEFAULT_TAIL_POLL_INTERVAL_MS
}
fn default_tail_max_line_bytes() -> usize {
    DEFAULT_TAIL_MAX_LINE_BYTES
}

impl SourcesConfig {
    /// Checks every source. The error is `(key, message)`: the key as in
    /// `source.exec[0].series`, the message saying what to fix. Call
    /// [`resolve_paths`](SourcesConfig::resolve_paths) first, so that two spellings of the
    /// same tail path are recognised.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let limits = IngestLimits::default();
        for (i, e) in self.exec.iter().enumerate() {
            let key = |k: &str| format!("source.exec[{i}].{k}");
            validate_series(&e.series, &limits).map_err(|err| (key("series"), err.to_string()))?;
            match e.command.first() {
                None => {
                    return Err((
                        key("command"),
                        "is empty; give the program and its arguments, e.g. \
                         command = [\"/usr/bin/sensors\", \"-j\"] (it is run directly, not through a shell)"
                            .into(),
                    ))
                }
                Some(p) if p.is_empty() => {
                    return Err((
                        key("command"),
                        "the program (the first element) is empty; name the program to run".into(),
                    ))
                }
                Some(_) => {}
            }
            if e.interval_secs == 0 {
                return Err((key("interval_secs"), "must be at least 1".into()));
            }
            if e.timeout_secs == 0 {
                return Err((key("timeout_secs"), "must be at least 1".into()));
            }
            if e.max_output_bytes == 0 || e.max_output_bytes > MAX_BUFFER_BYTES {
                return Err((
                    key("max_output_bytes"),
                    format!("must be between 1 and {MAX_BUFFER_BYTES}"),
                ));
            }
        }
        for (i, t) in self.tail.iter().enumerate() {
            let key = |k: &str| format!("source.tail[{i}].{k}");
            if t.path.as_os_str().is_empty() {
                return Err((
                    key("path"),
                    "is empty; name the file of JSON lines to follow".into(),
                ));
            }
            if let Some(j) = self.tail[..i].iter().position(|o| o.path == t.path) {
                return Err((
                    key("path"),
                    format!(
                        "{} is already followed by source.tail[{j}]; follow each file once",
                        t.path.display()
                    ),
                ));
            }
            if t.poll_interval_ms == 0 {
                return Err((key("poll_interval_ms"), "must be at least 1".into()));
            }
            if t.max_line_bytes == 0 || t.max_line_bytes > MAX_BUFFER_BYTES {
                return Err((
                    key("max_line_bytes"),
                    format!("must be between 1 and {MAX_BUFFER_BYTES}"),
                ));
            }
        }
        Ok(())
    }

    /// Makes relative tail paths relative to `base`, the directory holding the
    /// configuration file.
    pub fn resolve_paths(&mut self, base: &Path) {
        for t in &mut self.tail {
            if t.path.is_relative() && !t.path.as_os_str().is_empty() {
                t.path = base.join(&t.path);
            }
        }
    }
}

/// Resolves when shutdown is requested: the value is true, or the sender is gone.
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|&stop| stop).await;
}

/// Sleeps for `d`; false if shutdown was requested first.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        biased;
        _ = shutdown_requested(shutdown) => false,
        _ = tokio::time::sleep(d) => true,
    }
}

// ---------------------------------------------------------------------------------------
// Exec source
// ---------------------------------------------------------------------------------------

/// Runs `cfg.command` every `interval_secs` (the first time at once) and submits each
/// successful run's output as a record, until `shutdown` turns true (or its sender is
/// dropped). A run in progress is then killed.
pub async fn run_exec<S: RecordSink>(
    cfg: ExecSourceConfig,
    sink: Arc<S>,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("exec_source", series = %cfg.series);
    async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(cfg.interval_secs.max(1)));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown_requested(&mut shutdown) => break,
                _ = ticker.tick() => {}
            }
            let outcome = tokio::select! {
                biased;
                _ = shutdown_requested(&mut shutdown) => break,
                o = exec_once(&cfg) => o,
            };
            let payload = match outcome {
                Ok(p) => p,
                Err(f) => {
                    tracing::warn!(
                        series = %cfg.series,
                        command = ?cfg.command,
                        reason = %f.reason,
                        stderr = %f.stderr,
                        "exec source: the command failed; no record"
                    );
                    continue;
                }
            };
            let record = IngestRecord {
                series: cfg.series.clone(),
                ts_ms: None,
                payload,
            };
            let accepted = tokio::select! {
                biased;
                _ = shutdown_requested(&mut shutdown) => break,
                r = sink.accept(record) => r,
            };
            match accepted {
                Ok(seq) => tracing::debug!(seq, "exec source: record queued"),
                Err(e) => tracing::warn!(
                    series = %cfg.series,
                    command = ?cfg.command,
                    error = %e,
                    "exec source: the agent did not accept the record; it is lost"
                ),
            }
        }
        tracing::debug!("exec source stopped");
    }
    .instrument(span)
    .await
}

/// Why a run of an exec command gave no record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExecFailure {
    reason: String,
    /// The first bytes of its standard error, lossily decoded and trimmed.
    stderr: String,
}

impl ExecFailure {
    fn new(reason: String, stderr: &[u8]) -> ExecFailure {
        ExecFailure {
            reason,
            stderr: String::from_utf8_lossy(stderr).trim().to_owned(),
        }
    }
}

/// A started command: killed (with its process group) when dropped before it was reaped.
struct RunningChild {
    child: Child,
    pgid: Option<rustix::process::Pid>,
    reaped: bool,
}

impl RunningChild {
    fn kill(&mut self) {
        if self.reaped {
            // Its id may belong to someone else by now.
            return;
        }
        if let Some(pgid) = self.pgid {
            // The leader is not reaped, so the group id is still ours.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
        let _ = self.child.start_kill();
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await;
        if status.is_ok() {
            self.reaped = true;
        }
        status
    }
}

impl Drop for RunningChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the command once; the payload of its output, or why there is none.
async fn exec_once(cfg: &ExecSourceConfig) -> Result<Payload, ExecFailure> {
    let Some((program, args)) = cfg.command.split_first() else {
        return Err(ExecFailure::new("no command configured".into(), b""));
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(|e| ExecFailure::new(format!("cannot start {program:?}: {e}"), b""))?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    let mut run = RunningChild {
        child,
        pgid,
        reaped: false,
    };
    let stdout = run.child.stdout.take();
    let stderr = run.child.stderr.take();
    let max = cfg.max_output_bytes;
    let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
    let mut err_head = Vec::new();

    let finished = tokio::time::timeout(timeout, async {
        let (out, ()) = tokio::join!(
            async {
                let out = read_capped(stdout, max).await;
                if matches!(out, Ok(None)) {
                    // Too much output: no use waiting for the rest.
                    run.kill();
                }
                out
            },
            read_head(stderr, &mut err_head, STDERR_HEAD_BYTES),
        );
        (out, run.wait().await)
    })
    .await;

    let (out, status) = match finished {
        Ok(done) => done,
        Err(_) => {
            run.kill();
            // Reap it; SIGKILL takes effect at once unless the process is stuck in the kernel.
            let _ = tokio::time::timeout(Duration::from_secs(5), run.wait()).await;
            return Err(ExecFailure::new(
                format!(
                    "did not finish within timeout_secs ({} s); killed",
                    timeout.as_secs()
                ),
                &err_head,
            ));
        }
    };
    let out = match out {
        Ok(Some(out)) => out,
        Ok(None) => {
            return Err(ExecFailure::new(
                format!(
                    "printed more than max_output_bytes ({max} bytes); stopped it. Raise \
                     max_output_bytes or make the command print less"
                ),
                &err_head,
            ))
        }
        Err(e) => {
            return Err(ExecFailure::new(
                format!("reading its output failed: {e}"),
                &err_head,
            ))
        }
    };
    match status {
        Ok(s) if s.success() => Ok(output_payload(out)),
        Ok(s) => Err(ExecFailure::new(format!("failed ({s})"), &err_head)),
        Err(e) => Err(ExecFailure::new(
            format!("waiting for it failed: {e}"),
            &err_head,
        )),
    }
}

/// Reads to the end, or `None` as soon as there are more than `max` bytes.
async fn read_capped<R: AsyncRead + Unpin>(
    reader: Option<R>,
    max: usize,
) -> io::Result<Option<Vec<u8>>> {
    let Some(reader) = reader else {
        return Ok(Some(Vec::new()));
    };
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    reader.take(limit).read_to_end(&mut buf).await?;
    Ok((buf.len() <= max).then_some(buf))
}

/// Reads to the end, keeping the first `keep` bytes in `head`.
async fn read_head<R: AsyncRead + Unpin>(reader: Option<R>, head: &mut Vec<u8>, keep: usize) {
    let Some(mut reader) = reader else { return };
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = keep.saturating_sub(head.len());
                head.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// The payload of a command's output: the JSON value if it is JSON, else the trimmed text
/// as a JSON string, else (not UTF-8) the bytes.
fn output_payload(out: Vec<u8>) -> Payload {
    match String::from_utf8(out) {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(v) => Payload::Json(v),
            Err(_) => Payload::Json(Value::String(text.trim().to_owned())),
        },
        Err(e) => Payload::Bytes(e.into_bytes()),
    }
}

// ---------------------------------------------------------------------------------------
// Tail source
// ---------------------------------------------------------------------------------------

/// Follows `cfg.path` and submits each line's record, keeping its position in a state file
/// in `state_dir` (created 0700 if missing), until `shutdown` turns true (or its sender is
/// dropped).
pub async fn run_tail<S: RecordSink>(
    cfg: TailSourceConfig,
    state_dir: PathBuf,
    sink: Arc<S>,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("tail_source", file = %cfg.path.display());
    async move {
        let limits = IngestLimits {
            max_line_bytes: cfg.max_line_bytes,
            ..IngestLimits::default()
        };
        let poll_interval = Duration::from_millis(cfg.poll_interval_ms.max(1));
        let store = StateStore::new(state_dir, &cfg.path);
        let (store, saved) = blocking(store, |s| s.load()).await;
        let mut tail = Tail {
            reader: TailReader::new(cfg.path.clone(), cfg.max_line_bytes, saved),
            store,
            committed: None,
            unsynced: false,
            last_sync: Instant::now(),
            save_failed: false,
        };
        let mut poll_error: Option<String> = None;
        'run: loop {
            if *shutdown.borrow() {
                break;
            }
            let poll;
            (tail, poll) = blocking(tail, |t| t.reader.poll()).await;
            let poll = match poll {
                Ok(p) => {
                    poll_error = None;
                    p
                }
                Err(e) => {
                    let text = e.to_string();
                    if poll_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(error = %text, "tail source: cannot read the file; retrying");
                        poll_error = Some(text);
                    }
                    if !sleep_or_shutdown(poll_interval, &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            for event in poll.events {
                match event {
                    TailEvent::Start { offset } => {
                        tail.committed = Some(offset);
                        tail.unsynced = true;
                    }
                    TailEvent::TooLong { start, end } => {
                        tracing::warn!(
                            at = %format_args!("{}:{start}", cfg.path.display()),
                            "tail source: line longer than max_line_bytes ({}); skipped",
                            cfg.max_line_bytes
                        );
                        tail.committed = Some(end);
                        tail.unsynced = true;
                    }
                    TailEvent::Line { start, end, bytes } => match parse_line(&bytes, &limits) {
                        Err(e) => {
                            tracing::warn!(
                                at = %format_args!("{}:{start}", cfg.path.display()),
                                error = %e,
                                "tail source: bad line skipped"
                            );
                            tail.committed = Some(end);
                            tail.unsynced = true;
                        }
                        Ok(record) => {
                            if !submit(&*sink, record, &cfg.path, start, &mut shutdown).await {
                                break 'run;
                            }
                            tail.committed = Some(end);
                            tail.unsynced = true;
                            let sync = tail.last_sync.elapsed() >= SYNC_EVERY;
                            tail = tail.save(sync).await;
                        }
                    },
                }
            }
            if !poll.more {
                if tail.unsynced {
                    tail = tail.save(true).await;
                }
                if !sleep_or_shutdown(poll_interval, &mut shutdown).await {
                    break;
                }
            }
        }
        if tail.unsynced {
            tail.save(true).await;
        }
        tracing::debug!("tail source stopped");
    }
    .instrument(span)
    .await
}

/// Offers `record` until the sink accepts it, backing off between attempts; false if
/// shutdown was requested first.
async fn submit<S: RecordSink>(
    sink: &S,
    record: IngestRecord,
    path: &Path,
    offset: u64,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut backoff = RETRY_MIN;
    let mut attempt = 0u32;
    loop {
        let result = tokio::select! {
            biased;
            _ = shutdown_requested(shutdown) => return false,
            r = sink.accept(record.clone()) => r,
        };
        match result {
            Ok(seq) => {
                tracing::trace!(seq, offset, "tail source: record queued");
                return true;
            }
            Err(e) => {
                attempt += 1;
                tracing::warn!(
                    at = %format_args!("{}:{offset}", path.display()),
                    error = %e,
                    attempt,
                    retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                    "tail source: the agent did not accept the record; retrying the same line"
                );
                if !sleep_or_shutdown(backoff, shutdown).await {
                    return false;
                }
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Runs blocking file work on the blocking pool, moving `value` there and back.
async fn blocking<T, R, F>(mut value: T, f: F) -> (T, R)
where
    T: Send + 'static,
    R: Send + 'static,
    F: FnOnce(&mut T) -> R + Send + 'static,
{
    match tokio::task::spawn_blocking(move || {
        let r = f(&mut value);
        (value, r)
    })
    .await
    {
        Ok(done) => done,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The state of a running tail source that moves to the blocking pool and back.
struct Tail {
    reader: TailReader,
    store: StateStore,
    /// Offset after the last line handled (accepted, or skipped as bad) in the current file.
    committed: Option<u64>,
    /// `committed` changed since the state file was last made durable.
    unsynced: bool,
    last_sync: Instant,
    save_failed: bool,
}

impl Tail {
    /// Records `committed` in the state file; with `sync`, durably (fsync).
    async fn save(self, sync: bool) -> Tail {
        let (mut tail, result) = blocking(self, move |t| {
            let Some(committed) = t.committed else {
                return Ok(());
            };
            let Some(state) = t.reader.state(committed)? else {
                return Ok(());
            };
            t.store.save(&state, sync)
        })
        .await;
        match result {
            Ok(()) => {
                if tail.save_failed {
                    tracing::info!("tail source: the position is recorded again");
                }
                tail.save_failed = false;
                if sync {
                    tail.unsynced = false;
                    tail.last_sync = Instant::now();
                }
            }
            Err(e) => {
                if !tail.save_failed {
                    tracing::warn!(
                        state_file = %tail.store.file.display(),
                        error = %e,
                        "tail source: cannot record the position; after a restart lines would be delivered again"
                    );
                }
                tail.save_failed = true;
            }
        }
        tail
    }
}

/// What the state file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TailState {
    /// The tailed path (for people, and to detect a hash collision of state file names).
    path: String,
    /// Identity of the file the offset belongs to.
    dev: u64,
    ino: u64,
    /// Bytes of the file handled: reading resumes here.
    offset: u64,
    /// FNV-1a hash (hex) of its first `min(offset, 1024)` bytes, to tell a file that
    /// reuses the inode of a deleted one.
    head_len: u64,
    head_fnv1a: String,
}

/// The state file of one tailed path.
struct StateStore {
    dir: PathBuf,
    file: PathBuf,
    path_text: String,
}

impl StateStore {
    fn new(dir: PathBuf, tailed: &Path) -> StateStore {
        let name = format!("tail-{:016x}.json", fnv1a(tailed.as_os_str().as_bytes()));
        StateStore {
            file: dir.join(name),
            dir,
            path_text: tailed.to_string_lossy().into_owned(),
        }
    }

    /// The saved state, if there is a usable one.
    fn load(&mut self) -> Option<TailState> {
        let text = match fs::read(&self.file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(
                    state_file = %self.file.display(),
                    error = %e,
                    "tail source: cannot read the saved position; reading the file from the start"
                );
                return None;
            }
        };
        match serde_json::from_slice::<TailState>(&text) {
            Ok(s) if s.path == self.path_text => Some(s),
            Ok(s) => {
                tracing::warn!(
                    state_file = %self.file.display(),
                    other = %s.path,
                    "tail source: the state file belongs to another path; reading the file from the start"
                );
                None
            }
            Err(e) => {
                tracing::warn!(
                    state_file = %self.file.display(),
                    error = %e,
                    "tail source: the saved position is unreadable; reading the file from the start"
                );
                None
            }
        }
    }

    /// Replaces the state file atomically (temporary file, rename); with `sync`, durably.
    fn save(&self, state: &TailState, sync: bool) -> io::Result<()> {
        let annotate = |what: &Path, e: io::Error| {
            io::Error::new(e.kind(), format!("{}: {e}", what.display()))
        };
        if !self.dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(|e| annotate(&self.dir, e))?;
        }
        let mut text = serde_json::to_vec(state).map_err(io::Error::other)?;
        text.push(b'\n');
        let mut tmp_name = self.file.clone().into_os_string();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(annotate(&tmp, e)),
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| annotate(&tmp, e))?;
        f.write_all(&text).map_err(|e| annotate(&tmp, e))?;
        if sync {
            f.sync_all().map_err(|e| annotate(&tmp, e))?;
        }
        drop(f);
        fs::rename(&tmp, &self.file).map_err(|e| annotate(&self.file, e))?;
        if sync {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| annotate(&self.dir, e))?;
        }
        Ok(())
    }
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What reading the tailed file found, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TailEvent {
    /// Reading starts at `offset` of a file just opened (resumed from the saved state, or
    /// 0), or again at 0 after a truncation. Always the first event of a poll.
    Start { offset: u64 },
    /// A complete line `start..end` (`end` is after its newline); `bytes` without the
    /// newline.
    Line {
        start: u64,
        end: u64,
        bytes: Vec<u8>,
    },
    /// A line `start..end` longer than the limit, skipped.
    TooLong { start: u64, end: u64 },
}

#[derive(Debug, Default)]
struct TailPoll {
    events: Vec<TailEvent>,
    /// More may be read at once: poll again without waiting.
    more: bool,
}

struct OpenTailFile {
    file: File,
    dev: u64,
    ino: u64,
}

/// Reads complete lines from a file that grows, is truncated or replaced. Blocking I/O.
struct TailReader {
    path: PathBuf,
    max_line: usize,
    file: Option<OpenTailFile>,
    /// Saved state to resume from when the file is first opened.
    resume: Option<TailState>,
    /// Offset in `file` of the next byte to read.
    read_pos: u64,
    /// Bytes of a line whose newline has not been read yet; they start at
    /// `read_pos - buf.len()`.
    buf: Vec<u8>,
    /// Discarding an over-long line that started here, up to its newline.
    skipping: Option<u64>,
    /// The path names another file; the old one is read once more before switching.
    replaced_seen: bool,
    waiting_logged: bool,
    /// Cached first bytes of `file`, for the fingerprint.
    head: Vec<u8>,
    chunk: Vec<u8>,
}

impl TailReader {
    fn new(path: PathBuf, max_line: usize, resume: Option<TailState>) -> TailReader {
        TailReader {
            path,
            max_line: max_line.max(1),
            file: None,
            resume,
            read_pos: 0,
            buf: Vec::new(),
            skipping: None,
            replaced_seen: false,
            waiting_logged: false,
            head: Vec::new(),
            chunk: vec![0; READ_CHUNK_BYTES],
        }
    }

    fn annotate(&self, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("{}: {e}", self.path.display()))
    }

    /// Reads what is there; returns the lines found.
    fn poll(&mut self) -> io::Result<TailPoll> {
        let mut out = TailPoll::default();
        if self.file.is_none() && !self.open(&mut out)? {
            return Ok(out);
        }
        let mut budget = READ_BUDGET_BYTES;
        loop {
            let n = self.read_chunk(&mut out.events)?;
            if n == 0 {
                break;
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                out.more = true;
                return Ok(out);
            }
        }
        if out.events.is_empty() {
            // At the end, nothing pending: was the file truncated or replaced? (Only with no
            // events pending, so that a Start event is always the first of its poll.)
            self.check_file(&mut out)?;
        } else {
            out.more = true;
        }
        Ok(out)
    }

    /// Opens the path; false if it does not exist (yet).
    fn open(&mut self, out: &mut TailPoll) -> io::Result<bool> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !self.waiting_logged {
                    tracing::info!("tail source: the file does not exist (yet); waiting for it");
                    self.waiting_logged = true;
                }
                return Ok(false);
            }
            Err(e) => return Err(self.annotate(e)),
        };
        let meta = file.metadata().map_err(|e| self.annotate(e))?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a regular file; a tail source follows a file of JSON lines",
                    self.path.display()
                ),
            ));
        }
        let opened = OpenTailFile {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
        };
        self.head.clear();
        let offset = match self.resume.take() {
            Some(saved) => self.resume_offset(&opened, meta.len(), &saved)?,
            None => 0,
        };
        self.file = Some(opened);
        self.read_pos = offset;
        self.buf.clear();
        self.skipping = None;
        self.replaced_seen = false;
        self.waiting_logged = false;
        tracing::info!(offset, "tail source: following the file");
        out.events.push(TailEvent::Start { offset });
        out.more = true;
        Ok(true)
    }

    /// Where to start in a file just opened, given the saved state.
    fn resume_offset(&mut self, f: &OpenTailFile, len: u64, saved: &TailState) -> io::Result<u64> {
        if saved.ino != f.ino {
            tracing::info!(
                "tail source: the file was replaced while the agent was stopped; reading it from the start"
            );
            return Ok(0);
        }
        if saved.offset > len {
            tracing::warn!(
                saved_offset = saved.offset,
                size = len,
                "tail source: the file is shorter than the saved position (truncated while the agent was stopped); reading it from the start"
            );
            return Ok(0);
        }
        let head_len = saved.offset.min(FINGERPRINT_BYTES);
        let head = read_head_of(&f.file, head_len).map_err(|e| self.annotate(e))?;
        if saved.head_len != head_len || format!("{:016x}", fnv1a(&head)) != saved.head_fnv1a {
            tracing::info!(
                "tail source: the file's contents differ from the saved position's (replaced while the agent was stopped); reading it from the start"
            );
            return Ok(0);
        }
        Ok(saved.offset)
    }

    /// Reads one chunk at `read_pos` and splits it into lines; the number of bytes read.
    fn read_chunk(&mut self, events: &mut Vec<TailEvent>) -> io::Result<usize> {
        let Some(f) = &self.file else { return Ok(0) };
        let n = loop {
            match f.file.read_at(&mut self.chunk, self.read_pos) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.annotate(e)),
            }
        };
        let chunk = std::mem::take(&mut self.chunk);
        self.consume(&chunk[..n], self.read_pos, events);
        self.chunk = chunk;
        self.read_pos += n as u64;
        Ok(n)
    }

    /// Splits `data` (which starts at file offset `at`) into lines.
    fn consume(&mut self, mut data: &[u8], mut at: u64, events: &mut Vec<TailEvent>) {
        if let Some(start) = self.skipping {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let end = at + i as u64 + 1;
                    events.push(TailEvent::TooLong { start, end });
                    self.skipping = None;
                    data = &data[i + 1..];
                    at = end;
                }
                None => return,
            }
        }
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            let start = at - self.buf.len() as u64;
            let end = at + i as u64 + 1;
            // A `\r` before the newline does not count against the limit.
            if self.buf.len() + i > self.max_line + 1 {
                events.push(TailEvent::TooLong { start, end });
            } else {
                let mut bytes = std::mem::take(&mut self.buf);
                bytes.extend_from_slice(&data[..i]);
                events.push(TailEvent::Line { start, end, bytes });
            }
            self.buf.clear();
            data = &data[i + 1..];
            at = end;
        }
        if self.buf.len() + data.len() > self.max_line + 1 {
            self.skipping = Some(at - self.buf.len() as u64);
            self.buf.clear();
        } else {
            self.buf.extend_from_slice(data);
        }
    }

    /// At the end of the file: notices truncation and replacement.
    fn check_file(&mut self, out: &mut TailPoll) -> io::Result<()> {
        let Some(f) = &self.file else { return Ok(()) };
        let (dev, ino) = (f.dev, f.ino);
        let len = f.file.metadata().map_err(|e| self.annotate(e))?.len();
        if len < self.read_pos {
            tracing::warn!(
                size = len,
                position = self.read_pos,
                "tail source: the file was truncated; reading it again from the start"
            );
            self.read_pos = 0;
            self.buf.clear();
            self.skipping = None;
            self.head.clear();
            out.events.push(TailEvent::Start { offset: 0 });
            out.more = true;
            return Ok(());
        }
        match fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) != (dev, ino) => {
                if !self.replaced_seen {
                    // Read the old file once more: the writer may have added to it between
                    // our last read and the replacement.
                    self.replaced_seen = true;
                    out.more = true;
                    return Ok(());
                }
                if !self.buf.is_empty() || self.skipping.is_some() {
                    tracing::warn!(
                        "tail source: the replaced file ends with an incomplete line; it is dropped"
                    );
                }
                tracing::info!(
                    "tail source: the file was replaced (rotated); reading the new one from the start"
                );
                self.file = None;
                self.open(out)?;
            }
            Ok(_) => self.replaced_seen = false,
            // Removed: keep reading the old file until a new one appears.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.annotate(e)),
        }
        Ok(())
    }

    /// The state to save for a position in the current file; `None` if no file is open.
    fn state(&mut self, offset: u64) -> io::Result<Option<TailState>> {
        let Some(f) = &self.file else { return Ok(None) };
        let head_len = offset.min(FINGERPRINT_BYTES);
        if (self.head.len() as u64) < head_len {
            self.head = read_head_of(&f.file, FINGERPRINT_BYTES).map_err(|e| self.annotate(e))?;
        }
        let head = &self.head[..self.head.len().min(head_len as usize)];
        Ok(Some(TailState {
            path: self.path.to_string_lossy().into_owned(),
            dev: f.dev,
            ino: f.ino,
            offset,
            head_len,
            head_fnv1a: format!("{:016x}", fnv1a(head)),
        }))
    }
}

/// The first `len` bytes of `file` (fewer if it is shorter), read positionally so that no
/// file offset moves.
fn read_head_of(file: &File, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

// ---------------------------------------------------------------------------------------
// Host figures
// ---------------------------------------------------------------------------------------

/// Figures about the gateway for the agent's health report.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct HostFigures {
    /// CPU busy time since the previous sample, 0 to 100 (all CPUs together); `None` on
    /// the first sample.
    pub cpu_percent: Option<f64>,
    /// One-minute load average.
    pub load1: Option<f64>,
    pub mem_total_bytes: u64,
    /// Memory available for new work without swapping (`MemAvailable`).
    pub mem_available_bytes: u64,
    /// The path whose filesystem the disk figures describe.
    pub disk_path: String,
    pub disk_total_bytes: u64,
    /// Space available to unprivileged users.
    pub disk_available_bytes: u64,
    pub uptime_secs: u64,
}

/// Samples [`HostFigures`]; keeps the previous CPU counters to compute the CPU use between
/// two samples.
#[derive(Debug, Default)]
pub struct HostSampler {
    prev_cpu: Option<CpuTimes>,
}

impl HostSampler {
    pub fn new() -> HostSampler {
        HostSampler::default()
    }

    /// Reads `/proc/stat`, `/proc/loadavg`, `/proc/meminfo`, `/proc/uptime` and the
    /// filesystem statistics of `disk_path`. CPU and load are `None` when unavailable;
    /// memory, uptime and disk figures are errors.
    pub fn sample(&mut self, disk_path: &Path) -> io::Result<HostFigures> {
        let cpu_now = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_proc_stat_cpu(&t));
        let cpu_percent = match (&self.prev_cpu, &cpu_now) {
            (Some(prev), Some(now)) => cpu_busy_percent(prev, now),
            _ => None,
        };
        if cpu_now.is_some() {
            self.prev_cpu = cpu_now;
        }
        let load1 = fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|t| parse_loadavg(&t));
        let meminfo = read_proc("/proc/meminfo")?;
        let mem = parse_meminfo(&meminfo)
            .ok_or_else(|| invalid_data("/proc/meminfo: no MemTotal line"))?;
        let uptime = read_proc("/proc/uptime")?;
        let uptime_secs =
            parse_uptime(&uptime).ok_or_else(|| invalid_data("/proc/uptime: unexpected format"))?;
        let vfs = rustix::fs::statvfs(disk_path).map_err(|e| {
            let e = io::Error::from(e);
            io::Error::new(e.kind(), format!("{}: {e}", disk_path.display()))
        })?;
        Ok(HostFigures {
            cpu_percent,
            load1,
            mem_total_bytes: mem.total_bytes,
            mem_available_bytes: mem.available_bytes,
            disk_path: disk_path.display().to_string(),
            disk_total_bytes: vfs.f_blocks.saturating_mul(vfs.f_frsize),
            disk_available_bytes: vfs.f_bavail.saturating_mul(vfs.f_frsize),
            uptime_secs,
        })
    }
}

fn read_proc(path: &str) -> io::Result<String> {
    fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

fn invalid_data(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// The aggregate CPU counters of `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuTimes {
    /// user + nice + system + idle + iowait + irq + softirq + steal.
    total: u64,
    /// idle + iowait.
    idle: u64,
}

/// The `cpu ` line of `/proc/stat`.
fn parse_proc_stat_cpu(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    // guest and guest_nice are already part of user and nice.
    let total = fields.iter().fold(0u64, |a, &v| a.saturating_add(v));
    let idle = fields[3].saturating_add(fields.get(4).copied().unwrap_or(0));
    Some(CpuTimes { total, idle })
}

/// Busy share of the time between two samples, in percent; `None` if no time passed or the
/// counters went backwards.
fn cpu_busy_percent(prev: &CpuTimes, now: &CpuTimes) -> Option<f64> {
    let dt = now.total.checked_sub(prev.total)?;
    let didle = now.idle.checked_sub(prev.idle)?;
    if dt == 0 {
        return None;
    }
    let busy = dt.saturating_sub(didle) as f64 / dt as f64 * 100.0;
    Some(busy.clamp(0.0, 100.0))
}

/// The one-minute load average from `/proc/loadavg`.
fn parse_loadavg(text: &str) -> Option<f64> {
    let v: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
    v.is_finite().then_some(v)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemInfo {
    total_bytes: u64,
    available_bytes: u64,
}

/// `MemTotal` and `MemAvailable` from `/proc/meminfo` (kernels before 3.14 have no
/// `MemAvailable`: then `MemFree + Buffers + Cached`).
fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let mut parts = rest.split_ascii_whitespace();
            let value: u64 = parts.next()?.parse().ok()?;
            match parts.next() {
                Some("kB") => Some(value.saturating_mul(1024)),
                None => Some(value),
                Some(_) => None,
            }
        })
    };
    let total_bytes = field("MemTotal")?;
    let available_bytes = field("MemAvailable").unwrap_or_else(|| {
        ["MemFree", "Buffers", "Cached"]
            .iter()
            .filter_map(|n| field(n))
            .fold(0u64, u64::saturating_add)
    });
    Some(MemInfo {
        total_bytes,
        available_bytes: available_bytes.min(total_bytes),
    })
}

/// Whole seconds since boot from `/proc/uptime`.
fn parse_uptime(text: &str) -> Option<u64> {
    let secs: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some(secs as u64)
}

#[cfg(test)]
mod tests;
