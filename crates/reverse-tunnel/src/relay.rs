//! The relay: runs inside the broker, on its WebSocket-over-TLS listener at
//! [`crate::proto::PATH`], and pairs an operator with a device.
//!
//! 1. The operator connects (client certificate, or username and password in the request),
//!    asks to `open` service S on device D. The relay checks the grant (write permission on
//!    `$tunnel/D/open/S` in the broker's ACL), its limits, and that D is connected to the
//!    broker.
//! 2. It publishes an [`Offer`] on `$tunnel/D/notify` over D's own MQTT session: session id,
//!    service, relay URL, and a single-use token valid `offer_ttl_secs`.
//! 3. The agent on D checks S against its allow-list, dials the relay with its device
//!    certificate and sends `accept` (or `refuse`). The relay checks that the certificate
//!    identity is D, that the token is D's, unused and unexpired, then splices the two
//!    WebSockets ([`crate::splice`]): binary messages flow both ways through a
//!    [`crate::frames::FrameFilter`] (stream limit, device may not open streams) with
//!    back-pressure (one frame in hand per direction).
//! 4. The session ends when either side closes, after `idle_timeout_secs` without a byte,
//!    after `max_session_secs`, or at broker shutdown (the `shutdown` signal of
//!    [`Relay::serve`]).
//!
//! Every open, refusal (with its reason) and close (duration, bytes each way) is an audit
//! event: `tunnel_open`, `tunnel_refused`, `tunnel_close`, with `operator`, `device`,
//! `service` and `session` fields.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::WebSocketStream;

use crate::proto::{
    random_token, valid_name, ErrorCode, Offer, RefuseReason, Reply, Request, SessionInfo,
};
use crate::splice::RelayConnection;
use crate::ws::{read_json, write_json, Activity};

/// The broker's `[tunnel]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Serve the relay at `/tunnel/v1` on every `wss` listener. Off by default.
    pub enabled: bool,
    /// The URL devices dial to join, as they reach this broker:
    /// `wss://broker.example:443/tunnel/v1`. Required when enabled.
    pub public_url: String,
    /// Seconds a device has to join after the offer (the token's lifetime).
    pub offer_ttl_secs: u64,
    /// A session without a byte either way for this long is closed.
    pub idle_timeout_secs: u64,
    /// No session lasts longer than this.
    pub max_session_secs: u64,
    /// Sessions (waiting or open) on this broker.
    pub max_sessions: usize,
    /// Sessions to one device at once.
    pub max_sessions_per_device: usize,
    /// Sessions of one operator at once.
    pub max_sessions_per_operator: usize,
    /// TCP connections carried by one session at once; more are reset by the relay.
    pub max_streams_per_session: usize,
    /// Seconds a new connection has to send its request.
    pub request_timeout_secs: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            enabled: false,
            public_url: String::new(),
            offer_ttl_secs: 60,
            idle_timeout_secs: 900,
            max_session_secs: 4 * 3600,
            max_sessions: 64,
            max_sessions_per_device: 4,
            max_sessions_per_operator: 8,
            max_streams_per_session: 64,
            request_timeout_secs: 10,
        }
    }
}

impl RelayConfig {
    /// Checks the values; the error is `(key, what to fix)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !self.enabled {
            return Ok(());
        }
        crate::ws::RelayUrl::parse(&self.public_url).map_err(|e| {
            (
                "tunnel.public_url".to_string(),
                format!("{e}; set it to the wss:// URL devices use to reach this broker, e.g. \"wss://broker.example:443/tunnel/v1\""),
            )
        })?;
        for (k, v) in [
            ("tunnel.offer_ttl_secs", self.offer_ttl_secs),
            ("tunnel.idle_timeout_secs", self.idle_timeout_secs),
            ("tunnel.max_session_secs", self.max_session_secs),
            ("tunnel.request_timeout_secs", self.request_timeout_secs),
            ("tunnel.max_sessions", self.max_sessions as u64),
            (
                "tunnel.max_sessions_per_device",
                self.max_sessions_per_device as u64,
            ),
            (
                "tunnel.max_sessions_per_operator",
                self.max_sessions_per_operator as u64,
            ),
            (
                "tunnel.max_streams_per_session",
                self.max_streams_per_session as u64,
            ),
        ] {
            if v == 0 {
                return Err((k.to_string(), "must be at least 1".to_string()));
            }
        }
        Ok(())
    }
}

