//! The store-and-forward queue: every record a local producer hands to the agent stays on
//! disk until the broker's PUBACK for that exact publish.
//!
//! # Layout
//! - [`UplinkQueue`]: the small trait the rest of the agent uses (ingest appends through
//!   [`GroupCommit`], the uplink peeks and acks).
//! - [`SledQueue`]: the sled implementation. Trees: `meta` (format version, sequence
//!   high-water mark, drop counter), `records` (big-endian `seq` of a group's first record →
//!   a group of records with consecutive `seq`s, so sled iterates in sequence order) and
//!   `acked` (which records of a partly acknowledged group are acknowledged). Records use a
//!   small versioned binary encoding ([`record`]), never serde.
//! - [`GroupCommit`]: batches concurrent submissions into one append round and one flush.
//!
//! # Groups
//! sled's costs are per key: a tree descent and a node copy per insert or delete, a page (and
//! its page-table entry, kept in memory for the whole store) per 8 to 17 keys. So an append
//! stores consecutive records as groups of up to 64 records and 1 KiB (a larger record is a
//! group of its own; [`GroupCommit`] appends the records of a whole round together, so
//! single-record producers share groups too). An acknowledged record is marked in memory and
//! skipped; the group is deleted once all its records are acknowledged, and the marks of
//! partly acknowledged groups are written to `acked` before every flush. A crash can lose
//! marks made since the last flush, and those records are sent again: at least once, as
//! before, since deletions were never flushed on their own either. Format version 2; a
//! version 1 store (one record per key) opens as groups of one and is marked version 2, after
//! which an agent that knows only version 1 refuses it (and leaves it alone).
//! - [`MemoryQueue`]: the same contract in memory, for tests of the other modules.
//!
//! # Sequence numbers and order
//! `seq` is the per-device sequence number of the telemetry envelope. One queue assigns it,
//! strictly increasing, and it survives restarts: the high-water mark is written to `meta`
//! with every append and reopening takes the larger of it and the last key + 1. A small
//! `seq-reserved` file in the store directory (rewritten once every 2^20 sequence numbers)
//! keeps the numbering going up even when a corrupt store is moved aside, or when sled
//! silently lost the end of its log, so consumers that drop duplicates by `(device, seq)`
//! never drop new data. Records are appended in submission order, so order is kept per
//! series (and globally).
//!
//! # Reserved series
//! Besides telemetry, the queue carries the agent's own audit records (tunnel open, close
//! and refusal, see `crate::tunnel`) under the reserved series [`AUDIT_SERIES`] (`$audit`),
//! so they survive outages and restarts like telemetry and go out with a `seq` of the same
//! sequence (consumers drop duplicates the same way). The uplink publishes them on
//! `devices/<id>/audit` instead of `devices/<id>/data/<series>`. Producers can never name a
//! `$` series (ingest refuses it), and [`record::check_series`] refuses every `$` series
//! other than the reserved ones, on append and on decode. Audit records count against the
//! disk budget like any record.
//!
//! # Durability
//! [`UplinkQueue::append`] is not durable; [`UplinkQueue::flush`] makes every earlier append
//! durable, and [`UplinkQueue::peek`] only returns records a completed flush covered, so a
//! record can never reach the broker and then vanish in a crash (its `seq` would be reused).
//! [`GroupCommit`] answers a producer only after the flush that covers its records; one flush
//! serves every submission that arrived while the previous one ran.
//!
//! Appends do not use `sled::Batch`: in sled 0.34 every `apply_batch` writes the log buffer
//! out at once (`pwrite` and `sync_file_range`), a thousand synced writes a second at
//! 35 000 records/s. Plain inserts wait in the buffer for the flush of their round.
//!
//! Two durability levels ([`Durability`], config `queue.durability`):
//! - `flush` (the default): sled's own flush. On Linux sled 0.34 writes its log buffer with
//!   `pwrite` followed by `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` (in
//!   `IoBufs::write_to_log`, `src/pagecache/iobuf.rs`), not `fsync`: the data survives a
//!   crash or `kill -9` of the agent, but not necessarily a power cut (file size and other
//!   metadata are not synced, nor is the drive's write cache flushed).
//! - `fsync`: additionally syncs the store before acknowledging: sled's log file (`db`, where
//!   every write goes) is `fdatasync`ed on every flush, and every other file and directory of
//!   the store is synced once when it appears (sled writes its blob files without ever
//!   syncing them). Survives power loss on hardware that honours cache flushes. Measured with
//!   100 000 records through [`GroupCommit`] (the `group_commit_rate` test, release build,
//!   ext4 on a virtual disk, 2 shared cores): 8 producers that each wait for "accepted" went
//!   from 17 300 to 10 800 records/s (-38 %: 7 records per flush), 64 producers from 64 000
//!   to 43 000 records/s (-33 %). Producers that pipeline their requests through the ingest
//!   socket fill the flushes, and there `fsync` cost little: 8 connections were accepted at
//!   160 000 to 260 000 records/s either way (`agent_rates` in the integration tests).
//!   Re-syncing every file on every flush instead cost 90 %.
//!
//! `flush` is the default: the failure it covers (the agent crashing or being killed,
//! guarantee S1) is the common one, it is the cheaper mode and writes flash less often, and
//! gateways on unreliable power without a UPS set `durability = "fsync"`.
//!
//! # Disk budget
//! [`QueueOptions::max_bytes`] bounds the bytes the queued records take (key plus encoded
//! record, as counted by [`UplinkQueue::bytes`]). sled is log-structured: its files are
//! larger than the live data and shrink only as segments are cleaned (1 million records of
//! ~70 bytes took 68 MiB by this count and 176 MiB of file), so leave about three times the
//! budget free on the partition. When an append would exceed the budget:
//! - [`WhenFull::DropOldest`] (the default): the oldest records (lowest `seq`, including
//!   records that may be in flight to the broker) are deleted until the new batch fits; every
//!   dropped record is counted in a persistent counter ([`UplinkQueue::drops`], reported in
//!   the agent's health) and logged. New data wins over old data: the queue keeps the most
//!   recent history.
//! - [`WhenFull::RejectNew`]: the append fails with [`QueueError::Full`] and the producer is
//!   told its records were not accepted.
//!
//! A single batch larger than the whole budget is refused ([`QueueError::BatchTooLarge`]).
//!
//! # Damage
//! A store locked by another process is refused ([`QueueError::Locked`], naming the path) and
//! never touched. A store with an unknown format version is refused. A corrupt store (sled
//! reports corruption, a record does not decode, or the store files exist but the format
//! version is gone, which is what sled leaves after silently dropping damaged segments) is
//! moved aside to `<path>.corrupt-<unix seconds>`, reported in [`OpenReport`] and in the log,
//! and a fresh store takes its place. Nothing is ever silently wiped.
//!
//! # Memory
//! sled's page cache is capped by [`QueueOptions::cache_capacity_bytes`]; [`UplinkQueue::peek`]
//! is paged; opening scans the records one at a time to count them and check they decode;
//! appends reach sled in batches of at most 64 records (sled 0.34 holds on to memory for
//! large batches). With the default 8 MiB cache and 1 million records queued the process
//! measured 45 MiB resident while appending and 70 MiB after reopening (2.5 s to open); see
//! the `memory_with_a_million_records` test.

