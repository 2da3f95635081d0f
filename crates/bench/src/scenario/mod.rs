//! The six scenarios and what they share: the [`Run`] context (target, deadline, labels,
//! broker pid), connecting many clients, and the finishing of a result line.
//!
//! - [`flow`]: the publisher and subscriber loops of the message scenarios.
//! - [`fan`]: fan-in and fan-out throughput.
//! - [`latency`]: paced publishing and latency percentiles.
//! - [`retained`]: retained delivery to new subscribers.
//! - [`connections`]: conn-scale (memory per connection) and handshake (setup rate).

pub mod connections;
pub mod fan;
pub mod flow;
pub mod latency;
pub mod retained;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bulwark_protocol::packet::{Packet, QoS, SubAck, Subscribe, SubscribeReturnCode};
use bulwark_protocol::topic::TopicFilter;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{Conn, Target};
use crate::report::{round3, Common};
use crate::sysstat::{self, CpuUse};
use crate::wire::Incoming;

/// How long a receiver waits for more deliveries after the publishers are done.
pub const IDLE_AFTER_PUBLISH: Duration = Duration::from_secs(5);

/// Connects made at once while setting up clients for a message scenario.
const SETUP_CONCURRENCY: usize = 64;

/// Everything a scenario needs besides its own arguments.
pub struct Run {
    pub target: Arc<Target>,
    /// The overall --max-seconds deadline.
    pub deadline: Instant,
    pub label: String,
    pub broker_pid: Option<u32>,
    pub client_prefix: String,
}

impl Run {
    /// `<prefix>-<role>-<i>-<pid>`: unique per process.
    pub fn client_id(&self, role: &str, i: usize) -> String {
        format!("{}-{role}-{i}-{}", self.client_prefix, std::process::id())
    }

    /// The common fields of the result line; reads the broker's RSS now.
    pub fn common(
        &self,
        scenario: &'static str,
        qos: Option<u8>,
        duration: Duration,
        cpu: CpuUse,
        timed_out: bool,
    ) -> Common {
        Common {
            scenario,
            broker: self.label.clone(),
            transport: self.target.transport(),
            qos,
            duration_s: round3(duration.as_secs_f64()),
            gen_cpu_pct: round3(cpu.gen_pct),
            broker_cpu_pct: cpu.broker_pct.map(round3),
            broker_rss_kb: self.broker_pid.and_then(|p| sysstat::rss_kb(p).ok()),
            timed_out,
        }
    }

    /// Connects `n` clients `<prefix>-<role>-<i>-<pid>`, each subscribed to `filter` when
    /// given, at most [`SETUP_CONCURRENCY`] at a time. Returned in index order.
    pub async fn connect_clients(
        &self,
        role: &'static str,
        n: usize,
        filter: Option<(&str, QoS)>,
    ) -> Result<Vec<Conn>> {
        let filter = match filter {
            Some((f, qos)) => Some((
                TopicFilter::new(f).map_err(|e| anyhow!("filter {f}: {e}"))?,
                qos,
            )),
            None => None,
        };
        let results = bounded(n, SETUP_CONCURRENCY, self.deadline, |i| {
            let target = self.target.clone();
            let id = self.client_id(role, i);
            let filter = filter.clone();
            async move {
                let mut conn = target
                    .connect(id.clone())
                    .await
                    .with_context(|| format!("client {id}"))?;
                if let Some((filter, qos)) = filter {
                    subscribe(&mut conn, filter, qos)
                        .await
                        .with_context(|| format!("client {id}"))?;
                }
                Ok((i, conn))
            }
        })
        .await;
        if results.timed_out {
            return Err(DeadlineDuringSetup.into());
        }
        let mut conns: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
        for r in results.done {
            let (i, conn) = r?;
            conns[i] = Some(conn);
        }
        Ok(conns.into_iter().flatten().collect())
    }
}

/// The deadline passed before all clients were connected: the scenario reports an
/// empty, timed-out result.
#[derive(Debug)]
pub struct DeadlineDuringSetup;

impl std::fmt::Display for DeadlineDuringSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("--max-seconds ran out while connecting clients")
    }
}

impl std::error::Error for DeadlineDuringSetup {}

