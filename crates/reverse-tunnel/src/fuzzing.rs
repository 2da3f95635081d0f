//! The check behind the `frames` fuzz target in `fuzz/`, shared with the corpus replay test
//! (`tests/corpus_replay.rs`) so both run one implementation. It panics when it finds a
//! bug; that is the point. Not part of the supported API.
//!
//! Input format: a sequence of chunks, each one control byte followed by its bytes. Bit 7 of
//! the control byte is the direction (0: operator to device, 1: device to operator), bits
//! 0..=6 the chunk length (0..=127; the last chunk takes what is left if it is shorter).

use crate::frames::{reset_frame, Direction, FrameError, FrameFilter, HEADER_LEN};

/// The stream limit the fuzz target uses.
pub const FUZZ_MAX_STREAMS: usize = 4;
/// The data frame limit the fuzz target uses.
pub const FUZZ_MAX_DATA_FRAME: u32 = 65536;

/// What [`check_frames`] saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FramesOutcome {
    /// Chunks fed (including the one that failed).
    pub chunks: usize,
    /// The error that ended the session, if one did.
    pub error: Option<FrameError>,
    /// Bytes forwarded towards the device and towards the operator.
    pub forwarded_to_device: u64,
    pub forwarded_to_operator: u64,
    /// Streams refused because of the limit.
    pub refused: u32,
    /// Streams opened, ever.
    pub opened_total: u64,
    /// Streams open at the end.
    pub open_streams: usize,
}

/// Splits `data` into (direction, chunk) pairs as described in the module documentation.
pub fn chunks(mut data: &[u8]) -> Vec<(Direction, &[u8])> {
    let mut out = Vec::new();
    while let Some((&control, rest)) = data.split_first() {
        let dir = if control & 0x80 == 0 {
            Direction::ToDevice
        } else {
            Direction::ToOperator
        };
        let len = usize::from(control & 0x7f).min(rest.len());
        out.push((dir, &rest[..len]));
        data = &rest[len..];
    }
    out
}

/// Feeds the chunks of `data` to a `FrameFilter::new(4, 65536)`, and the same bytes one at a
/// time to a second filter, until a feed fails. Checks:
/// - no panic; at most 4 streams open after every feed; `opened_total` never falls and
///   is at least the number of open streams;
/// - replies are exactly one reset frame per refused stream;
/// - per direction, the filter never forwards more bytes than it was given;
/// - chunk boundaries do not matter: byte-at-a-time feeding forwards and replies the same
///   bytes and fails at the same chunk with the same error.
pub fn check_frames(data: &[u8]) -> FramesOutcome {
    let mut whole = FrameFilter::new(FUZZ_MAX_STREAMS, FUZZ_MAX_DATA_FRAME);
    let mut bytewise = FrameFilter::new(FUZZ_MAX_STREAMS, FUZZ_MAX_DATA_FRAME);
    let mut outcome = FramesOutcome::default();
    let (mut given_to_device, mut given_to_operator) = (0u64, 0u64);
    for (dir, chunk) in chunks(data) {
        outcome.chunks += 1;
        let before_total = whole.opened_total;
        let result = whole.feed(dir, chunk);
        // The same bytes, one at a time: the first error must be the same one.
        let mut single = Ok((Vec::new(), Vec::new(), 0u32));
        for b in chunk {
            match bytewise.feed(dir, std::slice::from_ref(b)) {
                Ok(o) => {
                    if let Ok((fwd, reply, refused)) = &mut single {
                        fwd.extend(o.forward);
                        reply.extend(o.reply);
                        *refused += o.refused;
                    }
                }
                Err(e) => {
                    single = Err(e);
                    break;
                }
            }
        }
        let filtered = match (result, single) {
            (Ok(o), Ok((fwd, reply, refused))) => {
                assert_eq!(o.forward, fwd, "forwarded bytes depend on chunking");
                assert_eq!(o.reply, reply, "replies depend on chunking");
                assert_eq!(o.refused, refused, "refusals depend on chunking");
                o
            }
            (Err(a), Err(b)) => {
                assert_eq!(a, b, "a different error when fed byte by byte");
                // Display must work for the audit log line.
                assert!(!a.to_string().is_empty());
                outcome.error = Some(a);
                break;
            }
            (a, b) => panic!("chunked {a:?} but byte by byte {b:?}"),
        };
        assert!(
            whole.open_streams() <= FUZZ_MAX_STREAMS,
            "{} streams open",
            whole.open_streams()
        );
        assert_eq!(whole.open_streams(), bytewise.open_streams());
        assert!(whole.opened_total >= before_total);
        assert!(whole.opened_total >= whole.open_streams() as u64);
        assert_eq!(
            filtered.reply.len(),
            filtered.refused as usize * HEADER_LEN,
            "one reset per refused stream"
        );
        for r in filtered.reply.chunks(HEADER_LEN) {
            let id = u32::from_be_bytes([r[4], r[5], r[6], r[7]]);
            assert_eq!(r, reset_frame(id), "a reply that is not a reset");
        }
        match dir {
            Direction::ToDevice => {
                given_to_device += chunk.len() as u64;
                outcome.forwarded_to_device += filtered.forward.len() as u64;
            }
            Direction::ToOperator => {
                given_to_operator += chunk.len() as u64;
                outcome.forwarded_to_operator += filtered.forward.len() as u64;
            }
        }
        assert!(outcome.forwarded_to_device <= given_to_device);
        assert!(outcome.forwarded_to_operator <= given_to_operator);
        outcome.refused += filtered.refused;
    }
    outcome.opened_total = whole.opened_total;
    outcome.open_streams = whole.open_streams();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_format() {
        let c = chunks(&[2, 1, 2, 0x81, 9, 0x05, 7]);
        assert_eq!(
            c,
            vec![
                (Direction::ToDevice, &[1u8, 2][..]),
                (Direction::ToOperator, &[9u8][..]),
                (Direction::ToDevice, &[7u8][..]),
            ]
        );
        assert!(chunks(&[]).is_empty());
        assert_eq!(check_frames(&[]), FramesOutcome::default());
    }
}
