//! The one typed configuration: embedded defaults, then a TOML file, then `FMSFLOW_*`
//! environment overrides (`FMSFLOW_ENGINE__WORKERS=4` sets `engine.workers`). Unknown keys
//! are rejected with the key named, whether they come from the file or the environment.

use std::path::Path;
use std::time::Duration;

use fmsflow_dataflows::dataflow::FlowConfig;
use fmsflow_dataflows::RuleConfig;
use serde::{Deserialize, Deserializer};

/// Errors loading the configuration. Not retryable: fix the file or the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// TOML syntax, unknown key or wrong type.
    #[error("invalid configuration ({origin}): {message}")]
    Invalid { origin: String, message: String },
    /// A value that parses but makes no sense.
    #[error("invalid configuration: `{field}` {problem}")]
    Value { field: &'static str, problem: String },
    /// A file holding a secret that every user of the machine can read.
    #[error(
        "config file {path} holds the secret `{key}` and every user can read it (mode {mode:o}): \
         `chmod 600 {path}` (or 640 with a group of the service), or leave `{key}` out of the file \
         and set {env} instead"
    )]
    Exposed {
        path: String,
        key: &'static str,
        env: &'static str,
        mode: u32,
    },
}

/// The settings that are secrets: (key, environment variable).
const SECRETS: [(&str, &str); 3] = [
    ("api.token", "FMSFLOW_API__TOKEN"),
    ("kafka.security.sasl_password", "FMSFLOW_KAFKA__SECURITY__SASL_PASSWORD"),
    (
        "kafka.security.ssl_key_password",
        "FMSFLOW_KAFKA__SECURITY__SSL_KEY_PASSWORD",
    ),
];

/// Refuses a config file that holds a secret and is readable by every user.
fn check_secrets_private(path: &Path, text: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(table) = text.parse::<toml::Table>() else {
        // Syntax errors are reported, with their place, by the parse that follows.
        return Ok(());
    };
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode()).unwrap_or(0);
    if mode & 0o004 == 0 {
        return Ok(());
    }
    for (key, env) in SECRETS {
        let mut at = key.split('.');
        let first = at.next().and_then(|k| table.get(k));
        let set = at
            .try_fold(first, |v, k| Some(v.and_then(|v| v.get(k))))
            .flatten()
            .and_then(|v| v.as_str())
            .is_some_and(|v| !v.is_empty());
        if set {
            return Err(ConfigError::Exposed {
                path: path.display().to_string(),
                key,
                env,
                mode: mode & 0o777,
            });
        }
    }
    Ok(())
}

/// A duration written as `250ms`, `10s`, `5m`, `6h` or `1d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    /// Milliseconds, as the dataflow wants them.
    pub fn ms(self) -> i64 {
        self.0.as_millis() as i64
    }
}

/// Parses `250ms`, `10s`, `5m`, `6h`, `1d` (also `1.5s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 250ms, 10s, 5m, 6h or 1d"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        u => return Err(format!("unknown duration unit `{u}` in `{s}` (use ms, s, m, h or d)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(serde::de::Error::custom)
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The device fleet.
    pub fleet: Fleet,
    /// Quality rules.
    pub rules: Rules,
    /// The dataflow engine.
    pub engine: Engine,
    /// The Parquet lake.
    pub lake: Lake,
    /// The HTTP poller (the demo's, and later `fmsflow collect`).
    pub collector: Collector,
    /// The FMS API simulator.
    pub sim: Sim,
    /// Kafka brokers and topics (`[kafka]`).
    pub kafka: crate::connectors::kafka::KafkaSettings,
    /// The query API and dashboard.
    pub api: Api,
    /// The processes of a cluster (`[cluster]`).
    pub cluster: ClusterCfg,
}

/// `[cluster]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterCfg {
    /// Timely `host:port` of every engine process, in process order; empty: one process.
    pub hosts: Vec<String>,
    /// Instead of `hosts`: a file of them, one per line, `#` comments.
    pub hosts_file: String,
    /// This process's index in the host list.
    #[serde(default)]
    pub process: Option<usize>,
    /// How long start-up waits for the other processes.
    pub connect_timeout: Dur,
}

