//! Broker figures, in one place: [`Figures`] is the snapshot that both the `$SYS/broker/...`
//! topics ([`crate::sys`]) and the Prometheus endpoint render, and this module serves the
//! latter when `[metrics] enabled = true`.
//!
//! The endpoint is a deliberately small HTTP/1.1 server: one request per connection
//! (`Connection: close`), a request head of at most 8 KiB that must arrive within 5 s,
//! at most 8 connections at once (more are closed at accept), `GET /metrics` only. It
//! binds loopback by default; a network-reachable address needs `allow_on_network = true`,
//! and it never shares a port with a listener, 8883 or 443.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::ListenerConfig;
use crate::connection::Shared;
use crate::router::{Metrics, Router, RouterStats};

/// The one path served.
pub const PATH: &str = "/metrics";
/// The Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Default address: loopback only.
pub const DEFAULT_BIND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9184);
/// The broker's public ports (MQTT over TLS, WebSocket over TLS): never the metrics port.
pub const PUBLIC_PORTS: [u16; 2] = [8883, 443];
/// Scrapes served at once; further connections are closed at accept.
pub const MAX_CONNECTIONS: usize = 8;
/// Largest request head (request line and headers) read.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Time a scraper has to send its request head, and again to take the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// `[metrics]` in the broker configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` (Prometheus text format). Off by default.
    pub enabled: bool,
    /// Address and port of the endpoint; loopback unless `allow_on_network` is set.
    pub bind: SocketAddr,
    /// Explicit opt-out: serve metrics on a network-reachable address (a warning is
    /// logged at every start).
    pub allow_on_network: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            bind: DEFAULT_BIND,
            allow_on_network: false,
        }
    }
}

impl MetricsConfig {
    /// Checks the endpoint against the listeners: `Err((key, message))`.
    pub fn validate(&self, listeners: &[ListenerConfig]) -> Result<(), (String, String)> {
        if !self.enabled {
            return Ok(());
        }
        let key = || "metrics.bind".to_string();
        let port = self.bind.port();
        if PUBLIC_PORTS.contains(&port) {
            return Err((
                key(),
                format!(
                    "port {port} is one of the public ports (8883 MQTT/TLS, 443 WebSocket/TLS); metrics must never share the public ports: bind another port, e.g. \"{DEFAULT_BIND}\""
                ),
            ));
        }
        if port != 0 {
            if let Some((i, l)) = listeners
                .iter()
                .enumerate()
                .find(|(_, l)| l.bind.port() == port)
            {
                return Err((
                    key(),
                    format!(
                        "port {port} is the port of listener[{i}] ({}); metrics must never share a listener's port: bind another port, e.g. \"{DEFAULT_BIND}\"",
                        l.display_name()
                    ),
                ));
            }
        }
        if !self.bind.ip().is_loopback() && !self.allow_on_network {
            return Err((
                key(),
                format!(
                    "metrics on the network-reachable address {} are refused; bind a loopback address (default \"{DEFAULT_BIND}\"), or set allow_on_network = true to opt out",
                    self.bind
                ),
            ));
        }
        Ok(())
    }
}

/// Every broker figure at one moment: the single source of `$SYS/broker/...` and of the
/// Prometheus endpoint.
#[derive(Debug, Clone)]
pub struct Figures {
    pub uptime_secs: u64,
    pub clients_connected: u64,
    pub connections_total: u64,
    pub connections_refused: u64,
    pub messages_received: u64,
    pub messages_sent: u64,
    pub messages_dropped: u64,
    pub messages_denied: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub protocol_errors: u64,
    pub router: RouterStats,
    /// Audit events by kind, for every kind seen since start.
    pub audit: Vec<(String, u64)>,
    /// Tunnel sessions waiting or open; `None` without a relay.
    pub tunnel_sessions: Option<usize>,
    /// Idle connections waiting in the parking lot, without a task.
    pub connections_parked: u64,
}

impl Figures {
    /// The router's counters and state, and the process-wide audit counts.
    pub fn collect(router: &Router) -> Figures {
        let m = &router.metrics;
        Figures {
            uptime_secs: router.started.elapsed().as_secs(),
            clients_connected: Metrics::get(&m.clients_connected),
            connections_total: Metrics::get(&m.connections_total),
            connections_refused: Metrics::get(&m.connections_refused),
            messages_received: Metrics::get(&m.messages_received),
            messages_sent: Metrics::get(&m.messages_sent),
            messages_dropped: Metrics::get(&m.messages_dropped),
            messages_denied: Metrics::get(&m.deliveries_denied),
            bytes_received: Metrics::get(&m.bytes_received),
            bytes_sent: Metrics::get(&m.bytes_sent),
            protocol_errors: Metrics::get(&m.protocol_errors),
            router: router.stats(),
            audit: crate::audit::counts().snapshot(),
            tunnel_sessions: None,
            connections_parked: 0,
        }
    }

