//! The live view the query API answers from: each local worker's share of the differential
//! aggregates, mirrored into memory as its dataflow frontier passes each epoch.
//!
//! A worker's trace cannot be read from another thread, and a query through the dataflow
//! waits for the next epoch; so each worker applies its complete epochs' updates to its own
//! shard here, and a query reads the shards directly. Every value is kept with the epoch it
//! changed at ([`Versions`]): a query reads "as of" one epoch `T` — every update of the epochs
//! before `T`, none of `T` or later — even while the workers apply newer ones, and processes
//! of a cluster answer a fanned-out query as of the same `T`.
//!
//! Versions older than the *horizon* (the view's frontier of [`KEEP_FOR`] ago, and at least
//! [`KEEP_EPOCHS`] epochs back) are folded into one, so memory stays bounded by the keys,
//! not by time. An hour's aggregates are kept as the figures a query reads
//! ([`HourFigures`]), not the exact sums. Once the dataflow forgets an hour (no reading can
//! change it any more: it retracts the hour's keys), the view packs it ([`Frozen`]) and keeps
//! it until it is more than `keep_hours` behind the newest: the totals hold the few hours
//! that can still change, the view the day the dashboard shows. Older hours are read from
//! the lake when a query asks for them ([`Archive`]), each shard's share as it would have
//! held it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use fmsflow_dataflows::dataflow::{joined_frontier, split_done, Epoch, Outputs};
use fmsflow_dataflows::rules::Outcome;
use fmsflow_dataflows::time::HOUR_MS;
use fmsflow_dataflows::{DeviceLatest, HourFigures};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;

use super::archive::Archive;
use crate::lake::parquet::QualityRow;

/// Versions newer than the frontier of this long ago are kept for as-of reads.
pub const KEEP_FOR: Duration = Duration::from_secs(5);
/// ... and at least this many epochs of them.
pub const KEEP_EPOCHS: Epoch = 64;

/// A value's history: its newest version `(epoch it took effect at, value or removed)`,
/// and the older versions a read as of an earlier epoch may still need, oldest first. Once
/// the newest version is older than the horizon, the older ones are folded away and their
/// room freed ([`Shard::settle`] sees to values that stopped changing): a settled value is
/// one version in place, with no allocation. That is most of them (an hour of a device
/// changes only while it is current); keeping every value's room for the versions it once
/// had cost 1.3–2.7 KB of `HourStats` per (device, hour), for `api.keep_hours` hours. The
/// older versions are a deque: a value updated every epoch (an hour of a device that
/// reports often) drops its oldest version at each update, and that must not move the
/// others (at 64 versions of `HourStats`, moving them made one update cost microseconds and
/// held readers back).
#[derive(Clone, Debug)]
pub struct Versions<V> {
    older: VecDeque<(Epoch, Option<V>)>,
    /// `(0, None)` before the first version: the same reads as no version at all.
    newest: (Epoch, Option<V>),
}

impl<V> Default for Versions<V> {
    fn default() -> Self {
        Versions {
            older: VecDeque::new(),
            newest: (0, None),
        }
    }
}

impl<V: Copy> Versions<V> {
    /// The value as of `as_of`: the newest version of an epoch before it.
    pub fn at(&self, as_of: Epoch) -> Option<V> {
        if self.newest.0 < as_of {
            return self.newest.1;
        }
        self.older.iter().rev().find(|(t, _)| *t < as_of).and_then(|(_, v)| *v)
    }

    /// The newest value.
    pub fn last(&self) -> Option<V> {
        self.newest.1
    }

    /// Sets the value from epoch `t` on (epochs arrive in order), folding the versions before
    /// `horizon` into the newest of them. Whether older versions are left to fold later.
    pub fn set(&mut self, t: Epoch, v: Option<V>, horizon: Epoch) -> bool {
        if self.newest.0 != t {
            // A first "removed" reads as no version at all.
            if self.newest.1.is_some() || !self.older.is_empty() {
                // Room for exactly the versions there are, up to four: most values keep
                // one older version for a few seconds, and a deque's first growth makes
                // room for four (~1 KB of `HourFigures`).
                if self.older.len() == self.older.capacity() && self.older.len() < 4 {
                    self.older.reserve_exact(1);
                }
                self.older.push_back(self.newest);
            }
        }
        self.newest = (t, v);
        !self.settle(horizon)
    }

    /// Folds the versions before `horizon` into the newest of them; whether only the newest
    /// version is left.
    pub fn settle(&mut self, horizon: Epoch) -> bool {
        // The first older version goes once the one after it is before the horizon.
        while !self.older.is_empty() {
            let next = self.older.get(1).map_or(self.newest.0, |v| v.0);
            if next >= horizon {
                break;
            }
            self.older.pop_front();
        }
        if self.older.is_empty() && self.older.capacity() > 0 {
            self.older = VecDeque::new();
        }
        self.older.is_empty()
    }

    /// Settled, and removed: nothing for any read to find.
    fn gone(&self) -> bool {
        self.older.is_empty() && self.newest.1.is_none()
    }
}

/// A device's newest accepted reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latest {
    /// Event time, ms since the epoch.
    pub time_ms: i64,
    /// `isFail`.
    pub is_fail: bool,
    /// The six metrics in [`fmsflow_dataflows::METRICS`] order.
    pub metrics: [f64; 6],
}

/// Valid and rejected counts: per outcome.
pub type OutcomeCounts = BTreeMap<Outcome, i64>;

/// Quality counts: in all, and by device.
pub type QualityCounts = (OutcomeCounts, BTreeMap<u32, OutcomeCounts>);

