//! Local ingest: how programs on the gateway hand telemetry to the agent.
//!
//! There is no network listener: producers connect to a Unix domain socket (mode 0660 by
//! default, so access is a matter of file ownership and group membership) and write
//! newline-delimited JSON requests, one object per line:
//!
//! ```text
//! {"series":"line1/temp","payload":21.5}
//! {"series":"line1/temp","payload":{"v":21.5,"unit":"C"},"ts":"2026-11-27T10:00:00.123Z"}
//! {"series":"cam/frame","payload_b64":"AAEC/w==","ts":1795773600123}
//! ```
//!
//! - `series` names the data relative to the device's namespace: the agent publishes under
//!   `devices/<id>/data/<series>`. It must be non-empty printable text without whitespace,
//!   `+`, `#`, empty levels, a leading or trailing `/`, a leading `$` or `.`/`..` levels, so
//!   a producer can never publish outside its device's namespace ([`validate_series`]).
//! - Exactly one of `payload` (any JSON value, `null` included) and `payload_b64` (bytes in
//!   standard base64).
//! - Optional `ts`: an RFC 3339 string or integer unix milliseconds; without it the agent
//!   stamps the time it received the record.
//!
//! Each request line gets one reply line, in request order: `{"ok":true,"seq":1234}` once the
//! record is on disk (the sequence number of the record in the telemetry envelope), or
//! `{"ok":false,"error":"..."}` saying what to fix. A rejected line does not end the
//! connection, except a line longer than the limit: it is answered with an error and the
//! connection is closed without reading the rest of it (after the replies to the lines before
//! it).
//!
//! Requests may be pipelined, and a producer that wants a high rate should: write lines
//! without waiting for their replies, and read the replies as they come. The agent parses
//! lines as they arrive and hands the records read while the previous batch was being stored
//! to the queue together, as one batch that one flush makes durable (at most two batches of
//! a connection wait for the queue at a time). A reply is still written only once its record
//! is durable, and replies keep request order. A producer that waits for each reply before
//! sending the next line gets one record per flush.
//!
//! Bounds ([`IngestLimits`]): line length, series length and depth, concurrent connections
//! (a connection over the limit gets one error line and is closed), and per connection the
//! lines and bytes read and not yet answered (`max_pending_lines`, `max_pending_bytes`;
//! reading pauses at either until replies go out). Raw memory held by the server is at most
//! about `max_connections × (max_pending_bytes + max_line_bytes + 16 KiB)`, plus the parsed
//! records of the pending lines (a JSON payload takes more memory parsed than as text).
//!
//! The client side ([`send`], [`send_stream`], [`request_from_args`]) is what
//! `bulwark-agent send` uses.

use std::collections::VecDeque;
use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use base64::Engine as _;
use bulwark_protocol::envelope::{self, EnvelopeError};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument as _;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Default longest request line, newline excluded: 256 KiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 256 * 1024;
/// Default permissions of the socket file: owner and group may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Latest timestamp accepted, in unix milliseconds: 9999-12-31T23:59:59.999Z.
pub const MAX_TS_MS: u64 = envelope::MAX_TS_MILLIS;

/// Longest line `bulwark-agent send` reads from its input.
const CLIENT_MAX_LINE_BYTES: usize = 16 * 1024 * 1024;
/// Longest reply line the client accepts.
const CLIENT_MAX_REPLY_BYTES: usize = 64 * 1024;
/// Requests the client sends ahead of their replies.
const CLIENT_IN_FLIGHT: usize = 64;
/// Read buffer of a server connection.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Batches of one connection handed to the sink and not yet answered, at most: one being
/// made durable and the next one waiting for its turn. Lines that arrive meanwhile form the
/// batch after. (This keeps the queue's commit channel, `max_waiting` submissions, from
/// filling up with many small batches of a few connections.)
const BATCHES_IN_FLIGHT: usize = 2;
/// Default of [`IngestLimits::max_pending_lines`].
pub const DEFAULT_MAX_PENDING_LINES: usize = 1024;
/// Default of [`IngestLimits::max_pending_bytes`]: 1 MiB.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 1024 * 1024;

/// Bounds of the ingest server. `max_*` values below 1 are treated as 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestLimits {
    /// Longest request line, newline excluded.
    pub max_line_bytes: usize,
    /// Longest series name, in bytes.
    pub max_series_bytes: usize,
    /// Most levels in a series name (`a/b/c` has 3). The topic has 3 more
    /// (`devices/<id>/data/`); the broker's default topic depth limit is 32.
    pub max_series_levels: usize,
    /// Connections served at once; one more gets an error line and is closed.
    pub max_connections: usize,
    /// Request lines of one connection read and not yet answered (being parsed, waiting for
    /// the queue, or being made durable); reading pauses at this many until replies go out.
    pub max_pending_lines: usize,
    /// Bytes of the request lines of one connection read and not yet answered; reading
    /// pauses once this many are pending (the line that crosses the mark is still taken, so
    /// a line of `max_line_bytes` always gets through).
    pub max_pending_bytes: usize,
    /// On shutdown, how long connections may take to answer the lines already read.
    pub shutdown_grace: Duration,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_series_bytes: 512,
            max_series_levels: 16,
            max_connections: 64,
            max_pending_lines: DEFAULT_MAX_PENDING_LINES,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Why a request line (or a `bulwark-agent send` invocation) was refused. The `Display`
/// text is what the producer sees in `{"ok":false,"error":...}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("line longer than {max} bytes")]
    LineTooLong { max: usize },
    #[error(
        "empty line; send one JSON object per line, e.g. {{\"series\":\"line1/temp\",\"payload\":21.5}}"
    )]
    EmptyLine,
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("request must be a JSON object, e.g. {{\"series\":\"line1/temp\",\"payload\":21.5}}")]
    NotAnObject,
    /// Unknown or duplicate field, missing `series`, a field of the wrong type.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The series name breaks a rule; the text starts with "series ".
    #[error("{0}")]
    Series(String),
    #[error("both payload and payload_b64 given; send exactly one")]
    BothPayloads,
    #[error(
        "no payload; give \"payload\" (any JSON value) or \"payload_b64\" (bytes in standard base64)"
    )]
    NoPayload,
    #[error("payload_b64 is not valid standard base64: {0}")]
    BadBase64(String),
    /// The timestamp is unusable; the text starts with "ts ".
    #[error("{0}")]
    BadTimestamp(String),
    /// Command-line arguments of `bulwark-agent send` that do not make a request.
    #[error("{0}")]
    Usage(String),
}