    /// [`Figures::collect`] plus what only the running broker knows (the tunnel relay).
    pub fn of(shared: &Shared) -> Figures {
        let mut f = Figures::collect(&shared.router);
        f.tunnel_sessions = shared.tunnel.get().map(|r| r.session_count());
        f.connections_parked = shared.parking.len() as u64;
        f
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

fn family(out: &mut String, name: &str, kind: Kind, help: &str) {
    let kind = match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
    };
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it (`\`, `"` and newline escaped).
fn label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// The figures in the Prometheus text exposition format (0.0.4).
pub fn render(f: &Figures) -> String {
    use Kind::{Counter, Gauge};
    let r = &f.router;
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "bulwark_build_info",
        Gauge,
        "The broker's version; always 1.",
    );
    let _ = writeln!(
        out,
        "bulwark_build_info{{version=\"{}\"}} 1",
        label_value(crate::VERSION)
    );
    let mut tunnel = Vec::new();
    if let Some(n) = f.tunnel_sessions {
        tunnel.push((
            "bulwark_tunnel_sessions",
            Gauge,
            "Tunnel relay sessions waiting for their device or open.",
            n as u64,
        ));
    }
    let plain: [(&str, Kind, &str, u64); 21] = [
        (
            "bulwark_uptime_seconds",
            Gauge,
            "Seconds since the broker started.",
            f.uptime_secs,
        ),
        (
            "bulwark_clients_connected",
            Gauge,
            "MQTT clients connected now.",
            f.clients_connected,
        ),
        (
            "bulwark_connections_parked",
            Gauge,
            "Connected clients idle long enough (limits.park_idle_after_ms) to wait without a task.",
            f.connections_parked,
        ),
        (
            "bulwark_connections_total",
            Counter,
            "MQTT connections accepted (CONNECT succeeded) since start.",
            f.connections_total,
        ),
        (
            "bulwark_connections_refused_total",
            Counter,
            "Connections refused at accept (ban, rate, connection limit) or at CONNECT.",
            f.connections_refused,
        ),
        (
            "bulwark_messages_received_total",
            Counter,
            "PUBLISH packets received from clients.",
            f.messages_received,
        ),
        (
            "bulwark_messages_sent_total",
            Counter,
            "PUBLISH packets sent to clients.",
            f.messages_sent,
        ),
        (
            "bulwark_messages_dropped_total",
            Counter,
            "Messages dropped because a session queue was full.",
            f.messages_dropped,
        ),
        (
            "bulwark_messages_denied_total",
            Counter,
            "Deliveries not made because the subscriber may not read the topic.",
            f.messages_denied,
        ),
        (
            "bulwark_bytes_received_total",
            Counter,
            "Bytes received from MQTT clients.",
            f.bytes_received,
        ),
        (
            "bulwark_bytes_sent_total",
            Counter,
            "Bytes sent to MQTT clients.",
            f.bytes_sent,
        ),
        (
            "bulwark_protocol_errors_total",
            Counter,
            "Connections closed for an MQTT protocol violation.",
            f.protocol_errors,
        ),
        (
            "bulwark_sessions",
            Gauge,
            "Sessions held (connected clients and persistent sessions of absent ones).",
            r.sessions as u64,
        ),
        (
            "bulwark_sessions_persistent",
            Gauge,
            "Persistent sessions (clean session 0), connected or not.",
            r.persistent_sessions as u64,
        ),
        (
            "bulwark_queued_messages",
            Gauge,
            "Messages queued or in flight, summed over every session.",
            r.queued_messages as u64,
        ),
        (
            "bulwark_queued_bytes",
            Gauge,
            "Payload bytes queued or in flight, summed over every session.",
            r.queued_bytes as u64,
        ),
        (
            "bulwark_queue_depth_max",
            Gauge,
            "Messages queued or in flight in the deepest session queue.",
            r.max_queue_depth as u64,
        ),
        (
            "bulwark_subscriptions",
            Gauge,
            "Subscriptions held, over every session.",
            r.subscriptions as u64,
        ),
        (
            "bulwark_retained_messages",
            Gauge,
            "Retained messages of clients (the $SYS figures are not counted).",
            r.retained as u64,
        ),
        (
            "bulwark_retained_bytes",
            Gauge,
            "Payload bytes of those retained messages.",
            r.retained_bytes as u64,
        ),
        (
            "bulwark_process_start_time_seconds",
            Gauge,
            "Start time of the broker, in Unix seconds.",
            crate::router::unix_now().saturating_sub(f.uptime_secs),
        ),
    ];
    for (name, kind, help, value) in plain.into_iter().chain(tunnel) {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        &mut out,
        "bulwark_audit_events_total",
        Counter,
        "Audit events by kind (the `event` field of the audit log), for every kind seen since start.",
    );
    for (event, n) in &f.audit {
        let _ = writeln!(
            out,
            "bulwark_audit_events_total{{event=\"{}\"}} {n}",
            label_value(event)
        );
    }
    out
}

/// Binds the endpoint (before anything is served, like the listeners).
pub async fn bind(config: &MetricsConfig) -> Result<(TcpListener, SocketAddr), crate::StartError> {
    let err = |source| crate::StartError::Bind {
        name: "metrics".to_string(),
        addr: config.bind,
        source,
    };
    let sock = TcpListener::bind(config.bind).await.map_err(err)?;
    let addr = sock.local_addr().map_err(err)?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics served on a network-reachable address (allow_on_network = true): anyone who reaches it can read the broker's figures");
    }
    tracing::info!(%addr, path = PATH, "serving metrics");
    Ok((sock, addr))
}

/// Serves scrapes until `shutdown` turns true.
pub async fn serve(sock: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = sock.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                tracing::error!(error = %e, backoff_ms = backoff.as_millis() as u64, "metrics: accept failed");
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: {MAX_CONNECTIONS} scrapes in progress; connection closed");
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        conns.spawn(async move {
            handle(stream, IO_TIMEOUT, || render(&Figures::of(&shared))).await;
            drop(permit);
        });
    }
    drop(sock);
    // Scrapes in progress are cut short: nothing waits for them.
    conns.shutdown().await;
}

