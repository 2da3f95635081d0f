//! Session semantics at the packet level: unacknowledged QoS 1 and 2 deliveries resent with
//! DUP and their original packet ids when a persistent session resumes, PUBREL resent for
//! released QoS 2 messages, exactly-once routing of a QoS 2 PUBLISH sent twice, and a clean
//! session discarding what a persistent one had queued.

use std::time::Duration;

use bulwark_integration_tests::{BrokerConfig, RawClient, TestBroker};
use bulwark_protocol::{
    decode, encode, DecodeLimits, Packet, Publish, QoS, TopicFilter, TopicName,
};
use bytes::BytesMut;

const T: Duration = Duration::from_secs(10);

struct Peer {
    raw: RawClient,
    buf: BytesMut,
}

impl Peer {
    fn connect(addr: std::net::SocketAddr, client_id: &str, clean: bool) -> (Peer, bool) {
        let mut p = Peer {
            raw: RawClient::connect(addr),
            buf: BytesMut::new(),
        };
        p.send(&Packet::Connect(bulwark_protocol::Connect {
            protocol: bulwark_protocol::ProtocolLevel::V311,
            clean_session: clean,
            keep_alive: 60,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
        }));
        match p.recv() {
            Packet::ConnAck(a) => {
                assert_eq!(a.code, bulwark_protocol::ConnectReturnCode::Accepted);
                let present = a.session_present;
                (p, present)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn send(&mut self, p: &Packet) {
        let mut b = BytesMut::new();
        encode(p, &mut b).unwrap();
        self.raw.send(&b).unwrap();
    }

    fn recv(&mut self) -> Packet {
        self.try_recv(T).expect("a packet from the broker")
    }

    fn try_recv(&mut self, timeout: Duration) -> Option<Packet> {
        let limits = DecodeLimits::default();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(p) = decode(&mut self.buf, &limits).unwrap() {
                return Some(p);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            self.raw.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match std::io::Read::read(&mut self.raw.stream, &mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return None,
            }
        }
    }

    fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.send(&Packet::Subscribe(bulwark_protocol::Subscribe {
            pkid: 1,
            filters: vec![(TopicFilter::new(filter).unwrap(), qos)],
        }));
        assert!(matches!(self.recv(), Packet::SubAck(_)));
    }

    fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        pkid: Option<u16>,
        dup: bool,
        payload: &'static [u8],
    ) {
        self.send(&Packet::Publish(Publish {
            dup,
            qos,
            retain: false,
            topic: TopicName::new(topic).unwrap(),
            pkid,
            payload: bytes::Bytes::from_static(payload),
        }));
    }

    /// Proves the connection is alive and everything before it was processed.
    fn ping(&mut self) {
        self.send(&Packet::PingReq);
        loop {
            match self.recv() {
                Packet::PingResp => return,
                Packet::Publish(_) => {}
                other => panic!("unexpected {other:?} while waiting for PINGRESP"),
            }
        }
    }
}

fn publish_of(p: Packet) -> Publish {
    match p {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[test]
fn unacknowledged_qos1_and_qos2_are_resent_with_dup_on_resume() {
    let b = TestBroker::start(BrokerConfig::default());
    let addr = b.addr("tcp");
    let (mut sub, present) = Peer::connect(addr, "resumer", false);
    assert!(!present);
    sub.subscribe("r/#", QoS::ExactlyOnce);

    let (mut publ, _) = Peer::connect(addr, "pub", true);
    publ.publish("r/one", QoS::AtLeastOnce, Some(10), false, b"1");
    assert_eq!(publ.recv(), Packet::PubAck(10));
    publ.publish("r/two", QoS::ExactlyOnce, Some(11), false, b"2");
    assert_eq!(publ.recv(), Packet::PubRec(11));
    publ.send(&Packet::PubRel(11));
    assert_eq!(publ.recv(), Packet::PubComp(11));

    let one = publish_of(sub.recv());
    let two = publish_of(sub.recv());
    assert_eq!(
        (one.topic.as_str(), one.qos, one.dup),
        ("r/one", QoS::AtLeastOnce, false)
    );
    assert_eq!(
        (two.topic.as_str(), two.qos, two.dup),
        ("r/two", QoS::ExactlyOnce, false)
    );
    // Acknowledge nothing and vanish.
    drop(sub);

    let (mut sub, present) = Peer::connect(addr, "resumer", false);
    assert!(present);
    let r1 = publish_of(sub.recv());
    let r2 = publish_of(sub.recv());
    assert!(r1.dup && r2.dup, "resent with DUP");
    assert_eq!(r1.pkid, one.pkid, "original packet id");
    assert_eq!(r2.pkid, two.pkid);
    assert_eq!(r1.topic.as_str(), "r/one", "order kept");
    // Complete QoS 1; for QoS 2 send PUBREC, receive PUBREL, then vanish before PUBCOMP.
    sub.send(&Packet::PubAck(r1.pkid.unwrap()));
    sub.send(&Packet::PubRec(r2.pkid.unwrap()));
    assert_eq!(sub.recv(), Packet::PubRel(r2.pkid.unwrap()));
    drop(sub);

    let (mut sub, present) = Peer::connect(addr, "resumer", false);
    assert!(present);
    assert_eq!(
        sub.recv(),
        Packet::PubRel(r2.pkid.unwrap()),
        "PUBREL is resent, not the PUBLISH"
    );
    sub.send(&Packet::PubComp(r2.pkid.unwrap()));
    sub.ping();
    drop(sub);

    let (mut sub, _) = Peer::connect(addr, "resumer", false);
    assert_eq!(
        sub.try_recv(Duration::from_millis(500)),
        None,
        "nothing left to resend"
    );
}

#[test]
fn qos2_publish_sent_twice_is_routed_once() {
    let b = TestBroker::start(BrokerConfig::default());
    let addr = b.addr("tcp");
    let (mut sub, _) = Peer::connect(addr, "watch", true);
    sub.subscribe("x/#", QoS::AtLeastOnce);
    let (mut publ, _) = Peer::connect(addr, "twice", true);
    publ.publish("x/y", QoS::ExactlyOnce, Some(7), false, b"once");
    assert_eq!(publ.recv(), Packet::PubRec(7));
    publ.publish("x/y", QoS::ExactlyOnce, Some(7), true, b"once");
    assert_eq!(publ.recv(), Packet::PubRec(7));
    publ.send(&Packet::PubRel(7));
    assert_eq!(publ.recv(), Packet::PubComp(7));
    // After PUBREL the id is free again: a new message with id 7 is routed.
    publ.publish("x/z", QoS::ExactlyOnce, Some(7), false, b"next");
    assert_eq!(publ.recv(), Packet::PubRec(7));

    let first = publish_of(sub.recv());
    assert_eq!(first.topic.as_str(), "x/y");
    sub.send(&Packet::PubAck(first.pkid.unwrap()));
    let second = publish_of(sub.recv());
    assert_eq!(second.topic.as_str(), "x/z", "the duplicate was not routed");
}

#[test]
fn clean_session_discards_persistent_state() {
    let b = TestBroker::start(BrokerConfig::default());
    let addr = b.addr("tcp");
    let (mut sub, _) = Peer::connect(addr, "c", false);
    sub.subscribe("q/#", QoS::AtLeastOnce);
    drop(sub);
    let (mut publ, _) = Peer::connect(addr, "p", true);
    publ.publish("q/1", QoS::AtLeastOnce, Some(1), false, b"x");
    assert_eq!(publ.recv(), Packet::PubAck(1));

    let (mut sub, present) = Peer::connect(addr, "c", true);
    assert!(!present, "a clean session never reports a present session");
    assert_eq!(
        sub.try_recv(Duration::from_millis(500)),
        None,
        "queued messages discarded"
    );
    drop(sub);
    let (_sub, present) = Peer::connect(addr, "c", false);
    assert!(!present, "the old persistent session is gone");
    publ.publish("q/2", QoS::AtLeastOnce, Some(2), false, b"x");
    assert_eq!(publ.recv(), Packet::PubAck(2));
}

/// A client whose subscriptions overlap gets one copy of a message, at the highest QoS
/// among the filters that match (MQTT-3.3.5-1), before and after a restart (restored
/// subscriptions, and one added after the restart); a client with one matching filter
/// beside it gets its own copy. The messages that follow show that no second copy came
/// first.
#[test]
fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
    let mut b = TestBroker::start(BrokerConfig::default());
    let addr = b.addr("tcp");
    let (mut over, _) = Peer::connect(addr, "overlap", false);
    over.subscribe("o/#", QoS::AtMostOnce);
    over.subscribe("o/+", QoS::AtLeastOnce);
    let (mut single, _) = Peer::connect(addr, "single", true);
    single.subscribe("o/a", QoS::AtMostOnce);

    let (mut publ, _) = Peer::connect(addr, "pub", true);
    publ.publish("o/a", QoS::AtLeastOnce, Some(1), false, b"one");
    assert_eq!(publ.recv(), Packet::PubAck(1));
    publ.publish("o/x/marker", QoS::AtMostOnce, None, false, b"m");
    publ.publish("o/a", QoS::AtMostOnce, None, false, b"after");
    publ.ping();

    let first = publish_of(over.recv());
    assert_eq!((first.topic.as_str(), first.qos), ("o/a", QoS::AtLeastOnce));
    over.send(&Packet::PubAck(first.pkid.unwrap()));
    let next = publish_of(over.recv());
    assert_eq!(next.topic.as_str(), "o/x/marker", "one copy of o/a only");
    let last = publish_of(over.recv());
    assert_eq!(
        (&last.payload[..], last.qos),
        (&b"after"[..], QoS::AtMostOnce)
    );
    let s = publish_of(single.recv());
    assert_eq!((&s.payload[..], s.qos), (&b"one"[..], QoS::AtMostOnce));
    let s = publish_of(single.recv());
    assert_eq!(&s.payload[..], b"after", "one copy of the first o/a only");
    // The broker has handled the PUBACK once it answers a later PINGREQ; a broker stopped
    // before that would rightly send the message again (DUP) after the restart.
    over.ping();
    drop((over, single, publ));

    b.restart(false);
    let addr = b.addr("tcp");
    let (mut over, present) = Peer::connect(addr, "overlap", false);
    assert!(
        present,
        "the persistent session and its subscriptions were restored"
    );
    over.subscribe("o/a", QoS::ExactlyOnce);
    let (mut publ, _) = Peer::connect(addr, "pub", true);
    publ.publish("o/a", QoS::AtLeastOnce, Some(2), false, b"two");
    assert_eq!(publ.recv(), Packet::PubAck(2));
    publ.publish("o/x/marker", QoS::AtMostOnce, None, false, b"m");
    publ.ping();
    let first = publish_of(over.recv());
    assert_eq!(
        (first.topic.as_str(), first.qos),
        ("o/a", QoS::AtLeastOnce),
        "QoS 1: the message's own QoS caps the highest subscription (2)"
    );
    over.send(&Packet::PubAck(first.pkid.unwrap()));
    let next = publish_of(over.recv());
    assert_eq!(next.topic.as_str(), "o/x/marker", "one copy of o/a only");
}
