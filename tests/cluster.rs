//! The engine as a timely cluster of processes on loopback (issue 6): the same sealed lake
//! as one process of one worker; start-up that names a missing or mismatched process within
//! its bound; a lost process stops the others with the documented error; SIGTERM drains.
//! (Losing a process mid-run and resuming the whole cluster from the checkpoint is in
//! tests/kafka.rs, which has the brokers.)

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Writes `hours` of generated readings of 100 devices, 2 % dirty and 2 % late.
fn input(dir: &Path, hours: u32, seed: u64) -> std::path::PathBuf {
    let path = dir.join("in.ndjson");
    let out = Command::new(common::bin())
        .args(["gen", "--hours", &hours.to_string(), "--seed", &seed.to_string()])
        .args(["--dirty-rate", "0.02", "--late-rate", "0.02", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    path
}

/// `processes` loopback addresses for the cluster's own connections.
fn hosts(processes: usize) -> String {
    common::free_ports(processes)
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `fmsflow run` of `input` into `lake`, process `process` of `hosts` (none: alone).
fn run(input: &Path, lake: &Path, workers: usize, cluster: Option<(&str, usize)>, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(common::bin());
    cmd.args(["run", "--source"])
        .arg(format!("file:{}", input.display()))
        .args(["--lake", &format!("file://{}", lake.display())])
        .args(["--workers", &workers.to_string()])
        .env("FMSFLOW_ENGINE__BATCH", "2000")
        .env("FMSFLOW_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((hosts, process)) = cluster {
        cmd.args(["--hosts", hosts, "--process", &process.to_string()]);
    }
    cmd
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The two lakes hold the same rows, table by table (tests/lake_rows.py).
fn assert_same_rows(a: &Path, b: &Path) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lake_rows.py");
    let out = Command::new(common::python())
        .arg(script)
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the lakes differ: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn three_processes_of_two_workers_seal_the_same_lake_as_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let seed = common::seed("FMSFLOW_TEST_SEED");
    let input = input(dir.path(), 5, seed);
    let single = dir.path().join("single");
    let o = run(&input, &single, 1, None, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let cluster = dir.path().join("cluster");
    let h = hosts(3);
    // Started in reverse order: each waits for the others.
    let children: Vec<Child> = (0..3)
        .rev()
        .map(|i| run(&input, &cluster, 2, Some((&h, i)), &[]).spawn().unwrap())
        .collect();
    for (n, c) in children.into_iter().enumerate() {
        let o = common::wait_bounded(c, Duration::from_secs(300), "a cluster process");
        assert!(o.status.success(), "process {}: {}", 2 - n, stderr(&o));
    }
    let v = common::assert_committed(&format!("file://{}", cluster.display()));
    let rows = assert_same_rows(&single, &cluster);
    eprintln!(
        "seed {seed}: the same rows at 1×1 and 3×2: {rows}; {} hours committed",
        v.hours
    );
    assert!(rows["readings"].as_u64().unwrap() > 100_000, "{rows}");
    assert!(rows["rejects"].as_u64().unwrap() > 1_000, "{rows}");
}

#[test]
fn a_missing_or_mismatched_process_is_named_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), 1, 1);
    let lake = dir.path().join("lake");
    let h = hosts(3);
    let addr: Vec<&str> = h.split(',').collect();
    // Process 1 alone: 0 never answers, 2 never dials.
    let t0 = Instant::now();
    let child = run(
        &input,
        &lake,
        1,
        Some((&h, 1)),
        &[("FMSFLOW_CLUSTER__CONNECT_TIMEOUT", "3s")],
    )
    .spawn()
    .unwrap();
    let o = common::wait_bounded(child, Duration::from_secs(60), "a process waiting for its peers");
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "gave up before the bound: {err}"
    );
    for (i, a) in [(0, addr[0]), (2, addr[2])] {
        assert!(err.contains(&format!("process {i} ({a}")), "{err}");
    }
    assert!(err.contains("cluster.connect_timeout"), "{err}");

    // Two processes that disagree on --workers both stop, naming the other and the flag.
    let h2 = hosts(2);
    let a = run(&input, &lake, 1, Some((&h2, 0)), &[]).spawn().unwrap();
    let b = run(&input, &lake, 2, Some((&h2, 1)), &[]).spawn().unwrap();
    for (c, other) in [(a, 1), (b, 0)] {
        let o = common::wait_bounded(c, Duration::from_secs(60), "a mismatched process");
        let err = stderr(&o);
        assert!(!o.status.success());
        assert!(
            err.contains(&format!("process {other}")) && err.contains("--workers"),
            "{err}"
        );
    }

    // Bad host lists fail at once, naming the setting.
    for (args, field) in [
        (
            vec!["--hosts", "127.0.0.1:1,127.0.0.1:2", "--process", "2"],
            "cluster.process",
        ),
        (vec!["--process", "0"], "cluster.process"),
        (
            vec!["--hosts", "127.0.0.1:1,127.0.0.1:1", "--process", "0"],
            "cluster.hosts",
        ),
        (
            vec!["--hosts", "127.0.0.1,127.0.0.1:2", "--process", "0"],
            "cluster.hosts",
        ),
    ] {
        let o = Command::new(common::bin())
            .args(["run", "--source"])
            .arg(format!("file:{}", input.display()))
            .args(["--lake", &format!("file://{}", lake.display())])
            .args(&args)
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(stderr(&o).contains(field), "{args:?}: {}", stderr(&o));
    }
    let file = dir.path().join("hosts");
    std::fs::write(&file, format!("# the cluster\n{}\n\n{} # twice\n", addr[0], addr[0])).unwrap();
    let o = Command::new(common::bin())
        .args(["run", "--source"])
        .arg(format!("file:{}", input.display()))
        .args(["--lake", &format!("file://{}", lake.display())])
        .args(["--process", "0", "--hosts-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains("cluster.hosts_file") && stderr(&o).contains("twice"),
        "{}",
        stderr(&o)
    );
}

/// Starts a paced 3-process replay and waits until each process has sent records.
fn paced_cluster(input: &Path, lake: &Path, hosts: &str) -> Vec<Child> {
    let children: Vec<Child> = (0..3)
        .map(|i| {
            run(input, lake, 1, Some((hosts, i)), &[("FMSFLOW_ENGINE__BATCH", "200")])
                .args(["--rate", "2000"])
                .spawn()
                .unwrap()
        })
        .collect();
    // Until the lake has its first files: the cluster is up and sealing.
    common::wait_for("the cluster's first sealed hour", Duration::from_secs(120), || {
        std::fs::read_dir(lake.join("readings")).is_ok_and(|mut d| d.next().is_some())
    });
    children
}

#[test]
fn a_lost_process_stops_the_others_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), 6, 2);
    let lake = dir.path().join("lake");
    let h = hosts(3);
    let mut children = paced_cluster(&input, &lake, &h);
    let lost = children.remove(2);
    unsafe { libc::kill(lost.id() as i32, libc::SIGKILL) };
    let _ = common::wait_bounded(lost, Duration::from_secs(30), "the killed process");
    let addr2 = h.split(',').nth(2).unwrap().to_string();
    let mut named_the_killed = false;
    for (i, c) in children.into_iter().enumerate() {
        let o = common::wait_bounded(c, Duration::from_secs(60), "a process whose peer was killed");
        let err = stderr(&o);
        assert!(!o.status.success(), "process {i} succeeded without its peer: {err}");
        // A survivor may see the other survivor stop (on the same loss) before it sees the
        // killed process's socket close: it names whichever it lost first.
        assert!(
            err.contains("lost process ") && err.contains("restart every process"),
            "process {i}: {err}"
        );
        named_the_killed |= err.contains(&format!("lost process 2 of the cluster ({addr2})"));
        assert!(!err.contains("panicked"), "process {i} reported a raw panic: {err}");
    }
    assert!(named_the_killed, "no survivor named the killed process 2 ({addr2})");
}

#[test]
fn sigterm_drains_every_process_and_leaves_a_whole_lake() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), 6, 3);
    let lake = dir.path().join("lake");
    let h = hosts(3);
    let children = paced_cluster(&input, &lake, &h);
    for c in &children {
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    let mut total = 0u64;
    for (i, c) in children.into_iter().enumerate() {
        let o = common::wait_bounded(c, Duration::from_secs(60), "a process told to stop");
        let err = stderr(&o);
        assert!(o.status.success(), "process {i}: {err}");
        assert!(err.contains("stopping:"), "process {i}: {err}");
        let out = String::from_utf8_lossy(&o.stdout);
        total += out
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("process {i}: no `replayed N records` line: {out}"));
    }
    // Stopped early (the paced replay had minutes to go), and what was read is committed
    // whole.
    assert!(total < 6 * 100 * 360, "the replay ran to its end: {total} records");
    let v = common::assert_committed(&format!("file://{}", lake.display()));
    eprintln!("stopped after {total} records; {} hours committed", v.hours);
}
