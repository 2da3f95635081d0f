//! Command line: common options (accepted before or after the subcommand) and one
//! subcommand per scenario.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Load generator for Bulwark's `make bench`: drives an MQTT 3.1.1 broker on this machine
/// (loopback only) through one scenario and prints exactly one JSON line with the result
/// on stdout. Progress and diagnostics go to stderr.
///
/// Every line has "scenario", "broker" (--label), "transport" ("tcp" | "tls"), "qos",
/// "duration_s", "gen_cpu_pct" (this process, percent of one core), "broker_cpu_pct" and
/// "broker_rss_kb" (of --broker-pid, null without it) and "timed_out". Clients use clean
/// sessions and keep alive 60 s; all clients connect before the measured interval, which
/// starts at the first publish. Exit codes: 0 result printed (also when --max-seconds ran
/// out: "timed_out": true), 1 run failed, 2 bad usage.
#[derive(Debug, Parser)]
#[command(name = "bulwark-bench", version, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Common options (before or after the subcommand)")]
pub struct CommonArgs {
    /// Broker host: must be loopback (127.0.0.0/8, ::1 or localhost).
    #[arg(long, global = true, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, global = true, default_value_t = 1883)]
    pub port: u16,
    /// Connect with TLS (needs --ca; --cert and --key add a client certificate).
    #[arg(long, global = true)]
    pub tls: bool,
    /// PEM CA certificate that verifies the broker's certificate.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS.
    #[arg(long, global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Name the broker's certificate must carry.
    #[arg(long, global = true, default_value = "localhost")]
    pub server_name: String,
    /// Broker name reported in the "broker" field.
    #[arg(long, global = true, value_name = "NAME", default_value = "unknown")]
    pub label: String,
    /// Broker process to measure (CPU from /proc/PID/stat, VmRSS from /proc/PID/status).
    #[arg(long, global = true, value_name = "PID")]
    pub broker_pid: Option<u32>,
    /// Overall deadline: the scenario ends, reports what arrived and exits 0 with
    /// "timed_out": true.
    #[arg(long, global = true, value_name = "N", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_seconds: u64,
    /// MQTT username for every client.
    #[arg(long, global = true)]
    pub username: Option<String>,
    /// MQTT password for every client.
    #[arg(long, global = true)]
    pub password: Option<String>,
    /// Client id prefix; ids are <prefix>-<role>-<i>-<pid>.
    #[arg(long, global = true, default_value = "bench")]
    pub client_prefix: String,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Many publishers, one subscriber: broker ingest and routing throughput.
    ///
    /// Publisher i publishes --messages/--publishers messages to bench/fanin/<i>; one
    /// subscriber on bench/fanin/+ (same QoS) receives them all. Ends when every message
    /// arrived, 5 s after the last arrival once publishers are done, or at --max-seconds.
    /// Fields: publishers, subscribers, sent, received (distinct), lost, duplicates,
    /// msgs_per_s (received / seconds from the first publish to the last delivery).
    FanIn(FanInArgs),
    /// One publisher, many subscribers: broker delivery (fan-out) throughput.
    ///
    /// One publisher sends --messages to bench/fanout; each of --subscribers receives
    /// them all. Fields: publishers, subscribers, sent (= messages x subscribers expected
    /// deliveries), received, lost, duplicates, msgs_per_s (deliveries per second).
    FanOut(FanOutArgs),
    /// End-to-end latency at a fixed publish rate.
    ///
    /// One publisher sends --messages to bench/latency at --rate messages per second
    /// (absolute schedule, no drift); one subscriber measures publish-to-delivery time
    /// from the send timestamp in each payload. Fields: sent, received, lost, p50_us,
    /// p99_us, p999_us, max_us, mean_us (exact nearest-rank percentiles).
    Latency(LatencyArgs),
    /// Memory per idle connection.
    ///
    /// Opens --clients connections (TCP [+ TLS] + CONNECT/CONNACK, at most --concurrency
    /// at a time), keeps them idle, and reads the broker's VmRSS before any connect and
    /// once it is stable after all are connected. Needs --broker-pid. Fields: clients,
    /// connected, failed, connects_per_s, rss_before_kb, rss_after_kb, bytes_per_conn.
    ConnScale(ConnScaleArgs),
    /// Connection setup rate: full TCP [+ TLS with client certificate] + CONNECT/CONNACK
    /// handshakes, then DISCONNECT.
    ///
    /// TLS session resumption is off, so each connection pays for a full handshake.
    /// Fields: connections, failed, handshakes_per_s, p50_ms, p99_ms (connect-to-CONNACK
    /// time per connection).
    Handshake(HandshakeArgs),
    /// Retained-message delivery to new subscribers.
    ///
    /// Publishes --topics retained QoS 1 messages to bench/retained/<i> (all acknowledged),
    /// then --subscribers already-connected clients subscribe to bench/retained/# at once
    /// (QoS 1). Measured from the SUBSCRIBEs to the last retained delivery. The retained
    /// messages are cleared afterwards. Fields: topics, subscribers, sent (= topics x
    /// subscribers), received, lost, duplicates, msgs_per_s.
    Retained(RetainedArgs),
}