/// The payload of a record: the envelope's own type, `Json(Value)` from `payload` or
/// `Bytes(Vec<u8>)` from `payload_b64`, published the same way in the envelope.
pub use bulwark_protocol::envelope::Payload as IngestPayload;

/// One record handed over by a producer.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestRecord {
    /// Relative to `devices/<id>/data/`; valid per [`validate_series`].
    pub series: String,
    /// The producer's timestamp in unix milliseconds; `None`: stamp the receive time.
    pub ts_ms: Option<u64>,
    pub payload: IngestPayload,
}

impl IngestRecord {
    /// The MQTT topic the record is published on: `devices/<device_id>/data/<series>`
    /// (as [`bulwark_protocol::envelope::data_topic`] builds it, without its checks).
    pub fn topic(&self, device_id: &str) -> String {
        format!("devices/{device_id}/data/{}", self.series)
    }

    /// The request line (without newline) that [`parse_line`] turns back into this record.
    pub fn to_line(&self) -> String {
        let (payload, payload_b64) = match &self.payload {
            IngestPayload::Json(v) => (Some(v), None),
            IngestPayload::Bytes(b) => (None, Some(B64.encode(b))),
        };
        wire_out(&WireOut {
            series: &self.series,
            payload,
            payload_b64,
            ts: self.ts_ms.map(Value::from),
        })
    }
}

/// A request as it is read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    series: String,
    #[serde(default, deserialize_with = "present")]
    payload: Option<Value>,
    #[serde(default)]
    payload_b64: Option<String>,
    #[serde(default, deserialize_with = "present")]
    ts: Option<Value>,
}

/// `Some(value)` for a field that is present, even when it is `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A request as it is written.
#[derive(Serialize)]
struct WireOut<'a> {
    series: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<Value>,
}

fn wire_out(w: &WireOut<'_>) -> String {
    // Serialising strings and JSON values cannot fail.
    serde_json::to_string(w).unwrap_or_default()
}

/// Parses one request line (a trailing `\n` or `\r\n` is ignored). Pure: no I/O.
pub fn parse_line(line: &[u8], limits: &IngestLimits) -> Result<IngestRecord, IngestError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > limits.max_line_bytes {
        return Err(IngestError::LineTooLong {
            max: limits.max_line_bytes,
        });
    }
    let Some(&first) = line.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Err(IngestError::EmptyLine);
    };
    if first != b'{' {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(line) {
                Ok(_) => IngestError::NotAnObject,
                Err(e) => IngestError::NotJson(e.to_string()),
            },
        );
    }
    let req: WireRequest = serde_json::from_slice(line).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => IngestError::Invalid(e.to_string()),
        _ => IngestError::NotJson(e.to_string()),
    })?;
    validate_series(&req.series, limits)?;
    let payload = match (req.payload, req.payload_b64) {
        (Some(_), Some(_)) => return Err(IngestError::BothPayloads),
        (None, None) => return Err(IngestError::NoPayload),
        (Some(v), None) => IngestPayload::Json(v),
        (None, Some(b)) => IngestPayload::Bytes(
            B64.decode(b.as_bytes())
                .map_err(|e| IngestError::BadBase64(e.to_string()))?,
        ),
    };
    let ts_ms = match req.ts {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_ts(&v)?),
    };
    Ok(IngestRecord {
        series: req.series,
        ts_ms,
        payload,
    })
}

const TS_HINT: &str =
    "an RFC 3339 string such as \"2026-11-27T10:00:00.123Z\" or integer unix milliseconds";

/// A `ts` value: RFC 3339 string or integer unix milliseconds, 1970 to 9999.
fn parse_ts(v: &Value) -> Result<u64, IngestError> {
    let bad = |m: String| IngestError::BadTimestamp(m);
    match v {
        Value::Number(n) => match n.as_u64() {
            Some(ms) if ms <= MAX_TS_MS => Ok(ms),
            Some(_) => Err(bad(format!(
                "ts {n} is after the year 9999; give unix milliseconds (not micro- or nanoseconds)"
            ))),
            None => Err(bad(format!(
                "ts {n} is not a non-negative integer; give {TS_HINT}"
            ))),
        },
        Value::String(s) => envelope::parse_ts(s).map_err(|e| match e {
            EnvelopeError::Timestamp { reason, .. } => bad(format!(
                "ts {s:?} is not a usable RFC 3339 timestamp ({reason}); give {TS_HINT}"
            )),
            other => bad(format!("ts {s:?}: {other}")),
        }),
        _ => Err(bad(format!("ts must be {TS_HINT}"))),
    }
}

/// Invisible formatting characters that would make two different series look alike.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}'
        | '\u{3164}'
        | '\u{FE00}'..='\u{FE0F}'
        | '\u{FEFF}'
        | '\u{FFF0}'..='\u{FFFF}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// Checks a series name: it must stay inside `devices/<id>/data/` and be plain, printable
