//! The router: every session, the subscription trie and the retained messages behind one
//! lock, and the operations connection tasks perform on them (attach, publish, subscribe,
//! acknowledge, detach). Every mutation that must survive a restart is written through
//! the [`BrokerStore`]; the caller decides when to wait for durability.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::park::{Signals, Wakeup};
use bulwark_protocol::acl::{AclFile, Principal};
use bulwark_protocol::{
    ConnectReturnCode, Packet, QoS, SubscribeReturnCode, SubscriptionTrie, TopicFilter, TopicName,
};

use crate::auth::Authority;
use crate::config::Limits;
use crate::session::{Enqueued, Message, QueueChange, QueueLimits, Session};
use crate::store::{BrokerStore, SessionRecord, Snapshot, StoreError};

/// Broker-wide counters, published under `$SYS/broker/...`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub clients_connected: AtomicU64,
    pub connections_total: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_dropped: AtomicU64,
    pub connections_refused: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Deliveries not made because the subscriber may not read the topic.
    pub deliveries_denied: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Retained messages with their broker-wide bounds. The broker's own `$SYS` figures are
/// kept here too but do not count against the bounds, which are the clients' budget.
#[derive(Debug, Default)]
pub struct RetainedStore {
    messages: HashMap<TopicName, Arc<Message>>,
    /// Client retained messages (not `$` topics) and their payload bytes.
    counted: usize,
    bytes: usize,
}

/// Outcome of storing a retained message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainOutcome {
    Stored,
    Cleared,
    /// The bound on retained messages or bytes was reached; the message was still routed.
    Refused,
}

impl RetainedStore {
    /// Client retained messages (the `$SYS` figures are not counted).
    pub fn len(&self) -> usize {
        self.counted
    }
    pub fn is_empty(&self) -> bool {
        self.counted == 0
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn set(&mut self, msg: Arc<Message>, limits: &Limits) -> RetainOutcome {
        if msg.topic.is_dollar() {
            if msg.payload.is_empty() {
                self.messages.remove(&msg.topic);
                return RetainOutcome::Cleared;
            }
            self.messages.insert(msg.topic.clone(), msg);
            return RetainOutcome::Stored;
        }
        if msg.payload.is_empty() {
            if let Some(old) = self.messages.remove(&msg.topic) {
                self.bytes -= old.payload.len();
                self.counted -= 1;
            }
            return RetainOutcome::Cleared;
        }
        let old_len = self.messages.get(&msg.topic).map(|m| m.payload.len());
        let count_after = self.counted + usize::from(old_len.is_none());
        let bytes_after = self.bytes - old_len.unwrap_or(0) + msg.payload.len();
        if count_after > limits.max_retained_messages || bytes_after > limits.max_retained_bytes {
            return RetainOutcome::Refused;
        }
        self.bytes = bytes_after;
        self.counted = count_after;
        self.messages.insert(msg.topic.clone(), msg);
        RetainOutcome::Stored
    }

    fn matching<'a>(&'a self, filter: &'a TopicFilter) -> impl Iterator<Item = &'a Arc<Message>> {
        self.messages
            .values()
            .filter(move |m| filter.matches(&m.topic))
    }
}

struct State {
    /// Boxed: the table's spare slots then cost a pointer each, not a whole session.
    sessions: HashMap<Arc<str>, Box<Session>>,
    trie: SubscriptionTrie<Arc<str>, QoS>,
    retained: RetainedStore,
}

/// Why a CONNECT could not take its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachError {
    /// Another identity holds this client id (A5): refused, the holder keeps its session.
    OwnedByAnotherIdentity,
}

/// What a connection gets when it attaches to its session.
#[derive(Debug)]
pub struct Attached {
    pub session_present: bool,
    pub signals: Arc<Signals>,
    /// Packets to resend first (resumed in-flight messages).
    pub resend: Vec<Packet>,
}

