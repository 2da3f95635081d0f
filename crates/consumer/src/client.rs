//! The MQTT side: mutual TLS, a persistent session, manual acknowledgements, reconnection
//! with back-off, and error messages that say what to fix.

use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, Incoming, MqttOptions, Outgoing,
    Publish, QoS, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};

use crate::dedup::Dedup;
use crate::record::{Outcome, Processor};

/// Exit code for bad usage or configuration (unreadable certificate, bad URL, unwritable
/// output file).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// Keepalive of the MQTT connection.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Seconds for TCP, TLS and CONNACK together.
const CONNECT_TIMEOUT_SECS: u64 = 10;
/// Reconnect back-off: doubles from the minimum up to the maximum, with jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Largest message accepted (the broker's default maximum).
const MAX_PACKET: usize = 1024 * 1024;

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerUrl {
    /// `mqtts://HOST[:PORT]` (port 8883 by default).
    Mqtts { host: String, port: u16 },
    /// `wss://HOST[:PORT][/PATH]` (port 443 and path `/mqtt` by default).
    Wss {
        host: String,
        port: u16,
        url: String,
    },
}

impl BrokerUrl {
    pub fn parse(s: &str) -> Result<BrokerUrl, String> {
        let bad = |why: &str| {
            format!("--broker {s:?}: {why}; expected mqtts://HOST:PORT, e.g. mqtts://localhost:8883 (or wss://HOST:PORT/mqtt)")
        };
        let (wss, rest) = if let Some(rest) = s.strip_prefix("mqtts://") {
            (false, rest)
        } else if let Some(rest) = s.strip_prefix("wss://") {
            (true, rest)
        } else if s.starts_with("mqtt://") || s.starts_with("tcp://") || s.starts_with("ws://") {
            return Err(bad("plain (unencrypted) connections are not supported"));
        } else {
            return Err(bad("unknown scheme"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if !wss && !path.is_empty() && path != "/" {
            return Err(bad("an mqtts URL has no path"));
        }
        if authority.starts_with('[') {
            return Err(bad(
                "IPv6 literals are not supported; use a host name such as localhost",
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
            ),
            None => (authority, if wss { 443 } else { 8883 }),
        };
        if host.is_empty() || host.contains(['@', '?', '#', ' ']) {
            return Err(bad("missing or invalid host"));
        }
        Ok(if wss {
            let path = if path.is_empty() { "/mqtt" } else { path };
            BrokerUrl::Wss {
                host: host.to_string(),
                port,
                url: format!("wss://{host}:{port}{path}"),
            }
        } else {
            BrokerUrl::Mqtts {
                host: host.to_string(),
                port,
            }
        })
    }

    fn host_port(&self) -> String {
        match self {
            BrokerUrl::Mqtts { host, port } | BrokerUrl::Wss { host, port, .. } => {
                format!("{host}:{port}")
            }
        }
    }

    fn host(&self) -> &str {
        match self {
            BrokerUrl::Mqtts { host, .. } | BrokerUrl::Wss { host, .. } => host,
        }
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerUrl::Mqtts { host, port } => write!(f, "mqtts://{host}:{port}"),
            BrokerUrl::Wss { url, .. } => f.write_str(url),
        }
    }
}

/// Everything the consumer needs (the command line, checked).
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    pub broker: BrokerUrl,
    pub ca_file: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_id: String,
    pub topics: Vec<String>,
    pub out: Option<PathBuf>,
    pub quiet: bool,
    /// A fresh session the broker forgets at disconnect (default: persistent).
    pub clean_session: bool,
}

/// Why the consumer stopped without being asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// Bad usage or configuration: exit 64.
    Config(String),
    /// Anything else: exit 1.
    Failure(String),
}

impl RunError {
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) => EXIT_BAD_CONFIG,
            RunError::Failure(_) => 1,
        }
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Config(m) | RunError::Failure(m) => f.write_str(m),
        }
    }
}

