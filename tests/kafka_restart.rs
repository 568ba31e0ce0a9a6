//! The live path through Kafka failures: the simulator, `fmsflow collect` and `fmsflow run`
//! following the raw topic all run while broker 2 of the test cluster is stopped and started
//! again, and while the whole cluster (both brokers and the controller) is down for
//! `FMSFLOW_FAULT_KAFKA_DOWN_S` seconds (default 120) and started again with its data. Nothing
//! may be lost or doubled: the raw topic holds exactly what the simulator served, and the lake
//! and the dead letters match the simulator's truth, as without a fault.
//!
//! In a test binary of its own, so the restarts do not disturb other tests, and its tests
//! run one at a time. Needs the cluster `scripts/test` starts (`FMSFLOW_KAFKA_BOOTSTRAP`,
//! `FMSFLOW_KAFKA_DIR`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::kafka::{bootstrap, create_topic, dead_letters_by_rule, kafka_env, sim_truth, start_sim, unique, Killed};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// `scripts/kafka <args> --dir $FMSFLOW_KAFKA_DIR`.
fn kafka_script(args: &[&str]) {
    let dir = std::env::var("FMSFLOW_KAFKA_DIR").unwrap_or_else(|_| {
        panic!("FMSFLOW_KAFKA_DIR is not set: run the tests with `bash scripts/test`, which starts the cluster this test restarts a broker of")
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka");
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .args(["--dir", &dir])
        .output()
        .expect("running scripts/kafka");
    assert!(
        out.status.success(),
        "scripts/kafka {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The tests stop nodes of the one cluster: one test at a time (cargo runs a binary's tests
/// in parallel threads).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    // A test that failed still released the cluster (see `Restart`).
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts these nodes again when dropped before [`Restart::done`]: a test failing while
/// nodes are down leaves the cluster running for the tests after it.
struct Restart(&'static [&'static str]);

impl Restart {
    fn done(self) {
        std::mem::forget(self);
    }
}

impl Drop for Restart {
    fn drop(&mut self) {
        let dir = std::env::var("FMSFLOW_KAFKA_DIR").unwrap_or_default();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka");
        for n in self.0 {
            let _ = Command::new("bash")
                .arg(&script)
                .args(["start-node", n, "--dir", &dir])
                .output();
        }
    }
}

fn consumer(group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Each partition's end offset, or `None` while the cluster cannot say (a leader is moving).
fn ends(c: &BaseConsumer, topic: &str, partitions: i32) -> Option<Vec<i64>> {
    // Fresh metadata first: after a leader moves, the cached one still names the old leader.
    c.fetch_metadata(Some(topic), Duration::from_secs(5)).ok()?;
    (0..partitions)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(5))
                .ok()
                .map(|(_, h)| h)
        })
        .collect()
}

/// The group's committed offset of each partition (-1 where none).
fn committed(c: &BaseConsumer, topic: &str, partitions: i32) -> Option<Vec<i64>> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
    Some(
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect(),
    )
}

