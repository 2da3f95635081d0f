//! The hot path of the MQTT wire format, built on `bulwark_protocol::codec`.
//!
//! - [`PublishTemplate`]: a PUBLISH encoded once by the codec; each message is a copy of
//!   it with the packet identifier and the [`MessageId`] patched in, so sending allocates
//!   nothing and many messages go out in one `write_all`.
//! - [`next_incoming`]: PUBLISH packets are parsed in place (after the codec has checked
//!   the fixed header and the size limit) and only their id is kept; every other packet
//!   goes through [`decode`].
//! - [`PacketIds`]: the QoS 1 in-flight table of a publisher.

use anyhow::{anyhow, bail, Context, Result};
use bulwark_protocol::codec::{decode, encode, packet_type, peek_fixed_header, DecodeLimits};
use bulwark_protocol::packet::{Packet, Publish, QoS};
use bulwark_protocol::topic::TopicName;
use bytes::{Buf, Bytes, BytesMut};

use crate::payload::MessageId;

/// One PUBLISH, encoded once, stamped many times.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    bytes: Vec<u8>,
    /// Offset of the packet identifier (QoS 1 only).
    pkid_at: Option<usize>,
    /// Offset of the payload.
    payload_at: usize,
}

impl PublishTemplate {
    /// A PUBLISH to `topic` with a zero payload of `payload_len` bytes.
    pub fn new(topic: &str, qos: QoS, retain: bool, payload_len: usize) -> Result<Self> {
        let topic = TopicName::new(topic).with_context(|| format!("topic {topic:?}"))?;
        let qos1 = qos != QoS::AtMostOnce;
        let packet = Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic,
            pkid: qos1.then_some(1),
            payload: Bytes::from(vec![0u8; payload_len]),
        });
        let mut buf = BytesMut::new();
        encode(&packet, &mut buf).map_err(|e| anyhow!("encoding the PUBLISH template: {e}"))?;
        let payload_at = buf.len() - payload_len;
        Ok(PublishTemplate {
            bytes: buf.to_vec(),
            pkid_at: qos1.then(|| payload_at - 2),
            payload_at,
        })
    }

    /// Appends one PUBLISH to `out`. `pkid` must be `Some` exactly for QoS 1 templates;
    /// `id` is written at the start of the payload when given (the payload must then be
    /// at least [`crate::payload::ID_LEN`] bytes).
    pub fn append(&self, out: &mut BytesMut, pkid: Option<u16>, id: Option<MessageId>) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let packet = &mut out[start..];
        if let (Some(at), Some(pkid)) = (self.pkid_at, pkid) {
            packet[at..at + 2].copy_from_slice(&pkid.to_be_bytes());
        }
        if let Some(id) = id {
            id.write_to(&mut packet[self.payload_at..]);
        }
    }

    /// Encoded size of one message.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// A packet read from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A PUBLISH, reduced to what the benchmark needs.
    Publish {
        pkid: Option<u16>,
        retain: bool,
        /// `None` when the payload is too short to carry one.
        id: Option<MessageId>,
    },
    /// Any other packet, fully decoded.
    Other(Packet),
}

/// Takes the next complete packet off the front of `buf`; `Ok(None)` when more bytes are
/// needed.
pub fn next_incoming(buf: &mut BytesMut, limits: &DecodeLimits) -> Result<Option<Incoming>> {
    let Some(header) =
        peek_fixed_header(buf, limits).map_err(|e| anyhow!("bad packet from broker: {e}"))?
    else {
        return Ok(None);
    };
    let len = header.packet_len();
    if buf.len() < len {
        return Ok(None);
    }
    if header.packet_type != packet_type::PUBLISH {
        let packet = decode(buf, limits)
            .map_err(|e| anyhow!("bad packet from broker: {e}"))?
            .ok_or_else(|| anyhow!("codec wanted more bytes of a complete packet"))?;
        return Ok(Some(Incoming::Other(packet)));
    }
    let qos = (header.flags >> 1) & 0b11;
    let retain = header.flags & 1 != 0;
    let body = &buf[header.header_len..len];
    let Some(topic_len) = body
        .get(0..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        bail!("bad packet from broker: PUBLISH without a topic");
    };
    let mut at = 2 + topic_len;
    let pkid = if qos > 0 {
        let Some(b) = body.get(at..at + 2) else {
            bail!("bad packet from broker: PUBLISH too short for its packet identifier");
        };
        at += 2;
        Some(u16::from_be_bytes([b[0], b[1]]))
    } else {
        None
    };
    let Some(payload) = body.get(at..) else {
        bail!("bad packet from broker: PUBLISH topic longer than the packet");
    };
    let id = MessageId::read_from(payload);
    buf.advance(len);
    Ok(Some(Incoming::Publish { pkid, retain, id }))
}

/// Packet identifiers a QoS 1 publisher has in flight.
#[derive(Debug, Clone)]
pub struct PacketIds {
    in_use: Vec<u64>,
    next: u16,
    count: usize,
}

impl Default for PacketIds {
    fn default() -> Self {
        PacketIds {
            in_use: vec![0; 65536 / 64],
            next: 1,
            count: 0,
        }
    }
}

impl PacketIds {
    /// A free identifier, marked in use; `None` when all 65535 are in flight.
    pub fn allocate(&mut self) -> Option<u16> {
        if self.count >= 65535 {
            return None;
        }
        loop {
            let id = self.next;
            self.next = if id == u16::MAX { 1 } else { id + 1 };
            let (word, mask) = Self::slot(id);
            if self.in_use[word] & mask == 0 {
                self.in_use[word] |= mask;
                self.count += 1;
                return Some(id);
            }
        }
    }

