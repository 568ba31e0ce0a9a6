//! The dataflow: validate → route by hour → dedup and pre-aggregate → differential
//! collections of hourly statistics and quality counts → hour sealing.
//!
//! A record's bytes stay on the worker that read it: a reading crosses to its (device, hour)'s
//! worker without them, and only a duplicate's bytes are fetched back, for its rejection.
//!
//! Timely time is a coarse [`Epoch`] chosen by the driver (a batch of a replay, a few
//! hundred milliseconds live); event time stays in the data. Only the driver advances
//! epochs; everything here is deterministic given which records land in which epoch.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use differential_dataflow::collection::AsCollection;
use differential_dataflow::difference::Semigroup;
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::Capability;
use timely::dataflow::{Scope, Stream};

use crate::keep::{HourReadings, KeptReadings};
use crate::model::{Bytes, DeviceHour, DeviceLatest, PayloadAt, RawRecord, Reading, SourcePos};
use crate::rules::{validate_keeping, Outcome, Rejection, RuleConfig};
use crate::stats::HourStats;
use crate::time::HOUR_MS;

/// Timely time: a coarse, driver-chosen batch number.
pub type Epoch = u64;

/// A fast, deterministic hasher for small integer keys (the std SipHash is ~5x slower here).
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);
impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(*b as u64);
        }
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64)
    }
    #[inline]
    fn write_i64(&mut self, i: i64) {
        self.write_u64(i as u64)
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64)
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}
/// A `HashMap` with [`FxHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// A hash map whose entries sit in a vector, in the order they were inserted, with only
/// their indexes in the hash table. With many large entries (100,000 devices' [`HourStats`],
/// 320 bytes each) the table stays small enough for the caches, new entries are written one
/// after another instead of at random places of a table of tens of megabytes, and draining
/// reads them in order: there, memory, not instructions, was the cost of the stages that
/// keep such maps.
#[derive(Clone, Debug)]
pub struct IndexedMap<K, V> {
    index: FastMap<K, u32>,
    entries: Vec<(K, V)>,
}

impl<K, V> Default for IndexedMap<K, V> {
    fn default() -> Self {
        IndexedMap {
            index: FastMap::default(),
            entries: Vec::new(),
        }
    }
}

impl<K: Clone + Eq + std::hash::Hash, V> IndexedMap<K, V> {
    /// The value of `k`, inserted from `new` if there is none; and whether it was inserted.
    #[inline]
    pub fn get_or_insert_with(&mut self, k: K, new: impl FnOnce() -> V) -> (&mut V, bool) {
        match self.index.entry(k) {
            std::collections::hash_map::Entry::Occupied(e) => (&mut self.entries[*e.get() as usize].1, false),
            std::collections::hash_map::Entry::Vacant(e) => {
                let k = e.key().clone();
                e.insert(self.entries.len() as u32);
                self.entries.push((k, new()));
                (&mut self.entries.last_mut().expect("just pushed").1, true)
            }
        }
    }

    /// Sets the value of `k`.
    #[inline]
    pub fn insert(&mut self, k: K, v: V) {
        let mut v = Some(v);
        let (slot, inserted) = self.get_or_insert_with(k, || v.take().expect("taken once"));
        if !inserted {
            *slot = v.take().expect("not taken");
        }
    }

    /// The value of `k`.
    #[inline]
    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let i = *self.index.get(k)? as usize;
        Some(&mut self.entries[i].1)
    }

    /// Removes `k` (the last entry takes its place).
    pub fn remove(&mut self, k: &K) -> Option<V> {
        let i = self.index.remove(k)? as usize;
        let (_, v) = self.entries.swap_remove(i);
        if let Some((moved, _)) = self.entries.get(i) {
            *self.index.get_mut(moved).expect("every entry is indexed") = i as u32;
        }
        Some(v)
    }

    /// The entries, in insertion order (as long as none was removed).
    pub fn iter(&self) -> std::slice::Iter<'_, (K, V)> {
        self.entries.iter()
    }

    /// Removes every entry, handing them over in insertion order.
    pub fn drain(&mut self) -> std::vec::Drain<'_, (K, V)> {
        self.index.clear();
        self.entries.drain(..)
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Which worker owns an hour's aggregate tables (`hourly`, `quality`) in the lake.
#[inline]
pub fn route_hour(hour: i64) -> u64 {
    (hour as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32
}

/// The worker of `peers` that owns `hour` (its tables, sealed and written there): where
/// timely's exchange sends [`route_hour`]'s value (a mask for a power of two of workers,
/// the remainder otherwise; the two agree).
pub fn hour_owner(hour: i64, peers: usize) -> usize {
    (route_hour(hour) % peers.max(1) as u64) as usize
}

/// Which worker deduplicates and pre-aggregates a (device, hour): every reading of a key
/// meets every other there, and a replay's hour spreads over all workers.
#[inline]
pub fn route_device_hour(device: u32, hour: i64) -> u64 {
    ((hour as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (device as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)) >> 32
}

/// Dataflow parameters beyond the rules.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowConfig {
    /// The quality rules.
    pub rules: RuleConfig,
    /// An hour is sealed once the event-time watermark passes its end plus this grace (ms).
    pub grace_ms: i64,
    /// Set when resuming after a crash: the first epochs replay records whose outputs the
    /// lake already holds.
    pub recovery: Option<Recovery>,
    /// The `hourly` and `quality` collections forget an hour's keys (retract them) once the
    /// event-time watermark is this far past the hour's end, so the arrangements behind
    /// them hold a bounded window and memory stays flat over months; never before the hour's
    /// state is dropped (`max_age` + `grace` + an hour past its end). Only for inputs whose
    /// records all carry an ingest time (a record without one can reopen a forgotten hour,
    /// whose tables would then hold only its own statistics). `None` keeps every hour, as a
    /// bounded replay of files does.
    pub forget_after_ms: Option<i64>,
    /// The sealing stage packs an open hour's readings once it holds four chunks of them at
    /// a worker (~24 instead of 88 bytes a reading, ~180 ns each to pack): a live engine's
    /// largest item. A replay of files, whose hours are held only while it reads them as
    /// fast as it can, keeps them unpacked.
    pub pack_open_hours: bool,
    /// The most readings a worker holds of an hour that is not sealed yet: once it holds
    /// this many, the sealing stage writes them as a part of the hour ([`BatchKind::Open`])
    /// and goes on holding the next ones. An hour of a large fleet then costs its worker this
    /// many readings of memory, not the whole hour. `None` holds every hour whole until its
    /// seal (one part per worker and hour).
    pub max_open_rows: Option<usize>,
}

impl FlowConfig {
    /// The number of recovery epochs (0 when not resuming).
    pub fn recovery_epochs(&self) -> Epoch {
        self.recovery.as_ref().map_or(0, |r| r.epochs)
    }
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            rules: RuleConfig::default(),
            grace_ms: 5 * 60 * 1000,
            recovery: None,
            forget_after_ms: None,
            pack_open_hours: false,
            max_open_rows: None,
        }
    }
}