/// text. Rules: not empty; at most `max_series_bytes` bytes and `max_series_levels` levels;
/// no `+` or `#`; no U+0000, control, whitespace or invisible formatting characters; no
/// leading `$`; no leading or trailing `/`; no empty level; no `.` or `..` level.
pub fn validate_series(series: &str, limits: &IngestLimits) -> Result<(), IngestError> {
    let fail = |m: String| Err(IngestError::Series(m));
    if series.is_empty() {
        return fail("series must not be empty; name it like \"line1/temp\"".into());
    }
    if series.len() > limits.max_series_bytes {
        return fail(format!(
            "series is {} bytes long; at most {} are allowed",
            series.len(),
            limits.max_series_bytes
        ));
    }
    for (i, c) in series.char_indices() {
        let problem = match c {
            '+' | '#' => return fail("series must not contain '+' or '#' (MQTT wildcards)".into()),
            '\0' => "U+0000",
            c if c.is_control() => "control character",
            c if c.is_whitespace() => "whitespace",
            c if is_invisible(c) => "invisible formatting character",
            _ => continue,
        };
        return fail(if c == '\0' {
            format!("series must not contain {problem} (at byte {i}); only printable characters are allowed")
        } else {
            format!(
                "series must not contain {problem} U+{:04X} (at byte {i}); only printable characters are allowed",
                c as u32
            )
        });
    }
    if series.starts_with('$') {
        return fail("series must not start with '$' (reserved for broker topics)".into());
    }
    if series.starts_with('/') || series.ends_with('/') {
        return fail(
            "series must not start or end with '/'; it is relative to devices/<id>/data/".into(),
        );
    }
    let mut levels = 0usize;
    for level in series.split('/') {
        levels += 1;
        if level.is_empty() {
            return fail("series must not contain empty levels ('//')".into());
        }
        if level == "." || level == ".." {
            return fail("series must not contain '.' or '..' levels".into());
        }
    }
    if levels > limits.max_series_levels.max(1) {
        return fail(format!(
            "series has {levels} levels; at most {} are allowed",
            limits.max_series_levels.max(1)
        ));
    }
    // The envelope's own rule (looser than the above): never accept what it would refuse.
    envelope::validate_series(series).map_err(|e| IngestError::Series(format!("series: {e}")))
}

/// The answer to one request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "WireReply", try_from = "WireReply")]
pub enum Reply {
    /// `{"ok":true,"seq":N}`: the record is on disk with sequence number N.
    Accepted { seq: u64 },
    /// `{"ok":false,"error":"..."}`.
    Rejected { error: String },
}

#[derive(Serialize, Deserialize)]
struct WireReply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<Reply> for WireReply {
    fn from(r: Reply) -> Self {
        match r {
            Reply::Accepted { seq } => WireReply {
                ok: true,
                seq: Some(seq),
                error: None,
            },
            Reply::Rejected { error } => WireReply {
                ok: false,
                seq: None,
                error: Some(error),
            },
        }
    }
}

impl TryFrom<WireReply> for Reply {
    type Error = String;
    fn try_from(w: WireReply) -> Result<Self, String> {
        match (w.ok, w.seq) {
            (true, Some(seq)) => Ok(Reply::Accepted { seq }),
            (true, None) => Err("reply has \"ok\":true but no \"seq\"".into()),
            (false, _) => Ok(Reply::Rejected {
                error: w.error.unwrap_or_else(|| "(no error message)".into()),
            }),
        }
    }
}

impl Reply {
    /// The reply line, without newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a reply line.
    pub fn parse(line: &str) -> Result<Reply, String> {
        serde_json::from_str(line).map_err(|e| e.to_string())
    }

    pub fn is_accepted(&self) -> bool {
        matches!(self, Reply::Accepted { .. })
    }

    fn rejected(e: impl ToString) -> Reply {
        Reply::Rejected {
            error: e.to_string(),
        }
    }
}

/// Where accepted records go. The agent's implementation writes records to its durable
/// queue and answers once they are flushed, with each record's sequence number; an `Err` is
/// sent to the producer as the error text (e.g. "queue full; retry later").
///
/// Closures `Fn(IngestRecord) -> impl Future<Output = Result<u64, String>>` implement it.
/// Implementations may use `async fn accept(&self, record: IngestRecord) -> ...` as long
/// as the future is `Send`.
pub trait RecordSink: Send + Sync + 'static {
    fn accept(&self, record: IngestRecord) -> impl Future<Output = Result<u64, String>> + Send;

    /// Consecutive records of one connection, in request order: resolves to one answer per
    /// record, in the same order, once every accepted one is durable.
    ///
    /// The server calls this for a connection's next batch before the previous batch's
    /// future has resolved, and polls the futures one at a time, oldest first. So the
    /// default, which takes the records one by one through [`RecordSink::accept`] when
    /// polled, keeps request order; an implementation that stores the records when it is
    /// called (rather than when its future is polled) must store them in call order.
    fn accept_batch(
        &self,
        records: Vec<IngestRecord>,
    ) -> impl Future<Output = Vec<Result<u64, String>>> + Send {
        async move {
            let mut answers = Vec::with_capacity(records.len());
            for record in records {
                answers.push(self.accept(record).await);
            }
            answers
        }
    }
}

impl<F, Fut> RecordSink for F
where
    F: Fn(IngestRecord) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u64, String>> + Send,
{
    fn accept(&self, record: IngestRecord) -> impl Future<Output = Result<u64, String>> + Send {
        self(record)
    }
}

/// The socket file we created; removed when dropped if it is still ours.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// A bound ingest socket, ready to [`serve`](IngestServer::serve). The socket file is
/// removed when the server stops (or is dropped), unless something else replaced it.
#[derive(Debug)]
pub struct IngestServer {
    listener: std::os::unix::net::UnixListener,
    file: SocketFile,
    limits: IngestLimits,
}

