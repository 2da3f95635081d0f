//! The on-disk development PKI used by `make run` and `make certs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::ca::{common_name_of, pem_certificate_der, serial_from_bytes};
use crate::fsutil::{
    create_private_dir, mode_of, read_pki_file, replace, write_new, KEY_MODE, PUBLIC_MODE,
};
use crate::{CertificateAuthority, CertifiedKey};

/// Common name of the CA that [`DevPki::ensure`] creates.
pub const DEV_CA_COMMON_NAME: &str = "Bulwark Development CA";
/// Common name of the broker certificate that [`DevPki::ensure`] creates.
pub const DEV_SERVER_COMMON_NAME: &str = "bulwark-broker";
/// Server names [`DevPki::ensure`] is typically called with (the CLI's defaults).
pub const DEFAULT_SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1", "broker"];

/// The development PKI directory layout used by `make run` and `make certs`.
///
/// ```text
/// <dir>/ca.pem              root CA certificate (give this to clients and the broker)
/// <dir>/ca.key              root CA private key (0600)
/// <dir>/server.pem          broker certificate
/// <dir>/server.key          broker private key (0600)
/// <dir>/clients/<name>.pem  client certificate
/// <dir>/clients/<name>.key  client private key (0600)
/// <dir>/crl.pem             certificate revocation list signed by the CA
/// <dir>/revoked.txt         revoked serial numbers (decimal), one per line
/// ```
///
/// `<dir>` and `<dir>/clients` are created with mode 0700.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// The directory holding the files.
    pub dir: PathBuf,
}

/// What [`DevPki::ensure_with_report`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnsureReport {
    /// Files and directories that were created.
    pub created: Vec<PathBuf>,
    /// Files that already existed and were left untouched.
    pub found: Vec<PathBuf>,
    /// Problems with existing material that `ensure` did not fix (it never overwrites).
    pub warnings: Vec<String>,
}

/// Which certificate of the development PKI a [`CertInfo`] describes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CertRole {
    /// `ca.pem`
    Ca,
    /// `server.pem`
    Server,
    /// `clients/<name>.pem`
    Client(String),
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertRole::Ca => f.write_str("ca"),
            CertRole::Server => f.write_str("server"),
            CertRole::Client(name) => write!(f, "client {name}"),
        }
    }
}

/// A certificate file of the development PKI, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Which certificate this is.
    pub role: CertRole,
    /// The certificate file.
    pub path: PathBuf,
    /// Subject common name.
    pub common_name: String,
    /// Serial number.
    pub serial: u64,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// DNS name SANs.
    pub dns_names: Vec<String>,
    /// IP address SANs.
    pub ip_addresses: Vec<IpAddr>,
    /// URI SANs.
    pub uris: Vec<String>,
    /// Authority key identifier, if present.
    pub authority_key_id: Option<Vec<u8>>,
    /// Whether the serial is listed in `crl.pem` (what the broker enforces).
    pub revoked: bool,
}

impl CertInfo {
    /// Whether `now` lies outside the validity period.
    pub fn is_expired_at(&self, now: OffsetDateTime) -> bool {
        now > self.not_after
    }

    /// Whether the certificate covers `name` (an IP address or DNS name, case-insensitive).
    pub fn covers_name(&self, name: &str) -> bool {
        match name.parse::<IpAddr>() {
            Ok(ip) => self.ip_addresses.contains(&ip),
            Err(_) => self.dns_names.iter().any(|d| d.eq_ignore_ascii_case(name)),
        }
    }
}

/// The parsed `crl.pem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// The CRL number (incremented by every [`DevPki::revoke`]).
    pub crl_number: u64,
    /// When the CRL was signed.
    pub this_update: OffsetDateTime,
    /// When the CRL expires.
    pub next_update: Option<OffsetDateTime>,
    /// Revoked serials with their revocation dates, in CRL order.
    pub revoked: Vec<(u64, OffsetDateTime)>,
}

impl CrlInfo {
    /// Whether `serial` is listed.
    pub fn is_revoked(&self, serial: u64) -> bool {
        self.revoked.iter().any(|&(s, _)| s == serial)
    }
}

impl DevPki {
    /// Creates what is missing of the development PKI in `dir` and returns it.
    ///
    /// Existing material is never overwritten: an existing CA is loaded and used to issue the
    /// missing certificates. `server_names` (IP addresses or DNS names) go into a new
    /// `server.pem`; each of `clients` gets `clients/<name>.pem` and `.key` if missing.
    /// `crl.pem` starts as an empty CRL with CRL number 1 and `revoked.txt` as an empty file.
    pub fn ensure(dir: &Path, server_names: &[&str], clients: &[&str]) -> Result<DevPki> {
        Self::ensure_with_report(dir, server_names, clients).map(|(pki, _)| pki)
    }

