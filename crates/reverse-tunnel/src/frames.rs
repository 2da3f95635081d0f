//! The relay's view of the yamux byte stream it forwards: frame headers only.
//!
//! yamux frames are a 12-byte header (version 0, type, flags, stream id, length; big
//! endian) followed, for data frames only, by `length` payload bytes. The relay does not
//! terminate yamux (the session is end to end between the operator's CLI and the agent);
//! it parses the headers of both directions to:
//! - enforce `max_streams_per_session`: a stream the operator opens beyond the limit is
//!   answered with a reset by the relay and never reaches the device;
//! - refuse a device that opens streams towards the operator (only operators open streams);
//! - refuse anything that is not yamux version 0 with a known frame type.
//!
//! [`FrameFilter`] takes bytes in arbitrary chunks (WebSocket messages need not align with
//! frames) and returns the bytes to forward and the bytes to send back. It keeps a 12-byte
//! header buffer and a few counters per open stream: memory is bounded by the stream
//! limit. It reads headers only: [`FrameFilter::plan`] says which ranges of a chunk go on,
//! so that the relay forwards an unchanged chunk (the usual case) without copying it.

use std::collections::HashMap;
use std::ops::Range;

pub const HEADER_LEN: usize = 12;
const TYPE_DATA: u8 = 0;
const TYPE_WINDOW_UPDATE: u8 = 1;
const TYPE_GO_AWAY: u8 = 3;
const FLAG_SYN: u16 = 1;
const FLAG_FIN: u16 = 4;
const FLAG_RST: u16 = 8;

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToDevice,
    ToOperator,
}

/// A stream of yamux that broke the relay's rules: the session is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a yamux frame (version {0})")]
    Version(u8),
    #[error("unknown yamux frame type {0}")]
    Type(u8),
    #[error("the device tried to open stream {0} towards the operator")]
    DeviceOpened(u32),
    #[error("stream {0} opened twice")]
    Reopened(u32),
    #[error("data frame of {0} bytes is larger than the relay allows")]
    TooLarge(u32),
}

#[derive(Debug, Default, Clone, Copy)]
struct StreamState {
    fin_to_device: bool,
    fin_to_operator: bool,
}

/// What to do with the payload bytes still expected after a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    Forward(u32),
    Drop(u32),
}

#[derive(Debug)]
struct DirectionState {
    header: [u8; HEADER_LEN],
    have: usize,
    payload: Payload,
}

impl Default for DirectionState {
    fn default() -> Self {
        DirectionState {
            header: [0; HEADER_LEN],
            have: 0,
            payload: Payload::Forward(0),
        }
    }
}

/// The output of [`FrameFilter::feed`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filtered {
    /// Bytes to pass on in the direction they were going.
    pub forward: Vec<u8>,
    /// Bytes to send back to where they came from (resets of refused streams).
    pub reply: Vec<u8>,
    /// Streams refused because of the stream limit.
    pub refused: u32,
}

/// What to forward of one chunk, as [`FrameFilter::plan`] decides it without copying: the
/// header bytes `carried` over from earlier chunks (a header split across chunks is held
/// back until it is complete), then the `ranges` of the chunk, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// At most `HEADER_LEN - 1` bytes.
    pub carried: Vec<u8>,
    pub ranges: Vec<Range<usize>>,
    /// Bytes to send back to where the chunk came from (resets of refused streams).
    pub reply: Vec<u8>,
    /// Streams refused because of the stream limit.
    pub refused: u32,
}

impl Plan {
    fn clear(&mut self) {
        self.carried.clear();
        self.ranges.clear();
        self.reply.clear();
        self.refused = 0;
    }

    fn push(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        match self.ranges.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => self.ranges.push(r),
        }
    }

    /// Whether the whole chunk of `len` bytes goes on unchanged.
    pub fn is_whole(&self, len: usize) -> bool {
        self.carried.is_empty()
            && match self.ranges.as_slice() {
                [] => len == 0,
                [r] => r.start == 0 && r.end == len,
                _ => false,
            }
    }

    /// Bytes to forward.
    pub fn forward_len(&self) -> usize {
        self.carried.len() + self.ranges.iter().map(|r| r.len()).sum::<usize>()
    }

    /// The bytes to forward, copied out of `chunk` (the chunk the plan was made for).
    pub fn forward_bytes(&self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.forward_len());
        out.extend_from_slice(&self.carried);
        for r in &self.ranges {
            out.extend_from_slice(&chunk[r.clone()]);
        }
        out
    }
}