/// One worker's share of the aggregates.
#[derive(Default)]
struct Shard {
    /// By (hour, device): fleet queries read one hour's range, device queries look up hours.
    hourly: BTreeMap<(i64, u32), Versions<HourFigures>>,
    /// By (hour, device, outcome).
    quality: BTreeMap<(i64, u32, Outcome), Versions<i64>>,
    /// The same summed over devices, by (hour, outcome): fleet-wide quality without a scan
    /// of every device.
    quality_hours: BTreeMap<(i64, Outcome), Versions<i64>>,
    latest: HashMap<u32, Versions<Latest>>,
    /// Largest accepted event time (every worker sees every worker's: broadcast).
    watermark: Versions<i64>,
    /// Values left with older versions, by the epoch they were set at, oldest first: each
    /// is settled once that epoch is behind the horizon (and forgotten if it was removed).
    unsettled: VecDeque<(Epoch, Key)>,
    /// Hours no reading can change any more, packed ([`Frozen`]).
    frozen: BTreeMap<i64, Frozen>,
    /// Hours the dataflow has forgotten, and the epoch it did: each is frozen once that
    /// epoch is behind the horizon (its values have one version each by then).
    forgotten: BTreeMap<i64, Epoch>,
    /// The hours before this one have left the shard (`api.keep_hours`): a read takes them
    /// from the lake ([`Archive`]), if the view has one.
    evicted: Evicted,
}

/// The first hour a shard still holds (`i64::MIN` until one leaves).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Evicted(i64);

impl Default for Evicted {
    fn default() -> Self {
        Evicted(i64::MIN)
    }
}

/// One hour's values once no reading can change them: the dataflow's totals have forgotten
/// the hour (`rules.max_age` + `engine.grace` + an hour past its end), and the view keeps it
/// for `api.keep_hours` in sorted vectors, without versions or tree nodes: 232 bytes per
/// device's figures instead of the ~400 of a versioned entry in a B-tree node.
#[derive(Debug, Default, PartialEq)]
pub struct Frozen {
    /// By device.
    hourly: Vec<(u32, HourFigures)>,
    /// By (device, outcome).
    quality: Vec<QualityRow>,
    /// The same summed over devices, by outcome.
    quality_hours: Vec<(Outcome, i64)>,
    /// The earliest and latest event time of the hour's readings.
    span: Option<(i64, i64)>,
}

impl Frozen {
    /// An hour's values as the lake's `hourly` and `quality` files hold them (rows in any
    /// order).
    pub(crate) fn from_rows(mut hourly: Vec<(u32, HourFigures)>, mut quality: Vec<QualityRow>) -> Frozen {
        hourly.sort_unstable_by_key(|(d, _)| *d);
        quality.sort_unstable_by_key(|(k, _)| *k);
        let mut sums = OutcomeCounts::new();
        for ((_, o), n) in &quality {
            *sums.entry(*o).or_default() += n;
        }
        let mut f = Frozen {
            hourly,
            quality,
            quality_hours: sums.into_iter().collect(),
            span: None,
        };
        f.finish();
        f
    }

    /// Once every value is in: the span of the hour's readings, and no spare room.
    fn finish(&mut self) {
        self.span = self
            .hourly
            .iter()
            .map(|(_, v)| (v.first_ms, v.last_ms))
            .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)));
        self.hourly.shrink_to_fit();
        self.quality.shrink_to_fit();
        self.quality_hours.shrink_to_fit();
    }

    /// Devices with figures in the hour.
    pub fn devices(&self) -> usize {
        self.hourly.len()
    }

    fn figures(&self, device: u32) -> Option<HourFigures> {
        let i = self.hourly.binary_search_by_key(&device, |(d, _)| *d).ok()?;
        Some(self.hourly[i].1)
    }

    /// A device's quality counts.
    fn quality_of(&self, device: u32) -> &[QualityRow] {
        let from = self.quality.partition_point(|((d, _), _)| *d < device);
        let to = self.quality.partition_point(|((d, _), _)| *d <= device);
        &self.quality[from..to]
    }
}

/// Takes the entries before `end` out of `map`: the hour being frozen and any older one (hours
/// freeze oldest first, so these are the first of the map). The map is split, not emptied
/// entry by entry: the write lock is held for the split, not for a removal per key.
fn take_before<K: Ord, V>(map: &mut BTreeMap<K, V>, end: K) -> BTreeMap<K, V> {
    let rest = map.split_off(&end);
    std::mem::replace(map, rest)
}

/// Hour `h`'s packed values (made if new), noting the hour in `hours`.
fn packed<'a>(frozen: &'a mut BTreeMap<i64, Frozen>, hours: &mut Vec<i64>, h: i64) -> &'a mut Frozen {
    if hours.last() != Some(&h) {
        hours.push(h);
    }
    frozen.entry(h).or_default()
}

/// Sets `key`'s value in a vector sorted by key.
fn upsert<K: Ord + Copy, V>(sorted: &mut Vec<(K, V)>, key: K, value: V) {
    match sorted.binary_search_by_key(&key, |(k, _)| *k) {
        Ok(i) => sorted[i].1 = value,
        Err(i) => sorted.insert(i, (key, value)),
    }
}

/// A value of a shard.
#[derive(Clone, Copy, Debug)]
enum Key {
    Hourly((i64, u32)),
    Quality((i64, u32, Outcome)),
    QualityHour((i64, Outcome)),
    Latest(u32),
}

/// Settles `map`'s value at `k`, and forgets it if it was removed.
fn settle_in<K: Ord, V: Copy>(map: &mut BTreeMap<K, Versions<V>>, k: &K, horizon: Epoch) {
    if let Some(v) = map.get_mut(k) {
        if v.settle(horizon) && v.gone() {
            map.remove(k);
        }
    }
}