    /// [`ensure`](Self::ensure), also telling what was created, what was found and what looks
    /// wrong with existing files.
    pub fn ensure_with_report(
        dir: &Path,
        server_names: &[&str],
        clients: &[&str],
    ) -> Result<(DevPki, EnsureReport)> {
        for name in clients {
            validate_client_name(name)?;
        }
        let pki = DevPki {
            dir: dir.to_path_buf(),
        };
        let mut report = EnsureReport::default();

        if create_private_dir(dir)? {
            report.created.push(dir.to_path_buf());
        } else if mode_of(dir).is_ok_and(|m| m & 0o077 != 0) {
            report.warnings.push(format!(
                "{} is accessible by other users; run `chmod 700 {}`",
                dir.display(),
                dir.display()
            ));
        }

        // The CA.
        let (ca_pem, ca_key) = (pki.ca_path(), pki.ca_key_path());
        let ca = if pki.pair_exists(&ca_pem, &ca_key)? {
            let ca = pki.load_ca()?;
            report.found.extend([ca_pem, ca_key.clone()]);
            check_key_mode(&ca_key, &mut report);
            ca
        } else {
            let ca = CertificateAuthority::new_root(DEV_CA_COMMON_NAME)?;
            write_new(&ca_key, ca.key_pem().as_bytes(), KEY_MODE)?;
            if let Err(e) = write_new(&ca_pem, ca.cert_pem().as_bytes(), PUBLIC_MODE) {
                let _ = fs::remove_file(&ca_key);
                return Err(e);
            }
            report.created.extend([ca_pem, ca_key]);
            ca
        };

        // The broker certificate.
        let (server_pem, server_key) = (pki.server_cert_path(), pki.server_key_path());
        if pki.pair_exists(&server_pem, &server_key)? {
            let info = pki.read_cert(&server_pem, CertRole::Server)?;
            pki.check_leaf(&info, &ca, &server_key, &mut report);
            let missing: Vec<&str> = server_names
                .iter()
                .copied()
                .filter(|n| !info.covers_name(n))
                .collect();
            if !missing.is_empty() {
                report.warnings.push(format!(
                    "{} does not cover {}; to reissue it, delete {} and {} and run \
                     `bulwark-pki init --dir {}` again",
                    server_pem.display(),
                    missing.join(", "),
                    server_pem.display(),
                    server_key.display(),
                    dir.display()
                ));
            }
            report.found.extend([server_pem, server_key]);
        } else {
            let issued = ca
                .issue_server(DEV_SERVER_COMMON_NAME, server_names)
                .context("issuing the broker certificate")?;
            write_pair(&server_pem, &server_key, &issued)?;
            report.created.extend([server_pem, server_key]);
        }

        // Client certificates.
        if create_private_dir(&pki.clients_dir())? {
            report.created.push(pki.clients_dir());
        }
        for name in clients {
            let (pem, key) = (pki.client_cert_path(name), pki.client_key_path(name));
            if pki.pair_exists(&pem, &key)? {
                let info = pki.read_cert(&pem, CertRole::Client((*name).to_owned()))?;
                pki.check_leaf(&info, &ca, &key, &mut report);
                report.found.extend([pem, key]);
            } else {
                let issued = ca
                    .issue_client(name)
                    .with_context(|| format!("issuing the client certificate {name:?}"))?;
                write_pair(&pem, &key, &issued)?;
                report.created.extend([pem, key]);
            }
        }

        // Revocation.
        let revoked_txt = pki.revoked_list_path();
        if revoked_txt.exists() {
            report.found.push(revoked_txt);
        } else {
            write_new(&revoked_txt, b"", PUBLIC_MODE)?;
            report.created.push(revoked_txt);
        }
        let crl = pki.crl_path();
        if crl.exists() {
            let info = pki.crl_info()?;
            if info
                .next_update
                .is_some_and(|t| t < OffsetDateTime::now_utc())
            {
                report.warnings.push(format!(
                    "{} expired on {}; TLS peers that check CRL freshness will reject it \
                     (`bulwark-pki revoke` re-signs it)",
                    crl.display(),
                    info.next_update.map(format_date).unwrap_or_default()
                ));
            }
            report.found.push(crl);
        } else {
            // Normally empty; after a deleted crl.pem this restores the revoked.txt entries.
            let serials = pki.revoked_serials()?;
            let pem = ca.crl_pem(&serials, 1)?;
            write_new(&crl, pem.as_bytes(), PUBLIC_MODE)?;
            report.created.push(crl);
        }

        Ok((pki, report))
    }

