//! The query API of real `fmsflow run` processes (1 process, and a cluster of 3), checked
//! against the oracle's from-scratch recomputation: final answers, answers taken while a
//! paced replay runs (each must equal the oracle over exactly the epochs it says it is as
//! of), every error path, and `fmsflow query`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fmsflow::config::Config;
use fmsflow::connectors::file::{Replay, BLOCK};
use fmsflow::gen::{generate, GenSettings};
use fmsflow_dataflows::dataflow::Epoch;
use fmsflow_dataflows::oracle::{expected, Expected};
use fmsflow_dataflows::rules::Outcome;
use fmsflow_dataflows::time::{format_rfc3339, parse_rfc3339, HOUR_MS};
use fmsflow_dataflows::{RawRecord, METRICS};
use serde_json::Value;

const START_MS: i64 = 1_751_846_400_000; // 2025-07-07T00:00:00Z

/// One HTTP GET on 127.0.0.1: (status, headers in lower case, body as JSON).
fn get(base: &str, path: &str, token: Option<&str>) -> (u16, HashMap<String, String>, Value) {
    let hostport = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(hostport).unwrap_or_else(|e| panic!("connecting to {base}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reading the answer");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let json = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    (status, headers, json)
}

/// GET that must answer 200.
fn ok(base: &str, path: &str) -> Value {
    let (status, _, v) = get(base, path, None);
    assert_eq!(status, 200, "GET {base}{path}: {v}");
    v
}

/// Random input (seeded, the seed printed): dirty, late and duplicate records, written as
/// `files` replay files.
fn write_input(dir: &Path, seed: u64, hours: u32, files: usize) -> Vec<PathBuf> {
    let (records, dirty) = generate(&GenSettings {
        devices: 100,
        hours,
        interval_s: 10,
        start_ms: START_MS,
        seed,
        dirty_rate: 0.03,
        late_rate: 0.05,
        max_late_ms: 30 * 60 * 1000,
    });
    eprintln!("input: seed {seed}, {} records, dirty {dirty:?}", records.len());
    let paths: Vec<PathBuf> = (0..files).map(|i| dir.join(format!("part-{i}.ndjson"))).collect();
    let mut outs: Vec<_> = paths
        .iter()
        .map(|p| std::io::BufWriter::new(std::fs::File::create(p).unwrap()))
        .collect();
    for (i, (ingest, payload)) in records.iter().enumerate() {
        writeln!(outs[i % files], "{ingest} {payload}").unwrap();
    }
    for mut o in outs {
        o.flush().unwrap();
    }
    paths
}

/// The records as the engine reads them, each with its epoch (the same for any number of
/// workers: `Replay` cuts epochs at fixed places in the files).
fn epochs_of(files: &[PathBuf], batch: usize) -> Vec<(Epoch, RawRecord)> {
    let mut out = Vec::new();
    let mut r = Replay::open(files, 0, 1, batch, BLOCK).unwrap();
    let mut buf = Vec::new();
    while let Some(epoch) = r.next(&mut buf).unwrap() {
        out.extend(buf.drain(..).map(|rec| (epoch, rec)));
    }
    out
}

/// Engine processes serving the API.
struct Engines {
    procs: Vec<Child>,
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Engines {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// Starts `processes` engine processes of `workers` workers each, replaying `files` (one per
/// worker) and serving the API, with `env` settings.
fn start(files: &[PathBuf], processes: usize, workers: usize, env: &[(&str, &str)], rate: Option<u32>) -> Engines {
    let dir = tempfile::tempdir().unwrap();
    let ports = common::free_ports(2 * processes);
    let urls: Vec<String> = (0..processes)
        .map(|i| format!("http://127.0.0.1:{}", ports[i]))
        .collect();
    let timely: Vec<String> = (0..processes)
        .map(|i| format!("127.0.0.1:{}", ports[processes + i]))
        .collect();
    let pattern = files[0].parent().unwrap().join("part-*.ndjson");
    let procs = (0..processes)
        .map(|i| {
            let mut cmd = Command::new(common::bin());
            cmd.args(["run", "--source"])
                .arg(format!("file:{}", pattern.display()))
                .args(["--lake", &format!("file://{}", dir.path().join("lake").display())])
                .args(["--workers", &workers.to_string()])
                .args(["--http", urls[i].trim_start_matches("http://"), "--keep-serving"])
                // These tests ask as fast as they can from one address; the rate limit has
                // a test of its own, which sets it.
                .env("FMSFLOW_API__RATE_LIMIT", "0")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            if processes > 1 {
                cmd.args(["--cluster", &timely.join(","), "--process", &i.to_string()])
                    .args(["--api-peers", &urls.join(",")]);
            }
            if let Some(r) = rate {
                cmd.args(["--rate", &r.to_string()]);
            }
            cmd.spawn().expect("starting fmsflow run")
        })
        .collect();
    let e = Engines { procs, urls, _dir: dir };
    for u in &e.urls {
        let hostport = u.trim_start_matches("http://").to_string();
        common::wait_for(&format!("the API on {u}"), Duration::from_secs(60), || {
            TcpStream::connect(&hostport).is_ok()
        });
    }
    e
}

fn wait_complete(e: &Engines) {
    for u in &e.urls {
        common::wait_for(
            &format!("{u} to have all of its input"),
            Duration::from_secs(120),
            || ok(u, "/api/v1/status")["as_of"]["complete"] == Value::Bool(true),
        );
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Fails unless an API hour row equals the oracle's hour.
fn check_row(row: &Value, exp: &Expected, device: u32, hour: i64, context: &str) {
    let naive = exp
        .hourly
        .get(&(device, hour))
        .unwrap_or_else(|| panic!("{context}: device {device} hour {hour} answered but not expected: {row}"));
    let n = naive.times.len();
    assert_eq!(row["count"], n as u64, "{context}: device {device} hour {hour} count");
    assert_eq!(
        row["fails"], naive.fails,
        "{context}: device {device} hour {hour} fails"
    );
    assert_eq!(
        row["first"],
        format_rfc3339(*naive.times.iter().min().unwrap()),
        "{context}"
    );
    assert_eq!(
        row["last"],
        format_rfc3339(*naive.times.iter().max().unwrap()),
        "{context}"
    );
    for (i, m) in METRICS.iter().enumerate() {
        let vals = &naive.values[i];
        let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mean = vals.iter().sum::<f64>() / n as f64;
        let std = (vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64).sqrt();
        let got = &row["metrics"][*m];
        let f = |k: &str| got[k].as_f64().unwrap_or(f64::NAN);
        assert_eq!(
            (f("min"), f("max")),
            (min, max),
            "{context}: device {device} hour {hour} {m} min/max"
        );
        assert!(
            close(f("mean"), mean) && close(f("stddev"), std),
            "{context}: device {device} hour {hour} {m}: mean/stddev {}/{} vs {mean}/{std}",
            f("mean"),
            f("stddev")
        );
    }
}

/// Fails unless the fleet's rows of `hour` are exactly the oracle's devices of that hour.
fn check_fleet_hour(answer: &Value, exp: &Expected, hour: i64, context: &str) {
    let rows = answer["devices"].as_array().expect("devices");
    let want: Vec<u32> = exp.hourly.keys().filter(|(_, h)| *h == hour).map(|(d, _)| *d).collect();
    let got: Vec<u32> = rows.iter().map(|r| r["device"].as_u64().unwrap() as u32).collect();
    assert_eq!(got, want, "{context}: the devices of hour {hour}");
    for r in rows {
        check_row(r, exp, r["device"].as_u64().unwrap() as u32, hour, context);
    }
}

/// Quality counts by outcome name over hours `from..to` (and one device).
fn oracle_quality(exp: &Expected, from: i64, to: i64, device: Option<u32>) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for ((d, h, o), n) in &exp.quality {
        if (from..to).contains(h) && device.is_none_or(|x| x == *d) {
            *m.entry(o.name().to_string()).or_default() += n;
        }
    }
    m
}

fn check_quality(answer: &Value, want: &BTreeMap<String, i64>, context: &str) {
    let valid = want.get(Outcome::Valid.name()).copied().unwrap_or(0);
    let total: i64 = want.values().sum();
    assert_eq!(answer["valid"], valid, "{context}: valid: {answer}");
    assert_eq!(answer["total"], total, "{context}: total: {answer}");
    let rules: BTreeMap<String, i64> = want
        .iter()
        .filter(|(k, n)| k.as_str() != Outcome::Valid.name() && **n != 0)
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    let got: BTreeMap<String, i64> = serde_json::from_value(answer["rules"].clone()).unwrap();
    assert_eq!(got, rules, "{context}: rejections per rule");
}

fn hour_param(h: i64) -> String {
    format_rfc3339(h * HOUR_MS)
}

/// Every answer of a finished replay against the oracle: every hour of the fleet, devices'
/// hours and latest readings, quality overall and per device; from every process.
fn check_final(e: &Engines, exp: &Expected, records: &[(Epoch, RawRecord)], context: &str) {
    let hours: Vec<i64> = {
        let mut h: Vec<i64> = exp.hourly.keys().map(|(_, h)| *h).collect();
        h.sort();
        h.dedup();
        h
    };
    let (first, last) = (hours[0], *hours.last().unwrap());
    for (i, u) in e.urls.iter().enumerate() {
        let context = format!("{context}, asking process {i}");
        for h in &hours {
            let a = ok(u, &format!("/api/v1/fleet/hourly?hour={}", hour_param(*h)));
            assert_eq!(a["as_of"]["complete"], true, "{context}");
            assert_eq!(a["as_of"]["processes"], e.urls.len(), "{context}");
            check_fleet_hour(&a, exp, *h, &context);
        }
        for d in [1u32, 17, 50 + i as u32, 100] {
            let a = ok(
                u,
                &format!(
                    "/api/v1/devices/{d}/hourly?from={}&to={}",
                    hour_param(first),
                    hour_param(last + 1)
                ),
            );
            let rows = a["hours"].as_array().unwrap();
            let want: Vec<i64> = hours
                .iter()
                .copied()
                .filter(|h| exp.hourly.contains_key(&(d, *h)))
                .collect();
            assert_eq!(rows.len(), want.len(), "{context}: device {d}'s hours: {a}");
            for (r, h) in rows.iter().zip(&want) {
                assert_eq!(r["hour"], hour_param(*h), "{context}");
                check_row(r, exp, d, *h, &context);
            }
            // The newest accepted reading: the largest event time among the device's
            // accepted readings (the oracle keeps their values in the same order).
            let (t, vals) = exp
                .hourly
                .iter()
                .filter(|((dev, _), _)| *dev == d)
                .flat_map(|(_, n)| {
                    n.times.iter().enumerate().map(move |(j, t)| {
                        (
                            *t,
                            METRICS
                                .iter()
                                .enumerate()
                                .map(|(m, _)| n.values[m][j])
                                .collect::<Vec<_>>(),
                        )
                    })
                })
                .max_by_key(|(t, _)| *t)
                .expect("the device has readings");
            let l = ok(u, &format!("/api/v1/devices/{d}/latest"));
            assert_eq!(l["reading"]["time"], format_rfc3339(t), "{context}: device {d} latest");
            for (m, v) in METRICS.iter().zip(vals) {
                assert_eq!(
                    l["reading"]["metrics"][*m].as_f64(),
                    Some(v),
                    "{context}: device {d} latest {m}"
                );
            }
        }
        let range = format!("from={}&to={}", hour_param(first - 24), hour_param(last + 1));
        let q = ok(u, &format!("/api/v1/quality?{range}"));
        check_quality(&q, &oracle_quality(exp, first - 24, last + 1, None), &context);
        for d in [3u32, 42] {
            let q = ok(u, &format!("/api/v1/quality?{range}&device={d}"));
            check_quality(&q, &oracle_quality(exp, first - 24, last + 1, Some(d)), &context);
        }
        let st = ok(u, "/api/v1/status");
        let procs = st["processes"].as_array().unwrap();
        assert_eq!(procs.len(), e.urls.len(), "{context}: {st}");
        let received: u64 = procs.iter().map(|p| p["received"].as_u64().unwrap()).sum();
        assert_eq!(
            received,
            records.len() as u64,
            "{context}: every record received once: {st}"
        );
    }
    // Prometheus metrics, summed over the processes: the same counts as the oracle.
    let want = oracle_quality(exp, i64::MIN, i64::MAX, None);
    let mut got: BTreeMap<String, f64> = BTreeMap::new();
    for u in &e.urls {
        let (status, headers, body) = get(u, "/metrics", None);
        assert_eq!(status, 200, "{u}/metrics: {body}");
        assert!(headers["content-type"].starts_with("text/plain"), "{headers:?}");
        for (name, v) in metric_samples(body.as_str().expect("a text answer")) {
            *got.entry(name).or_default() += v;
        }
    }
    let sample = |k: &str| {
        got.get(k)
            .copied()
            .unwrap_or_else(|| panic!("{context}: no {k} in /metrics: {got:?}"))
    };
    assert_eq!(
        sample("fmsflow_records_received_total"),
        records.len() as f64,
        "{context}"
    );
    assert_eq!(
        sample("fmsflow_readings_valid_total"),
        want.get(Outcome::Valid.name()).copied().unwrap_or(0) as f64,
        "{context}"
    );
    for r in fmsflow_dataflows::Rule::ALL {
        assert_eq!(
            sample(&format!("fmsflow_records_rejected_total{{rule=\"{}\"}}", r.name())),
            want.get(r.name()).copied().unwrap_or(0) as f64,
            "{context}: rejected by {}",
            r.name()
        );
    }
    // This check's own queries were timed, by endpoint.
    assert!(sample("fmsflow_query_duration_seconds_count{endpoint=\"fleet_hourly\"}") >= 1.0);
    assert_eq!(sample("fmsflow_failed"), 0.0, "{context}");
}

/// The samples of Prometheus's text format: (name with its labels, value).
fn metric_samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: {l}"));
            (k.to_string(), v.parse().unwrap_or_else(|_| panic!("a number in {l}")))
        })
        .collect()
}

#[test]
fn answers_equal_the_oracle_at_1_and_3_processes() {
    let cfg = Config::from_sources(None, &[]).unwrap();
    // With `api.keep_hours` = 1 the older hours are answered from the lake (and read again
    // for every query: no cache), each process its own share.
    for (processes, workers, from_lake) in [(1usize, 2usize, false), (3, 1, false), (1, 2, true), (3, 1, true)] {
        let dir = tempfile::tempdir().unwrap();
        let files = write_input(dir.path(), common::seed("FMSFLOW_TEST_SEED"), 3, processes * workers);
        let batch = 1000;
        let records = epochs_of(&files, batch);
        let exp = expected(&records, &cfg.flow_config().rules);
        let mut env = vec![("FMSFLOW_ENGINE__BATCH", "1000")];
        if from_lake {
            env.extend([("FMSFLOW_API__KEEP_HOURS", "1"), ("FMSFLOW_API__LAKE_CACHE_HOURS", "0")]);
        }
        let e = start(&files, processes, workers, &env, None);
        wait_complete(&e);
        let context = format!("{processes} process(es), older hours from the lake: {from_lake}");
        check_final(&e, &exp, &records, &context);
        let first = exp.hourly.keys().map(|(_, h)| *h).min().unwrap();
        let hourly = e
            ._dir
            .path()
            .join("lake")
            .join(fmsflow::lake::LakeWriter::dir("hourly", first));
        if from_lake {
            // Proof that the first hour came from the lake: without its file, it cannot be
            // answered, and the answer says why.
            std::fs::remove_dir_all(&hourly).unwrap();
            let (status, _, body) = get(
                &e.urls[0],
                &format!("/api/v1/fleet/hourly?hour={}", hour_param(first)),
                None,
            );
            assert_eq!(status, 503, "{context}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("from the lake") && message.contains("is gone"),
                "{context}: {body}"
            );
            continue;
        }
        // Held in memory, it does not need the lake.
        std::fs::remove_dir_all(&hourly).unwrap();
        check_fleet_hour(
            &ok(&e.urls[0], &format!("/api/v1/fleet/hourly?hour={}", hour_param(first))),
            &exp,
            first,
            &context,
        );
        if processes > 1 {
            // A process that does not answer: the others say so at once (503, Retry-After),
            // never hang.
            let mut e = e;
            let _ = e.procs[2].kill();
            let _ = e.procs[2].wait();
            let t0 = Instant::now();
            let (status, headers, body) = get(&e.urls[0], "/api/v1/devices/5/latest", None);
            assert_eq!(status, 503, "{body}");
            assert_eq!(headers.get("retry-after").map(String::as_str), Some("1"));
            assert!(
                body["error"]["message"].as_str().unwrap().contains("process 2"),
                "{body}"
            );
            assert!(t0.elapsed() < Duration::from_secs(10), "answered in {:?}", t0.elapsed());
        }
    }
}

#[test]
fn answers_taken_during_a_replay_are_consistent_as_of_their_epoch() {
    let cfg = Config::from_sources(None, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = write_input(dir.path(), common::seed("FMSFLOW_TEST_SEED"), 2, 3);
    let batch = 300;
    let records = epochs_of(&files, batch);
    // Paced: 3 processes of 1 worker, each 3,000 records/s (10 epochs a second).
    let e = start(&files, 3, 1, &[("FMSFLOW_ENGINE__BATCH", "300")], Some(3000));
    let mut oracles: BTreeMap<Epoch, Expected> = BTreeMap::new();
    let mut seen: Vec<Epoch> = Vec::new();
    let rules = cfg.flow_config().rules;
    let (h0, h1) = (START_MS / HOUR_MS, START_MS / HOUR_MS + 1);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut asks = 0usize;
    loop {
        assert!(Instant::now() < deadline, "the replay did not end in time");
        let u = &e.urls[asks % 3];
        asks += 1;
        let path = if asks.is_multiple_of(2) {
            format!("/api/v1/fleet/hourly?hour={}", hour_param(h0 + (asks as i64 / 2) % 2))
        } else {
            format!("/api/v1/quality?from={}&to={}", hour_param(h0 - 24), hour_param(h1 + 1))
        };
        let (status, _, a) = get(u, &path, None);
        if status == 404 {
            // No device has data for that hour yet: only before the first epochs.
            continue;
        }
        assert_eq!(status, 200, "{path}: {a}");
        let complete = a["as_of"]["complete"] == Value::Bool(true);
        let t = if complete {
            Epoch::MAX
        } else {
            a["as_of"]["epoch"].as_u64().unwrap()
        };
        let exp = oracles.entry(t).or_insert_with(|| {
            let part: Vec<(Epoch, RawRecord)> = records.iter().filter(|(e, _)| *e < t).cloned().collect();
            expected(&part, &rules)
        });
        let context = format!("process {} as of epoch {t}", (asks - 1) % 3);
        if path.contains("fleet") {
            let hour = parse_rfc3339(a["hour"].as_str().unwrap()).unwrap() / HOUR_MS;
            check_fleet_hour(&a, exp, hour, &context);
        } else {
            check_quality(&a, &oracle_quality(exp, h0 - 24, h1 + 1, None), &context);
        }
        if !complete && !seen.contains(&t) {
            seen.push(t);
        }
        if complete {
            break;
        }
    }
    assert!(
        seen.len() >= 3,
        "answers as of at least 3 different epochs during the replay, not {seen:?}"
    );
    eprintln!("{asks} answers checked, as of {} different epochs", seen.len());
}

#[test]
fn every_error_has_its_status_and_names_its_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_input(dir.path(), 7, 1, 1);
    let token = "s3cret-token";
    // Paced (36,000 records at 1,000 a second): the replay is still going while the errors
    // are checked, so a query can wait for an epoch that has not come.
    let e = start(
        &files,
        1,
        1,
        &[
            ("FMSFLOW_API__TOKEN", token),
            ("FMSFLOW_API__MAX_IN_FLIGHT", "1"),
            ("FMSFLOW_ENGINE__BATCH", "100"),
        ],
        Some(1000),
    );
    let u = &e.urls[0];
    let t = Some(token);
    // Authentication.
    for (given, what) in [(None, "no token"), (Some("wrong"), "a wrong token")] {
        let (status, headers, body) = get(u, "/api/v1/status", given);
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(headers.get("www-authenticate").map(String::as_str), Some("Bearer"));
    }
    common::wait_for("the first hour's readings", Duration::from_secs(60), || {
        get(u, "/api/v1/fleet/hourly", t).0 == 200
    });
    // 503 with Retry-After when busy: one query holds the only slot (it waits for an epoch
    // the view never reaches, up to its bound); the next is turned away at once.
    let mut turned_away = false;
    for _ in 0..5 {
        let (base, tok) = (u.clone(), token.to_string());
        let holder = std::thread::spawn(move || get(&base, "/api/v1/status?scope=local&as_of=999999999", Some(&tok)));
        while !holder.is_finished() {
            let (status, headers, body) = get(u, "/api/v1/status", t);
            if status == 503 {
                assert_eq!(headers.get("retry-after").map(String::as_str), Some("1"), "{body}");
                assert!(
                    body["error"]["message"].as_str().unwrap().contains("in flight"),
                    "{body}"
                );
                turned_away = true;
                break;
            }
        }
        // The holder itself: the epoch did not come, so 503 too, within its bound.
        let (status, headers, body) = holder.join().unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(headers.contains_key("retry-after"));
        if turned_away {
            break;
        }
    }
    assert!(
        turned_away,
        "a query beyond api.max_in_flight was never turned away with 503"
    );

    // So is /metrics.
    assert_eq!(get(u, "/metrics", None).0, 401);
    let (status, _, body) = get(u, "/metrics", t);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.as_str()
            .unwrap()
            .contains("fmsflow_queries_total{class=\"4xx\",endpoint=\"status\"}"),
        "{body}"
    );
    // The OpenAPI document is public and lists every path.
    let (status, _, doc) = get(u, "/api/v1/openapi.json", None);
    assert_eq!(status, 200);
    for p in [
        "/api/v1/status",
        "/api/v1/devices/{id}/hourly",
        "/api/v1/devices/{id}/latest",
        "/api/v1/fleet/hourly",
        "/api/v1/quality",
    ] {
        assert!(
            doc["paths"][p]["get"]["responses"]["200"].is_object(),
            "{p} in the OpenAPI document"
        );
    }
    // 400 naming the parameter.
    for (path, parameter) in [
        ("/api/v1/devices/abc/hourly", "id"),
        ("/api/v1/devices/-3/latest", "id"),
        ("/api/v1/devices/5/hourly?from=yesterday", "from"),
        ("/api/v1/devices/5/hourly?to=2025-13-01T00:00:00Z", "to"),
        (
            "/api/v1/devices/5/hourly?from=2025-07-08T00:00:00Z&to=2025-07-07T00:00:00Z",
            "from",
        ),
        (
            "/api/v1/devices/5/hourly?from=2025-01-01T00:00:00Z&to=2025-07-07T00:00:00Z",
            "to",
        ),
        ("/api/v1/devices/5/hourly?color=red", "color"),
        ("/api/v1/fleet/hourly?sort=colour", "sort"),
        ("/api/v1/fleet/hourly?order=sideways", "order"),
        ("/api/v1/fleet/hourly?limit=0", "limit"),
        ("/api/v1/fleet/hourly?limit=many", "limit"),
        ("/api/v1/fleet/hourly?hour=noon", "hour"),
        ("/api/v1/quality?device=x", "device"),
        ("/api/v1/quality?by_device=-1", "by_device"),
        ("/api/v1/status?as_of=soon", "as_of"),
        ("/api/v1/status?scope=global", "scope"),
    ] {
        let (status, _, body) = get(u, path, t);
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["parameter"], parameter, "{path}: {body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    // 404: unknown device, hour without data, unknown path.
    for path in [
        "/api/v1/devices/0/latest",
        "/api/v1/devices/101/hourly",
        "/api/v1/quality?device=4000",
        "/api/v1/fleet/hourly?hour=2030-01-01T00:00:00Z",
        "/api/v1/no/such/path",
    ] {
        let (status, _, body) = get(u, path, t);
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body["error"]["message"].is_string(), "{path}: {body}");
    }
    // A non-loopback address without a token is refused at start, naming the setting.
    let out = Command::new(common::bin())
        .args(["run", "--source"])
        .arg(format!("file:{}", files[0].display()))
        .args(["--lake", &format!("file://{}", dir.path().join("lake2").display())])
        .args(["--http", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("api.token"), "{err}");
    // So is --keep-serving without an API to keep serving.
    let out = Command::new(common::bin())
        .args(["run", "--source"])
        .arg(format!("file:{}", files[0].display()))
        .args(["--lake", &format!("file://{}", dir.path().join("lake3").display())])
        .arg("--keep-serving")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--keep-serving needs") && err.contains("--http"), "{err}");
}

#[test]
fn the_query_command_prints_tables_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_input(dir.path(), 11, 2, 1);
    let e = start(&files, 1, 1, &[], None);
    wait_complete(&e);
    let u = &e.urls[0];
    let query = |args: &[&str]| {
        let out = Command::new(common::bin())
            .args(["query", "--url", u])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (okay, out, err) = query(&[
        "--json",
        "fleet",
        "--hour",
        "2025-07-07T01:00:00Z",
        "--sort",
        "fails",
        "--limit",
        "3",
    ]);
    assert!(okay, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        ok(u, "/api/v1/fleet/hourly?hour=2025-07-07T01:00:00Z&sort=fails&limit=3")
    );
    assert_eq!(v["devices"].as_array().unwrap().len(), 3);
    let (okay, out, err) = query(&[
        "device",
        "17",
        "--from",
        "2025-07-07T00:00:00Z",
        "--to",
        "2025-07-07T02:00:00Z",
    ]);
    assert!(okay, "{err}");
    assert!(
        out.contains("device 17 from 2025-07-07T00:00:00Z to 2025-07-07T02:00:00Z"),
        "{out}"
    );
    assert!(out.contains("2025-07-07T01:00:00Z"), "{out}");
    assert!(out.contains("sensor1 min/mean/max"), "{out}");
    let (okay, out, err) = query(&["quality", "--by-device", "2"]);
    assert!(okay, "{err}");
    assert!(out.contains("valid ratio"), "{out}");
    let (okay, out, err) = query(&["status"]);
    assert!(okay, "{err}");
    assert!(out.contains("input complete"), "{out}");
    // Errors: the API's message and parameter, and a failing exit.
    let (okay, _, err) = query(&["fleet", "--sort", "colour"]);
    assert!(!okay);
    assert!(err.contains("400") && err.contains("`sort`"), "{err}");
    let (okay, _, err) = query(&["latest", "999"]);
    assert!(!okay);
    assert!(err.contains("404") && err.contains("unknown device 999"), "{err}");
}

/// One raw request (`head` holds the request line and headers, without the blank line): the
/// status and the `Retry-After` header.
fn raw_request(hostport: &str, head: &str) -> (u16, Option<String>) {
    let mut s = TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "{head}\r\nHost: {hostport}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let retry = text.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("retry-after:")
            .map(|v| v.trim().to_string())
    });
    (status, retry)
}

