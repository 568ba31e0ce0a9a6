//! Per-hour manifests: the commit records that make an hour's files visible together.
//!
//! `_fmsflow/manifests/dt=YYYY-MM-DD/hour=HH.json` lists, per table, the files that make the
//! hour's current version, with the source offsets the run had read when it was committed.
//! The engine's committing worker replaces it (one atomic write) once every file of the
//! epochs it covers is stored, and only after the checkpoint of those epochs: a manifest
//! never lists a file a restart would delete. Then it deletes the versions of `hourly` and
//! `quality` that the new manifest no longer lists. A reader that reads the manifest and then
//! the files it lists sees one version of the hour, whole: the readings, rejects, aggregates
//! and quality counts of the same epochs. docs/LAKE.md has the rules for readers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{hour_of_key, part_of_key, Covered, LakeError, LakeWriter, Storage, REPLACED_TABLES};

/// Where the manifests are kept in the lake.
pub const DIR: &str = "_fmsflow/manifests";

/// One hour's manifest. `format` changes when the meaning of a field does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub format: u32,
    /// The hour's start, RFC 3339 (for people; the key names the hour too).
    pub hour: String,
    /// 1 for the hour's first commit, then one more for each.
    pub commit: u64,
    /// Per table (`readings`, `rejects`, `hourly`, `quality`), the keys of its files,
    /// relative to the lake's root, in order. A table with no file is absent.
    pub files: BTreeMap<String, Vec<String>>,
    /// Kafka runs: per partition of the raw topic, the offset after the last record the
    /// commit covers (the checkpoint's `read_end`). Empty for other sources.
    #[serde(default)]
    pub read_end: BTreeMap<i32, i64>,
}

/// The key of `hour`'s manifest.
pub fn key(hour: i64) -> String {
    let dir = LakeWriter::dir("x", hour);
    format!("{DIR}/{}.json", &dir[2..])
}

/// The hour a manifest key names.
pub fn hour_of(key: &str) -> Option<i64> {
    let rest = key.strip_prefix(DIR)?.strip_prefix('/')?.strip_suffix(".json")?;
    hour_of_key(&format!("x/{rest}"))
}

impl Manifest {
    /// An empty manifest of `hour`, not yet committed.
    pub fn new(hour: i64) -> Manifest {
        Manifest {
            format: 1,
            hour: fmsflow_dataflows::time::format_rfc3339(hour * fmsflow_dataflows::time::HOUR_MS),
            ..Manifest::default()
        }
    }

    /// The manifest of `hour` in `storage`, if there is one.
    pub fn load(storage: &dyn Storage, hour: i64) -> Result<Option<Manifest>, LakeError> {
        let key = key(hour);
        let Some(bytes) = storage.get(&key)? else {
            return Ok(None);
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| invalid(&key, storage, e.to_string()))?;
        if m.format != 1 {
            return Err(invalid(
                &key,
                storage,
                format!("has format {}; this fmsflow reads format 1", m.format),
            ));
        }
        Ok(Some(m))
    }

    /// Writes it atomically over the hour's previous manifest.
    pub fn save(&self, storage: &dyn Storage, hour: i64) -> Result<(), LakeError> {
        let bytes = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        storage.put_atomic(&key(hour), &bytes)
    }

    /// Adds files to the hour. A file of `hourly` or `quality` is a new version of the
    /// table's one file: it replaces the version listed before (the higher part number
    /// wins). Returns the keys no longer listed, to delete once this manifest is stored.
    pub fn add(&mut self, keys: impl IntoIterator<Item = String>) -> Vec<String> {
        let mut superseded = Vec::new();
        for key in keys {
            let table = key.split('/').next().unwrap_or_default().to_string();
            let files = self.files.entry(table.clone()).or_default();
            if REPLACED_TABLES.contains(&table.as_str()) {
                files.push(key);
                files.sort_by_key(|k| part_of_key(k));
                let newest = files.pop().expect("just pushed");
                superseded.append(files);
                files.push(newest);
            } else if let Err(at) = files.binary_search(&key) {
                files.insert(at, key);
            }
        }
        superseded
    }

