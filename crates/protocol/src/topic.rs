//! Validated topic names and topic filters (MQTT 3.1.1 §4.7).
//!
//! A [`TopicName`] is what a PUBLISH carries: at least one character, at most 65535 bytes,
//! no wildcard and no U+0000. A [`TopicFilter`] is what SUBSCRIBE and UNSUBSCRIBE carry:
//! the same length and character rules, with `+` and `#` allowed only as whole levels and
//! `#` only as the last level. Both are immutable once built and cheap to clone.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Longest topic name or filter the wire format can carry (a two-byte length prefix).
pub const MAX_TOPIC_LEN: usize = 65535;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than 65535 bytes")]
    TooLong,
    #[error("topic contains U+0000")]
    NullCharacter,
    #[error("wildcard '+' or '#' in a topic name")]
    WildcardInName,
    #[error("'#' must be the last level and alone in it")]
    InvalidMultiLevelWildcard,
    #[error("'+' must occupy a whole level")]
    InvalidSingleLevelWildcard,
}

/// A topic name as used in PUBLISH: non-empty, no wildcards, no U+0000. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

/// A topic filter as used in SUBSCRIBE/UNSUBSCRIBE: wildcards only as whole levels, `#`
/// only last. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(Arc<str>);

impl TopicName {
    /// Validates `s` as a topic name: non-empty, at most 65535 bytes, no `+`, `#` or U+0000.
    pub fn new(s: impl AsRef<str>) -> Result<TopicName, TopicError> {
        let s = s.as_ref();
        check_common(s)?;
        if s.contains(['+', '#']) {
            return Err(TopicError::WildcardInName);
        }
        Ok(TopicName(Arc::from(s)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// `$SYS/...`, `$tunnel/...`: topics that start with `$` (§4.7.2).
    pub fn is_dollar(&self) -> bool {
        self.0.starts_with('$')
    }
    /// Number of `/`-separated levels.
    pub fn level_count(&self) -> usize {
        self.0.split('/').count()
    }
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }
}

impl TopicFilter {
    /// Validates `s` as a topic filter: non-empty, at most 65535 bytes, no U+0000, `+` only
    /// as a whole level, `#` only as a whole level and the last one.
    pub fn new(s: impl AsRef<str>) -> Result<TopicFilter, TopicError> {
        let s = s.as_ref();
        check_common(s)?;
        let mut levels = s.split('/').peekable();
        while let Some(level) = levels.next() {
            if level.contains('#') && (level != "#" || levels.peek().is_some()) {
                return Err(TopicError::InvalidMultiLevelWildcard);
            }
            if level.contains('+') && level != "+" {
                return Err(TopicError::InvalidSingleLevelWildcard);
            }
        }
        Ok(TopicFilter(Arc::from(s)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn level_count(&self) -> usize {
        self.0.split('/').count()
    }
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }
    pub fn has_wildcards(&self) -> bool {
        self.0.contains(['+', '#'])
    }
    /// Whether `topic` matches this filter (§4.7, including the `$` rule of §4.7.2).
    ///
    /// `+` matches exactly one level (which may be empty), `#` matches its parent level and
    /// any number of levels below it (so `a/#` matches `a`), and a filter whose first level
    /// is a wildcard never matches a topic that starts with `$`.
    pub fn matches(&self, topic: &TopicName) -> bool {
        // The common filters without taking both apart level by level (checked for every
        // ACL rule of every publish and delivery): no `+` and either no `#` (the same
        // string) or a trailing `#` (the prefix itself, or anything below it). A `#` is
        // always last and alone in its level, a `+` alone in its level.
        let (f, t) = (self.0.as_bytes(), topic.0.as_bytes());
        if !f.contains(&b'+') {
            return match f.split_last() {
                Some((b'#', [])) => !topic.is_dollar(),
                Some((b'#', [prefix @ .., b'/'])) => {
                    t.starts_with(prefix) && (t.len() == prefix.len() || t[prefix.len()] == b'/')
                }
                _ => f == t,
            };
        }
        self.matches_by_level(topic)
    }

    /// [`TopicFilter::matches`] for any filter, one level at a time (the `$` rule
    /// included).
    fn matches_by_level(&self, topic: &TopicName) -> bool {
        if topic.is_dollar() && self.0.starts_with(['+', '#']) {
            return false;
        }
        let mut filter = self.levels();
        let mut name = topic.levels();
        loop {
            match (filter.next(), name.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(n)) if f == n => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}
impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}
impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The rules names and filters share: non-empty, at most 65535 bytes, no U+0000.
fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        Err(TopicError::Empty)
    } else if s.len() > MAX_TOPIC_LEN {
        Err(TopicError::TooLong)
    } else if s.contains('\0') {
        Err(TopicError::NullCharacter)
    } else {
        Ok(())
    }
}

impl AsRef<str> for TopicName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}
impl AsRef<str> for TopicFilter {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for TopicName {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicName::new(s)
    }
}
impl FromStr for TopicFilter {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicFilter::new(s)
    }
}

impl TryFrom<&str> for TopicName {
    type Error = TopicError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        TopicName::new(s)
    }
}
impl TryFrom<String> for TopicName {
    type Error = TopicError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TopicName::new(s)
    }
}
impl TryFrom<&str> for TopicFilter {
    type Error = TopicError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        TopicFilter::new(s)
    }
}
impl TryFrom<String> for TopicFilter {
    type Error = TopicError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TopicFilter::new(s)
    }
}