/// Whether `e` is a [`DeadlineDuringSetup`].
pub fn is_setup_timeout(e: &anyhow::Error) -> bool {
    e.downcast_ref::<DeadlineDuringSetup>().is_some()
}

/// Sends SUBSCRIBE (packet id 1) and waits for a SUBACK granting it.
pub async fn subscribe(conn: &mut Conn, filter: TopicFilter, qos: QoS) -> Result<()> {
    conn.queue(&subscribe_packet(filter, qos))?;
    conn.send().await?;
    loop {
        match conn.recv().await? {
            Incoming::Other(Packet::SubAck(ack)) => return check_suback(&ack),
            Incoming::Other(Packet::PingResp) => {}
            other => return Err(anyhow!("expected SUBACK, got {other:?}")),
        }
    }
}

pub fn subscribe_packet(filter: TopicFilter, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid: 1,
        filters: vec![(filter, qos)],
    })
}

pub fn check_suback(ack: &SubAck) -> Result<()> {
    match ack.return_codes.first() {
        Some(SubscribeReturnCode::Success(_)) => Ok(()),
        _ => Err(anyhow!(
            "the broker refused the subscription (SUBACK {:?}); check its ACL for the \
             bench user",
            ack.return_codes
        )),
    }
}

/// What [`bounded`] returns.
pub struct Bounded<T> {
    /// Results of the jobs that finished, in completion order.
    pub done: Vec<Result<T>>,
    /// Jobs started but not finished when the deadline passed.
    pub unfinished: usize,
    pub timed_out: bool,
}

/// Runs `job(0..n)` as tasks, at most `concurrency` at a time, until all finish or the
/// deadline passes (then the unfinished ones are aborted).
pub async fn bounded<T, F, Fut>(
    n: usize,
    concurrency: usize,
    deadline: Instant,
    job: F,
) -> Bounded<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
{
    let mut set = JoinSet::new();
    let mut next = 0;
    let mut done = Vec::with_capacity(n);
    let expired = tokio::time::sleep_until(deadline);
    tokio::pin!(expired);
    loop {
        while next < n && set.len() < concurrency.max(1) {
            set.spawn(job(next));
            next += 1;
        }
        tokio::select! {
            joined = set.join_next() => match joined {
                None => break,
                Some(Ok(r)) => done.push(r),
                Some(Err(e)) => done.push(Err(anyhow!("task failed: {e}"))),
            },
            _ = &mut expired => {
                let unfinished = set.len();
                set.abort_all();
                return Bounded { done, unfinished, timed_out: true };
            }
        }
    }
    Bounded {
        done,
        unfinished: 0,
        timed_out: false,
    }
}

/// Splits `total` over `parts` as evenly as possible (the first ones get the remainder).
pub fn split_evenly(total: u64, parts: usize) -> Vec<u64> {
    let parts_u = parts.max(1) as u64;
    (0..parts as u64)
        .map(|i| total / parts_u + u64::from(i < total % parts_u))
        .collect()
}

/// Prints a progress line to stderr.
pub fn progress(msg: impl std::fmt::Display) {
    eprintln!("bulwark-bench: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_the_total() {
        assert_eq!(split_evenly(10, 3), vec![4, 3, 3]);
        assert_eq!(split_evenly(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(split_evenly(200_000, 10).iter().sum::<u64>(), 200_000);
        assert!(split_evenly(5, 0).is_empty());
    }

    #[tokio::test]
    async fn bounded_respects_concurrency_and_deadline() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let far = Instant::now() + Duration::from_secs(30);
        let r = bounded(20, 3, far, |i| {
            let (live, peak) = (live.clone(), peak.clone());
            async move {
                let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                live.fetch_sub(1, Ordering::SeqCst);
                Ok(i)
            }
        })
        .await;
        assert!(!r.timed_out);
        assert_eq!(r.done.len(), 20);
        assert!(peak.load(Ordering::SeqCst) <= 3);

        let soon = Instant::now() + Duration::from_millis(20);
        let r = bounded(5, 2, soon, |_| async {
            std::future::pending::<()>().await;
            Ok(())
        })
        .await;
        assert!(r.timed_out);
        assert_eq!((r.done.len(), r.unfinished), (0, 2));
    }
}
