//! The Parquet lake: where an hour's files go once it is sealed. Storage is chosen by URL
//! (`file://` a local directory, `s3://bucket/prefix` S3, `hdfs://host:port/path` HDFS with
//! the `hdfs` feature) behind one small trait.
//!
//! Layout (Hive style, readable as-is by DuckDB, Spark, Athena):
//! `{readings,hourly,quality,rejects}/dt=YYYY-MM-DD/hour=HH/part-*.parquet`.
//! Every file is named by the batch that wrote it, `part-SSSSS-wWWW` (part `S` of worker `W`:
//! 0 when the hour seals, then one per late change). `readings/` and `rejects/` get a new
//! part per batch and worker; `hourly/` and `quality/` get a new version of the hour's one
//! file, from the hour's owner, when late data changes the hour. Every file is written whole
//! (a temporary name and a rename, or one upload), so a reader never sees half a file. An
//! hour's per-hour manifest ([`manifest`]) then makes a set of files visible at once, and the
//! versions it no longer lists are deleted.

#[cfg(feature = "hdfs")]
pub mod hdfs;
pub mod local;
pub mod manifest;
pub mod parquet;
pub mod s3;

use std::sync::Arc;

use fmsflow_dataflows::dataflow::HourBatch;
use fmsflow_dataflows::time::partition_of_hour;

/// Errors of the lake. `retryable` says whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    /// The URL's scheme is not one this build writes to.
    #[error("lake URL `{url}`: {problem}")]
    Url { url: String, problem: String },
    /// An I/O operation on the storage failed.
    #[error("{op} `{path}` failed: {source}{}", full_hint(.source))]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// Encoding Parquet failed (a bug, not an environment problem).
    #[error("encoding {table} for hour {hour} as Parquet failed: {message}")]
    Encode {
        table: &'static str,
        hour: i64,
        message: String,
    },
}

/// What to do about a full disk (or quota), which the bare OS error does not say.
fn full_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            " (the lake's disk is full: free space there; the write is retried, and nothing is lost while it waits)"
        }
        _ => "",
    }
}

impl LakeError {
    /// Whether a retry can help.
    pub fn retryable(&self) -> bool {
        matches!(self, LakeError::Io { .. })
    }
}

/// Where lake files are stored. Keys are `/`-separated paths relative to the lake root.
pub trait Storage: Send + Sync {
    /// Writes `bytes` at `key` so that readers see either the old object or the whole new one.
    fn put_atomic(&self, key: &str, bytes: &[u8]) -> Result<(), LakeError>;
    /// Reads the object at `key`, if there is one.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, LakeError>;
    /// The keys of every object under `prefix` (a folder, `/`-separated), in no order;
    /// nothing when there is no such folder. Unfinished temporary objects are not listed.
    fn list(&self, prefix: &str) -> Result<Vec<String>, LakeError>;
    /// Deletes the object at `key`; deleting what is not there is not an error.
    fn delete(&self, key: &str) -> Result<(), LakeError>;
    /// A human description (for logs).
    fn describe(&self) -> String;
    /// The backend, as the metrics' `backend` label names it.
    fn backend(&self) -> &'static str {
        "file"
    }
    /// Deletes what writes of processes that died mid-write left behind (their temporary
    /// files); how many. Writes in progress are left alone.
    fn sweep_abandoned(&self) -> Result<usize, LakeError> {
        Ok(0)
    }
}

/// How to open a lake's storage, beside its URL (`[lake]`).
#[derive(Clone, Debug)]
pub struct StorageOptions {
    /// Local directory: make each file durable before it is renamed into place (the
    /// default); without it a crash of the machine (not of fmsflow) can lose files the lake
    /// already showed.
    pub fsync: bool,
    /// S3: endpoint, region, addressing, encryption, multipart sizes, retries.
    pub s3: s3::S3Options,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            fsync: true,
            s3: s3::S3Options::default(),
        }
    }
}