/// A boxed future, for the object-safe [`RelayHost`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the relay needs from the broker that hosts it.
pub trait RelayHost: Send + Sync + 'static {
    /// The identity of a connection: its certificate identity, or the username whose
    /// password checks out. `Err` says why not (for the operator and the audit log).
    fn authenticate<'a>(
        &'a self,
        peer: SocketAddr,
        cert_identity: Option<&'a str>,
        username: Option<&'a str>,
        password: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, String>>;
    /// Whether `operator` may open `service` on `device` (write on `$tunnel/D/open/S`).
    fn may_open(&self, operator: &str, device: &str, service: &str) -> bool;
    /// Whether `device` can receive an offer now: connected, and subscribed to its
    /// notification topic.
    fn device_online(&self, device: &str) -> bool;
    /// Publishes the offer on `$tunnel/<device>/notify` (QoS 1, not retained).
    fn notify(&self, device: &str, offer: &Offer) -> Result<(), String>;
}

enum Join<S> {
    Device(Box<WebSocketStream<S>>),
    Refused(RefuseReason),
}

enum Phase<S> {
    Waiting {
        token: String,
        expires: Instant,
        join: oneshot::Sender<Join<S>>,
    },
    Open,
}

struct Entry<S> {
    device: String,
    service: String,
    operator: String,
    opened_ms: u64,
    phase: Phase<S>,
    activity: Arc<Activity>,
}

/// The relay. One per broker; cheap to share (`Arc`).
pub struct Relay<S> {
    host: Arc<dyn RelayHost>,
    config: RelayConfig,
    sessions: Mutex<HashMap<String, Entry<S>>>,
}

impl<S> std::fmt::Debug for Relay<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Who a refusal concerns, for the audit line.
#[derive(Default)]
struct Who<'a> {
    operator: Option<&'a str>,
    device: Option<&'a str>,
    service: Option<&'a str>,
    session: Option<&'a str>,
    role: &'a str,
}

fn audit_refused(peer: SocketAddr, who: &Who<'_>, code: ErrorCode, detail: &str) {
    tracing::warn!(
        target: "audit",
        event = "tunnel_refused",
        %peer,
        role = who.role,
        operator = who.operator.unwrap_or(""),
        device = who.device.unwrap_or(""),
        service = who.service.unwrap_or(""),
        session = who.session.unwrap_or(""),
        reason = code.as_str(),
        detail,
        "tunnel refused"
    );
}

