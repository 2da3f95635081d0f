//! Replays the committed fuzz corpora (`fuzz/corpus/frames`, `fuzz/corpus/splice`) through
//! the same checks the fuzz targets run, so every seed and every crash ever fixed stays a
//! regression test.
//!
//! Seed names also state an expectation: for `frames`, `ok-*` passes the relay's frame
//! filter without an error and `err-*` must end in a frame error; for `splice`, see
//! [`splice_corpus_replays`]. Other names (garbage, crashes) only must not panic.

use std::fs;
use std::path::PathBuf;

use bulwark_tunnel::frames::FrameError;
use bulwark_tunnel::fuzzing::{check_frames, check_splice, FUZZ_MAX_STREAMS};

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
                path.file_name()
                    .expect("a file name")
                    .to_string_lossy()
                    .into_owned(),
                fs::read(&path).expect("readable corpus file"),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn frames_corpus_replays() {
    let files = corpus("frames");
    assert!(
        files.len() >= 10,
        "only {} files in fuzz/corpus/frames",
        files.len()
    );
    let (mut ok, mut err) = (0, 0);
    for (name, data) in &files {
        let outcome = check_frames(data);
        assert!(
            outcome.open_streams <= FUZZ_MAX_STREAMS,
            "{name}: {outcome:?}"
        );
        if name.starts_with("ok-") {
            assert_eq!(outcome.error, None, "{name}: {outcome:?}");
            assert!(outcome.forwarded_to_device > 0, "{name}: nothing forwarded");
            ok += 1;
        } else if name.starts_with("err-") {
            assert!(
                outcome.error.is_some(),
                "{name}: expected an error, got {outcome:?}"
            );
            err += 1;
        }
    }
    assert!(ok >= 6, "only {ok} ok- seeds");
    assert!(err >= 5, "only {err} err- seeds");
}

/// The seeds do what their names say (so the corpus keeps covering each rule).
#[test]
fn frames_seeds_cover_each_rule() {
    let files: std::collections::HashMap<String, Vec<u8>> = corpus("frames").into_iter().collect();
    let run = |name: &str| {
        check_frames(
            files
                .get(name)
                .unwrap_or_else(|| panic!("seed {name} is missing")),
        )
    };
    let limit = run("ok-stream-limit");
    assert_eq!(limit.refused, 2);
    assert_eq!(limit.open_streams, FUZZ_MAX_STREAMS);
    assert_eq!(run("ok-fin").open_streams, 0);
    assert_eq!(run("ok-rst").open_streams, 0);
    assert_eq!(run("ok-rst").opened_total, 2);
    assert_eq!(run("ok-data").open_streams, 1);
    assert_eq!(run("ok-data-syn-large").forwarded_to_device, 12 + 4096);
    assert_eq!(run("ok-ping").opened_total, 0);
    assert_eq!(run("err-version-1").error, Some(FrameError::Version(1)));
    assert_eq!(run("err-type-9").error, Some(FrameError::Type(9)));
    assert_eq!(
        run("err-device-opens-stream").error,
        Some(FrameError::DeviceOpened(2))
    );
    assert_eq!(run("err-reopened").error, Some(FrameError::Reopened(1)));
    // yamux sends a stream's SYN with its first frame: ids may open out of order.
    let out_of_order = run("ok-syn-out-of-order");
    assert_eq!(out_of_order.error, None);
    assert_eq!(out_of_order.opened_total, 2);
    assert_eq!(
        run("err-data-too-large").error,
        Some(FrameError::TooLarge(65537))
    );
    assert_eq!(
        run("err-http-garbage").error,
        Some(FrameError::Version(b'G'))
    );
}

/// The `splice` corpus through the relay's data path, as the fuzz target runs it. Seed
/// names state the expectation: `ok-*` is forwarded and closed properly, `err-*` ends as
/// the operator's protocol error, `end-*` ends as a close; others only must not panic.
#[test]
fn splice_corpus_replays() {
    let files = corpus("splice");
    assert!(
        files.len() >= 10,
        "only {} files in fuzz/corpus/splice",
        files.len()
    );
    let (mut ok, mut err) = (0, 0);
    for (name, data) in &files {
        let outcome = check_splice(data);
        if name.starts_with("ok-") {
            assert_eq!(outcome.reason, "operator closed", "{name}");
            assert!(!outcome.to_device.is_empty(), "{name}: nothing forwarded");
            ok += 1;
        } else if name.starts_with("err-") {
            assert_eq!(outcome.reason, "operator protocol error", "{name}");
            err += 1;
        } else if name.starts_with("end-") {
            assert_eq!(outcome.reason, "operator closed", "{name}");
        }
    }
    assert!(ok >= 4, "only {ok} ok- seeds");
    assert!(err >= 6, "only {err} err- seeds");
    // The seeds' yamux bytes arrive whole: a SYN and 220 bytes of data on stream 1.
    let one = check_splice(
        &files
            .iter()
            .find(|(n, _)| n == "ok-one-message")
            .expect("seed ok-one-message")
            .1,
    );
    assert_eq!(one.to_device.len(), 12 + 12 + 220);
}
