//! [`SledQueue`]: the sled implementation of [`UplinkQueue`]. See the parent module for the
//! guarantees; this file is about how they are kept.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{
    record, unix_ms, Durability, NewRecord, OpenReport, QueueError, QueueOptions, StoredRecord,
    UplinkQueue, WhenFull,
};

/// Version of the on-disk layout (trees, keys, record encoding). Version 2 stores records in
/// groups ([`record::encode_group`]) and keeps the acknowledgements of partly acknowledged
/// groups in the `acked` tree. A version 1 store (one record per key) is opened and
/// upgraded: its records read as groups of one. Another version stops start-up.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this agent opens (and upgrades).
const OLDEST_FORMAT_VERSION: u32 = 1;

const META_FORMAT: &[u8] = b"format_version";
const META_NEXT_SEQ: &[u8] = b"next_seq";
const META_DROPS: &[u8] = b"drops";

/// Records per group at most.
const GROUP_RECORDS: usize = 64;
/// A group takes more records only while it stays within this many bytes (a larger record
/// is a group of its own). sled's costs (time, and memory for its page table) are per key,
/// so larger groups are cheaper, up to where sled's page cache stops keeping its bound:
/// sled 0.34 evicts lazily, each of its 256 cache shards only once 64 accesses to it have
/// piled up, so several leaves per shard (a leaf holds 8 to 17 keys) stay in memory beyond
/// the cache capacity, and the larger the groups, the larger the leaves. Measured with
/// 1 million queued records (the agent process, `agent_rates`): 1 KiB groups, 50 MB
/// resident after ingesting them and 31 MB after a restart; 4 KiB groups, 99 MB and 75 MB.
const GROUP_BYTES: usize = 1024;

/// File in the store directory holding a sequence number above every one ever assigned.
const RESERVATION_FILE: &str = "seq-reserved";
/// How far ahead the reservation goes: the file is rewritten once per this many records.
const SEQ_BLOCK: u64 = 1 << 20;

/// sled-backed [`UplinkQueue`]. Open with [`SledQueue::open`].
pub struct SledQueue {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    /// Groups of records by the sequence number of their first record.
    records: sled::Tree,
    /// Acknowledged records of the groups that are only partly acknowledged, as of the last
    /// flush: group key -> bitmap ([`Partial::bitmap`]).
    acked: sled::Tree,
    /// The groups with some records acknowledged (and some not). Locked after `appender`
    /// when both are needed.
    partial: Mutex<BTreeMap<u64, Partial>>,
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

/// A group some of whose records are acknowledged. A group is deleted once all of its
/// records are; until then the acknowledged ones are skipped, and written to the `acked`
/// tree at the next flush (after a crash before that, they are sent again: at least once).
#[derive(Debug)]
struct Partial {
    /// Encoded length of each record of the group, by position.
    lens: Vec<u32>,
    /// Acknowledged positions, one bit each.
    acked: Vec<u64>,
    /// Records not acknowledged.
    remaining: usize,
    /// Acknowledgements not yet in the `acked` tree.
    dirty: bool,
    /// The `acked` tree holds an entry for the group.
    stored: bool,
}

impl Partial {
    fn new(lens: Vec<u32>) -> Partial {
        Partial {
            acked: vec![0; lens.len().div_ceil(64)],
            remaining: lens.len(),
            lens,
            dirty: false,
            stored: false,
        }
    }

    /// Read back from the `acked` tree.
    fn from_bitmap(lens: Vec<u32>, bitmap: &[u8]) -> Result<Partial, String> {
        let mut p = Partial::new(lens);
        if bitmap.len() != p.acked.len() * 8 {
            return Err(format!(
                "bitmap of {} bytes for a group of {} records",
                bitmap.len(),
                p.lens.len()
            ));
        }
        for (word, chunk) in p.acked.iter_mut().zip(bitmap.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(chunk);
            *word = u64::from_be_bytes(a);
        }
        let n = p.lens.len();
        if n % 64 != 0 && p.acked[n / 64] >> (n % 64) != 0 {
            return Err("bits set beyond the group's records".into());
        }
        p.remaining = n - p
            .acked
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum::<usize>();
        p.stored = true;
        Ok(p)
    }

