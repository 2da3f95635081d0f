//! The device side, run by the agent: answers offers that arrive on
//! `$tunnel/<device>/notify`, dials the relay with the device certificate, and connects
//! each stream the operator opens to the allow-listed local service.
//!
//! A device never connects anywhere that is not on its own lists: the relay must be one of
//! the agent's configured brokers, and a service must be in `[tunnel.services]`, which only
//! takes loopback addresses and Unix sockets.
//!
//! Configuration (`[tunnel]` in the agent's file):
//!
//! ```toml
//! [tunnel]
//! enabled = true                  # off by default
//! idle_timeout_secs = 900         # no byte either way for this long: closed
//! max_session_secs = 14400        # no session lasts longer
//! max_sessions = 2                # sessions at once; more offers are refused
//! max_streams_per_session = 64    # TCP connections per session; more are reset
//! connect_timeout_secs = 10       # reaching the relay, and the local service
//! [tunnel.services]
//! ssh = "127.0.0.1:22"
//! web = "unix:/run/plc-ui/http.sock"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::mux::{self, MuxStream};
use crate::proto::{Offer, RefuseReason, Request};
use crate::ws::{self, Activity, RelayUrl, WsBytes};

/// The agent's `[tunnel]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceTunnelConfig {
    pub enabled: bool,
    /// Service name → `HOST:PORT` on loopback, or `unix:/path`.
    pub services: BTreeMap<String, String>,
    pub idle_timeout_secs: u64,
    pub max_session_secs: u64,
    pub max_sessions: usize,
    pub max_streams_per_session: usize,
    pub connect_timeout_secs: u64,
}

impl Default for DeviceTunnelConfig {
    fn default() -> Self {
        DeviceTunnelConfig {
            enabled: false,
            services: BTreeMap::new(),
            idle_timeout_secs: 900,
            max_session_secs: 4 * 3600,
            max_sessions: 2,
            max_streams_per_session: 64,
            connect_timeout_secs: 10,
        }
    }
}

/// Where a service lives on the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceTarget {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ServiceTarget {
    /// `127.0.0.1:22`, `[::1]:8080`, `localhost:22` or `unix:/run/x.sock`. Anything that is
    /// not loopback is refused: the tunnel reaches the gateway itself, not the plant
    /// network behind it.
    pub fn parse(s: &str) -> Result<ServiceTarget, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err(format!("{s:?}: a Unix socket path must be absolute"));
            }
            return Ok(ServiceTarget::Unix(p));
        }
        let addr: SocketAddr = match s.strip_prefix("localhost:") {
            Some(port) => format!("127.0.0.1:{port}")
                .parse()
                .map_err(|_| format!("{s:?}: bad port"))?,
            None => s
                .parse()
                .map_err(|_| format!("{s:?}: expected 127.0.0.1:PORT, [::1]:PORT or unix:/path"))?,
        };
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{s:?}: only loopback addresses (127.0.0.1, ::1) or Unix sockets; the tunnel must not reach beyond the gateway"
            ));
        }
        Ok(ServiceTarget::Tcp(addr))
    }
}

impl DeviceTunnelConfig {
    /// Checks the values; the error is `(key, what to fix)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (name, target) in &self.services {
            let key = format!("tunnel.services.{name}");
            if !crate::proto::valid_name(name) {
                return Err((
                    key,
                    "service names are one topic level: no '/', '+', '#', no leading '$'".into(),
                ));
            }
            ServiceTarget::parse(target).map_err(|e| (key, e))?;
        }
        for (k, v) in [
            ("tunnel.idle_timeout_secs", self.idle_timeout_secs),
            ("tunnel.max_session_secs", self.max_session_secs),
            ("tunnel.max_sessions", self.max_sessions as u64),
            (
                "tunnel.max_streams_per_session",
                self.max_streams_per_session as u64,
            ),
            ("tunnel.connect_timeout_secs", self.connect_timeout_secs),
        ] {
            if v == 0 {
                return Err((k.to_string(), "must be at least 1".into()));
            }
        }
        Ok(())
    }

    pub fn target(&self, service: &str) -> Option<ServiceTarget> {
        self.services
            .get(service)
            .and_then(|t| ServiceTarget::parse(t).ok())
    }
}

