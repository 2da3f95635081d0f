//! What the consumer does with one message: classify its topic, check the envelope, drop
//! duplicates, write the JSON line, and say what to print. No network here, so all of it
//! is tested without a broker.

use std::io::{self, BufRead, Write};

use bulwark_protocol::envelope::{format_ts, Payload, TelemetryEnvelope};
use serde::Deserialize;

use crate::dedup::Dedup;

/// Characters of a payload shown on a terminal line before it is cut with `…`.
pub const MAX_SHOWN_CHARS: usize = 160;

/// The kinds of topic the consumer tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind<'a> {
    /// `devices/<device>/data/<series>`: telemetry, written to the output file.
    Data { device: &'a str, series: &'a str },
    /// `devices/<device>/audit`: the agent's audit records (envelopes with series `$audit`),
    /// shown and deduplicated, not written.
    Audit { device: &'a str },
    /// Anything else (`devices/<id>/status`, `devices/<id>/health`, `$SYS/...`): shown only.
    Other,
}

/// Classifies a topic name.
pub fn classify(topic: &str) -> TopicKind<'_> {
    let Some(rest) = topic.strip_prefix("devices/") else {
        return TopicKind::Other;
    };
    let Some((device, rest)) = rest.split_once('/') else {
        return TopicKind::Other;
    };
    if device.is_empty() {
        return TopicKind::Other;
    }
    if rest == "audit" {
        return TopicKind::Audit { device };
    }
    match rest.strip_prefix("data/") {
        Some(series) if !series.is_empty() => TopicKind::Data { device, series },
        _ => TopicKind::Other,
    }
}

/// The output file's line for a record: the envelope exactly as
/// [`TelemetryEnvelope::to_json_bytes`] writes it, then `"topic"` and `"received"` (the
/// consumer's clock, [`format_ts`]), without the final newline. See the crate documentation.
pub fn record_line(envelope: &TelemetryEnvelope, topic: &str, received_ms: u64) -> String {
    let mut line = String::from_utf8(envelope.to_json_bytes()).unwrap_or_default();
    // The envelope is a JSON object: replace its closing brace.
    if line.ends_with('}') {
        line.pop();
    }
    line.push_str(",\"topic\":");
    line.push_str(&serde_json::Value::from(topic).to_string());
    line.push_str(",\"received\":\"");
    line.push_str(&format_ts(received_ms));
    line.push_str("\"}");
    line
}

/// The terminal line for a record: `gw-1 #1234 line1/temp = 21.5`, with ` (historical)`
/// when the agent flagged it.
pub fn human_line(envelope: &TelemetryEnvelope) -> String {
    let mut line = format!(
        "{} #{} {} = {}",
        envelope.device,
        envelope.seq,
        envelope.series,
        shown_payload(&envelope.payload)
    );
    if envelope.historical {
        line.push_str(" (historical)");
    }
    line
}

/// The terminal line for a message that is not telemetry:
/// `devices/gw-1/status: {"state":"online",...}`, with ` (retained)` for a retained one.
pub fn other_line(topic: &str, payload: &[u8], retained: bool) -> String {
    let body = match std::str::from_utf8(payload) {
        Ok(text) => shorten(text.trim_end(), MAX_SHOWN_CHARS),
        Err(_) => format!("<{} bytes>", payload.len()),
    };
    let mut line = format!("{topic}: {body}");
    if retained {
        line.push_str(" (retained)");
    }
    line
}

fn shown_payload(payload: &Payload) -> String {
    match payload {
        Payload::Json(value) => shorten(&value.to_string(), MAX_SHOWN_CHARS),
        Payload::Bytes(bytes) => format!("<{} bytes>", bytes.len()),
    }
}

/// `text` cut to at most `max` characters, ending with `…` when cut; control characters
/// are shown as spaces so a payload cannot move the terminal's cursor.
pub fn shorten(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new record, written to the output file (if any); `line` is the terminal line.
    Written { line: String },
    /// A new audit record: shown, not written.
    Audit { line: String },
    /// `(device, seq)` was seen before: dropped.
    Duplicate { device: String, seq: u64 },
    /// Not telemetry: shown, not written.
    Other { line: String },
    /// On a data or audit topic but unusable (not an envelope, or an envelope of another
    /// device or series than its topic says): dropped; `reason` says why.
    Rejected { reason: String },
}

