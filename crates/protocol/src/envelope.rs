//! The telemetry envelope: what an agent publishes on `devices/<device>/data/<series>`.
//!
//! ```json
//! {"v":1,"device":"gw-17","seq":1234,"series":"line1/temp","ts":"2026-11-27T10:00:00.123Z","historical":false,"payload":{"c":21.5}}
//! ```
//!
//! - `v` is the envelope version; only `1` exists.
//! - `device` and `seq` identify a record: `seq` is per device and strictly increasing across
//!   agent restarts, so consumers drop duplicates by `(device, seq)` as a set (live data may
//!   overtake a draining backlog, so `seq` is not monotonic on the wire).
//! - `series` is one or more topic levels; order is kept per series.
//! - `ts` is RFC 3339 in UTC with milliseconds ([`format_ts`], [`parse_ts`]).
//! - `historical` is true when the record was older than the agent's configured age when it
//!   was sent (it waited in the store-and-forward queue).
//! - exactly one of `payload` (any JSON value, `null` included) and `payload_b64` (bytes that
//!   are not JSON, base64 with the standard alphabet and padding).
//!
//! Parsing ([`TelemetryEnvelope::from_json_slice`]) is strict: unknown or duplicate fields,
//! another version, both or neither payload fields, an invalid device or series, or a `ts`
//! that does not parse are errors. [`TelemetryEnvelope::new`] and
//! [`TelemetryEnvelope::validate`] apply the same rules on the sending side.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::topic::{TopicName, MAX_TOPIC_LEN};

/// The only envelope version.
pub const ENVELOPE_VERSION: u32 = 1;

/// The latest instant [`format_ts`] can write with a four-digit year:
/// `9999-12-31T23:59:59.999Z`, in Unix milliseconds.
pub const MAX_TS_MILLIS: u64 = 253_402_300_799_999;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is not valid JSON for this schema: {0}")]
    Json(String),
    #[error("envelope version {0} is not supported (only 1 is)")]
    Version(u32),
    #[error("envelope must carry exactly one of \"payload\" and \"payload_b64\"")]
    PayloadFields,
    #[error("payload_b64 is not standard padded base64: {0}")]
    Base64(String),
    #[error("invalid device id {device:?}: {reason}")]
    Device {
        device: String,
        reason: &'static str,
    },
    #[error("invalid series {series:?}: {reason}")]
    Series {
        series: String,
        reason: &'static str,
    },
    #[error(
        "invalid timestamp {ts:?}: {reason}; expected RFC 3339 such as 2026-11-27T10:00:00.123Z"
    )]
    Timestamp { ts: String, reason: &'static str },
    #[error("data topic for device {device:?} and series {series:?} is longer than 65535 bytes")]
    TopicTooLong { device: String, series: String },
}

/// The body of a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Any JSON value; serialised as `"payload": <value>`.
    Json(serde_json::Value),
    /// Bytes that are not JSON; serialised as `"payload_b64": "<base64>"`.
    Bytes(Vec<u8>),
}

/// A telemetry record as published by an agent. See the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryEnvelope {
    /// Always [`ENVELOPE_VERSION`].
    pub v: u32,
    pub device: String,
    pub seq: u64,
    pub series: String,
    /// RFC 3339, UTC, milliseconds: see [`format_ts`].
    pub ts: String,
    pub historical: bool,
    pub payload: Payload,
}

impl TelemetryEnvelope {
    /// Builds a version-1 envelope, formatting `ts_millis` with [`format_ts`] and checking
    /// device, series and timestamp range.
    pub fn new(
        device: impl Into<String>,
        seq: u64,
        series: impl Into<String>,
        ts_millis: u64,
        historical: bool,
        payload: Payload,
    ) -> Result<TelemetryEnvelope, EnvelopeError> {
        let envelope = TelemetryEnvelope {
            v: ENVELOPE_VERSION,
            device: device.into(),
            seq,
            series: series.into(),
            ts: format_ts(ts_millis),
            historical,
            payload,
        };
        if ts_millis > MAX_TS_MILLIS {
            return Err(EnvelopeError::Timestamp {
                ts: envelope.ts,
                reason: "after year 9999",
            });
        }
        envelope.validate()?;
        Ok(envelope)
    }

