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
    /// Latest (event time, isFail, wall-clock ms it arrived) per device, indexed by device
    /// id (`i64::MIN`: none yet).
    latest: Mutex<Vec<(i64, bool, i64)>>,
    /// Kafka partitions read here: (position, end as last seen).
    partitions: Mutex<BTreeMap<i32, (i64, Option<i64>)>>,
    /// The first fatal error of a sink, if any.
    pub error: Mutex<Option<String>>,
}

impl Status {
    /// Counts accepted readings and tracks each device's latest failure state.
    pub fn on_latest(&self, latest: &[DeviceLatest]) {
        self.valid.fetch_add(latest.iter().map(|l| l.readings).sum(), Relaxed);
        let now = crate::clock::wall_ms();
        let mut state = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        for l in latest {
            let d = l.device as usize;
            if d >= state.len() {
                state.resize(d + 1, (i64::MIN, false, i64::MIN));
            }
            let e = &mut state[d];
            if l.time_ms >= e.0 {
                (e.0, e.1) = (l.time_ms, l.is_fail);
            }
            e.2 = now;
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
            .filter(|(_, (_, f, _))| *f)
            .map(|(d, _)| d as u32)
            .collect()
    }

    /// Devices a valid reading arrived from in the last `within_ms` of wall clock.
    pub fn devices_reporting(&self, within_ms: i64) -> usize {
        let since = crate::clock::wall_ms() - within_ms;
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        latest.iter().filter(|(_, _, seen)| *seen >= since).count()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_report_while_their_readings_are_recent() {
        let s = Status::default();
        let latest = |device: u32, is_fail: bool| DeviceLatest {
            device,
            time_ms: 1,
            is_fail,
            metrics: [0.0; 6],
            readings: 2,
        };
        s.on_latest(&[latest(3, false), latest(5, true)]);
        assert_eq!(s.devices_reporting(60_000), 2);
        assert_eq!(s.valid.load(Relaxed), 4);
        assert_eq!(s.failing_devices(), vec![5]);
        // Arrived "now": none of them within -1 ms.
        assert_eq!(s.devices_reporting(-1_000), 0);
    }
}