/// Resuming from a checkpoint. At the checkpoint the event-time watermark was `watermark`;
/// every hour it had sealed has its files, which hold all the records read by then. The
/// restarted run re-reads, in its epochs `0..epochs`, every record read before the
/// checkpoint that an hour from `oldest` on can need (from [`Recovery::reread_from_ms`]
/// on), then goes on with new records.
///
/// During those epochs the sealing stage rebuilds the state of the sealed hours without
/// writing it again: their readings and rejections are dropped (the files hold them) and
/// their aggregates are kept but not marked changed. Hours still open at the checkpoint are
/// built as on the first run. Afterwards a late change to a sealed hour writes it as usual.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Epochs before this one replay records read before the checkpoint.
    pub epochs: Epoch,
    /// The event-time watermark at the checkpoint (ms).
    pub watermark: i64,
    /// The oldest hour the checkpoint still tracks: one the sealing stage held, or one a
    /// partition that lagged behind the others could still bring readings for (which
    /// reopens it after its state was dropped). Older hours cannot change any more.
    pub oldest: i64,
    /// The part number at which each (hour, worker) of a sealed hour goes on (its number of
    /// parts at the checkpoint, those written while the hour was open included). Parts the crashed run wrote after the
    /// checkpoint are numbered from there on; the restart deletes them before it writes (see
    /// docs/RECOVERY.md).
    pub next_seq: BTreeMap<(i64, usize), u32>,
}

impl Recovery {
    /// The oldest hour whose state the sealing stage still held at the checkpoint.
    pub fn oldest_kept_hour(watermark: i64, cfg: &FlowConfig) -> i64 {
        // An hour is dropped once `watermark > (hour + 2) h + grace + max_age`.
        watermark
            .saturating_sub(cfg.grace_ms + cfg.rules.max_age_ms + 1)
            .div_euclid(HOUR_MS)
            - 1
    }

    /// The oldest hour a record ingested at `ingest_ms` or later can still bring an
    /// acceptable reading for (the stale rule takes event times down to `ingest - max_age`),
    /// with `max_future` to spare for records not quite in ingest order.
    pub fn oldest_reopenable_hour(ingest_ms: i64, cfg: &FlowConfig) -> i64 {
        ingest_ms
            .saturating_sub(cfg.rules.max_age_ms + cfg.rules.max_future_ms)
            .div_euclid(HOUR_MS)
    }

    /// The ingest time from which records must be re-read: every record counted in an hour
    /// from `oldest` on, and every reading such a record can be a duplicate of. A rejection
    /// is counted in the hour it arrived in; a reading of an hour `h`, or one that a record
    /// arriving in `h` duplicates (an event time at most `max_age` before `h`), arrived at
    /// most `max_future` before its event time.
    pub fn reread_from_ms(&self, cfg: &FlowConfig) -> i64 {
        self.oldest
            .saturating_mul(HOUR_MS)
            .saturating_sub(cfg.rules.max_age_ms + cfg.rules.max_future_ms)
    }

    /// Whether the hour had been sealed at the checkpoint: the watermark had passed it, or
    /// it had written parts by then (the end of the input seals every hour, the watermark
    /// notwithstanding). `next_seq` counts only the parts of sealed hours: an open hour's
    /// parts ([`BatchKind::Open`]) are not in it, and the restart deletes them and builds
    /// the hour again from the records it re-reads.
    pub fn sealed(&self, hour: i64, grace_ms: i64) -> bool {
        self.watermark >= (hour + 1) * HOUR_MS + grace_ms
            || self.next_seq.range((hour, 0)..=(hour, usize::MAX)).next().is_some()
    }
}

/// What a batch is in its hour's life at a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchKind {
    /// Written before the hour is sealed, once the worker held
    /// [`FlowConfig::max_open_rows`] of its readings: those readings and nothing else. The
    /// hour's rejections and tables come with its seal, and its manifest lists the part
    /// from then on.
    Open,
    /// The batch that seals the hour: the watermark passed its end plus the grace, or the
    /// input ended.
    Seal,
    /// A change after the seal (late data), or of an hour reopened after its state was
    /// dropped, or of an hour a resumed run found sealed at its checkpoint.
    Late,
}

/// Everything one hour's files need when it is sealed, or when late data changes it, or a
/// part of its readings while it is open.
#[derive(Clone, Debug, PartialEq)]
pub struct HourBatch {
    /// Hour index since the epoch.
    pub hour: i64,
    /// The worker's batches of the hour are numbered 0, 1, 2, …: its open parts, then the
    /// seal, then each later change.
    pub seq: u32,
    /// Open part, seal or later change.
    pub kind: BatchKind,
    /// The worker that wrote the batch: appended tables get one part per worker.
    pub worker: usize,
    /// The hour was reopened after its state was dropped (data later than the retention):
    /// `hourly` and `quality` hold only the keys that changed, to merge into the files.
    pub partial: bool,
    /// Readings accepted at this worker since its previous batch of this hour, ordered by
    /// device, time, source position.
    pub readings: HourReadings,
    /// Rejections made at this worker and counted in this hour since its previous batch,
    /// ordered by device, rule.
    pub rejections: Vec<Rejection>,
    /// At the hour's owner: its full current aggregates by device, when changed since the
    /// previous batch.
    pub hourly: Option<Vec<(u32, HourStats)>>,
    /// The hour's full current quality counts by (device, outcome), when changed.
    pub quality: Option<Vec<((u32, Outcome), i64)>>,
}

impl HourBatch {
    /// An empty first seal of `hour` by `worker`, for tools and tests to fill in.
    pub fn seal(hour: i64, worker: usize) -> HourBatch {
        HourBatch {
            hour,
            seq: 0,
            kind: BatchKind::Seal,
            worker,
            partial: false,
            readings: Default::default(),
            rejections: Vec::new(),
            hourly: None,
            quality: None,
        }
    }
}

/// The streams and collections a built dataflow exposes.
pub struct Outputs<'scope> {
    /// Accepted readings, at the worker that owns their (device, hour).
    pub readings: Stream<'scope, Epoch, Vec<Reading>>,
    /// Every rejection, by any rule.
    pub rejections: Stream<'scope, Epoch, Vec<Rejection>>,
    /// The current hourly aggregates: one `((device, hour), stats)` record per key.
    pub hourly: VecCollection<'scope, Epoch, (DeviceHour, HourStats), isize>,
    /// The current quality counts: one `((device, hour, outcome), count)` record per key.
    pub quality: VecCollection<'scope, Epoch, ((u32, i64, Outcome), isize), isize>,
    /// Each worker's largest accepted event time per epoch, sent to every worker.
    pub watermarks: Stream<'scope, Epoch, Vec<i64>>,
    /// Per epoch and worker, each device's newest accepted reading and count (live status).
    pub latest: Stream<'scope, Epoch, Vec<DeviceLatest>>,
    grace_ms: i64,
    max_age_ms: i64,
    recovery: Option<Recovery>,
    pack_open_hours: bool,
    max_open_rows: Option<usize>,
}