/// Opens the storage a lake URL names: `file://<path>`, `s3://<bucket>[/<prefix>]` or (with
/// the `hdfs` feature) `hdfs://<host>:<port>/<path>`.
pub fn open(url: &str, opts: &StorageOptions) -> Result<Arc<dyn Storage>, LakeError> {
    let err = |problem: &str| LakeError::Url {
        url: url.to_string(),
        problem: problem.to_string(),
    };
    let storage: Arc<dyn Storage> = match url.split_once("://") {
        Some(("file", path)) if !path.is_empty() => Arc::new(local::LocalStorage::new(path.into(), opts.fsync)),
        Some(("file", _)) => return Err(err("needs a path, e.g. file://./fmsflow-lake or file:///data/lake")),
        Some(("s3", rest)) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            Arc::new(s3::S3Storage::open(bucket, prefix, &opts.s3)?)
        }
        #[cfg(feature = "hdfs")]
        Some(("hdfs", _)) => Arc::new(hdfs::HdfsStorage::open(url)?),
        #[cfg(not(feature = "hdfs"))]
        Some(("hdfs", _)) => {
            return Err(err(
                "this fmsflow was built without HDFS; build it with `cargo build --release --features hdfs` \
                 (needs a JDK), or use file:// or s3://",
            ))
        }
        Some((scheme, _)) => {
            return Err(err(&format!(
                "unknown scheme `{scheme}`; use file://, s3:// or hdfs://"
            )))
        }
        None => {
            return Err(err(
                "is not a URL; use file://<path>, s3://<bucket>/<prefix> or hdfs://<host>:<port>/<path>",
            ))
        }
    };
    Ok(Arc::new(Instrumented(storage)))
}

/// The metrics' `backend` label of a lake URL.
pub fn backend_of(url: &str) -> &'static str {
    match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("s3") => "s3",
        Some("hdfs") => "hdfs",
        _ => "file",
    }
}

/// A storage whose operations are timed and counted in the `fmsflow_sink_*` metrics.
struct Instrumented(Arc<dyn Storage>);

impl Instrumented {
    fn counted<T>(&self, r: Result<T, LakeError>) -> Result<T, LakeError> {
        if r.is_err() {
            crate::metrics::shared().sink_error(self.0.backend());
        }
        r
    }
}

impl Storage for Instrumented {
    fn put_atomic(&self, key: &str, bytes: &[u8]) -> Result<(), LakeError> {
        let started = std::time::Instant::now();
        let r = self.counted(self.0.put_atomic(key, bytes));
        if r.is_ok() {
            crate::metrics::shared().sink_write(self.0.backend(), started.elapsed().as_secs_f64(), bytes.len());
        }
        r
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, LakeError> {
        self.counted(self.0.get(key))
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, LakeError> {
        self.counted(self.0.list(prefix))
    }
    fn delete(&self, key: &str) -> Result<(), LakeError> {
        self.counted(self.0.delete(key))
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    fn sweep_abandoned(&self) -> Result<usize, LakeError> {
        self.counted(self.0.sweep_abandoned())
    }
}

/// What one write did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    /// Files written.
    pub files: u64,
    /// Rows written.
    pub rows: u64,
}

/// Encodes hour batches as Parquet and stores them.
pub struct LakeWriter {
    storage: Arc<dyn Storage>,
    row_group_rows: usize,
    writers: usize,
    retry: Retry,
    device_partitions: bool,
    keep_replaced: std::time::Duration,
    /// Held while a batch's readings are encoded and stored: one readings file at a time in
    /// the process ([`LakeWriter::one_readings_file_at_a_time`]).
    one_at_a_time: Option<std::sync::Mutex<()>>,
}

/// How long a failing storage operation is retried: for `limit` in all, pausing `first`,
/// then twice as long each time, up to 30 s.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Total time an operation may keep failing before the run fails.
    pub limit: std::time::Duration,
    /// The first pause.
    pub first: std::time::Duration,
    /// The storage's backend, for the retries metric.
    pub backend: &'static str,
}

impl Retry {
    /// Runs `op` until it succeeds, fails with an error no retry can help, or has failed for
    /// the limit; logs each failure it retries.
    pub fn run<T>(&self, what: &str, op: impl FnMut() -> Result<T, LakeError>) -> Result<T, LakeError> {
        crate::backoff::retry(
            self.limit,
            self.first,
            std::time::Duration::from_secs(30),
            LakeError::retryable,
            |e, pause, failing| {
                crate::metrics::shared().sink_retry(self.backend);
                tracing::warn!(
                    "lake: {what} failed, retrying in {pause:?} (failing for {failing:?} of at most {:?}): {e}",
                    self.limit
                )
            },
            op,
        )
    }
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            limit: std::time::Duration::from_secs(600),
            first: std::time::Duration::from_secs(1),
            backend: "file",
        }
    }
}

