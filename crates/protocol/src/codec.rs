//! MQTT 3.1.1 wire format: [`decode`] and [`encode`].
//!
//! Decoding is strict: every rule of the spec that a receiver can check from the bytes is a
//! [`DecodeError`]. The fixed header is read first ([`peek_fixed_header`]) and the packet
//! size, the flags and the length of fixed-size packets are checked from it alone, before
//! the body is waited for or anything is allocated. A complete packet is then split off the
//! buffer and frozen, so payloads and binary fields are zero-copy slices of it.
//!
//! Encoding checks what the wire format and the spec require of a sender (packet
//! identifiers, field lengths, non-empty lists) and writes nothing when it fails.

use bytes::{Buf as _, BufMut, Bytes, BytesMut};

use crate::packet::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, ProtocolLevel, Publish, QoS, SubAck,
    Subscribe, SubscribeReturnCode, Unsubscribe,
};
use crate::topic::{TopicFilter, TopicName};

/// Largest remaining length the four-byte variable-length encoding can carry (§2.2.3).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Longest string or binary field: its length prefix is two bytes (§1.5.3).
const MAX_FIELD_LEN: usize = 65535;

/// Limits the decoder enforces before allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest whole packet (fixed header + remaining length) accepted, in bytes.
    pub max_packet_size: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_packet_size: 1024 * 1024,
        }
    }
}

/// The fixed header of a packet whose remaining length is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// Control packet type, 1..=14 (0 and 15 are rejected by `peek_fixed_header`).
    pub packet_type: u8,
    /// The low four bits of the first byte.
    pub flags: u8,
    /// Remaining length as declared.
    pub remaining_length: usize,
    /// Bytes taken by the fixed header itself (2..=5).
    pub header_len: usize,
}

impl FixedHeader {
    /// Whole packet size: header plus remaining length.
    pub fn packet_len(&self) -> usize {
        self.header_len + self.remaining_length
    }
}

/// Packet type numbers (MQTT 3.1.1 §2.2.1).
pub mod packet_type {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
}

/// Why bytes could not be decoded. Every variant means "close the connection", except the
/// two CONNECT refusals the spec answers with a CONNACK first (see [`DecodeError::connack_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet of {size} bytes exceeds the limit of {max} bytes")]
    PacketTooLarge { size: usize, max: usize },
    #[error("remaining length is longer than four bytes")]
    MalformedRemainingLength,
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    #[error("invalid fixed-header flags {flags:#06b} for packet type {packet_type}")]
    InvalidFlags { packet_type: u8, flags: u8 },
    #[error("protocol name {0:?} is not \"MQTT\"")]
    InvalidProtocolName(String),
    /// Answer with CONNACK 0x01, then close (§3.1.2-2).
    #[error("unsupported protocol level {0}")]
    UnacceptableProtocolLevel(u8),
    /// Answer with CONNACK 0x02, then close (§3.1.3-8).
    #[error("client identifier rejected: {0}")]
    ClientIdRejected(&'static str),
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("invalid UTF-8 string: {0}")]
    InvalidString(&'static str),
    #[error("invalid topic: {0}")]
    InvalidTopic(#[from] crate::topic::TopicError),
}

impl DecodeError {
    /// The CONNACK return code the server must send before closing, if any.
    pub fn connack_code(&self) -> Option<crate::packet::ConnectReturnCode> {
        match self {
            DecodeError::UnacceptableProtocolLevel(_) => {
                Some(crate::packet::ConnectReturnCode::UnacceptableProtocolVersion)
            }
            DecodeError::ClientIdRejected(_) => {
                Some(crate::packet::ConnectReturnCode::IdentifierRejected)
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("packet too large to encode: {0} bytes of remaining length")]
    TooLarge(usize),
    #[error("string longer than 65535 bytes")]
    StringTooLong,
    #[error("invalid packet: {0}")]
    Invalid(&'static str),
}

/// Reads the fixed header at the start of `buf` without consuming anything.
/// `Ok(None)`: not enough bytes yet. Errors on a fifth length byte, a reserved type, or a
/// packet larger than `limits.max_packet_size` (checked from the header alone). It also
/// rejects, as early as the bytes allow, flags that are invalid for the packet type
/// ([`DecodeError::InvalidFlags`]: QoS 3, DUP with QoS 0, PUBREL/SUBSCRIBE/UNSUBSCRIBE not
/// `0b0010`, any other non-PUBLISH not `0`) and fixed-size packets whose remaining length is
/// not their size ([`DecodeError::Malformed`]).
pub fn peek_fixed_header(
    buf: &[u8],
    limits: &DecodeLimits,
) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let packet_type = first >> 4;
    let flags = first & 0x0f;
    check_type_and_flags(packet_type, flags)?;

    let mut remaining_length = 0usize;
    let mut header_len = 1;
    loop {
        if header_len == 5 {
            // Four length bytes, the last one still saying "more follows".
            return Err(DecodeError::MalformedRemainingLength);
        }
        let Some(&byte) = buf.get(header_len) else {
            return Ok(None);
        };
        remaining_length |= usize::from(byte & 0x7f) << (7 * (header_len - 1));
        header_len += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }

    let header = FixedHeader {
        packet_type,
        flags,
        remaining_length,
        header_len,
    };
    if header.packet_len() > limits.max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: header.packet_len(),
            max: limits.max_packet_size,
        });
    }
    if let Some(size) = fixed_remaining_length(packet_type) {
        if remaining_length != size {
            return Err(DecodeError::Malformed(if size == 0 {
                "remaining length of a PINGREQ, PINGRESP or DISCONNECT must be 0"
            } else {
                "remaining length of CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK must be 2"
            }));
        }
    }
    Ok(Some(header))
}

/// Decodes one packet from the front of `buf`, consuming its bytes. `Ok(None)` means more
/// bytes are needed (normal flow). The size limit is checked from the fixed header before
/// anything is allocated.
///
/// On `Ok(None)` nothing is consumed. On an error found in the fixed header nothing is
/// consumed either; on an error found in the body the whole packet has been consumed. Either
/// way the connection must be closed (after a CONNACK for [`DecodeError::connack_code`]).
pub fn decode(buf: &mut BytesMut, limits: &DecodeLimits) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = peek_fixed_header(buf, limits)? else {
        return Ok(None);
    };
    if buf.len() < header.packet_len() {
        // Wait for the body; do not reserve room for it from the declared length.
        return Ok(None);
    }
    if let Some(packet) = decode_in_place(&header, &buf[header.header_len..header.packet_len()]) {
        buf.advance(header.packet_len());
        return packet.map(Some);
    }
    let mut frame = buf.split_to(header.packet_len()).freeze();
    let body = frame.split_off(header.header_len);
    decode_body(&header, Reader { buf: body }).map(Some)
}

