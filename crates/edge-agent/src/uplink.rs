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
//!
//! Topics: a record is published on `devices/<id>/data/<series>`, except the agent's own
//! audit records (series [`AUDIT_SERIES`], `$audit`: tunnel open, close and refusal), which
//! go to `devices/<id>/audit` in the same telemetry envelope (`"series":"$audit"`, the
//! event as `payload`), with the same PUBACK-driven deletion; see [`record_topic`].
//!
//! With `tunnel.enabled` the agent also subscribes to `$tunnel/<id>/notify` (in the same
//! SUBSCRIBE as `devices/<id>/cmd/#`, after every CONNACK) and hands each offer on exactly
//! that topic to [`TunnelAgent::on_offer`], which runs it in a task of its own (see
//! `crate::tunnel`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulwark_protocol::envelope::{
    data_topic, format_ts, validate_device, EnvelopeError, TelemetryEnvelope,
};
use rumqttc::{
    AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS, SubscribeFilter, TlsConfiguration,
    Transport,
};
use tokio::sync::{watch, Notify};

use crate::commands::{self, CommandLimiter};
use crate::config::{AgentConfig, BrokerUrl};
use crate::health::HealthCollector;
use crate::queue::{QueueError, StoredRecord, UplinkQueue, AUDIT_SERIES};
use crate::tunnel::TunnelAgent;

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
/// attempt, so a broken CA file fails every attempt, and a fixed one is picked up): the
/// same builder the tunnel's operator side uses, with the device certificate.
pub fn tls_config(cfg: &AgentConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let u = &cfg.uplink;
    bulwark_tunnel::operator::client_tls(
        u.ca_file.as_deref(),
        u.use_system_roots,
        Some((&u.cert_file, &u.key_file)),
    )
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
    // Retained "offline" if the connection is lost without a DISCONNECT.
    o.set_last_will(rumqttc::LastWill::new(
        status_topic(&cfg.device_id),
        status_payload("offline", Some("connection lost"), now_ms()),
        QoS::AtLeastOnce,
        true,
    ));
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
    into_envelope(device, r.clone(), historical_after, now_ms)
}

/// [`envelope`], taking the record (its series and payload move into the envelope).
fn into_envelope(
    device: &str,
    r: StoredRecord,
    historical_after: Duration,
    now_ms: u64,
) -> TelemetryEnvelope {
    TelemetryEnvelope {
        v: 1,
        device: device.to_string(),
        seq: r.seq,
        series: r.series,
        ts: format_ts(r.ts_ms),
        historical: now_ms.saturating_sub(r.ts_ms) > historical_after.as_millis() as u64,
        payload: r.payload,
    }
}

/// The topic a stored record is published on: `devices/<id>/audit` for the agent's audit
/// records ([`AUDIT_SERIES`]), `devices/<id>/data/<series>` for everything else.
pub fn record_topic(device: &str, series: &str) -> Result<String, EnvelopeError> {
    if series == AUDIT_SERIES {
        validate_device(device)?;
        return Ok(format!("devices/{device}/audit"));
    }
    data_topic(device, series)
}

/// The retained `devices/<id>/status` payload.
pub fn status_payload(state: &str, reason: Option<&str>, now_ms: u64) -> Vec<u8> {
    let mut v = serde_json::json!({"state": state, "ts": format_ts(now_ms)});
    if let Some(r) = reason {
        v["reason"] = serde_json::Value::from(r);
    }
    v.to_string().into_bytes()
}

enum SessionEnd {
    Shutdown,
    /// The connection failed; `connected` says whether it had been up.
    Lost {
        connected: bool,
        error: String,
    },
}

