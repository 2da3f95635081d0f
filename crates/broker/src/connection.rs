//! A task per client connection while it has work: handshakes and CONNECT under one
//! deadline counted from TCP accept, then a loop that reads packets, hands them to the
//! router, and writes what the session has to send. An idle plain-TCP connection gives up
//! its task and waits in the parking lot ([`crate::park`]) until something concerns it.
//! All protocol state lives in the router and the session; this module does I/O, timers
//! and the rules about which packet may come when.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bulwark_protocol::codec::{packet_type, peek_fixed_header};
use bulwark_protocol::{
    decode, encode, ConnAck, Connect, ConnectReturnCode, DecodeError, DecodeLimits, LastWill,
    Packet, QoS, SubAck,
};
use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{field, Instrument};

use crate::config::{ListenerConfig, Transport as TransportKind};
use crate::park::{Parked, ParkingLot, Signals, Wakeup};
use crate::router::{attach_refusal, Metrics, Router};
use crate::session::Message;
use crate::store::FlushCoordinator;
use crate::tls::ClientCertificate;
use crate::transport::{accept_websocket, Transport, Upgraded};

/// Everything a connection task needs from the broker.
#[derive(Debug)]
pub struct Shared {
    pub router: Arc<Router>,
    /// Present with `sync` durability: acknowledgements wait for it.
    pub durability: Option<FlushCoordinator>,
    pub abuse: crate::abuse::AbuseGuard,
    /// The tunnel relay, when `[tunnel] enabled = true`.
    pub tunnel: std::sync::OnceLock<Arc<crate::tunnel::BrokerRelay>>,
    /// Idle plain-TCP connections without a task.
    pub parking: Arc<ParkingLot<ParkedConnection>>,
    /// Broker shutdown. Never polled itself: a clone sees a shutdown sent at any time
    /// as a change, so connections clone it when they (re)start serving rather than each
    /// keeping a receiver.
    pub shutdown: watch::Receiver<bool>,
}

/// A listener as the connection tasks see it.
pub struct ListenerRuntime {
    pub name: Arc<str>,
    pub config: ListenerConfig,
    pub tls: Option<crate::tls::TlsMaterial>,
}

impl std::fmt::Debug for ListenerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerRuntime")
            .field("name", &self.name)
            .finish()
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent DISCONNECT: no will.
    Disconnect,
    /// Broker shutdown: no will.
    Shutdown,
    TakenOver,
    /// Disconnected by the broker (revoked certificate, operator).
    Kicked,
    ClosedByPeer,
    KeepaliveTimeout,
    WriteTimeout,
    Io,
    Protocol,
}

impl End {
    fn publishes_will(self) -> bool {
        !matches!(self, End::Disconnect | End::Shutdown)
    }
    fn as_str(self) -> &'static str {
        match self {
            End::Disconnect => "client_disconnect",
            End::Shutdown => "broker_shutdown",
            End::TakenOver => "session_taken_over",
            End::Kicked => "kicked",
            End::ClosedByPeer => "connection_closed",
            End::KeepaliveTimeout => "keepalive_timeout",
            End::WriteTimeout => "write_timeout",
            End::Io => "io_error",
            End::Protocol => "protocol_error",
        }
    }
}

/// A connection just accepted: what its task starts from, in one box, so that the task
/// does not carry each of these for its whole life (an `async fn` keeps room for its
/// arguments in every state, even after they have moved on).
pub struct Accepted {
    pub shared: Arc<Shared>,
    pub listener: Arc<ListenerRuntime>,
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub accepted: Instant,
    pub shutdown: watch::Receiver<bool>,
    /// The connection's place under `limits.max_connections`, given back at the end.
    pub permit: tokio::sync::OwnedSemaphorePermit,
}

/// The span of a connection's task; `client_id` and `identity` are recorded once known.
fn conn_span(peer: SocketAddr, listener: &str) -> tracing::Span {
    tracing::info_span!(
        "conn",
        peer = %peer,
        listener = %listener,
        client_id = field::Empty,
        identity = field::Empty,
    )
}

/// Serves one accepted TCP connection until it ends or is parked.
pub async fn serve(accepted: Box<Accepted>) {
    let span = conn_span(accepted.peer, &accepted.listener.name);
    async move {
        // Set-up (TLS and WebSocket handshakes, CONNECT, authentication, a tunnel relay
        // session) runs boxed, so the long-lived task of a connection holds only what
        // serving needs.
        let set_up = {
            let Accepted {
                shared,
                listener,
                stream,
                peer,
                accepted,
                shutdown,
                permit,
            } = *accepted;
            Box::pin(set_up(
                shared, listener, stream, peer, accepted, shutdown, permit,
            ))
        };
        let Some(Ready {
            mut connection,
            first,
        }) = set_up.await
        else {
            return;
        };
        // Boxed: inline, this future would be part of the task for as long as it lives.
        if let Err(end) = Box::pin(connection.begin(first)).await {
            return Box::pin(connection.finish(end)).await;
        }
        // Most clients are quiet after CONNECT (a gateway publishes every few seconds): a
        // new plain-TCP connection is parked at once, so that a connection storm does not
        // leave a task per connection in memory. Whatever arrives wakes it.
        let park_now = connection.idle_after_activity_ms.is_some();
        drive(connection, park_now).await
    }
    .instrument(span)
    .await
}

/// Serves an established connection until it ends or is parked again; `park_now` parks
/// it before serving.
async fn drive(mut connection: Box<Connection>, mut park_now: bool) {
    loop {
        let outcome = if std::mem::take(&mut park_now) {
            Outcome::Park
        } else {
            connection.serve_loop().await
        };
        let end = match outcome {
            Outcome::End(end) => end,
            Outcome::Park => match connection.park() {
                Parking::Parked => return,
                Parking::Refused(c) => {
                    connection = c;
                    continue;
                }
                Parking::Failed(c, end) => {
                    connection = c;
                    end
                }
            },
        };
        return Box::pin(connection.finish(end)).await;
    }
}

