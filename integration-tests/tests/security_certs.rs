//! Client certificates the broker must refuse at the handshake (on 8883 and 443 alike):
//! signed by another CA, expired, not yet valid, or a server certificate used as a client
//! certificate; and R3, a client asking for a huge number of subscriptions.

use std::sync::Arc;
use std::time::Duration;

use bulwark_integration_tests::mqtt::{options, Client, Via};
use bulwark_integration_tests::{BrokerConfig, ClientCert, TestBroker};
use bulwark_pki::{CertSpec, CertificateAuthority, CertifiedKey};

fn as_client(name: &str, c: CertifiedKey, dir: &std::path::Path) -> ClientCert {
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, &c.cert_pem).unwrap();
    bulwark_integration_tests::write_private(&key_path, &c.key_pem);
    ClientCert {
        name: name.into(),
        serial: c.serial,
        cert_path,
        key_path,
        cert_pem: c.cert_pem,
        key_pem: c.key_pem,
    }
}

async fn refused(b: &TestBroker, cert: &ClientCert) {
    for (listener, via) in [
        (
            "tls",
            Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(cert))),
        ),
        (
            "wss",
            Via::Wss(b.addr("wss"), b.pki.rustls_client_config(Some(cert))),
        ),
    ] {
        let r = Client::connect(options(&cert.name, &via)).await;
        assert!(r.is_err(), "{} must be refused on {listener}", cert.name);
    }
    // The broker logs the failure after the client has seen it: wait for the lines.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b
        .process
        .count_log(|v| v["event"] == "tls_handshake_failed")
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "handshake failures audited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        b.process
            .count_log(|v| v["event"] == "connect" && v["client_id"] == cert.name.as_str()),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_do_not_chain_or_are_out_of_date_are_refused() {
    let b = TestBroker::start(BrokerConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();

    let rogue_ca = CertificateAuthority::new_root("Rogue CA").unwrap();
    let rogue = as_client("rogue", rogue_ca.issue_client("rogue").unwrap(), dir.path());
    refused(&b, &rogue).await;

    let expired = b
        .pki
        .ca
        .issue(&CertSpec::client("expired").valid_between(
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        ))
        .unwrap();
    refused(&b, &as_client("expired", expired, dir.path())).await;

    let future = b
        .pki
        .ca
        .issue(&CertSpec::client("future").valid_between(
            now + time::Duration::days(1),
            now + time::Duration::days(30),
        ))
        .unwrap();
    refused(&b, &as_client("future", future, dir.path())).await;

    // A server certificate (serverAuth only) is no client certificate.
    let server = b.pki.ca.issue_server("sneaky", &["localhost"]).unwrap();
    refused(&b, &as_client("sneaky", server, dir.path())).await;

    // And a good one still works.
    let good = b.pki.client("good");
    let via = Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(&good)));
    Client::connect(options("good", &via)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_verifies_the_broker_name() {
    // T1 from the client side, with the same rustls settings our clients use: a broker
    // certificate for another host name is refused.
    let b = TestBroker::start(BrokerConfig::default());
    let c = b.pki.client("app");
    let config: Arc<rustls::ClientConfig> = b.pki.rustls_client_config(Some(&c));
    let tcp = tokio::net::TcpStream::connect(b.addr("tls")).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("broker.example.com").unwrap();
    let r = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await;
    assert!(
        r.is_err(),
        "a certificate for localhost does not serve broker.example.com"
    );
}

#[test]
fn r3_huge_subscribe_is_capped_and_memory_stays_bounded() {
    use bulwark_integration_tests::RawClient;
    let b = TestBroker::start(BrokerConfig::default());
    let pid = b.process.pid();
    let rss = || -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let before = rss();
    let mut raw = RawClient::connect(b.addr("tcp"));
    raw.send(&bulwark_integration_tests::connect_bytes("greedy"))
        .unwrap();
    assert_eq!(
        raw.read_exact(4, Duration::from_secs(5)).unwrap(),
        vec![0x20, 2, 0, 0]
    );
    // 100 SUBSCRIBE packets of 1000 filters each: 100k subscriptions asked for.
    let mut granted = 0usize;
    let mut failed = 0usize;
    for p in 0..100u32 {
        let mut body = vec![0, 1];
        for i in 0..1000u32 {
            let f = format!("r3/{p}/{i}");
            body.extend_from_slice(&(f.len() as u16).to_be_bytes());
            body.extend_from_slice(f.as_bytes());
            body.push(0);
        }
        let mut pkt = vec![0x82];
        let mut len = body.len();
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            pkt.push(byte);
            if len == 0 {
                break;
            }
        }
        pkt.extend(body);
        raw.send(&pkt).unwrap();
        // SUBACK: 90 03 e8 (1002 bytes remaining) then 00 01 and 1000 codes.
        let head = raw.read_exact(5, Duration::from_secs(10)).unwrap();
        assert_eq!(head[0], 0x90);
        let codes = raw.read_exact(1000, Duration::from_secs(10)).unwrap();
        granted += codes.iter().filter(|c| **c == 0).count();
        failed += codes.iter().filter(|c| **c == 0x80).count();
    }
    assert_eq!(granted, 1000, "limits.max_subscriptions_per_client (1000)");
    assert_eq!(failed, 99_000);
    b.process
        .wait_audit("subscribe_refused", &[("client_id", "greedy")]);
    let grown_kib = rss().saturating_sub(before);
    assert!(grown_kib < 64 * 1024, "RSS grew by {grown_kib} KiB");
    // Still serving.
    raw.send(&[0xc0, 0]).unwrap();
    assert_eq!(
        raw.read_exact(2, Duration::from_secs(5)).unwrap(),
        vec![0xd0, 0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3_wildcard_for_a_whole_tld_is_not_accepted_by_clients() {
    // The broker is given a certificate for `*.com`; a client with our TLS settings that
    // connects to `broker.com` must refuse it (a wildcard may not cover a public suffix).
    let b = TestBroker::start(BrokerConfig {
        extra: "[reload]\nwatch_interval_secs = 0\n".into(),
        ..BrokerConfig::default()
    });
    let wild = b
        .pki
        .ca
        .issue(&CertSpec::server("wild", &["*.com"]))
        .unwrap();
    let tmp = b.pki.dir.path().join("wild.tmp");
    bulwark_integration_tests::write_private(&tmp, &wild.key_pem);
    std::fs::rename(&tmp, &b.pki.server_key).unwrap();
    std::fs::write(&tmp, &wild.cert_pem).unwrap();
    std::fs::rename(&tmp, &b.pki.server_cert).unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &b.process.pid().to_string()])
        .status()
        .unwrap();
    b.process
        .wait_audit("reload", &[("what", "tls"), ("listener", "tls")]);
    let c = b.pki.client("app");
    let tcp = tokio::net::TcpStream::connect(b.addr("tls")).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("broker.com").unwrap();
    let r = tokio_rustls::TlsConnector::from(b.pki.rustls_client_config(Some(&c)))
        .connect(name, tcp)
        .await;
    assert!(
        r.is_err(),
        "a *.com certificate must not be accepted for broker.com"
    );

    // Control: a wildcard one label below a registrable domain is fine, so the refusal
    // above is about the wildcard's reach, not about wildcards as such.
    let ok = b
        .pki
        .ca
        .issue(&CertSpec::server("wild-ok", &["*.example.com"]))
        .unwrap();
    bulwark_integration_tests::write_private(&tmp, &ok.key_pem);
    std::fs::rename(&tmp, &b.pki.server_key).unwrap();
    std::fs::write(&tmp, &ok.cert_pem).unwrap();
    std::fs::rename(&tmp, &b.pki.server_cert).unwrap();
    let before = b.process.count_log(|v| v["event"] == "reload");
    std::process::Command::new("kill")
        .args(["-HUP", &b.process.pid().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.process.count_log(|v| v["event"] == "reload") <= before {
        assert!(std::time::Instant::now() < deadline, "no second reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tcp = tokio::net::TcpStream::connect(b.addr("tls")).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("broker.example.com").unwrap();
    tokio_rustls::TlsConnector::from(b.pki.rustls_client_config(Some(&c)))
        .connect(name, tcp)
        .await
        .expect("*.example.com covers broker.example.com");
}