#[derive(Debug, Args)]
pub struct QosArgs {
    /// QoS of publishes and subscriptions (0 or 1).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
}

#[derive(Debug, Args)]
pub struct PayloadArgs {
    /// Payload size in bytes (at least 24: publisher, sequence and send time).
    #[arg(long, value_name = "BYTES", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(0..=16 * 1024 * 1024))]
    pub payload: u32,
}

#[derive(Debug, Args)]
pub struct WindowArgs {
    /// Most unacknowledged QoS 1 publishes per publisher.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub window: u32,
}

#[derive(Debug, Args)]
pub struct FanInArgs {
    /// Number of publishers.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub publishers: u32,
    /// Messages in total (split evenly over the publishers).
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    #[command(flatten)]
    pub qos: QosArgs,
    #[command(flatten)]
    pub payload: PayloadArgs,
    #[command(flatten)]
    pub window: WindowArgs,
}

#[derive(Debug, Args)]
pub struct FanOutArgs {
    /// Number of subscribers.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub subscribers: u32,
    /// Messages published (each subscriber should receive all of them).
    #[arg(long, default_value_t = 20_000)]
    pub messages: u64,
    #[command(flatten)]
    pub qos: QosArgs,
    #[command(flatten)]
    pub payload: PayloadArgs,
    #[command(flatten)]
    pub window: WindowArgs,
}

#[derive(Debug, Args)]
pub struct LatencyArgs {
    /// Publish rate, messages per second.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub rate: u64,
    /// Messages to publish.
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    #[command(flatten)]
    pub qos: QosArgs,
    #[command(flatten)]
    pub payload: PayloadArgs,
}

#[derive(Debug, Args)]
pub struct ConnScaleArgs {
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: u32,
    /// Most connects in flight at once.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
}

#[derive(Debug, Args)]
pub struct HandshakeArgs {
    /// Connections to make, one after another per concurrency slot.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// Most handshakes in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
}

#[derive(Debug, Args)]
pub struct RetainedArgs {
    /// Retained topics to publish (bench/retained/0 ..).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub topics: u32,
    /// Subscribers that subscribe to bench/retained/# at once.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub subscribers: u32,
    #[command(flatten)]
    pub payload: PayloadArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn common_options_go_before_or_after_the_subcommand() {
        let a = Cli::try_parse_from(["b", "--port", "1999", "fan-in", "--qos", "1"]).unwrap();
        let b = Cli::try_parse_from(["b", "fan-in", "--qos", "1", "--port", "1999"]).unwrap();
        assert_eq!(a.common.port, 1999);
        assert_eq!(b.common.port, 1999);
        assert!(
            matches!(b.scenario, Scenario::FanIn(ref f) if f.qos.qos == 1 && f.publishers == 10)
        );
        assert!(Cli::try_parse_from(["b", "fan-in", "--qos", "2"]).is_err());
        assert!(Cli::try_parse_from(["b", "handshake", "--window", "3"]).is_err());
    }
}
