//! The checks behind the fuzz targets in `fuzz/`, shared with the corpus replay test so both
//! run one implementation. Each function panics when it finds a bug; that is the point.
//! Not part of the supported API.

use std::collections::HashSet;

use bytes::BytesMut;

use crate::acl::{filter_contains, filters_intersect, AclFile, Decision, Principal, Reason};
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

/// What [`check_acl`] saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AclOutcome {
    /// Whether the text parsed as an ACL file.
    pub parsed: bool,
    /// `rule_count()` when it parsed.
    pub rules: usize,
    /// The line the parse error named.
    pub error_line: Option<usize>,
}

/// Principals the ACL checks run for: ordinary ones and the hostile identities and client
/// ids of SECURITY-CASES A1.
const FUZZ_PRINCIPALS: &[(Option<&str>, &str)] = &[
    (None, "anon-1"),
    (Some("gw-17"), "gw-17"),
    (Some("alice"), "alice-dashboard"),
    (Some("#"), "#"),
    (Some("+"), "gw-17"),
    (Some("a/b"), "a/b"),
    (Some(""), ""),
    (Some("$SYS"), "$SYS"),
    (Some("%c"), "%u"),
    (Some("gw-17"), "+"),
];

const FUZZ_TOPICS: &[&str] = &[
    "a",
    "a/b",
    "/",
    "devices/gw-17/data/x",
    "devices/gw-17/cmd/reboot",
    "devices/#/data",
    "devices/a/b/data",
    "plant/secret/x",
    "$SYS/broker/clients",
    "$tunnel/gw-17/open/ssh",
    "$tunnel/gw-17/notify",
    "#",
    "+",
];

const FUZZ_FILTERS: &[&str] = &[
    "#",
    "+/#",
    "a/#",
    "a/+",
    "devices/gw-17/#",
    "devices/+/data/#",
    "$SYS/#",
    "$tunnel/+/notify",
    "/#",
];

const FUZZ_TUNNELS: &[(&str, &str)] = &[
    ("gw-17", "ssh"),
    ("gw-18", "http"),
    ("#", "ssh"),
    ("+", "ssh"),
    ("a/b", "ssh"),
    ("gw-17", ""),
    ("gw-17", "s/h"),
];