/// A connection resumed from the parking lot: a new task, with a new span of the same
/// fields as the one its first task had.
async fn resumed(mut connection: Box<Connection>) {
    let listener = connection
        .shared
        .router
        .listener_of(connection.conn)
        .unwrap_or_default();
    let span = conn_span(connection.peer, &listener);
    span.record(
        "client_id",
        field::display(connection.client_id.escape_debug()),
    );
    if let Some(i) = &connection.identity {
        span.record("identity", field::display(i.escape_debug()));
    }
    async move {
        if let Err(e) = connection.transport.unpark() {
            tracing::debug!(error = %e, "could not give a parked connection back to the runtime");
            return Box::pin(connection.finish(End::Io)).await;
        }
        // Something woke it (its socket, a signal, its keepalive): the idle time starts
        // over. Otherwise the park timer, already due, could win before the runtime has
        // seen the socket readable, and the connection would go back to the lot unread
        // (over and over on a single-threaded runtime).
        connection.touch_idle(Instant::now());
        drive(connection, false).await
    }
    .instrument(span)
    .await
}

/// A connection waiting in the [`ParkingLot`] (see [`crate::park`]).
pub struct ParkedConnection(Box<Connection>);

impl Parked for ParkedConnection {
    fn fd(&self) -> std::os::fd::RawFd {
        self.0
            .transport
            .parked_fd()
            .expect("only parked streams are in the lot")
    }
    fn signals(&self) -> Arc<Signals> {
        self.0.signals.clone()
    }
    fn deadline(&self) -> Option<std::time::Instant> {
        self.0
            .keepalive()
            .map(|k| (self.0.last_activity + k).into_std())
    }
    fn resume(self) {
        tokio::spawn(resumed(self.0));
    }
}

/// What an established connection's loop ended with.
enum Outcome {
    End(End),
    /// Idle for `limits.park_idle_after_ms`: park it.
    Park,
}

/// What came of an attempt to park.
enum Parking {
    Parked,
    /// The lot parks no more (shutdown) or could not watch the socket: serve on, and do
    /// not try again.
    Refused(Box<Connection>),
    /// The stream was lost on the way.
    Failed(Box<Connection>, End),
}

/// Everything from accept to an accepted CONNECT: `None` when the connection ended on the
/// way (refused, timed out, or a tunnel relay session that has run its course).
async fn set_up(
    shared: Arc<Shared>,
    listener: Arc<ListenerRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    shutdown: watch::Receiver<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Option<Ready> {
    let deadline = accepted + shared.router.limits().connect_timeout();
    let established =
        tokio::time::timeout_at(deadline, establish(&shared, &listener, stream, peer)).await;
    let (transport, connect, certificate, rbuf) = match established {
        Ok(Ok(Setup::Mqtt(e))) => e,
        Ok(Ok(Setup::Tunnel(ws, identity))) => {
            if let Some(relay) = shared.tunnel.get() {
                Box::pin(relay.clone().serve(*ws, identity, peer, shutdown)).await;
            }
            return None;
        }
        Ok(Err(e)) => {
            e.log(peer);
            return None;
        }
        Err(_) => {
            Metrics::add(&shared.router.metrics.connections_refused, 1);
            tracing::warn!(
                target: "audit",
                event = "connect_timeout",
                %peer,
                timeout_secs = shared.router.limits().connect_timeout_secs,
                "no complete CONNECT within limits.connect_timeout_secs of accept; closed"
            );
            return None;
        }
    };
    Connection::start(
        shared,
        listener,
        Stream {
            transport,
            rbuf,
            peer,
            permit,
        },
        connect,
        certificate,
    )
    .await
}

enum SetupError {
    Tls(std::io::Error),
    WebSocket(std::io::Error),
    Io(std::io::Error),
    ClosedBeforeConnect,
    NotConnect(u8),
    Decode(DecodeError),
}

impl SetupError {
    fn log(&self, peer: SocketAddr) {
        match self {
            SetupError::Tls(e) => {
                tracing::warn!(target: "audit", event = "tls_handshake_failed", %peer, error = %e, "TLS handshake failed")
            }
            SetupError::WebSocket(e) => {
                tracing::warn!(target: "audit", event = "websocket_refused", %peer, error = %e, "WebSocket upgrade refused")
            }
            SetupError::Io(e) => {
                tracing::debug!(%peer, error = %e, "connection failed before CONNECT")
            }
            SetupError::ClosedBeforeConnect => tracing::debug!(%peer, "closed before CONNECT"),
            SetupError::NotConnect(t) => {
                tracing::warn!(target: "audit", event = "protocol_error", %peer, packet_type = t, "first packet is not CONNECT; closed")
            }
            SetupError::Decode(e) => {
                tracing::warn!(target: "audit", event = "protocol_error", %peer, error = %e, "invalid CONNECT; closed")
            }
        }
    }
}

type Established = (Transport, Connect, Option<ClientCertificate>, BytesMut);

/// What an accepted connection turned out to be.
#[allow(clippy::large_enum_variant)] // one per connection, moved once
enum Setup {
    Mqtt(Established),
    /// A tunnel relay connection, with its certificate identity.
    Tunnel(
        Box<tokio_tungstenite::WebSocketStream<crate::tunnel::RelayStream>>,
        Option<String>,
    ),
}

async fn establish(
    shared: &Shared,
    listener: &ListenerRuntime,
    stream: TcpStream,
    _peer: SocketAddr,
) -> Result<Setup, SetupError> {
    let _ = stream.set_nodelay(true);
    let limits = shared.router.limits();
    let (mut transport, certificate) = match (&listener.tls, listener.config.transport) {
        (Some(material), kind) => {
            // Boxed, like the WebSocket upgrade below: a TLS handshake's state is large,
            // and inline it would be part of every connection's set-up, plain TCP too (a
            // connection storm allocates one set-up per connection at once).
            let tls = Box::pin(material.acceptor().accept(stream))
                .await
                .map_err(SetupError::Tls)?;
            let certificate = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| ClientCertificate::from_der(c, material.config.identity_field));
            let t = if kind == TransportKind::Wss {
                let relay = shared.tunnel.get();
                let max = (limits.max_packet_size + 16).max(if relay.is_some() {
                    bulwark_tunnel::ws::MAX_MESSAGE_BYTES + 1024
                } else {
                    0
                });
                match Box::pin(accept_websocket(
                    tls,
                    &listener.config.ws_path,
                    max,
                    relay.is_some(),
                ))
                .await
                .map_err(SetupError::WebSocket)?
                {
                    Upgraded::Mqtt(t) => t,
                    Upgraded::Tunnel(ws) => {
                        return Ok(Setup::Tunnel(ws, certificate.and_then(|c| c.identity)))
                    }
                }
            } else {
                Transport::Tls(Box::new(tls))
            };
            (t, certificate)
        }
        (None, _) => (Transport::Tcp(stream), None),
    };
    let pre_auth = DecodeLimits {
        max_packet_size: limits.max_connect_packet_size,
    };
    let mut rbuf = BytesMut::with_capacity(crate::transport::SETUP_READ_CHUNK);
    loop {
        if let Some(h) = peek_fixed_header(&rbuf, &pre_auth).map_err(SetupError::Decode)? {
            if h.packet_type != packet_type::CONNECT {
                return Err(SetupError::NotConnect(h.packet_type));
            }
        }
        match decode(&mut rbuf, &pre_auth) {
            Ok(Some(Packet::Connect(c))) => {
                return Ok(Setup::Mqtt((transport, c, certificate, rbuf)))
            }
            Ok(Some(p)) => {
                return Err(SetupError::NotConnect(bulwark_protocol::codec::type_of(&p)))
            }
            Ok(None) => {}
            Err(e) => {
                if let Some(code) = e.connack_code() {
                    let _ = send_packets(
                        &mut transport,
                        &[Packet::ConnAck(ConnAck {
                            session_present: false,
                            code,
                        })],
                    )
                    .await;
                }
                return Err(SetupError::Decode(e));
            }
        }
        let n = transport
            .read_into(&mut rbuf, crate::transport::SETUP_READ_CHUNK)
            .await
            .map_err(SetupError::Io)?;
        if n == 0 {
            return Err(SetupError::ClosedBeforeConnect);
        }
    }
}

