//! Development PKI for Bulwark.
//!
//! This crate creates the certificates a Bulwark broker and its clients need for mutual TLS
//! in development, test and lab setups:
//!
//! * [`CertificateAuthority`]: a self-signed root CA (ECDSA P-256) that issues server and
//!   client certificates ([`CertSpec`], [`CertifiedKey`]) and signs CRLs. Tests use it
//!   in memory; [`CertificateAuthority::from_pem`] loads one from files.
//! * [`DevPki`]: the directory layout used by `make run` and `make certs`
//!   (`ca.pem`, `server.pem`, `clients/<name>.pem`, `crl.pem`, ...). [`DevPki::ensure`]
//!   creates what is missing and never overwrites existing material; [`DevPki::revoke`]
//!   adds a client to the CRL.
//!
//! The `bulwark-pki` binary is the command-line front end to [`DevPki`].
//!
//! This is **not** a production CA: the CA key sits unencrypted next to the certificates
//! (mode 0600). Production deployments should use the plant's own PKI.
//!
//! ```no_run
//! use bulwark_pki::{CertificateAuthority, CertSpec};
//!
//! # fn main() -> anyhow::Result<()> {
//! let ca = CertificateAuthority::new_root("Test CA")?;
//! let server = ca.issue_server("broker", &["localhost", "127.0.0.1"])?;
//! let device = ca.issue(&CertSpec::client("press-7").with_uri("urn:bulwark:device:press-7"))?;
//! let crl = ca.crl_pem(&[device.serial], 1)?;
//! # let _ = (server, crl);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod ca;
mod dev;
mod fsutil;

pub use ca::{
    CertSpec, CertificateAuthority, CertifiedKey, Usage, BACKDATE, CA_VALIDITY, CRL_VALIDITY,
    LEAF_VALIDITY,
};
pub use dev::{
    format_date, validate_client_name, CertInfo, CertRole, CrlInfo, DevPki, EnsureReport,
    DEFAULT_SERVER_NAMES, DEV_CA_COMMON_NAME, DEV_SERVER_COMMON_NAME,
};