/// Parses `data` (invalid UTF-8 replaced) as an ACL file. A parse error must name an
/// existing line and suggest a fix. When it parses, runs every check for a few fixed
/// principals against fixed topics and filters plus those spelled on the file's lines,
/// checking that
/// - decisions name real rule lines and explanations agree with them;
/// - `allows_read`/`allows_publish` agree with `check_read`/`check_publish`;
/// - nobody publishes to a `$` topic, and bad tunnel names are refused;
/// - a granted subscription only delivers topics `check_read` allows;
/// - no grant comes from a `%u`/`%c` pattern for a value that must never match (A1);
/// - `filter_contains` and `filters_intersect` agree with `TopicFilter::matches`.
pub fn check_acl(data: &[u8]) -> AclOutcome {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.lines().collect();
    let acl = match AclFile::parse(&text) {
        Ok(acl) => acl,
        Err(e) => {
            assert!(
                (1..=lines.len()).contains(&e.line),
                "error names line {} of {}: {e}",
                e.line,
                lines.len()
            );
            let shown = e.to_string();
            assert!(shown.starts_with(&format!("line {}: ", e.line)), "{shown}");
            assert!(shown.contains("; fix: "), "{shown}");
            return AclOutcome {
                parsed: false,
                rules: 0,
                error_line: Some(e.line),
            };
        }
    };
    let rules = acl.rule_count();
    assert!(rules <= lines.len());

    // Topics and filters: the fixed ones, then the last word of each line (at most 16).
    let mut topics: Vec<TopicName> = FUZZ_TOPICS
        .iter()
        .filter_map(|t| TopicName::new(t).ok())
        .collect();
    let mut filters: Vec<TopicFilter> = FUZZ_FILTERS
        .iter()
        .map(|f| TopicFilter::new(f).expect("fixed filter"))
        .collect();
    for word in lines
        .iter()
        .filter_map(|l| l.split_whitespace().last())
        .take(16)
    {
        let word = word.replace("%u", "gw-17").replace("%c", "gw-17");
        if let Ok(t) = TopicName::new(&word) {
            topics.push(t);
        }
        if let Ok(f) = TopicFilter::new(&word) {
            filters.push(f);
        }
    }

    let check = |d: &Decision, who: &Principal<'_>| {
        let explained = acl.explain(d);
        assert!(
            explained.starts_with(if d.allowed { "allowed" } else { "denied" }),
            "{explained}"
        );
        if let Some(rule) = &d.rule {
            assert!((1..=lines.len()).contains(&rule.line), "{rule:?}");
            assert_eq!(rule.text, lines[rule.line - 1].trim(), "{rule:?}");
            assert!(explained.contains(&format!("line {}: `{}`", rule.line, rule.text)));
            if d.allowed && rule.text.starts_with("pattern") {
                check_no_unsafe_grant(&rule.text, who);
            }
        }
        match d.reason {
            Reason::Granted | Reason::Denied | Reason::DeniedUnsafeSubstitution => {
                assert!(d.rule.is_some(), "{d:?}")
            }
            _ => assert!(d.rule.is_none(), "{d:?}"),
        }
        assert_eq!(
            d.allowed,
            d.reason == Reason::Granted
                || d.reason == Reason::AnonymousConnect
                || d.reason == Reason::ClientIdIsIdentity,
            "{d:?}"
        );
    };

    for &(identity, client_id) in FUZZ_PRINCIPALS {
        let who = Principal {
            identity,
            client_id,
        };
        let connect = acl.check_connect(identity, client_id);
        check(&connect, &who);
        if identity.is_none() {
            assert!(
                connect.allowed,
                "anonymous connect is the broker's decision"
            );
        }
        for topic in &topics {
            let read = acl.check_read(&who, topic);
            check(&read, &who);
            assert_eq!(read.allowed, acl.allows_read(&who, topic), "{topic}");
            let publish = acl.check_publish(&who, topic);
            check(&publish, &who);
            assert_eq!(publish.allowed, acl.allows_publish(&who, topic), "{topic}");
            if topic.is_dollar() {
                assert!(!publish.allowed, "publish to {topic} allowed: {publish:?}");
            }
        }
        for filter in &filters {
            let sub = acl.check_subscribe(&who, filter);
            check(&sub, &who);
            if sub.allowed {
                for topic in topics.iter().filter(|t| filter.matches(t)) {
                    assert!(
                        acl.allows_read(&who, topic),
                        "{who:?} may subscribe {filter} but not read {topic}"
                    );
                }
            }
        }
        for &(device, service) in FUZZ_TUNNELS {
            let tunnel = acl.check_tunnel(&who, device, service);
            check(&tunnel, &who);
            let bad = |s: &str| s.is_empty() || s.contains(['+', '#', '/']);
            if bad(device) || bad(service) {
                assert_eq!(tunnel.reason, Reason::InvalidTunnelName);
            }
        }
    }

    for a in &filters {
        for b in &filters {
            let contains = filter_contains(a, b);
            let meet = filters_intersect(a, b);
            assert_eq!(meet, filters_intersect(b, a), "{a} ∩ {b}");
            if contains {
                assert!(meet, "{a} ⊇ {b} but they do not intersect");
            }
            for t in &topics {
                if contains && b.matches(t) {
                    assert!(a.matches(t), "{a} ⊇ {b} but only {b} matches {t}");
                }
                if a.matches(t) && b.matches(t) {
                    assert!(meet, "{a} and {b} both match {t} but do not intersect");
                }
            }
        }
    }
    AclOutcome {
        parsed: true,
        rules,
        error_line: None,
    }
}

/// A1: a `pattern` grant (its line `text`) must not apply through a value that is empty or
/// contains `+`, `#` or `/`, nor through a `$` value that would start the filter.
fn check_no_unsafe_grant(text: &str, who: &Principal<'_>) {
    let rest = text.trim_start_matches("pattern").trim_start();
    let filter = match rest.split_once(char::is_whitespace) {
        Some((word, after)) if ["read", "write", "readwrite"].contains(&word) => after.trim_start(),
        _ => rest,
    };
    let identity = who
        .identity
        .expect("patterns never apply to anonymous clients");
    let unsafe_value = |v: &str| v.is_empty() || v.contains(['+', '#', '/', '\0']);
    for (placeholder, value) in [("%u", identity), ("%c", who.client_id)] {
        if filter.contains(placeholder) {
            assert!(
                !unsafe_value(value),
                "`{text}` granted through {placeholder} = {value:?}"
            );
        }
        if filter.starts_with(placeholder) {
            assert!(
                !value.starts_with('$'),
                "`{text}` granted through {placeholder} = {value:?}"
            );
        }
    }
}
