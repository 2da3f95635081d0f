//! Accept loops. Each listener accepts, enforces the broker-wide connection cap (a
//! connection over the cap is closed at once and audited), survives accept errors such
//! as EMFILE with a short back-off, and on shutdown waits for its connections to end.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::connection::{self, ListenerRuntime, Shared};
use crate::router::Metrics;

pub async fn accept_loop(
    sock: TcpListener,
    listener: Arc<ListenerRuntime>,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        // Reap finished connection tasks so the set does not grow.
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            r = sock.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: keep serving, try again shortly.
                tracing::error!(listener = %listener.name, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let accepted_at = Instant::now();
        if let Err(refusal) = shared
            .abuse
            .check_address(peer.ip(), accepted_at.into_std())
        {
            Metrics::add(&shared.router.metrics.connections_refused, 1);
            let n = Metrics::get(&shared.router.metrics.connections_refused);
            if n.is_power_of_two() || n % 1000 == 0 {
                tracing::warn!(target: "audit", event = "banned_connection", %peer, listener = %listener.name, refusal = ?refusal, "connection from a banned address closed at accept");
            }
            drop(stream);
            continue;
        }
        if !shared
            .abuse
            .admit_connection(peer.ip(), accepted_at.into_std())
        {
            Metrics::add(&shared.router.metrics.connections_refused, 1);
            let n = Metrics::get(&shared.router.metrics.connections_refused);
            if n.is_power_of_two() || n % 1000 == 0 {
                tracing::warn!(target: "audit", event = "connection_rate_limited", %peer, listener = %listener.name, "connection closed at accept: abuse.connections_per_sec_per_address exceeded");
            }
            drop(stream);
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            Metrics::add(&shared.router.metrics.connections_refused, 1);
            tracing::warn!(
                target: "audit",
                event = "connection_limit",
                %peer,
                listener = %listener.name,
                "connection closed at accept: limits.max_connections reached"
            );
            drop(stream);
            continue;
        };
        conns.spawn(connection::serve(Box::new(connection::Accepted {
            shared: shared.clone(),
            listener: listener.clone(),
            stream,
            peer,
            accepted: accepted_at,
            shutdown: shutdown.clone(),
            permit,
        })));
    }
    drop(sock);
    while conns.join_next().await.is_some() {}
}