    /// Opens an existing development PKI directory (nothing is read yet).
    pub fn open(dir: &Path) -> Result<DevPki> {
        ensure!(
            dir.is_dir(),
            "{}: no such directory; run `bulwark-pki init --dir {}` first",
            dir.display(),
            dir.display()
        );
        Ok(DevPki {
            dir: dir.to_path_buf(),
        })
    }

    /// Loads the CA from `ca.pem` and `ca.key`.
    pub fn load_ca(&self) -> Result<CertificateAuthority> {
        let cert = read_pki_file(&self.ca_path(), &self.dir)?;
        let key = read_pki_file(&self.ca_key_path(), &self.dir)?;
        CertificateAuthority::from_pem(&cert, &key).with_context(|| {
            format!(
                "{} / {}: not a usable CA",
                self.ca_path().display(),
                self.ca_key_path().display()
            )
        })
    }

    /// Issues `clients/<name>.pem` and `clients/<name>.key`. Fails if either exists.
    pub fn issue_client(&self, name: &str) -> Result<()> {
        validate_client_name(name)?;
        let (pem, key) = (self.client_cert_path(name), self.client_key_path(name));
        for path in [&pem, &key] {
            ensure!(
                !path.exists(),
                "{}: already exists; choose another name, or `bulwark-pki revoke {name} --dir {}` \
                 and delete clients/{name}.pem and clients/{name}.key before reissuing",
                path.display(),
                self.dir.display()
            );
        }
        let ca = self.load_ca()?;
        create_private_dir(&self.clients_dir())?;
        let issued = ca
            .issue_client(name)
            .with_context(|| format!("issuing the client certificate {name:?}"))?;
        write_pair(&pem, &key, &issued)
    }

    /// Revokes `clients/<name>.pem`: adds its serial to `revoked.txt` (if not yet listed) and
    /// atomically rewrites `crl.pem` with the CRL number incremented. Earlier revocation dates
    /// are kept. Revoking twice is harmless (the CRL is just re-signed).
    pub fn revoke(&self, name: &str) -> Result<()> {
        validate_client_name(name)?;
        let ca = self.load_ca()?;
        let serial = self.read_client_cert(name)?.serial;

        let mut serials = self.revoked_serials()?;
        let (old_number, dates) = if self.crl_path().exists() {
            let crl = self.crl_info()?;
            (crl.crl_number, crl.revoked.into_iter().collect())
        } else {
            (0, BTreeMap::new())
        };
        if !serials.contains(&serial) {
            serials.push(serial);
        }
        let now = OffsetDateTime::now_utc();
        let entries: Vec<(u64, OffsetDateTime)> = serials
            .iter()
            .map(|s| (*s, dates.get(s).copied().unwrap_or(now)))
            .collect();
        let number = old_number
            .checked_add(1)
            .ok_or_else(|| anyhow!("{}: CRL number overflow", self.crl_path().display()))?;
        let crl = ca.crl_pem_with_dates(&entries, number, now)?;

        let list: String = serials.iter().map(|s| format!("{s}\n")).collect();
        replace(&self.revoked_list_path(), list.as_bytes(), PUBLIC_MODE)?;
        replace(&self.crl_path(), crl.as_bytes(), PUBLIC_MODE)
    }