#[test]
fn long_targets_bodies_and_clients_over_the_rate_limit_are_turned_away() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_input(dir.path(), 3, 1, 1);
    let e = start(&files, 1, 1, &[("FMSFLOW_API__RATE_LIMIT", "1")], None);
    let hostport = e.urls[0].trim_start_matches("http://").to_string();
    // A request target over 4 KiB: 414, whatever the rate.
    let long = format!("GET /api/v1/status?x={} HTTP/1.1", "a".repeat(5000));
    assert_eq!(raw_request(&hostport, &long).0, 414);
    // A body: 413 (the API takes none).
    let body = "GET /api/v1/status HTTP/1.1\r\nContent-Length: 4096";
    assert_eq!(raw_request(&hostport, body).0, 413);
    // 1 a second in bursts of 2: 30 requests in a row take far less than 28 s, so some get
    // 429 with Retry-After.
    let answers: Vec<(u16, Option<String>)> = (0..30)
        .map(|_| raw_request(&hostport, "GET /api/v1/status HTTP/1.1"))
        .collect();
    assert!(answers.iter().any(|(s, _)| *s == 200), "{answers:?}");
    let limited = answers.iter().find(|(s, _)| *s == 429);
    assert_eq!(limited.map(|(_, r)| r.as_deref()), Some(Some("1")), "{answers:?}");
    // The bucket refills (a turned-away request takes no token): the client is answered again.
    common::wait_for("an answer after the refill", Duration::from_secs(10), || {
        raw_request(&hostport, "GET /api/v1/status HTTP/1.1").0 == 200
    });
}
