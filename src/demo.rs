//! `fmsflow demo`: the whole live path in one process. Starts the simulator, polls it over
//! HTTP like the collector, runs the engine on W workers, writes the lake, and shows a live
//! status line. Ctrl-C (or `--duration`) stops it with everything flushed.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use fmsflow_dataflows::RawRecord;

use crate::clock::Clock;
use crate::config::Config;
use crate::connectors::fms_http::{poll, PollSettings};
use crate::engine::{self, EngineSettings, Source};
use crate::lake;
use crate::sim::{Sim, SimSettings};
use crate::status::Status;

/// Demo options from the command line.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Time-compressed: the simulator's clock runs this many times faster.
    pub speedup: Option<f64>,
    /// Stop after this long (wall clock).
    pub duration: Option<Duration>,
    /// Dirty fraction for the simulator.
    pub dirty_rate: f64,
    /// Where the dashboard and API listen (else `api.listen`, else [`crate::config::DEMO_LISTEN`]).
    pub http: Option<String>,
}

/// Runs the demo.
pub fn run(cfg: &Config, opts: DemoOptions) -> anyhow::Result<()> {
    let clock = match opts.speedup {
        Some(s) => Clock::fast(s),
        None => Clock::real(),
    };
    let storage = lake::open(&cfg.lake.url, &cfg.lake.storage_options())?;
    eprintln!(
        "fmsflow demo: {} devices, {} workers, lake in {}",
        cfg.fleet.devices,
        cfg.engine.workers,
        storage.describe()
    );
    // Live: one readings file at a time (`LakeWriter::one_readings_file_at_a_time`).
    let writer = Arc::new(cfg.lake.writer(storage.clone()).one_readings_file_at_a_time(true));
    let status = Arc::new(Status::default());
    let stop = Arc::new(AtomicBool::new(false));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let sim = Sim::new(
        SimSettings {
            devices: cfg.fleet.devices,
            seed: cfg.sim.seed,
            dirty_rate: opts.dirty_rate,
        },
        clock.clone(),
    );
    let (sim_stop_tx, sim_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, sim_task) = rt
        .block_on(crate::sim::serve(sim.clone(), 0, async move {
            let _ = sim_stop_rx.await;
        }))
        .context("starting the simulator on 127.0.0.1")?;
    eprintln!(
        "simulator on http://{addr} (speedup {}x); Ctrl-C stops cleanly",
        clock.speedup()
    );

    // One channel per worker; a device always goes to the same worker.
    let workers = cfg.engine.workers;
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..workers).map(|_| mpsc::channel::<RawRecord>()).unzip();
    let deliver: Arc<dyn Fn(u32, RawRecord) + Send + Sync> = Arc::new(move |device, raw| {
        let _ = txs[device as usize % txs.len()].send(raw);
    });

    let settings = EngineSettings {
        flow: cfg.flow_config(),
        workers,
        batch: cfg.engine.batch,
        epoch: cfg.engine.epoch.0,
        cluster: None,
        replay_rate: None,
    };
    // The query API and dashboard, over the engine's live view.
    let view = cfg.api.view(workers, storage, 0, 1);
    let chosen = opts
        .http
        .clone()
        .or_else(|| Some(cfg.api.listen.clone()).filter(|l| !l.is_empty()));
    let start_api = |listen: String| {
        crate::api::start(
            crate::api::settings_from(cfg, listen, 0, cfg.fleet.devices),
            view.clone(),
            status.clone(),
        )
    };
    let api = match chosen {
        // An address asked for must be had.
        Some(listen) => start_api(listen).context("starting the query API")?,
        // The default one may be taken (another demo): any free port then.
        None => match start_api(crate::config::DEMO_LISTEN.to_string()) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("{e}; the dashboard takes a free port instead");
                start_api("127.0.0.1:0".to_string()).context("starting the query API")?
            }
        },
    };
    eprintln!("dashboard on http://{}/ (query API under /api/v1/)", api.addr);

    let engine_status = status.clone();
    let engine_writer = writer.clone();
    let engine = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            engine::run(
                settings,
                Source::Live(rxs),
                Some(engine_writer),
                None,
                engine_status,
                Some(view),
            )
        })
        .context("starting the engine thread")?;

    let interval = cfg.collector.interval.0.div_f64(clock.speedup());
    let poll_settings = PollSettings {
        base: format!("http://{addr}"),
        devices: cfg.fleet.devices,
        interval,
        concurrency: cfg.collector.concurrency,
        timeout: cfg.collector.timeout.0,
        retries: cfg.collector.retries,
    };
    let poller = rt.spawn(poll(
        poll_settings,
        clock.clone(),
        status.clone(),
        deliver,
        stop.clone(),
    ));

    {
        let stop = stop.clone();
        rt.spawn(async move {
            crate::shutdown::signal().await;
            eprintln!("\nstopping: flushing the pipeline");
            stop.store(true, Relaxed);
        });
    }

    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last = (Instant::now(), 0u64);
    let mut last_print = Instant::now() - Duration::from_secs(60);
    while !stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        if opts.duration.is_some_and(|d| started.elapsed() >= d) || status.error().is_some() || engine.is_finished() {
            stop.store(true, Relaxed);
            break;
        }
        let every = if tty {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        if last_print.elapsed() >= every {
            let total = status.valid.load(Relaxed) + status.rejected.load(Relaxed);
            let rate = (total - last.1) as f64 / last.0.elapsed().as_secs_f64();
            last = (Instant::now(), total);
            last_print = Instant::now();
            let line = status_line(&status, &clock, rate);
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
        }
    }
    if tty {
        eprintln!();
    }
    rt.block_on(poller).context("the poller task")?;
    let result = engine
        .join()
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    let _ = sim_stop_tx.send(());
    let _ = rt.block_on(sim_task);
    result?;
    let s = sim.stats();
    eprintln!("{}", status_line(&status, &clock, 0.0));
    eprintln!(
        "done: {} polled, {}; {} poll errors",
        s.served,
        status.summary(),
        status.poll_errors.load(Relaxed)
    );
    eprintln!(
        "simulator served dirty: {:?}",
        s.dirty.iter().filter(|(_, n)| **n > 0).collect::<Vec<_>>()
    );
    Ok(())
}

fn status_line(status: &Status, clock: &Clock, rate: f64) -> String {
    let valid = status.valid.load(Relaxed);
    let total = valid + status.rejected.load(Relaxed);
    let quality = if total == 0 {
        100.0
    } else {
        100.0 * valid as f64 / total as f64
    };
    let failing = status.failing_devices();
    let shown: Vec<String> = failing.iter().take(8).map(|d| d.to_string()).collect();
    let more = if failing.len() > 8 {
        format!(" +{}", failing.len() - 8)
    } else {
        String::new()
    };
    format!(
        "[{}] {rate:>7.0} readings/s | {total} in, quality {quality:.1}% | hours sealed {} | failing devices ({}): {}{more}",
        fmsflow_dataflows::time::format_rfc3339(clock.now_ms() / 1000 * 1000),
        status.hours_sealed.load(Relaxed),
        failing.len(),
        if shown.is_empty() { "none".to_string() } else { shown.join(",") },
    )
}
