//! The aggregate types. [`HourStats`] is the *difference* type of the hourly collection: a
//! reading becomes one `HourStats` and differential adds them with [`Semigroup::plus_equals`],
//! so every update costs O(1) and no operator ever re-scans an hour's readings.
//!
//! Mean and variance merge with Chan et al.'s parallel formula, which stays accurate in any
//! merge order (and so at any worker count) where sum-of-squares would cancel badly.

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

use differential_dataflow::difference::{IsZero, Monoid, Semigroup};
use serde::{Deserialize, Serialize};

use crate::model::Reading;

/// Running statistics of one metric. Its count is the owning [`HourStats::count`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct MetricStats {
    /// Smallest value seen.
    pub min: f64,
    /// Largest value seen.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sum of squared deviations from the mean (M2); variance is `m2 / count`.
    pub m2: f64,
}

impl MetricStats {
    const EMPTY: MetricStats = MetricStats { min: f64::INFINITY, max: f64::NEG_INFINITY, mean: 0.0, m2: 0.0 };

    fn of(v: f64) -> Self {
        MetricStats { min: v, max: v, mean: v, m2: 0.0 }
    }

    /// Merges `other` (over `nb` readings) into `self` (over `na` readings).
    #[inline]
    fn merge(&mut self, na: u64, other: &MetricStats, nb: u64) {
        if nb == 0 {
            return;
        }
        if na == 0 {
            *self = *other;
            return;
        }
        let n = (na + nb) as f64;
        let (na, nb) = (na as f64, nb as f64);
        let delta = other.mean - self.mean;
        self.mean += delta * (nb / n);
        self.m2 += other.m2 + delta * delta * (na * nb / n);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    fn key(&self) -> [u64; 4] {
        [self.min.to_bits(), self.max.to_bits(), self.mean.to_bits(), self.m2.to_bits()]
    }
}

/// Statistics of one (device, hour): counts, event-time span, and per-metric statistics.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct HourStats {
    /// Readings accepted.
    pub count: u64,
    /// Readings with `isFail: true`.
    pub fails: u64,
    /// Earliest event time, ms since the epoch.
    pub first_ms: i64,
    /// Latest event time, ms since the epoch.
    pub last_ms: i64,
    /// Per-metric statistics in [`crate::METRICS`] order.
    pub metrics: [MetricStats; 6],
}

impl HourStats {
    /// The statistics of a single reading.
    #[inline]
    pub fn of(r: &Reading) -> Self {
        HourStats {
            count: 1,
            fails: r.is_fail as u64,
            first_ms: r.time_ms,
            last_ms: r.time_ms,
            metrics: r.metrics.map(MetricStats::of),
        }
    }

    /// Adds one reading in place (the same as `plus_equals(&HourStats::of(r))`, cheaper).
    #[inline]
    pub fn add(&mut self, r: &Reading) {
        self.plus_equals(&HourStats::of(r));
    }

    /// Population standard deviation of metric `i`.
    pub fn stddev(&self, i: usize) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            (self.metrics[i].m2 / self.count as f64).max(0.0).sqrt()
        }
    }

    fn order_key(&self) -> (u64, u64, i64, i64, [[u64; 4]; 6]) {
        (self.count, self.fails, self.first_ms, self.last_ms, self.metrics.map(|m| m.key()))
    }
}

impl Default for HourStats {
    fn default() -> Self {
        HourStats { count: 0, fails: 0, first_ms: i64::MAX, last_ms: i64::MIN, metrics: [MetricStats::EMPTY; 6] }
    }
}

impl IsZero for HourStats {
    #[inline]
    fn is_zero(&self) -> bool {
        self.count == 0
    }
}

impl Semigroup for HourStats {
    #[inline]
    fn plus_equals(&mut self, rhs: &Self) {
        let (na, nb) = (self.count, rhs.count);
        for (a, b) in self.metrics.iter_mut().zip(rhs.metrics.iter()) {
            a.merge(na, b, nb);
        }
        self.count += rhs.count;
        self.fails += rhs.fails;
        self.first_ms = self.first_ms.min(rhs.first_ms);
        self.last_ms = self.last_ms.max(rhs.last_ms);
    }
}

impl Monoid for HourStats {
    fn zero() -> Self {
        HourStats::default()
    }
}

// Differential sorts data and diffs; floats get a total order through their bit patterns.
impl PartialEq for HourStats {
    fn eq(&self, other: &Self) -> bool {
        self.order_key() == other.order_key()
    }
}
impl Eq for HourStats {}
impl PartialOrd for HourStats {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HourStats {
    fn cmp(&self, other: &Self) -> Ordering {
        self.order_key().cmp(&other.order_key())
    }
}
impl Hash for HourStats {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.order_key().hash(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SourcePos;

    fn reading(t: i64, v: f64, fail: bool) -> Reading {
        Reading { device: 1, time_ms: t, metrics: [v; 6], is_fail: fail, ingest_ms: None, pos: SourcePos::default(), payload: Vec::new() }
    }

    #[test]
    fn merge_equals_direct_statistics() {
        let vals = [3.0, 7.5, -2.0, 11.25, 0.5];
        let mut left = HourStats::default();
        let mut right = HourStats::default();
        for (i, v) in vals.iter().enumerate() {
            let r = reading(i as i64 * 1000, *v, i == 2);
            if i % 2 == 0 { left.add(&r) } else { right.add(&r) }
        }
        left.plus_equals(&right);
        let mean = vals.iter().sum::<f64>() / 5.0;
        let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 5.0;
        assert_eq!(left.count, 5);
        assert_eq!(left.fails, 1);
        assert_eq!((left.first_ms, left.last_ms), (0, 4000));
        assert_eq!((left.metrics[0].min, left.metrics[0].max), (-2.0, 11.25));
        assert!((left.metrics[3].mean - mean).abs() < 1e-12);
        assert!((left.stddev(5) - var.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn zero_is_identity() {
        let mut a = HourStats::of(&reading(5, 2.0, false));
        let b = a;
        a.plus_equals(&HourStats::zero());
        assert_eq!(a, b);
        let mut z = HourStats::zero();
        z.plus_equals(&b);
        assert_eq!(z, b);
        assert!(HourStats::zero().is_zero());
    }
}