impl ClusterCfg {
    /// This process's place in the cluster, or `None` for a single process: the host list
    /// (from `hosts` or `hosts_file`) and `process`, checked.
    pub fn resolve(&self) -> Result<Option<crate::cluster::Cluster>, ConfigError> {
        let bad = |field, problem: String| ConfigError::Value { field, problem };
        let hosts: Vec<String> = if self.hosts_file.is_empty() {
            self.hosts.clone()
        } else {
            if !self.hosts.is_empty() {
                return Err(bad(
                    "cluster.hosts_file",
                    "give either cluster.hosts or cluster.hosts_file, not both".into(),
                ));
            }
            std::fs::read_to_string(&self.hosts_file)
                .map_err(|e| bad("cluster.hosts_file", format!("{}: {e}", self.hosts_file)))?
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        };
        let field = if self.hosts_file.is_empty() {
            "cluster.hosts"
        } else {
            "cluster.hosts_file"
        };
        match (hosts.is_empty(), self.process) {
            (true, None) => return Ok(None),
            (true, Some(p)) => {
                return Err(bad(
                    "cluster.process",
                    format!("is {p}, but there is no host list: give --hosts (cluster.hosts)"),
                ))
            }
            (false, None) => {
                return Err(bad(
                    "cluster.process",
                    "a cluster needs this process's index in the host list (--process)".into(),
                ))
            }
            (false, Some(p)) if p >= hosts.len() => {
                return Err(bad(
                    "cluster.process",
                    format!(
                        "{p} is not an index of the {} hosts (0..={})",
                        hosts.len(),
                        hosts.len() - 1
                    ),
                ))
            }
            _ => {}
        }
        for (i, h) in hosts.iter().enumerate() {
            let port_ok = h
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(bad(field, format!("entry {i} `{h}` is not host:port")));
            }
            if hosts[..i].contains(h) {
                return Err(bad(field, format!("`{h}` is listed twice")));
            }
        }
        if self.connect_timeout.0.is_zero() {
            return Err(bad("cluster.connect_timeout", "must be longer than 0".into()));
        }
        Ok(Some(crate::cluster::Cluster {
            process: self.process.expect("checked above"),
            addresses: hosts,
            connect_timeout: self.connect_timeout.0,
        }))
    }
}

/// `[api]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Api {
    /// `host:port` the query API and dashboard listen on; empty: off (`fmsflow run`) or
    /// [`DEMO_LISTEN`] (`fmsflow demo`).
    pub listen: String,
    /// Bearer token every API request must carry; empty: none (only on loopback).
    pub token: String,
    /// In a cluster: every process's API base URL, `http://host:port`, in process order.
    pub peers: Vec<String>,
    /// Queries answered at once by one process.
    pub max_in_flight: usize,
    /// Requests a second one client address may make (0: no limit).
    pub rate_limit: f64,
    /// Hours the live view keeps behind the newest; older ones are read from the lake.
    pub keep_hours: u32,
    /// Older hours kept decoded once read from the lake (0: none; each is read again).
    pub lake_cache_hours: usize,
}

impl Api {
    /// The live view of a process (`process` of `processes`, each of `workers` workers),
    /// reading hours older than `keep_hours` from the lake in `storage`.
    pub fn view(
        &self,
        workers: usize,
        storage: std::sync::Arc<dyn crate::lake::Storage>,
        process: usize,
        processes: usize,
    ) -> std::sync::Arc<crate::api::view::LiveView> {
        let archive = crate::api::archive::Archive::new(storage, process, processes, workers, self.lake_cache_hours);
        crate::api::view::LiveView::with_archive(workers, self.keep_hours, Some(archive))
    }
}

/// Where `fmsflow demo` serves the API and dashboard unless told otherwise.
pub const DEMO_LISTEN: &str = "127.0.0.1:8090";

/// `[fleet]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Devices are numbered 1..=devices; other ids are `unknown_device`.
    pub devices: u32,
}

