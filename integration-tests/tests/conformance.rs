//! Table-driven MQTT 3.1.1 conformance and hostile-input test against the real broker.
//!
//! Every row of [`cases`] is one fresh TCP connection to ONE broker (plain TCP listener,
//! anonymous): optionally a valid CONNECT first (its CONNACK `20 02 00 00` consumed), then
//! optional setup exchanges, then the bytes under test, then an expectation:
//!
//! * `Reply(hex)`: exactly these bytes come back and the connection stays open (checked
//!   with PINGREQ `c0 00` -> PINGRESP `d0 00`, which also proves nothing else was sent);
//! * `Close`: the broker closes the connection without sending anything;
//! * `ReplyThenClose(hex)`: exactly these bytes, then close (CONNACK refusals);
//! * `CloseBetween(lo, hi)`: closed, nothing sent, between `lo` and `hi` ms after TCP
//!   connect (the CONNECT deadline, R1).
//!
//! A row may also name the audit event the broker must log for that connection
//! (`event[:field=value,...]`, matched on the connection's `peer`).
//!
//! The ids are those of /work/shared/SECURITY-CASES.md (P1..P14, R1, R5); `V` marks the
//! baseline rows for correct behaviour. All failures are collected and reported together.
//! After the table: a client subscribed to `#` for the whole run must have received only
//! valid topics (nothing malformed or `$`-prefixed forwarded), and a fresh client must
//! complete a normal CONNECT + SUBSCRIBE + PUBLISH round trip.
//!
//! Byte spec syntax (see [`bytes`]): hex pairs, `'text'` raw bytes, `<text>` a UTF-8 string
//! with its two-byte length prefix, `RL` the remaining length of the rest of the packet
//! (computed), `|` separates packets sent in the same write. Deliberately wrong lengths are
//! written as explicit hex.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bulwark_integration_tests::{connect_bytes, hex, BrokerConfig, TestBroker};

const CONNECT_TIMEOUT_SECS: u64 = 2;
const MAX_PACKET_SIZE: usize = 4096;
const MAX_CONNECT_PACKET_SIZE: usize = 1024;
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
const AUDIT_TIMEOUT: Duration = Duration::from_secs(2);
/// A violation before CONNECT must be closed on the spot: a close this late would be the
/// CONNECT deadline (2 s) doing the work instead.
const PRE_AUTH_CLOSE_LIMIT: Duration = Duration::from_millis(1500);
/// Peak broker RSS allowed at the end: far below the 200-256 MB the hostile headers declare.
const MAX_PEAK_RSS_KIB: u64 = 64 * 1024;

// ---------------------------------------------------------------------------------------
// The table

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pre {
    /// The bytes under test are the first bytes of the connection.
    Raw,
    /// A valid CONNECT first, its CONNACK consumed.
    Connected,
}

