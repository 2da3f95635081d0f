//! One MQTT session as a state machine with no I/O: what is queued for the client, what is
//! in flight and in which QoS state, which QoS 2 packet ids the client has in flight
//! toward us, and its subscriptions. The connection task feeds it acknowledgements and
//! asks it for the next packets to send; the router feeds it messages.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::park::Signals;
use bulwark_protocol::{Packet, Publish, QoS, TopicFilter, TopicName};
use bytes::Bytes;

use crate::store::{QueuedRecord, StoredMessage};

/// An application message as routed: shared by every session it is delivered to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// Retain flag it was published with.
    pub retain: bool,
}

impl Message {
    pub fn to_stored(&self, qos: QoS, retain: bool) -> StoredMessage {
        StoredMessage {
            topic: self.topic.as_str().to_string(),
            payload: self.payload.clone(),
            qos,
            retain,
        }
    }
}

#[derive(Debug, Clone)]
struct Queued {
    seq: u64,
    msg: Arc<Message>,
    qos: QoS,
    retain: bool,
}

#[derive(Debug, Clone)]
struct Inflight {
    seq: u64,
    pkid: u16,
    msg: Arc<Message>,
    qos: QoS,
    retain: bool,
    /// QoS 2 only: PUBREC received, PUBREL sent.
    released: bool,
}

/// The bounds a session enforces on what is queued for it.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_inflight: usize,
    pub max_messages: usize,
    pub max_bytes: usize,
}

/// What happened to a message offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued under this sequence number.
    Queued { seq: u64 },
    /// QoS 0 to a client that is not connected: not kept (as Mosquitto does by default).
    Skipped,
    /// The queue is at its bound: the message is dropped and counted.
    Dropped,
}

/// A change to persist for a persistent session's queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueChange {
    Put { seq: u64, record: QueuedRecord },
    Remove { seq: u64 },
}

/// A session's subscriptions by filter. Eight bytes and no allocation while there are
/// none: many clients (gateways that only publish) never subscribe, and every idle
/// connection keeps its session in memory.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)] // the box keeps an empty map's 48 bytes out of the session
pub struct Subscriptions(Option<Box<HashMap<TopicFilter, QoS>>>);

impl Subscriptions {
    pub fn insert(&mut self, filter: TopicFilter, qos: QoS) -> Option<QoS> {
        self.0.get_or_insert_default().insert(filter, qos)
    }

    pub fn remove(&mut self, filter: &TopicFilter) -> Option<QoS> {
        let map = self.0.as_mut()?;
        let removed = map.remove(filter);
        if map.is_empty() {
            self.0 = None;
        }
        removed
    }

    pub fn contains_key(&self, filter: &TopicFilter) -> bool {
        self.0.as_ref().is_some_and(|m| m.contains_key(filter))
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TopicFilter, &QoS)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    pub fn keys(&self) -> impl Iterator<Item = &TopicFilter> {
        self.iter().map(|(f, _)| f)
    }
}

/// A queue allocated on its first message: an idle session's two queues cost a pointer
/// each, not the 32 bytes of an empty `VecDeque`. Once allocated, it stays (a session that
/// has carried messages is likely to carry more).
#[derive(Debug)]
#[allow(clippy::box_collection)]
struct LazyDeque<T>(Option<Box<VecDeque<T>>>);

impl<T> Default for LazyDeque<T> {
    fn default() -> Self {
        LazyDeque(None)
    }
}

impl<T> LazyDeque<T> {
    fn push_back(&mut self, v: T) {
        self.0.get_or_insert_default().push_back(v)
    }

    fn pop_front(&mut self) -> Option<T> {
        self.0.as_mut()?.pop_front()
    }

    fn front(&self) -> Option<&T> {
        self.0.as_ref()?.front()
    }

    fn back(&self) -> Option<&T> {
        self.0.as_ref()?.back()
    }

    fn remove(&mut self, idx: usize) -> Option<T> {
        self.0.as_mut()?.remove(idx)
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flat_map(|q| q.iter())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.0.iter_mut().flat_map(|q| q.iter_mut())
    }

    fn clear(&mut self) {
        if let Some(q) = &mut self.0 {
            q.clear();
        }
    }
}

