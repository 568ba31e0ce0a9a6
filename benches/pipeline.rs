//! Replays generated readings through parse → validate → hourly aggregates (→ Parquet) at 1
//! and 2 workers and prints msgs/s, total and per worker. Run: `cargo bench --bench pipeline`
//! (or `scripts/bench`). Size with `FMSFLOW_BENCH_HOURS` (default 28 hours × 100 devices ×
//! 360 readings = 1,008,000 readings) and `FMSFLOW_BENCH_BATCH` (records per worker per epoch,
//! default 50,000) and `FMSFLOW_BENCH_WRITERS` (lake writer threads per worker, default 1 as
//! in the configuration). `FMSFLOW_BENCH_METRICS`: `on` (the default, as `engine.metrics`),
//! `off` (`engine.metrics = false`), or `recent`: every reading stamped as ingested now, so
//! each one's end-to-end latency is kept and observed (the live path's cost; the replay's
//! 2025 stamps are too old to count), with `rules.max_age` lifted so none is stale.
//! `FMSFLOW_BENCH_FORGET=H`: the collections forget hours `H` hours behind the watermark
//! (`FlowConfig::forget_after_ms`; 0 = as soon as they can), as the engine does on Kafka.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fmsflow::engine::{self, EngineSettings, Source};
use fmsflow::gen::{generate, GenSettings};
use fmsflow::lake::{self, LakeWriter};
use fmsflow::status::Status;
use fmsflow_dataflows::dataflow::FlowConfig;
use fmsflow_dataflows::{validate, RawRecord, RuleConfig, SourcePos};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn records(hours: u32) -> Vec<RawRecord> {
    let (recs, _) = generate(&GenSettings::clean(100, hours));
    recs.into_iter()
        .enumerate()
        .map(|(i, (ingest, p))| RawRecord {
            payload: p.into_bytes().into(),
            ingest_ms: Some(ingest),
            pos: SourcePos {
                source: 0,
                offset: i as u64,
            },
        })
        .collect()
}

/// CPU time (user + system) of the whole process so far, from `/proc/self/stat` (Linux; in
/// clock ticks of 10 ms). Shows how busy the cores were during a case.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Prints a case's rate, and with `cpu` (CPU time spent during the case) how many cores it
/// kept busy on average.
fn report(what: &str, workers: usize, n: usize, t: Duration, cpu: Option<Duration>) {
    let rate = n as f64 / t.as_secs_f64();
    let busy = cpu
        .map(|c| format!("  cores busy {:.2}", c.as_secs_f64() / t.as_secs_f64()))
        .unwrap_or_default();
    println!(
        "{what:<46} workers={workers}  {n} msgs in {:>6.3} s  {:>10.0} msgs/s  {:>10.0} msgs/s/worker{busy}",
        t.as_secs_f64(),
        rate,
        rate / workers as f64
    );
}

/// The number in environment variable `name`, or `default` when it is unset or not a number.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    fmsflow::no_huge_pages();
    let hours: u32 = env_or("FMSFLOW_BENCH_HOURS", 28);
    let (batch, writers): (usize, usize) = (
        env_or("FMSFLOW_BENCH_BATCH", 50_000),
        env_or("FMSFLOW_BENCH_WRITERS", 1),
    );
    let metrics = std::env::var("FMSFLOW_BENCH_METRICS").unwrap_or_else(|_| "on".into());
    fmsflow::metrics::set_enabled(metrics != "off");
    let mut flow = FlowConfig {
        forget_after_ms: std::env::var("FMSFLOW_BENCH_FORGET")
            .ok()
            .map(|h| h.parse::<i64>().expect("FMSFLOW_BENCH_FORGET: hours") * 3_600_000),
        ..FlowConfig::default()
    };
    let mut data = records(hours);
    if metrics == "recent" {
        let now = fmsflow::clock::wall_ms();
        for r in &mut data {
            r.ingest_ms = Some(now);
        }
        flow.rules.max_age_ms = i64::MAX / 4;
    }
    let data = Arc::new(data);
    let n = data.len();
    println!(
        "fmsflow pipeline benchmark: {n} generated readings ({hours} hours x 100 devices), {} cores, metrics {metrics}",
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1)
    );

    // FMSFLOW_BENCH_ONLY=aggregate-1 (or parquet-2, ...) runs one case, for profiling.
    let only = std::env::var("FMSFLOW_BENCH_ONLY").ok();

    // Parse + validate alone, one thread, no dataflow.
    let cfg = RuleConfig::default();
    if only.is_none() {
        let start = Instant::now();
        let ok = data.iter().filter(|r| validate((*r).clone(), &cfg).is_ok()).count();
        assert_eq!(ok, n);
        report("parse+validate (one thread, no dataflow)", 1, n, start.elapsed(), None);
    }

    // The comparison: the naive recomputation the oracle tests use (keeps every value).
    if only.is_none() {
        let epochs: Vec<(u64, RawRecord)> = data.iter().map(|r| (0, r.clone())).collect();
        let start = Instant::now();
        let exp = fmsflow_dataflows::oracle::expected(&epochs, &cfg);
        let t = start.elapsed();
        assert_eq!(exp.hourly.len(), 100 * hours as usize);
        report("naive recomputation (one thread, comparison)", 1, n, t, None);
    }

    // (lake, fsync): no lake; Parquet with each file fsynced (the default); Parquet without fsync.
    for (with_lake, fsync) in [(false, false), (true, true), (true, false)] {
        for workers in [1usize, 2] {
            let kind = match (with_lake, fsync) {
                (false, _) => "aggregate",
                (true, true) => "parquet",
                (true, false) => "parquet-nofsync",
            };
            if only.as_ref().is_some_and(|o| *o != format!("{kind}-{workers}")) {
                continue;
            }
            let dir = tempfile::tempdir().expect("temp dir");
            let writer = with_lake.then(|| {
                let storage = lake::open(
                    &format!("file://{}", dir.path().display()),
                    &lake::StorageOptions {
                        fsync,
                        ..Default::default()
                    },
                )
                .expect("lake");
                Arc::new(LakeWriter::new(storage, 16_384).with_writers(writers))
            });
            let status = Arc::new(Status::default());
            let settings = EngineSettings {
                flow: flow.clone(),
                workers,
                batch,
                epoch: Duration::from_millis(200),
                cluster: None,
                replay_rate: None,
            };
            let (start, cpu0) = (Instant::now(), cpu_time());
            engine::run(
                settings,
                Source::Memory(data.clone()),
                writer,
                None,
                status.clone(),
                None,
            )
            .expect("engine run");
            let t = start.elapsed();
            let cpu = cpu_time().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
            assert_eq!(status.valid.load(Relaxed) as usize, n);
            let what = match kind {
                "aggregate" => "parse+validate+aggregate",
                "parquet" => "parse+validate+aggregate+Parquet (fsync)",
                _ => "parse+validate+aggregate+Parquet (no fsync)",
            };
            report(what, workers, n, t, cpu);
        }
    }
}
