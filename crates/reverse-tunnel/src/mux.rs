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

/// yamux settings shared by both ends: at most `max_streams` streams, and at most 16 MiB of
/// receive window for the whole session.
pub fn yamux_config(max_streams: usize) -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(max_streams.max(1));
    c.set_max_connection_receive_window(Some(16 * 1024 * 1024));
    c
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