/// The packets whose body is at most a packet identifier (acknowledgements, PINGREQ,
/// PINGRESP, DISCONNECT), decoded from the buffer in place: no shared handle on it, so
/// no reference counting per acknowledgement. `None` for the other packet types.
fn decode_in_place(header: &FixedHeader, body: &[u8]) -> Option<Result<Packet, DecodeError>> {
    use packet_type::*;
    let pkid = || {
        let [hi, lo, rest @ ..] = body else {
            return Err(TRUNCATED);
        };
        match u16::from_be_bytes([*hi, *lo]) {
            0 => Err(PKID_ZERO),
            _ if !rest.is_empty() => Err(LEFT_OVER),
            id => Ok(id),
        }
    };
    let empty = |p| {
        if body.is_empty() {
            Ok(p)
        } else {
            Err(LEFT_OVER)
        }
    };
    Some(match header.packet_type {
        PUBACK => pkid().map(Packet::PubAck),
        PUBREC => pkid().map(Packet::PubRec),
        PUBREL => pkid().map(Packet::PubRel),
        PUBCOMP => pkid().map(Packet::PubComp),
        UNSUBACK => pkid().map(Packet::UnsubAck),
        PINGREQ => empty(Packet::PingReq),
        PINGRESP => empty(Packet::PingResp),
        DISCONNECT => empty(Packet::Disconnect),
        _ => return None,
    })
}

/// Appends the wire form of `packet` to `buf`.
///
/// Fails, leaving `buf` untouched, when the packet could not be decoded by a conforming
/// receiver: a packet identifier missing, present or 0 where it must not be, a string or
/// binary field over 65535 bytes, a string containing U+0000, an empty SUBSCRIBE,
/// UNSUBSCRIBE or SUBACK, or a remaining length over [`MAX_REMAINING_LENGTH`].
pub fn encode(packet: &Packet, buf: &mut BytesMut) -> Result<(), EncodeError> {
    validate_for_encode(packet)?;
    let remaining = remaining_length(packet);
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge(remaining));
    }
    buf.reserve(1 + length_field_len(remaining) + remaining);
    buf.put_u8(first_byte(packet));
    put_remaining_length(buf, remaining);
    match packet {
        Packet::Connect(c) => {
            put_str(buf, "MQTT");
            buf.put_u8(4);
            let mut flags = 0u8;
            if c.clean_session {
                flags |= 0b0000_0010;
            }
            if let Some(will) = &c.will {
                flags |= 0b0000_0100 | (will.qos as u8) << 3;
                if will.retain {
                    flags |= 0b0010_0000;
                }
            }
            if c.password.is_some() {
                flags |= 0b0100_0000;
            }
            if c.username.is_some() {
                flags |= 0b1000_0000;
            }
            buf.put_u8(flags);
            buf.put_u16(c.keep_alive);
            put_str(buf, &c.client_id);
            if let Some(will) = &c.will {
                put_str(buf, will.topic.as_str());
                put_binary(buf, &will.payload);
            }
            if let Some(username) = &c.username {
                put_str(buf, username);
            }
            if let Some(password) = &c.password {
                put_binary(buf, password);
            }
        }
        Packet::ConnAck(ack) => {
            buf.put_u8(u8::from(ack.session_present));
            buf.put_u8(ack.code as u8);
        }
        Packet::Publish(p) => {
            put_str(buf, p.topic.as_str());
            if let Some(pkid) = p.pkid {
                buf.put_u16(pkid);
            }
            buf.put_slice(&p.payload);
        }
        Packet::PubAck(pkid)
        | Packet::PubRec(pkid)
        | Packet::PubRel(pkid)
        | Packet::PubComp(pkid)
        | Packet::UnsubAck(pkid) => buf.put_u16(*pkid),
        Packet::Subscribe(s) => {
            buf.put_u16(s.pkid);
            for (filter, qos) in &s.filters {
                put_str(buf, filter.as_str());
                buf.put_u8(*qos as u8);
            }
        }
        Packet::SubAck(s) => {
            buf.put_u16(s.pkid);
            for code in &s.return_codes {
                buf.put_u8(match code {
                    SubscribeReturnCode::Success(qos) => *qos as u8,
                    SubscribeReturnCode::Failure => 0x80,
                });
            }
        }
        Packet::Unsubscribe(u) => {
            buf.put_u16(u.pkid);
            for filter in &u.filters {
                put_str(buf, filter.as_str());
            }
        }
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => {}
    }
    Ok(())
}

/// Bytes [`encode`] appends for `packet` (fixed header included) when it succeeds. For a
/// packet that `encode` rejects the value is only the size its fields would take.
pub fn encoded_len(packet: &Packet) -> usize {
    let remaining = remaining_length(packet);
    1usize
        .saturating_add(length_field_len(remaining))
        .saturating_add(remaining)
}

// ---------------------------------------------------------------------------------------
// Fixed header

fn check_type_and_flags(packet_type: u8, flags: u8) -> Result<(), DecodeError> {
    use packet_type::*;
    let ok = match packet_type {
        0 | 15 => return Err(DecodeError::ReservedPacketType(packet_type)),
        PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            let dup = flags & 0b1000 != 0;
            qos != 3 && !(dup && qos == 0)
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => flags == 0b0010,
        _ => flags == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(DecodeError::InvalidFlags { packet_type, flags })
    }
}

/// The remaining length a packet type always has, if it is fixed.
fn fixed_remaining_length(packet_type: u8) -> Option<usize> {
    use packet_type::*;
    match packet_type {
        CONNACK | PUBACK | PUBREC | PUBREL | PUBCOMP | UNSUBACK => Some(2),
        PINGREQ | PINGRESP | DISCONNECT => Some(0),
        _ => None,
    }
}

/// The control packet type number (1..=14) of `packet`.
pub fn type_of(packet: &Packet) -> u8 {
    first_byte(packet) >> 4
}

fn first_byte(packet: &Packet) -> u8 {
    use packet_type::*;
    let (packet_type, flags) = match packet {
        Packet::Connect(_) => (CONNECT, 0),
        Packet::ConnAck(_) => (CONNACK, 0),
        Packet::Publish(p) => (
            PUBLISH,
            u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain),
        ),
        Packet::PubAck(_) => (PUBACK, 0),
        Packet::PubRec(_) => (PUBREC, 0),
        Packet::PubRel(_) => (PUBREL, 0b0010),
        Packet::PubComp(_) => (PUBCOMP, 0),
        Packet::Subscribe(_) => (SUBSCRIBE, 0b0010),
        Packet::SubAck(_) => (SUBACK, 0),
        Packet::Unsubscribe(_) => (UNSUBSCRIBE, 0b0010),
        Packet::UnsubAck(_) => (UNSUBACK, 0),
        Packet::PingReq => (PINGREQ, 0),
        Packet::PingResp => (PINGRESP, 0),
        Packet::Disconnect => (DISCONNECT, 0),
    };
    packet_type << 4 | flags
}

