//! Prometheus metrics: every name and label fmsflow exports, in one place, on registries of
//! its own (never the crate's default one). The engine serves them at `/metrics` on the
//! query API's server, the collector on `collector.metrics_listen`, the simulator on its
//! own port.
//!
//! The hot path keeps counting in [`Status`]'s plain atomics; a scrape copies them into the
//! registry's counters (advancing each by what it gained since the last scrape), so a
//! reading costs nothing more with metrics than without. What cannot be a plain count (the
//! latency, epoch, sink and poll histograms) is recorded in [`shared()`]'s instruments, per
//! epoch, per file or per poll, never per reading; `engine.metrics = false` turns those off
//! (for benchmarks). Labels are bounded: `rule`, `partition`, `endpoint`, `class`,
//! `backend`, `kind`, `le`; never a device id.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fmsflow_dataflows::Rule;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
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
    pub const UPTIME: &str = "fmsflow_uptime_seconds";
    pub const RESIDENT_MEMORY: &str = "fmsflow_resident_memory_bytes";
    pub const LATENCY: &str = "fmsflow_latency_seconds";
    pub const EPOCH_SECONDS: &str = "fmsflow_epoch_duration_seconds";
    pub const SINK_WRITE_SECONDS: &str = "fmsflow_sink_write_duration_seconds";
    pub const SINK_BYTES: &str = "fmsflow_sink_written_bytes_total";
    pub const SINK_ERRORS: &str = "fmsflow_sink_errors_total";
    pub const SINK_RETRIES: &str = "fmsflow_sink_retries_total";
    pub const PRODUCE_ERRORS: &str = "fmsflow_kafka_produce_errors_total";
    pub const FLEET_DEVICES: &str = "fmsflow_fleet_devices";
    pub const DEVICES_REPORTING: &str = "fmsflow_devices_reporting";
    pub const DEVICES_FAILING: &str = "fmsflow_devices_failing";
    pub const DEVICES_BY_QUALITY: &str = "fmsflow_devices_by_quality";
    pub const POLLS: &str = "fmsflow_collector_polls_total";
    pub const POLL_SECONDS: &str = "fmsflow_collector_poll_duration_seconds";
    pub const POLLS_EXPECTED: &str = "fmsflow_collector_polls_expected_total";
    pub const POLLS_SKIPPED: &str = "fmsflow_collector_polls_skipped_total";
    pub const PRODUCED: &str = "fmsflow_collector_records_produced_total";
    pub const DELIVERED: &str = "fmsflow_collector_records_delivered_total";
    pub const SIM_RESPONSES: &str = "fmsflow_sim_responses_total";
    pub const SIM_SILENCED: &str = "fmsflow_sim_devices_silenced";
    pub const SIM_FAULTY: &str = "fmsflow_sim_devices_faulty";
}

/// The text exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The lake's and the result topics' backends, as the `backend` label names them.
pub const BACKENDS: [&str; 4] = ["file", "s3", "hdfs", "kafka"];

/// Outcomes of a collector poll, as the `class` label names them.
pub const POLL_CLASSES: [&str; 5] = ["2xx", "4xx", "5xx", "timeout", "error"];

/// The `le` bounds of [`names::DEVICES_BY_QUALITY`].
pub const QUALITY_BOUNDS: [f64; 5] = [0.5, 0.9, 0.95, 0.99, 1.0];

/// A device counts as reporting while its newest valid reading arrived this recently.
pub const REPORTING_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the instruments of [`shared()`] on or off (`engine.metrics`); the counters a scrape
/// copies from [`Status`] are always there.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Relaxed);
}

/// Whether the instruments record.
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// This process's resident memory (`VmRSS` of /proc/self/status), where there is one.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    kb.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