impl IngestServer {
    /// Binds the socket at `path` and gives it permissions `mode` (e.g.
    /// [`DEFAULT_SOCKET_MODE`]). Needs no runtime.
    ///
    /// Refuses when the parent directory is writable by others (anyone could replace the
    /// socket), when the path exists and is not a socket, and when another process listens
    /// on it. A stale socket left by a previous run (nobody listening) is replaced.
    pub fn bind(path: impl AsRef<Path>, mode: u32) -> io::Result<IngestServer> {
        let path = path.as_ref();
        if mode & !0o777 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ingest socket mode {mode:o} has bits outside 0777"),
            ));
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = fs::metadata(parent).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: {e} (the directory of the ingest socket must exist)",
                    parent.display()
                ),
            )
        })?;
        if !dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", parent.display()),
            ));
        }
        if dir.mode() & 0o002 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is writable by every user (mode {:o}), so anyone could replace the ingest socket; \
                     put it in a directory only the agent can write, e.g. /run/bulwark-agent",
                    parent.display(),
                    dir.mode() & 0o7777
                ),
            ));
        }
        match fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; remove it or choose another ingest socket path",
                        path.display()
                    ),
                ));
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "{} is in use: another process (another bulwark-agent?) listens on it",
                            path.display()
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a stale ingest socket");
                    fs::remove_file(path).map_err(|e| with_path(path, e))?;
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "{}: cannot tell whether the existing socket is in use: {e}",
                            path.display()
                        ),
                    ));
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(path, e)),
        }
        let listener =
            std::os::unix::net::UnixListener::bind(path).map_err(|e| with_path(path, e))?;
        let meta = fs::symlink_metadata(path).map_err(|e| with_path(path, e))?;
        let file = SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| with_path(path, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| with_path(path, e))?;
        Ok(IngestServer {
            listener,
            file,
            limits: IngestLimits::default(),
        })
    }

    /// Replaces the default limits.
    pub fn with_limits(mut self, limits: IngestLimits) -> IngestServer {
        self.limits = limits;
        self
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    pub fn limits(&self) -> &IngestLimits {
        &self.limits
    }

    /// Serves producers until `shutdown` turns true (or its sender is dropped), each
    /// connection in its own task. Then it stops accepting, removes the socket file, and
    /// gives open connections `shutdown_grace` to answer the lines they have already read.
    pub async fn serve<S: RecordSink>(
        self,
        sink: S,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let IngestServer {
            listener,
            file,
            limits,
        } = self;
        let listener = UnixListener::from_std(listener)?;
        let sink = Arc::new(sink);
        let limits = Arc::new(limits);
        let max_connections = limits.max_connections.max(1);
        let permits = Arc::new(Semaphore::new(max_connections));
        let mut conns = JoinSet::new();
        let mut next_id = 0u64;
        tracing::info!(path = %file.path.display(), "ingest socket ready");
        loop {
            tokio::select! {
                _ = shutdown_requested(&mut shutdown) => break,
                Some(res) = conns.join_next(), if !conns.is_empty() => log_join(res),
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        next_id += 1;
                        match permits.clone().try_acquire_owned() {
                            Ok(permit) => {
                                let (sink, limits, shutdown) =
                                    (sink.clone(), limits.clone(), shutdown.clone());
                                conns.spawn(async move {
                                    handle_connection(stream, next_id, sink, limits, shutdown).await;
                                    drop(permit);
                                });
                            }
                            Err(_) => {
                                tracing::warn!(
                                    max_connections,
                                    "ingest connection refused: too many connections"
                                );
                                let mut line = Reply::rejected(format!(
                                    "too many connections (limit {max_connections}); try again later"
                                ))
                                .to_line();
                                line.push('\n');
                                let _ = stream.try_write(line.as_bytes());
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ingest accept failed");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = shutdown_requested(&mut shutdown) => break,
                        }
                    }
                },
            }
        }
        drop(listener);
        drop(file);
        if !conns.is_empty() {
            let drained = tokio::time::timeout(limits.shutdown_grace, async {
                while let Some(res) = conns.join_next().await {
                    log_join(res);
                }
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    connections = conns.len(),
                    "ingest connections still busy after the shutdown grace period; closing them"
                );
                conns.shutdown().await;
            }
        }
        tracing::info!("ingest socket closed");
        Ok(())
    }
}

/// Resolves when shutdown is requested: the value is true, or the sender is gone.
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|&stop| stop).await;
}

fn log_join(res: Result<(), tokio::task::JoinError>) {
    if let Err(e) = res {
        if e.is_panic() {
            tracing::error!(error = %e, "ingest connection task panicked");
        }
    }
}

async fn handle_connection<S: RecordSink>(
    stream: UnixStream,
    id: u64,
    sink: Arc<S>,
    limits: Arc<IngestLimits>,
    shutdown: watch::Receiver<bool>,
) {
    let cred = stream.peer_cred().ok();
    let span = tracing::debug_span!(
        "ingest",
        conn = id,
        uid = cred.map(|c| c.uid()),
        pid = cred.and_then(|c| c.pid())
    );
    async move {
        tracing::debug!("producer connected");
        let (rd, wr) = stream.into_split();
        serve_connection(rd, wr, &*sink, &limits, shutdown).await;
        tracing::debug!("producer disconnected");
    }
    .instrument(span)
    .await
}

enum LineRead {
    /// A line (without its newline) is in the buffer; at end of input it may be unterminated.
    Line,
    Eof,
    /// More than `max` bytes without a newline; nothing more was consumed.
    TooLong,
}

/// Reads one line into `line` without ever holding more than `max` bytes of it.
async fn read_line_limited<R: AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineRead> {
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        let (take, newline) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Ok(LineRead::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take + usize::from(newline));
        if newline {
            return Ok(LineRead::Line);
        }
    }
}

/// The sink's answers to the records of a batch, to come.
type Answers<'a> = Pin<Box<dyn Future<Output = Vec<Result<u64, String>>> + Send + 'a>>;

/// Consecutive request lines of one connection.
#[derive(Default)]
struct Batch<'a> {
    /// One per line, in order: `None` for a record handed to the sink (its answer comes
    /// from `answers`, in order), the reply for a line refused without the sink.
    replies: Vec<Option<Reply>>,
    /// The records, until the batch is handed to the sink.
    records: Vec<IngestRecord>,
    answers: Option<Answers<'a>>,
    /// Bytes of the request lines.
    bytes: usize,
}

/// What [`LineBuffer::next_line`] found.
enum NextLine {
    /// The next request line (without its newline): `buf[range]`.
    Line(std::ops::Range<usize>),
    /// No complete line yet: read more.
    NeedMore,
    /// The next line is longer than the limit.
    TooLong,
    /// End of input, every line taken.
    End,
}

/// Bytes read from a producer, not yet taken as lines. Holds at most one line of up to the
/// limit plus one read.
#[derive(Default)]
struct LineBuffer {
    buf: Vec<u8>,
    /// Where the next line starts.
    start: usize,
    /// `buf[start..scanned]` has no newline.
    scanned: usize,
    eof: bool,
}

