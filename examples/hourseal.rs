//! What a live hour's readings cost from arrival to the lake: an hour of a fleet read every
//! 10 s (10,000 devices: 1,000 msg/s, the simulator's two-decimal values), a second's
//! readings at a time, kept by one sealing stage (a two-worker engine holds half at each)
//! and then written as the lake's `readings` file. Heap bytes are counted by the allocator:
//! what the hour holds before it is written, and the peak while it is written (merged and
//! encoded 65,536 rows at a time, the file's bytes growing beside them). Beside it, the
//! same hour kept unpacked and written from whole columns, as before packing.
//!
//! `cargo run --release --example hourseal [-- DEVICES INTERVAL_S]`

use fmsflow::fms::clean_values;
use fmsflow::lake::parquet;
use fmsflow_dataflows::keep::KeptReadings;
use fmsflow_dataflows::Reading;

#[path = "common/counting.rs"]
mod counting;
use counting::arg;

fn main() {
    let devices = arg(1, 10_000) as u32;
    let interval_s = arg(2, 10) as i64;
    for pack in [true, false] {
        hour(devices, interval_s, pack);
    }
}

fn hour(devices: u32, interval_s: i64, pack: bool) {
    let t0 = 1_751_846_400_000i64; // 2025-07-07T00:00:00Z
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut offsets = [0u64; 6]; // partitions
    let before = counting::live();
    let mut kept = KeptReadings::default();
    if !pack {
        kept.never_pack();
    }
    let mut n = 0usize;
    for s in 0..3600 {
        let time_ms = t0 + s * 1000;
        let second: Vec<Reading> = (1..=devices)
            .filter(|d| i64::from(*d) % interval_s == s % interval_s)
            .map(|device| {
                let (metrics, is_fail) = clean_values(42, device, time_ms);
                Reading {
                    metrics,
                    is_fail,
                    ..counting::fleet_reading(device, time_ms, &mut offsets)
                }
            })
            .collect();
        n += second.len();
        kept.keep(&second);
    }
    let held = counting::live() - before;
    counting::reset_peak();
    let started = std::time::Instant::now();
    let hour = kept.take();
    let file = if pack {
        parquet::readings(hour.chunks(65_536), n, 0, 16_384)
    } else {
        parquet::readings([hour.into_columns()], n, 0, 16_384)
    }
    .expect("encoding");
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}: {n} readings held in {:.1} MiB ({:.1} bytes each); written in {:.2} s to a {:.1} MiB file ({:.1} bytes a row), peak {:.1} MiB while written",
        if pack { "packed" } else { "unpacked, whole columns" },
        mib(held),
        held as f64 / n as f64,
        secs,
        mib(file.len()),
        file.len() as f64 / n as f64,
        mib(counting::peak() - before)
    );
}
