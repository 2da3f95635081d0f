//! Hot reload: TLS material (server certificate, key, client CA, CRL) is checked every
//! `reload.watch_interval_secs` and rebuilt when a file changed, and on SIGHUP. A reload
//! never drops sessions; a reload that fails keeps the last good configuration and says so
//! loudly. After a CRL change, connected clients whose certificate is now revoked are
//! disconnected.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::ReloadConfig;
use crate::connection::ListenerRuntime;
use crate::router::Router;
use crate::tls::Reload;

/// Checks every listener once; `force` rebuilds even if no file changed (SIGHUP).
pub fn reload_all(listeners: &[Arc<ListenerRuntime>], router: &Router, force: bool) {
    for l in listeners {
        let Some(material) = &l.tls else { continue };
        match material.reload_if_changed(force) {
            Reload::Unchanged => {}
            Reload::Reloaded => {
                tracing::info!(
                    target: "audit",
                    event = "reload",
                    listener = %l.name,
                    what = "tls",
                    "TLS material reloaded"
                );
                let revoked = material.revoked();
                if revoked.is_empty() {
                    continue;
                }
                let kicked = router.kick_where(|c| {
                    c.listener == l.name
                        && c.revocation_key
                            .as_ref()
                            .is_some_and(|k| revoked.contains(k))
                });
                for c in kicked {
                    tracing::warn!(
                        target: "audit",
                        event = "certificate_revoked",
                        listener = %l.name,
                        peer = %c.peer,
                        client_id = %c.client_id.escape_debug(),
                        identity = c.identity.as_deref().map(|i| i.escape_debug().to_string()).unwrap_or_default(),
                        "client certificate revoked by the new CRL; disconnected"
                    );
                }
            }
            Reload::Failed(e) => {
                tracing::error!(
                    target: "audit",
                    event = "reload_failed",
                    listener = %l.name,
                    what = "tls",
                    error = %e,
                    "TLS reload failed; the last good configuration stays in force"
                );
            }
        }
    }
}

pub async fn run(
    listeners: Vec<Arc<ListenerRuntime>>,
    router: Arc<Router>,
    config: ReloadConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let period = Duration::from_secs(config.watch_interval_secs.max(1));
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        let forced = tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick(), if config.watch_interval_secs > 0 => false,
            Some(()) = async { match &mut hup { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading");
                true
            }
        };
        reload_all(&listeners, &router, forced);
    }
}
