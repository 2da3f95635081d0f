//! The checks behind the fuzz targets in `fuzz/`, shared with the corpus replay test so both
//! run one implementation. Each function panics when it finds a bug; that is the point.
//! Not part of the supported API.

use std::collections::HashSet;

use bytes::BytesMut;

use crate::codec::{decode, encode, encoded_len, peek_fixed_header, DecodeLimits};
use crate::packet::Packet;
use crate::topic::{TopicError, TopicFilter, TopicName, MAX_TOPIC_LEN};
use crate::trie::SubscriptionTrie;

/// The small limit the fuzz targets decode with.
pub const FUZZ_LIMITS: DecodeLimits = DecodeLimits {
    max_packet_size: 4096,
};

/// What [`check_decode`] saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DecodeOutcome {
    /// Packets decoded, in order.
    pub packets: Vec<Packet>,
    /// Whether decoding stopped on an error (rather than on an incomplete packet).
    pub error: bool,
    /// Bytes left in the buffer when decoding stopped.
    pub leftover: usize,
}

/// Decodes `data` packet after packet with [`FUZZ_LIMITS`] until it needs more bytes or
/// fails. Every decoded packet must encode, to [`encoded_len`] bytes, and decode back to
/// itself, also when those bytes arrive one at a time.
pub fn check_decode(data: &[u8]) -> DecodeOutcome {
    let mut buf = BytesMut::from(data);
    let mut outcome = DecodeOutcome::default();
    loop {
        let before = buf.len();
        let peeked = peek_fixed_header(&buf, &FUZZ_LIMITS);
        match decode(&mut buf, &FUZZ_LIMITS) {
            Ok(Some(packet)) => {
                let header = peeked.expect("decode succeeded where peek failed");
                let header = header.expect("decode returned a packet for an incomplete header");
                assert_eq!(
                    before - buf.len(),
                    header.packet_len(),
                    "consumed != packet_len"
                );
                check_round_trip(&packet);
                outcome.packets.push(packet);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                match peeked {
                    Ok(None) => {}
                    Ok(Some(h)) => assert!(h.packet_len() > buf.len(), "complete but Ok(None)"),
                    Err(e) => panic!("peek failed ({e}) but decode returned Ok(None)"),
                }
                break;
            }
            Err(err) => {
                if let Err(peek_err) = peeked {
                    assert_eq!(err, peek_err);
                    assert_eq!(buf.len(), before, "a header error consumed bytes");
                }
                // Display must work for logs and audit events.
                let _ = err.to_string();
                outcome.error = true;
                break;
            }
        }
    }
    outcome.leftover = buf.len();
    outcome
}

/// `packet` (one that decode returned) encodes and decodes back to itself, whole and fed
/// byte by byte.
pub fn check_round_trip(packet: &Packet) {
    let mut wire = BytesMut::new();
    encode(packet, &mut wire).expect("a decoded packet must encode");
    assert_eq!(
        wire.len(),
        encoded_len(packet),
        "encoded_len disagrees with encode"
    );
    let limits = DecodeLimits {
        max_packet_size: wire.len(),
    };
    let bytes = wire.freeze();

    let mut whole = BytesMut::from(&bytes[..]);
    let again = decode(&mut whole, &limits).expect("re-encoded packet must decode");
    assert_eq!(
        again.as_ref(),
        Some(packet),
        "round trip changed the packet"
    );
    assert!(whole.is_empty(), "re-encoded packet left bytes behind");

    let mut trickle = BytesMut::new();
    for (i, byte) in bytes.iter().enumerate() {
        trickle.extend_from_slice(&[*byte]);
        let got = decode(&mut trickle, &limits).expect("a prefix of a valid packet must not fail");
        if i + 1 < bytes.len() {
            assert_eq!(got, None, "decoded a packet from a {}-byte prefix", i + 1);
        } else {
            assert_eq!(
                got.as_ref(),
                Some(packet),
                "byte-by-byte decode changed the packet"
            );
        }
    }
    assert!(trickle.is_empty());
}

