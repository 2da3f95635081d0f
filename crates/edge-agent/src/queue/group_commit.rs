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

/// What [`GroupCommit::submit_each`] resolves to: an error for the whole submission, or
/// one result per record.
pub type EachResult = Result<Vec<Result<u64, QueueError>>, QueueError>;

struct Submission {
    records: Vec<NewRecord>,
    reply: ReplyTo,
}

enum ReplyTo {
    /// [`GroupCommit::submit`]: the records are one unit.
    Whole(oneshot::Sender<Result<Vec<u64>, QueueError>>),
    /// [`GroupCommit::submit_each`]: each record on its own.
    Each(oneshot::Sender<EachResult>),
}

enum Answer {
    Whole(
        oneshot::Sender<Result<Vec<u64>, QueueError>>,
        Result<Vec<u64>, QueueError>,
    ),
    Each(oneshot::Sender<EachResult>, EachResult),
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
        self.queue(records, ReplyTo::Whole)
    }

    /// Like [`GroupCommit::submit`], but each record is appended as if it were submitted
    /// alone (see [`UplinkQueue::append_each`]): one refused record does not refuse the
    /// others. Resolves once the accepted records are durable, to one result per record, or
    /// to an error for all of them (busy, a failed flush, an I/O error). The submission is
    /// queued when this is called, so calls are appended in call order.
    pub fn submit_each(
        &self,
        records: Vec<NewRecord>,
    ) -> impl Future<Output = EachResult> + Send + 'static {
        self.queue(records, ReplyTo::Each)
    }

    /// Queues `records` with a reply channel made by `reply_to`; resolves to the reply (an
    /// empty one for no records, without a round).
    fn queue<T: Default + Send + 'static>(
        &self,
        records: Vec<NewRecord>,
        reply_to: fn(oneshot::Sender<Result<T, QueueError>>) -> ReplyTo,
    ) -> impl Future<Output = Result<T, QueueError>> + Send + 'static {
        let pending = if records.is_empty() {
            Ok(None)
        } else {
            let (reply, rx) = oneshot::channel();
            self.send(Submission {
                records,
                reply: reply_to(reply),
            })
            .map(|()| Some(rx))
        };
        async move {
            match pending? {
                None => Ok(T::default()),
                Some(rx) => rx.await.unwrap_or(Err(QueueError::Closed)),
            }
        }
    }

    fn send(&self, s: Submission) -> Result<(), QueueError> {
        match self.tx.try_send(s) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(QueueError::Busy {
                max_waiting: self.max_waiting,
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(QueueError::Closed),
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
///
/// Consecutive submissions that take their records one by one (every
/// [`GroupCommit::submit_each`], and every [`GroupCommit::submit`] of a single record, for
/// which the two are the same) are appended together in one
/// [`UplinkQueue::append_each`]: the queue then stores the records of many producers in
/// shared groups. A [`GroupCommit::submit`] of several records is appended on its own.
fn commit(queue: &dyn UplinkQueue, round: Vec<Submission>) -> bool {
    let mut answers = Vec::with_capacity(round.len());
    let mut appended = false;
    let mut run = Run::default();
    for s in round {
        match s.reply {
            ReplyTo::Whole(reply) if s.records.len() != 1 => {
                appended |= run.append(queue, &mut answers);
                let result = queue.append(s.records);
                appended |= result.is_ok();
                answers.push(Answer::Whole(reply, result));
            }
            reply => {
                run.counts.push((reply, s.records.len()));
                run.records.extend(s.records);
            }
        }
    }
    appended |= run.append(queue, &mut answers);
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
    let not_durable = |e: &QueueError| QueueError::NotDurable {
        detail: e.to_string(),
    };
    for answer in answers {
        match answer {
            Answer::Whole(reply, result) => {
                let answer = match (&flushed, result) {
                    (Err(e), Ok(_)) => Err(not_durable(e)),
                    (_, result) => result,
                };
                let _ = reply.send(answer);
            }
            Answer::Each(reply, result) => {
                let answer = match (&flushed, result) {
                    (Err(e), Ok(each)) => Ok(each
                        .into_iter()
                        .map(|r| r.and_then(|_| Err(not_durable(e))))
                        .collect()),
                    (_, result) => result,
                };
                let _ = reply.send(answer);
            }
        }
    }
    appended && flushed.is_ok()
}

/// Submissions appended together, in order, with their record counts.
#[derive(Default)]
struct Run {
    counts: Vec<(ReplyTo, usize)>,
    records: Vec<NewRecord>,
}

impl Run {
    /// Appends the run (if any), queues the answers of its submissions; whether records were
    /// appended.
    fn append(&mut self, queue: &dyn UplinkQueue, answers: &mut Vec<Answer>) -> bool {
        if self.counts.is_empty() {
            return false;
        }
        let result = queue.append_each(std::mem::take(&mut self.records));
        let appended = result.as_ref().is_ok_and(|r| r.iter().any(Result::is_ok));
        let mut each = match result {
            Ok(each) => Ok(each.into_iter()),
            Err(e) => Err(e),
        };
        for (reply, n) in self.counts.drain(..) {
            let mine: Result<Vec<Result<u64, QueueError>>, QueueError> = match &mut each {
                Ok(each) => Ok(each.by_ref().take(n).collect()),
                Err(e) => Err(e.clone()),
            };
            answers.push(match reply {
                ReplyTo::Each(reply) => Answer::Each(reply, mine),
                ReplyTo::Whole(reply) => Answer::Whole(
                    reply,
                    mine.and_then(|one| one.into_iter().collect::<Result<Vec<u64>, _>>()),
                ),
            });
        }
        appended
    }
}

#[cfg(test)]
mod tests;
