//! The API's answers, as JSON. The same types carry a peer's share of a fanned-out query
//! and the merged answer, and the CLI (`fmsflow query`) reads them back.

use std::collections::BTreeMap;

use fmsflow_dataflows::rules::Outcome;
use fmsflow_dataflows::time::{format_rfc3339, HOUR_MS};
use fmsflow_dataflows::{HourFigures, METRICS};
use serde::{Deserialize, Serialize};

use super::view::{Latest, OutcomeCounts};

/// The dataflow time an answer is consistent as of: every update of the epochs before
/// `epoch`, none of it or later, from every process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsOf {
    /// Epochs before this one are in the answer.
    pub epoch: u64,
    /// The input has ended and everything is in.
    pub complete: bool,
    /// Processes that answered.
    pub processes: usize,
}

/// An error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// See [`ErrorBody`].
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The HTTP status.
    pub status: u16,
    /// The request parameter at fault, if one is.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub parameter: Option<String>,
    /// A sentence for a person.
    pub message: String,
}

/// One metric's statistics in an hour.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub stddev: f64,
}

/// One (device, hour) of the hourly aggregates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HourRow {
    /// Device id.
    pub device: u32,
    /// Start of the hour, RFC 3339.
    pub hour: String,
    /// Readings accepted.
    pub count: u64,
    /// Of which `isFail`.
    pub fails: u64,
    /// Earliest event time.
    pub first: String,
    /// Latest event time.
    pub last: String,
    /// Per metric, by name.
    pub metrics: BTreeMap<String, MetricRow>,
}

impl HourRow {
    /// The row of `stats`.
    pub fn new(device: u32, hour: i64, s: &HourFigures) -> Self {
        HourRow {
            device,
            hour: format_rfc3339(hour * HOUR_MS),
            count: s.count,
            fails: s.fails,
            first: format_rfc3339(s.first_ms),
            last: format_rfc3339(s.last_ms),
            metrics: METRICS
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let [min, max, mean, stddev] = s.metrics[i];
                    (m.to_string(), MetricRow { min, max, mean, stddev })
                })
                .collect(),
        }
    }
}

/// `GET /api/v1/devices/{id}/hourly`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceHourly {
    /// Consistent as of.
    pub as_of: AsOf,
    /// The device.
    pub device: u32,
    /// First hour covered.
    pub from: String,
    /// End of the covered hours (exclusive).
    pub to: String,
    /// The hours with readings, oldest first.
    pub hours: Vec<HourRow>,
}

/// A device's newest accepted reading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatestRow {
    /// Event time, RFC 3339.
    pub time: String,
    /// Event time, ms since the epoch.
    pub time_ms: i64,
    /// `isFail`.
    pub is_fail: bool,
    /// The metrics by name.
    pub metrics: BTreeMap<String, f64>,
}

impl LatestRow {
    /// The row of `l`.
    pub fn new(l: &Latest) -> Self {
        LatestRow {
            time: format_rfc3339(l.time_ms),
            time_ms: l.time_ms,
            is_fail: l.is_fail,
            metrics: METRICS.iter().zip(l.metrics).map(|(m, v)| (m.to_string(), v)).collect(),
        }
    }
}

/// `GET /api/v1/devices/{id}/latest`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceLatestAnswer {
    /// Consistent as of.
    pub as_of: AsOf,
    /// The device.
    pub device: u32,
    /// Its newest reading (always present in a whole answer: no reading is a 404).
    pub reading: Option<LatestRow>,
}

/// `GET /api/v1/fleet/hourly`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetHourly {
    /// Consistent as of.
    pub as_of: AsOf,
    /// The hour.
    pub hour: String,
    /// The sort key.
    pub sort: String,
    /// `asc` or `desc`.
    pub order: String,
    /// One row per device with readings in the hour, sorted.
    pub devices: Vec<HourRow>,
}

/// What `fleet/hourly` sorts by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Device id.
    Device,
    /// Readings.
    Count,
    /// Fail count.
    Fails,
    /// A metric's statistic: (metric index, 0 min / 1 max / 2 mean / 3 stddev).
    Metric(usize, usize),
}