/// Constant-time comparison of two tokens.
fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S: RelayConnection> Relay<S> {
    pub fn new(host: Arc<dyn RelayHost>, config: RelayConfig) -> Relay<S> {
        Relay {
            host,
            config,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Sessions waiting or open.
    pub fn session_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry<S>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves one upgraded WebSocket connection to its end. `cert_identity` is the
    /// identity of the verified client certificate, if any. Returns when the connection
    /// ends or `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        mut ws: WebSocketStream<S>,
        cert_identity: Option<String>,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let timeout = Duration::from_secs(self.config.request_timeout_secs);
        let request: Request = match read_json(&mut ws, timeout).await {
            Ok(r) => r,
            Err(e) => {
                audit_refused(
                    peer,
                    &Who {
                        role: "unknown",
                        ..Who::default()
                    },
                    ErrorCode::BadRequest,
                    &e,
                );
                let _ = write_json(&mut ws, &Reply::error(ErrorCode::BadRequest, e)).await;
                let _ = ws.close(None).await;
                return;
            }
        };
        tracing::debug!(%peer, request = ?request.redacted(), "tunnel request");
        let served = async {
            match request {
                Request::Open {
                    device,
                    service,
                    username,
                    password,
                } => {
                    self.open(
                        ws,
                        peer,
                        cert_identity.as_deref(),
                        username.as_deref(),
                        password.as_deref(),
                        &device,
                        &service,
                    )
                    .await
                }
                Request::List { username, password } => {
                    self.list(
                        ws,
                        peer,
                        cert_identity.as_deref(),
                        username.as_deref(),
                        password.as_deref(),
                    )
                    .await
                }
                Request::Accept { session, token } => {
                    self.join(ws, peer, cert_identity.as_deref(), &session, &token, None)
                        .await
                }
                Request::Refuse {
                    session,
                    token,
                    reason,
                } => {
                    self.join(
                        ws,
                        peer,
                        cert_identity.as_deref(),
                        &session,
                        &token,
                        Some(reason),
                    )
                    .await
                }
            }
        };
        tokio::select! {
            _ = served => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }

    async fn refuse(
        &self,
        mut ws: WebSocketStream<S>,
        peer: SocketAddr,
        who: Who<'_>,
        code: ErrorCode,
        error: String,
    ) {
        audit_refused(peer, &who, code, &error);
        let _ = write_json(&mut ws, &Reply::error(code, error)).await;
        let _ = ws.close(None).await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn open(
        &self,
        mut ws: WebSocketStream<S>,
        peer: SocketAddr,
        cert: Option<&str>,
        username: Option<&str>,
        password: Option<&str>,
        device: &str,
        service: &str,
    ) {
        let mut who = Who {
            role: "operator",
            device: Some(device),
            service: Some(service),
            ..Who::default()
        };
        let operator = match self.host.authenticate(peer, cert, username, password).await {
            Ok(o) => o,
            Err(e) => {
                who.operator = username;
                return self.refuse(ws, peer, who, ErrorCode::AuthFailed, e).await;
            }
        };
        who.operator = Some(&operator);
        if !valid_name(device) || !valid_name(service) {
            return self
                .refuse(
                    ws,
                    peer,
                    who,
                    ErrorCode::BadRequest,
                    "device and service names are one topic level: no '/', '+', '#', and no leading '$'".into(),
                )
                .await;
        }
        if !self.host.may_open(&operator, device, service) {
            let msg = format!(
                "{operator} has no grant to open {service} on {device}: an administrator must give you write permission on {} in the broker's ACL",
                crate::proto::grant_topic(device, service)
            );
            return self.refuse(ws, peer, who, ErrorCode::NoGrant, msg).await;
        }
        if !self.host.device_online(device) {
            let msg = format!(
                "{device} is not connected to the broker, or its agent has no tunnel enabled (its retained devices/{device}/status says whether it is online); a tunnel needs the device online with [tunnel] enabled = true"
            );
            return self
                .refuse(ws, peer, who, ErrorCode::DeviceOffline, msg)
                .await;
        }
        let session = random_token()[..22].to_string();
        let token = random_token();
        let ttl = Duration::from_secs(self.config.offer_ttl_secs);
        let activity = Arc::new(Activity::default());
        let (join_tx, mut join_rx) = oneshot::channel();
        let limit = {
            let mut s = self.lock();
            let c = &self.config;
            let limit = if s.len() >= c.max_sessions {
                Some(format!(
                    "the relay has {} sessions (tunnel.max_sessions); try again later",
                    s.len()
                ))
            } else if s.values().filter(|e| e.device == device).count() >= c.max_sessions_per_device
            {
                Some(format!(
                    "{device} already has {} tunnel sessions (tunnel.max_sessions_per_device); close one first",
                    c.max_sessions_per_device
                ))
            } else if s.values().filter(|e| e.operator == operator).count()
                >= c.max_sessions_per_operator
            {
                Some(format!(
                    "you already have {} tunnel sessions open (tunnel.max_sessions_per_operator); close one first",
                    c.max_sessions_per_operator
                ))
            } else {
                None
            };
            if limit.is_none() {
                s.insert(
                    session.clone(),
                    Entry {
                        device: device.to_string(),
                        service: service.to_string(),
                        operator: operator.clone(),
                        opened_ms: now_ms(),
                        phase: Phase::Waiting {
                            token: token.clone(),
                            expires: Instant::now() + ttl,
                            join: join_tx,
                        },
                        activity: activity.clone(),
                    },
                );
            }
            limit
        };
        if let Some(msg) = limit {
            return self.refuse(ws, peer, who, ErrorCode::Limit, msg).await;
        }
        who.session = Some(&session);
        let offer = Offer {
            v: 1,
            session: session.clone(),
            service: service.to_string(),
            relay_url: self.config.public_url.clone(),
            token,
            expires: bulwark_protocol::envelope::format_ts(now_ms() + ttl.as_millis() as u64),
            expires_in_secs: ttl.as_secs(),
            operator: operator.clone(),
        };
        if let Err(e) = self.host.notify(device, &offer) {
            self.lock().remove(&session);
            return self
                .refuse(
                    ws,
                    peer,
                    who,
                    ErrorCode::Unavailable,
                    format!("cannot notify {device}: {e}"),
                )
                .await;
        }
        let deadline = tokio::time::sleep(ttl);
        tokio::pin!(deadline);
        let joined = tokio::select! {
            j = &mut join_rx => j.ok(),
            _ = &mut deadline => {
                let waiting = {
                    let mut s = self.lock();
                    let waiting = matches!(s.get(&session).map(|e| &e.phase), Some(Phase::Waiting { .. }));
                    if waiting {
                        s.remove(&session);
                    }
                    waiting
                };
                // Not waiting any more: the device joined at the last moment, and its answer
                // is in the channel.
                if waiting { None } else { join_rx.try_recv().ok() }
            }
            // The operator went away (or sent something out of turn) before the device came.
            _ = ws.next() => {
                self.lock().remove(&session);
                audit_refused(peer, &who, ErrorCode::BadRequest, "the operator left before the device joined");
                return;
            }
        };
        let dev_ws = match joined {
            None => {
                self.lock().remove(&session);
                let msg = format!(
                    "{device} did not join within {} s: is the tunnel enabled in its agent ([tunnel] in agent.toml), and can it reach {}? Its log says more",
                    ttl.as_secs(),
                    self.config.public_url
                );
                return self
                    .refuse(ws, peer, who, ErrorCode::TokenExpired, msg)
                    .await;
            }
            Some(Join::Refused(reason)) => {
                self.lock().remove(&session);
                let msg = match reason {
                    RefuseReason::ServiceNotAllowed => format!(
                        "{device} does not allow the service {service:?}: it is not in the gateway's [tunnel.services]; ask its administrator"
                    ),
                    RefuseReason::TooManySessions => format!(
                        "{device} already runs its maximum of tunnel sessions (tunnel.max_sessions in its agent.toml)"
                    ),
                };
                return self.refuse(ws, peer, who, reason.code(), msg).await;
            }
            Some(Join::Device(d)) => d,
        };
        if write_json(&mut ws, &Reply::ok(Some(session.clone())))
            .await
            .is_err()
        {
            self.lock().remove(&session);
            return;
        }
        tracing::info!(
            target: "audit",
            event = "tunnel_open",
            %peer,
            operator = %operator,
            device,
            service,
            session = %session,
            "tunnel session open"
        );
        let started = Instant::now();
        let reason = self.splice(ws, *dev_ws, &activity).await;
        self.lock().remove(&session);
        tracing::info!(
            target: "audit",
            event = "tunnel_close",
            %peer,
            operator = %operator,
            device,
            service,
            session = %session,
            duration_secs = started.elapsed().as_secs_f64(),
            bytes_to_device = activity.bytes_in(),
            bytes_to_operator = activity.bytes_out(),
            reason,
            "tunnel session closed"
        );
    }

    async fn list(
        &self,
        mut ws: WebSocketStream<S>,
        peer: SocketAddr,
        cert: Option<&str>,
        username: Option<&str>,
        password: Option<&str>,
    ) {
        let who = Who {
            role: "operator",
            operator: username,
            ..Who::default()
        };
        let operator = match self.host.authenticate(peer, cert, username, password).await {
            Ok(o) => o,
            Err(e) => return self.refuse(ws, peer, who, ErrorCode::AuthFailed, e).await,
        };
        let mut sessions: Vec<SessionInfo> = self
            .lock()
            .iter()
            .filter(|(_, e)| {
                e.operator == operator || self.host.may_open(&operator, &e.device, &e.service)
            })
            .map(|(id, e)| SessionInfo {
                session: id.clone(),
                device: e.device.clone(),
                service: e.service.clone(),
                operator: e.operator.clone(),
                opened: bulwark_protocol::envelope::format_ts(e.opened_ms),
                state: match e.phase {
                    Phase::Waiting { .. } => "waiting".into(),
                    Phase::Open => "open".into(),
                },
                bytes_to_device: e.activity.bytes_in(),
                bytes_to_operator: e.activity.bytes_out(),
            })
            .collect();
        sessions.sort_by(|a, b| a.opened.cmp(&b.opened));
        let reply = Reply {
            ok: true,
            sessions: Some(sessions),
            ..Reply::default()
        };
        let _ = write_json(&mut ws, &reply).await;
        let _ = ws.close(None).await;
    }

    /// A device answers an offer.
    async fn join(
        &self,
        mut ws: WebSocketStream<S>,
        peer: SocketAddr,
        cert: Option<&str>,
        session: &str,
        token: &str,
        refuse: Option<RefuseReason>,
    ) {
        let mut who = Who {
            role: "device",
            session: Some(session),
            device: cert,
            ..Who::default()
        };
        let Some(identity) = cert else {
            return self
                .refuse(
                    ws,
                    peer,
                    who,
                    ErrorCode::AuthFailed,
                    "devices join a tunnel with their device certificate".into(),
                )
                .await;
        };
        let checked = {
            let mut s = self.lock();
            match s.get_mut(session) {
                None => Err((
                    ErrorCode::TokenInvalid,
                    "unknown or finished session (tokens are single use)".to_string(),
                )),
                Some(e) => {
                    who.service = None;
                    if e.device != identity {
                        Err((
                            ErrorCode::WrongDevice,
                            format!(
                                "certificate identity {identity:?} tried to join a session for device {:?}",
                                e.device
                            ),
                        ))
                    } else {
                        match &e.phase {
                            Phase::Open => Err((
                                ErrorCode::TokenInvalid,
                                "token already used (tokens are single use)".to_string(),
                            )),
                            Phase::Waiting { token: t, .. } if !same_token(t, token) => Err((
                                ErrorCode::TokenInvalid,
                                "wrong token for this session".to_string(),
                            )),
                            Phase::Waiting { expires, .. } if Instant::now() > *expires => {
                                Err((ErrorCode::TokenExpired, "the offer has expired".to_string()))
                            }
                            Phase::Waiting { .. } => {
                                match std::mem::replace(&mut e.phase, Phase::Open) {
                                    Phase::Waiting { join, .. } => Ok((join, e.service.clone())),
                                    Phase::Open => unreachable!("checked above"),
                                }
                            }
                        }
                    }
                }
            }
        };
        let (join, service) = match checked {
            Ok(j) => j,
            Err((code, msg)) => return self.refuse(ws, peer, who, code, msg).await,
        };
        who.service = Some(&service);
        if let Some(reason) = refuse {
            self.lock().remove(session);
            audit_refused(peer, &who, reason.code(), "the device declined the offer");
            let _ = join.send(Join::Refused(reason));
            let _ = write_json(&mut ws, &Reply::ok(Some(session.to_string()))).await;
            let _ = ws.close(None).await;
            return;
        }
        if write_json(&mut ws, &Reply::ok(Some(session.to_string())))
            .await
            .is_err()
        {
            self.lock().remove(session);
            return;
        }
        if join.send(Join::Device(Box::new(ws))).is_err() {
            // The operator left in the meantime.
            self.lock().remove(session);
        }
        // The operator's task splices and closes; this connection's task ends here.
    }

    /// Forwards both ways until one side closes or a limit ends the session; returns why.
    /// The WebSockets continue in [`crate::splice`] on their connections: nothing is lost,
    /// since the relay last wrote its reply on each and has not read since, and neither the
    /// operator nor the device sends before that reply.
    async fn splice(
        &self,
        op: WebSocketStream<S>,
        dev: WebSocketStream<S>,
        activity: &Activity,
    ) -> &'static str {
        let idle = Duration::from_secs(self.config.idle_timeout_secs);
        let lifetime = Duration::from_secs(self.config.max_session_secs);
        let limit = async {
            tokio::select! {
                _ = activity.idle_for(idle) => "idle timeout",
                _ = tokio::time::sleep(lifetime) => "maximum session lifetime",
            }
        };
        crate::splice::splice(
            op.into_inner(),
            dev.into_inner(),
            self.config.max_streams_per_session,
            activity,
            limit,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let c = RelayConfig::default();
        assert!(!c.enabled);
        assert!(c.validate().is_ok());
        let on = RelayConfig {
            enabled: true,
            ..RelayConfig::default()
        };
        assert_eq!(on.validate().unwrap_err().0, "tunnel.public_url");
        let ok = RelayConfig {
            enabled: true,
            public_url: "wss://b.example:443/tunnel/v1".into(),
            ..RelayConfig::default()
        };
        assert!(ok.validate().is_ok());
        let zero = RelayConfig {
            max_streams_per_session: 0,
            ..ok
        };
        assert_eq!(
            zero.validate().unwrap_err().0,
            "tunnel.max_streams_per_session"
        );
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "ab"));
    }
}
