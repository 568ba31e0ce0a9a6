//! The aggregate types. [`HourStats`] is the *difference* type of the hourly collection: a
//! reading becomes one `HourStats` and differential adds them with [`Semigroup::plus_equals`],
//! so every update costs O(1) and no operator ever re-scans an hour's readings.
//!
//! Sums are kept exactly, as integers in units of 10⁻⁹ ([`SCALE`]): addition is then
//! associative and commutative to the bit, so differential's merges, retractions and the
//! order in which workers combine partial results can never change a total, and the lake is
//! bit-identical at any worker count. Mean and variance are derived from the exact sums only
//! when read (variance as `(n·Σx² − (Σx)²) / n²`, exact in `i128`), so there is no
//! cancellation either. Values must lie within ±[`MAX_ABS`].

use differential_dataflow::difference::{IsZero, Monoid, Semigroup};
use serde::{Deserialize, Serialize};

use crate::model::Reading;

/// Fixed-point scale of the exact sums: values are counted in units of 10⁻⁹.
pub const SCALE: f64 = 1e9;
/// Largest magnitude a value may have (rule ranges are limited to this).
pub const MAX_ABS: f64 = 1e7;

/// Running statistics of one metric. Its count is the owning [`HourStats::count`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MetricStats {
    /// Smallest value seen, as ordered bits (see [`MetricStats::min`]).
    min_bits: i64,
    /// Largest value seen, as ordered bits.
    max_bits: i64,
    /// Σx in units of 10⁻⁹.
    sum: i128,
    /// Σx² in units of 10⁻¹⁸.
    sum_sq: i128,
}

/// A value in units of 10⁻⁹, rounded half away from zero (a cast, not a libm call).
#[inline]
fn fixed(v: f64) -> i128 {
    let y = v * SCALE;
    (y + 0.5f64.copysign(y)) as i64 as i128
}

/// Maps an f64 to an i64 whose integer order is the float's total order.
fn ordered(v: f64) -> i64 {
    let b = v.to_bits() as i64;
    b ^ (((b >> 63) as u64) >> 1) as i64
}

fn unordered(b: i64) -> f64 {
    f64::from_bits((b ^ (((b >> 63) as u64) >> 1) as i64) as u64)
}

impl MetricStats {
    const EMPTY: MetricStats = MetricStats {
        min_bits: i64::MAX,
        max_bits: i64::MIN,
        sum: 0,
        sum_sq: 0,
    };

    #[inline]
    fn of(v: f64) -> Self {
        let x = fixed(v);
        let o = ordered(v);
        MetricStats {
            min_bits: o,
            max_bits: o,
            sum: x,
            sum_sq: x * x,
        }
    }

    #[inline]
    fn add(&mut self, v: f64) {
        let x = fixed(v);
        let o = ordered(v);
        self.min_bits = self.min_bits.min(o);
        self.max_bits = self.max_bits.max(o);
        self.sum = self.sum.wrapping_add(x);
        self.sum_sq = self.sum_sq.wrapping_add(x * x);
    }

    #[inline]
    fn merge(&mut self, other: &MetricStats) {
        self.min_bits = self.min_bits.min(other.min_bits);
        self.max_bits = self.max_bits.max(other.max_bits);
        self.sum = self.sum.wrapping_add(other.sum);
        self.sum_sq = self.sum_sq.wrapping_add(other.sum_sq);
    }

    /// Smallest value (+∞ when empty).
    pub fn min_value(&self) -> f64 {
        if self.min_bits == i64::MAX {
            f64::INFINITY
        } else {
            unordered(self.min_bits)
        }
    }

    /// Largest value (−∞ when empty).
    pub fn max_value(&self) -> f64 {
        if self.max_bits == i64::MIN {
            f64::NEG_INFINITY
        } else {
            unordered(self.max_bits)
        }
    }

    /// Mean over `n` readings.
    pub fn mean(&self, n: u64) -> f64 {
        if n == 0 {
            f64::NAN
        } else {
            self.sum as f64 / n as f64 / SCALE
        }
    }

