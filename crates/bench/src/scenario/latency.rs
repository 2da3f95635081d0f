//! latency: one publisher on a fixed schedule, one subscriber timing every delivery
//! against the send time in its payload.

use anyhow::{anyhow, Result};
use serde::Serialize;

use super::fan::{drive, payload_len, qos_of, Sender};
use super::flow::PublishPlan;
use super::{is_setup_timeout, progress, Run};
use crate::cli::LatencyArgs;
use crate::percentile::{mean, nearest_rank};
use crate::report::{json_line, round3};
use crate::sysstat::CpuUse;
use crate::tally::{DeliveryTally, LossSummary};
use crate::wire::PublishTemplate;

#[derive(Debug, Serialize)]
struct LatencyFields {
    sent: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
    max_us: Option<f64>,
    mean_us: Option<f64>,
}

/// Latency percentiles in microseconds from samples in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencyStats {
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub max_us: Option<f64>,
    pub mean_us: Option<f64>,
}

impl LatencyStats {
    /// Sorts `samples_ns` and reads the exact percentiles from it.
    pub fn from_ns(samples_ns: &mut [u64]) -> LatencyStats {
        samples_ns.sort_unstable();
        let us = |ns: Option<u64>| ns.map(|v| round3(v as f64 / 1000.0));
        LatencyStats {
            p50_us: us(nearest_rank(samples_ns, 50.0)),
            p99_us: us(nearest_rank(samples_ns, 99.0)),
            p999_us: us(nearest_rank(samples_ns, 99.9)),
            max_us: us(samples_ns.last().copied()),
            mean_us: mean(samples_ns).map(|m| round3(m / 1000.0)),
        }
    }
}

/// `bulwark-bench latency`.
pub async fn latency(run: &Run, args: &LatencyArgs) -> Result<String> {
    let qos = qos_of(args.qos.qos);
    let payload = payload_len(args.payload.payload);
    progress(format_args!(
        "latency: {} messages at {}/s, QoS {}, {payload} B",
        args.messages, args.rate, args.qos.qos
    ));
    let setup = async {
        let mut subs = run
            .connect_clients("sub", 1, Some(("bench/latency", qos)))
            .await?;
        let mut pubs = run.connect_clients("pub", 1, None).await?;
        let sub = subs.pop().ok_or_else(|| anyhow!("no subscriber"))?;
        let publisher = pubs.pop().ok_or_else(|| anyhow!("no publisher"))?;
        Ok::<_, anyhow::Error>((sub, publisher))
    };
    let (sub, publisher) = match setup.await {
        Ok(v) => v,
        Err(e) if is_setup_timeout(&e) => {
            progress(&e);
            let common = run.common(
                "latency",
                Some(args.qos.qos),
                Default::default(),
                CpuUse::default(),
                true,
            );
            return json_line(
                &common,
                &fields(LossSummary::default(), LatencyStats::default()),
            );
        }
        Err(e) => return Err(e),
    };
    let sender = Sender {
        conn: publisher,
        templates: vec![PublishTemplate::new("bench/latency", qos, false, payload)?],
        plan: PublishPlan {
            index: 0,
            count: args.messages,
            qos,
            window: 65535,
            stamp: true,
        },
        pace: Some(args.rate),
    };
    let tally = DeliveryTally::new(&[args.messages]);
    let mut driven = drive(run, vec![(sub, tally)], vec![sender], true).await?;
    let summary = driven.summary();
    let mut samples: Vec<u64> = driven
        .received
        .iter_mut()
        .flat_map(|r| std::mem::take(&mut r.latencies_ns))
        .collect();
    let stats = LatencyStats::from_ns(&mut samples);
    progress(format_args!(
        "latency: received {}/{} p50 {:?} us p99 {:?} us max {:?} us",
        summary.received, summary.sent, stats.p50_us, stats.p99_us, stats.max_us
    ));
    let common = run.common(
        "latency",
        Some(args.qos.qos),
        driven.duration,
        driven.cpu,
        driven.timed_out,
    );
    json_line(&common, &fields(summary, stats))
}

fn fields(summary: LossSummary, stats: LatencyStats) -> LatencyFields {
    LatencyFields {
        sent: summary.sent,
        received: summary.received,
        lost: summary.lost,
        duplicates: summary.duplicates,
        p50_us: stats.p50_us,
        p99_us: stats.p99_us,
        p999_us: stats.p999_us,
        max_us: stats.max_us,
        mean_us: stats.mean_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_in_microseconds() {
        let mut ns: Vec<u64> = (1..=1000).rev().map(|i| i * 1000).collect();
        let s = LatencyStats::from_ns(&mut ns);
        assert_eq!(s.p50_us, Some(500.0));
        assert_eq!(s.p99_us, Some(990.0));
        assert_eq!(s.p999_us, Some(999.0));
        assert_eq!(s.max_us, Some(1000.0));
        assert_eq!(s.mean_us, Some(500.5));
        assert_eq!(LatencyStats::from_ns(&mut []), LatencyStats::default());
    }
}