#[derive(Clone, Copy)]
enum Input {
    Bytes(&'static str),
    /// Send, then `shutdown(Write)`: a truncated packet followed by EOF.
    BytesThenShutdown(&'static str),
    Gen(fn() -> Vec<u8>),
    /// Send nothing.
    Silence,
    /// One byte every `ms` milliseconds.
    Trickle(fn() -> Vec<u8>, u64),
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    Reply(&'static str),
    Close,
    ReplyThenClose(&'static str),
    /// Closed with nothing sent, between these many ms after TCP connect.
    CloseBetween(u64, u64),
}

struct Case {
    id: &'static str,
    name: &'static str,
    pre: Pre,
    setup: &'static [(&'static str, &'static str)],
    input: Input,
    expect: Expect,
    audit: Option<&'static str>,
}

impl Case {
    fn audit(mut self, spec: &'static str) -> Case {
        self.audit = Some(spec);
        self
    }
    fn setup(mut self, s: &'static [(&'static str, &'static str)]) -> Case {
        self.setup = s;
        self
    }
}

fn case(id: &'static str, name: &'static str, pre: Pre, input: Input, expect: Expect) -> Case {
    Case {
        id,
        name,
        pre,
        setup: &[],
        input,
        expect,
        audit: None,
    }
}

/// First bytes of the connection.
fn raw(id: &'static str, name: &'static str, input: Input, expect: Expect) -> Case {
    case(id, name, Pre::Raw, input, expect)
}

/// After a valid CONNECT.
fn post(id: &'static str, name: &'static str, input: Input, expect: Expect) -> Case {
    case(id, name, Pre::Connected, input, expect)
}

/// A violation as the first bytes: closed at once, nothing sent, audited.
fn bad_raw(id: &'static str, name: &'static str, spec: &'static str) -> Case {
    raw(id, name, Input::Bytes(spec), Expect::Close).audit("protocol_error")
}

/// A violation after CONNECT: closed, nothing sent, audited.
fn bad(id: &'static str, name: &'static str, spec: &'static str) -> Case {
    post(id, name, Input::Bytes(spec), Expect::Close).audit("protocol_error")
}

use Expect::{Close, CloseBetween, Reply, ReplyThenClose};
use Input::{Bytes, BytesThenShutdown, Gen, Silence, Trickle};

/// The table. One row per case: id, name, bytes, expectation (see the module doc).
#[rustfmt::skip]
fn cases() -> Vec<Case> {
    vec![
        // ---- P1: remaining length ---------------------------------------------------
        bad_raw("P1", "first packet: PUBLISH with a 5-byte remaining length", "30 ff ff ff ff 01"),
        bad_raw("P1", "first packet: CONNECT with a 5-byte remaining length", "10 ff ff ff ff 01"),
        bad("P1", "PUBLISH with a 5-byte remaining length", "30 ff ff ff ff 01"),
        bad("P1", "PINGREQ with a 5-byte remaining length", "c0 ff ff ff ff 01"),
        bad("P1", "PUBLISH header declaring max_packet_size+1 bytes (header only)", "32 fe 1f"),
        bad("P1", "SUBSCRIBE header declaring 16 KiB > max_packet_size (header only)", "82 80 80 01"),
        // ---- P2: first packet not CONNECT, pre-auth size cap ---------------------------
        bad_raw("P2", "first packet PUBLISH declaring 200 MB (header only)", "30 ff ff ff 5f"),
        bad_raw("P2", "first packet CONNECT declaring 200 MB (header only)", "10 ff ff ff 5f"),
        bad_raw("P2", "first packet small PUBLISH", "30 RL <a/b> 'x'"),
        bad_raw("P2", "first packet SUBSCRIBE", "82 RL 00 01 <a/b> 00"),
        bad_raw("P2", "first packet UNSUBSCRIBE", "a2 RL 00 01 <a/b>"),
        bad_raw("P2", "first packet PINGREQ", "c0 00"),
        bad_raw("P2", "first packet PUBREL", "62 02 00 01"),
        bad_raw("P2", "first packet DISCONNECT", "e0 00"),
        bad_raw("P2", "CONNECT header declaring more than max_connect_packet_size (header only)", "10 80 08"),
        raw("P2", "CONNECT of max_connect_packet_size+1 bytes", Gen(|| connect_total(MAX_CONNECT_PACKET_SIZE + 1)), Close)
            .audit("protocol_error"),
        raw("P2", "CONNECT of exactly max_connect_packet_size bytes is accepted", Gen(|| connect_total(MAX_CONNECT_PACKET_SIZE)), Reply("20 02 00 00")),
        // ---- P3: lengths beyond the packet, truncation ---------------------------------
        bad_raw("P3", "CONNECT protocol name length beyond the packet", "10 RL 00 ff 'MQTT' 04 02 00 3c <c>"),
        bad_raw("P3", "CONNECT client id length beyond the packet", "10 RL <MQTT> 04 02 00 3c 00 ff 'abcd'"),
        bad_raw("P3", "CONNECT will topic length beyond the packet", "10 RL <MQTT> 04 06 00 3c <c> 00 40 'w/t' 00 01 'x'"),
        bad_raw("P3", "CONNECT will payload length beyond the packet", "10 RL <MQTT> 04 06 00 3c <c> <w/t> 00 40 'x'"),
        bad_raw("P3", "CONNECT username length beyond the packet", "10 RL <MQTT> 04 82 00 3c <c> 00 20 'u'"),
        bad_raw("P3", "CONNECT password length beyond the packet", "10 RL <MQTT> 04 c2 00 3c <c> <u> 00 20 'p'"),
        bad_raw("P3", "CONNECT body ends after the protocol level", "10 RL <MQTT> 04"),
        bad_raw("P3", "CONNECT with a byte after the last field", "10 RL <MQTT> 04 02 00 3c <c> 00"),
        raw("P3", "truncated CONNECT then EOF", BytesThenShutdown("10 20 00 04 'MQTT' 04 02 00 3c"), Close),
        raw("P3", "truncated fixed header then EOF", BytesThenShutdown("10 ff"), Close),
        bad("P3", "PUBLISH topic length beyond the packet", "30 RL 00 09 'a/b'"),
        bad("P3", "PUBLISH topic length field cut short", "30 01 00"),
        bad("P3", "PUBLISH QoS 1 with no room for the packet id", "32 RL <a/b>"),
        bad("P3", "SUBSCRIBE filter length beyond the packet", "82 RL 00 01 00 09 'a/b' 00"),
        bad("P3", "SUBSCRIBE filter without its QoS byte", "82 RL 00 01 <a/b>"),
        bad("P3", "UNSUBSCRIBE filter length beyond the packet", "a2 RL 00 01 00 09 'a/b'"),
        bad("P3", "PUBACK with remaining length 3", "40 03 00 01 00"),
        bad("P3", "PUBREL with remaining length 1", "62 01 00"),
        bad("P3", "PINGREQ with remaining length 1", "c0 01 00"),
        bad("P3", "DISCONNECT with remaining length 1", "e0 01 00"),
        post("P3", "truncated PUBLISH then EOF", BytesThenShutdown("30 0a 00 03 'a/b'"), Close)
            .audit("disconnect:reason=connection_closed"),
        post("P3", "truncated SUBSCRIBE then EOF", BytesThenShutdown("82 0a 00 01 00 05"), Close)
            .audit("disconnect:reason=connection_closed"),
        // ---- P4: flags, QoS, empty topic -----------------------------------------------
        bad_raw("P4", "CONNECT with fixed-header flags 0001 (0x11)", "11 RL <MQTT> 04 02 00 3c <c>"),
        bad_raw("P4", "CONNECT reserved flag bit 0 set", "10 RL <MQTT> 04 03 00 3c <c>"),
        bad_raw("P4", "CONNECT will QoS 3", "10 RL <MQTT> 04 1e 00 3c <c> <w/t> <x>"),
        bad_raw("P4", "CONNECT will retain without the will flag", "10 RL <MQTT> 04 22 00 3c <c>"),
        bad_raw("P4", "CONNECT will QoS 1 without the will flag", "10 RL <MQTT> 04 0a 00 3c <c>"),
        bad_raw("P4", "CONNECT password flag without the username flag", "10 RL <MQTT> 04 42 00 3c <c> <p>"),
        bad_raw("P4", "reserved packet type 0 first", "00 00"),
        bad_raw("P4", "reserved packet type 15 first", "f0 00"),
        bad("P4", "PUBACK with flags 0001 (0x41)", "41 02 00 01"),
        bad("P4", "SUBSCRIBE with flags 0000 (0x80)", "80 RL 00 01 <a/b> 00"),
        bad("P4", "UNSUBSCRIBE with flags 0000 (0xa0)", "a0 RL 00 01 <a/b>"),
        bad("P4", "PUBREL with flags 0000 (0x60)", "60 02 00 01"),
        bad("P4", "PINGREQ with flags 0001 (0xc1)", "c1 00"),
        bad("P4", "DISCONNECT with flags 1000 (0xe8)", "e8 00"),
        bad("P4", "PUBLISH QoS 3 (0x36)", "36 RL <a/b> 00 01 'x'"),
        bad("P4", "PUBLISH DUP with QoS 0 (0x38)", "38 RL <a/b> 'x'"),
        bad("P4", "PUBLISH with an empty topic, QoS 0", "30 RL 00 00 'x'"),
        bad("P4", "PUBLISH with an empty topic, QoS 1", "32 RL 00 00 00 01 'x'"),
        bad("P4", "reserved packet type 15 after CONNECT", "f0 00"),
        // ---- P5: UTF-8 -----------------------------------------------------------------
        bad_raw("P5", "client id invalid UTF-8 c3 28", "10 RL <MQTT> 04 02 00 3c 00 02 c3 28"),
        bad_raw("P5", "client id surrogate ed a0 80", "10 RL <MQTT> 04 02 00 3c 00 03 ed a0 80"),
        bad_raw("P5", "client id overlong encoding c0 af", "10 RL <MQTT> 04 02 00 3c 00 02 c0 af"),
        bad_raw("P5", "client id with U+0000", "10 RL <MQTT> 04 02 00 3c 00 03 'a' 00 'b'"),
        bad_raw("P5", "username invalid UTF-8 c3 28", "10 RL <MQTT> 04 82 00 3c <c> 00 02 c3 28"),
        bad_raw("P5", "username surrogate ed a0 80", "10 RL <MQTT> 04 82 00 3c <c> 00 03 ed a0 80"),
        bad_raw("P5", "username with U+0000", "10 RL <MQTT> 04 82 00 3c <c> 00 03 'u' 00 'v'"),
        bad_raw("P5", "will topic invalid UTF-8 c3 28", "10 RL <MQTT> 04 06 00 3c <c> 00 02 c3 28 <x>"),
        bad_raw("P5", "will topic with U+0000", "10 RL <MQTT> 04 06 00 3c <c> 00 03 'w' 00 't' <x>"),
        bad("P5", "PUBLISH topic invalid UTF-8 c3 28", "30 RL 00 04 'a/' c3 28 'x'"),
        bad("P5", "PUBLISH topic surrogate ed a0 80", "30 RL 00 05 'a/' ed a0 80 'x'"),
        bad("P5", "PUBLISH topic with U+0000", "30 RL 00 04 'a/' 00 'b' 'x'"),
        bad("P5", "PUBLISH QoS 1 topic with U+0000", "32 RL 00 04 'a/' 00 'b' 00 01 'x'"),
        bad("P5", "SUBSCRIBE filter invalid UTF-8 c3 28", "82 RL 00 01 00 02 c3 28 00"),
        bad("P5", "SUBSCRIBE filter surrogate ed a0 80", "82 RL 00 01 00 03 ed a0 80 00"),
        bad("P5", "SUBSCRIBE filter with U+0000", "82 RL 00 01 00 03 'a' 00 'b' 00"),
        bad("P5", "UNSUBSCRIBE filter with U+0000", "a2 RL 00 01 00 03 'a' 00 'b'"),
        // ---- P6: wildcards where a topic name is required ------------------------------
        bad("P6", "PUBLISH topic a/+", "30 RL <a/+> 'x'"),
        bad("P6", "PUBLISH topic a/#", "30 RL <a/#> 'x'"),
        bad("P6", "PUBLISH QoS 1 topic #", "32 RL <#> 00 01 'x'"),
        bad("P6", "PUBLISH topic with + inside a level (a/b+c)", "30 RL <a/b+c> 'x'"),
        bad_raw("P6", "will topic w/+", "10 RL <MQTT> 04 06 00 3c <c> <w/+> <x>"),
        bad_raw("P6", "will topic w/#", "10 RL <MQTT> 04 06 00 3c <c> <w/#> <x>"),
        bad("P6", "SUBSCRIBE filter with # not last (a/#/b)", "82 RL 00 01 <a/#/b> 00"),
        bad("P6", "SUBSCRIBE filter with + inside a level (a/b+)", "82 RL 00 01 <a/b+> 00"),
        // ---- P8: SUBSCRIBE / UNSUBSCRIBE payloads --------------------------------------
        bad("P8", "SUBSCRIBE without topic filters", "82 02 00 01"),
        bad("P8", "UNSUBSCRIBE without topic filters", "a2 02 00 01"),
        bad("P8", "SUBSCRIBE requested QoS 3", "82 RL 00 01 <a/b> 03"),
        bad("P8", "SUBSCRIBE requested QoS with reserved bits (0x81)", "82 RL 00 01 <a/b> 81"),
        bad("P8", "SUBSCRIBE second filter with requested QoS 3", "82 RL 00 01 <a/b> 00 <c/d> 03"),
        // ---- P10: server-to-client packets and a second CONNECT from a client ----------
        bad_raw("P10", "first packet CONNACK", "20 02 00 00"),
        bad("P10", "client sends CONNACK", "20 02 00 00"),
        bad("P10", "client sends SUBACK", "90 03 00 01 00"),
        bad("P10", "client sends UNSUBACK", "b0 02 00 01"),
        bad("P10", "client sends PINGRESP", "d0 00"),
        bad("P10", "client sends a second CONNECT", "10 RL <MQTT> 04 02 00 3c <conf-second>"),
        raw("P10", "two CONNECTs in one write", Bytes("10 RL <MQTT> 04 02 00 3c <conf-double> | 10 RL <MQTT> 04 02 00 3c <conf-double>"), ReplyThenClose("20 02 00 00"))
            .audit("protocol_error"),
        // ---- P14: `$` topics are written by the broker only ----------------------------
        post("P14", "PUBLISH QoS 0 to $SYS/x", Bytes("30 RL <$SYS/x> 'x'"), Close)
            .audit("publish_refused:topic=$SYS/x"),
        post("P14", "PUBLISH QoS 1 to $SYS/x", Bytes("32 RL <$SYS/x> 00 01 'x'"), Close)
            .audit("publish_refused:topic=$SYS/x"),
        post("P14", "PUBLISH QoS 2 retained to $SYS/x", Bytes("35 RL <$SYS/x> 00 01 'x'"), Close)
            .audit("publish_refused:topic=$SYS/x"),
        post("P14", "PUBLISH QoS 0 retained to $SYS/broker/uptime", Bytes("31 RL <$SYS/broker/uptime> 'x'"), Close)
            .audit("publish_refused"),
        post("P14", "PUBLISH QoS 0 to $tunnel/x/notify", Bytes("30 RL <$tunnel/x/notify> 'x'"), Close)
            .audit("publish_refused:topic=$tunnel/x/notify"),
        post("P14", "PUBLISH QoS 1 to $tunnel/x/notify", Bytes("32 RL <$tunnel/x/notify> 00 01 'x'"), Close)
            .audit("publish_refused:topic=$tunnel/x/notify"),
        post("P14", "PUBLISH QoS 0 to another $ topic ($foo)", Bytes("30 RL <$foo> 'x'"), Close)
            .audit("publish_refused"),
        raw("P14", "CONNECT with a will on $SYS/w", Bytes("10 RL <MQTT> 04 06 00 3c <conf-will-sys> <$SYS/w> <x>"), ReplyThenClose("20 02 00 05"))
            .audit("connect_refused"),
        // ---- R1: CONNECT deadline, keepalive cap ---------------------------------------
        raw("R1", "TCP connect then silence: closed by the CONNECT deadline", Silence, CloseBetween(1500, 6000))
            .audit("connect_timeout"),
        raw("R1", "CONNECT trickled one byte every 300 ms: closed at the deadline", Trickle(|| connect_bytes("conf-trickle-client-0001"), 300), CloseBetween(1500, 6000))
            .audit("connect_timeout"),
        raw("R1", "half a CONNECT then silence: closed at the deadline", Bytes("10 20 00 04 'MQTT'"), CloseBetween(1500, 6000))
            .audit("connect_timeout"),
        raw("R1", "keepalive 65535 refused", Bytes("10 RL <MQTT> 04 02 ff ff <conf-ka-max>"), ReplyThenClose("20 02 00 02"))
            .audit("connect_refused"),
        raw("R1", "keepalive 3601 (> max_keepalive_secs) refused", Bytes("10 RL <MQTT> 04 02 0e 11 <conf-ka-3601>"), ReplyThenClose("20 02 00 02"))
            .audit("connect_refused"),
        raw("R1", "keepalive 3600 accepted", Bytes("10 RL <MQTT> 04 02 0e 10 <conf-ka-3600>"), Reply("20 02 00 00")),
        raw("R1", "keepalive 0 refused by default", Bytes("10 RL <MQTT> 04 02 00 00 <conf-ka-0>"), ReplyThenClose("20 02 00 02"))
            .audit("connect_refused"),
        // ---- R5: oversized PUBLISH refused from the fixed header -----------------------
        bad("R5", "PUBLISH header declaring 256 MB (header only)", "30 ff ff ff 7f"),
        bad("R5", "PUBLISH QoS 1 header declaring 256 MB, start of a body", "32 ff ff ff 7f 00 03 'a/b' 00 01"),
        post("R5", "PUBLISH QoS 1 of max_packet_size+1 bytes", Gen(|| publish_total(MAX_PACKET_SIZE + 1, 41)), Close)
            .audit("protocol_error"),
        post("R5", "PUBLISH QoS 1 of exactly max_packet_size bytes", Gen(|| publish_total(MAX_PACKET_SIZE, 42)), Reply("40 02 00 2a")),
        post("R5", "PUBLISH QoS 1 of max_packet_size-1 bytes", Gen(|| publish_total(MAX_PACKET_SIZE - 1, 43)), Reply("40 02 00 2b")),
        // ---- V: correct behaviour -------------------------------------------------------
        raw("V", "CONNECT MQIsdp level 3 -> CONNACK 0x01", Bytes("10 RL <MQIsdp> 03 02 00 3c <c>"), ReplyThenClose("20 02 00 01")),
        raw("V", "CONNECT MQTT level 3 -> CONNACK 0x01", Bytes("10 RL <MQTT> 03 02 00 3c <c>"), ReplyThenClose("20 02 00 01")),
        raw("V", "CONNECT MQTT level 5 -> CONNACK 0x01", Bytes("10 RL <MQTT> 05 02 00 3c 00 <c>"), ReplyThenClose("20 02 00 01")),
        bad_raw("V", "CONNECT protocol name MQTX -> close", "10 RL <MQTX> 04 02 00 3c <c>"),
        raw("V", "empty client id with clean session 1 accepted", Bytes("10 RL <MQTT> 04 02 00 3c 00 00"), Reply("20 02 00 00")),
        raw("V", "empty client id with clean session 0 -> CONNACK 0x02", Bytes("10 RL <MQTT> 04 00 00 3c 00 00"), ReplyThenClose("20 02 00 02")),
        raw("V", "client id of 257 bytes (> max_client_id_len) -> CONNACK 0x02", Gen(|| connect_packet(&"x".repeat(257), 60)), ReplyThenClose("20 02 00 02"))
            .audit("connect_refused"),
        raw("V", "CONNECT with will, username and password accepted", Bytes("10 RL <MQTT> 04 ee 00 3c <conf-full> <w/conf> <bye> <user> <pass>"), Reply("20 02 00 00")),
        raw("V", "CONNECT and PINGREQ in one write", Bytes("10 RL <MQTT> 04 02 00 3c <conf-batch> | c0 00"), Reply("20 02 00 00 d0 00")),
        post("V", "PUBLISH QoS 0 (no reply)", Bytes("30 RL <a/b> 'hello'"), Reply("")),
        post("V", "PUBLISH QoS 0 with a binary payload (not UTF-8)", Bytes("30 RL <a/b> c3 28 00 ff"), Reply("")),
        post("V", "PUBLISH QoS 0 to a topic with empty levels (a//b/)", Bytes("30 RL <a//b/> 'x'"), Reply("")),
        post("V", "PUBLISH QoS 0 with 32 topic levels", Gen(|| publish0(&["l"; 32].join("/"))), Reply("")),
        post("V", "PUBLISH QoS 0 with 33 topic levels (> max_topic_levels) -> close", Gen(|| publish0(&["l"; 33].join("/"))), Close)
            .audit("protocol_error"),
        post("V", "PUBLISH retained with an empty payload (clear)", Bytes("31 RL <conf/r>"), Reply("")),
        post("V", "PUBLISH QoS 1 -> PUBACK with the same id", Bytes("32 RL <a/b> 12 34 'hello'"), Reply("40 02 12 34")),
        post("V", "PUBLISH QoS 1 DUP -> PUBACK", Bytes("3a RL <a/b> 12 35 'x'"), Reply("40 02 12 35")),
        post("V", "PUBLISH QoS 2 -> PUBREC", Bytes("34 RL <a/b> 12 36 'x'"), Reply("50 02 12 36")),
        post("V", "QoS 2 flow: PUBREL -> PUBCOMP", Bytes("62 02 12 37"), Reply("70 02 12 37"))
            .setup(&[("34 RL <a/b> 12 37 'x'", "50 02 12 37")]),
        post("V", "QoS 2 duplicate before PUBREL -> PUBREC again", Bytes("3c RL <a/b> 12 38 'x'"), Reply("50 02 12 38"))
            .setup(&[("34 RL <a/b> 12 38 'x'", "50 02 12 38")]),
        post("V", "QoS 1 and QoS 2 PUBLISH in one write", Bytes("32 RL <a/b> 00 0a 'x' | 34 RL <a/b> 00 0b 'y'"), Reply("40 02 00 0a 50 02 00 0b")),
        post("V", "SUBSCRIBE QoS 1 -> SUBACK granting 1", Bytes("82 RL 00 01 <s/1> 01"), Reply("90 03 00 01 01")),
        post("V", "SUBSCRIBE two filters -> SUBACK 02 00", Bytes("82 RL 00 02 <s/2> 02 <s/+/#> 00"), Reply("90 04 00 02 02 00")),
        post("V", "UNSUBSCRIBE -> UNSUBACK", Bytes("a2 RL 00 05 <s/1>"), Reply("b0 02 00 05")),
        post("V", "PINGREQ -> PINGRESP", Bytes("c0 00"), Reply("d0 00")),
        post("V", "two PINGREQs in one write", Bytes("c0 00 | c0 00"), Reply("d0 00 d0 00")),
        // A PINGREQ is a barrier: what was published before it is delivered before its PINGRESP.
        post("V", "PUBLISH to its own subscription, then PINGREQ, in one write -> delivery, then PINGRESP", Bytes("30 RL <own/echo> 'x' | c0 00"), Reply("30 RL <own/echo> 'x' | d0 00"))
            .setup(&[("82 RL 00 01 <own/echo> 00", "90 03 00 01 00")]),
        post("V", "PUBACK for an unknown id is ignored", Bytes("40 02 00 07"), Reply("")),
        post("V", "PUBCOMP for an unknown id is ignored", Bytes("70 02 00 08"), Reply("")),
        post("V", "PUBREC for an unknown id -> PUBREL", Bytes("50 02 00 09"), Reply("62 02 00 09")),
        post("V", "PUBREL for an unknown id -> PUBCOMP", Bytes("62 02 00 0a"), Reply("70 02 00 0a")),
        post("V", "DISCONNECT -> close", Bytes("e0 00"), Close).audit("disconnect:reason=client_disconnect"),
        bad("V", "PUBLISH QoS 1 with packet id 0", "32 RL <a/b> 00 00 'x'"),
        bad("V", "PUBLISH QoS 2 with packet id 0", "34 RL <a/b> 00 00 'x'"),
        bad("V", "SUBSCRIBE with packet id 0", "82 RL 00 00 <a/b> 00"),
        bad("V", "UNSUBSCRIBE with packet id 0", "a2 RL 00 00 <a/b>"),
        bad("V", "PUBACK with packet id 0", "40 02 00 00"),
    ]
}

// ---------------------------------------------------------------------------------------
// Byte builders

/// Parses a byte spec: hex pairs, `'raw'`, `<length-prefixed string>`, `RL` (remaining
/// length of the rest of this packet), `|` (next packet).
fn bytes(spec: &str) -> Vec<u8> {
    let mut all = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let mut rl_at: Option<usize> = None;
    let finish = |out: &mut Vec<u8>, rl_at: &mut Option<usize>, all: &mut Vec<u8>| {
        if let Some(at) = rl_at.take() {
            let body = out.split_off(at);
            out.extend(varint(body.len()));
            out.extend(body);
        }
        all.append(out);
    };
    let mut it = spec.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            c if c.is_whitespace() => {}
            '|' => finish(&mut out, &mut rl_at, &mut all),
            '\'' => {
                let s: String = it.by_ref().take_while(|&x| x != '\'').collect();
                out.extend(s.as_bytes());
            }
            '<' => {
                let s: String = it.by_ref().take_while(|&x| x != '>').collect();
                out.extend((s.len() as u16).to_be_bytes());
                out.extend(s.as_bytes());
            }
            'R' => {
                assert_eq!(it.next(), Some('L'), "bad spec {spec:?}");
                assert!(rl_at.is_none(), "two RL in one packet: {spec:?}");
                rl_at = Some(out.len());
            }
            c if c.is_ascii_hexdigit() => {
                let d = it
                    .next()
                    .filter(char::is_ascii_hexdigit)
                    .unwrap_or_else(|| panic!("odd hex in {spec:?}"));
                out.push(u8::from_str_radix(&format!("{c}{d}"), 16).unwrap());
            }
            other => panic!("unexpected {other:?} in byte spec {spec:?}"),
        }
    }
    finish(&mut out, &mut rl_at, &mut all);
    all
}

/// MQTT variable-length encoding (§2.2.3).
fn varint(mut n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        v.push(b);
        if n == 0 {
            return v;
        }
    }
}

fn packet(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut v = vec![first];
    v.extend(varint(body.len()));
    v.extend(body);
    v
}

fn put_str(v: &mut Vec<u8>, s: &[u8]) {
    v.extend((s.len() as u16).to_be_bytes());
    v.extend(s);
}

/// A valid 3.1.1 CONNECT (clean session) of any size.
fn connect_packet(client_id: &str, keepalive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.extend([4, 0x02]);
    body.extend(keepalive.to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    packet(0x10, body)
}

/// A valid CONNECT (username and password) of exactly `total` bytes (131..=16386).
fn connect_total(total: usize) -> Vec<u8> {
    let rl = total - 3;
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.extend([4, 0xc2, 0, 60]);
    put_str(&mut body, b"conf-big-connect");
    put_str(&mut body, b"u");
    let pw = vec![b'p'; rl - body.len() - 2];
    put_str(&mut body, &pw);
    let v = packet(0x10, body);
    assert_eq!(v.len(), total);
    v
}

/// A PUBLISH QoS 1 to `big/t` of exactly `total` bytes (131..=16386).
fn publish_total(total: usize, pkid: u16) -> Vec<u8> {
    let rl = total - 3;
    let mut body = Vec::new();
    put_str(&mut body, b"big/t");
    body.extend(pkid.to_be_bytes());
    body.resize(rl, b'p');
    let v = packet(0x32, body);
    assert_eq!(v.len(), total);
    v
}

/// A PUBLISH QoS 0 to `topic` with payload `x`.
fn publish0(topic: &str) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic.as_bytes());
    body.push(b'x');
    packet(0x30, body)
}

