//! Stream multiplexing: yamux over the WebSocket byte stream ([`crate::ws::WsBytes`]).
//!
//! The operator's CLI is the yamux client and opens one stream per TCP connection (or one
//! for `stdio`); the agent is the server and connects each stream it accepts to the
//! allow-listed local service. yamux gives every stream its own flow-control window and
//! half-close, so one busy stream cannot stall the others, and memory per session is
//! bounded by the windows ([`yamux_config`]).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt as _, TokioAsyncReadCompatExt as _};

/// One multiplexed stream, as a tokio byte stream.
pub type MuxStream = Compat<yamux::Stream>;

/// Largest payload of a data frame this side sends (yamux's default is 16 KiB). A frame
/// and its header travel as one WebSocket message, so this stays below
/// [`crate::ws::MAX_MESSAGE_BYTES`] (and the relay's data frame limit, which is that size).
/// Larger frames mean fewer messages, TLS writes and wake-ups per byte; a small frame of
/// another stream waits behind at most one of these.
pub const MAX_FRAME_PAYLOAD: usize = 128 * 1024;

/// Bytes each side of a stream copies at once between its socket and the tunnel (tokio's
/// default is 8 KiB): one read from the local socket becomes one data frame. Two buffers
/// per stream.
pub const STREAM_COPY_BUFFER: usize = MAX_FRAME_PAYLOAD;

/// Copies a tunnel stream and a local connection into each other until both directions
/// end (half-close passed on), with [`STREAM_COPY_BUFFER`]s: bytes each way.
pub async fn copy_both_ways<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, STREAM_COPY_BUFFER, STREAM_COPY_BUFFER).await
}

/// yamux gives every stream a receive window of 256 KiB and lets a stream that fills it
/// quickly (within two round trips) double it, as long as the session's total stays within
/// its limit. A stream's window may grow to this: on a path whose three processes take
/// turns on a busy machine, 256 KiB left the sender waiting for window updates. The larger
/// the window, the more of a busy stream's bytes may queue in the connection ahead of
/// another stream's small frame (1 MiB at 100 MiB/s: 10 ms; with 2 MiB, round trips
/// beside a busy stream reached a p99 of 76 ms on a loaded machine).
pub const STREAM_WINDOW_MAX: usize = 1024 * 1024;

/// yamux's initial (and minimum) stream receive window.
const STREAM_WINDOW: usize = yamux::DEFAULT_CREDIT as usize;

/// What the session's window holds beyond 256 KiB per stream: the growth of its streams'
/// windows, shared.
const SESSION_WINDOW_HEADROOM: usize = STREAM_WINDOW_MAX - STREAM_WINDOW;

/// yamux settings shared by both ends: at most `max_streams` streams, data frames of at
/// most [`MAX_FRAME_PAYLOAD`], and at most `max_streams` × 256 KiB + 768 KiB of receive
/// window for the whole session (every stream its 256 KiB, and growth up to
/// [`STREAM_WINDOW_MAX`] shared). That window is what a side buffers at most for streams
/// whose reader is slower than the sender: per stream at most [`STREAM_WINDOW_MAX`], plus
/// the two [`STREAM_COPY_BUFFER`]s.
pub fn yamux_config(max_streams: usize) -> yamux::Config {
    let max_streams = max_streams.max(1);
    let mut c = yamux::Config::default();
    // Each setter checks that the window leaves every stream its 256 KiB: no limit while
    // the stream count changes, then the limit.
    c.set_max_connection_receive_window(None);
    c.set_max_num_streams(max_streams);
    c.set_max_connection_receive_window(Some(
        max_streams
            .saturating_mul(STREAM_WINDOW)
            .saturating_add(SESSION_WINDOW_HEADROOM),
    ));
    c.set_split_send_size(MAX_FRAME_PAYLOAD);
    c
}

/// See [`settle_allocator`].
const ALLOCATOR_SETTLE_BYTES: usize = 4 * 1024 * 1024;

