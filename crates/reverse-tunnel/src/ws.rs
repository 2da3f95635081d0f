//! WebSocket plumbing shared by the three roles: the first JSON exchange, the client
//! connection (TLS, then WebSocket upgrade), the client's framing ([`WsClient`]) and the
//! byte-stream adapter yamux runs over ([`WsBytes`]). The relay's side of a running
//! session is in [`crate::splice`].

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::proto::{Reply, Request, MAX_REQUEST_BYTES, SUBPROTOCOL};

/// Largest WebSocket message either side sends or accepts once the session runs.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Bytes a client reads from its TCP socket at once, below TLS (rustls asks for 4 KiB at a
/// time; without this buffer every 4 KiB would be a system call). One per relay connection.
pub const TCP_READ_BUFFER: usize = 64 * 1024;

/// Written frames a client lets wait for a flush: beyond this, the next write first sends
/// them on. At most this plus one frame of [`MAX_MESSAGE_BYTES`] is pending ([`WsClient`]).
pub const WS_WRITE_BUFFER: usize = 64 * 1024;

/// Byte counts and the time of the last byte, shared with whoever watches the session.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }
}

impl Activity {
    pub fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last byte either way.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Resolves once no byte has gone either way for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let quiet = self.idle();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }

    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }
}

// -- the client side: WebSocket framing over TLS ------------------------------------------

/// Frame opcodes (RFC 6455 §5.2), for both ends: this client and the relay's
/// [`crate::splice`].
pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xa;

/// Masking keys taken from the operating system's random source at once (one system call
/// per this many frames).
const MASK_KEYS_PER_FILL: usize = 64;

/// Largest WebSocket frame payload either side of a session may send: the client accepts
/// no larger frame from the relay, the relay none from a client.
pub const MAX_FRAME_PAYLOAD: u64 = (MAX_MESSAGE_BYTES + 1024) as u64;

/// Appends the header of a whole frame (FIN set) of `len` payload bytes; `masked`: a
/// client's frame, whose masking key the caller appends next.
pub(crate) fn push_header(out: &mut Vec<u8>, opcode: u8, len: usize, masked: bool) {
    let mask = if masked { 0x80 } else { 0 };
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(mask | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(mask | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// What the client is reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    /// A frame header: `have` of `need` bytes (2 to 10: server frames are not masked).
    Header { have: usize, need: usize },
    /// The payload of a data frame: `left` bytes; `fin`: its message ends with it.
    Data { left: u64, fin: bool },
    /// The payload of a control frame (at most 125 bytes).
    Control { opcode: u8, have: usize, len: usize },
}

/// What [`WsClient::poll_payload`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// `n` payload bytes of a data message (text or binary) are in the caller's buffer;
    /// `end`: the message is complete.
    Data { n: usize, text: bool, end: bool },
    /// The relay closed the WebSocket (or the connection ended between frames).
    End,
}

/// The client end of a relay WebSocket once it is upgraded: frames (RFC 6455) read and
/// written directly on the TLS stream. Payload bytes go from the TLS stream straight into
/// the reader's buffer; a write becomes one binary frame, masked as the protocol wants,
/// gathered with the next ones until a flush (or until [`WS_WRITE_BUFFER`] is pending). A
/// ping is answered; a close, or the end of the connection, ends the stream. Anything
/// else that the relay must not send (masked or oversized frames, reserved bits or
/// opcodes, broken fragmentation) is an error.
///
/// Memory: the pending output (at most [`WS_WRITE_BUFFER`] plus one frame of at most
/// [`MAX_MESSAGE_BYTES`]) and 125 bytes of control payload.
#[derive(Debug)]
pub struct WsClient<S> {
    io: S,
    head: [u8; 10],
    state: ReadState,
    /// A data message is in progress (its next frames are continuations) and is text.
    in_message: bool,
    text: bool,
    control: [u8; 125],
    ended: bool,
    /// Frames to write; `out[out_pos..]` is not written yet.
    out: Vec<u8>,
    out_pos: usize,
    close_queued: bool,
    /// Masking keys (RFC 6455 §5.3 wants them unpredictable): bytes from the operating
    /// system's random source, [`MASK_KEYS_PER_FILL`] keys per call; `keys[key_pos..]` are
    /// unused.
    keys: [u8; 4 * MASK_KEYS_PER_FILL],
    key_pos: usize,
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("WebSocket protocol error from the relay: {what}"),
    )
}