    fn bitmap(&self) -> Vec<u8> {
        self.acked.iter().flat_map(|w| w.to_be_bytes()).collect()
    }

    fn is_acked(&self, i: usize) -> bool {
        self.acked
            .get(i / 64)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    /// Marks position `i`; false if it already was (or is out of range).
    fn ack(&mut self, i: usize) -> bool {
        match self.acked.get_mut(i / 64) {
            Some(w) if *w >> (i % 64) & 1 == 0 => {
                *w |= 1 << (i % 64);
                self.remaining -= 1;
                self.dirty = true;
                true
            }
            _ => false,
        }
    }
}

fn is_acked(p: Option<&Partial>, i: usize) -> bool {
    p.is_some_and(|p| p.is_acked(i))
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
        let db = open_db(path, options)?;
        restrict_files(path);
        let meta = db.open_tree("meta").map_err(|e| classify(path, e))?;
        let records = db.open_tree("records").map_err(|e| classify(path, e))?;
        let acked = db.open_tree("acked").map_err(|e| classify(path, e))?;

        let mut upgrade = false;
        match meta.get(META_FORMAT).map_err(|e| classify(path, e))? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| corrupt("format_version is not a 4-byte integer".into()))?;
                if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&found) {
                    return Err(QueueError::UnknownVersion {
                        path: path.to_path_buf(),
                        found,
                    });
                }
                upgrade = found != FORMAT_VERSION;
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

        // The acknowledgements of partly acknowledged groups.
        let mut bitmaps = BTreeMap::new();
        for item in acked.iter() {
            let (k, v) = item.map_err(|e| classify(path, e))?;
            let key = key_seq(&k)
                .ok_or_else(|| corrupt(format!("acknowledgement key {k:?} is not 8 bytes")))?;
            bitmaps.insert(key, v);
        }
        // Count the records and check each one decodes, one group at a time.
        let (mut count, mut bytes, mut last) = (0u64, 0u64, None);
        let mut partial = BTreeMap::new();
        let mut done = Vec::new();
        // One lookup per group rather than one iterator over all of them: sled 0.34's page
        // cache evicts lazily, each of its 256 shards only once 64 accesses to it have piled
        // up, and an iterator touches each page once, which would leave the whole store in
        // memory (see GROUP_BYTES). A lookup per group touches each page once per group.
        let mut next = records.first().map_err(|e| classify(path, e))?;
        while let Some((k, v)) = next.take() {
            next = records.get_gt(&k).map_err(|e| classify(path, e))?;
            let key =
                key_seq(&k).ok_or_else(|| corrupt(format!("record key {k:?} is not 8 bytes")))?;
            let group =
                record::group_records(&v).map_err(|e| corrupt(format!("record {key}: {e}")))?;
            let mut lens = Vec::with_capacity(group.len());
            for (seq, encoded) in (key..).zip(&group) {
                let r =
                    record::decode(encoded).map_err(|e| corrupt(format!("record {seq}: {e}")))?;
                if r.seq != seq {
                    return Err(corrupt(format!(
                        "record under key {seq} says seq {}",
                        r.seq
                    )));
                }
                lens.push(encoded.len() as u32);
            }
            let p = match bitmaps.remove(&key) {
                None => None,
                Some(bitmap) => Some(
                    Partial::from_bitmap(lens.clone(), &bitmap)
                        .map_err(|e| corrupt(format!("acknowledgements of record {key}: {e}")))?,
                ),
            };
            for (i, len) in lens.iter().enumerate() {
                if !is_acked(p.as_ref(), i) {
                    count += 1;
                    bytes += StoredRecord::accounted_bytes(*len as usize);
                }
            }
            last = Some(key + group.len() as u64 - 1);
            match p {
                Some(p) if p.remaining == 0 => done.push(key),
                Some(p) => {
                    partial.insert(key, p);
                }
                None => {}
            }
        }
        // Groups acknowledged in full, and acknowledgements of groups that are gone.
        for key in done.iter().chain(bitmaps.keys()) {
            records
                .remove(key.to_be_bytes())
                .map_err(|e| classify(path, e))?;
            acked
                .remove(key.to_be_bytes())
                .map_err(|e| classify(path, e))?;
        }
        if upgrade {
            meta.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes())
                .map_err(|e| classify(path, e))?;
            db.flush().map_err(|e| classify(path, e))?;
            tracing::info!(path = %path.display(), format_version = FORMAT_VERSION, "queue store upgraded");
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
            acked,
            partial: Mutex::new(partial),
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