/// `[rules]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Largest allowed lead of the event time over the ingest time (`future_time`).
    pub max_future: Dur,
    /// Largest allowed lag of the event time behind the ingest time (`stale_time`).
    pub max_age: Dur,
    /// Inclusive `[min, max]` per metric (`out_of_range`).
    pub ranges: Ranges,
}

/// `[rules.ranges]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ranges {
    /// sensor1 range.
    pub sensor1: [f64; 2],
    /// sensor2 range.
    pub sensor2: [f64; 2],
    /// sensor3 range.
    pub sensor3: [f64; 2],
    /// motor1 range.
    pub motor1: [f64; 2],
    /// motor2 range.
    pub motor2: [f64; 2],
    /// motor3 range.
    pub motor3: [f64; 2],
}

/// `[engine]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Engine {
    /// Timely worker threads in this process.
    pub workers: usize,
    /// Live mode: length of one timely epoch.
    pub epoch: Dur,
    /// Replay: records per worker per epoch (from 10,000 on, a file replay's epochs hold
    /// four times the fleet when that is more, up to eight times this).
    pub batch: usize,
    /// An hour is sealed once the event-time watermark passes its end plus this grace.
    pub grace: Dur,
    /// Record the latency, epoch, sink and poll histograms of `/metrics`.
    pub metrics: bool,
}

/// `[lake]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lake {
    /// Where the lake lives: `file://path` (relative paths from the working directory).
    pub url: String,
    /// Rows per Parquet row group (smaller groups let readers prune by device).
    pub row_group_rows: usize,
    /// fsync each file before renaming it into place.
    pub fsync: bool,
    /// Writer threads per engine worker: each encodes and stores whole hours, so more of
    /// them overlap storage waits (fsync, uploads).
    pub writers: usize,
    /// `readings/` gets a `device=D` level under each hour: one file per device and part.
    /// Readers of one device open only its files, at the cost of many small files.
    pub device_partitions: bool,
    /// The most readings an engine worker holds of an hour not yet sealed: once it holds
    /// this many, it writes them as the hour's next `readings` part and goes on (0: holds the
    /// whole hour until its seal). Ignored with `device_partitions`.
    pub max_open_rows: usize,
    /// How long a version of an hour's `hourly` or `quality` file that a newer one replaced
    /// stays, for readers of the manifest that listed it (0: deleted at once).
    pub keep_replaced: Dur,
    /// How long a failing write to the lake (storage unreachable, disk full) is retried,
    /// with growing pauses, before the run fails; the engine waits meanwhile.
    pub retry_for: Dur,
    /// S3: endpoint URL of an S3-compatible server; empty for AWS (or `AWS_ENDPOINT_URL`).
    pub s3_endpoint: String,
    /// S3: region; empty takes it from the AWS chain (`AWS_REGION`, the profile).
    pub s3_region: String,
    /// S3: path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub s3_path_style: bool,
    /// S3: server-side encryption of every object, `AES256` or `aws:kms`; empty for the
    /// bucket's default.
    pub s3_sse: String,
    /// S3: objects of this many bytes or more are uploaded in parts.
    pub s3_multipart_threshold: usize,
    /// S3: bytes per part of a multipart upload (at least 5 MiB).
    pub s3_part_size: usize,
    /// S3: tries of one request (throttling, timeouts and 5xx are retried with backoff).
    pub s3_max_attempts: u32,
    /// S3: the longest one try of a request may take; a try not answered by then is retried.
    pub s3_timeout: Dur,
}

impl Lake {
    /// How failed lake writes are retried.
    pub fn retry(&self) -> crate::lake::Retry {
        crate::lake::Retry {
            limit: self.retry_for.0,
            backend: crate::lake::backend_of(&self.url),
            ..crate::lake::Retry::default()
        }
    }

