//! Prometheus metrics: every name and label fmsflow exports, in one place, on a registry of
//! its own (never the crate's default one). Served at `/metrics` by the query API's server.
//!
//! The hot path keeps counting in [`Status`]'s plain atomics; a scrape copies them into the
//! registry's counters (advancing each by what it gained since the last scrape), so a
//! reading costs nothing more with metrics than without. Labels are bounded: `rule`,
//! `partition`, `endpoint`, `class`; never a device id.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use fmsflow_dataflows::Rule;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::api::view::LiveView;
use crate::status::Status;

/// Every metric name, so dashboards, rules and tests can refer to the same strings.
pub mod names {
    pub const RECEIVED: &str = "fmsflow_records_received_total";
    pub const VALID: &str = "fmsflow_readings_valid_total";
    pub const REJECTED: &str = "fmsflow_records_rejected_total";
    pub const HOURS_SEALED: &str = "fmsflow_hours_sealed_total";
    pub const LATE_REWRITES: &str = "fmsflow_late_rewrites_total";
    pub const FILES_WRITTEN: &str = "fmsflow_lake_files_written_total";
    pub const ROWS_WRITTEN: &str = "fmsflow_lake_rows_written_total";
    pub const POLL_ERRORS: &str = "fmsflow_poll_errors_total";
    pub const PARTITION_POSITION: &str = "fmsflow_kafka_partition_position";
    pub const PARTITION_LAG: &str = "fmsflow_kafka_partition_lag";
    pub const WATERMARK: &str = "fmsflow_watermark_seconds";
    pub const WATERMARK_DELAY: &str = "fmsflow_watermark_delay_seconds";
    pub const FRONTIER: &str = "fmsflow_dataflow_frontier_epoch";
    pub const QUERY_SECONDS: &str = "fmsflow_query_duration_seconds";
    pub const QUERIES: &str = "fmsflow_queries_total";
    pub const START_TIME: &str = "fmsflow_process_start_time_seconds";
    pub const BUILD_INFO: &str = "fmsflow_build_info";
    pub const FAILED: &str = "fmsflow_failed";
}

/// The query API's endpoints, as the `endpoint` label names them (`other`: an unknown
/// `/api/v1/` path).
pub const ENDPOINTS: [&str; 9] = [
    "status",
    "device_hourly",
    "device_latest",
    "fleet_hourly",
    "quality",
    "openapi",
    "metrics",
    "dashboard",
    "other",
];

/// One process's metrics.
pub struct Metrics {
    registry: Registry,
    received: IntCounter,
    valid: IntCounter,
    rejected: Vec<IntCounter>,
    hours_sealed: IntCounter,
    late_rewrites: IntCounter,
    files_written: IntCounter,
    rows_written: IntCounter,
    poll_errors: IntCounter,
    partition_position: IntGaugeVec,
    partition_lag: IntGaugeVec,
    watermark: Gauge,
    watermark_delay: Gauge,
    frontier: IntGauge,
    failed: IntGauge,
    query_seconds: HistogramVec,
    queries: IntCounterVec,
    /// Scrapes one at a time, so counters advance exactly once per gain.
    scrape: Mutex<()>,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric name");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid metric name");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric name");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