/// Builds the rustls client configuration (ring provider, TLS 1.3 and 1.2, the CA file as
/// the only roots, the client certificate). The files are read on every call, so a renewed
/// certificate is picked up at the next reconnect.
pub fn tls_config(o: &ConsumerOptions) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let ca = &o.ca_file;
    let pem = std::fs::read(ca).map_err(|e| format!("--ca-file {}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("--ca-file {}: not a PEM certificate: {e}", ca.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("--ca-file {}: unusable CA certificate: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "--ca-file {}: contains no certificate (expected the PEM CA certificate, e.g. certs/dev/ca.pem)",
            ca.display()
        ));
    }
    let cert_pem =
        std::fs::read(&o.cert).map_err(|e| format!("--cert {}: {e}", o.cert.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--cert {}: not a PEM certificate: {e}", o.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--cert {}: contains no certificate",
            o.cert.display()
        ));
    }
    let key_pem = std::fs::read(&o.key).map_err(|e| format!("--key {}: {e}", o.key.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("--key {}: not a PEM private key: {e}", o.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| {
            format!(
                "--key {} does not go with --cert {}: {e}",
                o.key.display(),
                o.cert.display()
            )
        })?;
    Ok(Arc::new(config))
}

fn transport(o: &ConsumerOptions, tls: Arc<rustls::ClientConfig>) -> Transport {
    let tls = TlsConfiguration::Rustls(tls);
    match o.broker {
        BrokerUrl::Mqtts { .. } => Transport::tls_with_config(tls),
        BrokerUrl::Wss { .. } => Transport::wss_with_config(tls),
    }
}

fn mqtt_options(o: &ConsumerOptions, tls: Arc<rustls::ClientConfig>) -> MqttOptions {
    let mut m = match &o.broker {
        BrokerUrl::Mqtts { host, port } => MqttOptions::new(o.client_id.clone(), host, *port),
        BrokerUrl::Wss { url, port, .. } => MqttOptions::new(o.client_id.clone(), url, *port),
    };
    m.set_transport(transport(o, tls));
    m.set_keep_alive(KEEPALIVE);
    // A persistent session (unless asked otherwise): the broker keeps the subscriptions and
    // queues QoS 1 messages while this consumer is away, so nothing is missed across its
    // reconnects.
    m.set_clean_session(o.clean_session);
    // PUBACK only after the record is in the output file.
    m.set_manual_acks(true);
    m.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    m.set_request_channel_capacity(4096);
    m
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn jitter(d: Duration) -> Duration {
    // Between 50 % and 100 % of `d`; the clock's nanoseconds are random enough here.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    d / 2 + d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// The rustls error inside a connection error, if there is one (rumqttc wraps it in I/O,
/// MQTT state or WebSocket errors, depending on when the handshake or its alert failed).
fn rustls_error(e: &ConnectionError) -> Option<&rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // io::Error's source() skips the error it wraps: look at it directly.
        if let Some(tls) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        current = err.source();
    }
    None
}

/// A connection error in words that say what to fix.
pub fn explain(e: &ConnectionError, o: &ConsumerOptions) -> String {
    use rustls::{AlertDescription as A, CertificateError as C};
    let at = o.broker.host_port();
    let host = o.broker.host();
    let ca = o.ca_file.display();
    let cert = o.cert.display();
    if let Some(tls) = rustls_error(e) {
        return match tls {
            rustls::Error::InvalidCertificate(C::NotValidForName)
            | rustls::Error::InvalidCertificate(C::NotValidForNameContext { .. }) => format!(
                "TLS: the broker's certificate does not name {host:?}: connect with a name it \
                 has (bulwark-pki show), or issue the broker a certificate for it \
                 (bulwark-pki init --server-name {host})"
            ),
            rustls::Error::InvalidCertificate(C::UnknownIssuer)
            | rustls::Error::InvalidCertificate(C::BadSignature) => format!(
                "TLS: the broker's certificate is not signed by --ca-file {ca}: pass the CA \
                 that signed it"
            ),
            rustls::Error::InvalidCertificate(C::Expired)
            | rustls::Error::InvalidCertificate(C::ExpiredContext { .. }) => {
                "TLS: the broker's certificate has expired (or this computer's clock is wrong)"
                    .to_string()
            }
            rustls::Error::InvalidCertificate(other) => format!(
                "TLS: the broker's certificate at {at} was not accepted ({other:?}); check \
                 --ca-file {ca}"
            ),
            rustls::Error::AlertReceived(A::CertificateRevoked) => format!(
                "TLS: the broker refused --cert {cert}: it has been revoked; get a new client \
                 certificate (bulwark-pki issue-client NAME)"
            ),
            rustls::Error::AlertReceived(A::CertificateExpired) => {
                format!("TLS: the broker refused --cert {cert}: it has expired; get a new one")
            }
            rustls::Error::AlertReceived(
                A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::DecryptError,
            ) => format!(
                "TLS: the broker refused --cert {cert}: it is not signed by a CA the broker \
                 trusts (its client_ca_file)"
            ),
            rustls::Error::AlertReceived(A::CertificateRequired | A::HandshakeFailure) => {
                format!(
                    "TLS: the broker refused the handshake: it wants a client certificate it \
                     accepts; check --cert {cert} and --key"
                )
            }
            other => format!("TLS with {at} failed: {other}"),
        };
    }
    match e {
        ConnectionError::Io(io) | ConnectionError::Tls(rumqttc::TlsError::Io(io))
            if io.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            format!(
                "nothing accepts connections at {at} (connection refused): is the broker \
                 running, and is --broker {} right?",
                o.broker
            )
        }
        ConnectionError::NetworkTimeout => format!(
            "no answer from {at} within {CONNECT_TIMEOUT_SECS} s: is it the right address, or \
             does a firewall drop the packets?"
        ),
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadClientId => format!(
                "the broker refused the connection ({code:?}): the identity of --cert {cert} \
                 may not use client id {:?} (the ACL needs `clientid {}` or `clientid *` under \
                 its `user` line), or the id belongs to another identity's session; see the \
                 broker's audit log",
                o.client_id, o.client_id
            ),
            ConnectReturnCode::BadUserNamePassword => format!(
                "the broker did not accept --cert {cert} as an identity (bad credentials): \
                 check the listener's identity setting"
            ),
            ConnectReturnCode::ServiceUnavailable => {
                "the broker is busy (server unavailable); trying again".to_string()
            }
            other => format!("the broker refused the connection: {other:?}"),
        },
        ConnectionError::Io(io) => format!("connection to {at}: {io}"),
        other => format!("connection to {at}: {other}"),
    }
}