/// A live client connection, as operators and revocation see it.
#[derive(Debug, Clone)]
pub struct LiveConnection {
    pub client_id: Arc<str>,
    pub identity: Option<Arc<str>>,
    pub peer: std::net::SocketAddr,
    pub listener: Arc<str>,
    /// Issuer and serial of the client certificate, for revocation.
    /// Boxed: plain-TCP and password clients have none.
    pub revocation_key: Option<Box<crate::tls::RevokedKey>>,
    /// Authenticated with a password (so removing the user cuts it off).
    pub via_password: bool,
    pub tls_version: Option<crate::transport::TlsVersion>,
    /// Unix seconds.
    /// (u32 until 2106: this entry is kept for every connection.)
    pub connected_at: u32,
    /// The connection's signals (kick it with `kick`).
    pub signals: Arc<Signals>,
}

/// Shared broker state. Cheap to reach from every connection task through an `Arc`.
pub struct Router {
    state: Mutex<State>,
    connections: Mutex<HashMap<u64, Box<LiveConnection>>>,
    limits: Limits,
    queue_limits: QueueLimits,
    store: Arc<dyn BrokerStore>,
    authority: Arc<Authority>,
    pub metrics: Metrics,
    next_connection: AtomicU64,
    pub started: Instant,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn log_store_error(e: StoreError) {
    tracing::error!(error = %e, "writing to the persistent store failed");
}

impl Router {
    pub fn new(limits: Limits, store: Arc<dyn BrokerStore>, authority: Arc<Authority>) -> Router {
        let queue_limits = QueueLimits {
            max_inflight: limits.max_inflight,
            max_messages: limits.max_queued_messages,
            max_bytes: limits.max_queued_bytes,
        };
        Router {
            state: Mutex::new(State {
                sessions: HashMap::new(),
                trie: SubscriptionTrie::new(),
                retained: RetainedStore::default(),
            }),
            connections: Mutex::new(HashMap::new()),
            limits,
            queue_limits,
            store,
            authority,
            metrics: Metrics::default(),
            next_connection: AtomicU64::new(1),
            started: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state is still consistent enough
        // to keep serving other clients, so recover the guard rather than cascade.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn queue_limits(&self) -> &QueueLimits {
        &self.queue_limits
    }

    pub fn new_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Loads retained messages and persistent sessions from a snapshot.
    pub fn restore(&self, snap: Snapshot) {
        let mut st = self.lock();
        let st = &mut *st;
        for m in snap.retained {
            let Ok(topic) = TopicName::new(&m.topic) else {
                continue;
            };
            let msg = Arc::new(Message {
                topic,
                payload: m.payload,
                qos: m.qos,
                retain: true,
            });
            st.retained.set(msg, &self.limits);
        }
        for (rec, queued) in snap.sessions {
            let cid: Arc<str> = rec.client_id.as_str().into();
            let mut s = Session::new(cid.clone(), rec.identity.map(Into::into), true);
            s.disconnected_at = if rec.disconnected_at == 0 {
                unix_now()
            } else {
                rec.disconnected_at
            };
            for (f, q) in rec.subscriptions {
                if let Ok(filter) = TopicFilter::new(&f) {
                    st.trie.insert(&filter, cid.clone(), q);
                    s.subscriptions.insert(filter, q);
                }
            }
            s.restore_queue(queued);
            st.sessions.insert(cid, Box::new(s));
        }
        tracing::info!(
            retained = st.retained.len(),
            sessions = st.sessions.len(),
            "restored persistent state"
        );
    }

    fn session_record(s: &Session) -> SessionRecord {
        SessionRecord {
            client_id: s.client_id.to_string(),
            identity: s.identity.as_ref().map(|i| i.to_string()),
            subscriptions: s
                .subscriptions
                .iter()
                .map(|(f, q)| (f.as_str().to_string(), *q))
                .collect(),
            disconnected_at: s.disconnected_at,
        }
    }

    fn persist_change(&self, client_id: &str, change: QueueChange) {
        let r = match change {
            QueueChange::Put { seq, record } => self.store.put_queued(client_id, seq, &record),
            QueueChange::Remove { seq } => self.store.remove_queued(client_id, seq),
        };
        if let Err(e) = r {
            log_store_error(e);
        }
    }

    fn remove_session_locked(&self, st: &mut State, client_id: &Arc<str>) {
        if let Some(s) = st.sessions.remove(client_id) {
            for f in s.subscriptions.keys() {
                st.trie.remove(f, client_id);
            }
            if s.persistent {
                if let Err(e) = self.store.remove_session(client_id) {
                    log_store_error(e);
                }
            }
        }
    }

    /// Attaches connection `conn` to the session `client_id`, taking it over from any
    /// connection of the same identity (that connection is kicked).
    pub fn attach(
        &self,
        client_id: &Arc<str>,
        identity: Option<&Arc<str>>,
        clean_session: bool,
        conn: u64,
    ) -> Result<Attached, AttachError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if let Some(existing) = st.sessions.get(client_id) {
            if existing.identity.as_deref() != identity.map(|i| &**i) {
                return Err(AttachError::OwnedByAnotherIdentity);
            }
            if existing.connection.is_some() {
                existing.signals.notify(Wakeup::Kick);
            }
        }
        let resume = !clean_session && st.sessions.get(client_id).is_some_and(|s| s.persistent);
        if !resume {
            self.remove_session_locked(st, client_id);
            st.sessions.insert(
                client_id.clone(),
                Box::new(Session::new(
                    client_id.clone(),
                    identity.cloned(),
                    !clean_session,
                )),
            );
        }
        let s = st.sessions.get_mut(client_id).expect("inserted above");
        // Fresh signals (a new session has them already), so that a kick meant for the
        // previous connection cannot reach this one.
        if resume {
            s.signals = Arc::default();
        }
        s.connection = std::num::NonZeroU64::new(conn);
        s.disconnected_at = 0;
        if s.persistent {
            if let Err(e) = self.store.put_session(&Self::session_record(s)) {
                log_store_error(e);
            }
        }
        Ok(Attached {
            session_present: resume,
            signals: s.signals.clone(),
            resend: s.resend_inflight(),
        })
    }

