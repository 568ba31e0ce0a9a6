//! Hours the live view no longer holds (older than `api.keep_hours`), answered from the
//! lake: the hour's manifest names its `hourly` and `quality` files, which hold the same
//! figures and counts the view held (docs/API.md, "Older hours").
//!
//! Each process answers for the (device, hour) keys its own workers aggregate (the
//! dataflow's [`route_device_hour`]), from memory or from the lake alike, so a cluster's
//! fanned-out answer stays a union of disjoint shares. A few decoded hours are cached.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use fmsflow_dataflows::dataflow::route_device_hour;

use super::view::Frozen;
use crate::lake::manifest::Manifest;
use crate::lake::{parquet, Storage};

/// Hours read from the lake at once by one query.
pub const READ_AT_ONCE: usize = 8;

/// Reads old hours from the lake for one process's view.
pub struct Archive {
    storage: Arc<dyn Storage>,
    /// The global index of this process's first worker.
    first_worker: usize,
    /// This process's workers, and the cluster's.
    workers: usize,
    peers: usize,
    /// Decoded hours kept, most recently used last.
    cache: Mutex<VecDeque<(i64, Arc<Vec<Frozen>>)>>,
    capacity: usize,
}

impl Archive {
    /// The archive of process `process` (of `processes`, each of `workers` workers) over
    /// `storage`, keeping up to `capacity` decoded hours.
    pub fn new(
        storage: Arc<dyn Storage>,
        process: usize,
        processes: usize,
        workers: usize,
        capacity: usize,
    ) -> Archive {
        Archive {
            storage,
            first_worker: process * workers,
            workers,
            peers: processes * workers,
            cache: Mutex::default(),
            capacity,
        }
    }