#[derive(Debug)]
pub struct Session {
    pub client_id: Arc<str>,
    /// The authenticated identity that owns the session (certificate CN), if any.
    pub identity: Option<Arc<str>>,
    /// Kept after the client goes away (CONNECT with clean session 0).
    pub persistent: bool,
    pub subscriptions: Subscriptions,
    /// The live connection, if any (connection ids start at 1; the niche keeps this
    /// field at 8 bytes in every session).
    pub connection: Option<std::num::NonZeroU64>,
    /// Unix seconds when the client went away; 0 while connected.
    pub disconnected_at: u64,
    /// Wakes the connection when there is something to send, or kicks it.
    pub signals: Arc<Signals>,
    pending: LazyDeque<Queued>,
    inflight: LazyDeque<Inflight>,
    queued_bytes: usize,
    /// Packet ids of QoS 2 messages received and not yet released; boxed, allocated on
    /// the first QoS 2 PUBLISH (most clients never send one). The box keeps the 48 bytes
    /// of an empty set out of every session.
    #[allow(clippy::box_collection)]
    incoming_qos2: Option<Box<HashSet<u16>>>,
    next_pkid: u16,
    /// The in-flight messages' packet ids follow each other in the order they were
    /// allocated (wrapping from 65535 to 1), as [`Session::allocate_pkid`] gives them out:
    /// an id outside the run from the oldest to the newest is free without a scan. False
    /// after a restore or allocation broke that order, until the window empties.
    ids_in_order: bool,
    next_seq: u64,
    /// Messages dropped because the queue was full.
    pub dropped: u64,
}

impl Session {
    pub fn new(client_id: Arc<str>, identity: Option<Arc<str>>, persistent: bool) -> Session {
        Session {
            client_id,
            identity,
            persistent,
            subscriptions: Subscriptions::default(),
            connection: None,
            disconnected_at: 0,
            signals: Arc::default(),
            pending: LazyDeque::default(),
            inflight: LazyDeque::default(),
            queued_bytes: 0,
            incoming_qos2: None,
            next_pkid: 1,
            ids_in_order: true,
            next_seq: 1,
            dropped: 0,
        }
    }

    /// Rebuilds queued state from the store. Records that had been sent go back in flight
    /// with their packet id, so they are resent with DUP when the client returns.
    pub fn restore_queue(&mut self, records: Vec<(u64, QueuedRecord)>) {
        for (seq, rec) in records {
            let Ok(topic) = TopicName::new(&rec.message.topic) else {
                continue;
            };
            let msg = Arc::new(Message {
                topic,
                payload: rec.message.payload.clone(),
                qos: rec.message.qos,
                retain: rec.message.retain,
            });
            self.queued_bytes += msg.payload.len();
            self.next_seq = self.next_seq.max(seq + 1);
            if rec.pkid != 0 && rec.message.qos != QoS::AtMostOnce {
                self.next_pkid = rec.pkid.wrapping_add(1).max(1);
                self.note_in_flight(rec.pkid);
                self.inflight.push_back(Inflight {
                    seq,
                    pkid: rec.pkid,
                    qos: rec.message.qos,
                    retain: rec.message.retain,
                    msg,
                    released: rec.released,
                });
            } else {
                self.pending.push_back(Queued {
                    seq,
                    qos: rec.message.qos,
                    retain: rec.message.retain,
                    msg,
                });
            }
        }
    }

    /// Whether connection `conn` (an id from 1) is the session's live connection.
    pub fn is_served_by(&self, conn: u64) -> bool {
        self.connection.is_some_and(|c| c.get() == conn)
    }

    pub fn is_online(&self) -> bool {
        self.connection.is_some()
    }

    /// Messages queued or in flight.
    pub fn queue_len(&self) -> usize {
        self.pending.len() + self.inflight.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Offers a message at delivery QoS `qos`. Never blocks: a full queue drops.
    pub fn enqueue(
        &mut self,
        msg: Arc<Message>,
        qos: QoS,
        retain: bool,
        limits: &QueueLimits,
    ) -> Enqueued {
        if qos == QoS::AtMostOnce && !self.is_online() {
            return Enqueued::Skipped;
        }
        if self.queue_len() >= limits.max_messages
            || self.queued_bytes + msg.payload.len() > limits.max_bytes
        {
            self.dropped += 1;
            return Enqueued::Dropped;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queued_bytes += msg.payload.len();
        self.pending.push_back(Queued {
            seq,
            msg,
            qos,
            retain,
        });
        Enqueued::Queued { seq }
    }

    fn allocate_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.pkid_in_flight(id) {
                return id;
            }
        }
    }

    /// Where `id` comes after `first` in the cycle of packet ids 1..=65535 (0 for `first`).
    fn id_distance(first: u16, id: u16) -> u32 {
        (u32::from(id) + 65_535 - u32::from(first)) % 65_535
    }