    /// The connection went away. A clean session ends; a persistent one stays, offline.
    pub fn detach(&self, client_id: &Arc<str>, conn: u64) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(s) = st.sessions.get_mut(client_id) else {
            return;
        };
        if !s.is_served_by(conn) {
            return; // taken over already
        }
        if s.persistent {
            s.connection = None;
            s.disconnected_at = unix_now();
            if let Err(e) = self.store.put_session(&Self::session_record(s)) {
                log_store_error(e);
            }
        } else {
            self.remove_session_locked(st, client_id);
        }
    }

    /// Whether `conn` still owns the session.
    pub fn owns(&self, client_id: &Arc<str>, conn: u64) -> bool {
        self.lock()
            .sessions
            .get(client_id)
            .is_some_and(|s| s.is_served_by(conn))
    }

    /// Routes a message: retained store, then every matching session. Returns whether
    /// anything was written to the store (the caller then waits for durability before
    /// acknowledging, in `sync` mode).
    pub fn publish(&self, msg: Message) -> bool {
        let msg = Arc::new(msg);
        let mut guard = self.lock();
        self.publish_locked(&mut guard, msg)
    }

    fn publish_locked(&self, st: &mut State, msg: Arc<Message>) -> bool {
        let mut wrote = false;
        // `$SYS` figures are regenerated after a restart; they are never written to disk.
        let durable = !msg.topic.is_dollar();
        if msg.retain {
            match st.retained.set(msg.clone(), &self.limits) {
                RetainOutcome::Stored | RetainOutcome::Cleared if !durable => {}
                RetainOutcome::Stored => {
                    let r = self.store.put_retained(&msg.to_stored(msg.qos, true));
                    if let Err(e) = r {
                        log_store_error(e);
                    }
                    wrote = true;
                }
                RetainOutcome::Cleared => {
                    if let Err(e) = self.store.remove_retained(msg.topic.as_str()) {
                        log_store_error(e);
                    }
                    wrote = true;
                }
                RetainOutcome::Refused => {
                    tracing::warn!(
                        target: "audit",
                        event = "retained_limit",
                        topic = %msg.topic.as_str().escape_debug(),
                        "retained message not stored: limits.max_retained_messages or limits.max_retained_bytes reached"
                    );
                }
            }
        }
        // One delivery per session, at the highest QoS among its matching subscriptions.
        // A session with a single subscription matches once and is served at once; only
        // the matches of sessions with several subscriptions are sorted to find repeats
        // (sorting every match by client id cost a string comparison per step).
        // The trie's keys are borrowed, not cloned: no reference counting per match.
        let State { sessions, trie, .. } = st;
        let acl = self.authority.acl();
        let mut several: Vec<(&Arc<str>, QoS)> = Vec::new();
        trie.for_each_match(&msg.topic, |cid, &sub_qos| {
            let Some(s) = sessions.get_mut(cid) else {
                return;
            };
            if s.subscriptions.len() > 1 {
                several.push((cid, sub_qos));
                return;
            }
            wrote |= self.deliver(s, &acl, &msg, sub_qos);
        });
        if several.len() > 1 {
            // Highest QoS first within each client id, then keep the first of each.
            several.sort_unstable_by(|a, b| a.0.cmp(b.0).then(b.1.cmp(&a.1)));
            several.dedup_by(|later, earlier| later.0 == earlier.0);
        }
        for (cid, sub_qos) in several {
            if let Some(s) = sessions.get_mut(cid) {
                wrote |= self.deliver(s, &acl, &msg, sub_qos);
            }
        }
        wrote
    }

