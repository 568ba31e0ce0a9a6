//! Kafka, for real: the collector producing the simulator's payloads, the engine reading the
//! raw topic and writing the lake, the changelog and the dead letters; replays from offsets
//! and from a time; the same range replayed twice giving byte-identical sealed files.
//!
//! Needs a running Kafka: `scripts/test` starts a 2-broker cluster with `scripts/kafka` and
//! sets `FMSFLOW_KAFKA_BOOTSTRAP`. Each test uses topics of its own.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::kafka::{
    bootstrap, committed, consume_all, create_topic, dead_letters_by_rule, generated, kafka_env, produce,
    produce_generated, sim_truth, start_sim, unique,
};
use fmsflow::lake::Storage;

/// `fmsflow run --source kafka --from <from> --until end --workers <workers>` into `lake`.
fn run_command(raw: &str, partitions: i32, from: &str, lake: &Path, workers: usize) -> Command {
    run_command_at(raw, partitions, from, &format!("file://{}", lake.display()), workers)
}

/// [`run_command`] into the lake at a URL; an `s3://` one on the test S3 server.
fn run_command_at(raw: &str, partitions: i32, from: &str, lake: &str, workers: usize) -> Command {
    common::kafka::replay_command(raw, partitions, from, lake, workers)
}

/// The storage of a lake URL (the test S3 server's settings for `s3://`).
/// Runs `fmsflow run --source kafka --from <from> --until end` into `lake`; its stdout.
fn replay(raw: &str, partitions: i32, from: &str, lake: &Path, workers: usize) -> String {
    let out = run_command(raw, partitions, from, lake, workers)
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
fn simulator_to_collector_to_kafka_to_engine_on_two_processes_counts_every_record() {
    common::python();
    let raw = unique("e2e");
    // 3 partitions read by 2 workers: one worker owns two.
    let partitions = 3;

    let (sim, port) = start_sim(&["--devices", "100", "--seed", "7", "--dirty-rate", "0.05"]);

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
    let (served, dirty) = sim_truth(port);
    drop(sim);
    assert!(served >= 400, "6 s of 100 devices every second: {served}");
    assert!(
        stdout.contains(&format!("{served} produced, {served} delivered, 0 failed")),
        "every served payload produced and delivered once: {stdout} vs {served} served"
    );
    let raw_records = consume_all(&raw);
    assert_eq!(raw_records.len() as u64, served);
    for r in &raw_records {
        assert!(r.headers.contains_key("poll_ms"), "{r:?}");
        assert_eq!(r.headers["poll_ms"].parse::<i64>().ok(), r.timestamp, "{r:?}");
    }

    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    // The engine as a cluster of 2 processes with one worker each.
    let ports: Vec<u16> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect::<Vec<_>>()
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    let addresses = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let procs: Vec<_> = (0..2)
        .map(|i| {
            run_command(&raw, partitions, "earliest", &lake, 1)
                .args(["--cluster", &addresses, "--process", &i.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting an engine process")
        })
        .collect();
    for (i, p) in procs.into_iter().enumerate() {
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "engine process {i} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let bad: u64 = dirty.values().sum();
    assert!(bad > 0, "the simulator served dirty records: {dirty:?}");

    // Every bad record is in the dead-letter topic, with its rule, its original bytes and
    // where it came from.
    let dead = consume_all(&format!("{raw}.rejects"));
    let by_rule = dead_letters_by_rule(&format!("{raw}.rejects"));
    assert_eq!(by_rule, dirty, "dead letters by rule vs the simulator's truth");
    eprintln!("served {served}, dirty {dirty:?}, dead letters {}", dead.len());
    for d in &dead {
        let p: i32 = d.headers["source"].parse().unwrap();
        assert!(p >= 0 && p < partitions, "{d:?}");
    }
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

#[test]
fn replays_from_offsets_and_times_and_twice_identically() {
    common::python();
    let raw = unique("replay");
    // One partition read by 2 workers: one worker has none and must still advance.
    let partitions = 1;
    let records = produce_generated(&raw, partitions, 2, "0");
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
    // Once every output is stored, the group's offsets are at the end of what was read.
    assert_eq!(
        committed(&format!("{raw}.group"), &raw, partitions),
        vec![Some(n as i64)]
    );

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

/// The (partition, offset) of every dead letter in `topic`, and how many letters there are.
/// Each letter also carries its record's ingest time in a header, and is stamped with the
/// time it was sent (within the last hour), not with that ingest time.
fn dead_letter_sources(topic: &str) -> (BTreeSet<(String, String)>, usize) {
    let all = consume_all(topic);
    let n = all.len();
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 3_600_000;
    for r in &all {
        assert!(r.headers["ingest_ms"].parse::<i64>().is_ok(), "{r:?}");
        assert!(
            r.timestamp.is_some_and(|t| t > an_hour_ago),
            "not stamped when sent: {r:?}"
        );
    }
    (
        all.into_iter()
            .map(|r| (r.headers["source"].clone(), r.headers["offset"].clone()))
            .collect(),
        n,
    )
}

/// A replay killed (SIGKILL) right after its first checkpoint that covers a sealed hour,
/// then run again with `--from checkpoint`, leaves the lake an uninterrupted replay leaves:
/// the same rows in every table, none twice. Its dead letters are those of the uninterrupted
/// run; records the killed run had sent after its checkpoint may be there twice (at least
/// once, and each names its source partition and offset). One process of 2 workers.
#[test]
fn a_killed_run_resumes_from_its_checkpoint() {
    killed_run_resumes("resume", 1, 2);
}

/// [`a_killed_run_resumes_from_its_checkpoint`] for a cluster of 2 processes of 1 worker
/// each: worker 0 writes the checkpoint from what the other process reports through the
/// dataflow, and every process of the resumed run cleans its own files.
#[test]
fn a_killed_cluster_resumes_from_its_checkpoint() {
    killed_run_resumes("resume-cluster", 2, 1);
}

/// Issue 6: one process of a cluster of 3 processes of 2 workers is killed mid-run. The
/// other two stop by themselves with the documented error naming it; a restart of all three
/// from the checkpoint ends with the lake and dead letters of a run that was never killed.
#[test]
fn a_cluster_that_loses_one_process_stops_and_resumes_from_its_checkpoint() {
    killed_run_resumes_after("resume-lost-one", 3, 2, Some(1));
}

/// Starts `fmsflow run --source kafka --until end` of `raw` into `lake` as `processes`
/// processes of `workers` workers (a cluster on fresh loopback ports when there are several),
/// its outputs named after `outputs`, with the settings `env` on top.
#[allow(clippy::too_many_arguments)]
fn start_run(
    raw: &str,
    partitions: i32,
    lake: &str,
    from: &str,
    outputs: &str,
    processes: usize,
    workers: usize,
    env: &[(&str, &str)],
) -> Vec<std::process::Child> {
    let listeners: Vec<std::net::TcpListener> = (0..processes)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addresses: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    drop(listeners);
    (0..processes)
        .map(|i| {
            let mut cmd = run_command_at(raw, partitions, from, lake, workers);
            if processes > 1 {
                cmd.args(["--cluster", &addresses.join(","), "--process", &i.to_string()]);
            }
            cmd.env("FMSFLOW_ENGINE__BATCH", "400")
                .envs(env.iter().copied())
                .env("FMSFLOW_KAFKA__REJECTS_TOPIC", format!("{raw}.{outputs}.rejects"))
                .env("FMSFLOW_KAFKA__HOURLY_TOPIC", format!("{raw}.{outputs}.hourly"))
                .env("FMSFLOW_KAFKA__GROUP", format!("{raw}.{outputs}"))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting fmsflow run")
        })
        .collect()
}

/// Waits for every process of a run; their standard errors. Fails if one failed, once it
/// has stopped the others (the rest of a cluster waits for the failed process to connect
/// until it times out), with the standard error of each.
fn finish(mut children: Vec<std::process::Child>, what: &str) -> Vec<String> {
    use std::io::Read;
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let mut pipe = c.stderr.take().expect("stderr is piped");
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
        })
        .collect();
    let mut status = vec![None; children.len()];
    common::wait_for(&format!("{what} to end"), Duration::from_secs(900), || {
        for (c, s) in children.iter_mut().zip(status.iter_mut()) {
            if s.is_none() {
                *s = c.try_wait().unwrap();
            }
        }
        let failed = status.iter().flatten().any(|s| !s.success());
        if failed {
            children.iter_mut().for_each(|c| drop(c.kill()));
        }
        failed || status.iter().all(Option::is_some)
    });
    let errs: Vec<String> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    if status.iter().flatten().any(|s| !s.success()) {
        let report: Vec<String> = status
            .iter()
            .zip(&errs)
            .enumerate()
            .map(|(i, (s, err))| match s {
                Some(s) => format!("process {i} ended ({s}):\n{err}"),
                None => format!("process {i}, stopped then:\n{err}"),
            })
            .collect();
        panic!("{what} failed:\n{}", report.join("\n"));
    }
    errs
}

/// SIGKILLs every process of a run: whether any had already finished by itself, and the
/// lines of their standard errors that say how they resumed.
fn kill_all(children: Vec<std::process::Child>) -> (bool, Vec<String>) {
    let mut any_finished = false;
    let mut resumed = Vec::new();
    for mut k in children {
        let _ = k.kill();
        let out = k.wait_with_output().unwrap();
        any_finished |= out.status.success();
        let err = String::from_utf8_lossy(&out.stderr);
        resumed.extend(err.lines().filter(|l| l.contains("resuming")).map(str::to_string));
    }
    (any_finished, resumed)
}

/// The lakes `whole` (an uninterrupted run of topic `raw`'s outputs "whole") and `resumed`
/// (a run killed and resumed, outputs "resumed") hold the same rows, table by table, as
/// DuckDB reads them, with no reading twice; both runs sent the same set of dead letters.
fn assert_same_lakes(raw: &str, whole: &str, resumed: &str) {
    let fetched = tempfile::tempdir().unwrap();
    let read = |url: &str| {
        if url.starts_with("hdfs://") {
            common::hdfs::fetch(url, fetched.path());
            return common::read_lake(fetched.path());
        }
        common::read_lake_at(url.strip_prefix("file://").unwrap_or(url))
    };
    let (mut a, mut b) = (read(whole), read(resumed));
    assert_eq!(a["readings"], a["readings_distinct"], "{a}");
    // DuckDB's mean over the readings depends on how they are split into files, in the last
    // bits only; everything else must be equal.
    for v in [&mut a, &mut b] {
        let e = v.as_object_mut().unwrap().remove("max_mean_error").unwrap();
        assert!(
            e.as_f64().unwrap() < 1e-9,
            "hourly means differ from the readings by {e}"
        );
    }
    assert_eq!(a, b, "the resumed lake differs from the uninterrupted one");
    // Both are whole to a reader that follows the manifests, with every file committed.
    common::assert_committed(whole);
    common::assert_committed(resumed);
    let (whole_letters, n) = dead_letter_sources(&format!("{raw}.whole.rejects"));
    assert_eq!(
        whole_letters.len(),
        n,
        "an uninterrupted run sends each dead letter once"
    );
    let (resumed_letters, m) = dead_letter_sources(&format!("{raw}.resumed.rejects"));
    assert_eq!(resumed_letters, whole_letters, "dead letters lost or made up");
    eprintln!("{n} dead letters; the killed and resumed runs sent {m}");
}

fn killed_run_resumes(name: &str, processes: usize, workers: usize) {
    killed_run_resumes_after(name, processes, workers, None);
}

/// [`killed_run_resumes`], killing only process `lost` (when given): the others must then
/// stop by themselves, naming it.
fn killed_run_resumes_after(name: &str, processes: usize, workers: usize, lost: Option<usize>) {
    common::python();
    let raw = unique(name);
    let partitions = 3;
    produce_generated(&raw, partitions, 4, "0.02");
    let dir = tempfile::tempdir().unwrap();
    // The lakes, by URL: the checks below read them through the storage trait, so they hold
    // for any backend.
    let lake_url = |lake: &str| format!("file://{}", dir.path().join(lake).display());
    let run = |lake: &str, from: &str, outputs: &str| {
        start_run(&raw, partitions, lake, from, outputs, processes, workers, &[])
    };

    let whole = lake_url("whole");
    finish(run(&whole, "earliest", "whole"), "the uninterrupted run");
    let key = fmsflow::checkpoint::KEY;
    assert!(
        common::open_lake(&whole).get(key).unwrap().is_some(),
        "a finished run leaves its checkpoint"
    );

    let resumed = lake_url("resumed");
    let mut killed = run(&resumed, "earliest", "resumed");
    let resumed_storage = common::open_lake(&resumed);
    let checkpoint = || resumed_storage.get(key).ok().flatten();
    // Killed once an hour is sealed and more is still to come.
    let sealed_some = || {
        checkpoint()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|c| c["next_seq"].as_array().is_some_and(|a| !a.is_empty()))
    };
    common::wait_for("a checkpoint with a sealed hour", Duration::from_secs(120), || {
        sealed_some() || killed.iter_mut().any(|k| k.try_wait().unwrap().is_some())
    });
    if let Some(lost) = lost {
        let mut victim = killed.remove(lost);
        assert!(
            victim.try_wait().unwrap().is_none(),
            "process {lost} finished before it could be killed; the run must be killed mid-run"
        );
        victim.kill().unwrap();
        victim.wait().unwrap();
        for (i, child) in killed.into_iter().enumerate() {
            let t0 = std::time::Instant::now();
            let out = common::wait_bounded(child, Duration::from_secs(60), "a process without its peer");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "process {i} ended well without process {lost}: {err}"
            );
            assert!(
                err.contains(&format!("lost process {lost} of the cluster")) && err.contains("--from checkpoint"),
                "{err}"
            );
            eprintln!(
                "a survivor stopped {:?} after the kill: {}",
                t0.elapsed(),
                err.lines().rfind(|l| l.contains("lost process")).unwrap_or("")
            );
        }
    } else {
        assert!(
            !kill_all(killed).0,
            "a process finished before it could be killed; the run must be killed mid-run"
        );
    }
    let ck: serde_json::Value = serde_json::from_slice(&checkpoint().unwrap()).unwrap();
    assert_eq!(ck["processes"], processes, "{ck}");
    // What the kill left is whole to a reader that follows the manifests (in a cluster,
    // process 0 commits the hours every process writes).
    // (The kill may come between the checkpoint and its manifests: none may be there yet.)
    common::assert_readable_after_kill(resumed_storage.as_ref(), "after the kill");
    let errs = finish(run(&resumed, "checkpoint", "resumed"), "the resumed run");
    for err in &errs {
        assert!(err.contains("resuming from the checkpoint of epoch"), "{err}");
    }
    eprintln!(
        "killed after the checkpoint {ck}; {}",
        errs[0].lines().find(|l| l.contains("resuming")).unwrap_or("")
    );
    assert_same_lakes(&raw, &whole, &resumed);
}

/// A small random number generator for the crash test's kill points (xorshift64*), seeded
/// from `FMSFLOW_CRASH_SEED` or the clock, the seed printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = common::seed("FMSFLOW_CRASH_SEED");
        Rng(seed.max(1))
    }

    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The crash test of the lake: a run over a replay of `FMSFLOW_FAULT_HOURS` (6) hours of
/// generated records, killed with SIGKILL at `FMSFLOW_FAULT_KILLS` (20) random points and
/// restarted from its checkpoint after each, ends with the lake of a run that was never
/// killed, row for row. The killed lives write open hours in parts (`lake.max_open_rows`),
/// the uninterrupted run whole. A quarter of the kills come while a life starts or recovers (a random
/// moment in its first 0.6 s), the rest once its checkpoint has passed a random share of the
/// input left, plus a random 0-30 ms.
fn crash_test(name: &str, lake: &str) {
    common::python();
    let raw = unique(name);
    let partitions = 3;
    let hours = common::fault_setting("FMSFLOW_FAULT_HOURS", 6);
    let total = produce_generated(&raw, partitions, hours, "0.02").len() as f64;
    let (processes, workers) = (1, 2);
    let run = |lake: &str, from: &str, outputs: &str| {
        start_run(&raw, partitions, lake, from, outputs, processes, workers, &[])
    };
    let dir = tempfile::tempdir().unwrap();
    let whole = format!("file://{}", dir.path().join("whole").display());
    finish(run(&whole, "earliest", "whole"), "the uninterrupted run");
    // The lives under test hold at most 500 readings of an open hour at a worker (about 3,600
    // per worker and hour here): each hour is written in open parts before its seal, which a
    // kill before the seal leaves without a manifest for the next life to delete and redo.
    let run = |lake: &str, from: &str, outputs: &str| {
        start_run(
            &raw,
            partitions,
            lake,
            from,
            outputs,
            processes,
            workers,
            &[("FMSFLOW_LAKE__MAX_OPEN_ROWS", "500")],
        )
    };

    let storage = common::open_lake(lake);
    let key = fmsflow::checkpoint::KEY;
    let checkpoint = || {
        storage
            .get(key)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    };
    // How many records the checkpoint covers.
    let covered = |c: &serde_json::Value| -> f64 {
        c["read_end"]
            .as_object()
            .map_or(0.0, |m| m.values().filter_map(|v| v.as_f64()).sum())
    };
    let kills = common::fault_setting("FMSFLOW_FAULT_KILLS", 20) as usize;
    let mut rng = Rng::new();
    let mut made = 0;
    for k in 0..kills {
        let ck = checkpoint();
        let from = if ck.is_some() { "checkpoint" } else { "earliest" };
        // Each life is killed past a random share of what is left, sized so that the
        // remaining lives find input left to be killed in.
        let covered_at_start = ck.as_ref().map_or(0.0, covered);
        let share = (1.5 * rng.next() / (kills - k) as f64).min(0.8);
        let goal = covered_at_start + share * (total - covered_at_start);
        let mut life = run(lake, from, "resumed");
        let started = std::time::Instant::now();
        let what = if rng.next() < 0.25 {
            let at = Duration::from_secs_f64(0.6 * rng.next());
            common::wait_for("the moment of a kill", Duration::from_secs(5), || {
                started.elapsed() >= at || life.iter_mut().any(|p| p.try_wait().unwrap().is_some())
            });
            format!("{:.0} ms after its start", at.as_secs_f64() * 1e3)
        } else {
            common::wait_for(
                &format!("the checkpoint to cover {goal:.0} records"),
                Duration::from_secs(120),
                || {
                    checkpoint().is_some_and(|c| covered(&c) >= goal)
                        || life.iter_mut().any(|p| p.try_wait().unwrap().is_some())
                },
            );
            std::thread::sleep(Duration::from_secs_f64(0.03 * rng.next()));
            format!("once its checkpoint covered {goal:.0} records")
        };
        let (finished, resumed) = kill_all(life);
        for line in resumed {
            eprintln!("  {line}");
        }
        if finished {
            eprintln!("life {k} finished before its kill ({what})");
            break;
        }
        made += 1;
        let at = checkpoint().map_or("no checkpoint yet".to_string(), |c| {
            format!("checkpoint of epoch {} covering {:.0} records", c["epoch"], covered(&c))
        });
        eprintln!("life {k} (--from {from}) killed {what}; {at}");
        // Whatever the kill left, a reader that follows the manifests sees whole hours:
        // what they list is there, one version of each table, hourly counts equal to the
        // readings (the files the next life deletes are in no manifest).
        common::assert_readable_after_kill(storage.as_ref(), &format!("after life {k}"));
    }
    assert_eq!(
        made, kills,
        "only {made} of {kills} lives were killed before they finished: the input is too short"
    );
    let from = if checkpoint().is_some() {
        "checkpoint"
    } else {
        "earliest"
    };
    finish(run(lake, from, "resumed"), "the last life");
    assert_same_lakes(&raw, &whole, lake);
    // The killed writes' temporary files are gone: each life sweeps them at its start.
    if let Some(dir) = lake.strip_prefix("file://") {
        let left: Vec<String> = files(Path::new(dir))
            .into_keys()
            .filter(|k| k.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "temporary files left in the lake: {left:?}");
    } else if lake.starts_with("hdfs://") {
        // Each life sweeps what the kills left (on S3 there is nothing to sweep: an upload
        // is one request, or a multipart upload never completed).
        assert_eq!(
            storage.sweep_abandoned().unwrap(),
            0,
            "temporary files of killed writes left in the lake"
        );
    }
}

#[test]
fn twenty_kills_on_local_storage_lose_nothing_and_double_nothing() {
    let dir = tempfile::tempdir().unwrap();
    crash_test("crash-local", &format!("file://{}", dir.path().join("lake").display()));
}

#[test]
fn twenty_kills_on_hdfs_lose_nothing_and_double_nothing() {
    let (url, _) = common::hdfs::lake("crash");
    crash_test("crash-hdfs", &url);
}

#[test]
fn twenty_kills_on_s3_lose_nothing_and_double_nothing() {
    crash_test("crash-s3", &format!("s3://{}/lake", common::s3::bucket("crash")));
}

/// Following a topic after a resume: records the reader received beyond the recovery epochs'
/// bounds (one partition's records arrive while the epoch waits for another's) are all
/// taken, even when nothing new arrives after them.
#[test]
fn following_after_a_resume_takes_what_recovery_left() {
    use fmsflow::connectors::kafka::{KafkaSettings, PartitionReader, ResumePlan, SourceSpec, StartAt};
    let raw = unique("follow-after-resume");
    let partitions = 2;
    create_topic(&raw, partitions);
    // Partition by partition, so one partition's records come in before the other's.
    let p: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let per_partition = 500;
    for part in 0..partitions {
        for i in 0..per_partition {
            let payload = format!("record {part}/{i}");
            let record = rdkafka::producer::BaseRecord::to(&raw)
                .partition(part)
                .key("k")
                .payload(&payload)
                .timestamp(1_000 + i);
            p.send(record).map_err(|(e, _)| e).unwrap();
            p.poll(Duration::ZERO);
        }
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(60)).unwrap();

    // The recovery epoch re-reads the first 50 records of each partition.
    let spec = SourceSpec {
        settings: KafkaSettings::named_after(&bootstrap(), &raw, partitions, 1),
        from: StartAt::Resume(ResumePlan {
            start: (0..partitions).map(|p| (p, 0)).collect(),
            read_end: (0..partitions).map(|p| (p, 50)).collect(),
            epochs: 1,
        }),
        until_end: false,
        stop: Default::default(),
    };
    let mut reader = PartitionReader::open(&spec, 0, 1).unwrap();
    let mut got = Vec::new();
    reader.read_epoch(0, 50, Duration::from_secs(60), &mut got).unwrap();
    assert_eq!(got.len(), 100, "the recovery epoch holds 50 records of each partition");
    let total = (partitions * per_partition as i32) as usize;
    common::wait_for("every record, following", Duration::from_secs(60), || {
        reader.read_available(1_000, &mut got).unwrap();
        got.len() >= total
    });
    let mut offsets: Vec<(u32, u64)> = got.iter().map(|r| (r.pos.source, r.pos.offset)).collect();
    offsets.sort_unstable();
    let expected: Vec<(u32, u64)> = (0..partitions as u32)
        .flat_map(|p| (0..per_partition as u64).map(move |o| (p, o)))
        .collect();
    assert_eq!(offsets, expected, "every record once");
}

/// A raw topic created a moment ago is opened once its partitions have leaders (until then
/// the brokers answer "not leader" or do not know it yet); one that does not exist is an
/// error naming it.
#[test]
fn a_topic_just_created_is_opened_and_a_missing_one_named() {
    let dir = tempfile::tempdir().unwrap();
    let raw = unique("fresh");
    create_topic(&raw, 4);
    // Empty, and read to its end: the run ends as soon as every partition is open.
    replay(&raw, 4, "earliest", &dir.path().join("fresh"), 2);

    let missing = unique("missing");
    let out = run_command(&missing, 4, "earliest", &dir.path().join("missing"), 1)
        .output()
        .expect("running fmsflow run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a run on a missing topic succeeded:\n{stderr}");
    assert!(
        stderr.contains(&format!("topic {missing:?} does not exist")),
        "the error does not name the missing topic:\n{stderr}"
    );
}

/// An S3 outage mid-run: the S3 server stopped for 60 s while hours seal, then started again.
/// The engine retries its writes and waits meanwhile; the lake it leaves in S3 holds the rows
/// an uninterrupted run leaves, none lost, none twice. The server is one of its own (started
/// with `scripts/s3` on a free port), so no other test sees the outage.
/// How long the fault tests keep a lake backend away: `FMSFLOW_FAULT_OUTAGE_S`, 60 s by
/// default (`scripts/faults` runs them with 300 s).
fn outage() -> Duration {
    Duration::from_secs(common::fault_setting("FMSFLOW_FAULT_OUTAGE_S", 60).into())
}

/// A lake's backend taken away in the middle of a run that follows Kafka, and given back.
struct LakeOutage<'a> {
    lake: String,
    storage: std::sync::Arc<dyn Storage>,
    /// Settings of the run beyond the lake URL.
    env: Vec<(&'static str, String)>,
    /// Checked, while the backend is away, with the run's log so far.
    during: Box<dyn Fn(&str) + 'a>,
    down: Box<dyn Fn() + 'a>,
    up: Box<dyn Fn() + 'a>,
    /// The lake as DuckDB and pyarrow read it.
    read: Box<dyn Fn() -> serde_json::Value + 'a>,
}

/// The engine follows a topic into `o.lake`; once an hour is sealed there, the backend goes
/// away for [`outage`] while the rest of the input arrives. The engine must retry, hold back
/// (read no more than its queues hold), write everything once the backend is back, and stop
/// cleanly: the lake then holds exactly the rows of an uninterrupted replay.
fn lake_outage_loses_nothing(name: &str, o: LakeOutage) {
    common::python();
    let dir = tempfile::tempdir().unwrap();
    let raw = unique(name);
    let partitions = 2;
    let records = generated(4, "0.02");
    create_topic(&raw, partitions);
    let half = records.len() / 2;
    produce(&raw, &records[..half]);

    let log = dir.path().join("run.log");
    let mut cmd = common::kafka::follow_command(&raw, partitions, &o.lake);
    // The run keeps retrying through the outage, and a while beyond.
    cmd.env("FMSFLOW_LAKE__RETRY_FOR", format!("{}s", outage().as_secs() + 300))
        // At most batch × 3 records per worker wait for their outputs to be stored.
        .env("FMSFLOW_ENGINE__BATCH", "200")
        .envs(o.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut engine = common::kafka::Killed(cmd.spawn().expect("starting fmsflow run"));
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();

    common::wait_for("a sealed hour in the lake", Duration::from_secs(120), || {
        !o.storage.list("hourly").unwrap_or_default().is_empty()
    });
    (o.down)();
    let stopped = std::time::Instant::now();
    produce(&raw, &records[half..]);
    common::wait_for("the engine retrying a lake write", Duration::from_secs(180), || {
        logged().contains("retrying in")
    });
    (o.during)(&logged());
    std::thread::sleep(outage().saturating_sub(stopped.elapsed()));
    // Backpressure: with the lake away, the engine stops reading once 3 batches per worker
    // wait to be stored, instead of holding the whole backlog in memory.
    let read_in_outage = logged()
        .lines()
        .rev()
        .find_map(|l| {
            l.trim()
                .split_once(" records in,")
                .and_then(|(n, _)| n.parse::<usize>().ok())
        })
        .unwrap_or(0);
    assert!(
        read_in_outage <= half + 2 * 3 * 200,
        "the engine read {read_in_outage} of {} records while the lake was away: no backpressure",
        records.len()
    );
    (o.up)();
    let all = format!(" {} records in,", records.len());
    common::wait_for("the engine reading every record", Duration::from_secs(300), || {
        logged().contains(&all)
    });
    // Stopped as an operator stops it: the run seals what is left and writes it.
    unsafe { libc::kill(engine.0.id() as i32, libc::SIGINT) };
    common::wait_for("the run to stop", Duration::from_secs(120), || {
        engine.0.try_wait().unwrap().is_some()
    });
    let status = engine.0.wait().unwrap();
    assert!(status.success(), "the run failed:\n{}", logged());

    let local = dir.path().join("local");
    replay(&raw, partitions, "earliest", &local, 2);
    let (a, b) = (common::read_lake(&local), (o.read)());
    common::assert_same_rows(&a, &b, ("uninterrupted", "the lake after the outage"));
    assert_eq!(b["readings"], b["readings_distinct"], "{b}");
    common::assert_committed_in(o.storage.as_ref(), &o.lake);
    let retries = logged().matches("retrying in").count();
    eprintln!(
        "{} readings; the run retried {retries} lake writes through a {} s outage, during which \
         it had read {read_in_outage} of {} records",
        b["readings"],
        outage().as_secs(),
        records.len()
    );
}

/// Runs a script of the project's (`scripts/<name>`) with `env`; fails unless it succeeds.
fn script(name: &str, args: &[&str], env: &[(&str, &str)]) {
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running scripts/{name}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{name} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_s3_outage_mid_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s3_dir = dir.path().join("s3").display().to_string();
    let port = common::free_ports(1)[0].to_string();
    let endpoint = format!("http://127.0.0.1:{port}");
    let s3 = |cmd: &str| script("s3", &[cmd, "--dir", &s3_dir], &[("FMSFLOW_S3_PORT", &port)]);
    s3("start");
    // Stops the server however the test ends.
    let _stop = Stop(|| s3("stop"));
    let bucket = common::s3::bucket_at(&endpoint, "outage");
    let lake = format!("s3://{bucket}/lake");
    let opts = fmsflow::lake::s3::S3Options {
        endpoint: Some(endpoint.clone()),
        ..common::s3::options()
    };
    lake_outage_loses_nothing(
        "s3-outage",
        LakeOutage {
            lake: lake.clone(),
            storage: std::sync::Arc::new(fmsflow::lake::s3::S3Storage::open(&bucket, "lake", &opts).unwrap()),
            env: vec![
                ("FMSFLOW_LAKE__S3_ENDPOINT", endpoint.clone()),
                ("FMSFLOW_LAKE__S3_PATH_STYLE", "true".into()),
                // Our retries take over after the SDK's second try, so the test sees them soon.
                ("FMSFLOW_LAKE__S3_MAX_ATTEMPTS", "2".into()),
                ("AWS_ENDPOINT_URL", endpoint.clone()),
            ],
            during: Box::new(|_| {}),
            down: Box::new(|| s3("stop")),
            up: Box::new(|| s3("start")),
            read: Box::new(|| common::read_lake_with(&lake, &[("AWS_ENDPOINT_URL", &endpoint)])),
        },
    );
}

/// Runs its closure when dropped: stops what a test started, however the test ends.
struct Stop<F: Fn()>(F);
impl<F: Fn()> Drop for Stop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The NameNode of an HDFS of the test's own (the shared one serves other tests) stopped for
/// the outage and started again with its namespace.
#[test]
fn a_namenode_outage_mid_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hdfs_dir = dir.path().join("hdfs").display().to_string();
    let ports = common::free_ports(2);
    let (rpc, http) = (ports[0].to_string(), ports[1].to_string());
    let hdfs = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--dir", &hdfs_dir]);
        script(
            "hdfs",
            &a,
            &[("FMSFLOW_HDFS_PORT", &rpc), ("FMSFLOW_HDFS_HTTP_PORT", &http)],
        )
    };
    hdfs(&["start"]);
    let _stop = Stop(|| hdfs(&["stop"]));
    let lake = format!("hdfs://127.0.0.1:{rpc}/outage/lake");
    let fetched = dir.path().join("fetched");
    lake_outage_loses_nothing(
        "namenode-outage",
        LakeOutage {
            lake: lake.clone(),
            storage: common::open_lake(&lake),
            env: Vec::new(),
            during: Box::new(|_| {}),
            down: Box::new(|| hdfs(&["stop-node", "namenode"])),
            up: Box::new(|| hdfs(&["start-node", "namenode"])),
            read: Box::new(|| {
                common::hdfs::fetch(&lake, &fetched);
                common::read_lake(&fetched)
            }),
        },
    );
}

