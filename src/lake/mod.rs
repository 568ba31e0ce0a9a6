//! The Parquet lake: where an hour's files go once it is sealed. Storage is chosen by URL
//! (`file://` now; `s3://` and `hdfs://` come with the storage work) behind one small trait.
//!
//! Layout (Hive style, readable as-is by DuckDB, Spark, Athena):
//! `{readings,hourly,quality,rejects}/dt=YYYY-MM-DD/hour=HH/part-*.parquet`.
//! `readings/` and `rejects/` get a new part per batch and worker (`part-SSSSS-wWWW`: part 0
//! when the hour seals, then one per late change); `hourly/` and `quality/` hold one file per hour, replaced whole when late
//! data changes the hour. Every file is written under a hidden temporary name and renamed,
//! so a reader never sees half a file.

pub mod local;
pub mod parquet;

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
    #[error("{op} `{path}` failed: {source}")]
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
    /// A human description (for logs).
    fn describe(&self) -> String;
}

/// Opens the storage a lake URL names.
/// `fsync`: make each file durable before it is renamed into place (the default); without
/// it a crash of the machine (not of fmsflow) can lose files the lake already showed.
pub fn open(url: &str, fsync: bool) -> Result<Arc<dyn Storage>, LakeError> {
    let err = |problem: &str| LakeError::Url {
        url: url.to_string(),
        problem: problem.to_string(),
    };
    match url.split_once("://") {
        Some(("file", path)) if !path.is_empty() => Ok(Arc::new(local::LocalStorage::new(path.into(), fsync))),
        Some(("file", _)) => Err(err("needs a path, e.g. file://./fmsflow-lake or file:///data/lake")),
        Some(("s3" | "hdfs", _)) => Err(err(
            "this build writes only file:// lakes; S3 and HDFS backends are not available yet",
        )),
        Some((scheme, _)) => Err(err(&format!("unknown scheme `{scheme}`; use file://"))),
        None => Err(err("is not a URL; use file://<path>")),
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
}

impl LakeWriter {
    /// A writer over `storage`.
    pub fn new(storage: Arc<dyn Storage>, row_group_rows: usize) -> Self {
        LakeWriter {
            storage,
            row_group_rows,
        }
    }

    /// The partition directory of `hour` in `table`.
    pub fn dir(table: &str, hour: i64) -> String {
        let (dt, hh) = partition_of_hour(hour);
        format!("{table}/dt={dt}/hour={hh:02}")
    }

    /// Writes one batch: new readings and rejects as a new part, current aggregates and
    /// quality counts as the hour's single (replaced) file.
    pub fn write(&self, b: &HourBatch) -> Result<Written, LakeError> {
        let mut w = Written::default();
        let rg = self.row_group_rows;
        let storage = &self.storage;
        let mut put = |key: String, bytes: Vec<u8>, rows: usize| -> Result<(), LakeError> {
            storage.put_atomic(&key, &bytes)?;
            w.files += 1;
            w.rows += rows as u64;
            Ok(())
        };
        // Appended tables: a new part per batch, named by sequence and worker.
        let part = format!("part-{:05}-w{:03}.parquet", b.seq, b.worker);
        if !b.readings.is_empty() {
            let bytes = parquet::readings(&b.readings, b.hour, rg)?;
            put(
                format!("{}/{part}", Self::dir("readings", b.hour)),
                bytes,
                b.readings.len(),
            )?;
        }
        if !b.rejections.is_empty() {
            let bytes = parquet::rejects(&b.rejections, b.hour, rg)?;
            put(
                format!("{}/{part}", Self::dir("rejects", b.hour)),
                bytes,
                b.rejections.len(),
            )?;
        }
        // Replaced tables: one file per hour. A partial batch (an hour reopened after its
        // state was dropped) carries only the keys that changed: merge them into the file.
        let mut replace = |table: &'static str, bytes: Vec<u8>, key: &[&str], rows: usize| -> Result<(), LakeError> {
            let path = format!("{}/part-00000.parquet", Self::dir(table, b.hour));
            let bytes = match b.partial.then(|| storage.get(&path)).transpose()?.flatten() {
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
