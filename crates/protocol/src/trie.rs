//! The subscription trie: topic filters keyed level by level with `+` and `#` nodes, so
//! matching a topic costs O(topic depth), not O(number of subscriptions).
//! (Implementation in progress.)

use std::collections::HashMap;
use std::hash::Hash;

use crate::topic::{TopicFilter, TopicName};

/// Maps topic filters to subscribers. `K` identifies a subscriber (a session), `V` is what
/// the subscription carries (its granted QoS, say). One subscriber holds at most one entry
/// per filter.
#[derive(Debug, Clone)]
pub struct SubscriptionTrie<K, V> {
    root: Node<K, V>,
    len: usize,
}

#[derive(Debug, Clone)]
struct Node<K, V> {
    children: HashMap<Box<str>, Node<K, V>>,
    /// Subscriptions whose filter ends at this node.
    here: HashMap<K, V>,
}

impl<K: Eq + Hash + Clone, V> Default for SubscriptionTrie<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone, V> SubscriptionTrie<K, V> {
    pub fn new() -> Self {
        SubscriptionTrie { root: Node { children: HashMap::new(), here: HashMap::new() }, len: 0 }
    }

    /// Adds or replaces `key`'s subscription to `filter`; returns the value it replaced.
    pub fn insert(&mut self, filter: &TopicFilter, key: K, value: V) -> Option<V> {
        let _ = (filter, key, value);
        todo!("trie in progress")
    }

    /// Removes `key`'s subscription to `filter`, pruning emptied nodes.
    pub fn remove(&mut self, filter: &TopicFilter, key: &K) -> Option<V> {
        let _ = (filter, key);
        todo!("trie in progress")
    }

    /// Calls `f` once for every (subscriber, value) whose filter matches `topic`. A subscriber
    /// with several matching filters is visited once per filter.
    pub fn for_each_match(&self, topic: &TopicName, f: impl FnMut(&K, &V)) {
        let _ = (topic, f);
        todo!("trie in progress")
    }

    /// Number of (filter, subscriber) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
