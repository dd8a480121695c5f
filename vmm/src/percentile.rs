//! Nearest-rank percentiles and durations in microseconds, shared by probe reports, benchmarks
//! and the CLI.

use std::time::{Duration, Instant};

/// `d` in microseconds, the unit every reported latency uses.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Microseconds since `since`, as a float.
pub fn micros_since(since: Instant) -> f64 {
    micros(since.elapsed())
}

/// The samples in ascending order, for [`nearest_rank`].
pub fn sorted(samples: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut sorted: Vec<f64> = samples.into_iter().collect();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// The nearest-rank `q` quantile (0 < q ≤ 1) of `sorted` (ascending); 0 when there are none.
pub fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_nearest_rank_of_one_to_a_hundred() {
        let s = sorted((1..=100).rev().map(f64::from));
        assert_eq!(
            (nearest_rank(&s, 0.5), nearest_rank(&s, 0.99), nearest_rank(&s, 1.0)),
            (50.0, 99.0, 100.0)
        );
        assert_eq!(nearest_rank(&[], 0.5), 0.0);
    }

    #[test]
    fn test_micros_of_one_and_a_half_milliseconds() {
        assert_eq!(micros(std::time::Duration::from_micros(1500)), 1500.0);
    }
}
