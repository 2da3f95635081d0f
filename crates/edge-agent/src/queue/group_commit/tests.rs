use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Notify;

use super::*;
use crate::queue::{
    Durability, MemoryQueue, OpenReport, Payload, QueueOptions, SledQueue, StoredRecord,
};

fn rec(series: &str, i: u64) -> NewRecord {
    NewRecord {
        series: series.into(),
        ts_ms: 1_795_773_600_000 + i,
        payload: Payload::Json(json!({ "i": i })),
    }
}

fn open(path: &Path, durability: Durability) -> (SledQueue, OpenReport) {
    let options = QueueOptions {
        cache_capacity_bytes: 1 << 20,
        durability,
        ..QueueOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match SledQueue::open(path, options.clone()) {
            Err(QueueError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => return r.unwrap(),
        }
    }
}

/// Wraps a queue; remembers how many flushes had completed when each record was appended,
/// and can hold flushes back.
#[derive(Debug)]
struct Probe<Q> {
    inner: Q,
    flushes_at_append: Mutex<HashMap<u64, u64>>,
    /// Records per `append_each` call.
    append_each_calls: Mutex<Vec<usize>>,
    /// When set, the next `flush` says so on `entered` and waits for a message on `release`.
    gate: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
    fail_flush: std::sync::atomic::AtomicBool,
}

impl<Q: UplinkQueue> Probe<Q> {
    fn new(inner: Q) -> Probe<Q> {
        Probe {
            inner,
            flushes_at_append: Mutex::new(HashMap::new()),
            append_each_calls: Mutex::default(),
            gate: Mutex::new(None),
            fail_flush: Default::default(),
        }
    }
}

impl<Q: UplinkQueue> UplinkQueue for Probe<Q> {
    fn append(&self, batch: Vec<NewRecord>) -> Result<Vec<u64>, QueueError> {
        let before = self.inner.flushes();
        let seqs = self.inner.append(batch)?;
        let mut map = self.flushes_at_append.lock().unwrap();
        for s in &seqs {
            map.insert(*s, before);
        }
        Ok(seqs)
    }
    fn append_each(
        &self,
        batch: Vec<NewRecord>,
    ) -> Result<Vec<Result<u64, QueueError>>, QueueError> {
        self.append_each_calls.lock().unwrap().push(batch.len());
        // The trait's default: one record at a time through `append` (recorded above).
        let mut out = Vec::new();
        for r in batch {
            match self.append(vec![r]) {
                Ok(seqs) => out.push(Ok(seqs[0])),
                Err(e) if e.refuses_only_the_batch() => out.push(Err(e)),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
    fn flush(&self) -> Result<(), QueueError> {
        let gate = self.gate.lock().unwrap().take();
        if let Some((entered, release)) = gate {
            entered.send(()).unwrap();
            release.recv().unwrap();
        }
        if self.fail_flush.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(QueueError::Io {
                path: "/probe".into(),
                source: std::io::Error::other("disk on fire"),
            });
        }
        self.inner.flush()
    }
    fn peek(&self, after: Option<u64>, limit: usize) -> Result<Vec<StoredRecord>, QueueError> {
        self.inner.peek(after, limit)
    }
    fn ack(&self, seq: u64) -> Result<bool, QueueError> {
        self.inner.ack(seq)
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn bytes(&self) -> u64 {
        self.inner.bytes()
    }
    fn oldest(&self) -> Result<Option<(u64, u64)>, QueueError> {
        self.inner.oldest()
    }
    fn drops(&self) -> u64 {
        self.inner.drops()
    }
    fn flushes(&self) -> u64 {
        self.inner.flushes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_share_flushes_and_resolve_only_when_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue");
    let (q, _) = open(&path, Durability::Flush);
    let probe = Arc::new(Probe::new(q));
    let committed = Arc::new(Notify::new());
    let gc = GroupCommit::start(
        probe.clone(),
        GroupCommitOptions::default(),
        committed.clone(),
    );
    let mut tasks = Vec::new();
    for t in 0..200u64 {
        let gc = gc.clone();
        let probe = probe.clone();
        tasks.push(tokio::spawn(async move {
            let seqs = gc
                .submit(vec![rec(&format!("s{}", t % 10), t)])
                .await
                .unwrap();
            // At resolution, a flush has completed since the append.
            let at_append = probe.flushes_at_append.lock().unwrap()[&seqs[0]];
            assert!(
                probe.flushes() > at_append,
                "answered before a flush covered seq {}",
                seqs[0]
            );
            // And the uplink can already see it.
            let visible = probe.peek(Some(seqs[0] - 1), 1).unwrap();
            assert_eq!(visible[0].seq, seqs[0]);
            seqs[0]
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 200);
    let flushes = probe.flushes();
    println!("200 concurrent submissions: {flushes} flushes");
    assert!((1..=40).contains(&flushes), "{flushes} flushes");
    // The uplink was told.
    tokio::time::timeout(Duration::from_secs(1), committed.notified())
        .await
        .unwrap();

    drop(gc);
    drop(probe);
    let (q, report) = tokio::task::spawn_blocking(move || open(&path, Durability::Flush))
        .await
        .unwrap();
    assert_eq!(report.records, 200);
    let stored: Vec<u64> = q.peek(None, 1000).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(stored, seqs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_submissions_keep_their_order() {
    let q = Arc::new(MemoryQueue::default());
    let gc = GroupCommit::start(
        q.clone(),
        GroupCommitOptions::default(),
        Arc::new(Notify::new()),
    );
    let mut last = 0;
    for i in 0..50 {
        let s = gc
            .submit(vec![rec("a", 2 * i), rec("a", 2 * i + 1)])
            .await
            .unwrap();
        assert_eq!(s, vec![last + 1, last + 2]);
        last = s[1];
    }
    assert_eq!(gc.submit(vec![]).await.unwrap(), Vec::<u64>::new());
    let values: Vec<u64> = q
        .peek(None, 1000)
        .unwrap()
        .iter()
        .map(|r| match &r.payload {
            Payload::Json(v) => v["i"].as_u64().unwrap(),
            Payload::Bytes(_) => unreachable!(),
        })
        .collect();
    assert_eq!(values, (0..100).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_waiting_submissions_are_busy_at_once() {
    let probe = Arc::new(Probe::new(MemoryQueue::default()));
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    *probe.gate.lock().unwrap() = Some((entered_tx, release_rx));
    let gc = GroupCommit::start(
        probe.clone(),
        GroupCommitOptions {
            max_waiting: 2,
            ..GroupCommitOptions::default()
        },
        Arc::new(Notify::new()),
    );
    // The first round is flushing (held at the gate)...
    let first = tokio::spawn(gc.submit(vec![rec("a", 0)]));
    tokio::task::spawn_blocking(move || entered_rx.recv().unwrap())
        .await
        .unwrap();
    // ...two more may wait for the next round...
    let second = tokio::spawn(gc.submit(vec![rec("a", 1)]));
    let third = tokio::spawn(gc.submit(vec![rec("a", 2)]));
    // ...and the fourth is refused without waiting.
    let started = Instant::now();
    let err = gc.submit(vec![rec("a", 3)]).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(matches!(err, QueueError::Busy { max_waiting: 2 }), "{err}");
    assert!(!first.is_finished(), "answered before its flush");
    release_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap(), vec![1]);
    assert_eq!(second.await.unwrap().unwrap(), vec![2]);
    assert_eq!(third.await.unwrap().unwrap(), vec![3]);
    assert_eq!(probe.flushes(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_the_right_submitters() {
    let probe = Arc::new(Probe::new(MemoryQueue::default()));
    let gc = GroupCommit::start(
        probe.clone(),
        GroupCommitOptions::default(),
        Arc::new(Notify::new()),
    );
    // An invalid record fails its own submission only.
    let bad = NewRecord {
        series: "a/+".into(),
        ..rec("a", 0)
    };
    let (good, bad) = tokio::join!(gc.submit(vec![rec("a", 0)]), gc.submit(vec![bad]));
    assert!(good.is_ok());
    assert!(
        matches!(bad, Err(QueueError::InvalidRecord { index: 0, .. })),
        "{bad:?}"
    );
    // A failed flush fails everyone in the round: nobody is told "accepted".
    probe
        .fail_flush
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = gc.submit(vec![rec("a", 1)]).await.unwrap_err();
    assert!(matches!(err, QueueError::NotDurable { .. }), "{err}");
    assert!(err.to_string().contains("disk on fire"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_each_answers_each_record_in_call_order() {
    let probe = Arc::new(Probe::new(MemoryQueue::default()));
    let gc = GroupCommit::start(
        probe.clone(),
        GroupCommitOptions::default(),
        Arc::new(Notify::new()),
    );
    // Queued when called: the second call is stored after the first even though nothing
    // has been awaited yet.
    let first = gc.submit_each(vec![
        rec("a", 0),
        NewRecord {
            series: "a/+".into(),
            ..rec("a", 1)
        },
        rec("a", 2),
    ]);
    let second = gc.submit_each(vec![rec("a", 3)]);
    let (first, second) = tokio::join!(first, second);
    let first = first.unwrap();
    assert_eq!(first[0].as_ref().unwrap(), &1);
    assert!(
        matches!(first[1], Err(QueueError::InvalidRecord { index: 0, .. })),
        "{:?}",
        first[1]
    );
    assert_eq!(first[2].as_ref().unwrap(), &2);
    assert_eq!(
        second
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect::<Vec<_>>(),
        vec![3]
    );
    // Answered only after a flush covered them.
    let at_append = probe.flushes_at_append.lock().unwrap()[&3];
    assert!(probe.flushes() > at_append);
    assert!(gc.submit_each(Vec::new()).await.unwrap().is_empty());
    // A failed flush: every record stored in the round is "not durable", a refused one keeps
    // its own error.
    probe
        .fail_flush
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let got = gc
        .submit_each(vec![
            rec("a", 4),
            NewRecord {
                series: "".into(),
                ..rec("a", 5)
            },
        ])
        .await
        .unwrap();
    assert!(
        matches!(got[0], Err(QueueError::NotDurable { .. })),
        "{:?}",
        got[0]
    );
    assert!(
        matches!(got[1], Err(QueueError::InvalidRecord { .. })),
        "{:?}",
        got[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_appends_single_records_and_batches_together() {
    let probe = Arc::new(Probe::new(MemoryQueue::default()));
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    *probe.gate.lock().unwrap() = Some((entered_tx, release_rx));
    let gc = GroupCommit::start(
        probe.clone(),
        GroupCommitOptions::default(),
        Arc::new(Notify::new()),
    );
    // The first round is held in its flush while the next one gathers.
    let first = tokio::spawn(gc.submit(vec![rec("a", 0)]));
    tokio::task::spawn_blocking(move || entered_rx.recv().unwrap())
        .await
        .unwrap();
    let single = tokio::spawn(gc.submit(vec![rec("a", 1)]));
    let each = tokio::spawn(gc.submit_each(vec![rec("a", 2), rec("a", 3)]));
    let whole = tokio::spawn(gc.submit(vec![rec("a", 4), rec("a", 5)]));
    let after = tokio::spawn(gc.submit(vec![rec("a", 6)]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    release_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap(), vec![1]);
    assert_eq!(single.await.unwrap().unwrap(), vec![2]);
    let each: Vec<u64> = each
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(each, vec![3, 4]);
    assert_eq!(whole.await.unwrap().unwrap(), vec![5, 6]);
    assert_eq!(after.await.unwrap().unwrap(), vec![7]);
    // Round one: the first record. Round two: the single record and the batch together,
    // then the multi-record `submit` on its own, then the last single record.
    assert_eq!(*probe.append_each_calls.lock().unwrap(), vec![1, 3, 1]);
    assert_eq!(probe.flushes(), 2);
}

/// Records/s through group commit with 8 producers that each wait for "accepted" before
/// sending the next record, in both durability modes:
/// `cargo test -p bulwark-agent --lib group_commit_rate -- --ignored --nocapture`
/// (`BULWARK_BENCH_DIR` picks the disk).
#[test]
#[ignore = "measurement, prints figures"]
fn group_commit_rate() {
    const RECORDS: u64 = 100_000;
    for producers in [8u64, 64] {
        for durability in [Durability::Flush, Durability::Fsync] {
            let base = std::env::var_os("BULWARK_BENCH_DIR").map(std::path::PathBuf::from);
            let dir = match &base {
                Some(b) => tempfile::tempdir_in(b).unwrap(),
                None => tempfile::tempdir().unwrap(),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let (rate, flushes) = rt.block_on(async {
                let (q, _) = open(&dir.path().join("queue"), durability);
                let q: Arc<dyn UplinkQueue> = Arc::new(q);
                let gc = GroupCommit::start(
                    q.clone(),
                    GroupCommitOptions::default(),
                    Arc::new(Notify::new()),
                );
                let start = Instant::now();
                let mut tasks = Vec::new();
                for p in 0..producers {
                    let gc = gc.clone();
                    tasks.push(tokio::spawn(async move {
                        let series = format!("line{p}/temp");
                        for i in 0..RECORDS / producers {
                            let r = NewRecord {
                                series: series.clone(),
                                ts_ms: 1_795_773_600_000 + i,
                                payload: Payload::Json(json!({ "c": 21.5, "i": i })),
                            };
                            gc.submit(vec![r]).await.unwrap();
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                let secs = start.elapsed().as_secs_f64();
                (q.len() as f64 / secs, q.flushes())
            });
            println!(
                "{producers} producers, {durability:?}: {rate:.0} records/s, {flushes} flushes ({:.1} records per flush)",
                RECORDS as f64 / flushes as f64
            );
        }
    }
}