impl LakeWriter {
    /// A writer over `storage`, with one writer thread per engine worker.
    pub fn new(storage: Arc<dyn Storage>, row_group_rows: usize) -> Self {
        LakeWriter {
            retry: Retry {
                backend: storage.backend(),
                ..Retry::default()
            },
            storage,
            row_group_rows,
            writers: 1,
            device_partitions: false,
            keep_replaced: std::time::Duration::ZERO,
            one_at_a_time: None,
        }
    }

    /// The same, encoding and storing one batch's readings at a time in this process (every
    /// worker's writer threads share the writer). For an engine following a live source: its
    /// workers fill their parts of an hour alike, so they write them in the same seconds, and
    /// one after another their files and the pieces being encoded are not in memory together
    /// (~17 MiB each at `lake.max_open_rows`). A replay writes in parallel, for speed.
    pub fn one_readings_file_at_a_time(self, on: bool) -> Self {
        LakeWriter {
            one_at_a_time: on.then(|| std::sync::Mutex::new(())),
            ..self
        }
    }

    /// The same, retrying failed storage operations as `retry` says (an unreachable S3
    /// server, a full disk) instead of failing the run at once. While a write waits, its
    /// writer's queue fills and the engine's workers wait for it (backpressure).
    pub fn with_retry(self, retry: Retry) -> Self {
        LakeWriter { retry, ..self }
    }

    /// Writes `readings/` with a `device=D` level under each hour (`lake.device_partitions`).
    pub fn with_device_partitions(self, device_partitions: bool) -> Self {
        LakeWriter {
            device_partitions,
            ..self
        }
    }

    /// Keeps a replaced version of an hour's table this long after the hour's manifest
    /// stops listing it (`lake.keep_replaced`).
    pub fn with_keep_replaced(self, keep_replaced: std::time::Duration) -> Self {
        LakeWriter { keep_replaced, ..self }
    }

    /// See [`LakeWriter::with_keep_replaced`].
    pub fn keep_replaced(&self) -> std::time::Duration {
        self.keep_replaced
    }

    /// The retry policy of this writer's storage operations.
    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// The same, with `writers` writer threads per engine worker (at least 1).
    pub fn with_writers(self, writers: usize) -> Self {
        LakeWriter {
            writers: writers.max(1),
            ..self
        }
    }

    /// Writer threads per engine worker.
    pub fn writers(&self) -> usize {
        self.writers
    }

    /// The partition directory of `hour` in `table`.
    pub fn dir(table: &str, hour: i64) -> String {
        let (dt, hh) = partition_of_hour(hour);
        format!("{table}/dt={dt}/hour={hh:02}")
    }

    /// The storage the writer writes to.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The name of batch `b`'s file in each table's hour directory.
    pub fn part_name(b: &HourBatch) -> String {
        format!("part-{:05}-w{:03}.parquet", b.seq, b.worker)
    }

    /// The key of file `part` of `table` in `hour`, in the folder of `device` if given
    /// (`readings/` with `lake.device_partitions`).
    fn key(table: &str, hour: i64, device: Option<u32>, part: &str) -> String {
        let dir = Self::dir(table, hour);
        match device {
            Some(d) => format!("{dir}/device={d}/{part}"),
            None => format!("{dir}/{part}"),
        }
    }

    /// The keys [`LakeWriter::write`] stores `b` under, in the order it stores them.
    pub fn keys(&self, b: &HourBatch) -> Vec<String> {
        let part = Self::part_name(b);
        let mut keys = Vec::new();
        if self.device_partitions {
            // One file per device with readings.
            let devices = b.readings.devices().into_iter();
            keys.extend(devices.map(|d| Self::key("readings", b.hour, Some(d), &part)));
        } else if !b.readings.is_empty() {
            keys.push(Self::key("readings", b.hour, None, &part));
        }
        let mut add = |table: &str, present: bool| {
            if present {
                keys.push(Self::key(table, b.hour, None, &part));
            }
        };
        add("rejects", !b.rejections.is_empty());
        add("hourly", b.hourly.is_some());
        add("quality", b.quality.is_some());
        keys
    }