    /// The lake writer these settings give, over `storage`.
    pub fn writer(&self, storage: std::sync::Arc<dyn crate::lake::Storage>) -> crate::lake::LakeWriter {
        crate::lake::LakeWriter::new(storage, self.row_group_rows)
            .with_writers(self.writers)
            .with_retry(self.retry())
            .with_device_partitions(self.device_partitions)
            .with_keep_replaced(self.keep_replaced.0)
    }

    /// The storage options these settings give.
    pub fn storage_options(&self) -> crate::lake::StorageOptions {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        crate::lake::StorageOptions {
            fsync: self.fsync,
            s3: crate::lake::s3::S3Options {
                endpoint: some(&self.s3_endpoint),
                region: some(&self.s3_region),
                path_style: self.s3_path_style,
                sse: some(&self.s3_sse),
                multipart_threshold: self.s3_multipart_threshold,
                part_size: self.s3_part_size,
                max_attempts: self.s3_max_attempts,
                attempt_timeout: self.s3_timeout.0,
            },
        }
    }
}

/// `[collector]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Collector {
    /// Base URL of the FMS API; devices are at `{url}/{id}/`.
    pub url: String,
    /// Every device is polled once per interval.
    pub interval: Dur,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Per-request timeout.
    pub timeout: Dur,
    /// Retries after a failed request (with backoff).
    pub retries: u32,
    /// Where `fmsflow collect` serves `/metrics` (`host:port`; empty: nowhere).
    pub metrics_listen: String,
}

/// `[sim]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sim {
    /// Seed of every simulated value.
    pub seed: u64,
    /// Fraction of responses that are dirty, spread evenly over every kind of bad record.
    pub dirty_rate: f64,
    /// Port the simulator listens on (127.0.0.1).
    pub port: u16,
}

/// The embedded defaults, documented in the README.
pub const DEFAULTS: &str = include_str!("../fmsflow.toml");