    /// Queues `msg` for `s` (matched by a subscription at `sub_qos`) if the ACL lets it
    /// read the topic.
    fn deliver(&self, s: &mut Session, acl: &AclFile, msg: &Arc<Message>, sub_qos: QoS) -> bool {
        // Every delivery is checked: a subscription granted earlier does not cover topics
        // the subscriber may not read (deny rules, ACL changes).
        if !acl.allows_read(&principal_of(s), &msg.topic) {
            Metrics::add(&self.metrics.deliveries_denied, 1);
            return false;
        }
        let qos = msg.qos.min(sub_qos);
        self.enqueue(s, msg.clone(), qos, false)
    }

    fn enqueue(&self, s: &mut Session, msg: Arc<Message>, qos: QoS, retain: bool) -> bool {
        // The queue takes `msg`; a second reference only where the store needs one.
        let for_store = (s.persistent && qos != QoS::AtMostOnce).then(|| msg.clone());
        match s.enqueue(msg, qos, retain, &self.queue_limits) {
            Enqueued::Queued { seq } => {
                let mut wrote = false;
                if let Some(msg) = for_store {
                    let record = crate::store::QueuedRecord {
                        message: msg.to_stored(qos, retain),
                        pkid: 0,
                        released: false,
                    };
                    if let Err(e) = self.store.put_queued(&s.client_id, seq, &record) {
                        log_store_error(e);
                    }
                    wrote = true;
                }
                if s.is_online() {
                    s.signals.notify(Wakeup::Deliveries);
                }
                wrote
            }
            Enqueued::Skipped => false,
            Enqueued::Dropped => {
                Metrics::add(&self.metrics.messages_dropped, 1);
                if s.dropped.is_power_of_two() {
                    tracing::warn!(
                        target: "audit",
                        event = "queue_full",
                        client_id = %s.client_id.escape_debug(),
                        dropped = s.dropped,
                        "message dropped: the session's queue is at limits.max_queued_messages or limits.max_queued_bytes"
                    );
                }
                false
            }
        }
    }