use std::path::PathBuf;

pub use bulwark_protocol::envelope::Payload;

mod group_commit;
mod memory;
pub mod record;
mod sled_queue;

pub use group_commit::{EachResult, GroupCommit, GroupCommitOptions};
pub use memory::MemoryQueue;
pub use record::RecordError;
pub use sled_queue::{SledQueue, FORMAT_VERSION};

/// The series of the agent's own audit records (tunnel open, close, refusal). The uplink
/// publishes them on `devices/<id>/audit`, not under `data/`. Producers cannot use it:
/// ingest refuses every series that starts with `$`.
pub const AUDIT_SERIES: &str = "$audit";

/// Series only the agent itself appends; [`record::check`] refuses every other series that
/// starts with `$`.
pub const RESERVED_SERIES: &[&str] = &[AUDIT_SERIES];

/// A record as a producer hands it over.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    /// Topic levels under `devices/<id>/data/` (see
    /// [`bulwark_protocol::envelope::validate_series`]), or one of the agent's
    /// [`RESERVED_SERIES`] (see [`record::check_series`]).
    pub series: String,
    /// When the value was measured, Unix milliseconds.
    pub ts_ms: u64,
    pub payload: Payload,
}

/// A record as stored and handed to the uplink.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    /// Per-device sequence number; also the record's key.
    pub seq: u64,
    pub series: String,
    pub ts_ms: u64,
    /// When the queue accepted it, Unix milliseconds (agent clock).
    pub enqueued_ms: u64,
    pub payload: Payload,
}

