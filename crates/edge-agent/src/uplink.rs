//! The uplink: the agent's only network connection, outbound to the broker over TLS (or
//! WebSocket over TLS) with the device certificate.
//!
//! rumqttc's `publish()` returns no packet id, and with a clean session it forgets its own
//! unacknowledged publishes on reconnect. So the agent owns the `EventLoop`, keeps every
//! record on disk until the broker acknowledges it, and does its own bookkeeping:
//! - records are submitted in sequence order, at most `max_inflight` at a time;
//! - each `Outgoing::Publish(pkid)` event is matched to the oldest submitted record (rumqttc
//!   writes requests in the order they were submitted);
//! - `Incoming::PubAck(pkid)` deletes exactly that record from the queue;
//! - after every reconnect the agent starts again from the oldest record on disk.
//!
//! Handing a record to rumqttc is never counted as delivery.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bulwark_protocol::envelope::{data_topic, format_ts, TelemetryEnvelope};
use rumqttc::{
    AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{watch, Notify};

use crate::config::{AgentConfig, BrokerUrl};
use crate::queue::{StoredRecord, UplinkQueue};

/// What the uplink reports about itself (for health and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkStatus {
    pub connected: bool,
    pub broker: Option<String>,
    pub acked: u64,
    pub reconnects: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Builds the rustls client configuration from the files as they are now (read on every
/// attempt, so a broken CA file fails every attempt, and a fixed one is picked up).
pub fn tls_config(cfg: &AgentConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let u = &cfg.uplink;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &u.ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("{}: not a PEM certificate file: {e}", ca.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("{}: unusable CA certificate: {e}", ca.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("{}: contains no certificate", ca.display()));
        }
    }
    if u.use_system_roots {
        let found = rustls_native_certs::load_native_certs();
        for c in found.certs {
            let _ = roots.add(c);
        }
    }
    let cert_pem =
        std::fs::read(&u.cert_file).map_err(|e| format!("{}: {e}", u.cert_file.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", u.cert_file.display()))?;
    let key_pem =
        std::fs::read(&u.key_file).map_err(|e| format!("{}: {e}", u.key_file.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: not a PEM private key: {e}", u.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("{}: {e}", u.key_file.display()))?;
    Ok(Arc::new(config))
}

fn mqtt_options(cfg: &AgentConfig, url: &BrokerUrl) -> Result<MqttOptions, String> {
    let tls = TlsConfiguration::Rustls(tls_config(cfg)?);
    let mut o = match url {
        BrokerUrl::Mqtts { host, port } => {
            let mut o = MqttOptions::new(cfg.device_id.clone(), host.clone(), *port);
            o.set_transport(Transport::tls_with_config(tls));
            o
        }
        BrokerUrl::Wss { url, port, .. } => {
            let mut o = MqttOptions::new(cfg.device_id.clone(), url.clone(), *port);
            o.set_transport(Transport::wss_with_config(tls));
            o
        }
    };
    o.set_keep_alive(Duration::from_secs(u64::from(
        cfg.uplink.keepalive_secs.max(5),
    )));
    o.set_clean_session(true);
    o.set_inflight(cfg.uplink.max_inflight);
    o.set_request_channel_capacity(usize::from(cfg.uplink.max_inflight) * 2 + 16);
    o.set_max_packet_size(1024 * 1024, 1024 * 1024);
    Ok(o)
}

/// Builds the envelope of a stored record, marking it historical if it is older than
/// `historical_after` when sent.
pub fn envelope(
    device: &str,
    r: &StoredRecord,
    historical_after: Duration,
    now_ms: u64,
) -> TelemetryEnvelope {
    TelemetryEnvelope {
        v: 1,
        device: device.to_string(),
        seq: r.seq,
        series: r.series.clone(),
        ts: format_ts(r.ts_ms),
        historical: now_ms.saturating_sub(r.ts_ms) > historical_after.as_millis() as u64,
        payload: r.payload.clone(),
    }
}

enum SessionEnd {
    Shutdown,
    /// The connection failed; `connected` says whether it had been up.
    Lost {
        connected: bool,
        error: String,
    },
}

/// Runs the uplink until `shutdown` turns true.
pub async fn run(
    cfg: Arc<AgentConfig>,
    queue: Arc<dyn UplinkQueue>,
    wake: Arc<Notify>,
    status: watch::Sender<UplinkStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let urls = cfg.broker_urls();
    let min = Duration::from_millis(cfg.uplink.backoff_min_ms);
    let max = Duration::from_millis(cfg.uplink.backoff_max_ms);
    let mut backoff = min;
    let mut idx = 0usize;
    loop {
        let url = &urls[idx % urls.len()];
        let end = match mqtt_options(&cfg, url) {
            Err(e) => SessionEnd::Lost {
                connected: false,
                error: format!("TLS material: {e}"),
            },
            Ok(mut opts) => {
                let mut net = rumqttc::NetworkOptions::new();
                net.set_connection_timeout(cfg.uplink.connect_timeout_secs);
                opts.set_clean_session(true);
                let (client, mut eventloop) =
                    AsyncClient::new(opts, usize::from(cfg.uplink.max_inflight) * 2 + 16);
                eventloop.set_network_options(net);
                let end = session(
                    &cfg,
                    url,
                    &client,
                    &mut eventloop,
                    &queue,
                    &wake,
                    &status,
                    &mut shutdown,
                )
                .await;
                if matches!(end, SessionEnd::Shutdown) {
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while eventloop.poll().await.is_ok() {}
                    })
                    .await;
                }
                end
            }
        };
        match end {
            SessionEnd::Shutdown => return,
            SessionEnd::Lost { connected, error } => {
                status.send_modify(|s| {
                    s.connected = false;
                    s.reconnects += 1;
                });
                if connected {
                    backoff = min;
                } else {
                    // Fail over to the next broker after a failed attempt.
                    idx += 1;
                }
                let jitter = Duration::from_millis(now_ms() % (backoff.as_millis() as u64 / 4 + 1));
                tracing::warn!(broker = %url, error = %error, retry_in_ms = (backoff + jitter).as_millis() as u64, "uplink down");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(backoff + jitter) => {}
                }
                if !connected {
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &AgentConfig,
    url: &BrokerUrl,
    client: &AsyncClient,
    eventloop: &mut rumqttc::EventLoop,
    queue: &Arc<dyn UplinkQueue>,
    wake: &Notify,
    status: &watch::Sender<UplinkStatus>,
    shutdown: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let window = usize::from(cfg.uplink.max_inflight);
    let historical = Duration::from_secs(cfg.uplink.historical_after_secs);
    let mut connected = false;
    // Submitted to rumqttc, not yet written (in order) / written, awaiting PUBACK.
    let mut submitted: VecDeque<u64> = VecDeque::new();
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut next_after: Option<u64> = None;
    loop {
        if connected {
            let room = window.saturating_sub(submitted.len() + inflight.len());
            if room > 0 {
                match queue.peek(next_after, room) {
                    Ok(batch) => {
                        let now = now_ms();
                        for r in batch {
                            let env = envelope(&cfg.device_id, &r, historical, now);
                            let topic = match data_topic(&cfg.device_id, &r.series) {
                                Ok(t) => t,
                                Err(e) => {
                                    // Validated at ingest; a record that cannot be sent is
                                    // dropped rather than blocking the queue forever.
                                    tracing::error!(seq = r.seq, error = %e, "record has an unusable series; dropped");
                                    let _ = queue.ack(r.seq);
                                    next_after = Some(r.seq);
                                    continue;
                                }
                            };
                            let body = env.to_json_bytes();
                            if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, body)
                            {
                                return SessionEnd::Lost {
                                    connected,
                                    error: format!("submitting to the MQTT client: {e}"),
                                };
                            }
                            submitted.push_back(r.seq);
                            next_after = Some(r.seq);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "reading the queue failed"),
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return SessionEnd::Shutdown,
            _ = wake.notified(), if connected => {}
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    if ack.code != rumqttc::ConnectReturnCode::Success {
                        return SessionEnd::Lost { connected: false, error: format!("broker refused CONNECT: {:?}", ack.code) };
                    }
                    connected = true;
                    // Start again from the oldest record on disk: whatever was in flight on
                    // the previous connection is resent.
                    submitted.clear();
                    inflight.clear();
                    next_after = None;
                    tracing::info!(broker = %url, "uplink connected");
                    status.send_modify(|s| {
                        s.connected = true;
                        s.broker = Some(url.to_string());
                    });
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(seq) = submitted.pop_front() {
                        inflight.insert(pkid, seq);
                    }
                }
                Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                    if let Some(seq) = inflight.remove(&ack.pkid) {
                        if let Err(e) = queue.ack(seq) {
                            tracing::error!(seq, error = %e, "deleting an acknowledged record failed; it will be sent again");
                        }
                        status.send_modify(|s| s.acked += 1);
                    }
                }
                Ok(_) => {}
                Err(e) => return SessionEnd::Lost { connected, error: e.to_string() },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_protocol::envelope::Payload;

    #[test]
    fn old_records_are_marked_historical() {
        let r = StoredRecord {
            seq: 7,
            series: "line1/temp".into(),
            ts_ms: 1_000_000,
            enqueued_ms: 1_000_000,
            payload: Payload::Json(serde_json::json!(21.5)),
        };
        let fresh = envelope("gw-1", &r, Duration::from_secs(300), 1_000_000 + 1_000);
        assert!(!fresh.historical);
        assert_eq!(fresh.seq, 7);
        assert_eq!(fresh.device, "gw-1");
        let old = envelope("gw-1", &r, Duration::from_secs(300), 1_000_000 + 301_000);
        assert!(old.historical);
    }
}