/// The instruments every part of one process records into, and its identity (build, start,
/// uptime).
pub struct Shared {
    process: Registry,
    pipeline: Registry,
    started: Instant,
    uptime: Gauge,
    resident: Gauge,
    /// Poll time or Kafka record timestamp to the aggregate updated, per reading.
    pub latency: Histogram,
    /// An epoch's first input to the epoch done (aggregated, stored), per epoch.
    pub epoch_duration: Histogram,
    sink_write: HistogramVec,
    sink_bytes: IntCounterVec,
    sink_errors: IntCounterVec,
    sink_retries: IntCounterVec,
    /// Records a producer could not deliver (the engine's results, the collector's raw
    /// records).
    pub produce_errors: IntCounter,
    polls: IntCounterVec,
    poll_seconds: Histogram,
    /// Device polls the collector scheduled (one per device per interval).
    pub polls_expected: IntCounter,
    /// Scheduled polls not made: the device's previous poll was still running.
    pub polls_skipped: IntCounter,
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric name");
    r.register(Box::new(h.clone())).expect("metric registered once");
    h
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric name");
    r.register(Box::new(h.clone())).expect("metric registered once");
    h
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

/// Buckets of the latency histograms, in seconds: 1 ms to 1 min.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

static SHARED: LazyLock<Shared> = LazyLock::new(Shared::new);

/// This process's instruments (created on first use; `main` touches them at start so the
/// start time is the process's).
pub fn shared() -> &'static Shared {
    &SHARED
}

