//! TLS material for listeners: rustls server configuration (TLS 1.2 and 1.3 only, the
//! ring provider's safe cipher suites), client-certificate verification against a CA
//! file, and the identity taken from a verified client certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ClientCertificates, TlsConfig};

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
            let vb = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
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

/// The identity of a verified client certificate: its subject common name.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    if cn.is_empty() {
        None
    } else {
        Some(cn)
    }
}