impl SortKey {
    /// `device`, `count`, `fails` or `<metric>_<min|max|mean|stddev>`.
    pub fn parse(s: &str) -> Result<SortKey, String> {
        match s {
            "device" => return Ok(SortKey::Device),
            "count" => return Ok(SortKey::Count),
            "fails" => return Ok(SortKey::Fails),
            _ => {}
        }
        s.rsplit_once('_')
            .and_then(|(m, st)| {
                Some(SortKey::Metric(
                    METRICS.iter().position(|x| *x == m)?,
                    HourFigures::STATS.iter().position(|x| *x == st)?,
                ))
            })
            .ok_or_else(|| {
                format!(
                    "`{s}`: sort by device, count, fails or <metric>_<min|max|mean|stddev> (metrics: {})",
                    METRICS.join(", ")
                )
            })
    }

    /// The name [`SortKey::parse`] reads.
    pub fn name(self) -> String {
        match self {
            SortKey::Device => "device".into(),
            SortKey::Count => "count".into(),
            SortKey::Fails => "fails".into(),
            SortKey::Metric(m, s) => format!("{}_{}", METRICS[m], HourFigures::STATS[s]),
        }
    }

    fn of_row(self, r: &HourRow) -> (f64, u32) {
        let v = match self {
            SortKey::Device => r.device as f64,
            SortKey::Count => r.count as f64,
            SortKey::Fails => r.fails as f64,
            SortKey::Metric(m, s) => {
                let x = &r.metrics[METRICS[m]];
                [x.min, x.max, x.mean, x.stddev][s]
            }
        };
        (v, r.device)
    }

    fn of_figures(self, (d, f): &(u32, HourFigures)) -> (f64, u32) {
        let v = match self {
            SortKey::Device => *d as f64,
            SortKey::Count => f.count as f64,
            SortKey::Fails => f.fails as f64,
            SortKey::Metric(m, s) => f.metrics[m][s],
        };
        (v, *d)
    }

    /// Sorts `rows` by this key, ties by device.
    pub fn sort(self, rows: &mut [HourRow], descending: bool) {
        sort_by_key_value(rows, |r| self.of_row(r), descending);
    }

    /// Sorts a view's `(device, figures)` by this key (before they become rows), ties by
    /// device.
    pub fn sort_figures(self, rows: &mut [(u32, HourFigures)], descending: bool) {
        sort_by_key_value(rows, |r| self.of_figures(r), descending);
    }
}

fn sort_by_key_value<T>(rows: &mut [T], key: impl Fn(&T) -> (f64, u32), descending: bool) {
    rows.sort_by(|a, b| {
        let ((va, da), (vb, db)) = (key(a), key(b));
        let o = va.total_cmp(&vb);
        let o = if descending { o.reverse() } else { o };
        o.then(da.cmp(&db))
    });
}

/// Counts of one device, or of all.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityCounts {
    /// Records seen (accepted and rejected).
    pub total: i64,
    /// Accepted.
    pub valid: i64,
    /// valid / total (1 when there is nothing).
    pub valid_ratio: f64,
    /// Rejections per rule name (rules with none are left out).
    pub rules: BTreeMap<String, i64>,
}

impl QualityCounts {
    fn of(counts: &OutcomeCounts) -> Self {
        let mut q = QualityCounts::default();
        for (o, n) in counts {
            q.add(o.name(), *n);
        }
        q.finish();
        q
    }

    fn add(&mut self, outcome: &str, n: i64) {
        self.total += n;
        if outcome == Outcome::Valid.name() {
            self.valid += n;
        } else if n != 0 {
            *self.rules.entry(outcome.to_string()).or_default() += n;
        }
    }

    fn merge(&mut self, o: &QualityCounts) {
        self.add(Outcome::Valid.name(), o.valid);
        for (r, n) in &o.rules {
            self.add(r, *n);
        }
        self.finish();
    }

    fn finish(&mut self) {
        self.valid_ratio = if self.total == 0 {
            1.0
        } else {
            self.valid as f64 / self.total as f64
        };
    }
}

/// One device's quality in a `by_device` list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceQuality {
    /// Device id (0: records whose device id was unknown or unreadable).
    pub device: u32,
    /// Its counts.
    #[serde(flatten)]
    pub counts: QualityCounts,
    /// Its valid readings / the readings its polls should have produced (see
    /// [`QualityAnswer::expected`]); none for device 0.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub availability: Option<f64>,
}

/// The event-time span of one hour's readings (the whole fleet's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HourSpan {
    /// The hour (its start, RFC 3339).
    pub hour: String,
    /// Earliest reading, ms since the Unix epoch.
    pub first_ms: i64,
    /// Latest reading.
    pub last_ms: i64,
}

