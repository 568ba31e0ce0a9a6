//! Replay from files into the lake: generated data with dirty, duplicate and late records
//! lands in the lake exactly once, and the lake is the same at any worker count.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use arrow_array::{Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use fmsflow::gen::{generate, GenSettings};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn read_table(lake: &Path, table: &str) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for entry in glob::glob(&format!("{}/{table}/**/*.parquet", lake.display())).unwrap() {
        let f = File::open(entry.unwrap()).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap();
        out.extend(reader.map(|b| b.unwrap()));
    }
    out
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap()
}

/// (device, time) of every reading, sorted.
fn readings(lake: &Path) -> Vec<(i32, i64)> {
    let mut v: Vec<(i32, i64)> = read_table(lake, "readings")
        .iter()
        .flat_map(|b| {
            let d = col::<Int32Array>(b, "device");
            let t = col::<TimestampMillisecondArray>(b, "time");
            (0..b.num_rows())
                .map(move |i| (d.value(i), t.value(i)))
                .collect::<Vec<_>>()
        })
        .collect();
    v.sort();
    v
}

fn rejects_by_rule(lake: &Path) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for b in read_table(lake, "rejects") {
        let r = col::<StringArray>(&b, "rule");
        for i in 0..b.num_rows() {
            *m.entry(r.value(i).to_string()).or_default() += 1;
        }
    }
    m
}

fn hourly_counts(lake: &Path) -> BTreeMap<(i32, i64), i64> {
    let mut m = BTreeMap::new();
    for b in read_table(lake, "hourly") {
        let d = col::<Int32Array>(&b, "device");
        let h = col::<TimestampMillisecondArray>(&b, "hour_start");
        let c = col::<Int64Array>(&b, "count");
        for i in 0..b.num_rows() {
            assert!(
                m.insert((d.value(i), h.value(i)), c.value(i)).is_none(),
                "one hourly row per (device, hour)"
            );
        }
    }
    m
}

#[test]
fn replay_lands_every_row_once_at_any_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let s = GenSettings {
        devices: 30,
        hours: 5,
        interval_s: 10,
        start_ms: 1_751_846_400_000,
        seed: 11,
        dirty_rate: 0.05,
        late_rate: 0.02,
        max_late_ms: 30 * 60 * 1000,
    };
    let (records, dirty) = generate(&s);
    let input = dir.path().join("in.ndjson");
    let mut f = File::create(&input).unwrap();
    for (ingest, p) in &records {
        writeln!(f, "{ingest} {p}").unwrap();
    }
    drop(f);
    let dirty_total: u64 = dirty.values().sum();

    let mut lakes = Vec::new();
    // Several writer threads per worker: an hour's late rewrites must still land in order.
    // The last run writes each hour's readings in open parts of 700 rows before its seal
    // (5,400 a worker holds of an hour otherwise).
    for (workers, writers, open) in [("1", "1", "0"), ("3", "1", "0"), ("2", "3", "0"), ("2", "2", "700")] {
        let lake = dir.path().join(format!("lake-{workers}-{writers}-{open}"));
        let out = Command::new(common::bin())
            .args(["run", "--source"])
            .arg(format!("file:{}", input.display()))
            .arg("--lake")
            .arg(format!("file://{}", lake.display()))
            .args(["--workers", workers])
            .env("FMSFLOW_FLEET__DEVICES", "30")
            .env("FMSFLOW_ENGINE__BATCH", "1000")
            .env("FMSFLOW_LAKE__WRITERS", writers)
            .env("FMSFLOW_LAKE__MAX_OPEN_ROWS", open)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows = readings(&lake);
        assert_eq!(
            rows.len() as u64,
            records.len() as u64 - dirty_total,
            "every clean record, once"
        );
        assert!(rows.windows(2).all(|w| w[0] != w[1]), "no reading twice");
        let rej = rejects_by_rule(&lake);
        let want: BTreeMap<String, u64> = dirty.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        assert_eq!(rej, want, "every dirty record in the dead letters under its rule");
        let hourly = hourly_counts(&lake);
        assert_eq!(hourly.values().sum::<i64>() as usize, rows.len());
        assert_eq!(hourly.len(), 30 * 5, "one hourly row per device and hour");
        // Every file committed: the open parts are listed once their hour is sealed.
        common::assert_committed(&format!("file://{}", lake.display()));
        let parts = std::fs::read_dir(lake.join("readings/dt=2025-07-07/hour=02"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".parquet"))
            .count();
        let at_least = if open == "0" { 1 } else { 2 * 6 };
        assert!(
            parts >= at_least,
            "hour 02 has {parts} readings parts, expected {at_least}+"
        );
        lakes.push((rows, rej, hourly));
    }
    assert!(lakes[0] == lakes[1], "the lake does not depend on the worker count");
    assert!(lakes[0] == lakes[2], "the lake does not depend on the writer threads");
    assert!(lakes[0] == lakes[3], "the lake does not depend on open parts");
}

#[test]
fn bad_sources_fail_with_a_clear_error() {
    let out = Command::new(common::bin())
        .args(["run", "--source", "file:/nonexistent/*.ndjson"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no file matches"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(common::bin())
        .args(["run", "--source", "kafka:x", "--lake", "s3://b/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new(common::bin())
        .env("FMSFLOW_ENGINE__WROKERS", "2")
        .args(["run", "--source", "file:x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("wrokers"), "{err}");
}
