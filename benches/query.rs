//! Query latency while ingesting: the engine replays generated readings paced at
//! `FMSFLOW_BENCH_RATE` (default 10,000) msgs/s on 2 workers, into a local lake, with the
//! query API on 127.0.0.1; a client in the same process asks point queries (a device's
//! latest reading, a device's 24 hours) and fleet queries (one hour of every device, the
//! top 20 by fails, quality over 24 hours) at a steady pace over keep-alive connections,
//! and prints p50/p99/max per kind. Run: `cargo bench --bench query`.
//!
//! Sizes: `FMSFLOW_BENCH_DEVICES` (default 1,000), `FMSFLOW_BENCH_SECONDS` of measurement
//! (default 30, after a 3 s warm-up); `FMSFLOW_BENCH_KINDS=0,1` asks only those kinds of
//! query (in the printed order).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fmsflow::api::{self, view::LiveView, ApiSettings};
use fmsflow::config::Config;
use fmsflow::engine::{self, EngineSettings, Source};
use fmsflow::gen::{generate, GenSettings};
use fmsflow::lake;
use fmsflow::status::Status;
use serde_json::json;

mod common;
use common::{percentile, Results};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// p50, p90, p99 and max of `v` (sorted here), in ms.
fn summary(v: &mut [Duration]) -> [f64; 4] {
    v.sort();
    [0.5, 0.9, 0.99, 1.0].map(|q| percentile(v, q).as_secs_f64() * 1e3)
}

fn main() {
    fmsflow::no_huge_pages();
    let rate: f64 = env_or("FMSFLOW_BENCH_RATE", 10_000.0);
    let devices: u32 = env_or("FMSFLOW_BENCH_DEVICES", 1_000);
    let seconds: u64 = env_or("FMSFLOW_BENCH_SECONDS", 30);
    let workers = 2;
    // Enough readings to last the warm-up, the measurement and some more, one every 10 s
    // per device, in time order.
    let need = rate * (seconds as f64 + 10.0);
    let hours = (need / (devices as f64 * 360.0)).ceil() as u32;
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in.ndjson");
    {
        use std::io::Write;
        let (records, _) = generate(&GenSettings {
            dirty_rate: 0.01,
            ..GenSettings::clean(devices, hours)
        });
        let mut w = std::io::BufWriter::new(std::fs::File::create(&input).expect("input file"));
        for (ingest, payload) in &records {
            writeln!(w, "{ingest} {payload}").expect("writing the input");
        }
    }
    let mut cfg = Config::from_sources(None, &[]).expect("default config");
    cfg.fleet.devices = devices;
    let storage = lake::open(
        &format!("file://{}", dir.path().join("lake").display()),
        &cfg.lake.storage_options(),
    )
    .expect("lake");
    let view = LiveView::new(workers, cfg.api.keep_hours);
    let status = Arc::new(Status::default());
    let server = api::start(
        ApiSettings {
            listen: "127.0.0.1:0".into(),
            token: None,
            peers: Vec::new(),
            process: 0,
            max_in_flight: 64,
            // The benchmark's client is one address asking as fast as it can.
            rate_limit: 0.0,
            devices,
            poll_interval: cfg.collector.interval.0,
        },
        view.clone(),
        status.clone(),
    )
    .expect("API");
    let settings = EngineSettings::paced(cfg.flow_config(), workers, rate);
    let (st, v) = (status.clone(), view.clone());
    let writer = Arc::new(cfg.lake.writer(storage));
    let engine = std::thread::spawn(move || {
        engine::run(settings, Source::Files(vec![input]), Some(writer), None, st, Some(v)).expect("engine run")
    });
    println!(
        "fmsflow query benchmark: {devices} devices, ingest paced at {rate} msgs/s on {workers} workers, \
         API on http://{}, {} cores",
        server.addr,
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1)
    );

    let base = format!("http://{}", server.addr);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let kinds = [
        "device latest",
        "device hourly (24 h)",
        "fleet hour (all devices)",
        "fleet top 20 by fails",
        "quality 24 h",
    ];
    let results = rt.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(8)
            .build()
            .expect("client");
        let path = move |kind: usize, i: u64| {
            let d = 1 + (i * 7919 % devices as u64);
            match kind {
                0 => format!("/api/v1/devices/{d}/latest"),
                1 => format!("/api/v1/devices/{d}/hourly"),
                2 => "/api/v1/fleet/hourly".to_string(),
                3 => "/api/v1/fleet/hourly?sort=fails&limit=20".to_string(),
                _ => "/api/v1/quality".to_string(),
            }
        };
        // Per kind: queries per second.
        let pace = [100.0, 100.0, 5.0, 20.0, 5.0];
        tokio::time::sleep(Duration::from_secs(3)).await;
        let received0 = status.received.load(Relaxed);
        let start = Instant::now();
        let mut tasks = Vec::new();
        // FMSFLOW_BENCH_KINDS=0,1 asks only those kinds (by their order in the table).
        let only: Option<Vec<usize>> = std::env::var("FMSFLOW_BENCH_KINDS")
            .ok()
            .map(|v| v.split(',').filter_map(|k| k.trim().parse().ok()).collect());
        for (kind, qps) in pace.into_iter().enumerate() {
            if only.as_ref().is_some_and(|o| !o.contains(&kind)) {
                tasks.push(tokio::spawn(async { Vec::new() }));
                continue;
            }
            let (client, base) = (client.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / qps));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut i = 0u64;
                while start.elapsed() < Duration::from_secs(seconds) {
                    tick.tick().await;
                    i += 1;
                    let t = Instant::now();
                    let r = client.get(format!("{base}{}", path(kind, i))).send().await;
                    let ok = match r {
                        // 404: a device with no reading yet (at low rates) is still an answer.
                        Ok(r) => {
                            (r.status().is_success() || r.status() == reqwest::StatusCode::NOT_FOUND)
                                && r.bytes().await.is_ok()
                        }
                        Err(_) => false,
                    };
                    assert!(ok, "query {} failed", path(kind, i));
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        let ingested = (status.received.load(Relaxed) - received0) as f64 / start.elapsed().as_secs_f64();
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("/metrics")
            .text()
            .await
            .expect("/metrics text");
        (out, ingested, metrics)
    });
    let (mut lat, ingested, metrics) = results;
    println!("ingest during the measurement: {ingested:.0} msgs/s");
    let mut results = Results::new("query");
    for (k, v) in kinds.iter().zip(lat.iter_mut()) {
        let n = v.len();
        if n == 0 {
            continue;
        }
        let [p50, p90, p99, max] = summary(v);
        println!("{k:<28} {n:>6} queries  p50 {p50:>7.3} ms  p90 {p90:>7.3} ms  p99 {p99:>7.3} ms  max {max:>7.3} ms");
        results.push(
            json!({"kind": k, "queries": n, "ingest_msgs_per_s": ingested, "devices": devices,
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max}),
        );
    }
    results.finish();
    // The server's own view of the same queries (from the request arriving to the answer
    // leaving axum), against the client's: the difference is transport and scheduling.
    for endpoint in ["device_latest", "device_hourly"] {
        let bucket = |le: &str| {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "fmsflow_query_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"{le}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit_once(' '))
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let all = bucket("+Inf");
        if all > 0.0 {
            println!(
                "server side, {endpoint}: {:.2} % within 1 ms, {:.2} % within 2 ms, {:.2} % within 5 ms",
                100.0 * bucket("0.001") / all,
                100.0 * bucket("0.002") / all,
                100.0 * bucket("0.005") / all
            );
        }
    }
    drop(server);
    drop(engine);
}