impl<'scope> Outputs<'scope> {
    /// Hours ready for the lake: each worker's readings and rejections, and at the hour's
    /// owner its tables. Built only when asked for (a sink needs it; the aggregates do not).
    pub fn sealed(&self) -> Stream<'scope, Epoch, Vec<HourBatch>> {
        seal(
            self.readings.clone(),
            self.rejections.clone(),
            additions(self.hourly.clone().inner),
            additions(self.quality.clone().inner),
            self.watermarks.clone(),
            Hours {
                recovery: self.recovery.clone(),
                grace_ms: self.grace_ms,
                max_age_ms: self.max_age_ms,
                worker: self.readings.scope().index(),
                pack: self.pack_open_hours,
                max_open_rows: self.max_open_rows.unwrap_or(usize::MAX).max(1),
            },
        )
    }
}

type Quality = ((u32, i64, Outcome), Epoch, isize);
/// Messages' containers waiting for their epoch to complete.
type ByEpoch<D> = BTreeMap<Epoch, Vec<Vec<D>>>;
/// A quality count as a record of the `quality` collection.
type QualityCount = ((u32, i64, Outcome), isize);
/// An update of the `hourly` collection.
type HourlyUpdate = ((DeviceHour, HourStats), Epoch, isize);
/// An update of the `quality` collection.
type QualityUpdate = (QualityCount, Epoch, isize);

/// Builds the dataflow over a stream of raw records.
pub fn build<'scope>(raw: Stream<'scope, Epoch, Vec<RawRecord>>, cfg: &FlowConfig) -> Outputs<'scope> {
    let scope = raw.scope();
    let rules = cfg.rules.clone();
    let (ok, bad, payloads) = validate_stage(raw, rules);

    let retention = cfg.rules.max_age_ms + HOUR_MS;
    let (readings, losers, hourly_updates, valid_counts, watermarks, latest) = dedup(scope, ok, retention);
    let dups = duplicates(payloads, losers);
    let watermarks = watermarks.broadcast();

    let rejections = concat(bad, dups);
    let reject_counts = count_rejections(rejections.clone());

    let quality_updates = concat(valid_counts, reject_counts);
    // Not before the sealing operator has dropped the hour (see `seal`).
    let after = cfg
        .forget_after_ms
        .map(|after| after.max(HOUR_MS + cfg.grace_ms + cfg.rules.max_age_ms));
    fn forget<'scope, K>(
        after: Option<i64>,
        watermarks: &Stream<'scope, Epoch, Vec<i64>>,
        hour_of: fn(&K) -> i64,
    ) -> Option<Forget<'scope, K>> {
        after.map(|after_ms| Forget {
            watermarks: watermarks.clone(),
            hour_of,
            after_ms,
        })
    }
    // A (device, hour)'s aggregate updates all come from the worker that deduplicates it
    // (`dedup` routes readings by `route_device_hour`): they are where their totals are
    // kept, with no exchange. Quality counts of rejections come from every worker, and are
    // routed the same way.
    let hourly = totals(
        hourly_updates,
        Pipeline,
        forget(after, &watermarks, |k: &DeviceHour| k.1),
        "HourlyTotals",
    );
    let quality = totals(
        quality_updates,
        Exchange::new(|u: &Quality| route_device_hour((u.0).0, (u.0).1)),
        forget(after, &watermarks, |k: &(u32, i64, Outcome)| k.1),
        "QualityTotals",
    );

    Outputs {
        readings,
        rejections,
        hourly,
        quality,
        watermarks,
        latest,
        grace_ms: cfg.grace_ms,
        max_age_ms: cfg.rules.max_age_ms,
        recovery: cfg.recovery.clone(),
        pack_open_hours: cfg.pack_open_hours,
        max_open_rows: cfg.max_open_rows,
    }
}

fn concat<'scope, D: Clone + 'static>(
    a: Stream<'scope, Epoch, Vec<D>>,
    b: Stream<'scope, Epoch, Vec<D>>,
) -> Stream<'scope, Epoch, Vec<D>> {
    use timely::dataflow::operators::Concat;
    a.concat(b)
}

/// When a collection forgets an hour: once the event-time watermark is more than
/// `after_ms` past the hour's end. `hour_of` gives a key's hour.
pub struct Forget<'scope, K> {
    /// Each worker's largest accepted event time per epoch, from every worker.
    pub watermarks: Stream<'scope, Epoch, Vec<i64>>,
    /// A key's hour.
    pub hour_of: fn(&K) -> i64,
    /// How far past an hour's end the watermark must be.
    pub after_ms: i64,
}

