//! The live path through a broker failure: the simulator, `fmsflow collect` and `fmsflow run`
//! following the raw topic all run while broker 2 of the test cluster is stopped and started
//! again. Nothing may be lost or doubled: the raw topic holds exactly what the simulator
//! served, and the lake and the dead letters match the simulator's truth, as without a fault.
//!
//! In a test binary of its own, so the restart does not disturb other tests. Needs the
//! cluster `scripts/test` starts (`FMSFLOW_KAFKA_BOOTSTRAP`, `FMSFLOW_KAFKA_DIR`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

#[test]
fn a_broker_restarted_mid_stream_loses_nothing() {
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
    let engine_pid = engine.id();
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

    wait("the collector to finish", Duration::from_secs(90), || {
        collector.0.try_wait().unwrap().is_some()
    });
    let collect_out = std::fs::read_to_string(&collect_log).unwrap();
    assert!(collector.0.wait().unwrap().success(), "collect failed:\n{collect_out}");
    let (served, dirty) = sim_truth(port);
    drop(sim);
    assert!(
        collect_out.contains(&format!("{served} produced, {served} delivered, 0 failed")),
        "{collect_out}"
    );
    // Nothing lost. A few records may be in twice: when a broker goes away with records in
    // flight, librdkafka's idempotent producer can bump its epoch and send again what may
    // already be stored (it reports them delivered once). The engine's duplicate rule
    // catches those copies.
    let end_offsets = ends(&c, &raw, partitions).expect("end offsets");
    let stored = end_offsets.iter().sum::<i64>() as u64;
    assert!(stored >= served, "{stored} records in the topic, {served} served");
    let copies = stored - served;

    // The engine has covered every record once its group's committed offsets reach the ends.
    let group = consumer(&format!("{raw}.group"));
    wait("the engine to commit every offset", Duration::from_secs(120), || {
        committed(&group, &raw, partitions).is_some_and(|o| o == end_offsets)
    });
    let st = Command::new("kill")
        .args(["-INT", &engine_pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    wait("the engine to stop after Ctrl-C", Duration::from_secs(120), || {
        engine.0.try_wait().unwrap().is_some()
    });
    let engine_out = std::fs::read_to_string(&engine_log).unwrap();
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
    let v = common::read_lake(&lake);
    assert_eq!(v["readings"].as_u64().unwrap(), served - bad, "{v}\n{engine_out}");
    assert_eq!(v["quality"]["valid"].as_u64().unwrap(), served - bad, "{v}");
    eprintln!(
        "through a broker restart: {served} served, {} while broker 2 was down, {bad} dirty, {copies} producer copies; all accounted for",
        at_stop.map(|s| end_offsets.iter().sum::<i64>() - s).unwrap_or_default()
    );
}