/// What happened to an offer, for the agent's audit record (which it sends through its
/// store-and-forward queue).
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceEvent {
    Open {
        session: String,
        service: String,
        operator: String,
    },
    Refused {
        session: String,
        service: String,
        operator: String,
        reason: String,
    },
    Close {
        session: String,
        service: String,
        operator: String,
        duration_secs: f64,
        bytes_in: u64,
        bytes_out: u64,
        streams: u64,
        reason: String,
    },
}

impl DeviceEvent {
    pub fn name(&self) -> &'static str {
        match self {
            DeviceEvent::Open { .. } => "tunnel_open",
            DeviceEvent::Refused { .. } => "tunnel_refused",
            DeviceEvent::Close { .. } => "tunnel_close",
        }
    }

    /// The event as a JSON object (with `event`), as the agent publishes it.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            DeviceEvent::Open {
                session,
                service,
                operator,
            } => {
                json!({"event": self.name(), "session": session, "service": service, "operator": operator})
            }
            DeviceEvent::Refused {
                session,
                service,
                operator,
                reason,
            } => {
                json!({"event": self.name(), "session": session, "service": service, "operator": operator, "reason": reason})
            }
            DeviceEvent::Close {
                session,
                service,
                operator,
                duration_secs,
                bytes_in,
                bytes_out,
                streams,
                reason,
            } => {
                json!({"event": self.name(), "session": session, "service": service, "operator": operator,
                "duration_secs": duration_secs, "bytes_from_operator": bytes_in, "bytes_to_operator": bytes_out,
                "streams": streams, "reason": reason})
            }
        }
    }
}

/// Runs the device side of tunnel sessions for one agent.
#[derive(Debug)]
pub struct DeviceTunnels {
    config: DeviceTunnelConfig,
    /// Hosts the agent may dial: its brokers.
    relay_hosts: Vec<String>,
    active: AtomicUsize,
}