/// The disk of a local lake fills up (another file takes all its space) and is freed again.
/// The lake is on a tmpfs of its own: mounting one needs root.
#[test]
fn a_full_lake_disk_loses_nothing_and_corrupts_nothing() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test mounts a small tmpfs to fill up, which needs root (CI runs as root)"
    );
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "fmsflow-full-disk"])
        .arg(&disk)
        .status()
        .expect("running mount");
    assert!(
        st.success(),
        "mount -t tmpfs failed (the test needs root and a kernel that allows it)"
    );
    let _unmount = Stop(|| {
        let _ = Command::new("umount").arg("-l").arg(&disk).status();
    });
    let root = disk.join("lake");
    let filler = disk.join("filler");
    let lake = format!("file://{}", root.display());
    let full = || {
        // Takes every byte left, down to the last page.
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        for chunk in [1 << 20, 4096] {
            let block = vec![0u8; chunk];
            while f.write_all(&block).is_ok() {}
        }
        let free = nix_free_bytes(&disk);
        assert!(free < 64 << 10, "the disk still has {free} bytes free");
    };
    let storage = common::open_lake(&lake);
    lake_outage_loses_nothing(
        "full-disk",
        LakeOutage {
            lake: lake.clone(),
            storage: storage.clone(),
            env: Vec::new(),
            during: Box::new(|log| {
                assert!(
                    log.contains("disk is full"),
                    "the run's log does not say the disk is full:\n{log}"
                );
                // Nothing half-written is left or listed, and readers see whole hours.
                common::assert_readable_after_kill(storage.as_ref(), "with the disk full");
                let tmp: Vec<String> = files(&root).into_keys().filter(|k| k.ends_with(".tmp")).collect();
                assert!(tmp.is_empty(), "failed writes left temporary files: {tmp:?}");
            }),
            down: Box::new(full),
            up: Box::new(|| std::fs::remove_file(&filler).unwrap()),
            read: Box::new(|| common::read_lake(&root)),
        },
    );
}

