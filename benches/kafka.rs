//! Kafka → engine ingest, beside Kafka's own consumer on the same topic in the same run.
//!
//! Produces generated readings (100 devices, `FMSFLOW_BENCH_HOURS` hours, default 28 =
//! 1,008,000 records; or the first `FMSFLOW_BENCH_READINGS` of them) to a fresh topic of `FMSFLOW_BENCH_PARTITIONS` partitions (default 4),
//! then reads the whole topic:
//! - with `org.apache.kafka.tools.ConsumerPerformance` (Kafka's consumer benchmark);
//! - with the engine (`--source kafka --until end`): parse, validate, aggregate, at 1 and 2
//!   workers, and at 2 workers with the Parquet lake as well.
//!
//! Needs a running Kafka (`FMSFLOW_KAFKA_BOOTSTRAP`); `scripts/bench kafka` (or `live`) starts one.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fmsflow::connectors::kafka::{
    ensure_topics_with, KafkaProducer, KafkaSettings, PartitionReader, SourceSpec, StartAt,
};
use fmsflow::engine::{self, EngineSettings, Source};
use fmsflow::gen::{generate_at_most, GenSettings};
use fmsflow::lake::{self, LakeWriter};
use fmsflow::status::Status;
use fmsflow_dataflows::dataflow::FlowConfig;
use serde_json::json;

