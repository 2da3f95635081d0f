//! retained: how fast the broker delivers stored retained messages to clients that
//! subscribe all at once; the retained messages are cleared afterwards.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use bulwark_protocol::packet::{Packet, QoS};
use bulwark_protocol::topic::TopicFilter;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};

use super::fan::payload_len;
use super::flow::{publish_burst, receive, PublishPlan, ReceiveOutcome};
use super::{is_setup_timeout, progress, subscribe_packet, Run};
use crate::cli::RetainedArgs;
use crate::client::Conn;
use crate::report::{json_line, rate};
use crate::sysstat::{CpuMeter, CpuUse};
use crate::tally::{DeliveryTally, LossSummary};
use crate::wire::{Incoming, PublishTemplate};

/// Unacknowledged retained publishes in flight while storing or clearing them.
const STORE_WINDOW: usize = 256;

/// Time allowed to clear the retained messages, even after --max-seconds.
const CLEANUP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
struct RetainedFields {
    topics: u64,
    subscribers: u64,
    sent: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    msgs_per_s: f64,
}

/// `bulwark-bench retained`.
pub async fn retained(run: &Run, args: &RetainedArgs) -> Result<String> {
    let payload = payload_len(args.payload.payload);
    let topics = u64::from(args.topics);
    let n = args.subscribers as usize;
    progress(format_args!(
        "retained: {topics} retained topics, {n} subscribers on bench/retained/#, {payload} B"
    ));
    let setup = async {
        let subs = run.connect_clients("sub", n, None).await?;
        let mut pubs = run.connect_clients("pub", 1, None).await?;
        let publisher = pubs.pop().ok_or_else(|| anyhow!("no publisher"))?;
        Ok::<_, anyhow::Error>((subs, publisher))
    };
    let (subs, mut publisher) = match setup.await {
        Ok(v) => v,
        Err(e) if is_setup_timeout(&e) => {
            progress(&e);
            return line(
                run,
                args,
                LossSummary::default(),
                Duration::ZERO,
                CpuUse::default(),
                true,
            );
        }
        Err(e) => return Err(e),
    };
    let store: Vec<PublishTemplate> = (0..topics)
        .map(|i| {
            PublishTemplate::new(
                &format!("bench/retained/{i}"),
                QoS::AtLeastOnce,
                true,
                payload,
            )
        })
        .collect::<Result<_>>()?;
    let plan = PublishPlan {
        index: 0,
        count: topics,
        qos: QoS::AtLeastOnce,
        window: STORE_WINDOW,
        stamp: true,
    };
    let stored = publish_burst(&mut publisher, &store, plan, run.deadline).await?;
    let mut outcome = None;
    if !stored.timed_out && ping(&mut publisher, run.deadline).await? {
        progress(format_args!(
            "{topics} retained messages stored; subscribing"
        ));
        outcome = Some(deliver(run, subs, topics).await?);
    } else {
        for conn in subs {
            conn.disconnect().await;
        }
    }
    clear(
        &mut publisher,
        topics,
        run.deadline.max(Instant::now()) + CLEANUP_GRACE,
    )
    .await?;
    publisher.disconnect().await;

    let Some((received, duration, cpu, timed_out)) = outcome else {
        return line(
            run,
            args,
            LossSummary::default(),
            Duration::ZERO,
            CpuUse::default(),
            true,
        );
    };
    let mut summary = LossSummary::default();
    for r in &received {
        summary.add(&r.tally, &[stored.sent]);
    }
    if summary.unexpected > 0 {
        progress(format_args!(
            "{} deliveries were not retained messages of this run (left-overs on \
             bench/retained/# from an earlier run?)",
            summary.unexpected
        ));
    }
    line(run, args, summary, duration, cpu, timed_out)
}

