//! The lake's storage backends, one suite written once and run on each: a local directory
//! and S3 (a real s3s-fs server on 127.0.0.1, which checks request signatures; `scripts/test`
//! starts it with `scripts/s3`). Then a whole replay into S3 gives the same files, byte for
//! byte, as the same replay into a local directory.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::kafka::{http_get, try_http_get, Killed};
use fmsflow_dataflows::time::{format_rfc3339, parse_rfc3339, HOUR_MS};
use serde_json::Value;

use fmsflow::lake::s3::{S3Options, S3Storage};
use fmsflow::lake::{local::LocalStorage, Storage};

/// Bytes that do not repeat in any short period (so no layer can pass by compressing them).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `fmsflow run --source file:<input> --lake <lake> --workers <workers>` with these
/// environment variables (and the test S3 server's settings), not yet started.
fn replay_command(input: &std::path::Path, lake: &str, workers: usize, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(common::bin());
    cmd.args(["run", "--workers", &workers.to_string(), "--source"])
        .arg(format!("file:{}", input.display()))
        .arg("--lake")
        .arg(lake)
        .env("FMSFLOW_LAKE__S3_ENDPOINT", common::s3::endpoint())
        .env("FMSFLOW_LAKE__S3_PATH_STYLE", "true")
        .envs(env.iter().copied());
    cmd
}