/// Free bytes of the filesystem holding `path` (statvfs).
fn nix_free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(c.as_ptr(), &mut s) },
        0,
        "statvfs {}",
        path.display()
    );
    s.f_bavail as u64 * s.f_frsize as u64
}

/// The query API of an engine following Kafka: its status names each partition's position,
/// end and lag, and the answers count what was produced.
#[test]
fn the_api_status_reports_each_partitions_position_and_lag() {
    let raw = unique("api-lag");
    let records = produce_generated(&raw, 3, 1, "0.0");
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_ports(1)[0];
    let _engine = common::kafka::Killed(
        common::kafka::follow_command(&raw, 3, &format!("file://{}", dir.path().join("lake").display()))
            .args(["--http", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting fmsflow run"),
    );
    common::wait_for("the API", Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let status = || -> serde_json::Value {
        serde_json::from_str(&common::kafka::http_get(port, "/api/v1/status")).expect("a JSON status")
    };
    // Every record read: each partition at its end, lag 0, the positions summing to what
    // was produced.
    common::wait_for("every partition read to its end", Duration::from_secs(90), || {
        let st = status();
        let parts = st["processes"][0]["partitions"].as_array().cloned().unwrap_or_default();
        parts.len() == 3
            && parts.iter().all(|p| p["lag"] == 0 && p["end"] == p["position"])
            && parts.iter().map(|p| p["position"].as_i64().unwrap()).sum::<i64>() == records.len() as i64
    });
    let st = status();
    assert_eq!(st["processes"][0]["received"], records.len() as u64, "{st}");
    let partitions: Vec<i64> = st["processes"][0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["partition"].as_i64().unwrap())
        .collect();
    assert_eq!(partitions, vec![0, 1, 2], "{st}");
    // The live answers hold what was read: quality counts every record.
    common::wait_for("the quality counts of every record", Duration::from_secs(30), || {
        let q: serde_json::Value = serde_json::from_str(&common::kafka::http_get(
            port,
            "/api/v1/quality?from=2025-07-06T00:00:00Z&to=2025-07-08T00:00:00Z",
        ))
        .unwrap();
        q["total"] == records.len() as u64
    });
}

/// A file of the test cluster's directory (`FMSFLOW_KAFKA_DIR`, the DIR of `scripts/kafka
/// start --dir DIR`): its path and its text.
fn cluster_file(name: &str) -> (String, String) {
    let dir = std::env::var("FMSFLOW_KAFKA_DIR").expect(
        "FMSFLOW_KAFKA_DIR is not set: the TLS and SASL tests read the cluster's bootstrap-tls, tls/ca.pem, \
         bootstrap-sasl and sasl.env from the directory `scripts/kafka start --dir DIR` used (`bash scripts/test` \
         sets it)",
    );
    let path = Path::new(&dir).join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (a cluster started before scripts/kafka had TLS and SASL listeners? restart it)",
            path.display()
        )
    });
    (path.display().to_string(), text)
}

