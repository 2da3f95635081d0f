//! TLS material for listeners: rustls server configuration (TLS 1.2 and 1.3 only, the
//! ring provider's safe cipher suites), client-certificate verification against a CA
//! file and its CRL, the identity taken from a verified client certificate, and
//! [`TlsMaterial`], which rebuilds the configuration when its files change.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::config::{CertificateField, ClientCertificates, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Material { path: String, message: String },
    #[error("TLS configuration rejected: {0}")]
    Rustls(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.display().to_string(),
        source,
    })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read(path)?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
    let certs = certs.map_err(|e| TlsSetupError::Material {
        path: path.display().to_string(),
        message: format!("not a valid PEM certificate file: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Material {
            path: path.display().to_string(),
            message: "contains no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsSetupError::Material {
            path: path.display().to_string(),
            message: format!("not a valid PEM key file: {e}"),
        })?
        .ok_or_else(|| TlsSetupError::Material {
            path: path.display().to_string(),
            message: "contains no private key (PKCS#8, PKCS#1 or SEC1 PEM expected)".into(),
        })
}

/// Reads the CRLs in a PEM file (one or more `X509 CRL` blocks).
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsSetupError> {
    let pem = read(path)?;
    let crls: Result<Vec<_>, _> = rustls_pemfile::crls(&mut pem.as_slice()).collect();
    let crls = crls.map_err(|e| TlsSetupError::Material {
        path: path.display().to_string(),
        message: format!("not a valid PEM CRL file: {e}"),
    })?;
    if crls.is_empty() {
        return Err(TlsSetupError::Material {
            path: path.display().to_string(),
            message: "contains no CRL (expected -----BEGIN X509 CRL-----); `bulwark-pki init` writes an empty one".into(),
        });
    }
    for c in &crls {
        if let Err(e) = x509_parser::parse_x509_crl(c.as_ref()) {
            return Err(TlsSetupError::Material {
                path: path.display().to_string(),
                message: format!("unreadable CRL: {e}"),
            });
        }
    }
    Ok(crls)
}

/// A revoked certificate: issuer (raw DER name) and serial (big-endian bytes).
pub type RevokedKey = (Vec<u8>, Vec<u8>);

/// Every (issuer, serial) a CRL file revokes.
pub fn revoked_set(crls: &[CertificateRevocationListDer<'_>]) -> HashSet<RevokedKey> {
    let mut out = HashSet::new();
    for c in crls {
        if let Ok((_, crl)) = x509_parser::parse_x509_crl(c.as_ref()) {
            let issuer = crl.issuer().as_raw().to_vec();
            for r in crl.iter_revoked_certificates() {
                out.insert((issuer.clone(), strip_zeros(r.raw_serial())));
            }
        }
    }
    out
}

fn strip_zeros(b: &[u8]) -> Vec<u8> {
    let i = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    b[i..].to_vec()
}

/// What the broker keeps of a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The identity from the configured field; `None` if the field is absent or empty.
    pub identity: Option<String>,
    pub revocation_key: RevokedKey,
}

impl ClientCertificate {
    pub fn from_der(
        cert: &CertificateDer<'_>,
        field: CertificateField,
    ) -> Option<ClientCertificate> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let identity = match field {
            CertificateField::Cn => parsed
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_string),
            CertificateField::SanDns | CertificateField::SanUri => parsed
                .subject_alternative_name()
                .ok()
                .flatten()
                .and_then(|san| {
                    san.value
                        .general_names
                        .iter()
                        .find_map(|n| match (field, n) {
                            (
                                CertificateField::SanDns,
                                x509_parser::extensions::GeneralName::DNSName(d),
                            ) => Some(d.to_string()),
                            (
                                CertificateField::SanUri,
                                x509_parser::extensions::GeneralName::URI(u),
                            ) => Some(u.to_string()),
                            _ => None,
                        })
                }),
        }
        .filter(|s| !s.is_empty());
        Some(ClientCertificate {
            identity,
            revocation_key: (
                parsed.issuer().as_raw().to_vec(),
                strip_zeros(parsed.raw_serial()),
            ),
        })
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls server configuration of one listener.
pub fn server_config(tls: &TlsConfig, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let certs = load_certs(&tls.cert_file)?;
    let key = load_key(&tls.key_file)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    let builder = match (tls.client_certificates, &tls.client_ca_file) {
        (ClientCertificates::None, _) | (_, None) => builder.with_no_client_auth(),
        (mode, Some(ca_file)) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca_file)? {
                roots.add(c).map_err(|e| TlsSetupError::Material {
                    path: ca_file.display().to_string(),
                    message: format!("unusable CA certificate: {e}"),
                })?;
            }
            let mut vb = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if let Some(crl_file) = &tls.crl_file {
                vb = vb
                    .with_crls(load_crls(crl_file)?)
                    .only_check_end_entity_revocation();
            }
            let vb = if mode == ClientCertificates::Optional {
                vb.allow_unauthenticated()
            } else {
                vb
            };
            let verifier = vb
                .build()
                .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsSetupError::Material {
            path: tls.key_file.display().to_string(),
            message: format!(
                "key does not fit the certificate in {}: {e}",
                tls.cert_file.display()
            ),
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A listener's TLS configuration, rebuilt when its files change (or on SIGHUP). A
/// rebuild that fails keeps the last good configuration; connections in progress are
/// never touched by a reload.
pub struct TlsMaterial {
    pub config: TlsConfig,
    acceptor: RwLock<tokio_rustls::TlsAcceptor>,
    revoked: RwLock<Arc<HashSet<RevokedKey>>>,
    watch: crate::reload::FileWatch,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert_file", &self.config.cert_file)
            .finish()
    }
}

/// Outcome of [`TlsMaterial::reload_if_changed`].
#[derive(Debug)]
pub enum Reload {
    Unchanged,
    Reloaded,
    Failed(TlsSetupError),
}

impl TlsMaterial {
    pub fn new(config: &TlsConfig) -> Result<TlsMaterial, TlsSetupError> {
        let watch = crate::reload::FileWatch::new(Self::files(config));
        let (acceptor, revoked) = Self::build(config)?;
        Ok(TlsMaterial {
            config: config.clone(),
            acceptor: RwLock::new(acceptor),
            revoked: RwLock::new(Arc::new(revoked)),
            watch,
        })
    }

    fn files(config: &TlsConfig) -> Vec<&Path> {
        let mut v = vec![config.cert_file.as_path(), config.key_file.as_path()];
        v.extend(config.client_ca_file.as_deref());
        v.extend(config.crl_file.as_deref());
        v
    }

    fn build(
        config: &TlsConfig,
    ) -> Result<(tokio_rustls::TlsAcceptor, HashSet<RevokedKey>), TlsSetupError> {
        let server = server_config(config, &[])?;
        let revoked = match &config.crl_file {
            Some(p) => revoked_set(&load_crls(p)?),
            None => HashSet::new(),
        };
        Ok((tokio_rustls::TlsAcceptor::from(server), revoked))
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The certificates the current CRL revokes.
    pub fn revoked(&self) -> Arc<HashSet<RevokedKey>> {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuilds if any file changed since the last (attempted) build, or if `force`.
    pub fn reload_if_changed(&self, force: bool) -> Reload {
        if !self.watch.changed(force) {
            return Reload::Unchanged;
        }
        match Self::build(&self.config) {
            Ok((acceptor, revoked)) => {
                *self.acceptor.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
                *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(revoked);
                Reload::Reloaded
            }
            Err(e) => Reload::Failed(e),
        }
    }
}