/// Runs [`replay_command`]; fails if the run fails, or if the lake it leaves is not whole
/// and committed ([`common::assert_committed`]).
fn replay_into(input: &std::path::Path, lake: &str, workers: usize, env: &[(&str, &str)]) {
    let out = replay_command(input, lake, workers, env).output().unwrap();
    assert!(
        out.status.success(),
        "run into {lake}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::assert_committed(lake);
}

/// `fmsflow gen` of `devices` × `hours` with 2 % dirty records, into `dir/in.ndjson`.
fn generated_input(dir: &std::path::Path, devices: u32, hours: u32) -> std::path::PathBuf {
    generated_input_late(dir, devices, hours, 0.0)
}

/// [`generated_input`] with a share `late` of readings delivered up to 30 minutes late.
fn generated_input_late(dir: &std::path::Path, devices: u32, hours: u32, late: f64) -> std::path::PathBuf {
    let input = dir.join("in.ndjson");
    let gen = Command::new(common::bin())
        .args(["gen", "--devices", &devices.to_string(), "--hours", &hours.to_string()])
        .args(["--late-rate", &late.to_string()])
        .args(["--dirty-rate", "0.02", "--out"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    input
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// What every backend must do. `big` is the size of the large object written (over the
/// backend's multipart threshold where it has one).
fn suite(s: &dyn Storage, big: usize) {
    let a = "readings/dt=2025-07-07/hour=08/part-00000-w000.parquet";
    let b = "readings/dt=2025-07-07/hour=09/part-00000-w001.parquet";
    let c = "hourly/dt=2025-07-07/hour=08/part-00000.parquet";
    let near = "readingsx/dt=2025-07-07/hour=08/part-00000-w000.parquet";

    // Nothing yet: no object, no keys, and deleting nothing is no error.
    assert_eq!(s.get(a).unwrap(), None, "{}", s.describe());
    assert!(s.list("readings").unwrap().is_empty());
    s.delete(a).unwrap();

    s.put_atomic(a, b"one").unwrap();
    s.put_atomic(b, b"two").unwrap();
    s.put_atomic(c, b"three").unwrap();
    s.put_atomic(near, b"near").unwrap();
    assert_eq!(s.get(a).unwrap().as_deref(), Some(&b"one"[..]));
    assert_eq!(s.get(c).unwrap().as_deref(), Some(&b"three"[..]));

    // A folder lists every key under it at any depth, and nothing of a folder whose name
    // only starts the same; a trailing slash changes nothing.
    assert_eq!(sorted(s.list("readings").unwrap()), vec![a.to_string(), b.to_string()]);
    assert_eq!(sorted(s.list("readings/").unwrap()), vec![a.to_string(), b.to_string()]);
    assert_eq!(s.list("readings/dt=2025-07-07/hour=09").unwrap(), vec![b.to_string()]);
    assert_eq!(s.list("hourly").unwrap(), vec![c.to_string()]);
    assert!(s.list("quality").unwrap().is_empty());

    // A write replaces the whole object.
    s.put_atomic(a, b"uno, replaced").unwrap();
    assert_eq!(s.get(a).unwrap().as_deref(), Some(&b"uno, replaced"[..]));

    // An empty object, and a large one.
    s.put_atomic("rejects/empty.parquet", b"").unwrap();
    assert_eq!(s.get("rejects/empty.parquet").unwrap().as_deref(), Some(&b""[..]));
    let large = noise(big, 7);
    s.put_atomic("rejects/large.parquet", &large).unwrap();
    assert!(
        s.get("rejects/large.parquet").unwrap().unwrap() == large,
        "the large object came back different"
    );

    // Deleting removes the object and its key, once.
    s.delete(a).unwrap();
    s.delete(a).unwrap();
    assert_eq!(s.get(a).unwrap(), None);
    assert_eq!(s.list("readings").unwrap(), vec![b.to_string()]);
}

#[test]
fn a_local_directory_passes_the_storage_suite() {
    let dir = tempfile::tempdir().unwrap();
    suite(&LocalStorage::new(dir.path().join("lake"), true), 12 << 20);
}

#[test]
fn s3_passes_the_storage_suite_with_multipart_uploads() {
    let bucket = common::s3::bucket("suite");
    // Parts of the least size S3 takes, so the 12 MiB object goes up in 3 parts.
    let opts = S3Options {
        multipart_threshold: 5 << 20,
        part_size: 5 << 20,
        ..common::s3::options()
    };
    suite(&S3Storage::open(&bucket, "lake/", &opts).unwrap(), 12 << 20);
    // The same bucket under another prefix is another lake.
    let other = S3Storage::open(&bucket, "other", &opts).unwrap();
    assert!(other.list("readings").unwrap().is_empty());
}

#[test]
fn s3_refuses_a_missing_bucket_and_wrong_keys_at_open() {
    let opts = common::s3::options();
    let missing = match S3Storage::open("no-such-bucket-fmsflow", "", &opts) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a missing bucket opened"),
    };
    assert!(missing.contains("no-such-bucket-fmsflow"), "{missing}");

    let bucket = common::s3::bucket("keys");
    let out = Command::new(common::bin())
        .args(["run", "--source", "file:/nonexistent/*.ndjson", "--lake"])
        .arg(format!("s3://{bucket}/lake"))
        .env("FMSFLOW_LAKE__S3_ENDPOINT", common::s3::endpoint())
        .env("FMSFLOW_LAKE__S3_PATH_STYLE", "true")
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a run with a wrong secret key succeeded");
    assert!(stderr.contains(&bucket) && stderr.contains("credentials"), "{stderr}");
    assert!(!stderr.contains("not-the-secret"), "the secret was printed: {stderr}");
}

/// A TCP relay on 127.0.0.1 to `target` that, once `stall` is set, passes on only the first
/// `keep` bytes of each answer it relays from then on and holds back the rest (a connection
/// that stops delivering in the middle of an answer); its address.
fn stalling_relay(
    target: std::net::SocketAddr,
    stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
    keep: usize,
) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering::SeqCst;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(target) else {
                continue;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
            });
            let (mut s_in, mut c_out, stall) = (server, client, stall.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut passed_while_stalled = 0;
                while let Ok(n) = s_in.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut n = n;
                    if stall.load(SeqCst) {
                        n = n.min(keep.saturating_sub(passed_while_stalled));
                        passed_while_stalled += n;
                    }
                    if c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn an_s3_read_whose_answer_stalls_is_cut_off_and_tried_again() {
    use std::sync::atomic::Ordering::SeqCst;
    let bucket = common::s3::bucket("stall");
    let endpoint = common::s3::endpoint();
    let target = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("the test server's endpoint is http://IP:PORT");
    let stall = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Headers and the start of the body pass; the rest of the megabyte does not.
    let relay = stalling_relay(target, stall.clone(), 2000);
    let opts = S3Options {
        endpoint: Some(format!("http://{relay}")),
        max_attempts: 2,
        attempt_timeout: std::time::Duration::from_millis(500),
        ..common::s3::options()
    };
    let s3 = std::sync::Arc::new(S3Storage::open(&bucket, "lake", &opts).unwrap());
    let object = noise(1 << 20, 7);
    s3.put_atomic("readings/x.bin", &object).unwrap();
    stall.store(true, SeqCst);
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = s3.clone();
    std::thread::spawn(move || tx.send(reader.get("readings/x.bin").map(|b| b.map(|b| b.len()))));
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("a read whose answer stalled was never given up");
    let e = got.expect_err("a read whose answer stalled succeeded").to_string();
    assert!(e.contains("readings/x.bin") && e.contains("did not come whole"), "{e}");
    // Once the connection delivers again, the same storage reads the object whole.
    stall.store(false, SeqCst);
    assert_eq!(s3.get("readings/x.bin").unwrap(), Some(object));
}

/// Generates 20 devices × 3 hours of readings, replays them into a local directory and into
/// `url`, and checks that `storage` (the lake at `url`) holds the same files, byte for byte.
/// Returns the folder holding the input and the local lake (`local/`).
fn replay_matches_local(url: &str, storage: &dyn Storage, what: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let input = generated_input(dir.path(), 20, 3);
    replay_into(
        &input,
        &format!("file://{}", dir.path().join("local").display()),
        2,
        &[],
    );
    replay_into(&input, url, 2, &[]);
    let local = LocalStorage::new(dir.path().join("local"), false);
    let mut n = 0;
    for table in ["readings", "hourly", "quality", "rejects"] {
        let keys = sorted(local.list(table).unwrap());
        assert!(!keys.is_empty(), "no {table} files");
        assert_eq!(
            keys,
            sorted(storage.list(table).unwrap()),
            "{table}: other files in {what}"
        );
        for k in keys {
            assert!(
                local.get(&k).unwrap() == storage.get(&k).unwrap(),
                "{k} differs in {what}"
            );
            n += 1;
        }
    }
    eprintln!("{n} files, the same in {what} as in the local directory");
    dir
}

#[test]
fn a_replay_into_s3_stores_the_files_a_local_replay_does() {
    let bucket = common::s3::bucket("replay");
    let s3 = S3Storage::open(&bucket, "lake", &common::s3::options()).unwrap();
    let dir = replay_matches_local(&format!("s3://{bucket}/lake"), &s3, "S3");
    // DuckDB and pyarrow read the S3 lake, through pyarrow's S3 filesystem, as they read
    // the local one.
    let (a, b) = (
        common::read_lake(&dir.path().join("local")),
        common::read_lake_at(&format!("s3://{bucket}/lake")),
    );
    common::assert_same_rows(&a, &b, ("local", "S3"));
    assert!(
        a["readings"].as_u64().unwrap() > 0 && !a["rejects"].as_object().unwrap().is_empty(),
        "{a}"
    );
    assert!(b["max_mean_error"].as_f64().unwrap() < 1e-9, "{b}");
}

#[test]
fn hdfs_passes_the_storage_suite() {
    let (_, storage) = common::hdfs::lake("suite");
    suite(storage.as_ref(), 12 << 20);
    // Temporary files of killed writes: this host's dead processes' go, as do any host's
    // untouched for an hour; this process's, and another host's recent ones, stay.
    let dir = "readings/dt=2025-07-07/hour=00";
    let host = fmsflow::lake::host_name();
    let dead = format!("{dir}/.part-00001-w000.parquet.4294967294-7@{host}.tmp");
    let live = format!("{dir}/.part-00002-w000.parquet.{}-8@{host}.tmp", std::process::id());
    let elsewhere = format!("{dir}/.part-00003-w000.parquet.4294967294-9@another-host.tmp");
    for k in [&dead, &live, &elsewhere] {
        storage.put_atomic(k, b"partial").unwrap();
    }
    assert_eq!(storage.sweep_abandoned().unwrap(), 1);
    assert_eq!(storage.get(&dead).unwrap(), None);
    assert!(storage.get(&live).unwrap().is_some() && storage.get(&elsewhere).unwrap().is_some());
    assert!(storage.list(dir).unwrap().iter().all(|k| !k.contains(".tmp")));
}

#[test]
fn hdfs_refuses_an_unreachable_namenode_at_open() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("hdfs://127.0.0.1:{port}/lake");
    let e = match fmsflow::lake::open(&url, &Default::default()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened {url} with no NameNode there"),
    };
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("is HDFS running"),
        "{e}"
    );
}

#[test]
fn a_replay_into_hdfs_stores_the_files_a_local_replay_does() {
    let (url, storage) = common::hdfs::lake("replay");
    let dir = replay_matches_local(&url, storage.as_ref(), "HDFS");
    // DuckDB and pyarrow read the files as fetched from HDFS (pyarrow's HDFS filesystem needs
    // a libhdfs.so from a Hadoop install, which the tests do not have).
    let fetched = dir.path().join("from-hdfs");
    common::hdfs::fetch(&url, &fetched);
    let (a, b) = (
        common::read_lake(&dir.path().join("local")),
        common::read_lake(&fetched),
    );
    common::assert_same_rows(&a, &b, ("local", "HDFS"));
    assert!(a["readings"].as_u64().unwrap() > 0, "{a}");
}

/// A replay in which a reading of hour 00 arrives after the hour was sealed (the watermark
/// past 01:05), into the lake at `url`. Afterwards each table shows one version of hour 00:
/// the hour's `hourly` and `quality` are one file each, rewritten with the late reading
/// counted once, and its readings are the sealed part plus one part holding the late reading.
fn late_data_leaves_one_version_of_the_hour(url: &str, storage: &dyn Storage) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("late.ndjson");
    let line = |device: u32, secs: i64, v: f64| {
        let t = 1_751_846_400 + secs; // 2025-07-07T00:00:00Z + secs
        let time = fmsflow_dataflows::time::format_rfc3339(t * 1000);
        format!(
            "{} {{\"time\": \"{time}\", \"DeviceId\": {device}, \"sensor1\": {v}, \"sensor2\": 1.5, \"sensor3\": 2.5, \
             \"motor1\": 100.0, \"motor2\": 200.0, \"motor3\": 300.0, \"isFail\": false}}\n",
            t * 1000 + 100
        )
    };
    let mut text = String::new();
    // Hour 00 and the first 10 minutes of hour 01 for devices 1 and 2, every 60 s: hour 00 is
    // sealed once a reading at 01:05 is accepted.
    for s in (0..4200).step_by(60) {
        for d in [1, 2] {
            text += &line(d, s, 10.0 + (s / 60) as f64);
        }
    }
    // The late reading: device 1 at 00:30:30, a time no other reading has, arriving at 01:10
    // (its ingest time is what a replay line carries).
    let late = line(1, 1830, 77.0);
    let (_, body) = late.split_once(' ').unwrap();
    text += &format!("{} {body}", (1_751_846_400i64 + 4200) * 1000);
    // More of hour 01, so the late reading's epoch is neither the first nor the last.
    for s in (4260..4800).step_by(60) {
        for d in [1, 2] {
            text += &line(d, s, 50.0);
        }
    }
    std::fs::write(&input, text).unwrap();
    // Small epochs: the hour is sealed several epochs before the late reading comes.
    replay_into(&input, url, 1, &[("FMSFLOW_ENGINE__BATCH", "20")]);
    let hour00 = |table: &str| sorted(storage.list(&format!("{table}/dt=2025-07-07/hour=00")).unwrap());
    assert_eq!(
        hour00("hourly"),
        vec!["hourly/dt=2025-07-07/hour=00/part-00001-w000.parquet"],
        "one hourly file for the hour, the late version (the sealed one is deleted), and nothing else"
    );
    assert_eq!(
        hour00("quality"),
        vec!["quality/dt=2025-07-07/hour=00/part-00001-w000.parquet"]
    );
    // The hour's manifest lists these files.
    let m = fmsflow::lake::manifest::Manifest::load(storage, fmsflow::lake::hour_of_key(&hour00("hourly")[0]).unwrap())
        .unwrap()
        .unwrap();
    for table in ["hourly", "quality", "readings"] {
        assert_eq!(m.files[table], hour00(table), "{m:?}");
    }
    assert_eq!(
        hour00("readings"),
        vec![
            "readings/dt=2025-07-07/hour=00/part-00000-w000.parquet",
            "readings/dt=2025-07-07/hour=00/part-00001-w000.parquet",
        ],
        "the sealed part, then one part for the late reading"
    );
    // What a reader sees: one row per device in hour 00, the late reading counted once.
    let lake = common::read_lake_at(url.strip_prefix("file://").unwrap_or(url));
    let by_hour = lake["hourly_by_hour"].as_array().unwrap();
    let h0 = by_hour.iter().find(|h| h["hour"] == 0).unwrap();
    assert_eq!(
        (h0["rows"].as_u64(), h0["count"].as_u64()),
        (Some(2), Some(121)),
        "{lake}"
    );
    assert_eq!(lake["readings_by_hour"]["2025-07-07/00"], 121, "{lake}");
    assert_eq!(lake["readings"], lake["readings_distinct"], "{lake}");
    assert!(lake["max_mean_error"].as_f64().unwrap() < 1e-9, "{lake}");
}

