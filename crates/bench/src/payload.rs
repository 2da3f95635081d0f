//! What every benchmark message carries at the start of its payload, so that loss,
//! duplicates and latency are measured exactly rather than estimated.
//!
//! Layout (big-endian): bytes 0..8 publisher index, 8..16 sequence number within that
//! publisher, 16..24 send time in nanoseconds since the process-wide [`Clock`] origin.
//! The rest of the payload, up to the requested size, is zero padding.

use std::sync::OnceLock;
use std::time::Instant;

/// Bytes taken by a [`MessageId`]; the smallest payload a benchmark message may have.
pub const ID_LEN: usize = 24;

/// Identity and send time of one benchmark message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageId {
    pub publisher: u64,
    pub seq: u64,
    /// Nanoseconds since [`Clock::origin`] when the message was encoded for sending.
    pub sent_ns: u64,
}

impl MessageId {
    /// Writes the id into the first [`ID_LEN`] bytes of `payload`.
    ///
    /// # Panics
    /// If `payload` is shorter than [`ID_LEN`] (templates are always at least that long).
    pub fn write_to(&self, payload: &mut [u8]) {
        payload[0..8].copy_from_slice(&self.publisher.to_be_bytes());
        payload[8..16].copy_from_slice(&self.seq.to_be_bytes());
        payload[16..24].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    /// Reads the id from the start of `payload`; `None` if it is too short to hold one
    /// (a message that is not ours, or the empty payload that clears a retained message).
    pub fn read_from(payload: &[u8]) -> Option<MessageId> {
        let word = |at: usize| -> Option<u64> {
            Some(u64::from_be_bytes(
                payload.get(at..at + 8)?.try_into().ok()?,
            ))
        };
        Some(MessageId {
            publisher: word(0)?,
            seq: word(8)?,
            sent_ns: word(16)?,
        })
    }
}

/// The monotonic clock every timestamp in a payload is taken from. Publisher and
/// subscriber live in the same process, so send and receive times are comparable.
#[derive(Debug, Clone, Copy)]
pub struct Clock;

impl Clock {
    /// The process-wide origin, fixed on first use.
    pub fn origin() -> Instant {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    /// Nanoseconds since [`Clock::origin`].
    pub fn now_ns() -> u64 {
        Self::ns_at(Instant::now())
    }

    /// Nanoseconds from [`Clock::origin`] to `at` (0 if `at` is earlier).
    pub fn ns_at(at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(Self::origin()).as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_padding() {
        let id = MessageId {
            publisher: 3,
            seq: 0x0102_0304_0506_0708,
            sent_ns: u64::MAX - 1,
        };
        let mut payload = vec![0xAAu8; 64];
        id.write_to(&mut payload);
        assert_eq!(MessageId::read_from(&payload), Some(id));
        assert!(
            payload[ID_LEN..].iter().all(|&b| b == 0xAA),
            "padding untouched"
        );
        assert_eq!(&payload[8..16], &[1, 2, 3, 4, 5, 6, 7, 8], "big-endian");
    }

    #[test]
    fn minimum_size_round_trips() {
        let id = MessageId {
            publisher: 0,
            seq: 42,
            sent_ns: 1_000,
        };
        let mut payload = [0u8; ID_LEN];
        id.write_to(&mut payload);
        assert_eq!(MessageId::read_from(&payload), Some(id));
    }

    #[test]
    fn short_payload_has_no_id() {
        assert_eq!(MessageId::read_from(&[]), None);
        assert_eq!(MessageId::read_from(&[0; ID_LEN - 1]), None);
    }

    #[test]
    fn clock_is_monotonic() {
        let a = Clock::now_ns();
        let b = Clock::now_ns();
        assert!(b >= a);
        assert_eq!(Clock::ns_at(Clock::origin()), 0);
    }
}
