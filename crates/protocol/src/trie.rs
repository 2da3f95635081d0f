//! The subscription trie: topic filters keyed level by level with `+` and `#` nodes, so
//! matching a topic costs O(topic depth), not O(number of subscriptions).
//!
//! Nodes live in one arena (`Vec`) and refer to their children by index, so dropping,
//! cloning or matching never recurses: a filter of 30 000 levels cannot exhaust the stack.
//! A node keeps its `+` and `#` children beside the map of its other levels, so matching
//! a level costs one map lookup, not three.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroUsize;

use crate::topic::{TopicFilter, TopicName};

/// Index of the root node in the arena; the root is never freed.
const ROOT: usize = 0;

/// Maps topic filters to subscribers. `K` identifies a subscriber (a session), `V` is what
/// the subscription carries (its granted QoS, say). One subscriber holds at most one entry
/// per filter.
#[derive(Debug, Clone)]
pub struct SubscriptionTrie<K, V> {
    /// Arena of nodes; `nodes[ROOT]` is the root (the level before the first one).
    nodes: Vec<Node<K, V>>,
    /// Indices of arena slots freed by pruning, reused before the arena grows.
    free: Vec<usize>,
    len: usize,
}

#[derive(Debug, Clone)]
struct Node<K, V> {
    /// Next level (other than `+` and `#`) -> arena index.
    children: HashMap<Box<str>, usize>,
    /// The `+` child (never the root, so never index 0).
    plus: Option<NonZeroUsize>,
    /// The `#` child.
    hash: Option<NonZeroUsize>,
    /// Subscriptions whose filter ends at this node.
    here: HashMap<K, V>,
}

impl<K, V> Node<K, V> {
    fn new() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            hash: None,
            here: HashMap::new(),
        }
    }

    /// The child reached by `level` (`+` and `#` included).
    fn child(&self, level: &str) -> Option<usize> {
        match level {
            "+" => self.plus.map(NonZeroUsize::get),
            "#" => self.hash.map(NonZeroUsize::get),
            _ => self.children.get(level).copied(),
        }
    }

    fn set_child(&mut self, level: &str, idx: usize) {
        let nz = NonZeroUsize::new(idx).expect("the root is nobody's child");
        match level {
            "+" => self.plus = Some(nz),
            "#" => self.hash = Some(nz),
            _ => {
                self.children.insert(level.into(), idx);
            }
        }
    }

    fn remove_child(&mut self, level: &str) {
        match level {
            "+" => self.plus = None,
            "#" => self.hash = None,
            _ => {
                self.children.remove(level);
            }
        }
    }

    fn has_children(&self) -> bool {
        self.plus.is_some() || self.hash.is_some() || !self.children.is_empty()
    }
}

impl<K: Eq + Hash + Clone, V> Default for SubscriptionTrie<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone, V> SubscriptionTrie<K, V> {
    pub fn new() -> Self {
        SubscriptionTrie {
            nodes: vec![Node::new()],
            free: Vec::new(),
            len: 0,
        }
    }