/// Answers CONNECT with a refusal and closes.
async fn send_refusal(transport: &mut Transport, code: ConnectReturnCode) {
    let _ = send_packets(
        transport,
        &[Packet::ConnAck(ConnAck {
            session_present: false,
            code,
        })],
    )
    .await;
    transport.shutdown().await;
}

async fn send_packets(transport: &mut Transport, packets: &[Packet]) -> std::io::Result<usize> {
    let mut buf = BytesMut::new();
    for p in packets {
        encode(p, &mut buf).map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    transport.write_all(&buf).await?;
    Ok(buf.len())
}

struct Connection {
    shared: Arc<Shared>,
    transport: Transport,
    rbuf: BytesMut,
    client_id: Arc<str>,
    identity: Option<Arc<str>>,
    conn: u64,
    peer: SocketAddr,
    /// Boxed: most clients have none, and this state is kept for every idle connection.
    will: Option<Box<LastWill>>,
    /// 1.5 times the keepalive the client asked for, in milliseconds; 0: none.
    keepalive_ms: u32,
    /// The publish rate limit; `None` for allow-listed addresses or without a limit.
    rate: Option<Box<RateState>>,
    signals: Arc<Signals>,
    /// When the client last sent something (keepalive).
    last_activity: Instant,
    /// When anything last happened on the connection, for parking after
    /// `limits.park_idle_after_ms`, in milliseconds after `last_activity` (this state is
    /// kept for every idle connection: 8 bytes, not an `Instant`'s 16); `None`: never
    /// parked (TLS, WebSocket, or the lot refused it).
    idle_after_activity_ms: Option<u32>,
    /// The connection's place under `limits.max_connections`, given back at the end.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// A rate-limited client's allowance and what it has used since last charged.
struct RateState {
    rate: crate::abuse::ClientRate,
    /// PUBLISH packets and payload bytes received since the rate was last charged.
    published: (u64, u64),
}

/// The stream side of a connection as set-up hands it over.
struct Stream {
    transport: Transport,
    /// Bytes read after CONNECT.
    rbuf: BytesMut,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
}

/// What woke an established connection's task.
enum Event {
    Shutdown,
    Kicked,
    Read(std::io::Result<usize>),
    /// Messages were queued for the session.
    Deliveries,
    KeepaliveExpired,
    /// Nothing happened for `park_after`.
    Idle,
}

/// An accepted connection, ready to serve: what set-up leaves behind.
struct Ready {
    connection: Box<Connection>,
    /// CONNACK and what is resent of the session.
    first: Vec<Packet>,
}

/// Why CONNECT was refused, for the audit log.
fn refuse_reason(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::Accepted => "accepted",
        ConnectReturnCode::UnacceptableProtocolVersion => "unacceptable protocol version",
        ConnectReturnCode::IdentifierRejected => "identifier rejected",
        ConnectReturnCode::ServerUnavailable => "server unavailable",
        ConnectReturnCode::BadUsernameOrPassword => "bad username or password",
        ConnectReturnCode::NotAuthorized => "not authorized",
    }
}

impl Connection {
    #[allow(clippy::too_many_arguments)]
    async fn start(
        shared: Arc<Shared>,
        listener: Arc<ListenerRuntime>,
        stream: Stream,
        connect: Connect,
        certificate: Option<ClientCertificate>,
    ) -> Option<Ready> {
        let Stream {
            mut transport,
            rbuf,
            peer,
            permit,
        } = stream;
        let router = shared.router.clone();
        let span = tracing::Span::current();
        let cert_identity = certificate.as_ref().and_then(|c| c.identity.as_deref());
        let refuse = |code: ConnectReturnCode, identity: Option<&str>, detail: &str| {
            Metrics::add(&router.metrics.connections_refused, 1);
            tracing::warn!(
                target: "audit",
                event = "connect_refused",
                %peer,
                client_id = %connect.client_id.escape_debug(),
                identity = identity.map(|i| i.escape_debug().to_string()).unwrap_or_default(),
                reason = refuse_reason(code),
                detail,
                "CONNECT refused"
            );
            code
        };
        let authenticated = authenticate(&shared, &listener, &connect, cert_identity, peer).await;
        let checked = match authenticated {
            Err((code, detail)) => Err(refuse(code, cert_identity, &detail)),
            Ok((identity, via_password)) => {
                let id = identity.as_deref();
                check_connect(&router, &connect, id)
                    .map_err(|(code, detail)| refuse(code, id, &detail))
                    .map(|cid| (identity, cid, via_password))
            }
        };
        let (identity, client_id, via_password) = match checked {
            Ok(v) => v,
            Err(code) => {
                send_refusal(&mut transport, code).await;
                return None;
            }
        };
        if let Some(i) = &identity {
            span.record("identity", field::display(i.escape_debug()));
        }
        let conn = router.new_connection_id();
        let client_id: Arc<str> = match client_id {
            Some(c) => c,
            None => format!("bulwark-auto-{conn:x}-{:x}", crate::router::unix_now()).into(),
        };
        span.record("client_id", field::display(client_id.escape_debug()));
        let attached =
            match router.attach(&client_id, identity.as_ref(), connect.clean_session, conn) {
                Ok(a) => a,
                Err(e) => {
                    let code = refuse(
                        attach_refusal(e),
                        identity.as_deref(),
                        "client id belongs to a session of another identity",
                    );
                    send_refusal(&mut transport, code).await;
                    return None;
                }
            };
        router.register_connection(
            conn,
            crate::router::LiveConnection {
                client_id: client_id.clone(),
                identity: identity.clone(),
                peer,
                listener: listener.name.clone(),
                revocation_key: certificate
                    .as_ref()
                    .map(|c| Box::new(c.revocation_key.clone())),
                via_password,
                tls_version: transport.tls_version(),
                connected_at: u32::try_from(crate::router::unix_now()).unwrap_or(u32::MAX),
                signals: attached.signals.clone(),
            },
        );
        Metrics::add(&router.metrics.connections_total, 1);
        router
            .metrics
            .clients_connected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            target: "audit",
            event = "connect",
            %peer,
            client_id = %client_id.escape_debug(),
            identity = identity.as_deref().map(|i| i.escape_debug().to_string()).unwrap_or_default(),
            clean_session = connect.clean_session,
            keepalive = connect.keep_alive,
            session_present = attached.session_present,
            "client connected"
        );
        let now = Instant::now();
        let idle_after_activity_ms = matches!(transport, Transport::Tcp(_)).then_some(0);
        let abuse = shared.abuse.config();
        let rate = (!shared.abuse.is_allow_listed(peer.ip())
            && (abuse.messages_per_sec_per_client > 0 || abuse.bytes_per_sec_per_client > 0))
            .then(|| {
                Box::new(RateState {
                    rate: crate::abuse::ClientRate::new(abuse, now.into_std()),
                    published: (0, 0),
                })
            });
        let c = Box::new(Connection {
            shared: shared.clone(),
            transport,
            rbuf,
            client_id: client_id.clone(),
            identity: identity.clone(),
            conn,
            peer,
            will: connect.will.clone().map(Box::new),
            keepalive_ms: u32::from(connect.keep_alive) * 1500,
            rate,
            signals: attached.signals,
            last_activity: now,
            idle_after_activity_ms,
            _permit: permit,
        });
        let mut first = vec![Packet::ConnAck(ConnAck {
            session_present: attached.session_present,
            code: ConnectReturnCode::Accepted,
        })];
        first.extend(attached.resend);
        Some(Ready {
            connection: c,
            first,
        })
    }

    /// Sends CONNACK, what is resent and what was queued while the client was away, and
    /// handles packets that arrived together with CONNECT.
    async fn begin(&mut self, first: Vec<Packet>) -> Result<(), End> {
        let mut out = first;
        if self
            .shared
            .router
            .with_session(&self.client_id, self.conn, |s| s.drain_outgoing(&mut out))
            .is_none()
        {
            return Err(End::TakenOver);
        }
        self.write(&out).await?;
        if !self.rbuf.is_empty() {
            if let Some(end) = self.process_input().await? {
                return Err(end);
            }
        }
        Ok(())
    }

    /// Reads, handles and writes until the connection ends or has been idle long enough
    /// to be parked.
    async fn serve_loop(&mut self) -> Outcome {
        // A clone of the never-polled receiver sees a shutdown sent at any time before
        // (a parked connection resumed by it) or during this loop.
        let mut shutdown = self.shared.shutdown.clone();
        // One wait for shutdown and one timer serve the whole loop. Built anew on every
        // turn, the timer was put into and taken out of the runtime's timer wheel, and the
        // shutdown wait into and out of the channel's waiter list, for every packet, ahead
        // of the packet's handling; a timer moved to a later deadline is only marked.
        let shutdown_changed = shutdown.changed();
        tokio::pin!(shutdown_changed);
        let timer = tokio::time::sleep_until(Instant::now() + TIMER_UNSET);
        tokio::pin!(timer);
        loop {
            // A client publishing faster than its rate is slowed down: nothing more is read
            // from it until its allowance refills.
            let pause = match &mut self.rate {
                Some(r) if r.published.0 > 0 => {
                    let (msgs, bytes) = std::mem::take(&mut r.published);
                    r.rate.take(msgs, bytes, std::time::Instant::now())
                }
                _ => Duration::ZERO,
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = &mut shutdown_changed => return Outcome::End(End::Shutdown),
                    _ = tokio::time::sleep(pause) => {}
                }
                // Time spent paused by the broker does not count against keepalive.
                self.last_activity = Instant::now();
            }
            let ka_deadline = self.keepalive().map(|k| self.last_activity + k);
            let park_deadline = self
                .idle_since()
                .map(|t| t + self.shared.router.limits().park_idle_after());
            let deadline = match (ka_deadline, park_deadline) {
                (Some(k), Some(p)) => Some(k.min(p)),
                (k, p) => k.or(p),
            };
            if let Some(d) = deadline.filter(|d| *d != timer.deadline()) {
                timer.as_mut().reset(d);
            }
            // The wait holds only the small futures it selects over; handling what it
            // returned (boxed, on the heap while it runs) is not part of an idle task.
            let event = tokio::select! {
                _ = &mut shutdown_changed => Event::Shutdown,
                _ = self.signals.notified(Wakeup::Kick) => Event::Kicked,
                r = self.transport.read_into(&mut self.rbuf, crate::transport::READ_CHUNK) => Event::Read(r),
                _ = self.signals.notified(Wakeup::Deliveries) => Event::Deliveries,
                _ = &mut timer, if deadline.is_some() => {
                    if ka_deadline.is_some_and(|d| d <= Instant::now()) {
                        Event::KeepaliveExpired
                    } else {
                        Event::Idle
                    }
                }
            };
            let step = match event {
                Event::Shutdown => Err(End::Shutdown),
                Event::Kicked => Err(if self.shared.router.owns(&self.client_id, self.conn) {
                    End::Kicked
                } else {
                    End::TakenOver
                }),
                Event::Read(Ok(0)) => Err(End::ClosedByPeer),
                Event::Read(Ok(n)) => {
                    Metrics::add(&self.shared.router.metrics.bytes_received, n as u64);
                    self.last_activity = Instant::now();
                    self.touch_idle(self.last_activity);
                    match Box::pin(self.process_input()).await {
                        Ok(None) => Ok(()),
                        Ok(Some(end)) | Err(end) => Err(end),
                    }
                }
                Event::Read(Err(e)) => {
                    tracing::debug!(error = %e, "read failed");
                    Err(End::Io)
                }
                Event::Deliveries => {
                    self.touch_idle(Instant::now());
                    let mut out = Vec::new();
                    match self.drain_deliveries(&mut out, &mut false) {
                        Ok(()) => Box::pin(self.write(&out)).await,
                        Err(end) => Err(end),
                    }
                }
                Event::KeepaliveExpired => Err(End::KeepaliveTimeout),
                Event::Idle => return Outcome::Park,
            };
            if let Err(end) = step {
                return Outcome::End(end);
            }
        }
    }

    /// When anything last happened on the connection (`None`: never parked).
    fn idle_since(&self) -> Option<Instant> {
        self.idle_after_activity_ms
            .map(|ms| self.last_activity + Duration::from_millis(u64::from(ms)))
    }

    /// Something happened at `now` (a packet, a delivery): the idle time starts over.
    fn touch_idle(&mut self, now: Instant) {
        if let Some(ms) = &mut self.idle_after_activity_ms {
            let after = now
                .saturating_duration_since(self.last_activity)
                .as_millis();
            *ms = u32::try_from(after).unwrap_or(u32::MAX);
        }
    }

    /// Hands an idle connection to the parking lot; its task then ends.
    fn park(mut self: Box<Self>) -> Parking {
        // A read buffer without a partial packet is not kept while parked.
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
        match self.transport.park() {
            Ok(true) => {}
            Ok(false) => {
                self.idle_after_activity_ms = None;
                return Parking::Refused(self);
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not take an idle connection out of the runtime");
                return Parking::Failed(self, End::Io);
            }
        }
        let lot = self.shared.parking.clone();
        match lot.park(ParkedConnection(self)) {
            Ok(()) => Parking::Parked,
            Err(ParkedConnection(mut c)) => {
                c.idle_after_activity_ms = None;
                match c.transport.unpark() {
                    Ok(()) => Parking::Refused(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "could not give a connection back to the runtime");
                        Parking::Failed(c, End::Io)
                    }
                }
            }
        }
    }

    /// Decodes and handles every complete packet in the read buffer, then writes the
    /// replies and deliveries. `Ok(Some(End::Disconnect))` after DISCONNECT.
    async fn process_input(&mut self) -> Result<Option<End>, End> {
        let router = self.shared.router.clone();
        let mut out = Vec::new();
        let mut wrote = false;
        // A PUBLISH goes to the router, which may wake subscribers' tasks.
        let mut routed = false;
        let mut end = None;
        let limits = DecodeLimits {
            max_packet_size: router.limits().max_packet_size,
        };
        loop {
            let packet = match decode(&mut self.rbuf, &limits) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    self.protocol_error(&format!("{e}"));
                    // Acknowledge what was handled before the bad packet.
                    let _ = self.finish_batch(out, wrote).await;
                    return Err(End::Protocol);
                }
            };
            routed |= matches!(packet, Packet::Publish(_));
            // Messages queued for this client before this packet (by other clients, or by
            // this batch's own publishes to its own subscriptions) go out ahead of the
            // packet's reply, in the order things happened: a client may use PINGREQ as
            // a barrier, and its PINGRESP comes after what was published before it.
            if self.signals.is_set(Wakeup::Deliveries) {
                if let Err(e) = self.drain_deliveries(&mut out, &mut wrote) {
                    let _ = self.finish_batch(out, wrote).await;
                    return Err(e);
                }
            }
            match self.handle(packet, &mut out, &mut wrote) {
                Ok(None) => {}
                Ok(Some(e)) => {
                    end = Some(e);
                    break;
                }
                Err(e) => {
                    let _ = self.finish_batch(out, wrote).await;
                    return Err(e);
                }
            }
        }
        if routed {
            // The subscribers this batch's messages woke send them before this connection
            // writes its acknowledgements (a system call, and a wake-up of the publisher,
            // ahead of the delivery) and looks for more input. A batch that woke nobody
            // (acknowledgements, pings) does not yield.
            let_woken_tasks_run().await;
        }
        if end.is_none() {
            self.drain_deliveries(&mut out, &mut wrote)?;
        }
        self.finish_batch(out, wrote).await?;
        Ok(end)
    }

    /// Appends the messages queued for this client to `out`, and takes the permit that
    /// announced them: one set while the batch ran would otherwise wake the serve loop
    /// for a queue already drained. Taken before the drain, so that a message queued
    /// after it sets the permit again.
    fn drain_deliveries(&self, out: &mut Vec<Packet>, wrote: &mut bool) -> Result<(), End> {
        self.signals.take(Wakeup::Deliveries);
        self.shared
            .router
            .with_session(&self.client_id, self.conn, |s| {
                s.drain_outgoing(out);
                *wrote |= s.wrote;
            })
            .ok_or(End::TakenOver)
    }

    /// Waits for durability if the batch wrote to the store, then sends it.
    async fn finish_batch(&mut self, out: Vec<Packet>, wrote: bool) -> Result<(), End> {
        if wrote {
            if let Some(d) = &self.shared.durability {
                d.durable().await;
            }
        }
        self.write(&out).await
    }

    /// How long the connection may stay silent (1.5 times its keepalive).
    fn keepalive(&self) -> Option<Duration> {
        (self.keepalive_ms > 0).then(|| Duration::from_millis(u64::from(self.keepalive_ms)))
    }

    fn principal(&self) -> bulwark_protocol::acl::Principal<'_> {
        bulwark_protocol::acl::Principal {
            identity: self.identity.as_deref(),
            client_id: &self.client_id,
        }
    }

    fn protocol_error(&self, detail: &str) {
        Metrics::add(&self.shared.router.metrics.protocol_errors, 1);
        tracing::warn!(
            target: "audit",
            event = "protocol_error",
            peer = %self.peer,
            client_id = %self.client_id.escape_debug(),
            detail,
            "protocol violation; connection closed"
        );
    }

    fn handle(
        &mut self,
        packet: Packet,
        out: &mut Vec<Packet>,
        wrote: &mut bool,
    ) -> Result<Option<End>, End> {
        let router = self.shared.router.clone();
        let limits = router.limits();
        let gone = || End::TakenOver;
        match packet {
            Packet::Publish(p) => {
                if p.topic.level_count() > limits.max_topic_levels {
                    self.protocol_error(
                        "PUBLISH topic has more levels than limits.max_topic_levels",
                    );
                    return Err(End::Protocol);
                }
                if p.topic.is_dollar() {
                    tracing::warn!(
                        target: "audit",
                        event = "publish_refused",
                        peer = %self.peer,
                        client_id = %self.client_id.escape_debug(),
                        topic = %p.topic.as_str().escape_debug(),
                        reason = "topics starting with '$' are written by the broker only",
                        "PUBLISH refused; connection closed"
                    );
                    Metrics::add(&router.metrics.protocol_errors, 1);
                    return Err(End::Protocol);
                }
                Metrics::add(&router.metrics.messages_received, 1);
                if let Some(r) = &mut self.rate {
                    r.published.0 += 1;
                    r.published.1 += p.payload.len() as u64;
                }
                let decision = router
                    .authority()
                    .check_publish(&self.principal(), &p.topic);
                let permitted = decision.allowed;
                if !permitted {
                    // MQTT 3.1.1 has no negative acknowledgement: the message is
                    // acknowledged (so the client does not resend it forever) and dropped.
                    tracing::warn!(
                        target: "audit",
                        event = "acl_denied",
                        action = "publish",
                        identity = self.identity.as_deref().map(|i| i.escape_debug().to_string()).unwrap_or_default(),
                        client_id = %self.client_id.escape_debug(),
                        topic = %p.topic.as_str().escape_debug(),
                        decision = %decision,
                        "PUBLISH refused by the ACL; acknowledged and dropped"
                    );
                }
                let msg = Message {
                    topic: p.topic,
                    // The decoded payload is a view into the read buffer; a copy keeps a
                    // small retained or queued message from pinning a whole buffer.
                    payload: bytes::Bytes::copy_from_slice(&p.payload),
                    qos: p.qos,
                    retain: p.retain,
                };
                match (p.qos, p.pkid) {
                    (QoS::AtMostOnce, _) => {
                        if permitted {
                            *wrote |= router.publish(msg)
                        }
                    }
                    (QoS::AtLeastOnce, Some(id)) => {
                        if permitted {
                            *wrote |= router.publish(msg);
                        }
                        out.push(Packet::PubAck(id));
                    }
                    (QoS::ExactlyOnce, Some(id)) => {
                        let first = router
                            .with_session(&self.client_id, self.conn, |s| s.incoming_qos2(id))
                            .ok_or_else(gone)?;
                        if first && permitted {
                            *wrote |= router.publish(msg);
                        }
                        out.push(Packet::PubRec(id));
                    }
                    _ => {
                        self.protocol_error("PUBLISH with QoS > 0 and no packet id");
                        return Err(End::Protocol);
                    }
                }
            }
            Packet::PubAck(id) => {
                *wrote |= router
                    .with_session(&self.client_id, self.conn, |s| {
                        s.on_puback(id);
                        s.wrote
                    })
                    .ok_or_else(gone)?;
            }
            Packet::PubRec(id) => {
                *wrote |= router
                    .with_session(&self.client_id, self.conn, |s| {
                        s.on_pubrec(id);
                        s.wrote
                    })
                    .ok_or_else(gone)?;
                // §4.3.3: answer PUBREC with PUBREL, also for an id we do not know.
                out.push(Packet::PubRel(id));
            }
            Packet::PubComp(id) => {
                *wrote |= router
                    .with_session(&self.client_id, self.conn, |s| {
                        s.on_pubcomp(id);
                        s.wrote
                    })
                    .ok_or_else(gone)?;
            }
            Packet::PubRel(id) => {
                router
                    .with_session(&self.client_id, self.conn, |s| s.incoming_pubrel(id))
                    .ok_or_else(gone)?;
                out.push(Packet::PubComp(id));
            }
            Packet::Subscribe(sub) => {
                let who = self.principal();
                let authority = router.authority().clone();
                let allow = |f: &bulwark_protocol::TopicFilter| {
                    let d = authority.check_subscribe(&who, f);
                    if !d.allowed {
                        tracing::warn!(
                            target: "audit",
                            event = "acl_denied",
                            action = "subscribe",
                            identity = who.identity.map(|i| i.escape_debug().to_string()).unwrap_or_default(),
                            client_id = %who.client_id.escape_debug(),
                            filter = %f.as_str().escape_debug(),
                            decision = %d,
                            "subscription refused by the ACL"
                        );
                    }
                    d.allowed
                };
                let (codes, w) = router
                    .subscribe(&self.client_id, self.conn, &sub.filters, allow)
                    .ok_or_else(gone)?;
                *wrote |= w;
                out.push(Packet::SubAck(SubAck {
                    pkid: sub.pkid,
                    return_codes: codes,
                }));
            }
            Packet::Unsubscribe(u) => {
                *wrote |= router
                    .unsubscribe(&self.client_id, self.conn, &u.filters)
                    .ok_or_else(gone)?;
                out.push(Packet::UnsubAck(u.pkid));
            }
            Packet::PingReq => out.push(Packet::PingResp),
            Packet::Disconnect => {
                self.will = None;
                return Ok(Some(End::Disconnect));
            }
            p @ (Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp) => {
                self.protocol_error(&format!("{} is not allowed from a client here", p.name()));
                return Err(End::Protocol);
            }
        }
        Ok(None)
    }

    async fn write(&mut self, packets: &[Packet]) -> Result<(), End> {
        if packets.is_empty() {
            return Ok(());
        }
        let mut buf = BytesMut::new();
        let mut publishes = 0u64;
        for p in packets {
            if let Err(e) = encode(p, &mut buf) {
                tracing::error!(error = %e, packet = p.name(), "could not encode an outgoing packet");
                continue;
            }
            if matches!(p, Packet::Publish(_)) {
                publishes += 1;
            }
        }
        let timeout = Duration::from_secs(self.shared.router.limits().write_timeout_secs);
        match tokio::time::timeout(timeout, self.transport.write_all(&buf)).await {
            Ok(Ok(())) => {
                let m = &self.shared.router.metrics;
                Metrics::add(&m.bytes_sent, buf.len() as u64);
                Metrics::add(&m.messages_sent, publishes);
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                Err(End::Io)
            }
            Err(_) => {
                tracing::warn!(
                    target: "audit",
                    event = "write_timeout",
                    peer = %self.peer,
                    client_id = %self.client_id.escape_debug(),
                    "client did not read for limits.write_timeout_secs; closed"
                );
                Err(End::WriteTimeout)
            }
        }
    }

    async fn finish(mut self: Box<Self>, end: End) {
        let router = self.shared.router.clone();
        router.unregister_connection(self.conn);
        router.detach(&self.client_id, self.conn);
        router
            .metrics
            .clients_connected
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if end.publishes_will() {
            if let Some(w) = self.will.take().filter(|w| {
                // Checked again when it fires: the ACL may have changed since CONNECT.
                let d = router
                    .authority()
                    .check_publish(&self.principal(), &w.topic);
                if !d.allowed {
                    tracing::warn!(
                        target: "audit",
                        event = "will_dropped",
                        client_id = %self.client_id.escape_debug(),
                        topic = %w.topic.as_str().escape_debug(),
                        decision = %d,
                        "will not published: the ACL no longer allows its topic"
                    );
                }
                d.allowed
            }) {
                let w = *w;
                tracing::debug!(topic = %w.topic, "publishing will");
                router.publish(Message {
                    topic: w.topic,
                    payload: w.payload,
                    qos: w.qos,
                    retain: w.retain,
                });
            }
        }
        tracing::info!(
            target: "audit",
            event = "disconnect",
            peer = %self.peer,
            client_id = %self.client_id.escape_debug(),
            reason = end.as_str(),
            "client disconnected"
        );
        if end != End::Io {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.transport.shutdown()).await;
        }
    }
}

