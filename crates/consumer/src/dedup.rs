//! Duplicate detection by `(device, seq)` in bounded memory.
//!
//! An agent numbers every record of its device with a strictly increasing `seq` (across
//! restarts) and sends it at least once, so the same record can arrive twice (after a
//! reconnect of the agent, of this consumer, or a broker restart). `seq` is not monotonic
//! on the wire: after an outage live records overtake the draining backlog, and the
//! sequence has gaps that never fill (audit records the consumer is not subscribed to,
//! records dropped by a full agent queue, a store moved aside).
//!
//! Per device, [`SeqWindow`] keeps the seqs seen as a set of disjoint ranges: the lowest
//! range ends at the highest contiguous seq, and the ranges above it are the bounded set of
//! seqs seen above it. A record stream in order is one range however long it runs; a live
//! stream overtaking a backlog is two; each gap costs one range. The number of ranges is
//! capped at [`SeqWindow::max_ranges`] ([`DEFAULT_MAX_RANGES`] = 100 000, a few MB for a
//! device in the worst case): when a new gap would exceed it, the lowest gap is given up,
//! that is, treated as seen. A record that arrives afterwards in that oldest gap is
//! dropped as a duplicate (counted in [`SeqWindow::given_up`]); this needs 100 000 gaps
//! still open in one device's sequence, which in practice are permanent ones.
//!
//! Seqs below the lowest range were never seen and are accepted: a consumer that starts
//! while a device drains its backlog behind live data loses nothing.

use std::collections::{BTreeMap, HashMap};

/// Ranges kept per device by default.
pub const DEFAULT_MAX_RANGES: usize = 100_000;

/// The seqs of one device seen so far (see the module documentation).
#[derive(Debug, Clone)]
pub struct SeqWindow {
    /// start → end, inclusive, disjoint and never adjacent (adjacent ranges are merged).
    ranges: BTreeMap<u64, u64>,
    max_ranges: usize,
    given_up: u64,
}

impl SeqWindow {
    /// An empty window keeping at most `max_ranges` ranges (at least 1).
    pub fn new(max_ranges: usize) -> SeqWindow {
        SeqWindow {
            ranges: BTreeMap::new(),
            max_ranges: max_ranges.max(1),
            given_up: 0,
        }
    }

    /// Whether `seq` was seen (or lies in a gap that was given up).
    pub fn contains(&self, seq: u64) -> bool {
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &end)| end >= seq)
    }

    /// Records `seq`; returns true if it is new, false if it is a duplicate.
    pub fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) {
            return false;
        }
        let prev = self
            .ranges
            .range(..seq)
            .next_back()
            .map(|(&s, &e)| (s, e))
            .filter(|&(_, end)| end.checked_add(1) == Some(seq));
        let next = seq
            .checked_add(1)
            .and_then(|n| self.ranges.get(&n).map(|&end| (n, end)));
        match (prev, next) {
            (Some((start, _)), Some((next_start, next_end))) => {
                self.ranges.remove(&next_start);
                self.ranges.insert(start, next_end);
            }
            (Some((start, _)), None) => {
                self.ranges.insert(start, seq);
            }
            (None, Some((next_start, next_end))) => {
                self.ranges.remove(&next_start);
                self.ranges.insert(seq, next_end);
            }
            (None, None) => {
                self.ranges.insert(seq, seq);
                if self.ranges.len() > self.max_ranges {
                    self.give_up_lowest_gap();
                }
            }
        }
        true
    }

    /// Merges the two lowest ranges, treating the gap between them as seen.
    fn give_up_lowest_gap(&mut self) {
        let mut it = self.ranges.iter();
        let (Some((&a_start, &a_end)), Some((&b_start, &b_end))) = (it.next(), it.next()) else {
            return;
        };
        self.given_up += b_start - a_end - 1;
        self.ranges.remove(&b_start);
        self.ranges.insert(a_start, b_end);
    }

    /// The highest seq up to which everything from the lowest seq seen has been seen.
    pub fn highest_contiguous(&self) -> Option<u64> {
        self.ranges.first_key_value().map(|(_, &end)| end)
    }

    /// Ranges currently kept (memory is proportional to this).
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    /// The cap on [`SeqWindow::ranges`].
    pub fn max_ranges(&self) -> usize {
        self.max_ranges
    }

    /// Seqs never seen that were treated as seen because the cap was reached.
    pub fn given_up(&self) -> u64 {
        self.given_up
    }
}

/// One [`SeqWindow`] per device.
#[derive(Debug, Clone)]
pub struct Dedup {
    devices: HashMap<String, SeqWindow>,
    max_ranges: usize,
}

impl Default for Dedup {
    fn default() -> Self {
        Dedup::new(DEFAULT_MAX_RANGES)
    }
}

impl Dedup {
    pub fn new(max_ranges_per_device: usize) -> Dedup {
        Dedup {
            devices: HashMap::new(),
            max_ranges: max_ranges_per_device,
        }
    }

    /// Whether `(device, seq)` was seen.
    pub fn contains(&self, device: &str, seq: u64) -> bool {
        self.devices.get(device).is_some_and(|w| w.contains(seq))
    }

