//! Monitoring, for real: the files of `cluster/monitoring` checked by Debian's promtool, every
//! metric name they use exported by the code, and a real Prometheus with the project's
//! scrape config and rules scraping a live pipeline (simulator → collector → Kafka → engine)
//! until a silenced device fires `FmsflowDeviceSilent`.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::kafka::{create_topic, kafka_env, start_sim, unique, Killed};

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/monitoring")
}

/// A Prometheus program: `FMSFLOW_<VAR>` (set by `scripts/test`), else `name` on the PATH.
fn prometheus_tool(var: &str, name: &str) -> String {
    let program = std::env::var(var).unwrap_or_else(|_| name.to_string());
    let found = Command::new(&program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is not installed: these tests need Debian's prometheus package \
         (`apt-get install prometheus`, which `bash scripts/test` runs), or {var} naming the program"
    );
    program
}

/// The files under `dir` (recursively) whose names end in one of `exts`.
fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p, exts));
        } else if exts.iter().any(|x| p.to_string_lossy().ends_with(x)) {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Every `fmsflow_…` metric name in `text` (recording rules, `fmsflow:…`, are not metrics
/// the code exports).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("fmsflow_") {
        let start = i + at;
        let before_ok = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if before_ok {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

#[test]
fn dashboards_and_rules_use_only_metrics_the_code_exports() {
    let exported = fmsflow::metrics::exported_names();
    // A histogram's series are its name with _bucket, _sum and _count.
    let known = |n: &str| {
        exported.contains(n)
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| n.strip_suffix(s).is_some_and(|b| exported.contains(b)))
    };
    let dir = monitoring_dir();
    let checked = files(&dir.join("rules"), &[".yml"])
        .into_iter()
        .chain(files(&dir.join("dashboards"), &[".json"]))
        .chain(files(&dir.join("tests"), &[".yml"]))
        .collect::<Vec<_>>();
    assert!(
        checked.len() >= 5,
        "rules, dashboards and rule tests expected in {dir:?}: {checked:?}"
    );
    let mut used = BTreeSet::new();
    for f in &checked {
        let text = std::fs::read_to_string(f).unwrap();
        let names = metric_names(&text);
        let unknown: Vec<_> = names.iter().filter(|n| !known(n)).collect();
        assert!(
            unknown.is_empty(),
            "{} uses metrics the code does not export: {unknown:?}",
            f.display()
        );
        used.extend(names);
    }
    // The key series are in use (a dashboard or rule file that lost them would pass above).
    for n in [
        "fmsflow_records_received_total",
        "fmsflow_readings_valid_total",
        "fmsflow_devices_reporting",
        "fmsflow_kafka_partition_lag",
        "fmsflow_watermark_seconds",
        "fmsflow_sink_errors_total",
        "fmsflow_latency_seconds_bucket",
        "fmsflow_collector_polls_expected_total",
    ] {
        assert!(used.contains(n), "no dashboard or rule uses {n}");
    }
    // Every dashboard queries the datasource the Grafana role provisions.
    for d in files(&dir.join("dashboards"), &[".json"]) {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&d).unwrap())
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", d.display()));
        let text = v.to_string();
        assert!(
            text.contains(r#""uid":"prometheus""#),
            "{}: no prometheus datasource",
            d.display()
        );
        assert!(v["uid"].is_string() && v["panels"].as_array().is_some_and(|p| !p.is_empty()));
    }
}

#[test]
fn promtool_passes_the_config_the_rules_and_the_rule_tests() {
    let promtool = prometheus_tool("FMSFLOW_PROMTOOL", "promtool");
    let dir = monitoring_dir();
    let rules: Vec<String> = files(&dir.join("rules"), &[".yml"])
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    for args in [
        vec!["check".to_string(), "config".into(), "prometheus.yml".into()],
        [vec!["check".to_string(), "rules".into()], rules].concat(),
        vec!["test".to_string(), "rules".into(), "tests/fmsflow_test.yml".into()],
    ] {
        let out = Command::new(&promtool).args(&args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(dir.join("rules/fmsflow.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("tests/fmsflow_test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for a in alerts {
        assert!(tests.contains(&format!("alertname: {a}")), "no promtool test of {a}");
    }
}

/// One HTTP request to 127.0.0.1:`port`: the status code and the body.
fn request(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((
        code,
        resp.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The values of an instant PromQL query (one per series; empty when none).
fn query(port: u16, q: &str) -> Vec<f64> {
    let (code, body) = match request(port, "GET", &format!("/api/v1/query?query={}", url_encode(q))) {
        Ok(r) => r,
        Err(_) => return Vec::new(),
    };
    // Chunked bodies: the JSON is the part between the first '{' and the last '}'.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if code == 200 => &body[a..=b],
        _ => return Vec::new(),
    };
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    v["data"]["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| s["value"][1].as_str().and_then(|x| x.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// The single value of `q`, if the query has exactly one series.
fn value(port: u16, q: &str) -> Option<f64> {
    match query(port, q).as_slice() {
        [v] => Some(*v),
        _ => None,
    }
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool, log: impl Fn() -> String) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn prometheus_scrapes_a_live_pipeline_and_a_silenced_device_fires_its_alert() {
    let prometheus = prometheus_tool("FMSFLOW_PROMETHEUS", "prometheus");
    let devices = 20;
    let raw = unique("monitoring");
    create_topic(&raw, 2);
    let (_sim, sim_port) = start_sim(&["--devices", &devices.to_string(), "--seed", "11"]);
    let ports = common::free_ports(3);
    let (collector_port, engine_port, prom_port) = (ports[0], ports[1], ports[2]);
    let token = "monitoring-test-token";
    let work = tempfile::tempdir().unwrap();

    let spawn_logged = |cmd: &mut Command, name: &str| {
        let log = std::fs::File::create(work.path().join(format!("{name}.log"))).unwrap();
        Killed(
            cmd.stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {name}: {e}")),
        )
    };
    let logs = || {
        ["collector", "engine", "prometheus"]
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(work.path().join(format!("{n}.log"))).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {n} (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let shared_env = |cmd: &mut Command| {
        cmd.env("FMSFLOW_FLEET__DEVICES", devices.to_string())
            .env("FMSFLOW_COLLECTOR__INTERVAL", "1s");
    };

    let mut collect = Command::new(common::bin());
    kafka_env(&mut collect, &raw, 2).args([
        "collect",
        "--api",
        &format!("http://127.0.0.1:{sim_port}"),
        "--devices",
        &devices.to_string(),
        "--interval",
        "1s",
        "--metrics-listen",
        &format!("127.0.0.1:{collector_port}"),
    ]);
    shared_env(&mut collect);
    let _collector = spawn_logged(&mut collect, "collector");

    let lake = work.path().join("lake");
    let mut engine = common::kafka::follow_command(&raw, 2, &format!("file://{}", lake.display()));
    engine
        .args(["--http", &format!("127.0.0.1:{engine_port}")])
        .env("FMSFLOW_API__TOKEN", token);
    shared_env(&mut engine);
    let _engine = spawn_logged(&mut engine, "engine");

    // Prometheus with the project's config, rules and rule tests' folder layout; only the
    // intervals are shortened, and the targets point at this test's processes.
    let conf = work.path().join("prometheus");
    std::fs::create_dir_all(conf.join("rules")).unwrap();
    std::fs::create_dir_all(conf.join("targets")).unwrap();
    let dir = monitoring_dir();
    let config = std::fs::read_to_string(dir.join("prometheus.yml")).unwrap();
    assert_eq!(config.matches("interval: 15s").count(), 2, "{config}");
    std::fs::write(
        conf.join("prometheus.yml"),
        config.replace("interval: 15s", "interval: 1s"),
    )
    .unwrap();
    for r in files(&dir.join("rules"), &[".yml"]) {
        std::fs::copy(&r, conf.join("rules").join(r.file_name().unwrap())).unwrap();
    }
    let target = |port: u16, labels: &str| format!(r#"[{{"targets": ["127.0.0.1:{port}"], "labels": {{{labels}}}}}]"#);
    for (file, text) in [
        ("engine.json", target(engine_port, r#""process": "0""#)),
        ("collector.json", target(collector_port, "")),
        ("simulator.json", target(sim_port, "")),
        ("kafka.json", "[]".to_string()),
        ("node.json", "[]".to_string()),
    ] {
        std::fs::write(conf.join("targets").join(file), text).unwrap();
    }
    std::fs::write(conf.join("fmsflow-api-token"), token).unwrap();
    let _prometheus = spawn_logged(
        Command::new(&prometheus).args([
            &format!("--config.file={}", conf.join("prometheus.yml").display()),
            &format!("--storage.tsdb.path={}", conf.join("data").display()),
            &format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ]),
        "prometheus",
    );
    wait_until(
        "Prometheus to be ready",
        Duration::from_secs(60),
        || request(prom_port, "GET", "/-/ready").is_ok_and(|(c, _)| c == 200),
        logs,
    );

    // Every fmsflow target is scraped (the engine's with the token from the credentials file).
    for job in ["fmsflow-engine", "fmsflow-collector", "fms-simulator"] {
        wait_until(
            &format!("up{{job={job:?}}} == 1"),
            Duration::from_secs(90),
            || value(prom_port, &format!("up{{job={job:?}}}")) == Some(1.0),
            logs,
        );
    }
    // The key series exist and move.
    let moving = [
        r#"fmsflow_records_received_total{job="fmsflow-engine"}"#,
        r#"fmsflow_readings_valid_total{job="fmsflow-engine"}"#,
        r#"fmsflow_latency_seconds_count{job="fmsflow-engine"}"#,
        r#"fmsflow_epoch_duration_seconds_count{job="fmsflow-engine"}"#,
        r#"fmsflow_collector_polls_total{job="fmsflow-collector",class="2xx"}"#,
        r#"fmsflow_collector_polls_expected_total{job="fmsflow-collector"}"#,
        r#"fmsflow_collector_records_delivered_total{job="fmsflow-collector"}"#,
        r#"fmsflow_sim_responses_total{job="fms-simulator",kind="clean"}"#,
        r#"fmsflow_watermark_seconds{job="fmsflow-engine"}"#,
        r#"fmsflow_uptime_seconds{job="fmsflow-engine"}"#,
    ];
    let first: Vec<f64> = moving
        .iter()
        .map(|q| {
            let mut v = None;
            wait_until(
                &format!("a sample of {q}"),
                Duration::from_secs(60),
                || {
                    v = value(prom_port, q);
                    v.is_some()
                },
                logs,
            );
            v.unwrap()
        })
        .collect();
    for (q, v0) in moving.iter().zip(first) {
        wait_until(
            &format!("{q} to move past {v0}"),
            Duration::from_secs(60),
            || value(prom_port, q).is_some_and(|v| v > v0),
            logs,
        );
    }
    wait_until(
        "every device reporting, and the quality and availability recording rules",
        Duration::from_secs(60),
        || {
            value(prom_port, r#"sum(fmsflow_devices_reporting{job="fmsflow-engine"})"#) == Some(devices as f64)
                && value(prom_port, "fmsflow:quality_ratio:rate5m").is_some_and(|q| q > 0.9 && q <= 1.0)
                && value(prom_port, "fmsflow:availability_ratio:rate5m").is_some_and(|a| a > 0.5)
        },
        logs,
    );
    // Quality and availability are query-API answers too.
    let (code, body) = request(engine_port, "GET", "/api/v1/quality").unwrap();
    assert_eq!(code, 401, "the API asks for its token: {body}");
    let quality: serde_json::Value = {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", engine_port)).unwrap();
        write!(
            s,
            "GET /api/v1/quality HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let body = &resp[resp.find('{').unwrap()..=resp.rfind('}').unwrap()];
        serde_json::from_str(body).unwrap()
    };
    let availability = quality["availability"].as_f64().unwrap();
    assert!(availability > 0.5 && availability <= 1.05, "{quality}");
    assert!(quality["expected"].as_f64().unwrap() > 0.0, "{quality}");
    assert!(quality["valid_ratio"].as_f64().unwrap() > 0.9, "{quality}");
    assert_eq!(
        alert_state(prom_port, "FmsflowDeviceSilent"),
        None,
        "no device is silent yet:\n{}",
        logs()
    );

    // Silence one device: after 60 s without a reading the alert fires.
    let (code, body) = request(sim_port, "PUT", "/control/silence/7").unwrap();
    assert_eq!(code, 200, "{body}");
    let silenced = Instant::now();
    wait_until(
        "the simulator's silenced gauge",
        Duration::from_secs(30),
        || value(prom_port, "fmsflow_sim_devices_silenced") == Some(1.0),
        logs,
    );
    wait_until(
        "one device short in fmsflow:devices_silent",
        Duration::from_secs(150),
        || value(prom_port, "fmsflow:devices_silent") == Some(1.0),
        logs,
    );
    wait_until(
        "FmsflowDeviceSilent firing in /api/v1/alerts",
        Duration::from_secs(60),
        || alert_state(prom_port, "FmsflowDeviceSilent").as_deref() == Some("firing"),
        logs,
    );
    assert!(
        silenced.elapsed() >= Duration::from_secs(55),
        "the alert fired {:?} after the device went silent; it must wait for 60 s without a reading",
        silenced.elapsed()
    );
    // The collector counted the device's 503s.
    assert!(
        value(
            prom_port,
            r#"fmsflow_collector_polls_total{job="fmsflow-collector",class="5xx"}"#
        )
        .is_some_and(|v| v > 0.0),
        "no 5xx polls counted"
    );
}

/// The state (`pending`, `firing`) of alert `name` in Prometheus's `/api/v1/alerts`.
fn alert_state(port: u16, name: &str) -> Option<String> {
    let (_, body) = request(port, "GET", "/api/v1/alerts").ok()?;
    let json = &body[body.find('{')?..=body.rfind('}')?];
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["data"]["alerts"]
        .as_array()?
        .iter()
        .find(|a| a["labels"]["alertname"] == name)
        .and_then(|a| a["state"].as_str().map(str::to_string))
}