mod common;
use common::Results;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_num(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    fmsflow::no_huge_pages();
    let Ok(brokers) = std::env::var("FMSFLOW_KAFKA_BOOTSTRAP") else {
        eprintln!("FMSFLOW_KAFKA_BOOTSTRAP is not set: run scripts/bench kafka (or live), which starts Kafka");
        std::process::exit(2);
    };
    let readings = std::env::var("FMSFLOW_BENCH_READINGS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let hours = match readings {
        Some(n) => n.div_ceil(100 * 360) as u32,
        None => env_num("FMSFLOW_BENCH_HOURS", 28),
    };
    let partitions = env_num("FMSFLOW_BENCH_PARTITIONS", 4) as i32;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let topic = format!("bench.raw.{nanos}");

    let (records, _) = generate_at_most(&GenSettings::clean(100, hours), readings.unwrap_or(u64::MAX));
    let n = records.len();
    println!(
        "fmsflow Kafka ingest benchmark: {n} generated readings (100 devices x {hours} h), topic of {partitions} partitions, brokers {brokers}, {} cores",
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1)
    );

    // The records carry 2025 timestamps: time retention would delete them mid-run.
    ensure_topics_with(
        &KafkaSettings::named_after(&brokers, &topic, partitions, 1),
        &[&topic],
        &[("retention.ms", "-1")],
    )
    .unwrap();

    // Produce: key the device id, timestamp the ingest time, as `fmsflow collect` does and
    // with its producer.
    let producer = KafkaProducer::new(&brokers).unwrap();
    let start = Instant::now();
    let mut bytes = 0usize;
    for (ts, payload) in &records {
        let device = payload
            .split("\"DeviceId\": ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .unwrap_or("0");
        bytes += payload.len();
        producer
            .send(&topic, device.as_bytes(), payload.as_bytes(), Some(*ts), None, None)
            .unwrap();
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    let t = start.elapsed().as_secs_f64();
    println!(
        "produce (fmsflow's producer: idempotent, lz4)      {n} msgs in {t:>6.2} s  {:>10.0} msgs/s  ({:.0} MB of payload)",
        n as f64 / t,
        bytes as f64 / 1e6
    );
    let mut results = Results::new("kafka");
    // The topic stays: scripts/bench reads it again with Spark's Kafka source.
    results.push(
        json!({"case": "produce", "topic": topic, "partitions": partitions, "records": n,
        "seconds": t, "msgs_per_s": n as f64 / t}),
    );

    for round in 1..=2 {
        println!("-- round {round}");
        let mut row = |case: &str, workers: usize, t: f64| {
            results.push(json!({"case": case, "round": round, "workers": workers, "records": n,
                "seconds": t, "msgs_per_s": n as f64 / t}));
        };
        let (t, fetching) = consumer_performance(&brokers, &topic, n, round);
        row("kafka_consumer_perf", 1, t);
        row("kafka_consumer_perf_fetching", 1, fetching);
        row("fmsflow_reader_only", 1, reader_only(&brokers, &topic, n, round));
        for (workers, with_lake) in [(1, false), (2, false), (2, true)] {
            let case = if with_lake {
                "fmsflow_engine_parquet"
            } else {
                "fmsflow_engine"
            };
            row(
                case,
                workers,
                engine_ingest(&brokers, &topic, n, workers, with_lake, round),
            );
        }
    }
    results.finish();
}

/// Kafka's own consumer benchmark over the whole topic: its seconds overall, and fetching
/// only (without the group join).
fn consumer_performance(brokers: &str, topic: &str, n: usize, round: u32) -> (f64, f64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka");
    let out = Command::new("bash")
        .arg(script)
        .args([
            "tool",
            "org.apache.kafka.tools.ConsumerPerformance",
            "--bootstrap-server",
            brokers,
        ])
        .args(["--topic", topic, "--num-records", &n.to_string(), "--timeout", "120000"])
        .args(["--group", &format!("bench.cp.{round}.{topic}")])
        .output()
        .expect("running ConsumerPerformance");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ConsumerPerformance failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec,
    // rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec
    let line = text
        .lines()
        .rfind(|l| l.split(',').count() >= 10)
        .unwrap_or_else(|| panic!("no result line from ConsumerPerformance:\n{text}"));
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    println!(
        "ConsumerPerformance (Kafka's consumer, 1 thread)    {} msgs  {:>10} msgs/s overall, {:>10} msgs/s fetching (after a {} ms group join)",
        f[4], f[5], f[9], f[6]
    );
    let secs = |rate: &str| n as f64 / rate.parse::<f64>().expect("a rate from ConsumerPerformance");
    (secs(f[5]), secs(f[9]))
}

/// fmsflow's partition reader alone, one thread, every partition, records dropped: the
/// connector's own ceiling. Returns its seconds.
fn reader_only(brokers: &str, topic: &str, n: usize, round: u32) -> f64 {
    let spec = spec(brokers, topic, &format!("bench.reader.{round}.{topic}"));
    let start = Instant::now();
    let mut reader = PartitionReader::open(&spec, 0, 1).unwrap();
    let mut buf = Vec::new();
    let (mut total, mut epoch) = (0, 0);
    while reader
        .read_epoch(epoch, 50_000, Duration::from_secs(60), &mut buf)
        .unwrap()
    {
        total += buf.len();
        buf.clear();
        epoch += 1;
    }
    total += buf.len();
    let t = start.elapsed().as_secs_f64();
    assert_eq!(total, n);
    println!(
        "fmsflow partition reader alone (1 thread)          {n} msgs in {t:>6.2} s  {:>10.0} msgs/s",
        n as f64 / t
    );
    t
}

fn spec(brokers: &str, topic: &str, group: &str) -> SourceSpec {
    SourceSpec {
        settings: KafkaSettings {
            group: group.to_string(),
            ..KafkaSettings::named_after(brokers, topic, 1, 1)
        },
        from: StartAt::Earliest,
        until_end: true,
        stop: Arc::new(AtomicBool::new(false)),
    }
}

/// The engine reading the whole topic (`--from earliest --until end`). Returns its seconds.
fn engine_ingest(brokers: &str, topic: &str, n: usize, workers: usize, with_lake: bool, round: u32) -> f64 {
    let spec = spec(
        brokers,
        topic,
        &format!("bench.engine.{round}.{workers}.{with_lake}.{topic}"),
    );
    let dir = tempfile::tempdir().unwrap();
    let writer = with_lake.then(|| {
        let storage = lake::open(
            &format!("file://{}", dir.path().display()),
            &lake::StorageOptions::default(),
        )
        .unwrap();
        Arc::new(LakeWriter::new(storage, 16_384))
    });
    let status = Arc::new(Status::default());
    let es = EngineSettings {
        flow: FlowConfig::default(),
        workers,
        batch: 50_000,
        epoch: Duration::from_millis(200),
        cluster: None,
        replay_rate: None,
    };
    let start = Instant::now();
    engine::run(es, Source::Kafka(Box::new(spec)), writer, None, status.clone(), None).expect("engine run");
    let t = start.elapsed().as_secs_f64();
    assert_eq!(status.valid.load(Relaxed) as usize, n, "every record accepted");
    let what = if with_lake {
        "engine: parse+validate+aggregate+Parquet"
    } else {
        "engine: parse+validate+aggregate"
    };
    println!(
        "{what:<42} workers={workers}  {n} msgs in {t:>6.2} s  {:>10.0} msgs/s",
        n as f64 / t
    );
    t
}