/// The test cluster's TLS listener (`scripts/kafka` gives every broker one): its bootstrap
/// servers, and settings that trust the CA that signed the brokers' certificates.
fn tls_listener() -> (String, fmsflow::connectors::kafka::KafkaSecurity) {
    let security = fmsflow::connectors::kafka::KafkaSecurity {
        protocol: "ssl".into(),
        ssl_ca_location: cluster_file("tls/ca.pem").0,
        ..Default::default()
    };
    (cluster_file("bootstrap-tls").1, security)
}

/// The test cluster's SASL_SSL listener (`scripts/kafka` gives every broker one): its
/// bootstrap servers, and settings that log in with `mechanism` as the test user whose name
/// and password `scripts/kafka` wrote to DIR/sasl.env.
fn sasl_listener(mechanism: &str) -> (String, fmsflow::connectors::kafka::KafkaSecurity) {
    let (path, env) = cluster_file("sasl.env");
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{path} has no {name}"))
            .to_string()
    };
    let security = fmsflow::connectors::kafka::KafkaSecurity {
        protocol: "sasl_ssl".into(),
        sasl_mechanism: mechanism.into(),
        sasl_username: var("FMSFLOW_KAFKA_SASL_USERNAME"),
        sasl_password: var("FMSFLOW_KAFKA_SASL_PASSWORD"),
        ..tls_listener().1
    };
    (cluster_file("bootstrap-sasl").1, security)
}