    /// Releases `id`; `false` if it was not in flight (a stray or repeated PUBACK).
    pub fn release(&mut self, id: u16) -> bool {
        let (word, mask) = Self::slot(id);
        if self.in_use[word] & mask == 0 {
            return false;
        }
        self.in_use[word] &= !mask;
        self.count -= 1;
        true
    }

    /// Identifiers in flight.
    pub fn in_flight(&self) -> usize {
        self.count
    }

    fn slot(id: u16) -> (usize, u64) {
        (usize::from(id / 64), 1u64 << (id % 64))
    }
}

/// Appends a PUBACK for `pkid`.
pub fn put_puback(out: &mut BytesMut, pkid: u16) {
    // PUBACK with a non-zero identifier always encodes; 0 never comes from a decoded PUBLISH.
    let _ = encode(&Packet::PubAck(pkid), out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_stamps_decode_through_the_codec() {
        let t = PublishTemplate::new("bench/fanin/3", QoS::AtLeastOnce, true, 40).unwrap();
        let mut out = BytesMut::new();
        let id = MessageId {
            publisher: 3,
            seq: 77,
            sent_ns: 123,
        };
        t.append(&mut out, Some(513), Some(id));
        t.append(&mut out, Some(514), None);
        assert_eq!(out.len(), 2 * t.len());
        let limits = DecodeLimits::default();
        let mut copy = out.clone();
        match decode(&mut copy, &limits).unwrap().unwrap() {
            Packet::Publish(p) => {
                assert_eq!(p.topic.as_str(), "bench/fanin/3");
                assert_eq!(p.pkid, Some(513));
                assert!(p.retain);
                assert_eq!(p.payload.len(), 40);
                assert_eq!(MessageId::read_from(&p.payload), Some(id));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            next_incoming(&mut out, &limits).unwrap(),
            Some(Incoming::Publish {
                pkid: Some(513),
                retain: true,
                id: Some(id)
            })
        );
        // The second copy still has the template's zero payload.
        assert_eq!(
            next_incoming(&mut out, &limits).unwrap(),
            Some(Incoming::Publish {
                pkid: Some(514),
                retain: true,
                id: Some(MessageId {
                    publisher: 0,
                    seq: 0,
                    sent_ns: 0
                })
            })
        );
        assert!(out.is_empty());
    }

    #[test]
    fn qos0_template_and_partial_input() {
        let t = PublishTemplate::new("bench/fanout", QoS::AtMostOnce, false, 24).unwrap();
        let mut whole = BytesMut::new();
        let id = MessageId {
            publisher: 0,
            seq: 5,
            sent_ns: 9,
        };
        t.append(&mut whole, None, Some(id));
        let limits = DecodeLimits::default();
        let mut partial = BytesMut::from(&whole[..whole.len() - 1]);
        assert_eq!(next_incoming(&mut partial, &limits).unwrap(), None);
        assert_eq!(partial.len(), whole.len() - 1, "nothing consumed");
        partial.extend_from_slice(&whole[whole.len() - 1..]);
        assert_eq!(
            next_incoming(&mut partial, &limits).unwrap(),
            Some(Incoming::Publish {
                pkid: None,
                retain: false,
                id: Some(id)
            })
        );
    }

    #[test]
    fn other_packets_go_through_the_codec() {
        let mut buf = BytesMut::new();
        put_puback(&mut buf, 9);
        encode(&Packet::PingResp, &mut buf).unwrap();
        let limits = DecodeLimits::default();
        assert_eq!(
            next_incoming(&mut buf, &limits).unwrap(),
            Some(Incoming::Other(Packet::PubAck(9)))
        );
        assert_eq!(
            next_incoming(&mut buf, &limits).unwrap(),
            Some(Incoming::Other(Packet::PingResp))
        );
        assert_eq!(next_incoming(&mut buf, &limits).unwrap(), None);
    }

    #[test]
    fn malformed_publish_is_an_error() {
        // PUBLISH QoS 1, remaining length 3: topic length 1, topic "a", no room for pkid.
        let mut buf = BytesMut::from(&[0x32, 3, 0, 1, b'a'][..]);
        assert!(next_incoming(&mut buf, &DecodeLimits::default()).is_err());
        // Topic length beyond the packet.
        let mut buf = BytesMut::from(&[0x30, 2, 0, 9][..]);
        assert!(next_incoming(&mut buf, &DecodeLimits::default()).is_err());
    }

    #[test]
    fn packet_ids_wrap_and_skip_ids_in_use() {
        let mut ids = PacketIds::default();
        let first = ids.allocate().unwrap();
        assert_eq!(first, 1);
        for _ in 0..65533 {
            ids.allocate().unwrap();
        }
        assert_eq!(ids.in_flight(), 65534);
        assert!(ids.release(7));
        assert!(!ids.release(7), "released twice");
        // 65535 is still free, then the search wraps past 1..=6 (in use) to 7.
        assert_eq!(ids.allocate(), Some(65535));
        assert_eq!(ids.allocate(), Some(7));
        assert_eq!(ids.allocate(), None, "all 65535 in flight");
        assert!(ids.release(1));
        assert_eq!(ids.allocate(), Some(1));
        assert!(!ids.release(0));
    }
}