// ---------------------------------------------------------------------------------------
// Socket helpers

enum Read1 {
    Data(Vec<u8>),
    Closed,
    Timeout,
    Error(String),
}

fn read_some(s: &mut TcpStream, timeout: Duration) -> Read1 {
    if s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .is_err()
    {
        return Read1::Closed;
    }
    let mut buf = [0u8; 8192];
    match s.read(&mut buf) {
        Ok(0) => Read1::Closed,
        Ok(n) => Read1::Data(buf[..n].to_vec()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Read1::Timeout,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) =>
        {
            Read1::Closed
        }
        Err(e) => Read1::Error(e.to_string()),
    }
}

/// Reads exactly `n` bytes; `Err((received, why))` otherwise.
fn read_n(s: &mut TcpStream, n: usize, timeout: Duration) -> Result<Vec<u8>, (Vec<u8>, String)> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err((got, format!("timeout after {timeout:?}")));
        }
        if s.set_read_timeout(Some(left)).is_err() {
            return Err((got, "socket closed".into()));
        }
        let mut buf = vec![0u8; n - got.len()];
        match s.read(&mut buf) {
            Ok(0) => return Err((got, "connection closed by the broker".into())),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err((got, format!("timeout after {timeout:?}")))
            }
            Err(e) => return Err((got, format!("read error: {e}"))),
        }
    }
    Ok(got)
}