    /// Adds or replaces `key`'s subscription to `filter`; returns the value it replaced.
    pub fn insert(&mut self, filter: &TopicFilter, key: K, value: V) -> Option<V> {
        let mut idx = ROOT;
        for level in filter.levels() {
            idx = match self.nodes[idx].child(level) {
                Some(child) => child,
                None => {
                    let child = self.alloc();
                    self.nodes[idx].set_child(level, child);
                    child
                }
            };
        }
        let old = self.nodes[idx].here.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`'s subscription to `filter`, pruning emptied nodes.
    pub fn remove(&mut self, filter: &TopicFilter, key: &K) -> Option<V> {
        // (parent index, level leading from the parent to the next node on the path)
        let mut path: Vec<(usize, &str)> = Vec::new();
        let mut idx = ROOT;
        for level in filter.levels() {
            let child = self.nodes[idx].child(level)?;
            path.push((idx, level));
            idx = child;
        }
        let old = self.nodes[idx].here.remove(key)?;
        self.len -= 1;
        if self.len == 0 {
            // Nothing left: drop the whole arena rather than pruning node by node.
            self.nodes.truncate(1);
            self.nodes[ROOT] = Node::new();
            self.free.clear();
            return Some(old);
        }
        while let Some((parent, level)) = path.pop() {
            let node = &self.nodes[idx];
            if !node.here.is_empty() || node.has_children() {
                break;
            }
            self.nodes[parent].remove_child(level);
            self.release(idx);
            idx = parent;
        }
        Some(old)
    }

    /// The value `key` holds for exactly `filter`, if it is subscribed to it.
    pub fn get(&self, filter: &TopicFilter, key: &K) -> Option<&V> {
        let mut idx = ROOT;
        for level in filter.levels() {
            idx = self.nodes[idx].child(level)?;
        }
        self.nodes[idx].here.get(key)
    }

    /// Calls `f` once for every (subscriber, value) whose filter matches `topic`. A subscriber
    /// with several matching filters is visited once per filter.
    ///
    /// Same semantics as [`TopicFilter::matches`]: `+` matches one level, `#` its parent and
    /// everything below, and wildcards at the first level never match a `$` topic.
    pub fn for_each_match<'a>(&'a self, topic: &TopicName, mut f: impl FnMut(&'a K, &'a V)) {
        let dollar = topic.is_dollar();
        let mut emit = |idx: usize| {
            for (k, v) in &self.nodes[idx].here {
                f(k, v);
            }
        };
        // A node reached by the levels consumed so far, and the levels left: the one being
        // followed, and those waiting behind `+` branches (no allocation without one).
        let mut next = Some((ROOT, topic.levels()));
        let mut branches = Vec::new();
        while let Some((idx, mut rest)) = next.take().or_else(|| branches.pop()) {
            let node = &self.nodes[idx];
            match rest.next() {
                None => {
                    emit(idx);
                    // `a/#` also matches `a`.
                    if let Some(hash) = node.hash {
                        emit(hash.get());
                    }
                }
                Some(level) => {
                    if !(idx == ROOT && dollar) {
                        if let Some(hash) = node.hash {
                            emit(hash.get());
                        }
                        if let Some(plus) = node.plus {
                            branches.push((plus.get(), rest.clone()));
                        }
                    }
                    // A topic level is never `+` or `#` (TopicName refuses them).
                    if let Some(&child) = node.children.get(level) {
                        next = Some((child, rest));
                    }
                }
            }
        }
    }

    /// Number of (filter, subscriber) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Live nodes, the root included (1 for an empty trie). For tests of pruning.
    #[doc(hidden)]
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    fn alloc(&mut self) -> usize {
        match self.free.pop() {
            Some(idx) => idx,
            None => {
                self.nodes.push(Node::new());
                self.nodes.len() - 1
            }
        }
    }

    fn release(&mut self, idx: usize) {
        debug_assert_ne!(idx, ROOT);
        // Replace rather than clear so the slot's maps give their memory back.
        self.nodes[idx] = Node::new();
        self.free.push(idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }

    fn matches(
        trie: &SubscriptionTrie<u32, &'static str>,
        topic: &str,
    ) -> Vec<(u32, &'static str)> {
        let mut out = Vec::new();
        trie.for_each_match(&TopicName::new(topic).unwrap(), |k, v| out.push((*k, *v)));
        out.sort();
        out
    }

    #[test]
    fn insert_replace_len() {
        let mut t = SubscriptionTrie::new();
        assert!(t.is_empty());
        assert_eq!(t.insert(&filter("a/b"), 1, "x"), None);
        assert_eq!(t.insert(&filter("a/b"), 1, "y"), Some("x"));
        assert_eq!(t.insert(&filter("a/b"), 2, "z"), None);
        assert_eq!(t.insert(&filter("a/+"), 1, "w"), None);
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(&filter("a/b"), &1), Some(&"y"));
        assert_eq!(t.get(&filter("a"), &1), None);
        assert_eq!(matches(&t, "a/b"), vec![(1, "w"), (1, "y"), (2, "z")]);
    }

