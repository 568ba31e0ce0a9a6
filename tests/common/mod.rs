//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod hdfs;
pub mod kafka;
pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The `fmsflow` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fmsflow"))
}

/// The Python that has pyarrow and duckdb: `FMSFLOW_PYTHON` (set by `scripts/test`), else
/// `python3`. Fails loudly when the packages are missing.
pub fn python() -> String {
    let py = std::env::var("FMSFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import duckdb, pyarrow"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{py} cannot import duckdb and pyarrow: run the tests with `bash scripts/test`, which installs them"
    );
    py
}

/// Opens the lake at `url` as the engine does: `file://`, `s3://` on the test server, or
/// `hdfs://` on the test HDFS.
pub fn open_lake(url: &str) -> std::sync::Arc<dyn fmsflow::lake::Storage> {
    let opts = fmsflow::lake::StorageOptions {
        fsync: false,
        s3: if url.starts_with("s3://") {
            s3::options()
        } else {
            Default::default()
        },
    };
    fmsflow::lake::open(url, &opts).unwrap_or_else(|e| panic!("opening {url}: {e}"))
}

/// Checks the lake at `url` after its runs have ended, as a reader that follows the hours'
/// manifests sees it (`lake::manifest::verify`: every listed file there, one version of each
/// hour's tables, hourly counts equal to the readings), and that every file of the tables is
/// listed by a manifest: nothing is left uncommitted or superseded.
pub fn assert_committed(url: &str) -> fmsflow::lake::manifest::Verified {
    assert_committed_in(open_lake(url).as_ref(), url)
}

/// [`assert_committed`] of an open lake (`url` names it in messages).
pub fn assert_committed_in(storage: &dyn fmsflow::lake::Storage, url: &str) -> fmsflow::lake::manifest::Verified {
    let v = fmsflow::lake::manifest::verify(storage).unwrap_or_else(|e| panic!("{url}: {e}"));
    assert!(
        v.unlisted.is_empty(),
        "{url}: files no manifest lists: {:?}",
        v.unlisted
    );
    assert!(v.hours > 0 && v.readings > 0, "{url}: no committed hour: {v:?}");
    v
}

/// Checks, after a kill, that a reader following the lake's manifests sees whole hours
/// (`lake::manifest::verify`). A read that may succeed when tried again (the server still
/// finishing a killed client's request) is tried again, for at most 20 s; a broken lake
/// fails at once.
pub fn assert_readable_after_kill(storage: &dyn fmsflow::lake::Storage, when: &str) {
    use fmsflow::lake::manifest::{verify, VerifyError};
    wait_for(
        &format!("a lake that reads whole {when}"),
        Duration::from_secs(20),
        || match verify(storage) {
            Ok(_) => true,
            Err(VerifyError::Broken(e)) => {
                panic!("{when}, a reader following the manifests sees a broken lake: {e}")
            }
            Err(VerifyError::Retry(e)) => {
                eprintln!("{when}: reading the lake again: {e}");
                false
            }
        },
    );
}

/// Reads a lake with DuckDB and pyarrow (tests/read_lake.py) and returns its JSON summary.
pub fn read_lake(dir: &Path) -> serde_json::Value {
    read_lake_at(&dir.display().to_string())
}

/// [`read_lake`] of a lake directory or an `s3://bucket/prefix` lake (read through
/// pyarrow's S3 filesystem at `AWS_ENDPOINT_URL`, with the keys of the environment).
pub fn read_lake_at(location: &str) -> serde_json::Value {
    read_lake_with(location, &[])
}

/// [`read_lake_at`] with these environment variables set for the reader (another
/// `AWS_ENDPOINT_URL`, say).
pub fn read_lake_with(location: &str, env: &[(&str, &str)]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/read_lake.py");
    let out = Command::new(python())
        .arg(script)
        .arg(location)
        .envs(env.iter().copied())
        .output()
        .expect("running read_lake.py");
    assert!(
        out.status.success(),
        "read_lake.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("read_lake.py prints JSON")
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The entries of a [`read_lake_at`] summary that depend only on the rows (not on how they
/// are split into files).
pub const ROW_SUMMARY: [&str; 10] = [
    "readings",
    "readings_distinct",
    "readings_bad_hour",
    "readings_by_hour",
    "hourly_by_hour",
    "quality",
    "rejects",
    "hourly_fails",
    "readings_fails",
    "pyarrow_rows",
];

/// Fails unless two lakes' summaries agree on every entry of [`ROW_SUMMARY`], naming the
/// entry and the two lakes (`names`) when they do not.
pub fn assert_same_rows(a: &serde_json::Value, b: &serde_json::Value, names: (&str, &str)) {
    for key in ROW_SUMMARY {
        assert_eq!(
            a[key], b[key],
            "{key}: {} {} against {} {}",
            names.0, a[key], names.1, b[key]
        );
    }
}

/// A random seed for a randomized test: `var` from the environment when set (to rerun a
/// failure), else one from the clock. Printed, so a failure can be rerun.
pub fn seed(var: &str) -> u64 {
    let seed = std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            % 1_000_000_000
    });
    eprintln!("seed: {var}={seed}");
    seed
}

/// A setting of the fault tests from the environment, `default` when unset (`scripts/faults`
/// sets longer ones).
pub fn fault_setting(var: &str, default: u32) -> u32 {
    std::env::var(var).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{var}={v:?} is not a whole number"))
    })
}

/// `n` ports on 127.0.0.1 that were free a moment ago (bound at once, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// Waits for `child` at most `limit`; kills it and fails if it is still running then.
pub fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "{what} still running after {limit:?}:\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}
