//! What the duplicate rule's memory costs per reading at real time: a `Deduper` filled with
//! `rules.max_age` + 1 hour (7 h) of a fleet read every 10 s (10,000 devices: 1,000 msg/s)
//! from Kafka partitions, one epoch per second, as the live engine fills it. Heap bytes are
//! counted by the allocator, not read from RSS. Beside it, the size of a reading in the
//! dataflow (`examples/hourseal.rs` measures an hour of them kept until written, and written).
//!
//! With JITTER 1, as a collector delivers them: one reading in ten a second late (the
//! simulator's times are whole seconds), and each second's readings in a random order within
//! their partition.
//!
//! `cargo run --release -p fmsflow-dataflows --example statemem [-- DEVICES INTERVAL_S HOURS PARTITIONS JITTER]`

use fmsflow_dataflows::rules::Deduper;
use fmsflow_dataflows::time::HOUR_MS;
use fmsflow_dataflows::Reading;

#[path = "../../examples/common/counting.rs"]
mod counting;
use counting::arg;

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
    counting::reset_peak();
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
            batch.push(counting::fleet_reading(device, time_ms, &mut offsets));
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
        "duplicate rule's memory: {:.1} MiB (peak {:.1} MiB while filled), {:.1} bytes per reading; {:.0} ns per reading to fill",
        bytes as f64 / (1 << 20) as f64,
        (counting::peak() - before) as f64 / (1 << 20) as f64,
        bytes as f64 / readings as f64,
        secs * 1e9 / readings as f64
    );
    println!(
        "a reading in the dataflow: {} bytes (one hour of this fleet: {:.1} MiB); the sealing stage keeps 88 until its hour is written, ~24 packed: cargo run --release --example hourseal",
        std::mem::size_of::<Reading>(),
        (std::mem::size_of::<Reading>() as u64 * readings / hours as u64) as f64 / (1 << 20) as f64
    );
}
