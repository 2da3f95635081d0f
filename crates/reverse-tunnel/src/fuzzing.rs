//! The checks behind the fuzz targets in `fuzz/` (`frames`, `splice`), shared with the
//! corpus replay test (`tests/corpus_replay.rs`) so both run one implementation. They panic
//! when they find a bug; that is the point. Not part of the supported API.
//!
//! `frames` input format: a sequence of chunks, each one control byte followed by its bytes. Bit 7 of
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

/// What [`run_splice`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpliceOutcome {
    /// The payload of every binary message the device side received, in order.
    pub to_device: Vec<u8>,
    /// Why the relay ended the session.
    pub reason: &'static str,
}

/// Runs a relay session ([`crate::splice::splice`], limit [`FUZZ_MAX_STREAMS`] streams)
/// whose operator side sends `raw` in pieces of `chunk` bytes and then ends its
/// connection, and whose device side (a WebSocket client) reads everything. Panics when
/// the session does not end within 10 seconds, or when what the relay sends the device is
/// not valid WebSocket from a server (a protocol error other than an unannounced end).
pub fn run_splice(raw: &[u8], chunk: usize) -> SpliceOutcome {
    use futures_util::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;
    use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        let (mut op_c, op_r) = tokio::io::duplex(1 << 16);
        let (dev_c, dev_r) = tokio::io::duplex(1 << 16);
        let activity = crate::ws::Activity::default();
        let relay = crate::splice::splice(
            op_r,
            dev_r,
            FUZZ_MAX_STREAMS,
            &activity,
            std::future::pending(),
        );
        let writer = async move {
            for c in raw.chunks(chunk.max(1)) {
                if op_c.write_all(c).await.is_err() {
                    break;
                }
            }
            // The operator's connection ends here.
        };
        let mut dev =
            tokio_tungstenite::WebSocketStream::from_raw_socket(dev_c, Role::Client, None).await;
        let reader = async move {
            let mut got = Vec::new();
            while let Some(m) = dev.next().await {
                match m {
                    Ok(Message::Binary(b)) => got.extend_from_slice(&b),
                    Ok(Message::Text(t)) => panic!("the relay sent the device text: {t:?}"),
                    Ok(_) => {}
                    Err(WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_))
                    | Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => break,
                    Err(e) => panic!("the relay sent the device invalid WebSocket: {e}"),
                }
            }
            got
        };
        let (reason, (), to_device) =
            tokio::time::timeout(std::time::Duration::from_secs(10), async {
                tokio::join!(relay, writer, reader)
            })
            .await
            .expect("the relay session did not end after the operator's connection did");
        SpliceOutcome { to_device, reason }
    })
}

/// The `splice` fuzz target: the first byte sets the piece size (1 to 256 bytes), the rest
/// is what the operator side sends. The session runs twice, in those pieces and all at
/// once. Checks ([`run_splice`]): no panic, the session ends, the device gets only valid
/// WebSocket; the device never gets more payload bytes than were sent; what the device got
/// in one run is a prefix of what it got in the other (exact equality for valid input that
/// ends with a close is the `frames_cut_anywhere_arrive_whole` property test).
pub fn check_splice(data: &[u8]) -> SpliceOutcome {
    let Some((&size, raw)) = data.split_first() else {
        return run_splice(&[], 1);
    };
    let pieces = run_splice(raw, usize::from(size) + 1);
    let whole = run_splice(raw, raw.len().max(1));
    for o in [&pieces, &whole] {
        assert!(
            o.to_device.len() <= raw.len(),
            "the device got {} bytes from {} sent",
            o.to_device.len(),
            raw.len()
        );
    }
    // The cut may change how much is forwarded before the session ends (what was read
    // before an abrupt end or a violation), never which bytes.
    let (a, b) = (&pieces.to_device, &whole.to_device);
    assert!(
        a.starts_with(b) || b.starts_with(a),
        "forwarded bytes depend on how the input was cut: {} and {} bytes",
        a.len(),
        b.len()
    );
    pieces
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