    /// SUBSCRIBE: adds the subscriptions and queues matching retained messages. `None`
    /// if the connection no longer owns the session.
    /// `allow` is the authorization check of each filter (it logs its own refusals).
    pub fn subscribe(
        &self,
        client_id: &Arc<str>,
        conn: u64,
        filters: &[(TopicFilter, QoS)],
        allow: impl Fn(&TopicFilter) -> bool,
    ) -> Option<(Vec<SubscribeReturnCode>, bool)> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let s = st.sessions.get_mut(client_id)?;
        if !s.is_served_by(conn) {
            return None;
        }
        let mut codes = Vec::with_capacity(filters.len());
        let mut granted = Vec::new();
        // Refusals by bound are audited once per SUBSCRIBE packet (a client asking for
        // 100k subscriptions gets one line, not 100k).
        let mut refused: Option<(&TopicFilter, &'static str, usize)> = None;
        let mut refuse = |f: &'static str, filter| match &mut refused {
            Some((_, _, n)) => *n += 1,
            None => refused = Some((filter, f, 1)),
        };
        for (filter, qos) in filters {
            if !allow(filter) {
                codes.push(SubscribeReturnCode::Failure);
                continue;
            }
            if filter.level_count() > self.limits.max_topic_levels {
                refuse("too many topic levels", filter);
                codes.push(SubscribeReturnCode::Failure);
                continue;
            }
            if !s.subscriptions.contains_key(filter)
                && s.subscriptions.len() >= self.limits.max_subscriptions_per_client
            {
                refuse("limits.max_subscriptions_per_client reached", filter);
                codes.push(SubscribeReturnCode::Failure);
                continue;
            }
            s.subscriptions.insert(filter.clone(), *qos);
            st.trie.insert(filter, client_id.clone(), *qos);
            codes.push(SubscribeReturnCode::Success(*qos));
            granted.push((filter.clone(), *qos));
        }
        if let Some((filter, reason, count)) = refused {
            tracing::warn!(
                target: "audit",
                event = "subscribe_refused",
                client_id = %client_id.escape_debug(),
                filter = %filter.as_str().escape_debug(),
                reason,
                count,
                "subscription(s) refused"
            );
        }
        let mut wrote = false;
        if s.persistent {
            if let Err(e) = self.store.put_session(&Self::session_record(s)) {
                log_store_error(e);
            }
            wrote = true;
        }
        // Retained messages, with the retain flag set (§3.3.1.3), each checked like any
        // other delivery.
        let acl = self.authority.acl();
        for (filter, sub_qos) in granted {
            let who = principal_of(s);
            let matching: Vec<Arc<Message>> = st
                .retained
                .matching(&filter)
                .filter(|m| acl.allows_read(&who, &m.topic))
                .cloned()
                .collect();
            for m in matching {
                let qos = m.qos.min(sub_qos);
                wrote |= self.enqueue(s, m, qos, true);
            }
        }
        Some((codes, wrote))
    }

    /// UNSUBSCRIBE. `None` if the connection no longer owns the session.
    pub fn unsubscribe(
        &self,
        client_id: &Arc<str>,
        conn: u64,
        filters: &[TopicFilter],
    ) -> Option<bool> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let s = st.sessions.get_mut(client_id)?;
        if !s.is_served_by(conn) {
            return None;
        }
        for f in filters {
            if s.subscriptions.remove(f).is_some() {
                st.trie.remove(f, client_id);
            }
        }
        if s.persistent {
            if let Err(e) = self.store.put_session(&Self::session_record(s)) {
                log_store_error(e);
            }
            return Some(true);
        }
        Some(false)
    }

    /// Applies acknowledgements and incoming QoS 2 bookkeeping, then collects what can be
    /// sent now. `f` gets the session. `None` if the connection no longer owns it.
    pub fn with_session<R>(
        &self,
        client_id: &Arc<str>,
        conn: u64,
        f: impl FnOnce(&mut SessionOps<'_>) -> R,
    ) -> Option<R> {
        let mut guard = self.lock();
        let s = guard.sessions.get_mut(client_id)?;
        if !s.is_served_by(conn) {
            return None;
        }
        let mut ops = SessionOps {
            router: self,
            session: s,
            wrote: false,
        };
        Some(f(&mut ops))
    }

    /// Removes persistent sessions whose client has been away longer than
    /// `limits.session_expiry_secs`. Returns how many were removed.
    pub fn expire_sessions(&self, now_unix: u64) -> usize {
        let expiry = self.limits.session_expiry_secs;
        if expiry == 0 {
            return 0;
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let expired: Vec<Arc<str>> = st
            .sessions
            .values()
            .filter(|s| {
                s.connection.is_none()
                    && s.disconnected_at != 0
                    // Whole seconds: `>` so a session never expires early.
                    && now_unix.saturating_sub(s.disconnected_at) > expiry
            })
            .map(|s| s.client_id.clone())
            .collect();
        for cid in &expired {
            tracing::info!(client_id = %cid.escape_debug(), "persistent session expired");
            self.remove_session_locked(st, cid);
        }
        expired.len()
    }

    /// Figures for `$SYS`, the metrics endpoint and tests.
    pub fn stats(&self) -> RouterStats {
        let st = self.lock();
        let mut stats = RouterStats {
            sessions: st.sessions.len(),
            persistent_sessions: 0,
            queued_messages: 0,
            queued_bytes: 0,
            max_queue_depth: 0,
            subscriptions: st.trie.len(),
            retained: st.retained.len(),
            retained_bytes: st.retained.bytes(),
        };
        for s in st.sessions.values() {
            stats.persistent_sessions += usize::from(s.persistent);
            stats.queued_messages += s.queue_len();
            stats.queued_bytes += s.queued_bytes();
            stats.max_queue_depth = stats.max_queue_depth.max(s.queue_len());
        }
        stats
    }

    fn live(&self) -> MutexGuard<'_, HashMap<u64, Box<LiveConnection>>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register_connection(&self, conn: u64, live: LiveConnection) {
        self.live().insert(conn, Box::new(live));
    }

    /// The listener a live connection came in on.
    pub fn listener_of(&self, conn: u64) -> Option<Arc<str>> {
        self.live().get(&conn).map(|c| c.listener.clone())
    }

    pub fn unregister_connection(&self, conn: u64) {
        self.live().remove(&conn);
    }

    /// Whether a connected session of `identity` holds a subscription matching `topic`
    /// (the tunnel relay asks this before offering a session to a device, so an offer is
    /// never published before the device's agent can receive it).
    pub fn identity_subscribed(&self, identity: &str, topic: &TopicName) -> bool {
        self.lock().sessions.values().any(|s| {
            s.connection.is_some()
                && s.identity.as_deref() == Some(identity)
                && s.subscriptions.keys().any(|f| f.matches(topic))
        })
    }

    /// Every live connection, by connection id.
    pub fn live_connections(&self) -> Vec<(u64, LiveConnection)> {
        let mut v: Vec<_> = self
            .live()
            .iter()
            .map(|(k, v)| (*k, LiveConnection::clone(v)))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Disconnects every live connection for which `pred` holds; returns them.
    pub fn kick_where(&self, pred: impl Fn(&LiveConnection) -> bool) -> Vec<LiveConnection> {
        let kicked: Vec<LiveConnection> = self
            .live()
            .values()
            .filter(|c| pred(c))
            .map(|c| LiveConnection::clone(c))
            .collect();
        for c in &kicked {
            c.signals.notify(Wakeup::Kick);
        }
        kicked
    }

    /// After an ACL change: removes every subscription its session may no longer hold.
    /// Returns (client id, filter) of each removed subscription.
    pub fn revalidate_subscriptions(&self) -> Vec<(Arc<str>, TopicFilter)> {
        let authority = self.authority.clone();
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut removed = Vec::new();
        for s in st.sessions.values_mut() {
            let who = principal_of(s);
            let denied: Vec<TopicFilter> = s
                .subscriptions
                .keys()
                .filter(|f| !authority.check_subscribe(&who, f).allowed)
                .cloned()
                .collect();
            for f in denied {
                s.subscriptions.remove(&f);
                st.trie.remove(&f, &s.client_id);
                removed.push((s.client_id.clone(), f));
            }
            if s.persistent && removed.iter().any(|(c, _)| *c == s.client_id) {
                if let Err(e) = self.store.put_session(&Self::session_record(s)) {
                    log_store_error(e);
                }
            }
        }
        removed
    }

    /// Subscriptions the session of `client_id` holds.
    pub fn subscription_count(&self, client_id: &str) -> usize {
        self.lock()
            .sessions
            .get(client_id)
            .map_or(0, |s| s.subscriptions.len())
    }

    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// Marks every connected session offline (used at shutdown so a restart finds them
    /// with a proper `disconnected_at`).
    pub fn detach_all(&self) {
        let mut guard = self.lock();
        let now = unix_now();
        for s in guard.sessions.values_mut() {
            if s.connection.take().is_some() && s.persistent {
                s.disconnected_at = now;
                if let Err(e) = self.store.put_session(&Self::session_record(s)) {
                    log_store_error(e);
                }
            }
        }
    }
}

/// Figures about the router's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterStats {
    pub sessions: usize,
    /// Sessions kept while their client is away (clean session 0).
    pub persistent_sessions: usize,
    /// Messages queued or in flight, summed over every session.
    pub queued_messages: usize,
    /// Payload bytes of those messages.
    pub queued_bytes: usize,
    /// The deepest single session queue (queued and in flight).
    pub max_queue_depth: usize,
    pub subscriptions: usize,
    pub retained: usize,
    pub retained_bytes: usize,
}