    /// Every file listed, of every table.
    pub fn all_files(&self) -> impl Iterator<Item = &String> {
        self.files.values().flatten()
    }
}

fn invalid(key: &str, storage: &dyn Storage, problem: String) -> LakeError {
    LakeError::Io {
        op: "reading the manifest",
        path: format!("{key} in {}", storage.describe()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, problem),
    }
}

/// Every manifest in `storage`, by hour.
pub fn load_all(storage: &dyn Storage) -> Result<BTreeMap<i64, Manifest>, LakeError> {
    let mut out = BTreeMap::new();
    for k in storage.list(DIR)? {
        if let Some(hour) = hour_of(&k) {
            if let Some(m) = Manifest::load(storage, hour)? {
                out.insert(hour, m);
            }
        }
    }
    Ok(out)
}

/// What [`rebuild`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Rebuilt {
    /// Manifests written again, or deleted (their hour has no covered file).
    pub manifests: usize,
    /// Old versions of `hourly` and `quality` deleted.
    pub superseded: usize,
}

/// Before a run resumes from a checkpoint: makes the manifest of every hour from `oldest` on
/// list exactly the files the checkpoint covers (a crash after a checkpoint and before its
/// manifests leaves them behind), and deletes the old table versions those supersede. Files
/// not covered are left to [`super::clean_after_checkpoint`]; so this may run beside it,
/// in another process of the cluster.
pub fn rebuild<S: Fn(i64) -> bool>(
    storage: &dyn Storage,
    covered: &Covered<'_, S>,
    read_end: &BTreeMap<i32, i64>,
) -> Result<Rebuilt, LakeError> {
    let mut hours: BTreeMap<i64, Manifest> = BTreeMap::new();
    let mut superseded = Vec::new();
    for (key, hour, _, covered) in covered.files(storage)? {
        if covered {
            superseded.extend(hours.entry(hour).or_insert_with(|| Manifest::new(hour)).add([key]));
        }
    }
    let mut done = Rebuilt::default();
    let stored = load_all(storage)?;
    for (hour, old) in stored.range(covered.oldest..) {
        if !hours.contains_key(hour) {
            storage.delete(&key(*hour))?;
            done.manifests += 1;
        } else if let Some(m) = hours.get_mut(hour) {
            m.commit = old.commit;
        }
    }
    for (hour, mut m) in hours {
        if stored.get(&hour).is_some_and(|old| old.files == m.files) {
            continue;
        }
        m.commit += 1;
        m.read_end = read_end.clone();
        m.save(storage, hour)?;
        done.manifests += 1;
    }
    // Older hours: versions their manifests replaced, which a crashed run meant to delete
    // later (`lake.keep_replaced`).
    for table in REPLACED_TABLES {
        for k in storage.list(table)? {
            let Some(hour) = hour_of_key(&k).filter(|h| *h < covered.oldest) else {
                continue;
            };
            let listed = stored
                .get(&hour)
                .and_then(|m| m.files.get(table))
                .and_then(|f| f.last());
            if listed.is_some_and(|l| part_of_key(l) > part_of_key(&k)) {
                superseded.push(k);
            }
        }
    }
    for k in &superseded {
        storage.delete(k)?;
    }
    done.superseded = superseded.len();
    Ok(done)
}

/// What [`verify`] found.
#[derive(Debug, Default)]
pub struct Verified {
    /// Hours with a manifest.
    pub hours: usize,
    /// Files the manifests list.
    pub files: usize,
    /// Readings in the listed files.
    pub readings: u64,
    /// The sum of the hours' commit numbers: it grows with every commit.
    pub commits: u64,
    /// Files of the four tables that no manifest lists: a run's files not yet committed,
    /// or (once every run has ended) files that should not be there.
    pub unlisted: Vec<String>,
}

/// Why [`verify`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading again may succeed: a storage operation failed (the server was unreachable,
    /// a read was torn by a concurrent write), or a listed file was missing because a new
    /// commit of its hour replaced it while it was being read. A reader that meets this
    /// reads the manifests again.
    #[error("{0}")]
    Retry(String),
    /// The lake is not consistent.
    #[error("{0}")]
    Broken(String),
}

