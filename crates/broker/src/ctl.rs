//! Operations over a Unix socket that only the broker's user can use (mode 0600): list
//! sessions, disconnect a client, list, add and lift bans, reload. One JSON request per
//! line, one JSON reply per line; `bulwark-broker ctl` is the client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::connection::{ListenerRuntime, Shared};

/// `[ctl]` in the broker configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    /// Path of the control socket (created 0600). Without it there is no control socket.
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

/// A request to the running broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Sessions,
    Kick { client_id: String },
    Bans,
    Ban { address: String, seconds: u64 },
    Unban { what: String },
    Reload,
}

/// One live client, as `sessions` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub client_id: String,
    pub identity: Option<String>,
    pub address: String,
    pub listener: String,
    pub tls_version: Option<String>,
    pub subscriptions: usize,
    pub connected_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanInfo {
    /// An address, or `user:NAME`.
    pub what: String,
    pub remaining_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Sessions {
        ok: bool,
        sessions: Vec<SessionInfo>,
    },
    Bans {
        ok: bool,
        bans: Vec<BanInfo>,
    },
    Done {
        ok: bool,
        message: String,
    },
    Error {
        ok: bool,
        error: String,
    },
}

fn done(message: impl Into<String>) -> Reply {
    Reply::Done {
        ok: true,
        message: message.into(),
    }
}

fn error(e: impl Into<String>) -> Reply {
    Reply::Error {
        ok: false,
        error: e.into(),
    }
}

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// Binds the control socket (0600; a stale socket file from a previous run is replaced).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        // Only replace a socket, never a regular file someone pointed us at.
        let meta = std::fs::symlink_metadata(path)?;
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::other(format!(
                "{} exists and is not a socket; remove it or choose another [ctl] socket",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::other(format!(
                "{} is in use by another running broker",
                path.display()
            )));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    listeners: Vec<Arc<ListenerRuntime>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.changed() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (shared, listeners) = (shared.clone(), listeners.clone());
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(30), handle(stream, &shared, &listeners))
                    .await;
        });
    }
}

async fn handle(
    stream: UnixStream,
    shared: &Shared,
    listeners: &[Arc<ListenerRuntime>],
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_REQUEST as u64 * 16)).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = if line.len() > MAX_REQUEST {
            error("request too long")
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(req) => execute(req, shared, listeners),
                Err(e) => error(format!("bad request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

use tokio::io::AsyncReadExt;

/// Carries out one request.
pub fn execute(req: Request, shared: &Shared, listeners: &[Arc<ListenerRuntime>]) -> Reply {
    let router = &shared.router;
    let now = Instant::now();
    tracing::info!(target: "audit", event = "ctl", request = ?req, "control request");
    match req {
        Request::Sessions => {
            let sessions = router
                .live_connections()
                .into_iter()
                .map(|(_, c)| SessionInfo {
                    subscriptions: router.subscription_count(&c.client_id),
                    client_id: c.client_id.to_string(),
                    identity: c.identity.as_deref().map(str::to_string),
                    address: c.peer.to_string(),
                    listener: c.listener.to_string(),
                    tls_version: c.tls_version.map(|v| v.as_str().to_string()),
                    connected_at: u64::from(c.connected_at),
                })
                .collect();
            Reply::Sessions { ok: true, sessions }
        }
        Request::Kick { client_id } => {
            let kicked = router.kick_where(|c| *c.client_id == *client_id);
            if kicked.is_empty() {
                error(format!("no connected client with client id {client_id:?}"))
            } else {
                tracing::warn!(target: "audit", event = "kicked", client_id = %client_id.escape_debug(), "client disconnected by an operator");
                done(format!("disconnected {client_id}"))
            }
        }
        Request::Bans => Reply::Bans {
            ok: true,
            bans: shared
                .abuse
                .bans(now)
                .into_iter()
                .map(|(what, d)| BanInfo {
                    what,
                    remaining_secs: d.as_secs(),
                })
                .collect(),
        },
        Request::Ban { address, seconds } => match address.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                shared
                    .abuse
                    .ban_address(ip, Duration::from_secs(seconds), now);
                let kicked = router.kick_where(|c| c.peer.ip() == ip);
                tracing::warn!(target: "audit", event = "ban", address = %ip, seconds, by = "operator", "address banned by an operator");
                done(format!(
                    "banned {ip} for {seconds} s; disconnected {} client(s)",
                    kicked.len()
                ))
            }
            Err(_) => error(format!("{address:?} is not an IP address")),
        },
        Request::Unban { what } => {
            if shared.abuse.lift(&what, now) {
                tracing::info!(target: "audit", event = "unban", what = %what.escape_debug(), "ban lifted by an operator");
                done(format!("lifted the ban on {what}"))
            } else {
                error(format!("no ban in force on {what:?}"))
            }
        }
        Request::Reload => {
            crate::reload::reload_all(listeners, router, true);
            crate::reload::reload_auth(router, true);
            done("reloaded TLS material, ACL and password file (see the audit log for failures)")
        }
    }
}

/// Client side: sends one request and returns the reply.
pub async fn request(socket: &Path, req: &Request) -> Result<Reply, String> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "cannot reach the broker at {}: {e}; is it running, and are you its user?",
            socket.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    w.write_all(&line).await.map_err(|e| e.to_string())?;
    w.shutdown().await.map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(r).lines();
    let reply = lines
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the broker closed the control connection without a reply")?;
    serde_json::from_str(&reply).map_err(|e| format!("unreadable reply {reply:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_stable_json() {
        let r: Request = serde_json::from_str(r#"{"cmd":"kick","client_id":"gw-1"}"#).unwrap();
        assert_eq!(
            r,
            Request::Kick {
                client_id: "gw-1".into()
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"cmd":"ban","address":"192.0.2.1","seconds":60}"#).unwrap();
        assert!(matches!(r, Request::Ban { seconds: 60, .. }));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"shutdown"}"#).is_err());
        let j = serde_json::to_string(&done("x")).unwrap();
        assert_eq!(j, r#"{"ok":true,"message":"x"}"#);
    }
}