/// `fmsflow run --from earliest --until end` of the 2 partitions of `raw` into `lake` on 2
/// workers, talking to `brokers` with these `[kafka.security]` settings (given as
/// `FMSFLOW_KAFKA__SECURITY__…` variables): its output, within 3 minutes.
fn run_through(
    raw: &str,
    lake: &Path,
    brokers: &str,
    security: &fmsflow::connectors::kafka::KafkaSecurity,
    what: &str,
) -> std::process::Output {
    let mut cmd = run_command(raw, 2, "earliest", lake, 2);
    cmd.env("FMSFLOW_KAFKA__BROKERS", brokers)
        .env("FMSFLOW_KAFKA__SECURITY__PROTOCOL", &security.protocol);
    for (key, value) in security.given() {
        cmd.env(format!("FMSFLOW_KAFKA__SECURITY__{}", key.to_uppercase()), value);
    }
    common::wait_bounded(
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(),
        Duration::from_secs(180),
        what,
    )
}

/// [`run_through`] into the lake `lake2` of `dir`, which must fail at start: its stderr.
fn refused_through(
    raw: &str,
    dir: &Path,
    brokers: &str,
    security: &fmsflow::connectors::kafka::KafkaSecurity,
    what: &str,
) -> String {
    let out = run_through(raw, &dir.join("lake2"), brokers, security, what);
    assert!(!out.status.success(), "{what} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_engine_reads_and_writes_through_the_brokers_tls_listener() {
    common::python();
    let raw = unique("tls");
    let records = produce_generated(&raw, 2, 1, "0.02");
    let dir = tempfile::tempdir().unwrap();
    let (tls, security) = tls_listener();
    // Every record read over TLS, the dead letters written over TLS.
    let lake = dir.path().join("lake");
    let out = run_through(&raw, &lake, &tls, &security, "fmsflow run over TLS");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = common::read_lake(&lake);
    let letters: u64 = dead_letters_by_rule(&format!("{raw}.rejects")).values().sum();
    assert!(letters > 0);
    assert_eq!(
        v["readings"].as_u64().unwrap() + letters,
        records.len() as u64,
        "every record read over TLS is a reading or a dead letter: {v}"
    );
    // A CA that did not sign the brokers' certificates: refused, with the TLS error named.
    let wrong = dir.path().join("other-ca.pem");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=other CA",
        ])
        .arg("-keyout")
        .arg(dir.path().join("other-ca.key"))
        .arg("-out")
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let wrong_ca = fmsflow::connectors::kafka::KafkaSecurity {
        ssl_ca_location: wrong.display().to_string(),
        ..security
    };
    let err = refused_through(
        &raw,
        dir.path(),
        &tls,
        &wrong_ca,
        "fmsflow run over TLS with a CA that did not sign the brokers' certificates",
    );
    assert!(
        err.to_lowercase().contains("ssl") || err.to_lowercase().contains("certificate"),
        "the error names the TLS failure: {err}"
    );
}