    /// Population variance over `n` readings.
    pub fn variance(&self, n: u64) -> f64 {
        if n == 0 {
            return f64::NAN;
        }
        let n128 = n as i128;
        let exact = n128
            .checked_mul(self.sum_sq)
            .zip(self.sum.checked_mul(self.sum))
            .and_then(|(a, b)| a.checked_sub(b));
        match exact {
            Some(num) => (num.max(0) as f64 / (n as f64 * n as f64)) / (SCALE * SCALE),
            // Beyond i128 (astronomically many readings): fall back to floating point.
            None => {
                let mean = self.sum as f64 / n as f64;
                ((self.sum_sq as f64 / n as f64 - mean * mean) / (SCALE * SCALE)).max(0.0)
            }
        }
    }
}

/// Statistics of one (device, hour): counts, event-time span, and per-metric statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

    /// Adds one reading in place: the same as `plus_equals(&HourStats::of(r))`, cheaper.
    #[inline]
    pub fn add(&mut self, r: &Reading) {
        self.count += 1;
        self.fails += r.is_fail as u64;
        self.first_ms = self.first_ms.min(r.time_ms);
        self.last_ms = self.last_ms.max(r.time_ms);
        for (m, v) in self.metrics.iter_mut().zip(r.metrics) {
            m.add(v);
        }
    }

    /// The value that, added to `self`, gives statistics of no reading ([`IsZero`]), which
    /// differential then drops: counts and sums negated (wrapping, as they are added);
    /// extremes and time span kept, as merging them with themselves changes nothing.
    pub fn negated(&self) -> Self {
        let mut n = *self;
        n.count = self.count.wrapping_neg();
        n.fails = self.fails.wrapping_neg();
        for m in n.metrics.iter_mut() {
            m.sum = m.sum.wrapping_neg();
            m.sum_sq = m.sum_sq.wrapping_neg();
        }
        n
    }

    /// Mean of metric `i`.
    pub fn mean(&self, i: usize) -> f64 {
        self.metrics[i].mean(self.count)
    }

    /// Population standard deviation of metric `i`.
    pub fn stddev(&self, i: usize) -> f64 {
        self.metrics[i].variance(self.count).sqrt()
    }

    /// What the hour answers: its counts and span, and each metric's min, max, mean and
    /// stddev (the lake's `hourly` row, the API's and the changelog's).
    pub fn figures(&self) -> HourFigures {
        HourFigures {
            count: self.count,
            fails: self.fails,
            first_ms: self.first_ms,
            last_ms: self.last_ms,
            metrics: std::array::from_fn(|i| {
                let m = &self.metrics[i];
                [m.min_value(), m.max_value(), self.mean(i), self.stddev(i)]
            }),
        }
    }
}

/// The figures of one (device, hour) as they are read: [`HourStats`] without the exact sums
/// that only adding more readings needs (224 bytes instead of 320). The live view keeps an
/// hour's aggregates in this form.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct HourFigures {
    /// Readings accepted.
    pub count: u64,
    /// Readings with `isFail: true`.
    pub fails: u64,
    /// Earliest event time, ms since the epoch.
    pub first_ms: i64,
    /// Latest event time, ms since the epoch.
    pub last_ms: i64,
    /// Per metric in [`crate::METRICS`] order: [`HourFigures::STATS`].
    pub metrics: [[f64; 4]; 6],
}

