//! A mergeable aggregate: the panes of hopping windows and the sessions of session
//! windows combine these (Chan et al.'s pairwise update for the variance).

use serde::{Deserialize, Serialize};

use super::WindowFeatures;

/// Count, sum, sum of squared deviations, minimum and maximum of some values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agg {
    pub sum: f64,
    pub m2: f64,
    pub min: f64,
    pub max: f64,
    pub count: u32,
}

impl Default for Agg {
    fn default() -> Self {
        Self { sum: 0.0, m2: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY, count: 0 }
    }
}

impl Agg {
    #[inline]
    pub fn add(&mut self, value: f64) {
        let previous_mean = if self.count == 0 { 0.0 } else { self.sum / f64::from(self.count) };
        self.count = self.count.saturating_add(1);
        self.sum += value;
        let mean = self.sum / f64::from(self.count);
        self.m2 += (value - previous_mean) * (value - mean);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Fold `other` in, as if its values had been added one by one.
    #[inline]
    pub fn merge(&mut self, other: &Agg) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let (na, nb) = (f64::from(self.count), f64::from(other.count));
        let delta = other.sum / nb - self.sum / na;
        self.m2 += other.m2 + delta * delta * na * nb / (na + nb);
        self.sum += other.sum;
        self.count = self.count.saturating_add(other.count);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Take `part` (a subset of the values folded in) out again: count, sum and the sum
    /// of squared deviations as if it had never been added, up to rounding. Minimum and
    /// maximum cannot be taken out: the caller keeps them another way.
    #[inline]
    pub fn subtract(&mut self, part: &Agg) {
        if part.count == 0 {
            return;
        }
        if part.count >= self.count {
            *self = Agg::default();
            return;
        }
        let (n, nb) = (f64::from(self.count), f64::from(part.count));
        let na = n - nb;
        let sum_a = self.sum - part.sum;
        let delta = part.sum / nb - sum_a / na;
        self.m2 = (self.m2 - part.m2 - delta * delta * na * nb / n).max(0.0);
        self.sum = sum_a;
        self.count -= part.count;
    }

    pub fn features(&self, start_ms: i64, end_ms: i64) -> WindowFeatures {
        let count = f64::from(self.count.max(1));
        WindowFeatures {
            start_ms,
            end_ms,
            count: u64::from(self.count),
            mean: self.sum / count,
            min: self.min,
            max: self.max,
            stddev: (self.m2 / count).max(0.0).sqrt(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Merging two aggregates gives what adding all the values to one gives.
        #[test]
        fn merge_equals_adding(a in proptest::collection::vec(-1e3f64..1e3, 0..50),
                               b in proptest::collection::vec(-1e3f64..1e3, 0..50)) {
            let (mut left, mut right, mut all) = (Agg::default(), Agg::default(), Agg::default());
            a.iter().for_each(|v| { left.add(*v); all.add(*v); });
            b.iter().for_each(|v| { right.add(*v); all.add(*v); });
            left.merge(&right);
            proptest::prop_assert_eq!(left.count, all.count);
            proptest::prop_assert!((left.sum - all.sum).abs() < 1e-6);
            proptest::prop_assert!((left.m2 - all.m2).abs() < 1e-6 * all.m2.abs().max(1.0));
            proptest::prop_assert_eq!((left.min, left.max), (all.min, all.max));
            // And taking `b` out again gives `a`'s count, sum and spread.
            let mut only_a = Agg::default();
            a.iter().for_each(|v| only_a.add(*v));
            left.subtract(&right);
            proptest::prop_assert_eq!(left.count, only_a.count);
            proptest::prop_assert!((left.sum - only_a.sum).abs() < 1e-6);
            proptest::prop_assert!((left.m2 - only_a.m2).abs() < 1e-6 * all.m2.abs().max(1.0), "{} vs {}", left.m2, only_a.m2);
        }
    }
}