    #[test]
    fn remove_prunes_empty_nodes() {
        let mut t = SubscriptionTrie::new();
        t.insert(&filter("a/b/c"), 1, "abc");
        t.insert(&filter("a/+"), 1, "a+");
        assert_eq!(t.node_count(), 5); // root, a, b, c, +
        assert_eq!(t.remove(&filter("a/b/c"), &2), None);
        assert_eq!(t.remove(&filter("a/b"), &1), None);
        assert_eq!(t.remove(&filter("x"), &1), None);
        assert_eq!(t.remove(&filter("a/b/c"), &1), Some("abc"));
        assert_eq!(t.node_count(), 3); // root, a, +
        assert_eq!(t.len(), 1);
        // Freed slots are reused.
        t.insert(&filter("a/b/d"), 3, "abd");
        assert_eq!(t.node_count(), 5);
        assert_eq!(t.remove(&filter("a/+"), &1), Some("a+"));
        assert_eq!(t.remove(&filter("a/b/d"), &3), Some("abd"));
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 1);
        assert_eq!(matches(&t, "a/b/d"), vec![]);
    }

    #[test]
    fn wildcard_semantics() {
        let mut t = SubscriptionTrie::new();
        t.insert(&filter("#"), 1, "#");
        t.insert(&filter("+"), 1, "+");
        t.insert(&filter("+/#"), 1, "+/#");
        t.insert(&filter("a/#"), 1, "a/#");
        t.insert(&filter("a/+"), 1, "a/+");
        t.insert(&filter("$SYS/#"), 1, "$SYS/#");
        t.insert(&filter("$SYS/+"), 1, "$SYS/+");
        assert_eq!(
            matches(&t, "a"),
            vec![(1, "#"), (1, "+"), (1, "+/#"), (1, "a/#")]
        );
        assert_eq!(
            matches(&t, "a/"),
            vec![(1, "#"), (1, "+/#"), (1, "a/#"), (1, "a/+")]
        );
        assert_eq!(matches(&t, "b/c/d"), vec![(1, "#"), (1, "+/#")]);
        assert_eq!(matches(&t, "$SYS"), vec![(1, "$SYS/#")]);
        assert_eq!(matches(&t, "$SYS/x"), vec![(1, "$SYS/#"), (1, "$SYS/+")]);
        assert_eq!(matches(&t, "$other"), vec![]);
    }

    #[test]
    fn deep_filters_do_not_recurse() {
        let mut t = SubscriptionTrie::new();
        let deep = "+/".repeat(30_000) + "#";
        let f = filter(&deep);
        t.insert(&f, 1, "deep");
        let topic = TopicName::new("/".repeat(40_000)).unwrap();
        let mut hits = 0;
        t.for_each_match(&topic, |_, _| hits += 1);
        assert_eq!(hits, 1);
        let copy = t.clone();
        assert_eq!(copy.len(), 1);
        drop(copy);
        assert_eq!(t.remove(&f, &1), Some("deep"));
        assert_eq!(t.node_count(), 1);
    }

    const LEVELS: &[&str] = &["a", "b", "", "$s", "$SYS"];

    fn topic_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(LEVELS), 1..5)
            .prop_map(|l| l.join("/"))
            .prop_filter("topics are not empty", |t| !t.is_empty())
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        let level = prop_oneof![3 => prop::sample::select(LEVELS), 2 => Just("+")];
        (prop::collection::vec(level, 1..5), any::<bool>())
            .prop_map(|(mut l, hash)| {
                if hash {
                    l.push("#");
                }
                l.join("/")
            })
            .prop_filter("filters are not empty", |f| !f.is_empty())
    }

    proptest! {
        #[test]
        fn trie_agrees_with_brute_force(
            subs in prop::collection::vec((filter_strategy(), 0u8..4), 0..40),
            topics in prop::collection::vec(topic_strategy(), 1..20),
            removals in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let mut trie = SubscriptionTrie::new();
            let mut model: HashMap<(String, u8), usize> = HashMap::new();
            for (i, (f, k)) in subs.iter().enumerate() {
                let old = trie.insert(&filter(f), *k, i);
                prop_assert_eq!(old, model.insert((f.clone(), *k), i));
            }
            prop_assert_eq!(trie.len(), model.len());
            let check = |trie: &SubscriptionTrie<u8, usize>,
                         model: &HashMap<(String, u8), usize>|
             -> Result<(), TestCaseError> {
                for t in &topics {
                    let name = TopicName::new(t).unwrap();
                    let mut got = Vec::new();
                    trie.for_each_match(&name, |k, v| got.push((*k, *v)));
                    got.sort_unstable();
                    let mut want: Vec<(u8, usize)> = model
                        .iter()
                        .filter(|((f, _), _)| filter(f).matches(&name))
                        .map(|((_, k), v)| (*k, *v))
                        .collect();
                    want.sort_unstable();
                    prop_assert_eq!(got, want, "topic {:?}", t);
                }
                // Pruning leaves exactly the nodes on some remaining filter's path.
                let mut prefixes = std::collections::HashSet::new();
                for (f, _) in model.keys() {
                    let levels: Vec<&str> = f.split('/').collect();
                    for i in 1..=levels.len() {
                        prefixes.insert(levels[..i].to_vec());
                    }
                }
                prop_assert_eq!(trie.node_count(), prefixes.len() + 1);
                Ok(())
            };
            check(&trie, &model)?;
            if !subs.is_empty() {
                for idx in removals {
                    let (f, k) = idx.get(&subs);
                    let removed = trie.remove(&filter(f), k);
                    prop_assert_eq!(removed, model.remove(&(f.clone(), *k)));
                }
                prop_assert_eq!(trie.len(), model.len());
                check(&trie, &model)?;
                let rest: Vec<(String, u8)> = model.keys().cloned().collect();
                for (f, k) in rest {
                    prop_assert!(trie.remove(&filter(&f), &k).is_some());
                }
            }
            prop_assert!(trie.is_empty());
            prop_assert_eq!(trie.node_count(), 1);
        }
    }
}
