//! Connecting to the broker under test: the loopback-only [`Target`], TLS with a client
//! certificate, and [`Conn`], one MQTT client connection with its read and write buffers.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bulwark_protocol::codec::{encode, DecodeLimits};
use bulwark_protocol::packet::{Connect, ConnectReturnCode, Packet, ProtocolLevel};
use bytes::{Bytes, BytesMut};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::wire::{next_incoming, Incoming};
use crate::UsageError;

/// Keep alive sent in every CONNECT, in seconds.
pub const KEEP_ALIVE_S: u16 = 60;

/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;

/// Checks that `host` names the local machine: `localhost`, an address in 127.0.0.0/8 or
/// `::1`. The generator must never be pointed at another machine.
pub fn check_loopback(host: &str) -> Result<(), UsageError> {
    let refuse = || {
        UsageError(format!(
            "--host {host:?}: only loopback targets are allowed (127.0.0.0/8, ::1 or \
             \"localhost\"); bulwark-bench loads a broker on this machine and must not be \
             pointed at another one"
        ))
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.eq_ignore_ascii_case("localhost") || bare.eq_ignore_ascii_case("localhost.") {
        return Ok(());
    }
    match bare.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => Ok(()),
        _ => Err(refuse()),
    }
}

/// TLS settings from the command line.
#[derive(Debug, Clone)]
pub struct TlsOptions<'a> {
    pub ca: Option<&'a Path>,
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub server_name: &'a str,
}

/// Where and how every client of a run connects.
pub struct Target {
    addrs: Vec<SocketAddr>,
    /// Index into `addrs` of the address that accepted last.
    preferred: AtomicUsize,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    username: Option<String>,
    password: Option<Bytes>,
    limits: DecodeLimits,
}