type Refusal = (ConnectReturnCode, String);

pub(crate) fn auth_failure(shared: &Shared, peer: SocketAddr, user: Option<&str>, reason: &str) {
    log_auth_failure(peer, user, reason);
    record_auth_failure(shared, peer, user);
}

fn log_auth_failure(peer: SocketAddr, user: Option<&str>, reason: &str) {
    tracing::warn!(
        target: "audit",
        event = "auth_failure",
        %peer,
        username = user.map(|u| u.escape_debug().to_string()).unwrap_or_default(),
        reason,
        "authentication failed"
    );
}

fn record_auth_failure(shared: &Shared, peer: SocketAddr, user: Option<&str>) {
    for ban in shared
        .abuse
        .record_failure(peer.ip(), user, std::time::Instant::now())
    {
        match ban {
            crate::abuse::Banned::Address(ip, d) => tracing::warn!(
                target: "audit", event = "ban", address = %ip, seconds = d.as_secs(),
                "address banned after repeated authentication failures"
            ),
            crate::abuse::Banned::User(u, d) => tracing::warn!(
                target: "audit", event = "ban", username = %u.escape_debug(), seconds = d.as_secs(),
                "username banned after repeated authentication failures"
            ),
        }
    }
}

/// Establishes the client's identity according to the listener's identity source.
/// `Ok(None)`: anonymous (allowed by the listener).
async fn authenticate(
    shared: &Shared,
    listener: &ListenerRuntime,
    connect: &Connect,
    cert_identity: Option<&str>,
    peer: SocketAddr,
) -> Result<(Option<Arc<str>>, bool), Refusal> {
    use crate::config::IdentitySource;
    let mode = listener.config.identity;
    let username = connect.username.as_deref();
    let bad = |detail: &str| (ConnectReturnCode::BadUsernameOrPassword, detail.to_string());
    let not_authorized = |detail: &str| (ConnectReturnCode::NotAuthorized, detail.to_string());

    // A certificate identity is used when there is one and the mode takes it.
    if let Some(cert) = cert_identity.filter(|_| mode != IdentitySource::Password) {
        if let Some(u) = username {
            if u != cert {
                auth_failure(
                    shared,
                    peer,
                    Some(u),
                    "username differs from the certificate identity",
                );
                return Err(bad("username differs from the certificate identity"));
            }
        }
        let with_password = mode == IdentitySource::CertificateAndPassword;
        if with_password {
            verify_password(shared, connect, peer).await?;
        }
        shared.abuse.record_success(peer.ip(), username);
        return Ok((Some(Arc::from(cert)), with_password));
    }
    if mode.needs_certificate() {
        auth_failure(shared, peer, username, "no verified client certificate");
        return Err(not_authorized(
            "this listener requires a client certificate",
        ));
    }
    // Credentials on a listener that allows anonymous clients, on a broker without a
    // password file, are ignored (as Mosquitto does): the client is anonymous, never the
    // unverified username.
    let ignore_credentials =
        listener.config.allow_anonymous && shared.router.authority().verifier().is_none();
    if username.is_some() && mode.accepts_password() && !ignore_credentials {
        let user = verify_password(shared, connect, peer).await?;
        shared.abuse.record_success(peer.ip(), Some(&user));
        return Ok((Some(Arc::from(user.as_str())), true));
    }
    if mode.needs_password() {
        auth_failure(shared, peer, None, "no username and password");
        return Err(not_authorized(
            "this listener requires a username and password",
        ));
    }
    if listener.config.allow_anonymous {
        return Ok((None, false));
    }
    auth_failure(shared, peer, username, "no credentials");
    Err(not_authorized(
        "no client certificate or password, and the listener does not allow anonymous clients",
    ))
}