    /// Checks everything [`TelemetryEnvelope::from_json_slice`] checks.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        if self.v != ENVELOPE_VERSION {
            return Err(EnvelopeError::Version(self.v));
        }
        data_topic(&self.device, &self.series)?;
        parse_ts(&self.ts)?;
        Ok(())
    }

    /// `ts` in Unix milliseconds.
    pub fn ts_millis(&self) -> Result<u64, EnvelopeError> {
        parse_ts(&self.ts)
    }

    /// The topic this envelope is published on: `devices/<device>/data/<series>`.
    pub fn topic(&self) -> Result<String, EnvelopeError> {
        data_topic(&self.device, &self.series)
    }

    /// Serialises to compact JSON with the fields in the documented order. This does not
    /// validate: an envelope built with [`TelemetryEnvelope::new`] is valid; one assembled
    /// field by field can be checked with [`TelemetryEnvelope::validate`] (the data topic
    /// check, [`data_topic`], covers device and series).
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Serialising a `serde_json::Value` and plain fields cannot fail: there are no maps
        // with non-string keys and no fallible `Serialize` impls involved.
        serde_json::to_vec(&self.wire()).unwrap_or_default()
    }

    /// Parses and validates an envelope (see the module documentation for the rules).
    pub fn from_json_slice(bytes: &[u8]) -> Result<TelemetryEnvelope, EnvelopeError> {
        let wire: WireIn =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Json(e.to_string()))?;
        TelemetryEnvelope::try_from(wire)
    }

    fn wire(&self) -> WireOut<'_> {
        let (payload, payload_b64) = match &self.payload {
            Payload::Json(value) => (Some(value), None),
            Payload::Bytes(bytes) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            ),
        };
        WireOut {
            v: self.v,
            device: &self.device,
            seq: self.seq,
            series: &self.series,
            ts: &self.ts,
            historical: self.historical,
            payload,
            payload_b64,
        }
    }
}

impl Serialize for TelemetryEnvelope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.wire().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TelemetryEnvelope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireIn::deserialize(deserializer)?;
        TelemetryEnvelope::try_from(wire).map_err(serde::de::Error::custom)
    }
}

#[derive(Serialize)]
struct WireOut<'a> {
    v: u32,
    device: &'a str,
    seq: u64,
    series: &'a str,
    ts: &'a str,
    historical: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_b64: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireIn {
    v: u32,
    device: String,
    seq: u64,
    series: String,
    ts: String,
    historical: bool,
    // `Option<Value>` alone would read `"payload": null` as absent.
    #[serde(default, deserialize_with = "present")]
    payload: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    payload_b64: Option<String>,
}

fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl TryFrom<WireIn> for TelemetryEnvelope {
    type Error = EnvelopeError;
    fn try_from(wire: WireIn) -> Result<Self, Self::Error> {
        if wire.v != ENVELOPE_VERSION {
            return Err(EnvelopeError::Version(wire.v));
        }
        let payload = match (wire.payload, wire.payload_b64) {
            (Some(value), None) => Payload::Json(value),
            (None, Some(b64)) => Payload::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| EnvelopeError::Base64(e.to_string()))?,
            ),
            _ => return Err(EnvelopeError::PayloadFields),
        };
        let envelope = TelemetryEnvelope {
            v: wire.v,
            device: wire.device,
            seq: wire.seq,
            series: wire.series,
            ts: wire.ts,
            historical: wire.historical,
            payload,
        };
        envelope.validate()?;
        Ok(envelope)
    }
}

/// A device id is one topic level: non-empty, without `/`, `+`, `#` or U+0000.
pub fn validate_device(device: &str) -> Result<(), EnvelopeError> {
    let reason = if device.is_empty() {
        "empty"
    } else if device.contains('/') {
        "contains '/'"
    } else if device.contains(['+', '#']) {
        "contains a wildcard ('+' or '#')"
    } else if device.contains('\0') {
        "contains U+0000"
    } else if device.len() > MAX_TOPIC_LEN {
        "longer than 65535 bytes"
    } else {
        return Ok(());
    };
    Err(EnvelopeError::Device {
        device: device.to_string(),
        reason,
    })
}

/// A series is one or more topic levels: non-empty, no `+`, `#` or U+0000, and no empty
/// level at either end (no leading or trailing `/`).
pub fn validate_series(series: &str) -> Result<(), EnvelopeError> {
    let reason = if series.is_empty() {
        "empty"
    } else if series.contains(['+', '#']) {
        "contains a wildcard ('+' or '#')"
    } else if series.contains('\0') {
        "contains U+0000"
    } else if series.starts_with('/') || series.ends_with('/') {
        "empty topic level at the start or the end"
    } else if series.len() > MAX_TOPIC_LEN {
        "longer than 65535 bytes"
    } else {
        return Ok(());
    };
    Err(EnvelopeError::Series {
        series: series.to_string(),
        reason,
    })
}

