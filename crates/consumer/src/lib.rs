//! `bulwark-consumer`: the enterprise side's telemetry consumer.
//!
//! It connects to the broker over TLS with an application certificate (mutual TLS),
//! subscribes with QoS 1 in a persistent session (`clean_session = false`, so the broker
//! keeps the subscriptions and queues messages while the consumer is away; `--clean-session`
//! for a quick look that leaves nothing behind), drops duplicates by `(device, seq)`,
//! appends each new record to a file as one JSON line, and prints a short line per message.
//!
//! ```text
//! bulwark-consumer --broker mqtts://localhost:8883 --ca-file certs/dev/ca.pem \
//!     --cert certs/dev/clients/app1.pem --key certs/dev/clients/app1.key \
//!     --out data/consumer.jsonl
//! ```
//!
//! # The output file (`--out`)
//!
//! A stable format that other programs (and the end-to-end tests) read. The file is only
//! ever appended to (created with mode 0640); one consumer per file. Each line is one
//! telemetry record, UTF-8 JSON, terminated by `\n`:
//!
//! ```json
//! {"v":1,"device":"gw-1","seq":1234,"series":"line1/temp","ts":"2026-11-27T10:00:00.123Z","historical":false,"payload":21.5,"topic":"devices/gw-1/data/line1/temp","received":"2026-11-27T10:00:00.456Z"}
//! ```
//!
//! - The fields up to `payload` (or `payload_b64` for bytes that are not JSON) are the
//!   telemetry envelope exactly as [`bulwark_protocol::envelope`] defines and serialises it,
//!   in that order; numbers in `payload` are written back exactly as received.
//! - `topic`: the MQTT topic the record arrived on, always `devices/<device>/data/<series>`
//!   (records whose envelope names another device or series than their topic are dropped
//!   and logged, never written).
//! - `received`: when this consumer received it, RFC 3339 UTC with milliseconds.
//! - Only telemetry (`devices/+/data/#`) is written. Status, health, audit and any other
//!   topic subscribed to with `--topic` is printed, not written.
//! - No `(device, seq)` is written twice: duplicates are dropped in memory
//!   ([`dedup`]), and at start the consumer reads the `(device, seq)` of every record
//!   already in the file, so a restart does not write them again either. A line cut short
//!   by a crash is ended with a newline before the next record and is not a record (skip
//!   lines that do not parse).
//! - Lines are in arrival order. `seq` is per device and increases, and order is kept per
//!   series within live data and within the backlog (`"historical":true`) separately; after
//!   an outage live records may come before older historical ones. Sort by `(device, seq)`
//!   for the device's own order.
//! - A record is acknowledged to the broker (PUBACK) only after its line was written to
//!   the file, so a crash of the consumer loses nothing: the broker sends it again.
//!
//! # Terminal output
//!
//! Unless `--quiet`, one line per message on stdout: `gw-1 #1234 line1/temp = 21.5`, with
//! ` (historical)` when the agent flagged the record; audit records as
//! `gw-1 #1240 $audit = {"event":"tunnel_open",...}`; anything else as
//! `devices/gw-1/status: {"state":"online",...}` (cut at 160 characters). Connection
//! events and errors go to stderr (`BULWARK_LOG=debug` for more, duplicates included).
//!
//! Exit codes: 0 stopped by SIGINT or SIGTERM (after a clean DISCONNECT), 1 failure (the
//! message says why: output file not writable, every subscription refused), 64 bad usage
//! or configuration (bad URL, unreadable certificate, key or CA file).

pub mod client;
pub mod dedup;
pub mod record;

pub use client::{run, BrokerUrl, ConsumerOptions, RunError, EXIT_BAD_CONFIG};
