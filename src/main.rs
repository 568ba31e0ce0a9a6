//! `fmsflow`: the factory-sensor pipeline's one binary. See `fmsflow --help`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};

use fmsflow::config::{parse_duration, Config};
use fmsflow::{api, clock, connectors, demo, engine, gen, lake, sim, status};

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
        /// Where the dashboard and query API listen, host:port (default api.listen, else
        /// 127.0.0.1:8090; port 0 picks a free one).
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
    },
    /// Serve the FMS API simulator: GET /{id}/ for ids 1..=N, /health, /stats, /metrics.
    ///
    /// Faults, to rehearse a failing FMS API: a faulty device answers `silence` (503), `error`
    /// (500 with a body), `hang` (nothing until --hang-for passes, far beyond the collector's
    /// timeout; then 504) or `garbage` (200 with a body that is not a reading: truncated JSON,
    /// an HTML page, random bytes, JSON of another shape). PUT /control/fault/{id}?kind=<kind>
    /// sets one, DELETE /control/fault/{id} ends it (PUT/DELETE /control/silence/{id}: the
    /// same for silence); --fault-share gives a share of the fleet one from the start.
    /// /stats counts them: `served` (every 200, garbage included: what reaches Kafka), `dirty`
    /// by rule (garbage included), `faults` by kind; /stats/devices per device.
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
        /// Fraction of the devices given a fault from the start (0 to 1, rounded to whole
        /// devices), chosen from the seed.
        #[arg(long, default_value_t = 0.0)]
        fault_share: f64,
        /// The faults --fault-share deals to its devices in turn: silence, error, hang, garbage.
        #[arg(long, value_delimiter = ',', default_value = "error,hang,garbage")]
        fault_kinds: Vec<sim::Fault>,
        /// How long a hanging device holds a request before it answers 504 (a stopping
        /// simulator answers at once).
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        hang_for: Duration,
    },
    /// Poll the FMS API for every device and produce each payload to the raw Kafka topic.
    Collect {
        /// Base URL of the FMS API (devices at <URL>/<id>/).
        #[arg(long)]
        api: Option<String>,
        /// Number of devices, polled as ids 1..=N.
        #[arg(long)]
        devices: Option<u32>,
        /// Time between two polls of one device, e.g. 10s.
        #[arg(long, value_parser = parse_duration)]
        interval: Option<Duration>,
        /// Kafka bootstrap servers, host:port,...
        #[arg(long)]
        brokers: Option<String>,
        /// Raw topic (created if missing).
        #[arg(long)]
        topic: Option<String>,
        /// Stop after this long (default: until Ctrl-C).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Serve Prometheus metrics at http://<ADDR>/metrics (host:port; default
        /// collector.metrics_listen, 127.0.0.1:9101; "" turns it off).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
    /// Run the engine: records from files or Kafka, through the dataflow, into the lake (and,
    /// from Kafka, the changelog and dead-letter topics).
    Run {
        /// Where records come from: file:<path-or-glob> (NDJSON, optionally `<ingest_ms> `
        /// prefixed), or kafka (the raw topic; see --brokers, --from, --until).
        #[arg(long)]
        source: String,
        /// Lake URL, e.g. file://./fmsflow-lake.
        #[arg(long)]
        lake: Option<String>,
        /// Worker threads.
        #[arg(long)]
        workers: Option<usize>,
        /// Kafka bootstrap servers (with --source kafka).
        #[arg(long)]
        brokers: Option<String>,
        /// Where to start reading Kafka: earliest, latest, timestamp:<RFC 3339>,
        /// offsets:<partition>=<offset>,... (unlisted partitions start at their earliest),
        /// checkpoint (resume after a crash from the lake's checkpoint, with the same --workers
        /// and --hosts; see docs/RECOVERY.md), or auto (checkpoint when the lake has one, else
        /// earliest: what a service runs with).
        #[arg(long, default_value = "earliest")]
        from: String,
        /// `end`: stop at the end each partition has when the run starts, with epochs cut at
        /// fixed offsets (a replay: the same range gives the same outputs). Without it the
        /// engine follows the topic until Ctrl-C or SIGTERM (either drains, then exits 0).
        #[arg(long, value_parser = ["end"])]
        until: Option<String>,
        /// Run as one process of a timely cluster: the `host:port` every process listens on
        /// for the others, in process order (default cluster.hosts). Every process gets the
        /// same list, --workers and options, and its own --process. Start-up waits
        /// cluster.connect_timeout (60 s) for the others, then fails naming the missing.
        #[arg(long, visible_alias = "cluster", value_delimiter = ',', value_name = "HOST:PORT,...")]
        hosts: Vec<String>,
        /// The host list from a file: one host:port per line, `#` comments (default
        /// cluster.hosts_file).
        #[arg(long, value_name = "FILE", conflicts_with = "hosts")]
        hosts_file: Option<PathBuf>,
        /// This process's index in the host list, from 0 (default cluster.process).
        #[arg(long)]
        process: Option<usize>,
        /// Serve the query API and dashboard on host:port (default api.listen; empty: none).
        /// Beyond loopback it needs api.token.
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
        /// In a cluster: every process's API base URL (http://host:port), in process order,
        /// so any process answers for every device (default api.peers).
        #[arg(long, value_delimiter = ',', value_name = "URLS")]
        api_peers: Vec<String>,
        /// After the input ends, keep answering queries until Ctrl-C (needs --http or
        /// api.listen).
        #[arg(long)]
        keep_serving: bool,
        /// File replay: at most this many records per second in this process (default: as
        /// fast as possible).
        #[arg(long, value_name = "N")]
        rate: Option<f64>,
    },
    /// Ask a running engine's query API (`--http` of `fmsflow run`, or the demo's).
    Query {
        /// The API's base URL.
        #[arg(long, env = "FMSFLOW_API_URL", default_value = "http://127.0.0.1:8090")]
        url: String,
        /// Print the JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        ask: QueryCommand,
    },
    /// Generate N devices × M hours of readings in the replay format.
    Gen {
        /// Number of devices.
        #[arg(long, default_value_t = 100)]
        devices: u32,
        /// Hours of data.
        #[arg(long, default_value_t = 24)]
        hours: u32,
        /// Stop after this many readings (the benchmarks' "N readings"): the hours needed
        /// for them, one reading per device every 10 s, the last 10 s cut short; overrides
        /// --hours.
        #[arg(long)]
        readings: Option<u64>,
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
    /// Print the files of one table that the lake's manifests list: each hour's committed
    /// version, whole (see docs/LAKE.md, "Reading a consistent lake").
    Files {
        /// Lake URL (default from config).
        #[arg(long)]
        lake: Option<String>,
        /// The table.
        #[arg(long, value_parser = ["readings", "rejects", "hourly", "quality"])]
        table: String,
        /// Print one DuckDB `read_parquet([...])` expression instead of one location a line.
        #[arg(long)]
        sql: bool,
    },
    /// Check a lake as a reader that follows its manifests sees it: every listed file is
    /// there, one version of each hour's tables, hourly counts equal to the readings. Fails
    /// on the first problem; lists files no manifest lists (written by a run still going,
    /// or left by one that ended badly).
    Verify {
        /// Lake URL (default from config).
        #[arg(long)]
        lake: Option<String>,
    },
    /// Check the settings (defaults, --config file, FMSFLOW_* environment) as `run` would
    /// read them, and print what they amount to; fails naming the first bad field. A
    /// deployment runs it before it restarts anything.
    CheckConfig,
}

/// What `fmsflow query` asks. Times are RFC 3339 (e.g. 2025-07-07T08:00:00Z).
#[derive(Subcommand, Debug)]
enum QueryCommand {
    /// Frontier, watermark, counts, Kafka lag, per process.
    Status,
    /// One device's hourly aggregates (default: the 24 hours up to the newest).
    Device {
        /// Device id.
        id: u32,
        /// First hour (the hour holding this time).
        #[arg(long)]
        from: Option<String>,
        /// End of the range (exclusive, rounded up to a whole hour).
        #[arg(long)]
        to: Option<String>,
    },
    /// One device's newest accepted reading.
    Latest {
        /// Device id.
        id: u32,
    },
    /// One hour across the fleet.
    Fleet {
        /// The hour holding this time (default: the newest).
        #[arg(long)]
        hour: Option<String>,
        /// device, count, fails or <metric>_<min|max|mean|stddev>, e.g. sensor1_max.
        #[arg(long)]
        sort: Option<String>,
        /// asc or desc (default: desc, except by device).
        #[arg(long)]
        order: Option<String>,
        /// At most this many devices.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Valid / total and rejections by rule over a range (default: the last 24 hours).
    Quality {
        /// First hour.
        #[arg(long)]
        from: Option<String>,
        /// End of the range (exclusive).
        #[arg(long)]
        to: Option<String>,
        /// Only this device.
        #[arg(long)]
        device: Option<u32>,
        /// Also list the N devices with the most rejections.
        #[arg(long, value_name = "N")]
        by_device: Option<usize>,
    },
}

// Many short-lived record buffers: mimalloc is markedly faster than glibc's malloc here.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    fmsflow::no_huge_pages();
    #[cfg(feature = "hdfs")]
    fmsflow::lake::hdfs::jvm_leaves_signals_alone();
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
    // The process's start time and build, for /metrics.
    fmsflow::metrics::shared();
    let mut cfg = Config::load(cli.config.as_deref())?;
    fmsflow::metrics::set_enabled(cfg.engine.metrics);
    match cli.command {
        Command::Demo {
            fast,
            duration,
            lake,
            workers,
            dirty_rate,
            http,
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
                    http,
                },
            )
        }
        Command::Sim {
            devices,
            port,
            seed,
            dirty_rate,
            fault_share,
            fault_kinds,
            hang_for,
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
            anyhow::ensure!(
                (0.0..=1.0).contains(&fault_share),
                "--fault-share must be between 0 and 1"
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let sim = sim::Sim::new(settings.clone(), clock::Clock::from_env().map_err(anyhow::Error::msg)?);
                sim.set_hang_for(hang_for);
                let faulty = sim.fault_share(fault_share, &fault_kinds);
                let (addr, task) = sim::serve(sim, port.unwrap_or(cfg.sim.port), fmsflow::shutdown::signal())
                    .await
                    .context("binding the simulator's port")?;
                let faults = if faulty.is_empty() {
                    String::new()
                } else {
                    let kinds: Vec<String> = sim::Fault::ALL
                        .iter()
                        .map(|k| (k, faulty.iter().filter(|(_, f)| f == k).count()))
                        .filter(|(_, n)| *n > 0)
                        .map(|(k, n)| format!("{n} {k}"))
                        .collect();
                    format!(", faulty devices: {} (GET /stats/devices lists them)", kinds.join(", "))
                };
                // One line: a parent reading the port may stop reading after it.
                println!(
                    "fmsflow sim: {} devices on http://{addr} (seed {}, dirty rate {}{faults})",
                    settings.devices, settings.seed, settings.dirty_rate
                );
                let _ = std::io::stdout().flush();
                task.await??;
                Ok(())
            })
        }
        Command::Collect {
            api,
            devices,
            interval,
            brokers,
            topic,
            duration,
            metrics_listen,
        } => {
            if let Some(m) = metrics_listen {
                cfg.collector.metrics_listen = m;
            }
            if let Some(b) = brokers {
                cfg.kafka.brokers = b;
            }
            if let Some(t) = topic {
                cfg.kafka.raw_topic = t;
            }
            let interval = interval.unwrap_or(cfg.collector.interval.0);
            anyhow::ensure!(!interval.is_zero(), "--interval must be longer than 0");
            let devices = devices.unwrap_or(cfg.fleet.devices);
            anyhow::ensure!(devices > 0, "--devices must be at least 1");
            let summary = fmsflow::collect::run(fmsflow::collect::CollectOptions {
                poll: connectors::fms_http::PollSettings {
                    base: api.unwrap_or_else(|| cfg.collector.url.clone()),
                    devices,
                    interval,
                    concurrency: cfg.collector.concurrency,
                    timeout: cfg.collector.timeout.0,
                    retries: cfg.collector.retries,
                },
                kafka: cfg.kafka.clone(),
                duration,
                metrics_listen: (!cfg.collector.metrics_listen.is_empty())
                    .then(|| cfg.collector.metrics_listen.parse())
                    .transpose()
                    .with_context(|| {
                        format!(
                            "--metrics-listen {:?}: not an address like 0.0.0.0:9101",
                            cfg.collector.metrics_listen
                        )
                    })?,
            })?;
            let classes: Vec<String> = summary.polls.iter().map(|(c, n)| format!("{c} {n}")).collect();
            println!(
                "collected: {} produced, {} delivered, {} failed, {} poll errors, {} not JSON; requests by outcome: {}; {} polls skipped (the previous still running)",
                summary.produced,
                summary.delivered,
                summary.failed,
                summary.poll_errors,
                summary.non_json,
                classes.join(", "),
                summary.skipped
            );
            Ok(())
        }
        Command::Run {
            source,
            lake,
            workers,
            brokers,
            from,
            until,
            hosts,
            hosts_file,
            process,
            http,
            api_peers,
            keep_serving,
            rate,
        } => {
            if let Some(l) = lake {
                cfg.lake.url = l;
            }
            if let Some(w) = workers {
                anyhow::ensure!(w > 0, "--workers must be at least 1");
                cfg.engine.workers = w;
            }
            if let Some(b) = brokers {
                cfg.kafka.brokers = b;
            }
            if !hosts.is_empty() {
                cfg.cluster.hosts = hosts;
                cfg.cluster.hosts_file.clear();
            }
            if let Some(f) = hosts_file {
                cfg.cluster.hosts_file = f.display().to_string();
                cfg.cluster.hosts.clear();
            }
            if process.is_some() {
                cfg.cluster.process = process;
            }
            let cluster = cfg.cluster.resolve()?;
            if let Some(h) = http {
                cfg.api.listen = h;
            }
            if !api_peers.is_empty() {
                cfg.api.peers = api_peers;
            }
            anyhow::ensure!(
                !keep_serving || !cfg.api.listen.is_empty(),
                "--keep-serving needs the query API: give --http ADDR (or set api.listen)"
            );
            if let Some(r) = rate {
                anyhow::ensure!(
                    r.is_finite() && r > 0.0,
                    "--rate must be a positive number of records/s"
                );
            }
            let opts = RunOptions {
                source,
                from,
                until_end: until.is_some(),
                cluster,
                keep_serving,
                rate,
            };
            run_engine(&cfg, &opts)
        }
        Command::Query { url, json, ask } => {
            let token = (!cfg.api.token.is_empty()).then(|| cfg.api.token.clone());
            let ask = match ask {
                QueryCommand::Status => api::client::Ask::Status,
                QueryCommand::Device { id, from, to } => api::client::Ask::Device { id, from, to },
                QueryCommand::Latest { id } => api::client::Ask::Latest { id },
                QueryCommand::Fleet {
                    hour,
                    sort,
                    order,
                    limit,
                } => api::client::Ask::Fleet {
                    hour,
                    sort,
                    order,
                    limit,
                },
                QueryCommand::Quality {
                    from,
                    to,
                    device,
                    by_device,
                } => api::client::Ask::Quality {
                    from,
                    to,
                    device,
                    by_device,
                },
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let out = rt.block_on(async {
                let client = api::client::Client::new(&url, token, Duration::from_secs(10))?;
                client.ask(&ask, json).await
            })?;
            print!("{out}");
            if !out.ends_with('\n') {
                println!();
            }
            Ok(())
        }
        Command::Files { lake, table, sql } => {
            let url = lake.unwrap_or(cfg.lake.url.clone());
            let storage = lake::open(&url, &cfg.lake.storage_options())?;
            let root = url.strip_prefix("file://").unwrap_or(&url).trim_end_matches('/');
            let manifests = lake::manifest::load_all(storage.as_ref())?;
            anyhow::ensure!(
                !manifests.is_empty(),
                "{} holds no manifest ({}/...): no run has committed an hour there (is the lake URL right?)",
                storage.describe(),
                lake::manifest::DIR
            );
            let files: Vec<String> = manifests
                .values()
                .flat_map(|m| m.files.get(&table).into_iter().flatten())
                .map(|k| format!("{root}/{k}"))
                .collect();
            if sql {
                let list: Vec<String> = files.iter().map(|f| format!("'{}'", f.replace('\'', "''"))).collect();
                println!("read_parquet([{}], hive_partitioning = true)", list.join(", "));
            } else {
                for f in files {
                    println!("{f}");
                }
            }
            Ok(())
        }
        Command::CheckConfig => {
            let cluster = cfg.cluster.resolve()?;
            lake::open(&cfg.lake.url, &cfg.lake.storage_options())
                .with_context(|| format!("lake.url {}", cfg.lake.url))?;
            println!(
                "configuration OK: {} worker(s) per process, {}; lake {}; Kafka {} (topic {}); API {}",
                cfg.engine.workers,
                match &cluster {
                    Some(c) => format!("process {} of a cluster of {}", c.process, c.addresses.len()),
                    None => "one process".to_string(),
                },
                cfg.lake.url,
                cfg.kafka.brokers,
                cfg.kafka.raw_topic,
                if cfg.api.listen.is_empty() {
                    "off".to_string()
                } else {
                    cfg.api.listen.clone()
                }
            );
            Ok(())
        }
        Command::Verify { lake } => {
            let url = lake.unwrap_or(cfg.lake.url.clone());
            let storage = lake::open(&url, &cfg.lake.storage_options())?;
            let v = lake::manifest::verify(storage.as_ref())?;
            anyhow::ensure!(
                v.hours > 0 || !v.unlisted.is_empty(),
                "{} holds no manifest and no table file: nothing to verify (is the lake URL right?)",
                storage.describe()
            );
            for k in &v.unlisted {
                println!("not in any manifest: {k}");
            }
            println!(
                "{url}: {} hour(s), {} file(s), {} readings; every listed file is there and the hourly counts \
                 equal the readings; {} file(s) not in any manifest",
                v.hours,
                v.files,
                v.readings,
                v.unlisted.len()
            );
            Ok(())
        }
        Command::Gen {
            devices,
            hours,
            readings,
            out,
            seed,
            dirty_rate,
            late_rate,
            start,
        } => {
            let start_ms = fmsflow_dataflows::time::parse_rfc3339(&start)
                .with_context(|| format!("--start {start:?} is not an RFC 3339 time"))?;
            anyhow::ensure!(devices > 0, "--devices must be at least 1");
            // One reading per device every 10 s: 360 per device and hour.
            let hours = match readings {
                Some(n) => u32::try_from(n.div_ceil(devices as u64 * 360))
                    .context("--readings needs more hours than fit in a u32")?,
                None => hours,
            };
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
            let (records, dirty) = gen::generate_at_most(&s, readings.unwrap_or(u64::MAX));
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

/// Reads the lake's checkpoint, deletes the files written after it, and plans the restart:
/// where each partition is re-read from, and the recovery the dataflow does.
fn plan_resume(
    cfg: &Config,
    storage: &dyn lake::Storage,
    cluster: Option<&engine::Cluster>,
) -> anyhow::Result<(connectors::kafka::ResumePlan, fmsflow_dataflows::dataflow::Recovery)> {
    use fmsflow::checkpoint::Checkpoint;
    use fmsflow_dataflows::dataflow::hour_owner;
    let (process, processes) = cluster.map_or((0, 1), |c| (c.process, c.addresses.len()));
    let workers = cfg.engine.workers;
    let peers = workers * processes;
    // Failed storage operations are retried as the lake's writes are (`lake.retry_for`).
    let retry = cfg.lake.retry();
    let ck = Checkpoint::load_with(storage, |s| {
        retry.run("reading the checkpoint", || s.get(fmsflow::checkpoint::KEY))
    })
    .map_err(anyhow::Error::msg)?
    .with_context(|| {
        format!(
            "--from checkpoint: {} holds no checkpoint ({}); start with --from earliest",
            storage.describe(),
            fmsflow::checkpoint::KEY
        )
    })?;
    anyhow::ensure!(
        ck.topic == cfg.kafka.raw_topic,
        "--from checkpoint: the checkpoint is of topic {:?}, not kafka.raw_topic {:?}",
        ck.topic,
        cfg.kafka.raw_topic
    );
    anyhow::ensure!(
        ck.workers == workers && ck.processes == processes,
        "--from checkpoint: the checkpoint was written by {} process(es) of {} workers; resume with the \
         same --workers and as many --cluster processes (here: {processes} of {workers})",
        ck.processes,
        ck.workers,
    );
    let flow = cfg.flow_config();
    let mut recovery = ck.recovery(0, &flow);
    let covered = lake::Covered {
        oldest: recovery.oldest,
        sealed: |hour| recovery.sealed(hour, flow.grace_ms),
        next_seq: &recovery.next_seq,
    };
    // Both steps are idempotent, so retried whole. The manifests first: a kill between the
    // two then leaves manifests that list only covered files, none of which is deleted.
    // The manifests are worker 0's: they list what the checkpoint covers.
    let rebuilt = if process == 0 {
        retry.run("rewriting the manifests", || {
            lake::manifest::rebuild(storage, &covered, &ck.read_end)
        })?
    } else {
        Default::default()
    };
    let deleted = retry.run("deleting the files written after the checkpoint", || {
        lake::clean_after_checkpoint(
            storage,
            &covered,
            // This process's workers are process * workers .. (process + 1) * workers.
            |worker, hour| worker.unwrap_or_else(|| hour_owner(hour, peers)) / workers == process,
        )
    })?;
    // Each partition is re-read from its first record stamped at or after the re-read time.
    let from_ms = recovery.reread_from_ms(&flow);
    let probe = connectors::kafka::SourceSpec {
        settings: cfg.kafka.clone(),
        from: connectors::kafka::StartAt::Timestamp(from_ms),
        until_end: false,
        stop: Arc::default(),
    };
    let starts = connectors::kafka::PartitionReader::open(&probe, 0, 1)?.positions();
    let start: std::collections::BTreeMap<i32, i64> = starts
        .into_iter()
        .map(|(p, o)| (p, o.min(ck.read_end.get(&p).copied().unwrap_or(o))))
        .collect();
    let epochs = engine::recovery_epochs(&start, &ck.read_end, peers, cfg.engine.batch);
    eprintln!(
        "resuming from the checkpoint of epoch {} (watermark {}): deleted {} file(s) written after it, \
         {} old table version(s); rewrote {} manifest(s); re-reading from {} ({} recovery epochs)",
        ck.epoch,
        fmsflow_dataflows::time::format_rfc3339(ck.watermark),
        deleted.len(),
        rebuilt.superseded,
        rebuilt.manifests,
        fmsflow_dataflows::time::format_rfc3339(from_ms),
        epochs
    );
    let plan = connectors::kafka::ResumePlan {
        start,
        read_end: ck.read_end.clone(),
        epochs,
    };
    recovery.epochs = epochs;
    Ok((plan, recovery))
}

/// `fmsflow run`'s options beyond the configuration.
struct RunOptions {
    source: String,
    from: String,
    until_end: bool,
    cluster: Option<engine::Cluster>,
    keep_serving: bool,
    rate: Option<f64>,
}

fn run_engine(cfg: &Config, opts: &RunOptions) -> anyhow::Result<()> {
    let (source, from, until_end, cluster) = (
        opts.source.as_str(),
        opts.from.as_str(),
        opts.until_end,
        opts.cluster.clone(),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storage = lake::open(&cfg.lake.url, &cfg.lake.storage_options())?;
    let swept = storage.sweep_abandoned()?;
    if swept > 0 {
        eprintln!(
            "deleted {swept} temporary file(s) that writes killed before they finished left in {}",
            storage.describe()
        );
    }
    let mut flow = cfg.flow_config();
    let (source, sinks) = if source == "kafka" {
        let k = cfg.kafka.clone();
        // `auto` (what a service runs with): resume when the lake has a checkpoint, else
        // start at the beginning. Every process of a cluster decides before the cluster
        // connects, and no checkpoint is written before it does: they all decide the same.
        let from = if from == "auto" {
            let has = cfg
                .lake
                .retry()
                .run("reading the checkpoint", || storage.get(fmsflow::checkpoint::KEY))?
                .is_some();
            eprintln!(
                "--from auto: {}",
                if has {
                    "the lake has a checkpoint; resuming from it"
                } else {
                    "the lake has no checkpoint; starting at the earliest records"
                }
            );
            if has {
                "checkpoint"
            } else {
                "earliest"
            }
        } else {
            from
        };
        let mut from: connectors::kafka::StartAt = from.parse()?;
        if from == connectors::kafka::StartAt::Checkpoint {
            let (plan, recovery) = plan_resume(cfg, storage.as_ref(), cluster.as_ref())?;
            flow.recovery = Some(recovery);
            from = connectors::kafka::StartAt::Resume(plan);
        }
        connectors::kafka::ensure_topics(&k, &[&k.hourly_topic, &k.rejects_topic])?;
        let sinks = connectors::kafka::KafkaSinks {
            producer: connectors::kafka::KafkaProducer::with(&k.brokers, &k.security)?,
            hourly_topic: k.hourly_topic.clone(),
            rejects_topic: k.rejects_topic.clone(),
        };
        eprintln!(
            "reading {} on {} from {from:?} ({}) on {} workers into {}, {} and {}",
            k.raw_topic,
            k.brokers,
            if until_end {
                "until its current end"
            } else {
                "following it until Ctrl-C or SIGTERM"
            },
            cfg.engine.workers,
            storage.describe(),
            k.hourly_topic,
            k.rejects_topic
        );
        let on_stop = stop.clone();
        fmsflow::shutdown::on_signal("finishing the epochs in flight", move || on_stop.store(true, Relaxed));
        let spec = connectors::kafka::SourceSpec {
            settings: k,
            from,
            until_end,
            stop: stop.clone(),
        };
        (engine::Source::Kafka(Box::new(spec)), Some(Arc::new(sinks)))
    } else if let Some(pattern) = source.strip_prefix("file:") {
        let files = connectors::file::expand(pattern)?;
        eprintln!(
            "replaying {} file(s) on {} workers into {}",
            files.len(),
            cfg.engine.workers,
            storage.describe()
        );
        // The workers stop reading at their next batch (`shutdown::requested`).
        fmsflow::shutdown::on_signal("ending the replay here and finishing the epochs in flight", || {});
        // A file's lines may carry no ingest time, and such a reading can reach an hour any
        // time later: its aggregates must still be there. A replay of files is bounded, and
        // so is what it keeps.
        flow.forget_after_ms = None;
        flow.pack_open_hours = false;
        (engine::Source::Files(files), None)
    } else {
        anyhow::bail!("--source {source:?}: expected file:<path-or-glob> or kafka");
    };
    // Following a topic, the workers' parts come in the same seconds: written one at a time,
    // their memory does not add up.
    let following = matches!(&source, engine::Source::Kafka(spec) if !spec.until_end);
    let writer = Arc::new(cfg.lake.writer(storage.clone()).one_readings_file_at_a_time(following));
    let status = Arc::new(status::Status::default());
    let settings = engine::EngineSettings {
        flow,
        workers: cfg.engine.workers,
        batch: cfg.engine.batch,
        epoch: cfg.engine.epoch.0,
        cluster,
        replay_rate: opts.rate.map(|r| r / cfg.engine.workers as f64),
    };
    // The query API and dashboard, over this process's live view.
    let process = settings.cluster.as_ref().map_or(0, |c| c.process);
    let processes = settings.cluster.as_ref().map_or(1, |c| c.addresses.len());
    // Hours older than api.keep_hours are answered from the lake.
    let view = (!cfg.api.listen.is_empty()).then(|| cfg.api.view(cfg.engine.workers, storage, process, processes));
    let server = match &view {
        Some(v) => {
            anyhow::ensure!(
                cfg.api.peers.is_empty() || cfg.api.peers.len() == processes,
                "api.peers (--api-peers) lists {} URL(s) for {processes} process(es): list every process's API, in process order",
                cfg.api.peers.len()
            );
            anyhow::ensure!(
                processes == 1 || !cfg.api.peers.is_empty(),
                "a cluster's API needs every process's API URL (--api-peers or api.peers) to answer for every device"
            );
            let s = api::start(
                api::settings_from(cfg, cfg.api.listen.clone(), process, cfg.fleet.devices),
                v.clone(),
                status.clone(),
            )?;
            eprintln!("query API and dashboard on http://{}/", s.addr);
            Some(s)
        }
        None => None,
    };
    let started = Instant::now();
    let st = status.clone();
    let engine_sinks = sinks.clone();
    let handle = std::thread::spawn(move || engine::run(settings, source, Some(writer), engine_sinks, st, view));
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
    if let Some(k) = &sinks {
        k.producer
            .flush(Duration::from_secs(60))
            .context("changelog or dead-letter records were still undelivered after 60 s")?;
        let d = &k.producer.delivery;
        anyhow::ensure!(
            d.failed.load(Relaxed) == 0,
            "{} changelog or dead-letter records could not be delivered (last error: {})",
            d.failed.load(Relaxed),
            d.last_error().unwrap_or_default()
        );
    }
    let secs = started.elapsed().as_secs_f64();
    let total = status.received.load(Relaxed);
    println!(
        "replayed {total} records in {secs:.2} s ({:.0} records/s): {}",
        total as f64 / secs,
        status.summary()
    );
    if let (Some(s), true) = (&server, opts.keep_serving) {
        let _ = std::io::stdout().flush();
        eprintln!(
            "input done; still answering queries on http://{}/ until Ctrl-C or SIGTERM",
            s.addr
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(fmsflow::shutdown::signal());
    }
    drop(server);
    Ok(())
}