impl Shared {
    fn new() -> Shared {
        let process = Registry::new();
        let start = gauge(
            &process,
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
            &process,
            names::BUILD_INFO,
            "Always 1; the labels name this build.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let uptime = gauge(&process, names::UPTIME, "Seconds since this process started.");
        let resident = gauge(
            &process,
            names::RESIDENT_MEMORY,
            "Resident memory of this process (VmRSS), read at each scrape.",
        );
        let r = Registry::new();
        let sink_write = histogram_vec(
            &r,
            names::SINK_WRITE_SECONDS,
            "Time to store one lake file (the last attempt) or to have one result record acknowledged, by backend.",
            &["backend"],
            latency_buckets(),
        );
        let sink_bytes = counter_vec(&r, names::SINK_BYTES, "Bytes stored, by backend.", &["backend"]);
        let sink_errors = counter_vec(
            &r,
            names::SINK_ERRORS,
            "Failed storage operations and undelivered result records, by backend (retried ones included).",
            &["backend"],
        );
        let sink_retries = counter_vec(
            &r,
            names::SINK_RETRIES,
            "Storage operations tried again after a failure, by backend.",
            &["backend"],
        );
        for b in BACKENDS {
            sink_write.with_label_values(&[b]);
            sink_bytes.with_label_values(&[b]);
            sink_errors.with_label_values(&[b]);
            sink_retries.with_label_values(&[b]);
        }
        let polls = counter_vec(
            &r,
            names::POLLS,
            "FMS API polls by outcome: the HTTP status class, `timeout` or `error` (no answer).",
            &["class"],
        );
        for c in POLL_CLASSES {
            polls.with_label_values(&[c]);
        }
        Shared {
            latency: histogram(
                &r,
                names::LATENCY,
                "End-to-end latency of a reading: poll time (or Kafka record timestamp) to its hourly aggregate updated.",
                latency_buckets(),
            ),
            epoch_duration: histogram(
                &r,
                names::EPOCH_SECONDS,
                "Time from an epoch's first input to the epoch aggregated and its outputs stored.",
                latency_buckets(),
            ),
            produce_errors: counter(
                &r,
                names::PRODUCE_ERRORS,
                "Records a Kafka producer could not deliver (after librdkafka's retries).",
            ),
            poll_seconds: histogram(
                &r,
                names::POLL_SECONDS,
                "Time of one FMS API request, answered or not.",
                latency_buckets(),
            ),
            polls_expected: counter(
                &r,
                names::POLLS_EXPECTED,
                "Device polls scheduled: one per device per interval, answered or not.",
            ),
            polls_skipped: counter(
                &r,
                names::POLLS_SKIPPED,
                "Scheduled polls not made because the device's previous poll was still running (a device that hangs).",
            ),
            sink_write,
            sink_bytes,
            sink_errors,
            sink_retries,
            polls,
            process,
            pipeline: r,
            started: Instant::now(),
            uptime,
            resident,
        }
    }

    /// Notes one storage operation or delivery of `backend`: how long it took, what it stored.
    pub fn sink_write(&self, backend: &str, seconds: f64, bytes: usize) {
        if enabled() {
            self.sink_write.with_label_values(&[backend]).observe(seconds);
            self.sink_write_bytes(backend, bytes);
        }
    }

    /// Notes `bytes` handed to `backend`.
    pub fn sink_write_bytes(&self, backend: &str, bytes: usize) {
        if bytes > 0 {
            self.sink_bytes.with_label_values(&[backend]).inc_by(bytes as u64);
        }
    }

    /// Notes a failed storage operation or delivery of `backend`.
    pub fn sink_error(&self, backend: &str) {
        self.sink_errors.with_label_values(&[backend]).inc();
    }

    /// Notes a storage operation of `backend` tried again.
    pub fn sink_retry(&self, backend: &str) {
        self.sink_retries.with_label_values(&[backend]).inc();
    }

    /// Notes one FMS API poll's outcome (one of [`POLL_CLASSES`]) and time.
    pub fn poll(&self, class: &str, seconds: f64) {
        self.polls.with_label_values(&[class]).inc();
        if enabled() {
            self.poll_seconds.observe(seconds);
        }
    }

    /// The FMS API polls counted so far, by class, in [`POLL_CLASSES`] order.
    pub fn polls_by_class(&self) -> Vec<(&'static str, u64)> {
        POLL_CLASSES
            .iter()
            .map(|c| (*c, self.polls.with_label_values(&[c]).get()))
            .collect()
    }

    /// The text exposition of this process's identity, with the pipeline's instruments
    /// (`pipeline`) and `more`.
    pub fn render(&self, pipeline: bool, more: &[&Registry]) -> String {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        if let Some(b) = resident_bytes() {
            self.resident.set(b as f64);
        }
        let mut families = self.process.gather();
        if pipeline {
            families.extend(self.pipeline.gather());
        }
        for r in more {
            families.extend(r.gather());
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("the text encoder writes to a Vec");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The collector's own series: what it produced and had acknowledged, and the fleet it
/// polls.
pub struct CollectorMetrics {
    registry: Registry,
    produced: IntCounter,
    delivered: IntCounter,
    scrape: Mutex<()>,
}

impl CollectorMetrics {
    /// The series, for a fleet of `devices`.
    pub fn new(devices: u32) -> CollectorMetrics {
        let r = Registry::new();
        int_gauge(&r, names::FLEET_DEVICES, "Devices in the fleet (fleet.devices).").set(devices as i64);
        CollectorMetrics {
            produced: counter(&r, names::PRODUCED, "Payloads handed to the Kafka producer."),
            delivered: counter(&r, names::DELIVERED, "Payloads the brokers acknowledged."),
            registry: r,
            scrape: Mutex::new(()),
        }
    }

    /// The text exposition, the counters brought up to `produced` and `delivered`.
    pub fn render(&self, produced: u64, delivered: u64) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        advance(&self.produced, produced);
        advance(&self.delivered, delivered);
        shared().render(true, &[&self.registry])
    }
}

/// The simulator's series: what it served, by kind, and the devices given a fault.
pub struct SimMetrics {
    registry: Registry,
    responses: Vec<IntCounter>,
    silenced: IntGauge,
    faulty: Vec<IntGauge>,
    scrape: Mutex<()>,
}

/// The `kind` labels of [`names::SIM_RESPONSES`] besides the rule names: clean readings, then
/// the answers of faulty devices (`silenced`: 503, `error`: 500, `hang`: held past the
/// client's timeout, `garbage`: a 200 body that is not a reading).
pub const SIM_KINDS: [&str; 5] = ["clean", "silenced", "error", "hang", "garbage"];

/// The `kind` labels of [`names::SIM_FAULTY`]: the simulator's fault kinds.
pub const SIM_FAULTS: [&str; 4] = ["silence", "error", "hang", "garbage"];

impl SimMetrics {
    /// The series, every kind at zero.
    pub fn new() -> SimMetrics {
        let r = Registry::new();
        let responses_vec = counter_vec(
            &r,
            names::SIM_RESPONSES,
            "Device responses served: clean, a faulty device's (silenced 503, error 500, hang, garbage), or dirty by the rule that must catch them.",
            &["kind"],
        );
        let responses = SIM_KINDS
            .iter()
            .copied()
            .chain(Rule::ALL.iter().map(|r| r.name()))
            .map(|k| responses_vec.with_label_values(&[k]))
            .collect();
        let faulty_vec = gauge_vec(
            &r,
            names::SIM_FAULTY,
            "Devices given a fault (--fault-share or /control/fault), by kind.",
            &["kind"],
        );
        let faulty = SIM_FAULTS.iter().map(|k| faulty_vec.with_label_values(&[k])).collect();
        SimMetrics {
            silenced: int_gauge(
                &r,
                names::SIM_SILENCED,
                "Devices silenced through /control (answering 503).",
            ),
            faulty,
            responses,
            registry: r,
            scrape: Mutex::new(()),
        }
    }

    /// The text exposition: `counts` in [`SIM_KINDS`] then `Rule::ALL` order, `faulty` the
    /// devices given each fault in [`SIM_FAULTS`] order (the first, `silence`, is also the
    /// silenced gauge).
    pub fn render(&self, counts: &[u64], faulty: &[usize]) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for (c, n) in self.responses.iter().zip(counts) {
            advance(c, *n);
        }
        for (g, n) in self.faulty.iter().zip(faulty) {
            g.set(*n as i64);
        }
        self.silenced.set(faulty.first().copied().unwrap_or(0) as i64);
        shared().render(false, &[&self.registry])
    }
}

impl Default for SimMetrics {
    fn default() -> Self {
        Self::new()
    }
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
    devices_reporting: IntGauge,
    devices_failing: IntGauge,
    by_quality: Vec<IntGauge>,
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

impl Metrics {
    /// Every metric registered, the per-rule and per-endpoint series present from the start
    /// (at zero), for a fleet of `devices`.
    pub fn new(devices: u32) -> Metrics {
        let r = Registry::new();
        let rejected_vec = counter_vec(
            &r,
            names::REJECTED,
            "Records rejected, by the quality rule that rejected them.",
            &["rule"],
        );
        let rejected = Rule::ALL
            .iter()
            .map(|rule| rejected_vec.with_label_values(&[rule.name()]))
            .collect();
        let query_seconds = histogram_vec(
            &r,
            names::QUERY_SECONDS,
            "Time to answer a query-API request, by endpoint.",
            &["endpoint"],
            vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 3.0],
        );
        let queries = counter_vec(
            &r,
            names::QUERIES,
            "Query-API requests answered, by endpoint and status class (2xx, 4xx, 5xx).",
            &["endpoint", "class"],
        );
        for e in ENDPOINTS {
            query_seconds.with_label_values(&[e]);
            for class in ["2xx", "4xx", "5xx"] {
                queries.with_label_values(&[e, class]);
            }
        }
        int_gauge(&r, names::FLEET_DEVICES, "Devices in the fleet (fleet.devices).").set(devices as i64);
        let by_quality = gauge_vec(
            &r,
            names::DEVICES_BY_QUALITY,
            "Devices of this process whose quality (valid / records) over the last 24 hours is at most `le`.",
            &["le"],
        );
        let by_quality = QUALITY_BOUNDS
            .iter()
            .map(|b| by_quality.with_label_values(&[&b.to_string()]))
            .collect();
        Metrics {
            devices_reporting: int_gauge(
                &r,
                names::DEVICES_REPORTING,
                "Devices this process received a valid reading from in the last 60 s.",
            ),
            devices_failing: int_gauge(
                &r,
                names::DEVICES_FAILING,
                "Devices of this process whose newest reading reports a failure (isFail).",
            ),
            by_quality,
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
        self.devices_reporting
            .set(status.devices_reporting(REPORTING_WINDOW.as_millis() as i64) as i64);
        self.devices_failing.set(status.failing_devices().len() as i64);
        if let Some(view) = view {
            let frontier = view.frontier();
            self.frontier.set(view.epoch_label(frontier).0 as i64);
            if let Some(w) = view.watermark(frontier) {
                self.watermark.set(w as f64 / 1000.0);
                self.watermark_delay.set((crate::clock::wall_ms() - w) as f64 / 1000.0);
            }
            let ratios = view.device_quality_ratios(frontier);
            for (g, bound) in self.by_quality.iter().zip(QUALITY_BOUNDS) {
                g.set(ratios.iter().filter(|r| **r <= bound).count() as i64);
            }
        }
        shared().render(true, &[&self.registry])
    }
}

/// Every metric family fmsflow exports (engine, collector, simulator), by name: what
/// dashboards and alert rules may use.
pub fn exported_names() -> std::collections::BTreeSet<String> {
    // A partition, so the per-partition families have a series.
    let status = Status::default();
    status.set_partitions(&[(0, 0, Some(0))]);
    let texts = [
        Metrics::new(1).render(&status, None),
        CollectorMetrics::new(1).render(0, 0),
        SimMetrics::new().render(&[], &[]),
    ];
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_carries_the_status_counters_and_advances_them_once() {
        let m = Metrics::new(100);
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
        let m = Metrics::new(100);
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