/// Splits `data` at `\n` into candidate topic strings (at most 16; invalid UTF-8 replaced)
/// and checks [`TopicName::new`], [`TopicFilter::new`], [`TopicFilter::matches`] and
/// [`SubscriptionTrie`] against each other and against the rules of §4.7.
pub fn check_topics(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let candidates: Vec<&str> = text.split('\n').take(16).collect();
    let mut names = Vec::new();
    let mut filters = Vec::new();
    for s in &candidates {
        let name = TopicName::new(s);
        let filter = TopicFilter::new(s);
        check_topic_rules(s, &name, &filter);
        if let Ok(name) = name {
            names.push(name);
        }
        if let Ok(filter) = filter {
            filters.push(filter);
        }
    }
    // Every name is also matched by the filter spelled the same way, and by `#` unless it
    // is a `$` topic.
    let hash = TopicFilter::new("#").expect("# is a filter");
    for name in &names {
        assert!(TopicFilter::from(name.clone()).matches(name));
        assert_eq!(hash.matches(name), !name.is_dollar());
    }

    let mut trie = SubscriptionTrie::new();
    let mut entries = HashSet::new();
    for (i, filter) in filters.iter().enumerate() {
        let key = i % 3;
        let fresh = entries.insert((filter.clone(), key));
        assert_eq!(trie.insert(filter, key, filter.clone()).is_none(), fresh);
    }
    assert_eq!(trie.len(), entries.len());
    let check_trie = |trie: &SubscriptionTrie<usize, TopicFilter>,
                      entries: &HashSet<(TopicFilter, usize)>| {
        for name in &names {
            let mut got = Vec::new();
            trie.for_each_match(name, |k, f| got.push((f.clone(), *k)));
            got.sort();
            let mut want: Vec<_> = entries
                .iter()
                .filter(|(f, _)| f.matches(name))
                .cloned()
                .collect();
            want.sort();
            assert_eq!(got, want, "trie and matches disagree on {name:?}");
        }
    };
    check_trie(&trie, &entries);
    // Remove every other entry, check again, then empty the trie.
    let mut all: Vec<_> = entries.iter().cloned().collect();
    all.sort();
    for (f, k) in all.iter().step_by(2) {
        assert_eq!(trie.remove(f, k).as_ref(), Some(f));
        assert_eq!(trie.remove(f, k), None);
        entries.remove(&(f.clone(), *k));
    }
    check_trie(&trie, &entries);
    for (f, k) in &entries {
        assert!(trie.remove(f, k).is_some());
    }
    assert!(trie.is_empty());
    assert_eq!(trie.node_count(), 1, "remove left nodes behind");
}

/// The validation rules, restated independently of the implementation in `topic.rs`.
fn check_topic_rules(
    s: &str,
    name: &Result<TopicName, TopicError>,
    filter: &Result<TopicFilter, TopicError>,
) {
    let common_ok = !s.is_empty() && s.len() <= MAX_TOPIC_LEN && !s.contains('\0');
    let name_ok = common_ok && !s.contains(['+', '#']);
    assert_eq!(name.is_ok(), name_ok, "TopicName::new({s:?}) = {name:?}");
    let levels: Vec<&str> = s.split('/').collect();
    let filter_ok = common_ok
        && levels.iter().enumerate().all(|(i, level)| {
            (!level.contains('+') || *level == "+")
                && (!level.contains('#') || (*level == "#" && i + 1 == levels.len()))
        });
    assert_eq!(
        filter.is_ok(),
        filter_ok,
        "TopicFilter::new({s:?}) = {filter:?}"
    );
    if let Ok(name) = name {
        assert_eq!(name.as_str(), s);
        assert_eq!(name.level_count(), levels.len());
        assert_eq!(name.is_dollar(), s.starts_with('$'));
    }
    if let Ok(filter) = filter {
        assert_eq!(filter.as_str(), s);
        assert_eq!(filter.has_wildcards(), s.contains(['+', '#']));
    }
}
