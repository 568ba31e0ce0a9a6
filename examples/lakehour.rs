//! An hour the live view no longer holds, read back from the lake (docs/API.md, "Older
//! hours come from the lake"): what one costs to read and decode, and what a decoded hour
//! holds. The lake gets `HOURS` hours of `DEVICES` devices' `hourly` and `quality` files, as
//! the engine commits them (`LakeWriter::write`, then the manifest); then each hour is read
//! cold (a cache of none), then through a cache that holds them all, twice.
//!
//! `cargo run --release --example lakehour [-- DEVICES HOURS [LAKE_URL]]` (defaults 10,000
//! devices, 6 hours, a temporary local directory; an `s3://` URL takes the
//! `FMSFLOW_LAKE__S3_*` settings, as `fmsflow run` does).
use std::time::{Duration, Instant};

use fmsflow::api::archive::Archive;
use fmsflow::config::Config;
use fmsflow::lake::{self, manifest::Manifest};
use fmsflow_dataflows::dataflow::HourBatch;
use fmsflow_dataflows::rules::{Outcome, Rule};
use fmsflow_dataflows::{HourStats, Reading};

#[path = "common/counting.rs"]
#[allow(dead_code)]
mod counting;
use counting::arg;

/// Hour `hour` of `devices` devices, each with 360 readings' worth of figures.
fn batch(hour: i64, devices: u32) -> HourBatch {
    let start = hour * fmsflow_dataflows::time::HOUR_MS;
    let hourly = (1..=devices)
        .map(|d| {
            let at = |k: i64| Reading {
                device: d,
                time_ms: start + 10_000 * k + i64::from(d % 10_000),
                // Figures that differ from device to device, as a fleet's do.
                metrics: std::array::from_fn(|m| {
                    let spread = (u64::from(d) * 2_654_435_761 + m as u64 * 40_503) % 100_000;
                    50.0 + spread as f64 / 1_000.0 + (k * (m as i64 + 1) % 37) as f64 / 100.0
                }),
                is_fail: k % 50 == 0,
                ingest_ms: None,
                pos: Default::default(),
                payload_at: Default::default(),
            };
            let mut s = HourStats::of(&at(0));
            (1..360).for_each(|k| s.add(&at(k)));
            (d, s)
        })
        .collect();
    let mut quality: Vec<((u32, Outcome), i64)> = (1..=devices).map(|d| ((d, Outcome::Valid), 360)).collect();
    quality.extend(
        (1..=devices)
            .step_by(50)
            .map(|d| ((d, Outcome::Rejected(Rule::OutOfRange)), 1)),
    );
    quality.sort_unstable();
    HourBatch {
        hourly: Some(hourly),
        quality: Some(quality),
        ..HourBatch::seal(hour, 0)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let devices = arg(1, 10_000) as u32;
    let hours = arg(2, 6) as i64;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = std::env::args()
        .nth(3)
        .unwrap_or_else(|| format!("file://{}", dir.path().display()));
    let cfg = Config::load(None).expect("the configuration (FMSFLOW_* settings)");
    let storage = lake::open(&url, &cfg.lake.storage_options()).expect("opening the lake");
    let writer = cfg.lake.writer(storage.clone());
    let first = 486_624; // 2025-07-07T00
    let mut bytes = 0;
    for h in first..first + hours {
        let mut b = batch(h, devices);
        writer.write(&mut b).expect("writing the hour");
        let mut m = Manifest::new(h);
        m.add(writer.keys(&b));
        m.save(storage.as_ref(), h).expect("committing the hour");
        bytes += m
            .all_files()
            .map(|k| storage.get(k).unwrap().map_or(0, |f| f.len()))
            .sum::<usize>();
    }
    println!(
        "{hours} hours of {devices} devices in {url}: {:.1} MiB of hourly and quality files ({:.0} B a device-hour)",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / (hours as f64 * f64::from(devices))
    );
    let cold = Archive::new(storage.clone(), 0, 1, 2, 0);
    let cached = Archive::new(storage.clone(), 0, 1, 2, hours as usize);
    let mut times: Vec<f64> = Vec::new();
    let before = counting::live();
    let mut held = Vec::new();
    for h in first..first + hours {
        let t = Instant::now();
        let shares = cold.hour(h).expect("reading the hour");
        times.push(ms(t.elapsed()));
        assert_eq!(shares.iter().map(|s| s.devices()).sum::<usize>(), devices as usize);
        held.push(cached.hour(h).expect("reading the hour"));
    }
    let per_hour = (counting::live() - before) as f64 / hours as f64;
    times.sort_by(f64::total_cmp);
    println!(
        "read and decoded cold, 2 workers' shares: median {:.1} ms, max {:.1} ms an hour",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    println!(
        "held decoded: {:.2} MiB an hour, {:.0} B a device-hour",
        per_hour / (1 << 20) as f64,
        per_hour / f64::from(devices)
    );
    drop(held);
    let t = Instant::now();
    let mut n = 0;
    cold.for_hours(first..first + hours, |_, shares| n += shares.len())
        .expect("reading the hours");
    println!(
        "the {hours} hours as one query reads them ({} at a time), cold: {:.1} ms",
        fmsflow::api::archive::READ_AT_ONCE,
        ms(t.elapsed())
    );
    let t = Instant::now();
    for h in first..first + hours {
        cached.hour(h).expect("a cached hour");
    }
    println!(
        "from the cache: {:.1} µs an hour",
        t.elapsed().as_secs_f64() * 1e6 / hours as f64
    );
}
