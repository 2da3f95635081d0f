//! Certificate authority: issued certificates parse, carry the right contents and chain to
//! the CA; CRLs list the right serials.

use std::net::IpAddr;

use ::time::{Duration, OffsetDateTime};
use bulwark_pki::{CertSpec, CertificateAuthority, Usage, CA_VALIDITY, CRL_VALIDITY};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).expect("valid X.509");
    assert!(rest.is_empty());
    cert
}

fn pem_der(pem: &str) -> Vec<u8> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("valid PEM");
    block.contents
}

fn cn(cert: &X509Certificate<'_>) -> String {
    cert.subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

fn serial(cert: &X509Certificate<'_>) -> u64 {
    u64::try_from(cert.serial.clone()).unwrap()
}

fn ski(cert: &X509Certificate<'_>) -> Vec<u8> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
        .expect("subject key identifier")
}

fn aki(cert: &X509Certificate<'_>) -> Vec<u8> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|id| id.0.to_vec())
            }
            _ => None,
        })
        .expect("authority key identifier")
}

#[derive(Debug, Default, PartialEq)]
struct Sans {
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    uris: Vec<String>,
}

fn sans(cert: &X509Certificate<'_>) -> Sans {
    let mut out = Sans::default();
    let Some(ext) = cert.subject_alternative_name().unwrap() else {
        return out;
    };
    for name in &ext.value.general_names {
        match name {
            GeneralName::DNSName(d) => out.dns.push(d.to_string()),
            GeneralName::URI(u) => out.uris.push(u.to_string()),
            GeneralName::IPAddress(b) => out.ips.push(match b.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()),
                _ => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()),
            }),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    out
}

/// (server_auth, client_auth)
fn eku(cert: &X509Certificate<'_>) -> (bool, bool) {
    let eku = cert
        .extended_key_usage()
        .unwrap()
        .expect("EKU present")
        .value;
    (eku.server_auth, eku.client_auth)
}

fn close_to(actual: OffsetDateTime, expected: OffsetDateTime) -> bool {
    (actual - expected).abs() < Duration::minutes(5)
}

#[test]
fn root_ca_is_a_self_signed_p256_ca() {
    let ca = CertificateAuthority::new_root("Plant Test CA").unwrap();
    let der = ca.cert_der();
    assert_eq!(der, pem_der(&ca.cert_pem()));
    let cert = parse(&der);

    assert_eq!(cn(&cert), "Plant Test CA");
    assert_eq!(cert.subject().as_raw(), cert.issuer().as_raw());
    cert.verify_signature(None).expect("self-signed");
    assert_eq!(
        cert.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
    );

    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("basic constraints");
    assert!(bc.critical);
    assert!(bc.value.ca);
    let ku = cert.key_usage().unwrap().expect("key usage").value;
    assert!(ku.key_cert_sign());
    assert!(ku.crl_sign());

    let now = OffsetDateTime::now_utc();
    let v = cert.validity();
    assert!(v.not_before.to_datetime() < now);
    assert!(close_to(v.not_after.to_datetime(), now + CA_VALIDITY));
    assert!(serial(&cert) > 0);
    assert_eq!(ski(&cert), ca.key_identifier());
    assert!(ca.key_pem().contains("BEGIN PRIVATE KEY"));
}

#[test]
fn server_certificate_has_names_eku_and_chains_to_ca() {
    let ca = CertificateAuthority::new_root("Plant Test CA").unwrap();
    let ca_der = ca.cert_der();
    let ca_cert = parse(&ca_der);

    let issued = ca
        .issue_server("broker", &["localhost", "127.0.0.1", "::1", "broker"])
        .unwrap();
    assert_eq!(issued.cert_der, pem_der(&issued.cert_pem));
    let cert = parse(&issued.cert_der);

    assert_eq!(cn(&cert), "broker");
    assert_eq!(
        sans(&cert),
        Sans {
            dns: vec!["localhost".into(), "broker".into()],
            ips: vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
            uris: vec![],
        }
    );
    assert_eq!(eku(&cert), (true, false));
    assert!(!cert.is_ca());
    assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());

    // Issued by the CA and signed with its key.
    assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
    assert_eq!(aki(&cert), ski(&ca_cert));
    cert.verify_signature(Some(ca_cert.public_key()))
        .expect("signed by the CA");
    // ...and not by some other CA.
    let other = CertificateAuthority::new_root("Other CA").unwrap();
    let other_der = other.cert_der();
    assert!(cert
        .verify_signature(Some(parse(&other_der).public_key()))
        .is_err());

    // Serial: non-zero, 63 bits, matches the certificate.
    assert_eq!(serial(&cert), issued.serial);
    assert!(issued.serial > 0 && issued.serial <= i64::MAX as u64);

    // Validity: now-1h .. now+825d.
    let now = OffsetDateTime::now_utc();
    let v = cert.validity();
    assert!(close_to(
        v.not_before.to_datetime(),
        now - Duration::hours(1)
    ));
    assert!(close_to(
        v.not_after.to_datetime(),
        now + Duration::days(825)
    ));

    // The key is a P-256 PKCS#8 key belonging to the certificate.
    let key = rcgen::KeyPair::from_pem(&issued.key_pem).unwrap();
    assert_eq!(key.serialized_der(), issued.key_der.as_slice());
    assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );
}