impl StoredRecord {
    /// Bytes the record counts against the disk budget: its key plus its encoding.
    pub fn accounted_bytes(encoded_len: usize) -> u64 {
        8 + encoded_len as u64
    }
}

/// How far a flush goes before producers are told "accepted". See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// sled's flush (`sync_file_range` on Linux): survives a process crash.
    #[default]
    Flush,
    /// sled's flush, then `fsync` of every file of the store: survives power loss.
    Fsync,
}

/// What happens when an append would exceed [`QueueOptions::max_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Delete the oldest records until the new ones fit; count and report the drops.
    #[default]
    DropOldest,
    /// Refuse the new records ([`QueueError::Full`]).
    RejectNew,
}

/// Options of [`SledQueue::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOptions {
    /// sled's page cache; the main part of the queue's memory use. Default 8 MiB.
    pub cache_capacity_bytes: u64,
    /// Disk budget for queued records (see the module documentation). Default 1 GiB.
    pub max_bytes: u64,
    pub durability: Durability,
    pub when_full: WhenFull,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            cache_capacity_bytes: 8 * 1024 * 1024,
            max_bytes: 1024 * 1024 * 1024,
            durability: Durability::default(),
            when_full: WhenFull::default(),
        }
    }
}

/// What opening the queue found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpenReport {
    /// Where a corrupt store was moved to (a fresh one was opened in its place).
    pub moved_aside: Option<PathBuf>,
    /// Why it was moved aside.
    pub corruption: Option<String>,
    /// Records queued.
    pub records: u64,
    /// Bytes they count against the budget.
    pub bytes: u64,
    /// The sequence number the next record gets.
    pub next_seq: u64,
    /// Records dropped by the disk budget so far (persistent).
    pub drops: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue store {path} is locked by another running process (another bulwark-agent?); stop it or set queue.path elsewhere ({detail})")]
    Locked { path: PathBuf, detail: String },
    #[error("queue store {path} has format version {found}; this agent understands version {FORMAT_VERSION}. Run the agent version that wrote it, or move the directory away to start empty")]
    UnknownVersion { path: PathBuf, found: u32 },
    #[error("queue store {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("queue store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("queue store error: {0}")]
    Sled(#[from] sled::Error),
    #[error("record {index} of the batch is refused: {reason}")]
    InvalidRecord { index: usize, reason: RecordError },
    #[error("a batch of {bytes} bytes is larger than the queue's whole disk budget (queue.max_bytes = {max_bytes})")]
    BatchTooLarge { bytes: u64, max_bytes: u64 },
    #[error("the queue is full ({bytes} of queue.max_bytes = {max_bytes} bytes used) and refuses new records")]
    Full { bytes: u64, max_bytes: u64 },
    #[error(
        "the queue is busy ({max_waiting} submissions already waiting for a flush); retry later"
    )]
    Busy { max_waiting: usize },
    #[error("records were written but could not be made durable: {detail}")]
    NotDurable { detail: String },
    #[error("the queue's commit task has stopped")]
    Closed,
}

