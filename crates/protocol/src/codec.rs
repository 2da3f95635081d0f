//! MQTT 3.1.1 wire format: `decode` and `encode`. (Implementation in progress.)

use bytes::BytesMut;

use crate::packet::Packet;

/// Limits the decoder enforces before allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest whole packet (fixed header + remaining length) accepted, in bytes.
    pub max_packet_size: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_packet_size: 1024 * 1024 }
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
/// packet larger than `limits.max_packet_size` (checked from the header alone).
pub fn peek_fixed_header(
    buf: &[u8],
    limits: &DecodeLimits,
) -> Result<Option<FixedHeader>, DecodeError> {
    let _ = (buf, limits);
    todo!("bulwark-protocol codec in progress")
}

/// Decodes one packet from the front of `buf`, consuming its bytes. `Ok(None)` means more
/// bytes are needed (normal flow). The size limit is checked from the fixed header before
/// anything is allocated.
pub fn decode(buf: &mut BytesMut, limits: &DecodeLimits) -> Result<Option<Packet>, DecodeError> {
    let _ = (buf, limits);
    todo!("bulwark-protocol codec in progress")
}

/// Appends the wire form of `packet` to `buf`.
pub fn encode(packet: &Packet, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let _ = (packet, buf);
    todo!("bulwark-protocol codec in progress")
}