/// Sends PINGREQ and waits for PINGRESP: the broker has handled everything sent before.
/// `false` when the deadline passed first.
async fn ping(conn: &mut Conn, deadline: Instant) -> Result<bool> {
    conn.queue(&Packet::PingReq)?;
    let round_trip = async {
        conn.send().await?;
        loop {
            match conn.recv().await? {
                Incoming::Other(Packet::PingResp) => return Ok(()),
                Incoming::Other(Packet::PubAck(_)) => {}
                other => bail!("expected PINGRESP, got {other:?}"),
            }
        }
    };
    match timeout_at(deadline, round_trip).await {
        Ok(r) => r.map(|()| true),
        Err(_) => Ok(false),
    }
}

/// The measured part: all subscribers subscribe at once and count retained deliveries.
async fn deliver(
    run: &Run,
    subs: Vec<Conn>,
    topics: u64,
) -> Result<(Vec<ReceiveOutcome>, Duration, CpuUse, bool)> {
    let deadline = run.deadline;
    let filter = TopicFilter::new("bench/retained/#").map_err(|e| anyhow!("{e}"))?;
    let (go_tx, go_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(None);
    let tasks: Vec<JoinHandle<Result<(ReceiveOutcome, Conn)>>> = subs
        .into_iter()
        .map(|mut conn| {
            let (mut go, done_rx, filter) = (go_rx.clone(), done_rx.clone(), filter.clone());
            tokio::spawn(async move {
                go.wait_for(|g| *g)
                    .await
                    .map_err(|_| anyhow!("start signal lost"))?;
                conn.queue(&subscribe_packet(filter, QoS::AtLeastOnce))?;
                conn.send().await?;
                let tally = DeliveryTally::new(&[topics]);
                let out = receive(&mut conn, tally, false, done_rx, deadline).await?;
                Ok((out, conn))
            })
        })
        .collect();
    let cpu = CpuMeter::start(run.broker_pid);
    let start = Instant::now();
    go_tx.send_replace(true);
    // Nothing more will be published: the idle timeout runs from the SUBSCRIBEs.
    done_tx.send_replace(Some(start));
    let mut received = Vec::with_capacity(tasks.len());
    let mut conns = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (out, conn) = t.await??;
        received.push(out);
        conns.push(conn);
    }
    let end = Instant::now();
    let cpu = cpu.stop();
    for conn in conns {
        conn.disconnect().await;
    }
    let last = received.iter().filter_map(|r| r.last_receive).max();
    let timed_out = received.iter().any(|r| r.timed_out);
    Ok((
        received,
        last.unwrap_or(end).saturating_duration_since(start),
        cpu,
        timed_out,
    ))
}

/// Publishes an empty retained message to every bench topic so the broker holds none.
async fn clear(publisher: &mut Conn, topics: u64, deadline: Instant) -> Result<()> {
    let templates: Vec<PublishTemplate> = (0..topics)
        .map(|i| PublishTemplate::new(&format!("bench/retained/{i}"), QoS::AtLeastOnce, true, 0))
        .collect::<Result<_>>()?;
    let plan = PublishPlan {
        index: 0,
        count: topics,
        qos: QoS::AtLeastOnce,
        window: STORE_WINDOW,
        stamp: false,
    };
    let out = publish_burst(publisher, &templates, plan, deadline).await?;
    if out.timed_out || out.acked < topics {
        progress(format_args!(
            "warning: only {} of {topics} retained bench messages were cleared; the broker \
             still holds some under bench/retained/",
            out.acked
        ));
    }
    Ok(())
}

fn line(
    run: &Run,
    args: &RetainedArgs,
    summary: LossSummary,
    duration: Duration,
    cpu: CpuUse,
    timed_out: bool,
) -> Result<String> {
    progress(format_args!(
        "retained: sent {} received {} lost {} duplicates {} in {:.3} s",
        summary.sent,
        summary.received,
        summary.lost,
        summary.duplicates,
        duration.as_secs_f64()
    ));
    let common = run.common("retained", Some(1), duration, cpu, timed_out);
    json_line(
        &common,
        &RetainedFields {
            topics: u64::from(args.topics),
            subscribers: u64::from(args.subscribers),
            sent: summary.sent,
            received: summary.received,
            lost: summary.lost,
            duplicates: summary.duplicates,
            msgs_per_s: rate(summary.received, duration.as_secs_f64()),
        },
    )
}
