//! bulwark-tunnel: remote SSH and web sessions to gateways that accept no inbound
//! connection, relayed through the broker's port 443.
//!
//! - [`proto`]: the session protocol (first JSON messages, the device offer).
//! - [`ws`]: WebSocket plumbing: the byte-stream adapter, the client connection.
//! - [`frames`]: the relay's view of the yamux stream (stream limit, rule checks); fuzzed.
//! - [`mux`]: yamux over the WebSocket byte stream.
#![forbid(unsafe_code)]

pub mod frames;
pub mod mux;
pub mod proto;
pub mod ws;
