//! What a live hour's readings cost from arrival to the lake: an hour of a fleet read every
//! 10 s (10,000 devices: 1,000 msg/s, the simulator's two-decimal values), a second's
//! readings at a time, kept by one sealing stage (a two-worker engine holds half at each)
//! and then written as the lake's `readings` file. Heap bytes are counted by the allocator:
//! the most the hour holds, and the peak (while it is written: merged and encoded
//! `lake::READ_OUT_ROWS` rows at a time, the file's bytes growing beside them). Three ways:
//! written as open parts whenever `OPEN_ROWS` readings are held (`lake.max_open_rows`,
//! 524,288 by default), the rest at the seal; packed and written whole at the seal; unpacked
//! and written from whole columns, as before packing.
//!
//! `cargo run --release --example hourseal [-- DEVICES INTERVAL_S OPEN_ROWS]`

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
    let open_rows = arg(3, 524_288) as usize;
    for how in [Keep::OpenParts(open_rows), Keep::Packed, Keep::Unpacked] {
        hour(devices, interval_s, how);
    }
}

/// How the sealing stage holds the hour.
#[derive(Clone, Copy, PartialEq)]
enum Keep {
    /// Packed, and written as a part whenever this many are held (`lake.max_open_rows`).
    OpenParts(usize),
    /// Packed, written whole at the seal (`lake.max_open_rows = 0`).
    Packed,
    /// Unpacked and written from whole columns, as before packing.
    Unpacked,
}

/// Writes what `kept` holds as one Parquet file; its size.
fn write(kept: &mut KeptReadings, how: Keep) -> usize {
    let rows = kept.len();
    let readings = kept.take();
    let file = if how == Keep::Unpacked {
        parquet::readings([readings.into_columns()], rows, 0, 16_384)
    } else {
        parquet::readings(readings.chunks(fmsflow::lake::READ_OUT_ROWS), rows, 0, 16_384)
    };
    file.expect("encoding").len()
}

fn hour(devices: u32, interval_s: i64, how: Keep) {
    let t0 = 1_751_846_400_000i64; // 2025-07-07T00:00:00Z
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut offsets = [0u64; 6]; // partitions
    let before = counting::live();
    let mut kept = KeptReadings::default();
    if how == Keep::Unpacked {
        kept.never_pack();
    }
    let (mut n, mut parts, mut bytes) = (0usize, 0usize, 0usize);
    // The most bytes held, and how many readings then.
    let mut most = (0usize, 0usize);
    let mut note = |kept: &KeptReadings| {
        let held = counting::live() - before;
        if held > most.0 {
            most = (held, kept.len());
        }
    };
    counting::reset_peak();
    let started = std::time::Instant::now();
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
        if let Keep::OpenParts(rows) = how {
            if kept.len() >= rows {
                note(&kept);
                bytes += write(&mut kept, how);
                parts += 1;
            }
        }
    }
    let reading_s = started.elapsed().as_secs_f64();
    note(&kept);
    let held = kept.len();
    if !matches!(how, Keep::OpenParts(_)) {
        // Holding a whole hour, the peak is that of writing it: measured from here.
        counting::reset_peak();
    }
    let started = std::time::Instant::now();
    bytes += write(&mut kept, how);
    parts += 1;
    let secs = started.elapsed().as_secs_f64();
    let what = match how {
        Keep::OpenParts(rows) => format!("packed, open parts of {rows}"),
        Keep::Packed => "packed, whole hour".into(),
        Keep::Unpacked => "unpacked, whole columns".into(),
    };
    println!(
        "{what}: {n} readings in {parts} part(s), at most {:.1} MiB held ({:.1} bytes a reading held), \
         {held} left at the seal, written in {:.2} s ({:.2} s reading the hour) to {:.1} MiB of files ({:.1} bytes a row), \
         peak {:.1} MiB",
        mib(most.0),
        most.0 as f64 / most.1 as f64,
        secs,
        reading_s,
        mib(bytes),
        bytes as f64 / n as f64,
        mib(counting::peak() - before)
    );
}
