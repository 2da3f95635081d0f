//! [`SledQueue`]: the sled implementation of [`UplinkQueue`]. See the parent module for the
//! guarantees; this file is about how they are kept.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{
    record, unix_ms, Durability, NewRecord, OpenReport, QueueError, QueueOptions, StoredRecord,
    UplinkQueue, WhenFull,
};

/// Version of the on-disk layout (trees, keys, record encoding). Another version stops
/// start-up.
pub const FORMAT_VERSION: u32 = 1;

const META_FORMAT: &[u8] = b"format_version";
const META_NEXT_SEQ: &[u8] = b"next_seq";
const META_DROPS: &[u8] = b"drops";

/// Largest sled batch an append writes at once (see `append`).
const SLED_BATCH_RECORDS: usize = 64;

/// File in the store directory holding a sequence number above every one ever assigned.
const RESERVATION_FILE: &str = "seq-reserved";
/// How far ahead the reservation goes: the file is rewritten once per this many records.
const SEQ_BLOCK: u64 = 1 << 20;

/// sled-backed [`UplinkQueue`]. Open with [`SledQueue::open`].
pub struct SledQueue {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    records: sled::Tree,
    options: QueueOptions,
    /// Held for the whole of an append, so sequence numbers are assigned and written in order.
    appender: Mutex<Appender>,
    /// What `Durability::Fsync` has synced so far (None in `Flush` mode).
    fsync: Option<Mutex<FsyncState>>,
    /// Every record with a lower `seq` is covered by a completed flush.
    durable_below: AtomicU64,
    len: AtomicU64,
    bytes: AtomicU64,
    drops: AtomicU64,
    flushes: AtomicU64,
}

struct Appender {
    next_seq: u64,
    /// Value in the reservation file: no assigned `seq` reaches it.
    reserved: u64,
}

