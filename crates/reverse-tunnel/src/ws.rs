//! WebSocket plumbing shared by the three roles: the byte-stream adapter yamux runs over,
//! the first JSON exchange, and the client connection (TLS, then WebSocket upgrade).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

use crate::proto::{Reply, Request, MAX_REQUEST_BYTES, SUBPROTOCOL};

/// Largest WebSocket message either side sends or accepts once the session runs.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

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

/// A WebSocket seen as a byte stream: writes become binary messages (at most
/// [`MAX_MESSAGE_BYTES`] each), reads return the payloads of binary messages in order. A
/// close (or a text message, which the session never carries) ends the stream.
pub struct WsBytes<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
    activity: Arc<Activity>,
    closed: bool,
}

impl<S> WsBytes<S> {
    pub fn new(ws: WebSocketStream<S>, activity: Arc<Activity>) -> WsBytes<S> {
        WsBytes {
            ws,
            pending: Bytes::new(),
            activity,
            closed: false,
        }
    }
}

fn ws_io(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(e) => e,
        E::ConnectionClosed | E::AlreadyClosed => io::Error::from(io::ErrorKind::BrokenPipe),
        e => io::Error::other(e.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None => {
                    this.closed = true;
                }
                Some(Err(e)) => {
                    this.closed = true;
                    return Poll::Ready(match e {
                        tokio_tungstenite::tungstenite::Error::ConnectionClosed => Ok(()),
                        e => Err(ws_io(e)),
                    });
                }
                Some(Ok(Message::Binary(b))) => {
                    this.activity
                        .bytes_in
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                    this.activity.touch();
                    this.pending = b;
                }
                Some(Ok(Message::Close(_))) | Some(Ok(Message::Text(_))) => {
                    this.closed = true;
                }
                // tungstenite answers pings itself.
                Some(Ok(_)) => {}
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
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_io)?;
        let n = buf.len().min(MAX_MESSAGE_BYTES);
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(ws_io)?;
        this.activity
            .bytes_out
            .fetch_add(n as u64, Ordering::Relaxed);
        this.activity.touch();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_io(e))),
        }
    }
}

/// The WebSocket configuration both ends use once the session runs.
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

/// The client side of a relay connection.
pub type ClientWs = WebSocketStream<TlsStream<TcpStream>>;

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
        let (mut ws, _resp) = tokio_tungstenite::client_async_with_config(req, tls, Some(config()))
            .await
            .map_err(|e| format!("WebSocket upgrade at {}: {e}", url.url()))?;
        write_json(&mut ws, request)
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
    let reply: Reply = read_json(&mut ws, Duration::from_secs(120)).await?;
    Ok((ws, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

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
