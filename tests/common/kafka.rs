//! Helpers of the tests that need Kafka: the cluster `scripts/test` started, topics of each
//! test's own, reading a topic whole, and the simulator as a child process.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fmsflow::connectors::kafka::{ensure_topics_with, KafkaProducer, KafkaSettings};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// The bootstrap servers of the test cluster.
pub fn bootstrap() -> String {
    std::env::var("FMSFLOW_KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
        panic!(
            "FMSFLOW_KAFKA_BOOTSTRAP is not set: these tests need a running Kafka. Run them with \
             `bash scripts/test` (it starts one), or start one with `scripts/kafka start --brokers 2` \
             and set FMSFLOW_KAFKA_BOOTSTRAP to the bootstrap line it prints"
        )
    })
}

/// A topic name no other test or run uses.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test.{name}.{}.{nanos}", std::process::id())
}

/// Environment that points `fmsflow` at the test cluster and these topics.
pub fn kafka_env<'a>(cmd: &'a mut Command, raw: &str, partitions: i32) -> &'a mut Command {
    cmd.env("FMSFLOW_KAFKA__BROKERS", bootstrap())
        .env("FMSFLOW_KAFKA__RAW_TOPIC", raw)
        .env("FMSFLOW_KAFKA__HOURLY_TOPIC", format!("{raw}.hourly"))
        .env("FMSFLOW_KAFKA__REJECTS_TOPIC", format!("{raw}.rejects"))
        .env("FMSFLOW_KAFKA__PARTITIONS", partitions.to_string())
        .env("FMSFLOW_KAFKA__REPLICATION", "2")
        .env("FMSFLOW_KAFKA__GROUP", format!("{raw}.group"))
        .env("FMSFLOW_LOG", "warn")
}

/// `fmsflow run` following the raw topic from its start on 2 workers into the lake `lake`
/// (a URL), pointed at the test cluster by [`kafka_env`].
pub fn follow_command(raw: &str, partitions: i32, lake: &str) -> Command {
    let mut cmd = Command::new(super::bin());
    kafka_env(&mut cmd, raw, partitions).args([
        "run",
        "--source",
        "kafka",
        "--from",
        "earliest",
        "--workers",
        "2",
        "--lake",
        lake,
    ]);
    cmd
}

/// `fmsflow run --source kafka --from <from> --until end --workers <workers>` into the lake
/// at a URL (an `s3://` one on the test S3 server), pointed at the test cluster by
/// [`kafka_env`].
pub fn replay_command(raw: &str, partitions: i32, from: &str, lake: &str, workers: usize) -> Command {
    let mut cmd = Command::new(super::bin());
    kafka_env(&mut cmd, raw, partitions)
        .args(["run", "--source", "kafka", "--until", "end", "--from", from])
        .args(["--workers", &workers.to_string(), "--lake", lake]);
    if lake.starts_with("s3://") {
        cmd.env("FMSFLOW_LAKE__S3_ENDPOINT", super::s3::endpoint())
            .env("FMSFLOW_LAKE__S3_PATH_STYLE", "true");
    }
    cmd
}