impl DeviceTunnels {
    pub fn new(config: DeviceTunnelConfig, relay_hosts: Vec<String>) -> Self {
        DeviceTunnels {
            config,
            relay_hosts,
            active: AtomicUsize::new(0),
        }
    }

    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Handles one notification payload: decides, dials the relay, and (if accepted) runs
    /// the session to its end. `tls` is the agent's client configuration (device
    /// certificate, broker CA). Every decision is reported through `on_event`.
    pub async fn handle_offer(
        self: Arc<Self>,
        payload: &[u8],
        tls: Arc<rustls::ClientConfig>,
        on_event: impl Fn(DeviceEvent) + Send + Sync,
    ) {
        let offer: Offer = match serde_json::from_slice(payload) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(target: "audit", event = "tunnel_refused", reason = "bad_offer", error = %e, "malformed tunnel offer ignored");
                return;
            }
        };
        let refused = |reason: &str| DeviceEvent::Refused {
            session: offer.session.clone(),
            service: offer.service.clone(),
            operator: offer.operator.clone(),
            reason: reason.to_string(),
        };
        let url = match RelayUrl::parse(&offer.relay_url) {
            Ok(u)
                if self
                    .relay_hosts
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(&u.host)) =>
            {
                u
            }
            Ok(u) => {
                tracing::warn!(target: "audit", event = "tunnel_refused", reason = "relay_not_a_broker", relay = %u.url(), "tunnel offer names a relay that is not one of this agent's brokers; not dialled");
                on_event(refused("relay_not_a_broker"));
                return;
            }
            Err(e) => {
                tracing::warn!(target: "audit", event = "tunnel_refused", reason = "bad_offer", error = %e, "tunnel offer with a bad relay URL ignored");
                on_event(refused("bad_offer"));
                return;
            }
        };
        let decision = match self.config.target(&offer.service) {
            None => Err(RefuseReason::ServiceNotAllowed),
            Some(_) if self.active.load(Ordering::SeqCst) >= self.config.max_sessions => {
                Err(RefuseReason::TooManySessions)
            }
            Some(t) => Ok(t),
        };
        let timeout = Duration::from_secs(self.config.connect_timeout_secs);
        let target = match decision {
            Err(reason) => {
                let code = match reason {
                    RefuseReason::ServiceNotAllowed => "service_not_allowed",
                    RefuseReason::TooManySessions => "too_many_sessions",
                };
                tracing::warn!(target: "audit", event = "tunnel_refused", session = %offer.session, service = %offer.service, operator = %offer.operator, reason = code, "tunnel offer refused");
                on_event(refused(code));
                let req = Request::Refuse {
                    session: offer.session.clone(),
                    token: offer.token.clone(),
                    reason,
                };
                if let Err(e) = ws::connect(&url, tls, &req, timeout).await {
                    tracing::warn!(error = %e, "could not tell the relay the offer is refused");
                }
                return;
            }
            Ok(t) => t,
        };
        self.active.fetch_add(1, Ordering::SeqCst);
        let _active = ActiveGuard(&self.active);
        let req = Request::Accept {
            session: offer.session.clone(),
            token: offer.token.clone(),
        };
        // The session (joining, then carrying the streams) runs on a thread of its own.
        let (joined_tx, joined_rx) = oneshot::channel::<Result<(), NotJoined>>();
        let (mut done_tx, done_rx) = oneshot::channel::<(&'static str, u64, Arc<Activity>)>();
        let config = self.config.clone();
        spawn_session_thread(async move {
            let (ws, reply) = match ws::connect(&url, tls, &req, timeout).await {
                Ok(v) => v,
                Err(e) => {
                    let _ = joined_tx.send(Err(NotJoined::Unreachable(e)));
                    return;
                }
            };
            if !reply.ok {
                let _ = joined_tx.send(Err(NotJoined::Refused {
                    code: reply.code.map(|c| c.as_str()).unwrap_or("refused"),
                    error: reply.error.unwrap_or_default(),
                }));
                return;
            }
            if joined_tx.send(Ok(())).is_err() {
                return; // The agent no longer waits for this session.
            }
            let activity = Arc::new(Activity::default());
            let (reason, streams) = tokio::select! {
                r = run_session(&config, WsBytes::new(ws, activity.clone()), target, &activity) => r,
                _ = done_tx.closed() => return,
            };
            let _ = done_tx.send((reason, streams, activity));
        }.instrument(tracing::Span::current()));
        match joined_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(NotJoined::Unreachable(error))) => {
                tracing::warn!(target: "audit", event = "tunnel_refused", session = %offer.session, reason = "relay_unreachable", error = %error, "could not join the tunnel session");
                on_event(refused("relay_unreachable"));
                return;
            }
            Ok(Err(NotJoined::Refused { code, error })) => {
                tracing::warn!(target: "audit", event = "tunnel_refused", session = %offer.session, reason = code, error = %error, "the relay refused the device");
                on_event(refused(code));
                return;
            }
            Err(_) => {
                tracing::error!(target: "audit", event = "tunnel_refused", session = %offer.session, reason = "local_error", "could not start a thread for the tunnel session");
                on_event(refused("local_error"));
                return;
            }
        }
        tracing::info!(target: "audit", event = "tunnel_open", session = %offer.session, service = %offer.service, operator = %offer.operator, "tunnel session open");
        on_event(DeviceEvent::Open {
            session: offer.session.clone(),
            service: offer.service.clone(),
            operator: offer.operator.clone(),
        });
        let started = Instant::now();
        let (reason, streams, activity) =
            done_rx
                .await
                .unwrap_or(("session thread failed", 0, Arc::new(Activity::default())));
        let ev = DeviceEvent::Close {
            session: offer.session.clone(),
            service: offer.service.clone(),
            operator: offer.operator.clone(),
            duration_secs: started.elapsed().as_secs_f64(),
            bytes_in: activity.bytes_in(),
            bytes_out: activity.bytes_out(),
            streams,
            reason: reason.to_string(),
        };
        tracing::info!(target: "audit", event = "tunnel_close", session = %offer.session, service = %offer.service, operator = %offer.operator,
            duration_secs = started.elapsed().as_secs_f64(), bytes_in = activity.bytes_in(), bytes_out = activity.bytes_out(), streams, reason, "tunnel session closed");
        on_event(ev);
    }
}