/// The collection of each key's accumulated difference, `((key, total), 1)`: what
/// differential's `count_total` makes of `updates`, for epochs (a total order), without an
/// arrangement. `pact` must bring all updates of a key to one worker, where its total is
/// kept in a hash map. Once an epoch is complete at the input, its updates are summed per key
/// and each key whose sum is not zero changes its total: the old total goes out with −1
/// (unless zero), the new one with +1 (unless zero, and then the key is forgotten), at that
/// epoch. These are exactly `count_total`'s output updates: the totals are sums of the same
/// differences, and `Semigroup::plus_equals` of [`HourStats`] and of counts is associative
/// and commutative to the bit. Only the order of a message's updates differs, which no
/// reader depends on. (A key whose total returns to zero is forgotten, so a later update
/// starts it afresh; `count_total` did so only once its trace had compacted the two.)
///
/// With `forget`, once an epoch moves the watermark more than `after_ms` past an hour's
/// end, every total of that hour is taken back (−1) and forgotten, at the next epoch: the
/// collection then holds an hour's keys only while the hour can change or be asked for,
/// and this operator's memory is bounded by the hours in that window. (At the next epoch:
/// the hour's last update, at this one, must reach the sealing operator, which drops the
/// hour at the same point.) Updates for an hour already forgotten (a reopened hour) start
/// a total that is forgotten again at the next epoch: the collection then held only their
/// own statistics, so forgetting is for inputs whose readings all carry an ingest time,
/// which can never reopen an hour.
///
/// `count_total` arranged every update: with a fleet much larger than an epoch's readings
/// (100,000 devices), nearly every reading is one update of its own (320 bytes of
/// [`HourStats`]), which the arrangement's batcher and spine copied and merged a dozen
/// times; that was most of the work. Here an update is summed into its total in place. (A
/// separate forgetting stage used to keep a second copy of every total.)
fn totals<'scope, K, R, P>(
    updates: Stream<'scope, Epoch, Vec<(K, Epoch, R)>>,
    pact: P,
    forget: Option<Forget<'scope, K>>,
    name: &str,
) -> VecCollection<'scope, Epoch, (K, R), isize>
where
    K: differential_dataflow::ExchangeData + std::hash::Hash,
    R: differential_dataflow::ExchangeData + Semigroup,
    P: timely::dataflow::channels::pact::ParallelizationContract<Epoch, Vec<(K, Epoch, R)>>,
{
    let scope = updates.scope();
    let mut builder = OperatorBuilder::new(name.to_owned(), scope);
    let mut input = builder.new_input(updates, pact);
    let (mut i_wm, hour_of, after_ms) = match forget {
        Some(f) => (Some(builder.new_input(f.watermarks, Pipeline)), f.hour_of, f.after_ms),
        None => (None, (|_: &K| 0) as fn(&K) -> i64, 0),
    };
    let (o_out, s_out) = builder.new_output::<Vec<((K, R), Epoch, isize)>>();
    let mut o_out = OutputBuilder::from(o_out);
    builder.build(move |caps| {
        let mut caps: Vec<Capability<Epoch>> = caps;
        // Each epoch's updates as the containers they came in (an update of a later epoch
        // than its message's is filed under its own).
        let mut stash: ByEpoch<(K, Epoch, R)> = BTreeMap::new();
        let mut totals: IndexedMap<K, R> = IndexedMap::default();
        // Per epoch: where each key's first update is, and those places in arrival order.
        let mut first: FastMap<K, (u32, u32)> = FastMap::default();
        let mut order: Vec<(u32, u32)> = Vec::new();
        // Forgetting: each epoch's watermark until the epoch is complete, the watermark so
        // far, and the keys that got a total, by hour (a key may be listed twice).
        let mut pending_wm: BTreeMap<Epoch, i64> = BTreeMap::new();
        let mut watermark = i64::MIN;
        let mut by_hour: BTreeMap<i64, Vec<K>> = BTreeMap::new();
        move |frontiers| {
            input.for_each_stamp(|cap, data| {
                let t = epoch_of(&cap);
                for batch in data {
                    if batch.iter().all(|u| u.1 == t) {
                        stash.entry(t).or_default().push(std::mem::take(batch));
                    } else {
                        for u in batch.drain(..) {
                            stash.entry(u.1).or_default().push(vec![u]);
                        }
                    }
                }
            });
            if let Some(i_wm) = i_wm.as_mut() {
                i_wm.for_each_stamp(|cap, data| {
                    let w = pending_wm.entry(epoch_of(&cap)).or_insert(i64::MIN);
                    data.for_each(|b| *w = b.iter().copied().fold(*w, i64::max));
                });
            }
            let frontier = joined_frontier(frontiers);
            let mut out = o_out.activate();
            loop {
                let t = match (stash.keys().next(), pending_wm.keys().next()) {
                    (Some(a), Some(b)) => *a.min(b),
                    (Some(a), None) | (None, Some(a)) => *a,
                    (None, None) => break,
                };
                if frontier.less_equal(&t) {
                    break;
                }
                let mut batches = stash.remove(&t).unwrap_or_default();
                // Sum each key's updates of the epoch into its first one.
                first.clear();
                order.clear();
                for b in 0..batches.len() {
                    for i in 0..batches[b].len() {
                        match first.entry(batches[b][i].0.clone()) {
                            std::collections::hash_map::Entry::Vacant(e) => {
                                e.insert((b as u32, i as u32));
                                order.push((b as u32, i as u32));
                            }
                            std::collections::hash_map::Entry::Occupied(e) => {
                                let (fb, fi) = *e.get();
                                let r = batches[b][i].2.clone();
                                batches[fb as usize][fi as usize].2.plus_equals(&r);
                            }
                        }
                    }
                }
                let cap = caps[0].delayed(&t);
                let mut session = out.session(&cap);
                for &(b, i) in order.iter() {
                    let (k, _, d) = &batches[b as usize][i as usize];
                    if d.is_zero() {
                        continue;
                    }
                    match totals.get_mut(k) {
                        Some(total) => {
                            session.give(((k.clone(), total.clone()), t, -1));
                            total.plus_equals(d);
                            if total.is_zero() {
                                totals.remove(k);
                            } else {
                                session.give(((k.clone(), total.clone()), t, 1));
                            }
                        }
                        None => {
                            totals.insert(k.clone(), d.clone());
                            session.give(((k.clone(), d.clone()), t, 1));
                            if i_wm.is_some() {
                                by_hour.entry(hour_of(k)).or_default().push(k.clone());
                            }
                        }
                    }
                }
                drop(session);
                if let Some(w) = pending_wm.remove(&t) {
                    watermark = watermark.max(w);
                }
                let limit = watermark.saturating_sub(after_ms);
                while let Some(e) = by_hour.first_entry() {
                    if (*e.key() + 1) * HOUR_MS >= limit {
                        break;
                    }
                    let at = t + 1;
                    let cap = caps[0].delayed(&at);
                    let mut session = out.session(&cap);
                    for k in e.remove() {
                        if let Some(total) = totals.remove(&k) {
                            session.give(((k, total), at, -1));
                        }
                    }
                }
            }
            match frontier.iter().min() {
                Some(f) => caps.iter_mut().for_each(|c| c.downgrade(f)),
                None => caps.clear(),
            }
        }
    });
    s_out.as_collection()
}

/// A collection's additions: its new values, without the retractions of the old ones. The
/// sealing stage keeps only new values, and they cross an exchange to the hour's owner: a
/// retraction is as large as a value (336 bytes of `HourStats`), so dropping them where they
/// are made halves what moves.
fn additions<'scope, D: Clone + 'static>(
    updates: Stream<'scope, Epoch, Vec<(D, Epoch, isize)>>,
) -> Stream<'scope, Epoch, Vec<(D, Epoch, isize)>> {
    use timely::dataflow::operators::generic::Operator;
    updates.unary(Pipeline, "Additions", |_, _| {
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let mut session = output.session(&cap);
                for batch in data {
                    batch.retain(|u| u.2 > 0);
                    if !batch.is_empty() {
                        session.give_container(batch);
                    }
                }
            });
        }
    })
}

/// Per-epoch counts of rejections by (device, hour, rule), pre-aggregated per worker.
fn count_rejections<'scope>(rejections: Stream<'scope, Epoch, Vec<Rejection>>) -> Stream<'scope, Epoch, Vec<Quality>> {
    use timely::dataflow::operators::generic::Operator;
    rejections.unary(Pipeline, "CountRejections", |_, _| {
        let mut counts: FastMap<(u32, i64, Outcome), isize> = FastMap::default();
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let t = epoch_of(&cap);
                for batch in data {
                    for r in batch.iter() {
                        *counts
                            .entry((r.device, r.hour(), Outcome::Rejected(r.rule)))
                            .or_default() += 1;
                    }
                }
                if let Some(c) = cap.retain_least(output.output_index()) {
                    output.session(&c).give_iterator(counts.drain().map(|(k, n)| (k, t, n)));
                }
            });
        }
    })
}

