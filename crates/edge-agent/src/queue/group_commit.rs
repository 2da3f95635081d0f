//! [`GroupCommit`]: many producers, one flush per round.
//!
//! Submissions go into a bounded channel. One task takes everything waiting in it (up to
//! [`GroupCommitOptions::max_round_records`]), appends each submission in arrival order, flushes
//! once, and only then answers every submitter. While a round is being flushed, the next
//! one gathers in the channel, so the number of flushes grows with time, not with records.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use super::{NewRecord, QueueError, UplinkQueue};

/// Bounds of [`GroupCommit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommitOptions {
    /// Submissions that may wait for the next round; beyond that, [`GroupCommit::submit`]
    /// fails at once with [`QueueError::Busy`]. Default 1024.
    pub max_waiting: usize,
    /// A round stops taking submissions once it holds this many records. Default 16384.
    pub max_round_records: usize,
}

impl Default for GroupCommitOptions {
    fn default() -> Self {
        GroupCommitOptions {
            max_waiting: 1024,
            max_round_records: 16384,
        }
    }
}

struct Submission {
    records: Vec<NewRecord>,
    reply: oneshot::Sender<Result<Vec<u64>, QueueError>>,
}

/// Handle to the commit task. Cheap to clone; the task stops when the last handle is
/// dropped (after finishing its round).
#[derive(Debug, Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Submission>,
    max_waiting: usize,
}

impl GroupCommit {
    /// Starts the commit task on the current tokio runtime. `committed` is notified
    /// (`notify_one`) after every round that made records durable: the uplink waits on it,
    /// since [`UplinkQueue::peek`] only shows durable records.
    pub fn start(
        queue: Arc<dyn UplinkQueue>,
        options: GroupCommitOptions,
        committed: Arc<Notify>,
    ) -> GroupCommit {
        let max_waiting = options.max_waiting.max(1);
        let (tx, rx) = mpsc::channel(max_waiting);
        tokio::spawn(run(queue, rx, options.max_round_records.max(1), committed));
        GroupCommit { tx, max_waiting }
    }

    /// Queues `records` for the next round. Resolves to their sequence numbers once they
    /// are durable, or to the error that kept them from being stored or made durable. Fails
    /// at once ([`QueueError::Busy`]) when `max_waiting` submissions are already waiting;
    /// the call itself never blocks.
    pub fn submit(
        &self,
        records: Vec<NewRecord>,
    ) -> impl Future<Output = Result<Vec<u64>, QueueError>> + Send + 'static {
        let pending = if records.is_empty() {
            Ok(None)
        } else {
            let (reply, rx) = oneshot::channel();
            match self.tx.try_send(Submission { records, reply }) {
                Ok(()) => Ok(Some(rx)),
                Err(mpsc::error::TrySendError::Full(_)) => Err(QueueError::Busy {
                    max_waiting: self.max_waiting,
                }),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(QueueError::Closed),
            }
        };
        async move {
            match pending? {
                None => Ok(Vec::new()),
                Some(rx) => rx.await.unwrap_or(Err(QueueError::Closed)),
            }
        }
    }
}

async fn run(
    queue: Arc<dyn UplinkQueue>,
    mut rx: mpsc::Receiver<Submission>,
    max_round_records: usize,
    committed: Arc<Notify>,
) {
    while let Some(first) = rx.recv().await {
        let mut records = first.records.len();
        let mut round = vec![first];
        while records < max_round_records {
            match rx.try_recv() {
                Ok(s) => {
                    records += s.records.len();
                    round.push(s);
                }
                Err(_) => break,
            }
        }
        let q = queue.clone();
        match tokio::task::spawn_blocking(move || commit(&*q, round)).await {
            Ok(true) => committed.notify_one(),
            Ok(false) => {}
            // The submitters see their reply dropped: QueueError::Closed.
            Err(e) => tracing::error!(error = %e, "queue commit round failed"),
        }
    }
}

/// Appends every submission of the round, flushes once, answers. Returns whether records
/// were made durable.
fn commit(queue: &dyn UplinkQueue, round: Vec<Submission>) -> bool {
    let mut answers = Vec::with_capacity(round.len());
    let mut appended = false;
    for s in round {
        let result = queue.append(s.records);
        appended |= result.is_ok();
        answers.push((s.reply, result));
    }
    if appended {
        crate::crash_point::hit(crate::crash_point::Phase::Received);
    }
    let flushed = if appended { queue.flush() } else { Ok(()) };
    if appended && flushed.is_ok() {
        crate::crash_point::hit(crate::crash_point::Phase::Flushed);
    }
    if let Err(e) = &flushed {
        tracing::error!(error = %e, "flushing the queue failed; producers are told their records were not accepted");
    }
    for (reply, result) in answers {
        let answer = match (&flushed, result) {
            (Err(e), Ok(_)) => Err(QueueError::NotDurable {
                detail: e.to_string(),
            }),
            (_, result) => result,
        };
        let _ = reply.send(answer);
    }
    appended && flushed.is_ok()
}

#[cfg(test)]
mod tests;
