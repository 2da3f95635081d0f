//! The byte streams MQTT runs over: plain TCP (loopback), TLS, and WebSocket over TLS.
//! A connection task sees one [`Transport`] with cancel-safe reads into its buffer and
//! whole writes, whatever is underneath.

use std::io;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Wss(Box<WebSocketStream<TlsStream<TcpStream>>>),
    /// A plain TCP connection parked without a task ([`crate::park`]): out of the
    /// runtime's reactor until [`Transport::unpark`].
    Parked(std::net::TcpStream),
    /// The stream was lost while changing hands (parking failed).
    Gone,
}

fn not_in_runtime() -> io::Error {
    io::Error::other("the connection is parked or gone; it has no stream in the runtime")
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp(_) => "Transport::Tcp",
            Transport::Tls(_) => "Transport::Tls",
            Transport::Wss(_) => "Transport::Wss",
            Transport::Parked(_) => "Transport::Parked",
            Transport::Gone => "Transport::Gone",
        })
    }
}

/// What a WebSocket upgrade led to.
pub enum Upgraded {
    /// MQTT over WebSocket.
    Mqtt(Transport),
    /// A tunnel relay connection (`/tunnel/v1`, subprotocol `bulwark-tunnel.v1`).
    Tunnel(Box<WebSocketStream<TlsStream<TcpStream>>>),
}

/// Upgrades a TLS stream to WebSocket. At `path` it is MQTT: the client must offer the
/// `mqtt` subprotocol (MQTT 3.1.1 §6.0), which the reply selects. With `tunnel`, the
/// relay's path [`bulwark_tunnel::proto::PATH`] is served too (subprotocol
/// [`bulwark_tunnel::proto::SUBPROTOCOL`]). Anything else is 404.
pub async fn accept_websocket(
    stream: TlsStream<TcpStream>,
    path: &str,
    max_message: usize,
    tunnel: bool,
) -> Result<Upgraded, io::Error> {
    use bulwark_tunnel::proto::{PATH as TUNNEL_PATH, SUBPROTOCOL as TUNNEL_PROTOCOL};
    let mut is_tunnel = false;
    #[allow(clippy::result_large_err)] // the error type is tungstenite's
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let want = if req.uri().path() == path {
            "mqtt"
        } else if tunnel && req.uri().path() == TUNNEL_PATH {
            is_tunnel = true;
            TUNNEL_PROTOCOL
        } else {
            let mut e =
                ErrorResponse::new(Some(format!("nothing is served at {}", req.uri().path())));
            *e.status_mut() = StatusCode::NOT_FOUND;
            return Err(e);
        };
        let offered = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case(want));
        if !offered {
            let mut e = ErrorResponse::new(Some(format!(
                "the WebSocket subprotocol {want:?} is required"
            )));
            *e.status_mut() = StatusCode::BAD_REQUEST;
            return Err(e);
        }
        resp.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(want));
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("websocket handshake: {e}"),
            )
        })?;
    Ok(if is_tunnel {
        Upgraded::Tunnel(Box::new(ws))
    } else {
        Upgraded::Mqtt(Transport::Wss(Box::new(ws)))
    })
}

/// Bytes a read may fill at once on an established connection: large enough that a busy
/// publisher's packets arrive in few system calls.
pub const READ_CHUNK: usize = 16 * 1024;

/// Bytes a read may fill at once before CONNECT is complete: a CONNECT is small, and a
/// connection storm should not allocate a large buffer per connection.
pub const SETUP_READ_CHUNK: usize = 1024;

fn reserve_for_read(buf: &mut BytesMut, chunk: usize) {
    if buf.capacity() - buf.len() < chunk / 4 {
        buf.reserve(chunk);
    }
}

/// Gives back the memory of a read buffer that holds no partial packet.
fn release_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}

fn ws_err(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// The TLS protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
    Other,
}

impl TlsVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "TLSv1.2",
            TlsVersion::Tls13 => "TLSv1.3",
            TlsVersion::Other => "other",
        }
    }
}

impl Transport {
    /// The TLS version, or `None` for plain TCP.
    pub fn tls_version(&self) -> Option<TlsVersion> {
        let conn = match self {
            Transport::Tcp(_) | Transport::Parked(_) | Transport::Gone => return None,
            Transport::Tls(s) => s.get_ref().1,
            Transport::Wss(ws) => ws.get_ref().get_ref().1,
        };
        conn.protocol_version().map(|v| match v {
            rustls::ProtocolVersion::TLSv1_3 => TlsVersion::Tls13,
            rustls::ProtocolVersion::TLSv1_2 => TlsVersion::Tls12,
            _ => TlsVersion::Other,
        })
    }