/// A quality count's new value (`None`: gone), by (hour, device, outcome).
type QualityChange = ((i64, u32, Outcome), Option<i64>);

/// What one epoch changes in a shard.
#[derive(Default)]
struct EpochUpdates {
    hourly: Vec<((i64, u32), Option<HourFigures>)>,
    quality: Vec<QualityChange>,
    latest: Vec<DeviceLatest>,
    watermark: Option<i64>,
}

impl Shard {
    /// A removed key is one the dataflow forgot: its hour is frozen once the epoch is
    /// behind the horizon. A change of a frozen hour (only a replay of files without
    /// ingest times reopens old hours, and it forgets none) goes into it in place.
    fn apply_hourly(&mut self, t: Epoch, updates: &[((i64, u32), Option<HourFigures>)], horizon: Epoch) {
        // Hours that left the view are answered from the lake.
        let evicted = self.evicted.0;
        for (k, v) in updates.iter().filter(|(k, _)| k.0 >= evicted) {
            let Some(v) = v else {
                self.forgotten.entry(k.0).or_insert(t);
                continue;
            };
            if let Some(f) = self.frozen.get_mut(&k.0) {
                upsert(&mut f.hourly, k.1, *v);
                f.span = Some(
                    f.span
                        .map_or((v.first_ms, v.last_ms), |(a, b)| (a.min(v.first_ms), b.max(v.last_ms))),
                );
                continue;
            }
            if self.hourly.entry(*k).or_default().set(t, Some(*v), horizon) {
                self.unsettled.push_back((t, Key::Hourly(*k)));
            }
        }
    }

    fn apply_quality(&mut self, t: Epoch, updates: &[QualityChange], horizon: Epoch) {
        // Hours that left the view are answered from the lake.
        let evicted = self.evicted.0;
        for (k, v) in updates.iter().filter(|(k, _)| k.0 >= evicted) {
            let (hour, device, outcome) = *k;
            let Some(v) = v else {
                self.forgotten.entry(hour).or_insert(t);
                continue;
            };
            if let Some(f) = self.frozen.get_mut(&hour) {
                let old = f
                    .quality_of(device)
                    .iter()
                    .find(|((_, o), _)| *o == outcome)
                    .map_or(0, |e| e.1);
                upsert(&mut f.quality, (device, outcome), *v);
                let total = f.quality_hours.iter().find(|(o, _)| *o == outcome).map_or(0, |e| e.1);
                upsert(&mut f.quality_hours, outcome, total + v - old);
                continue;
            }
            let v = &Some(*v);
            let versions = self.quality.entry(*k).or_default();
            let delta = v.unwrap_or(0) - versions.last().unwrap_or(0);
            if versions.set(t, *v, horizon) {
                self.unsettled.push_back((t, Key::Quality(*k)));
            }
            let total = self.quality_hours.entry((hour, outcome)).or_default();
            let sum = total.last().unwrap_or(0) + delta;
            if total.set(t, (sum != 0).then_some(sum), horizon) {
                self.unsettled.push_back((t, Key::QualityHour((hour, outcome))));
            }
        }
    }

    /// Settles at most `limit` of the values set before `horizon`; whether any are left.
    fn settle(&mut self, horizon: Epoch, limit: usize) -> bool {
        for _ in 0..limit {
            match self.unsettled.front() {
                Some((t, _)) if *t < horizon => {}
                _ => return false,
            }
            let Some((_, k)) = self.unsettled.pop_front() else {
                return false;
            };
            match k {
                Key::Hourly(k) => settle_in(&mut self.hourly, &k, horizon),
                Key::Quality(k) => settle_in(&mut self.quality, &k, horizon),
                Key::QualityHour(k) => settle_in(&mut self.quality_hours, &k, horizon),
                Key::Latest(d) => {
                    if let Some(v) = self.latest.get_mut(&d) {
                        v.settle(horizon);
                    }
                }
            }
        }
        self.unsettled.front().is_some_and(|(t, _)| *t < horizon)
    }

    /// Freezes the forgotten hours whose epoch is behind the horizon.
    fn freeze(&mut self, horizon: Epoch) {
        while let Some((&hour, _)) = self.forgotten.first_key_value().filter(|(_, t)| **t < horizon) {
            self.forgotten.pop_first();
            // This hour, and any older one still in the trees (older than a forgotten hour:
            // no reading can change it either), each into its own packed hour.
            let mut hours: Vec<i64> = Vec::new();
            let frozen = &mut self.frozen;
            for ((h, d), v) in take_before(&mut self.hourly, (hour + 1, 0)) {
                v.last()
                    .into_iter()
                    .for_each(|v| upsert(&mut packed(frozen, &mut hours, h).hourly, d, v));
            }
            for ((h, d, o), v) in take_before(&mut self.quality, (hour + 1, 0, Outcome::Valid)) {
                v.last()
                    .into_iter()
                    .for_each(|v| upsert(&mut packed(frozen, &mut hours, h).quality, (d, o), v));
            }
            for ((h, o), v) in take_before(&mut self.quality_hours, (hour + 1, Outcome::Valid)) {
                v.last()
                    .into_iter()
                    .for_each(|v| upsert(&mut packed(frozen, &mut hours, h).quality_hours, o, v));
            }
            hours.sort_unstable();
            hours.dedup();
            for f in frozen
                .iter_mut()
                .filter(|(h, _)| hours.binary_search(h).is_ok())
                .map(|(_, f)| f)
            {
                f.finish();
            }
        }
    }