/// Reads until the broker closes; `Ok(received)` or `Err` if still open after `timeout`.
fn read_to_close(s: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "connection still open after {timeout:?}; received [{}]",
                hex(&got)
            ));
        }
        match read_some(s, left) {
            Read1::Data(d) => got.extend(d),
            Read1::Closed => return Ok(got),
            Read1::Timeout => {}
            Read1::Error(e) => return Err(format!("read error {e}; received [{}]", hex(&got))),
        }
    }
}

/// One MQTT packet: (first byte, body).
fn read_packet(s: &mut TcpStream, timeout: Duration) -> Result<(u8, Vec<u8>), String> {
    let err = |(got, why): (Vec<u8>, String)| format!("{why} (partial [{}])", hex(&got));
    let first = read_n(s, 1, timeout).map_err(err)?[0];
    let mut rl = 0usize;
    for i in 0..4 {
        let b = read_n(s, 1, timeout).map_err(err)?[0];
        rl |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    let body = read_n(s, rl, timeout).map_err(err)?;
    Ok((first, body))
}

fn connect_raw(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect(addr).map_err(|e| format!("TCP connect failed: {e}"))?;
    s.set_nodelay(true).ok();
    Ok(s)
}

/// A valid CONNECT with its CONNACK `20 02 00 00` consumed.
fn connect_ok(s: &mut TcpStream, client_id: &str) -> Result<(), String> {
    s.write_all(&connect_bytes(client_id))
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    match read_n(s, 4, REPLY_TIMEOUT) {
        Ok(b) if b == [0x20, 2, 0, 0] => Ok(()),
        Ok(b) => Err(format!("valid CONNECT answered [{}]", hex(&b))),
        Err((b, why)) => Err(format!("valid CONNECT: {why}; received [{}]", hex(&b))),
    }
}

// ---------------------------------------------------------------------------------------
// Running a case

fn run_case(b: &TestBroker, addr: SocketAddr, index: usize, c: &Case) -> Result<(), String> {
    let mut s = connect_raw(addr)?;
    let start = Instant::now();
    let peer = s.local_addr().map_err(|e| format!("local_addr: {e}"))?;
    if c.pre == Pre::Connected {
        connect_ok(&mut s, &format!("conf-{index:03}"))?;
    }
    for (send, want) in c.setup {
        let want = bytes(want);
        s.write_all(&bytes(send))
            .map_err(|e| format!("setup send {send:?}: {e}"))?;
        match read_n(&mut s, want.len(), REPLY_TIMEOUT) {
            Ok(got) if got == want => {}
            Ok(got) => {
                return Err(format!(
                    "setup {send:?}: expected [{}], got [{}]",
                    hex(&want),
                    hex(&got)
                ))
            }
            Err((got, why)) => {
                return Err(format!(
                    "setup {send:?}: expected [{}]: {why}; got [{}]",
                    hex(&want),
                    hex(&got)
                ))
            }
        }
    }

    // Send the input. A send error is not itself a failure: the broker may have closed
    // already (that is what Close cases expect); the expectation decides.
    let mut send_note = String::new();
    let mut trickle_result: Option<Result<Vec<u8>, String>> = None;
    match c.input {
        Bytes(spec) => {
            if let Err(e) = s.write_all(&bytes(spec)) {
                send_note = format!(" (send error: {e})");
            }
        }
        BytesThenShutdown(spec) => {
            if let Err(e) = s.write_all(&bytes(spec)) {
                send_note = format!(" (send error: {e})");
            }
            let _ = s.shutdown(Shutdown::Write);
        }
        Gen(f) => {
            if let Err(e) = s.write_all(&f()) {
                send_note = format!(" (send error: {e})");
            }
        }
        Silence => {}
        Trickle(f, ms) => {
            let data = f();
            let mut got = Vec::new();
            let mut closed = false;
            for byte in &data {
                if s.write_all(&[*byte]).is_err() {
                    closed = true;
                    break;
                }
                match read_some(&mut s, Duration::from_millis(ms)) {
                    Read1::Data(d) => got.extend(d),
                    Read1::Closed => {
                        closed = true;
                        break;
                    }
                    Read1::Timeout => {}
                    Read1::Error(e) => return Err(format!("read error while trickling: {e}")),
                }
            }
            trickle_result = Some(if closed {
                Ok(got)
            } else {
                match read_to_close(&mut s, CLOSE_TIMEOUT) {
                    Ok(more) => {
                        got.extend(more);
                        Ok(got)
                    }
                    Err(e) => Err(format!(
                        "whole CONNECT ({} bytes over {:?}) sent and {e}",
                        data.len(),
                        start.elapsed()
                    )),
                }
            });
        }
    }

    match c.expect {
        Reply(want) => {
            let want = bytes(want);
            match read_n(&mut s, want.len(), REPLY_TIMEOUT) {
                Ok(got) if got == want => {}
                Ok(got) => {
                    return Err(format!(
                        "expected [{}], got [{}]{send_note}",
                        hex(&want),
                        hex(&got)
                    ))
                }
                Err((got, why)) => {
                    return Err(format!(
                        "expected [{}]: {why}; got [{}]{send_note}",
                        hex(&want),
                        hex(&got)
                    ))
                }
            }
            // The connection must still be open, with nothing else sent.
            if let Err(e) = s.write_all(&[0xc0, 0]) {
                return Err(format!("reply ok, but PINGREQ could not be sent: {e}"));
            }
            match read_n(&mut s, 2, REPLY_TIMEOUT) {
                Ok(got) if got == [0xd0, 0] => {}
                Ok(got) => {
                    return Err(format!(
                        "reply ok, then PINGREQ answered [{}] instead of [d0 00]",
                        hex(&got)
                    ))
                }
                Err((got, why)) => {
                    return Err(format!(
                        "reply ok, then PINGREQ: {why}; got [{}]",
                        hex(&got)
                    ))
                }
            }
            let _ = s.write_all(&[0xe0, 0]);
        }
        Close => {
            let got = read_to_close(&mut s, CLOSE_TIMEOUT)
                .map_err(|e| format!("expected close: {e}{send_note}"))?;
            if !got.is_empty() {
                return Err(format!(
                    "expected close with nothing sent, got [{}] then close",
                    hex(&got)
                ));
            }
            let took = start.elapsed();
            if c.pre == Pre::Raw && took >= PRE_AUTH_CLOSE_LIMIT {
                return Err(format!(
                    "closed only after {took:?}: the CONNECT deadline ({CONNECT_TIMEOUT_SECS} s) closed it, not the violation"
                ));
            }
        }
        ReplyThenClose(want) => {
            let want = bytes(want);
            let got = read_to_close(&mut s, CLOSE_TIMEOUT)
                .map_err(|e| format!("expected [{}] then close: {e}{send_note}", hex(&want)))?;
            if got != want {
                return Err(format!(
                    "expected [{}] then close, got [{}] then close",
                    hex(&want),
                    hex(&got)
                ));
            }
        }
        CloseBetween(lo, hi) => {
            let result = match trickle_result.take() {
                Some(r) => r,
                None => read_to_close(&mut s, Duration::from_millis(hi + 2000)),
            };
            let took = start.elapsed();
            let got = result.map_err(|e| format!("expected close within {hi} ms: {e}"))?;
            if !got.is_empty() {
                return Err(format!(
                    "expected close with nothing sent, got [{}]",
                    hex(&got)
                ));
            }
            if took < Duration::from_millis(lo) || took > Duration::from_millis(hi) {
                return Err(format!(
                    "closed after {took:?}, expected between {lo} and {hi} ms"
                ));
            }
        }
    }

    if let Some(spec) = c.audit {
        check_audit(b, spec, peer)?;
    }
    Ok(())
}

/// An audit event `event[:k=v,...]` logged for the connection from `peer`.
fn check_audit(b: &TestBroker, spec: &str, peer: SocketAddr) -> Result<(), String> {
    let (event, rest) = spec.split_once(':').unwrap_or((spec, ""));
    let fields: Vec<(&str, &str)> = rest
        .split(',')
        .filter(|f| !f.is_empty())
        .map(|f| f.split_once('=').expect("audit field k=v"))
        .collect();
    let peer = peer.to_string();
    let found = b.process.wait_log(AUDIT_TIMEOUT, |v| {
        v["target"] == "audit"
            && v["event"] == event
            && v["peer"].as_str() == Some(peer.as_str())
            && fields.iter().all(|(k, val)| v[*k].as_str() == Some(*val))
    });
    if found.is_some() {
        return Ok(());
    }
    let seen: Vec<String> = b
        .process
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "audit" && v["peer"].as_str() == Some(peer.as_str()))
        .map(|v| {
            format!(
                "{} {}",
                v["event"].as_str().unwrap_or("?"),
                v["reason"]
                    .as_str()
                    .or(v["detail"].as_str())
                    .or(v["error"].as_str())
                    .unwrap_or("")
            )
        })
        .collect();
    Err(format!(
        "behaviour ok but no audit event {spec}; audit events for this connection: {seen:?}"
    ))
}