fn length_field_len(remaining: usize) -> usize {
    match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_remaining_length(buf: &mut BytesMut, mut remaining: usize) {
    loop {
        let mut byte = (remaining % 128) as u8;
        remaining /= 128;
        if remaining > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if remaining == 0 {
            break;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Decoding the body

/// A cursor over the body of one packet. Every read checks the bytes are there.
struct Reader {
    buf: Bytes,
}

const PKID_ZERO: DecodeError = DecodeError::Malformed("packet identifier 0");
const LEFT_OVER: DecodeError = DecodeError::Malformed("bytes left over after the last field");
const TRUNCATED: DecodeError = DecodeError::Malformed("a field runs past the end of the packet");

impl Reader {
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&byte, _) = self.buf.split_first().ok_or(TRUNCATED)?;
        self.buf = self.buf.slice(1..);
        Ok(byte)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn pkid(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(PKID_ZERO),
            pkid => Ok(pkid),
        }
    }

    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if n > self.buf.len() {
            return Err(TRUNCATED);
        }
        Ok(self.buf.split_to(n))
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// A two-byte length followed by that many bytes (§1.5.6 binary data).
    fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()?;
        if usize::from(len) > self.buf.len() {
            return Err(DecodeError::Malformed(
                "string or binary length exceeds the packet",
            ));
        }
        self.take(usize::from(len))
    }

    /// A UTF-8 encoded string (§1.5.3): well-formed UTF-8 (no surrogates), no U+0000.
    fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.binary()?;
        let s = std::str::from_utf8(&bytes)
            .map_err(|_| DecodeError::InvalidString("not well-formed UTF-8"))?;
        if s.contains('\0') {
            return Err(DecodeError::InvalidString("contains U+0000"));
        }
        Ok(s.to_owned())
    }

    fn topic_name(&mut self) -> Result<TopicName, DecodeError> {
        Ok(TopicName::new(self.string()?)?)
    }

    fn topic_filter(&mut self) -> Result<TopicFilter, DecodeError> {
        Ok(TopicFilter::new(self.string()?)?)
    }

    /// The packet's fields must use exactly its remaining length.
    fn finish(self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(LEFT_OVER)
        }
    }
}

fn decode_body(header: &FixedHeader, mut r: Reader) -> Result<Packet, DecodeError> {
    use packet_type::*;
    // Acknowledgements and the empty packets have one decoder, the in-place one.
    if let Some(packet) = decode_in_place(header, &r.buf) {
        return packet;
    }
    let packet = match header.packet_type {
        CONNECT => Packet::Connect(decode_connect(&mut r)?),
        CONNACK => Packet::ConnAck(decode_connack(&mut r)?),
        PUBLISH => Packet::Publish(decode_publish(header.flags, &mut r)?),
        SUBSCRIBE => Packet::Subscribe(decode_subscribe(&mut r)?),
        SUBACK => Packet::SubAck(decode_suback(&mut r)?),
        UNSUBSCRIBE => Packet::Unsubscribe(decode_unsubscribe(&mut r)?),
        other => return Err(DecodeError::ReservedPacketType(other)),
    };
    r.finish()?;
    Ok(packet)
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary()?;
    if &name[..] == b"MQIsdp" {
        // An MQTT 3.1 client: tell it the version is unacceptable (§3.1.2.2, and what
        // Mosquitto answers) rather than just closing.
        let level = r.u8()?;
        return Err(DecodeError::UnacceptableProtocolLevel(level));
    }
    if &name[..] != b"MQTT" {
        let mut shown = String::from_utf8_lossy(&name).into_owned();
        if let Some((cut, _)) = shown.char_indices().nth(32) {
            shown.truncate(cut);
            shown.push('…');
        }
        return Err(DecodeError::InvalidProtocolName(shown));
    }
    let level = r.u8()?;
    if level != 4 {
        // Answered with CONNACK 0x01 before anything else is read: a newer client's CONNECT
        // may not follow the 3.1.1 layout from here on.
        return Err(DecodeError::UnacceptableProtocolLevel(level));
    }
    let flags = r.u8()?;
    if flags & 0b0000_0001 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag is set"));
    }
    let clean_session = flags & 0b0000_0010 != 0;
    let will_flag = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    let password_flag = flags & 0b0100_0000 != 0;
    let username_flag = flags & 0b1000_0000 != 0;
    let will_qos = match (will_flag, QoS::from_u8(will_qos)) {
        (_, None) => return Err(DecodeError::Malformed("will QoS 3")),
        (false, Some(qos)) if qos != QoS::AtMostOnce || will_retain => {
            return Err(DecodeError::Malformed(
                "will QoS or will retain set without a will",
            ))
        }
        (_, Some(qos)) => qos,
    };
    if password_flag && !username_flag {
        return Err(DecodeError::Malformed(
            "password flag set without the user name flag",
        ));
    }
    let keep_alive = r.u16()?;

    let client_id = r.string()?;
    let will = if will_flag {
        let topic = r.topic_name()?;
        let payload = r.binary()?;
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    // The packet is well-formed only if nothing follows; check before refusing the client id
    // so that a malformed packet is never answered with a CONNACK.
    if !r.is_empty() {
        return Err(DecodeError::Malformed(
            "bytes left over after the last field",
        ));
    }
    if client_id.is_empty() && !clean_session {
        return Err(DecodeError::ClientIdRejected(
            "an empty client identifier requires clean session",
        ));
    }
    Ok(Connect {
        protocol: ProtocolLevel::V311,
        clean_session,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn decode_connack(r: &mut Reader) -> Result<ConnAck, DecodeError> {
    let ack_flags = r.u8()?;
    if ack_flags & 0b1111_1110 != 0 {
        return Err(DecodeError::Malformed(
            "reserved CONNACK acknowledge flags are set",
        ));
    }
    let session_present = ack_flags & 1 != 0;
    let code = match r.u8()? {
        0 => ConnectReturnCode::Accepted,
        1 => ConnectReturnCode::UnacceptableProtocolVersion,
        2 => ConnectReturnCode::IdentifierRejected,
        3 => ConnectReturnCode::ServerUnavailable,
        4 => ConnectReturnCode::BadUsernameOrPassword,
        5 => ConnectReturnCode::NotAuthorized,
        _ => return Err(DecodeError::Malformed("reserved CONNACK return code")),
    };
    if session_present && code != ConnectReturnCode::Accepted {
        return Err(DecodeError::Malformed(
            "session present with a refusing CONNACK",
        ));
    }
    Ok(ConnAck {
        session_present,
        code,
    })
}

fn decode_publish(flags: u8, r: &mut Reader) -> Result<Publish, DecodeError> {
    // peek_fixed_header has rejected QoS 3 and DUP with QoS 0.
    let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or(DecodeError::InvalidFlags {
        packet_type: packet_type::PUBLISH,
        flags,
    })?;
    let topic = r.topic_name()?;
    let pkid = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(r.pkid()?)
    };
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        pkid,
        payload: r.rest(),
    })
}

fn decode_subscribe(r: &mut Reader) -> Result<Subscribe, DecodeError> {
    let pkid = r.pkid()?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.topic_filter()?;
        let requested = r.u8()?;
        let qos = match QoS::from_u8(requested) {
            Some(qos) => qos,
            None => return Err(DecodeError::Malformed("requested QoS is not 0, 1 or 2")),
        };
        filters.push((filter, qos));
    }
    if filters.is_empty() {
        return Err(DecodeError::Malformed("SUBSCRIBE without a topic filter"));
    }
    Ok(Subscribe { pkid, filters })
}

