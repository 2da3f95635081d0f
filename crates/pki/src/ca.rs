//! The certificate authority: root creation, leaf issuance and CRLs.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::IpAddr;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};

/// How far back `not_before` is set for new certificates, to tolerate clock skew.
pub const BACKDATE: Duration = Duration::hours(1);
/// Lifetime of server and client certificates (the CA/Browser Forum's old 825-day limit).
pub const LEAF_VALIDITY: Duration = Duration::days(825);
/// Lifetime of a root CA created by [`CertificateAuthority::new_root`].
pub const CA_VALIDITY: Duration = Duration::days(3652);
/// Time between a CRL's `thisUpdate` and `nextUpdate`.
pub const CRL_VALIDITY: Duration = Duration::days(30);

/// A freshly issued certificate together with its private key.
///
/// The key is a PKCS#8 ECDSA P-256 key (`-----BEGIN PRIVATE KEY-----`).
#[derive(Clone, PartialEq, Eq)]
pub struct CertifiedKey {
    /// The certificate, PEM encoded.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM encoded.
    pub key_pem: String,
    /// The certificate, DER encoded.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER encoded.
    pub key_der: Vec<u8>,
    /// The certificate's serial number (63 random bits, never zero).
    pub serial: u64,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("serial", &self.serial)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish_non_exhaustive()
    }
}

/// What a leaf certificate may be used for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Usage {
    /// TLS server authentication (`id-kp-serverAuth`): the broker.
    Server,
    /// TLS client authentication (`id-kp-clientAuth`): devices, operators, applications.
    Client,
}