// ---------------------------------------------------------------------------------------
// Watcher (subscribed to `#` for the whole run) and the final round trip

/// A PUBLISH topic a client may legitimately receive through `#`.
fn check_delivered_topic(first: u8, body: &[u8]) -> Result<String, String> {
    if body.len() < 2 {
        return Err(format!(
            "PUBLISH {first:02x} with a body of {} bytes",
            body.len()
        ));
    }
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let raw = body
        .get(2..2 + len)
        .ok_or_else(|| format!("PUBLISH topic length beyond the packet: [{}]", hex(body)))?;
    let topic = std::str::from_utf8(raw)
        .map_err(|_| format!("forwarded a non-UTF-8 topic [{}]", hex(raw)))?;
    if topic.is_empty() || topic.contains(['\0', '+', '#']) || topic.starts_with('$') {
        return Err(format!("forwarded an invalid or `$` topic {topic:?}"));
    }
    Ok(topic.to_string())
}

fn start_watcher(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut w = connect_raw(addr)?;
    connect_ok(&mut w, "conf-watcher")?;
    w.write_all(&bytes("82 RL 00 01 <#> 00 <$SYS/x> 00 <$tunnel/#> 00"))
        .map_err(|e| e.to_string())?;
    let (first, body) = read_packet(&mut w, REPLY_TIMEOUT)?;
    if first != 0x90 || body.len() != 5 || body[..2] != [0, 1] || body[2] != 0 {
        return Err(format!("watcher SUBACK [{:02x} {}]", first, hex(&body)));
    }
    Ok(w)
}

