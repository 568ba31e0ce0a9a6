//! Live latency from produce to aggregate update, at fixed input rates.
//!
//! For each rate (default 1,000 and 10,000 msg/s; `FMSFLOW_BENCH_RATES=1000,10000`), for
//! `FMSFLOW_BENCH_SECS` seconds (default 10, after `FMSFLOW_BENCH_WARMUP` seconds, default 2,
//! that are produced but not measured): a
//! producer writes clean readings of `rate`
//! devices (one reading per device per second, stamped now) to a fresh raw topic while the
//! engine follows it (`engine.epoch` = `FMSFLOW_BENCH_EPOCH_MS`, default 20 ms) and writes
//! the hourly changelog. Afterwards both topics are read back: the k-th reading of a
//! (device, hour) is in the aggregate from the first changelog record of that key with a
//! count of at least k. Its latency is that record's timestamp (set when the engine sent
//! it) minus the reading's produce timestamp. Prints p50, p99 and the maximum.
//!
//! Needs a running Kafka (`FMSFLOW_KAFKA_BOOTSTRAP`); `scripts/bench kafka` (or `live`) starts one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fmsflow::connectors::kafka::{ensure_topics, KafkaProducer, KafkaSettings, KafkaSinks, SourceSpec, StartAt};
use fmsflow::engine::{self, EngineSettings, Source};
use fmsflow::status::Status;
use fmsflow_dataflows::dataflow::FlowConfig;
use fmsflow_dataflows::RuleConfig;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;

