//! bulwark-tunnel: remote SSH and web sessions to gateways that accept no inbound
//! connection, relayed through the broker's port 443.
//!
//! - [`proto`]: the session protocol (first JSON messages, the device offer).
//! - [`ws`]: WebSocket plumbing: the byte-stream adapter, the client connection.
//! - [`frames`]: the relay's view of the yamux stream (stream limit, rule checks); fuzzed.
//! - [`mux`]: yamux over the WebSocket byte stream.
//! - [`relay`]: the broker side: pairs operators with devices, enforces grants and limits.
//! - [`splice`]: the relay's data path between a paired operator and device.
//! - [`device`]: the agent side: answers offers, connects streams to allow-listed services.
//! - [`operator`]: the operator side: open, forward, stdio, list.
#![forbid(unsafe_code)]

pub mod device;
pub mod frames;
#[doc(hidden)]
pub mod fuzzing;
pub mod mux;
pub mod operator;
pub mod proto;
pub mod relay;
pub mod splice;
pub mod ws;
