//! Persistence of retained messages and persistent sessions, behind [`BrokerStore`].
//!
//! [`SledStore`] keeps four trees: `meta` (format version), `retained` (topic → message),
//! `sessions` (client id → session record) and `queue` (client id, 0x00, big-endian
//! sequence → queued message), so a session's queue is one ordered prefix scan.
//! Records are a small versioned binary encoding (see [`wire`]), never serde of payloads.
//! [`FlushCoordinator`] turns many "make this durable" requests into one flush (group commit).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bulwark_protocol::QoS;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// Version of the on-disk layout. A store with another version stops start-up.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path} is locked by another running broker; stop it first or point persistence.path elsewhere ({detail})")]
    Locked { path: PathBuf, detail: String },
    #[error("store {path} has format version {found}; this broker understands version {FORMAT_VERSION}. Use the broker version that wrote it, or move the directory away to start empty")]
    UnknownVersion { path: PathBuf, found: u32 },
    #[error("store {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store error: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record is malformed: {0}")]
    Record(&'static str),
}

/// A message as stored: retained, or queued for a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// A persistent session, without its queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub client_id: String,
    pub identity: Option<String>,
    pub subscriptions: Vec<(String, QoS)>,
    /// Unix seconds when the client went away; 0 while it was connected.
    pub disconnected_at: u64,
}

/// A message queued for a persistent session, with its delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRecord {
    pub message: StoredMessage,
    /// Packet id it was sent with; 0 = not sent yet.
    pub pkid: u16,
    /// QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    pub released: bool,
}

/// Everything the broker reloads at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub retained: Vec<StoredMessage>,
    pub sessions: Vec<(SessionRecord, Vec<(u64, QueuedRecord)>)>,
}

/// Storage the broker's state is written through. Writes may be buffered; they are
/// durable after [`BrokerStore::flush`] returns.
pub trait BrokerStore: Send + Sync + std::fmt::Debug + 'static {
    fn load(&self) -> Result<Snapshot, StoreError>;
    fn put_retained(&self, msg: &StoredMessage) -> Result<(), StoreError>;
    fn remove_retained(&self, topic: &str) -> Result<(), StoreError>;
    fn put_session(&self, rec: &SessionRecord) -> Result<(), StoreError>;
    /// Removes the session and all of its queued messages.
    fn remove_session(&self, client_id: &str) -> Result<(), StoreError>;
    fn put_queued(&self, client_id: &str, seq: u64, rec: &QueuedRecord) -> Result<(), StoreError>;
    fn remove_queued(&self, client_id: &str, seq: u64) -> Result<(), StoreError>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// The store used when persistence is disabled: keeps nothing.
#[derive(Debug, Default)]
pub struct NullStore;