/// An accepted reading's payload, kept on the worker that validated it, at its slot.
type KeptPayload = (u32, Bytes);
/// A duplicate (routed back to the worker that keeps its payload) and the source position of
/// the reading accepted in its place.
type Loser = (Reading, SourcePos);

type ValidateStreams<'scope> = (
    Stream<'scope, Epoch, Vec<Reading>>,
    Stream<'scope, Epoch, Vec<Rejection>>,
    Stream<'scope, Epoch, Vec<KeptPayload>>,
);

/// Applies the stateless rules where the records were read. Rejections carry their bytes;
/// an accepted reading leaves its bytes here, on the third stream (never exchanged), and
/// carries only where they are ([`PayloadAt`]): most readings cross to another worker, and
/// moving and freeing their bytes there cost more than the rules.
fn validate_stage<'scope>(raw: Stream<'scope, Epoch, Vec<RawRecord>>, rules: RuleConfig) -> ValidateStreams<'scope> {
    let scope = raw.scope();
    let worker = scope.index() as u32;
    let mut builder = OperatorBuilder::new("Validate".to_owned(), scope);
    let mut input = builder.new_input(raw, Pipeline);
    let (o_ok, s_ok) = builder.new_output::<Vec<Reading>>();
    let (o_bad, s_bad) = builder.new_output::<Vec<Rejection>>();
    let (o_kept, s_kept) = builder.new_output::<Vec<KeptPayload>>();
    let (mut o_ok, mut o_bad, mut o_kept) = (
        OutputBuilder::from(o_ok),
        OutputBuilder::from(o_bad),
        OutputBuilder::from(o_kept),
    );
    builder.build(move |_| {
        // The next slot of each epoch still open at the input.
        let mut slots: BTreeMap<Epoch, u32> = BTreeMap::new();
        move |frontiers| {
            let (mut h_ok, mut h_bad, mut h_kept) = (o_ok.activate(), o_bad.activate(), o_kept.activate());
            input.for_each_stamp(|cap, data| {
                let t = epoch_of(&cap);
                let slot = slots.entry(t).or_default();
                let (c_ok, c_bad, c_kept) = (cap.delayed(&t, 0), cap.delayed(&t, 1), cap.delayed(&t, 2));
                let (mut ok, mut bad, mut kept) = (h_ok.session(&c_ok), h_bad.session(&c_bad), h_kept.session(&c_kept));
                for batch in data {
                    for raw in batch.drain(..) {
                        match validate_keeping(raw, &rules) {
                            Ok((mut r, payload)) => {
                                r.payload_at = PayloadAt { worker, slot: *slot };
                                kept.give((*slot, payload));
                                *slot += 1;
                                ok.give(r);
                            }
                            Err(rejection) => bad.give(rejection),
                        }
                    }
                }
            });
            let frontier = frontiers[0].frontier();
            slots.retain(|t, _| frontier.less_equal(t));
        }
    });
    (s_ok, s_bad, s_kept)
}

/// Builds the rejections of duplicates where their payloads were kept: an epoch's payloads
/// wait here until the duplicate rule has passed the epoch at every worker, then the
/// duplicates' bytes go into their rejections and the rest are dropped.
fn duplicates<'scope>(
    kept: Stream<'scope, Epoch, Vec<KeptPayload>>,
    losers: Stream<'scope, Epoch, Vec<Loser>>,
) -> Stream<'scope, Epoch, Vec<Rejection>> {
    let scope = kept.scope();
    let mut builder = OperatorBuilder::new("Duplicates".to_owned(), scope);
    let mut i_kept = builder.new_input(kept, Pipeline);
    let mut i_losers = builder.new_input(losers, Exchange::new(|(r, _): &Loser| r.payload_at.worker as u64));
    let (o_rej, s_rej) = builder.new_output::<Vec<Rejection>>();
    let mut o_rej = OutputBuilder::from(o_rej);
    builder.build(move |caps| {
        let mut caps: Vec<Capability<Epoch>> = caps;
        let mut payloads: BTreeMap<Epoch, Vec<Bytes>> = BTreeMap::new();
        let mut pending: BTreeMap<Epoch, Vec<Loser>> = BTreeMap::new();
        // The slots of the last epoch: the next one is sized for as many at once.
        let mut last_slots = 0;
        move |frontiers| {
            i_kept.for_each_stamp(|cap, data| {
                let slots = payloads
                    .entry(epoch_of(&cap))
                    .or_insert_with(|| Vec::with_capacity(last_slots));
                for batch in data {
                    for (slot, payload) in batch.drain(..) {
                        let slot = slot as usize;
                        if slot >= slots.len() {
                            slots.resize_with(slot + 1, Default::default);
                        }
                        slots[slot] = payload;
                    }
                }
            });
            i_losers.for_each_stamp(|cap, data| {
                let v = pending.entry(epoch_of(&cap)).or_default();
                data.for_each(|b| v.append(b));
            });
            let frontier = joined_frontier(frontiers);
            let done = |t: &Epoch| !frontier.less_equal(t);
            let mut out = o_rej.activate();
            for (t, losers) in split_done(&mut pending, done) {
                let mut slots = payloads.get_mut(&t);
                let cap = caps[0].delayed(&t);
                let mut session = out.session(&cap);
                for (r, first) in losers {
                    // Timely delivers an epoch's payloads (same worker) before the frontier
                    // of their losers passes it.
                    let payload = slots
                        .as_deref_mut()
                        .and_then(|s| s.get_mut(r.payload_at.slot as usize))
                        .map(std::mem::take)
                        .expect("a duplicate's payload is kept on the worker that read it");
                    session.give(Rejection::duplicate(&r, Vec::from(payload), first));
                }
            }
            // The payloads of finished epochs, freed here on the worker that read them.
            for (_, slots) in split_done(&mut payloads, done) {
                last_slots = slots.len();
            }
            match frontier.iter().min() {
                Some(f) => caps.iter_mut().for_each(|c| c.downgrade(f)),
                None => caps.clear(),
            }
        }
    });
    s_rej
}

type DedupStreams<'scope> = (
    Stream<'scope, Epoch, Vec<Reading>>,
    Stream<'scope, Epoch, Vec<Loser>>,
    Stream<'scope, Epoch, Vec<(DeviceHour, Epoch, HourStats)>>,
    Stream<'scope, Epoch, Vec<Quality>>,
    Stream<'scope, Epoch, Vec<i64>>,
    Stream<'scope, Epoch, Vec<DeviceLatest>>,
);