    /// Writes one batch: new readings and rejects as a new part, current aggregates and
    /// quality counts as a new version of the hour's file (under the keys
    /// [`LakeWriter::keys`] gives). The batch's readings are taken (encoded without a copy);
    /// the rest of it is left as it was.
    pub fn write(&self, b: &mut HourBatch) -> Result<Written, LakeError> {
        let mut w = Written::default();
        let rg = self.row_group_rows;
        let storage = &self.storage;
        let mut put = |key: String, bytes: Vec<u8>, rows: usize| -> Result<(), LakeError> {
            self.retry
                .run(&format!("storing {key}"), || storage.put_atomic(&key, &bytes))?;
            w.files += 1;
            w.rows += rows as u64;
            Ok(())
        };
        // Appended tables: a new part per batch, named by sequence and worker.
        let part = Self::part_name(b);
        if !b.readings.is_empty() {
            let _turn = self
                .one_at_a_time
                .as_ref()
                .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()));
            let readings = std::mem::take(&mut b.readings);
            if self.device_partitions {
                for (device, rows) in readings.into_columns().split_by_device() {
                    let n = rows.len();
                    let bytes = parquet::readings([rows], n, b.hour, rg)?;
                    put(Self::key("readings", b.hour, Some(device), &part), bytes, n)?;
                }
            } else {
                let rows = readings.len();
                let bytes = parquet::readings(readings.chunks(READ_OUT_ROWS), rows, b.hour, rg)?;
                put(Self::key("readings", b.hour, None, &part), bytes, rows)?;
            }
        }
        if !b.rejections.is_empty() {
            let bytes = parquet::rejects(&b.rejections, b.hour, rg)?;
            put(Self::key("rejects", b.hour, None, &part), bytes, b.rejections.len())?;
        }
        // Replaced tables: a new version of the hour's file. A partial batch (an hour
        // reopened after its state was dropped) carries only the keys that changed: merge
        // them into the newest version stored (this writer thread wrote it: all of an
        // hour's batches go to one thread of its owner).
        let mut replace = |table: &'static str, bytes: Vec<u8>, key: &[&str], rows: usize| -> Result<(), LakeError> {
            let dir = Self::dir(table, b.hour);
            let path = Self::key(table, b.hour, None, &part);
            let old = b.partial.then(|| {
                self.retry.run(&format!("reading the newest version in {dir}"), || {
                    let newest = storage
                        .list(&dir)?
                        .into_iter()
                        .filter(|k| *k != path)
                        .max_by_key(|k| part_of_key(k));
                    newest.map_or(Ok(None), |k| storage.get(&k))
                })
            });
            let bytes = match old.transpose()?.flatten() {
                Some(old) => parquet::merge(&old, &bytes, table, b.hour, rg, key)?,
                None => bytes,
            };
            put(path, bytes, rows)
        };
        if let Some(h) = &b.hourly {
            replace("hourly", parquet::hourly(h, b.hour, rg)?, &["device"], h.len())?;
        }
        if let Some(q) = &b.quality {
            replace(
                "quality",
                parquet::quality(q, b.hour, rg)?,
                &["device", "outcome"],
                q.len(),
            )?;
        }
        Ok(w)
    }
}

/// The writer of a temporary file named `.NAME.PID-N.tmp` (local directories) or
/// `.NAME.PID-N@HOST.tmp` (shared storage): its process id, and its host if named.
pub(crate) fn temp_file_owner(name: &str) -> Option<(u32, Option<&str>)> {
    let stem = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (stem, host) = match stem.rsplit_once('@') {
        Some((s, h)) => (s, Some(h)),
        None => (stem, None),
    };
    let (_, tail) = stem.rsplit_once('.')?;
    let (pid, n) = tail.split_once('-')?;
    n.parse::<u64>().ok()?;
    Some((pid.parse().ok()?, host))
}