#[test]
fn late_data_leaves_one_version_of_the_hour_on_local_storage() {
    let dir = tempfile::tempdir().unwrap();
    let storage = LocalStorage::new(dir.path().join("lake"), false);
    late_data_leaves_one_version_of_the_hour(&format!("file://{}", dir.path().join("lake").display()), &storage);
}

#[test]
fn late_data_leaves_one_version_of_the_hour_on_s3() {
    let bucket = common::s3::bucket("late");
    let storage = S3Storage::open(&bucket, "lake", &common::s3::options()).unwrap();
    late_data_leaves_one_version_of_the_hour(&format!("s3://{bucket}/lake"), &storage);
}

/// While a replay with late data commits version after version of its hours, a reader that
/// follows the manifests reads the hours again and again: each time, the hour it reads is
/// whole and of one version (the files listed are there, one version of each table, the
/// hourly counts equal to the readings). A file it misses must be one a newer commit of
/// its hour replaced, and the reader then reads the hour again, as docs/LAKE.md tells
/// readers to.
fn readers_following_the_manifests_see_whole_hours(url: &str, hours: u32, env: &[(&str, &str)], min_read: usize) {
    use fmsflow::lake::manifest::{self, Manifest, VerifyError};
    let dir = tempfile::tempdir().unwrap();
    let input = generated_input_late(dir.path(), 10, hours, 0.05);
    let storage = common::open_lake(url);
    // Small epochs: many commits, each hour rewritten many times by late readings.
    let mut run = replay_command(&input, url, 2, &[&[("FMSFLOW_ENGINE__BATCH", "50")], env].concat())
        .stderr(std::fs::File::create(dir.path().join("run.log")).unwrap())
        .spawn()
        .unwrap();
    // (hour, commit) of every version read whole, and reads to do again.
    let (mut seen, mut retried) = (std::collections::BTreeSet::new(), 0);
    let started = std::time::Instant::now();
    let status = 'run: loop {
        // The two newest hours: those the run is committing.
        let mut hours: Vec<i64> = storage
            .list(manifest::DIR)
            .unwrap()
            .iter()
            .filter_map(|k| manifest::hour_of(k))
            .collect();
        hours.sort_unstable();
        for &hour in hours.iter().rev().take(2) {
            let checked = Manifest::load(storage.as_ref(), hour)
                .map_err(|e| VerifyError::Retry(e.to_string()))
                .and_then(|m| {
                    Ok((
                        m.as_ref()
                            .map(|m| manifest::verify_hour(storage.as_ref(), hour, m))
                            .transpose()?,
                        m,
                    ))
                });
            match checked {
                Ok((_, Some(m))) => {
                    seen.insert((hour, m.commit));
                }
                Ok((_, None)) => {}
                // (A failed read: the reader reads the hour again.)
                Err(VerifyError::Retry(e)) => {
                    eprintln!("again: {e}");
                    retried += 1
                }
                Err(e) => {
                    let _ = run.kill();
                    panic!("a reader following the manifests saw a broken hour: {e}");
                }
            }
            if let Some(status) = run.try_wait().unwrap() {
                break 'run status;
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(300),
            "the replay did not end in 300 s"
        );
    };
    let log = std::fs::read_to_string(dir.path().join("run.log")).unwrap();
    assert!(status.success(), "{log}");
    let end = common::assert_committed(url);
    let last: std::collections::BTreeMap<i64, u64> = manifest::load_all(storage.as_ref())
        .unwrap()
        .into_iter()
        .map(|(h, m)| (h, m.commit))
        .collect();
    // Versions read while the run went on: older than the hour's last.
    let during = seen.iter().filter(|(h, c)| last.get(h).is_some_and(|l| c < l)).count();
    eprintln!(
        "{during} versions of hours read whole while the run went on ({} in all), {retried} read again; \
         at the end {} hours, {} commits",
        seen.len(),
        end.hours,
        end.commits
    );
    assert!(
        during >= min_read,
        "the reader read too few versions during the run to test anything: {seen:?}"
    );
}