/// Drains the watcher, checks every delivered topic, then PINGREQ -> PINGRESP.
fn finish_watcher(w: &mut TcpStream, failures: &mut Vec<String>) {
    let mut topics: BTreeMap<String, usize> = BTreeMap::new();
    let mut check = |first: u8, body: &[u8], failures: &mut Vec<String>| {
        if first >> 4 == 3 {
            match check_delivered_topic(first, body) {
                Ok(t) => *topics.entry(t).or_default() += 1,
                Err(e) => failures.push(format!("[P5/P6/P14] watcher subscribed to #: {e}")),
            }
        }
    };
    if let Err(e) = w.write_all(&[0xc0, 0]) {
        failures.push(format!(
            "[V] watcher (connected for the whole run) was disconnected: {e}"
        ));
        return;
    }
    loop {
        match read_packet(w, REPLY_TIMEOUT) {
            Ok((0xd0, _)) => break,
            Ok((first, body)) => check(first, &body, failures),
            Err(e) => {
                failures.push(format!(
                    "[V] watcher (connected for the whole run) got no PINGRESP: {e}"
                ));
                return;
            }
        }
    }
    if !topics.contains_key("a/b") || !topics.contains_key("final/t") {
        failures.push(format!(
            "[V] watcher subscribed to # should have received a/b and final/t; got {topics:?}"
        ));
    }
    println!("watcher received (topic: count): {topics:?}");
    let _ = w.write_all(&[0xe0, 0]);
}