impl LineBuffer {
    fn next_line(&mut self, max: usize) -> NextLine {
        if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let end = self.scanned + i;
            let line = self.start..end;
            self.start = end + 1;
            self.scanned = self.start;
            return if line.len() > max {
                NextLine::TooLong
            } else {
                NextLine::Line(line)
            };
        }
        self.scanned = self.buf.len();
        let rest = self.start..self.buf.len();
        if rest.len() > max {
            NextLine::TooLong
        } else if !self.eof {
            NextLine::NeedMore
        } else if rest.is_empty() {
            NextLine::End
        } else {
            // The last line need not end with a newline.
            self.start = self.buf.len();
            self.scanned = self.start;
            NextLine::Line(rest)
        }
    }

    fn extend(&mut self, data: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
            if self.buf.is_empty() && self.buf.capacity() > 4 * READ_BUFFER_BYTES {
                // After a long line, do not keep its buffer for the connection's lifetime.
                self.buf = Vec::new();
            }
        }
        self.buf.extend_from_slice(data);
    }
}

/// Resolves to the answers of the oldest batch handed to the sink (never, if there is none).
fn oldest_answers<'f, 'a>(
    in_flight: &'f mut VecDeque<Batch<'a>>,
) -> impl Future<Output = Vec<Result<u64, String>>> + use<'f, 'a> {
    std::future::poll_fn(move |cx| match in_flight.front_mut() {
        None => Poll::Pending,
        Some(batch) => match &mut batch.answers {
            None => Poll::Ready(Vec::new()),
            Some(answers) => answers.as_mut().poll(cx),
        },
    })
}

/// Appends the reply lines of `batch` to `out`, taking the sink's answers in order.
fn write_replies(out: &mut Vec<u8>, batch: Batch<'_>, answers: Vec<Result<u64, String>>) {
    use std::io::Write as _;
    let mut answers = answers.into_iter();
    for reply in batch.replies {
        let reply = reply.unwrap_or_else(|| match answers.next() {
            Some(Ok(seq)) => Reply::Accepted { seq },
            Some(Err(error)) => {
                tracing::debug!(%error, "record not accepted");
                Reply::Rejected { error }
            }
            None => Reply::rejected("not stored"),
        });
        match reply {
            // What `to_line` writes, without building a string for it.
            Reply::Accepted { seq } => {
                let _ = writeln!(out, "{{\"ok\":true,\"seq\":{seq}}}");
            }
            rejected => {
                out.extend_from_slice(rejected.to_line().as_bytes());
                out.push(b'\n');
            }
        }
    }
}

/// Serves one producer. Lines are parsed as they arrive; the records read meanwhile go to
/// the sink together as one batch, at most [`BATCHES_IN_FLIGHT`] batches at a time, and the
/// replies of a batch are written, in request order, once the sink has answered it.
/// Reading pauses while `max_pending_lines` lines or `max_pending_bytes` bytes are read and
/// not yet answered.
async fn serve_connection<S: RecordSink>(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    sink: &S,
    limits: &IngestLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let max_line = limits.max_line_bytes;
    let max_lines = limits.max_pending_lines.max(1);
    let max_bytes = limits.max_pending_bytes.max(1);
    let mut input = LineBuffer::default();
    let mut chunk = vec![0u8; READ_BUFFER_BYTES];
    // False after the end of input, a read error, shutdown or an overlong line.
    let mut reading = true;
    let mut fatal = None;
    let mut open = Batch::default();
    let mut in_flight: VecDeque<Batch<'_>> = VecDeque::with_capacity(BATCHES_IN_FLIGHT);
    // Lines (and their bytes) read and not yet answered.
    let (mut lines, mut bytes) = (0usize, 0usize);
    let mut out = Vec::new();
    loop {
        // Take the lines already read, as far as the bounds allow.
        let mut need_input = false;
        while reading && lines < max_lines && bytes < max_bytes {
            match input.next_line(max_line) {
                NextLine::Line(range) => {
                    lines += 1;
                    bytes += range.len();
                    open.bytes += range.len();
                    match parse_line(&input.buf[range], limits) {
                        Ok(record) => {
                            open.records.push(record);
                            open.replies.push(None);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "request rejected");
                            open.replies.push(Some(Reply::rejected(e)));
                        }
                    }
                }
                NextLine::NeedMore => {
                    need_input = true;
                    break;
                }
                NextLine::TooLong => {
                    fatal = Some(IngestError::LineTooLong { max: max_line });
                    reading = false;
                }
                NextLine::End => reading = false,
            }
        }
        // Hand them to the sink.
        if !open.replies.is_empty() && in_flight.len() < BATCHES_IN_FLIGHT {
            let mut batch = std::mem::take(&mut open);
            let records = std::mem::take(&mut batch.records);
            if !records.is_empty() {
                batch.answers = Some(Box::pin(sink.accept_batch(records)));
            }
            in_flight.push_back(batch);
        }
        if in_flight.is_empty() && !reading {
            break;
        }
        tokio::select! {
            biased;
            answers = oldest_answers(&mut in_flight) => {
                let Some(batch) = in_flight.pop_front() else { continue };
                lines -= batch.replies.len();
                bytes -= batch.bytes;
                write_replies(&mut out, batch, answers);
                if let Err(e) = wr.write_all(&out).await {
                    tracing::debug!(error = %e, "producer went away before its reply");
                    return;
                }
                out.clear();
            }
            r = rd.read(&mut chunk), if reading && need_input => match r {
                Ok(0) => input.eof = true,
                Ok(n) => input.extend(&chunk[..n]),
                Err(e) => {
                    tracing::debug!(error = %e, "reading from the producer failed");
                    reading = false;
                }
            },
            _ = shutdown_requested(&mut shutdown), if reading => reading = false,
        }
    }
    if let Some(e) = fatal {
        tracing::debug!(error = %e, "request rejected; closing the connection");
        let mut line = Reply::rejected(e).to_line();
        line.push('\n');
        if wr.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

// ----- client side: `bulwark-agent send` -----

/// One request line for [`send`]: a raw line, or made from a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLine(String);

impl RequestLine {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for RequestLine {
    fn from(s: String) -> Self {
        RequestLine(s)
    }
}

impl From<&str> for RequestLine {
    fn from(s: &str) -> Self {
        RequestLine(s.to_owned())
    }
}

impl From<&IngestRecord> for RequestLine {
    fn from(r: &IngestRecord) -> Self {
        RequestLine(r.to_line())
    }
}

impl From<IngestRecord> for RequestLine {
    fn from(r: IngestRecord) -> Self {
        RequestLine(r.to_line())
    }
}

/// What [`send_stream`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendSummary {
    /// Request lines sent.
    pub sent: usize,
    pub accepted: usize,
    pub rejected: usize,
}

/// Sends request lines to the agent at `path` (pipelined) and returns one reply per line,
/// in order. Fails if a line contains a newline, if the agent cannot be reached, or if it
/// closes the connection before answering every line.
pub async fn send<I>(path: impl AsRef<Path>, requests: I) -> io::Result<Vec<Reply>>
where
    I: IntoIterator,
    I::Item: Into<RequestLine>,
{
    let mut input = Vec::new();
    for (i, r) in requests.into_iter().enumerate() {
        let line = r.into().0;
        if line.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "request {} contains a newline; a request is one line of JSON",
                    i + 1
                ),
            ));
        }
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }
    let mut replies = Vec::new();
    exchange(path.as_ref(), &input[..], false, |_, r| replies.push(r)).await?;
    Ok(replies)
}