/// `GET /api/v1/quality`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QualityAnswer {
    /// Consistent as of.
    pub as_of: AsOf,
    /// First hour covered.
    pub from: String,
    /// End of the covered hours (exclusive).
    pub to: String,
    /// The device asked about, if one was.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device: Option<u32>,
    /// Over the range (and the device).
    #[serde(flatten)]
    pub counts: QualityCounts,
    /// With `by_device=N`: the N devices with the most rejections.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub devices: Option<Vec<DeviceQuality>>,
    /// Readings the polls should have produced over the range, for the fleet (or the
    /// device): every device polled once per `collector.interval` over each hour's span.
    pub expected: f64,
    /// Availability: valid readings / `expected`, the share of expected polls that produced a
    /// valid reading (1 when nothing was expected).
    pub availability: f64,
    /// Each hour's span, behind `expected`: from its earliest to its latest reading.
    pub spans: Vec<HourSpan>,
}

impl QualityAnswer {
    /// This process's share.
    pub fn new(
        as_of: AsOf,
        from: i64,
        to: i64,
        device: Option<u32>,
        all: &OutcomeCounts,
        per_device: &BTreeMap<u32, OutcomeCounts>,
        spans: &BTreeMap<i64, (i64, i64)>,
    ) -> Self {
        QualityAnswer {
            as_of,
            from: format_rfc3339(from * HOUR_MS),
            to: format_rfc3339(to * HOUR_MS),
            device,
            counts: QualityCounts::of(all),
            devices: (!per_device.is_empty()).then(|| {
                per_device
                    .iter()
                    .map(|(d, c)| DeviceQuality {
                        device: *d,
                        counts: QualityCounts::of(c),
                        availability: None,
                    })
                    .collect()
            }),
            expected: 0.0,
            availability: 1.0,
            spans: spans
                .iter()
                .map(|(h, (first_ms, last_ms))| HourSpan {
                    hour: format_rfc3339(h * HOUR_MS),
                    first_ms: *first_ms,
                    last_ms: *last_ms,
                })
                .collect(),
        }
    }

    /// Works out `expected` and the availabilities, for `devices` devices (the fleet, or 1
    /// with `device`) polled every `interval_ms`.
    pub fn rate(&mut self, devices: u32, interval_ms: i64) {
        let per_device: f64 = self
            .spans
            .iter()
            .map(|s| ((s.last_ms - s.first_ms).max(0) / interval_ms.max(1) + 1) as f64)
            .sum();
        let ratio = |valid: i64, expected: f64| if expected > 0.0 { valid as f64 / expected } else { 1.0 };
        self.expected = per_device * devices as f64;
        self.availability = ratio(self.counts.valid, self.expected);
        for d in self.devices.iter_mut().flatten() {
            d.availability = (d.device != 0).then(|| ratio(d.counts.valid, per_device));
        }
    }

    /// Adds a peer's share.
    pub fn merge(&mut self, peer: QualityAnswer) {
        self.counts.merge(&peer.counts);
        let mut spans: BTreeMap<String, (i64, i64)> = self
            .spans
            .drain(..)
            .map(|s| (s.hour, (s.first_ms, s.last_ms)))
            .collect();
        for s in peer.spans {
            let e = spans.entry(s.hour).or_insert((s.first_ms, s.last_ms));
            *e = (e.0.min(s.first_ms), e.1.max(s.last_ms));
        }
        self.spans = spans
            .into_iter()
            .map(|(hour, (first_ms, last_ms))| HourSpan {
                hour,
                first_ms,
                last_ms,
            })
            .collect();
        if let Some(theirs) = peer.devices {
            let mine = self.devices.get_or_insert_with(Vec::new);
            let mut by: BTreeMap<u32, QualityCounts> = mine.drain(..).map(|d| (d.device, d.counts)).collect();
            for d in theirs {
                by.entry(d.device).or_default().merge(&d.counts);
            }
            *mine = by
                .into_iter()
                .map(|(device, counts)| DeviceQuality {
                    device,
                    counts,
                    availability: None,
                })
                .collect();
        }
    }