impl Config {
    /// Defaults, then `path` (if any), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                check_secrets_private(p, &text)?;
                Some((p.display().to_string(), text))
            }
            None => None,
        };
        Config::from_sources(file.as_ref().map(|(n, t)| (n.as_str(), t.as_str())), &env)
    }

    /// The layering itself, with explicit inputs (tests use this).
    pub fn from_sources(file: Option<(&str, &str)>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let invalid = |origin: &str, e: &dyn std::fmt::Display| ConfigError::Invalid {
            origin: origin.to_string(),
            message: e.to_string(),
        };
        let mut value: toml::Table = DEFAULTS.parse().map_err(|e| invalid("embedded defaults", &e))?;
        if let Some((name, text)) = file {
            let overlay: toml::Table = text.parse().map_err(|e| invalid(name, &e))?;
            // Check the file alone first, so an unknown key is reported against the file.
            merge(&mut value, overlay);
            Config::deserialize(toml::Value::Table(value.clone())).map_err(|e| invalid(name, &e))?;
        }
        for (k, v) in env {
            // Only FMSFLOW_<SECTION>__<KEY> names a setting; FMSFLOW_CONFIG, FMSFLOW_LOG and
            // the test helpers' variables have no `__`.
            let Some(rest) = k.strip_prefix("FMSFLOW_").filter(|r| r.contains("__")) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            let parsed = parse_env_value(v);
            set_path(&mut value, &path, parsed).map_err(|e| invalid(&format!("environment variable {k}"), &e))?;
            Config::deserialize(toml::Value::Table(value.clone()))
                .map_err(|e| invalid(&format!("environment variable {k}"), &e))?;
        }
        let cfg = Config::deserialize(toml::Value::Table(value)).map_err(|e| invalid("configuration", &e))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |field, problem: &str| {
            Err(ConfigError::Value {
                field,
                problem: problem.to_string(),
            })
        };
        if self.fleet.devices == 0 {
            return bad("fleet.devices", "must be at least 1");
        }
        if self.engine.workers == 0 {
            return bad("engine.workers", "must be at least 1");
        }
        if self.engine.batch == 0 {
            return bad("engine.batch", "must be at least 1");
        }
        if self.engine.epoch.0.is_zero() {
            return bad("engine.epoch", "must be longer than 0");
        }
        if self.collector.concurrency == 0 {
            return bad("collector.concurrency", "must be at least 1");
        }
        if !self.collector.metrics_listen.is_empty()
            && self.collector.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(
                "collector.metrics_listen",
                "must be an address like 0.0.0.0:9101, or \"\" for none",
            );
        }
        if self.collector.interval.0.is_zero() {
            return bad("collector.interval", "must be longer than 0");
        }
        if !(0.0..=1.0).contains(&self.sim.dirty_rate) {
            return bad("sim.dirty_rate", "must be between 0 and 1");
        }
        if let Some((field, problem)) = self.kafka.security.problem() {
            return Err(ConfigError::Value { field, problem });
        }
        if self.kafka.partitions < 1 {
            return bad("kafka.partitions", "must be at least 1");
        }
        if self.kafka.replication < 1 {
            return bad("kafka.replication", "must be at least 1");
        }
        for (field, v) in [
            ("kafka.brokers", &self.kafka.brokers),
            ("kafka.raw_topic", &self.kafka.raw_topic),
            ("kafka.hourly_topic", &self.kafka.hourly_topic),
            ("kafka.rejects_topic", &self.kafka.rejects_topic),
            ("kafka.group", &self.kafka.group),
        ] {
            if v.trim().is_empty() {
                return bad(field, "must not be empty");
            }
        }
        if self.api.max_in_flight == 0 {
            return bad("api.max_in_flight", "must be at least 1");
        }
        if !(self.api.rate_limit >= 0.0 && self.api.rate_limit.is_finite()) {
            return bad(
                "api.rate_limit",
                "must be a number of requests a second, 0 or more (0: no limit)",
            );
        }
        if self.api.keep_hours == 0 {
            return bad("api.keep_hours", "must be at least 1");
        }
        if let Some(p) = self.api.peers.iter().find(|p| !p.starts_with("http://")) {
            return bad("api.peers", &format!("`{p}` is not an http://host:port URL"));
        }
        if self.lake.writers == 0 {
            return bad("lake.writers", "must be at least 1");
        }
        if self.lake.row_group_rows == 0 {
            return bad("lake.row_group_rows", "must be at least 1");
        }
        if !self.lake.s3_sse.is_empty() && !crate::lake::s3::SSE_VALUES.contains(&self.lake.s3_sse.as_str()) {
            return bad("lake.s3_sse", "must be empty, AES256 or aws:kms");
        }
        if self.lake.s3_part_size < 5 << 20 {
            return bad(
                "lake.s3_part_size",
                "must be at least 5242880 (5 MiB, the least S3 takes)",
            );
        }
        if self.lake.s3_max_attempts == 0 {
            return bad("lake.s3_max_attempts", "must be at least 1");
        }
        if self.lake.s3_timeout.0.is_zero() {
            return bad("lake.s3_timeout", "must be longer than 0");
        }
        for (name, [lo, hi]) in self.rules.ranges.named() {
            let max = fmsflow_dataflows::stats::MAX_ABS;
            if !(lo.is_finite() && hi.is_finite() && lo <= hi && lo.abs() <= max && hi.abs() <= max) {
                return Err(ConfigError::Value {
                    field: "rules.ranges",
                    problem: format!("{name} must be [min, max] with min <= max, both within ±{max}"),
                });
            }
        }
        Ok(())
    }

    /// The rule parameters for the dataflow.
    pub fn rule_config(&self) -> RuleConfig {
        let r = &self.rules.ranges;
        RuleConfig {
            fleet_size: self.fleet.devices,
            max_future_ms: self.rules.max_future.ms(),
            max_age_ms: self.rules.max_age.ms(),
            ranges: [r.sensor1, r.sensor2, r.sensor3, r.motor1, r.motor2, r.motor3].map(|[a, b]| (a, b)),
        }
    }

    /// The dataflow parameters.
    pub fn flow_config(&self) -> FlowConfig {
        FlowConfig {
            rules: self.rule_config(),
            grace_ms: self.engine.grace.ms(),
            recovery: None,
            // The collections forget an hour as soon as no reading can change it (max_age +
            // grace + an hour past its end); the live view keeps it packed for api.keep_hours
            // (src/api/view.rs, `Frozen`). Kafka's and the poller's records all carry an
            // ingest time; a replay of files turns this off.
            forget_after_ms: Some(0),
            // A live hour's readings are the engine's largest item; a replay of files turns
            // this off (it holds an hour only while reading it, and is measured by speed).
            pack_open_hours: true,
            // Device partitions would make each open part one small file per device.
            max_open_rows: (self.lake.max_open_rows > 0 && !self.lake.device_partitions)
                .then_some(self.lake.max_open_rows),
        }
    }
}