/// `bulwark-agent send --file -`: sends each non-blank line of `input` (each a JSON request
/// object) as it is read, pipelined, calling `on_reply(line_number, reply)` (1-based input
/// line numbers) as the replies arrive. Fails if the agent closes the connection before
/// answering every line sent.
pub async fn send_stream<R, F>(
    path: impl AsRef<Path>,
    input: R,
    on_reply: F,
) -> io::Result<SendSummary>
where
    R: AsyncBufRead + Unpin,
    F: FnMut(usize, Reply),
{
    exchange(path.as_ref(), input, true, on_reply).await
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

async fn exchange<R, F>(
    path: &Path,
    mut input: R,
    skip_blank: bool,
    mut on_reply: F,
) -> io::Result<SendSummary>
where
    R: AsyncBufRead + Unpin,
    F: FnMut(usize, Reply),
{
    let stream = UnixStream::connect(path).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot connect to the agent's ingest socket {}: {e}",
                path.display()
            ),
        )
    })?;
    let (rd, mut wr) = stream.into_split();
    // Input line numbers of the requests awaiting a reply, in order.
    let (tx, mut rx) = mpsc::channel::<usize>(CLIENT_IN_FLIGHT);

    let writer = async move {
        let mut sent = 0usize;
        let mut lineno = 0usize;
        loop {
            let mut line = Vec::new();
            match read_line_limited(&mut input, &mut line, CLIENT_MAX_LINE_BYTES).await? {
                LineRead::Eof => break,
                LineRead::TooLong => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "input line {} is longer than {CLIENT_MAX_LINE_BYTES} bytes",
                            lineno + 1
                        ),
                    ))
                }
                LineRead::Line => {}
            }
            lineno += 1;
            if skip_blank && line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if tx.send(lineno).await.is_err() {
                break; // the reader stopped: the agent closed the connection
            }
            line.push(b'\n');
            if let Err(e) = wr.write_all(&line).await {
                if is_disconnect(&e) {
                    break; // the agent closed the connection; the reader reports what it said
                }
                return Err(e);
            }
            sent += 1;
        }
        drop(tx);
        let _ = wr.shutdown().await;
        Ok(sent)
    };

    // Owns `rx`, so that when the agent goes away the channel closes and a writer waiting
    // for room in it stops instead of waiting forever.
    let reader = async move {
        let mut rd = BufReader::new(rd);
        let mut summary = SendSummary::default();
        loop {
            let mut line = Vec::new();
            match read_line_limited(&mut rd, &mut line, CLIENT_MAX_REPLY_BYTES).await {
                Ok(LineRead::Line) => {}
                Ok(LineRead::Eof) => break,
                Ok(LineRead::TooLong) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the agent sent a reply longer than 64 KiB",
                    ))
                }
                // The agent closed with our requests unread; what it said has been read.
                Err(e) if is_disconnect(&e) => break,
                Err(e) => return Err(e),
            }
            let text = String::from_utf8_lossy(&line);
            let reply = Reply::parse(text.trim_end()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected reply from the agent ({e}): {text:?}"),
                )
            })?;
            let Some(lineno) = rx.recv().await else {
                return Err(io::Error::other(format!(
                    "unexpected reply from the agent: {}",
                    reply.to_line()
                )));
            };
            if reply.is_accepted() {
                summary.accepted += 1;
            } else {
                summary.rejected += 1;
            }
            on_reply(lineno, reply);
        }
        Ok(summary)
    };

    let (sent, summary) = tokio::join!(writer, reader);
    let sent = sent?;
    let mut summary = summary?;
    let answered = summary.accepted + summary.rejected;
    if answered < sent {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the agent closed the connection; {} of {sent} request(s) got no reply",
                sent - answered
            ),
        ));
    }
    summary.sent = sent;
    Ok(summary)
}

