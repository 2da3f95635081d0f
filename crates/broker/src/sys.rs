//! `$SYS/broker/...`: broker figures published as retained messages every
//! `sys.interval_secs`. Clients may read these topics (a `#` subscription does not match
//! them, §4.7.2) but never write them.

use std::sync::Arc;
use std::time::Duration;

use bulwark_protocol::{QoS, TopicName};
use bytes::Bytes;
use tokio::sync::watch;

use crate::config::SysConfig;
use crate::metrics::Figures;
use crate::router::Router;
use crate::session::Message;

/// The topics and their current values (from [`Figures`], like the metrics endpoint).
pub fn snapshot(router: &Router) -> Vec<(String, String)> {
    let f = Figures::collect(router);
    let fixed: Vec<(&str, String)> = vec![
        (
            "$SYS/broker/version",
            format!("bulwark-broker {}", crate::VERSION),
        ),
        ("$SYS/broker/uptime", format!("{} seconds", f.uptime_secs)),
        (
            "$SYS/broker/clients/connected",
            f.clients_connected.to_string(),
        ),
        ("$SYS/broker/clients/total", f.router.sessions.to_string()),
        (
            "$SYS/broker/connections/total",
            f.connections_total.to_string(),
        ),
        (
            "$SYS/broker/connections/refused",
            f.connections_refused.to_string(),
        ),
        (
            "$SYS/broker/messages/received",
            f.messages_received.to_string(),
        ),
        ("$SYS/broker/messages/sent", f.messages_sent.to_string()),
        (
            "$SYS/broker/messages/dropped",
            f.messages_dropped.to_string(),
        ),
        ("$SYS/broker/bytes/received", f.bytes_received.to_string()),
        ("$SYS/broker/bytes/sent", f.bytes_sent.to_string()),
        (
            "$SYS/broker/subscriptions/count",
            f.router.subscriptions.to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            f.router.retained.to_string(),
        ),
        ("$SYS/broker/protocol_errors", f.protocol_errors.to_string()),
        ("$SYS/broker/messages/denied", f.messages_denied.to_string()),
    ];
    let mut out: Vec<(String, String)> =
        fixed.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    // One topic per audit event kind seen so far.
    for (event, n) in f.audit {
        out.push((format!("$SYS/broker/audit/{event}"), n.to_string()));
    }
    out
}

/// Publishes the current figures once.
pub fn publish_once(router: &Router) {
    for (topic, value) in snapshot(router) {
        let Ok(topic) = TopicName::new(topic) else {
            continue;
        };
        router.publish(Message {
            topic,
            payload: Bytes::from(value),
            qos: QoS::AtMostOnce,
            retain: true,
        });
    }
}

pub async fn run(router: Arc<Router>, config: SysConfig, mut shutdown: watch::Receiver<bool>) {
    if config.interval_secs == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(config.interval_secs));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => publish_once(&router),
        }
    }
}