/// Tracks both directions of one tunnel session. See the module documentation.
#[derive(Debug)]
pub struct FrameFilter {
    max_streams: usize,
    max_data_frame: u32,
    to_device: DirectionState,
    to_operator: DirectionState,
    open: HashMap<u32, StreamState>,
    /// Streams opened, ever.
    pub opened_total: u64,
}

impl FrameFilter {
    /// `max_data_frame`: largest data frame payload allowed (yamux sends at most its
    /// split-send size, 16 KiB by default).
    pub fn new(max_streams: usize, max_data_frame: u32) -> FrameFilter {
        FrameFilter {
            max_streams,
            max_data_frame,
            to_device: DirectionState::default(),
            to_operator: DirectionState::default(),
            open: HashMap::new(),
            opened_total: 0,
        }
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.open.len()
    }

    /// Processes `input` going in direction `dir`: the bytes to forward, copied.
    pub fn feed(&mut self, dir: Direction, input: &[u8]) -> Result<Filtered, FrameError> {
        let mut plan = Plan::default();
        self.plan(dir, input, &mut plan)?;
        Ok(Filtered {
            forward: plan.forward_bytes(input),
            reply: std::mem::take(&mut plan.reply),
            refused: plan.refused,
        })
    }

    /// Processes `input` going in direction `dir`: what to forward goes into `plan`
    /// (cleared first) as ranges of `input`. On an error the session must end; `plan` is
    /// then meaningless.
    pub fn plan(
        &mut self,
        dir: Direction,
        input: &[u8],
        plan: &mut Plan,
    ) -> Result<(), FrameError> {
        plan.clear();
        let mut pos = 0;
        while pos < input.len() {
            let st = match dir {
                Direction::ToDevice => &mut self.to_device,
                Direction::ToOperator => &mut self.to_operator,
            };
            match st.payload {
                Payload::Forward(n) if n > 0 => {
                    let k = (n as usize).min(input.len() - pos);
                    plan.push(pos..pos + k);
                    pos += k;
                    st.payload = Payload::Forward(n - k as u32);
                    continue;
                }
                Payload::Drop(n) if n > 0 => {
                    let k = (n as usize).min(input.len() - pos);
                    pos += k;
                    st.payload = Payload::Drop(n - k as u32);
                    continue;
                }
                _ => {}
            }
            let (start, had) = (pos, st.have);
            let k = (HEADER_LEN - st.have).min(input.len() - pos);
            st.header[st.have..st.have + k].copy_from_slice(&input[pos..pos + k]);
            st.have += k;
            pos += k;
            if st.have < HEADER_LEN {
                break;
            }
            st.have = 0;
            let header = st.header;
            if self.on_header(dir, header, plan)? {
                // Only the chunk's first header can have begun in an earlier chunk.
                plan.carried.extend_from_slice(&header[..had]);
                plan.push(start..pos);
            }
        }
        Ok(())
    }

