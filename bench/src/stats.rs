//! Percentiles and medians of samples (on [`cowvm_vmm::percentile`]).

use cowvm_vmm::percentile::{nearest_rank, sorted};
use serde::Serialize;

/// p50/p90/p99/max of a set of samples (nearest rank).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub n: usize,
}

impl Percentiles {
    /// Percentiles of `samples` (all zero when empty; non-finite samples are left out).
    pub fn of(samples: &[f64]) -> Self {
        let sorted = sorted(samples.iter().copied().filter(|v| v.is_finite()));
        Percentiles {
            p50: nearest_rank(&sorted, 0.50),
            p90: nearest_rank(&sorted, 0.90),
            p99: nearest_rank(&sorted, 0.99),
            max: nearest_rank(&sorted, 1.0),
            n: sorted.len(),
        }
    }
}

/// The middle value (mean of the two middle ones for an even count); 0 for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&samples);
        assert_eq!((p.p50, p.p90, p.p99, p.max, p.n), (50.0, 90.0, 99.0, 100.0, 100));
        assert_eq!(Percentiles::of(&[]).p50, 0.0);
    }

    #[test]
    fn test_median_of_odd_even_and_no_samples() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