impl Ranges {
    fn named(&self) -> [(&'static str, [f64; 2]); 6] {
        [
            ("sensor1", self.sensor1),
            ("sensor2", self.sensor2),
            ("sensor3", self.sensor3),
            ("motor1", self.motor1),
            ("motor2", self.motor2),
            ("motor3", self.motor3),
        ]
    }
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// An environment value as TOML (numbers, booleans, arrays), else as a plain string.
fn parse_env_value(v: &str) -> toml::Value {
    match format!("x = {v}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("x").unwrap_or_else(|| toml::Value::String(v.to_string())),
        Err(_) => toml::Value::String(v.to_string()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], v: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".into()),
        [last] => {
            table.insert(last.clone(), v);
            Ok(())
        }
        [first, rest @ ..] => match table
            .entry(first.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => set_path(t, rest, v),
            _ => Err(format!("`{first}` is not a section")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn defaults_load() {
        let c = Config::from_sources(None, &[]).unwrap();
        assert_eq!(c.fleet.devices, 100);
        assert_eq!(c.collector.interval.0, Duration::from_secs(10));
        assert_eq!(c.lake.url, "file://./fmsflow-lake");
    }

    /// `lake.max_open_rows` reaches the dataflow, except as 0 (whole hours) and with device
    /// partitions (each open part would be a small file per device).
    #[test]
    fn open_parts_follow_the_lake_settings() {
        let flow = |pairs: &[(&str, &str)]| Config::from_sources(None, &env(pairs)).unwrap().flow_config();
        assert_eq!(flow(&[]).max_open_rows, Some(524_288));
        assert_eq!(
            flow(&[("FMSFLOW_LAKE__MAX_OPEN_ROWS", "1000")]).max_open_rows,
            Some(1000)
        );
        assert_eq!(flow(&[("FMSFLOW_LAKE__MAX_OPEN_ROWS", "0")]).max_open_rows, None);
        assert_eq!(flow(&[("FMSFLOW_LAKE__DEVICE_PARTITIONS", "true")]).max_open_rows, None);
    }

    #[test]
    fn file_then_env() {
        let c = Config::from_sources(
            Some(("t.toml", "[engine]\nworkers = 3\n")),
            &env(&[("FMSFLOW_ENGINE__WORKERS", "5"), ("FMSFLOW_RULES__MAX_AGE", "2h")]),
        )
        .unwrap();
        assert_eq!(c.engine.workers, 5);
        assert_eq!(c.rules.max_age.0, Duration::from_secs(7200));
        let c = Config::from_sources(Some(("t.toml", "[engine]\nworkers = 3\n")), &[]).unwrap();
        assert_eq!(c.engine.workers, 3);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_sources(Some(("t.toml", "[engine]\nwrokers = 3\n")), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("wrokers") && e.contains("t.toml"), "{e}");
        let e = Config::from_sources(None, &env(&[("FMSFLOW_LAKE__URLL", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("urll") && e.contains("FMSFLOW_LAKE__URLL"), "{e}");
        let e = Config::from_sources(None, &env(&[("FMSFLOW_LAEK__URL", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("laek"), "{e}");
        assert!(Config::from_sources(None, &env(&[("FMSFLOW_LOG", "debug"), ("FMSFLOW_PYTHON", "python3")])).is_ok());
    }

    #[test]
    fn a_file_with_a_secret_must_not_be_readable_by_everyone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fmsflow.toml");
        let chmod = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        std::fs::write(&path, "[api]\ntoken = \"s3cret\"\n").unwrap();
        chmod(0o644);
        let e = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(
            e.contains("api.token") && e.contains("chmod 600") && e.contains("644"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "the error must not show the secret: {e}");
        chmod(0o640);
        assert_eq!(Config::load(Some(&path)).unwrap().api.token, "s3cret");
        // No secret in it: any mode will do.
        std::fs::write(&path, "[fleet]\ndevices = 5\n").unwrap();
        chmod(0o644);
        assert_eq!(Config::load(Some(&path)).unwrap().fleet.devices, 5);
    }

    #[test]
    fn kafka_security_settings_are_checked_at_start() {
        let with = |vars: &[(&str, &str)]| Config::from_sources(None, &env(vars));
        let e = with(&[("FMSFLOW_KAFKA__SECURITY__PROTOCOL", "tls")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("kafka.security.protocol"), "{e}");
        let e = with(&[("FMSFLOW_KAFKA__SECURITY__PROTOCOL", "sasl_ssl")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("kafka.security.sasl_mechanism"), "{e}");
        let e = with(&[
            ("FMSFLOW_KAFKA__SECURITY__PROTOCOL", "SASL_SSL"),
            ("FMSFLOW_KAFKA__SECURITY__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("FMSFLOW_KAFKA__SECURITY__SASL_USERNAME", "fmsflow"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("kafka.security.sasl_password"), "{e}");
        let e = with(&[("FMSFLOW_KAFKA__SECURITY__SSL_CA_LOCATION", "/no/such/ca.pem")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("kafka.security.ssl_ca_location") && e.contains("/no/such/ca.pem"),
            "{e}"
        );
        let ok = with(&[
            ("FMSFLOW_KAFKA__SECURITY__PROTOCOL", "sasl_ssl"),
            ("FMSFLOW_KAFKA__SECURITY__SASL_MECHANISM", "PLAIN"),
            ("FMSFLOW_KAFKA__SECURITY__SASL_USERNAME", "fmsflow"),
            ("FMSFLOW_KAFKA__SECURITY__SASL_PASSWORD", "pw"),
        ])
        .unwrap();
        // The password is never shown.
        let shown = format!("{:?}", ok.kafka);
        assert!(!shown.contains("\"pw\""), "{shown}");
        assert!(shown.contains("<set>"), "{shown}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = Config::from_sources(Some(("t.toml", "[collector]\ninterval = \"ten seconds\"\n")), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("interval"), "{e}");
        let e = Config::from_sources(None, &env(&[("FMSFLOW_SIM__DIRTY_RATE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sim.dirty_rate"), "{e}");
        let e = Config::from_sources(Some(("t.toml", "[rules.ranges]\nsensor1 = [5.0, 1.0]\n")), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sensor1"), "{e}");
        let e = Config::from_sources(None, &env(&[("FMSFLOW_LAKE__WRITERS", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lake.writers"), "{e}");
        for (k, v, field) in [
            ("FMSFLOW_LAKE__S3_SSE", "rot13", "lake.s3_sse"),
            ("FMSFLOW_LAKE__S3_PART_SIZE", "1048576", "lake.s3_part_size"),
            ("FMSFLOW_LAKE__S3_MAX_ATTEMPTS", "0", "lake.s3_max_attempts"),
            ("FMSFLOW_LAKE__S3_TIMEOUT", "0s", "lake.s3_timeout"),
        ] {
            let e = Config::from_sources(None, &env(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(field), "{k}={v}: {e}");
        }
        let c = Config::from_sources(
            None,
            &env(&[
                ("FMSFLOW_LAKE__S3_SSE", "aws:kms"),
                ("FMSFLOW_LAKE__S3_ENDPOINT", "http://127.0.0.1:9000"),
            ]),
        )
        .unwrap();
        let o = c.lake.storage_options();
        assert_eq!(o.s3.sse.as_deref(), Some("aws:kms"));
        assert_eq!(o.s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(o.s3.region, None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