    fn apply_latest(&mut self, t: Epoch, updates: &[DeviceLatest], horizon: Epoch) {
        for l in updates {
            let versions = self.latest.entry(l.device).or_default();
            if versions.last().is_none_or(|p| l.time_ms >= p.time_ms) {
                let v = Latest {
                    time_ms: l.time_ms,
                    is_fail: l.is_fail,
                    metrics: l.metrics,
                };
                if versions.set(t, Some(v), horizon) {
                    self.unsettled.push_back((t, Key::Latest(l.device)));
                }
            }
        }
    }

    fn apply_watermark(&mut self, t: Epoch, w: Option<i64>, horizon: Epoch, keep_hours: i64) {
        let Some(w) = w.filter(|w| self.watermark.last().is_none_or(|p| *w > p)) else {
            return;
        };
        self.watermark.set(t, Some(w), horizon);
        // Old hours leave the view (the lake keeps them).
        let oldest = w.div_euclid(HOUR_MS) - keep_hours;
        self.evicted.0 = self.evicted.0.max(oldest);
        while self.hourly.first_key_value().is_some_and(|((h, _), _)| *h < oldest) {
            self.hourly.pop_first();
        }
        while self.quality.first_key_value().is_some_and(|((h, _, _), _)| *h < oldest) {
            self.quality.pop_first();
        }
        while self
            .quality_hours
            .first_key_value()
            .is_some_and(|((h, _), _)| *h < oldest)
        {
            self.quality_hours.pop_first();
        }
        while self.frozen.first_key_value().is_some_and(|(h, _)| *h < oldest) {
            self.frozen.pop_first();
        }
        while self.forgotten.first_key_value().is_some_and(|(h, _)| *h < oldest) {
            self.forgotten.pop_first();
        }
    }
}

/// Updates applied under one hold of a shard's write lock. An epoch's updates are invisible
/// to reads until the worker's frontier passes it, so they may go in piecewise: readers
/// wait at most for one piece, not for a whole epoch (1-3 ms at 1,000 devices).
const APPLY_CHUNK: usize = 64;

/// This process's live view: one shard per local worker.
pub struct LiveView {
    shards: Vec<RwLock<Shard>>,
    /// Per local worker: every epoch before this one is in its shard (`Epoch::MAX`: its
    /// dataflow has ended).
    frontiers: Vec<AtomicU64>,
    /// The newest epoch any shard has applied (what "as of the end" means once all ended).
    newest: AtomicU64,
    horizon: AtomicU64,
    /// (when, the view's frontier then), oldest first: where the horizon comes from.
    history: Mutex<VecDeque<(Instant, Epoch)>>,
    advanced: (Mutex<()>, Condvar),
    keep_hours: i64,
    /// Where hours older than `keep_hours` are read from.
    archive: Option<Archive>,
    /// The engine has finished and stored every output ([`LiveView::finished`]).
    done: AtomicBool,
}

impl LiveView {
    /// A view for `workers` local workers, holding the newest `keep_hours` hours.
    pub fn new(workers: usize, keep_hours: u32) -> Arc<LiveView> {
        Self::with_archive(workers, keep_hours, None)
    }

    /// The same, answering for older hours from `archive`.
    pub fn with_archive(workers: usize, keep_hours: u32, archive: Option<Archive>) -> Arc<LiveView> {
        Arc::new(LiveView {
            shards: (0..workers).map(|_| RwLock::default()).collect(),
            frontiers: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            newest: AtomicU64::new(0),
            horizon: AtomicU64::new(0),
            history: Mutex::default(),
            advanced: (Mutex::new(()), Condvar::new()),
            keep_hours: keep_hours as i64,
            archive,
            done: AtomicBool::new(false),
        })
    }

    /// Every shard sees watermark `w` (and lets the hours older than `keep_hours` go).
    #[cfg(test)]
    pub(crate) fn evict_all_before_for_tests(&self, w: i64) {
        for s in &self.shards {
            s.write().unwrap().apply_watermark(1, Some(w), 0, self.keep_hours);
        }
    }

    /// The engine has finished: every epoch is in and every output stored (in the lake
    /// too), so answers as of the end are complete.
    pub fn finished(&self) {
        self.done.store(true, Ordering::Release);
    }

    /// Local workers.
    pub fn workers(&self) -> usize {
        self.shards.len()
    }

