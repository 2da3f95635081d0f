//! Validated topic names and topic filters (MQTT 3.1.1 §4.7). (Implementation in progress.)

use std::fmt;
use std::sync::Arc;

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
    pub fn new(s: impl AsRef<str>) -> Result<TopicName, TopicError> {
        let _ = s;
        todo!("topic validation in progress")
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
    pub fn new(s: impl AsRef<str>) -> Result<TopicFilter, TopicError> {
        let _ = s;
        todo!("topic validation in progress")
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
    pub fn matches(&self, topic: &TopicName) -> bool {
        let _ = topic;
        todo!("topic matching in progress")
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
