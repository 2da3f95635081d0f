//! The device side of remote sessions (`[tunnel]`): the agent's glue around
//! [`bulwark_tunnel::device::DeviceTunnels`].
//!
//! - When `tunnel.enabled`, the uplink also subscribes (QoS 1) to
//!   `$tunnel/<device>/notify` after every CONNACK. A PUBLISH on exactly that topic is an
//!   offer; [`TunnelAgent::on_offer`] hands it to a task of its own, so the uplink's event
//!   loop never waits for a tunnel.
//! - That task runs [`DeviceTunnels::handle_offer`] with the agent's TLS client
//!   configuration (the device certificate and the broker CA, read afresh like for every
//!   uplink connection attempt; if that fails the offer is logged and ignored). The device
//!   only dials relays whose host is one of its configured brokers, and only connects
//!   streams to services in `[tunnel.services]`, which take loopback addresses and Unix
//!   sockets only.
//! - One [`DeviceTunnels`] lives as long as the agent (across reconnects), so its session
//!   limit (`tunnel.max_sessions`) holds across reconnects too. Beyond that, at most
//!   `max_sessions + 4` offers are handled at once (sessions and offers still being decided
//!   or refused); further offers are dropped without dialling anything, counted, and logged
//!   at power-of-two counts (`tunnel_offer_dropped`, audit target).
//! - Every [`DeviceEvent`] (open, refusal, close with duration and byte counts) is appended
//!   to the store-and-forward queue under the reserved series
//!   [`AUDIT_SERIES`] through the [`GroupCommit`], so it reaches
//!   the broker on `devices/<id>/audit` even after an outage or a restart. The record is a
//!   telemetry envelope (`"series":"$audit"`, with the agent's `seq`, so consumers drop
//!   duplicates by `(device, seq)` as for telemetry) whose `payload` is
//!   [`DeviceEvent::to_json`]. Appending never blocks: the submission is queued at once and a
//!   small task waits for it (and retries a few times while the commit queue is busy).
//!
//! Sessions still open when the agent stops end with the process; their close is then only
//! in the tunnel relay's audit.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bulwark_tunnel::device::{DeviceEvent, DeviceTunnels};

use crate::config::AgentConfig;
use crate::queue::{GroupCommit, NewRecord, Payload, QueueError, AUDIT_SERIES};

/// Offers handled at once beyond `tunnel.max_sessions` (offers being decided or refused).
pub const EXTRA_OFFERS_IN_PROGRESS: usize = 4;

/// Appends tunnel audit records to the queue.
#[derive(Debug, Clone)]
pub struct AuditSink {
    commit: GroupCommit,
}

/// Attempts at submitting one audit record while the commit queue is busy.
const AUDIT_ATTEMPTS: u32 = 5;

impl AuditSink {
    pub fn new(commit: GroupCommit) -> Self {
        AuditSink { commit }
    }

    /// The queue record of `event`.
    pub fn record(event: &DeviceEvent, ts_ms: u64) -> NewRecord {
        NewRecord {
            series: AUDIT_SERIES.to_string(),
            ts_ms,
            payload: Payload::Json(event.to_json()),
        }
    }

    /// Submits `event` without waiting (the submission is queued before this returns, so
    /// events keep their order); a spawned task waits for the flush and logs a failure.
    /// Must be called inside a tokio runtime.
    pub fn append(&self, event: &DeviceEvent) {
        let record = Self::record(event, crate::queue::unix_ms());
        let first = self.commit.submit(vec![record.clone()]);
        let commit = self.commit.clone();
        tokio::spawn(async move {
            let mut result = first.await;
            let mut attempt = 1;
            while matches!(result, Err(QueueError::Busy { .. })) && attempt < AUDIT_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                attempt += 1;
                result = commit.submit(vec![record.clone()]).await;
            }
            if let Err(e) = result {
                let event = match &record.payload {
                    Payload::Json(v) => v.to_string(),
                    Payload::Bytes(_) => String::new(),
                };
                tracing::error!(target: "audit", event = "tunnel_audit_lost", record = %event, error = %e,
                    "a tunnel audit record could not be queued; it is only in this log");
            }
        });
    }
}

/// The agent's tunnel side: one per agent, shared by every uplink session.
#[derive(Debug)]
pub struct TunnelAgent {
    tunnels: Arc<DeviceTunnels>,
    audit: AuditSink,
    notify_topic: String,
    in_progress: Arc<AtomicUsize>,
    max_in_progress: usize,
    dropped: AtomicU64,
}

impl TunnelAgent {
    /// `None` unless `tunnel.enabled`. Warns when the tunnel is enabled without services
    /// (every offer is then refused).
    pub fn new(cfg: &AgentConfig, commit: GroupCommit) -> Option<Arc<TunnelAgent>> {
        let t = &cfg.tunnel;
        if !t.enabled {
            return None;
        }
        if t.services.is_empty() {
            tracing::warn!(
                "tunnel.enabled = true but [tunnel.services] is empty: every tunnel offer will be refused"
            );
        }
        let relay_hosts: Vec<String> = cfg
            .broker_urls()
            .iter()
            .map(|u| u.host().to_string())
            .collect();
        tracing::info!(services = ?t.services.keys().collect::<Vec<_>>(), relays = ?relay_hosts, max_sessions = t.max_sessions, "tunnel enabled");
        Some(Arc::new(TunnelAgent {
            tunnels: Arc::new(DeviceTunnels::new(t.clone(), relay_hosts)),
            audit: AuditSink::new(commit),
            notify_topic: bulwark_tunnel::proto::notify_topic(&cfg.device_id),
            in_progress: Arc::new(AtomicUsize::new(0)),
            max_in_progress: t.max_sessions.saturating_add(EXTRA_OFFERS_IN_PROGRESS),
            dropped: AtomicU64::new(0),
        }))
    }

