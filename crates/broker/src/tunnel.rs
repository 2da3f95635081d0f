//! The broker as host of the tunnel relay ([`bulwark_tunnel::relay`]): served at
//! `/tunnel/v1` on every `wss` listener when `[tunnel] enabled = true`.
//!
//! Operators authenticate as MQTT clients do: a verified client certificate (its identity
//! as the listener's `identity_field` gives it), or a username and password from the
//! password file (with the same failure counting and bans). Opening service S on device D
//! needs write permission on `$tunnel/D/open/S` in the ACL. The offer reaches the device on
//! `$tunnel/D/notify` through the router, like any message (the device's ACL must let it
//! read that topic; the default device rules do).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use bulwark_protocol::acl::Principal;
use bulwark_protocol::{QoS, TopicName};
use bulwark_tunnel::proto::Offer;
use bulwark_tunnel::relay::{BoxFuture, Relay, RelayConfig, RelayHost};
use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::connection::Shared;
use crate::session::Message;

/// The stream a relay connection runs over.
pub type RelayStream = TlsStream<TcpStream>;
/// The broker's relay.
pub type BrokerRelay = Relay<RelayStream>;

/// Starts the relay for `shared` (kept as a weak reference: the relay lives inside it).
pub fn start(shared: &Arc<Shared>, config: RelayConfig) -> Arc<BrokerRelay> {
    Arc::new(Relay::new(
        Arc::new(BrokerRelayHost {
            shared: Arc::downgrade(shared),
        }),
        config,
    ))
}

struct BrokerRelayHost {
    shared: Weak<Shared>,
}

impl RelayHost for BrokerRelayHost {
    fn authenticate<'a>(
        &'a self,
        peer: SocketAddr,
        cert_identity: Option<&'a str>,
        username: Option<&'a str>,
        password: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let shared = self
                .shared
                .upgrade()
                .ok_or_else(|| "the broker is shutting down".to_string())?;
            if let Some(cert) = cert_identity {
                if let Some(u) = username.filter(|u| *u != cert) {
                    crate::connection::auth_failure(
                        &shared,
                        peer,
                        Some(u),
                        "tunnel: username differs from the certificate identity",
                    );
                    return Err(format!(
                        "the username {u:?} differs from your certificate's identity {cert:?}; leave the username out"
                    ));
                }
                return Ok(cert.to_string());
            }
            let Some(user) = username else {
                crate::connection::auth_failure(&shared, peer, None, "tunnel: no credentials");
                return Err("no client certificate and no username: give --cert and --key, or --username with BULWARK_TUNNEL_PASSWORD".into());
            };
            let Some(verifier) = shared.router.authority().verifier() else {
                crate::connection::auth_failure(
                    &shared,
                    peer,
                    Some(user),
                    "tunnel: password authentication is not configured",
                );
                return Err("password authentication is not configured on this broker; use a client certificate".into());
            };
            if shared
                .abuse
                .check_user(peer.ip(), user, std::time::Instant::now())
                .is_err()
            {
                return Err(
                    "username temporarily banned after repeated failures; try again later".into(),
                );
            }
            let pw = password.unwrap_or("").as_bytes();
            match verifier.verify(user, pw).await {
                Ok(v) if v.is_accepted() => {
                    shared.abuse.record_success(peer.ip(), Some(user));
                    Ok(user.to_string())
                }
                Ok(_) => {
                    crate::connection::auth_failure(
                        &shared,
                        peer,
                        Some(user),
                        "tunnel: wrong username or password",
                    );
                    Err("wrong username or password".into())
                }
                Err(_) => Err("the broker is busy checking passwords; try again".into()),
            }
        })
    }

    fn may_open(&self, operator: &str, device: &str, service: &str) -> bool {
        let Some(shared) = self.shared.upgrade() else {
            return false;
        };
        let acl = shared.router.authority().acl();
        acl.check_tunnel(
            &Principal {
                identity: Some(operator),
                client_id: operator,
            },
            device,
            service,
        )
        .allowed
    }

    /// Online for a tunnel: connected and subscribed to its notification topic (an agent
    /// subscribes right after CONNACK; an offer published before that would be lost).
    fn device_online(&self, device: &str) -> bool {
        let Ok(topic) = TopicName::new(bulwark_tunnel::proto::notify_topic(device)) else {
            return false;
        };
        self.shared
            .upgrade()
            .is_some_and(|s| s.router.identity_subscribed(device, &topic))
    }

    fn notify(&self, device: &str, offer: &Offer) -> Result<(), String> {
        let shared = self
            .shared
            .upgrade()
            .ok_or_else(|| "the broker is shutting down".to_string())?;
        let topic = TopicName::new(bulwark_tunnel::proto::notify_topic(device))
            .map_err(|e| e.to_string())?;
        let payload = serde_json::to_vec(offer).map_err(|e| e.to_string())?;
        shared.router.publish(Message {
            topic,
            payload: Bytes::from(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
        });
        Ok(())
    }
}
