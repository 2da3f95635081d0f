//! The on-disk encoding of a queued record, and its hand-written decoder.
//!
//! ```text
//! u8   record version (1)
//! u64  seq            big-endian, equal to the record's key
//! u64  ts_ms          Unix milliseconds, at most MAX_TS_MILLIS
//! u64  enqueued_ms    Unix milliseconds
//! u32  series length, then the series (UTF-8, a valid series: see check_series)
//! u8   payload kind   0 = JSON, 1 = bytes
//! u32  payload length, then the payload (JSON text for kind 0)
//! ```
//!
//! The decoder checks every length against the bytes that are left before it copies
//! anything, so it never allocates more than its input, and it accepts exactly what the
//! encoder can produce (a record the encoder would refuse is corrupt, not a record).
//!
//! The queue stores records in groups, one group per key (store format 2):
//!
//! ```text
//! u8   group version (2)
//! u32  count, at least 1
//! count times: u32 length, then a record as above
//! ```
//!
//! The records of a group have consecutive sequence numbers, the first one equal to the
//! group's key. A value that starts with the record version instead is a single record
//! (how format 1 stored every record) and reads as a group of one.

use bulwark_protocol::envelope::{validate_series, Payload, MAX_TS_MILLIS};

use super::{StoredRecord, RESERVED_SERIES};

/// Version byte of the record encoding.
pub const RECORD_VERSION: u8 = 1;
/// Version byte of a group of records.
pub const GROUP_VERSION: u8 = 2;

/// Deepest JSON nesting a payload may have. serde_json refuses to parse nesting of 128 or
/// more, so a deeper payload could be stored but never read back; it is refused on append.
pub const MAX_JSON_DEPTH: usize = 127;

const KIND_JSON: u8 = 0;
const KIND_BYTES: u8 = 1;

/// Bytes of a record before its series: version, seq, ts_ms, enqueued_ms.
const HEADER_LEN: usize = 1 + 8 + 8 + 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record is truncated")]
    Truncated,
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("series is not UTF-8")]
    SeriesUtf8,
    #[error("invalid series: {0}")]
    Series(String),
    #[error("timestamp {0} ms is after year 9999")]
    Timestamp(u64),
    #[error("unknown payload kind {0}")]
    PayloadKind(u8),
    #[error("JSON payload does not parse: {0}")]
    Json(String),
    #[error("JSON payload nests deeper than {MAX_JSON_DEPTH} levels")]
    JsonTooDeep,
    #[error("{0} is longer than 4 GiB")]
    TooLong(&'static str),
    #[error("{0} trailing bytes after the record")]
    Trailing(usize),
    #[error("group holds no record")]
    EmptyGroup,
    #[error("record {found} where record {expected} belongs")]
    GroupSequence { expected: u64, found: u64 },
}

/// Checks a stored series: a valid envelope series
/// ([`bulwark_protocol::envelope::validate_series`]) that does not start with `$`, or one of
/// the agent's own [`RESERVED_SERIES`] (`$audit`). Producers never get this far with a `$`
/// series: ingest refuses every one (`crate::ingest::validate_series`); only the agent
/// appends reserved series, and any other `$` series is refused here, so nothing unknown
/// can be mapped to a topic by the uplink.
pub fn check_series(series: &str) -> Result<(), RecordError> {
    validate_series(series).map_err(|e| RecordError::Series(e.to_string()))?;
    if series.starts_with('$') && !RESERVED_SERIES.contains(&series) {
        return Err(RecordError::Series(format!(
            "{series:?}: a series starting with '$' is reserved for the agent ({})",
            RESERVED_SERIES.join(", ")
        )));
    }
    Ok(())
}

/// Checks what [`encode`] would refuse, without encoding: series, timestamp, lengths and
/// JSON depth.
pub fn check(series: &str, ts_ms: u64, payload: &Payload) -> Result<(), RecordError> {
    check_series(series)?;
    if ts_ms > MAX_TS_MILLIS {
        return Err(RecordError::Timestamp(ts_ms));
    }
    if u32::try_from(series.len()).is_err() {
        return Err(RecordError::TooLong("series"));
    }
    match payload {
        Payload::Json(value) => {
            if json_depth(value) > MAX_JSON_DEPTH {
                return Err(RecordError::JsonTooDeep);
            }
        }
        Payload::Bytes(bytes) => {
            if u32::try_from(bytes.len()).is_err() {
                return Err(RecordError::TooLong("payload"));
            }
        }
    }
    Ok(())
}

