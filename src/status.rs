//! Live counters the engine, the poller and the lake writer update and the demo displays.
//! Plain atomics: cheap on the hot path, readable from any thread.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use fmsflow_dataflows::{DeviceLatest, Rejection, Rule};

/// Pipeline counters.
#[derive(Default)]
pub struct Status {
    /// Raw records handed to the engine.
    pub received: AtomicU64,
    /// Readings accepted.
    pub valid: AtomicU64,
    /// Records rejected, any rule.
    pub rejected: AtomicU64,
    /// Rejections per rule, in `Rule::ALL` order.
    pub by_rule: [AtomicU64; Rule::ALL.len()],
    /// Hours sealed and written.
    pub hours_sealed: AtomicU64,
    /// Rewrites of already sealed hours caused by late data.
    pub late_rewrites: AtomicU64,
    /// Parquet files written.
    pub files_written: AtomicU64,
    /// Rows written to Parquet.
    pub rows_written: AtomicU64,
    /// Polls that failed (HTTP error, timeout, connection).
    pub poll_errors: AtomicU64,
    /// Latest (event time, isFail) per device, indexed by device id (`i64::MIN`: none yet).
    latest: Mutex<Vec<(i64, bool)>>,
    /// Kafka partitions read here: (position, end as last seen).
    partitions: Mutex<BTreeMap<i32, (i64, Option<i64>)>>,
    /// The first fatal error of a sink, if any.
    pub error: Mutex<Option<String>>,
}

impl Status {
    /// Counts accepted readings and tracks each device's latest failure state.
    pub fn on_latest(&self, latest: &[DeviceLatest]) {
        self.valid.fetch_add(latest.iter().map(|l| l.readings).sum(), Relaxed);
        let mut state = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        for l in latest {
            let d = l.device as usize;
            if d >= state.len() {
                state.resize(d + 1, (i64::MIN, false));
            }
            let e = &mut state[d];
            if l.time_ms >= e.0 {
                *e = (l.time_ms, l.is_fail);
            }
        }
    }

    /// Counts rejections by rule.
    pub fn on_rejections(&self, rejections: &[Rejection]) {
        self.rejected.fetch_add(rejections.len() as u64, Relaxed);
        for r in rejections {
            let i = Rule::ALL.iter().position(|x| *x == r.rule).unwrap_or(0);
            self.by_rule[i].fetch_add(1, Relaxed);
        }
    }

    /// Devices whose latest reading reports a failure.
    pub fn failing_devices(&self) -> Vec<u32> {
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        latest
            .iter()
            .enumerate()
            .filter(|(_, (_, f))| *f)
            .map(|(d, _)| d as u32)
            .collect()
    }

    /// Rejections per rule name.
    pub fn rejections_by_rule(&self) -> BTreeMap<&'static str, u64> {
        Rule::ALL
            .iter()
            .zip(self.by_rule.iter())
            .map(|(r, c)| (r.name(), c.load(Relaxed)))
            .collect()
    }

    /// One line: accepted, rejected by rule, hours sealed, files and rows written.
    pub fn summary(&self) -> String {
        format!(
            "{} valid, {} rejected {:?}; {} hours sealed; {} files, {} rows written",
            self.valid.load(Relaxed),
            self.rejected.load(Relaxed),
            self.rejections_by_rule()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .collect::<Vec<_>>(),
            self.hours_sealed.load(Relaxed),
            self.files_written.load(Relaxed),
            self.rows_written.load(Relaxed),
        )
    }

    /// Notes where a reader is in its partitions: (partition, position, end).
    pub fn set_partitions(&self, parts: &[(i32, i64, Option<i64>)]) {
        let mut m = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        for (p, pos, end) in parts {
            m.insert(*p, (*pos, *end));
        }
    }

    /// Every partition's (position, end as last seen).
    pub fn partitions(&self) -> BTreeMap<i32, (i64, Option<i64>)> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the first fatal error.
    pub fn fail(&self, message: String) {
        let mut e = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(message);
        }
    }

    /// The recorded fatal error, if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
