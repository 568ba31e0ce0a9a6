//! What every benchmark shares: its results as JSON for `scripts/bench`, besides the table it
//! prints. With `FMSFLOW_BENCH_JSON=FILE` set, [`Results::finish`] writes
//! `{"bench": NAME, "cores": N, "rows": [...]}` to FILE, one object per printed row; the
//! script merges them, checks the targets and draws the plots. Without it, nothing is
//! written.
//!
//! Each benchmark includes this module (`mod common;`) and uses part of it.
#![allow(dead_code)]

use serde_json::{json, Value};

/// The rows of one benchmark run.
pub struct Results {
    bench: &'static str,
    rows: Vec<Value>,
}

impl Results {
    pub fn new(bench: &'static str) -> Self {
        Results {
            bench,
            rows: Vec::new(),
        }
    }

    /// One result: an object of plain values (names in snake case, units in the names).
    pub fn push(&mut self, row: Value) {
        self.rows.push(row);
    }

    /// Writes the file `FMSFLOW_BENCH_JSON` names, if it names one.
    pub fn finish(self) {
        let Ok(path) = std::env::var("FMSFLOW_BENCH_JSON") else {
            return;
        };
        let doc = json!({
            "bench": self.bench,
            "cores": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1),
            "rows": self.rows,
        });
        let text = serde_json::to_string_pretty(&doc).expect("results are JSON");
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
}

/// Value at quantile `q` (0..=1) of an ascending slice (nearest rank).
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> T {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// The points of the empirical CDF of an ascending slice, for a plot: the value at each
/// percent from 0 to 99, then at 99.9 and 100 %.
pub fn cdf_points(sorted: &[i64]) -> Vec<(f64, i64)> {
    if sorted.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<(f64, i64)> = (0..100)
        .map(|p| (p as f64, percentile(sorted, p as f64 / 100.0)))
        .collect();
    out.push((99.9, percentile(sorted, 0.999)));
    out.push((100.0, percentile(sorted, 1.0)));
    out
}
