//! The loops that move messages: a publisher sending as fast as its QoS 1 window allows
//! ([`publish_burst`]), one sending on a fixed schedule ([`publish_paced`]), and a
//! subscriber counting what arrives ([`receive`]).
//!
//! Messages are stamped into a shared write buffer and written in batches; acknowledgements
//! are written once per read. Nothing here allocates per message.

use std::time::Duration;

use anyhow::{bail, Result};
use bulwark_protocol::packet::{Packet, QoS};
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout_at, Instant};

use super::check_suback;
use crate::client::{Conn, KEEP_ALIVE_S};
use crate::payload::{Clock, MessageId};
use crate::tally::{Delivery, DeliveryTally};
use crate::wire::{put_puback, Incoming, PacketIds, PublishTemplate};

/// Largest batch of messages written with one `write_all`, in bytes.
const BATCH_BYTES: usize = 64 * 1024;

/// A client that sent nothing for this long sends PINGREQ (half the keep alive).
const PING_AFTER: Duration = Duration::from_secs(KEEP_ALIVE_S as u64 / 2);

/// What one publisher is to send.
#[derive(Debug, Clone, Copy)]
pub struct PublishPlan {
    /// Publisher index written into each payload.
    pub index: u64,
    /// Messages to send; sequence numbers `0..count`.
    pub count: u64,
    pub qos: QoS,
    /// Most unacknowledged QoS 1 messages.
    pub window: usize,
    /// Write a [`MessageId`] into each payload (off for the empty payloads that clear
    /// retained messages).
    pub stamp: bool,
}

/// What a publisher did.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishOutcome {
    /// Messages written to the socket.
    pub sent: u64,
    /// QoS 1 messages acknowledged.
    pub acked: u64,
    pub timed_out: bool,
}

/// Publishes `plan.count` messages as fast as the socket and the QoS 1 window allow.
/// Message `seq` uses `templates[seq % templates.len()]`. Returns when all are sent (and,
/// for QoS 1, acknowledged) or at `deadline`.
pub async fn publish_burst(
    conn: &mut Conn,
    templates: &[PublishTemplate],
    plan: PublishPlan,
    deadline: Instant,
) -> Result<PublishOutcome> {
    let qos1 = plan.qos != QoS::AtMostOnce;
    let mut ids = PacketIds::default();
    let mut out = PublishOutcome::default();
    let largest = templates
        .iter()
        .map(PublishTemplate::len)
        .max()
        .unwrap_or(1);
    let batch = (BATCH_BYTES / largest.max(1)).max(1);
    let window = plan.window.clamp(1, 65535);
    loop {
        let room = if qos1 {
            window.saturating_sub(ids.in_flight())
        } else {
            batch
        };
        let n = room.min(batch).min((plan.count - out.sent) as usize);
        for _ in 0..n {
            let template = &templates[(out.sent % templates.len() as u64) as usize];
            let pkid = if qos1 { ids.allocate() } else { None };
            let id = plan.stamp.then(|| MessageId {
                publisher: plan.index,
                seq: out.sent,
                sent_ns: Clock::now_ns(),
            });
            template.append(&mut conn.wbuf, pkid, id);
            out.sent += 1;
        }
        if timeout_at(deadline, conn.send()).await.is_err() {
            out.timed_out = true;
            return Ok(out);
        }
        let all_sent = out.sent == plan.count;
        if all_sent && (!qos1 || ids.in_flight() == 0) {
            return Ok(out);
        }
        if qos1 && (all_sent || ids.in_flight() >= window) {
            tokio::select! {
                r = conn.fill() => r?,
                _ = sleep_until(deadline) => {
                    out.timed_out = true;
                    return Ok(out);
                }
            }
            out.acked += take_acks(conn, &mut ids)?;
        }
    }
}

/// Publishes `count` messages, message `i` due at `start + i / rate`: an absolute
/// schedule, so a late wake-up sends the overdue messages at once instead of drifting.
pub async fn publish_paced(
    conn: &mut Conn,
    template: &PublishTemplate,
    plan: PublishPlan,
    rate: u64,
    start: Instant,
    deadline: Instant,
) -> Result<PublishOutcome> {
    let qos1 = plan.qos != QoS::AtMostOnce;
    let mut ids = PacketIds::default();
    let mut out = PublishOutcome::default();
    let due = |seq: u64| start + Duration::from_secs_f64(seq as f64 / rate.max(1) as f64);
    loop {
        let now = Instant::now();
        while out.sent < plan.count && due(out.sent) <= now {
            let pkid = if qos1 {
                match ids.allocate() {
                    Some(id) => Some(id),
                    None => break,
                }
            } else {
                None
            };
            let id = MessageId {
                publisher: plan.index,
                seq: out.sent,
                sent_ns: Clock::now_ns(),
            };
            template.append(&mut conn.wbuf, pkid, Some(id));
            out.sent += 1;
        }
        if timeout_at(deadline, conn.send()).await.is_err() {
            out.timed_out = true;
            return Ok(out);
        }
        if out.sent == plan.count && (!qos1 || ids.in_flight() == 0) {
            return Ok(out);
        }
        // With every packet id in flight only a PUBACK can make progress.
        let wake = if out.sent < plan.count && ids.in_flight() < 65535 {
            due(out.sent).min(deadline)
        } else {
            deadline
        };
        tokio::select! {
            r = conn.fill(), if qos1 => {
                r?;
                out.acked += take_acks(conn, &mut ids)?;
            }
            _ = sleep_until(wake) => {
                if Instant::now() >= deadline {
                    out.timed_out = true;
                    return Ok(out);
                }
            }
        }
    }
}

