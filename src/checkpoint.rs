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
    /// (hour, worker, parts written by then), for the hours the sealing stage still held.
    pub next_seq: Vec<(i64, usize, u32)>,
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
    pub fn recovery(&self, epochs: Epoch) -> Recovery {
        Recovery {
            epochs,
            watermark: self.watermark,
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
    /// Part `seq` of `hour` by `worker`, stored under the keys `files`.
    Part {
        hour: i64,
        worker: usize,
        seq: u32,
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
    /// The oldest hour the sealing stage still holds: older hours change no more (but for
    /// data later than the retention, which reopens an hour).
    pub oldest: i64,
    /// The source positions covered (the checkpoint's `read_end`; empty but for Kafka).
    pub read_end: BTreeMap<i32, i64>,
}

/// (hour, worker, seq, files) of a [`Report::Part`].
type PartReport = (i64, usize, u32, Vec<String>);

/// What the workers report, by epoch, until a checkpoint folds it in.
#[derive(Default)]
pub struct Recorder {
    inner: Mutex<Reports>,
}

#[derive(Default)]
struct Reports {
    positions: BTreeMap<Epoch, Vec<(i32, i64)>>,
    watermarks: BTreeMap<Epoch, i64>,
    parts: BTreeMap<Epoch, Vec<PartReport>>,
    // Folded: everything up to the last checkpoint.
    read_end: BTreeMap<i32, i64>,
    watermark: Option<i64>,
    next_seq: BTreeMap<(i64, usize), u32>,
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
            Report::Part {
                hour,
                worker,
                seq,
                files,
            } => self.part(epoch, *hour, *worker, *seq, files.clone()),
        }
    }

    /// A reader's positions after `epoch`.
    fn positions(&self, epoch: Epoch, positions: &[(i32, i64)]) {
        let mut g = self.lock();
        g.max_epoch = g.max_epoch.max(epoch);
        g.positions.entry(epoch).or_default().extend_from_slice(positions);
    }

    /// A watermark seen at `epoch`.
    pub fn watermark(&self, epoch: Epoch, w: i64) {
        let mut g = self.lock();
        let v = g.watermarks.entry(epoch).or_insert(w);
        *v = (*v).max(w);
    }

    /// A part handed to a lake writer at `epoch`.
    fn part(&self, epoch: Epoch, hour: i64, worker: usize, seq: u32, files: Vec<String>) {
        self.lock()
            .parts
            .entry(epoch)
            .or_default()
            .push((hour, worker, seq, files));
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
        let mut files: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for (_, parts) in up_to(&mut g.parts, epoch) {
            for (h, w, seq, keys) in parts {
                let n = g.next_seq.entry((h, w)).or_default();
                *n = (*n).max(seq + 1);
                files.entry(h).or_default().extend(keys);
            }
        }
        // The end of a run: the last epoch reported.
        let epoch = if epoch == Epoch::MAX { g.max_epoch } else { epoch };
        let watermark = g.watermark.unwrap_or(i64::MIN);
        // Hours older than the oldest one kept cannot be written again.
        let oldest = Recovery::oldest_kept_hour(watermark, flow);
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
        r.part(1, 0, 1, 0, vec!["a".into()]);
        r.part(1, 0, 0, 0, vec!["b".into(), "c".into()]);
        r.part(3, 0, 1, 1, vec!["d".into()]);
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
        old.part(0, 0, 1, 0, vec![]);
        old.part(0, 1, 0, 2, vec![]);
        let ck = old.take(0, "t", 2, 1, &flow).unwrap().checkpoint.unwrap();
        // The restart re-reads from before the checkpoint: its first epochs report less.
        let r = Recorder::resuming(&ck.read_end, &ck.recovery(3));
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
        r.part(4, 1, 0, 2, vec![]);
        let later = r.take(4, "t", 2, 1, &flow).unwrap().checkpoint.unwrap();
        assert_eq!(later.read_end, [(0, 120), (1, 80)].into_iter().collect());
        assert_eq!(later.next_seq, vec![(0, 1, 1), (1, 0, 3)]);
    }
}