impl BrokerStore for NullStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot::default())
    }
    fn put_retained(&self, _: &StoredMessage) -> Result<(), StoreError> {
        Ok(())
    }
    fn remove_retained(&self, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
    fn put_session(&self, _: &SessionRecord) -> Result<(), StoreError> {
        Ok(())
    }
    fn remove_session(&self, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
    fn put_queued(&self, _: &str, _: u64, _: &QueuedRecord) -> Result<(), StoreError> {
        Ok(())
    }
    fn remove_queued(&self, _: &str, _: u64) -> Result<(), StoreError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// sled-backed store.
pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
    retained: sled::Tree,
    sessions: sled::Tree,
    queue: sled::Tree,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SledStore {
    /// Opens (or creates) the store at `path`. Never moves anything aside: see
    /// [`SledStore::open_or_recover`].
    pub fn open(path: &Path, cache_capacity: u64) -> Result<SledStore, StoreError> {
        // sled recovers from torn or garbled segments by dropping them; a store whose
        // files exist but whose format version is gone was damaged, not new.
        let preexisting = std::fs::metadata(path.join("db")).is_ok_and(|m| m.len() > 0);
        create_private_dir(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity)
            .flush_every_ms(None)
            .open()
            .map_err(|e| classify_open_error(path, e))?;
        let meta = db.open_tree("meta")?;
        let retained = db.open_tree("retained")?;
        let sessions = db.open_tree("sessions")?;
        let queue = db.open_tree("queue")?;
        match meta.get("format_version")? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        path: path.to_path_buf(),
                        detail: "format_version is not a 4-byte integer".into(),
                    })?;
                if found != FORMAT_VERSION {
                    return Err(StoreError::UnknownVersion {
                        path: path.to_path_buf(),
                        found,
                    });
                }
            }
            None => {
                if preexisting {
                    return Err(StoreError::Corrupt {
                        path: path.to_path_buf(),
                        detail: "the store files exist but their format version cannot be read"
                            .into(),
                    });
                }
                if !(retained.is_empty() && sessions.is_empty() && queue.is_empty()) {
                    return Err(StoreError::Corrupt {
                        path: path.to_path_buf(),
                        detail: "data without a format version".into(),
                    });
                }
                meta.insert("format_version", &FORMAT_VERSION.to_be_bytes())?;
                db.flush()?;
            }
        }
        Ok(SledStore {
            path: path.to_path_buf(),
            db,
            retained,
            sessions,
            queue,
        })
    }

    /// Opens the store and loads it. A corrupt store (unreadable by sled, or with records
    /// that do not decode) is moved aside to `<path>.corrupt-<unix time>` with an error in
    /// the log, and an empty store takes its place. A locked store or an unknown format
    /// version is returned as an error: those are never moved aside.
    pub fn open_or_recover(
        path: &Path,
        cache_capacity: u64,
    ) -> Result<(SledStore, Snapshot), StoreError> {
        let attempt = SledStore::open(path, cache_capacity).and_then(|s| {
            let snap = s.load()?;
            Ok((s, snap))
        });
        match attempt {
            Ok(ok) => Ok(ok),
            Err(e @ (StoreError::Corrupt { .. } | StoreError::Record(_))) => {
                let detail = e.to_string();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = PathBuf::from(format!("{}.corrupt-{now}", path.display()));
                tracing::error!(
                    target: "audit",
                    event = "store_corrupt",
                    path = %path.display(),
                    moved_to = %aside.display(),
                    detail = %detail,
                    "persistent store is corrupt: moved aside, starting with an empty store; retained messages and offline sessions in it are not loaded"
                );
                std::fs::rename(path, &aside).map_err(|source| StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                let s = SledStore::open(path, cache_capacity)?;
                let snap = s.load()?;
                Ok((s, snap))
            }
            Err(e) => Err(e),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    if path.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })
}

fn classify_open_error(path: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StoreError::Locked {
                path: path.to_path_buf(),
                detail: io.to_string(),
            }
        }
        sled::Error::Io(source) => StoreError::Io {
            path: path.to_path_buf(),
            source,
        },
        sled::Error::Corruption { .. } | sled::Error::Unsupported(_) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        other => StoreError::Sled(other),
    }
}

