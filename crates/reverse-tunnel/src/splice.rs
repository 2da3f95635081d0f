//! The relay's data path: once an operator and a device are paired, their two WebSockets
//! are spliced here, without a WebSocket library in the way.
//!
//! Each direction reads what the sending side has ready (its socket in large pieces, then
//! TLS, into one plaintext buffer), takes the WebSocket frames apart (they come masked, as
//! from any client), unmasks the payload in place, passes it through the
//! [`FrameFilter`] and writes what the filter lets through to the other side as one
//! binary frame: a header, then the payload straight from the buffer (no copy besides
//! TLS's own). What the filter answers (resets of refused streams) and pongs go back to
//! the sending side. While one direction's frame is on its way, that direction reads no
//! more: back-pressure, and memory bounded by the buffers ([`SOCKET_READ_BUFFER`],
//! [`SESSION_READ_BUFFER`] per side).
//!
//! The frames a side may send are checked as strictly as before (RFC 6455 for a server):
//! masked, no reserved bits, known opcodes, control frames whole and short, continuations
//! only inside a message, at most [`MAX_FRAME_PAYLOAD`] bytes a frame. A text message, a
//! close or the end of the connection ends the session; a violation ends it as a protocol
//! error.

use std::io::{self, IoSlice, Read as _};
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::frames::{Direction, FrameFilter, Plan};
use crate::ws::{
    apply_mask, push_header, Activity, MAX_FRAME_PAYLOAD, MAX_MESSAGE_BYTES, OP_BINARY, OP_CLOSE,
    OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
};

/// Ciphertext read from a side's socket at once (rustls itself asks for 4 KiB at a time:
/// a system call each). One per side of a session.
pub const SOCKET_READ_BUFFER: usize = 64 * 1024;

/// Plaintext (WebSocket frames) read from a side and not yet passed on: the largest frame
/// the relay forwards. One per side of a session.
pub const SESSION_READ_BUFFER: usize = 128 * 1024;

/// Pieces (runs of payload between the sender's frame headers) in one forwarded frame: a
/// sender of many tiny frames gets many forwarded frames, not one long list.
const MAX_PIECES: usize = 64;

/// Frames one direction forwards before the other direction gets its turn.
const FRAMES_PER_TURN: usize = 8;

/// How long closing a finished session's two connections may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection the relay serves: the TLS stream the broker accepted.
pub trait RelayConnection: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The socket under the TLS session and the session itself, so that the relay reads
    /// the socket in large pieces while it splices (through the stream, rustls reads 4 KiB
    /// at a time). `None`: the relay reads through the stream.
    fn socket_and_tls(&mut self) -> Option<(&mut TcpStream, &mut rustls::ServerConnection)> {
        None
    }
}

impl RelayConnection for tokio_rustls::server::TlsStream<TcpStream> {
    fn socket_and_tls(&mut self) -> Option<(&mut TcpStream, &mut rustls::ServerConnection)> {
        let (io, tls) = self.get_mut();
        Some((io, tls))
    }
}

/// In-memory connections, for tests.
impl RelayConnection for tokio::io::DuplexStream {}

/// Why a direction stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The sending side closed (close frame, text message, end of the connection).
    SourceClosed,
    /// The receiving side is gone.
    DestinationClosed,
    /// The sending side broke the WebSocket or tunnel protocol.
    SourceBroke,
}

/// One side of a session.
struct Side<S> {
    io: S,
    /// Ciphertext read ahead: `cipher[cpos..cend]` is not yet handed to rustls.
    cipher: Box<[u8]>,
    cpos: usize,
    cend: usize,
    socket_eof: bool,
    /// Plaintext: `plain[ppos..pend]` is not yet taken apart.
    plain: Box<[u8]>,
    ppos: usize,
    pend: usize,
    /// The data frame being read: payload bytes left, masking key, key position.
    payload: Option<(u64, [u8; 4], usize)>,
    /// A fragmented message is in progress.
    in_message: bool,
    /// Small frames to this side (pongs, resets, close): `out[out_pos..]` is not written.
    out: Vec<u8>,
    out_pos: usize,
    /// A forwarded frame is partly written to this side.
    forwarding: bool,
    unflushed: bool,
}