impl std::fmt::Debug for SledQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledQueue")
            .field("path", &self.path)
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl SledQueue {
    /// Opens (or creates, mode 0700) the queue at `path`.
    ///
    /// A corrupt store is moved aside to `<path>.corrupt-<unix seconds>` and a fresh one is
    /// opened; the report says so, and sequence numbers continue above the old store's. A
    /// locked store ([`QueueError::Locked`]) or an unknown format version
    /// ([`QueueError::UnknownVersion`]) is an error and is left alone.
    pub fn open(path: &Path, options: QueueOptions) -> Result<(SledQueue, OpenReport), QueueError> {
        match SledQueue::open_inner(path, &options, 0) {
            Err(QueueError::Corrupt { detail, .. }) => {
                let aside = move_aside(path)?;
                // Number on above anything the old store may have handed out: its
                // reservation, or the clock in milliseconds (a store would need more
                // records than that to have got there by counting from 1).
                let floor = read_reservation(&aside).unwrap_or(0).max(unix_ms());
                tracing::error!(
                    target: "audit",
                    event = "queue_corrupt",
                    path = %path.display(),
                    moved_to = %aside.display(),
                    detail = %detail,
                    next_seq = floor,
                    "the store-and-forward queue is corrupt: moved aside, starting with an empty queue; records in it are not sent"
                );
                let (queue, mut report) = SledQueue::open_inner(path, &options, floor)?;
                report.moved_aside = Some(aside);
                report.corruption = Some(detail);
                Ok((queue, report))
            }
            other => other,
        }
    }

    fn open_inner(
        path: &Path,
        options: &QueueOptions,
        seq_floor: u64,
    ) -> Result<(SledQueue, OpenReport), QueueError> {
        let corrupt = |detail: String| QueueError::Corrupt {
            path: path.to_path_buf(),
            detail,
        };
        // sled recovers from torn or garbled segments by dropping them; a store whose files
        // exist but whose format version is gone was damaged, not new.
        let preexisting = std::fs::metadata(path.join("db")).is_ok_and(|m| m.len() > 0);
        create_private_dir(path)?;
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(options.cache_capacity_bytes)
            // Durability is ours to decide: no background flusher.
            .flush_every_ms(None);
        // sled 0.34 may panic, rather than return an error, on some garbled files.
        let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
            .map_err(|panic| {
                corrupt(format!(
                    "sled panicked while opening: {}",
                    panic_text(&panic)
                ))
            })?
            .map_err(|e| classify(path, e))?;
        restrict_files(path);
        let meta = db.open_tree("meta").map_err(|e| classify(path, e))?;
        let records = db.open_tree("records").map_err(|e| classify(path, e))?;

        match meta.get(META_FORMAT).map_err(|e| classify(path, e))? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| corrupt("format_version is not a 4-byte integer".into()))?;
                if found != FORMAT_VERSION {
                    return Err(QueueError::UnknownVersion {
                        path: path.to_path_buf(),
                        found,
                    });
                }
            }
            None => {
                if preexisting {
                    return Err(corrupt(
                        "the store files exist but their format version cannot be read".into(),
                    ));
                }
                if !records.is_empty() {
                    return Err(corrupt("records without a format version".into()));
                }
                meta.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes())
                    .map_err(|e| classify(path, e))?;
                db.flush().map_err(|e| classify(path, e))?;
            }
        }

        // Count the records and check each one decodes, one at a time.
        let (mut count, mut bytes, mut last) = (0u64, 0u64, None);
        for item in records.iter() {
            let (k, v) = item.map_err(|e| classify(path, e))?;
            let seq =
                key_seq(&k).ok_or_else(|| corrupt(format!("record key {k:?} is not 8 bytes")))?;
            let r = record::decode(&v).map_err(|e| corrupt(format!("record {seq}: {e}")))?;
            if r.seq != seq {
                return Err(corrupt(format!(
                    "record under key {seq} says seq {}",
                    r.seq
                )));
            }
            count += 1;
            bytes += StoredRecord::accounted_bytes(v.len());
            last = Some(seq);
        }
        let meta_u64 = |key: &[u8]| -> Result<u64, QueueError> {
            match meta.get(key).map_err(|e| classify(path, e))? {
                None => Ok(0),
                Some(v) => <[u8; 8]>::try_from(v.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| {
                        corrupt(format!(
                            "meta {} is not an 8-byte integer",
                            String::from_utf8_lossy(key)
                        ))
                    }),
            }
        };
        let drops = meta_u64(META_DROPS)?;
        let mut next_seq = meta_u64(META_NEXT_SEQ)?
            .max(last.map_or(0, |s| s.saturating_add(1)))
            .max(seq_floor)
            .max(1);
        let reserved = read_reservation(path);
        if let Some(r) = reserved {
            if next_seq < r.saturating_sub(SEQ_BLOCK) {
                tracing::warn!(
                    path = %path.display(),
                    store_next_seq = next_seq,
                    reserved = r,
                    "the queue's sequence high-water mark went back (sled lost the end of its log?); numbering continues above the reservation"
                );
                next_seq = r;
            }
        }
        let mut reserved = reserved.unwrap_or(0);
        if reserved <= next_seq {
            reserved = next_seq.saturating_add(SEQ_BLOCK);
            write_reservation(path, reserved)?;
        }
        let report = OpenReport {
            moved_aside: None,
            corruption: None,
            records: count,
            bytes,
            next_seq,
            drops,
        };
        let fsync = match options.durability {
            Durability::Flush => None,
            Durability::Fsync => Some(Mutex::new(FsyncState::new(path).map_err(io_err(path))?)),
        };
        let queue = SledQueue {
            path: path.to_path_buf(),
            fsync,
            db,
            meta,
            records,
            options: options.clone(),
            appender: Mutex::new(Appender { next_seq, reserved }),
            durable_below: AtomicU64::new(next_seq),
            len: AtomicU64::new(count),
            bytes: AtomicU64::new(bytes),
            drops: AtomicU64::new(drops),
            flushes: AtomicU64::new(0),
        };
        Ok((queue, report))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What sled's files take on disk (larger than [`UplinkQueue::bytes`]: sled is
    /// log-structured).
    pub fn size_on_disk(&self) -> Result<u64, QueueError> {
        Ok(self.db.size_on_disk()?)
    }

    fn appender(&self) -> MutexGuard<'_, Appender> {
        self.appender.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sled_err(&self, e: sled::Error) -> QueueError {
        classify(&self.path, e)
    }

    /// Deletes the oldest records until `incoming` more bytes fit the budget. Called with
    /// the appender held.
    fn make_room(&self, incoming: u64) -> Result<(), QueueError> {
        let max = self.options.max_bytes;
        if self.bytes.load(Ordering::SeqCst) + incoming <= max {
            return Ok(());
        }
        if self.options.when_full == WhenFull::RejectNew {
            return Err(QueueError::Full {
                bytes: self.bytes.load(Ordering::SeqCst),
                max_bytes: max,
            });
        }
        let (mut dropped, mut first, mut last) = (0u64, None, 0u64);
        while self.bytes.load(Ordering::SeqCst) + incoming > max {
            // pop_min removes atomically, so a concurrent ack of the same record cannot
            // count it twice.
            match self.records.pop_min().map_err(|e| self.sled_err(e))? {
                Some((k, v)) => {
                    self.forget(v.len());
                    dropped += 1;
                    let seq = key_seq(&k).unwrap_or(0);
                    first.get_or_insert(seq);
                    last = seq;
                }
                None => {
                    // Nothing left to drop: the accounting drifted; it is exact again.
                    self.bytes.store(0, Ordering::SeqCst);
                    self.len.store(0, Ordering::SeqCst);
                    break;
                }
            }
        }
        if dropped > 0 {
            let total = self.drops.fetch_add(dropped, Ordering::SeqCst) + dropped;
            self.meta
                .insert(META_DROPS, &total.to_be_bytes())
                .map_err(|e| self.sled_err(e))?;
            tracing::warn!(
                path = %self.path.display(),
                dropped,
                first_seq = first.unwrap_or(0),
                last_seq = last,
                total_drops = total,
                max_bytes = max,
                "queue disk budget reached: dropped the oldest records"
            );
        }
        Ok(())
    }

    /// Accounts for a record of `value_len` encoded bytes leaving the queue.
    fn forget(&self, value_len: usize) {
        let size = StoredRecord::accounted_bytes(value_len);
        let _ = self
            .bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(size))
            });
        let _ = self
            .len
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(1))
            });
    }
}

