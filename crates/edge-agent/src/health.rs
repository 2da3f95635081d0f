//! The gateway health report, published on `devices/<id>/health` every
//! `health.interval_secs` (and at every connect), and returned by the `health` command.
//!
//! ```json
//! {"v":1,"device":"gw-17","ts":"2026-11-27T10:00:00.000Z","agent_version":"0.1.0",
//!  "agent_uptime_secs":3600,
//!  "queue":{"records":12,"bytes":980,"max_bytes":1073741824,"oldest_age_secs":4.2,"drops":0},
//!  "uplink":{"broker":"mqtts://broker.example:8883","acked":5120,"reconnects":1},
//!  "exposure":{"exposed":[],"loopback_only":2},
//!  "host":{"cpu_percent":3.5,"load1":0.12,"mem_total_bytes":...,"mem_available_bytes":...,
//!          "disk_path":"/var/lib/bulwark-agent/queue","disk_total_bytes":...,
//!          "disk_available_bytes":...,"uptime_secs":86400}}
//! ```
//!
//! `exposure.exposed` lists the host's listening sockets that the network can reach (see
//! [`crate::exposure`]); on an edge gateway it should be empty. A figure that cannot be read
//! is `null` with the reason in `errors`, never a made-up value.

use std::path::PathBuf;
use std::time::Instant;

use bulwark_protocol::envelope::format_ts;
use serde::Serialize;
use serde_json::Value;

use crate::exposure::ExposureReport;
use crate::queue::UplinkQueue;
use crate::sources::{HostFigures, HostSampler};
use crate::uplink::UplinkStatus;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueFigures {
    pub records: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Seconds since the oldest queued record was accepted.
    pub oldest_age_secs: Option<f64>,
    /// Records dropped by the disk budget, ever.
    pub drops: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UplinkFigures {
    pub broker: Option<String>,
    pub acked: u64,
    pub reconnects: u64,
}

/// One health report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthReport {
    pub v: u32,
    pub device: String,
    pub ts: String,
    pub agent_version: &'static str,
    pub agent_uptime_secs: u64,
    pub queue: QueueFigures,
    pub uplink: UplinkFigures,
    pub exposure: Option<ExposureReport>,
    pub host: Option<HostFigures>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl HealthReport {
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Collects health reports; keeps the CPU sample between reports.
#[derive(Debug)]
pub struct HealthCollector {
    device: String,
    disk_path: PathBuf,
    max_bytes: u64,
    started: Instant,
    sampler: HostSampler,
}

impl HealthCollector {
    pub fn new(device: &str, disk_path: PathBuf, max_bytes: u64) -> HealthCollector {
        HealthCollector {
            device: device.to_string(),
            disk_path,
            max_bytes,
            started: Instant::now(),
            sampler: HostSampler::new(),
        }
    }

    pub fn report(&mut self, queue: &dyn UplinkQueue, uplink: &UplinkStatus) -> HealthReport {
        let now = crate::queue::unix_ms();
        let mut errors = Vec::new();
        let oldest_age_secs = match queue.oldest() {
            Ok(Some((_, enqueued))) => Some(now.saturating_sub(enqueued) as f64 / 1000.0),
            Ok(None) => None,
            Err(e) => {
                errors.push(format!("queue: {e}"));
                None
            }
        };
        let exposure = match ExposureReport::collect() {
            Ok(r) => {
                r.audit();
                Some(r)
            }
            Err(e) => {
                errors.push(format!("exposure: reading /proc/net: {e}"));
                None
            }
        };
        let host = match self.sampler.sample(&self.disk_path) {
            Ok(h) => Some(h),
            Err(e) => {
                errors.push(format!("host figures: {e}"));
                None
            }
        };
        HealthReport {
            v: 1,
            device: self.device.clone(),
            ts: format_ts(now),
            agent_version: env!("CARGO_PKG_VERSION"),
            agent_uptime_secs: self.started.elapsed().as_secs(),
            queue: QueueFigures {
                records: queue.len(),
                bytes: queue.bytes(),
                max_bytes: self.max_bytes,
                oldest_age_secs,
                drops: queue.drops(),
            },
            uplink: UplinkFigures {
                broker: uplink.broker.clone(),
                acked: uplink.acked,
                reconnects: uplink.reconnects,
            },
            exposure,
            host,
            errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{MemoryQueue, NewRecord, Payload, QueueOptions};

    #[test]
    fn report_carries_queue_figures_and_exposure() {
        let q = MemoryQueue::new(QueueOptions::default());
        q.append(vec![NewRecord {
            series: "a".into(),
            ts_ms: 1,
            payload: Payload::Json(serde_json::json!(1)),
        }])
        .unwrap();
        q.flush().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut c = HealthCollector::new("gw-1", dir.path().to_path_buf(), 1 << 20);
        let r = c.report(
            &q,
            &UplinkStatus {
                connected: true,
                broker: Some("mqtts://b:8883".into()),
                acked: 3,
                reconnects: 1,
            },
        );
        assert_eq!(r.device, "gw-1");
        assert_eq!(r.queue.records, 1);
        assert!(r.queue.oldest_age_secs.is_some());
        assert_eq!(r.uplink.acked, 3);
        assert!(r.exposure.is_some(), "{:?}", r.errors);
        let host = r.host.as_ref().expect("host figures");
        assert!(host.mem_total_bytes > 0);
        assert!(host.disk_total_bytes > 0);
        let v = r.to_json();
        assert_eq!(v["queue"]["drops"], 0);
        assert_eq!(v["uplink"]["broker"], "mqtts://b:8883");
    }
}
