//! bulwark-broker: an MQTT 3.1.1 broker for the DMZ.
//!
//! Layout:
//! - [`config`]: the strict TOML configuration and its validation (exit 64 on errors).
//! - [`tls`]: rustls server configuration and certificate identities.
//! - [`listener`]: accept loops with the connection cap and accept back-off.
//! - [`transport`]: TCP, TLS and WebSocket-over-TLS as one byte stream.
//! - [`connection`]: one task per client: CONNECT deadline, packet rules, I/O.
//! - [`session`]: the per-session state machine (queue, in-flight window, QoS 2).
//! - [`router`]: sessions, the subscription trie and retained messages behind one lock.
//! - [`store`]: persistence behind [`store::BrokerStore`] (sled), with group commit.
//! - [`sys`]: the `$SYS/broker/...` topics.
//! - [`metrics`]: the figures behind them, and the Prometheus endpoint (`[metrics]`).
//! - [`logging`]: the main log, the audit counts and the audit file as one tracing layer.
//!
//! [`Broker::start`] runs everything from a validated [`config::Config`]; the binary in
//! `main.rs` adds the command line, logging and signal handling.
#![forbid(unsafe_code)]

pub mod abuse;
pub mod audit;
pub mod auth;
pub mod config;
pub mod connection;
pub mod ctl;
pub mod doctor;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod park;
pub mod reload;
pub mod router;
pub mod session;
pub mod store;
pub mod sys;
pub mod tls;
pub mod transport;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Config, Durability};
use crate::connection::Shared;
use crate::router::Router;
use crate::store::{BrokerStore, FlushCoordinator, NullStore, SledStore, StoreError};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener {name}: {source}")]
    Tls {
        name: String,
        #[source]
        source: tls::TlsSetupError,
    },
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("configuration: {0}")]
    Config(String),
    /// The idle-connection thread or its epoll set could not be created (out of threads,
    /// file descriptors or memory).
    #[error("could not start the idle-connection thread: {0}")]
    Parking(#[source] std::io::Error),
}

impl StartError {
    /// Exit code: 64 for what the operator's configuration or files caused.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Tls { .. } | StartError::Config(_) => config::EXIT_BAD_CONFIG,
            StartError::Store(StoreError::UnknownVersion { .. }) => config::EXIT_BAD_CONFIG,
            StartError::Bind { .. } | StartError::Store(_) | StartError::Parking(_) => 1,
        }
    }
}

/// A running broker.
#[derive(Debug)]
pub struct Broker {
    router: Arc<Router>,
    local_addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
    /// One permit per open connection, out of `limits.max_connections`.
    connections: Arc<tokio::sync::Semaphore>,
    max_connections: usize,
    store: Arc<dyn BrokerStore>,
    durability: Option<FlushCoordinator>,
}