/// Why a device did not join a session.
enum NotJoined {
    /// No connection to the relay (the error).
    Unreachable(String),
    /// The relay refused: its code and message.
    Refused { code: &'static str, error: String },
}

/// Runs a tunnel session on a thread of its own, with a single-threaded runtime: every
/// message through the tunnel wakes this one thread, where on the agent's pool a worker
/// woke another worker and went to sleep for each of them (a futex round trip per message
/// each way), and a busy tunnel cannot slow the agent's telemetry. One thread per session
/// (`tunnel.max_sessions`). If the thread cannot start, `session` is dropped (its
/// channels say so).
fn spawn_session_thread<F>(session: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a runtime for the tunnel session");
            return;
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("tunnel-session".into())
        .spawn(move || rt.block_on(session))
    {
        tracing::error!(error = %e, "cannot start a thread for the tunnel session");
    }
}

/// Serves streams until the session ends; returns why, and how many streams it carried.
async fn run_session<S>(
    config: &DeviceTunnelConfig,
    io: S,
    target: ServiceTarget,
    activity: &Activity,
) -> (&'static str, u64)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let streams = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let max_streams = config.max_streams_per_session;
    let connect_timeout = Duration::from_secs(config.connect_timeout_secs);
    let mut tasks = tokio::task::JoinSet::new();
    let serve = {
        let streams = streams.clone();
        let total = total.clone();
        mux::serve(io, mux::yamux_config(max_streams), move |s| {
            total.fetch_add(1, Ordering::Relaxed);
            if streams.load(Ordering::SeqCst) >= max_streams {
                drop(s); // reset
                return;
            }
            streams.fetch_add(1, Ordering::SeqCst);
            let streams = streams.clone();
            let target = target.clone();
            tasks.spawn(async move {
                if let Err(e) = connect_stream(s, &target, connect_timeout).await {
                    tracing::debug!(error = %e, "tunnel stream ended with an error");
                }
                streams.fetch_sub(1, Ordering::SeqCst);
            });
        })
    };
    activity.touch();
    let reason = tokio::select! {
        r = serve => match r { Ok(()) => "closed", Err(_) => "connection lost" },
        _ = activity.idle_for(Duration::from_secs(config.idle_timeout_secs)) => "idle timeout",
        _ = tokio::time::sleep(Duration::from_secs(config.max_session_secs)) => "maximum session lifetime",
    };
    (reason, total.load(Ordering::Relaxed))
}

struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Connects one tunnel stream to the local service and copies both ways, with half-close.
async fn connect_stream(
    mut s: MuxStream,
    target: &ServiceTarget,
    timeout: Duration,
) -> std::io::Result<()> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
    match target {
        ServiceTarget::Tcp(a) => {
            let mut c = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(a))
                .await
                .map_err(|_| timed_out())??;
            let _ = c.set_nodelay(true);
            mux::copy_both_ways(&mut s, &mut c).await.map(|_| ())
        }
        ServiceTarget::Unix(p) => {
            let mut c = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(p))
                .await
                .map_err(|_| timed_out())??;
            mux::copy_both_ways(&mut s, &mut c).await.map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            ServiceTarget::parse("127.0.0.1:22").unwrap(),
            ServiceTarget::Tcp("127.0.0.1:22".parse().unwrap())
        );
        assert_eq!(
            ServiceTarget::parse("localhost:80").unwrap(),
            ServiceTarget::Tcp("127.0.0.1:80".parse().unwrap())
        );
        assert!(ServiceTarget::parse("[::1]:8080").is_ok());
        assert_eq!(
            ServiceTarget::parse("unix:/run/x.sock").unwrap(),
            ServiceTarget::Unix("/run/x.sock".into())
        );
        assert!(ServiceTarget::parse("10.0.0.5:22")
            .unwrap_err()
            .contains("only loopback"));
        assert!(ServiceTarget::parse("0.0.0.0:22").is_err());
        assert!(ServiceTarget::parse("unix:rel.sock").is_err());
        assert!(ServiceTarget::parse("plc.local:22").is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = DeviceTunnelConfig::default();
        c.services.insert("ssh".into(), "127.0.0.1:22".into());
        assert!(c.validate().is_ok());
        c.services.insert("plc".into(), "192.168.1.10:502".into());
        assert_eq!(c.validate().unwrap_err().0, "tunnel.services.plc");
        let c = DeviceTunnelConfig {
            max_sessions: 0,
            ..DeviceTunnelConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "tunnel.max_sessions");
    }
}