fn decode_suback(r: &mut Reader) -> Result<SubAck, DecodeError> {
    let pkid = r.pkid()?;
    let mut return_codes = Vec::new();
    while !r.is_empty() {
        return_codes.push(match r.u8()? {
            0 => SubscribeReturnCode::Success(QoS::AtMostOnce),
            1 => SubscribeReturnCode::Success(QoS::AtLeastOnce),
            2 => SubscribeReturnCode::Success(QoS::ExactlyOnce),
            0x80 => SubscribeReturnCode::Failure,
            _ => {
                return Err(DecodeError::Malformed(
                    "SUBACK return code not 0, 1, 2 or 0x80",
                ))
            }
        });
    }
    if return_codes.is_empty() {
        return Err(DecodeError::Malformed("SUBACK without a return code"));
    }
    Ok(SubAck { pkid, return_codes })
}

fn decode_unsubscribe(r: &mut Reader) -> Result<Unsubscribe, DecodeError> {
    let pkid = r.pkid()?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.topic_filter()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Malformed("UNSUBSCRIBE without a topic filter"));
    }
    Ok(Unsubscribe { pkid, filters })
}

// ---------------------------------------------------------------------------------------
// Encoding

fn check_pkid(pkid: u16) -> Result<(), EncodeError> {
    if pkid == 0 {
        Err(EncodeError::Invalid("packet identifier 0"))
    } else {
        Ok(())
    }
}

fn check_str(s: &str) -> Result<(), EncodeError> {
    if s.len() > MAX_FIELD_LEN {
        Err(EncodeError::StringTooLong)
    } else if s.contains('\0') {
        Err(EncodeError::Invalid("string contains U+0000"))
    } else {
        Ok(())
    }
}

fn check_binary(b: &[u8]) -> Result<(), EncodeError> {
    if b.len() > MAX_FIELD_LEN {
        Err(EncodeError::Invalid("binary field longer than 65535 bytes"))
    } else {
        Ok(())
    }
}

fn validate_for_encode(packet: &Packet) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(c) => {
            check_str(&c.client_id)?;
            if c.client_id.is_empty() && !c.clean_session {
                return Err(EncodeError::Invalid(
                    "an empty client identifier requires clean session",
                ));
            }
            if let Some(will) = &c.will {
                check_binary(&will.payload)?;
            }
            if let Some(username) = &c.username {
                check_str(username)?;
            }
            if let Some(password) = &c.password {
                if c.username.is_none() {
                    return Err(EncodeError::Invalid("password without a user name"));
                }
                check_binary(password)?;
            }
        }
        Packet::ConnAck(ack) => {
            if ack.session_present && ack.code != ConnectReturnCode::Accepted {
                return Err(EncodeError::Invalid(
                    "session present with a refusing CONNACK",
                ));
            }
        }
        Packet::Publish(p) => match (p.qos, p.pkid) {
            (QoS::AtMostOnce, Some(_)) => {
                return Err(EncodeError::Invalid("packet identifier on a QoS 0 PUBLISH"))
            }
            (QoS::AtMostOnce, None) if p.dup => {
                return Err(EncodeError::Invalid("DUP set on a QoS 0 PUBLISH"))
            }
            (QoS::AtMostOnce, None) => {}
            (_, None) => {
                return Err(EncodeError::Invalid(
                    "QoS 1 or 2 PUBLISH without a packet identifier",
                ))
            }
            (_, Some(pkid)) => check_pkid(pkid)?,
        },
        Packet::PubAck(pkid)
        | Packet::PubRec(pkid)
        | Packet::PubRel(pkid)
        | Packet::PubComp(pkid)
        | Packet::UnsubAck(pkid) => check_pkid(*pkid)?,
        Packet::Subscribe(s) => {
            check_pkid(s.pkid)?;
            if s.filters.is_empty() {
                return Err(EncodeError::Invalid("SUBSCRIBE without a topic filter"));
            }
        }
        Packet::SubAck(s) => {
            check_pkid(s.pkid)?;
            if s.return_codes.is_empty() {
                return Err(EncodeError::Invalid("SUBACK without a return code"));
            }
        }
        Packet::Unsubscribe(u) => {
            check_pkid(u.pkid)?;
            if u.filters.is_empty() {
                return Err(EncodeError::Invalid("UNSUBSCRIBE without a topic filter"));
            }
        }
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => {}
    }
    Ok(())
}

/// Remaining length of `packet` as encoded (saturating, so an absurd packet cannot wrap).
fn remaining_length(packet: &Packet) -> usize {
    let field = |len: usize| len.saturating_add(2);
    match packet {
        Packet::Connect(c) => {
            let mut n = field(4) + 1 + 1 + 2;
            n = n.saturating_add(field(c.client_id.len()));
            if let Some(will) = &c.will {
                n = n.saturating_add(field(will.topic.as_str().len()));
                n = n.saturating_add(field(will.payload.len()));
            }
            if let Some(username) = &c.username {
                n = n.saturating_add(field(username.len()));
            }
            if let Some(password) = &c.password {
                n = n.saturating_add(field(password.len()));
            }
            n
        }
        Packet::ConnAck(_) => 2,
        Packet::Publish(p) => field(p.topic.as_str().len())
            .saturating_add(if p.pkid.is_some() { 2 } else { 0 })
            .saturating_add(p.payload.len()),
        Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::UnsubAck(_) => 2,
        Packet::Subscribe(s) => s.filters.iter().fold(2usize, |n, (f, _)| {
            n.saturating_add(field(f.as_str().len()) + 1)
        }),
        Packet::SubAck(s) => s.return_codes.len().saturating_add(2),
        Packet::Unsubscribe(u) => u
            .filters
            .iter()
            .fold(2usize, |n, f| n.saturating_add(field(f.as_str().len()))),
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => 0,
    }
}

fn put_str(buf: &mut BytesMut, s: &str) {
    put_binary(buf, s.as_bytes());
}