impl Broker {
    /// Opens the store, binds every listener and starts serving. Nothing is served if any
    /// listener fails to bind or any TLS material is unusable.
    pub async fn start(config: Config) -> Result<Broker, StartError> {
        // Registered first, before any listener is bound and announced, so that an early
        // SIGHUP (a reload right after start) cannot take the default action of
        // terminating the process.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut runtimes = Vec::new();
        for l in &config.listeners {
            let name = l.display_name();
            let tls = match &l.tls {
                Some(t) => Some(tls::TlsMaterial::new(t).map_err(|source| StartError::Tls {
                    name: name.clone(),
                    source,
                })?),
                None => None,
            };
            runtimes.push(connection::ListenerRuntime {
                name: name.into(),
                config: l.clone(),
                tls,
            });
        }

        let p = &config.persistence;
        let (store, snapshot): (Arc<dyn BrokerStore>, _) = if p.enabled {
            let path = p.path.clone();
            let cap = p.cache_capacity_bytes;
            let (s, snap) =
                tokio::task::spawn_blocking(move || SledStore::open_or_recover(&path, cap))
                    .await
                    .map_err(|e| StoreError::Io {
                        path: p.path.clone(),
                        source: std::io::Error::other(e.to_string()),
                    })??;
            tracing::info!(path = %s.path().display(), durability = ?p.durability, "persistent store open");
            (Arc::new(s), Some(snap))
        } else {
            tracing::warn!("persistence is disabled: retained messages and persistent sessions are lost on restart");
            (Arc::new(NullStore), None)
        };

        let mut listeners = Vec::new();
        let mut local_addrs = Vec::new();
        for rt in runtimes {
            let sock = tokio::net::TcpListener::bind(rt.config.bind)
                .await
                .map_err(|source| StartError::Bind {
                    name: rt.name.to_string(),
                    addr: rt.config.bind,
                    source,
                })?;
            let addr = sock.local_addr().map_err(|source| StartError::Bind {
                name: rt.name.to_string(),
                addr: rt.config.bind,
                source,
            })?;
            if rt.config.transport == config::Transport::Tcp && !rt.config.is_loopback() {
                tracing::warn!(
                    listener = %rt.name,
                    %addr,
                    "PLAINTEXT MQTT on a network-reachable address (allow_plaintext_on_network = true): passwords and data cross the network unencrypted"
                );
            }
            if rt.config.allow_anonymous && !rt.config.is_loopback() {
                tracing::warn!(listener = %rt.name, %addr, "anonymous clients accepted on a network-reachable address (allow_anonymous_on_network = true)");
            }
            tracing::info!(listener = %rt.name, %addr, transport = ?rt.config.transport, "listening");
            local_addrs.push(addr);
            listeners.push((sock, rt));
        }
        let metrics_sock = if config.metrics.enabled {
            Some(metrics::bind(&config.metrics).await?)
        } else {
            None
        };

        let authority =
            Arc::new(auth::Authority::from_config(&config.auth).map_err(StartError::Config)?);
        if !authority.has_acl_file() {
            tracing::warn!("no ACL file ([auth] acl_file): every authenticated client may publish and subscribe to every topic that does not start with '$'");
        }
        let router = Arc::new(Router::new(config.limits.clone(), store.clone(), authority));
        if let Some(snap) = snapshot {
            router.restore(snap);
        }
        let durability = if p.enabled {
            match p.durability {
                Durability::Sync => Some(FlushCoordinator::start(store.clone(), None)),
                Durability::Periodic => {
                    // Periodic: nobody waits; the coordinator just flushes on its timer.
                    FlushCoordinator::start(
                        store.clone(),
                        Some(Duration::from_millis(p.flush_interval_ms)),
                    );
                    None
                }
            }
        } else {
            None
        };
        let abuse = abuse::AbuseGuard::new(config.abuse.clone())
            .map_err(|e| StartError::Config(format!("abuse.allow_list: {e}")))?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            router: router.clone(),
            durability: durability.clone(),
            abuse,
            tunnel: std::sync::OnceLock::new(),
            parking: park::ParkingLot::start().map_err(StartError::Parking)?,
            shutdown: shutdown_rx.clone(),
        });
        if config.tunnel.enabled {
            let relay = tunnel::start(&shared, config.tunnel.clone());
            let _ = shared.tunnel.set(relay);
            tracing::info!(public_url = %config.tunnel.public_url, path = bulwark_tunnel::proto::PATH, "tunnel relay enabled on the wss listeners");
        }
        let mut tasks = JoinSet::new();
        let conns = Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections));
        let mut runtimes = Vec::with_capacity(listeners.len());
        for (sock, rt) in listeners {
            let rt = Arc::new(rt);
            runtimes.push(rt.clone());
            tasks.spawn(listener::accept_loop(
                sock,
                rt,
                shared.clone(),
                conns.clone(),
                shutdown_rx.clone(),
            ));
        }
        tasks.spawn(sys::run(
            router.clone(),
            config.sys.clone(),
            shutdown_rx.clone(),
        ));
        tasks.spawn(expiry_loop(router.clone(), shutdown_rx.clone()));
        let metrics_addr = metrics_sock.as_ref().map(|(_, addr)| *addr);
        if let Some((sock, _)) = metrics_sock {
            tasks.spawn(metrics::serve(sock, shared.clone(), shutdown_rx.clone()));
        }
        if let Some(path) = &config.ctl.socket {
            let sock = ctl::bind(path)
                .map_err(|e| StartError::Config(format!("[ctl] socket {}: {e}", path.display())))?;
            tracing::info!(socket = %path.display(), "control socket ready");
            tasks.spawn(ctl::serve(
                sock,
                shared.clone(),
                runtimes.clone(),
                shutdown_rx.clone(),
            ));
        }
        tasks.spawn(reload::run(
            runtimes,
            router.clone(),
            config.reload.clone(),
            hup,
            shutdown_rx.clone(),
        ));
        Ok(Broker {
            router,
            local_addrs,
            metrics_addr,
            shutdown,
            tasks,
            shared,
            connections: conns,
            max_connections: config.limits.max_connections,
            store,
            durability,
        })
    }

    /// The bound address of each listener, in configuration order (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The bound address of the metrics endpoint, when `[metrics] enabled = true`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Graceful shutdown: stop accepting, close every connection (no wills), mark
    /// sessions offline and flush the store.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        // Parked connections get a task again, see the shutdown and close.
        self.shared.parking.close();
        while self.tasks.join_next().await.is_some() {}
        // Connections resumed from the parking lot run outside the listeners' task sets;
        // each holds a permit until it has closed.
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        let _ = self.connections.acquire_many(all).await;
        self.router.detach_all();
        if let Some(d) = &self.durability {
            d.durable().await;
        }
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.flush()).await {
            Ok(Ok(())) => tracing::info!("store flushed; shutdown complete"),
            Ok(Err(e)) => tracing::error!(error = %e, "final store flush failed"),
            Err(e) => tracing::error!(error = %e, "final store flush failed"),
        }
    }
}

async fn expiry_loop(router: Arc<Router>, mut shutdown: watch::Receiver<bool>) {
    // Check often enough that a session outlives its expiry by at most a quarter of it
    // (and never more than a minute); the first check runs at start-up.
    let expiry = router.limits().session_expiry_secs;
    let period = Duration::from_secs((expiry / 4).clamp(1, 60));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => { router.expire_sessions(router::unix_now()); }
        }
    }
}