/// A normal client still works: CONNECT, SUBSCRIBE, PUBLISH QoS 1 and receive it.
fn final_round_trip(addr: SocketAddr) -> Result<(), String> {
    let mut s = connect_raw(addr)?;
    connect_ok(&mut s, "conf-final")?;
    s.write_all(&bytes("82 RL 00 01 <final/t> 01"))
        .map_err(|e| e.to_string())?;
    let suback = read_n(&mut s, 5, REPLY_TIMEOUT)
        .map_err(|(g, why)| format!("SUBACK: {why} [{}]", hex(&g)))?;
    if suback != bytes("90 03 00 01 01") {
        return Err(format!("SUBACK [{}]", hex(&suback)));
    }
    s.write_all(&bytes("32 RL <final/t> 00 02 'hello'"))
        .map_err(|e| e.to_string())?;
    let (mut acked, mut delivered) = (false, false);
    while !(acked && delivered) {
        let (first, body) = read_packet(&mut s, REPLY_TIMEOUT)?;
        match first {
            0x40 if body == [0, 2] => acked = true,
            0x32 => {
                let want = bytes("<final/t>");
                if body.len() < want.len() + 2
                    || body[..want.len()] != want[..]
                    || &body[want.len() + 2..] != b"hello"
                {
                    return Err(format!("delivered PUBLISH [{}]", hex(&body)));
                }
                let id = &body[want.len()..want.len() + 2];
                s.write_all(&[0x40, 2, id[0], id[1]])
                    .map_err(|e| e.to_string())?;
                delivered = true;
            }
            other => return Err(format!("unexpected packet {other:02x} [{}]", hex(&body))),
        }
    }
    let _ = s.write_all(&[0xe0, 0]);
    Ok(())
}

