//! The operator side, used by the `bulwark-tunnel` command: open a session, forward a
//! local port or stdin/stdout through it, list sessions.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::mux::{self, MuxClient};
use crate::proto::{ErrorCode, Reply, Request, SessionInfo};
use crate::ws::{self, Activity, RelayUrl, WsBytes};

/// How the operator reaches the relay and who it is.
#[derive(Clone)]
pub struct OperatorConfig {
    pub relay: RelayUrl,
    pub tls: Arc<rustls::ClientConfig>,
    /// Without a client certificate: the username and password.
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    /// Streams this side opens at once at most (the relay and the device have their own
    /// limits too).
    pub max_streams: usize,
}

impl std::fmt::Debug for OperatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorConfig")
            .field("relay", &self.relay)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Why a tunnel could not be used; `Display` says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorError {
    /// The relay's code, when the relay refused.
    pub code: Option<ErrorCode>,
    pub message: String,
}

impl std::fmt::Display for OperatorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(f, "{} ({})", self.message, c.as_str()),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for OperatorError {}

fn local(message: impl Into<String>) -> OperatorError {
    OperatorError {
        code: None,
        message: message.into(),
    }
}

fn refused(reply: Reply) -> OperatorError {
    OperatorError {
        code: reply.code,
        message: reply
            .error
            .unwrap_or_else(|| "the relay refused without a reason".into()),
    }
}

/// Client TLS: trust `ca_file` (and the system roots if asked), present `cert` if given.
pub fn client_tls(
    ca_file: Option<&Path>,
    system_roots: bool,
    cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("{}: not a PEM certificate file: {e}", ca.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("{}: unusable CA certificate: {e}", ca.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("{}: contains no certificate", ca.display()));
        }
    }
    if system_roots {
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
    }
    if roots.is_empty() {
        return Err("no CA to check the broker's certificate: give --ca-file (or ca_file in the config), or use_system_roots".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: not a PEM certificate file: {e}", cert.display()))?;
            let kpem = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
            let k = PrivateKeyDer::from_pem_slice(&kpem)
                .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, k)
                .map_err(|e| format!("{}: {e}", key.display()))?
        }
    };
    Ok(Arc::new(config))
}

/// An open tunnel session: open streams with [`OpenSession::client`]; the session ends
/// when this is dropped or the relay closes it.
#[derive(Debug)]
pub struct OpenSession {
    pub session: String,
    pub client: MuxClient,
    pub activity: Arc<Activity>,
    driver: tokio::task::JoinHandle<Result<(), String>>,
}

impl OpenSession {
    /// Waits for the session to end (closed by the relay or the device); returns why.
    pub async fn closed(&mut self) -> String {
        match (&mut self.driver).await {
            Ok(Ok(())) => "the tunnel session was closed".into(),
            Ok(Err(e)) => format!("the tunnel session broke: {e}"),
            Err(e) => format!("the tunnel session task failed: {e}"),
        }
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Asks the relay for a session to `service` on `device` and waits until the device joined.
pub async fn open(
    cfg: &OperatorConfig,
    device: &str,
    service: &str,
) -> Result<OpenSession, OperatorError> {
    let req = Request::Open {
        device: device.to_string(),
        service: service.to_string(),
        username: cfg.username.clone(),
        password: cfg.password.clone(),
    };
    let (ws, reply) = ws::connect(&cfg.relay, cfg.tls.clone(), &req, cfg.connect_timeout)
        .await
        .map_err(local)?;
    if !reply.ok {
        return Err(refused(reply));
    }
    let session = reply.session.unwrap_or_default();
    let activity = Arc::new(Activity::default());
    let (client, driver) = mux::client(
        WsBytes::new(ws, activity.clone()),
        mux::yamux_config(cfg.max_streams),
    );
    Ok(OpenSession {
        session,
        client,
        activity,
        driver: tokio::spawn(driver),
    })
}

/// Lists the sessions the operator may see.
pub async fn list(cfg: &OperatorConfig) -> Result<Vec<SessionInfo>, OperatorError> {
    let req = Request::List {
        username: cfg.username.clone(),
        password: cfg.password.clone(),
    };
    let (mut ws, reply) = ws::connect(&cfg.relay, cfg.tls.clone(), &req, cfg.connect_timeout)
        .await
        .map_err(local)?;
    let _ = ws.close().await;
    if !reply.ok {
        return Err(refused(reply));
    }
    Ok(reply.sessions.unwrap_or_default())
}

/// Forwards every connection accepted on `listener` through its own stream of `session`,
/// until the session ends. Returns why it ended.
pub async fn forward(mut session: OpenSession, listener: TcpListener) -> String {
    let client = session.client.clone();
    let accept = async {
        loop {
            let (mut tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let client = client.clone();
            tokio::spawn(async move {
                match client.open().await {
                    Ok(mut s) => {
                        tracing::debug!(%peer, "stream open");
                        let r = mux::copy_both_ways(&mut tcp, &mut s).await;
                        tracing::debug!(%peer, result = ?r, "stream closed");
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "cannot open a stream"),
                }
            });
        }
    };
    tokio::select! {
        // The accept loop never ends by itself.
        _ = accept => String::new(),
        why = session.closed() => why,
    }
}

/// Carries stdin/stdout through one stream (for `ssh -o ProxyCommand=...`). Returns when
/// either side is done.
pub async fn stdio(mut session: OpenSession) -> Result<(), OperatorError> {
    let mut s = session.client.open().await.map_err(local)?;
    let mut io = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    tokio::select! {
        r = mux::copy_both_ways(&mut io, &mut s) => r.map(|_| ()).map_err(|e| local(e.to_string())),
        why = session.closed() => Err(local(why)),
    }
}