/// A session borrowed under the router lock, with its persistence wired in.
pub struct SessionOps<'a> {
    router: &'a Router,
    session: &'a mut Session,
    /// Whether anything was written to the store.
    pub wrote: bool,
}

impl SessionOps<'_> {
    fn apply(&mut self, change: Option<QueueChange>) -> bool {
        match change {
            Some(c) => {
                if self.session.persistent {
                    self.router.persist_change(&self.session.client_id, c);
                    self.wrote = true;
                }
                true
            }
            None => false,
        }
    }

    pub fn on_puback(&mut self, pkid: u16) -> bool {
        let c = self.session.on_puback(pkid);
        self.apply(c)
    }

    pub fn on_pubrec(&mut self, pkid: u16) -> bool {
        let c = self.session.on_pubrec(pkid);
        self.apply(c)
    }

    pub fn on_pubcomp(&mut self, pkid: u16) -> bool {
        let c = self.session.on_pubcomp(pkid);
        self.apply(c)
    }

    pub fn incoming_qos2(&mut self, pkid: u16) -> bool {
        self.session.incoming_qos2(pkid)
    }

    pub fn incoming_pubrel(&mut self, pkid: u16) {
        self.session.incoming_pubrel(pkid)
    }

    /// Moves sendable messages into `out` (within the in-flight window). Each is checked
    /// against the current ACL first: messages queued while the client was away are
    /// dropped if it may no longer read them.
    pub fn drain_outgoing(&mut self, out: &mut Vec<Packet>) {
        let limits = *self.router.queue_limits();
        let acl = self.router.authority.acl();
        // The same ACL snapshot, principal and topic give the same answer: consecutive
        // messages on one topic (the common case) are checked once per drain.
        let mut last: Option<(Arc<Message>, bool)> = None;
        loop {
            if let Some(next) = self.session.peek_pending() {
                let allowed = match &last {
                    Some((m, allowed)) if Arc::ptr_eq(m, next) || m.topic == next.topic => *allowed,
                    _ => {
                        let allowed = acl.allows_read(&principal_of(self.session), &next.topic);
                        last = Some((next.clone(), allowed));
                        allowed
                    }
                };
                if !allowed {
                    Metrics::add(&self.router.metrics.deliveries_denied, 1);
                    let c = self.session.drop_pending_front();
                    self.apply(c);
                    continue;
                }
            }
            match self.session.next_outgoing(&limits) {
                Some((packet, change)) => {
                    self.apply(change);
                    out.push(packet);
                }
                None => break,
            }
        }
    }
}

/// The ACL principal of a session.
pub fn principal_of(s: &Session) -> Principal<'_> {
    Principal {
        identity: s.identity.as_deref(),
        client_id: &s.client_id,
    }
}

/// CONNACK refusal for an attach error.
pub fn attach_refusal(e: AttachError) -> ConnectReturnCode {
    match e {
        AttachError::OwnedByAnotherIdentity => ConnectReturnCode::IdentifierRejected,
    }
}
