//! Kafka, for real: the collector producing the simulator's payloads, the engine reading the
//! raw topic and writing the lake, the changelog and the dead letters; replays from offsets
//! and from a time; the same range replayed twice giving byte-identical sealed files.
//!
//! Needs a running Kafka: `scripts/test` starts a 2-broker cluster with `scripts/kafka` and
//! sets `FMSFLOW_KAFKA_BOOTSTRAP`. Each test uses topics of its own.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

fn bootstrap() -> String {
    std::env::var("FMSFLOW_KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
        panic!(
            "FMSFLOW_KAFKA_BOOTSTRAP is not set: these tests need a running Kafka. Run them with \
             `bash scripts/test` (it starts one), or start one with `scripts/kafka start --brokers 2` \
             and set FMSFLOW_KAFKA_BOOTSTRAP to the bootstrap line it prints"
        )
    })
}

/// A topic name no other test or run uses.
fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test.{name}.{}.{nanos}", std::process::id())
}

/// Environment that points `fmsflow` at the test cluster and these topics.
fn kafka_env<'a>(cmd: &'a mut Command, raw: &str, partitions: i32) -> &'a mut Command {
    cmd.env("FMSFLOW_KAFKA__BROKERS", bootstrap())
        .env("FMSFLOW_KAFKA__RAW_TOPIC", raw)
        .env("FMSFLOW_KAFKA__HOURLY_TOPIC", format!("{raw}.hourly"))
        .env("FMSFLOW_KAFKA__REJECTS_TOPIC", format!("{raw}.rejects"))
        .env("FMSFLOW_KAFKA__PARTITIONS", partitions.to_string())
        .env("FMSFLOW_KAFKA__REPLICATION", "2")
        .env("FMSFLOW_KAFKA__GROUP", format!("{raw}.group"))
        .env("FMSFLOW_LOG", "warn")
}

/// One consumed record.
#[derive(Debug, Clone)]
struct Rec {
    key: String,
    value: Vec<u8>,
    headers: BTreeMap<String, String>,
    timestamp: Option<i64>,
}

/// Every record of `topic`, read from the beginning to the end each partition has now.
fn consume_all(topic: &str) -> Vec<Rec> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(30)).unwrap();
    let parts = md.topics()[0].partitions().len() as i32;
    assert!(parts > 0, "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in 0..parts {
        let (_, high) = c.fetch_watermarks(topic, p, Duration::from_secs(30)).unwrap();
        ends.insert(p, high);
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut next: BTreeMap<i32, i64> = (0..parts).map(|p| (p, 0)).collect();
    let start = Instant::now();
    while next.iter().any(|(p, n)| *n < ends[p]) {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out reading {topic}");
        match c.poll(Duration::from_millis(200)) {
            None | Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            Some(Ok(m)) => {
                next.insert(m.partition(), m.offset() + 1);
                if m.offset() >= ends[&m.partition()] {
                    continue;
                }
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Rec {
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                    timestamp: m.timestamp().to_millis(),
                });
            }
        }
    }
    out
}