#[test]
fn client_certificate_has_client_eku_and_uri() {
    let ca = CertificateAuthority::new_root("Plant Test CA").unwrap();
    let ca_der = ca.cert_der();
    let ca_cert = parse(&ca_der);

    let plain = ca.issue_client("press-7").unwrap();
    let cert = parse(&plain.cert_der);
    assert_eq!(cn(&cert), "press-7");
    assert_eq!(eku(&cert), (false, true));
    assert_eq!(sans(&cert), Sans::default());
    cert.verify_signature(Some(ca_cert.public_key())).unwrap();

    let spec = CertSpec::client("press-7").with_uri("urn:bulwark:device:press-7");
    assert_eq!(spec.usage, Usage::Client);
    let with_uri = ca.issue(&spec).unwrap();
    let cert = parse(&with_uri.cert_der);
    assert_eq!(sans(&cert).uris, ["urn:bulwark:device:press-7"]);
    assert_eq!(eku(&cert), (false, true));
    assert_ne!(plain.serial, with_uri.serial);
}

#[test]
fn validity_can_be_chosen() {
    let ca = CertificateAuthority::new_root("Plant Test CA").unwrap();
    let nb = OffsetDateTime::from_unix_timestamp(1_600_000_000).unwrap();
    let na = nb + Duration::days(1);
    let issued = ca
        .issue(&CertSpec::client("expired").valid_between(nb, na))
        .unwrap();
    let cert = parse(&issued.cert_der);
    assert_eq!(cert.validity().not_before.to_datetime(), nb);
    assert_eq!(cert.validity().not_after.to_datetime(), na);
}

#[test]
fn bad_specs_are_rejected() {
    let ca = CertificateAuthority::new_root("Plant Test CA").unwrap();
    let now = OffsetDateTime::now_utc();
    let backwards = CertSpec::client("x").valid_between(now, now - Duration::days(1));
    assert!(ca.issue(&backwards).is_err());
    let err = ca.issue_server("broker", &[]).unwrap_err();
    assert!(err.to_string().contains("DNS name or IP address"), "{err}");
    assert!(ca.issue_client("").is_err());
    assert!(ca.issue_server("broker", &["bäckerei.example"]).is_err());
    assert!(CertificateAuthority::new_root(" ").is_err());
}

#[test]
fn from_pem_round_trip_issues_certificates_verifiable_with_the_original_ca() {
    let original = CertificateAuthority::new_root("Plant Test CA").unwrap();
    let ca_der = original.cert_der();
    let ca_cert = parse(&ca_der);

    let loaded = CertificateAuthority::from_pem(&original.cert_pem(), &original.key_pem()).unwrap();
    assert_eq!(loaded.cert_der(), ca_der);
    assert_eq!(loaded.cert_pem(), original.cert_pem());
    assert_eq!(loaded.key_identifier(), original.key_identifier());
    assert_eq!(loaded.common_name(), "Plant Test CA");

    for issued in [
        loaded.issue_server("broker", &["localhost"]).unwrap(),
        loaded.issue_client("hmi").unwrap(),
    ] {
        let cert = parse(&issued.cert_der);
        cert.verify_signature(Some(ca_cert.public_key()))
            .expect("verifiable with the original CA certificate");
        assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
        assert_eq!(aki(&cert), ski(&ca_cert));
    }

    // CRLs from the loaded CA also verify against the original.
    let crl_pem = loaded.crl_pem(&[7], 1).unwrap();
    let crl_der = pem_der(&crl_pem);
    let (_, crl) = CertificateRevocationList::from_der(&crl_der).unwrap();
    crl.verify_signature(ca_cert.public_key()).unwrap();
}

#[test]
fn from_pem_rejects_mismatched_key_and_non_ca_certificates() {
    let a = CertificateAuthority::new_root("A").unwrap();
    let b = CertificateAuthority::new_root("B").unwrap();
    let err = CertificateAuthority::from_pem(&a.cert_pem(), &b.key_pem()).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");

    let leaf = a.issue_client("leaf").unwrap();
    let err = CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");

    assert!(CertificateAuthority::from_pem("garbage", &a.key_pem()).is_err());
    assert!(CertificateAuthority::from_pem(&a.cert_pem(), "garbage").is_err());
}

#[test]
fn crl_lists_serials_and_is_signed_by_the_ca() {
    let ca = CertificateAuthority::new_root("Plant Test CA").unwrap();
    let ca_der = ca.cert_der();
    let ca_cert = parse(&ca_der);
    let revoked = ca.issue_client("lost").unwrap();
    let kept = ca.issue_client("kept").unwrap();

    let pem = ca.crl_pem(&[revoked.serial], 42).unwrap();
    assert!(pem.contains("BEGIN X509 CRL"));
    let der = pem_der(&pem);
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();

    crl.verify_signature(ca_cert.public_key()).unwrap();
    assert_eq!(crl.issuer().as_raw(), ca_cert.subject().as_raw());
    assert_eq!(u64::try_from(crl.crl_number().unwrap()).unwrap(), 42);
    let serials: Vec<u64> = crl
        .iter_revoked_certificates()
        .map(|r| u64::try_from(r.serial()).unwrap())
        .collect();
    assert_eq!(serials, [revoked.serial]);
    assert!(!serials.contains(&kept.serial));

    let now = OffsetDateTime::now_utc();
    assert!(close_to(crl.last_update().to_datetime(), now));
    assert!(close_to(
        crl.next_update().unwrap().to_datetime(),
        now + CRL_VALIDITY
    ));

    // An empty CRL has no revoked entries but is still valid.
    let empty = pem_der(&ca.crl_pem(&[], 1).unwrap());
    let (_, crl) = CertificateRevocationList::from_der(&empty).unwrap();
    assert_eq!(crl.iter_revoked_certificates().count(), 0);
    crl.verify_signature(ca_cert.public_key()).unwrap();
}

#[test]
fn certified_key_debug_does_not_leak_the_key() {
    let ca = CertificateAuthority::new_root("Plant Test CA").unwrap();
    let issued = ca.issue_client("x").unwrap();
    let debug = format!("{issued:?} {ca:?}");
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
}