/// Reads the request head: `Ok(None)` if it grows past [`MAX_HEAD_BYTES`].
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(from + end);
            return Ok((head.len() <= MAX_HEAD_BYTES).then_some(head));
        }
        if head.len() > MAX_HEAD_BYTES {
            return Ok(None);
        }
    }
}

/// One HTTP response, always with `Connection: close`.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    extra: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            extra: "",
            body: format!("{body}\n"),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{}\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
            self.extra
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// The answer to a request head; `body` renders the figures only when they are asked for.
fn respond(head: &[u8], body: impl FnOnce() -> String) -> Response {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).unwrap_or_default().trim_end();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "Bad Request", "bad request line");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Response::text(400, "Bad Request", "bad request line");
    }
    if method != "GET" {
        let mut r = Response::text(405, "Method Not Allowed", "only GET is served");
        r.extra = "Allow: GET\r\n";
        return r;
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != PATH {
        return Response::text(404, "Not Found", "not found; metrics are at /metrics");
    }
    Response {
        status: 200,
        reason: "OK",
        content_type: CONTENT_TYPE,
        extra: "",
        body: body(),
    }
}

/// Serves one connection: one request, one response, close.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    timeout: Duration,
    body: impl FnOnce() -> String,
) {
    let response = match tokio::time::timeout(timeout, read_head(&mut stream)).await {
        // Too slow, closed early or unreadable: nothing to answer.
        Err(_) | Ok(Err(_)) => return,
        Ok(Ok(None)) => Response::text(
            431,
            "Request Header Fields Too Large",
            "request head larger than 8 KiB",
        ),
        Ok(Ok(Some(head))) => respond(&head, body),
    };
    let bytes = response.to_bytes();
    let _ = tokio::time::timeout(timeout, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn figures() -> Figures {
        Figures {
            uptime_secs: 7,
            clients_connected: 2,
            connections_total: 5,
            connections_refused: 1,
            messages_received: 10,
            messages_sent: 20,
            messages_dropped: 0,
            messages_denied: 0,
            bytes_received: 300,
            bytes_sent: 600,
            protocol_errors: 0,
            router: RouterStats {
                sessions: 3,
                persistent_sessions: 1,
                queued_messages: 4,
                queued_bytes: 40,
                max_queue_depth: 4,
                subscriptions: 6,
                retained: 1,
                retained_bytes: 9,
            },
            audit: vec![("auth_failure".into(), 2), ("we\"ird\\".into(), 1)],
            tunnel_sessions: Some(1),
            connections_parked: 1,
        }
    }

    #[test]
    fn render_is_the_text_format_with_help_and_type() {
        let text = render(&figures());
        assert!(text.ends_with('\n'));
        for line in text.lines() {
            assert!(
                line.starts_with("# HELP bulwark_")
                    || line.starts_with("# TYPE bulwark_")
                    || line.starts_with("bulwark_"),
                "{line}"
            );
        }
        for want in [
            "# TYPE bulwark_connections_total counter",
            "bulwark_connections_total 5",
            "# TYPE bulwark_clients_connected gauge",
            "bulwark_clients_connected 2",
            "# TYPE bulwark_connections_parked gauge",
            "bulwark_connections_parked 1",
            "bulwark_bytes_received_total 300",
            "bulwark_queued_messages 4",
            "bulwark_sessions_persistent 1",
            "bulwark_tunnel_sessions 1",
            "# TYPE bulwark_audit_events_total counter",
            "bulwark_audit_events_total{event=\"auth_failure\"} 2",
            "bulwark_audit_events_total{event=\"we\\\"ird\\\\\"} 1",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want}:\n{text}");
        }
        // Every family is declared once, before its samples.
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let mut dedup = types.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(types.len(), dedup.len());
        let mut f = figures();
        f.tunnel_sessions = None;
        assert!(!render(&f).contains("bulwark_tunnel_sessions"));
    }

    #[test]
    fn routes() {
        let ok = respond(b"GET /metrics HTTP/1.1\r\nHost: x", || "m 1\n".into());
        assert_eq!(
            (ok.status, ok.content_type, ok.body.as_str()),
            (200, CONTENT_TYPE, "m 1\n")
        );
        assert_eq!(
            respond(b"GET /metrics?x=1 HTTP/1.0", String::new).status,
            200
        );
        let never =
            || -> String { panic!("figures rendered for a request that does not get them") };
        assert_eq!(respond(b"GET / HTTP/1.1", never).status, 404);
        assert_eq!(respond(b"GET /metricsx HTTP/1.1", never).status, 404);
        let post = respond(b"POST /metrics HTTP/1.1", never);
        assert_eq!(post.status, 405);
        assert!(String::from_utf8(post.to_bytes())
            .unwrap()
            .contains("Allow: GET\r\n"));
        assert_eq!(respond(b"HEAD /metrics HTTP/1.1", never).status, 405);
        assert_eq!(respond(b"GET /metrics", never).status, 400);
        assert_eq!(respond(b"GET /metrics SPDY/3", never).status, 400);
        assert_eq!(respond(b"\xff\xfe", never).status, 400);
    }

    async fn exchange(request: &[u8], timeout: Duration) -> String {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(handle(server, timeout, || "bulwark_x 1\n".to_string()));
        client.write_all(request).await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        task.await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn serves_one_request_and_closes() {
        let r = exchange(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", IO_TIMEOUT).await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Length: 12\r\n") && r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\nbulwark_x 1\n"), "{r}");
        let r = exchange(b"GET /other HTTP/1.1\r\n\r\n", IO_TIMEOUT).await;
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.extend(vec![b'a'; MAX_HEAD_BYTES + 10]);
        big.extend_from_slice(b"\r\n\r\n");
        let r = exchange(&big, IO_TIMEOUT).await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    }

    #[tokio::test]
    async fn a_slow_client_is_closed_without_an_answer() {
        let r = exchange(b"GET /metrics HTTP/1.1\r\n", Duration::from_millis(100)).await;
        assert_eq!(r, "");
    }

    const LISTENER: &str =
        "[[listener]]\nbind = \"127.0.0.1:1883\"\ntransport = \"tcp\"\nallow_anonymous = true\n";

    fn check(metrics: &str) -> Result<Config, String> {
        let c = Config::parse(
            &format!("{LISTENER}[metrics]\n{metrics}"),
            Path::new("t.toml"),
        )
        .map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn config_defaults_and_refusals() {
        let c = check("").unwrap();
        assert!(!c.metrics.enabled);
        assert_eq!(c.metrics.bind, DEFAULT_BIND);
        check("enabled = true\n").unwrap();
        // Disabled: the address is not checked.
        check("bind = \"0.0.0.0:1883\"\n").unwrap();
        let e = check("enabled = true\nbind = \"127.0.0.1:1883\"\n").unwrap_err();
        assert!(
            e.contains("metrics.bind") && e.contains("listener[0]"),
            "{e}"
        );
        for port in [8883, 443] {
            let e = check(&format!("enabled = true\nbind = \"127.0.0.1:{port}\"\n")).unwrap_err();
            assert!(
                e.contains("metrics.bind")
                    && e.contains("metrics must never share the public ports"),
                "{e}"
            );
        }
        let e = check("enabled = true\nbind = \"0.0.0.0:9184\"\n").unwrap_err();
        assert!(
            e.contains("metrics.bind") && e.contains("allow_on_network"),
            "{e}"
        );
        check("enabled = true\nbind = \"0.0.0.0:9184\"\nallow_on_network = true\n").unwrap();
        let e =
            check("enabled = true\nbind = \"0.0.0.0:443\"\nallow_on_network = true\n").unwrap_err();
        assert!(e.contains("public ports"), "{e}");
        let e = check("port = 1\n").unwrap_err();
        assert!(e.contains("unknown field `port`"), "{e}");
    }
}