    /// Applies one complete header; returns whether the frame goes on.
    fn on_header(
        &mut self,
        dir: Direction,
        h: [u8; HEADER_LEN],
        plan: &mut Plan,
    ) -> Result<bool, FrameError> {
        let version = h[0];
        let typ = h[1];
        let flags = u16::from_be_bytes([h[2], h[3]]);
        let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        if version != 0 {
            return Err(FrameError::Version(version));
        }
        if typ > TYPE_GO_AWAY {
            return Err(FrameError::Type(typ));
        }
        let payload = if typ == TYPE_DATA { len } else { 0 };
        if typ == TYPE_DATA && len > self.max_data_frame {
            return Err(FrameError::TooLarge(len));
        }
        let mut forward = true;
        if id != 0 && (typ == TYPE_DATA || typ == TYPE_WINDOW_UPDATE) {
            if flags & FLAG_SYN != 0 {
                match dir {
                    Direction::ToOperator => return Err(FrameError::DeviceOpened(id)),
                    Direction::ToDevice => {
                        // yamux numbers a stream when it is opened but sends its SYN with
                        // the stream's first frame, so SYNs may arrive out of id order.
                        if self.open.contains_key(&id) {
                            return Err(FrameError::Reopened(id));
                        }
                        if self.open.len() >= self.max_streams {
                            forward = false;
                            plan.refused += 1;
                            plan.reply.extend_from_slice(&reset_frame(id));
                        } else {
                            self.open.insert(id, StreamState::default());
                            self.opened_total += 1;
                        }
                    }
                }
            } else if !self.open.contains_key(&id) {
                // A refused stream, or late frames of a closed one: nobody needs them.
                forward = false;
            }
            if forward {
                let closed = match self.open.get_mut(&id) {
                    Some(s) => {
                        if flags & FLAG_FIN != 0 {
                            match dir {
                                Direction::ToDevice => s.fin_to_device = true,
                                Direction::ToOperator => s.fin_to_operator = true,
                            }
                        }
                        flags & FLAG_RST != 0 || (s.fin_to_device && s.fin_to_operator)
                    }
                    None => false,
                };
                if closed {
                    self.open.remove(&id);
                }
            }
        }
        let st = match dir {
            Direction::ToDevice => &mut self.to_device,
            Direction::ToOperator => &mut self.to_operator,
        };
        st.payload = if forward {
            Payload::Forward(payload)
        } else {
            Payload::Drop(payload)
        };
        Ok(forward)
    }
}

