//! What the duplicate rule's memory costs per reading at real time: a `Deduper` filled with
//! `rules.max_age` + 1 hour (7 h) of a fleet read every 10 s (10,000 devices: 1,000 msg/s)
//! from Kafka partitions, one epoch per second, as the live engine fills it. Heap bytes are
//! counted by the allocator, not read from RSS. Then an hour of the same fleet's readings
//! (two-decimal metrics, as the simulator sends them) kept by one worker's sealing stage
//! until the hour is written, packed (as a live engine does) and unpacked: the bytes held,
//! and the peak and time of taking them out as the lake's columns.
//!
//! With JITTER 1, as a collector delivers them: one reading in ten a second late (the
//! simulator's times are whole seconds), and each second's readings in a random order within
//! their partition.
//!
//! `cargo run --release -p fmsflow-dataflows --example statemem [-- DEVICES INTERVAL_S HOURS PARTITIONS JITTER]`

use fmsflow_dataflows::keep::KeptReadings;
use fmsflow_dataflows::rules::Deduper;
use fmsflow_dataflows::time::HOUR_MS;
use fmsflow_dataflows::{Reading, SourcePos};

#[path = "../../examples/common/counting.rs"]
mod counting;
use counting::{arg, Counting};

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() {
    let devices = arg(1, 10_000) as u32;
    let interval_s = arg(2, 10) as i64;
    let hours = arg(3, 7) as i64;
    let partitions = arg(4, 6) as u32;
    let jitter = arg(5, 0) != 0;
    // A fixed xorshift: the same run every time.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let t0 = 1_751_846_400_000i64; // 2025-07-07T00:00:00Z
                                   // Nothing is forgotten while it fills: the window of a steady state.
    let mut deduper = Deduper::new(hours * HOUR_MS);
    let mut offsets = vec![0u64; partitions as usize];
    let (mut losers, mut batch) = (Vec::new(), Vec::new());
    let before = counting::live();
    let started = std::time::Instant::now();
    let mut readings = 0u64;
    for s in 0..hours * 3600 {
        batch.clear();
        let mut due: Vec<u32> = (1..=devices)
            .filter(|d| i64::from(*d) % interval_s == s % interval_s)
            .collect();
        if jitter {
            for i in (1..due.len()).rev() {
                due.swap(i, random() as usize % (i + 1));
            }
        }
        for device in due {
            let late = if jitter && random() % 10 == 0 { 1000 } else { 0 };
            let time_ms = t0 + s * 1000 + late + if jitter { 0 } else { i64::from(device) * 37 % 1000 };
            let source = device % partitions;
            let offset = &mut offsets[source as usize];
            *offset += 1;
            batch.push(Reading {
                device,
                time_ms,
                ingest_ms: Some(time_ms + 200),
                pos: SourcePos {
                    source,
                    offset: *offset,
                },
                ..Reading::EMPTY
            });
        }
        readings += batch.len() as u64;
        let mut batches = [std::mem::take(&mut batch)];
        deduper.epoch_in_place(&mut batches, &mut losers);
        assert!(losers.is_empty());
        let [b] = batches;
        batch = b;
    }
    let secs = started.elapsed().as_secs_f64();
    batch = Vec::new();
    drop(batch);
    let bytes = counting::live() - before;
    assert_eq!(deduper.len() as u64, readings);
    println!(
        "{devices} devices every {interval_s} s on {partitions} partitions, {hours} h{}: {readings} readings remembered",
        if jitter { ", with jitter" } else { "" }
    );
    println!(
        "duplicate rule's memory: {:.1} MiB, {:.1} bytes per reading; {:.0} ns per reading to fill",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / readings as f64,
        secs * 1e9 / readings as f64
    );
    drop(deduper);
    for pack in [true, false] {
        open_hour(devices, interval_s, partitions, pack);
    }
}

/// An hour of the fleet kept by one sealing stage, a second's readings at a time, and taken
/// out as columns.
fn open_hour(devices: u32, interval_s: i64, partitions: u32, pack: bool) {
    let t0 = 1_751_846_400_000i64;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut offsets = vec![0u64; partitions as usize];
    let before = counting::live();
    let mut kept = KeptReadings::default();
    if !pack {
        kept.never_pack();
    }
    let mut n = 0usize;
    let started = std::time::Instant::now();
    for s in 0..3600 {
        let second: Vec<Reading> = (1..=devices)
            .filter(|d| i64::from(*d) % interval_s == s % interval_s)
            .map(|device| {
                let source = device % partitions;
                let offset = &mut offsets[source as usize];
                *offset += 1;
                // A device's own level, and noise of a few percent, to two decimals.
                let level = f64::from(device % 1_000) + 100.0;
                let noise = ((s as u64 * 2_654_435_761 + u64::from(device) * 40_503) % 1_000) as f64 / 1_000.0;
                let metric = |i: usize| ((level * (i + 1) as f64) * (0.98 + 0.04 * noise) * 100.0).round() / 100.0;
                Reading {
                    device,
                    time_ms: t0 + s * 1000,
                    ingest_ms: Some(t0 + s * 1000 + 200),
                    pos: SourcePos {
                        source,
                        offset: *offset,
                    },
                    metrics: std::array::from_fn(metric),
                    ..Reading::EMPTY
                }
            })
            .collect();
        n += second.len();
        kept.keep(&second);
    }
    let fill = started.elapsed().as_secs_f64();
    let held = counting::live() - before;
    counting::reset_peak();
    let started = std::time::Instant::now();
    let columns = kept.take();
    let take = started.elapsed().as_secs_f64();
    assert_eq!(columns.len(), n);
    println!(
        "an hour's readings kept until written, {}: {:.1} MiB ({:.1} bytes per reading; {:.0} ns each to keep); taken out as columns in {:.2} s, peak {:.1} MiB",
        if pack { "packed" } else { "unpacked" },
        mib(held),
        held as f64 / n as f64,
        fill * 1e9 / n as f64,
        take,
        mib(counting::peak() - before)
    );
}