/// Counters for the summary at the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub written: u64,
    pub audit: u64,
    pub duplicates: u64,
    pub other: u64,
    pub rejected: u64,
}

/// What [`Processor::seed`] found in an existing output file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeedReport {
    /// Records whose `(device, seq)` are now known.
    pub records: u64,
    /// Lines that are not records (skipped).
    pub bad_lines: u64,
    /// Whether the file ended in the middle of a line (a newline must be written first).
    pub partial_last_line: bool,
}

#[derive(Deserialize)]
struct RecordKey {
    device: String,
    seq: u64,
}

/// Handles messages: duplicate detection and the output file.
pub struct Processor {
    dedup: Dedup,
    out: Option<Box<dyn Write + Send>>,
    stats: Stats,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("devices", &self.dedup.devices())
            .field("out", &self.out.is_some())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Processor {
    /// `out` receives one line per new record (flushed after each); `None` writes nothing.
    pub fn new(dedup: Dedup, out: Option<Box<dyn Write + Send>>) -> Processor {
        Processor {
            dedup,
            out,
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn dedup(&self) -> &Dedup {
        &self.dedup
    }

    /// Learns the `(device, seq)` of every record in an existing output file, so a restarted
    /// consumer does not write a record twice. Lines that do not parse are counted, not fatal.
    pub fn seed(&mut self, reader: impl BufRead) -> io::Result<SeedReport> {
        let mut report = SeedReport::default();
        let mut reader = reader;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            let complete = buf.last() == Some(&b'\n');
            report.partial_last_line = !complete;
            let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<RecordKey>(line) {
                Ok(key) if complete => {
                    self.dedup.insert(&key.device, key.seq);
                    report.records += 1;
                }
                _ => report.bad_lines += 1,
            }
        }
        Ok(report)
    }

    /// Handles one message received on `topic`. An error means the output file could not
    /// be written; the message must then not be acknowledged.
    pub fn handle(
        &mut self,
        topic: &str,
        payload: &[u8],
        retained: bool,
        received_ms: u64,
    ) -> io::Result<Outcome> {
        let outcome = match classify(topic) {
            TopicKind::Other => Outcome::Other {
                line: other_line(topic, payload, retained),
            },
            TopicKind::Data { device, series } => match checked(payload, device, Some(series)) {
                Err(reason) => Outcome::Rejected { reason },
                Ok(envelope) if self.dedup.contains(device, envelope.seq) => Outcome::Duplicate {
                    device: envelope.device,
                    seq: envelope.seq,
                },
                Ok(envelope) => {
                    if let Some(out) = self.out.as_mut() {
                        let mut line = record_line(&envelope, topic, received_ms);
                        line.push('\n');
                        out.write_all(line.as_bytes())?;
                        out.flush()?;
                    }
                    self.dedup.insert(device, envelope.seq);
                    Outcome::Written {
                        line: human_line(&envelope),
                    }
                }
            },
            TopicKind::Audit { device } => match checked(payload, device, None) {
                Err(reason) => Outcome::Rejected { reason },
                Ok(envelope) => {
                    if self.dedup.insert(device, envelope.seq) {
                        Outcome::Audit {
                            line: human_line(&envelope),
                        }
                    } else {
                        Outcome::Duplicate {
                            device: envelope.device,
                            seq: envelope.seq,
                        }
                    }
                }
            },
        };
        match &outcome {
            Outcome::Written { .. } => self.stats.written += 1,
            Outcome::Audit { .. } => self.stats.audit += 1,
            Outcome::Duplicate { .. } => self.stats.duplicates += 1,
            Outcome::Other { .. } => self.stats.other += 1,
            Outcome::Rejected { .. } => self.stats.rejected += 1,
        }
        Ok(outcome)
    }
}

/// Parses an envelope and checks that it is the device's (and the series') its topic says:
/// the broker's ACL lets a device publish only under its own `devices/<id>/`, so an
/// envelope naming another device is refused rather than trusted.
fn checked(
    payload: &[u8],
    device: &str,
    series: Option<&str>,
) -> Result<TelemetryEnvelope, String> {
    let envelope = TelemetryEnvelope::from_json_slice(payload)
        .map_err(|e| format!("not a telemetry envelope: {e}"))?;
    if envelope.device != device {
        return Err(format!(
            "the envelope names device {:?} but arrived on device {device:?}'s topic",
            envelope.device
        ));
    }
    if let Some(series) = series {
        if envelope.series != series {
            return Err(format!(
                "the envelope names series {:?} but arrived on series {series:?}'s topic",
                envelope.series
            ));
        }
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use serde_json::json;

    const T0: u64 = 1_795_773_600_123; // 2026-11-27T10:00:00.123Z

    fn env(device: &str, seq: u64, series: &str, payload: Payload) -> TelemetryEnvelope {
        TelemetryEnvelope::new(device, seq, series, T0, false, payload).unwrap()
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn the_file_format() {
        let e = env("gw-1", 1234, "line1/temp", Payload::Json(json!(21.5)));
        assert_eq!(
            record_line(&e, "devices/gw-1/data/line1/temp", T0 + 333),
            r#"{"v":1,"device":"gw-1","seq":1234,"series":"line1/temp","ts":"2026-11-27T10:00:00.123Z","historical":false,"payload":21.5,"topic":"devices/gw-1/data/line1/temp","received":"2026-11-27T10:00:00.456Z"}"#
        );
        let mut b = env("gw-1", 7, "cam", Payload::Bytes(vec![0, 1, 2, 0xff]));
        b.historical = true;
        let line = record_line(&b, "devices/gw-1/data/cam", T0);
        assert!(
            line.ends_with(r#""historical":true,"payload_b64":"AAEC/w==","topic":"devices/gw-1/data/cam","received":"2026-11-27T10:00:00.123Z"}"#),
            "{line}"
        );
        // A line is one JSON object that still parses as the envelope plus two fields.
        let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let obj = v.as_object_mut().unwrap();
        assert_eq!(obj.remove("topic"), Some(json!("devices/gw-1/data/cam")));
        assert!(obj.remove("received").is_some());
        let back = TelemetryEnvelope::from_json_slice(v.to_string().as_bytes()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn terminal_lines() {
        let e = env("gw-1", 1234, "line1/temp", Payload::Json(json!(21.5)));
        assert_eq!(human_line(&e), "gw-1 #1234 line1/temp = 21.5");
        let mut h = env("gw-2", 9, "line1/state", Payload::Json(json!("running")));
        h.historical = true;
        assert_eq!(
            human_line(&h),
            r#"gw-2 #9 line1/state = "running" (historical)"#
        );
        let b = env("gw-1", 1, "cam", Payload::Bytes(vec![1; 12]));
        assert_eq!(human_line(&b), "gw-1 #1 cam = <12 bytes>");
        let long = env("gw-1", 2, "x", Payload::Json(json!("é".repeat(500))));
        let line = human_line(&long);
        assert!(line.ends_with('…'));
        assert_eq!(
            line.chars().count(),
            "gw-1 #2 x = ".len() + MAX_SHOWN_CHARS + 1
        );
        assert_eq!(
            other_line("devices/gw-1/status", br#"{"state":"online"}"#, true),
            r#"devices/gw-1/status: {"state":"online"} (retained)"#
        );
        assert_eq!(other_line("a/b", &[0xff, 0xfe], false), "a/b: <2 bytes>");
        assert_eq!(other_line("a/b", b"x\x1b[2Jy\n", false), "a/b: x [2Jy");
    }

    #[test]
    fn topics() {
        assert_eq!(
            classify("devices/gw-1/data/line1/temp"),
            TopicKind::Data {
                device: "gw-1",
                series: "line1/temp"
            }
        );
        assert_eq!(
            classify("devices/gw-1/audit"),
            TopicKind::Audit { device: "gw-1" }
        );
        for other in [
            "devices/gw-1/status",
            "devices/gw-1/health",
            "devices/gw-1/data/",
            "devices/gw-1/data",
            "devices//data/x",
            "devices/gw-1",
            "plant/line1/temp",
            "$SYS/broker/uptime",
        ] {
            assert_eq!(classify(other), TopicKind::Other, "{other}");
        }
    }

    #[test]
    fn duplicates_are_dropped_and_everything_else_is_sorted_out() {
        let file = Shared::default();
        let mut p = Processor::new(Dedup::default(), Some(Box::new(file.clone())));
        let e = env("gw-1", 5, "line1/temp", Payload::Json(json!(20)));
        let topic = "devices/gw-1/data/line1/temp";
        let first = p.handle(topic, &e.to_json_bytes(), false, T0).unwrap();
        assert_eq!(
            first,
            Outcome::Written {
                line: "gw-1 #5 line1/temp = 20".into()
            }
        );
        let again = p.handle(topic, &e.to_json_bytes(), false, T0).unwrap();
        assert_eq!(
            again,
            Outcome::Duplicate {
                device: "gw-1".into(),
                seq: 5
            }
        );
        // Same seq, other device: new.
        let g2 = env("gw-2", 5, "line1/temp", Payload::Json(json!(20)));
        let out = p
            .handle(
                "devices/gw-2/data/line1/temp",
                &g2.to_json_bytes(),
                false,
                T0,
            )
            .unwrap();
        assert!(matches!(out, Outcome::Written { .. }));
        // An envelope naming another device or series than its topic: refused.
        for wrong in [
            "devices/gw-3/data/line1/temp",
            "devices/gw-1/data/line2/temp",
        ] {
            let e6 = env("gw-1", 6, "line1/temp", Payload::Json(json!(1)));
            let out = p.handle(wrong, &e6.to_json_bytes(), false, T0).unwrap();
            assert!(matches!(out, Outcome::Rejected { .. }), "{wrong}: {out:?}");
        }
        let out = p.handle(topic, b"21.5", false, T0).unwrap();
        let Outcome::Rejected { reason } = out else {
            panic!("{out:?}")
        };
        assert!(reason.starts_with("not a telemetry envelope"), "{reason}");
        // Status and health: shown, not written.
        let out = p
            .handle("devices/gw-1/status", br#"{"state":"online"}"#, true, T0)
            .unwrap();
        assert!(matches!(out, Outcome::Other { .. }));
        // Audit: deduplicated, shown, not written.
        let mut a = env(
            "gw-1",
            7,
            "$audit",
            Payload::Json(json!({"event":"tunnel_open"})),
        );
        a.historical = false;
        let out = p
            .handle("devices/gw-1/audit", &a.to_json_bytes(), false, T0)
            .unwrap();
        assert_eq!(
            out,
            Outcome::Audit {
                line: r#"gw-1 #7 $audit = {"event":"tunnel_open"}"#.into()
            }
        );
        let out = p
            .handle("devices/gw-1/audit", &a.to_json_bytes(), false, T0)
            .unwrap();
        assert!(matches!(out, Outcome::Duplicate { .. }));

        let text = file.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains(r#""device":"gw-1","seq":5"#));
        assert!(lines[1].contains(r#""device":"gw-2","seq":5"#));
        assert!(text.ends_with('\n'));
        assert_eq!(
            p.stats(),
            Stats {
                written: 2,
                audit: 1,
                duplicates: 2,
                other: 1,
                rejected: 3
            }
        );
    }

    #[test]
    fn a_restarted_consumer_learns_what_its_file_holds() {
        let mut file = Vec::new();
        for seq in 1..=3 {
            let e = env("gw-1", seq, "a", Payload::Json(json!(seq)));
            file.extend_from_slice(record_line(&e, "devices/gw-1/data/a", T0).as_bytes());
            file.push(b'\n');
        }
        file.extend_from_slice(b"\nnot json\n{\"device\":\"gw-2\",\"seq\":9");
        let mut p = Processor::new(Dedup::default(), None);
        let report = p.seed(&file[..]).unwrap();
        assert_eq!(
            report,
            SeedReport {
                records: 3,
                bad_lines: 2,
                partial_last_line: true
            }
        );
        assert!(p.dedup().contains("gw-1", 2));
        assert!(!p.dedup().contains("gw-2", 9), "a cut line is not a record");
        let e = env("gw-1", 3, "a", Payload::Json(json!(3)));
        let out = p
            .handle("devices/gw-1/data/a", &e.to_json_bytes(), false, T0)
            .unwrap();
        assert!(matches!(out, Outcome::Duplicate { .. }));
    }
}