/// Opens the output file for appending, after learning what it already holds.
fn open_out(o: &ConsumerOptions, processor: &mut Processor) -> Result<(), RunError> {
    let Some(path) = &o.out else {
        return Ok(());
    };
    let config = |e: std::io::Error| RunError::Config(format!("--out {}: {e}", path.display()));
    let mut partial = false;
    match std::fs::File::open(path) {
        Ok(f) => {
            let report = processor.seed(BufReader::new(f)).map_err(config)?;
            partial = report.partial_last_line;
            tracing::info!(
                file = %path.display(),
                records = report.records,
                "output file exists: records already in it will not be written again"
            );
            if report.bad_lines > 0 {
                tracing::warn!(
                    file = %path.display(),
                    lines = report.bad_lines,
                    "lines of the output file are not records; ignored"
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(config(e)),
    }
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .map_err(config)?
    };
    if partial {
        // A line cut by a crash: end it so the next record starts on its own line.
        file.write_all(b"\n").map_err(config)?;
    }
    *processor = Processor::new(processor.dedup().clone(), Some(Box::new(file)));
    Ok(())
}

fn print(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (`| head`) must not stop the consumer.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs until `shutdown` resolves (then disconnects cleanly and returns `Ok`), or until a
/// failure that retrying cannot fix.
pub async fn run(
    o: ConsumerOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let tls = tls_config(&o).map_err(RunError::Config)?;
    let mut processor = Processor::new(Dedup::default(), None);
    open_out(&o, &mut processor)?;

    let (client, mut eventloop) = AsyncClient::new(mqtt_options(&o, tls), 4096);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_connection_timeout(CONNECT_TIMEOUT_SECS);
    eventloop.set_network_options(net);

    tokio::pin!(shutdown);
    let mut backoff = BACKOFF_MIN;
    let mut pending_acks: std::collections::VecDeque<Publish> = Default::default();
    let mut last_error: Option<String> = None;
    let result = loop {
        let event = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                backoff = BACKOFF_MIN;
                last_error = None;
                tracing::info!(
                    broker = %o.broker,
                    client_id = %o.client_id,
                    session_resumed = ack.session_present,
                    "connected"
                );
                let filters = o
                    .topics
                    .iter()
                    .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(filters) {
                    break Err(RunError::Failure(format!("cannot subscribe: {e}")));
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                let mut refused = Vec::new();
                for (topic, code) in o.topics.iter().zip(&ack.return_codes) {
                    match code {
                        SubscribeReasonCode::Success(_) => {
                            tracing::info!(topic = %topic, "subscribed")
                        }
                        SubscribeReasonCode::Failure => refused.push(topic.as_str()),
                    }
                }
                if !refused.is_empty() {
                    let msg = format!(
                        "the broker refused the subscription to {}: the ACL must grant the \
                         identity of --cert {} `topic read FILTER` for it (bulwark-broker acl \
                         check --acl FILE --user NAME TOPIC read)",
                        refused.join(", "),
                        o.cert.display()
                    );
                    if refused.len() == o.topics.len() {
                        break Err(RunError::Failure(msg));
                    }
                    tracing::error!("{msg}");
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                let outcome = match processor.handle(&p.topic, &p.payload, p.retain, now_ms()) {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        let path = o.out.as_ref().map(|p| p.display().to_string());
                        break Err(RunError::Failure(format!(
                            "cannot write to --out {}: {e}",
                            path.unwrap_or_default()
                        )));
                    }
                };
                match outcome {
                    Outcome::Written { line }
                    | Outcome::Audit { line }
                    | Outcome::Other { line } => {
                        if !o.quiet {
                            print(&line);
                        }
                    }
                    Outcome::Duplicate { device, seq } => {
                        tracing::debug!(%device, seq, "duplicate dropped")
                    }
                    Outcome::Rejected { reason } => {
                        tracing::warn!(topic = %p.topic, "message dropped: {reason}")
                    }
                }
                if p.qos != QoS::AtMostOnce {
                    pending_acks.push_back(p);
                }
            }
            Ok(_) => {}
            Err(e) => {
                pending_acks.clear(); // the broker sends them again on the resumed session
                let msg = explain(&e, &o);
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!("{msg} (retrying in {:.1} s)", backoff.as_secs_f64());
                } else {
                    tracing::debug!("{msg} (retrying in {:.1} s)", backoff.as_secs_f64());
                }
                last_error = Some(msg);
                // Certificates may have been renewed meanwhile.
                match tls_config(&o) {
                    Ok(tls) => {
                        eventloop.mqtt_options.set_transport(transport(&o, tls));
                    }
                    Err(e) => tracing::warn!("{e}; keeping the TLS material read earlier"),
                }
                let wait = jitter(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                tokio::select! {
                    _ = &mut shutdown => break Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        while let Some(p) = pending_acks.front() {
            if client.try_ack(p).is_err() {
                break; // the request channel is full; the event loop drains it
            }
            pending_acks.pop_front();
        }
    };

    if result.is_ok() {
        // A clean DISCONNECT: the broker keeps the session (and queues for it).
        if client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
    }
    let s = processor.stats();
    tracing::info!(
        written = s.written,
        duplicates = s.duplicates,
        audit = s.audit,
        other = s.other,
        rejected = s.rejected,
        "stopped"
    );
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            BrokerUrl::parse("mqtts://localhost:8883").unwrap(),
            BrokerUrl::Mqtts {
                host: "localhost".into(),
                port: 8883
            }
        );
        assert_eq!(
            BrokerUrl::parse("mqtts://broker.example").unwrap(),
            BrokerUrl::Mqtts {
                host: "broker.example".into(),
                port: 8883
            }
        );
        assert_eq!(
            BrokerUrl::parse("wss://broker.example")
                .unwrap()
                .to_string(),
            "wss://broker.example:443/mqtt"
        );
        assert_eq!(
            BrokerUrl::parse("wss://localhost:8443/mqtt")
                .unwrap()
                .to_string(),
            "wss://localhost:8443/mqtt"
        );
        for bad in [
            "mqtt://localhost:1883",
            "ws://localhost",
            "localhost:8883",
            "mqtts://:8883",
            "mqtts://localhost:0",
            "mqtts://localhost:x",
            "mqtts://localhost:8883/x",
            "mqtts://[::1]:8883",
            "mqtts://user@host",
        ] {
            let e = BrokerUrl::parse(bad).unwrap_err();
            assert!(e.contains("expected mqtts://HOST:PORT"), "{bad}: {e}");
        }
    }

    fn options(dir: &std::path::Path) -> ConsumerOptions {
        ConsumerOptions {
            broker: BrokerUrl::parse("mqtts://localhost:8883").unwrap(),
            ca_file: dir.join("ca.pem"),
            cert: dir.join("c.pem"),
            key: dir.join("c.key"),
            client_id: "bulwark-consumer".into(),
            topics: vec!["devices/+/data/#".into()],
            out: None,
            quiet: true,
            clean_session: false,
        }
    }

    #[test]
    fn missing_tls_material_names_the_option() {
        let dir = tempfile::tempdir().unwrap();
        let o = options(dir.path());
        let e = tls_config(&o).unwrap_err();
        assert!(e.starts_with("--ca-file "), "{e}");
        std::fs::write(&o.ca_file, "not pem").unwrap();
        let e = tls_config(&o).unwrap_err();
        assert!(e.contains("contains no certificate"), "{e}");
    }

    #[test]
    fn errors_say_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let o = options(dir.path());
        let refused = ConnectionError::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert!(explain(&refused, &o).contains("is the broker running"));
        let not_auth = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
        assert!(explain(&not_auth, &o).contains("clientid bulwark-consumer"));
        let name = ConnectionError::Tls(rumqttc::TlsError::TLS(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        )));
        assert!(explain(&name, &o).contains("--server-name localhost"));
        let revoked = ConnectionError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked),
        ));
        assert!(explain(&revoked, &o).contains("revoked"));
        let nested = ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(rustls::AlertDescription::DecryptError),
            )),
        ));
        assert!(
            explain(&nested, &o).contains("not signed by a CA the broker trusts"),
            "{}",
            explain(&nested, &o)
        );
    }

    #[test]
    fn backoff_jitter_stays_in_range() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(j >= Duration::from_secs(1) && j <= Duration::from_secs(2));
        }
    }
}
