//! The README's first command, for real: `fmsflow demo --fast --duration 60s` writes a lake
//! that DuckDB and pyarrow read unchanged, with one hourly row per (device, sealed hour).

mod common;

use std::process::Command;

#[test]
fn demo_writes_a_lake_duckdb_and_pyarrow_read() {
    let py = common::python(); // fail early, before a minute of demo, if the readers are missing
    drop(py);
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let out = Command::new(common::bin())
        .args(["demo", "--fast", "--duration", "60s", "--lake"])
        .arg(format!("file://{}", lake.display()))
        .env("FMSFLOW_LOG", "warn")
        .output()
        .expect("running fmsflow demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    assert!(stderr.contains("hours sealed"), "{stderr}");

    let v = common::read_lake(&lake);
    let hours = v["hourly_by_hour"].as_array().unwrap();
    // 60 s at 360x is 6 simulated hours: at least 5 complete ones plus partial ends.
    assert!(hours.len() >= 6, "expected at least 6 hours, got {}: {v}", hours.len());
    for (i, h) in hours.iter().enumerate() {
        assert_eq!(h["rows"], h["devices"], "one row per device in {h}");
        // The first and last hours may be cut short by the demo's start and stop.
        if i > 0 && i + 1 < hours.len() {
            assert_eq!(h["rows"].as_u64().unwrap(), 100, "every device polled in hour {h}");
        }
        let key = format!("{}/{:02}", h["dt"].as_str().unwrap(), h["hour"].as_u64().unwrap());
        assert_eq!(
            h["count"], v["readings_by_hour"][&key],
            "hourly counts add up to the readings of {key}"
        );
    }
    assert_eq!(v["readings"], v["readings_distinct"], "no (device, time) twice");
    assert_eq!(
        v["readings_bad_hour"], 0,
        "every reading is in its own hour's partition"
    );
    assert_eq!(
        v["quality"]["valid"], v["readings"],
        "quality counts every accepted reading"
    );
    assert_eq!(v["hourly_fails"], v["readings_fails"]);
    assert!(v["max_mean_error"].as_f64().unwrap() < 1e-9, "{v}");
    let rejected: u64 = v["rejects"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    let counted: u64 = v["quality"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "valid")
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    assert!(rejected > 0, "the demo mixes in dirty data: {v}");
    assert_eq!(
        rejected, counted,
        "every rejection is in the dead letters and in the quality counts"
    );
    assert_eq!(v["pyarrow_rows"]["readings"], v["readings"], "pyarrow and DuckDB agree");
}

/// Ctrl-C stops the demo cleanly with everything flushed: every accepted reading it reports
/// is in the lake.
#[test]
fn ctrl_c_flushes_everything() {
    common::python();
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let log = dir.path().join("demo.log");
    let child = Command::new(common::bin())
        .args(["demo", "--fast", "--lake"])
        .arg(format!("file://{}", lake.display()))
        .env("FMSFLOW_LOG", "warn")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting fmsflow demo");
    // Wait until the first hour is sealed (a file in hourly/), then interrupt.
    common::wait_for("the first sealed hour", std::time::Duration::from_secs(120), || {
        glob::glob(&format!("{}/hourly/**/*.parquet", lake.display()))
            .unwrap()
            .next()
            .is_some()
    });
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(out.status.success(), "demo did not exit cleanly:\n{stderr}");
    assert!(stderr.contains("stopping: flushing the pipeline"), "{stderr}");
    let accepted: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("done: ").and_then(|l| l.split(" polled, ").nth(1)))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line:\n{stderr}"));
    let v = common::read_lake(&lake);
    assert_eq!(
        v["readings"].as_u64().unwrap(),
        accepted,
        "every accepted reading is in the lake"
    );
    assert_eq!(v["quality"]["valid"].as_u64().unwrap(), accepted);
}
