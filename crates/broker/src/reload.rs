//! Hot reload: TLS material (server certificate, key, client CA, CRL), the ACL file and
//! the password file are checked every `reload.watch_interval_secs` and reloaded when a
//! file changed, and on SIGHUP. A reload
//! never drops sessions; a reload that fails keeps the last good configuration and says so
//! loudly. After a CRL change, connected clients whose certificate is now revoked are
//! disconnected.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::config::ReloadConfig;
use crate::connection::ListenerRuntime;
use crate::router::Router;
use crate::tls::Reload;

/// Notices when any of a set of files changed (modification time or size) since the last
/// look. Shared by everything that hot-reloads: TLS material, the ACL, the password file.
#[derive(Debug)]
pub struct FileWatch {
    paths: Vec<PathBuf>,
    last: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl FileWatch {
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a Path>) -> FileWatch {
        let paths: Vec<PathBuf> = paths.into_iter().map(Path::to_path_buf).collect();
        let last = Mutex::new(Self::stamps(&paths));
        FileWatch { paths, last }
    }

    fn stamps(paths: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
        paths
            .iter()
            .map(|p| {
                let m = std::fs::metadata(p).ok()?;
                Some((m.modified().ok()?, m.len()))
            })
            .collect()
    }

    /// True if a file changed since the last call (or `force`); either way the current
    /// state becomes the reference for the next call.
    pub fn changed(&self, force: bool) -> bool {
        let now = Self::stamps(&self.paths);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let changed = force || *last != now;
        *last = now;
        changed
    }
}

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

/// Reloads the ACL and password files if they changed (or `force`), re-checks live
/// subscriptions after an ACL change, and disconnects clients whose user was removed.
pub fn reload_auth(router: &Router, force: bool) {
    use crate::auth::AuthReload;
    for event in router.authority().reload_if_changed(force) {
        match event {
            AuthReload::AclReloaded { rules } => {
                tracing::info!(target: "audit", event = "reload", what = "acl", rules, "ACL reloaded");
                for (client_id, filter) in router.revalidate_subscriptions() {
                    tracing::warn!(
                        target: "audit",
                        event = "subscription_revoked",
                        client_id = %client_id.escape_debug(),
                        filter = %filter.as_str().escape_debug(),
                        "subscription removed: the new ACL no longer grants it"
                    );
                }
            }
            AuthReload::AclFailed(e) => tracing::error!(
                target: "audit",
                event = "reload_failed",
                what = "acl",
                error = %e,
                "ACL reload failed; the last good ACL stays in force"
            ),
            AuthReload::PasswordsReloaded { removed } => {
                tracing::info!(target: "audit", event = "reload", what = "passwords", removed = removed.len(), "password file reloaded");
                if removed.is_empty() {
                    continue;
                }
                let kicked = router.kick_where(|c| {
                    c.via_password
                        && c.identity
                            .as_deref()
                            .is_some_and(|i| removed.iter().any(|r| r == i))
                });
                for c in kicked {
                    tracing::warn!(
                        target: "audit",
                        event = "user_removed",
                        client_id = %c.client_id.escape_debug(),
                        identity = c.identity.as_deref().map(|i| i.escape_debug().to_string()).unwrap_or_default(),
                        "user removed from the password file; disconnected"
                    );
                }
            }
            AuthReload::PasswordsFailed(e) => tracing::error!(
                target: "audit",
                event = "reload_failed",
                what = "passwords",
                error = %e,
                "password file reload failed; the last good file stays in force"
            ),
        }
    }
}

pub async fn run(
    listeners: Vec<Arc<ListenerRuntime>>,
    router: Arc<Router>,
    config: ReloadConfig,
    mut hup: Option<tokio::signal::unix::Signal>,
    mut shutdown: watch::Receiver<bool>,
) {
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
        reload_auth(&router, forced);
    }
}