fn wait(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_file(dir: &Path, name: &str) -> (PathBuf, Stdio, Stdio) {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    (path, Stdio::from(f.try_clone().unwrap()), Stdio::from(f))
}

/// Sends SIGINT (Ctrl-C) to a child.
fn interrupt(child: &Child) {
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// After the collector has stopped: checks that the raw topic holds every record the simulator
/// served (`served`, `dirty`), waits for the engine to commit every offset, stops it, and
/// checks that the dead letters and the lake match the simulator's truth. Returns the
/// records the topic holds twice (see below).
/// Waits (at most 120 s) for the collector to end; it must succeed and have delivered all the
/// simulator served. The simulator's truth (served, dirty by rule); the simulator is stopped.
fn collector_delivered_all(
    what: &str,
    collector: &mut Killed,
    log: &Path,
    sim: Killed,
    port: u16,
) -> (u64, std::collections::BTreeMap<String, u64>) {
    wait(what, Duration::from_secs(120), || {
        collector.0.try_wait().unwrap().is_some()
    });
    let out = std::fs::read_to_string(log).unwrap();
    assert!(collector.0.wait().unwrap().success(), "collect failed:\n{out}");
    let truth = sim_truth(port);
    drop(sim);
    let served = truth.0;
    assert!(
        out.contains(&format!("{served} produced, {served} delivered, 0 failed")),
        "{out}"
    );
    truth
}

fn check_the_outcome(
    raw: &str,
    partitions: i32,
    (served, dirty): (u64, std::collections::BTreeMap<String, u64>),
    engine: &mut Killed,
    engine_log: &Path,
    lake: &Path,
) -> u64 {
    let c = consumer(&unique("checker"));
    // Nothing lost. A few records may be in twice: when a broker goes away with records in
    // flight, librdkafka's idempotent producer can bump its epoch and send again what may
    // already be stored (it reports them delivered once). The engine's duplicate rule
    // catches those copies.
    let end_offsets = ends(&c, raw, partitions).expect("end offsets");
    let stored = end_offsets.iter().sum::<i64>() as u64;
    assert!(stored >= served, "{stored} records in the topic, {served} served");
    let copies = stored - served;

    // The engine has covered every record once its group's committed offsets reach the ends.
    let group = consumer(&format!("{raw}.group"));
    wait("the engine to commit every offset", Duration::from_secs(120), || {
        committed(&group, raw, partitions).is_some_and(|o| o == end_offsets)
    });
    interrupt(&engine.0);
    wait("the engine to stop after Ctrl-C", Duration::from_secs(120), || {
        engine.0.try_wait().unwrap().is_some()
    });
    let engine_out = std::fs::read_to_string(engine_log).unwrap();
    assert!(engine.0.wait().unwrap().success(), "engine failed:\n{engine_out}");

    let bad: u64 = dirty.values().sum();
    let letters = dead_letters_by_rule(&format!("{raw}.rejects"));
    if copies == 0 {
        assert_eq!(letters, dirty, "dead letters by rule vs the simulator's truth");
    } else {
        // A copy is a duplicate, or (a copy of a dirty record) rejected by that record's rule.
        assert_eq!(
            letters.values().sum::<u64>(),
            bad + copies,
            "{letters:?} vs {dirty:?} + {copies} copies"
        );
        for (rule, n) in &dirty {
            assert!(
                letters.get(rule).copied().unwrap_or(0) >= *n,
                "{letters:?} vs {dirty:?}"
            );
        }
    }
    let v = common::read_lake(lake);
    assert_eq!(v["readings"].as_u64().unwrap(), served - bad, "{v}\n{engine_out}");
    assert_eq!(v["readings_distinct"].as_u64().unwrap(), served - bad, "{v}");
    assert_eq!(v["quality"]["valid"].as_u64().unwrap(), served - bad, "{v}");
    copies
}

#[test]
fn a_broker_restarted_mid_stream_loses_nothing() {
    let _one = one_at_a_time();
    common::python();
    let raw = unique("restart");
    let partitions = 4;
    create_topic(&raw, partitions);
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let (sim, port) = start_sim(&["--devices", "100", "--seed", "11", "--dirty-rate", "0.05"]);

    // The engine follows the raw topic from its start.
    let (engine_log, out, err) = log_file(dir.path(), "engine.log");
    let engine = common::kafka::follow_command(&raw, partitions, &format!("file://{}", lake.display()))
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("starting fmsflow run");
    let mut engine = Killed(engine);

    let (collect_log, out, err) = log_file(dir.path(), "collect.log");
    let collector = kafka_env(&mut Command::new(common::bin()), &raw, partitions)
        .args([
            "collect",
            "--devices",
            "100",
            "--interval",
            "1s",
            "--duration",
            "14s",
            "--api",
        ])
        .arg(format!("http://127.0.0.1:{port}"))
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("starting fmsflow collect");
    let mut collector = Killed(collector);

    let c = consumer(&unique("watcher"));
    let total = |c: &BaseConsumer| ends(c, &raw, partitions).map(|e| e.iter().sum::<i64>());
    wait("300 records in the raw topic", Duration::from_secs(60), || {
        total(&c).is_some_and(|n| n >= 300)
    });
    let restart = Restart(&["2"]);
    kafka_script(&["stop-node", "2"]);
    let mut at_stop = None;
    wait(
        "300 more records while broker 2 is down",
        Duration::from_secs(90),
        || {
            let n = total(&c);
            if at_stop.is_none() {
                at_stop = n;
            }
            n.zip(at_stop).is_some_and(|(n, s)| n >= s + 300)
        },
    );
    kafka_script(&["start-node", "2"]);
    restart.done();

    let (served, dirty) = collector_delivered_all("the collector to finish", &mut collector, &collect_log, sim, port);
    let bad: u64 = dirty.values().sum();
    let copies = check_the_outcome(&raw, partitions, (served, dirty), &mut engine, &engine_log, &lake);
    let end_offsets = ends(&c, &raw, partitions).expect("end offsets");
    eprintln!(
        "through a broker restart: {served} served, {} while broker 2 was down, {bad} dirty, {copies} producer copies; all accounted for",
        at_stop.map(|s| end_offsets.iter().sum::<i64>() - s).unwrap_or_default()
    );
}

/// The value of the series `name` (no labels) in a Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn the_whole_cluster_down_for_minutes_loses_nothing() {
    let _one = one_at_a_time();
    common::python();
    let down = Duration::from_secs(common::fault_setting("FMSFLOW_FAULT_KAFKA_DOWN_S", 120).into());
    let raw = unique("cluster-down");
    let partitions = 4;
    create_topic(&raw, partitions);
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let (sim, port) = start_sim(&["--devices", "50", "--seed", "13", "--dirty-rate", "0.05"]);

    let (engine_log, out, err) = log_file(dir.path(), "engine.log");
    let engine = common::kafka::follow_command(&raw, partitions, &format!("file://{}", lake.display()))
        .env("FMSFLOW_FLEET__DEVICES", "50")
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("starting fmsflow run");
    let mut engine = Killed(engine);

    // The collector runs until it is interrupted, through the outage.
    let metrics_port = common::free_ports(1)[0];
    let (collect_log, out, err) = log_file(dir.path(), "collect.log");
    let collector = kafka_env(&mut Command::new(common::bin()), &raw, partitions)
        .args([
            "collect",
            "--devices",
            "50",
            "--interval",
            "1s",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--api",
            &format!("http://127.0.0.1:{port}"),
        ])
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("starting fmsflow collect");
    let mut collector = Killed(collector);
    let logs = || {
        format!(
            "--- collector\n{}\n--- engine\n{}",
            std::fs::read_to_string(&collect_log).unwrap_or_default(),
            std::fs::read_to_string(&engine_log).unwrap_or_default()
        )
    };

    let c = consumer(&unique("watcher"));
    let total = |c: &BaseConsumer| ends(c, &raw, partitions).map(|e| e.iter().sum::<i64>());
    wait("200 records in the raw topic", Duration::from_secs(60), || {
        total(&c).is_some_and(|n| n >= 200)
    });

    // Every node down: the brokers, then the controller. Their data stays.
    let restart = Restart(&["100", "1", "2"]);
    kafka_script(&["stop"]);
    let stopped = Instant::now();
    let served_at_stop = sim_truth(port).0;
    // The outage lasts `down`; meanwhile the collector keeps polling and neither it nor the
    // engine gives up.
    while stopped.elapsed() < down {
        assert!(
            collector.0.try_wait().unwrap().is_none(),
            "the collector exited while Kafka was down:\n{}",
            logs()
        );
        assert!(
            engine.0.try_wait().unwrap().is_none(),
            "the engine exited while Kafka was down:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let served_while_down = sim_truth(port).0 - served_at_stop;
    assert!(
        served_while_down > 0,
        "the collector stopped polling while Kafka was down"
    );
    // The collector holds what it polled: produced, not yet delivered.
    let m = common::kafka::http_get(metrics_port, "/metrics");
    let produced = metric(&m, "fmsflow_collector_records_produced_total").unwrap();
    let delivered = metric(&m, "fmsflow_collector_records_delivered_total").unwrap();
    assert!(
        produced - delivered >= served_while_down as f64 / 2.0,
        "{produced} produced, {delivered} delivered, {served_while_down} served while Kafka was down"
    );

    // The cluster comes back, controller first, with its topics.
    let started = Instant::now();
    kafka_script(&["start-node", "100"]);
    kafka_script(&["start-node", "1"]);
    kafka_script(&["start-node", "2"]);
    restart.done();
    let up = started.elapsed();

    // Recovery, bounded: what was polled while Kafka was down reaches the topic, and polls go
    // on after it.
    let target = sim_truth(port).0 + 100;
    wait(
        "the records polled while Kafka was down, and 100 more, in the raw topic",
        Duration::from_secs(180),
        || total(&c).is_some_and(|n| n as u64 >= target),
    );
    let recovered = started.elapsed();
    assert!(collector.0.try_wait().unwrap().is_none(), "{}", logs());
    assert!(engine.0.try_wait().unwrap().is_none(), "{}", logs());

    interrupt(&collector.0);
    let (served, dirty) = collector_delivered_all(
        "the collector to stop after Ctrl-C",
        &mut collector,
        &collect_log,
        sim,
        port,
    );
    let bad: u64 = dirty.values().sum();
    let copies = check_the_outcome(&raw, partitions, (served, dirty), &mut engine, &engine_log, &lake);
    eprintln!(
        "through {down:?} with the whole cluster down: {served} served, {served_while_down} while it was down, {bad} dirty, {copies} producer copies; all accounted for. Restarting the nodes took {up:?}, the backlog was in the topic {recovered:?} after the restart began"
    );
}