    /// Hour `hour`'s values, one share per local worker (empty if the lake has no such hour).
    pub fn hour(&self, hour: i64) -> Result<Arc<Vec<Frozen>>, String> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = cache.iter().position(|(h, _)| *h == hour) {
                let hit = cache.remove(i).expect("found");
                let shares = hit.1.clone();
                cache.push_back(hit);
                return Ok(shares);
            }
        }
        // Read without the lock: another query's hour does not wait for this one.
        let shares = Arc::new(self.load(hour)?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if self.capacity > 0 && !cache.iter().any(|(h, _)| *h == hour) {
            if cache.len() == self.capacity {
                cache.pop_front();
            }
            cache.push_back((hour, shares.clone()));
        }
        Ok(shares)
    }

    /// Calls `f` with each hour of `hours` in order, and its shares; reads up to
    /// [`READ_AT_ONCE`] hours at a time (each a few storage round trips).
    pub fn for_hours(&self, hours: std::ops::Range<i64>, mut f: impl FnMut(i64, &[Frozen])) -> Result<(), String> {
        let hours: Vec<i64> = hours.collect();
        for chunk in hours.chunks(READ_AT_ONCE) {
            let read: Vec<Result<Arc<Vec<Frozen>>, String>> = match chunk {
                [h] => vec![self.hour(*h)],
                _ => std::thread::scope(|s| {
                    let reads: Vec<_> = chunk.iter().map(|h| s.spawn(move || self.hour(*h))).collect();
                    reads
                        .into_iter()
                        .map(|r| r.join().unwrap_or_else(|_| Err("a read from the lake panicked".into())))
                        .collect()
                }),
            };
            for (h, shares) in chunk.iter().zip(read) {
                f(*h, &shares?);
            }
        }
        Ok(())
    }

    /// Decodes hour `hour`'s committed `hourly` and `quality` files, keeping this process's
    /// keys.
    fn load(&self, hour: i64) -> Result<Vec<Frozen>, String> {
        let storage = &*self.storage;
        let hour_name = || fmsflow_dataflows::time::format_rfc3339(hour * fmsflow_dataflows::time::HOUR_MS);
        let failed = |e: String| format!("reading the hour {} from the lake: {e}", hour_name());
        let Some(m) = Manifest::load(storage, hour).map_err(|e| failed(e.to_string()))? else {
            return Ok((0..self.workers).map(|_| Frozen::default()).collect());
        };
        let read = |table: &str| -> Result<Vec<Vec<u8>>, String> {
            let mut out = Vec::new();
            for key in m.files.get(table).into_iter().flatten() {
                match storage.get(key).map_err(|e| failed(e.to_string()))? {
                    Some(bytes) => out.push(bytes),
                    // Replaced by a newer commit since the manifest was read: asking again
                    // reads the newer one.
                    None => return Err(failed(format!("{key}, listed in its manifest, is gone"))),
                }
            }
            Ok(out)
        };
        // Which local worker aggregates (device, hour), if one of this process's does.
        let local = |device: u32| {
            let w = (route_device_hour(device, hour) % self.peers as u64) as usize;
            w.checked_sub(self.first_worker).filter(|i| *i < self.workers)
        };
        let mut hourly: Vec<Vec<_>> = vec![Vec::new(); self.workers];
        for bytes in read("hourly")? {
            for (d, f) in parquet::read_hourly(&bytes).map_err(&failed)? {
                if let Some(i) = local(d) {
                    hourly[i].push((d, f));
                }
            }
        }
        let mut quality: Vec<Vec<_>> = vec![Vec::new(); self.workers];
        for bytes in read("quality")? {
            for ((d, o), n) in parquet::read_quality(&bytes).map_err(&failed)? {
                if let Some(i) = local(d) {
                    quality[i].push(((d, o), n));
                }
            }
        }
        Ok(hourly
            .into_iter()
            .zip(quality)
            .map(|(h, q)| Frozen::from_rows(h, q))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fmsflow_dataflows::rules::{Outcome, Rule};
    use fmsflow_dataflows::{HourStats, Reading, SourcePos};

    use super::*;
    use crate::api::view::LiveView;
    use crate::lake::testing::scratch;
    use crate::lake::LakeWriter;

    /// An hour of `devices` devices committed to `storage`: its rows and its keys.
    fn commit_hour(
        storage: &dyn Storage,
        hour: i64,
        devices: u32,
    ) -> (Vec<(u32, HourStats)>, Vec<parquet::QualityRow>) {
        let start = hour * fmsflow_dataflows::time::HOUR_MS;
        let hourly: Vec<(u32, HourStats)> = (1..=devices)
            .map(|d| {
                let reading = |k: i64| Reading {
                    device: d,
                    time_ms: start + 1_000 * (d as i64 + k),
                    metrics: [d as f64 + k as f64 / 8.0; 6],
                    is_fail: k == 1,
                    ingest_ms: None,
                    pos: SourcePos::default(),
                    payload_at: Default::default(),
                };
                let mut s = HourStats::of(&reading(0));
                s.add(&reading(1));
                (d, s)
            })
            .collect();
        let mut quality: Vec<parquet::QualityRow> = (0..=devices).map(|d| ((d, Outcome::Valid), 2)).collect();
        quality.push(((0, Outcome::Rejected(Rule::UnknownDevice)), 3));
        quality.push(((7, Outcome::Rejected(Rule::Duplicate)), 1));
        quality.sort();
        let keys: Vec<String> = ["hourly", "quality"]
            .iter()
            .map(|t| format!("{}/part-00000-w000.parquet", LakeWriter::dir(t, hour)))
            .collect();
        storage
            .put_atomic(&keys[0], &parquet::hourly(&hourly, hour, 16).unwrap())
            .unwrap();
        storage
            .put_atomic(&keys[1], &parquet::quality(&quality, hour, 16).unwrap())
            .unwrap();
        let mut m = Manifest::new(hour);
        m.add(keys);
        m.save(storage, hour).unwrap();
        (hourly, quality)
    }

    /// Views (one per process) that no longer hold `hour` (the watermark is 4 hours on).
    fn views(storage: &Arc<dyn Storage>, processes: usize, workers: usize, hour: i64) -> Vec<Arc<LiveView>> {
        (0..processes)
            .map(|p| {
                let v = LiveView::with_archive(
                    workers,
                    2,
                    Some(Archive::new(storage.clone(), p, processes, workers, 2)),
                );
                v.evict_all_before_for_tests((hour + 4) * fmsflow_dataflows::time::HOUR_MS);
                v
            })
            .collect()
    }

    /// Hours the view no longer holds are read from the lake: each process answers for the
    /// keys its workers aggregate, so the processes' answers add up to the hour, once.
    #[test]
    fn old_hours_are_read_from_the_lake_each_process_its_share() {
        let (_dir, storage, hour) = scratch();
        let storage: Arc<dyn Storage> = Arc::new(storage);
        let (hourly, quality) = commit_hour(&*storage, hour, 40);
        let want: BTreeMap<u32, _> = hourly.iter().map(|(d, s)| (*d, s.figures())).collect();
        for (processes, workers) in [(1, 1), (1, 2), (2, 1), (3, 2)] {
            let context = format!("{processes} process(es) of {workers} worker(s)");
            let mut fleet = BTreeMap::new();
            let (mut valid, mut rejected, mut devices_seen) = (0, 0, 0);
            for v in views(&storage, processes, workers, hour) {
                for (d, f) in v.fleet_hour(u64::MAX, hour).unwrap() {
                    assert!(fleet.insert(d, f).is_none(), "{context}: device {d} twice");
                }
                let (all, by) = v.quality(u64::MAX, hour - 1, hour + 1, None, true).unwrap();
                valid += all[&Outcome::Valid];
                rejected += all
                    .iter()
                    .filter(|(o, _)| **o != Outcome::Valid)
                    .map(|(_, n)| n)
                    .sum::<i64>();
                devices_seen += by.len();
                let (sums, _) = v.quality(u64::MAX, hour, hour + 1, None, false).unwrap();
                assert_eq!(sums, all, "{context}: the sums are the per-device counts'");
                if let Some(span) = v.spans(u64::MAX, hour, hour + 3).unwrap().get(&hour) {
                    assert!(
                        span.0 >= hour * 3_600_000 + 1_000 && span.1 <= hour * 3_600_000 + 42_000,
                        "{context}"
                    );
                }
                for d in [1u32, 7, 40] {
                    let rows = v.device_hourly(u64::MAX, d, hour - 5, hour + 5).unwrap();
                    let seven = v.quality(u64::MAX, hour, hour + 1, Some(d), false).unwrap().0;
                    if let Some((h, f)) = rows.first() {
                        assert_eq!((*h, f), (hour, &want[&d]), "{context}");
                        assert_eq!(seven[&Outcome::Valid], 2, "{context}");
                    } else {
                        assert!(seven.is_empty(), "{context}: device {d}'s counts come with its figures");
                    }
                }
            }
            assert_eq!(fleet, want, "{context}");
            let count = |valid: bool| -> i64 {
                let of = |o: &Outcome| (*o == Outcome::Valid) == valid;
                quality.iter().filter(|((_, o), _)| of(o)).map(|(_, n)| n).sum()
            };
            assert_eq!((valid, rejected), (count(true), count(false)), "{context}");
            assert_eq!(devices_seen, 41, "{context}");
        }
        // The lake's spans: the earliest and latest reading of the hour.
        let v = &views(&storage, 1, 1, hour)[0];
        let span = v.spans(u64::MAX, hour, hour + 1).unwrap()[&hour];
        assert_eq!(span, (hour * 3_600_000 + 1_000, hour * 3_600_000 + 41_000));
        // An hour without a manifest has no rows; one whose listed file is gone says so.
        assert!(v.fleet_hour(u64::MAX, hour + 1).unwrap().is_empty());
        let v2 = &views(&storage, 1, 1, hour)[0];
        storage
            .delete(&format!("{}/part-00000-w000.parquet", LakeWriter::dir("hourly", hour)))
            .unwrap();
        let e = v2.fleet_hour(u64::MAX, hour).unwrap_err();
        assert!(e.contains("is gone") && e.contains("from the lake"), "{e}");
        // The first view read the hour before, and keeps it decoded.
        assert_eq!(v.fleet_hour(u64::MAX, hour).unwrap().len(), 40);
    }
}