/// Releases the packet ids of every PUBACK in the read buffer; returns how many.
fn take_acks(conn: &mut Conn, ids: &mut PacketIds) -> Result<u64> {
    let mut acked = 0;
    while let Some(packet) = conn.next()? {
        match packet {
            Incoming::Other(Packet::PubAck(pkid)) => {
                if ids.release(pkid) {
                    acked += 1;
                } else {
                    bail!("the broker acknowledged packet id {pkid}, which was not in flight");
                }
            }
            Incoming::Other(Packet::PingResp) => {}
            other => bail!("publisher got an unexpected packet: {other:?}"),
        }
    }
    Ok(acked)
}

/// What a subscriber saw.
#[derive(Debug, Clone, Default)]
pub struct ReceiveOutcome {
    pub tally: DeliveryTally,
    /// When the last message of this run arrived.
    pub last_receive: Option<Instant>,
    /// Publish-to-delivery time of each first delivery, in nanoseconds (only when asked).
    pub latencies_ns: Vec<u64>,
    pub timed_out: bool,
}

/// Counts deliveries into `tally` (acknowledging QoS 1 ones) until every expected message
/// arrived, or nothing arrived for [`super::IDLE_AFTER_PUBLISH`] after `publishers_done`
/// holds a time, or `deadline`. A SUBACK is checked (for subscriptions sent just before).
pub async fn receive(
    conn: &mut Conn,
    tally: DeliveryTally,
    keep_latencies: bool,
    mut publishers_done: watch::Receiver<Option<Instant>>,
    deadline: Instant,
) -> Result<ReceiveOutcome> {
    let capacity = if keep_latencies {
        usize::try_from(tally.expected()).unwrap_or(0)
    } else {
        0
    };
    let mut out = ReceiveOutcome {
        tally,
        latencies_ns: Vec::with_capacity(capacity),
        ..ReceiveOutcome::default()
    };
    let mut last_send = Instant::now();
    let mut done_at: Option<Instant> = *publishers_done.borrow_and_update();
    let mut watching = true;
    let wake = tokio::time::sleep_until(deadline);
    tokio::pin!(wake);
    let mut wake_at = deadline;
    loop {
        let mut got = false;
        while let Some(packet) = conn.next()? {
            match packet {
                Incoming::Publish { pkid, id, .. } => {
                    let delivery = out.tally.record(id);
                    if delivery != Delivery::Unexpected {
                        got = true;
                    }
                    if keep_latencies && delivery == Delivery::New {
                        if let Some(id) = id {
                            out.latencies_ns
                                .push(Clock::now_ns().saturating_sub(id.sent_ns));
                        }
                    }
                    if let Some(pkid) = pkid {
                        put_puback(&mut conn.wbuf, pkid);
                    }
                }
                Incoming::Other(Packet::SubAck(ack)) => check_suback(&ack)?,
                Incoming::Other(Packet::PingResp) => {}
                Incoming::Other(other) => {
                    bail!("subscriber got an unexpected {}", other.name())
                }
            }
        }
        if got {
            out.last_receive = Some(Instant::now());
        }
        if !conn.wbuf.is_empty() {
            if timeout_at(deadline, conn.send()).await.is_err() {
                out.timed_out = true;
                return Ok(out);
            }
            last_send = Instant::now();
        }
        if out.tally.is_complete() {
            return Ok(out);
        }
        let idle_end = done_at.map(|done| {
            out.last_receive.map_or(done, |last| last.max(done)) + super::IDLE_AFTER_PUBLISH
        });
        let ping_at = last_send + PING_AFTER;
        let next_wake = idle_end.map_or(deadline, |t| t.min(deadline)).min(ping_at);
        if next_wake != wake_at {
            wake.as_mut().reset(next_wake);
            wake_at = next_wake;
        }
        tokio::select! {
            r = conn.fill() => r?,
            changed = publishers_done.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                } else {
                    done_at = *publishers_done.borrow_and_update();
                }
            }
            _ = &mut wake => {
                let now = Instant::now();
                if now >= deadline {
                    out.timed_out = true;
                    return Ok(out);
                }
                if idle_end.is_some_and(|t| now >= t) {
                    return Ok(out);
                }
                if now >= ping_at {
                    conn.queue(&Packet::PingReq)?;
                }
            }
        }
    }
}