/// Everything that goes into a leaf certificate apart from the key and serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    /// Subject common name.
    pub common_name: String,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP address subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// URI subject alternative names (for example `urn:bulwark:device:press-7`).
    pub uris: Vec<String>,
    /// Server or client authentication.
    pub usage: Usage,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl CertSpec {
    fn new(cn: &str, usage: Usage) -> CertSpec {
        let now = OffsetDateTime::now_utc();
        CertSpec {
            common_name: cn.to_owned(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            uris: Vec::new(),
            usage,
            not_before: now - BACKDATE,
            not_after: now + LEAF_VALIDITY,
        }
    }

    /// A server (broker) certificate. Each of `names` becomes an IP address SAN if it parses
    /// as an IPv4/IPv6 address, a DNS name SAN otherwise. Valid from one hour ago for 825 days.
    pub fn server(cn: &str, names: &[&str]) -> CertSpec {
        names
            .iter()
            .fold(CertSpec::new(cn, Usage::Server), |spec, name| {
                spec.with_name(name)
            })
    }

    /// A client certificate (client authentication EKU, no SANs). Valid from one hour ago for
    /// 825 days.
    pub fn client(cn: &str) -> CertSpec {
        CertSpec::new(cn, Usage::Client)
    }

    /// Replaces the validity period.
    pub fn valid_between(mut self, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Adds a URI SAN.
    pub fn with_uri(mut self, uri: &str) -> Self {
        self.uris.push(uri.to_owned());
        self
    }

    /// Adds a DNS name SAN.
    pub fn with_dns_name(mut self, name: &str) -> Self {
        self.dns_names.push(name.to_owned());
        self
    }

    /// Adds an IP address SAN.
    pub fn with_ip_address(mut self, ip: IpAddr) -> Self {
        self.ip_addresses.push(ip);
        self
    }

    /// Adds an IP address SAN if `name` parses as an IP address, a DNS name SAN otherwise.
    pub fn with_name(self, name: &str) -> Self {
        match name.parse::<IpAddr>() {
            Ok(ip) => self.with_ip_address(ip),
            Err(_) => self.with_dns_name(name),
        }
    }

    fn check(&self) -> Result<()> {
        ensure!(
            !self.common_name.trim().is_empty(),
            "the certificate needs a non-empty common name"
        );
        ensure!(
            self.not_before < self.not_after,
            "certificate for {:?}: not_before ({}) must be earlier than not_after ({})",
            self.common_name,
            self.not_before,
            self.not_after
        );
        if self.usage == Usage::Server {
            ensure!(
                !self.dns_names.is_empty() || !self.ip_addresses.is_empty(),
                "server certificate {:?} needs at least one DNS name or IP address \
                 (TLS clients check these, not the common name)",
                self.common_name
            );
        }
        Ok(())
    }

    fn subject_alt_names(&self) -> Result<Vec<SanType>> {
        let mut sans = Vec::new();
        for name in &self.dns_names {
            let ia5 = Ia5String::try_from(name.as_str())
                .map_err(|e| anyhow!("DNS name {name:?} is not valid ASCII: {e}"))?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(self.ip_addresses.iter().copied().map(SanType::IpAddress));
        for uri in &self.uris {
            let ia5 = Ia5String::try_from(uri.as_str())
                .map_err(|e| anyhow!("URI {uri:?} is not valid ASCII: {e}"))?;
            sans.push(SanType::URI(ia5));
        }
        Ok(sans)
    }
}

/// A certificate authority that can issue leaf certificates and CRLs.
///
/// Keys are ECDSA P-256, signatures ECDSA with SHA-256.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
    key_identifier: Vec<u8>,
    common_name: String,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("common_name", &self.common_name)
            .field("key", &"[elided]")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a self-signed root CA: ECDSA P-256, valid from one hour ago for 10 years,
    /// basic constraints `CA:TRUE` (critical), key usage `keyCertSign` and `cRLSign`.
    pub fn new_root(common_name: &str) -> Result<Self> {
        ensure!(
            !common_name.trim().is_empty(),
            "the CA needs a non-empty common name"
        );
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating the CA key")?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(SerialNumber::from(random_serial()?));
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.key_identifier_method = KeyIdMethod::Sha256;

        let cert = params
            .self_signed(&key)
            .context("self-signing the CA certificate")?;
        let key_identifier = params.key_identifier(&key);
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_identifier,
            common_name: common_name.to_owned(),
        })
    }

    /// Loads an existing CA from its PEM certificate and PEM (PKCS#8) private key.
    ///
    /// Fails if the certificate is not a CA certificate or the key does not belong to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| anyhow!("the CA private key is not a usable PEM private key: {e}"))?;
        let cert_der = pem_certificate_der(cert_pem).context("reading the CA certificate")?;
        let (_, cert) = X509Certificate::from_der(&cert_der)
            .map_err(|e| anyhow!("the CA certificate is not valid X.509: {e}"))?;

        ensure!(
            cert.is_ca(),
            "the certificate {:?} is not a CA certificate (basic constraints CA:TRUE missing)",
            common_name_of(&cert)
        );
        ensure!(
            cert.public_key().raw == key.subject_public_key_info().as_slice(),
            "the CA private key does not belong to the CA certificate {:?}",
            common_name_of(&cert)
        );
        let key_identifier = cert
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
            .unwrap_or_else(|| CertificateParams::default().key_identifier(&key));
        let common_name = common_name_of(&cert);

        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
            .map_err(|e| anyhow!("cannot use the CA certificate for signing: {e}"))?;
        Ok(CertificateAuthority {
            issuer,
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key_identifier,
            common_name,
        })
    }

    /// The CA certificate, PEM encoded.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate, DER encoded.
    pub fn cert_der(&self) -> Vec<u8> {
        self.cert_der.clone()
    }

    /// The CA private key, PKCS#8 PEM encoded.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA's common name.
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// The CA's subject key identifier (equal to the authority key identifier of what it issues).
    pub fn key_identifier(&self) -> &[u8] {
        &self.key_identifier
    }

    /// Issues a leaf certificate for a fresh ECDSA P-256 key.
    ///
    /// The certificate gets a random non-zero 63-bit serial, `CA:FALSE`, key usage
    /// `digitalSignature`, the EKU matching [`CertSpec::usage`], subject and authority key
    /// identifiers, and the SANs of `spec`.
    pub fn issue(&self, spec: &CertSpec) -> Result<CertifiedKey> {
        spec.check()?;
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a P-256 key")?;
        let serial = random_serial()?;

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.as_str());
        params.subject_alt_names = spec.subject_alt_names()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match spec.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from(serial));
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;

        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate for {:?}", spec.common_name))?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            serial,
        })
    }

    /// Issues a server certificate; see [`CertSpec::server`].
    pub fn issue_server(&self, cn: &str, names: &[&str]) -> Result<CertifiedKey> {
        self.issue(&CertSpec::server(cn, names))
    }

    /// Issues a client certificate; see [`CertSpec::client`].
    pub fn issue_client(&self, cn: &str) -> Result<CertifiedKey> {
        self.issue(&CertSpec::client(cn))
    }

    /// A CRL signed by this CA listing `revoked_serials` (all with revocation date now),
    /// `thisUpdate` now and `nextUpdate` 30 days from now.
    pub fn crl_pem(&self, revoked_serials: &[u64], crl_number: u64) -> Result<String> {
        let now = OffsetDateTime::now_utc();
        let revoked: Vec<(u64, OffsetDateTime)> = revoked_serials
            .iter()
            .map(|&serial| (serial, now))
            .collect();
        self.crl_pem_with_dates(&revoked, crl_number, now)
    }

    /// Like [`crl_pem`](Self::crl_pem) with an explicit revocation date per serial and an
    /// explicit `thisUpdate` (`nextUpdate` is `this_update` + 30 days).
    pub fn crl_pem_with_dates(
        &self,
        revoked: &[(u64, OffsetDateTime)],
        crl_number: u64,
        this_update: OffsetDateTime,
    ) -> Result<String> {
        let params = CertificateRevocationListParams {
            this_update,
            next_update: this_update + CRL_VALIDITY,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&(serial, when)| RevokedCertParams {
                    serial_number: SerialNumber::from(serial),
                    revocation_time: when,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::PreSpecified(self.key_identifier.clone()),
        };
        let crl = params.signed_by(&self.issuer).context("signing the CRL")?;
        crl.pem().context("encoding the CRL as PEM")
    }
}