/// Builds the request line for `bulwark-agent send --series S (--json VALUE | --text STRING)
/// [--ts TS]`. `--json` takes any JSON value; `--text` sends its argument as a JSON string;
/// `--ts` takes an RFC 3339 timestamp or unix milliseconds. The series is checked here
/// (except for length limits, which are the agent's to enforce) so mistakes show before
/// connecting.
pub fn request_from_args(
    series: &str,
    json: Option<&str>,
    text: Option<&str>,
    ts: Option<&str>,
) -> Result<String, IngestError> {
    let unlimited = IngestLimits {
        max_series_bytes: usize::MAX,
        max_series_levels: usize::MAX,
        ..IngestLimits::default()
    };
    validate_series(series, &unlimited)?;
    let payload = match (json, text) {
        (Some(_), Some(_)) => {
            return Err(IngestError::Usage(
                "give either --json or --text, not both".into(),
            ))
        }
        (None, None) => {
            return Err(IngestError::Usage(
                "give a payload: --json VALUE (any JSON, e.g. 21.5) or --text STRING".into(),
            ))
        }
        (Some(j), None) => serde_json::from_str::<Value>(j).map_err(|e| {
            IngestError::Usage(format!(
                "--json value is not JSON ({e}); to send it as a string, use --text"
            ))
        })?,
        (None, Some(t)) => Value::String(t.to_owned()),
    };
    let ts = match ts.map(str::trim) {
        None => None,
        Some(s) => {
            let v = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                Value::from(s.parse::<u64>().map_err(|_| {
                    IngestError::BadTimestamp(format!("ts {s} is after the year 9999"))
                })?)
            } else {
                Value::String(s.to_owned())
            };
            parse_ts(&v)?;
            Some(v)
        }
    };
    Ok(wire_out(&WireOut {
        series,
        payload: Some(&payload),
        payload_b64: None,
        ts,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> Result<IngestRecord, IngestError> {
        parse_line(s.as_bytes(), &IngestLimits::default())
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn parses_json_payload() {
        let r = parse(r#"{"series":"line1/temp","payload":21.5}"#).unwrap();
        assert_eq!(
            r,
            IngestRecord {
                series: "line1/temp".into(),
                ts_ms: None,
                payload: IngestPayload::Json(json!(21.5)),
            }
        );
        assert_eq!(r.topic("gw-17"), "devices/gw-17/data/line1/temp");
        let r = parse(
            "  {\"payload\":{\"v\":[1,2,{\"x\":null}]},\"series\":\"a\",\"ts\":1795773600123}\r\n",
        )
        .unwrap();
        assert_eq!(
            r.payload,
            IngestPayload::Json(json!({"v":[1,2,{"x":null}]}))
        );
        assert_eq!(r.ts_ms, Some(1_795_773_600_123));
        // null is a payload like any other.
        let r = parse(r#"{"series":"a","payload":null,"ts":null}"#).unwrap();
        assert_eq!(r.payload, IngestPayload::Json(Value::Null));
        assert_eq!(r.ts_ms, None);
    }

    #[test]
    fn parses_b64_payload_and_timestamps() {
        let r = parse(
            r#"{"series":"cam/frame","payload_b64":"AAEC/w==","ts":"2026-11-27T10:00:00.123Z"}"#,
        )
        .unwrap();
        assert_eq!(r.payload, IngestPayload::Bytes(vec![0, 1, 2, 255]));
        assert_eq!(r.ts_ms, Some(1_795_773_600_123));
        let r =
            parse(r#"{"series":"a","payload":1,"ts":"2026-11-27T11:00:00.123456+01:00"}"#).unwrap();
        assert_eq!(r.ts_ms, Some(1_795_773_600_123));
        let r = parse(r#"{"series":"a","payload":1,"ts":"1970-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(r.ts_ms, Some(0));
        let r = parse(r#"{"series":"a","payload_b64":""}"#).unwrap();
        assert_eq!(r.payload, IngestPayload::Bytes(vec![]));
    }

    #[test]
    fn rejects_with_messages_that_say_what_to_fix() {
        let cases: &[(&str, &str)] = &[
            ("", "empty line"),
            ("   ", "empty line"),
            ("hello", "not JSON: "),
            ("{\"series\":\"a\",", "not JSON: "),
            (
                "{\"series\":\"a\",\"payload\":1} x",
                "not JSON: trailing characters",
            ),
            ("42", "request must be a JSON object"),
            ("[1]", "request must be a JSON object"),
            (
                r#"{"payload":1}"#,
                "invalid request: missing field `series`",
            ),
            (
                r#"{"series":"a","payload":1,"qos":1}"#,
                "invalid request: unknown field `qos`",
            ),
            (
                r#"{"series":5,"payload":1}"#,
                "invalid request: invalid type",
            ),
            (
                r#"{"series":"a","series":"b","payload":1}"#,
                "duplicate field `series`",
            ),
            (
                r#"{"series":"a","payload":1,"payload_b64":"AA=="}"#,
                "both payload and payload_b64 given",
            ),
            (r#"{"series":"a"}"#, "no payload"),
            (
                r#"{"series":"a","payload_b64":"not base64!"}"#,
                "payload_b64 is not valid standard base64",
            ),
            (
                r#"{"series":"a","payload_b64":5}"#,
                "invalid request: invalid type",
            ),
            (r#"{"series":"","payload":1}"#, "series must not be empty"),
            (
                r#"{"series":"a/+/b","payload":1}"#,
                "series must not contain '+' or '#'",
            ),
            (
                r#"{"series":"a/#","payload":1}"#,
                "series must not contain '+' or '#'",
            ),
            (
                r#"{"series":"/a","payload":1}"#,
                "series must not start or end with '/'",
            ),
            (
                r#"{"series":"a/","payload":1}"#,
                "series must not start or end with '/'",
            ),
            (
                r#"{"series":"a//b","payload":1}"#,
                "series must not contain empty levels",
            ),
            (
                r#"{"series":"$SYS/x","payload":1}"#,
                "series must not start with '$'",
            ),
            (
                r#"{"series":"a\u0000b","payload":1}"#,
                "series must not contain U+0000",
            ),
            (
                r#"{"series":"a\u0007b","payload":1}"#,
                "control character U+0007",
            ),
            (
                r#"{"series":"a\u007fb","payload":1}"#,
                "control character U+007F",
            ),
            (r#"{"series":"a b","payload":1}"#, "whitespace U+0020"),
            (
                r#"{"series":"a\u200bb","payload":1}"#,
                "invisible formatting character U+200B",
            ),
            (
                r#"{"series":"a\u202eb","payload":1}"#,
                "invisible formatting character U+202E",
            ),
            (r#"{"series":"a/../b","payload":1}"#, "'.' or '..' levels"),
            (r#"{"series":".","payload":1}"#, "'.' or '..' levels"),
            (
                r#"{"series":"a","payload":1,"ts":-1}"#,
                "ts -1 is not a non-negative integer",
            ),
            (
                r#"{"series":"a","payload":1,"ts":1.5}"#,
                "is not a non-negative integer",
            ),
            (
                r#"{"series":"a","payload":1,"ts":1795773600123000}"#,
                "after the year 9999",
            ),
            (
                r#"{"series":"a","payload":1,"ts":"yesterday"}"#,
                "is not a usable RFC 3339 timestamp",
            ),
            (
                r#"{"series":"a","payload":1,"ts":"1969-12-31T23:59:59Z"}"#,
                "before 1970",
            ),
            (
                r#"{"series":"a","payload":1,"ts":"2026-12-31T23:59:60Z"}"#,
                "leap seconds",
            ),
            (
                r#"{"series":"a","payload":1,"ts":true}"#,
                "ts must be an RFC 3339 string",
            ),
        ];
        for (line, want) in cases {
            let e = err(line);
            assert!(e.contains(want), "{line}: got {e:?}, want {want:?}");
        }
    }

    #[test]
    fn series_limits() {
        let limits = IngestLimits {
            max_series_bytes: 8,
            max_series_levels: 3,
            ..IngestLimits::default()
        };
        assert!(validate_series("a/b/c", &limits).is_ok());
        assert!(validate_series("12345678", &limits).is_ok());
        let e = validate_series("123456789", &limits)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "series is 9 bytes long; at most 8 are allowed");
        let e = validate_series("a/b/c/d", &limits).unwrap_err().to_string();
        assert_eq!(e, "series has 4 levels; at most 3 are allowed");
        // Printable non-ASCII text is fine.
        assert!(validate_series("Halle-1/Temperatur°C/wärme", &IngestLimits::default()).is_ok());
        assert!(validate_series("a.b/..c/x-y_z:1", &IngestLimits::default()).is_ok());
    }

    #[test]
    fn line_limit() {
        let limits = IngestLimits {
            max_line_bytes: 40,
            ..IngestLimits::default()
        };
        let ok = r#"{"series":"a","payload":"xxxxxxxxxxxxx"}"#;
        assert_eq!(ok.len(), 40);
        assert!(parse_line(ok.as_bytes(), &limits).is_ok());
        assert!(parse_line(format!("{ok}\r\n").as_bytes(), &limits).is_ok());
        let long = r#"{"series":"a","payload":"xxxxxxxxxxxxxx"}"#;
        assert_eq!(
            parse_line(long.as_bytes(), &limits)
                .unwrap_err()
                .to_string(),
            "line longer than 40 bytes"
        );
        assert_eq!(
            IngestError::LineTooLong {
                max: DEFAULT_MAX_LINE_BYTES
            }
            .to_string(),
            "line longer than 262144 bytes"
        );
    }

    #[test]
    fn garbage_never_panics() {
        let limits = IngestLimits::default();
        let samples: &[&[u8]] = &[
            b"\xff\xfe",
            b"{\"series\":\"\xff\",\"payload\":1}",
            b"{\"series\":\"a\",\"payload\":\"\\ud800\"}",
            b"{\"series\":\"a\",\"payload\":1e999}",
            b"\0",
            b"{",
            b"}",
        ];
        for s in samples {
            assert!(parse_line(s, &limits).is_err(), "{s:?}");
        }
        let deep = format!(
            "{{\"series\":\"a\",\"payload\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(parse_line(deep.as_bytes(), &limits).is_err());
    }

    #[test]
    fn record_round_trips_through_its_line() {
        let records = [
            IngestRecord {
                series: "a/b".into(),
                ts_ms: Some(5),
                payload: IngestPayload::Json(json!({"k": [1, "two", null]})),
            },
            IngestRecord {
                series: "bytes".into(),
                ts_ms: None,
                payload: IngestPayload::Bytes(vec![0, 10, 13, 255]),
            },
            IngestRecord {
                series: "n".into(),
                ts_ms: None,
                payload: IngestPayload::Json(Value::Null),
            },
        ];
        for r in records {
            let line = r.to_line();
            assert!(!line.contains('\n'));
            assert_eq!(parse(&line).unwrap(), r, "{line}");
        }
    }

    #[test]
    fn replies_on_the_wire() {
        assert_eq!(
            Reply::Accepted { seq: 1234 }.to_line(),
            r#"{"ok":true,"seq":1234}"#
        );
        assert_eq!(
            Reply::Rejected {
                error: "no \"x\"".into()
            }
            .to_line(),
            r#"{"ok":false,"error":"no \"x\""}"#
        );
        assert_eq!(
            Reply::parse(r#"{"ok":true,"seq":7,"extra":1}"#).unwrap(),
            Reply::Accepted { seq: 7 }
        );
        assert_eq!(
            Reply::parse(r#"{"ok":false}"#).unwrap(),
            Reply::Rejected {
                error: "(no error message)".into()
            }
        );
        assert!(Reply::parse(r#"{"ok":true}"#).is_err());
        assert!(Reply::parse("nope").is_err());
    }

    #[test]
    fn request_lines_from_arguments() {
        let line = request_from_args("line1/temp", Some("21.5"), None, None).unwrap();
        assert_eq!(line, r#"{"series":"line1/temp","payload":21.5}"#);
        let line = request_from_args("s", None, Some("hello \"world\""), None).unwrap();
        assert_eq!(line, r#"{"series":"s","payload":"hello \"world\""}"#);
        let line =
            request_from_args("s", Some(r#"{"a":[1,2]}"#), None, Some("1795773600123")).unwrap();
        assert_eq!(
            line,
            r#"{"series":"s","payload":{"a":[1,2]},"ts":1795773600123}"#
        );
        let line =
            request_from_args("s", None, Some("x"), Some("2026-11-27T10:00:00.123Z")).unwrap();
        assert_eq!(
            line,
            r#"{"series":"s","payload":"x","ts":"2026-11-27T10:00:00.123Z"}"#
        );
        // What it builds parses back.
        let r = parse(&line).unwrap();
        assert_eq!(r.ts_ms, Some(1_795_773_600_123));
        assert_eq!(r.payload, IngestPayload::Json(json!("x")));

        let e = |s, j, t, ts| request_from_args(s, j, t, ts).unwrap_err().to_string();
        assert!(e("s", Some("1"), Some("x"), None).contains("either --json or --text"));
        assert!(e("s", None, None, None).contains("give a payload"));
        assert!(e("s", Some("hello"), None, None).contains("--json value is not JSON"));
        assert!(e("s", Some("hello"), None, None).contains("use --text"));
        assert!(e("a/+", Some("1"), None, None).contains("'+' or '#'"));
        assert!(e("s", Some("1"), None, Some("soon")).contains("not a usable RFC 3339 timestamp"));
        assert!(e("s", Some("1"), None, Some("99999999999999999999")).contains("9999"));
        assert!(e("s", Some("1"), None, Some("-5")).contains("RFC 3339"));
    }
}