fn queue_key(client_id: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(client_id.len() + 9);
    k.extend_from_slice(client_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn queue_prefix(client_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(client_id.len() + 1);
    k.extend_from_slice(client_id.as_bytes());
    k.push(0);
    k
}

impl BrokerStore for SledStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let corrupt = |detail: &str| StoreError::Corrupt {
            path: self.path.clone(),
            detail: detail.to_string(),
        };
        let mut snap = Snapshot::default();
        for item in self.retained.iter() {
            let (_, v) = item?;
            let msg =
                wire::decode_message(&v).map_err(|e| corrupt(&format!("retained record: {e}")))?;
            snap.retained.push(msg);
        }
        for item in self.sessions.iter() {
            let (_, v) = item?;
            let rec =
                wire::decode_session(&v).map_err(|e| corrupt(&format!("session record: {e}")))?;
            let mut queued = Vec::new();
            for q in self.queue.scan_prefix(queue_prefix(&rec.client_id)) {
                let (k, v) = q?;
                let seq_bytes: [u8; 8] = k[k.len() - 8..]
                    .try_into()
                    .map_err(|_| corrupt("queue key too short"))?;
                let rec =
                    wire::decode_queued(&v).map_err(|e| corrupt(&format!("queued record: {e}")))?;
                queued.push((u64::from_be_bytes(seq_bytes), rec));
            }
            snap.sessions.push((rec, queued));
        }
        Ok(snap)
    }

    fn put_retained(&self, msg: &StoredMessage) -> Result<(), StoreError> {
        self.retained
            .insert(msg.topic.as_bytes(), wire::encode_message(msg))?;
        Ok(())
    }

    fn remove_retained(&self, topic: &str) -> Result<(), StoreError> {
        self.retained.remove(topic.as_bytes())?;
        Ok(())
    }

    fn put_session(&self, rec: &SessionRecord) -> Result<(), StoreError> {
        self.sessions
            .insert(rec.client_id.as_bytes(), wire::encode_session(rec))?;
        Ok(())
    }

    fn remove_session(&self, client_id: &str) -> Result<(), StoreError> {
        self.sessions.remove(client_id.as_bytes())?;
        let mut batch = sled::Batch::default();
        for item in self.queue.scan_prefix(queue_prefix(client_id)).keys() {
            batch.remove(item?);
        }
        self.queue.apply_batch(batch)?;
        Ok(())
    }

    fn put_queued(&self, client_id: &str, seq: u64, rec: &QueuedRecord) -> Result<(), StoreError> {
        self.queue
            .insert(queue_key(client_id, seq), wire::encode_queued(rec))?;
        Ok(())
    }

    fn remove_queued(&self, client_id: &str, seq: u64) -> Result<(), StoreError> {
        self.queue.remove(queue_key(client_id, seq))?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Group commit: callers ask for durability and wait; one flush serves every request that
/// arrived before it started.
#[derive(Debug, Clone)]
pub struct FlushCoordinator {
    tx: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

impl FlushCoordinator {
    /// Starts the flusher task. With `interval`, it also flushes on that period (periodic
    /// durability); requests are still served.
    pub fn start(store: Arc<dyn BrokerStore>, interval: Option<Duration>) -> FlushCoordinator {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
        tokio::spawn(async move {
            let mut ticker = interval.map(tokio::time::interval);
            loop {
                let first = match &mut ticker {
                    Some(t) => tokio::select! {
                        r = rx.recv() => match r { Some(w) => Some(w), None => break },
                        _ = t.tick() => None,
                    },
                    None => match rx.recv().await {
                        Some(w) => Some(w),
                        None => break,
                    },
                };
                let mut waiters: Vec<oneshot::Sender<()>> = first.into_iter().collect();
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "flushing the persistent store failed")
                    }
                    Err(e) => tracing::error!(error = %e, "store flush task failed"),
                }
                for w in waiters {
                    let _ = w.send(());
                }
            }
            // Channel closed: final flush so shutdown loses nothing.
            let _ = tokio::task::spawn_blocking(move || store.flush()).await;
        });
        FlushCoordinator { tx }
    }

    /// Resolves once everything written before the call is durable.
    pub async fn durable(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(tx).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The record encoding: a version byte, then fixed-order fields. Strings and byte strings
/// carry a u32 length. Decoding checks every length against what is left.
pub mod wire {
    use super::*;

    const RECORD_VERSION: u8 = 1;

    struct Reader<'a> {
        buf: &'a [u8],
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
            if self.buf.len() < n {
                return Err("truncated");
            }
            let (a, b) = self.buf.split_at(n);
            self.buf = b;
            Ok(a)
        }
        fn u8(&mut self) -> Result<u8, &'static str> {
            Ok(self.take(1)?[0])
        }
        fn u16(&mut self) -> Result<u16, &'static str> {
            Ok(u16::from_be_bytes(
                self.take(2)?.try_into().map_err(|_| "truncated")?,
            ))
        }
        fn u32(&mut self) -> Result<u32, &'static str> {
            Ok(u32::from_be_bytes(
                self.take(4)?.try_into().map_err(|_| "truncated")?,
            ))
        }
        fn u64(&mut self) -> Result<u64, &'static str> {
            Ok(u64::from_be_bytes(
                self.take(8)?.try_into().map_err(|_| "truncated")?,
            ))
        }
        fn bytes(&mut self) -> Result<&'a [u8], &'static str> {
            let n = self.u32()? as usize;
            self.take(n)
        }
        fn string(&mut self) -> Result<String, &'static str> {
            String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "invalid UTF-8")
        }
        fn qos(&mut self) -> Result<QoS, &'static str> {
            QoS::from_u8(self.u8()?).ok_or("invalid QoS")
        }
        fn version(&mut self) -> Result<(), &'static str> {
            if self.u8()? != RECORD_VERSION {
                return Err("unknown record version");
            }
            Ok(())
        }
        fn end(&self) -> Result<(), &'static str> {
            if self.buf.is_empty() {
                Ok(())
            } else {
                Err("trailing bytes")
            }
        }
    }

    fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }

    fn put_message(out: &mut Vec<u8>, m: &StoredMessage) {
        out.push(m.qos as u8);
        out.push(m.retain as u8);
        put_bytes(out, m.topic.as_bytes());
        put_bytes(out, &m.payload);
    }

    fn read_message(r: &mut Reader<'_>) -> Result<StoredMessage, &'static str> {
        let qos = r.qos()?;
        let retain = r.u8()? != 0;
        let topic = r.string()?;
        let payload = Bytes::copy_from_slice(r.bytes()?);
        Ok(StoredMessage {
            topic,
            payload,
            qos,
            retain,
        })
    }

    pub fn encode_message(m: &StoredMessage) -> Vec<u8> {
        let mut out = Vec::with_capacity(m.topic.len() + m.payload.len() + 11);
        out.push(RECORD_VERSION);
        put_message(&mut out, m);
        out
    }

    pub fn decode_message(b: &[u8]) -> Result<StoredMessage, &'static str> {
        let mut r = Reader { buf: b };
        r.version()?;
        let m = read_message(&mut r)?;
        r.end()?;
        Ok(m)
    }

    pub fn encode_session(s: &SessionRecord) -> Vec<u8> {
        let mut out = vec![RECORD_VERSION];
        put_bytes(&mut out, s.client_id.as_bytes());
        match &s.identity {
            Some(i) => {
                out.push(1);
                put_bytes(&mut out, i.as_bytes());
            }
            None => out.push(0),
        }
        out.extend_from_slice(&s.disconnected_at.to_be_bytes());
        out.extend_from_slice(&(s.subscriptions.len() as u32).to_be_bytes());
        for (f, q) in &s.subscriptions {
            put_bytes(&mut out, f.as_bytes());
            out.push(*q as u8);
        }
        out
    }

    pub fn decode_session(b: &[u8]) -> Result<SessionRecord, &'static str> {
        let mut r = Reader { buf: b };
        r.version()?;
        let client_id = r.string()?;
        let identity = match r.u8()? {
            0 => None,
            1 => Some(r.string()?),
            _ => return Err("invalid identity flag"),
        };
        let disconnected_at = r.u64()?;
        let n = r.u32()? as usize;
        let mut subscriptions = Vec::with_capacity(n.min(r.buf.len()));
        for _ in 0..n {
            let f = r.string()?;
            let q = r.qos()?;
            subscriptions.push((f, q));
        }
        r.end()?;
        Ok(SessionRecord {
            client_id,
            identity,
            subscriptions,
            disconnected_at,
        })
    }

    pub fn encode_queued(q: &QueuedRecord) -> Vec<u8> {
        let mut out = Vec::with_capacity(q.message.topic.len() + q.message.payload.len() + 16);
        out.push(RECORD_VERSION);
        out.extend_from_slice(&q.pkid.to_be_bytes());
        out.push(q.released as u8);
        put_message(&mut out, &q.message);
        out
    }

    pub fn decode_queued(b: &[u8]) -> Result<QueuedRecord, &'static str> {
        let mut r = Reader { buf: b };
        r.version()?;
        let pkid = r.u16()?;
        let released = r.u8()? != 0;
        let message = read_message(&mut r)?;
        r.end()?;
        Ok(QueuedRecord {
            message,
            pkid,
            released,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled's background threads may hold the file lock for a moment after a `Db` in
    /// this process is dropped; a new process never sees that.
    fn retry_locked<T>(f: impl Fn() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match f() {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                r => return r,
            }
        }
    }

    fn msg(topic: &str, payload: &'static [u8]) -> StoredMessage {
        StoredMessage {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: true,
        }
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let m = msg("a/b", b"hello");
        assert_eq!(wire::decode_message(&wire::encode_message(&m)).unwrap(), m);
        let s = SessionRecord {
            client_id: "c1".into(),
            identity: Some("gw-1".into()),
            subscriptions: vec![("a/#".into(), QoS::ExactlyOnce)],
            disconnected_at: 42,
        };
        assert_eq!(wire::decode_session(&wire::encode_session(&s)).unwrap(), s);
        let q = QueuedRecord {
            message: m.clone(),
            pkid: 7,
            released: true,
        };
        assert_eq!(wire::decode_queued(&wire::encode_queued(&q)).unwrap(), q);
        let enc = wire::encode_message(&m);
        for cut in 0..enc.len() {
            assert!(wire::decode_message(&enc[..cut]).is_err());
        }
        let mut bad = enc.clone();
        bad[0] = 9;
        assert!(wire::decode_message(&bad).is_err());
        // A declared length larger than the record must not allocate or panic.
        assert!(wire::decode_session(&[1, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn sled_store_persists_and_orders_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let s = SledStore::open(&path, 1 << 20).unwrap();
            s.put_retained(&msg("r/1", b"x")).unwrap();
            let rec = SessionRecord {
                client_id: "c".into(),
                identity: None,
                subscriptions: vec![("t/#".into(), QoS::AtLeastOnce)],
                disconnected_at: 1,
            };
            s.put_session(&rec).unwrap();
            // A client id that is a prefix of another must not see its queue.
            s.put_session(&SessionRecord {
                client_id: "cc".into(),
                ..rec.clone()
            })
            .unwrap();
            for seq in [300u64, 2, 1000] {
                let q = QueuedRecord {
                    message: msg("t/x", b"p"),
                    pkid: 0,
                    released: false,
                };
                s.put_queued("c", seq, &q).unwrap();
            }
            s.put_queued(
                "cc",
                1,
                &QueuedRecord {
                    message: msg("t/y", b"q"),
                    pkid: 0,
                    released: false,
                },
            )
            .unwrap();
            s.remove_queued("c", 300).unwrap();
            s.flush().unwrap();
        }
        let s = retry_locked(|| SledStore::open(&path, 1 << 20)).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.retained, vec![msg("r/1", b"x")]);
        let c = snap
            .sessions
            .iter()
            .find(|(r, _)| r.client_id == "c")
            .unwrap();
        let seqs: Vec<u64> = c.1.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![2, 1000]);
        s.remove_session("c").unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.sessions.len(), 1);
        assert_eq!(snap.sessions[0].1.len(), 1);
    }

    #[test]
    fn locked_store_is_refused_not_moved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let _first = SledStore::open(&path, 1 << 20).unwrap();
        let err = SledStore::open_or_recover(&path, 1 << 20).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
        let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(entries.len(), 1, "nothing may be moved aside");
    }

    #[test]
    fn unknown_format_version_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let db = sled::open(&path).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert("format_version", &99u32.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let err = retry_locked(|| SledStore::open_or_recover(&path, 1 << 20)).unwrap_err();
        assert!(
            matches!(err, StoreError::UnknownVersion { found: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn corrupt_records_move_the_store_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let s = SledStore::open(&path, 1 << 20).unwrap();
            s.retained.insert("t", &[1u8, 7, 7][..]).unwrap();
            s.flush().unwrap();
        }
        let (s, snap) = retry_locked(|| SledStore::open_or_recover(&path, 1 << 20)).unwrap();
        assert!(snap.retained.is_empty());
        drop(s);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("store.corrupt-")),
            "{names:?}"
        );
    }
}