    fn partial(&self) -> MutexGuard<'_, BTreeMap<u64, Partial>> {
        self.partial.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn corrupt(&self, detail: String) -> QueueError {
        QueueError::Corrupt {
            path: self.path.clone(),
            detail,
        }
    }

    /// Deletes the oldest records until `incoming` more bytes fit the budget, a whole group
    /// at a time. Called with the appender held.
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
            // pop_min removes atomically, so a concurrent ack of the same group cannot
            // count its records twice (acks look at `partial`, locked below).
            match self.records.pop_min().map_err(|e| self.sled_err(e))? {
                Some((k, v)) => {
                    let key = key_seq(&k).unwrap_or(0);
                    // An undecodable group still goes, counted as one record.
                    let lens: Vec<usize> = match record::group_records(&v) {
                        Ok(group) => group.iter().map(|r| r.len()).collect(),
                        Err(_) => vec![v.len()],
                    };
                    let p = self.partial().remove(&key);
                    for (i, len) in lens.iter().enumerate() {
                        if !is_acked(p.as_ref(), i) {
                            self.forget(*len);
                            dropped += 1;
                        }
                    }
                    if p.is_some_and(|p| p.stored) {
                        self.acked
                            .remove(key.to_be_bytes())
                            .map_err(|e| self.sled_err(e))?;
                    }
                    first.get_or_insert(key);
                    last = key + lens.len() as u64 - 1;
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

    /// Writes the acknowledgements of partly acknowledged groups made since the last call
    /// to the `acked` tree (the flush that follows makes them durable).
    fn write_acks(&self) -> Result<(), QueueError> {
        let mut partial = self.partial();
        for (key, p) in partial.iter_mut().filter(|(_, p)| p.dirty) {
            self.acked
                .insert(key.to_be_bytes(), p.bitmap())
                .map_err(|e| self.sled_err(e))?;
            p.dirty = false;
            p.stored = true;
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

/// Why [`SledQueue::append_batch`] did not store a batch.
enum AppendError {
    /// Refused before anything was written (see [`QueueError::refuses_only_the_batch`]);
    /// the batch is handed back.
    Refused(QueueError, Vec<NewRecord>),
    /// Failed part-way: a prefix of the batch may be stored.
    Failed(QueueError),
}

impl From<AppendError> for QueueError {
    fn from(e: AppendError) -> QueueError {
        match e {
            AppendError::Refused(e, _) | AppendError::Failed(e) => e,
        }
    }
}

impl SledQueue {
    /// [`UplinkQueue::append`], handing the batch back when it is refused as a whole.
    fn append_batch(&self, batch: Vec<NewRecord>) -> Result<Vec<u64>, AppendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for (index, r) in batch.iter().enumerate() {
            if let Err(reason) = record::check(&r.series, r.ts_ms, &r.payload) {
                return Err(AppendError::Refused(
                    QueueError::InvalidRecord { index, reason },
                    batch,
                ));
            }
        }
        let enqueued_ms = unix_ms();
        let mut appender = self.appender();
        let first = appender.next_seq;
        let n = batch.len() as u64;
        // Encoded while the records are kept, so that a refusal can hand them back.
        let mut stored = Vec::with_capacity(batch.len());
        let mut values: Vec<Vec<u8>> = Vec::with_capacity(batch.len());
        let mut incoming = 0u64;
        for (index, (r, seq)) in batch.into_iter().zip(first..).enumerate() {
            let s = StoredRecord {
                seq,
                series: r.series,
                ts_ms: r.ts_ms,
                enqueued_ms,
                payload: r.payload,
            };
            match record::encode_checked(&s) {
                Ok(value) => {
                    incoming += StoredRecord::accounted_bytes(value.len());
                    values.push(value);
                    stored.push(s);
                }
                Err(reason) => {
                    stored.push(s);
                    return Err(AppendError::Refused(
                        QueueError::InvalidRecord { index, reason },
                        give_back(stored),
                    ));
                }
            }
        }
        if incoming > self.options.max_bytes {
            return Err(AppendError::Refused(
                QueueError::BatchTooLarge {
                    bytes: incoming,
                    max_bytes: self.options.max_bytes,
                },
                give_back(stored),
            ));
        }
        match self.make_room(incoming) {
            Ok(()) => {}
            Err(e) if e.refuses_only_the_batch() => {
                return Err(AppendError::Refused(e, give_back(stored)))
            }
            Err(e) => return Err(AppendError::Failed(e)),
        }
        drop(stored);
        let next = first + n;
        if next >= appender.reserved {
            let reserved = next.saturating_add(SEQ_BLOCK);
            write_reservation(&self.path, reserved).map_err(AppendError::Failed)?;
            appender.reserved = reserved;
        }
        // The high-water mark goes first: a flush that covers any of these records covers
        // it too.
        self.meta
            .insert(META_NEXT_SEQ, &next.to_be_bytes())
            .map_err(|e| AppendError::Failed(self.sled_err(e)))?;
        appender.next_seq = next;
        // Consecutive records go into groups, one sled insert per group: sled's cost (and
        // its memory for the page table) is per key. Plain inserts, not a `sled::Batch`:
        // in sled 0.34 every `apply_batch` rolls the log buffer (`PageCache::pin_log`),
        // writing it out with `pwrite` and `sync_file_range` at once, and sled holds on to
        // memory for large batches. Plain inserts stay in the log buffer until the flush
        // that makes the whole round durable. A crash before that flush can leave any part
        // of the append on disk, which is harmless: nobody was told those records were
        // accepted, and the high-water mark above (written first) and the reservation file
        // keep their sequence numbers from being reused.
        let mut start = 0;
        while start < values.len() {
            let mut end = start + 1;
            let mut size = 5 + 4 + values[start].len();
            while end < values.len()
                && end - start < GROUP_RECORDS
                && size + 4 + values[end].len() <= GROUP_BYTES
            {
                size += 4 + values[end].len();
                end += 1;
            }
            let key = first + start as u64;
            self.records
                .insert(key.to_be_bytes(), record::encode_group(&values[start..end]))
                .map_err(|e| AppendError::Failed(self.sled_err(e)))?;
            start = end;
        }
        self.len.fetch_add(n, Ordering::SeqCst);
        self.bytes.fetch_add(incoming, Ordering::SeqCst);
        Ok((first..next).collect())
    }
}

/// The records of a refused batch, as they were handed in.
fn give_back(stored: Vec<StoredRecord>) -> Vec<NewRecord> {
    stored
        .into_iter()
        .map(|s| NewRecord {
            series: s.series,
            ts_ms: s.ts_ms,
            payload: s.payload,
        })
        .collect()
}

impl UplinkQueue for SledQueue {
    fn append(&self, batch: Vec<NewRecord>) -> Result<Vec<u64>, QueueError> {
        Ok(self.append_batch(batch)?)
    }

    fn append_each(
        &self,
        batch: Vec<NewRecord>,
    ) -> Result<Vec<Result<u64, QueueError>>, QueueError> {
        let batch = match self.append_batch(batch) {
            Ok(seqs) => return Ok(seqs.into_iter().map(Ok).collect()),
            Err(AppendError::Failed(e)) => return Err(e),
            // Some record is refused: one at a time, so that only it is.
            Err(AppendError::Refused(_, batch)) => batch,
        };
        let mut out = Vec::with_capacity(batch.len());
        for r in batch {
            match self.append_batch(vec![r]) {
                Ok(seqs) => out.push(seqs.first().copied().ok_or(QueueError::Closed)),
                Err(AppendError::Refused(e, _)) => out.push(Err(e)),
                Err(AppendError::Failed(e)) => return Err(e),
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), QueueError> {
        // Every append that finished before this line is covered by the flush below.
        let upto = self.appender().next_seq;
        self.write_acks()?;
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
        let key = |seq: u64| sled::IVec::from(&seq.to_be_bytes());
        // The group that holds `start`, if any, has the last key at or below it.
        let holding = self
            .records
            .range(..=key(start))
            .next_back()
            .transpose()
            .map_err(|e| self.sled_err(e))?;
        let after_holding = match &holding {
            Some((k, _)) => Bound::Excluded(k.clone()),
            None => Bound::Included(key(start)),
        };
        let groups = holding.map(Ok).into_iter().chain(
            self.records
                .range((after_holding, Bound::Excluded(key(end)))),
        );
        let partial = self.partial();
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in groups {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            let first = key_seq(&k).unwrap_or(0);
            let group = record::group_records(&v)
                .map_err(|e| self.corrupt(format!("record {first}: {e}")))?;
            let p = partial.get(&first);
            for (i, (seq, encoded)) in (first..).zip(&group).enumerate() {
                if seq >= end {
                    return Ok(out);
                }
                if seq < start || is_acked(p, i) {
                    continue;
                }
                let r = record::decode(encoded)
                    .map_err(|e| self.corrupt(format!("record {seq}: {e}")))?;
                if r.seq != seq {
                    return Err(self.corrupt(format!("record under key {seq} says seq {}", r.seq)));
                }
                out.push(r);
                if out.len() == limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    fn ack(&self, seq: u64) -> Result<bool, QueueError> {
        let mut partial = self.partial();
        let known = partial
            .range(..=seq)
            .next_back()
            .filter(|(first, p)| seq - **first < p.lens.len() as u64)
            .map(|(first, _)| *first);
        let first = match known {
            Some(first) => first,
            None => {
                // The group that holds `seq`: the last key at or below it.
                let Some((k, v)) = self
                    .records
                    .range(..=sled::IVec::from(&seq.to_be_bytes()))
                    .next_back()
                    .transpose()
                    .map_err(|e| self.sled_err(e))?
                else {
                    return Ok(false);
                };
                let first = key_seq(&k).unwrap_or(0);
                let lens: Vec<u32> = record::group_records(&v)
                    .map_err(|e| self.corrupt(format!("record {first}: {e}")))?
                    .iter()
                    .map(|r| r.len() as u32)
                    .collect();
                if seq - first >= lens.len() as u64 {
                    return Ok(false);
                }
                if lens.len() == 1 {
                    // A group of one: delete it right away.
                    if self
                        .records
                        .remove(k)
                        .map_err(|e| self.sled_err(e))?
                        .is_none()
                    {
                        return Ok(false);
                    }
                    self.forget(lens[0] as usize);
                    return Ok(true);
                }
                partial.insert(first, Partial::new(lens));
                first
            }
        };
        let Some(p) = partial.get_mut(&first) else {
            return Ok(false);
        };
        let i = (seq - first) as usize;
        if !p.ack(i) {
            return Ok(false);
        }
        self.forget(p.lens[i] as usize);
        if p.remaining == 0 {
            let stored = p.stored;
            partial.remove(&first);
            self.records
                .remove(first.to_be_bytes())
                .map_err(|e| self.sled_err(e))?;
            if stored {
                self.acked
                    .remove(first.to_be_bytes())
                    .map_err(|e| self.sled_err(e))?;
            }
        }
        Ok(true)
    }

    fn len(&self) -> u64 {
        self.len.load(Ordering::SeqCst)
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    fn oldest(&self) -> Result<Option<(u64, u64)>, QueueError> {
        let partial = self.partial();
        for item in self.records.iter() {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            let first = key_seq(&k).unwrap_or(0);
            let group = record::group_records(&v)
                .map_err(|e| self.corrupt(format!("oldest record: {e}")))?;
            let p = partial.get(&first);
            if let Some((_, encoded)) = group.iter().enumerate().find(|(i, _)| !is_acked(p, *i)) {
                let (seq, _, enqueued_ms) = record::header(encoded)
                    .map_err(|e| self.corrupt(format!("oldest record: {e}")))?;
                return Ok(Some((seq, enqueued_ms)));
            }
        }
        Ok(None)
    }

    fn drops(&self) -> u64 {
        self.drops.load(Ordering::SeqCst)
    }

    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
}

fn open_db(path: &Path, options: &QueueOptions) -> Result<sled::Db, QueueError> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(options.cache_capacity_bytes)
        // Durability is ours to decide: no background flusher.
        .flush_every_ms(None);
    // sled 0.34 may panic, rather than return an error, on some garbled files.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
        .map_err(|panic| QueueError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("sled panicked while opening: {}", panic_text(&panic)),
        })?
        .map_err(|e| classify(path, e))
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
