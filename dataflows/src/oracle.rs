//! A naive, from-scratch recomputation of what the dataflow maintains incrementally: the
//! reference the oracle tests compare against. Deliberately simple and slow: it keeps every
//! value and computes statistics in two passes.

use std::collections::{BTreeMap, HashSet};

use crate::dataflow::Epoch;
use crate::model::{DeviceHour, RawRecord};
use crate::rules::{validate, Outcome, RuleConfig};
use crate::stats::HourStats;

/// Statistics computed directly from all of an hour's values.
#[derive(Clone, Debug, Default)]
pub struct NaiveHour {
    /// The accepted values, per metric.
    pub values: [Vec<f64>; 6],
    /// Fail count.
    pub fails: u64,
    /// Event times.
    pub times: Vec<i64>,
}

impl NaiveHour {
    /// Compares with an incrementally maintained [`HourStats`]: counts and min/max exactly,
    /// mean and standard deviation to `rel` relative error. Returns a description of the
    /// first difference.
    pub fn check(&self, s: &HourStats, rel: f64) -> Result<(), String> {
        let n = self.times.len() as u64;
        if s.count != n || s.fails != self.fails {
            return Err(format!("count {} vs {n}, fails {} vs {}", s.count, s.fails, self.fails));
        }
        if s.first_ms != *self.times.iter().min().unwrap() || s.last_ms != *self.times.iter().max().unwrap() {
            return Err("first/last time differ".into());
        }
        for (i, vals) in self.values.iter().enumerate() {
            let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
            let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mean = vals.iter().sum::<f64>() / n as f64;
            let std = (vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64).sqrt();
            let close = |a: f64, b: f64| (a - b).abs() <= rel * a.abs().max(b.abs()).max(1.0);
            if s.metrics[i].min_value() != min || s.metrics[i].max_value() != max {
                return Err(format!(
                    "metric {i}: min/max {}/{} vs {min}/{max}",
                    s.metrics[i].min_value(),
                    s.metrics[i].max_value()
                ));
            }
            if !close(s.mean(i), mean) || !close(s.stddev(i), std) {
                return Err(format!(
                    "metric {i}: mean/std {}/{} vs {mean}/{std}",
                    s.mean(i),
                    s.stddev(i)
                ));
            }
        }
        Ok(())
    }
}

/// The expected hourly statistics and quality counts.
#[derive(Debug, Default)]
pub struct Expected {
    /// Per (device, hour).
    pub hourly: BTreeMap<DeviceHour, NaiveHour>,
    /// Per (device, hour, outcome).
    pub quality: BTreeMap<(u32, i64, Outcome), i64>,
}

/// Recomputes from scratch. Records are taken in (epoch, source position) order; the first
/// accepted reading of a (device, time) wins and later ones are duplicates.
pub fn expected(records: &[(Epoch, RawRecord)], cfg: &RuleConfig) -> Expected {
    let mut sorted: Vec<&(Epoch, RawRecord)> = records.iter().collect();
    sorted.sort_by_key(|(e, r)| (*e, r.pos));
    let mut seen = HashSet::new();
    let mut out = Expected::default();
    for (_, raw) in sorted {
        match validate(raw.clone(), cfg) {
            Ok(r) => {
                if !seen.insert((r.device, r.time_ms)) {
                    let hour = raw.ingest_ms.unwrap_or(r.time_ms);
                    *out.quality
                        .entry((
                            r.device,
                            crate::time::hour_of(hour),
                            Outcome::Rejected(crate::Rule::Duplicate),
                        ))
                        .or_default() += 1;
                    continue;
                }
                *out.quality.entry((r.device, r.hour(), Outcome::Valid)).or_default() += 1;
                let h = out.hourly.entry(r.key()).or_default();
                for (i, v) in r.metrics.iter().enumerate() {
                    h.values[i].push(*v);
                }
                h.fails += r.is_fail as u64;
                h.times.push(r.time_ms);
            }
            Err(rej) => {
                *out.quality
                    .entry((rej.device, rej.hour(), Outcome::Rejected(rej.rule)))
                    .or_default() += 1
            }
        }
    }
    out
}