#[test]
fn readers_following_the_manifests_see_whole_hours_on_local_storage() {
    let dir = tempfile::tempdir().unwrap();
    // Replaced versions are deleted at once: the reader reads hours again when it misses one.
    readers_following_the_manifests_see_whole_hours(
        &format!("file://{}", dir.path().join("lake").display()),
        24,
        &[],
        20,
    );
}

#[test]
fn readers_following_the_manifests_see_whole_hours_on_s3() {
    let bucket = common::s3::bucket("readers");
    // A reader of s3s-fs takes some 40 ms a file, longer for an hour than the commits in
    // between: replaced versions stay for it a while (and are deleted at the run's end), and
    // larger epochs give the hours fewer files. It reads a few versions during the run (2 to
    // 5 in trials); the local test is the one that reads hundreds.
    readers_following_the_manifests_see_whole_hours(
        &format!("s3://{bucket}/lake"),
        24,
        &[("FMSFLOW_LAKE__KEEP_REPLACED", "30s"), ("FMSFLOW_ENGINE__BATCH", "300")],
        1,
    );
}

/// `lake.device_partitions`: the readings of each hour go one folder deeper, by device, and
/// DuckDB and pyarrow read the same tables from such a lake, locally and on S3, as from the
/// usual layout.
#[test]
fn device_partitions_hold_the_same_rows_locally_and_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let input = generated_input(dir.path(), 5, 2);
    let by_device = [("FMSFLOW_LAKE__DEVICE_PARTITIONS", "true")];
    let plain = dir.path().join("plain");
    replay_into(&input, &format!("file://{}", plain.display()), 2, &[]);
    let local = dir.path().join("by-device");
    replay_into(&input, &format!("file://{}", local.display()), 2, &by_device);
    let bucket = common::s3::bucket("by-device");
    replay_into(&input, &format!("s3://{bucket}/lake"), 2, &by_device);

    let keys = sorted(LocalStorage::new(local.clone(), false).list("readings").unwrap());
    assert!(
        keys.iter()
            .any(|k| k.starts_with("readings/dt=2025-07-07/hour=00/device=3/part-")),
        "{keys:?}"
    );
    let s3 = S3Storage::open(&bucket, "lake", &common::s3::options()).unwrap();
    assert_eq!(keys, sorted(s3.list("readings").unwrap()), "other readings files in S3");
    let (a, b, c) = (
        common::read_lake(&plain),
        common::read_lake(&local),
        common::read_lake_at(&format!("s3://{bucket}/lake")),
    );
    common::assert_same_rows(&a, &b, ("usual layout", "device folders"));
    common::assert_same_rows(&b, &c, ("local", "S3"));
    assert!(a["readings"].as_u64().unwrap() > 3_000, "{a}");
    for lake in [&b, &c] {
        assert!(lake["max_mean_error"].as_f64().unwrap() < 1e-9, "{lake}");
    }
}