impl UplinkQueue for SledQueue {
    fn append(&self, batch: Vec<NewRecord>) -> Result<Vec<u64>, QueueError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for (index, r) in batch.iter().enumerate() {
            record::check(&r.series, r.ts_ms, &r.payload)
                .map_err(|reason| QueueError::InvalidRecord { index, reason })?;
        }
        let enqueued_ms = unix_ms();
        let mut appender = self.appender();
        let first = appender.next_seq;
        let n = batch.len() as u64;
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::with_capacity(batch.len());
        let mut incoming = 0u64;
        let mut seqs = Vec::with_capacity(batch.len());
        for (index, (r, seq)) in batch.into_iter().zip(first..).enumerate() {
            let stored = StoredRecord {
                seq,
                series: r.series,
                ts_ms: r.ts_ms,
                enqueued_ms,
                payload: r.payload,
            };
            let value = record::encode(&stored)
                .map_err(|reason| QueueError::InvalidRecord { index, reason })?;
            incoming += StoredRecord::accounted_bytes(value.len());
            writes.push((seq, value));
            seqs.push(seq);
        }
        if incoming > self.options.max_bytes {
            return Err(QueueError::BatchTooLarge {
                bytes: incoming,
                max_bytes: self.options.max_bytes,
            });
        }
        self.make_room(incoming)?;
        let next = first + n;
        if next >= appender.reserved {
            let reserved = next.saturating_add(SEQ_BLOCK);
            write_reservation(&self.path, reserved)?;
            appender.reserved = reserved;
        }
        // The high-water mark goes first: a flush that covers any of these records covers
        // it too.
        self.meta
            .insert(META_NEXT_SEQ, &next.to_be_bytes())
            .map_err(|e| self.sled_err(e))?;
        appender.next_seq = next;
        // sled 0.34 keeps memory for large batches: 300 000 records appended 1 000 (10 000)
        // per sled batch, flushed every 10 appends, grew the process to 330 MB (1 GB); in
        // sled batches of at most 64 records it stays near 30 MB. So a large append is
        // written as several sled batches. A crash can then leave part of an append on disk:
        // its producer was not answered, and the records present are valid and in order.
        let mut writes = writes.into_iter().peekable();
        while writes.peek().is_some() {
            let mut chunk = sled::Batch::default();
            for (seq, value) in writes.by_ref().take(SLED_BATCH_RECORDS) {
                chunk.insert(&seq.to_be_bytes(), value);
            }
            self.records
                .apply_batch(chunk)
                .map_err(|e| self.sled_err(e))?;
        }
        self.len.fetch_add(n, Ordering::SeqCst);
        self.bytes.fetch_add(incoming, Ordering::SeqCst);
        Ok(seqs)
    }

    fn flush(&self) -> Result<(), QueueError> {
        // Every append that finished before this line is covered by the flush below.
        let upto = self.appender().next_seq;
        // sled 0.34.7: Tree::flush -> PageCache::flush -> Log::flush -> iobuf::flush ->
        // make_stable, which waits until IoBufs::write_to_log has written every sealed
        // buffer; on Linux write_to_log calls pwrite, then
        // libc::sync_file_range(fd, off, len, WAIT_BEFORE | WRITE | WAIT_AFTER), not fsync
        // (src/pagecache/iobuf.rs). Hence Durability::Fsync.
        self.db.flush().map_err(|e| self.sled_err(e))?;
        if let Some(fsync) = &self.fsync {
            fsync
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .sync(&self.path)
                .map_err(io_err(&self.path))?;
        }
        self.durable_below.fetch_max(upto, Ordering::SeqCst);
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn peek(&self, after: Option<u64>, limit: usize) -> Result<Vec<StoredRecord>, QueueError> {
        let start = match after {
            Some(a) => match a.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
            None => 0,
        };
        let end = self.durable_below.load(Ordering::SeqCst);
        if limit == 0 || start >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in self
            .records
            .range(start.to_be_bytes()..end.to_be_bytes())
            .take(limit)
        {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            let r = record::decode(&v).map_err(|e| QueueError::Corrupt {
                path: self.path.clone(),
                detail: format!("record {:?}: {e}", key_seq(&k)),
            })?;
            out.push(r);
        }
        Ok(out)
    }

    fn ack(&self, seq: u64) -> Result<bool, QueueError> {
        match self
            .records
            .remove(seq.to_be_bytes())
            .map_err(|e| self.sled_err(e))?
        {
            Some(v) => {
                self.forget(v.len());
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn len(&self) -> u64 {
        self.len.load(Ordering::SeqCst)
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    fn oldest(&self) -> Result<Option<(u64, u64)>, QueueError> {
        match self.records.first().map_err(|e| self.sled_err(e))? {
            None => Ok(None),
            Some((_, v)) => {
                let (seq, _, enqueued_ms) =
                    record::header(&v).map_err(|e| QueueError::Corrupt {
                        path: self.path.clone(),
                        detail: format!("oldest record: {e}"),
                    })?;
                Ok(Some((seq, enqueued_ms)))
            }
        }
    }

    fn drops(&self) -> u64 {
        self.drops.load(Ordering::SeqCst)
    }

    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
}

fn key_seq(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}

fn classify(path: &Path, e: sled::Error) -> QueueError {
    match e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            QueueError::Locked {
                path: path.to_path_buf(),
                detail: io.to_string(),
            }
        }
        sled::Error::Io(source) => QueueError::Io {
            path: path.to_path_buf(),
            source,
        },
        sled::Error::Corruption { .. } | sled::Error::Unsupported(_) => QueueError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        other => QueueError::Sled(other),
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> QueueError + '_ {
    move |source| QueueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn create_private_dir(path: &Path) -> Result<(), QueueError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::metadata(path) {
        Ok(m) => {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", m.permissions().mode() & 0o777),
                    "the queue directory is accessible to other users; chmod 700 it"
                );
            }
            Ok(())
        }
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io_err(path)),
    }
}