/// Checks CONNECT's username and password; returns the username.
async fn verify_password(
    shared: &Shared,
    connect: &Connect,
    peer: SocketAddr,
) -> Result<String, Refusal> {
    let bad = |detail: &str| (ConnectReturnCode::BadUsernameOrPassword, detail.to_string());
    let Some(user) = connect.username.as_deref() else {
        auth_failure(shared, peer, None, "no username");
        return Err(bad("a username and password are required"));
    };
    let Some(verifier) = shared.router.authority().verifier() else {
        auth_failure(
            shared,
            peer,
            Some(user),
            "password authentication is not configured",
        );
        return Err(bad(
            "password authentication is not configured on this broker",
        ));
    };
    if let Err(refusal) = shared
        .abuse
        .check_user(peer.ip(), user, std::time::Instant::now())
    {
        // Logged, but not counted: attempts during a ban must not extend it, or an
        // attacker could keep the real user locked out for as long as the attack lasts.
        log_auth_failure(peer, Some(user), &format!("{refusal:?}"));
        return Err(bad("username temporarily banned after repeated failures"));
    }
    let password = connect.password.as_deref().unwrap_or(&[]);
    match verifier.verify(user, password).await {
        Ok(v) if v.is_accepted() => Ok(user.to_string()),
        Ok(_) => {
            auth_failure(shared, peer, Some(user), "wrong username or password");
            Err(bad("wrong username or password"))
        }
        Err(crate::auth::passwords::Busy) => Err((
            ConnectReturnCode::ServerUnavailable,
            "too many password checks waiting (auth.passwords.max_pending_verifications)".into(),
        )),
    }
}