/// `fmsflow files` lists what the manifests list, and DuckDB reads its `--sql` expression;
/// `fmsflow verify` passes a whole lake; both refuse a folder with no lake in it.
#[test]
fn files_and_verify_read_the_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let input = generated_input_late(dir.path(), 5, 3, 0.05);
    let lake = format!("file://{}", dir.path().join("lake").display());
    replay_into(&input, &lake, 2, &[("FMSFLOW_ENGINE__BATCH", "500")]);
    let fmsflow = |args: &[&str]| Command::new(common::bin()).args(args).output().unwrap();
    let storage = common::open_lake(&lake);
    let manifests = fmsflow::lake::manifest::load_all(storage.as_ref()).unwrap();
    let listed: usize = manifests
        .values()
        .map(|m| m.files.get("readings").map_or(0, Vec::len))
        .sum();
    let out = fmsflow(&["files", "--lake", &lake, "--table", "readings"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), listed);
    assert!(lines.iter().all(|l| std::path::Path::new(l).is_file()), "{lines:?}");
    // DuckDB reads the hourly table through the `--sql` expression: its counts add up to the
    // readings `verify` counts.
    let sql = fmsflow(&["files", "--lake", &lake, "--table", "hourly", "--sql"]);
    assert!(sql.status.success(), "{}", String::from_utf8_lossy(&sql.stderr));
    let expr = String::from_utf8(sql.stdout).unwrap();
    let count = Command::new(common::python())
        .args([
            "-c",
            "import duckdb, sys; print(duckdb.sql('select sum(count) from ' + sys.argv[1]).fetchall()[0][0])",
            expr.trim(),
        ])
        .output()
        .unwrap();
    assert!(count.status.success(), "{}", String::from_utf8_lossy(&count.stderr));
    let verified = fmsflow(&["verify", "--lake", &lake]);
    let report = String::from_utf8_lossy(&verified.stdout).to_string();
    assert!(
        verified.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    let readings = common::assert_committed(&lake).readings;
    assert!(
        report.contains(&format!("{readings} readings")) && report.contains(" 0 file(s) not in any manifest"),
        "{report}"
    );
    assert_eq!(String::from_utf8_lossy(&count.stdout).trim(), readings.to_string());
    // A folder with no lake: both say so and fail.
    let empty = format!("file://{}", dir.path().join("nothing").display());
    for args in [
        vec!["files", "--lake", &empty, "--table", "hourly"],
        vec!["verify", "--lake", &empty],
    ] {
        let out = fmsflow(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("no manifest"), "{args:?}: {err}");
    }
}