/// XORs `buf` with the masking key (RFC 6455 §5.3), eight bytes at a time.
pub(crate) fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let k8 = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ k8).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the key starts over.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

impl<S> WsClient<S> {
    /// Takes over `io`, a connection whose WebSocket upgrade is complete and on which the
    /// relay has sent nothing since.
    pub fn new(io: S) -> WsClient<S> {
        WsClient {
            io,
            head: [0; 10],
            state: ReadState::Header { have: 0, need: 2 },
            in_message: false,
            text: false,
            control: [0; 125],
            ended: false,
            out: Vec::new(),
            out_pos: 0,
            close_queued: false,
            keys: [0; 4 * MASK_KEYS_PER_FILL],
            key_pos: 4 * MASK_KEYS_PER_FILL,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    fn mask_key(&mut self) -> [u8; 4] {
        if self.key_pos == self.keys.len() {
            getrandom::fill(&mut self.keys).expect("the operating system's random source failed");
            self.key_pos = 0;
        }
        let mut key = [0u8; 4];
        key.copy_from_slice(&self.keys[self.key_pos..self.key_pos + 4]);
        self.key_pos += 4;
        key
    }

    /// Appends one whole frame (FIN set, masked) to the output.
    fn queue_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.queue_frame_of(opcode, &[], payload)
    }

    /// Appends one whole frame (FIN set, masked) whose payload is `a` then `b`.
    fn queue_frame_of(&mut self, opcode: u8, a: &[u8], b: &[u8]) {
        let len = a.len() + b.len();
        self.out.reserve(14 + len);
        push_header(&mut self.out, opcode, len, true);
        let key = self.mask_key();
        self.out.extend_from_slice(&key);
        let start = self.out.len();
        self.out.extend_from_slice(a);
        self.out.extend_from_slice(b);
        apply_mask(&mut self.out[start..], key);
    }

    fn queue_close(&mut self, code: u16) {
        if !self.close_queued {
            self.close_queued = true;
            self.queue_frame(OP_CLOSE, &code.to_be_bytes());
        }
    }

    fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
    /// Writes the pending output to the TLS stream (without flushing it).
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes and flushes everything pending.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_out(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Reads until payload bytes of a data message are in `buf` (at most `buf.len()`),
    /// the stream ends, or an error. Control frames are handled on the way.
    fn poll_payload(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Payload>> {
        loop {
            if self.ended {
                return Poll::Ready(Ok(Payload::End));
            }
            match self.state {
                ReadState::Header { have, need } => {
                    let mut rb = ReadBuf::new(&mut self.head[have..need]);
                    ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        if have == 0 && !self.in_message {
                            // The connection ended between messages.
                            self.ended = true;
                            continue;
                        }
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    let have = have + n;
                    if have < need {
                        self.state = ReadState::Header { have, need };
                        continue;
                    }
                    let (b0, b1) = (self.head[0], self.head[1]);
                    if b1 & 0x80 != 0 {
                        return Poll::Ready(Err(protocol_error("masked frame")));
                    }
                    let ext = match b1 & 0x7f {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    if need < 2 + ext {
                        self.state = ReadState::Header {
                            have,
                            need: 2 + ext,
                        };
                        continue;
                    }
                    let len = match ext {
                        0 => u64::from(b1 & 0x7f),
                        2 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                        _ => {
                            let mut l = [0u8; 8];
                            l.copy_from_slice(&self.head[2..10]);
                            u64::from_be_bytes(l)
                        }
                    };
                    self.state = ReadState::Header { have: 0, need: 2 };
                    if b0 & 0x70 != 0 {
                        return Poll::Ready(Err(protocol_error("reserved bits set")));
                    }
                    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
                    match opcode {
                        OP_CLOSE | OP_PING | OP_PONG => {
                            if !fin || len > 125 {
                                return Poll::Ready(Err(protocol_error(
                                    "fragmented or oversized control frame",
                                )));
                            }
                            self.state = ReadState::Control {
                                opcode,
                                have: 0,
                                len: len as usize,
                            };
                        }
                        OP_CONTINUATION | OP_TEXT | OP_BINARY => {
                            if (opcode == OP_CONTINUATION) != self.in_message {
                                return Poll::Ready(Err(protocol_error("broken fragmentation")));
                            }
                            if len > MAX_FRAME_PAYLOAD {
                                return Poll::Ready(Err(protocol_error("frame too large")));
                            }
                            if opcode != OP_CONTINUATION {
                                self.text = opcode == OP_TEXT;
                            }
                            self.in_message = !fin;
                            if len == 0 {
                                if fin {
                                    return Poll::Ready(Ok(Payload::Data {
                                        n: 0,
                                        text: self.text,
                                        end: true,
                                    }));
                                }
                                continue;
                            }
                            self.state = ReadState::Data { left: len, fin };
                        }
                        _ => return Poll::Ready(Err(protocol_error("unknown opcode"))),
                    }
                }
                ReadState::Data { left, fin } => {
                    let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let mut rb = ReadBuf::new(&mut buf[..want]);
                    ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        if want == 0 {
                            return Poll::Ready(Ok(Payload::Data {
                                n: 0,
                                text: self.text,
                                end: false,
                            }));
                        }
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ReadState::Header { have: 0, need: 2 }
                    } else {
                        ReadState::Data { left, fin }
                    };
                    return Poll::Ready(Ok(Payload::Data {
                        n,
                        text: self.text,
                        end: left == 0 && fin,
                    }));
                }
                ReadState::Control { opcode, have, len } => {
                    if have < len {
                        let mut rb = ReadBuf::new(&mut self.control[have..len]);
                        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
                        let n = rb.filled().len();
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                        }
                        self.state = ReadState::Control {
                            opcode,
                            have: have + n,
                            len,
                        };
                        continue;
                    }
                    self.state = ReadState::Header { have: 0, need: 2 };
                    match opcode {
                        OP_PING => {
                            let payload = self.control;
                            self.queue_frame(OP_PONG, &payload[..len]);
                        }
                        OP_CLOSE => {
                            self.ended = true;
                            self.queue_close(1000);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Sends one text message (the JSON exchange).
    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.queue_frame(OP_TEXT, text.as_bytes());
        std::future::poll_fn(|cx| self.poll_flush_out(cx)).await
    }

    /// Reads one text message of at most `max` bytes (the JSON exchange).
    pub async fn recv_text(&mut self, max: usize) -> Result<String, String> {
        let mut msg = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let p = std::future::poll_fn(|cx| self.poll_payload(cx, &mut buf))
                .await
                .map_err(|e| e.to_string())?;
            match p {
                Payload::End => return Err("the connection closed".into()),
                Payload::Data { text: false, .. } => {
                    return Err("expected a JSON text message first".into())
                }
                Payload::Data { n, end, .. } => {
                    if msg.len() + n > max {
                        return Err(format!("message longer than {max} bytes"));
                    }
                    msg.extend_from_slice(&buf[..n]);
                    if end {
                        return String::from_utf8(msg)
                            .map_err(|_| "a text message that is not UTF-8".to_string());
                    }
                }
            }
        }
    }

    /// Sends a close frame (normal closure) and ends the connection's sending side.
    pub async fn close(&mut self) -> io::Result<()> {
        self.queue_close(1000);
        std::future::poll_fn(|cx| self.poll_flush_out(cx)).await?;
        std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await
    }
}

/// Writes shorter than this wait (in [`WsBytes`]) to go out in one frame with the next
/// write, or at the flush: yamux writes each frame's 12-byte header on its own.
const SMALL_WRITE: usize = 64;

/// A relay WebSocket seen as a byte stream, for yamux: reads return the payloads of binary
/// messages in order; a close, the end of the connection, or a text message (which the
/// session never carries) ends the stream. A write becomes one binary frame (a short one
/// joins the next write's frame); frames leave at the next flush (yamux flushes after
/// every frame of its own, so a small write leaves at once) or once [`WS_WRITE_BUFFER`]
/// is pending.
pub struct WsBytes<S> {
    ws: WsClient<S>,
    /// Short writes waiting for the next write or the flush: at most [`SMALL_WRITE`].
    small: Vec<u8>,
    /// A flush was asked for after the last write, and the task let others run once.
    flush_waited: bool,
    activity: Arc<Activity>,
}

impl<S> WsBytes<S> {
    pub fn new(ws: WsClient<S>, activity: Arc<Activity>) -> WsBytes<S> {
        WsBytes {
            ws,
            small: Vec::new(),
            flush_waited: false,
            activity,
        }
    }

    /// Puts the short writes waiting into a frame of their own.
    fn queue_small(&mut self) {
        if !self.small.is_empty() {
            self.ws.queue_frame_of(OP_BINARY, &self.small, &[]);
            self.small.clear();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            match ready!(this.ws.poll_payload(cx, buf.initialize_unfilled()))? {
                Payload::End => return Poll::Ready(Ok(())),
                Payload::Data { text: true, .. } => {
                    this.ws.ended = true;
                    return Poll::Ready(Ok(()));
                }
                Payload::Data { n: 0, .. } => {}
                Payload::Data { n, .. } => {
                    buf.advance(n);
                    this.activity
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                    this.activity.touch();
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.ws.close_queued {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.ws.pending_out() >= WS_WRITE_BUFFER {
            ready!(this.ws.poll_write_out(cx))?;
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.flush_waited = false;
        let n = if this.small.len() + buf.len() < SMALL_WRITE {
            this.small.extend_from_slice(buf);
            buf.len()
        } else {
            let n = buf.len().min(MAX_MESSAGE_BYTES - this.small.len());
            this.ws.queue_frame_of(OP_BINARY, &this.small, &buf[..n]);
            this.small.clear();
            n
        };
        this.activity
            .bytes_out
            .fetch_add(n as u64, Ordering::Relaxed);
        this.activity.touch();
        Poll::Ready(Ok(n))
    }

    /// yamux flushes after every frame it writes, and ignores a flush that is not done
    /// yet. The first flush after a write lets the task's other work run once (the frames
    /// other streams have ready): they leave together, in one TLS write, at the next
    /// flush. A frame alone waits for one turn of the scheduler.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.flush_waited && (!this.small.is_empty() || this.ws.pending_out() > 0) {
            this.flush_waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.queue_small();
        this.ws.poll_flush_out(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ws.close_queued {
            this.queue_small();
        }
        this.ws.queue_close(1000);
        ready!(this.ws.poll_flush_out(cx))?;
        Pin::new(&mut this.ws.io).poll_shutdown(cx)
    }
}

/// The WebSocket configuration of a client's upgrade (tungstenite does the HTTP part; the
/// frames are then [`WsClient`]'s).
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES + 1024))
        .max_frame_size(Some(MAX_MESSAGE_BYTES + 1024))
        // Bounded buffering: a writer waits (back-pressure) instead of queueing without
        // limit.
        .max_write_buffer_size(4 * MAX_MESSAGE_BYTES)
        .write_buffer_size(64 * 1024)
}

/// Reads the first message: one JSON text message (within `timeout`).
pub async fn read_json<S, T>(ws: &mut WebSocketStream<S>, timeout: Duration) -> Result<T, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: serde::de::DeserializeOwned,
{
    let msg = tokio::time::timeout(timeout, async {
        loop {
            match ws.next().await {
                None => return Err("the connection closed".to_string()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(Message::Text(t))) => return Ok(t),
                Some(Ok(Message::Binary(_))) => {
                    return Err("expected a JSON text message first".into())
                }
                Some(Ok(Message::Close(_))) => return Err("the connection closed".to_string()),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .map_err(|_| format!("no request within {} s", timeout.as_secs()))??;
    if msg.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    serde_json::from_str(msg.as_str()).map_err(|e| format!("malformed message: {e}"))
}

fn ws_io(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(e) => e,
        E::ConnectionClosed | E::AlreadyClosed => io::Error::from(io::ErrorKind::BrokenPipe),
        e => io::Error::other(e.to_string()),
    }
}

/// Sends one JSON text message.
pub async fn write_json<S, T>(ws: &mut WebSocketStream<S>, value: &T) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: serde::Serialize,
{
    let text = serde_json::to_string(value).map_err(io::Error::other)?;
    ws.send(Message::text(text)).await.map_err(ws_io)
}

/// A relay URL taken apart: `wss://HOST[:PORT]/PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl RelayUrl {
    pub fn parse(url: &str) -> Result<RelayUrl, String> {
        let rest = url.strip_prefix("wss://").ok_or_else(|| {
            format!("{url:?}: the relay is reached with wss://HOST:PORT (TLS only)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, p) = h
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: bad IPv6 address"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            None => 443,
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(RelayUrl {
            host,
            port,
            path: if path.is_empty() {
                crate::proto::PATH.to_string()
            } else {
                path.to_string()
            },
        })
    }

    pub fn url(&self) -> String {
        if self.host.contains(':') {
            format!("wss://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            format!("wss://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// The client side of a relay connection: TCP, read in [`TCP_READ_BUFFER`] pieces; TLS;
/// WebSocket frames ([`WsClient`]).
pub type ClientWs = WsClient<TlsStream<BufReader<TcpStream>>>;

/// Connects to the relay (TCP, TLS with `tls` and host-name verification, WebSocket
/// upgrade offering [`SUBPROTOCOL`]), sends `request` and returns the reply.
pub async fn connect(
    url: &RelayUrl,
    tls: Arc<rustls::ClientConfig>,
    request: &Request,
    timeout: Duration,
) -> Result<(ClientWs, Reply), String> {
    let work = async {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("cannot reach {}:{}: {e}", url.host, url.port))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| format!("{}: {e}", url.host))?;
        let tcp = BufReader::with_capacity(TCP_READ_BUFFER, tcp);
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", url.host))?;
        let mut req = url
            .url()
            .into_client_request()
            .map_err(|e| format!("{}: {e}", url.url()))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        // tungstenite does the HTTP upgrade; the relay sends nothing before our request, so
        // nothing is left in tungstenite's buffer when the frames continue here.
        let (ws, _resp) = tokio_tungstenite::client_async_with_config(req, tls, Some(config()))
            .await
            .map_err(|e| format!("WebSocket upgrade at {}: {e}", url.url()))?;
        let mut ws = WsClient::new(ws.into_inner());
        let text = serde_json::to_string(request).map_err(|e| e.to_string())?;
        ws.send_text(&text)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        Ok::<_, String>(ws)
    };
    let mut ws = tokio::time::timeout(timeout, work).await.map_err(|_| {
        format!(
            "no connection to {} within {} s",
            url.url(),
            timeout.as_secs()
        )
    })??;
    // The reply to `open` comes when the device has joined: up to the offer's lifetime.
    let reply = tokio::time::timeout(Duration::from_secs(120), ws.recv_text(MAX_REQUEST_BYTES))
        .await
        .map_err(|_| "no reply within 120 s".to_string())??;
    let reply: Reply =
        serde_json::from_str(&reply).map_err(|e| format!("malformed message: {e}"))?;
    Ok((ws, reply))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Bytes;

    type Server = WebSocketStream<tokio::io::DuplexStream>;

    /// A client over one end of a pipe, tungstenite as the relay on the other.
    async fn client_and_server() -> (WsClient<tokio::io::DuplexStream>, Server) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = WebSocketStream::from_raw_socket(b, Role::Server, Some(config())).await;
        (WsClient::new(a), server)
    }

    async fn binary(server: &mut Server) -> Bytes {
        match server.next().await.unwrap().unwrap() {
            Message::Binary(m) => m,
            m => panic!("{m:?}"),
        }
    }

    /// The client's frames are what tungstenite (the relay) expects, masked; writes leave
    /// as one frame each at a flush; the JSON exchange works both ways.
    #[tokio::test]
    async fn client_frames_interoperate_with_the_relay() {
        let (mut c, mut server) = client_and_server().await;
        c.send_text("{\"hello\":1}").await.unwrap();
        assert_eq!(
            server.next().await.unwrap().unwrap(),
            Message::text("{\"hello\":1}")
        );
        server.send(Message::text("{\"ok\":true}")).await.unwrap();
        assert_eq!(c.recv_text(100).await.unwrap(), "{\"ok\":true}");
        server.send(Message::text("x".repeat(101))).await.unwrap();
        assert!(c.recv_text(100).await.unwrap_err().contains("longer than"));

        let activity = Arc::new(Activity::default());
        let mut w = WsBytes::new(c, activity.clone());
        w.write_all(&[1; 12]).await.unwrap();
        w.write_all(&[2; 1000]).await.unwrap();
        w.flush().await.unwrap();
        // A short write (a yamux header) goes out with the next one.
        assert_eq!(
            binary(&mut server).await,
            [vec![1; 12], vec![2; 1000]].concat()
        );
        w.write_all(b"x").await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(binary(&mut server).await, Bytes::from_static(b"x"));
        let big: Vec<u8> = (0..MAX_MESSAGE_BYTES + 70_000)
            .map(|i| (i % 251) as u8)
            .collect();
        w.write_all(&big).await.unwrap();
        w.flush().await.unwrap();
        let (m1, m2) = (binary(&mut server).await, binary(&mut server).await);
        assert_eq!(m1.len(), MAX_MESSAGE_BYTES);
        assert_eq!([m1, m2].concat(), big);
        assert_eq!(activity.bytes_out(), 1013 + big.len() as u64);
    }

    /// The relay's binary messages, fragmented or not, read as one byte stream; pings are
    /// answered; a close ends the stream.
    #[tokio::test]
    async fn relay_messages_read_as_a_byte_stream() {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        let (c, mut server) = client_and_server().await;
        let activity = Arc::new(Activity::default());
        let mut r = WsBytes::new(c, activity.clone());
        server
            .send(Message::binary(vec![7; 100_000]))
            .await
            .unwrap();
        server.send(Message::binary(Vec::new())).await.unwrap();
        server
            .send(Message::Frame(Frame::message(
                b"ab".to_vec(),
                OpCode::Data(Data::Binary),
                false,
            )))
            .await
            .unwrap();
        server
            .send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        server
            .send(Message::Frame(Frame::message(
                b"cd".to_vec(),
                OpCode::Data(Data::Continue),
                true,
            )))
            .await
            .unwrap();
        server.send(Message::Close(None)).await.unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 100_004);
        assert!(got[..100_000].iter().all(|b| *b == 7));
        assert_eq!(&got[100_000..], b"abcd");
        assert_eq!(activity.bytes_in(), 100_004);
        // The pong and the answer to the close went out with the next flush.
        r.flush().await.unwrap();
        assert_eq!(
            server.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"p"))
        );
        assert!(matches!(
            server.next().await.unwrap().unwrap(),
            Message::Close(_)
        ));
    }

    /// Frames the relay must not send are errors, not bytes.
    #[tokio::test]
    async fn bad_frames_are_errors() {
        let cases: [(&[u8], &str); 6] = [
            (&[0x82, 0x81, 1, 2, 3, 4, 0], "masked"),
            (&[0xc2, 0x01, 0], "reserved"),
            (&[0x89, 126, 0, 200], "control"),
            (&[0x80, 0x01, 0], "fragmentation"),
            (&[0x83, 0x01, 0], "opcode"),
            (&[0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0], "too large"),
        ];
        for (bytes, what) in cases {
            let (a, mut b) = tokio::io::duplex(1024);
            b.write_all(bytes).await.unwrap();
            let mut r = WsBytes::new(WsClient::new(a), Arc::new(Activity::default()));
            let mut buf = [0u8; 16];
            let e = r.read(&mut buf).await.unwrap_err();
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
        // The connection ending between frames is the end of the stream; inside one, an
        // error.
        let (a, mut b) = tokio::io::duplex(1024);
        b.write_all(&[0x82, 0x02, 1]).await.unwrap();
        drop(b);
        let mut r = WsBytes::new(WsClient::new(a), Arc::new(Activity::default()));
        let mut buf = [0u8; 16];
        assert_eq!(r.read(&mut buf).await.unwrap(), 1);
        assert!(r.read(&mut buf).await.is_err());
        let (a, b) = tokio::io::duplex(1024);
        drop(b);
        let mut r = WsBytes::new(WsClient::new(a), Arc::new(Activity::default()));
        assert_eq!(r.read(&mut buf).await.unwrap(), 0);
    }

    #[test]
    fn masking_matches_the_bytewise_definition() {
        for len in [0, 1, 3, 7, 8, 9, 31, 1000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let key = [0x12, 0x34, 0x56, 0x78];
            let mut fast = data.clone();
            apply_mask(&mut fast, key);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn relay_urls() {
        let u = RelayUrl::parse("wss://broker.example:8443/tunnel/v1").unwrap();
        assert_eq!(
            u,
            RelayUrl {
                host: "broker.example".into(),
                port: 8443,
                path: "/tunnel/v1".into()
            }
        );
        let u = RelayUrl::parse("wss://broker.example").unwrap();
        assert_eq!(u.port, 443);
        assert_eq!(u.path, "/tunnel/v1");
        assert_eq!(u.url(), "wss://broker.example:443/tunnel/v1");
        assert_eq!(RelayUrl::parse("wss://[::1]:9/x").unwrap().host, "::1");
        assert!(RelayUrl::parse("ws://b:80").is_err());
        assert!(RelayUrl::parse("wss://:80").is_err());
        assert!(RelayUrl::parse("wss://b:99999").is_err());
    }
}