/// A copy for every submitter of a round that failed; an I/O error is copied by kind and
/// text.
impl Clone for QueueError {
    fn clone(&self) -> Self {
        match self {
            QueueError::Locked { path, detail } => QueueError::Locked {
                path: path.clone(),
                detail: detail.clone(),
            },
            QueueError::UnknownVersion { path, found } => QueueError::UnknownVersion {
                path: path.clone(),
                found: *found,
            },
            QueueError::Corrupt { path, detail } => QueueError::Corrupt {
                path: path.clone(),
                detail: detail.clone(),
            },
            QueueError::Io { path, source } => QueueError::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            QueueError::Sled(e) => QueueError::Sled(e.clone()),
            QueueError::InvalidRecord { index, reason } => QueueError::InvalidRecord {
                index: *index,
                reason: reason.clone(),
            },
            QueueError::BatchTooLarge { bytes, max_bytes } => QueueError::BatchTooLarge {
                bytes: *bytes,
                max_bytes: *max_bytes,
            },
            QueueError::Full { bytes, max_bytes } => QueueError::Full {
                bytes: *bytes,
                max_bytes: *max_bytes,
            },
            QueueError::Busy { max_waiting } => QueueError::Busy {
                max_waiting: *max_waiting,
            },
            QueueError::NotDurable { detail } => QueueError::NotDurable {
                detail: detail.clone(),
            },
            QueueError::Closed => QueueError::Closed,
        }
    }
}

impl QueueError {
    /// Whether the error refused a batch before anything of it was written (an invalid
    /// record, the disk budget), so that the queue is as it was.
    pub fn refuses_only_the_batch(&self) -> bool {
        matches!(
            self,
            QueueError::InvalidRecord { .. }
                | QueueError::BatchTooLarge { .. }
                | QueueError::Full { .. }
        )
    }
}

/// The queue as the rest of the agent sees it. Writes are durable after
/// [`UplinkQueue::flush`]; readers only ever see durable records.
pub trait UplinkQueue: Send + Sync + std::fmt::Debug + 'static {
    /// Assigns the next sequence numbers to `batch`, in order, and stores it (not durable
    /// yet). Applies the disk budget policy. An invalid record refuses the whole batch; an
    /// I/O error or a crash part-way may leave a prefix of it stored, which is harmless:
    /// nobody was told it was accepted.
    fn append(&self, batch: Vec<NewRecord>) -> Result<Vec<u64>, QueueError>;
    /// Appends the records of `batch` in order, each as if it were appended alone: a record
    /// that is refused (invalid, larger than the budget, or the queue full under
    /// [`WhenFull::RejectNew`]) gets its own error and does not refuse the others. The outer
    /// error is one that stopped the append part-way (I/O), as for
    /// [`UplinkQueue::append`]. The default appends one record at a time; [`SledQueue`]
    /// writes the whole batch at once unless a record of it is refused.
    fn append_each(
        &self,
        batch: Vec<NewRecord>,
    ) -> Result<Vec<Result<u64, QueueError>>, QueueError> {
        let mut out = Vec::with_capacity(batch.len());
        for r in batch {
            match self.append(vec![r]) {
                Ok(seqs) => out.push(seqs.first().copied().ok_or(QueueError::Closed)),
                Err(e) if e.refuses_only_the_batch() => out.push(Err(e)),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
    /// Makes every earlier append durable (see [`Durability`]).
    fn flush(&self) -> Result<(), QueueError>;
    /// Up to `limit` durable records with `seq > after` (all if `after` is `None`), in
    /// sequence order.
    fn peek(&self, after: Option<u64>, limit: usize) -> Result<Vec<StoredRecord>, QueueError>;
    /// Deletes record `seq` (after the broker's PUBACK). Returns whether it was there;
    /// acking twice, or a record the budget already dropped, is fine.
    fn ack(&self, seq: u64) -> Result<bool, QueueError>;
    /// Records queued (durable or not).
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes queued records count against the budget.
    fn bytes(&self) -> u64;
    /// `(seq, enqueued_ms)` of the oldest queued record.
    fn oldest(&self) -> Result<Option<(u64, u64)>, QueueError>;
    /// Records dropped by the disk budget, ever (persistent).
    fn drops(&self) -> u64;
    /// Completed flushes since the queue was opened.
    fn flushes(&self) -> u64;
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