/// Every topic name is also a valid filter, one that matches exactly that name.
impl From<TopicName> for TopicFilter {
    fn from(name: TopicName) -> Self {
        TopicFilter(name.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }
    fn filter(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }
    fn m(f: &str, t: &str) -> bool {
        filter(f).matches(&name(t))
    }

    #[test]
    fn name_must_not_be_empty() {
        assert_eq!(TopicName::new(""), Err(TopicError::Empty));
    }

    #[test]
    fn name_length_limit() {
        assert!(TopicName::new("a".repeat(MAX_TOPIC_LEN)).is_ok());
        assert_eq!(
            TopicName::new("a".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong)
        );
        // The limit counts UTF-8 bytes, not characters.
        assert_eq!(TopicName::new("é".repeat(32768)), Err(TopicError::TooLong));
    }

    #[test]
    fn name_rejects_wildcards() {
        for s in ["+", "#", "a/+", "a/#", "a+b", "a#", "sport/tennis#"] {
            assert_eq!(TopicName::new(s), Err(TopicError::WildcardInName), "{s}");
        }
    }

    #[test]
    fn name_rejects_nul() {
        assert_eq!(TopicName::new("a\0b"), Err(TopicError::NullCharacter));
    }

    #[test]
    fn name_accepts_ordinary_topics() {
        for s in [
            "a",
            "/",
            "a/b/c",
            "/finance",
            "$SYS/broker",
            "a//b",
            " ",
            "sport/tennis player1",
        ] {
            assert_eq!(name(s).as_str(), s);
        }
        assert_eq!(name("a//b").level_count(), 3);
        assert!(name("$SYS/x").is_dollar());
        assert!(!name("x/$SYS").is_dollar());
    }

    #[test]
    fn filter_must_not_be_empty_nor_too_long() {
        assert_eq!(TopicFilter::new(""), Err(TopicError::Empty));
        assert!(TopicFilter::new("+").is_ok());
        assert_eq!(
            TopicFilter::new("a".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong)
        );
        assert!(TopicFilter::new("a".repeat(MAX_TOPIC_LEN)).is_ok());
    }

    #[test]
    fn filter_rejects_nul() {
        assert_eq!(TopicFilter::new("a/\0"), Err(TopicError::NullCharacter));
    }

    #[test]
    fn filter_single_level_wildcard_must_fill_its_level() {
        for s in [
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "/+",
            "+/",
            "+/+",
            "a/+/+/b",
        ] {
            assert!(TopicFilter::new(s).is_ok(), "{s}");
        }
        for s in ["sport+", "a/b+/c", "++", "+a", "a/+b"] {
            assert_eq!(
                TopicFilter::new(s),
                Err(TopicError::InvalidSingleLevelWildcard),
                "{s}"
            );
        }
    }

    #[test]
    fn filter_multi_level_wildcard_must_be_last_and_alone() {
        for s in ["#", "a/#", "/#", "+/#", "a/b/#"] {
            assert!(TopicFilter::new(s).is_ok(), "{s}");
        }
        for s in ["sport/tennis#", "#/a", "a/#/b", "##", "a/#/", "#+", "+#"] {
            assert_eq!(
                TopicFilter::new(s),
                Err(TopicError::InvalidMultiLevelWildcard),
                "{s}"
            );
        }
    }

    #[test]
    fn filter_has_wildcards() {
        assert!(filter("a/+").has_wildcards());
        assert!(filter("#").has_wildcards());
        assert!(!filter("a/b").has_wildcards());
    }

    #[test]
    fn exact_match() {
        assert!(m("a/b", "a/b"));
        assert!(!m("a/b", "a/c"));
        assert!(!m("a/b", "a/b/c"));
        assert!(!m("a/b/c", "a/b"));
        assert!(!m("a", "a/"));
        assert!(!m("/a", "a"));
        assert!(m("/", "/"));
    }

    #[test]
    fn single_level_wildcard_matches_one_level() {
        assert!(m("sport/tennis/+", "sport/tennis/player1"));
        assert!(m("sport/tennis/+", "sport/tennis/player2"));
        assert!(!m("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!m("sport/+", "sport"));
        assert!(m("sport/+", "sport/"));
        assert!(m("+", "a"));
        assert!(!m("+", "a/b"));
        assert!(m("+/+", "/finance"));
        assert!(m("/+", "/finance"));
        assert!(!m("+", "/finance"));
        assert!(m("+/+", "/"));
        assert!(m("a/+/c", "a//c"));
    }

    #[test]
    fn multi_level_wildcard_matches_parent_and_below() {
        assert!(m("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(m("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(m(
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon"
        ));
        assert!(m("sport/#", "sport"));
        assert!(m("a/#", "a"));
        assert!(m("a/#", "a/"));
        assert!(!m("a/#", "ab"));
        assert!(!m("a/b/#", "a"));
        assert!(m("#", "a"));
        assert!(m("#", "/"));
        assert!(m("#", "a/b/c"));
        assert!(m("+/#", "a"));
        assert!(m("+/#", "a/b/c"));
    }

    #[test]
    fn wildcards_at_the_first_level_skip_dollar_topics() {
        assert!(!m("#", "$SYS/broker/clients"));
        assert!(!m("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(!m("+", "$SYS"));
        assert!(!m("+/#", "$tunnel/x"));
        assert!(m("$SYS/#", "$SYS/monitor/Clients"));
        assert!(m("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(m("$SYS", "$SYS"));
        // Only the first level is special.
        assert!(m("a/+", "a/$b"));
        assert!(m("a/#", "a/$b"));
    }

    #[test]
    fn fast_paths_agree_with_matching_by_level() {
        // Every filter and topic over a small alphabet of levels, including empty ones.
        let levels = ["a", "b", "", "$s"];
        let mut topics = Vec::new();
        for n in 1..=3 {
            let mut idx = vec![0usize; n];
            loop {
                topics.push(idx.iter().map(|&i| levels[i]).collect::<Vec<_>>().join("/"));
                let mut k = 0;
                while k < n {
                    idx[k] += 1;
                    if idx[k] < levels.len() {
                        break;
                    }
                    idx[k] = 0;
                    k += 1;
                }
                if k == n {
                    break;
                }
            }
        }
        let mut filters: Vec<String> = Vec::new();
        for t in &topics {
            let parts: Vec<&str> = t.split('/').collect();
            filters.push(t.clone());
            filters.push(format!("{t}/#"));
            for i in 0..parts.len() {
                let mut p = parts.clone();
                p[i] = "+";
                filters.push(p.join("/"));
                filters.push(
                    parts[..i]
                        .iter()
                        .chain(["#"].iter())
                        .copied()
                        .collect::<Vec<_>>()
                        .join("/"),
                );
            }
        }
        filters.push("#".into());
        let (mut checked, mut matched) = (0, 0);
        for f in filters.iter().filter_map(|f| TopicFilter::new(f).ok()) {
            for t in topics.iter().filter_map(|t| TopicName::new(t).ok()) {
                let fast = f.matches(&t);
                assert_eq!(fast, f.matches_by_level(&t), "filter {f:?} topic {t:?}");
                checked += 1;
                matched += usize::from(fast);
            }
        }
        assert!(
            checked > 10_000 && matched > 1_000,
            "{checked} pairs, {matched} matches"
        );
    }

    #[test]
    fn conversions() {
        let n: TopicName = "a/b".parse().unwrap();
        assert_eq!(n.to_string(), "a/b");
        assert_eq!(TopicName::try_from("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(
            TopicFilter::try_from(String::from("a/+")).unwrap().as_str(),
            "a/+"
        );
        assert_eq!(
            "x#".parse::<TopicFilter>(),
            Err(TopicError::InvalidMultiLevelWildcard)
        );
        let f = TopicFilter::from(n.clone());
        assert!(f.matches(&n));
        assert_eq!(format!("{n:?}"), "\"a/b\"");
    }
}
