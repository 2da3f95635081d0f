//! Property tests of the ACL engine.
//!
//! - `filter_contains` and `filters_intersect` against brute force over a universe of topics
//!   that is exact for filters built from the same small alphabet: levels {"a", "b", "$x",
//!   ""} plus one level no filter mentions ("z", standing for every other level), and one
//!   level deeper than the deepest filter.
//! - `AclFile` read/publish decisions against a naive model (string substitution, then
//!   `TopicFilter::matches`), and subscribe soundness: a granted filter delivers only
//!   topics `check_read` allows.

use std::sync::OnceLock;

use bulwark_protocol::acl::{filter_contains, filters_intersect, AclFile, Principal};
use bulwark_protocol::{TopicFilter, TopicName};
use proptest::prelude::*;

/// Literal levels filters are built from.
const FILTER_LEVELS: [&str; 4] = ["a", "b", "$x", ""];
/// Deepest filter generated.
const MAX_FILTER_DEPTH: usize = 4;

/// Every valid topic of 1..=MAX_FILTER_DEPTH+1 levels over FILTER_LEVELS + "z".
fn universe() -> &'static [TopicName] {
    static U: OnceLock<Vec<TopicName>> = OnceLock::new();
    U.get_or_init(|| {
        let alphabet: Vec<&str> = FILTER_LEVELS.iter().copied().chain(["z"]).collect();
        let mut out = Vec::new();
        let mut layer: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
        for depth in 1..=MAX_FILTER_DEPTH + 1 {
            out.extend(layer.iter().filter_map(|t| TopicName::new(t).ok()));
            if depth <= MAX_FILTER_DEPTH {
                layer = layer
                    .iter()
                    .flat_map(|t| alphabet.iter().map(move |l| format!("{t}/{l}")))
                    .collect();
            }
        }
        out
    })
}

fn filter_from(levels: &[String], hash: bool) -> Option<TopicFilter> {
    let mut levels = levels.to_vec();
    if hash {
        levels.push("#".into());
    }
    TopicFilter::new(levels.join("/")).ok()
}

/// Filters of 1..=4 levels over FILTER_LEVELS, '+' and a final '#'.
fn filter() -> impl Strategy<Value = TopicFilter> {
    let level = prop_oneof![
        2 => prop::sample::select(&FILTER_LEVELS[..]).prop_map(String::from),
        1 => Just("+".to_string()),
    ];
    (
        prop::collection::vec(level, 0..=MAX_FILTER_DEPTH),
        any::<bool>(),
    )
        .prop_filter_map("valid filter of at most 4 levels", |(mut levels, hash)| {
            if hash && levels.len() == MAX_FILTER_DEPTH {
                levels.pop();
            }
            filter_from(&levels, hash)
        })
}

/// Every valid filter of 1..=4 levels over FILTER_LEVELS, '+' and a final '#'.
fn all_filters() -> Vec<TopicFilter> {
    let alphabet: Vec<String> = FILTER_LEVELS
        .iter()
        .copied()
        .chain(["+"])
        .map(String::from)
        .collect();
    let mut prefixes: Vec<Vec<String>> = vec![vec![]];
    let mut out = Vec::new();
    for depth in 0..=MAX_FILTER_DEPTH {
        for p in &prefixes {
            out.extend(filter_from(p, false));
            if depth < MAX_FILTER_DEPTH {
                out.extend(filter_from(p, true));
            }
        }
        prefixes = prefixes
            .iter()
            .flat_map(|p| {
                alphabet.iter().map(move |l| {
                    let mut p = p.clone();
                    p.push(l.clone());
                    p
                })
            })
            .collect();
    }
    out
}