/// The engine logs in to the SASL_SSL listener with PLAIN (the test's own producer and
/// consumer with SCRAM-SHA-256), and a wrong password stops it at start, naming the settings.
#[test]
fn the_engine_reads_and_writes_through_the_brokers_sasl_listener() {
    common::python();
    let raw = unique("sasl");
    let (sasl, scram) = sasl_listener("SCRAM-SHA-256");
    let (_, plain) = sasl_listener("PLAIN");
    // The raw records produced as the test user.
    let records = generated(1, "0.02");
    create_topic(&raw, 2);
    let producer = fmsflow::connectors::kafka::KafkaProducer::with(&sasl, &scram).unwrap();
    common::kafka::produce_through(&producer, &raw, &records);
    // Every record read over SASL_SSL, the dead letters written over it.
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let out = run_through(&raw, &lake, &sasl, &plain, "fmsflow run over SASL_SSL");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = common::read_lake(&lake);
    let consumer = fmsflow::connectors::kafka::base_config(&sasl, &scram);
    let letters = common::kafka::consume_all_with(&format!("{raw}.rejects"), &consumer).len() as u64;
    assert!(letters > 0);
    assert_eq!(
        v["readings"].as_u64().unwrap() + letters,
        records.len() as u64,
        "every record read over SASL_SSL is a reading or a dead letter: {v}"
    );
    // A wrong password: refused at start, the error naming the failed authentication and the
    // settings to check, and showing neither password.
    let wrong = fmsflow::connectors::kafka::KafkaSecurity {
        sasl_password: "not-the-password".into(),
        ..plain.clone()
    };
    let err = refused_through(
        &raw,
        dir.path(),
        &sasl,
        &wrong,
        "fmsflow run over SASL_SSL with a wrong password",
    );
    assert!(
        err.contains("SASL authentication") && err.contains("kafka.security.sasl_username"),
        "the error names the failed authentication and the settings: {err}"
    );
    assert!(
        !err.contains(&plain.sasl_password) && !err.contains("not-the-password"),
        "the error shows a password: {err}"
    );
}
