//! `fmsflow`: the factory-sensor pipeline's one binary. See `fmsflow --help`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};

use fmsflow::config::{parse_duration, Config};
use fmsflow::{clock, connectors, demo, engine, gen, lake, sim, status};

/// fmsflow — factory sensor readings from the FMS API to a Parquet lake, validated and
/// aggregated per device and hour by a timely/differential dataflow.
///
/// Configuration: embedded defaults (see `fmsflow.toml`), then `--config FILE`, then
/// `FMSFLOW_<SECTION>__<KEY>` environment variables; flags below override all three.
#[derive(Parser, Debug)]
#[command(name = "fmsflow", version, propagate_version = true)]
struct Cli {
    /// TOML file with settings to change from the defaults.
    #[arg(long, global = true, env = "FMSFLOW_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole pipeline in one process: simulator, HTTP poller, engine, lake, live status.
    Demo {
        /// Time-compressed simulator (360x: an hour passes in 10 s, so hours seal quickly).
        #[arg(long)]
        fast: bool,
        /// Stop after this long, e.g. 60s or 5m (default: until Ctrl-C).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Lake URL (default from config: file://./fmsflow-lake).
        #[arg(long)]
        lake: Option<String>,
        /// Worker threads.
        #[arg(long)]
        workers: Option<usize>,
        /// Fraction of dirty simulator responses, spread over every rule.
        #[arg(long, default_value_t = 0.02)]
        dirty_rate: f64,
    },
    /// Serve the FMS API simulator: GET /{id}/ for ids 1..=N, /health, /stats.
    Sim {
        /// Number of devices.
        #[arg(long)]
        devices: Option<u32>,
        /// Port on 127.0.0.1 (0 picks a free one and prints it).
        #[arg(long)]
        port: Option<u16>,
        /// Seed of all simulated values.
        #[arg(long)]
        seed: Option<u64>,
        /// Fraction of dirty responses, spread evenly over every rule.
        #[arg(long)]
        dirty_rate: Option<f64>,
    },
    /// Replay records through the engine into the lake.
    Run {
        /// Where records come from: file:<path-or-glob> (NDJSON, optionally `<ingest_ms> ` prefixed).
        #[arg(long)]
        source: String,
        /// Lake URL, e.g. file://./fmsflow-lake.
        #[arg(long)]
        lake: Option<String>,
        /// Worker threads.
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Generate N devices × M hours of readings in the replay format.
    Gen {
        /// Number of devices.
        #[arg(long, default_value_t = 100)]
        devices: u32,
        /// Hours of data.
        #[arg(long, default_value_t = 24)]
        hours: u32,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Fraction of dirty records.
        #[arg(long, default_value_t = 0.0)]
        dirty_rate: f64,
        /// Fraction of readings delivered up to 30 minutes late.
        #[arg(long, default_value_t = 0.0)]
        late_rate: f64,
        /// Event time of the first reading (RFC 3339).
        #[arg(long, default_value = "2025-07-07T00:00:00Z")]
        start: String,
    },
}

// Many short-lived record buffers: mimalloc is markedly faster than glibc's malloc here.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FMSFLOW_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut cfg = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Demo {
            fast,
            duration,
            lake,
            workers,
            dirty_rate,
        } => {
            if let Some(l) = lake {
                cfg.lake.url = l;
            }
            if let Some(w) = workers {
                anyhow::ensure!(w > 0, "--workers must be at least 1");
                cfg.engine.workers = w;
            }
            anyhow::ensure!(
                (0.0..=1.0).contains(&dirty_rate),
                "--dirty-rate must be between 0 and 1"
            );
            demo::run(
                &cfg,
                demo::DemoOptions {
                    speedup: fast.then_some(360.0),
                    duration,
                    dirty_rate,
                },
            )
        }
        Command::Sim {
            devices,
            port,
            seed,
            dirty_rate,
        } => {
            let settings = sim::SimSettings {
                devices: devices.unwrap_or(cfg.fleet.devices),
                seed: seed.unwrap_or(cfg.sim.seed),
                dirty_rate: dirty_rate.unwrap_or(cfg.sim.dirty_rate),
            };
            anyhow::ensure!(settings.devices > 0, "--devices must be at least 1");
            anyhow::ensure!(
                (0.0..=1.0).contains(&settings.dirty_rate),
                "--dirty-rate must be between 0 and 1"
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let sim = sim::Sim::new(settings.clone(), clock::Clock::real());
                let (addr, task) = sim::serve(sim, port.unwrap_or(cfg.sim.port), async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
                .context("binding the simulator's port")?;
                println!(
                    "fmsflow sim: {} devices on http://{addr} (seed {}, dirty rate {})",
                    settings.devices, settings.seed, settings.dirty_rate
                );
                let _ = std::io::stdout().flush();
                task.await??;
                Ok(())
            })
        }
        Command::Run { source, lake, workers } => {
            if let Some(l) = lake {
                cfg.lake.url = l;
            }
            if let Some(w) = workers {
                anyhow::ensure!(w > 0, "--workers must be at least 1");
                cfg.engine.workers = w;
            }
            run_replay(&cfg, &source)
        }
        Command::Gen {
            devices,
            hours,
            out,
            seed,
            dirty_rate,
            late_rate,
            start,
        } => {
            let start_ms = fmsflow_dataflows::time::parse_rfc3339(&start)
                .with_context(|| format!("--start {start:?} is not an RFC 3339 time"))?;
            let s = gen::GenSettings {
                devices,
                hours,
                interval_s: 10,
                start_ms,
                seed,
                dirty_rate,
                late_rate,
                max_late_ms: 30 * 60 * 1000,
            };
            let (records, dirty) = gen::generate(&s);
            let f = std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
            let mut w = std::io::BufWriter::new(f);
            for (ingest, payload) in &records {
                writeln!(w, "{ingest} {payload}")?;
            }
            w.flush()?;
            eprintln!(
                "wrote {} records to {} (dirty: {:?})",
                records.len(),
                out.display(),
                dirty
            );
            Ok(())
        }
    }
}

fn run_replay(cfg: &Config, source: &str) -> anyhow::Result<()> {
    let Some(pattern) = source.strip_prefix("file:") else {
        anyhow::bail!("--source {source:?}: this build replays only file:<path-or-glob> sources");
    };
    let files = connectors::file::expand(pattern)?;
    let storage = lake::open(&cfg.lake.url, cfg.lake.fsync)?;
    eprintln!(
        "replaying {} file(s) on {} workers into {}",
        files.len(),
        cfg.engine.workers,
        storage.describe()
    );
    let writer = Arc::new(lake::LakeWriter::new(storage, cfg.lake.row_group_rows));
    let status = Arc::new(status::Status::default());
    let settings = engine::EngineSettings {
        flow: cfg.flow_config(),
        workers: cfg.engine.workers,
        batch: cfg.engine.batch,
        epoch: cfg.engine.epoch.0,
    };
    let started = Instant::now();
    let st = status.clone();
    let handle = std::thread::spawn(move || engine::run(settings, engine::Source::Files(files), Some(writer), st));
    let mut last = Instant::now();
    while !handle.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            eprintln!(
                "  {} records in, {} hours sealed",
                status.received.load(Relaxed),
                status.hours_sealed.load(Relaxed)
            );
        }
    }
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))??;
    let secs = started.elapsed().as_secs_f64();
    let total = status.received.load(Relaxed);
    println!(
        "replayed {total} records in {secs:.2} s ({:.0} records/s): {}",
        total as f64 / secs,
        status.summary()
    );
    Ok(())
}