impl<S: RelayConnection> Side<S> {
    fn new(io: S) -> Side<S> {
        Side {
            io,
            cipher: vec![0; SOCKET_READ_BUFFER].into_boxed_slice(),
            cpos: 0,
            cend: 0,
            socket_eof: false,
            plain: vec![0; SESSION_READ_BUFFER].into_boxed_slice(),
            ppos: 0,
            pend: 0,
            payload: None,
            in_message: false,
            out: Vec::new(),
            out_pos: 0,
            forwarding: false,
            unflushed: false,
        }
    }

    /// Reads plaintext into `plain[pend..]` (making room first); `Ok(0)` at the end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.ppos == self.pend {
            self.ppos = 0;
            self.pend = 0;
        } else if self.ppos > 0 {
            self.plain.copy_within(self.ppos..self.pend, 0);
            self.pend -= self.ppos;
            self.ppos = 0;
        }
        if self.pend == self.plain.len() {
            // Cannot happen: what is taken apart is consumed (a frame header is short).
            return Poll::Ready(Err(io::Error::other("read buffer full")));
        }
        let Side {
            io,
            cipher,
            cpos,
            cend,
            socket_eof,
            plain,
            pend,
            ..
        } = self;
        let dst = &mut plain[*pend..];
        let mut got = 0;
        let n = match io.socket_and_tls() {
            None => {
                let mut rb = ReadBuf::new(dst);
                ready!(Pin::new(io).poll_read(cx, &mut rb))?;
                rb.filled().len()
            }
            // Everything the ciphertext already read holds is decrypted before the
            // plaintext goes on (rustls hands out one record, 16 KiB, at a time): the
            // frame forwarded is as large as what the socket gave, and goes out in one
            // system call rather than one per record.
            Some((tcp, tls)) => loop {
                let room = &mut dst[got..];
                if room.is_empty() {
                    break got;
                }
                match tls.reader().read(room) {
                    // The end (close_notify), or nothing more now that `got` bytes are in.
                    Ok(0) => break got,
                    Ok(n) => {
                        got += n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // What arrived before the error goes on first; the error comes again.
                    Err(_) if got > 0 => break got,
                    Err(e) => return Poll::Ready(Err(e)),
                }
                if *cpos < *cend {
                    let n = tls.read_tls(&mut &cipher[*cpos..*cend])?;
                    if n == 0 {
                        break got;
                    }
                    *cpos += n;
                    if let Err(e) = tls.process_new_packets() {
                        if got > 0 {
                            break got;
                        }
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                    }
                    continue;
                }
                if got > 0 || *socket_eof {
                    break got;
                }
                let mut rb = ReadBuf::new(cipher);
                ready!(Pin::new(&mut *tcp).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                if n == 0 {
                    *socket_eof = true;
                }
                (*cpos, *cend) = (0, n);
            },
        };
        *pend += n;
        Poll::Ready(Ok(n))
    }

    /// Appends a whole, unmasked frame to the small frames for this side.
    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        push_header(&mut self.out, opcode, payload.len(), false);
        self.out.extend_from_slice(payload);
    }

    /// Writes the small frames (unless a forwarded frame is half written).
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.forwarding {
            return Poll::Ready(Ok(()));
        }
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
            self.unflushed = true;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.unflushed {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// Unmasks `buf`, whose first byte is at position `phase` of the key.
fn unmask(buf: &mut [u8], key: [u8; 4], phase: usize) {
    let k = [
        key[phase % 4],
        key[(phase + 1) % 4],
        key[(phase + 2) % 4],
        key[(phase + 3) % 4],
    ];
    apply_mask(buf, k);
}

/// A piece of a forwarded frame.
#[derive(Debug, Clone)]
enum Piece {
    /// Bytes of the source's plaintext buffer.
    Source(Range<usize>),
    /// Bytes of [`Forward::own`].
    Own(Range<usize>),
}

/// A frame on its way to the destination.
#[derive(Debug, Default)]
struct Forward {
    /// The frame header, and header bytes the filter held back from an earlier read.
    own: Vec<u8>,
    pieces: Vec<Piece>,
    /// Payload bytes (what the filter let through), and the whole frame's length.
    payload: usize,
    len: usize,
    written: usize,
    /// Where the source's buffer is free again once the frame is out.
    consumed_to: usize,
}

/// One direction of a session.
struct Half {
    dir: Direction,
    forward: Option<Forward>,
    plan: Plan,
    /// Set when the source has stopped; reported once what it sent before is out.
    stop: Option<Stop>,
}

impl Half {
    fn new(dir: Direction) -> Half {
        Half {
            dir,
            forward: None,
            plan: Plan::default(),
            stop: None,
        }
    }

    /// Moves frames until nothing can move; `Ready` when the direction has stopped.
    fn poll<S: RelayConnection>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Side<S>,
        dst: &mut Side<S>,
        filter: &mut FrameFilter,
        counter: &AtomicU64,
        activity: &Activity,
    ) -> Poll<Stop> {
        let mut frames = 0;
        loop {
            if let Some(f) = &mut self.forward {
                if !dst.forwarding {
                    // Small frames already queued for the destination go first.
                    match dst.poll_write_out(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => return Poll::Ready(Stop::DestinationClosed),
                        Poll::Pending => return Poll::Pending,
                    }
                    dst.forwarding = true;
                }
                while f.written < f.len {
                    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(f.pieces.len());
                    let mut skip = f.written;
                    for p in &f.pieces {
                        let b = match p {
                            Piece::Source(r) => &src.plain[r.clone()],
                            Piece::Own(r) => &f.own[r.clone()],
                        };
                        if skip >= b.len() {
                            skip -= b.len();
                        } else {
                            slices.push(IoSlice::new(&b[skip..]));
                            skip = 0;
                        }
                    }
                    match Pin::new(&mut dst.io).poll_write_vectored(cx, &slices) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                            return Poll::Ready(Stop::DestinationClosed)
                        }
                        Poll::Ready(Ok(n)) => f.written += n,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                dst.forwarding = false;
                dst.unflushed = true;
                src.ppos = f.consumed_to;
                self.forward = None;
                frames += 1;
            }
            match src.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Stop::SourceClosed),
                Poll::Pending => return Poll::Pending,
            }
            if let Some(stop) = self.stop {
                return Poll::Ready(stop);
            }
            if frames >= FRAMES_PER_TURN {
                // The other direction's turn; this one goes on at the next poll.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match self.take_apart(src, filter) {
                Ok(Some(f)) => {
                    counter.fetch_add(f.payload as u64, Ordering::Relaxed);
                    activity.touch();
                    self.forward = Some(f);
                    continue;
                }
                Ok(None) => {}
                Err(stop) => {
                    self.stop = Some(stop);
                    continue;
                }
            }
            match src.poll_fill(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => self.stop = Some(Stop::SourceClosed),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => {
                    // Nothing more for now: answers queued on the way, and what was written,
                    // go out.
                    if let Poll::Ready(Err(_)) = src.poll_write_out(cx) {
                        return Poll::Ready(Stop::SourceClosed);
                    }
                    if let Poll::Ready(Err(_)) = dst.poll_flush(cx) {
                        return Poll::Ready(Stop::DestinationClosed);
                    }
                    if let Poll::Ready(Err(_)) = src.poll_flush(cx) {
                        return Poll::Ready(Stop::SourceClosed);
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Takes apart the frames in the source's buffer: the payload of its data frames,
    /// through the filter, becomes one frame for the destination (`None` if nothing goes
    /// on); control frames are answered. Stops at the end of the buffer or of a frame
    /// header that is not all there yet.
    fn take_apart<S: RelayConnection>(
        &mut self,
        src: &mut Side<S>,
        filter: &mut FrameFilter,
    ) -> Result<Option<Forward>, Stop> {
        let mut f = Forward::default();
        // Room for the frame header, written once the length is known.
        f.own.resize(10, 0);
        let mut pos = src.ppos;
        while pos < src.pend && f.pieces.len() < MAX_PIECES {
            if let Some((left, key, phase)) = src.payload {
                let n = (left.min((src.pend - pos) as u64)) as usize;
                let chunk = &mut src.plain[pos..pos + n];
                unmask(chunk, key, phase);
                if let Err(e) = filter.plan(self.dir, chunk, &mut self.plan) {
                    tracing::warn!(target: "audit", event = "tunnel_protocol_error", error = %e, "{} broke the tunnel protocol", self.dir_name());
                    return Err(Stop::SourceBroke);
                }
                if !self.plan.carried.is_empty() {
                    let start = f.own.len();
                    f.own.extend_from_slice(&self.plan.carried);
                    f.pieces.push(Piece::Own(start..f.own.len()));
                    f.payload += self.plan.carried.len();
                }
                for r in &self.plan.ranges {
                    f.pieces.push(Piece::Source(pos + r.start..pos + r.end));
                    f.payload += r.len();
                }
                if self.plan.refused > 0 {
                    tracing::info!(
                        refused = self.plan.refused,
                        "tunnel stream refused: tunnel.max_streams_per_session reached"
                    );
                }
                if !self.plan.reply.is_empty() {
                    let reply = std::mem::take(&mut self.plan.reply);
                    src.queue(OP_BINARY, &reply);
                }
                pos += n;
                let left = left - n as u64;
                src.payload = (left > 0).then_some((left, key, (phase + n) % 4));
                continue;
            }
            // A frame header: 2 bytes, the extended length, the masking key.
            let avail = &src.plain[pos..src.pend];
            if avail.len() < 2 {
                break;
            }
            let (b0, b1) = (avail[0], avail[1]);
            let ext = match b1 & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let head = 2 + ext + 4;
            if avail.len() < head {
                break;
            }
            if b0 & 0x70 != 0 || b1 & 0x80 == 0 {
                return Err(self.broke("reserved bits set, or an unmasked frame"));
            }
            let len = match ext {
                0 => u64::from(b1 & 0x7f),
                2 => u64::from(u16::from_be_bytes([avail[2], avail[3]])),
                _ => {
                    let mut l = [0u8; 8];
                    l.copy_from_slice(&avail[2..10]);
                    u64::from_be_bytes(l)
                }
            };
            let mut key = [0u8; 4];
            key.copy_from_slice(&avail[2 + ext..head]);
            let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
            match opcode {
                OP_BINARY | OP_CONTINUATION => {
                    if (opcode == OP_CONTINUATION) != src.in_message {
                        return Err(self.broke("broken fragmentation"));
                    }
                    if len > MAX_FRAME_PAYLOAD {
                        return Err(self.broke("frame too large"));
                    }
                    src.in_message = !fin;
                    pos += head;
                    src.payload = (len > 0).then_some((len, key, 0));
                }
                OP_PING | OP_PONG | OP_CLOSE => {
                    if !fin || len > 125 {
                        return Err(self.broke("fragmented or oversized control frame"));
                    }
                    let len = len as usize;
                    if avail.len() < head + len {
                        break;
                    }
                    let mut payload = [0u8; 125];
                    payload[..len].copy_from_slice(&avail[head..head + len]);
                    unmask(&mut payload[..len], key, 0);
                    pos += head + len;
                    match opcode {
                        OP_PING => src.queue(OP_PONG, &payload[..len]),
                        OP_CLOSE => {
                            return if f.payload > 0 {
                                // What came before goes on first; the close is read again.
                                Ok(Some(self.finish(f, pos - head - len)))
                            } else {
                                src.ppos = pos;
                                Err(Stop::SourceClosed)
                            };
                        }
                        _ => {}
                    }
                }
                // A text message (the session never carries one) ends it, as a close.
                OP_TEXT if !src.in_message => {
                    return if f.payload > 0 {
                        Ok(Some(self.finish(f, pos)))
                    } else {
                        src.ppos = pos;
                        Err(Stop::SourceClosed)
                    };
                }
                _ => return Err(self.broke("unknown opcode")),
            }
        }
        if f.payload == 0 {
            src.ppos = pos;
            return Ok(None);
        }
        Ok(Some(self.finish(f, pos)))
    }

    /// Writes the frame header in front of the pieces.
    fn finish(&self, mut f: Forward, consumed_to: usize) -> Forward {
        let mut head = Vec::with_capacity(10);
        push_header(&mut head, OP_BINARY, f.payload, false);
        let start = 10 - head.len();
        f.own[start..10].copy_from_slice(&head);
        f.pieces.insert(0, Piece::Own(start..10));
        f.len = f.payload + head.len();
        f.consumed_to = consumed_to;
        f
    }

    fn dir_name(&self) -> &'static str {
        match self.dir {
            Direction::ToDevice => "operator",
            Direction::ToOperator => "device",
        }
    }

    fn broke(&self, what: &str) -> Stop {
        tracing::warn!(target: "audit", event = "tunnel_protocol_error", error = what, "{} broke the WebSocket protocol", self.dir_name());
        Stop::SourceBroke
    }
}

/// Forwards both ways between `op` and `dev` until one side closes or breaks the protocol,
/// or `limit` resolves (its reason). Both sides get a close frame at the end (unless a
/// frame to them is half written). Returns why the session ended.
pub async fn splice<S, L>(
    op: S,
    dev: S,
    max_streams: usize,
    activity: &Activity,
    limit: L,
) -> &'static str
where
    S: RelayConnection,
    L: std::future::Future<Output = &'static str>,
{
    let mut op = Side::new(op);
    let mut dev = Side::new(dev);
    let mut filter = FrameFilter::new(max_streams, MAX_MESSAGE_BYTES as u32);
    let mut to_device = Half::new(Direction::ToDevice);
    let mut to_operator = Half::new(Direction::ToOperator);
    let mut device_first = false;
    activity.touch();
    let reason = {
        let forward = std::future::poll_fn(|cx| {
            // Both directions in turn, starting with the other one each time.
            device_first = !device_first;
            for i in 0..2 {
                let r = if (i == 0) == device_first {
                    to_device
                        .poll(
                            cx,
                            &mut op,
                            &mut dev,
                            &mut filter,
                            &activity.bytes_in,
                            activity,
                        )
                        .map(|s| match s {
                            Stop::SourceClosed => "operator closed",
                            Stop::DestinationClosed => "device closed",
                            Stop::SourceBroke => "operator protocol error",
                        })
                } else {
                    to_operator
                        .poll(
                            cx,
                            &mut dev,
                            &mut op,
                            &mut filter,
                            &activity.bytes_out,
                            activity,
                        )
                        .map(|s| match s {
                            Stop::SourceClosed => "device closed",
                            Stop::DestinationClosed => "operator closed",
                            Stop::SourceBroke => "device protocol error",
                        })
                };
                if r.is_ready() {
                    return r;
                }
            }
            Poll::Pending
        });
        tokio::select! {
            r = forward => r,
            r = limit => r,
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        for side in [&mut dev, &mut op] {
            if side.forwarding {
                continue;
            }
            side.queue(OP_CLOSE, &1000u16.to_be_bytes());
            let _ = std::future::poll_fn(|cx| side.poll_write_out(cx)).await;
            side.unflushed = true;
            let _ = std::future::poll_fn(|cx| side.poll_flush(cx)).await;
        }
    })
    .await;
    reason
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::reset_frame;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::{Bytes, Message};
    use tokio_tungstenite::WebSocketStream;

    type Client = WebSocketStream<tokio::io::DuplexStream>;

    fn yamux(typ: u8, flags: u16, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0, typ];
        f.extend_from_slice(&flags.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A relay splicing two tungstenite clients (operator, device) over in-memory pipes.
    async fn session(
        max_streams: usize,
    ) -> (
        Client,
        Client,
        tokio::task::JoinHandle<&'static str>,
        std::sync::Arc<Activity>,
    ) {
        let (op_c, op_r) = tokio::io::duplex(1 << 20);
        let (dev_c, dev_r) = tokio::io::duplex(1 << 20);
        let op = WebSocketStream::from_raw_socket(op_c, Role::Client, None).await;
        let dev = WebSocketStream::from_raw_socket(dev_c, Role::Client, None).await;
        let activity = std::sync::Arc::new(Activity::default());
        let a = activity.clone();
        let relay = tokio::spawn(async move {
            splice(op_r, dev_r, max_streams, &a, std::future::pending()).await
        });
        (op, dev, relay, activity)
    }

    /// Everything the receiving client gets, as one byte string, until it has `n` bytes.
    async fn read_bytes(c: &mut Client, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            match c.next().await.unwrap().unwrap() {
                Message::Binary(b) => got.extend_from_slice(&b),
                m => panic!("{m:?}"),
            }
        }
        got
    }

    #[tokio::test]
    async fn forwards_both_ways_and_answers_pings() {
        let (mut op, mut dev, relay, activity) = session(4).await;
        let mut sent = yamux(1, 1, 1, &[]);
        sent[8..12].copy_from_slice(&[0, 4, 0, 0]);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        for c in data.chunks(100_000) {
            sent.extend(yamux(0, 0, 1, c));
        }
        // Split at odd places: the relay's reads do not align with anything.
        op.send(Message::binary(sent[..5].to_vec())).await.unwrap();
        op.send(Message::binary(sent[5..100_007].to_vec()))
            .await
            .unwrap();
        op.send(Message::Ping(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        op.send(Message::binary(sent[100_007..].to_vec()))
            .await
            .unwrap();
        assert_eq!(read_bytes(&mut dev, sent.len()).await, sent);
        assert_eq!(
            op.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"hi"))
        );
        let back = yamux(0, 0, 1, b"answer");
        dev.send(Message::binary(back.clone())).await.unwrap();
        assert_eq!(read_bytes(&mut op, back.len()).await, back);
        assert_eq!(activity.bytes_in(), sent.len() as u64);
        assert_eq!(activity.bytes_out(), back.len() as u64);
        // The operator goes: the device gets a close frame.
        op.close(None).await.unwrap();
        assert_eq!(relay.await.unwrap(), "operator closed");
        assert!(matches!(
            dev.next().await.unwrap().unwrap(),
            Message::Close(_)
        ));
    }

    #[tokio::test]
    async fn streams_over_the_limit_are_reset_by_the_relay() {
        let (mut op, mut dev, relay, _) = session(1).await;
        let mut first = yamux(0, 1, 1, b"one");
        first.extend(yamux(0, 1, 3, b"two"));
        first.extend(yamux(0, 0, 1, b"more"));
        op.send(Message::binary(first)).await.unwrap();
        let mut want = yamux(0, 1, 1, b"one");
        want.extend(yamux(0, 0, 1, b"more"));
        assert_eq!(read_bytes(&mut dev, want.len()).await, want);
        assert_eq!(
            read_bytes(&mut op, 12).await,
            reset_frame(3).to_vec(),
            "the relay resets stream 3"
        );
        // A refused stream alone (nothing forwarded): its reset still comes back at once.
        op.send(Message::binary(yamux(1, 1, 5, &[]))).await.unwrap();
        assert_eq!(read_bytes(&mut op, 12).await, reset_frame(5).to_vec());
        drop(dev);
        op.send(Message::binary(yamux(0, 0, 1, b"x"))).await.ok();
        assert_eq!(relay.await.unwrap(), "device closed");
    }

    #[tokio::test]
    async fn protocol_violations_end_the_session() {
        // The device may not open streams.
        let (_op, mut dev, relay, _) = session(4).await;
        dev.send(Message::binary(yamux(0, 1, 2, b"x")))
            .await
            .unwrap();
        assert_eq!(relay.await.unwrap(), "device protocol error");
        // An unmasked frame (as a server would send) is not a client's.
        let (op_c, op_r) = tokio::io::duplex(1 << 16);
        let (_dev_c, dev_r) = tokio::io::duplex(1 << 16);
        let mut op = WebSocketStream::from_raw_socket(op_c, Role::Server, None).await;
        let a = Activity::default();
        let relay = async { splice(op_r, dev_r, 4, &a, std::future::pending()).await };
        let (r, _) = tokio::join!(relay, op.send(Message::binary(vec![0u8; 12])));
        assert_eq!(r, "operator protocol error");
        // A text message ends the session as a close.
        let (mut op, _dev, relay, _) = session(4).await;
        op.send(Message::text("hello")).await.unwrap();
        assert_eq!(relay.await.unwrap(), "operator closed");
    }

    /// Masks `payload` into a client frame.
    fn client_frame(opcode: u8, fin: bool, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut f = Vec::new();
        push_header(&mut f, opcode, payload.len(), true);
        if !fin {
            f[0] &= 0x7f;
        }
        f.extend_from_slice(&key);
        let start = f.len();
        f.extend_from_slice(payload);
        apply_mask(&mut f[start..], key);
        f
    }

    /// Runs a session whose operator side sends `raw` (in pieces of `chunk` bytes, then
    /// closes), and whose device reads everything: what the device got, and why the
    /// session ended (the harness of the `splice` fuzz target).
    fn run_raw(raw: Vec<u8>, chunk: usize) -> (Vec<u8>, &'static str) {
        let o = crate::fuzzing::run_splice(&raw, chunk);
        (o.to_device, o.reason)
    }

    proptest::proptest! {
        /// Any bytes from a side: no panic, the session ends.
        #[test]
        fn arbitrary_input_ends_the_session(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..2000), chunk in 0u8..=255) {
            let mut data = vec![chunk];
            data.extend(raw);
            let _ = crate::fuzzing::check_splice(&data);
        }

        /// Valid yamux in binary frames (fragmented or not, with pings between), cut
        /// anywhere: the device gets exactly the yamux bytes.
        #[test]
        fn frames_cut_anywhere_arrive_whole(
            sizes in proptest::collection::vec(0usize..3000, 1..12),
            fragment in proptest::bool::ANY,
            chunk in 1usize..5000,
            key in proptest::array::uniform4(proptest::num::u8::ANY),
        ) {
            let mut yamux_bytes = yamux(1, 1, 1, &[]);
            for (i, n) in sizes.iter().enumerate() {
                yamux_bytes.extend(yamux(0, 0, 1, &vec![i as u8; *n]));
            }
            let mut raw = Vec::new();
            let pieces: Vec<&[u8]> = yamux_bytes.chunks(1 + yamux_bytes.len() / 3).collect();
            for (i, p) in pieces.iter().enumerate() {
                if fragment {
                    let op = if i == 0 { OP_BINARY } else { OP_CONTINUATION };
                    raw.extend(client_frame(op, i + 1 == pieces.len(), p, key));
                } else {
                    raw.extend(client_frame(OP_BINARY, true, p, key));
                }
                if i == 0 {
                    raw.extend(client_frame(OP_PING, true, b"ping", key));
                }
            }
            raw.extend(client_frame(OP_CLOSE, true, &1000u16.to_be_bytes(), key));
            let (got, reason) = run_raw(raw, chunk);
            proptest::prop_assert_eq!(got, yamux_bytes);
            proptest::prop_assert_eq!(reason, "operator closed");
        }
    }

    #[tokio::test]
    async fn the_limit_ends_the_session() {
        let (op_c, op_r) = tokio::io::duplex(1 << 16);
        let (dev_c, dev_r) = tokio::io::duplex(1 << 16);
        let mut op = WebSocketStream::from_raw_socket(op_c, Role::Client, None).await;
        let mut dev = WebSocketStream::from_raw_socket(dev_c, Role::Client, None).await;
        let a = Activity::default();
        let r = splice(op_r, dev_r, 4, &a, async { "idle timeout" }).await;
        assert_eq!(r, "idle timeout");
        assert!(matches!(
            op.next().await.unwrap().unwrap(),
            Message::Close(_)
        ));
        assert!(matches!(
            dev.next().await.unwrap().unwrap(),
            Message::Close(_)
        ));
    }
}