/// Whether a process with this id runs on this machine (Linux: `/proc/PID`); this process
/// counts as running.
pub(crate) fn process_runs(pid: u32) -> bool {
    pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// This machine's host name ("" if it has none).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Rows of an hour's readings read out (merged, for a live hour) and encoded at a time: the
/// columns of the whole hour are never made at once (a live hour at 1,000 msg/s: 320 MiB).
/// A row group's worth by default: a piece's columns and arrays (~180 bytes a row) are
/// beside the part's packed readings and its file while it is written.
pub const READ_OUT_ROWS: usize = 16_384;

/// The tables with one part per batch and worker, and the tables with one file per hour.
pub const APPENDED_TABLES: [&str; 2] = ["readings", "rejects"];
/// See [`APPENDED_TABLES`].
pub const REPLACED_TABLES: [&str; 2] = ["hourly", "quality"];

/// The hour of a lake key (`table/dt=YYYY-MM-DD/hour=HH/...`), if it has that shape.
pub fn hour_of_key(key: &str) -> Option<i64> {
    let mut parts = key.split('/');
    let _table = parts.next()?;
    let day = parts.next()?.strip_prefix("dt=")?;
    let hh: i64 = parts.next()?.strip_prefix("hour=")?.parse().ok()?;
    let mut ymd = day.split('-');
    let (y, m, d): (i64, u32, u32) = (
        ymd.next()?.parse().ok()?,
        ymd.next()?.parse().ok()?,
        ymd.next()?.parse().ok()?,
    );
    if !(0..24).contains(&hh) || ymd.next().is_some() {
        return None;
    }
    Some(fmsflow_dataflows::time::days_from_civil(y, m, d) * 24 + hh)
}

/// The (part number, worker) of an appended table's part file name
/// (`part-SSSSS-wWWW.parquet`).
pub fn part_of_key(key: &str) -> Option<(u32, usize)> {
    let name = key.rsplit('/').next()?;
    let (seq, worker) = name.strip_prefix("part-")?.strip_suffix(".parquet")?.split_once("-w")?;
    Some((seq.parse().ok()?, worker.parse().ok()?))
}

/// A table file as [`Covered::files`] sees it: key, hour, (part number, worker) if the name
/// has them, and whether the checkpoint covers it.
pub type LakeFile = (String, i64, Option<(u32, usize)>, bool);

/// What a checkpoint covers of the lake's files, from hour `oldest` on (the oldest hour it
/// kept; older hours cannot change).
pub struct Covered<'a, S: Fn(i64) -> bool> {
    /// The oldest hour kept.
    pub oldest: i64,
    /// Whether the checkpoint had sealed an hour.
    pub sealed: S,
    /// Parts written per (hour, worker) by the checkpoint (0 when absent).
    pub next_seq: &'a std::collections::BTreeMap<(i64, usize), u32>,
}

impl<S: Fn(i64) -> bool> Covered<'_, S> {
    /// Every file of every table from hour `oldest` on, as (key, hour, its part's
    /// (seq, worker), covered by the checkpoint). An hour the checkpoint had not sealed
    /// covers none of its files; a sealed one covers its parts numbered below its
    /// `next_seq`, per worker.
    pub fn files(&self, storage: &dyn Storage) -> Result<Vec<LakeFile>, LakeError> {
        let mut out = Vec::new();
        for table in APPENDED_TABLES.iter().chain(REPLACED_TABLES.iter()) {
            for key in storage.list(table)? {
                let Some(hour) = hour_of_key(&key).filter(|h| *h >= self.oldest) else {
                    continue;
                };
                let part = part_of_key(&key);
                let covered = (self.sealed)(hour)
                    && part.is_none_or(|(seq, w)| seq < self.next_seq.get(&(hour, w)).copied().unwrap_or(0));
                out.push((key, hour, part, covered));
            }
        }
        Ok(out)
    }
}

/// Before a run resumes from a checkpoint: deletes the files written after it (those
/// [`Covered::files`] says it does not cover). Only the files `mine` accepts are looked at:
/// it gets a part's worker (`None` for a file of an older layout, not named by a part) and
/// the hour, so each process of a cluster cleans the files its own workers write, and none
/// deletes what another has already started writing. Returns the deleted keys. See
/// docs/RECOVERY.md.
pub fn clean_after_checkpoint<S: Fn(i64) -> bool>(
    storage: &dyn Storage,
    covered: &Covered<'_, S>,
    mine: impl Fn(Option<usize>, i64) -> bool,
) -> Result<Vec<String>, LakeError> {
    let mut deleted = Vec::new();
    for (key, hour, part, covered) in covered.files(storage)? {
        if !covered && mine(part.map(|(_, w)| w), hour) {
            storage.delete(&key)?;
            deleted.push(key);
        }
    }
    deleted.sort();
    Ok(deleted)
}