/// Reads the lake as a reader that follows the manifests does, and checks it: every listed
/// file is there and decodes, each hour has at most one version of `hourly` and `quality`,
/// and per device its `hourly` count equals its rows in `readings`. The first problem is
/// the error.
pub fn verify(storage: &dyn Storage) -> Result<Verified, VerifyError> {
    let manifests = load_all(storage).map_err(retry)?;
    let mut v = Verified {
        hours: manifests.len(),
        ..Verified::default()
    };
    let mut listed = std::collections::BTreeSet::new();
    for (&hour, m) in &manifests {
        v.readings += verify_hour(storage, hour, m)?;
        v.files += m.all_files().count();
        v.commits += m.commit;
        listed.extend(m.all_files().cloned());
    }
    for table in super::APPENDED_TABLES.iter().chain(REPLACED_TABLES.iter()) {
        for k in storage.list(table).map_err(retry)? {
            if !listed.contains(&k) {
                v.unlisted.push(k);
            }
        }
    }
    v.unlisted.sort();
    Ok(v)
}

fn retry(e: LakeError) -> VerifyError {
    VerifyError::Retry(e.to_string())
}

/// [`verify`] of one hour, as manifest `m` lists it; its readings.
pub fn verify_hour(storage: &dyn Storage, hour: i64, m: &Manifest) -> Result<u64, VerifyError> {
    let read = |table: &str| -> Result<Vec<_>, VerifyError> {
        let mut batches = Vec::new();
        for k in m.files.get(table).into_iter().flatten() {
            let Some(bytes) = storage.get(k).map_err(retry)? else {
                let now = Manifest::load(storage, hour).map_err(retry)?;
                return Err(if now.is_some_and(|n| n.commit != m.commit) {
                    VerifyError::Retry(format!("the manifest of {} changed while it was read", m.hour))
                } else {
                    VerifyError::Broken(format!(
                        "the manifest of {} (commit {}) lists {k}, which is not there",
                        m.hour, m.commit
                    ))
                });
            };
            batches.extend(super::parquet::read(&bytes).map_err(|e| VerifyError::Broken(format!("{k}: {e}")))?);
        }
        Ok(batches)
    };
    for t in REPLACED_TABLES {
        let n = m.files.get(t).map_or(0, Vec::len);
        if n > 1 {
            return Err(VerifyError::Broken(format!(
                "the manifest of {} lists {n} versions of {t}",
                m.hour
            )));
        }
    }
    let counts = |table: &str, column: Option<&str>| {
        super::parquet::per_device(&read(table)?, column).map_err(|e| VerifyError::Broken(format!("{table}: {e}")))
    };
    let readings = counts("readings", None)?;
    let hourly = counts("hourly", Some("count"))?;
    read("rejects")?;
    read("quality")?;
    if readings != hourly {
        let device = readings
            .keys()
            .chain(hourly.keys())
            .find(|d| readings.get(d) != hourly.get(d))
            .expect("the maps differ");
        return Err(VerifyError::Broken(format!(
            "the manifest of {} (commit {}): device {device} has {} readings and an hourly count of {}",
            m.hour,
            m.commit,
            readings.get(device).unwrap_or(&0),
            hourly.get(device).unwrap_or(&0)
        )));
    }
    Ok(readings.values().sum::<i64>() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_hour() {
        let h = hour_of_key("readings/dt=2025-07-07/hour=08/x").unwrap();
        assert_eq!(key(h), "_fmsflow/manifests/dt=2025-07-07/hour=08.json");
        assert_eq!(hour_of(&key(h)), Some(h));
        assert_eq!(hour_of("_fmsflow/checkpoint.json"), None);
        assert_eq!(Manifest::new(h).hour, "2025-07-07T08:00:00Z");
    }

    #[test]
    fn a_new_table_version_supersedes_the_old_one() {
        let mut m = Manifest::new(0);
        let r = |n: &str| format!("readings/dt=1970-01-01/hour=00/{n}");
        let q = |n: &str| format!("hourly/dt=1970-01-01/hour=00/{n}");
        assert!(m
            .add([
                r("part-00000-w001.parquet"),
                r("part-00000-w000.parquet"),
                q("part-00000-w001.parquet")
            ])
            .is_empty());
        assert_eq!(
            m.add([q("part-00002-w001.parquet"), r("part-00002-w000.parquet")]),
            vec![q("part-00000-w001.parquet")]
        );
        // An older version arriving late loses to the newer one.
        assert_eq!(
            m.add([q("part-00001-w001.parquet")]),
            vec![q("part-00001-w001.parquet")]
        );
        assert_eq!(m.files["hourly"], vec![q("part-00002-w001.parquet")]);
        assert_eq!(
            m.files["readings"],
            vec![
                r("part-00000-w000.parquet"),
                r("part-00000-w001.parquet"),
                r("part-00002-w000.parquet")
            ]
        );
        assert_eq!(m.all_files().count(), 4);
    }

    /// After a crash, the manifests list what the checkpoint covers, and nothing else.
    #[test]
    fn rebuilding_lists_what_the_checkpoint_covers() {
        let (_dir, s, h) = crate::lake::testing::scratch();
        let put = |table: &str, hour: i64, name: &str| crate::lake::testing::put(&s, table, hour, name);
        // Hour h-1: sealed; the checkpoint covers parts 0-1 of worker 0 and 0 of worker 1.
        let r0 = put("readings", h - 1, "part-00000-w000.parquet");
        let r1 = put("readings", h - 1, "part-00001-w000.parquet");
        let r2 = put("readings", h - 1, "part-00000-w001.parquet");
        let old_table = put("hourly", h - 1, "part-00000-w000.parquet");
        let table = put("hourly", h - 1, "part-00001-w000.parquet");
        let after = put("readings", h - 1, "part-00002-w000.parquet");
        // Its manifest was committed once, before the checkpoint's last epochs.
        let mut before = Manifest::new(h - 1);
        before.add([r0.clone(), old_table.clone()]);
        before.commit = 4;
        before.save(&s, h - 1).unwrap();
        // Hour h-3: older than the oldest kept; a version its manifest replaced is left.
        let older = put("quality", h - 3, "part-00001-w000.parquet");
        let older_current = put("quality", h - 3, "part-00002-w000.parquet");
        let mut m = Manifest::new(h - 3);
        m.add([older_current.clone()]);
        m.save(&s, h - 3).unwrap();
        // Hour h: not sealed at the checkpoint; a manifest of it cannot be right.
        put("readings", h, "part-00000-w000.parquet");
        Manifest::new(h).save(&s, h).unwrap();
        let next_seq = [((h - 1, 0), 2), ((h - 1, 1), 1)].into_iter().collect();
        let covered = Covered {
            oldest: h - 1,
            sealed: |hour| hour < h,
            next_seq: &next_seq,
        };
        let read_end = [(0, 99)].into_iter().collect();
        let done = rebuild(&s, &covered, &read_end).unwrap();
        assert_eq!(
            done,
            Rebuilt {
                manifests: 2,
                superseded: 2
            }
        );
        assert_eq!(
            (s.get(&older).unwrap(), s.get(&older_current).unwrap().is_some()),
            (None, true)
        );
        let m = Manifest::load(&s, h - 1).unwrap().unwrap();
        assert_eq!((m.commit, &m.read_end), (5, &read_end));
        assert_eq!(m.files["readings"], vec![r0, r2, r1]);
        assert_eq!(m.files["hourly"], vec![table]);
        assert_eq!(Manifest::load(&s, h).unwrap(), None);
        assert_eq!(s.get(&old_table).unwrap(), None, "the superseded version is deleted");
        assert!(s.get(&after).unwrap().is_some(), "files not covered are the clean-up's");
        // Again: nothing to do.
        assert_eq!(rebuild(&s, &covered, &read_end).unwrap(), Rebuilt::default());
    }
}
