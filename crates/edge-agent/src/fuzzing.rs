//! The check behind the `stored_record` fuzz target in `fuzz/`, shared with the corpus replay
//! test so both run one implementation. It panics when it finds a bug; that is the point.
//! Not part of the supported API.

use crate::queue::record::{decode, encode, header};
use crate::queue::{Payload, StoredRecord};

/// Decodes `data` as a stored queue record. Decoding must not panic; a record that decodes
/// must encode, decode back to itself, and encode to the same bytes again (JSON text is
/// normalised by the first encode; byte payloads come back byte for byte).
pub fn check_stored_record(data: &[u8]) -> Option<StoredRecord> {
    let record = match decode(data) {
        Ok(r) => r,
        Err(e) => {
            // Display must work for the log line that reports a corrupt store.
            let _ = e.to_string();
            return None;
        }
    };
    assert_eq!(
        header(data).expect("a decoded record has a header"),
        (record.seq, record.ts_ms, record.enqueued_ms),
        "header disagrees with decode"
    );
    let encoded = encode(&record).expect("a decoded record must encode");
    let again = decode(&encoded).expect("a re-encoded record must decode");
    assert_eq!(again, record, "round trip changed the record");
    assert_eq!(
        encode(&again).expect("encodes"),
        encoded,
        "encoding is not stable"
    );
    if let Payload::Bytes(_) = record.payload {
        assert_eq!(encoded, data, "a byte record must re-encode to its input");
    }
    Some(record)
}

#[cfg(test)]
mod tests {
    //! Replays the committed seed corpus (`fuzz/corpus/stored_record`) through the check the
    //! fuzz target runs. Seed names state an expectation: `ok-*` decodes, `err-*` does not.
    use super::*;

    #[test]
    fn stored_record_corpus_replays() {
        let dir: std::path::PathBuf = [
            env!("CARGO_MANIFEST_DIR"),
            "fuzz",
            "corpus",
            "stored_record",
        ]
        .iter()
        .collect();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("readable corpus directory").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(
            files.len() >= 10,
            "only {} seeds in {}",
            files.len(),
            dir.display()
        );
        let (mut ok, mut err) = (0, 0);
        for path in &files {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let data = std::fs::read(path).unwrap();
            let decoded = check_stored_record(&data);
            if name.starts_with("ok-") {
                assert!(decoded.is_some(), "{name}: does not decode");
                ok += 1;
            } else if name.starts_with("err-") {
                assert!(decoded.is_none(), "{name}: decoded {decoded:?}");
                err += 1;
            }
        }
        assert!(ok >= 3 && err >= 3, "ok {ok}, err {err}");
    }
}