    /// The serials listed in `revoked.txt` (empty if the file does not exist).
    ///
    /// Blank lines and `#` comments are ignored; `0x` prefixes hexadecimal serials.
    pub fn revoked_serials(&self) -> Result<Vec<u64>> {
        let path = self.revoked_list_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
        };
        parse_revoked_list(&text).with_context(|| format!("{}", path.display()))
    }

    /// Parses `crl.pem`.
    pub fn crl_info(&self) -> Result<CrlInfo> {
        let path = self.crl_path();
        let pem = read_pki_file(&path, &self.dir)?;
        parse_crl_pem(&pem).with_context(|| {
            format!(
                "{}: not a valid CRL; delete it and run `bulwark-pki init --dir {}` to \
                 recreate it from revoked.txt",
                path.display(),
                self.dir.display()
            )
        })
    }

    /// The names of the client certificates in `clients/`, sorted.
    pub fn client_names(&self) -> Result<Vec<String>> {
        let dir = self.clients_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("{}: cannot list", dir.display())),
        };
        let mut names = BTreeSet::new();
        for entry in entries {
            let path = entry
                .with_context(|| format!("{}: cannot list", dir.display()))?
                .path();
            if path.extension().is_some_and(|e| e == "pem") {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    names.insert(stem.to_owned());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Parses `clients/<name>.pem`.
    pub fn client_info(&self, name: &str) -> Result<CertInfo> {
        validate_client_name(name)?;
        let mut info = self.read_client_cert(name)?;
        if self.crl_path().exists() {
            info.revoked = self.crl_info()?.is_revoked(info.serial);
        }
        Ok(info)
    }

    /// All certificates: the CA, the broker certificate (if present) and the clients, with
    /// [`CertInfo::revoked`] taken from `crl.pem`.
    pub fn list(&self) -> Result<Vec<CertInfo>> {
        let crl = if self.crl_path().exists() {
            Some(self.crl_info()?)
        } else {
            None
        };
        let mut out = vec![self.read_cert(&self.ca_path(), CertRole::Ca)?];
        if self.server_cert_path().exists() {
            out.push(self.read_cert(&self.server_cert_path(), CertRole::Server)?);
        }
        for name in self.client_names()? {
            let path = self.clients_dir().join(format!("{name}.pem"));
            out.push(self.read_cert(&path, CertRole::Client(name))?);
        }
        if let Some(crl) = crl {
            for info in &mut out {
                info.revoked = crl.is_revoked(info.serial);
            }
        }
        Ok(out)
    }

    /// `<dir>/ca.pem`
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `<dir>/ca.key`
    pub fn ca_key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// `<dir>/server.pem`
    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// `<dir>/server.key`
    pub fn server_key_path(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// `<dir>/clients`
    pub fn clients_dir(&self) -> PathBuf {
        self.dir.join("clients")
    }

    /// `<dir>/clients/<name>.pem`
    pub fn client_cert_path(&self, name: &str) -> PathBuf {
        self.clients_dir().join(format!("{name}.pem"))
    }

    /// `<dir>/clients/<name>.key`
    pub fn client_key_path(&self, name: &str) -> PathBuf {
        self.clients_dir().join(format!("{name}.key"))
    }

    /// `<dir>/crl.pem`
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    /// `<dir>/revoked.txt`
    pub fn revoked_list_path(&self) -> PathBuf {
        self.dir.join("revoked.txt")
    }

    /// `Ok(true)` if both files exist, `Ok(false)` if neither does, an error if only one does.
    fn pair_exists(&self, cert: &Path, key: &Path) -> Result<bool> {
        match (cert.exists(), key.exists()) {
            (true, true) => Ok(true),
            (false, false) => Ok(false),
            (present, _) => {
                let (have, missing) = if present { (cert, key) } else { (key, cert) };
                bail!(
                    "{} exists but {} is missing; restore it, or delete {} and run \
                     `bulwark-pki init --dir {}` to create a new pair",
                    have.display(),
                    missing.display(),
                    have.display(),
                    self.dir.display()
                )
            }
        }
    }

    fn read_client_cert(&self, name: &str) -> Result<CertInfo> {
        let pem = self.client_cert_path(name);
        if !pem.exists() && self.dir.is_dir() {
            bail!(
                "{}: no such file; `bulwark-pki show --dir {}` lists the client certificates",
                pem.display(),
                self.dir.display()
            );
        }
        self.read_cert(&pem, CertRole::Client(name.to_owned()))
    }

    fn read_cert(&self, path: &Path, role: CertRole) -> Result<CertInfo> {
        let pem = read_pki_file(path, &self.dir)?;
        parse_cert_pem(&pem, role, path)
            .with_context(|| format!("{}: not a usable certificate", path.display()))
    }

    /// Warnings about an existing leaf certificate (wrong CA, expired, loose key mode).
    fn check_leaf(
        &self,
        info: &CertInfo,
        ca: &CertificateAuthority,
        key: &Path,
        report: &mut EnsureReport,
    ) {
        if info
            .authority_key_id
            .as_deref()
            .is_some_and(|aki| aki != ca.key_identifier())
        {
            report.warnings.push(format!(
                "{} was not issued by {}; delete {} and {} and run `bulwark-pki init --dir {}` \
                 again to reissue it",
                info.path.display(),
                self.ca_path().display(),
                info.path.display(),
                key.display(),
                self.dir.display()
            ));
        }
        if info.is_expired_at(OffsetDateTime::now_utc()) {
            report.warnings.push(format!(
                "{} expired on {}; delete it and {} and run `bulwark-pki init --dir {}` again",
                info.path.display(),
                format_date(info.not_after),
                key.display(),
                self.dir.display()
            ));
        }
        check_key_mode(key, report);
    }
}

/// Checks that `name` is usable as a client certificate name (and file name).
pub fn validate_client_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ensure!(
        !name.is_empty()
            && name.len() <= 64
            && ok_chars
            && !name.starts_with('.')
            && !name.starts_with('-'),
        "invalid client name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.', not \
         starting with '.' or '-' (it becomes the common name and the file name \
         clients/<name>.pem)"
    );
    Ok(())
}

/// `YYYY-MM-DD HH:MM UTC`
pub fn format_date(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

fn write_pair(cert: &Path, key: &Path, issued: &CertifiedKey) -> Result<()> {
    write_new(key, issued.key_pem.as_bytes(), KEY_MODE)?;
    if let Err(e) = write_new(cert, issued.cert_pem.as_bytes(), PUBLIC_MODE) {
        let _ = fs::remove_file(key);
        return Err(e);
    }
    Ok(())
}

fn check_key_mode(key: &Path, report: &mut EnsureReport) {
    if let Ok(mode) = mode_of(key) {
        if mode & 0o077 != 0 {
            report.warnings.push(format!(
                "{} is readable by other users (mode {mode:04o}); run `chmod 600 {}`",
                key.display(),
                key.display()
            ));
        }
    }
}

fn parse_revoked_list(text: &str) -> Result<Vec<u64>> {
    let mut serials = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let parsed = match entry
            .strip_prefix("0x")
            .or_else(|| entry.strip_prefix("0X"))
        {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => entry.parse(),
        };
        let serial = parsed.map_err(|_| {
            anyhow!(
                "line {}: {entry:?} is not a serial number (one decimal number per line)",
                i + 1
            )
        })?;
        if !serials.contains(&serial) {
            serials.push(serial);
        }
    }
    Ok(serials)
}

fn parse_cert_pem(pem: &str, role: CertRole, path: &Path) -> Result<CertInfo> {
    let der = pem_certificate_der(pem)?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| anyhow!("invalid X.509 certificate: {e}"))?;
    let mut info = CertInfo {
        role,
        path: path.to_path_buf(),
        common_name: common_name_of(&cert),
        serial: serial_from_bytes(cert.raw_serial())?,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        dns_names: Vec::new(),
        ip_addresses: Vec::new(),
        uris: Vec::new(),
        authority_key_id: None,
        revoked: false,
    };
    for ext in cert.iter_extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::DNSName(d) => info.dns_names.push((*d).to_owned()),
                        GeneralName::URI(u) => info.uris.push((*u).to_owned()),
                        GeneralName::IPAddress(bytes) => {
                            if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                                info.ip_addresses.push(IpAddr::from(v4));
                            } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                                info.ip_addresses.push(IpAddr::from(v6));
                            }
                        }
                        _ => {}
                    }
                }
            }
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                info.authority_key_id = aki.key_identifier.as_ref().map(|id| id.0.to_vec());
            }
            _ => {}
        }
    }
    Ok(info)
}