/// 63 random bits from the operating system's CSPRNG, never zero.
///
/// Serial numbers must be unpredictable and positive; 63 bits keep them positive and
/// representable as `u64`/`i64` everywhere.
fn random_serial() -> Result<u64> {
    let mut urandom = File::open("/dev/urandom").context("opening /dev/urandom")?;
    loop {
        let mut buf = [0u8; 8];
        urandom
            .read_exact(&mut buf)
            .context("reading /dev/urandom")?;
        let serial = u64::from_be_bytes(buf) >> 1;
        if serial != 0 {
            return Ok(serial);
        }
    }
}

/// The DER bytes of the first `CERTIFICATE` block in `pem`.
pub(crate) fn pem_certificate_der(pem: &str) -> Result<Vec<u8>> {
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| anyhow!("invalid PEM: {e}"))?;
        if block.label == "CERTIFICATE" {
            return Ok(block.contents);
        }
    }
    bail!("no `-----BEGIN CERTIFICATE-----` block found")
}

/// The first common name of the certificate's subject, or an empty string.
pub(crate) fn common_name_of(cert: &X509Certificate<'_>) -> String {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Converts a DER INTEGER's content bytes (big-endian, positive) to `u64`.
pub(crate) fn serial_from_bytes(raw: &[u8]) -> Result<u64> {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    let digits = &raw[start..];
    ensure!(
        digits.len() <= 8,
        "serial number {} does not fit in 64 bits (not issued by bulwark-pki?)",
        hex(raw)
    );
    Ok(digits
        .iter()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_bytes_round_trip() {
        assert_eq!(serial_from_bytes(&[0x00, 0x80, 0x01]).unwrap(), 0x8001);
        assert_eq!(
            serial_from_bytes(&u64::MAX.to_be_bytes()).unwrap(),
            u64::MAX
        );
        assert_eq!(serial_from_bytes(&[]).unwrap(), 0);
        assert!(serial_from_bytes(&[1; 9]).is_err());
    }

    #[test]
    fn random_serials_are_positive_63_bit_and_distinct() {
        let serials: std::collections::HashSet<u64> =
            (0..64).map(|_| random_serial().unwrap()).collect();
        assert_eq!(serials.len(), 64);
        assert!(serials.iter().all(|&s| s != 0 && s <= i64::MAX as u64));
    }

    #[test]
    fn server_spec_splits_ip_and_dns_names() {
        let spec = CertSpec::server("broker", &["localhost", "127.0.0.1", "::1", "broker"]);
        assert_eq!(spec.dns_names, ["localhost", "broker"]);
        assert_eq!(
            spec.ip_addresses,
            [
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(spec.usage, Usage::Server);
        let lifetime = spec.not_after - spec.not_before;
        assert_eq!(lifetime, LEAF_VALIDITY + BACKDATE);
    }
}
