//! What the engine holds per (device, hour) it keeps for the live view (`api.keep_hours`):
//! the whole dataflow and the live view, fed a fleet that reports a few times an hour, paced
//! like a live run (small epochs, the view's versions folding as in production). Heap bytes
//! are counted by the allocator, not read from RSS, sampled as the hours go by; the growth
//! per hour of input over the second half of the run, divided by the devices, is what one
//! more (device, hour) costs. After the run the dataflow is gone and the view is still there:
//! its own share.
//!
//! `cargo run --release --example hourmem [-- DEVICES HOURS INTERVAL_S RATE]` (`FMSFLOW_*`
//! settings apply: `FMSFLOW_API__KEEP_HOURS=6` holds 6 hours)
//! (defaults 10,000 devices, 24 h, a reading every 600 s, 40,000 msg/s on 2 workers).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fmsflow::api::view::LiveView;
use fmsflow::config::Config;
use fmsflow::engine::{self, EngineSettings, Source};
use fmsflow::gen::{generate, GenSettings};
use fmsflow::status::Status;

#[path = "common/counting.rs"]
mod counting;
use counting::arg;

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (sxy, sxx) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    sxy / sxx
}

fn main() {
    let devices = arg(1, 10_000) as u32;
    let hours = arg(2, 24) as u32;
    let interval_s = arg(3, 600) as u32;
    let rate = arg(4, 40_000) as f64;
    let workers = 2;
    let (records, _) = generate(&GenSettings {
        interval_s,
        ..GenSettings::clean(devices, hours)
    });
    // A file, not records in memory: only a replay of files is paced.
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in.ndjson");
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(std::fs::File::create(&input).expect("input file"));
        for (ingest, payload) in &records {
            writeln!(w, "{ingest} {payload}").expect("writing the input");
        }
    }
    let n = records.len();
    drop(records);
    let per_hour = n as f64 / hours as f64;
    let mut cfg = Config::load(None).expect("the configuration (FMSFLOW_* settings)");
    cfg.fleet.devices = devices;
    let view = LiveView::new(workers, cfg.api.keep_hours);
    let status = Arc::new(Status::default());
    let settings = EngineSettings::paced(cfg.flow_config(), workers, rate);
    let before = counting::live();
    counting::reset_peak();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (status, done) = (status.clone(), done.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut next_report = 0.0;
            while !done.load(Ordering::Relaxed) {
                let valid = status.valid.load(Ordering::Relaxed) as f64;
                let bytes = counting::live().saturating_sub(before) as f64;
                samples.push((valid / per_hour, bytes));
                if valid / per_hour >= next_report {
                    eprintln!(
                        "  {:5.1} h of input: {:7.1} MiB",
                        valid / per_hour,
                        bytes / (1 << 20) as f64
                    );
                    next_report += (hours as f64 / 8.0).max(1.0);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        })
    };
    engine::run(
        settings,
        Source::Files(vec![input]),
        None,
        None,
        status.clone(),
        Some(view.clone()),
    )
    .expect("engine run");
    done.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("sampler");
    let after = counting::live().saturating_sub(before);
    let half: Vec<(f64, f64)> = samples
        .iter()
        .copied()
        .filter(|(h, _)| *h >= hours as f64 / 2.0 && *h < hours as f64 - 0.5)
        .collect();
    let per_device_hour = slope(&half) / devices as f64;
    let peak = samples.iter().map(|s| s.1).fold(0.0, f64::max);
    println!(
        "{devices} devices, a reading every {interval_s} s, {hours} h ({n} readings) at {rate} msg/s on {workers} workers"
    );
    println!(
        "engine + view: {:.0} bytes per (device, hour) (slope over hours {:.0}–{:.0}); peak {:.1} MiB sampled, {:.1} MiB by the allocator",
        per_device_hour,
        hours as f64 / 2.0,
        hours as f64 - 0.5,
        peak / (1 << 20) as f64,
        counting::peak().saturating_sub(before) as f64 / (1 << 20) as f64
    );
    println!(
        "the view alone, after the run: {:.1} MiB, {:.0} bytes per (device, hour)",
        after as f64 / (1 << 20) as f64,
        after as f64 / (devices as f64 * hours as f64)
    );
    drop(view);
}