/// Routes readings to their hour's worker, applies the duplicate rule epoch by epoch (the
/// first reading of a (device, time) by epoch then source position wins, at any worker
/// count), and pre-aggregates each epoch's survivors into one update per (device, hour).
fn dedup<'scope>(
    scope: Scope<'scope, Epoch>,
    ok: Stream<'scope, Epoch, Vec<Reading>>,
    retention_ms: i64,
) -> DedupStreams<'scope> {
    let mut builder = OperatorBuilder::new("Dedup".to_owned(), scope);
    let mut input = builder.new_input(ok, Exchange::new(|r: &Reading| route_device_hour(r.device, r.hour())));
    let (o_read, s_read) = builder.new_output::<Vec<Reading>>();
    let (o_dup, s_dup) = builder.new_output::<Vec<Loser>>();
    let (o_stats, s_stats) = builder.new_output::<Vec<(DeviceHour, Epoch, HourStats)>>();
    let (o_valid, s_valid) = builder.new_output::<Vec<Quality>>();
    let (o_wm, s_wm) = builder.new_output::<Vec<i64>>();
    let (o_latest, s_latest) = builder.new_output::<Vec<DeviceLatest>>();
    let mut o_read = OutputBuilder::from(o_read);
    let mut o_dup = OutputBuilder::from(o_dup);
    let mut o_stats = OutputBuilder::from(o_stats);
    let mut o_valid = OutputBuilder::from(o_valid);
    let mut o_wm = OutputBuilder::from(o_wm);
    let mut o_latest = OutputBuilder::from(o_latest);

    builder.build(move |caps| {
        let mut caps: Vec<Capability<Epoch>> = caps;
        // Each epoch's input as the batches it came in (moved, never copied into one vector).
        let mut stash: BTreeMap<Epoch, Vec<Vec<Reading>>> = BTreeMap::new();
        let mut deduper = crate::rules::Deduper::new(retention_ms);
        let mut losers: Vec<(Reading, SourcePos)> = Vec::new();
        let mut agg: IndexedMap<DeviceHour, HourStats> = IndexedMap::default();
        let mut latest: IndexedMap<u32, DeviceLatest> = IndexedMap::default();
        move |frontiers| {
            input.for_each_stamp(|cap, data| {
                let bucket = stash.entry(epoch_of(&cap)).or_default();
                bucket.extend(data.map(std::mem::take));
            });
            let frontier = frontiers[0].frontier();
            let (mut h_read, mut h_dup, mut h_stats, mut h_valid, mut h_wm, mut h_latest) = (
                o_read.activate(),
                o_dup.activate(),
                o_stats.activate(),
                o_valid.activate(),
                o_wm.activate(),
                o_latest.activate(),
            );
            while let Some(entry) = stash.first_entry() {
                let t = *entry.key();
                if frontier.less_equal(&t) {
                    break;
                }
                let mut winners = entry.remove();
                deduper.epoch_in_place(&mut winners, &mut losers);
                let mut max_time = i64::MIN;
                for r in winners.iter().flatten() {
                    let (st, new) = agg.get_or_insert_with(r.key(), || HourStats::of(r));
                    if !new {
                        st.add(r);
                    }
                    max_time = max_time.max(r.time_ms);
                    let (l, _) = latest.get_or_insert_with(r.device, || DeviceLatest {
                        device: r.device,
                        time_ms: i64::MIN,
                        is_fail: false,
                        metrics: [0.0; 6],
                        readings: 0,
                    });
                    l.readings += 1;
                    if r.time_ms >= l.time_ms {
                        (l.time_ms, l.is_fail, l.metrics) = (r.time_ms, r.is_fail, r.metrics);
                    }
                }
                let cap_t = |i: usize| caps[i].delayed(&t);
                if !losers.is_empty() {
                    h_dup.session(&cap_t(1)).give_iterator(losers.drain(..));
                }
                if winners.iter().any(|b| !b.is_empty()) {
                    h_wm.session(&cap_t(4)).give(max_time);
                    h_latest
                        .session(&cap_t(5))
                        .give_iterator(latest.drain().map(|(_, l)| l));
                    // Passed on in the containers they came in (timely's small ones): no
                    // copy, and no large buffer (a fresh multi-megabyte buffer per epoch
                    // costs more in page faults than a copy).
                    let c = cap_t(0);
                    let mut s = h_read.session(&c);
                    for mut b in winners.into_iter().filter(|b| !b.is_empty()) {
                        s.give_container(&mut b);
                    }
                }
                if !agg.is_empty() {
                    let c = cap_t(3);
                    let mut s = h_valid.session(&c);
                    for (k, st) in agg.iter() {
                        s.give(((k.0, k.1, Outcome::Valid), t, st.count as isize));
                    }
                    h_stats
                        .session(&cap_t(2))
                        .give_iterator(agg.drain().map(|(k, st)| (k, t, st)));
                }
            }
            // Hold capabilities only as far back as the input frontier.
            match frontier.iter().min() {
                Some(f) => caps.iter_mut().for_each(|c| c.downgrade(f)),
                None => caps.clear(),
            }
        }
    });
    (s_read, s_dup, s_stats, s_valid, s_wm, s_latest)
}

/// Per-hour state held by the sealing operator.
#[derive(Default)]
struct HourState {
    sealed: bool,
    seq: u32,
    partial: bool,
    readings: KeptReadings,
    rejections: Vec<Rejection>,
    /// Each device's current aggregate (ordered by device when taken).
    hourly: IndexedMap<u32, HourStats>,
    hourly_dirty: bool,
    quality: IndexedMap<(u32, Outcome), i64>,
    quality_dirty: bool,
}

impl HourState {
    fn dirty(&self) -> bool {
        !self.readings.is_empty() || !self.rejections.is_empty() || self.hourly_dirty || self.quality_dirty
    }

    /// The batch that seals the hour or changes it after: what it holds since the last batch.
    fn take_batch(&mut self, hour: i64, worker: usize) -> HourBatch {
        // An hour reopened after its state was dropped, or found sealed by a resumed run,
        // was sealed before.
        let kind = if self.sealed || self.partial {
            BatchKind::Late
        } else {
            BatchKind::Seal
        };
        self.sealed = true;
        let readings = self.readings.take();
        let mut rejections = std::mem::take(&mut self.rejections);
        rejections.sort_by_key(|r| (r.device, r.rule, r.pos));
        let batch = HourBatch {
            hour,
            seq: self.seq,
            kind,
            worker,
            partial: self.partial,
            readings,
            rejections,
            hourly: self.hourly_dirty.then(|| sorted(&self.hourly)),
            quality: self.quality_dirty.then(|| sorted(&self.quality)),
        };
        self.seq += 1;
        self.hourly_dirty = false;
        self.quality_dirty = false;
        batch
    }

    /// A part of the readings of the open hour: all held so far.
    fn take_open(&mut self, hour: i64, worker: usize) -> HourBatch {
        let batch = HourBatch {
            hour,
            seq: self.seq,
            kind: BatchKind::Open,
            worker,
            partial: false,
            readings: self.readings.take(),
            rejections: Vec::new(),
            hourly: None,
            quality: None,
        };
        self.seq += 1;
        batch
    }
}