    /// Reads available bytes into `buf`; `Ok(0)` at end of stream. Cancel-safe.
    ///
    /// An idle connection holds no read buffer: when nothing is waiting to be read and
    /// `buf` holds no partial packet, its memory is given back before waiting for the
    /// socket to become readable. A busy connection keeps its buffer between reads.
    /// `chunk`: how much room to make in `buf` when it is nearly full ([`READ_CHUNK`],
    /// [`SETUP_READ_CHUNK`]).
    pub async fn read_into(&mut self, buf: &mut BytesMut, chunk: usize) -> io::Result<usize> {
        use futures_util::FutureExt as _;
        match self {
            // Poll-based: the waker is kept in the socket's registration, so the waiting
            // future is a reference, not a waiter node (idle connection memory). Reading
            // through `poll_read` (not `try_read`) lets tokio take a read that did not
            // fill the buffer as proof that the socket is drained: the next call waits for
            // readiness instead of making a system call that finds nothing (one per
            // message on a connection that sends one at a time).
            Transport::Tcp(s) => {
                std::future::poll_fn(|cx| {
                    // The buffer is made room in only when the socket has something.
                    if s.poll_read_ready(cx).is_ready() {
                        reserve_for_read(buf, chunk);
                        let r = tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *s), cx, buf);
                        if r.is_ready() {
                            return r;
                        }
                    }
                    release_if_empty(buf);
                    std::task::Poll::Pending
                })
                .await
            }
            Transport::Tls(s) => loop {
                reserve_for_read(buf, chunk);
                // One poll: decrypted bytes already held by rustls, or what the socket has.
                if let Some(r) = s.read_buf(buf).now_or_never() {
                    return r;
                }
                release_if_empty(buf);
                let tcp = &s.get_ref().0;
                std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await?;
            },
            Transport::Wss(ws) => loop {
                match ws.next().await {
                    None => return Ok(0),
                    Some(Err(e)) => return Err(ws_err(e)),
                    Some(Ok(Message::Binary(b))) => {
                        if b.is_empty() {
                            continue;
                        }
                        buf.extend_from_slice(&b);
                        return Ok(b.len());
                    }
                    Some(Ok(Message::Close(_))) => return Ok(0),
                    Some(Ok(Message::Text(_))) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "MQTT over WebSocket must use binary frames",
                        ))
                    }
                    // tungstenite queues the pong; flushing sends it.
                    Some(Ok(Message::Ping(_))) => ws.flush().await.map_err(ws_err)?,
                    Some(Ok(_)) => {}
                }
            },
            Transport::Parked(_) | Transport::Gone => Err(not_in_runtime()),
        }
    }

    /// Takes a plain TCP stream out of the runtime's reactor, for the parking lot.
    /// `Ok(false)`: not plain TCP, stays as it is.
    pub fn park(&mut self) -> io::Result<bool> {
        match std::mem::replace(self, Transport::Gone) {
            Transport::Tcp(s) => {
                *self = Transport::Parked(s.into_std()?);
                Ok(true)
            }
            other => {
                *self = other;
                Ok(false)
            }
        }
    }

    /// Gives a parked stream back to the runtime's reactor. Must run inside the runtime.
    pub fn unpark(&mut self) -> io::Result<()> {
        match std::mem::replace(self, Transport::Gone) {
            Transport::Parked(s) => *self = Transport::Tcp(TcpStream::from_std(s)?),
            other => *self = other,
        }
        Ok(())
    }

    /// The socket of a parked connection.
    pub fn parked_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Transport::Parked(s) => Some(s.as_raw_fd()),
            _ => None,
        }
    }

    /// Writes all of `data` (one WebSocket binary message on `wss`).
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Transport::Tcp(s) => s.write_all(data).await,
            Transport::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Transport::Wss(ws) => ws
                .send(Message::Binary(bytes::Bytes::copy_from_slice(data)))
                .await
                .map_err(ws_err),
            Transport::Parked(_) | Transport::Gone => Err(not_in_runtime()),
        }
    }

    /// Closes the stream politely (TLS close_notify, WebSocket close frame).
    pub async fn shutdown(&mut self) {
        let _ = match self {
            Transport::Tcp(s) => s.shutdown().await,
            Transport::Tls(s) => s.shutdown().await,
            Transport::Wss(ws) => (**ws).close(None).await.map_err(ws_err),
            Transport::Parked(s) => s.shutdown(std::net::Shutdown::Both),
            Transport::Gone => Ok(()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt as _;
    use std::task::{Context, Poll};

    /// A read that leaves room in the buffer has drained the socket: the transport then
    /// waits for the socket to become readable again instead of trying a read that would
    /// find nothing (a system call per message on a connection that sends one at a time).
    /// While it waits with nothing buffered, it holds no buffer.
    #[tokio::test]
    async fn a_read_that_drains_the_socket_clears_its_readiness() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut transport = Transport::Tcp(server);
        let mut buf = BytesMut::new();
        for round in 0..3u8 {
            client.write_all(&[round; 10]).await.unwrap();
            let n = transport.read_into(&mut buf, READ_CHUNK).await.unwrap();
            assert_eq!(n, 10, "round {round}");
            assert_eq!(&buf.split()[..], &[round; 10]);
            let Transport::Tcp(s) = &transport else {
                unreachable!()
            };
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(
                matches!(s.poll_read_ready(&mut cx), Poll::Pending),
                "round {round}: the socket still counts as readable after a read drained it"
            );
            assert!(transport
                .read_into(&mut buf, READ_CHUNK)
                .now_or_never()
                .is_none());
            assert_eq!(
                buf.capacity(),
                0,
                "round {round}: an idle wait keeps a buffer"
            );
        }
        // The end of the stream still reads as 0.
        drop(client);
        assert_eq!(transport.read_into(&mut buf, READ_CHUNK).await.unwrap(), 0);
    }
}