/// Encodes `r`, refusing what [`decode`] would refuse.
pub fn encode(r: &StoredRecord) -> Result<Vec<u8>, RecordError> {
    check(&r.series, r.ts_ms, &r.payload)?;
    encode_checked(r)
}

/// [`encode`] for a record whose series, timestamp and payload [`check`] has accepted.
pub(crate) fn encode_checked(r: &StoredRecord) -> Result<Vec<u8>, RecordError> {
    let prefix = HEADER_LEN + 4 + r.series.len() + 1 + 4;
    let mut out = Vec::with_capacity(
        prefix
            + match &r.payload {
                // A guess; the JSON text is written straight into `out`.
                Payload::Json(_) => 32,
                Payload::Bytes(bytes) => bytes.len(),
            },
    );
    out.push(RECORD_VERSION);
    out.extend_from_slice(&r.seq.to_be_bytes());
    out.extend_from_slice(&r.ts_ms.to_be_bytes());
    out.extend_from_slice(&r.enqueued_ms.to_be_bytes());
    out.extend_from_slice(&(r.series.len() as u32).to_be_bytes());
    out.extend_from_slice(r.series.as_bytes());
    match &r.payload {
        Payload::Json(value) => {
            out.push(KIND_JSON);
            out.extend_from_slice(&[0; 4]);
            serde_json::to_writer(&mut out, value).map_err(|e| RecordError::Json(e.to_string()))?;
        }
        Payload::Bytes(bytes) => {
            out.push(KIND_BYTES);
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(bytes);
        }
    }
    let body_len =
        u32::try_from(out.len() - prefix).map_err(|_| RecordError::TooLong("payload"))?;
    out[prefix - 4..prefix].copy_from_slice(&body_len.to_be_bytes());
    Ok(out)
}

/// Encodes already encoded records as one group (see the module documentation).
pub fn encode_group(records: &[Vec<u8>]) -> Vec<u8> {
    let len = 5 + records.iter().map(|r| 4 + r.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.push(GROUP_VERSION);
    out.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for r in records {
        out.extend_from_slice(&(r.len() as u32).to_be_bytes());
        out.extend_from_slice(r);
    }
    out
}

/// The encoded records of a stored value: a group, or a single record (format 1). Checks
/// the group's framing only; each record is checked when it is decoded.
pub fn group_records(value: &[u8]) -> Result<Vec<&[u8]>, RecordError> {
    match value.first() {
        None => Err(RecordError::Truncated),
        Some(&RECORD_VERSION) => Ok(vec![value]),
        Some(&GROUP_VERSION) => {
            let mut r = Reader { buf: &value[1..] };
            let count = r.u32()? as usize;
            if count == 0 {
                return Err(RecordError::EmptyGroup);
            }
            // Each record takes at least its 4-byte length: a count beyond that is a lie,
            // refused before anything is allocated for it.
            if count > r.buf.len() / 4 {
                return Err(RecordError::Truncated);
            }
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                out.push(r.sized()?);
            }
            if !r.buf.is_empty() {
                return Err(RecordError::Trailing(r.buf.len()));
            }
            Ok(out)
        }
        Some(&other) => Err(RecordError::Version(other)),
    }
}

/// Decodes a whole record; see the module documentation for what is checked.
pub fn decode(bytes: &[u8]) -> Result<StoredRecord, RecordError> {
    let mut r = Reader { buf: bytes };
    let (seq, ts_ms, enqueued_ms) = read_header(&mut r)?;
    let series = std::str::from_utf8(r.sized()?).map_err(|_| RecordError::SeriesUtf8)?;
    check_series(series)?;
    if ts_ms > MAX_TS_MILLIS {
        return Err(RecordError::Timestamp(ts_ms));
    }
    let kind = r.u8()?;
    let body = r.sized()?;
    let payload = match kind {
        KIND_JSON => Payload::Json(
            serde_json::from_slice(body).map_err(|e| RecordError::Json(e.to_string()))?,
        ),
        KIND_BYTES => Payload::Bytes(body.to_vec()),
        other => return Err(RecordError::PayloadKind(other)),
    };
    if !r.buf.is_empty() {
        return Err(RecordError::Trailing(r.buf.len()));
    }
    Ok(StoredRecord {
        seq,
        series: series.to_string(),
        ts_ms,
        enqueued_ms,
        payload,
    })
}