/// sled creates its files with the process umask; data files are 0600 (the directory is
/// 0700 as well).
fn restrict_files(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            if let Err(e) =
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))
            {
                tracing::warn!(file = %entry.path().display(), error = %e, "cannot make the queue file private (chmod 600)");
            }
        }
    }
}

/// Renames `path` to `<path>.corrupt-<unix seconds>` (with `-<n>` appended if taken).
fn move_aside(path: &Path) -> Result<PathBuf, QueueError> {
    let secs = unix_ms() / 1000;
    let base = format!("{}.corrupt-{secs}", path.display());
    let mut aside = PathBuf::from(&base);
    let mut n = 1;
    while aside.exists() {
        aside = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &aside).map_err(io_err(path))?;
    Ok(aside)
}

fn read_reservation(dir: &Path) -> Option<u64> {
    let file = dir.join(RESERVATION_FILE);
    let text = std::fs::read_to_string(&file).ok()?;
    match text.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => {
            tracing::warn!(file = %file.display(), "unreadable sequence reservation; ignored");
            None
        }
    }
}

/// Atomically replaces the reservation file (write, fsync, rename, fsync the directory).
fn write_reservation(dir: &Path, value: u64) -> Result<(), QueueError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{RESERVATION_FILE}.tmp"));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "{value}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(RESERVATION_FILE))?;
        std::fs::File::open(dir)?.sync_all()
    })();
    result.map_err(io_err(dir))
}

