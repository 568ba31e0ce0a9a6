//! The engine's checkpoint in the lake (`_fmsflow/checkpoint.json`): after every epoch whose
//! outputs are stored, where each Kafka partition's reader had got to, the event-time
//! watermark, and how many parts each (hour, worker) had written. A restart with
//! `--from checkpoint` resumes from it; docs/RECOVERY.md explains how.

use std::collections::BTreeMap;
use std::sync::Mutex;

use fmsflow_dataflows::dataflow::{Epoch, FlowConfig, Recovery};
use serde::{Deserialize, Serialize};

use crate::lake::{LakeError, Storage};

/// Where the checkpoint is kept in the lake.
pub const KEY: &str = "_fmsflow/checkpoint.json";

/// One checkpoint. `version` changes when the meaning of a field does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version (1).
    pub version: u32,
    /// The raw topic read.
    pub topic: String,
    /// Workers per process, and processes, of the run that wrote it: parts are per worker,
    /// so a restart must have the same.
    pub workers: usize,
    pub processes: usize,
    /// The epoch whose outputs, and all before it, are stored.
    pub epoch: Epoch,
    /// The event-time watermark after that epoch (ms).
    pub watermark: i64,
    /// Per partition, the offset after the last record read by then.
    pub read_end: BTreeMap<i32, i64>,
    /// (hour, worker, parts written by then), for the hours from `oldest` on.
    pub next_seq: Vec<(i64, usize, u32)>,
    /// The oldest hour it tracks: the oldest the sealing stage still held, or, when a
    /// partition's reader lagged behind the others, the oldest that partition could still
    /// bring readings for. Absent in checkpoints of older versions: then the former.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest: Option<i64>,
}

impl Checkpoint {
    /// The checkpoint in `storage`, if there is one.
    pub fn load(storage: &dyn Storage) -> Result<Option<Checkpoint>, String> {
        Self::load_with(storage, |s| s.get(KEY))
    }

    /// [`Checkpoint::load`], reading the object with `get` (to retry it, say).
    pub fn load_with(
        storage: &dyn Storage,
        get: impl FnOnce(&dyn Storage) -> Result<Option<Vec<u8>>, LakeError>,
    ) -> Result<Option<Checkpoint>, String> {
        let Some(bytes) = get(storage).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let c: Checkpoint = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{KEY} in {} is not a checkpoint: {e}", storage.describe()))?;
        if c.version != 1 {
            return Err(format!(
                "{KEY} in {} has version {}; this fmsflow reads version 1",
                storage.describe(),
                c.version
            ));
        }
        Ok(Some(c))
    }

    /// Writes it atomically over the previous one.
    pub fn save(&self, storage: &dyn Storage) -> Result<(), LakeError> {
        let bytes = serde_json::to_vec_pretty(self).expect("a checkpoint serializes");
        storage.put_atomic(KEY, &bytes)
    }

    /// What the dataflow of a restart needs: `epochs` recovery epochs.
    pub fn recovery(&self, epochs: Epoch, flow: &FlowConfig) -> Recovery {
        Recovery {
            epochs,
            watermark: self.watermark,
            oldest: self
                .oldest
                .unwrap_or_else(|| Recovery::oldest_kept_hour(self.watermark, flow)),
            next_seq: self.next_seq.iter().map(|&(h, w, n)| ((h, w), n)).collect(),
        }
    }
}

/// What a worker tells the checkpointing worker (worker 0), sent through the dataflow so it
/// arrives from any process: a reader's positions after an epoch, or a part handed to a lake
/// writer in an epoch. The watermark arrives by its own broadcast stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Report {
    /// Each partition's position after the epoch.
    Positions(Vec<(i32, i64)>),
    /// Each partition's ingest mark after the epoch: a lower bound of the ingest times its
    /// records still to come can have (`PartitionReader::ingest_marks`).
    Ingest(Vec<(i32, i64)>),
    /// Part `seq` of `hour` by `worker`, stored under the keys `files`; `open` when written
    /// before the hour was sealed ([`fmsflow_dataflows::dataflow::BatchKind::Open`]).
    Part {
        hour: i64,
        worker: usize,
        seq: u32,
        open: bool,
        files: Vec<String>,
    },
}

