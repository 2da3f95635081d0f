//! TLS hot reload and revocation (T5): a CRL replaced while the broker runs applies without
//! a restart, holders of newly revoked certificates are disconnected on 8883 and 443 alike,
//! others keep their sessions; a rotated server certificate is served to new connections
//! without dropping existing ones; a reload that fails keeps the last good configuration.

use std::sync::Arc;
use std::time::Duration;

use bulwark_integration_tests::mqtt::{options, Client, QoS, Via};
use bulwark_integration_tests::{BrokerConfig, TestBroker};
use rustls_pki_types::pem::PemObject;

const T: Duration = Duration::from_secs(15);

fn config() -> BrokerConfig {
    BrokerConfig {
        crl: true,
        extra: "[reload]\nwatch_interval_secs = 1\n".into(),
        ..BrokerConfig::default()
    }
}

async fn closed(c: &mut Client) -> bool {
    tokio::time::timeout(T, async {
        loop {
            match c.events.recv().await {
                Some(Err(_)) | None => return,
                _ => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_crl_disconnects_revoked_holders_on_both_listeners() {
    let b = TestBroker::start(config());
    let victim = b.pki.client("gw-stolen");
    let keeper = b.pki.client("gw-good");
    let via_tls = |c| Via::Tls(b.addr("tls"), b.pki.rustls_client_config(Some(c)));
    let via_wss = |c| Via::Wss(b.addr("wss"), b.pki.rustls_client_config(Some(c)));

    let mut v1 = Client::connect(options("gw-stolen", &via_tls(&victim)))
        .await
        .unwrap();
    let mut v2 = Client::connect(options("gw-stolen-ws", &via_wss(&victim)))
        .await
        .unwrap();
    let mut k = Client::connect(options("gw-good", &via_tls(&keeper)))
        .await
        .unwrap();
    k.subscribe("k/#", QoS::AtLeastOnce).await;

    b.pki.revoke(&[victim.serial]);
    b.process
        .wait_audit("certificate_revoked", &[("client_id", "gw-stolen")]);
    b.process
        .wait_audit("certificate_revoked", &[("client_id", "gw-stolen-ws")]);
    assert!(closed(&mut v1).await, "TLS holder disconnected");
    assert!(closed(&mut v2).await, "WebSocket holder disconnected");

    // The other client kept its session and works.
    let mut p = Client::connect(options("pub", &via_tls(&keeper)))
        .await
        .unwrap();
    p.publish("k/1", QoS::AtLeastOnce, false, b"x").await;
    assert_eq!(k.next_publish(T).await.unwrap().topic, "k/1");

    // The revoked certificate cannot come back, on either listener.
    assert!(Client::connect(options("gw-stolen", &via_tls(&victim)))
        .await
        .is_err());
    assert!(Client::connect(options("gw-stolen", &via_wss(&victim)))
        .await
        .is_err());

    // A CRL that does not parse: the last good one stays in force.
    let before = b.process.count_log(|v| v["event"] == "reload_failed");
    std::fs::write(&b.pki.crl_path, "not a CRL").unwrap();
    b.process
        .wait_log(T, |v| v["event"] == "reload_failed")
        .unwrap();
    assert!(b.process.count_log(|v| v["event"] == "reload_failed") > before);
    assert!(Client::connect(options("gw-stolen", &via_tls(&victim)))
        .await
        .is_err());
    let again = Client::connect(options("gw-good-2", &via_tls(&keeper))).await;
    assert!(
        again.is_ok(),
        "valid clients still get in: {:?}",
        again.err()
    );
}

async fn served_certificate(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_server_certificate_is_served_without_dropping_sessions() {
    let b = TestBroker::start(BrokerConfig {
        // Only SIGHUP triggers reloads here.
        extra: "[reload]\nwatch_interval_secs = 0\n".into(),
        ..BrokerConfig::default()
    });
    let client = b.pki.client("app");
    let tls = b.pki.rustls_client_config(Some(&client));
    let mut live = Client::connect(options("live", &Via::Tls(b.addr("tls"), tls.clone())))
        .await
        .unwrap();
    live.subscribe("t", QoS::AtLeastOnce).await;
    let old = served_certificate(b.addr("tls"), tls.clone()).await;

    b.pki.rotate_server_cert("bulwark-rotated");
    let new_pem = std::fs::read(&b.pki.server_cert).unwrap();
    let new_der = rustls_pki_types::CertificateDer::from_pem_slice(&new_pem)
        .unwrap()
        .to_vec();
    assert_ne!(old, new_der);
    std::process::Command::new("kill")
        .args(["-HUP", &b.process.pid().to_string()])
        .status()
        .unwrap();
    b.process
        .wait_audit("reload", &[("what", "tls"), ("listener", "tls")]);
    assert_eq!(
        served_certificate(b.addr("tls"), tls.clone()).await,
        new_der
    );

    // The connection made before the rotation is still there.
    let mut p = Client::connect(options("p", &Via::Tls(b.addr("tls"), tls)))
        .await
        .unwrap();
    p.publish("t", QoS::AtLeastOnce, false, b"still here").await;
    assert_eq!(
        &live.next_publish(T).await.unwrap().payload[..],
        b"still here"
    );
}