/// `Durability::Fsync`: after sled's flush, make the store's files durable on power loss.
///
/// - `db` (sled's log, where every write goes) is `fdatasync`ed on every flush: data plus the
///   metadata needed to read it back (its size), and a drive cache flush.
/// - Every other file is synced once, when it first appears: sled writes `conf` once, writes
///   each `blobs/*` file (large pages) once and never syncs it, and renames finished
///   `snap.*` files into place. A directory whose entries changed is synced after them.
///
/// This is "fsync every file of the store" without re-syncing files that cannot have
/// changed, which would cost a journal commit each.
#[derive(Debug)]
struct FsyncState {
    db: std::fs::File,
    /// Files (other than `db`) already synced, by path.
    synced: std::collections::HashSet<PathBuf>,
}

impl FsyncState {
    fn new(dir: &Path) -> std::io::Result<FsyncState> {
        Ok(FsyncState {
            db: std::fs::File::open(dir.join("db"))?,
            synced: std::collections::HashSet::new(),
        })
    }

    fn sync(&mut self, dir: &Path) -> std::io::Result<()> {
        self.db.sync_data()?;
        let mut seen = std::collections::HashSet::new();
        sync_new_files(dir, &self.db_path(dir), &mut self.synced, &mut seen)?;
        // Forget files sled removed, so the set stays as small as the directory.
        self.synced.retain(|p| seen.contains(p));
        Ok(())
    }

    fn db_path(&self, dir: &Path) -> PathBuf {
        dir.join("db")
    }
}

/// Syncs the files under `dir` that are not in `synced` yet (recursing into directories),
/// then `dir` itself if any of its entries was new. Records every file seen in `seen`.
fn sync_new_files(
    dir: &Path,
    skip: &Path,
    synced: &mut std::collections::HashSet<PathBuf>,
    seen: &mut std::collections::HashSet<PathBuf>,
) -> std::io::Result<()> {
    let mut changed = false;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path == skip {
            continue;
        }
        let kind = entry.file_type()?;
        let result = if kind.is_dir() {
            if !synced.contains(&path) {
                changed = true;
            }
            sync_new_files(&path, skip, synced, seen)
        } else if kind.is_file() && !synced.contains(&path) {
            changed = true;
            std::fs::File::open(&path).and_then(|f| f.sync_all())
        } else {
            Ok(())
        };
        match result {
            Ok(()) => {
                seen.insert(path.clone());
                synced.insert(path);
            }
            // sled removes snapshots and blobs as it goes.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if changed {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