fn parse_crl_pem(pem: &str) -> Result<CrlInfo> {
    let mut der = None;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| anyhow!("invalid PEM: {e}"))?;
        if block.label == "X509 CRL" {
            der = Some(block.contents);
            break;
        }
    }
    let der = der.ok_or_else(|| anyhow!("no `-----BEGIN X509 CRL-----` block found"))?;
    let (_, crl) =
        CertificateRevocationList::from_der(&der).map_err(|e| anyhow!("invalid X.509 CRL: {e}"))?;
    let crl_number = match crl.crl_number() {
        Some(n) => serial_from_bytes(&n.to_bytes_be())?,
        None => 0,
    };
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| {
            Ok((
                serial_from_bytes(r.raw_serial())?,
                r.revocation_date.to_datetime(),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CrlInfo {
        crl_number,
        this_update: crl.last_update().to_datetime(),
        next_update: crl.next_update().map(|t| t.to_datetime()),
        revoked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_list_parsing() {
        let text = "# comment\n\n12345\n0x1f # hex\n  42  \n12345\n";
        assert_eq!(parse_revoked_list(text).unwrap(), [12345, 0x1f, 42]);
        let err = parse_revoked_list("12\nalice\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn client_names_are_checked() {
        for good in ["alice", "press-7", "plc_01.line2", "A1"] {
            validate_client_name(good).unwrap();
        }
        for bad in [
            "",
            "../ca",
            "a/b",
            ".hidden",
            "-flag",
            "sp ace",
            "ü",
            &"x".repeat(65),
        ] {
            assert!(validate_client_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn dates_are_formatted_in_utc() {
        let t = time::Date::from_calendar_date(2031, time::Month::February, 3)
            .unwrap()
            .with_hms(4, 5, 6)
            .unwrap()
            .assume_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        assert_eq!(format_date(t), "2031-02-03 02:05 UTC");
    }
}