/// Gathers each hour's readings and rejections where they were made, and its aggregates and
/// quality counts at the hour's owner, and emits [`HourBatch`]es when the event-time
/// watermark (the largest accepted event time so far, over all workers, so every worker
/// decides alike) passes the hour's end plus `grace_ms`, and again whenever late data changes
/// a sealed hour. Before then, a worker that holds `max_open_rows` readings of the open hour
/// emits them as an open part. When the input ends every hour is emitted. An hour's state is dropped once
/// no reading within `max_age_ms` of its ingest time can reach it; if one still does (only
/// records without an ingest time can), the hour is reopened as a partial batch. With a
/// [`Recovery`], its first epochs rebuild the hours sealed before the checkpoint without
/// emitting them again.
#[allow(clippy::too_many_arguments)]
fn seal<'scope>(
    readings: Stream<'scope, Epoch, Vec<Reading>>,
    rejections: Stream<'scope, Epoch, Vec<Rejection>>,
    hourly: Stream<'scope, Epoch, Vec<HourlyUpdate>>,
    quality: Stream<'scope, Epoch, Vec<QualityUpdate>>,
    watermarks: Stream<'scope, Epoch, Vec<i64>>,
    hours_of: Hours,
) -> Stream<'scope, Epoch, Vec<HourBatch>> {
    let scope = readings.scope();
    let mut builder = OperatorBuilder::new("Seal".to_owned(), scope);
    let mut i_read = builder.new_input(readings, Pipeline);
    let mut i_rej = builder.new_input(rejections, Pipeline);
    let mut i_hourly = builder.new_input(hourly, Exchange::new(|u: &HourlyUpdate| route_hour((u.0).0 .1)));
    let mut i_quality = builder.new_input(quality, Exchange::new(|u: &QualityUpdate| route_hour((u.0).0 .1)));
    let mut i_wm = builder.new_input(watermarks, Pipeline);
    let (o_sealed, s_sealed) = builder.new_output::<Vec<HourBatch>>();
    let mut o_sealed = OutputBuilder::from(o_sealed);

    builder.build(move |caps| {
        let mut caps: Vec<Capability<Epoch>> = caps;
        // Updates waiting for their epoch to complete.
        let mut pending_read: BTreeMap<Epoch, Vec<Vec<Reading>>> = BTreeMap::new();
        let mut pending_rej: BTreeMap<Epoch, Vec<Rejection>> = BTreeMap::new();
        // The collections' messages as they came (moved, not copied update by update).
        let mut pending_hourly: ByEpoch<HourlyUpdate> = BTreeMap::new();
        let mut pending_quality: ByEpoch<QualityUpdate> = BTreeMap::new();
        let mut pending_wm: BTreeMap<Epoch, i64> = BTreeMap::new();
        let mut hours: BTreeMap<i64, HourState> = BTreeMap::new();
        // Next batch number of hours whose state was dropped.
        let mut dropped: BTreeMap<i64, u32> = BTreeMap::new();
        let (worker, grace_ms, max_age_ms) = (hours_of.worker, hours_of.grace_ms, hours_of.max_age_ms);
        let mut watermark = i64::MIN;
        move |frontiers| {
            i_read.for_each_stamp(|cap, data| {
                pending_read
                    .entry(epoch_of(&cap))
                    .or_default()
                    .extend(data.map(std::mem::take));
            });
            i_rej.for_each_stamp(|cap, data| {
                let v = pending_rej.entry(epoch_of(&cap)).or_default();
                data.for_each(|b| v.append(b));
            });
            // Only the new value of each key matters: the collection retracts the old one
            // ([`totals`]). A collection's message holds updates of its capability's epoch
            // and of later ones: each update is filed under its own epoch, so an hour's
            // tables go out with the readings of the same epochs (a file sealed at epoch E
            // must not count a reading of E + 1, which a checkpoint of E does not cover).
            i_hourly.for_each_stamp(|cap, data| file_by_epoch(&mut pending_hourly, epoch_of(&cap), data));
            i_quality.for_each_stamp(|cap, data| file_by_epoch(&mut pending_quality, epoch_of(&cap), data));
            i_wm.for_each_stamp(|cap, data| {
                let w = pending_wm.entry(epoch_of(&cap)).or_insert(i64::MIN);
                data.for_each(|b| *w = b.iter().copied().fold(*w, i64::max));
            });

            let frontier = joined_frontier(frontiers);
            let done = |t: &Epoch| !frontier.less_equal(t);
            // The complete epochs, each handled on its own and in order: what an epoch's
            // records change goes out at that epoch, never later. A checkpoint of epoch E
            // (the records read by E) then covers exactly the files emitted by E; emitted
            // at a later epoch, a crash between the two would lose them.
            let mut epochs: Vec<Epoch> = pending_read
                .keys()
                .chain(pending_rej.keys())
                .chain(pending_hourly.keys())
                .chain(pending_quality.keys())
                .chain(pending_wm.keys())
                .copied()
                .filter(done)
                .collect();
            epochs.sort_unstable();
            epochs.dedup();
            let finished = frontier.is_empty();
            if epochs.is_empty() && finished {
                // The input has ended: whatever is still open goes out now.
                epochs.extend(caps.first().map(|c| *c.time()));
            }
            let last = epochs.last().copied();
            for t in epochs {
                for (hour, chunk) in pending_read.remove(&t).into_iter().flatten().flat_map(split_by_hour) {
                    if !hours_of.stored(t, hour) {
                        hours_of.state(&mut hours, &dropped, hour).readings.keep(&chunk);
                    }
                }
                for r in pending_rej.remove(&t).into_iter().flatten() {
                    if !hours_of.stored(t, r.hour()) {
                        hours_of.state(&mut hours, &dropped, r.hour()).rejections.push(r);
                    }
                }
                // A message's updates are mostly of one hour: its state is looked up once
                // per run of updates of the same hour.
                for batch in pending_hourly.remove(&t).into_iter().flatten() {
                    for run in batch.chunk_by(|a, b| (a.0).0 .1 == (b.0).0 .1) {
                        let hour = (run[0].0).0 .1;
                        let stored = hours_of.stored(t, hour);
                        let h = hours_of.state(&mut hours, &dropped, hour);
                        for (((device, _), stats), _, _) in run.iter().filter(|u| u.2 > 0) {
                            h.hourly.insert(*device, *stats);
                            h.hourly_dirty |= !stored;
                        }
                    }
                }
                for batch in pending_quality.remove(&t).into_iter().flatten() {
                    for run in batch.chunk_by(|a, b| (a.0).0 .1 == (b.0).0 .1) {
                        let hour = (run[0].0).0 .1;
                        let stored = hours_of.stored(t, hour);
                        let h = hours_of.state(&mut hours, &dropped, hour);
                        for (((device, _, outcome), n), _, _) in run.iter().filter(|u| u.2 > 0) {
                            h.quality.insert((*device, *outcome), *n as i64);
                            h.quality_dirty |= !stored;
                        }
                    }
                }
                if let Some(w) = pending_wm.remove(&t) {
                    watermark = watermark.max(w);
                }
                // Once the input has ended, every hour is sealed with the last epoch.
                let all = finished && Some(t) == last;
                let cap = caps[0].delayed(&t);
                let mut out = o_sealed.activate();
                let mut session = out.session(&cap);
                for (hour, state) in hours.iter_mut() {
                    let sealable = all || watermark >= (hour + 1) * HOUR_MS + grace_ms;
                    if sealable && (!state.sealed || state.dirty()) {
                        session.give(state.take_batch(*hour, worker));
                    } else if !sealable && !state.sealed && state.readings.len() >= hours_of.max_open_rows {
                        session.give(state.take_open(*hour, worker));
                    }
                }
                // Hours no acceptable late reading can reach any more.
                hours.retain(|hour, s| {
                    let keep = !(s.sealed && watermark > (hour + 2) * HOUR_MS + grace_ms + max_age_ms);
                    if !keep {
                        dropped.insert(*hour, s.seq);
                    }
                    keep
                });
            }
            match frontier.iter().min() {
                Some(f) => caps.iter_mut().for_each(|c| c.downgrade(f)),
                None => caps.clear(),
            }
        }
    });
    s_sealed
}