fn put_binary(buf: &mut BytesMut, b: &[u8]) {
    // Lengths were checked by validate_for_encode (topics are <= 65535 by construction).
    buf.put_u16(b.len() as u16);
    buf.put_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::TopicError;

    const LIMITS: DecodeLimits = DecodeLimits {
        max_packet_size: 1024 * 1024,
    };

    fn dec(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        decode(&mut BytesMut::from(bytes), &LIMITS)
    }

    fn err(bytes: &[u8]) -> DecodeError {
        dec(bytes).expect_err("decode should fail")
    }

    fn malformed(bytes: &[u8]) {
        assert!(
            matches!(err(bytes), DecodeError::Malformed(_)),
            "{:?}",
            dec(bytes)
        );
    }

    fn enc(packet: &Packet) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode(packet, &mut buf).unwrap();
        assert_eq!(buf.len(), encoded_len(packet));
        buf.to_vec()
    }

    fn enc_err(packet: &Packet) -> EncodeError {
        let mut buf = BytesMut::from(&b"xy"[..]);
        let e = encode(packet, &mut buf).expect_err("encode should fail");
        assert_eq!(&buf[..], b"xy", "a failed encode wrote bytes");
        e
    }

    /// Fixed header + body with a correct remaining length.
    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        buf.put_u8(first);
        put_remaining_length(&mut buf, body.len());
        buf.put_slice(body);
        buf.to_vec()
    }

    fn s(v: &str) -> Vec<u8> {
        let mut out = (v.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(v.as_bytes());
        out
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn topic(t: &str) -> TopicName {
        TopicName::new(t).unwrap()
    }

    fn filter(f: &str) -> TopicFilter {
        TopicFilter::new(f).unwrap()
    }

    fn connect_body(flags: u8, payload: &[u8]) -> Vec<u8> {
        cat(&[&s("MQTT"), &[4, flags, 0, 60], payload])
    }

    // --- fixed header -------------------------------------------------------------------

    #[test]
    fn remaining_length_encodings() {
        for (n, wire) in [
            (0usize, &[0x00][..]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xff, 0xff, 0x7f]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (MAX_REMAINING_LENGTH, &[0xff, 0xff, 0xff, 0x7f]),
        ] {
            let mut buf = BytesMut::new();
            put_remaining_length(&mut buf, n);
            assert_eq!(&buf[..], wire, "{n}");
            assert_eq!(length_field_len(n), wire.len());
            let header = [&[0x30][..], wire].concat();
            let big = DecodeLimits {
                max_packet_size: usize::MAX,
            };
            let h = peek_fixed_header(&header, &big).unwrap().unwrap();
            assert_eq!((h.remaining_length, h.header_len), (n, 1 + wire.len()));
        }
    }

    #[test]
    fn fifth_remaining_length_byte_is_malformed() {
        let e = err(&[0x30, 0x80, 0x80, 0x80, 0x80]);
        assert_eq!(e, DecodeError::MalformedRemainingLength);
        let e = err(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01, 0, 0]);
        assert_eq!(e, DecodeError::MalformedRemainingLength);
        // Four continuation-free bytes are fine; an unfinished length just needs more bytes.
        assert_eq!(dec(&[0x30, 0x80, 0x80, 0x80]), Ok(None));
        assert_eq!(dec(&[0x30]), Ok(None));
        assert_eq!(dec(&[]), Ok(None));
    }

    #[test]
    fn oversized_packet_is_refused_from_the_header_alone() {
        // A PUBLISH header declaring 200 MB, and nothing else.
        let mut buf = BytesMut::new();
        buf.put_u8(0x30);
        put_remaining_length(&mut buf, 200 * 1024 * 1024);
        assert_eq!(buf.len(), 5);
        let capacity = buf.capacity();
        let e = decode(&mut buf, &LIMITS).unwrap_err();
        assert_eq!(
            e,
            DecodeError::PacketTooLarge {
                size: 200 * 1024 * 1024 + 5,
                max: LIMITS.max_packet_size
            }
        );
        assert_eq!(buf.capacity(), capacity, "decode grew the buffer");
        assert_eq!(buf.len(), 5);

        // The limit counts the fixed header too.
        let limits = DecodeLimits {
            max_packet_size: 10,
        };
        let ok = packet(0x30, &cat(&[&s("a/b"), b"xyz"])); // 2 + 8
        assert_eq!(ok.len(), 10);
        assert!(decode(&mut BytesMut::from(&ok[..]), &limits)
            .unwrap()
            .is_some());
        let big = packet(0x30, &cat(&[&s("a/b"), b"xyzw"]));
        assert_eq!(
            decode(&mut BytesMut::from(&big[..2]), &limits),
            Err(DecodeError::PacketTooLarge { size: 11, max: 10 })
        );
    }

    #[test]
    fn incomplete_body_waits_without_reserving() {
        let mut buf = BytesMut::with_capacity(8);
        buf.put_slice(&[0x30, 0x7f, 0x00, 0x01]);
        assert_eq!(decode(&mut buf, &LIMITS), Ok(None));
        assert_eq!(buf.len(), 4);
        assert_eq!(buf.capacity(), 8);
    }

    #[test]
    fn reserved_packet_types() {
        assert_eq!(err(&[0x00, 0x00]), DecodeError::ReservedPacketType(0));
        assert_eq!(err(&[0xf0, 0x00]), DecodeError::ReservedPacketType(15));
        // Detected from the first byte alone.
        assert_eq!(err(&[0xf0]), DecodeError::ReservedPacketType(15));
    }

    #[test]
    fn fixed_header_flags() {
        let bad = |first: u8, rest: &[u8]| {
            let e = err(&cat(&[&[first], rest]));
            assert_eq!(
                e,
                DecodeError::InvalidFlags {
                    packet_type: first >> 4,
                    flags: first & 0xf
                },
                "{first:#04x}"
            );
        };
        bad(0x60, &[2, 0, 1]); // PUBREL must be 0b0010
        bad(0x80, &[6, 0, 1, 0, 1, b'a', 0]); // SUBSCRIBE
        bad(0xa0, &[5, 0, 1, 0, 1, b'a']); // UNSUBSCRIBE
        bad(0xa3, &[5, 0, 1, 0, 1, b'a']);
        bad(0x11, &[]); // CONNECT
        bad(0x22, &[2, 0, 0]); // CONNACK
        bad(0x48, &[2, 0, 1]); // PUBACK
        bad(0x52, &[2, 0, 1]); // PUBREC
        bad(0x71, &[2, 0, 1]); // PUBCOMP
        bad(0x94, &[3, 0, 1, 0]); // SUBACK
        bad(0xb2, &[2, 0, 1]); // UNSUBACK
        bad(0xc1, &[0]); // PINGREQ
        bad(0xd8, &[0]); // PINGRESP
        bad(0xe2, &[0]); // DISCONNECT
        bad(0x36, &[]); // PUBLISH QoS 3
        bad(0x37, &[]);
        bad(0x38, &[]); // PUBLISH DUP with QoS 0
        bad(0x39, &[]);
        // The valid ones.
        assert_eq!(dec(&[0x62, 2, 0, 1]), Ok(Some(Packet::PubRel(1))));
        assert!(dec(&packet(0x3b, &cat(&[&s("t"), &[0, 1]])))
            .unwrap()
            .is_some());
    }

    #[test]
    fn fixed_size_packets_with_another_length_are_malformed() {
        for first in [0x20, 0x40, 0x50, 0x62, 0x70, 0xb0] {
            malformed(&[first, 3, 0, 1, 0]);
            malformed(&[first, 1, 0]);
            malformed(&[first, 0]);
            // Known from the header, before the body arrives.
            malformed(&[first, 3]);
        }
        for first in [0xc0, 0xd0, 0xe0] {
            malformed(&[first, 1, 0]);
            malformed(&[first, 1]);
        }
    }

    #[test]
    fn several_packets_in_one_buffer() {
        let mut buf = BytesMut::new();
        buf.put_slice(&[0xc0, 0x00, 0x40, 0x02, 0x12, 0x34, 0xe0]);
        assert_eq!(decode(&mut buf, &LIMITS), Ok(Some(Packet::PingReq)));
        assert_eq!(decode(&mut buf, &LIMITS), Ok(Some(Packet::PubAck(0x1234))));
        assert_eq!(decode(&mut buf, &LIMITS), Ok(None));
        buf.put_u8(0);
        assert_eq!(decode(&mut buf, &LIMITS), Ok(Some(Packet::Disconnect)));
        assert!(buf.is_empty());
    }

    // --- packet identifiers -------------------------------------------------------------

    #[test]
    fn packet_identifier_zero_is_malformed() {
        malformed(&packet(0x32, &cat(&[&s("t"), &[0, 0], b"x"])));
        malformed(&packet(0x34, &cat(&[&s("t"), &[0, 0]])));
        for first in [0x40, 0x50, 0x62, 0x70, 0xb0] {
            malformed(&[first, 2, 0, 0]);
        }
        malformed(&packet(0x82, &cat(&[&[0, 0], &s("a"), &[0]])));
        malformed(&packet(0x90, &[0, 0, 0]));
        malformed(&packet(0xa2, &cat(&[&[0, 0], &s("a")])));
    }

    // --- strings and topics -------------------------------------------------------------

    #[test]
    fn string_length_beyond_the_packet_is_malformed() {
        malformed(&packet(0x30, &[0, 5, b'a', b'b']));
        malformed(&packet(0x30, &[0]));
        malformed(&packet(0x10, &connect_body(0x02, &[0, 9, b'x'])));
        malformed(&packet(0x82, &[0, 1, 0, 9, b'a', 0]));
    }

    #[test]
    fn invalid_utf8_and_nul_are_rejected() {
        let bad = |bytes: &[u8]| {
            let mut topic = (bytes.len() as u16).to_be_bytes().to_vec();
            topic.extend_from_slice(bytes);
            let e = err(&packet(0x30, &topic));
            assert!(
                matches!(e, DecodeError::InvalidString(_)),
                "{bytes:?}: {e:?}"
            );
            let e = err(&packet(0x10, &connect_body(0x02, &topic)));
            assert!(
                matches!(e, DecodeError::InvalidString(_)),
                "client id {bytes:?}: {e:?}"
            );
        };
        bad(&[0xff]);
        bad(&[b'a', 0xc3]); // truncated sequence
        bad(&[0xc0, 0x80]); // overlong NUL
        bad(&[0xed, 0xa0, 0x80]); // U+D800, a surrogate
        bad(&[0xed, 0xbf, 0xbf]); // U+DFFF
        bad(&[0xf4, 0x90, 0x80, 0x80]); // above U+10FFFF
        bad(&[b'a', 0, b'b']); // U+0000
                               // Username too.
        let e = err(&packet(
            0x10,
            &connect_body(0x82, &cat(&[&s("c"), &s("u\0")])),
        ));
        assert!(matches!(e, DecodeError::InvalidString(_)));
        // Non-ASCII but valid is fine.
        let p = dec(&packet(0x30, &s("caf\u{e9}/\u{1F600}")))
            .unwrap()
            .unwrap();
        let Packet::Publish(p) = p else { panic!() };
        assert_eq!(p.topic.as_str(), "caf\u{e9}/\u{1F600}");
    }

    #[test]
    fn publish_topic_must_be_a_topic_name() {
        let bad = |t: &str, want: TopicError| {
            assert_eq!(
                err(&packet(0x30, &s(t))),
                DecodeError::InvalidTopic(want),
                "{t:?}"
            );
        };
        bad("", TopicError::Empty);
        bad("a/+", TopicError::WildcardInName);
        bad("#", TopicError::WildcardInName);
        bad("a#", TopicError::WildcardInName);
    }

    // --- CONNECT ------------------------------------------------------------------------

    #[test]
    fn connect_full_decodes() {
        let body = connect_body(
            0b1111_0110, // user, password, will retain, will QoS 2, will, clean session
            &cat(&[
                &s("client-1"),
                &s("dev/will"),
                &s("gone"),
                &s("user"),
                &s("pa\0ss"),
            ]),
        );
        let got = dec(&packet(0x10, &body)).unwrap().unwrap();
        let want = Packet::Connect(Connect {
            protocol: ProtocolLevel::V311,
            clean_session: true,
            keep_alive: 60,
            client_id: "client-1".into(),
            will: Some(LastWill {
                topic: topic("dev/will"),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::ExactlyOnce,
                retain: true,
            }),
            username: Some("user".into()),
            password: Some(Bytes::from_static(b"pa\0ss")),
        });
        assert_eq!(got, want);
        assert_eq!(enc(&want), packet(0x10, &body));
    }

    #[test]
    fn connect_minimal_decodes() {
        let got = dec(&packet(0x10, &connect_body(0x02, &s(""))))
            .unwrap()
            .unwrap();
        let Packet::Connect(c) = got else { panic!() };
        assert!(c.clean_session && c.client_id.is_empty() && c.will.is_none());
        assert!(c.username.is_none() && c.password.is_none());
    }

    #[test]
    fn connect_protocol_name_and_level() {
        let with = |name: &str, level: u8| {
            err(&packet(
                0x10,
                &cat(&[&s(name), &[level, 0x02, 0, 60], &s("c")]),
            ))
        };
        assert_eq!(with("MQIsdp", 3), DecodeError::UnacceptableProtocolLevel(3));
        assert_eq!(with("MQIsdp", 4), DecodeError::UnacceptableProtocolLevel(4));
        assert_eq!(
            with("mqtt", 4),
            DecodeError::InvalidProtocolName("mqtt".into())
        );
        assert_eq!(with("MQTT", 3), DecodeError::UnacceptableProtocolLevel(3));
        assert_eq!(with("MQTT", 5), DecodeError::UnacceptableProtocolLevel(5));
        assert_eq!(
            with("MQTT", 5).connack_code(),
            Some(ConnectReturnCode::UnacceptableProtocolVersion)
        );
        assert_eq!(
            with("MQIsdp", 3).connack_code(),
            Some(ConnectReturnCode::UnacceptableProtocolVersion)
        );
        // An MQTT 5 CONNECT (properties after keep alive) still gets "unacceptable level".
        let v5 = packet(0x10, &cat(&[&s("MQTT"), &[5, 0x02, 0, 60, 0], &s("c")]));
        assert_eq!(err(&v5), DecodeError::UnacceptableProtocolLevel(5));
        // A long garbage name is cut for logs.
        let long = "x".repeat(1000);
        let DecodeError::InvalidProtocolName(shown) = with(&long, 4) else {
            panic!()
        };
        assert!(shown.chars().count() <= 33);
    }

    #[test]
    fn connect_flag_rules() {
        let bad =
            |flags: u8, payload: &[u8]| malformed(&packet(0x10, &connect_body(flags, payload)));
        bad(0x03, &s("c")); // reserved bit
        bad(0x02 | 0x08, &s("c")); // will QoS 1 without will
        bad(0x02 | 0x10, &s("c")); // will QoS 2 without will
        bad(0x02 | 0x20, &s("c")); // will retain without will
        bad(0x02 | 0x04 | 0x18, &cat(&[&s("c"), &s("w"), &s("m")])); // will QoS 3
        bad(0x02 | 0x40, &cat(&[&s("c"), &s("p")])); // password without username
    }

    #[test]
    fn connect_will_topic_must_be_a_topic_name() {
        let e = err(&packet(
            0x10,
            &connect_body(0x06, &cat(&[&s("c"), &s("a/#"), &s("m")])),
        ));
        assert_eq!(e, DecodeError::InvalidTopic(TopicError::WildcardInName));
        let e = err(&packet(
            0x10,
            &connect_body(0x06, &cat(&[&s("c"), &s(""), &s("m")])),
        ));
        assert_eq!(e, DecodeError::InvalidTopic(TopicError::Empty));
    }

    #[test]
    fn connect_empty_client_id_needs_clean_session() {
        let e = err(&packet(0x10, &connect_body(0x00, &s(""))));
        assert!(matches!(e, DecodeError::ClientIdRejected(_)));
        assert_eq!(
            e.connack_code(),
            Some(ConnectReturnCode::IdentifierRejected)
        );
        // A malformed packet is reported as such, not answered with a CONNACK.
        malformed(&packet(0x10, &connect_body(0x00, &cat(&[&s(""), b"x"]))));
        assert!(dec(&packet(0x10, &connect_body(0x00, &s("c"))))
            .unwrap()
            .is_some());
    }

    #[test]
    fn connect_fields_must_fill_the_packet() {
        malformed(&packet(0x10, &connect_body(0x02, &cat(&[&s("c"), b"!"]))));
        malformed(&packet(0x10, &connect_body(0x82, &s("c")))); // username missing
        malformed(&packet(
            0x10,
            &connect_body(0x06, &cat(&[&s("c"), &s("w")])),
        )); // no message
        malformed(&packet(0x10, &[0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0])); // short
    }

    // --- CONNACK ------------------------------------------------------------------------

    #[test]
    fn connack_rules() {
        assert_eq!(
            dec(&[0x20, 2, 1, 0]),
            Ok(Some(Packet::ConnAck(ConnAck {
                session_present: true,
                code: ConnectReturnCode::Accepted
            })))
        );
        assert_eq!(
            dec(&[0x20, 2, 0, 5]),
            Ok(Some(Packet::ConnAck(ConnAck {
                session_present: false,
                code: ConnectReturnCode::NotAuthorized
            })))
        );
        malformed(&[0x20, 2, 2, 0]); // reserved acknowledge flag
        malformed(&[0x20, 2, 0x80, 0]);
        malformed(&[0x20, 2, 0, 6]); // return code
        malformed(&[0x20, 2, 1, 1]); // session present with a refusal
        let refused = ConnAck {
            session_present: true,
            code: ConnectReturnCode::NotAuthorized,
        };
        assert!(matches!(
            enc_err(&Packet::ConnAck(refused)),
            EncodeError::Invalid(_)
        ));
    }

    // --- PUBLISH ------------------------------------------------------------------------

    #[test]
    fn publish_decodes_with_zero_copy_payload() {
        let wire = packet(0x3d, &cat(&[&s("a/b"), &[0x12, 0x34], b"hello"]));
        let mut buf = BytesMut::from(&wire[..]);
        let start = buf.as_ptr() as usize;
        let got = decode(&mut buf, &LIMITS).unwrap().unwrap();
        let Packet::Publish(p) = got.clone() else {
            panic!()
        };
        assert_eq!(
            p,
            Publish {
                dup: true,
                qos: QoS::ExactlyOnce,
                retain: true,
                topic: topic("a/b"),
                pkid: Some(0x1234),
                payload: Bytes::from_static(b"hello"),
            }
        );
        assert_eq!(
            p.payload.as_ptr() as usize,
            start + wire.len() - 5,
            "payload was copied"
        );
        assert_eq!(enc(&got), wire);
    }

    #[test]
    fn publish_qos0_has_no_packet_identifier() {
        let got = dec(&packet(0x31, &cat(&[&s("t"), &[0, 0]])))
            .unwrap()
            .unwrap();
        let Packet::Publish(p) = got else { panic!() };
        assert_eq!(
            (p.pkid, &p.payload[..], p.retain),
            (None, &[0u8, 0][..], true)
        );
        let empty = dec(&packet(0x30, &s("t"))).unwrap().unwrap();
        let Packet::Publish(p) = empty else { panic!() };
        assert!(p.payload.is_empty());
    }

    #[test]
    fn publish_encode_checks_packet_identifier() {
        let p = |qos, pkid, dup| {
            Packet::Publish(Publish {
                dup,
                qos,
                retain: false,
                topic: topic("t"),
                pkid,
                payload: Bytes::new(),
            })
        };
        assert!(matches!(
            enc_err(&p(QoS::AtLeastOnce, None, false)),
            EncodeError::Invalid(_)
        ));
        assert!(matches!(
            enc_err(&p(QoS::ExactlyOnce, Some(0), false)),
            EncodeError::Invalid(_)
        ));
        assert!(matches!(
            enc_err(&p(QoS::AtMostOnce, Some(1), false)),
            EncodeError::Invalid(_)
        ));
        assert!(matches!(
            enc_err(&p(QoS::AtMostOnce, None, true)),
            EncodeError::Invalid(_)
        ));
        assert_eq!(
            enc(&p(QoS::AtMostOnce, None, false)),
            vec![0x30, 3, 0, 1, b't']
        );
        assert_eq!(
            enc(&p(QoS::AtLeastOnce, Some(7), true)),
            vec![0x3a, 5, 0, 1, b't', 0, 7]
        );
    }

    // --- SUBSCRIBE, SUBACK, UNSUBSCRIBE ---------------------------------------------------

    #[test]
    fn subscribe_rules() {
        let body = cat(&[&[0, 9], &s("a/+"), &[1], &s("#"), &[2], &s("$SYS/x"), &[0]]);
        let got = dec(&packet(0x82, &body)).unwrap().unwrap();
        let want = Packet::Subscribe(Subscribe {
            pkid: 9,
            filters: vec![
                (filter("a/+"), QoS::AtLeastOnce),
                (filter("#"), QoS::ExactlyOnce),
                (filter("$SYS/x"), QoS::AtMostOnce),
            ],
        });
        assert_eq!(got, want);
        assert_eq!(enc(&want), packet(0x82, &body));

        malformed(&packet(0x82, &[0, 1])); // no filters
        malformed(&packet(0x82, &cat(&[&[0, 1], &s("a"), &[3]]))); // QoS 3
        malformed(&packet(0x82, &cat(&[&[0, 1], &s("a"), &[0x04]]))); // reserved bits
        malformed(&packet(0x82, &cat(&[&[0, 1], &s("a"), &[0x81]])));
        malformed(&packet(0x82, &cat(&[&[0, 1], &s("a")]))); // QoS byte missing
        let e = err(&packet(0x82, &cat(&[&[0, 1], &s("a/#/b"), &[0]])));
        assert_eq!(
            e,
            DecodeError::InvalidTopic(TopicError::InvalidMultiLevelWildcard)
        );
        let e = err(&packet(0x82, &cat(&[&[0, 1], &s(""), &[0]])));
        assert_eq!(e, DecodeError::InvalidTopic(TopicError::Empty));
        let e = err(&packet(0x82, &cat(&[&[0, 1], &s("a+"), &[0]])));
        assert_eq!(
            e,
            DecodeError::InvalidTopic(TopicError::InvalidSingleLevelWildcard)
        );
    }

    #[test]
    fn suback_rules() {
        let got = dec(&packet(0x90, &[0, 3, 0, 1, 2, 0x80])).unwrap().unwrap();
        let want = Packet::SubAck(SubAck {
            pkid: 3,
            return_codes: vec![
                SubscribeReturnCode::Success(QoS::AtMostOnce),
                SubscribeReturnCode::Success(QoS::AtLeastOnce),
                SubscribeReturnCode::Success(QoS::ExactlyOnce),
                SubscribeReturnCode::Failure,
            ],
        });
        assert_eq!(got, want);
        for code in [3u8, 0x81, 0x40, 0xff] {
            malformed(&packet(0x90, &[0, 3, code]));
        }
        malformed(&packet(0x90, &[0, 3])); // no return code
    }

    #[test]
    fn unsubscribe_rules() {
        let body = cat(&[&[0, 4], &s("a/+"), &s("b/#")]);
        let want = Packet::Unsubscribe(Unsubscribe {
            pkid: 4,
            filters: vec![filter("a/+"), filter("b/#")],
        });
        assert_eq!(dec(&packet(0xa2, &body)), Ok(Some(want.clone())));
        assert_eq!(enc(&want), packet(0xa2, &body));
        malformed(&packet(0xa2, &[0, 4])); // no filters
        malformed(&packet(0xa2, &cat(&[&[0, 4], &s("a"), &[0]]))); // trailing byte
        let e = err(&packet(0xa2, &cat(&[&[0, 4], &s("a\0")])));
        assert!(matches!(e, DecodeError::InvalidString(_)));
    }

    #[test]
    fn empty_lists_are_not_encoded() {
        let sub = Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![],
        });
        let unsub = Packet::Unsubscribe(Unsubscribe {
            pkid: 1,
            filters: vec![],
        });
        let suback = Packet::SubAck(SubAck {
            pkid: 1,
            return_codes: vec![],
        });
        for p in [sub, unsub, suback] {
            assert!(matches!(enc_err(&p), EncodeError::Invalid(_)), "{p:?}");
        }
    }

    // --- small packets and encoding limits --------------------------------------------

    #[test]
    fn small_packets_wire_form() {
        for (p, wire) in [
            (Packet::PubAck(1), vec![0x40, 2, 0, 1]),
            (Packet::PubRec(0x0102), vec![0x50, 2, 1, 2]),
            (Packet::PubRel(0xffff), vec![0x62, 2, 0xff, 0xff]),
            (Packet::PubComp(2), vec![0x70, 2, 0, 2]),
            (Packet::UnsubAck(3), vec![0xb0, 2, 0, 3]),
            (Packet::PingReq, vec![0xc0, 0]),
            (Packet::PingResp, vec![0xd0, 0]),
            (Packet::Disconnect, vec![0xe0, 0]),
        ] {
            assert_eq!(enc(&p), wire);
            assert_eq!(dec(&wire), Ok(Some(p)));
        }
        for p in [
            Packet::PubAck(0),
            Packet::PubRec(0),
            Packet::PubRel(0),
            Packet::PubComp(0),
            Packet::UnsubAck(0),
        ] {
            assert!(matches!(enc_err(&p), EncodeError::Invalid(_)));
        }
    }

    #[test]
    fn encode_checks_field_lengths() {
        let connect = |client_id: String, username: Option<String>, password: Option<Bytes>| {
            Packet::Connect(Connect {
                protocol: ProtocolLevel::V311,
                clean_session: false,
                keep_alive: 0,
                client_id,
                will: None,
                username,
                password,
            })
        };
        let long = "x".repeat(65536);
        assert_eq!(
            enc_err(&connect(long.clone(), None, None)),
            EncodeError::StringTooLong
        );
        assert_eq!(
            enc_err(&connect("c".into(), Some(long), None)),
            EncodeError::StringTooLong
        );
        let big = Bytes::from(vec![0u8; 65536]);
        assert!(matches!(
            enc_err(&connect("c".into(), Some("u".into()), Some(big))),
            EncodeError::Invalid(_)
        ));
        assert!(matches!(
            enc_err(&connect("c".into(), None, Some(Bytes::new()))),
            EncodeError::Invalid(_)
        ));
        assert!(matches!(
            enc_err(&connect(String::new(), None, None)),
            EncodeError::Invalid(_)
        ));
        assert!(matches!(
            enc_err(&connect("a\0".into(), None, None)),
            EncodeError::Invalid(_)
        ));
        assert!(enc(&connect("x".repeat(65535), None, None)).len() > 65535);
    }

    #[test]
    fn encode_checks_remaining_length() {
        // 4097 filters of 65535 bytes share one allocation but would be 268 MB on the wire.
        let f = TopicFilter::new("f".repeat(65535)).unwrap();
        let filters = vec![(f, QoS::AtMostOnce); 4097];
        let p = Packet::Subscribe(Subscribe { pkid: 1, filters });
        let remaining = 2 + 4097 * (65535 + 3);
        assert!(remaining > MAX_REMAINING_LENGTH);
        assert_eq!(enc_err(&p), EncodeError::TooLarge(remaining));
        assert_eq!(encoded_len(&p), 5 + remaining);
    }

    /// The in-place path for acknowledgements and the empty packets gives what the general
    /// path gives (packet or error), and consumes exactly one packet either way.
    #[test]
    fn packets_decoded_in_place_match_the_general_path() {
        use packet_type::*;
        let kinds = [
            (PUBACK, 0x40u8, 2usize),
            (PUBREC, 0x50, 2),
            (PUBREL, 0x62, 2),
            (PUBCOMP, 0x70, 2),
            (UNSUBACK, 0xb0, 2),
            (PINGREQ, 0xc0, 0),
            (PINGRESP, 0xd0, 0),
            (DISCONNECT, 0xe0, 0),
        ];
        for (kind, first, len) in kinds {
            let bodies: Vec<Vec<u8>> = if len == 0 {
                vec![vec![]]
            } else {
                [0u16, 1, 2, 255, 256, 0x7fff, 0xfffe, 0xffff]
                    .iter()
                    .map(|id| id.to_be_bytes().to_vec())
                    .collect()
            };
            for body in bodies {
                let header = FixedHeader {
                    packet_type: kind,
                    flags: first & 0x0f,
                    remaining_length: len,
                    header_len: 2,
                };
                let general = decode_body(
                    &header,
                    Reader {
                        buf: Bytes::from(body.clone()),
                    },
                );
                let in_place = decode_in_place(&header, &body).expect("decoded in place");
                assert_eq!(in_place, general, "type {kind}, body {body:?}");
                // Followed by another packet: exactly this one is consumed, error or not.
                let mut wire = BytesMut::from(&packet(first, &body)[..]);
                wire.extend_from_slice(&[0xc0, 0]);
                assert_eq!(decode(&mut wire, &LIMITS).map(|p| p.unwrap()), general);
                assert_eq!(dec(&wire), Ok(Some(Packet::PingReq)), "type {kind}");
            }
        }
        assert_eq!(
            dec(&[0x40, 2, 0, 0]),
            Err(DecodeError::Malformed("packet identifier 0"))
        );
        assert_eq!(
            dec(&[0x40, 2, 0x12, 0x34]),
            Ok(Some(Packet::PubAck(0x1234)))
        );
        // Types with a body of their own take the general path.
        for kind in [CONNECT, CONNACK, PUBLISH, SUBSCRIBE, SUBACK, UNSUBSCRIBE] {
            let header = FixedHeader {
                packet_type: kind,
                flags: 0,
                remaining_length: 2,
                header_len: 2,
            };
            assert!(decode_in_place(&header, &[0, 1]).is_none(), "type {kind}");
        }
    }
}
