//! [`MemoryQueue`]: the [`UplinkQueue`] contract without a disk, for tests of the modules that
//! use the queue (uplink, ingest, health). Nothing survives the process.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{
    record, unix_ms, NewRecord, QueueError, QueueOptions, StoredRecord, UplinkQueue, WhenFull,
};

/// In-memory [`UplinkQueue`] with the same sequence, visibility (only flushed records are
/// peeked) and budget rules as [`super::SledQueue`].
#[derive(Debug)]
pub struct MemoryQueue {
    options: QueueOptions,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// seq → (record, accounted bytes)
    records: BTreeMap<u64, (StoredRecord, u64)>,
    next_seq: u64,
    durable_below: u64,
    bytes: u64,
    drops: u64,
    flushes: u64,
}

impl MemoryQueue {
    /// Starts empty, with the first `seq` = 1. Only `max_bytes` and `when_full` of the
    /// options apply.
    pub fn new(options: QueueOptions) -> MemoryQueue {
        MemoryQueue {
            options,
            state: Mutex::new(State {
                next_seq: 1,
                durable_below: 1,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        MemoryQueue::new(QueueOptions::default())
    }
}

impl UplinkQueue for MemoryQueue {
    fn append(&self, batch: Vec<NewRecord>) -> Result<Vec<u64>, QueueError> {
        let enqueued_ms = unix_ms();
        let mut st = self.state();
        let mut staged = Vec::with_capacity(batch.len());
        let mut incoming = 0;
        for (index, (r, seq)) in batch.into_iter().zip(st.next_seq..).enumerate() {
            let stored = StoredRecord {
                seq,
                series: r.series,
                ts_ms: r.ts_ms,
                enqueued_ms,
                payload: r.payload,
            };
            let len = record::encode(&stored)
                .map_err(|reason| QueueError::InvalidRecord { index, reason })?
                .len();
            let size = StoredRecord::accounted_bytes(len);
            incoming += size;
            staged.push((stored, size));
        }
        let max_bytes = self.options.max_bytes;
        if incoming > max_bytes {
            return Err(QueueError::BatchTooLarge {
                bytes: incoming,
                max_bytes,
            });
        }
        while st.bytes + incoming > max_bytes {
            if self.options.when_full == WhenFull::RejectNew {
                return Err(QueueError::Full {
                    bytes: st.bytes,
                    max_bytes,
                });
            }
            match st.records.pop_first() {
                Some((_, (_, size))) => {
                    st.bytes -= size;
                    st.drops += 1;
                }
                None => break,
            }
        }
        let mut seqs = Vec::with_capacity(staged.len());
        for (r, size) in staged {
            seqs.push(r.seq);
            st.next_seq = r.seq + 1;
            st.bytes += size;
            st.records.insert(r.seq, (r, size));
        }
        Ok(seqs)
    }

    fn flush(&self) -> Result<(), QueueError> {
        let mut st = self.state();
        st.durable_below = st.next_seq;
        st.flushes += 1;
        Ok(())
    }

    fn peek(&self, after: Option<u64>, limit: usize) -> Result<Vec<StoredRecord>, QueueError> {
        let st = self.state();
        let start = match after {
            Some(a) => match a.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
            None => 0,
        };
        if start >= st.durable_below {
            return Ok(Vec::new());
        }
        Ok(st
            .records
            .range(start..st.durable_below)
            .take(limit)
            .map(|(_, (r, _))| r.clone())
            .collect())
    }

    fn ack(&self, seq: u64) -> Result<bool, QueueError> {
        let mut st = self.state();
        match st.records.remove(&seq) {
            Some((_, size)) => {
                st.bytes -= size;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn len(&self) -> u64 {
        self.state().records.len() as u64
    }

    fn bytes(&self) -> u64 {
        self.state().bytes
    }

    fn oldest(&self) -> Result<Option<(u64, u64)>, QueueError> {
        Ok(self
            .state()
            .records
            .first_key_value()
            .map(|(seq, (r, _))| (*seq, r.enqueued_ms)))
    }

    fn drops(&self) -> u64 {
        self.state().drops
    }

    fn flushes(&self) -> u64 {
        self.state().flushes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Payload;

    fn rec(i: u64) -> NewRecord {
        NewRecord {
            series: "s".into(),
            ts_ms: i,
            payload: Payload::Bytes(vec![0; 10]),
        }
    }

    #[test]
    fn same_contract_as_the_sled_queue() {
        let one = StoredRecord::accounted_bytes(
            record::encode(&StoredRecord {
                seq: 1,
                series: "s".into(),
                ts_ms: 0,
                enqueued_ms: 0,
                payload: Payload::Bytes(vec![0; 10]),
            })
            .unwrap()
            .len(),
        );
        let q = MemoryQueue::new(QueueOptions {
            max_bytes: one * 3,
            ..QueueOptions::default()
        });
        assert_eq!(q.append(vec![rec(1), rec(2)]).unwrap(), vec![1, 2]);
        assert!(q.peek(None, 10).unwrap().is_empty(), "not flushed yet");
        q.flush().unwrap();
        assert_eq!(q.peek(Some(1), 10).unwrap()[0].seq, 2);
        assert_eq!(q.append(vec![rec(3), rec(4)]).unwrap(), vec![3, 4]);
        assert_eq!((q.len(), q.drops(), q.bytes()), (3, 1, one * 3));
        assert_eq!(q.oldest().unwrap().map(|o| o.0), Some(2));
        assert!(q.ack(2).unwrap());
        assert!(!q.ack(2).unwrap());
        assert!(matches!(
            q.append(vec![rec(5), rec(6), rec(7), rec(8)]),
            Err(QueueError::BatchTooLarge { .. })
        ));
        let bad = NewRecord {
            series: "a/#".into(),
            ..rec(9)
        };
        assert!(matches!(
            q.append(vec![bad]),
            Err(QueueError::InvalidRecord { index: 0, .. })
        ));
    }
}
