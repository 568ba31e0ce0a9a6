//! Lake write throughput per storage backend: sealed hours of generated readings (100 devices,
//! one reading per device every 10 s, so 36,000 rows an hour, with the hour's `hourly` and
//! `quality` tables) written one after another through `LakeWriter` (Parquet encoding, then
//! the storage's atomic put), on one thread. Prints rows/s and MB/s of Parquet stored per
//! backend, beside encoding alone (no storage) as the comparison.
//!
//! Run `scripts/bench-lake`, which starts a private S3 server (s3s-fs) and HDFS for those
//! cases; with `cargo bench --bench lake` alone, S3 is measured when `FMSFLOW_BENCH_S3` names
//! a lake URL (`s3://bucket/prefix`) and `AWS_ENDPOINT_URL` and the keys are set, HDFS when
//! `FMSFLOW_BENCH_HDFS` names one (`hdfs://host:port/path`, built with `--features hdfs`,
//! `CLASSPATH` set), and each is skipped with a message otherwise. `FMSFLOW_BENCH_HOURS` sets the number of hours (default 48).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use fmsflow::gen::{generate, GenSettings};
use fmsflow::lake::{self, s3::S3Options, LakeWriter, Storage, StorageOptions};
use fmsflow_dataflows::dataflow::HourBatch;
use fmsflow_dataflows::rules::Outcome;
use fmsflow_dataflows::{validate, HourStats, RawRecord, Reading, ReadingColumns, RuleConfig, SourcePos};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One sealed batch per hour, as the sealing stage makes them.
fn batches(hours: u32) -> Vec<HourBatch> {
    let (recs, _) = generate(&GenSettings::clean(100, hours));
    let cfg = RuleConfig::default();
    let mut by_hour: BTreeMap<i64, Vec<Reading>> = BTreeMap::new();
    for (i, (ingest, p)) in recs.into_iter().enumerate() {
        let raw = RawRecord {
            payload: p.into_bytes().into(),
            ingest_ms: Some(ingest),
            pos: SourcePos {
                source: 0,
                offset: i as u64,
            },
        };
        let r = validate(raw, &cfg).expect("generated clean readings are valid");
        by_hour.entry(r.hour()).or_default().push(r);
    }
    by_hour
        .into_iter()
        .map(|(hour, mut rows)| {
            rows.sort_by_key(|r| (r.device, r.time_ms, r.pos));
            let mut readings = ReadingColumns::with_capacity(rows.len());
            let mut hourly: BTreeMap<u32, HourStats> = BTreeMap::new();
            for r in &rows {
                readings.push(r);
                hourly.entry(r.device).or_default().add(r);
            }
            let quality = hourly
                .iter()
                .map(|(d, s)| ((*d, Outcome::Valid), s.count as i64))
                .collect();
            HourBatch {
                readings: readings.into(),
                hourly: Some(hourly.into_iter().collect()),
                quality: Some(quality),
                ..HourBatch::seal(hour, 0)
            }
        })
        .collect()
}

/// Sums the sizes of every file under `prefix` of each table.
fn stored_bytes(s: &dyn Storage) -> u64 {
    lake::APPENDED_TABLES
        .iter()
        .chain(lake::REPLACED_TABLES.iter())
        .flat_map(|t| s.list(t).expect("listing the lake"))
        .map(|k| s.get(&k).expect("reading back").map_or(0, |b| b.len() as u64))
        .sum()
}

fn report(what: &str, rows: u64, bytes: u64, secs: f64) {
    println!(
        "{what:<28} {rows} rows in {secs:>6.3} s  {:>10.0} rows/s  {:>7.1} MB/s  ({:.1} MB of Parquet)",
        rows as f64 / secs,
        bytes as f64 / secs / 1e6,
        bytes as f64 / 1e6
    );
}

fn main() {
    let hours: u32 = std::env::var("FMSFLOW_BENCH_HOURS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let template = batches(hours);
    let rows: u64 = template.iter().map(|b| b.readings.len() as u64).sum();
    println!("fmsflow lake write benchmark: {hours} sealed hours of 100 devices, {rows} readings, one thread");

    // The comparison: encoding alone, nothing stored.
    let start = Instant::now();
    let mut bytes = 0u64;
    for b in template.iter().cloned() {
        let rows = b.readings.len();
        bytes += fmsflow::lake::parquet::readings([b.readings.into_columns()], rows, b.hour, 16_384)
            .expect("encoding")
            .len() as u64;
        bytes += fmsflow::lake::parquet::hourly(b.hourly.as_deref().unwrap_or_default(), b.hour, 16_384)
            .expect("encoding")
            .len() as u64;
        bytes += fmsflow::lake::parquet::quality(b.quality.as_deref().unwrap_or_default(), b.hour, 16_384)
            .expect("encoding")
            .len() as u64;
    }
    report("encode only (no storage)", rows, bytes, start.elapsed().as_secs_f64());

    let dir = tempfile::tempdir().expect("temp dir");
    let mut cases: Vec<(String, String, StorageOptions)> = vec![
        (
            "local, fsync".into(),
            format!("file://{}", dir.path().join("fsync").display()),
            StorageOptions {
                fsync: true,
                ..Default::default()
            },
        ),
        (
            "local, no fsync".into(),
            format!("file://{}", dir.path().join("nofsync").display()),
            StorageOptions {
                fsync: false,
                ..Default::default()
            },
        ),
    ];
    match std::env::var("FMSFLOW_BENCH_S3") {
        Ok(url) => cases.push((
            "S3 (s3s-fs on 127.0.0.1)".into(),
            url,
            StorageOptions {
                s3: S3Options {
                    endpoint: std::env::var("AWS_ENDPOINT_URL").ok(),
                    region: Some("us-east-1".into()),
                    path_style: true,
                    ..Default::default()
                },
                ..Default::default()
            },
        )),
        Err(_) => println!("S3: skipped (FMSFLOW_BENCH_S3 is not set; scripts/bench-lake sets it)"),
    }
    match std::env::var("FMSFLOW_BENCH_HDFS") {
        Ok(url) => cases.push(("HDFS (1 DataNode, 127.0.0.1)".into(), url, StorageOptions::default())),
        Err(_) => println!("HDFS: skipped (FMSFLOW_BENCH_HDFS is not set; scripts/bench-lake sets it)"),
    }
    for (what, url, opts) in cases {
        let storage = lake::open(&url, &opts).unwrap_or_else(|e| panic!("opening {url}: {e}"));
        let w = LakeWriter::new(storage.clone(), 16_384);
        let batches = template.clone();
        let start = Instant::now();
        for mut b in batches {
            w.write(&mut b).unwrap_or_else(|e| panic!("writing to {url}: {e}"));
        }
        let secs = start.elapsed().as_secs_f64();
        report(&what, rows, stored_bytes(Arc::as_ref(&storage)), secs);
    }
}