/// Exhaustive: every pair of filters of the alphabet, with match sets as bitsets.
#[test]
fn containment_and_intersection_are_exact_for_every_pair() {
    let filters = all_filters();
    let topics = universe();
    let words = topics.len().div_ceil(64);
    let sets: Vec<Vec<u64>> = filters
        .iter()
        .map(|f| {
            let mut bits = vec![0u64; words];
            for (i, t) in topics.iter().enumerate() {
                if f.matches(t) {
                    bits[i / 64] |= 1 << (i % 64);
                }
            }
            bits
        })
        .collect();
    assert!(filters.len() > 700, "{} filters", filters.len());
    for (a, sa) in filters.iter().zip(&sets) {
        assert!(
            sa.iter().any(|w| *w != 0),
            "{a} matches nothing in the universe"
        );
        for (b, sb) in filters.iter().zip(&sets) {
            let contains = sb.iter().zip(sa).all(|(b, a)| b & !a == 0);
            assert_eq!(filter_contains(a, b), contains, "{a} ⊇ {b}");
            let meet = sa.iter().zip(sb).any(|(a, b)| a & b != 0);
            assert_eq!(filters_intersect(a, b), meet, "{a} ∩ {b}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn containment_is_exact(outer in filter(), inner in filter()) {
        let brute = universe()
            .iter()
            .filter(|t| inner.matches(t))
            .all(|t| outer.matches(t));
        prop_assert_eq!(filter_contains(&outer, &inner), brute, "{} ⊇ {}", outer, inner);
    }

    #[test]
    fn intersection_is_exact(a in filter(), b in filter()) {
        let brute = universe().iter().any(|t| a.matches(t) && b.matches(t));
        prop_assert_eq!(filters_intersect(&a, &b), brute, "{} ∩ {}", a, b);
        prop_assert_eq!(filters_intersect(&b, &a), brute);
    }

    #[test]
    fn containment_is_reflexive_and_implies_intersection(a in filter(), b in filter()) {
        prop_assert!(filter_contains(&a, &a));
        prop_assert!(filters_intersect(&a, &a));
        if filter_contains(&a, &b) {
            prop_assert!(filters_intersect(&a, &b));
        }
    }
}

// ---------------------------------------------------------------------------------------
// ACL decisions against a naive model
// ---------------------------------------------------------------------------------------

const NAMES: [&str; 7] = ["a", "b", "$x", "+", "#", "a/b", "z"];
const CLIENT_IDS: [&str; 7] = ["a", "b", "$x", "+", "#", "a/b", ""];

#[derive(Debug, Clone)]
enum Line {
    User(&'static str),
    Topic(&'static str, String),
    Pattern(&'static str, String),
}

fn access() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&["read", "write", "readwrite", "deny"][..])
}

fn template() -> impl Strategy<Value = String> {
    let level = prop_oneof![
        3 => prop::sample::select(&FILTER_LEVELS[..]).prop_map(String::from),
        1 => Just("+".to_string()),
        2 => Just("%u".to_string()),
        1 => Just("%c".to_string()),
        1 => Just("p%u".to_string()),
    ];
    (prop::collection::vec(level, 0..=3), any::<bool>()).prop_filter_map(
        "valid template",
        |(levels, hash)| {
            let probe: Vec<String> = levels
                .iter()
                .map(|l| l.replace("%u", "q").replace("%c", "q"))
                .collect();
            filter_from(&probe, hash)?;
            let mut levels = levels;
            if hash {
                levels.push("#".into());
            }
            Some(levels.join("/"))
        },
    )
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        1 => prop::sample::select(&NAMES[..]).prop_map(Line::User),
        3 => (access(), filter()).prop_map(|(a, f)| Line::Topic(a, f.to_string())),
        3 => (access(), template()).prop_map(|(a, t)| Line::Pattern(a, t)),
    ]
}

fn render(lines: &[Line]) -> String {
    let mut s = String::new();
    for l in lines {
        match l {
            Line::User(n) => s += &format!("user {n}\n"),
            Line::Topic(a, f) => s += &format!("topic {a} {f}\n"),
            Line::Pattern(a, t) => s += &format!("pattern {a} {t}\n"),
        }
    }
    s
}

/// Naive model of one operation ("read" or "write") on a topic.
fn model(lines: &[Line], who: &Principal<'_>, topic: &TopicName, op: &str) -> bool {
    let ok = |v: &str| !v.is_empty() && !v.contains(['+', '#', '/']);
    let mut user: Option<&str> = None;
    let mut granted = false;
    for l in lines {
        let (access, filter, grant_usable) = match l {
            Line::User(n) => {
                user = Some(n);
                continue;
            }
            Line::Topic(a, f) => {
                if user != who.identity {
                    continue;
                }
                (*a, TopicFilter::new(f).unwrap(), true)
            }
            Line::Pattern(a, t) => {
                let Some(id) = who.identity else { continue };
                let uses_u = t.contains("%u");
                let uses_c = t.contains("%c");
                if (uses_u && !ok(id)) || (uses_c && !ok(who.client_id)) {
                    if *a == "deny" {
                        return false; // fail closed
                    }
                    continue;
                }
                let levels: Vec<String> = t
                    .split('/')
                    .map(|l| match l {
                        "%u" => id.to_string(),
                        "%c" => who.client_id.to_string(),
                        "p%u" => format!("p{id}"),
                        other => other.to_string(),
                    })
                    .collect();
                let s = levels.join("/");
                let leading_dollar = s.starts_with('$') && !t.starts_with('$');
                (*a, TopicFilter::new(s).unwrap(), !leading_dollar)
            }
        };
        if !filter.matches(topic) {
            continue;
        }
        match access {
            "deny" => return false,
            "readwrite" => granted |= grant_usable,
            a if a == op => granted |= grant_usable,
            _ => {}
        }
    }
    granted && !(op == "write" && topic.is_dollar())
}

fn principal() -> impl Strategy<Value = (Option<&'static str>, &'static str)> {
    (
        prop_oneof![
            1 => Just(None),
            6 => prop::sample::select(&NAMES[..]).prop_map(Some),
        ],
        prop::sample::select(&CLIENT_IDS[..]),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn read_and_publish_follow_the_model(
        lines in prop::collection::vec(line(), 0..8),
        (identity, client_id) in principal(),
    ) {
        let acl = AclFile::parse(&render(&lines)).expect("generated ACL parses");
        let who = Principal { identity, client_id };
        for topic in universe().iter().step_by(7) {
            let r = acl.check_read(&who, topic);
            prop_assert_eq!(r.allowed, model(&lines, &who, topic, "read"), "read {}: {:?}", topic, r);
            prop_assert_eq!(r.allowed, acl.allows_read(&who, topic));
            let w = acl.check_publish(&who, topic);
            prop_assert_eq!(w.allowed, model(&lines, &who, topic, "write"), "write {}: {:?}", topic, w);
            prop_assert_eq!(w.allowed, acl.allows_publish(&who, topic));
            for d in [&r, &w] {
                prop_assert!(!acl.explain(d).is_empty());
            }
        }
    }

    #[test]
    fn granted_subscriptions_deliver_only_readable_topics(
        lines in prop::collection::vec(line(), 0..8),
        (identity, client_id) in principal(),
        f in filter(),
    ) {
        let acl = AclFile::parse(&render(&lines)).expect("generated ACL parses");
        let who = Principal { identity, client_id };
        let d = acl.check_subscribe(&who, &f);
        if d.allowed {
            for topic in universe().iter().filter(|t| f.matches(t)) {
                prop_assert!(acl.allows_read(&who, topic), "{} granted but {} is not readable: {:?}", f, topic, d);
            }
        }
    }
}