    /// Whether a message is in flight under `id`. While the ids are in order, one past the
    /// newest (the usual next id) is known to be free without looking at every message
    /// of the window.
    fn pkid_in_flight(&self, id: u16) -> bool {
        let (Some(first), Some(last)) = (self.inflight.front(), self.inflight.back()) else {
            return false;
        };
        if self.ids_in_order
            && Self::id_distance(first.pkid, id) > Self::id_distance(first.pkid, last.pkid)
        {
            return false;
        }
        self.inflight.iter().any(|f| f.pkid == id)
    }

    /// Keeps [`Session::ids_in_order`] true while `pkid`, about to go in flight, comes
    /// after the newest id in flight (and before the oldest, going round).
    fn note_in_flight(&mut self, pkid: u16) {
        if let (Some(first), Some(last)) = (self.inflight.front(), self.inflight.back()) {
            if Self::id_distance(first.pkid, pkid) <= Self::id_distance(first.pkid, last.pkid) {
                self.ids_in_order = false;
            }
        }
    }

    /// The next PUBLISH to send, if the in-flight window allows. For QoS 1 and 2 the
    /// message moves in flight; the change to persist is returned with it.
    pub fn next_outgoing(&mut self, limits: &QueueLimits) -> Option<(Packet, Option<QueueChange>)> {
        let front = self.pending.front()?;
        if front.qos != QoS::AtMostOnce && self.inflight.len() >= limits.max_inflight {
            return None;
        }
        let q = self.pending.pop_front()?;
        if q.qos == QoS::AtMostOnce {
            self.queued_bytes -= q.msg.payload.len();
            let packet = publish_packet(&q.msg, q.qos, q.retain, None, false);
            return Some((packet, None));
        }
        let pkid = self.allocate_pkid();
        self.note_in_flight(pkid);
        let packet = publish_packet(&q.msg, q.qos, q.retain, Some(pkid), false);
        // Only a persistent session's in-flight messages are stored; a clean session
        // does not pay for the record.
        let change = self.persistent.then(|| QueueChange::Put {
            seq: q.seq,
            record: QueuedRecord {
                message: q.msg.to_stored(q.qos, q.retain),
                pkid,
                released: false,
            },
        });
        self.inflight.push_back(Inflight {
            seq: q.seq,
            pkid,
            msg: q.msg,
            qos: q.qos,
            retain: q.retain,
            released: false,
        });
        Some((packet, change))
    }

    /// The message that [`Session::next_outgoing`] would send next.
    pub fn peek_pending(&self) -> Option<&Arc<Message>> {
        self.pending.front().map(|q| &q.msg)
    }

    /// Discards the next pending message (it may no longer be delivered).
    pub fn drop_pending_front(&mut self) -> Option<QueueChange> {
        let q = self.pending.pop_front()?;
        self.queued_bytes -= q.msg.payload.len();
        Some(QueueChange::Remove { seq: q.seq })
    }

    /// Packets to resend when a client resumes this session: unacknowledged PUBLISHes
    /// with DUP and their original packet ids, PUBRELs for released QoS 2 messages.
    pub fn resend_inflight(&self) -> Vec<Packet> {
        self.inflight
            .iter()
            .map(|f| {
                if f.released {
                    Packet::PubRel(f.pkid)
                } else {
                    publish_packet(&f.msg, f.qos, f.retain, Some(f.pkid), true)
                }
            })
            .collect()
    }

    fn complete(&mut self, idx: usize) -> QueueChange {
        let done = self.inflight.remove(idx).expect("index from position()");
        if self.inflight.len() == 0 {
            self.ids_in_order = true;
        }
        self.queued_bytes -= done.msg.payload.len();
        QueueChange::Remove { seq: done.seq }
    }

    /// PUBACK from the client. `None` if no QoS 1 message is in flight under `pkid`.
    pub fn on_puback(&mut self, pkid: u16) -> Option<QueueChange> {
        let idx = self
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && f.qos == QoS::AtLeastOnce)?;
        Some(self.complete(idx))
    }

    /// PUBREC from the client: the message becomes released; answer with PUBREL.
    pub fn on_pubrec(&mut self, pkid: u16) -> Option<QueueChange> {
        let f = self
            .inflight
            .iter_mut()
            .find(|f| f.pkid == pkid && f.qos == QoS::ExactlyOnce)?;
        f.released = true;
        Some(QueueChange::Put {
            seq: f.seq,
            record: QueuedRecord {
                message: f.msg.to_stored(f.qos, f.retain),
                pkid,
                released: true,
            },
        })
    }

    /// PUBCOMP from the client ends a QoS 2 delivery.
    pub fn on_pubcomp(&mut self, pkid: u16) -> Option<QueueChange> {
        let idx = self
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && f.qos == QoS::ExactlyOnce && f.released)?;
        Some(self.complete(idx))
    }

    /// A QoS 2 PUBLISH from the client. Returns true the first time a packet id is seen
    /// (route the message), false for a redelivery before PUBREL (do not route again).
    pub fn incoming_qos2(&mut self, pkid: u16) -> bool {
        self.incoming_qos2.get_or_insert_default().insert(pkid)
    }

    /// PUBREL from the client releases the packet id.
    pub fn incoming_pubrel(&mut self, pkid: u16) {
        if let Some(ids) = &mut self.incoming_qos2 {
            ids.remove(&pkid);
            if ids.is_empty() {
                self.incoming_qos2 = None;
            }
        }
    }

    /// Drops everything queued (used when a clean session replaces this one).
    pub fn clear_queue(&mut self) {
        self.pending.clear();
        self.inflight.clear();
        self.ids_in_order = true;
        self.queued_bytes = 0;
        self.incoming_qos2 = None;
    }
}