/// Runs the uplink until `shutdown` turns true. `tunnel` (present when `tunnel.enabled`)
/// lives as long as the agent, across reconnects.
pub async fn run(
    cfg: Arc<AgentConfig>,
    queue: Arc<dyn UplinkQueue>,
    wake: Arc<Notify>,
    status: watch::Sender<UplinkStatus>,
    mut shutdown: watch::Receiver<bool>,
    mut health: HealthCollector,
    tunnel: Option<Arc<TunnelAgent>>,
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
                let mut s = Session {
                    cfg: &cfg,
                    tunnel: tunnel.as_ref(),
                    url,
                    client: &client,
                    queue: &queue,
                    status: &status,
                    health: &mut health,
                    connected: false,
                    submitted: VecDeque::new(),
                    submitted_records: 0,
                    inflight: HashMap::new(),
                    lanes: Lanes::default(),
                    limiter: CommandLimiter::new(cfg.commands.max_per_minute),
                    commands_over_rate: 0,
                    control_dropped: 0,
                    queue_paused_until: None,
                };
                let end = s.run(&mut eventloop, &wake, &mut shutdown).await;
                if matches!(end, SessionEnd::Shutdown) {
                    s.finish(&mut eventloop).await;
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

fn status_topic(device: &str) -> String {
    format!("devices/{device}/status")
}

/// A publish handed to rumqttc, in submission order (rumqttc reports them in that order
/// as `Outgoing::Publish`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// A queued record: deleted on its PUBACK.
    Record(u64),
    /// Status, health or a command result: nothing to delete.
    Control,
}

/// The two lanes of the uplink after a (re)connect.
///
/// Records that had waited in the queue longer than `historical_after_secs` when the
/// connection came up are the backlog (`seq <= boundary`); they are sent at most
/// `backlog_drain_per_sec` per second (a token bucket), oldest first. Everything newer is
/// live and goes out as fast as the in-flight window allows, before backlog records, so new
/// data is never starved behind an outage's backlog. Within each lane records go out in
/// sequence order; live data may overtake the backlog (consumers drop duplicates by
/// `(device, seq)` as a set, and backlog records carry `historical: true`).
#[derive(Debug, Default)]
struct Lanes {
    /// Highest backlog seq, if there is a backlog.
    boundary: Option<u64>,
    backlog_after: Option<u64>,
    live_after: Option<u64>,
    tokens: f64,
    rate: f64,
    burst: f64,
    refilled: Option<Instant>,
}

impl Lanes {
    /// Splits the queue at connect time (binary search on `enqueued_ms`, which grows with
    /// `seq`).
    fn at_connect(
        queue: &dyn UplinkQueue,
        backlog_age: Duration,
        rate: u32,
        window: usize,
    ) -> Result<Lanes, QueueError> {
        let mut lanes = Lanes {
            rate: f64::from(rate.max(1)),
            burst: (window as f64).min(f64::from(rate.max(1))).max(1.0),
            refilled: Some(Instant::now()),
            ..Lanes::default()
        };
        lanes.tokens = lanes.burst;
        let cutoff = now_ms().saturating_sub(backlog_age.as_millis() as u64);
        let Some(first) = queue.peek(None, 1)?.into_iter().next() else {
            return Ok(lanes);
        };
        if first.enqueued_ms >= cutoff {
            return Ok(lanes);
        }
        // Smallest x such that the first record after x is live (or there is none).
        let live_after = |x: u64| -> Result<bool, QueueError> {
            Ok(match queue.peek(Some(x), 1)?.first() {
                None => true,
                Some(r) => r.enqueued_ms >= cutoff,
            })
        };
        let (mut lo, mut hi) = (first.seq, u64::MAX - 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if live_after(mid)? {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lanes.boundary = Some(lo);
        lanes.live_after = Some(lo);
        Ok(lanes)
    }

    fn backlog_pending(&self) -> bool {
        self.boundary.is_some()
    }

    fn refill(&mut self, now: Instant) {
        if let Some(t) = self.refilled {
            let add = now.duration_since(t).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + add).min(self.burst);
        }
        self.refilled = Some(now);
    }

    /// When the next backlog token is due, if the backlog is waiting for one.
    fn next_token_at(&self) -> Option<Instant> {
        if !self.backlog_pending() || self.tokens >= 1.0 {
            return None;
        }
        let wait = (1.0 - self.tokens) / self.rate;
        Some(self.refilled.unwrap_or_else(Instant::now) + Duration::from_secs_f64(wait))
    }
}

struct Session<'a> {
    cfg: &'a Arc<AgentConfig>,
    tunnel: Option<&'a Arc<TunnelAgent>>,
    url: &'a BrokerUrl,
    client: &'a AsyncClient,
    queue: &'a Arc<dyn UplinkQueue>,
    status: &'a watch::Sender<UplinkStatus>,
    health: &'a mut HealthCollector,
    connected: bool,
    /// Handed to rumqttc, not yet written (in order).
    submitted: VecDeque<Sent>,
    /// The `Sent::Record` entries of `submitted`.
    submitted_records: usize,
    /// Records written, awaiting their PUBACK, by packet id.
    inflight: HashMap<u16, u64>,
    lanes: Lanes,
    limiter: CommandLimiter,
    /// Commands ignored for exceeding the rate, this session.
    commands_over_rate: u64,
    /// Status, health or results dropped because rumqttc's request queue was full.
    control_dropped: u64,
    /// After a queue read error, the next attempt.
    queue_paused_until: Option<Instant>,
}

impl Session<'_> {
    fn records_out(&self) -> usize {
        self.inflight.len() + self.submitted_records
    }

    fn publish_record(&mut self, r: StoredRecord) -> Result<(), String> {
        let seq = r.seq;
        let topic = match record_topic(&self.cfg.device_id, &r.series) {
            Ok(t) => t,
            Err(e) => {
                // Validated at ingest; a record that cannot be sent is dropped rather than
                // blocking the queue forever.
                tracing::error!(seq, error = %e, "record has an unusable series; dropped");
                let _ = self.queue.ack(seq);
                return Ok(());
            }
        };
        let historical = Duration::from_secs(self.cfg.uplink.historical_after_secs);
        let env = into_envelope(&self.cfg.device_id, r, historical, now_ms());
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, env.to_json_bytes())
            .map_err(|e| format!("submitting to the MQTT client: {e}"))?;
        self.submitted.push_back(Sent::Record(seq));
        self.submitted_records += 1;
        Ok(())
    }

    /// Publishes status, health or a command result. A full request channel drops it (it
    /// is not queued data) rather than ending the session.
    fn publish_control(&mut self, topic: String, retain: bool, body: Vec<u8>) {
        match self
            .client
            .try_publish(topic.clone(), QoS::AtLeastOnce, retain, body)
        {
            Ok(()) => self.submitted.push_back(Sent::Control),
            Err(e) => {
                self.control_dropped += 1;
                if self.control_dropped.is_power_of_two() {
                    tracing::warn!(topic, error = %e, dropped_total = self.control_dropped, reason = "the MQTT client's request queue is full", "control message dropped");
                }
            }
        }
    }

    /// Hands records to rumqttc while the window has room: live lane first, then the
    /// backlog within its rate.
    fn fill(&mut self) -> Result<(), String> {
        if let Some(t) = self.queue_paused_until {
            if Instant::now() < t {
                return Ok(());
            }
            self.queue_paused_until = None;
        }
        match self.try_fill() {
            Ok(()) => Ok(()),
            Err(FillError::Client(e)) => Err(e),
            Err(FillError::Queue(e)) => {
                tracing::error!(error = %e, "reading the queue failed; retrying in 1 s");
                self.queue_paused_until = Some(Instant::now() + Duration::from_secs(1));
                Ok(())
            }
        }
    }

    fn try_fill(&mut self) -> Result<(), FillError> {
        let window = usize::from(self.cfg.uplink.max_inflight);
        let out = self.records_out();
        let mut room = window.saturating_sub(out);
        // With records out, wait until a quarter of the window is free: one read of the queue
        // then serves many records (each read costs a tree descent in sled, and acks arrive
        // one by one). Records out are acknowledged soon, so nothing waits long.
        if out > 0 && room < (window / 4).max(1) {
            return Ok(());
        }
        if room > 0 {
            let batch = self
                .queue
                .peek(self.lanes.live_after, room)
                .map_err(FillError::Queue)?;
            for r in batch {
                let seq = r.seq;
                self.publish_record(r).map_err(FillError::Client)?;
                self.lanes.live_after = Some(seq);
                room -= 1;
            }
        }
        if room > 0 {
            if let Some(boundary) = self.lanes.boundary {
                self.lanes.refill(Instant::now());
                let n = room.min(self.lanes.tokens as usize);
                if n > 0 {
                    let batch = self
                        .queue
                        .peek(self.lanes.backlog_after, n)
                        .map_err(FillError::Queue)?;
                    let mut done = batch.len() < n;
                    for r in batch {
                        let seq = r.seq;
                        if seq > boundary {
                            done = true;
                            break;
                        }
                        self.publish_record(r).map_err(FillError::Client)?;
                        self.lanes.backlog_after = Some(seq);
                        self.lanes.tokens -= 1.0;
                    }
                    if done || self.lanes.backlog_after == Some(boundary) {
                        tracing::info!("backlog drained");
                        self.lanes.boundary = None;
                    }
                }
            }
        }
        Ok(())
    }

    fn publish_health(&mut self) {
        let report = self.health.report(&**self.queue, &self.status.borrow());
        let body = report.to_json().to_string().into_bytes();
        let topic = format!("devices/{}/health", self.cfg.device_id);
        self.publish_control(topic, false, body);
    }

    /// An incoming PUBLISH: a tunnel offer on exactly `$tunnel/<id>/notify`, else a command.
    fn on_publish(&mut self, topic: &str, payload: &[u8]) {
        if let Some(t) = self.tunnel {
            if topic == t.notify_topic() {
                t.on_offer(self.cfg.clone(), payload.to_vec());
                return;
            }
        }
        self.on_command(topic, payload);
    }

    fn on_command(&mut self, topic: &str, payload: &[u8]) {
        let device = &self.cfg.device_id;
        let Some(name) = commands::command_name(device, topic) else {
            tracing::debug!(
                topic,
                "ignoring a message on a topic the agent did not expect"
            );
            return;
        };
        let name = name.to_string();
        if !self.limiter.allow(Instant::now()) {
            // Over the rate: no answer at all (answering a flood would be a flood), and the
            // audit line only at power-of-two counts.
            self.commands_over_rate += 1;
            if self.commands_over_rate.is_power_of_two() {
                tracing::warn!(
                    target: "audit",
                    event = "command_rate_limited",
                    command = %name,
                    dropped_total = self.commands_over_rate,
                    max_per_minute = self.cfg.commands.max_per_minute,
                    "commands over commands.max_per_minute are ignored without an answer"
                );
            }
            return;
        }
        let request = commands::parse_request(&name, payload, &self.cfg.commands.allow);
        let now = now_ms();
        let body = match request {
            commands::Request::Ping { id } => {
                tracing::info!(target: "audit", event = "command", command = %name, "command answered");
                commands::ok_result(&name, &id, serde_json::json!({"pong": true}), now)
            }
            commands::Request::Health { id } => {
                tracing::info!(target: "audit", event = "command", command = %name, "command answered");
                let report = self.health.report(&**self.queue, &self.status.borrow());
                commands::ok_result(&name, &id, report.to_json(), now)
            }
            commands::Request::Refuse { name, id, reason } => {
                tracing::warn!(target: "audit", event = "command_refused", command = %name, reason = %reason, "command refused");
                commands::error_result(&name, &id, &reason, now)
            }
        };
        self.publish_control(commands::result_topic(device, &name), false, body);
    }

    fn on_connack(&mut self) -> Result<(), QueueError> {
        self.connected = true;
        // Start again from the oldest record on disk: whatever was in flight on the previous
        // connection is resent.
        self.submitted.clear();
        self.submitted_records = 0;
        self.inflight.clear();
        let u = &self.cfg.uplink;
        self.lanes = Lanes::at_connect(
            &**self.queue,
            Duration::from_secs(u.historical_after_secs),
            u.backlog_drain_per_sec,
            usize::from(u.max_inflight),
        )?;
        let device = self.cfg.device_id.clone();
        tracing::info!(broker = %self.url, backlog_until_seq = ?self.lanes.boundary, "uplink connected");
        self.status.send_modify(|s| {
            s.connected = true;
            s.broker = Some(self.url.to_string());
        });
        self.publish_control(
            status_topic(&device),
            true,
            status_payload("online", None, now_ms()),
        );
        // One SUBSCRIBE; the SUBACK's return codes follow this order (see `on_suback`).
        let mut filters = vec![SubscribeFilter::new(
            format!("devices/{device}/cmd/#"),
            QoS::AtLeastOnce,
        )];
        if let Some(t) = self.tunnel {
            filters.push(SubscribeFilter::new(
                t.notify_topic().to_string(),
                QoS::AtLeastOnce,
            ));
        }
        if let Err(e) = self.client.try_subscribe_many(filters) {
            tracing::warn!(error = %e, "cannot subscribe to commands and tunnel offers");
        }
        Ok(())
    }

    /// The SUBACK of the subscription made at CONNACK: `[cmd/#, tunnel notify]`.
    fn on_suback(&self, codes: &[rumqttc::SubscribeReasonCode]) {
        let refused =
            |i: usize| matches!(codes.get(i), Some(rumqttc::SubscribeReasonCode::Failure));
        if refused(0) {
            tracing::warn!("the broker refused the subscription to devices/<id>/cmd/# (check the ACL); remote commands are unavailable");
        }
        if refused(1) {
            tracing::warn!("the broker refused the subscription to $tunnel/<id>/notify (check the ACL: `pattern read $tunnel/%u/notify`); remote sessions are unavailable");
        }
    }

    /// rumqttc wrote the oldest submitted publish with packet id `pkid`: a record now
    /// waits for its PUBACK.
    fn on_outgoing_publish(&mut self, pkid: u16) {
        if let Some(Sent::Record(seq)) = self.submitted.pop_front() {
            self.submitted_records -= 1;
            crate::crash_point::hit(crate::crash_point::Phase::Published);
            self.inflight.insert(pkid, seq);
        }
    }

    fn on_puback(&mut self, pkid: u16) {
        if let Some(seq) = self.inflight.remove(&pkid) {
            crate::crash_point::hit(crate::crash_point::Phase::Acked);
            if let Err(e) = self.queue.ack(seq) {
                tracing::error!(seq, error = %e, "deleting an acknowledged record failed; it will be sent again");
            }
            self.status.send_modify(|s| s.acked += 1);
        }
    }

    /// Clean stop: says "offline" (the will is not published after DISCONNECT), sends
    /// DISCONNECT, and keeps processing PUBACKs until the broker closes the connection (at
    /// most 2 s), so records the broker already has are not sent again at the next start.
    async fn finish(&mut self, eventloop: &mut rumqttc::EventLoop) {
        if self.connected {
            self.publish_control(
                status_topic(&self.cfg.device_id),
                true,
                status_payload("offline", Some("agent stopped"), now_ms()),
            );
        }
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.on_outgoing_publish(pkid),
                    Ok(Event::Incoming(Incoming::PubAck(ack))) => self.on_puback(ack.pkid),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        })
        .await;
    }

    async fn run(
        &mut self,
        eventloop: &mut rumqttc::EventLoop,
        wake: &Notify,
        shutdown: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        let mut health_tick =
            tokio::time::interval(Duration::from_secs(self.cfg.health.interval_secs.max(1)));
        health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.connected {
                if let Err(error) = self.fill() {
                    return SessionEnd::Lost {
                        connected: true,
                        error,
                    };
                }
            }
            let timer = match (self.lanes.next_token_at(), self.queue_paused_until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let connected = self.connected;
            tokio::select! {
                _ = shutdown.changed() => return SessionEnd::Shutdown,
                _ = wake.notified(), if connected => {}
                _ = health_tick.tick(), if connected => self.publish_health(),
                _ = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now).into()), if connected && timer.is_some() => {}
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                        if ack.code != rumqttc::ConnectReturnCode::Success {
                            return SessionEnd::Lost { connected: false, error: format!("broker refused CONNECT: {:?}", ack.code) };
                        }
                        if let Err(e) = self.on_connack() {
                            return SessionEnd::Lost { connected: true, error: format!("reading the queue: {e}") };
                        }
                        health_tick.reset_immediately();
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.on_outgoing_publish(pkid),
                    Ok(Event::Incoming(Incoming::PubAck(ack))) => self.on_puback(ack.pkid),
                    Ok(Event::Incoming(Incoming::SubAck(ack))) => self.on_suback(&ack.return_codes),
                    Ok(Event::Incoming(Incoming::Publish(p))) => self.on_publish(&p.topic, &p.payload),
                    Ok(_) => {}
                    Err(e) => return SessionEnd::Lost { connected: self.connected, error: e.to_string() },
                },
            }
        }
    }
}