/// `(seq, ts_ms, enqueued_ms)` of an encoded record, without decoding the rest.
pub fn header(bytes: &[u8]) -> Result<(u64, u64, u64), RecordError> {
    read_header(&mut Reader { buf: bytes })
}

fn read_header(r: &mut Reader<'_>) -> Result<(u64, u64, u64), RecordError> {
    let version = r.u8()?;
    if version != RECORD_VERSION {
        return Err(RecordError::Version(version));
    }
    Ok((r.u64()?, r.u64()?, r.u64()?))
}

/// Nesting depth of a JSON value (a scalar is 0, `[]` is 1), without recursion.
fn json_depth(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Array(items) => Box::new(items.iter()),
            serde_json::Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        deepest = deepest.max(depth + 1);
        if deepest > MAX_JSON_DEPTH {
            return deepest;
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    deepest
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.buf.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    /// A u32 length, then that many bytes (checked against what is left first).
    fn sized(&mut self) -> Result<&'a [u8], RecordError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn rec(payload: Payload) -> StoredRecord {
        StoredRecord {
            seq: 42,
            series: "line1/temp".into(),
            ts_ms: 1_795_773_600_123,
            enqueued_ms: 1_795_773_600_200,
            payload,
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let enc = encode(&rec(Payload::Bytes(vec![9, 8]))).unwrap();
        let mut want = vec![1];
        want.extend_from_slice(&42u64.to_be_bytes());
        want.extend_from_slice(&1_795_773_600_123u64.to_be_bytes());
        want.extend_from_slice(&1_795_773_600_200u64.to_be_bytes());
        want.extend_from_slice(&10u32.to_be_bytes());
        want.extend_from_slice(b"line1/temp");
        want.push(1);
        want.extend_from_slice(&2u32.to_be_bytes());
        want.extend_from_slice(&[9, 8]);
        assert_eq!(enc, want);
        assert_eq!(
            header(&enc).unwrap(),
            (42, 1_795_773_600_123, 1_795_773_600_200)
        );
    }

    #[test]
    fn round_trips_and_refuses_every_truncation() {
        for payload in [
            Payload::Json(json!({"c": 21.5, "ok": [true, null, "x"]})),
            Payload::Json(json!(null)),
            Payload::Bytes(vec![]),
            Payload::Bytes(vec![0xff; 300]),
        ] {
            let r = rec(payload);
            let enc = encode(&r).unwrap();
            assert_eq!(decode(&enc).unwrap(), r);
            for cut in 0..enc.len() {
                assert!(decode(&enc[..cut]).is_err(), "{cut}");
            }
            let mut long = enc.clone();
            long.push(0);
            assert_eq!(decode(&long), Err(RecordError::Trailing(1)));
        }
    }

    #[test]
    fn refuses_what_cannot_be_sent_or_read() {
        let mut enc = encode(&rec(Payload::Bytes(vec![1]))).unwrap();
        enc[0] = 2;
        assert_eq!(decode(&enc), Err(RecordError::Version(2)));
        // A huge declared length fails before anything is allocated.
        let mut huge = encode(&rec(Payload::Bytes(vec![]))).unwrap()[..HEADER_LEN].to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&huge), Err(RecordError::Truncated));

        for series in [
            "", "a/#", "+", "/a", "a/", "a\0", "$SYS/x", "$audit/x", "$auditx",
        ] {
            let r = StoredRecord {
                series: series.into(),
                ..rec(Payload::Bytes(vec![]))
            };
            assert!(
                matches!(encode(&r), Err(RecordError::Series(_))),
                "{series:?}"
            );
        }
        let late = StoredRecord {
            ts_ms: MAX_TS_MILLIS + 1,
            ..rec(Payload::Bytes(vec![]))
        };
        assert!(matches!(encode(&late), Err(RecordError::Timestamp(_))));

        // Kind byte and JSON text.
        let mut enc = encode(&rec(Payload::Json(json!(1)))).unwrap();
        let kind_at = HEADER_LEN + 4 + "line1/temp".len();
        enc[kind_at] = 7;
        assert_eq!(decode(&enc), Err(RecordError::PayloadKind(7)));
        enc[kind_at] = KIND_JSON;
        let last = enc.len() - 1;
        enc[last] = b'x';
        assert!(matches!(decode(&enc), Err(RecordError::Json(_))));
    }

    #[test]
    fn the_audit_series_is_stored() {
        let r = StoredRecord {
            series: crate::queue::AUDIT_SERIES.into(),
            ..rec(Payload::Json(json!({"event": "tunnel_open"})))
        };
        assert_eq!(decode(&encode(&r).unwrap()).unwrap(), r);
        // A stored record with another `$` series does not decode either.
        let mut enc = encode(&r).unwrap();
        let at = HEADER_LEN + 4 + 1;
        assert_eq!(&enc[at..at + 5], b"audit");
        enc[at..at + 5].copy_from_slice(b"other");
        assert!(matches!(decode(&enc), Err(RecordError::Series(_))));
    }

    #[test]
    fn json_depth_limit_matches_serde_json() {
        let nest = |depth: usize| {
            let mut v = json!(1);
            for _ in 0..depth {
                v = json!([v]);
            }
            v
        };
        let deepest = rec(Payload::Json(nest(MAX_JSON_DEPTH)));
        assert_eq!(json_depth(&nest(MAX_JSON_DEPTH)), MAX_JSON_DEPTH);
        assert_eq!(decode(&encode(&deepest).unwrap()).unwrap(), deepest);
        let too_deep = rec(Payload::Json(nest(MAX_JSON_DEPTH + 1)));
        assert_eq!(encode(&too_deep), Err(RecordError::JsonTooDeep));
        // And serde_json indeed cannot read it back.
        let text = serde_json::to_vec(&nest(MAX_JSON_DEPTH + 1)).unwrap();
        assert!(serde_json::from_slice::<serde_json::Value>(&text).is_err());
        assert_eq!(json_depth(&json!({"a": [1, {"b": []}], "c": 2})), 4);
        assert_eq!(json_depth(&json!([[], {}])), 2);
        assert_eq!(json_depth(&json!("x")), 0);
    }

    #[test]
    fn groups_frame_their_records() {
        let a = encode(&rec(Payload::Bytes(vec![1]))).unwrap();
        let b = encode(&StoredRecord {
            seq: 43,
            ..rec(Payload::Json(json!({"x": 1})))
        })
        .unwrap();
        let group = encode_group(&[a.clone(), b.clone()]);
        assert_eq!(group[0], GROUP_VERSION);
        assert_eq!(group.len(), 5 + 4 + a.len() + 4 + b.len());
        assert_eq!(
            group_records(&group).unwrap(),
            vec![a.as_slice(), b.as_slice()]
        );
        // A bare record (format 1) is a group of one.
        assert_eq!(group_records(&a).unwrap(), vec![a.as_slice()]);
        // Framing errors.
        assert_eq!(group_records(&[]), Err(RecordError::Truncated));
        assert_eq!(group_records(&[7, 0]), Err(RecordError::Version(7)));
        assert_eq!(
            group_records(&[GROUP_VERSION, 0, 0, 0, 0]),
            Err(RecordError::EmptyGroup)
        );
        let mut lie = group.clone();
        lie[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(group_records(&lie), Err(RecordError::Truncated));
        let mut long = group.clone();
        long.push(0);
        assert_eq!(group_records(&long), Err(RecordError::Trailing(1)));
        for cut in 0..group.len() {
            assert!(group_records(&group[..cut]).is_err(), "{cut}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_records_round_trip(
            seq in any::<u64>(),
            series in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,3}",
            ts_ms in 0..=MAX_TS_MILLIS,
            enqueued_ms in any::<u64>(),
            bytes in prop::collection::vec(any::<u8>(), 0..64),
            json in any::<bool>(),
            number in any::<f64>().prop_filter("finite", |f| f.is_finite()),
        ) {
            let payload = if json {
                Payload::Json(json!({"v": number, "b": bytes}))
            } else {
                Payload::Bytes(bytes)
            };
            let r = StoredRecord { seq, series, ts_ms, enqueued_ms, payload };
            let enc = encode(&r).unwrap();
            prop_assert_eq!(decode(&enc).unwrap(), r);
        }

        #[test]
        fn decode_never_panics(data in prop::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&data);
        }
    }
}