fn publish_packet(msg: &Message, qos: QoS, retain: bool, pkid: Option<u16>, dup: bool) -> Packet {
    Packet::Publish(Publish {
        dup,
        qos,
        retain,
        topic: msg.topic.clone(),
        pkid,
        payload: msg.payload.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: QueueLimits = QueueLimits {
        max_inflight: 2,
        max_messages: 4,
        max_bytes: 1000,
    };

    fn msg(topic: &str, qos: QoS) -> Arc<Message> {
        Arc::new(Message {
            topic: TopicName::new(topic).unwrap(),
            payload: Bytes::from_static(b"0123456789"),
            qos,
            retain: false,
        })
    }

    fn online() -> Session {
        let mut s = Session::new("c".into(), None, true);
        s.connection = std::num::NonZeroU64::new(1);
        s
    }

    fn pkid_of(p: &Packet) -> Option<u16> {
        match p {
            Packet::Publish(p) => p.pkid,
            _ => None,
        }
    }

    #[test]
    fn inflight_window_holds_back_qos1_in_order() {
        let mut s = online();
        for _ in 0..3 {
            s.enqueue(msg("t", QoS::AtLeastOnce), QoS::AtLeastOnce, false, &LIMITS);
        }
        let (p1, c1) = s.next_outgoing(&LIMITS).unwrap();
        let (p2, _) = s.next_outgoing(&LIMITS).unwrap();
        assert!(s.next_outgoing(&LIMITS).is_none(), "window of 2 is full");
        assert!(matches!(c1, Some(QueueChange::Put { seq: 1, .. })));
        let (a, b) = (pkid_of(&p1).unwrap(), pkid_of(&p2).unwrap());
        assert_ne!(a, b);
        assert_eq!(s.on_puback(a), Some(QueueChange::Remove { seq: 1 }));
        assert_eq!(s.on_puback(a), None, "a second PUBACK is ignored");
        let (p3, _) = s.next_outgoing(&LIMITS).unwrap();
        assert!(pkid_of(&p3).is_some());
        assert_eq!(s.queue_len(), 2);
    }

    /// Packet ids handed out while messages are acknowledged in any order, across the
    /// wrap from 65535 to 1 and after a restore with ids out of order: never the id of a
    /// message still in flight, and the same id a scan of the whole window would give.
    #[test]
    fn packet_ids_in_flight_are_never_reused() {
        let limits = QueueLimits {
            max_inflight: 40,
            max_messages: 1000,
            max_bytes: 1 << 20,
        };
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for (start, restored) in [
            (1u16, vec![]),
            (65_500, vec![]),
            (65_530, vec![7u16, 65_534, 3]),
        ] {
            let mut s = online();
            s.next_pkid = start;
            let records = restored
                .iter()
                .enumerate()
                .map(|(i, &pkid)| {
                    let m = msg("t", QoS::AtLeastOnce);
                    (
                        i as u64 + 1,
                        QueuedRecord {
                            message: m.to_stored(QoS::AtLeastOnce, false),
                            pkid,
                            released: false,
                        },
                    )
                })
                .collect();
            s.restore_queue(records);
            for _ in 0..20_000 {
                if next() % 3 != 0 {
                    s.enqueue(msg("t", QoS::AtLeastOnce), QoS::AtLeastOnce, false, &limits);
                    let in_flight: Vec<u16> = s.inflight.iter().map(|f| f.pkid).collect();
                    let mut expected = s.next_pkid;
                    while in_flight.contains(&expected) {
                        expected = expected.wrapping_add(1).max(1);
                    }
                    if let Some((p, _)) = s.next_outgoing(&limits) {
                        let id = pkid_of(&p).unwrap();
                        assert!(!in_flight.contains(&id), "id {id} reused while in flight");
                        assert_eq!(id, expected);
                    }
                } else if s.inflight.len() > 0 {
                    let idx = (next() % s.inflight.len() as u64) as usize;
                    let id = s.inflight.iter().nth(idx).unwrap().pkid;
                    assert!(s.on_puback(id).is_some());
                }
            }
        }
    }

    #[test]
    fn queue_bounds_drop_and_count() {
        let mut s = online();
        for _ in 0..4 {
            assert!(matches!(
                s.enqueue(msg("t", QoS::AtLeastOnce), QoS::AtLeastOnce, false, &LIMITS),
                Enqueued::Queued { .. }
            ));
        }
        assert_eq!(
            s.enqueue(msg("t", QoS::AtLeastOnce), QoS::AtLeastOnce, false, &LIMITS),
            Enqueued::Dropped
        );
        assert_eq!(s.dropped, 1);
        let small = QueueLimits {
            max_bytes: 25,
            ..LIMITS
        };
        let mut s = online();
        s.enqueue(msg("t", QoS::AtMostOnce), QoS::AtMostOnce, false, &small);
        s.enqueue(msg("t", QoS::AtMostOnce), QoS::AtMostOnce, false, &small);
        assert_eq!(
            s.enqueue(msg("t", QoS::AtMostOnce), QoS::AtMostOnce, false, &small),
            Enqueued::Dropped,
            "third 10-byte payload exceeds 25 bytes"
        );
        s.next_outgoing(&small).unwrap();
        assert_eq!(s.queued_bytes(), 10);
    }

    #[test]
    fn qos0_is_not_queued_offline() {
        let mut s = Session::new("c".into(), None, true);
        assert_eq!(
            s.enqueue(msg("t", QoS::AtMostOnce), QoS::AtMostOnce, false, &LIMITS),
            Enqueued::Skipped
        );
        assert!(matches!(
            s.enqueue(msg("t", QoS::AtLeastOnce), QoS::AtLeastOnce, false, &LIMITS),
            Enqueued::Queued { .. }
        ));
    }

    #[test]
    fn qos2_outbound_flow_and_resend() {
        let mut s = online();
        s.enqueue(msg("t", QoS::ExactlyOnce), QoS::ExactlyOnce, false, &LIMITS);
        let (p, _) = s.next_outgoing(&LIMITS).unwrap();
        let id = pkid_of(&p).unwrap();
        assert_eq!(s.on_puback(id), None, "PUBACK does not complete QoS 2");
        assert_eq!(s.on_pubcomp(id), None, "PUBCOMP before PUBREC is ignored");
        let resend = s.resend_inflight();
        assert!(matches!(&resend[0], Packet::Publish(p) if p.dup && p.pkid == Some(id)));
        assert!(
            matches!(s.on_pubrec(id), Some(QueueChange::Put { record, .. }) if record.released)
        );
        assert_eq!(s.resend_inflight(), vec![Packet::PubRel(id)]);
        assert_eq!(s.on_pubcomp(id), Some(QueueChange::Remove { seq: 1 }));
        assert_eq!(s.queue_len(), 0);
    }

    #[test]
    fn incoming_qos2_is_routed_once() {
        let mut s = online();
        assert!(s.incoming_qos2(5));
        assert!(!s.incoming_qos2(5));
        s.incoming_pubrel(5);
        assert!(s.incoming_qos2(5));
    }

    #[test]
    fn restore_puts_sent_records_back_in_flight() {
        let mut s = Session::new("c".into(), None, true);
        let rec = |pkid| QueuedRecord {
            message: msg("t", QoS::AtLeastOnce).to_stored(QoS::AtLeastOnce, false),
            pkid,
            released: false,
        };
        s.restore_queue(vec![(3, rec(9)), (4, rec(0))]);
        let resend = s.resend_inflight();
        assert_eq!(resend.len(), 1);
        assert!(matches!(&resend[0], Packet::Publish(p) if p.dup && p.pkid == Some(9)));
        s.connection = std::num::NonZeroU64::new(1);
        let (p, c) = s.next_outgoing(&LIMITS).unwrap();
        assert_ne!(pkid_of(&p), Some(9));
        assert!(matches!(c, Some(QueueChange::Put { seq: 4, .. })));
        let r = s.enqueue(msg("t", QoS::AtLeastOnce), QoS::AtLeastOnce, false, &LIMITS);
        assert_eq!(
            r,
            Enqueued::Queued { seq: 5 },
            "sequence continues after restore"
        );
    }
}