/// The offsets `group` has committed for each of `topic`'s first `partitions` partitions.
pub fn committed(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group)
        .create()
        .expect("a consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(30))
        .expect("the group's committed offsets");
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect()
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Rec {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub timestamp: Option<i64>,
}

/// Every record of `topic`, read from the beginning to the end each partition has now.
pub fn consume_all(topic: &str) -> Vec<Rec> {
    consume_all_with(topic, ClientConfig::new().set("bootstrap.servers", bootstrap()))
}

/// [`consume_all`] by a consumer of these settings (another listener, TLS or SASL).
pub fn consume_all_with(topic: &str, config: &ClientConfig) -> Vec<Rec> {
    let c: BaseConsumer = config
        .clone()
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
                    partition: m.partition(),
                    offset: m.offset(),
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
pub fn http_get(port: u16, path: &str) -> String {
    try_http_get(port, path).unwrap_or_else(|e| panic!("GET 127.0.0.1:{port}{path}: {e}"))
}

/// [`http_get`], an error when the server does not answer (yet).
pub fn try_http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Kills a child process when dropped (a failing test leaves nothing running).
pub struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Creates `topic` with `partitions` partitions, replicated to both brokers.
pub fn create_topic(topic: &str, partitions: i32) {
    ensure_topics_with(
        &KafkaSettings::named_after(&bootstrap(), topic, partitions, 2),
        &[topic],
        // Generated records carry 2025 timestamps: time retention would delete them.
        &[("retention.ms", "-1")],
    )
    .unwrap();
}

/// Starts `fmsflow sim` on a free port with these flags; the child and its port.
pub fn start_sim(args: &[&str]) -> (Killed, u16) {
    let mut sim = Command::new(super::bin())
        .args(["sim", "--port", "0"])
        .args(args)
        .env("FMSFLOW_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting fmsflow sim");
    let mut line = String::new();
    BufReader::new(sim.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in the simulator's first line: {line:?}"));
    (Killed(sim), port)
}

/// The simulator's truth: responses served, and the dirty ones by rule (rules with none left out).
pub fn sim_truth(port: u16) -> (u64, BTreeMap<String, u64>) {
    let stats: serde_json::Value = serde_json::from_str(&http_get(port, "/stats")).unwrap();
    let dirty = stats["dirty"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .filter(|(_, n)| *n > 0)
        .collect();
    (stats["served"].as_u64().unwrap(), dirty)
}

/// Dead letters by rule, checking each has a reason and a source position.
pub fn dead_letters_by_rule(topic: &str) -> BTreeMap<String, u64> {
    let mut by_rule = BTreeMap::new();
    for d in consume_all(topic) {
        assert!(!d.headers["reason"].is_empty(), "{d:?}");
        assert!(d.headers["source"].parse::<i32>().is_ok() && d.headers["offset"].parse::<i64>().is_ok());
        *by_rule.entry(d.headers["rule"].clone()).or_default() += 1;
    }
    by_rule
}

/// Produces a generated replay file to a topic: key the device id, timestamp the ingest time.
pub fn produce_generated(topic: &str, partitions: i32, hours: u32, dirty_rate: &str) -> Vec<(i64, String)> {
    let records = generated(hours, dirty_rate);
    // The engine creates only its output topics; make the raw one here.
    create_topic(topic, partitions);
    produce(topic, &records);
    records
}

/// (ingest time, payload) of a generated replay file of 20 devices, with late records.
pub fn generated(hours: u32, dirty_rate: &str) -> Vec<(i64, String)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gen.ndjson");
    let st = Command::new(super::bin())
        .args([
            "gen",
            "--devices",
            "20",
            "--hours",
            &hours.to_string(),
            "--late-rate",
            "0.02",
            "--dirty-rate",
            dirty_rate,
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
    records
}

/// Produces records to `topic` as the collector would: key the device id, timestamp the
/// ingest time.
pub fn produce(topic: &str, records: &[(i64, String)]) {
    produce_through(&KafkaProducer::new(&bootstrap()).unwrap(), topic, records)
}

/// [`produce`] through this producer (another listener, TLS or SASL settings).
pub fn produce_through(p: &KafkaProducer, topic: &str, records: &[(i64, String)]) {
    for (ts, payload) in records {
        // Keyed by device as the collector keys them; a payload too broken to name one
        // goes wherever the producer puts it.
        let key = serde_json::from_str::<serde_json::Value>(payload)
            .map(|v| v["DeviceId"].to_string())
            .unwrap_or_default();
        p.send(topic, key.as_bytes(), payload.as_bytes(), Some(*ts), None, None)
            .unwrap();
    }
    p.flush(Duration::from_secs(60)).unwrap();
}