    /// Keeps the `by_device` devices with the most rejections (none without `by_device`).
    pub fn finish(&mut self, by_device: Option<usize>) {
        match by_device {
            None => self.devices = None,
            Some(n) => {
                let list = self.devices.get_or_insert_with(Vec::new);
                list.sort_by(|a, b| {
                    (b.counts.total - b.counts.valid)
                        .cmp(&(a.counts.total - a.counts.valid))
                        .then(a.device.cmp(&b.device))
                });
                list.truncate(n);
            }
        }
    }
}

/// A Kafka partition's position and lag.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartitionLag {
    /// Partition.
    pub partition: i32,
    /// Offset after the last record read.
    pub position: i64,
    /// The partition's end as last seen (high watermark).
    pub end: Option<i64>,
    /// Records behind the end.
    pub lag: Option<i64>,
}

/// One process's part of `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessStatus {
    /// Index in the cluster.
    pub process: usize,
    /// Its workers.
    pub workers: usize,
    /// Its view's dataflow frontier: every epoch before it is in.
    pub frontier: u64,
    /// Raw records it took in.
    pub received: u64,
    /// Readings accepted.
    pub valid: u64,
    /// Records rejected.
    pub rejected: u64,
    /// Hours sealed and written.
    pub hours_sealed: u64,
    /// Rewrites of sealed hours after late data.
    pub late_rewrites: u64,
    /// Lake files written.
    pub files_written: u64,
    /// Lake rows written.
    pub rows_written: u64,
    /// Seconds since its API started.
    pub uptime_s: f64,
    /// Its Kafka partitions.
    pub partitions: Vec<PartitionLag>,
    /// Its fatal error, if it has one.
    pub error: Option<String>,
}

/// `GET /api/v1/status`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusAnswer {
    /// Consistent as of.
    pub as_of: AsOf,
    /// Largest accepted event time.
    pub watermark: Option<String>,
    /// Fleet size.
    pub devices: u32,
    /// Workers in all.
    pub workers: usize,
    /// Each process.
    pub processes: Vec<ProcessStatus>,
}

impl StatusAnswer {
    /// Adds a peer's share.
    pub fn merge(&mut self, peer: StatusAnswer) {
        self.workers += peer.workers;
        // By time, not by text (a fractional second sorts before `Z`).
        let ms = |w: &Option<String>| w.as_deref().and_then(fmsflow_dataflows::time::parse_rfc3339);
        if ms(&peer.watermark) > ms(&self.watermark) {
            self.watermark = peer.watermark;
        }
        self.processes.extend(peer.processes);
        self.processes.sort_by_key(|p| p.process);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_is_valid_readings_over_the_polls_each_hours_span_asked_for() {
        let as_of = AsOf {
            epoch: 1,
            complete: true,
            processes: 1,
        };
        let counts = |valid: i64, bad: i64| {
            OutcomeCounts::from([
                (Outcome::Valid, valid),
                (Outcome::Rejected(fmsflow_dataflows::Rule::OutOfRange), bad),
            ])
        };
        let per_device = BTreeMap::from([(1, counts(50, 1)), (2, counts(40, 0)), (0, counts(0, 3))]);
        // Hour 10: 10 minutes of readings; hour 11: 4:50 of them (polled every 10 s).
        let spans = BTreeMap::from([
            (10, (10 * HOUR_MS, 10 * HOUR_MS + 600_000)),
            (11, (11 * HOUR_MS, 11 * HOUR_MS + 290_000)),
        ]);
        let mut q = QualityAnswer::new(as_of.clone(), 10, 12, None, &counts(90, 4), &per_device, &spans);
        q.rate(2, 10_000);
        // 61 + 30 polls per device.
        assert_eq!(q.expected, 182.0);
        assert!((q.availability - 90.0 / 182.0).abs() < 1e-12);
        let devices = q.devices.as_ref().unwrap();
        let of = |d: u32| devices.iter().find(|x| x.device == d).unwrap().availability;
        assert_eq!(of(0), None);
        assert!((of(1).unwrap() - 50.0 / 91.0).abs() < 1e-12);
        // A peer's spans widen the hours they share.
        let mut peer = QualityAnswer::new(
            as_of,
            10,
            12,
            None,
            &counts(10, 0),
            &BTreeMap::new(),
            &BTreeMap::from([(11, (11 * HOUR_MS, 11 * HOUR_MS + 590_000))]),
        );
        peer.rate(2, 10_000);
        q.merge(peer);
        q.rate(2, 10_000);
        assert_eq!(q.expected, 2.0 * (61.0 + 60.0));
        assert_eq!(q.counts.valid, 100);
    }
}