/// The topic telemetry of `device` in `series` is published on: `devices/<device>/data/<series>`.
pub fn data_topic(device: &str, series: &str) -> Result<String, EnvelopeError> {
    validate_device(device)?;
    validate_series(series)?;
    let topic = format!("devices/{device}/data/{series}");
    if TopicName::new(&topic).is_err() {
        // The parts were checked above; only the total length can fail.
        return Err(EnvelopeError::TopicTooLong {
            device: device.to_string(),
            series: series.to_string(),
        });
    }
    Ok(topic)
}

/// Formats Unix milliseconds as RFC 3339 in UTC with milliseconds:
/// `2026-11-27T10:00:00.123Z`. Values after [`MAX_TS_MILLIS`] are written as that instant
/// (check the range first where it matters, as [`TelemetryEnvelope::new`] does).
pub fn format_ts(unix_millis: u64) -> String {
    let ms = unix_millis.min(MAX_TS_MILLIS);
    let days = ms / 86_400_000;
    let in_day = ms % 86_400_000;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    )
}

/// Parses an RFC 3339 timestamp into Unix milliseconds: `YYYY-MM-DDTHH:MM:SS`, an optional
/// fraction of 1 to 9 digits (truncated to milliseconds), then `Z` or an offset `+HH:MM` /
/// `-HH:MM`. `T`/`Z` may be lower case. Leap seconds (`:60`) and instants before 1970 or
/// after year 9999 are refused.
pub fn parse_ts(ts: &str) -> Result<u64, EnvelopeError> {
    let err = |reason: &'static str| EnvelopeError::Timestamp {
        ts: ts.to_string(),
        reason,
    };
    let b = ts.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Result<i64, EnvelopeError> {
        let part = b.get(range).ok_or_else(|| err("too short"))?;
        part.iter().try_fold(0i64, |acc, c| {
            if c.is_ascii_digit() {
                Ok(acc * 10 + i64::from(c - b'0'))
            } else {
                Err(err("a digit was expected"))
            }
        })
    };
    let sep = |i: usize, allowed: &[u8]| -> Result<(), EnvelopeError> {
        match b.get(i) {
            Some(c) if allowed.contains(c) => Ok(()),
            _ => Err(err("malformed date or time separator")),
        }
    };
    let year = digits(0..4)?;
    sep(4, b"-")?;
    let month = digits(5..7)?;
    sep(7, b"-")?;
    let day = digits(8..10)?;
    sep(10, b"Tt")?;
    let hour = digits(11..13)?;
    sep(13, b":")?;
    let minute = digits(14..16)?;
    sep(16, b":")?;
    let second = digits(17..19)?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(err("no such date"));
    }
    if hour > 23 || minute > 59 {
        return Err(err("no such time"));
    }
    if second > 59 {
        return Err(err("seconds out of range (leap seconds are not supported)"));
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 || n > 9 {
            return Err(err("the fraction must have 1 to 9 digits"));
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset_minutes = match b.get(i) {
        Some(b'Z' | b'z') => {
            i += 1;
            0
        }
        Some(&c @ (b'+' | b'-')) => {
            let h = digits(i + 1..i + 3)?;
            sep(i + 3, b":")?;
            let m = digits(i + 4..i + 6)?;
            if h > 23 || m > 59 {
                return Err(err("offset out of range"));
            }
            i += 6;
            if c == b'+' {
                h * 60 + m
            } else {
                -(h * 60 + m)
            }
        }
        _ => return Err(err("missing 'Z' or a UTC offset")),
    };
    if i != b.len() {
        return Err(err("trailing characters"));
    }
    let days = days_from_civil(year, month, day);
    let total =
        ((days * 24 + hour) * 60 + minute - offset_minutes) * 60_000 + second * 1000 + millis;
    if total < 0 {
        return Err(err("before 1970-01-01T00:00:00Z"));
    }
    let total = total as u64;
    if total > MAX_TS_MILLIS {
        return Err(err("after year 9999"));
    }
    Ok(total)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `z` days after 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn sample() -> TelemetryEnvelope {
        TelemetryEnvelope::new(
            "gw-17",
            1234,
            "line1/temp",
            1_795_773_600_123,
            false,
            Payload::Json(json!({"c": 21.5})),
        )
        .unwrap()
    }

    #[test]
    fn timestamps_format_and_parse() {
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ts(1_795_773_600_123), "2026-11-27T10:00:00.123Z");
        assert_eq!(format_ts(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_ts(MAX_TS_MILLIS), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_ts(u64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(parse_ts("2026-11-27T10:00:00.123Z"), Ok(1_795_773_600_123));
        assert_eq!(parse_ts("2026-11-27t10:00:00z"), Ok(1_795_773_600_000));
        assert_eq!(parse_ts("2026-11-27T10:00:00.1Z"), Ok(1_795_773_600_100));
        assert_eq!(
            parse_ts("2026-11-27T10:00:00.123999999Z"),
            Ok(1_795_773_600_123)
        );
        assert_eq!(
            parse_ts("2026-11-27T11:30:00.123+01:30"),
            Ok(1_795_773_600_123)
        );
        assert_eq!(
            parse_ts("2026-11-27T09:00:00.123-01:00"),
            Ok(1_795_773_600_123)
        );
        assert_eq!(parse_ts("9999-12-31T23:59:59.999Z"), Ok(MAX_TS_MILLIS));
        for bad in [
            "",
            "2026-11-27",
            "2026-11-27T10:00:00",
            "2026-11-27 10:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "2026-11-27T10:60:00Z",
            "2026-11-27T10:00:60Z",
            "2026-11-27T10:00:00.Z",
            "2026-11-27T10:00:00.1234567890Z",
            "2026-11-27T10:00:00Zx",
            "2026-11-27T10:00:00+0100",
            "2026-11-27T10:00:00+24:00",
            "1969-12-31T23:59:59.999Z",
            "1970-01-01T00:30:00+01:00",
            "+2026-11-27T10:00:00Z",
            "2026-1a-27T10:00:00Z",
            "２026-11-27T10:00:00Z",
        ] {
            assert!(parse_ts(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn serialises_in_the_documented_shape() {
        let text = String::from_utf8(sample().to_json_bytes()).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"device":"gw-17","seq":1234,"series":"line1/temp","ts":"2026-11-27T10:00:00.123Z","historical":false,"payload":{"c":21.5}}"#
        );
        let bytes = TelemetryEnvelope {
            payload: Payload::Bytes(vec![0, 1, 2, 0xff]),
            historical: true,
            ..sample()
        };
        let text = String::from_utf8(bytes.to_json_bytes()).unwrap();
        assert!(
            text.ends_with(r#""historical":true,"payload_b64":"AAEC/w=="}"#),
            "{text}"
        );
        assert!(!text.contains("\"payload\""));
        assert_eq!(
            TelemetryEnvelope::from_json_slice(text.as_bytes()).unwrap(),
            bytes
        );
    }

    #[test]
    fn null_payload_is_a_payload() {
        let e = TelemetryEnvelope {
            payload: Payload::Json(serde_json::Value::Null),
            ..sample()
        };
        let text = e.to_json_bytes();
        assert!(String::from_utf8_lossy(&text).ends_with(r#""payload":null}"#));
        assert_eq!(TelemetryEnvelope::from_json_slice(&text).unwrap(), e);
    }

    #[test]
    fn strict_parsing() {
        let ok = r#"{"v":1,"device":"gw-17","seq":1,"series":"a/b","ts":"2026-11-27T10:00:00.123Z","historical":false,"payload":1}"#;
        assert!(TelemetryEnvelope::from_json_slice(ok.as_bytes()).is_ok());
        let cases: &[(&str, &str)] = &[
            ("\"v\":1", "\"v\":2"),
            ("\"v\":1,", ""),
            ("\"payload\":1", "\"payload_b64\":\"AA==\",\"payload\":1"),
            ("\"payload\":1", "\"payload_b64\":null"),
            (",\"payload\":1", ""),
            ("\"payload\":1", "\"payload_b64\":\"AA\""),
            ("\"payload\":1", "\"payload_b64\":\"AB==\""),
            ("\"payload\":1", "\"payload_b64\":\"!!!!\""),
            ("\"series\":\"a/b\"", "\"series\":\"\""),
            ("\"series\":\"a/b\"", "\"series\":\"a/+\""),
            ("\"series\":\"a/b\"", "\"series\":\"a/#\""),
            ("\"series\":\"a/b\"", "\"series\":\"/a\""),
            ("\"series\":\"a/b\"", "\"series\":\"a/\""),
            ("\"series\":\"a/b\"", "\"series\":\"a\\u0000b\""),
            ("\"device\":\"gw-17\"", "\"device\":\"gw/17\""),
            ("\"device\":\"gw-17\"", "\"device\":\"+\""),
            ("\"device\":\"gw-17\"", "\"device\":\"\""),
            ("2026-11-27T10:00:00.123Z", "2026-11-27"),
            ("\"seq\":1", "\"seq\":-1"),
            ("\"seq\":1", "\"seq\":\"1\""),
            ("\"historical\":false", "\"historical\":0"),
            ("\"historical\":false,", ""),
            ("\"payload\":1", "\"payload\":1,\"extra\":true"),
            ("\"payload\":1", "\"payload\":1,\"payload\":2"),
        ];
        for (from, to) in cases {
            let bad = ok.replacen(from, to, 1);
            assert_ne!(bad, ok);
            assert!(
                TelemetryEnvelope::from_json_slice(bad.as_bytes()).is_err(),
                "accepted {bad}"
            );
        }
        assert!(TelemetryEnvelope::from_json_slice(b"[]").is_err());
        assert!(TelemetryEnvelope::from_json_slice(b"").is_err());
    }

    #[test]
    fn invalid_envelopes_are_caught_before_sending() {
        let mut e = sample();
        e.series = "a/#".into();
        assert!(matches!(e.validate(), Err(EnvelopeError::Series { .. })));
        assert!(TelemetryEnvelope::from_json_slice(&e.to_json_bytes()).is_err());
        let mut e = sample();
        e.v = 2;
        assert_eq!(e.validate(), Err(EnvelopeError::Version(2)));
        let mut e = sample();
        e.ts = "yesterday".into();
        assert!(matches!(e.validate(), Err(EnvelopeError::Timestamp { .. })));
        assert!(TelemetryEnvelope::new("d", 1, "a/", 0, false, Payload::Bytes(vec![])).is_err());
        assert!(TelemetryEnvelope::new("d/e", 1, "s", 0, false, Payload::Bytes(vec![])).is_err());
        assert!(TelemetryEnvelope::new(
            "d",
            1,
            "s",
            MAX_TS_MILLIS + 1,
            false,
            Payload::Bytes(vec![])
        )
        .is_err());
    }

    #[test]
    fn data_topics() {
        assert_eq!(
            data_topic("gw-17", "line1/temp").unwrap(),
            "devices/gw-17/data/line1/temp"
        );
        assert_eq!(
            data_topic("gw-17", "a//b").unwrap(),
            "devices/gw-17/data/a//b"
        );
        assert_eq!(sample().topic().unwrap(), "devices/gw-17/data/line1/temp");
        for (device, series) in [
            ("gw-17", ""),
            ("gw-17", "+"),
            ("gw-17", "a/#"),
            ("gw-17", "a+b"),
            ("gw-17", "/a"),
            ("gw-17", "a/"),
            ("gw-17", "/"),
            ("gw-17", "a\0"),
            ("", "a"),
            ("a/b", "a"),
            ("#", "a"),
            ("g+", "a"),
            ("g\0", "a"),
        ] {
            assert!(data_topic(device, series).is_err(), "{device:?} {series:?}");
        }
        let long = "x".repeat(MAX_TOPIC_LEN - 10);
        assert!(matches!(
            data_topic("gw-17", &long),
            Err(EnvelopeError::TopicTooLong { .. })
        ));
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            // Exact only with serde_json's float_roundtrip feature (see Cargo.toml).
            any::<f64>()
                .prop_filter("JSON numbers are finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn envelope() -> impl Strategy<Value = TelemetryEnvelope> {
        (
            "[A-Za-z0-9._$-]{1,24}",
            any::<u64>(),
            "[^+#/\u{0}]{1,8}(/[^+#\u{0}/]{0,8}){0,3}",
            0..=MAX_TS_MILLIS,
            any::<bool>(),
            prop_oneof![
                json_value().prop_map(Payload::Json),
                prop::collection::vec(any::<u8>(), 0..64).prop_map(Payload::Bytes),
            ],
        )
            .prop_filter("series must not end with '/'", |t| !t.2.ends_with('/'))
            .prop_map(|(device, seq, series, ts, historical, payload)| {
                TelemetryEnvelope::new(device, seq, series, ts, historical, payload).unwrap()
            })
    }

    proptest! {
        #[test]
        fn envelope_round_trips(e in envelope()) {
            let bytes = e.to_json_bytes();
            prop_assert_eq!(TelemetryEnvelope::from_json_slice(&bytes).unwrap(), e.clone());
            // Through serde too, as part of a larger document.
            let doc = serde_json::to_value(vec![&e]).unwrap();
            let back: Vec<TelemetryEnvelope> = serde_json::from_value(doc).unwrap();
            prop_assert_eq!(&back[0], &e);
        }

        #[test]
        fn ts_round_trips(ms in 0..=MAX_TS_MILLIS) {
            let text = format_ts(ms);
            prop_assert_eq!(text.len(), 24);
            prop_assert_eq!(parse_ts(&text), Ok(ms));
        }

        #[test]
        fn parse_ts_never_panics(s in "[0-9T:.Z+-]{0,40}") {
            let _ = parse_ts(&s);
        }
    }
}