/// A replay (2 workers) of `input` into `lake` that serves the query API and keeps serving:
/// the process (killed when dropped) and the API's port, once every output is stored.
fn serving(input: &std::path::Path, lake: &str, env: &[(&str, &str)]) -> (Killed, u16) {
    let port = common::free_ports(1)[0];
    let child = replay_command(input, lake, 2, env)
        .args(["--http", &format!("127.0.0.1:{port}"), "--keep-serving"])
        .env("FMSFLOW_API__RATE_LIMIT", "0")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let killed = Killed(child);
    common::wait_for(
        &format!("the replay into {lake} to complete"),
        Duration::from_secs(180),
        || try_http_get(port, "/api/v1/status").is_ok_and(|b| b.contains("\"complete\":true")),
    );
    (killed, port)
}

/// An answer without its `as_of`.
fn answer(port: u16, path: &str) -> Value {
    let body = http_get(port, path);
    let mut v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
    v.as_object_mut().unwrap().remove("as_of");
    v
}

/// Hours older than `api.keep_hours` are answered from the lake at `url` (read again for
/// every query), as the view answers them from memory.
fn older_hours_are_answered_from_the_lake(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = generated_input_late(dir.path(), 20, 4, 0.05);
    let local = format!("file://{}", dir.path().join("local").display());
    let (_memory_run, memory) = serving(&input, &local, &[]);
    let from_lake = [("FMSFLOW_API__KEEP_HOURS", "1"), ("FMSFLOW_API__LAKE_CACHE_HOURS", "0")];
    let (_lake_run, lake) = serving(&input, url, &from_lake);
    let status = answer(memory, "/api/v1/status");
    let newest = parse_rfc3339(status["watermark"].as_str().unwrap())
        .unwrap()
        .div_euclid(HOUR_MS);
    let hour = |h: i64| format_rfc3339(h * HOUR_MS);
    let mut paths: Vec<String> = (newest - 4..=newest)
        .map(|h| format!("/api/v1/fleet/hourly?hour={}", hour(h)))
        .collect();
    let range = format!("from={}&to={}", hour(newest - 4), hour(newest + 1));
    paths.push(format!("/api/v1/quality?{range}&by_device=5"));
    paths.push(format!("/api/v1/quality?{range}&device=7"));
    paths.extend([1, 7, 20].map(|d| format!("/api/v1/devices/{d}/hourly?{range}")));
    for p in &paths {
        assert_eq!(
            answer(lake, p),
            answer(memory, p),
            "GET {p}: from {url} and from memory"
        );
    }
    // The hours before the newest two came from the lake: they have the fleet's 20 devices
    // (and a few more ids of dirty records).
    for h in newest - 3..newest - 1 {
        let a = answer(lake, &format!("/api/v1/fleet/hourly?hour={}", hour(h)));
        assert!(a["devices"].as_array().unwrap().len() >= 20, "{a}");
    }
    eprintln!("{} answers from {url} equal the view's from memory", paths.len());
}

#[test]
fn older_hours_are_answered_from_the_lake_on_s3() {
    let bucket = common::s3::bucket("older-hours");
    older_hours_are_answered_from_the_lake(&format!("s3://{bucket}/lake"));
}

#[test]
fn older_hours_are_answered_from_the_lake_on_hdfs() {
    let (url, _) = common::hdfs::lake("older-hours");
    older_hours_are_answered_from_the_lake(&url);
}