/// GET `path` from a local HTTP server, the body as a string.
fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Kills a child process when dropped (a failing test leaves nothing running).
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `fmsflow run --source kafka --from <from> --until end` into `lake`; its stdout.
fn replay(raw: &str, partitions: i32, from: &str, lake: &Path, workers: usize) -> String {
    let out = kafka_env(&mut Command::new(common::bin()), raw, partitions)
        .args(["run", "--source", "kafka", "--until", "end", "--from", from])
        .args(["--workers", &workers.to_string()])
        .arg("--lake")
        .arg(format!("file://{}", lake.display()))
        .output()
        .expect("running fmsflow run");
    assert!(
        out.status.success(),
        "fmsflow run --from {from} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir` with its bytes, by path relative to `dir`.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn simulator_to_collector_to_kafka_to_engine_counts_every_record() {
    common::python();
    let raw = unique("e2e");
    // 3 partitions read by 2 workers: one worker owns two.
    let partitions = 3;

    let mut sim = Command::new(common::bin())
        .args([
            "sim",
            "--devices",
            "100",
            "--port",
            "0",
            "--seed",
            "7",
            "--dirty-rate",
            "0.05",
        ])
        .env("FMSFLOW_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting fmsflow sim");
    let mut line = String::new();
    BufReader::new(sim.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let sim = Killed(sim);
    let port: u16 = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in the simulator's first line: {line:?}"));

    let out = kafka_env(&mut Command::new(common::bin()), &raw, partitions)
        .args(["collect", "--devices", "100", "--interval", "1s", "--duration", "6s"])
        .arg("--api")
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .expect("running fmsflow collect");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "collect failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_str(&http_get(port, "/stats")).unwrap();
    drop(sim);
    let served = stats["served"].as_u64().unwrap();
    assert!(served >= 400, "6 s of 100 devices every second: {stats}");
    assert!(
        stdout.contains(&format!("{served} produced, {served} delivered, 0 failed")),
        "every served payload produced and delivered once: {stdout} vs {stats}"
    );
    let raw_records = consume_all(&raw);
    assert_eq!(raw_records.len() as u64, served);
    for r in &raw_records {
        assert!(r.headers.contains_key("poll_ms"), "{r:?}");
        assert_eq!(r.headers["poll_ms"].parse::<i64>().ok(), r.timestamp, "{r:?}");
    }

    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    replay(&raw, partitions, "earliest", &lake, 2);

    let dirty: BTreeMap<String, u64> = stats["dirty"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .filter(|(_, n)| *n > 0)
        .collect();
    let bad: u64 = dirty.values().sum();
    assert!(bad > 0, "the simulator served dirty records: {stats}");

    // Every bad record is in the dead-letter topic, with its rule, its original bytes and
    // where it came from.
    let dead = consume_all(&format!("{raw}.rejects"));
    let mut by_rule: BTreeMap<String, u64> = BTreeMap::new();
    for d in &dead {
        *by_rule.entry(d.headers["rule"].clone()).or_default() += 1;
        assert!(!d.headers["reason"].is_empty());
        let (p, o): (i32, i64) = (
            d.headers["source"].parse().unwrap(),
            d.headers["offset"].parse().unwrap(),
        );
        assert!(p >= 0 && p < partitions && o >= 0, "{d:?}");
    }
    assert_eq!(by_rule, dirty, "dead letters by rule vs the simulator's truth");
    eprintln!("served {served}, dirty {dirty:?}, dead letters {}", dead.len());
    let raw_values: std::collections::BTreeSet<&[u8]> = raw_records.iter().map(|r| r.value.as_slice()).collect();
    assert!(
        dead.iter().all(|d| raw_values.contains(d.value.as_slice())),
        "dead letters keep the original bytes"
    );

    // Every valid reading is counted in its hour.
    let v = common::read_lake(&lake);
    assert_eq!(v["readings"].as_u64().unwrap(), served - bad, "{v}");
    assert_eq!(v["quality"]["valid"].as_u64().unwrap(), served - bad, "{v}");
    let hourly_total: u64 = v["hourly_by_hour"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["count"].as_u64().unwrap())
        .sum();
    assert_eq!(hourly_total, served - bad);

    // The changelog's latest value per key is the current table.
    let mut latest: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for r in consume_all(&format!("{raw}.hourly")) {
        latest.insert(r.key, serde_json::from_slice(&r.value).unwrap());
    }
    let total: u64 = latest.values().map(|v| v["count"].as_u64().unwrap()).sum();
    assert_eq!(total, served - bad, "changelog counts add up to the valid readings");
    for (k, v) in &latest {
        assert_eq!(k, &format!("{}/{}", v["device"], v["hour"].as_str().unwrap()));
    }
}

/// Produces a generated replay file to a topic: key the device id, timestamp the ingest time.
fn produce_generated(topic: &str, partitions: i32, hours: u32) -> Vec<(i64, String)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gen.ndjson");
    let st = Command::new(common::bin())
        .args([
            "gen",
            "--devices",
            "20",
            "--hours",
            &hours.to_string(),
            "--late-rate",
            "0.02",
            "--out",
        ])
        .arg(&path)
        .env("FMSFLOW_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success());
    let records: Vec<(i64, String)> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            let (ts, p) = l.split_once(' ').unwrap();
            (ts.parse().unwrap(), p.to_string())
        })
        .collect();
    // The engine creates only its output topics; make the raw one here.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let created = rt
        .block_on(admin.create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(2))],
            &AdminOptions::new(),
        ))
        .unwrap();
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for (ts, payload) in &records {
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        let key = v["DeviceId"].to_string();
        let mut rec = BaseRecord::to(topic).key(&key).payload(payload).timestamp(*ts);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    p.poll(Duration::from_millis(10));
                }
            }
        }
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(60)).unwrap();
    records
}

#[test]
fn replays_from_offsets_and_times_and_twice_identically() {
    common::python();
    let raw = unique("replay");
    // One partition read by 2 workers: one worker has none and must still advance.
    let partitions = 1;
    let records = produce_generated(&raw, partitions, 2);
    let n = records.len() as u64;
    let dir = tempfile::tempdir().unwrap();

    // The whole topic, twice: byte-identical sealed files.
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    replay(&raw, partitions, "earliest", &a, 2);
    replay(&raw, partitions, "earliest", &b, 2);
    let (fa, fb) = (files(&a), files(&b));
    assert!(!fa.is_empty());
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (k, bytes) in &fa {
        assert!(bytes == &fb[k], "{k} differs between two replays of the same range");
    }
    let v = common::read_lake(&a);
    assert_eq!(v["readings"].as_u64().unwrap(), n, "{v}");
    eprintln!("{n} records replayed twice: {} identical files", fa.len());

    // From an offset: exactly the records from there on.
    let skip = 1000;
    let c = dir.path().join("c");
    replay(&raw, partitions, &format!("offsets:0={skip}"), &c, 2);
    let v = common::read_lake(&c);
    assert_eq!(v["readings"].as_u64().unwrap(), n - skip, "{v}");

    // From a time: exactly the records stamped at or after it.
    let cut = records[records.len() / 3].0 / 1000 * 1000;
    let expected = records.iter().filter(|(ts, _)| *ts >= cut).count() as u64;
    let d = dir.path().join("d");
    let cut_text = fmsflow_dataflows::time::format_rfc3339(cut);
    replay(&raw, partitions, &format!("timestamp:{cut_text}"), &d, 2);
    let v = common::read_lake(&d);
    assert_eq!(v["readings"].as_u64().unwrap(), expected, "{v}");
}
