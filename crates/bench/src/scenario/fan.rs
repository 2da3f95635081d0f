//! fan-in (many publishers, one subscriber) and fan-out (one publisher, many subscribers):
//! message throughput with exact loss and duplicate counts.

use anyhow::{anyhow, Result};
use bulwark_protocol::packet::QoS;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::flow::{
    publish_burst, publish_paced, receive, PublishOutcome, PublishPlan, ReceiveOutcome,
};
use super::{is_setup_timeout, progress, split_evenly, Run};
use crate::cli::{FanInArgs, FanOutArgs};
use crate::client::Conn;
use crate::report::{json_line, rate};
use crate::sysstat::{CpuMeter, CpuUse};
use crate::tally::{DeliveryTally, LossSummary};
use crate::wire::PublishTemplate;

#[derive(Debug, Serialize)]
struct FanFields {
    publishers: u64,
    subscribers: u64,
    sent: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    msgs_per_s: f64,
}

/// QoS from the --qos flag (already limited to 0 or 1 by the parser).
pub fn qos_of(flag: u8) -> QoS {
    if flag == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// The payload size to use: at least [`crate::payload::ID_LEN`].
pub fn payload_len(requested: u32) -> usize {
    let len = (requested as usize).max(crate::payload::ID_LEN);
    if len != requested as usize {
        progress(format_args!(
            "--payload {requested} raised to {len} bytes (publisher, sequence and send time)"
        ));
    }
    len
}

/// A publisher ready to go.
pub struct Sender {
    pub conn: Conn,
    pub templates: Vec<PublishTemplate>,
    pub plan: PublishPlan,
    /// Messages per second on a fixed schedule (first template only); `None`: as fast as
    /// the window allows.
    pub pace: Option<u64>,
}

/// What [`drive`] measured.
pub struct Driven {
    pub published: Vec<PublishOutcome>,
    pub received: Vec<ReceiveOutcome>,
    pub cpu: CpuUse,
    /// First publish to last delivery (to the end of the run if nothing arrived).
    pub duration: std::time::Duration,
    pub timed_out: bool,
}

impl Driven {
    /// Loss accounting over all receivers, against what each publisher sent.
    pub fn summary(&self) -> LossSummary {
        let sent: Vec<u64> = self.published.iter().map(|p| p.sent).collect();
        let mut sum = LossSummary::default();
        for r in &self.received {
            sum.add(&r.tally, &sent);
        }
        if sum.unexpected > 0 {
            progress(format_args!(
                "{} deliveries were not messages of this run (left-over retained \
                 messages or another client publishing on the bench topics?)",
                sum.unexpected
            ));
        }
        sum
    }
}

/// Starts the receivers, releases all publishers at once (the measured interval starts
/// here), waits for the publishers, tells the receivers, waits for them, then disconnects
/// everyone.
pub async fn drive(
    run: &Run,
    receivers: Vec<(Conn, DeliveryTally)>,
    senders: Vec<Sender>,
    keep_latencies: bool,
) -> Result<Driven> {
    let deadline = run.deadline;
    let (done_tx, done_rx) = watch::channel(None);
    let (go_tx, go_rx) = watch::channel(false);
    let sub_tasks: Vec<JoinHandle<Result<(ReceiveOutcome, Conn)>>> = receivers
        .into_iter()
        .map(|(mut conn, tally)| {
            let done_rx = done_rx.clone();
            tokio::spawn(async move {
                let out = receive(&mut conn, tally, keep_latencies, done_rx, deadline).await?;
                Ok((out, conn))
            })
        })
        .collect();
    let pub_tasks: Vec<JoinHandle<Result<(PublishOutcome, Conn)>>> = senders
        .into_iter()
        .map(|mut s| {
            let mut go = go_rx.clone();
            tokio::spawn(async move {
                go.wait_for(|g| *g)
                    .await
                    .map_err(|_| anyhow!("start signal lost"))?;
                let out = match s.pace {
                    Some(rate) => {
                        let start = Instant::now();
                        publish_paced(&mut s.conn, &s.templates[0], s.plan, rate, start, deadline)
                            .await?
                    }
                    None => publish_burst(&mut s.conn, &s.templates, s.plan, deadline).await?,
                };
                Ok((out, s.conn))
            })
        })
        .collect();

    let cpu = CpuMeter::start(run.broker_pid);
    let start = Instant::now();
    go_tx.send_replace(true);
    let mut published = Vec::with_capacity(pub_tasks.len());
    let mut conns = Vec::new();
    for t in pub_tasks {
        let (out, conn) = t.await??;
        published.push(out);
        conns.push(conn);
    }
    done_tx.send_replace(Some(Instant::now()));
    let sent: u64 = published.iter().map(|p| p.sent).sum();
    progress(format_args!(
        "publishers done: {sent} messages in {:.3} s",
        start.elapsed().as_secs_f64()
    ));
    let mut received = Vec::with_capacity(sub_tasks.len());
    for t in sub_tasks {
        let (out, conn) = t.await??;
        received.push(out);
        conns.push(conn);
    }
    let end = Instant::now();
    let cpu = cpu.stop();
    let last = received.iter().filter_map(|r| r.last_receive).max();
    let timed_out = published.iter().any(|p| p.timed_out) || received.iter().any(|r| r.timed_out);
    for conn in conns {
        conn.disconnect().await;
    }
    Ok(Driven {
        published,
        received,
        cpu,
        duration: last.unwrap_or(end).saturating_duration_since(start),
        timed_out,
    })
}

/// `bulwark-bench fan-in`.
pub async fn fan_in(run: &Run, args: &FanInArgs) -> Result<String> {
    let qos = qos_of(args.qos.qos);
    let payload = payload_len(args.payload.payload);
    let n = args.publishers as usize;
    let per_publisher = split_evenly(args.messages, n);
    progress(format_args!(
        "fan-in: {n} publishers -> 1 subscriber, {} messages, QoS {}, {payload} B",
        args.messages, args.qos.qos
    ));
    let setup = async {
        let mut subs = run
            .connect_clients("sub", 1, Some(("bench/fanin/+", qos)))
            .await?;
        let pubs = run.connect_clients("pub", n, None).await?;
        let sub = subs.pop().ok_or_else(|| anyhow!("no subscriber"))?;
        Ok::<_, anyhow::Error>((sub, pubs))
    };
    let (sub, pubs) = match setup.await {
        Ok(v) => v,
        Err(e) if is_setup_timeout(&e) => {
            progress(&e);
            return fan_line(run, "fan-in", args.qos.qos, n as u64, 1, None);
        }
        Err(e) => return Err(e),
    };
    let mut senders = Vec::with_capacity(n);
    for (i, conn) in pubs.into_iter().enumerate() {
        senders.push(Sender {
            conn,
            templates: vec![PublishTemplate::new(
                &format!("bench/fanin/{i}"),
                qos,
                false,
                payload,
            )?],
            plan: PublishPlan {
                index: i as u64,
                count: per_publisher[i],
                qos,
                window: args.window.window as usize,
                stamp: true,
            },
            pace: None,
        });
    }
    let tally = DeliveryTally::new(&per_publisher);
    let driven = drive(run, vec![(sub, tally)], senders, false).await?;
    fan_line(run, "fan-in", args.qos.qos, n as u64, 1, Some(&driven))
}

/// `bulwark-bench fan-out`.
pub async fn fan_out(run: &Run, args: &FanOutArgs) -> Result<String> {
    let qos = qos_of(args.qos.qos);
    let payload = payload_len(args.payload.payload);
    let n = args.subscribers as usize;
    progress(format_args!(
        "fan-out: 1 publisher -> {n} subscribers, {} messages, QoS {}, {payload} B",
        args.messages, args.qos.qos
    ));
    let setup = async {
        let subs = run
            .connect_clients("sub", n, Some(("bench/fanout", qos)))
            .await?;
        let mut pubs = run.connect_clients("pub", 1, None).await?;
        let publisher = pubs.pop().ok_or_else(|| anyhow!("no publisher"))?;
        Ok::<_, anyhow::Error>((subs, publisher))
    };
    let (subs, publisher) = match setup.await {
        Ok(v) => v,
        Err(e) if is_setup_timeout(&e) => {
            progress(&e);
            return fan_line(run, "fan-out", args.qos.qos, 1, n as u64, None);
        }
        Err(e) => return Err(e),
    };
    let sender = Sender {
        conn: publisher,
        templates: vec![PublishTemplate::new("bench/fanout", qos, false, payload)?],
        plan: PublishPlan {
            index: 0,
            count: args.messages,
            qos,
            window: args.window.window as usize,
            stamp: true,
        },
        pace: None,
    };
    let receivers = subs
        .into_iter()
        .map(|c| (c, DeliveryTally::new(&[args.messages])))
        .collect();
    let driven = drive(run, receivers, vec![sender], false).await?;
    fan_line(run, "fan-out", args.qos.qos, 1, n as u64, Some(&driven))
}

/// The result line; `driven` is `None` when the deadline passed during setup.
fn fan_line(
    run: &Run,
    scenario: &'static str,
    qos: u8,
    publishers: u64,
    subscribers: u64,
    driven: Option<&Driven>,
) -> Result<String> {
    let (summary, duration, cpu, timed_out) = match driven {
        Some(d) => (d.summary(), d.duration, d.cpu, d.timed_out),
        None => (
            LossSummary::default(),
            Default::default(),
            CpuUse::default(),
            true,
        ),
    };
    progress(format_args!(
        "{scenario}: sent {} received {} lost {} duplicates {} in {:.3} s",
        summary.sent,
        summary.received,
        summary.lost,
        summary.duplicates,
        duration.as_secs_f64()
    ));
    let common = run.common(scenario, Some(qos), duration, cpu, timed_out);
    json_line(
        &common,
        &FanFields {
            publishers,
            subscribers,
            sent: summary.sent,
            received: summary.received,
            lost: summary.lost,
            duplicates: summary.duplicates,
            msgs_per_s: rate(summary.received, duration.as_secs_f64()),
        },
    )
}
