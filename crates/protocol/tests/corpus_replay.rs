//! Replays the committed fuzz corpus (`fuzz/corpus/{decode,topic,acl}`) through the same checks
//! the fuzz targets run, so every seed and every crash ever fixed stays a regression test.
//!
//! Seed names also state an expectation: `ok-*` decodes completely without an error,
//! `err-*` must end in a decode error (for `acl`: `ok-*` parses, `err-*` is a parse error).

use std::fs;
use std::path::{Path, PathBuf};

use bulwark_protocol::acl::DEFAULT_DEVICE_RULES;
use bulwark_protocol::fuzzing::{check_acl, check_decode, check_topics};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir: PathBuf = [env!("CARGO_MANIFEST_DIR"), "fuzz", "corpus", target]
        .iter()
        .collect();
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable corpus directory").path())
        .filter(|path| path.is_file())
        .map(|path| {
            (
                file_name(&path),
                fs::read(&path).expect("readable corpus file"),
            )
        })
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn decode_corpus_replays() {
    let files = corpus("decode");
    assert!(
        files.len() >= 20,
        "only {} files in fuzz/corpus/decode",
        files.len()
    );
    let (mut ok, mut err) = (0, 0);
    for (name, data) in &files {
        let outcome = check_decode(data);
        if name.starts_with("ok-") {
            assert!(!outcome.error, "{name}: decode failed");
            assert!(!outcome.packets.is_empty(), "{name}: no packet decoded");
            assert_eq!(outcome.leftover, 0, "{name}: bytes left over");
            ok += 1;
        } else if name.starts_with("err-") {
            assert!(
                outcome.error,
                "{name}: expected a decode error, got {outcome:?}"
            );
            err += 1;
        }
    }
    // One valid example of each of the fourteen packets, and the malformed cases.
    assert!(ok >= 14, "only {ok} ok- seeds");
    assert!(err >= 20, "only {err} err- seeds");
}

#[test]
fn decode_corpus_covers_every_packet_kind() {
    let mut kinds = std::collections::BTreeSet::new();
    for (name, data) in corpus("decode") {
        if name.starts_with("ok-") {
            kinds.extend(check_decode(&data).packets.iter().map(|p| p.name()));
        }
    }
    assert_eq!(kinds.len(), 14, "packet kinds with a valid seed: {kinds:?}");
}

#[test]
fn topic_corpus_replays() {
    let files = corpus("topic");
    assert!(
        files.len() >= 5,
        "only {} files in fuzz/corpus/topic",
        files.len()
    );
    for (_, data) in &files {
        check_topics(data);
    }
}

#[test]
fn acl_corpus_replays() {
    let files = corpus("acl");
    assert!(
        files.len() >= 10,
        "only {} files in fuzz/corpus/acl",
        files.len()
    );
    let (mut ok, mut err) = (0, 0);
    for (name, data) in &files {
        let outcome = check_acl(data);
        if name.starts_with("ok-") {
            assert!(
                outcome.parsed,
                "{name}: parse failed at line {:?}",
                outcome.error_line
            );
            ok += 1;
        } else if name.starts_with("err-") {
            assert!(
                !outcome.parsed,
                "{name}: expected a parse error, got {outcome:?}"
            );
            err += 1;
        }
        if name == "ok-default-device-rules" {
            assert_eq!(String::from_utf8_lossy(data), DEFAULT_DEVICE_RULES);
        }
    }
    assert!(ok >= 8, "only {ok} ok- seeds");
    assert!(err >= 8, "only {err} err- seeds");
}