/// The checks after authentication: bounds, will, and the ACL's connect and will rules.
/// Returns the client id to use (`None`: assign one).
fn check_connect(
    router: &Router,
    connect: &Connect,
    identity: Option<&str>,
) -> Result<Option<Arc<str>>, Refusal> {
    let limits = router.limits();
    let refuse = |code, detail: &str| Err((code, detail.to_string()));
    if connect.client_id.len() > limits.max_client_id_len {
        return refuse(
            ConnectReturnCode::IdentifierRejected,
            "client id longer than limits.max_client_id_len",
        );
    }
    if connect.keep_alive == 0 && !limits.allow_zero_keepalive {
        return refuse(
            ConnectReturnCode::IdentifierRejected,
            "keepalive 0 is not allowed (limits.allow_zero_keepalive)",
        );
    }
    if connect.keep_alive > limits.max_keepalive_secs {
        return refuse(
            ConnectReturnCode::IdentifierRejected,
            "keepalive above limits.max_keepalive_secs",
        );
    }
    // A device that sends no client id is known by its identity.
    let client_id: Option<Arc<str>> = match (connect.client_id.is_empty(), identity) {
        (false, _) => Some(connect.client_id.as_str().into()),
        (true, Some(i)) => Some(i.into()),
        (true, None) => None,
    };
    let authority = router.authority();
    if let (Some(cid), Some(decision)) = (
        &client_id,
        client_id
            .as_deref()
            .and_then(|cid| authority.check_connect(identity, cid)),
    ) {
        if !decision.allowed {
            tracing::warn!(
                target: "audit",
                event = "acl_denied",
                action = "connect",
                identity = identity.map(|i| i.escape_debug().to_string()).unwrap_or_default(),
                client_id = %cid.escape_debug(),
                decision = %decision,
                "client id refused by the ACL"
            );
            return refuse(ConnectReturnCode::IdentifierRejected, &decision.to_string());
        }
    }
    if let Some(w) = &connect.will {
        if w.topic.is_dollar() {
            return refuse(
                ConnectReturnCode::NotAuthorized,
                "will topic starts with '$'; those topics are written by the broker only",
            );
        }
        if w.topic.level_count() > limits.max_topic_levels {
            return refuse(
                ConnectReturnCode::NotAuthorized,
                "will topic has more levels than limits.max_topic_levels",
            );
        }
        let cid = client_id.as_deref().unwrap_or("");
        let who = bulwark_protocol::acl::Principal {
            identity,
            client_id: cid,
        };
        let decision = authority.check_publish(&who, &w.topic);
        if !decision.allowed {
            tracing::warn!(
                target: "audit",
                event = "acl_denied",
                action = "will",
                identity = identity.map(|i| i.escape_debug().to_string()).unwrap_or_default(),
                client_id = %cid.escape_debug(),
                topic = %w.topic.as_str().escape_debug(),
                decision = %decision,
                "will topic refused by the ACL"
            );
            return refuse(ConnectReturnCode::NotAuthorized, &decision.to_string());
        }
    }
    Ok(client_id)
}