/// Files a collection's messages under the epochs of their new values (the updates with a
/// positive difference; the others retract old values and are skipped where read). A
/// message holds updates of its capability's epoch (kept whole, the usual case) and possibly
/// of later ones (filed one by one under their own).
fn file_by_epoch<D>(
    pending: &mut ByEpoch<(D, Epoch, isize)>,
    t: Epoch,
    data: std::slice::IterMut<'_, Vec<(D, Epoch, isize)>>,
) {
    for batch in data {
        if batch.iter().all(|u| u.1 == t) {
            if batch.iter().any(|u| u.2 > 0) {
                pending.entry(t).or_default().push(std::mem::take(batch));
            }
        } else {
            for u in batch.drain(..).filter(|u| u.2 > 0) {
                pending.entry(u.1).or_default().push(vec![u]);
            }
        }
    }
}

/// A map's entries ordered by key.
fn sorted<K: Ord + Copy + std::hash::Hash, V: Copy>(map: &IndexedMap<K, V>) -> Vec<(K, V)> {
    let mut keys: Vec<(K, &V)> = map.iter().map(|(k, v)| (*k, v)).collect();
    keys.sort_unstable_by_key(|(k, _)| *k);
    keys.into_iter().map(|(k, v)| (k, *v)).collect()
}

/// Splits readings by hour; a chunk of one hour (the usual case) is passed on as it is.
fn split_by_hour(v: Vec<Reading>) -> Vec<(i64, Vec<Reading>)> {
    match v.first().map(Reading::hour) {
        None => Vec::new(),
        Some(h) if v.iter().all(|r| r.hour() == h) => vec![(h, v)],
        Some(_) => {
            let mut by: BTreeMap<i64, Vec<Reading>> = BTreeMap::new();
            for r in v {
                by.entry(r.hour()).or_default().push(r);
            }
            by.into_iter().collect()
        }
    }
}

/// What the sealing stage knows of hours beyond its own state: which ones a resumed run
/// finds already stored.
struct Hours {
    recovery: Option<Recovery>,
    grace_ms: i64,
    max_age_ms: i64,
    worker: usize,
    /// Whether open hours' readings are packed ([`FlowConfig::pack_open_hours`]).
    pack: bool,
    /// An open hour's readings go out as a part once a worker holds this many
    /// ([`FlowConfig::max_open_rows`]; `usize::MAX` for never).
    max_open_rows: usize,
}

impl Hours {
    /// Whether output made at epoch `t` for `hour` is already in the lake: `t` replays
    /// records read before the checkpoint, and the checkpoint had sealed the hour.
    fn stored(&self, t: Epoch, hour: i64) -> bool {
        self.recovery
            .as_ref()
            .is_some_and(|r| t < r.epochs && r.sealed(hour, self.grace_ms))
    }

    /// The state of `hour`: reopened as partial if it was dropped before (in this run, or
    /// before the checkpoint), and already sealed if the checkpoint had sealed it.
    fn state<'a>(
        &self,
        hours: &'a mut BTreeMap<i64, HourState>,
        dropped: &BTreeMap<i64, u32>,
        hour: i64,
    ) -> &'a mut HourState {
        hours.entry(hour).or_insert_with(|| {
            let mut state = match (dropped.get(&hour), &self.recovery) {
                (Some(&seq), _) => HourState {
                    seq,
                    partial: true,
                    ..HourState::default()
                },
                (None, Some(r)) if r.sealed(hour, self.grace_ms) => HourState {
                    sealed: true,
                    seq: r.next_seq.get(&(hour, self.worker)).copied().unwrap_or(0),
                    partial: r.watermark > (hour + 2) * HOUR_MS + self.grace_ms + self.max_age_ms,
                    ..HourState::default()
                },
                (None, _) => HourState::default(),
            };
            if !self.pack {
                state.readings.never_pack();
            }
            state
        })
    }
}

/// The epoch of an input message (epochs are totally ordered, so a stamp has one least time).
fn epoch_of(cap: &timely::dataflow::operators::InputCapability<Epoch>) -> Epoch {
    *cap.least().expect("every message has a time")
}

/// The frontier of all of an operator's inputs together: an epoch is complete once it is
/// complete at every input.
pub fn joined_frontier(
    frontiers: &[timely::progress::frontier::MutableAntichain<Epoch>],
) -> timely::progress::Antichain<Epoch> {
    let mut joined = timely::progress::Antichain::new();
    for f in frontiers {
        for t in f.frontier().iter() {
            joined.insert(*t);
        }
    }
    joined
}

/// Removes and returns the entries of `map` whose epoch is complete, in epoch order.
pub fn split_done<V>(map: &mut BTreeMap<Epoch, V>, done: impl Fn(&Epoch) -> bool) -> Vec<(Epoch, V)> {
    let mut out = Vec::new();
    while let Some(e) = map.first_entry() {
        if !done(e.key()) {
            break;
        }
        out.push(e.remove_entry());
    }
    out
}

#[cfg(test)]
mod recovery_tests {
    use super::*;

    #[test]
    fn an_hour_with_parts_was_sealed_whatever_the_watermark() {
        let grace = FlowConfig::default().grace_ms;
        let r = Recovery {
            // The last reading at 05:59:50: the watermark never passed hour 5.
            watermark: 5 * HOUR_MS + 3_590_000,
            next_seq: BTreeMap::from([((4, 0), 1), ((5, 1), 1)]),
            ..Recovery::default()
        };
        assert!(r.sealed(4, grace), "the watermark passed hour 4");
        assert!(
            r.sealed(5, grace),
            "the end of the input sealed hour 5: it wrote a part"
        );
        assert!(!r.sealed(6, grace));
    }
}
