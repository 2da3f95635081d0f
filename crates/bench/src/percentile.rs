//! Exact percentiles by the nearest-rank method.
//!
//! The latency and handshake scenarios keep every sample, sort them once and read the
//! percentiles from the sorted vector; nothing is interpolated or estimated.

/// The `p`-th percentile (0 < `p` <= 100) of `sorted` (ascending) by nearest rank: the
/// smallest sample such that at least `p` percent of the samples are less than or equal
/// to it, i.e. the sample at 1-based rank `ceil(p / 100 * n)`. `None` when there are no
/// samples. `p` values outside (0, 100] are clamped to that range (so 0 gives the minimum).
pub fn nearest_rank(sorted: &[u64], p: f64) -> Option<u64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    debug_assert!(
        sorted.windows(2).all(|w| w[0] <= w[1]),
        "samples not sorted"
    );
    let p = if p.is_nan() {
        100.0
    } else {
        p.clamp(0.0, 100.0)
    };
    // Integer arithmetic on parts per million avoids 99.9 * n / 100 landing a hair above
    // an exact integer rank because of binary floating point.
    let ppm = (p * 10_000.0).round() as u128;
    let rank = (ppm * n as u128).div_ceil(1_000_000) as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// Arithmetic mean, `None` for no samples.
pub fn mean(samples: &[u64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
    Some(sum as f64 / samples.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_has_no_percentile() {
        assert_eq!(nearest_rank(&[], 50.0), None);
        assert_eq!(mean(&[]), None);
    }

    #[test]
    fn single_sample_is_every_percentile() {
        for p in [0.0, 0.1, 50.0, 99.9, 100.0] {
            assert_eq!(nearest_rank(&[7], p), Some(7));
        }
    }

    #[test]
    fn textbook_example() {
        // Wikipedia's nearest-rank example: 15, 20, 35, 40, 50.
        let s = [15, 20, 35, 40, 50];
        assert_eq!(nearest_rank(&s, 5.0), Some(15));
        assert_eq!(nearest_rank(&s, 30.0), Some(20));
        assert_eq!(nearest_rank(&s, 40.0), Some(20));
        assert_eq!(nearest_rank(&s, 50.0), Some(35));
        assert_eq!(nearest_rank(&s, 100.0), Some(50));
    }

    #[test]
    fn one_to_thousand() {
        let s: Vec<u64> = (1..=1000).collect();
        assert_eq!(nearest_rank(&s, 50.0), Some(500));
        assert_eq!(nearest_rank(&s, 99.0), Some(990));
        // 99.9 % of 1000 is exactly rank 999; float error must not push it to 1000.
        assert_eq!(nearest_rank(&s, 99.9), Some(999));
        assert_eq!(nearest_rank(&s, 100.0), Some(1000));
        assert_eq!(nearest_rank(&s, 0.0), Some(1));
    }

    #[test]
    fn rank_rounds_up() {
        // ceil(0.5 * 3) = 2, ceil(0.99 * 3) = 3.
        let s = [10, 20, 30];
        assert_eq!(nearest_rank(&s, 50.0), Some(20));
        assert_eq!(nearest_rank(&s, 99.0), Some(30));
        assert_eq!(nearest_rank(&s, 33.0), Some(10));
        assert_eq!(nearest_rank(&s, 34.0), Some(20));
    }

    #[test]
    fn duplicates_and_mean() {
        let s = [1, 1, 1, 1, 100];
        assert_eq!(nearest_rank(&s, 80.0), Some(1));
        assert_eq!(nearest_rank(&s, 81.0), Some(100));
        assert_eq!(mean(&s), Some(20.8));
        assert_eq!(mean(&[u64::MAX, u64::MAX]), Some(u64::MAX as f64));
    }
}