/// yamux allocates a buffer for every data frame it sends or receives and frees it soon
/// after. glibc's malloc hands free memory at the top of its heap back to the system once
/// there is more of it than its trim threshold (128 KiB at first), and the next frame
/// takes it back page by page, each page zeroed by the kernel: about half the bytes the
/// tunnel carried went through freshly faulted pages. glibc raises that threshold (to
/// twice the size) when a block it had mapped on its own is freed; freeing one such block
/// of [`ALLOCATOR_SETTLE_BYTES`] once per process lets the frame buffers be reused
/// instead, at the cost of keeping up to twice that much free memory. Other allocators
/// just see one allocation.
pub fn settle_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let block: Vec<u8> = Vec::with_capacity(ALLOCATOR_SETTLE_BYTES);
        drop(std::hint::black_box(block));
    });
}

type OpenReply = oneshot::Sender<Result<MuxStream, String>>;

/// The operator's handle: opens streams on a session whose connection is driven by
/// [`client`]'s task.
#[derive(Debug, Clone)]
pub struct MuxClient {
    tx: mpsc::Sender<OpenReply>,
}

impl MuxClient {
    /// Opens a new stream to the device.
    pub async fn open(&self) -> Result<MuxStream, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .await
            .map_err(|_| "the tunnel session has ended".to_string())?;
        rx.await
            .map_err(|_| "the tunnel session has ended".to_string())?
    }
}

/// Starts the client side over `io`. The returned future drives the session and ends
/// (with the reason) when the session closes; keep polling it (spawn it).
pub fn client<S>(
    io: S,
    config: yamux::Config,
) -> (
    MuxClient,
    impl std::future::Future<Output = Result<(), String>> + Send,
)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    settle_allocator();
    let (tx, mut rx) = mpsc::channel::<OpenReply>(16);
    let mut conn = yamux::Connection::new(io.compat(), config, yamux::Mode::Client);
    let driver = async move {
        let mut waiting: VecDeque<OpenReply> = VecDeque::new();
        let mut requests_open = true;
        poll_fn(move |cx| {
            while requests_open {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(r)) => waiting.push_back(r),
                    Poll::Ready(None) => requests_open = false,
                    Poll::Pending => break,
                }
            }
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(Ok(s)) => {
                        if let Some(r) = waiting.pop_front() {
                            let _ = r.send(Ok(s.compat()));
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        for r in waiting.drain(..) {
                            let _ = r.send(Err(e.to_string()));
                        }
                        return Poll::Ready(Err(e.to_string()));
                    }
                    Poll::Pending => break,
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    // Only operators open streams; the relay refuses a device that tries.
                    Poll::Ready(Some(Ok(s))) => drop(s),
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.to_string())),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    };
    (MuxClient { tx }, driver)
}

/// Runs the server side over `io`, handing every stream the operator opens to
/// `on_stream`, until the session closes.
pub async fn serve<S, F>(io: S, config: yamux::Config, mut on_stream: F) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut(MuxStream),
{
    settle_allocator();
    let mut conn = yamux::Connection::new(io.compat(), config, yamux::Mode::Server);
    loop {
        match poll_fn(|cx| conn.poll_next_inbound(cx)).await {
            Some(Ok(s)) => on_stream(s.compat()),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn config_for_any_stream_limit() {
        // yamux asserts that the session window leaves every stream its 256 KiB.
        for n in [0, 1, 64, 65, 1000, 10_000] {
            let _ = yamux_config(n);
        }
    }

    /// Two streams over one in-memory pipe: each echo comes back on its own stream, and
    /// half-close reaches the other side.
    #[tokio::test]
    async fn streams_are_independent_with_half_close() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve(b, yamux_config(8), |mut s| {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                buf.reverse();
                s.write_all(&buf).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }));
        let (client, driver) = client(a, yamux_config(8));
        let driver = tokio::spawn(driver);
        let mut tasks = Vec::new();
        for i in 0..4u8 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = client.open().await.unwrap();
                let msg = vec![i; 100_000 + i as usize];
                s.write_all(&msg).await.unwrap();
                s.shutdown().await.unwrap();
                let mut back = Vec::new();
                s.read_to_end(&mut back).await.unwrap();
                assert_eq!(back.len(), msg.len());
                assert!(back.iter().all(|b| *b == i));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop(client);
        driver.abort();
        server.abort();
    }
}