    /// Records `(device, seq)`; returns true if it is new.
    pub fn insert(&mut self, device: &str, seq: u64) -> bool {
        if let Some(w) = self.devices.get_mut(device) {
            return w.insert(seq);
        }
        let mut w = SeqWindow::new(self.max_ranges);
        w.insert(seq);
        self.devices.insert(device.to_string(), w);
        true
    }

    /// The window of one device.
    pub fn device(&self, device: &str) -> Option<&SeqWindow> {
        self.devices.get(device)
    }

    /// Devices seen.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_is_one_range() {
        let mut w = SeqWindow::new(4);
        for seq in 1..=10_000 {
            assert!(w.insert(seq));
        }
        assert_eq!(w.ranges(), 1);
        assert_eq!(w.highest_contiguous(), Some(10_000));
        for seq in [1, 5000, 10_000] {
            assert!(!w.insert(seq), "{seq} accepted twice");
        }
        assert!(w.insert(10_001));
        assert!(w.insert(0), "below the lowest seq seen is new");
        assert_eq!(w.ranges(), 1);
    }

    #[test]
    fn live_overtaking_a_backlog() {
        // A consumer starts while the agent drains 1..=100 behind live records 500...
        let mut w = SeqWindow::new(DEFAULT_MAX_RANGES);
        let mut live = 500..;
        let mut accepted = 0;
        for backlog in 1..=100 {
            assert!(w.insert(live.next().unwrap()));
            assert!(w.insert(backlog));
            accepted += 2;
        }
        assert_eq!(accepted, 200);
        assert_eq!(w.ranges(), 2);
        assert_eq!(w.highest_contiguous(), Some(100));
        // ... and the agent resends everything after a reconnect: all duplicates.
        for seq in (1..=100).chain(500..600) {
            assert!(!w.insert(seq));
        }
        // The gap 101..=499 fills from both ends and the ranges merge.
        for seq in (101..=300).chain((301..=499).rev()) {
            assert!(w.insert(seq));
        }
        assert_eq!(w.ranges(), 1);
        assert_eq!(w.highest_contiguous(), Some(599));
        assert_eq!(w.given_up(), 0);
    }

    #[test]
    fn merging_from_both_sides() {
        let mut w = SeqWindow::new(10);
        assert!(w.insert(10));
        assert!(w.insert(12));
        assert_eq!(w.ranges(), 2);
        assert!(w.insert(11));
        assert_eq!(w.ranges(), 1);
        assert!(w.insert(9));
        assert!(w.insert(13));
        assert_eq!(w.ranges(), 1);
        assert_eq!(w.highest_contiguous(), Some(13));
        assert!((9..=13).all(|s| w.contains(s)));
        assert!(!w.contains(8) && !w.contains(14));
    }

    #[test]
    fn memory_is_bounded_and_the_lowest_gap_is_given_up() {
        let mut w = SeqWindow::new(3);
        // Every other seq: each one is a new range.
        for seq in [2, 4, 6] {
            assert!(w.insert(seq));
        }
        assert_eq!(w.ranges(), 3);
        assert!(w.insert(8));
        assert_eq!(w.ranges(), 3, "the cap holds");
        assert_eq!(w.given_up(), 1);
        // 3 (the lowest gap) is now treated as seen; 5 and 7 are still open.
        assert!(!w.insert(3));
        assert!(w.insert(5));
        assert!(w.insert(7));
        assert_eq!(w.ranges(), 1);
        assert_eq!(w.highest_contiguous(), Some(8));
        // Below the lowest seq seen stays open.
        assert!(w.insert(1));

        let mut w = SeqWindow::new(100);
        for seq in (0..1_000_000).step_by(2) {
            assert!(w.insert(seq));
        }
        assert!(w.ranges() <= 100);
        assert!((0..1_000_000).step_by(2).all(|s| w.contains(s)));
        assert!(w.insert(999_997), "recent gaps are still open");
        assert!(!w.insert(1), "old gaps were given up");
    }

    #[test]
    fn extremes() {
        let mut w = SeqWindow::new(2);
        assert!(w.insert(u64::MAX));
        assert!(w.insert(0));
        assert!(!w.insert(u64::MAX));
        assert!(!w.insert(0));
        assert!(w.insert(u64::MAX - 1));
        assert!(w.insert(1));
        assert_eq!(w.ranges(), 2);
        assert!(w.insert(5));
        assert_eq!(w.ranges(), 2);
        assert_eq!(w.given_up(), 3);
        assert!(w.contains(3));
        assert_eq!(w.highest_contiguous(), Some(5));
    }

    #[test]
    fn devices_are_separate() {
        let mut d = Dedup::new(8);
        assert!(d.insert("gw-1", 1));
        assert!(d.insert("gw-2", 1));
        assert!(!d.insert("gw-1", 1));
        assert!(d.contains("gw-2", 1));
        assert!(!d.contains("gw-3", 1));
        assert_eq!(d.devices(), 2);
        assert_eq!(d.device("gw-1").unwrap().highest_contiguous(), Some(1));
    }
}
