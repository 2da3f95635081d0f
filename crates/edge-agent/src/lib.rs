//! bulwark-agent: the edge agent that runs on field gateways.
//!
//! Telemetry flows ingest → queue → uplink: a local producer hands records to the agent over
//! a Unix socket, the agent stores them durably and answers "accepted", and the uplink
//! publishes them to the broker as telemetry envelopes, deleting each one only after the
//! broker's PUBACK. The agent opens no listening TCP or UDP socket.
//!
//! - `config`: the strict TOML configuration and its validation.
//! - [`queue`]: the store-and-forward queue: [`queue::UplinkQueue`], its sled implementation
//!   [`queue::SledQueue`] (format version, corrupt store moved aside, disk budget) and
//!   [`queue::GroupCommit`] (one flush serves every producer waiting for it).
//! - `ingest`: the Unix socket local producers write to; submits records through the queue's
//!   group commit.
//! - `uplink`: the outbound MQTT connection (TLS or WebSocket over TLS) that drains the queue.
//! - `sources`: built-in producers (exec, file tail, gateway health).
//! - `tunnel`: the device side of remote sessions (`[tunnel]`): offers arrive on the
//!   uplink's MQTT session, tunnel audit records go through the queue to `devices/<id>/audit`.
//! - `exposure`: the self-check that the gateway listens on no network socket.
//!
//! `fuzzing` (hidden) holds the check the fuzz target in `fuzz/` and the corpus replay test
//! share.
#![forbid(unsafe_code)]

pub mod commands;
pub mod config;
pub mod crash_point;
pub mod exposure;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod ingest;
pub mod queue;
pub mod sources;
pub mod tunnel;
pub mod uplink;