/// A yamux window-update frame with the RST flag for stream `id`.
pub fn reset_frame(id: u32) -> [u8; HEADER_LEN] {
    let mut f = [0u8; HEADER_LEN];
    f[1] = TYPE_WINDOW_UPDATE;
    f[2..4].copy_from_slice(&FLAG_RST.to_be_bytes());
    f[4..8].copy_from_slice(&id.to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(typ: u8, flags: u16, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0, typ];
        f.extend_from_slice(&flags.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        let len = if typ == TYPE_DATA {
            payload.len() as u32
        } else {
            256 * 1024
        };
        f.extend_from_slice(&len.to_be_bytes());
        if typ == TYPE_DATA {
            f.extend_from_slice(payload);
        }
        f
    }

    #[test]
    fn plans_pass_whole_chunks_without_copying() {
        let mut f = FrameFilter::new(1, 1 << 20);
        let mut plan = Plan::default();
        // Whole frames in one chunk: the chunk itself goes on.
        let mut a = frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, &[]);
        a.extend(frame(TYPE_DATA, 0, 1, &[9; 100]));
        f.plan(Direction::ToDevice, &a, &mut plan).unwrap();
        assert!(plan.is_whole(a.len()));
        assert_eq!(plan.forward_bytes(&a), a);
        // A header split across chunks: held back, then carried into the next chunk.
        let b = frame(TYPE_DATA, 0, 1, b"xyz");
        f.plan(Direction::ToDevice, &b[..5], &mut plan).unwrap();
        assert_eq!(plan.forward_len(), 0);
        assert!(!plan.is_whole(5));
        f.plan(Direction::ToDevice, &b[5..], &mut plan).unwrap();
        assert_eq!(plan.carried, b[..5]);
        assert!(!plan.is_whole(b.len() - 5));
        assert_eq!(plan.forward_bytes(&b[5..]), b);
        // A refused stream's frames are cut out; the rest stays in order.
        let mut c = frame(TYPE_DATA, 0, 1, b"before");
        c.extend(frame(TYPE_DATA, FLAG_SYN, 3, b"refused"));
        c.extend(frame(TYPE_DATA, 0, 1, b"after"));
        f.plan(Direction::ToDevice, &c, &mut plan).unwrap();
        assert_eq!(plan.refused, 1);
        assert_eq!(plan.reply, reset_frame(3));
        assert_eq!(plan.ranges.len(), 2);
        let mut want = frame(TYPE_DATA, 0, 1, b"before");
        want.extend(frame(TYPE_DATA, 0, 1, b"after"));
        assert_eq!(plan.forward_bytes(&c), want);
    }

    #[test]
    fn forwards_whole_and_split_frames_unchanged() {
        let mut input = frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, &[]);
        input.extend(frame(TYPE_DATA, 0, 1, b"hello"));
        input.extend(frame(2, 0, 0, &[])); // ping
        for chunk in [1usize, 3, 7, 12, 100] {
            let mut f = FrameFilter::new(4, 1 << 20);
            let mut fwd = Vec::new();
            for c in input.chunks(chunk) {
                let o = f.feed(Direction::ToDevice, c).unwrap();
                assert!(o.reply.is_empty());
                fwd.extend(o.forward);
            }
            assert_eq!(fwd, input, "chunk {chunk}");
            assert_eq!(f.open_streams(), 1);
        }
    }

    #[test]
    fn streams_over_the_limit_are_reset_and_their_frames_dropped() {
        let mut f = FrameFilter::new(1, 1 << 20);
        let o = f
            .feed(Direction::ToDevice, &frame(TYPE_DATA, FLAG_SYN, 1, b"a"))
            .unwrap();
        assert_eq!(o.forward.len(), 13);
        let mut second = frame(TYPE_DATA, FLAG_SYN, 3, b"bb");
        second.extend(frame(TYPE_DATA, 0, 3, b"ccc"));
        let o = f.feed(Direction::ToDevice, &second).unwrap();
        assert!(o.forward.is_empty());
        assert_eq!(o.refused, 1);
        assert_eq!(o.reply, reset_frame(3));
        // Closing stream 1 (FIN both ways) frees the slot.
        f.feed(Direction::ToDevice, &frame(TYPE_DATA, FLAG_FIN, 1, b""))
            .unwrap();
        f.feed(Direction::ToOperator, &frame(TYPE_DATA, FLAG_FIN, 1, b""))
            .unwrap();
        assert_eq!(f.open_streams(), 0);
        let o = f
            .feed(
                Direction::ToDevice,
                &frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 5, &[]),
            )
            .unwrap();
        assert_eq!(o.forward.len(), 12);
        // RST from the device closes it too.
        f.feed(
            Direction::ToOperator,
            &frame(TYPE_WINDOW_UPDATE, FLAG_RST, 5, &[]),
        )
        .unwrap();
        assert_eq!(f.open_streams(), 0);
        assert_eq!(f.opened_total, 2);
    }

    #[test]
    fn violations() {
        let mut f = FrameFilter::new(4, 1 << 20);
        assert_eq!(
            f.feed(Direction::ToOperator, &frame(TYPE_DATA, FLAG_SYN, 2, b"x")),
            Err(FrameError::DeviceOpened(2))
        );
        let mut f = FrameFilter::new(4, 1 << 20);
        assert_eq!(
            f.feed(Direction::ToDevice, &[1; 12]),
            Err(FrameError::Version(1))
        );
        let mut f = FrameFilter::new(4, 1 << 20);
        assert_eq!(
            f.feed(Direction::ToDevice, &[0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::Type(9))
        );
        let mut f = FrameFilter::new(4, 10);
        assert_eq!(
            f.feed(
                Direction::ToDevice,
                &frame(TYPE_DATA, FLAG_SYN, 1, &[0; 11])
            ),
            Err(FrameError::TooLarge(11))
        );
        let mut f = FrameFilter::new(4, 1 << 20);
        f.feed(Direction::ToDevice, &frame(TYPE_DATA, FLAG_SYN, 3, b""))
            .unwrap();
        // A lower id may open later (yamux sends a SYN with the stream's first frame) ...
        f.feed(Direction::ToDevice, &frame(TYPE_DATA, FLAG_SYN, 1, b""))
            .unwrap();
        // ... but an open stream cannot open again.
        assert_eq!(
            f.feed(Direction::ToDevice, &frame(TYPE_DATA, FLAG_SYN, 3, b"")),
            Err(FrameError::Reopened(3))
        );
    }

    proptest::proptest! {
        #[test]
        fn never_more_open_streams_than_the_limit(
            frames in proptest::collection::vec((0u8..4, 0u16..16, 0u32..12, 0usize..40, proptest::bool::ANY), 0..60),
            chunk in 1usize..50,
        ) {
            let mut f = FrameFilter::new(3, 1 << 20);
            for (typ, flags, id, len, to_device) in frames {
                let bytes = frame(typ, flags, id, &vec![7; len]);
                let dir = if to_device { Direction::ToDevice } else { Direction::ToOperator };
                for c in bytes.chunks(chunk) {
                    if f.feed(dir, c).is_err() {
                        return Ok(());
                    }
                    proptest::prop_assert!(f.open_streams() <= 3);
                }
            }
        }
    }
}