impl HourFigures {
    /// The names of a metric's four figures, in their order.
    pub const STATS: [&'static str; 4] = ["min", "max", "mean", "stddev"];
}

impl Default for HourStats {
    fn default() -> Self {
        HourStats {
            count: 0,
            fails: 0,
            first_ms: i64::MAX,
            last_ms: i64::MIN,
            metrics: [MetricStats::EMPTY; 6],
        }
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
        for (a, b) in self.metrics.iter_mut().zip(rhs.metrics.iter()) {
            a.merge(b);
        }
        // Wrapping: a retraction (see [`HourStats::negated`]) is a "negative" count.
        self.count = self.count.wrapping_add(rhs.count);
        self.fails = self.fails.wrapping_add(rhs.fails);
        self.first_ms = self.first_ms.min(rhs.first_ms);
        self.last_ms = self.last_ms.max(rhs.last_ms);
    }
}

impl Monoid for HourStats {
    fn zero() -> Self {
        HourStats::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SourcePos;

    fn reading(t: i64, v: f64, fail: bool) -> Reading {
        Reading {
            device: 1,
            time_ms: t,
            metrics: [v; 6],
            is_fail: fail,
            ingest_ms: None,
            pos: SourcePos::default(),
            payload_at: Default::default(),
        }
    }

    #[test]
    fn merge_equals_direct_statistics() {
        let vals = [3.0, 7.5, -2.0, 11.25, 0.5];
        let mut left = HourStats::default();
        let mut right = HourStats::default();
        for (i, v) in vals.iter().enumerate() {
            let r = reading(i as i64 * 1000, *v, i == 2);
            if i % 2 == 0 {
                left.add(&r)
            } else {
                right.add(&r)
            }
        }
        left.plus_equals(&right);
        let mean = vals.iter().sum::<f64>() / 5.0;
        let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 5.0;
        assert_eq!(left.count, 5);
        assert_eq!(left.fails, 1);
        assert_eq!((left.first_ms, left.last_ms), (0, 4000));
        assert_eq!(
            (left.metrics[0].min_value(), left.metrics[0].max_value()),
            (-2.0, 11.25)
        );
        assert!((left.mean(3) - mean).abs() < 1e-12);
        assert!((left.stddev(5) - var.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn add_equals_plus_equals_of() {
        let mut a = HourStats::default();
        let mut b = HourStats::default();
        for (i, v) in [3.25, -0.5, 1e-9, 2_999.999_999_999, -7.0].iter().enumerate() {
            let r = reading(i as i64 * 7, *v, i % 2 == 0);
            a.add(&r);
            b.plus_equals(&HourStats::of(&r));
        }
        assert_eq!(a, b);
    }

    #[test]
    fn a_negated_value_cancels_its_sum_in_any_order() {
        let rs: Vec<Reading> = (0..5).map(|i| reading(i * 10, i as f64 * 1.5 - 2.0, i == 3)).collect();
        let mut whole = HourStats::default();
        rs.iter().for_each(|r| whole.add(r));
        // The retraction of the whole, added before, between and after the parts.
        for at in 0..=rs.len() {
            let mut acc = HourStats::default();
            for (i, r) in rs.iter().enumerate() {
                if i == at {
                    acc.plus_equals(&whole.negated());
                }
                acc.plus_equals(&HourStats::of(r));
            }
            if at == rs.len() {
                acc.plus_equals(&whole.negated());
            }
            assert!(acc.is_zero(), "retraction added at {at} leaves {acc:?}");
            assert!(acc.metrics.iter().all(|m| m.sum == 0 && m.sum_sq == 0));
        }
        assert!(!whole.negated().is_zero());
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

    #[test]
    fn addition_is_exactly_associative() {
        let rs: Vec<Reading> = [0.1, 0.2, 0.3, 1e-9, 123.456789, 2999.99]
            .iter()
            .enumerate()
            .map(|(i, v)| reading(i as i64, *v, false))
            .collect();
        let s: Vec<HourStats> = rs.iter().map(HourStats::of).collect();
        let mut left = s[0];
        for x in &s[1..] {
            left.plus_equals(x);
        }
        let mut right = s[5];
        for x in s[..5].iter().rev() {
            right.plus_equals(x);
        }
        assert_eq!(left, right);
    }

    #[test]
    fn ordered_bits_round_trip_and_order() {
        let vals = [f64::NEG_INFINITY, -3.5, -0.0, 0.0, 1e-300, 2.0, f64::INFINITY];
        for w in vals.windows(2) {
            assert!(ordered(w[0]) <= ordered(w[1]));
        }
        for v in vals {
            assert_eq!(unordered(ordered(v)).to_bits(), v.to_bits());
        }
    }

    #[test]
    fn variance_has_no_cancellation() {
        // Large mean, tiny spread: sum-of-squares in f64 would lose every digit.
        let rs: Vec<Reading> = (0..1000)
            .map(|i| reading(i, 2999.0 + (i % 2) as f64 * 0.002, false))
            .collect();
        let mut s = HourStats::default();
        rs.iter().for_each(|r| s.add(r));
        assert!((s.stddev(0) - 0.001).abs() < 1e-12, "{}", s.stddev(0));
    }
}