    /// Every epoch before this one is in every shard: the newest time a read can be as of.
    pub fn frontier(&self) -> Epoch {
        self.frontiers
            .iter()
            .map(|f| f.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    /// Reads before this epoch may no longer be exact.
    pub fn horizon(&self) -> Epoch {
        self.horizon.load(Ordering::Acquire)
    }

    /// The epoch to report for an as-of time: past the end of the data, the epoch after
    /// the last one.
    pub fn epoch_label(&self, as_of: Epoch) -> (Epoch, bool) {
        if as_of == Epoch::MAX {
            let newest = self.newest.load(Ordering::Acquire).saturating_add(1);
            (newest, self.done.load(Ordering::Acquire))
        } else {
            (as_of, false)
        }
    }

    /// Waits until the view has every epoch before `as_of`, at most `limit`.
    pub fn wait_for(&self, as_of: Epoch, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = self.advanced.0.lock().unwrap_or_else(|e| e.into_inner());
        while self.frontier() < as_of {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .advanced
                .1
                .wait_timeout(g, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn apply(&self, worker: usize, t: Epoch, u: EpochUpdates) {
        self.newest.fetch_max(t, Ordering::AcqRel);
        let horizon = self.horizon();
        let shard = || self.shards[worker].write().unwrap_or_else(|e| e.into_inner());
        for c in u.hourly.chunks(APPLY_CHUNK) {
            shard().apply_hourly(t, c, horizon);
        }
        for c in u.quality.chunks(APPLY_CHUNK) {
            shard().apply_quality(t, c, horizon);
        }
        for c in u.latest.chunks(APPLY_CHUNK) {
            shard().apply_latest(t, c, horizon);
        }
        shard().apply_watermark(t, u.watermark, horizon, self.keep_hours);
        while shard().settle(horizon, APPLY_CHUNK) {}
        shard().freeze(horizon);
    }

    fn advance(&self, worker: usize, to: Epoch) {
        if self.frontiers[worker].swap(to, Ordering::AcqRel) == to {
            return;
        }
        let f = self.frontier();
        let now = Instant::now();
        {
            let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
            if h.back().is_none_or(|(_, e)| *e < f) {
                h.push_back((now, f));
            }
            // The newest frontier at least KEEP_FOR old, but never closer than KEEP_EPOCHS.
            while h.len() > 1 && h[1].0 + KEEP_FOR <= now {
                h.pop_front();
            }
            let old = h.front().filter(|(at, _)| *at + KEEP_FOR <= now).map_or(0, |(_, e)| *e);
            let horizon = old.min(f.saturating_sub(KEEP_EPOCHS)).min(f);
            self.horizon.fetch_max(horizon, Ordering::AcqRel);
        }
        let _g = self.advanced.0.lock().unwrap_or_else(|e| e.into_inner());
        self.advanced.1.notify_all();
    }

    fn read<R>(&self, mut f: impl FnMut(&Shard) -> R) -> Vec<R> {
        self.shards
            .iter()
            .map(|s| f(&s.read().unwrap_or_else(|e| e.into_inner())))
            .collect()
    }

    /// Reads the hours `hours` of every shard: `memory` gets a shard and the part of `hours`
    /// it still holds; `old` gets each hour a shard has let go with that shard's share, read
    /// from `archive` (without one, those hours are not answered). A shard's share is read
    /// from one place or the other, as the shard was at its read.
    fn read_hours<R>(
        &self,
        archive: Option<&Archive>,
        hours: std::ops::Range<i64>,
        mut memory: impl FnMut(&Shard, std::ops::Range<i64>) -> R,
        mut old: impl FnMut(i64, &Frozen),
    ) -> Result<Vec<R>, String> {
        let (from, to) = (hours.start, hours.end);
        let mut evicted = Vec::new();
        let held = self.read(|s| {
            evicted.push(s.evicted.0);
            memory(s, from.max(s.evicted.0).min(to)..to)
        });
        if let Some(archive) = archive {
            let end = to.min(evicted.iter().copied().max().unwrap_or(i64::MIN));
            archive.for_hours(from..end.max(from), |h, shares| {
                for (share, _) in shares.iter().zip(&evicted).filter(|(_, e)| h < **e) {
                    old(h, share);
                }
            })?;
        }
        Ok(held)
    }

    /// One device's hourly statistics for the hours `from..to`, as of `as_of` (older hours
    /// from the lake).
    pub fn device_hourly(
        &self,
        as_of: Epoch,
        device: u32,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, HourFigures)>, String> {
        let mut out: Vec<(i64, HourFigures)> = Vec::new();
        let held = self.read_hours(
            self.archive.as_ref(),
            from..to,
            |s, hours| {
                hours
                    .filter_map(|h| {
                        let v = match s.frozen.get(&h) {
                            Some(f) => f.figures(device),
                            None => s.hourly.get(&(h, device)).and_then(|v| v.at(as_of)),
                        };
                        v.map(|st| (h, st))
                    })
                    .collect::<Vec<_>>()
            },
            |h, f| out.extend(f.figures(device).map(|st| (h, st))),
        )?;
        out.extend(held.into_iter().flatten());
        out.sort_by_key(|(h, _)| *h);
        Ok(out)
    }

    /// One device's newest reading as of `as_of`.
    pub fn device_latest(&self, as_of: Epoch, device: u32) -> Option<Latest> {
        self.read(|s| s.latest.get(&device).and_then(|v| v.at(as_of)))
            .into_iter()
            .flatten()
            .max_by_key(|l| l.time_ms)
    }

    /// Every device's statistics of one hour, as of `as_of` (an older hour from the lake).
    pub fn fleet_hour(&self, as_of: Epoch, hour: i64) -> Result<Vec<(u32, HourFigures)>, String> {
        let mut out = Vec::new();
        let held = self.read_hours(
            self.archive.as_ref(),
            hour..hour + 1,
            |s, hours| {
                if hours.is_empty() {
                    Vec::new()
                } else if let Some(f) = s.frozen.get(&hour) {
                    f.hourly.clone()
                } else {
                    s.hourly
                        .range((hour, 0)..=(hour, u32::MAX))
                        .filter_map(|((_, d), v)| v.at(as_of).map(|st| (*d, st)))
                        .collect::<Vec<_>>()
                }
            },
            |_, f| out.extend_from_slice(&f.hourly),
        )?;
        out.extend(held.into_iter().flatten());
        Ok(out)
    }

    /// Each hour of `from..to` with readings, and the event times of its earliest and latest
    /// reading, as of `as_of` (older hours from the lake).
    pub fn spans(&self, as_of: Epoch, from: i64, to: i64) -> Result<BTreeMap<i64, (i64, i64)>, String> {
        let mut spans: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        let held = self.read_hours(
            self.archive.as_ref(),
            from..to,
            |s, hours| {
                let mut spans: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
                for (h, f) in s.frozen.range(hours.clone()) {
                    if let Some(span) = f.span {
                        merge_span(&mut spans, *h, span);
                    }
                }
                for ((h, _), v) in s.hourly.range((hours.start, 0)..(hours.end, 0)) {
                    if let Some(st) = v.at(as_of) {
                        merge_span(&mut spans, *h, (st.first_ms, st.last_ms));
                    }
                }
                spans
            },
            |h, f| {
                if let Some(span) = f.span {
                    merge_span(&mut spans, h, span);
                }
            },
        )?;
        for (h, span) in held.into_iter().flatten() {
            merge_span(&mut spans, h, span);
        }
        Ok(spans)
    }

    /// Quality counts over the hours `from..to`: in all, and (with `per_device`) by device
    /// (older hours from the lake).
    pub fn quality(
        &self,
        as_of: Epoch,
        from: i64,
        to: i64,
        device: Option<u32>,
        per_device: bool,
    ) -> Result<QualityCounts, String> {
        self.quality_in(self.archive.as_ref(), as_of, from..to, (device, per_device))
    }

    /// [`LiveView::quality`] of `hours`, reading older ones from `archive` if given.
    fn quality_in(
        &self,
        archive: Option<&Archive>,
        as_of: Epoch,
        hours: std::ops::Range<i64>,
        (device, per_device): (Option<u32>, bool),
    ) -> Result<QualityCounts, String> {
        let mut tally = Tally::new(per_device);
        let held = self.read_hours(
            archive,
            hours,
            |s, hours| {
                let mut t = Tally::new(per_device);
                let (lo, to) = (hours.start, hours.end);
                match device {
                    None => {
                        for (_, f) in s.frozen.range(lo..to) {
                            t.frozen(f, None);
                        }
                        if per_device {
                            for ((_, d, o), v) in s.quality.range((lo, 0, Outcome::Valid)..(to, 0, Outcome::Valid)) {
                                t.add(*d, *o, v.at(as_of).unwrap_or(0));
                            }
                        } else {
                            for ((_, o), v) in s.quality_hours.range((lo, Outcome::Valid)..(to, Outcome::Valid)) {
                                t.add_all(*o, v.at(as_of).unwrap_or(0));
                            }
                        }
                    }
                    // One device: its few entries of each hour.
                    Some(d) => {
                        for h in lo..to {
                            if let Some(f) = s.frozen.get(&h) {
                                t.frozen(f, Some(d));
                                continue;
                            }
                            let range = (h, d, Outcome::Valid)..(h, d.saturating_add(1), Outcome::Valid);
                            for ((_, _, o), v) in s.quality.range(range) {
                                t.add(d, *o, v.at(as_of).unwrap_or(0));
                            }
                        }
                    }
                }
                t
            },
            |_, f| tally.frozen(f, device),
        )?;
        for t in held {
            tally.merge(t);
        }
        tally.all.retain(|_, n| *n != 0);
        Ok((tally.all, tally.by_device))
    }

    /// Each device's quality (valid / records) over the last [`QUALITY_HOURS`] hours up to
    /// the watermark's, as of `as_of` (records of unknown devices left out). Only the hours
    /// the view holds: a scrape of `/metrics` never reads the lake.
    pub fn device_quality_ratios(&self, as_of: Epoch) -> Vec<f64> {
        let Some(w) = self.watermark(as_of) else {
            return Vec::new();
        };
        let to = w.div_euclid(HOUR_MS) + 1;
        // Without the lake, nothing can fail.
        let (_, by_device) = self
            .quality_in(None, as_of, to - QUALITY_HOURS..to, (None, true))
            .unwrap_or_default();
        by_device
            .into_iter()
            .filter(|(d, _)| *d != 0)
            .filter_map(|(_, counts)| {
                let total: i64 = counts.values().sum();
                let valid = counts.get(&Outcome::Valid).copied().unwrap_or(0);
                (total > 0).then(|| valid as f64 / total as f64)
            })
            .collect()
    }

    /// The largest accepted event time as of `as_of`.
    pub fn watermark(&self, as_of: Epoch) -> Option<i64> {
        self.read(|s| s.watermark.at(as_of)).into_iter().flatten().max()
    }
}

/// The hours of each device's quality in `/metrics` (`fmsflow_devices_by_quality`).
pub const QUALITY_HOURS: i64 = 24;

/// Quality counts being summed: in all, and by device if asked.
struct Tally {
    all: OutcomeCounts,
    by_device: BTreeMap<u32, OutcomeCounts>,
    per_device: bool,
}

impl Tally {
    fn new(per_device: bool) -> Tally {
        Tally {
            all: OutcomeCounts::new(),
            by_device: BTreeMap::new(),
            per_device,
        }
    }

    fn add_all(&mut self, o: Outcome, n: i64) {
        *self.all.entry(o).or_default() += n;
    }

    fn add(&mut self, d: u32, o: Outcome, n: i64) {
        self.add_all(o, n);
        if self.per_device {
            *self.by_device.entry(d).or_default().entry(o).or_default() += n;
        }
    }

    /// A packed hour's counts: its sums, every device's, or one device's.
    fn frozen(&mut self, f: &Frozen, device: Option<u32>) {
        match device {
            None if !self.per_device => f.quality_hours.iter().for_each(|(o, n)| self.add_all(*o, *n)),
            None => f.quality.iter().for_each(|((d, o), n)| self.add(*d, *o, *n)),
            Some(d) => f.quality_of(d).iter().for_each(|((_, o), n)| self.add(d, *o, *n)),
        }
    }

    fn merge(&mut self, other: Tally) {
        for (o, n) in other.all {
            self.add_all(o, n);
        }
        for (d, counts) in other.by_device {
            let e = self.by_device.entry(d).or_default();
            for (o, n) in counts {
                *e.entry(o).or_default() += n;
            }
        }
    }
}

/// Widens hour `h`'s span in `spans` to cover `span`.
pub fn merge_span(spans: &mut BTreeMap<i64, (i64, i64)>, h: i64, span: (i64, i64)) {
    let e = spans.entry(h).or_insert(span);
    *e = (e.0.min(span.0), e.1.max(span.1));
}

/// Mirrors this worker's share of `out`'s aggregates into `view`'s shard `local`.
pub fn attach(out: &Outputs<'_>, view: Arc<LiveView>, local: usize) {
    let scope = out.latest.scope();
    let mut builder = OperatorBuilder::new("LiveView".to_owned(), scope);
    let mut i_hourly = builder.new_input(out.hourly.clone().inner, Pipeline);
    let mut i_quality = builder.new_input(out.quality.clone().inner, Pipeline);
    let mut i_latest = builder.new_input(out.latest.clone(), Pipeline);
    let mut i_wm = builder.new_input(out.watermarks.clone(), Pipeline);
    builder.build(move |_caps| {
        // Updates waiting for their epoch to complete.
        let mut pending: BTreeMap<Epoch, EpochUpdates> = BTreeMap::new();
        move |frontiers| {
            // A collection's message may hold updates of later epochs than its capability:
            // each is filed under its own. The collection retracts a key's old value (-1) and
            // adds the new one (+1): the +1 is the value; a lone -1 removes the key.
            i_hourly.for_each_stamp(|_, data| {
                data.for_each(|b| {
                    for (((device, hour), st), t, d) in b.drain(..) {
                        let u = &mut pending.entry(t).or_default().hourly;
                        u.push(((hour, device), (d > 0).then(|| st.figures())));
                    }
                })
            });
            i_quality.for_each_stamp(|_, data| {
                data.for_each(|b| {
                    for (((device, hour, o), n), t, d) in b.drain(..) {
                        let u = &mut pending.entry(t).or_default().quality;
                        u.push(((hour, device, o), (d > 0).then_some(n as i64)));
                    }
                })
            });
            i_latest.for_each_stamp(|cap, data| {
                let u = &mut pending.entry(*cap.least().expect("a time")).or_default().latest;
                data.for_each(|b| u.append(b));
            });
            i_wm.for_each_stamp(|cap, data| {
                let u = pending.entry(*cap.least().expect("a time")).or_default();
                data.for_each(|b| u.watermark = b.iter().copied().chain(u.watermark).max());
            });
            let frontier = joined_frontier(frontiers);
            for (t, mut u) in split_done(&mut pending, |t| !frontier.less_equal(t)) {
                // The retraction and the new value of a key come in either order: keep the value.
                u.hourly.sort_by_key(|(k, v)| (*k, v.is_none()));
                u.hourly.dedup_by(|b, a| a.0 == b.0);
                u.quality.sort_by_key(|(k, v)| (*k, v.is_none()));
                u.quality.dedup_by(|b, a| a.0 == b.0);
                view.apply(local, t, u);
            }
            view.advance(local, frontier.iter().min().copied().unwrap_or(Epoch::MAX));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_of_and_fold_below_the_horizon() {
        let mut v: Versions<i64> = Versions::default();
        assert_eq!(v.at(10), None);
        v.set(2, Some(20), 0);
        v.set(5, Some(50), 0);
        v.set(5, Some(55), 0);
        assert_eq!(
            (v.at(2), v.at(3), v.at(5), v.at(6)),
            (None, Some(20), Some(20), Some(55))
        );
        v.set(9, None, 0);
        assert_eq!((v.at(9), v.at(10), v.last()), (Some(55), None, None));
        // Horizon 7: everything before it folds into the newest version before 7 (epoch 5).
        assert!(v.set(12, Some(1), 7), "older versions are left to fold later");
        assert_eq!(
            v.older.capacity(),
            3,
            "room for the three versions there were, not four"
        );
        assert_eq!(v.older.len(), 2);
        assert_eq!((v.at(7), v.at(10), v.at(13)), (Some(55), None, Some(1)));
        // Once the newest is behind the horizon, only it is left, in place.
        assert!(!v.settle(12));
        assert!(v.settle(13));
        assert_eq!((v.older.capacity(), v.at(13), v.last()), (0, Some(1), Some(1)));
        assert!(!v.set(20, None, 21) && v.gone());
        // A first "removed" is no version at all.
        let mut w: Versions<i64> = Versions::default();
        assert!(!w.set(3, None, 0));
        assert!(!w.set(4, Some(1), 0), "nothing older to keep");
        assert_eq!((w.older.len(), w.at(4), w.at(5)), (0, None, Some(1)));
    }

    fn figures(count: u64, first_ms: i64) -> HourFigures {
        HourFigures {
            count,
            first_ms,
            last_ms: first_ms + 1,
            ..HourFigures::default()
        }
    }

    #[test]
    fn a_shard_settles_what_stopped_changing() {
        let mut s = Shard::default();
        let st = figures(1, 0);
        s.apply_hourly(1, &[((5, 1), Some(st)), ((5, 2), Some(st))], 0);
        s.apply_hourly(2, &[((5, 2), Some(st))], 0);
        s.apply_quality(2, &[((5, 2, Outcome::Valid), Some(3))], 0);
        s.apply_quality(3, &[((5, 2, Outcome::Valid), Some(4))], 0);
        assert_eq!(
            s.unsettled.len(),
            3,
            "the values set twice: two quality counts, one aggregate"
        );
        assert!(!s.settle(2, 100));
        assert_eq!(s.unsettled.len(), 3, "set at epochs 2 and 3: not behind horizon 2");
        assert!(s.settle(4, 1), "two are left");
        assert!(!s.settle(4, 100));
        assert_eq!(s.unsettled.len(), 0);
        assert!(s.hourly.values().all(|v| v.older.capacity() == 0));
        assert_eq!(s.hourly[&(5, 2)].at(3), Some(st));
        assert_eq!(s.quality_hours[&(5, Outcome::Valid)].at(4), Some(4));
    }

    #[test]
    fn a_forgotten_hour_is_frozen_behind_the_horizon_and_reads_the_same() {
        let view = LiveView::new(1, 168);
        let rej = Outcome::Rejected(fmsflow_dataflows::Rule::BadTime);
        let epoch = |t: Epoch, hourly: Vec<((i64, u32), Option<HourFigures>)>, quality: Vec<QualityChange>| {
            view.apply(
                0,
                t,
                EpochUpdates {
                    hourly,
                    quality,
                    latest: Vec::new(),
                    watermark: Some(10 * HOUR_MS + t as i64),
                },
            );
            view.advance(0, t + 1);
        };
        epoch(
            1,
            vec![
                // Hour 4 is never retracted (a replay of files forgets nothing): older than
                // a forgotten hour, it is packed with it, into its own.
                ((4, 2), Some(figures(5, 4 * HOUR_MS))),
                ((5, 1), Some(figures(2, 5 * HOUR_MS))),
                ((5, 2), Some(figures(3, 5 * HOUR_MS + 9))),
                ((6, 1), Some(figures(1, 6 * HOUR_MS))),
            ],
            vec![
                ((5, 1, Outcome::Valid), Some(2)),
                ((5, 2, Outcome::Valid), Some(3)),
                ((5, 2, rej), Some(1)),
                ((6, 1, Outcome::Valid), Some(1)),
            ],
        );
        let reads = |v: &LiveView| {
            (
                v.fleet_hour(Epoch::MAX, 5).unwrap(),
                v.device_hourly(Epoch::MAX, 2, 0, 10).unwrap(),
                v.spans(Epoch::MAX, 0, 10).unwrap(),
                v.quality(Epoch::MAX, 0, 10, None, false).unwrap(),
                v.quality(Epoch::MAX, 0, 10, None, true).unwrap(),
                v.quality(Epoch::MAX, 5, 6, Some(2), false).unwrap(),
            )
        };
        let before = reads(&view);
        assert_eq!((before.0.len(), before.1.len(), before.2.len()), (2, 2, 3));
        // The dataflow forgets hour 5 at epoch 2: a lone retraction of each key.
        epoch(
            2,
            vec![((5, 1), None), ((5, 2), None)],
            vec![
                ((5, 1, Outcome::Valid), None),
                ((5, 2, Outcome::Valid), None),
                ((5, 2, rej), None),
            ],
        );
        {
            let s = view.shards[0].read().unwrap();
            assert!(s.frozen.is_empty(), "epoch 2 is not behind the horizon yet");
            assert_eq!(s.forgotten.get(&5), Some(&2));
        }
        assert_eq!(
            reads(&view),
            before,
            "a retraction of a forgotten key changes no answer"
        );
        // Once the horizon (KEEP_FOR ago, at least KEEP_EPOCHS back) has passed epoch 2.
        view.horizon.store(3, Ordering::Release);
        epoch(3, Vec::new(), Vec::new());
        {
            let s = view.shards[0].read().unwrap();
            assert_eq!(s.frozen.keys().copied().collect::<Vec<_>>(), vec![4, 5]);
            assert_eq!(s.frozen[&4].hourly.len(), 1);
            assert_eq!(s.frozen[&4].span, Some((4 * HOUR_MS, 4 * HOUR_MS + 1)));
            assert_eq!(s.hourly.len(), 1, "hour 6 is left in the tree");
            assert!(s.quality.keys().all(|k| k.0 == 6) && s.quality_hours.keys().all(|k| k.0 == 6));
            let f = &s.frozen[&5];
            assert_eq!((f.hourly.len(), f.quality.len(), f.quality_hours.len()), (2, 3, 2));
            assert_eq!(f.span, Some((5 * HOUR_MS, 5 * HOUR_MS + 10)));
        }
        assert_eq!(reads(&view), before, "a frozen hour reads as it did");
        // A change of a frozen hour (a replay without ingest times) goes into it.
        epoch(
            100,
            vec![((5, 3), Some(figures(7, 5 * HOUR_MS - 1)))],
            vec![((5, 3, Outcome::Valid), Some(7)), ((5, 2, Outcome::Valid), Some(4))],
        );
        assert_eq!(view.fleet_hour(Epoch::MAX, 5).unwrap().len(), 3);
        assert_eq!(
            view.spans(Epoch::MAX, 5, 6).unwrap()[&5],
            (5 * HOUR_MS - 1, 5 * HOUR_MS + 10)
        );
        let (all, _) = view.quality(Epoch::MAX, 5, 6, None, false).unwrap();
        assert_eq!((all[&Outcome::Valid], all[&rej]), (2 + 4 + 7, 1));
        let (all, by) = view.quality(Epoch::MAX, 5, 6, None, true).unwrap();
        assert_eq!((all[&Outcome::Valid], by[&2][&Outcome::Valid]), (13, 4));
        // Hours more than keep_hours behind the newest leave, frozen or not.
        epoch(101, Vec::new(), Vec::new());
        let far = LiveView::new(1, 2);
        far.shards[0].write().unwrap().frozen.insert(5, Frozen::default());
        far.shards[0]
            .write()
            .unwrap()
            .apply_watermark(1, Some(10 * HOUR_MS), 0, 2);
        assert!(far.shards[0].read().unwrap().frozen.is_empty());
    }
}