enum FillError {
    Client(String),
    Queue(QueueError),
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

    #[test]
    fn audit_records_go_to_the_audit_topic() {
        assert_eq!(
            record_topic("gw-1", AUDIT_SERIES).unwrap(),
            "devices/gw-1/audit"
        );
        assert_eq!(
            record_topic("gw-1", "line1/temp").unwrap(),
            "devices/gw-1/data/line1/temp"
        );
        // Only the exact reserved series; anything else stays under data/.
        assert_eq!(
            record_topic("gw-1", "audit").unwrap(),
            "devices/gw-1/data/audit"
        );
        assert!(record_topic("gw/1", AUDIT_SERIES).is_err());
        // The envelope keeps the series and carries the event as its payload.
        let event = serde_json::json!({"event": "tunnel_open", "session": "s1"});
        let r = StoredRecord {
            seq: 9,
            series: AUDIT_SERIES.into(),
            ts_ms: 1_000_000,
            enqueued_ms: 1_000_000,
            payload: Payload::Json(event.clone()),
        };
        let env = envelope("gw-1", &r, Duration::from_secs(300), 1_000_500);
        let back = TelemetryEnvelope::from_json_slice(&env.to_json_bytes()).unwrap();
        assert_eq!(back.series, "$audit");
        assert_eq!(back.seq, 9);
        assert_eq!(back.payload, Payload::Json(event));
    }
}