/// What [`Recorder::take`] folds in at an epoch whose outputs are stored.
#[derive(Debug, PartialEq)]
pub struct Taken {
    /// The checkpoint to save (Kafka runs; `None` until something was read).
    pub checkpoint: Option<Checkpoint>,
    /// Per hour, the files stored in the epochs folded in, in order: what the hour's
    /// manifest adds.
    pub files: BTreeMap<i64, Vec<String>>,
    /// The oldest hour the checkpoint tracks (see [`Checkpoint::oldest`]): older hours
    /// change no more.
    pub oldest: i64,
    /// The source positions covered (the checkpoint's `read_end`; empty but for Kafka).
    pub read_end: BTreeMap<i32, i64>,
}

/// (hour, worker, seq, open, files) of a [`Report::Part`].
type PartReport = (i64, usize, u32, bool, Vec<String>);

/// What the workers report, by epoch, until a checkpoint folds it in.
#[derive(Default)]
pub struct Recorder {
    inner: Mutex<Reports>,
}

#[derive(Default)]
struct Reports {
    positions: BTreeMap<Epoch, Vec<(i32, i64)>>,
    ingest: BTreeMap<Epoch, Vec<(i32, i64)>>,
    watermarks: BTreeMap<Epoch, i64>,
    parts: BTreeMap<Epoch, Vec<PartReport>>,
    // Folded: everything up to the last checkpoint.
    read_end: BTreeMap<i32, i64>,
    watermark: Option<i64>,
    next_seq: BTreeMap<(i64, usize), u32>,
    /// The files of open hours' parts, stored but left out of the manifests and of
    /// `next_seq` until their hour is sealed: a restart deletes them and builds the hour again.
    open_files: BTreeMap<i64, Vec<String>>,
    /// Each partition's latest ingest mark.
    marks: BTreeMap<i32, i64>,
    /// The oldest hour tracked: it never goes back, as `next_seq` has forgotten the hours
    /// before it.
    oldest: Option<i64>,
    last: Option<Epoch>,
    max_epoch: Epoch,
}