    /// `$tunnel/<device>/notify`.
    pub fn notify_topic(&self) -> &str {
        &self.notify_topic
    }

    /// Sessions open now.
    pub fn active_sessions(&self) -> usize {
        self.tunnels.active_sessions()
    }

    /// Offers being handled now (including open sessions).
    pub fn offers_in_progress(&self) -> usize {
        self.in_progress.load(Ordering::SeqCst)
    }

    /// Handles an offer in a task of its own; returns at once. Returns false if the offer
    /// was dropped because too many are in progress.
    pub fn on_offer(&self, cfg: Arc<AgentConfig>, payload: Vec<u8>) -> bool {
        let Some(guard) = InProgress::take(&self.in_progress, self.max_in_progress) else {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(target: "audit", event = "tunnel_offer_dropped", dropped_total = n,
                    in_progress = self.max_in_progress,
                    "tunnel offer dropped: too many offers and sessions in progress");
            }
            return false;
        };
        let tunnels = self.tunnels.clone();
        let audit = self.audit.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let tls = match tokio::task::spawn_blocking(move || crate::uplink::tls_config(&cfg))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "tunnel offer ignored: cannot load the TLS material");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "tunnel offer ignored: loading the TLS material failed");
                    return;
                }
            };
            tunnels
                .handle_offer(&payload, tls, move |ev| audit.append(&ev))
                .await;
        });
        true
    }
}

/// One slot of the offers-in-progress count, released on drop.
#[derive(Debug)]
struct InProgress(Arc<AtomicUsize>);

impl InProgress {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<InProgress> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InProgress(count.clone()))
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{GroupCommitOptions, MemoryQueue, UplinkQueue};
    use tokio::sync::Notify;

    fn open_event() -> DeviceEvent {
        DeviceEvent::Open {
            session: "s1".into(),
            service: "ssh".into(),
            operator: "ops".into(),
        }
    }

    #[tokio::test]
    async fn events_are_queued_under_the_audit_series() {
        let queue: Arc<dyn UplinkQueue> = Arc::new(MemoryQueue::default());
        let wake = Arc::new(Notify::new());
        let commit = GroupCommit::start(queue.clone(), GroupCommitOptions::default(), wake);
        let sink = AuditSink::new(commit);
        sink.append(&open_event());
        sink.append(&DeviceEvent::Refused {
            session: "s2".into(),
            service: "web".into(),
            operator: "ops".into(),
            reason: "service_not_allowed".into(),
        });
        let mut records = Vec::new();
        for _ in 0..200 {
            records = queue.peek(None, 10).unwrap();
            if records.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(records.len(), 2);
        assert!(records.iter().all(|r| r.series == AUDIT_SERIES));
        assert_eq!(records[0].payload, Payload::Json(open_event().to_json()));
        let Payload::Json(second) = &records[1].payload else {
            panic!("not JSON")
        };
        assert_eq!(second["event"], "tunnel_refused");
        assert!(records[0].seq < records[1].seq);
    }

    #[test]
    fn the_audit_series_is_the_agents_alone() {
        use crate::ingest::{self, IngestLimits};
        // Producers: refused on the socket, by `send`, and for any other `$` series.
        for line in [
            r#"{"series":"$audit","payload":1}"#,
            r#"{"series":"$audit/x","payload":1}"#,
            r#"{"series":"$SYS/x","payload":1}"#,
        ] {
            let e = ingest::parse_line(line.as_bytes(), &IngestLimits::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("must not start with '$'"), "{line}: {e}");
        }
        assert!(ingest::request_from_args(AUDIT_SERIES, Some("1"), None, None).is_err());
        // The agent: the queue takes the reserved series, and no other `$` series.
        let queue = MemoryQueue::default();
        let record = AuditSink::record(&open_event(), 1_000);
        assert_eq!(queue.append(vec![record.clone()]).unwrap().len(), 1);
        for series in ["$other", "$audit/x", "$SYS/broker"] {
            let r = NewRecord {
                series: series.into(),
                ..record.clone()
            };
            assert!(
                matches!(queue.append(vec![r]), Err(QueueError::InvalidRecord { .. })),
                "{series}"
            );
        }
    }

    #[test]
    fn the_sled_queue_keeps_audit_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let record = AuditSink::record(&open_event(), 1_000);
        {
            let (q, _) = crate::queue::SledQueue::open(&path, Default::default()).unwrap();
            q.append(vec![record.clone()]).unwrap();
            q.flush().unwrap();
        }
        let (q, report) = crate::queue::SledQueue::open(&path, Default::default()).unwrap();
        assert!(report.moved_aside.is_none());
        let stored = q.peek(None, 10).unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].series, AUDIT_SERIES);
        assert_eq!(stored[0].payload, record.payload);
    }

    #[test]
    fn offers_in_progress_are_bounded() {
        let count = Arc::new(AtomicUsize::new(0));
        let a = InProgress::take(&count, 2).unwrap();
        let _b = InProgress::take(&count, 2).unwrap();
        assert!(InProgress::take(&count, 2).is_none());
        drop(a);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert!(InProgress::take(&count, 2).is_some());
    }
}