impl Target {
    /// Resolves `host` (which must be loopback) and loads the TLS material if `tls` is set.
    pub async fn new(
        host: &str,
        port: u16,
        tls: Option<TlsOptions<'_>>,
        username: Option<String>,
        password: Option<String>,
    ) -> Result<Target> {
        check_loopback(host)?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .with_context(|| format!("--host {host}: cannot resolve"))?
                .collect(),
        };
        if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
            return Err(UsageError(format!(
                "--host {host}: resolves to {addrs:?}, which is not only loopback addresses"
            ))
            .into());
        }
        let tls = match tls {
            Some(opts) => Some(tls_connector(&opts)?),
            None => None,
        };
        Ok(Target {
            addrs,
            preferred: AtomicUsize::new(0),
            tls,
            username,
            password: password.map(Bytes::from),
            limits: DecodeLimits {
                max_packet_size: 16 * 1024 * 1024,
            },
        })
    }

    /// "tcp" or "tls".
    pub fn transport(&self) -> &'static str {
        if self.tls.is_some() {
            "tls"
        } else {
            "tcp"
        }
    }

    /// TCP connect (+ TLS handshake), no MQTT yet.
    pub async fn dial(&self) -> Result<Conn> {
        let tcp = self.tcp_connect().await?;
        tcp.set_nodelay(true).context("setting TCP_NODELAY")?;
        let (reader, writer): (BoxRead, BoxWrite) = match &self.tls {
            None => {
                let (r, w) = tcp.into_split();
                (Box::new(r), Box::new(w))
            }
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .context("TLS handshake")?;
                let (r, w) = tokio::io::split(stream);
                (Box::new(r), Box::new(w))
            }
        };
        Ok(Conn {
            reader,
            writer,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(READ_CHUNK),
            limits: self.limits,
        })
    }

    /// [`Target::dial`], then CONNECT (clean session) and wait for an accepting CONNACK.
    pub async fn connect(&self, client_id: String) -> Result<Conn> {
        let mut conn = self.dial().await?;
        let connect = Packet::Connect(Connect {
            protocol: ProtocolLevel::V311,
            clean_session: true,
            keep_alive: KEEP_ALIVE_S,
            client_id,
            will: None,
            username: self.username.clone(),
            password: self.password.clone(),
        });
        encode(&connect, &mut conn.wbuf).map_err(|e| anyhow!("encoding CONNECT: {e}"))?;
        conn.send().await?;
        match conn.recv().await? {
            Incoming::Other(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Accepted => {
                Ok(conn)
            }
            Incoming::Other(Packet::ConnAck(ack)) => {
                bail!("broker refused CONNECT: {:?}", ack.code)
            }
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    async fn tcp_connect(&self) -> Result<TcpStream> {
        let first = self.preferred.load(Ordering::Relaxed);
        let mut last_err = None;
        for k in 0..self.addrs.len() {
            let i = (first + k) % self.addrs.len();
            match TcpStream::connect(self.addrs[i]).await {
                Ok(s) => {
                    if i != first {
                        self.preferred.store(i, Ordering::Relaxed);
                    }
                    return Ok(s);
                }
                Err(e) => last_err = Some((self.addrs[i], e)),
            }
        }
        let (addr, e) = last_err.expect("at least one address");
        Err(anyhow!("connecting to {addr}: {e}"))
    }
}

fn tls_connector(opts: &TlsOptions<'_>) -> Result<(TlsConnector, ServerName<'static>)> {
    let Some(ca) = opts.ca else {
        return Err(UsageError(
            "--tls needs --ca FILE (the PEM CA certificate that signed the broker's certificate)"
                .into(),
        )
        .into());
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca, "--ca")? {
        roots
            .add(cert)
            .with_context(|| format!("--ca {}: unusable CA certificate", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let mut config = match (opts.cert, opts.key) {
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert, "--cert")?;
            let key = read_key(key)?;
            builder.with_client_auth_cert(certs, key).with_context(|| {
                format!(
                    "--key {} does not go with --cert {}",
                    opts.key
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    cert.display()
                )
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(UsageError("--cert and --key must be given together".into()).into());
        }
    };
    // Every connection pays for a full handshake (certificate chain and client
    // certificate verification), as a fleet of devices reconnecting would.
    config.resumption = rustls::client::Resumption::disabled();
    let name = ServerName::try_from(opts.server_name.to_string()).map_err(|e| {
        UsageError(format!(
            "--server-name {:?}: not a DNS name or IP address: {e}",
            opts.server_name
        ))
    })?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

fn read_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).map_err(|e| UsageError(format!("{flag} {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UsageError(format!("{flag} {}: not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(UsageError(format!(
            "{flag} {}: contains no PEM certificate",
            path.display()
        ))
        .into());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).map_err(|e| UsageError(format!("--key {}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| UsageError(format!("--key {}: not PEM: {e}", path.display())))?
        .ok_or_else(|| {
            UsageError(format!(
                "--key {}: contains no PEM private key",
                path.display()
            ))
            .into()
        })
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// One MQTT client connection. Outgoing packets are appended to `wbuf` and written
/// together by [`Conn::send`]; incoming bytes accumulate in `rbuf`.
pub struct Conn {
    reader: BoxRead,
    writer: BoxWrite,
    rbuf: BytesMut,
    pub wbuf: BytesMut,
    limits: DecodeLimits,
}

impl Conn {
    /// Writes everything in `wbuf` with one `write_all` and clears it.
    pub async fn send(&mut self) -> Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.writer
            .write_all(&self.wbuf)
            .await
            .context("writing to the broker")?;
        self.writer.flush().await.context("writing to the broker")?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads whatever the socket has into `rbuf`. Cancel-safe: usable in `select!`.
    /// Errors when the broker has closed the connection.
    pub async fn fill(&mut self) -> Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        let n = self
            .reader
            .read_buf(&mut self.rbuf)
            .await
            .context("reading from the broker")?;
        if n == 0 {
            bail!("the broker closed the connection");
        }
        Ok(())
    }

    /// The next complete packet already in `rbuf`, if any.
    pub fn next(&mut self) -> Result<Option<Incoming>> {
        next_incoming(&mut self.rbuf, &self.limits)
    }

    /// The next packet, reading as needed.
    pub async fn recv(&mut self) -> Result<Incoming> {
        loop {
            if let Some(packet) = self.next()? {
                return Ok(packet);
            }
            self.fill().await?;
        }
    }

    /// Appends `packet` to `wbuf`.
    pub fn queue(&mut self, packet: &Packet) -> Result<()> {
        encode(packet, &mut self.wbuf).map_err(|e| anyhow!("encoding {}: {e}", packet.name()))
    }

    /// Sends DISCONNECT and closes our side. Errors are ignored: the run is over.
    pub async fn disconnect(mut self) {
        let _ = self.queue(&Packet::Disconnect);
        let _ = self.send().await;
        let _ = self.writer.shutdown().await;
    }

    /// Sends DISCONNECT, then waits (up to `grace`) for the broker to close the
    /// connection, so that the TIME_WAIT state lands on the broker's side and repeated
    /// connections do not exhaust local ports.
    pub async fn disconnect_and_wait(mut self, grace: std::time::Duration) {
        let _ = self.queue(&Packet::Disconnect);
        if self.send().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(grace, async {
            let mut sink = [0u8; 256];
            loop {
                match self.reader.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        let _ = self.writer.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_accepted() {
        for host in [
            "127.0.0.1",
            "127.1.2.3",
            "127.255.255.254",
            "::1",
            "[::1]",
            "localhost",
            "LocalHost",
        ] {
            assert!(check_loopback(host).is_ok(), "{host}");
        }
    }

    #[test]
    fn other_hosts_are_refused_naming_the_flag() {
        for host in [
            "10.0.0.1",
            "0.0.0.0",
            "192.168.1.10",
            "128.0.0.1",
            "::",
            "::ffff:10.0.0.1",
            "example.com",
            "localhost.example.com",
            "",
        ] {
            let err = check_loopback(host).expect_err(host);
            assert!(err.0.contains("--host"), "{err}");
        }
    }
}
