//! The FMS API failing for a share of the devices, on real servers: the simulator gives some
//! devices a fault (`error`: 500, `hang`: no answer within the collector's timeout,
//! `garbage`: a 200 body that is not a reading, `silence`: 503), `fmsflow collect` polls the
//! fleet into a raw topic of its own with fewer request slots than the fleet has devices, and
//! `fmsflow run` replays that topic into a lake. Nothing may be lost or doubled: the topic
//! holds exactly what the simulator served (garbage included, errors and hangs not), every
//! healthy device has its readings in the lake, the garbage is in the dead letters with its
//! rule and reason, the faulty devices' polls are counted by class in the collector's
//! metrics, and the hanging devices did not hold up the others' polls.
//!
//! Needs the Kafka cluster `scripts/test` starts (`FMSFLOW_KAFKA_BOOTSTRAP`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::kafka::{
    consume_all, create_topic, dead_letters_by_rule, http_get, kafka_env, sim_truth, start_sim, unique,
};
use fmsflow::sim::DeviceStats;

const DEVICES: u32 = 60;
/// Seconds the collector runs, one poll of each device a second.
const COLLECT_S: u64 = 20;

/// An HTTP request to a local server: (status, body).
fn request(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn devices(port: u16) -> BTreeMap<u32, DeviceStats> {
    let text = http_get(port, "/stats/devices");
    let by_id: BTreeMap<String, DeviceStats> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    by_id.into_iter().map(|(k, v)| (k.parse().unwrap(), v)).collect()
}

/// The value of the series `series` (name and labels, as exposed) in a Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Readings per device in a local lake, read by DuckDB.
fn lake_readings_by_device(lake: &std::path::Path) -> BTreeMap<u32, u64> {
    let script = format!(
        "import duckdb, json\nrows = duckdb.sql(\"select device, count(*) from read_parquet('{}/readings/**/*.parquet', hive_partitioning=true) group by all\").fetchall()\nprint(json.dumps({{str(d): n for d, n in rows}}))",
        lake.display()
    );
    let out = Command::new(common::python()).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: BTreeMap<String, u64> = serde_json::from_slice(&out.stdout).unwrap();
    m.into_iter().map(|(k, v)| (k.parse().unwrap(), v)).collect()
}

#[test]
fn a_failing_fms_api_for_some_devices_loses_and_doubles_nothing() {
    common::python();
    let raw = unique("faults-fms");
    let partitions = 4;
    create_topic(&raw, partitions);
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");

    // 9 of the 60 devices faulty from the start, 3 of each kind; a hanging device holds its
    // requests for far longer than the collector's timeout (2 s).
    let (sim, port) = start_sim(&[
        "--devices",
        &DEVICES.to_string(),
        "--seed",
        "23",
        "--dirty-rate",
        "0.03",
        "--fault-share",
        "0.15",
        "--fault-kinds",
        "error,hang,garbage",
        "--hang-for",
        "120s",
    ]);
    let at_start = devices(port);
    let by_kind = |stats: &BTreeMap<u32, DeviceStats>, kind: &str| -> Vec<u32> {
        stats
            .iter()
            .filter(|(_, s)| s.fault.as_deref() == Some(kind))
            .map(|(d, _)| *d)
            .collect()
    };
    for kind in ["error", "hang", "garbage"] {
        assert_eq!(by_kind(&at_start, kind).len(), 3, "{kind}: {at_start:?}");
    }
    // The control API: one more garbage device, one silenced, and one error device healed.
    let healthy: Vec<u32> = at_start
        .iter()
        .filter(|(_, s)| s.fault.is_none())
        .map(|(d, _)| *d)
        .collect();
    let (garbage_extra, silenced, healed) = (healthy[0], healthy[1], by_kind(&at_start, "error")[0]);
    assert_eq!(
        request(port, "PUT", &format!("/control/fault/{garbage_extra}?kind=garbage")).0,
        200
    );
    assert_eq!(request(port, "PUT", &format!("/control/silence/{silenced}")).0, 200);
    assert_eq!(request(port, "DELETE", &format!("/control/fault/{healed}")).0, 200);
    assert_eq!(request(port, "PUT", "/control/fault/1?kind=nonsense").0, 400);
    assert_eq!(request(port, "PUT", "/control/fault/1").0, 400);
    assert_eq!(
        request(port, "PUT", &format!("/control/fault/{}?kind=hang", DEVICES + 1)).0,
        404
    );
    let faults = devices(port);
    let error = by_kind(&faults, "error");
    let hang = by_kind(&faults, "hang");
    let garbage = by_kind(&faults, "garbage");
    assert_eq!((error.len(), hang.len(), garbage.len()), (2, 3, 4), "{faults:?}");
    assert_eq!(by_kind(&faults, "silence"), vec![silenced]);
    let healthy: BTreeSet<u32> = faults
        .iter()
        .filter(|(_, s)| s.fault.is_none())
        .map(|(d, _)| *d)
        .collect();
    assert_eq!(healthy.len(), 50);
    let sim_metrics = http_get(port, "/metrics");
    for (kind, n) in [("silence", 1.0), ("error", 2.0), ("hang", 3.0), ("garbage", 4.0)] {
        assert_eq!(
            metric(&sim_metrics, &format!("fmsflow_sim_devices_faulty{{kind=\"{kind}\"}}")),
            Some(n),
            "{sim_metrics}"
        );
    }

    // The collector: 8 request slots for 60 devices, so hanging devices that each held a slot
    // per poll due would soon hold them all.
    let metrics_port = common::free_ports(1)[0];
    let log = dir.path().join("collect.log");
    let collector = kafka_env(&mut Command::new(common::bin()), &raw, partitions)
        .args([
            "collect",
            "--devices",
            &DEVICES.to_string(),
            "--interval",
            "1s",
            "--duration",
            &format!("{COLLECT_S}s"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--api",
            &format!("http://127.0.0.1:{port}"),
        ])
        .env("FMSFLOW_COLLECTOR__CONCURRENCY", "8")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting fmsflow collect");
    let mut collector = common::kafka::Killed(collector);

    // While it runs, its /metrics counts the faulty devices' polls by class, and the polls
    // skipped while a hanging device's previous poll was still running.
    let scrape = || common::kafka::try_http_get(metrics_port, "/metrics").unwrap_or_default();
    let polls = |text: &str, class: &str| {
        metric(text, &format!("fmsflow_collector_polls_total{{class=\"{class}\"}}")).unwrap_or(0.0)
    };
    common::wait_for(
        "the collector's /metrics to count 5xx, timeouts and skipped polls",
        Duration::from_secs(COLLECT_S + 10),
        || {
            let m = scrape();
            polls(&m, "5xx") > 0.0
                && polls(&m, "timeout") > 0.0
                && polls(&m, "2xx") > 0.0
                && metric(&m, "fmsflow_collector_polls_skipped_total").is_some_and(|n| n > 0.0)
        },
    );

    // It stops after its --duration, once its last polls (hanging ones too) have ended.
    common::wait_for("the collector to finish", Duration::from_secs(COLLECT_S + 60), || {
        collector.0.try_wait().unwrap().is_some()
    });
    let collect_log = std::fs::read_to_string(&log).unwrap();
    let mut summary = String::new();
    collector.0.stdout.take().unwrap().read_to_string(&mut summary).unwrap();
    assert!(
        collector.0.wait().unwrap().success(),
        "collect failed:\n{summary}\n{collect_log}"
    );
    let (served, dirty) = sim_truth(port);
    let stats: serde_json::Value = serde_json::from_str(&http_get(port, "/stats")).unwrap();
    let fault_count = |k: &str| stats["faults"][k].as_u64().unwrap();
    let per_device = devices(port);
    drop(sim);
    eprintln!("sim: {stats}\ncollector: {summary}");

    // The collector's own count of its requests, by outcome, is the simulator's truth:
    // every 200 is a record, every 500 and 503 a 5xx, every held request a timeout.
    assert!(
        summary.contains(&format!("collected: {served} produced, {served} delivered, 0 failed")),
        "{summary}"
    );
    let (errors, hangs, silences) = (fault_count("error"), fault_count("hang"), fault_count("silence"));
    assert!(
        errors > 0 && hangs > 0 && silences > 0 && fault_count("garbage") > 0,
        "{stats}"
    );
    assert!(
        summary.contains(&format!(
            "requests by outcome: 2xx {served}, 4xx 0, 5xx {}, timeout {hangs}, error 0;",
            errors + silences
        )),
        "{summary}\n{stats}"
    );
    // Bodies that are not JSON (garbage and dirty ones alike) are counted, and produced all the same.
    let not_json = dirty.get("malformed_json").copied().unwrap_or(0);
    assert!(
        summary.contains(&format!(
            ", {} poll errors, {not_json} not JSON;",
            errors + silences + hangs
        )),
        "{summary}\n{stats}"
    );
    let skipped: u64 = summary
        .split("; ")
        .find_map(|p| p.trim_end().strip_suffix(" polls skipped (the previous still running)"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no skipped count in {summary}"));
    assert!(skipped > 0, "{summary}");

    // The hanging devices did not hold up the others: every healthy device was polled once a
    // second all along (the last second's poll may fall after the end; one more of slack).
    for d in &healthy {
        let s = &per_device[d];
        assert!(
            s.served >= COLLECT_S - 2 && s.refused == 0,
            "healthy device {d} was polled {} times in {COLLECT_S} s (one poll a second): {per_device:?}\n{collect_log}",
            s.served
        );
    }
    // A hanging device's polls do not pile up: one at a time, each (retries + 1) attempts.
    for d in &hang {
        let s = &per_device[d];
        assert!(
            s.served == 0 && s.refused > 0 && s.refused.is_multiple_of(3),
            "device {d}: {s:?}"
        );
    }
    for d in &error {
        assert!(
            per_device[d].served == 0 && per_device[d].refused > 0,
            "{d}: {per_device:?}"
        );
    }
    for d in &garbage {
        let s = &per_device[d];
        assert!(s.served > 0 && s.dirty == s.served && s.refused == 0, "{d}: {s:?}");
    }

    // The raw topic holds exactly what was served: garbage included, errors and hangs not.
    let records = consume_all(&raw);
    assert_eq!(records.len() as u64, served, "records in the raw topic vs served");
    let mut by_key: BTreeMap<u32, u64> = BTreeMap::new();
    for r in &records {
        *by_key.entry(r.key.parse().unwrap()).or_default() += 1;
    }
    for (d, s) in &per_device {
        assert_eq!(by_key.get(d).copied().unwrap_or(0), s.served, "device {d}'s records");
    }

    // The engine replays the topic into a lake.
    let engine = common::kafka::replay_command(&raw, partitions, "earliest", &format!("file://{}", lake.display()), 2)
        .env("FMSFLOW_FLEET__DEVICES", DEVICES.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fmsflow run");
    let out = common::wait_bounded(engine, Duration::from_secs(180), "the engine's replay");
    assert!(
        out.status.success(),
        "fmsflow run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Dead letters: every dirty record, garbage included, by the rule the simulator named.
    let letters = dead_letters_by_rule(&format!("{raw}.rejects"));
    assert_eq!(letters, dirty, "dead letters by rule vs the simulator's truth");
    // Each garbage device's every record is a dead letter, with its rule and reason.
    let raw_key: BTreeMap<(i32, i64), &str> = records
        .iter()
        .map(|r| ((r.partition, r.offset), r.key.as_str()))
        .collect();
    let mut garbage_letters: BTreeMap<u32, u64> = BTreeMap::new();
    for l in consume_all(&format!("{raw}.rejects")) {
        let at = (
            l.headers["source"].parse::<i32>().unwrap(),
            l.headers["offset"].parse::<i64>().unwrap(),
        );
        let device: u32 = raw_key[&at].parse().unwrap();
        if garbage.contains(&device) {
            assert!(
                ["malformed_json", "missing_field"].contains(&l.headers["rule"].as_str())
                    && !l.headers["reason"].is_empty(),
                "{l:?}"
            );
            assert_eq!(
                records.iter().find(|r| (r.partition, r.offset) == at).unwrap().value,
                l.value,
                "a dead letter carries the original bytes"
            );
            *garbage_letters.entry(device).or_default() += 1;
        }
    }
    for d in &garbage {
        assert_eq!(
            garbage_letters.get(d).copied().unwrap_or(0),
            per_device[d].served,
            "device {d}"
        );
    }

    // The lake: every healthy device's readings, the faulty ones' none.
    let bad: u64 = dirty.values().sum();
    let v = common::read_lake(&lake);
    assert_eq!(v["readings"].as_u64().unwrap(), served - bad, "{v}");
    assert_eq!(v["readings_distinct"].as_u64().unwrap(), served - bad, "{v}");
    assert_eq!(v["quality"]["valid"].as_u64().unwrap(), served - bad, "{v}");
    let lake_by_device = lake_readings_by_device(&lake);
    for (d, s) in &per_device {
        let want = s.served - s.dirty;
        assert_eq!(lake_by_device.get(d).copied().unwrap_or(0), want, "device {d}: {s:?}");
        assert_eq!(want > 0, healthy.contains(d), "device {d}: {s:?}");
    }
    common::assert_committed(&format!("file://{}", lake.display()));
    eprintln!(
        "{served} served by {} healthy and {} faulty devices: {errors} errors, {hangs} hangs, {silences} silenced, {} garbage ({skipped} polls skipped); {bad} dead letters, {} readings",
        healthy.len(),
        per_device.len() - healthy.len(),
        fault_count("garbage"),
        served - bad
    );
}