/// Brings a counter up to `now` (a monotonic total kept elsewhere).
fn advance(c: &IntCounter, now: u64) {
    c.inc_by(now.saturating_sub(c.get()));
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, the per-rule and per-endpoint series present from the start
    /// (at zero), and the process's start time and build recorded.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let rejected_vec = IntCounterVec::new(
            Opts::new(
                names::REJECTED,
                "Records rejected, by the quality rule that rejected them.",
            ),
            &["rule"],
        )
        .expect("valid metric name");
        r.register(Box::new(rejected_vec.clone()))
            .expect("metric registered once");
        let rejected = Rule::ALL
            .iter()
            .map(|rule| rejected_vec.with_label_values(&[rule.name()]))
            .collect();
        let query_seconds = HistogramVec::new(
            HistogramOpts::new(names::QUERY_SECONDS, "Time to answer a query-API request, by endpoint.").buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 3.0,
            ]),
            &["endpoint"],
        )
        .expect("valid metric name");
        r.register(Box::new(query_seconds.clone()))
            .expect("metric registered once");
        let queries = IntCounterVec::new(
            Opts::new(
                names::QUERIES,
                "Query-API requests answered, by endpoint and status class (2xx, 4xx, 5xx).",
            ),
            &["endpoint", "class"],
        )
        .expect("valid metric name");
        r.register(Box::new(queries.clone())).expect("metric registered once");
        for e in ENDPOINTS {
            query_seconds.with_label_values(&[e]);
            for class in ["2xx", "4xx", "5xx"] {
                queries.with_label_values(&[e, class]);
            }
        }
        let start = gauge(
            &r,
            names::START_TIME,
            "When this process started, in seconds since the Unix epoch.",
        );
        start.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        let build = gauge_vec(
            &r,
            names::BUILD_INFO,
            "Always 1; the labels name this build.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Metrics {
            received: counter(&r, names::RECEIVED, "Raw records handed to the engine."),
            valid: counter(&r, names::VALID, "Readings accepted by every quality rule."),
            rejected,
            hours_sealed: counter(&r, names::HOURS_SEALED, "Hours sealed and written to the lake."),
            late_rewrites: counter(
                &r,
                names::LATE_REWRITES,
                "Rewrites of sealed hours caused by late readings.",
            ),
            files_written: counter(&r, names::FILES_WRITTEN, "Parquet files written to the lake."),
            rows_written: counter(&r, names::ROWS_WRITTEN, "Rows written to the lake's Parquet files."),
            poll_errors: counter(&r, names::POLL_ERRORS, "FMS API polls that failed."),
            partition_position: gauge_vec(
                &r,
                names::PARTITION_POSITION,
                "The next offset this process reads in each Kafka partition it owns.",
                &["partition"],
            ),
            partition_lag: gauge_vec(
                &r,
                names::PARTITION_LAG,
                "Records between this process's position and the partition's end as last seen.",
                &["partition"],
            ),
            watermark: gauge(
                &r,
                names::WATERMARK,
                "The event-time watermark (largest accepted event time), Unix seconds.",
            ),
            watermark_delay: gauge(
                &r,
                names::WATERMARK_DELAY,
                "Wall clock minus the event-time watermark, in seconds.",
            ),
            frontier: int_gauge(
                &r,
                names::FRONTIER,
                "Every epoch before this one is complete in this process's live view.",
            ),
            failed: int_gauge(
                &r,
                names::FAILED,
                "1 once a sink has failed fatally (the process is stopping), else 0.",
            ),
            query_seconds,
            queries,
            registry: r,
            scrape: Mutex::new(()),
        }
    }

    /// Notes one answered request of `endpoint` (one of [`ENDPOINTS`]).
    pub fn observe_query(&self, endpoint: &str, status: u16, seconds: f64) {
        self.query_seconds.with_label_values(&[endpoint]).observe(seconds);
        let class = match status {
            500.. => "5xx",
            400.. => "4xx",
            _ => "2xx",
        };
        self.queries.with_label_values(&[endpoint, class]).inc();
    }

    /// The text exposition of every metric, with the counters brought up to `status` and
    /// the gauges to `view` and now.
    pub fn render(&self, status: &Status, view: Option<&LiveView>) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        advance(&self.received, status.received.load(Relaxed));
        advance(&self.valid, status.valid.load(Relaxed));
        for (c, n) in self.rejected.iter().zip(status.by_rule.iter()) {
            advance(c, n.load(Relaxed));
        }
        advance(&self.hours_sealed, status.hours_sealed.load(Relaxed));
        advance(&self.late_rewrites, status.late_rewrites.load(Relaxed));
        advance(&self.files_written, status.files_written.load(Relaxed));
        advance(&self.rows_written, status.rows_written.load(Relaxed));
        advance(&self.poll_errors, status.poll_errors.load(Relaxed));
        for (p, (position, end)) in status.partitions() {
            let p = p.to_string();
            self.partition_position.with_label_values(&[&p]).set(position);
            if let Some(end) = end {
                self.partition_lag.with_label_values(&[&p]).set((end - position).max(0));
            }
        }
        self.failed.set(status.error().is_some() as i64);
        if let Some(view) = view {
            let frontier = view.frontier();
            self.frontier.set(view.epoch_label(frontier).0 as i64);
            if let Some(w) = view.watermark(frontier) {
                self.watermark.set(w as f64 / 1000.0);
                self.watermark_delay.set((crate::clock::wall_ms() - w) as f64 / 1000.0);
            }
        }
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("the text encoder writes to a Vec");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_carries_the_status_counters_and_advances_them_once() {
        let m = Metrics::new();
        let s = Status::default();
        s.received.store(10, Relaxed);
        s.valid.store(7, Relaxed);
        s.by_rule[1].store(3, Relaxed);
        s.set_partitions(&[(2, 40, Some(100))]);
        let first = m.render(&s, None);
        assert!(first.contains("fmsflow_records_received_total 10\n"), "{first}");
        assert!(first.contains("fmsflow_readings_valid_total 7\n"), "{first}");
        let rule = Rule::ALL[1].name();
        assert!(
            first.contains(&format!("fmsflow_records_rejected_total{{rule=\"{rule}\"}} 3\n")),
            "{first}"
        );
        assert!(
            first.contains("fmsflow_kafka_partition_lag{partition=\"2\"} 60\n"),
            "{first}"
        );
        s.received.store(15, Relaxed);
        let second = m.render(&s, None);
        assert!(second.contains("fmsflow_records_received_total 15\n"), "{second}");
        // Every rule has its series from the start.
        for r in Rule::ALL {
            assert!(second.contains(&format!("rule=\"{}\"", r.name())), "{}", r.name());
        }
    }

    #[test]
    fn queries_are_counted_by_endpoint_and_status_class() {
        let m = Metrics::new();
        m.observe_query("device_latest", 200, 0.001);
        m.observe_query("device_latest", 404, 0.001);
        m.observe_query("quality", 503, 0.001);
        let text = m.render(&Status::default(), None);
        assert!(
            text.contains("fmsflow_queries_total{class=\"2xx\",endpoint=\"device_latest\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fmsflow_queries_total{class=\"4xx\",endpoint=\"device_latest\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fmsflow_queries_total{class=\"5xx\",endpoint=\"quality\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fmsflow_query_duration_seconds_count{endpoint=\"device_latest\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("fmsflow_build_info{version=\""), "{text}");
    }
}