mod common;
use common::{cdf_points, percentile, Results};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// (key, timestamp, value) of every record of `topic`, in offset order per partition.
fn read_all(brokers: &str, topic: &str) -> Vec<(String, i64, Vec<u8>)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("latency.reader.{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(30)).unwrap();
    let parts = md.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    for p in 0..parts {
        let (low, high) = c.fetch_watermarks(topic, p, Duration::from_secs(30)).unwrap();
        remaining += high - low;
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let start = Instant::now();
    while remaining > 0 {
        assert!(start.elapsed() < Duration::from_secs(120), "timed out reading {topic}");
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            remaining -= 1;
            out.push((
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                m.timestamp().to_millis().unwrap_or_default(),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
    out
}

fn main() {
    fmsflow::no_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FMSFLOW_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let Ok(brokers) = std::env::var("FMSFLOW_KAFKA_BOOTSTRAP") else {
        eprintln!("FMSFLOW_KAFKA_BOOTSTRAP is not set: run scripts/bench kafka (or live), which starts Kafka");
        std::process::exit(2);
    };
    let rates: Vec<u32> = std::env::var("FMSFLOW_BENCH_RATES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let secs: u64 = std::env::var("FMSFLOW_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let warmup: u64 = std::env::var("FMSFLOW_BENCH_WARMUP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let epoch_ms: u64 = std::env::var("FMSFLOW_BENCH_EPOCH_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    println!(
        "fmsflow live latency benchmark: produce -> aggregate update, {secs} s per rate, engine epoch {epoch_ms} ms, 2 workers, brokers {brokers}"
    );
    let mut results = Results::new("live");
    for rate in rates {
        run(&brokers, rate, warmup, secs, epoch_ms, &mut results);
    }
    results.finish();
}

fn run(brokers: &str, rate: u32, warmup: u64, secs: u64, epoch_ms: u64, results: &mut Results) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let raw = format!("latency.raw.{rate}.{nanos}");
    let settings = KafkaSettings::named_after(brokers, &raw, 4, 1);
    ensure_topics(&settings, &[&raw, &settings.hourly_topic, &settings.rejects_topic]).unwrap();

    // The engine follows the raw topic from its start.
    let stop = Arc::new(AtomicBool::new(false));
    let spec = SourceSpec {
        settings: settings.clone(),
        from: StartAt::Earliest,
        until_end: false,
        stop: stop.clone(),
    };
    let sinks = Arc::new(KafkaSinks {
        producer: KafkaProducer::new(brokers).unwrap(),
        hourly_topic: settings.hourly_topic.clone(),
        rejects_topic: settings.rejects_topic.clone(),
    });
    let status = Arc::new(Status::default());
    let es = EngineSettings {
        flow: FlowConfig {
            rules: RuleConfig {
                fleet_size: rate,
                ..RuleConfig::default()
            },
            ..FlowConfig::default()
        },
        workers: 2,
        batch: 50_000,
        epoch: Duration::from_millis(epoch_ms),
        cluster: None,
        replay_rate: None,
    };
    let (st, engine_sinks) = (status.clone(), sinks.clone());
    let engine =
        std::thread::spawn(move || engine::run(es, Source::Kafka(Box::new(spec)), None, Some(engine_sinks), st, None));

    // `rate` devices, each one reading per second, spread evenly over the second.
    let producer = KafkaProducer::new(brokers).unwrap();
    let start = Instant::now();
    let start_wall = now_ms();
    let mut sent = 0u64;
    let show_timeline = std::env::var("FMSFLOW_BENCH_TIMELINE").is_ok_and(|v| v == "1");
    // The first `warmup` seconds are produced but not measured.
    let total = rate as u64 * (secs + warmup);
    while sent < total {
        // Sends what is due, then sleeps a millisecond: sleeping before every record would
        // keep this thread busy on timers (a whole core at 10,000 msg/s), taking the core
        // the engine and the broker share.
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if due > start.elapsed() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let device = (sent % rate as u64) as u32 + 1;
        let second = sent / rate as u64;
        let now = now_ms();
        // Event time: the start second plus this reading's second, so (device, time) is unique.
        let time = (start_wall / 1000 + second as i64) * 1000;
        let payload = fmsflow::fms::clean_payload(42, device, time);
        producer
            .send(
                &raw,
                device.to_string().as_bytes(),
                payload.as_bytes(),
                Some(now),
                None,
                None,
            )
            .unwrap();
        sent += 1;
        if show_timeline && sent.is_multiple_of(rate as u64) {
            println!(
                "  produced {sent:>7} at {:>6} ms; the engine has received {:>7} and accepted {:>7}",
                start.elapsed().as_millis(),
                status.received.load(Relaxed),
                status.valid.load(Relaxed)
            );
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    let produce_secs = start.elapsed().as_secs_f64();

    // Wait until the engine has taken every reading in, then let it finish and stop.
    let wait_start = Instant::now();
    while status.valid.load(Relaxed) < total {
        if engine.is_finished() {
            match engine.join() {
                Ok(Err(e)) => panic!("the engine stopped early: {e}"),
                _ => panic!("the engine stopped early"),
            }
        }
        assert!(
            wait_start.elapsed() < Duration::from_secs(120),
            "the engine accepted {} of {total} readings",
            status.valid.load(Relaxed)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Relaxed);
    engine.join().unwrap().unwrap();
    sinks.producer.flush(Duration::from_secs(60)).unwrap();

    // The k-th reading of each (device, hour), in partition order, and its produce time.
    let mut produced: BTreeMap<String, Vec<(i64, bool)>> = BTreeMap::new();
    let measured_from = (start_wall / 1000 + warmup as i64) * 1000;
    for (key, ts, value) in read_all(brokers, &raw) {
        let v: serde_json::Value = serde_json::from_slice(&value).unwrap();
        let t = fmsflow_dataflows::time::parse_rfc3339(v["time"].as_str().unwrap()).unwrap();
        let hour = fmsflow_dataflows::time::format_rfc3339(t / 3_600_000 * 3_600_000);
        produced
            .entry(format!("{key}/{hour}"))
            .or_default()
            .push((ts, t >= measured_from));
    }
    // Changelog records per key: (count, the time the engine sent it).
    let mut updates: BTreeMap<String, Vec<(u64, i64)>> = BTreeMap::new();
    for (key, ts, value) in read_all(brokers, &settings.hourly_topic) {
        let v: serde_json::Value = serde_json::from_slice(&value).unwrap();
        updates.entry(key).or_default().push((v["count"].as_u64().unwrap(), ts));
    }
    let mut lat = Vec::with_capacity(total as usize);
    let mut timeline: Vec<(i64, i64)> = Vec::with_capacity(total as usize);
    for (key, times) in &produced {
        let ups = updates.get(key).map(Vec::as_slice).unwrap_or_default();
        for (k, &(produced_at, measured)) in times.iter().enumerate() {
            if !measured {
                continue;
            }
            let seen = ups
                .iter()
                .find(|(count, _)| *count as usize > k)
                .unwrap_or_else(|| panic!("reading {k} of {key} never reached the changelog"));
            lat.push(seen.1 - produced_at);
            timeline.push((produced_at, seen.1 - produced_at));
        }
    }
    lat.sort_unstable();
    let achieved = total as f64 / produce_secs;
    let (p50, p90, p99, max) = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
    );
    println!(
        "rate {rate:>6} msg/s (achieved {achieved:>8.0}): {} readings measured, latency p50 {p50} ms, p90 {p90} ms, p99 {p99} ms, max {max} ms",
        lat.len(),
    );
    results.push(json!({
        "rate": rate,
        "achieved_msgs_per_s": achieved,
        "measured": lat.len(),
        "epoch_ms": epoch_ms,
        "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
        "cdf_ms": cdf_points(&lat),
    }));
    // FMSFLOW_BENCH_TIMELINE=1: the latencies second by second of produce time, to tell a
    // steady backlog from stalls.
    if show_timeline {
        timeline.sort_unstable();
        let first = timeline.first().map_or(0, |t| t.0);
        let mut by_second: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for (at, l) in timeline {
            by_second.entry((at - first) / 1000).or_default().push(l);
        }
        for (sec, mut ls) in by_second {
            ls.sort_unstable();
            println!(
                "  second {sec:>3}: {:>6} readings, p50 {:>5} ms, p99 {:>5} ms, max {:>5} ms",
                ls.len(),
                percentile(&ls, 0.5),
                percentile(&ls, 0.99),
                ls.last().copied().unwrap_or_default()
            );
        }
    }
}
