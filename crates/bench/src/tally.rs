//! Exact loss and duplicate accounting for one receiving client.
//!
//! A [`DeliveryTally`] knows how many messages each publisher will send and keeps one bit
//! per expected message, so a delivery is classified as new, duplicate or unexpected in
//! constant time with no allocation after construction.

use crate::payload::MessageId;

/// How one delivery was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// First copy of an expected message.
    New,
    /// An expected message that had already arrived.
    Duplicate,
    /// Not a message of this run (unknown publisher, sequence out of range, no id).
    Unexpected,
}

/// Which messages one receiver has seen.
#[derive(Debug, Clone, Default)]
pub struct DeliveryTally {
    /// Per publisher: one bit per sequence number, and how many are expected.
    seen: Vec<(Vec<u64>, u64)>,
    expected: u64,
    distinct: u64,
    duplicates: u64,
    unexpected: u64,
}

impl DeliveryTally {
    /// A tally expecting `per_publisher[i]` messages (sequence numbers `0..n`) from
    /// publisher `i`.
    pub fn new(per_publisher: &[u64]) -> DeliveryTally {
        let seen = per_publisher
            .iter()
            .map(|&n| (vec![0u64; n.div_ceil(64) as usize], n))
            .collect();
        DeliveryTally {
            seen,
            expected: per_publisher.iter().sum(),
            ..DeliveryTally::default()
        }
    }

    /// Records one delivery; `None` is a payload without an id.
    pub fn record(&mut self, id: Option<MessageId>) -> Delivery {
        let Some(id) = id else {
            self.unexpected += 1;
            return Delivery::Unexpected;
        };
        let slot = usize::try_from(id.publisher)
            .ok()
            .and_then(|p| self.seen.get_mut(p));
        let Some((bits, count)) = slot else {
            self.unexpected += 1;
            return Delivery::Unexpected;
        };
        if id.seq >= *count {
            self.unexpected += 1;
            return Delivery::Unexpected;
        }
        let word = &mut bits[(id.seq / 64) as usize];
        let mask = 1u64 << (id.seq % 64);
        if *word & mask != 0 {
            self.duplicates += 1;
            Delivery::Duplicate
        } else {
            *word |= mask;
            self.distinct += 1;
            Delivery::New
        }
    }

    /// Every expected message has arrived at least once.
    pub fn is_complete(&self) -> bool {
        self.distinct >= self.expected
    }

    pub fn expected(&self) -> u64 {
        self.expected
    }

    /// Expected messages that arrived (each counted once).
    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    /// Extra copies of messages that had already arrived.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Deliveries that were not messages of this run.
    pub fn unexpected(&self) -> u64 {
        self.unexpected
    }

    /// How many of the first `sent[i]` messages of each publisher `i` never arrived. Pass
    /// what the publishers really sent (fewer than expected when the run timed out).
    pub fn lost_of(&self, sent: &[u64]) -> u64 {
        self.seen
            .iter()
            .zip(sent)
            .map(|((bits, count), &sent)| {
                let sent = sent.min(*count);
                let full_words = (sent / 64) as usize;
                let mut seen: u64 = bits[..full_words]
                    .iter()
                    .map(|w| u64::from(w.count_ones()))
                    .sum();
                let rest = sent % 64;
                if rest > 0 {
                    let mask = (1u64 << rest) - 1;
                    seen += u64::from((bits[full_words] & mask).count_ones());
                }
                sent - seen
            })
            .sum()
    }
}

/// Sums of several tallies (one per subscriber) against what was sent to each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossSummary {
    /// Deliveries that should have happened.
    pub sent: u64,
    /// Distinct deliveries that did.
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub unexpected: u64,
}

impl LossSummary {
    /// Adds one receiver's tally; `sent[i]` is what publisher `i` actually sent.
    pub fn add(&mut self, tally: &DeliveryTally, sent: &[u64]) {
        let expected_now: u64 = sent
            .iter()
            .zip(&tally.seen)
            .map(|(&s, (_, count))| s.min(*count))
            .sum();
        let lost = tally.lost_of(sent);
        debug_assert!(expected_now - lost <= tally.distinct());
        self.sent += expected_now;
        self.received += expected_now - lost;
        self.lost += lost;
        self.duplicates += tally.duplicates();
        self.unexpected += tally.unexpected();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(publisher: u64, seq: u64) -> Option<MessageId> {
        Some(MessageId {
            publisher,
            seq,
            sent_ns: 0,
        })
    }

    #[test]
    fn counts_new_duplicate_and_unexpected() {
        let mut t = DeliveryTally::new(&[3, 100]);
        assert_eq!(t.expected(), 103);
        assert_eq!(t.record(id(0, 0)), Delivery::New);
        assert_eq!(t.record(id(0, 0)), Delivery::Duplicate);
        assert_eq!(t.record(id(0, 3)), Delivery::Unexpected, "seq out of range");
        assert_eq!(
            t.record(id(2, 0)),
            Delivery::Unexpected,
            "unknown publisher"
        );
        assert_eq!(t.record(None), Delivery::Unexpected, "no id");
        assert_eq!(t.record(id(1, 99)), Delivery::New);
        assert_eq!(t.record(id(1, 64)), Delivery::New);
        assert_eq!((t.distinct(), t.duplicates(), t.unexpected()), (3, 1, 3));
        assert!(!t.is_complete());
        assert_eq!(t.lost_of(&[3, 100]), 100);
    }

    #[test]
    fn complete_in_any_order() {
        let mut t = DeliveryTally::new(&[130]);
        for seq in (0..130).rev() {
            assert_eq!(t.record(id(0, seq)), Delivery::New);
        }
        assert!(t.is_complete());
        assert_eq!(t.lost_of(&[130]), 0);
        assert_eq!(t.record(id(0, 129)), Delivery::Duplicate);
        assert!(t.is_complete());
    }

    #[test]
    fn loss_only_counts_what_was_sent() {
        // Publisher expected to send 200 but stopped (deadline) after 70; 65 arrived,
        // among them seq 69 but not 3, 10, 64, 65, 66.
        let mut t = DeliveryTally::new(&[200]);
        for seq in 0..70 {
            if ![3, 10, 64, 65, 66].contains(&seq) {
                t.record(id(0, seq));
            }
        }
        assert_eq!(t.lost_of(&[70]), 5);
        assert_eq!(t.lost_of(&[64]), 2, "bits at and above 64 are not counted");
        assert_eq!(t.lost_of(&[0]), 0);
        assert_eq!(t.lost_of(&[200]), 135);
        assert_eq!(
            t.lost_of(&[1000]),
            135,
            "sent is capped at what was expected"
        );
    }

    #[test]
    fn summary_adds_receivers() {
        let mut a = DeliveryTally::new(&[10]);
        let mut b = DeliveryTally::new(&[10]);
        for seq in 0..10 {
            a.record(id(0, seq));
            if seq != 4 {
                b.record(id(0, seq));
            }
        }
        b.record(id(0, 0));
        b.record(id(7, 0));
        let mut sum = LossSummary::default();
        sum.add(&a, &[10]);
        sum.add(&b, &[10]);
        assert_eq!(
            sum,
            LossSummary {
                sent: 20,
                received: 19,
                lost: 1,
                duplicates: 1,
                unexpected: 1,
            }
        );
    }

    #[test]
    fn empty_expectation_is_complete() {
        let t = DeliveryTally::new(&[0, 0]);
        assert!(t.is_complete());
        assert_eq!(t.lost_of(&[0, 0]), 0);
    }
}