/// Lets the tasks woken so far run before this one goes on: it wakes itself, and the
/// runtime queues it behind them. Unlike `tokio::task::yield_now`, which waits for the
/// runtime's next look at the sockets (an `epoll_wait` system call ahead of the
/// subscribers' writes), this goes straight to the woken tasks.
async fn let_woken_tasks_run() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// Where the serve loop's timer starts, until a keepalive or park deadline moves it: far
/// enough to be later than any of them.
const TIMER_UNSET: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[cfg(test)]
mod tests {
    /// On one thread (the broker's runtime on one CPU), the tasks a connection's batch
    /// woke run before it goes on: the subscriber's delivery is written ahead of the
    /// publisher's PUBACK.
    #[test]
    fn woken_tasks_run_before_the_connection_goes_on() {
        use std::sync::{Arc, Mutex};
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let wakeup = Arc::new(tokio::sync::Notify::new());
        rt.block_on(async {
            let subscriber = tokio::spawn({
                let (order, wakeup) = (order.clone(), wakeup.clone());
                async move {
                    wakeup.notified().await;
                    order.lock().unwrap().push("delivery");
                }
            });
            let publisher = tokio::spawn({
                let (order, wakeup) = (order.clone(), wakeup.clone());
                async move {
                    wakeup.notify_one();
                    super::let_woken_tasks_run().await;
                    order.lock().unwrap().push("puback");
                }
            });
            publisher.await.unwrap();
            subscriber.await.unwrap();
        });
        assert_eq!(*order.lock().unwrap(), ["delivery", "puback"]);
    }

    /// What an idle connection keeps in memory while parked: its own state, its session,
    /// its entry among the live connections and its signals (`bytes per idle plain
    /// connection` in BENCHMARKS.md). A field added here is paid for by every idle client;
    /// glibc's blocks grow in steps of 16 bytes (size + 8, rounded up), so the budgets sit
    /// at the top of the step each struct is in. tokio's `TcpStream` is 8 bytes larger in
    /// test builds than in release builds: `Connection` is 216 bytes in a release build.
    #[test]
    fn idle_connection_state_stays_small() {
        let sizes = [
            ("Connection", std::mem::size_of::<super::Connection>(), 224),
            (
                "Session",
                std::mem::size_of::<crate::session::Session>(),
                120,
            ),
            (
                "LiveConnection",
                std::mem::size_of::<crate::router::LiveConnection>(),
                104,
            ),
            ("Signals", std::mem::size_of::<crate::park::Signals>(), 40),
        ];
        for (name, size, budget) in sizes {
            assert!(
                size <= budget,
                "{name} is {size} bytes, over its budget of {budget}"
            );
        }
    }
}