/// Scratch lakes for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// An empty local lake (deleted with the guard) and the hour 2025-07-07T08.
    pub fn scratch() -> (tempfile::TempDir, local::LocalStorage, i64) {
        let dir = tempfile::tempdir().unwrap();
        let storage = local::LocalStorage::new(dir.path().to_path_buf(), false);
        (dir, storage, hour_of_key("readings/dt=2025-07-07/hour=08/x").unwrap())
    }

    /// Stores a placeholder file `name` in `table`'s folder of `hour`; returns its key.
    pub fn put(storage: &dyn Storage, table: &str, hour: i64, name: &str) -> String {
        let key = format!("{}/{name}", LakeWriter::dir(table, hour));
        storage.put_atomic(&key, b"x").unwrap();
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fmsflow_dataflows::dataflow::BatchKind;

    /// A directory whose first `fail` writes fail as an unreachable server's would.
    struct Flaky {
        inner: local::LocalStorage,
        fail: std::sync::atomic::AtomicUsize,
    }

    impl Storage for Flaky {
        fn put_atomic(&self, key: &str, bytes: &[u8]) -> Result<(), LakeError> {
            use std::sync::atomic::Ordering::Relaxed;
            if self.fail.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).is_ok() {
                return Err(LakeError::Io {
                    op: "uploading",
                    path: key.into(),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                });
            }
            self.inner.put_atomic(key, bytes)
        }
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, LakeError> {
            self.inner.get(key)
        }
        fn list(&self, prefix: &str) -> Result<Vec<String>, LakeError> {
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<(), LakeError> {
            self.inner.delete(key)
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    /// A directory that takes 100 ms to store a `readings/` file, and counts how many are
    /// being stored at once.
    struct Slow {
        inner: local::LocalStorage,
        now: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    impl Storage for Slow {
        fn put_atomic(&self, key: &str, bytes: &[u8]) -> Result<(), LakeError> {
            use std::sync::atomic::Ordering::SeqCst;
            let readings = key.starts_with("readings/");
            if readings {
                let n = self.now.fetch_add(1, SeqCst) + 1;
                self.most.fetch_max(n, SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let done = self.inner.put_atomic(key, bytes);
            if readings {
                self.now.fetch_sub(1, SeqCst);
            }
            done
        }
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, LakeError> {
            self.inner.get(key)
        }
        fn list(&self, prefix: &str) -> Result<Vec<String>, LakeError> {
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<(), LakeError> {
            self.inner.delete(key)
        }
        fn describe(&self) -> String {
            "slow".into()
        }
    }

    /// Live, the workers' writer threads store one readings file at a time between them:
    /// four threads writing a part each at once never overlap, and every part is stored.
    #[test]
    fn a_live_writer_stores_one_readings_file_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Slow {
            inner: local::LocalStorage::new(dir.path().to_path_buf(), false),
            now: Default::default(),
            most: Default::default(),
        });
        let w = Arc::new(LakeWriter::new(storage.clone(), 100).one_readings_file_at_a_time(true));
        let start = Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4usize)
            .map(|worker| {
                let (w, start) = (w.clone(), start.clone());
                std::thread::spawn(move || {
                    let mut columns = fmsflow_dataflows::ReadingColumns::default();
                    columns.push(&fmsflow_dataflows::Reading {
                        device: 1 + worker as u32,
                        time_ms: 481_000 * 3_600_000,
                        metrics: [1.0; 6],
                        is_fail: false,
                        ingest_ms: None,
                        pos: Default::default(),
                        payload_at: Default::default(),
                    });
                    let mut batch = HourBatch {
                        hour: 481_000,
                        seq: 0,
                        kind: BatchKind::Open,
                        worker,
                        partial: false,
                        readings: columns.into(),
                        rejections: Vec::new(),
                        hourly: None,
                        quality: None,
                    };
                    start.wait();
                    w.write(&mut batch).unwrap().files
                })
            })
            .collect();
        let files: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(files, 4);
        assert_eq!(storage.most.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn failed_writes_are_retried_within_the_limit_then_fail_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = |fail| {
            Arc::new(Flaky {
                inner: local::LocalStorage::new(dir.path().to_path_buf(), false),
                fail: std::sync::atomic::AtomicUsize::new(fail),
            })
        };
        let mut batch = HourBatch {
            hourly: Some(vec![(1, Default::default())]),
            ..HourBatch::seal(481_000, 0)
        };
        let retry = |limit_ms| Retry {
            limit: std::time::Duration::from_millis(limit_ms),
            first: std::time::Duration::from_millis(10),
            backend: "file",
        };
        // Three failures (pauses of 10, 20 and 40 ms) fit in a limit of 1 s.
        let storage = flaky(3);
        let w = LakeWriter::new(storage.clone(), 100).with_retry(retry(1000));
        assert_eq!(w.write(&mut batch).unwrap().files, 1);
        assert_eq!(storage.fail.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(storage
            .get(&format!(
                "{}/part-00000-w000.parquet",
                LakeWriter::dir("hourly", 481_000)
            ))
            .unwrap()
            .is_some());
        // Past the limit the error is the write's.
        let w = LakeWriter::new(flaky(100), 100).with_retry(retry(50));
        let e = w.write(&mut batch).unwrap_err();
        assert!(e.retryable() && e.to_string().contains("uploading"), "{e}");
    }

    #[test]
    fn keys_name_their_hour_and_part() {
        let hour = hour_of_key("readings/dt=2025-07-07/hour=08/part-00003-w001.parquet").unwrap();
        assert_eq!(LakeWriter::dir("readings", hour), "readings/dt=2025-07-07/hour=08");
        assert_eq!(
            part_of_key("readings/dt=2025-07-07/hour=08/part-00003-w001.parquet"),
            Some((3, 1))
        );
        assert_eq!(part_of_key("hourly/dt=2025-07-07/hour=08/part-00000.parquet"), None);
        assert_eq!(hour_of_key("readings/dt=2025-07-07/hour=24/x"), None);
        assert_eq!(hour_of_key("_fmsflow/checkpoint.json"), None);
    }

    /// The clean-up deletes exactly the files written after the checkpoint.
    #[test]
    fn cleaning_after_a_checkpoint() {
        let (_dir, storage, h) = testing::scratch();
        let put = |table: &str, hour: i64, name: &str| testing::put(&storage, table, hour, name);
        // Hour h-2: older than the checkpoint kept, untouched whatever it holds.
        let old = put("readings", h - 2, "part-00009-w000.parquet");
        // Hour h-1: sealed; worker 0 had written 1 part, worker 1 none.
        let kept = put("readings", h - 1, "part-00000-w000.parquet");
        let late0 = put("readings", h - 1, "part-00001-w000.parquet");
        let late1 = put("rejects", h - 1, "part-00000-w001.parquet");
        let table = put("hourly", h - 1, "part-00000-w001.parquet");
        let late_table = put("hourly", h - 1, "part-00001-w001.parquet");
        // Hour h: not sealed at the checkpoint, sealed after it.
        let open_part = put("readings", h, "part-00000-w000.parquet");
        let open_table = put("quality", h, "part-00000-w000.parquet");
        let next_seq = [((h - 1, 0), 1), ((h - 1, 1), 1)].into_iter().collect();
        let covered = Covered {
            oldest: h - 1,
            sealed: |hour| hour < h,
            next_seq: &next_seq,
        };
        let deleted = clean_after_checkpoint(&storage, &covered, |_, _| true).unwrap();
        let mut want = vec![late0, late_table, open_part, open_table];
        want.sort();
        assert_eq!(deleted, want);
        let mut left: Vec<String> = ["readings", "rejects", "hourly", "quality"]
            .iter()
            .flat_map(|t| storage.list(t).unwrap())
            .collect();
        left.sort();
        let mut expect = vec![old, kept, late1, table];
        expect.sort();
        assert_eq!(left, expect);
        assert!(storage.list("nothing-here").unwrap().is_empty());
        storage.delete("readings/not-there").unwrap();
    }
}