impl Recorder {
    /// A recorder that goes on from a checkpoint: what the checkpoint covered is covered
    /// still, whatever the resumed run reports. Without it, a checkpoint taken before the
    /// restart had re-read everything would forget the parts of hours sealed before the
    /// crash, and a second restart would delete them.
    pub fn resuming(read_end: &BTreeMap<i32, i64>, recovery: &Recovery) -> Recorder {
        let r = Recorder::default();
        {
            let mut g = r.lock();
            g.read_end = read_end.clone();
            g.watermark = Some(recovery.watermark);
            g.next_seq = recovery.next_seq.clone();
            g.oldest = Some(recovery.oldest);
        }
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reports> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Files one report of `epoch`.
    pub fn record(&self, epoch: Epoch, r: &Report) {
        match r {
            Report::Positions(p) => self.positions(epoch, p),
            Report::Ingest(m) => self.ingest_marks(epoch, m),
            Report::Part {
                hour,
                worker,
                seq,
                open,
                files,
            } => self.part(epoch, (*hour, *worker, *seq, *open, files.clone())),
        }
    }

    /// A reader's positions after `epoch`.
    fn positions(&self, epoch: Epoch, positions: &[(i32, i64)]) {
        let mut g = self.lock();
        g.max_epoch = g.max_epoch.max(epoch);
        g.positions.entry(epoch).or_default().extend_from_slice(positions);
    }

    /// A reader's ingest marks after `epoch`.
    fn ingest_marks(&self, epoch: Epoch, marks: &[(i32, i64)]) {
        self.lock().ingest.entry(epoch).or_default().extend_from_slice(marks);
    }

    /// A watermark seen at `epoch`.
    pub fn watermark(&self, epoch: Epoch, w: i64) {
        let mut g = self.lock();
        let v = g.watermarks.entry(epoch).or_insert(w);
        *v = (*v).max(w);
    }

    /// A part handed to a lake writer at `epoch`.
    fn part(&self, epoch: Epoch, part: PartReport) {
        self.lock().parts.entry(epoch).or_default().push(part);
    }

    /// Folds in every report of epochs up to `epoch` (whose outputs must be stored), or
    /// `None` if that was done already at or past `epoch`.
    pub fn take(
        &self,
        epoch: Epoch,
        topic: &str,
        workers: usize,
        processes: usize,
        flow: &FlowConfig,
    ) -> Option<Taken> {
        let mut g = self.lock();
        if g.last.is_some_and(|l| l >= epoch) {
            return None;
        }
        g.last = Some(epoch);
        for (_, ps) in up_to(&mut g.positions, epoch) {
            for (p, o) in ps {
                let e = g.read_end.entry(p).or_insert(o);
                *e = (*e).max(o);
            }
        }
        for (_, w) in up_to(&mut g.watermarks, epoch) {
            g.watermark = Some(g.watermark.map_or(w, |v| v.max(w)));
        }
        // The latest mark of each partition (it can go down: a partition that had caught up
        // can fall behind again).
        for (_, marks) in up_to(&mut g.ingest, epoch) {
            g.marks.extend(marks);
        }
        let mut files: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for (_, parts) in up_to(&mut g.parts, epoch) {
            for (h, w, seq, open, keys) in parts {
                if open {
                    g.open_files.entry(h).or_default().extend(keys);
                } else {
                    let n = g.next_seq.entry((h, w)).or_default();
                    *n = (*n).max(seq + 1);
                    files.entry(h).or_default().extend(keys);
                }
            }
        }
        // A sealed hour's manifest lists the parts it wrote while open (all of them older
        // than the seal, which every worker makes at the same epoch).
        for (h, listed) in files.iter_mut() {
            listed.extend(g.open_files.remove(h).into_iter().flatten());
        }
        // The end of a run: the last epoch reported.
        let epoch = if epoch == Epoch::MAX { g.max_epoch } else { epoch };
        let watermark = g.watermark.unwrap_or(i64::MIN);
        // Hours older than the oldest one the sealing stage holds can be written again only
        // when a partition that lags behind the others brings readings for them (its
        // records' event times are hours behind the watermark, which the others moved on):
        // they reopen, and their parts must go on from their numbers so far. Hours older
        // than both cannot be written again.
        let kept = Recovery::oldest_kept_hour(watermark, flow);
        let reopenable = g
            .marks
            .values()
            .min()
            .map_or(kept, |&m| Recovery::oldest_reopenable_hour(m, flow));
        let oldest = kept.min(reopenable).max(g.oldest.unwrap_or(i64::MIN));
        g.oldest = Some(oldest);
        g.next_seq.retain(|(h, _), _| *h >= oldest);
        let checkpoint = (!g.read_end.is_empty()).then(|| Checkpoint {
            version: 1,
            topic: topic.to_string(),
            workers,
            processes,
            epoch,
            watermark,
            read_end: g.read_end.clone(),
            next_seq: g.next_seq.iter().map(|(&(h, w), &n)| (h, w, n)).collect(),
            oldest: Some(oldest),
        });
        Some(Taken {
            checkpoint,
            files,
            oldest,
            read_end: g.read_end.clone(),
        })
    }
}

/// Removes and returns the entries of `m` at or before `epoch`.
fn up_to<V>(m: &mut BTreeMap<Epoch, V>, epoch: Epoch) -> BTreeMap<Epoch, V> {
    let rest = m.split_off(&epoch.saturating_add(1));
    std::mem::replace(m, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_reports_up_to_the_epoch() {
        let r = Recorder::default();
        let flow = FlowConfig::default();
        let t = r.take(0, "t", 2, 1, &flow).unwrap();
        assert_eq!((t.checkpoint, t.files.len()), (None, 0), "nothing read yet");
        r.positions(0, &[(0, 10)]);
        r.positions(0, &[(1, 5)]);
        r.positions(2, &[(0, 30)]);
        r.watermark(0, 1_000);
        r.watermark(2, 9_000);
        r.part(1, (0, 1, 0, false, vec!["a".into()]));
        r.part(1, (0, 0, 0, false, vec!["b".into(), "c".into()]));
        r.part(3, (0, 1, 1, false, vec!["d".into()]));
        let t = r.take(1, "t", 2, 1, &flow).unwrap();
        assert_eq!(
            t.files,
            [(0, vec!["a".into(), "b".into(), "c".into()])].into_iter().collect()
        );
        let c = t.checkpoint.unwrap();
        assert_eq!(c.read_end, [(0, 10), (1, 5)].into_iter().collect());
        assert_eq!(t.read_end, c.read_end);
        assert_eq!((c.epoch, c.watermark), (1, 1_000));
        assert_eq!(c.next_seq, vec![(0, 0, 1), (0, 1, 1)]);
        assert_eq!(r.take(1, "t", 2, 1, &flow), None, "taken already");
        let t = r.take(5, "t", 2, 1, &flow).unwrap();
        assert_eq!(t.files, [(0, vec!["d".into()])].into_iter().collect());
        let c = t.checkpoint.unwrap();
        assert_eq!(c.read_end, [(0, 30), (1, 5)].into_iter().collect());
        assert_eq!((c.watermark, c.next_seq.clone()), (9_000, vec![(0, 0, 1), (0, 1, 2)]));
        let dir = tempfile::tempdir().unwrap();
        let s = crate::lake::local::LocalStorage::new(dir.path().to_path_buf(), false);
        assert_eq!(Checkpoint::load(&s).unwrap(), None);
        c.save(&s).unwrap();
        assert_eq!(Checkpoint::load(&s).unwrap(), Some(c));
    }

    #[test]
    fn a_resumed_recorder_keeps_what_the_checkpoint_covered() {
        let flow = FlowConfig::default();
        let old = Recorder::default();
        old.positions(0, &[(0, 100), (1, 80)]);
        old.watermark(0, 7_200_000);
        old.part(0, (0, 1, 0, false, vec![]));
        old.part(0, (1, 0, 2, false, vec![]));
        let ck = old.take(0, "t", 2, 1, &flow).unwrap().checkpoint.unwrap();
        // The restart re-reads from before the checkpoint: its first epochs report less.
        let r = Recorder::resuming(&ck.read_end, &ck.recovery(3, &flow));
        r.positions(0, &[(0, 40), (1, 30)]);
        r.watermark(0, 1_000);
        let again = r.take(0, "t", 2, 1, &flow).unwrap().checkpoint.unwrap();
        assert_eq!(
            (again.read_end.clone(), again.watermark, again.next_seq.clone()),
            (ck.read_end.clone(), ck.watermark, ck.next_seq.clone()),
            "a checkpoint taken while re-reading must not forget the parts of the hours sealed before"
        );
        // New parts and positions past the checkpoint are added to it.
        r.positions(4, &[(0, 120)]);
        r.part(4, (1, 0, 2, false, vec![]));
        let later = r.take(4, "t", 2, 1, &flow).unwrap().checkpoint.unwrap();
        assert_eq!(later.read_end, [(0, 120), (1, 80)].into_iter().collect());
        assert_eq!(later.next_seq, vec![(0, 1, 1), (1, 0, 3)]);
    }

    /// An open hour's parts are stored but neither listed nor counted in `next_seq` until its
    /// seal: a restart from a checkpoint before the seal deletes them and builds the hour again
    /// (`Recovery::sealed` is false for it). The seal's take lists them with the seal's files.
    #[test]
    fn open_parts_are_listed_with_their_hours_seal() {
        let flow = FlowConfig::default();
        let r = Recorder::default();
        r.positions(0, &[(0, 10)]);
        r.part(0, (5, 0, 0, true, vec!["readings/5/part-00000-w000".into()]));
        r.part(1, (5, 1, 0, true, vec!["readings/5/part-00000-w001".into()]));
        r.part(1, (5, 0, 1, true, vec!["readings/5/part-00001-w000".into()]));
        r.part(1, (4, 0, 0, false, vec!["readings/4/part-00000-w000".into()]));
        let t = r.take(1, "t", 2, 1, &flow).unwrap();
        assert_eq!(t.files.keys().collect::<Vec<_>>(), [&4], "hour 5 is open: no manifest");
        let c = t.checkpoint.unwrap();
        assert_eq!(c.next_seq, vec![(4, 0, 1)]);
        assert!(
            !c.recovery(0, &flow).sealed(5, flow.grace_ms),
            "a restart builds hour 5 again"
        );
        // The seal, at every worker in the same epoch (worker 1 in the same take as its last
        // open part).
        r.part(2, (5, 1, 1, true, vec!["readings/5/part-00001-w001".into()]));
        r.part(3, (5, 0, 2, false, vec!["hourly/5/part-00002-w000".into()]));
        r.part(3, (5, 1, 2, false, vec![]));
        let t = r.take(3, "t", 2, 1, &flow).unwrap();
        let mut listed = t.files[&5].clone();
        listed.sort();
        assert_eq!(
            listed,
            [
                "hourly/5/part-00002-w000",
                "readings/5/part-00000-w000",
                "readings/5/part-00000-w001",
                "readings/5/part-00001-w000",
                "readings/5/part-00001-w001"
            ]
        );
        let c = t.checkpoint.unwrap();
        assert_eq!(c.next_seq, vec![(4, 0, 1), (5, 0, 3), (5, 1, 3)]);
        assert!(c.recovery(0, &flow).sealed(5, flow.grace_ms));
    }

    /// A partition whose reader lags hours behind the others (a backlog read at the same
    /// pace on every partition, one of them twice as dense) brings readings for hours the
    /// sealing stage has dropped: they reopen, and a restart must know how many parts each
    /// has, or it would write its next part over the first (the 48-hour crash test of
    /// `scripts/faults` found that). The checkpoint keeps them as long as the lagging
    /// partition can reach them.
    #[test]
    fn a_lagging_partition_keeps_the_hours_it_can_reopen() {
        let flow = FlowConfig::default();
        let h = |hour: i64| hour * 3_600_000;
        let r = Recorder::default();
        r.positions(0, &[(0, 1_000), (1, 500)]);
        // The watermark at 13:10 (from partition 0); partition 1 has reached 04:46.
        r.watermark(0, h(13) + 600_000);
        r.ingest_marks(0, &[(0, i64::MAX), (1, h(4) + 46 * 60_000)]);
        r.part(0, (4, 1, 7, false, vec![]));
        r.part(0, (12, 0, 0, false, vec![]));
        let c = r.take(0, "t", 2, 1, &flow).unwrap().checkpoint.unwrap();
        assert_eq!(
            Recovery::oldest_kept_hour(c.watermark, &flow),
            6,
            "hours 4 and 5 were dropped"
        );
        // 04:46 - 6 h - 5 min: partition 1 can still bring readings from 22:41 on.
        assert_eq!(c.oldest, Some(-2));
        assert_eq!(c.next_seq, vec![(4, 1, 8), (12, 0, 1)], "hour 4's parts are remembered");
        assert_eq!(c.recovery(0, &flow).oldest, -2);
        // Once partition 1 has caught up, the window closes again, and never reopens.
        r.ingest_marks(1, &[(1, i64::MAX)]);
        let c = r.take(1, "t", 2, 1, &flow).unwrap().checkpoint.unwrap();
        assert_eq!((c.oldest, c.next_seq.clone()), (Some(6), vec![(12, 0, 1)]));
        r.ingest_marks(2, &[(1, h(5))]);
        let c = r.take(2, "t", 2, 1, &flow).unwrap().checkpoint.unwrap();
        assert_eq!(
            c.oldest,
            Some(6),
            "the hours before were forgotten: the oldest never goes back"
        );
        // A checkpoint of an older version (without `oldest`) falls back to the watermark.
        let old = Checkpoint { oldest: None, ..c };
        assert_eq!(old.recovery(0, &flow).oldest, 6);
    }
}