/// Peak resident set size of the broker (VmHWM), in KiB.
fn broker_peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------

#[test]
fn conformance_table() {
    let started = Instant::now();
    let b = TestBroker::start(BrokerConfig {
        tls: false,
        wss: false,
        tcp: true,
        extra: format!(
            "[limits]\nmax_packet_size = {MAX_PACKET_SIZE}\nmax_connect_packet_size = {MAX_CONNECT_PACKET_SIZE}\nconnect_timeout_secs = {CONNECT_TIMEOUT_SECS}\n"
        ),
        ..Default::default()
    });
    let addr = b.addr("tcp");
    let cases = cases();
    {
        let mut names = std::collections::HashSet::new();
        for c in &cases {
            assert!(names.insert(c.name), "duplicate case name {:?}", c.name);
        }
    }

    let mut watcher = start_watcher(addr).expect("watcher");
    let mut failures = Vec::new();
    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, c) in cases.iter().enumerate() {
        *per_id.entry(c.id).or_default() += 1;
        let t = Instant::now();
        let r = run_case(&b, addr, i, c);
        let status = match &r {
            Ok(()) => "ok  ".to_string(),
            Err(_) => "FAIL".to_string(),
        };
        println!("{status} [{}] {} ({:?})", c.id, c.name, t.elapsed());
        if let Err(e) = r {
            let sent = match c.input {
                Bytes(s) | BytesThenShutdown(s) => format!(" sent [{}]", hex(&bytes(s))),
                _ => String::new(),
            };
            failures.push(format!("[{}] {}:{sent} -> {e}", c.id, c.name));
        }
    }

    if let Err(e) = final_round_trip(addr) {
        failures.push(format!("[V] normal client after all cases: {e}"));
    }
    finish_watcher(&mut watcher, &mut failures);

    // P2/R5: headers declaring 200-256 MB must not have made the broker allocate them.
    let peak_kib = broker_peak_rss_kib(b.process.pid());
    match peak_kib {
        Some(kib) if kib > MAX_PEAK_RSS_KIB => failures.push(format!(
            "[P2/R5] broker peak RSS {kib} KiB > {MAX_PEAK_RSS_KIB} KiB after the oversized headers"
        )),
        Some(_) => {}
        None => failures.push("[P2/R5] cannot read the broker's VmHWM".into()),
    }

    println!(
        "{} cases, per id {per_id:?}, broker peak RSS {peak_kib:?} KiB, {} failures, {:?}",
        cases.len(),
        failures.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} conformance checks failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    b.process
        .wait_audit("publish_refused", &[("topic", "$tunnel/x/notify")]);
}
