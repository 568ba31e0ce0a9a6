//! `fmsflow run`'s runtime: starts W timely workers in this process, builds the dataflow on
//! each, feeds it from a source, and attaches the lake sink. Only this driver advances
//! epochs: by batch when replaying, by wall-clock period when live.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fmsflow_dataflows::dataflow::{BatchKind, Epoch, FlowConfig, HourBatch};
use fmsflow_dataflows::{build, HourStats, RawRecord, Rejection};
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::ProbeHandle;

use crate::api::view::LiveView;
use crate::checkpoint::{Recorder, Report};
use crate::connectors::file::Replay;
use crate::connectors::kafka::{KafkaSinks, PartitionReader, SourceSpec, StartAt};
use crate::durable::{durable_sink, Tally, Ticket};
use crate::lake::manifest::Manifest;
use crate::lake::LakeWriter;
use crate::status::Status;

/// Where the engine's raw records come from.
pub enum Source {
    /// NDJSON files, replayed as fast as possible. With at least as many files as workers,
    /// each worker reads whole files; otherwise the workers share each file block by block.
    Files(Vec<PathBuf>),
    /// Records in memory (benchmarks, tests), shared out by index.
    Memory(Arc<Vec<RawRecord>>),
    /// One channel per worker, fed live; the engine stops when every sender is gone.
    Live(Vec<Receiver<RawRecord>>),
    /// The raw Kafka topic: each worker reads the partitions `p % workers == index`.
    Kafka(Box<SourceSpec>),
}

/// Engine parameters.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// The dataflow's parameters.
    pub flow: FlowConfig,
    /// Worker threads.
    pub workers: usize,
    /// Replay: records per worker per epoch.
    pub batch: usize,
    /// Live: epoch length.
    pub epoch: Duration,
    /// Run as one process of a cluster (each process runs `workers` workers); `None` for a
    /// single process.
    pub cluster: Option<Cluster>,
    /// File replay: at most this many records per second per worker (`None`: as fast as
    /// possible). A paced replay lets live queries watch the aggregates grow.
    pub replay_rate: Option<f64>,
}

impl EngineSettings {
    /// A replay of files paced at `rate` records per second in all, in epochs of a tenth
    /// of a second's records per worker: a live run's small epochs, for benchmarks and
    /// examples that watch the aggregates grow.
    pub fn paced(flow: FlowConfig, workers: usize, rate: f64) -> EngineSettings {
        let per_worker = rate / workers as f64;
        EngineSettings {
            flow,
            workers,
            batch: (per_worker / 10.0).max(1.0) as usize,
            epoch: Duration::from_millis(200),
            cluster: None,
            replay_rate: Some(per_worker),
        }
    }
}

pub use crate::cluster::Cluster;

/// Starts this process's `workers` timely workers running `f`: alone, or connected to the
/// other processes of `cluster` first (`crate::cluster::connect`, a bounded wait naming any
/// missing process).
fn start_workers<T, F>(
    workers: usize,
    cluster: Option<&Cluster>,
    f: F,
) -> Result<timely::communication::WorkerGuards<T>, EngineError>
where
    T: Send + 'static,
    F: Fn(&mut timely::worker::Worker) -> T + Send + Sync + 'static,
{
    use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
    use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
    let start = |message: String| EngineError::Start { workers, message };
    let Some(c) = cluster else {
        return timely::execute(timely::Config::process(workers), f).map_err(start);
    };
    let sockets = crate::cluster::connect(c, workers).map_err(|e| EngineError::Cluster(e.to_string()))?;
    crate::cluster::watch_for_lost_peers(c.addresses.clone());
    let hooks = timely::communication::Hooks::default();
    let local = ProcessBuilder::new_typed_vector(workers, hooks.refill.clone(), hooks.spill.clone());
    let (builders, guard) = initialize_networking_from_sockets(local, sockets, c.process, workers, hooks)
        .map_err(|e| start(format!("the cluster's network threads: {e}")))?;
    timely::execute::execute_from(
        builders.into_iter().map(AllocatorBuilder::Tcp).collect(),
        Box::new(guard),
        timely::WorkerConfig::default(),
        f,
    )
    .map_err(start)
}

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Timely could not start its workers.
    #[error("starting {workers} timely workers failed: {message}")]
    Start { workers: usize, message: String },
    /// A source or sink failed; the run stopped.
    #[error("{0}")]
    Failed(String),
    /// The cluster did not come together (a missing or mismatched process).
    #[error("{0}")]
    Cluster(String),
    /// Another process of the cluster went away mid-run.
    #[error(
        "lost process {process} of the cluster ({address}): {cause}. A timely cluster cannot go on \
         without one of its processes, so this one stops too: restart every process (from Kafka with \
         --from checkpoint, to resume where the lake's checkpoint is)"
    )]
    PeerLost {
        process: usize,
        address: String,
        cause: String,
    },
}

/// Runs the dataflow to completion (end of the files, or all live senders dropped). With
/// `view`, each worker mirrors its aggregates there for the query API.
pub fn run(
    settings: EngineSettings,
    source: Source,
    lake: Option<Arc<LakeWriter>>,
    kafka_out: Option<Arc<KafkaSinks>>,
    status: Arc<Status>,
    view: Option<Arc<LiveView>>,
) -> Result<(), EngineError> {
    let workers = settings.workers;
    let (files, memory, receivers, kafka) = match source {
        Source::Files(f) => (Some(f), None, None, None),
        Source::Memory(m) => (None, Some(m), None, None),
        Source::Live(rx) => (None, None, Some(rx), None),
        Source::Kafka(k) => (None, None, None, Some(k)),
    };
    let live = Arc::new(Mutex::new(
        receivers.map(|rx| rx.into_iter().map(Some).collect::<Vec<_>>()),
    ));
    // Into a lake: the hours' manifests, and from Kafka the checkpoints too (docs/LAKE.md,
    // docs/RECOVERY.md), written by worker 0 from what every worker reports to it through the
    // dataflow. Every process builds the same reporting dataflow; only worker 0's recorder
    // is used.
    let recorder = lake.as_ref().map(|lake| {
        Arc::new(Committer {
            recorder: match kafka.as_ref().map(|k| (&k.from, &settings.flow.recovery)) {
                Some((StartAt::Resume(plan), Some(recovery))) => Recorder::resuming(&plan.read_end, recovery),
                _ => Recorder::default(),
            },
            lake: lake.clone(),
            topic: kafka.as_ref().map(|k| k.settings.raw_topic.clone()).unwrap_or_default(),
            workers,
            processes: settings.cluster.as_ref().map_or(1, |c| c.addresses.len()),
            flow: settings.flow.clone(),
            manifests: Mutex::default(),
            replaced: Mutex::default(),
        })
    });
    let recovery_epochs = settings.flow.recovery_epochs();
    let finished_view = view.clone();
    let st = status.clone();
    let cluster = settings.cluster.clone();
    let guards = start_workers(workers, cluster.as_ref(), move |worker| {
        let index = worker.index();
        let peers = worker.peers();
        let probe = ProbeHandle::new();
        let (st_r, st_j) = (st.clone(), st.clone());
        // Encoding and writing run beside the worker, so fsync waits overlap the dataflow.
        let (mut to_writer, writer) = match &lake {
            Some(lake) => {
                let (queues, threads) = spawn_writers(index, lake.clone(), st.clone());
                (Some(queues), Some(threads))
            }
            None => (None, None),
        };
        let flow = settings.flow.clone();
        let (mut input, mut reports) = worker.dataflow::<Epoch, _, _>(|scope| {
            let (handle, raw) = scope.new_input::<RawRecord>();
            let out = build(raw, &flow);
            if let Some(v) = &view {
                // Worker indexes are global; each process runs `workers` of them.
                crate::api::view::attach(&out, v.clone(), index % workers);
            }
            let sealed = to_writer.as_ref().map(|_| out.sealed());
            out.latest.clone().inspect_core(move |e| {
                if let Ok((_, ls)) = e {
                    st_r.on_latest(ls)
                }
            });
            out.rejections.clone().inspect_core(move |e| {
                if let Ok((_, rs)) = e {
                    st_j.on_rejections(rs)
                }
            });
            if let Some(k) = kafka_out.clone() {
                attach_kafka_sinks(&out, k, st.clone(), &probe, recovery_epochs);
            }
            if let Some(c) = recorder.clone() {
                // Broadcast: worker 0 sees every worker's watermark. (Every worker builds the
                // operator: timely needs the same dataflow on all of them.)
                out.watermarks.clone().inspect_core(move |e| {
                    if let (Ok((stamp, ws)), 0) = (e, index) {
                        if let (Some(t), Some(w)) = (stamp.least(), ws.iter().max()) {
                            c.recorder.watermark(*t, *w);
                        }
                    }
                });
            }
            let mut sealed = sealed;
            let reports = recorder.clone().map(|c| {
                let (handle, positions) = scope.new_input::<Report>();
                // The batches pass through the reporting operator (moved, not cloned: a
                // second reader of the stream would get a copy of every sealed hour).
                let parts = sealed.take().map(|s| {
                    let (parts, batches) = report_parts(s, c.lake.clone());
                    sealed = Some(batches);
                    parts
                });
                report_to_worker_0(positions, parts, c, index).probe_with(&probe);
                handle
            });
            if sealed.is_none() {
                // Without a lake nothing needs sealing: the aggregates are the output. (With
                // one, the sealed hours depend on them, and the lake's sink is probed.)
                out.hourly.clone().inner.probe_with(&probe);
                out.quality.clone().inner.probe_with(&probe);
            }
            if let (Some(queues), Some(sealed)) = (to_writer.take(), sealed) {
                // The probe passes an epoch once the writer has stored all of its batches.
                let st_l = st.clone();
                durable_sink(
                    sealed,
                    "LakeSink",
                    Tally::new(),
                    move |t, batches: &mut Vec<HourBatch>, tally| {
                        for b in batches.drain(..) {
                            queues.send(b, tally.start(t));
                        }
                    },
                    move |e| st_l.fail(e),
                )
                .probe_with(&probe);
            }
            // Only a Kafka reader reports positions: other sources close that input at once.
            (handle, reports.filter(|_| kafka.is_some()))
        });
        // Worker 0 commits what the other sources' epochs stored as it goes.
        let committer = recorder.as_deref().filter(|_| index == 0);

        let mut epoch: Epoch = 0;
        let mut buf: Vec<RawRecord> = Vec::new();
        let mut final_commit = None;
        if let Some(files) = &files {
            // Epochs cut at fixed places in the files: the same outputs for every layout.
            let (chunk, block) = file_chunks(settings.batch, settings.flow.rules.fleet_size);
            match Replay::open(files, index, peers, chunk, block) {
                Ok(mut replay) => {
                    let (paced_from, mut shipped) = (Instant::now(), 0usize);
                    // At most [`FILE_AHEAD`] of this worker's chunks in flight: before the
                    // next, every epoch before the oldest of the last `FILE_AHEAD - 1` is done.
                    let mut shipped_at = std::collections::VecDeque::with_capacity(FILE_AHEAD);
                    loop {
                        let at = match replay.next(&mut buf) {
                            Ok(Some(at)) => at,
                            Ok(None) => break,
                            Err(e) => {
                                st.fail(e.to_string());
                                break;
                            }
                        };
                        shipped += buf.len();
                        if shipped_at.len() == FILE_AHEAD {
                            shipped_at.pop_front();
                        }
                        let behind = shipped_at.front().copied().unwrap_or(0);
                        ship_at(worker, &mut input, &probe, &st, &mut buf, &mut epoch, at, behind);
                        shipped_at.push_back(at);
                        commit_stored(committer, &probe, &st);
                        if let Some(rate) = settings.replay_rate {
                            pace(worker, paced_from, shipped, rate);
                        }
                        if st.error().is_some() || crate::shutdown::requested() {
                            break;
                        }
                    }
                }
                Err(e) => st.fail(e.to_string()),
            }
        } else if let Some(spec) = &kafka {
            match PartitionReader::open(spec, index, peers) {
                Ok(reader) => {
                    let ck = recorder.as_deref().map(|c| (c, index == 0));
                    final_commit = Some(read_kafka(
                        worker,
                        &mut input,
                        &mut reports,
                        &probe,
                        &st,
                        spec,
                        reader,
                        &settings,
                        &mut epoch,
                        ck,
                    ));
                }
                Err(e) => st.fail(format!("worker {index}: {e}")),
            }
        } else if let Some(records) = &memory {
            let mut it = records.iter().skip(index).step_by(peers).peekable();
            while it.peek().is_some() {
                buf.extend(it.by_ref().take(settings.batch).cloned());
                ship(worker, &mut input, &probe, &st, &mut buf, &mut epoch);
                commit_stored(committer, &probe, &st);
            }
        } else {
            let rx = live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .and_then(|v| v.get_mut(index).and_then(Option::take));
            let started = Instant::now();
            let period = settings.epoch;
            if let Some(rx) = rx {
                let mut committed_at = Instant::now();
                loop {
                    let now = (started.elapsed().as_nanos() / period.as_nanos().max(1)) as Epoch;
                    if now > epoch {
                        epoch = now;
                        input.advance_to(epoch);
                    }
                    match rx.recv_timeout(Duration::from_millis(5)) {
                        Ok(r) => {
                            buf.push(r);
                            buf.extend(rx.try_iter());
                            send(&mut input, &st, &mut buf);
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    worker.step();
                    timing_done(&probe);
                    if committed_at.elapsed() >= FOLLOW_COMMIT_EVERY {
                        commit_stored(committer, &probe, &st);
                        committed_at = Instant::now();
                    }
                }
            } else {
                // No channel for this worker: its input closes at once and the others go on.
                tracing::debug!(worker = index, "no live input for this worker");
            }
        }
        drop(input);
        drop(reports);
        // A failed write holds its epoch for good: stop waiting once the run has failed.
        worker.step_or_park_while(Some(PARK), || !probe.done() && st.error().is_none());
        timing_done(&probe);
        if let (Some(c), None) = (committer, st.error()) {
            // Every worker has reported its last positions and parts: they are in before its
            // input closed, and the probe is done only after every input closed.
            c.save(Epoch::MAX, &st);
        }
        if let (Some((reader, end)), None) = (final_commit, st.error()) {
            if let Err(e) = reader.commit(&end, true) {
                tracing::warn!(error = %e, "committing the final offsets failed");
            }
        }
        // Dropping the dataflow's sink closes the writer's channel; wait for the last files.
        for id in worker.installed_dataflows() {
            worker.drop_dataflow(id);
        }
        for w in writer.into_iter().flatten() {
            if w.join().is_err() {
                st.fail(format!("a lake writer of worker {index} panicked"));
            }
        }
    })?;
    if cluster.is_some() {
        // `join` would also join timely's network threads and panic if one of them did (a
        // lost process): wait for the workers alone first.
        while !guards.guards().iter().all(|g| g.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if let Some((process, address, cause)) = crate::cluster::lost() {
        // Dropping the guards would join timely's network threads, one of which panicked:
        // the process is stopping anyway.
        std::mem::forget(guards);
        return Err(EngineError::PeerLost {
            process: *process,
            address: address.clone(),
            cause: cause.clone(),
        });
    }
    for r in guards.join() {
        r.map_err(|e| EngineError::Failed(format!("a worker stopped: {e}")))?;
    }
    match status.error() {
        Some(e) => Err(EngineError::Failed(e)),
        None => {
            // Every output is stored: answers as of the end are complete, the lake's too.
            finished_view.inspect(|v| v.finished());
            Ok(())
        }
    }
}

/// Paced replay: keeps the dataflow going until `shipped` records at `rate` a second are
/// due since `from`.
fn pace(worker: &mut timely::worker::Worker, from: Instant, shipped: usize, rate: f64) {
    let due = from + Duration::from_secs_f64(shipped as f64 / rate.max(1e-3));
    while Instant::now() < due {
        worker.step_or_park(Some(due.saturating_duration_since(Instant::now()).min(PARK)));
    }
}

/// How long a worker with nothing to do may sleep before it looks again. Another worker's
/// data or progress wakes it sooner; sleeping rather than spinning leaves the core to the
/// workers and lake writers that have work (they outnumber the cores on small machines).
const PARK: Duration = Duration::from_millis(10);

/// Replay reads ahead of the dataflow by at most this many epochs.
const AHEAD: u64 = 2;

/// A file replay has at most this many of a worker's chunks ([`file_chunks`]) in flight. An
/// hour's files are encoded and stored by the lake writer threads, beside the workers on the
/// same cores: with two chunks in flight a worker often waited for an epoch's
/// files, idle, while a writer had the core. Four let the writers lag by two more chunks
/// (10 million readings of 100 devices on 2 workers, lake in tmpfs, 5 runs each: median
/// 5.58 s with 2 in flight, 4.48 s with 4; docs/BENCHMARKS.md), for two more chunks of
/// records held.
const FILE_AHEAD: usize = 4;

/// The smallest `engine.batch` whose file replay epochs grow with the fleet.
const FILE_CHUNK_FLOOR: usize = 10_000;

/// A file replay's epochs: chunks of at least `batch` records and of four times the fleet
/// (up to eight times `batch`), in blocks of [`crate::connectors::file::BLOCK`] per `batch`
/// records (one chunk per block, so the workers take turns through the file). The
/// aggregates' work is per (device, hour) and epoch: with an epoch of fewer records than
/// devices nearly every reading is a key of its own in its epoch, and with four readings per
/// device an epoch's updates are a quarter of its readings (10 million readings of 100,000
/// devices on 2 workers: 15.5 s in chunks of 44,000 records, 11.3 s in chunks of 200,000,
/// 8.7 s in chunks of 400,000 for the same peak RSS; larger chunks gain little more and hold
/// more records, and for a small fleet only hold more records: docs/BENCHMARKS.md). Depends
/// only on the configuration, so every worker and process cuts the files alike. A `batch` below
/// [`FILE_CHUNK_FLOOR`] asks for small epochs (tests of many epochs and commits): kept.
fn file_chunks(batch: usize, fleet_size: u32) -> (usize, u64) {
    let batch = batch.max(1);
    if batch < FILE_CHUNK_FLOOR {
        return (batch, crate::connectors::file::BLOCK);
    }
    let chunk = (4 * fleet_size as usize).clamp(batch, 8 * batch);
    (chunk, crate::connectors::file::BLOCK * chunk.div_ceil(batch) as u64)
}

/// Following a topic, the reader stays at most this far (in epochs' worth of wall time)
/// ahead of the stored outputs. An epoch is stored only once the brokers acknowledge its
/// output records, and an acknowledgement now and then takes a few hundred milliseconds: a
/// bound of two 20 ms epochs stopped reading for that long, and the aggregates of everything
/// produced meanwhile came late. The records in flight stay bounded by the input rate.
const FOLLOW_AHEAD: Duration = Duration::from_secs(2);

/// Following a topic, stored positions are committed (and the checkpoint written) at most
/// this often: live epochs are short, and a commit and an fsynced checkpoint every 20 ms
/// load the brokers and the disk for nothing (a restart re-reads at most this much more).
const FOLLOW_COMMIT_EVERY: Duration = Duration::from_secs(1);

/// [`FOLLOW_AHEAD`] in epochs of `period`, and never fewer than [`AHEAD`].
fn follow_ahead(period: Duration) -> u64 {
    ((FOLLOW_AHEAD.as_nanos() / period.as_nanos().max(1)) as u64).max(AHEAD)
}

/// The records one worker has read and the dataflow has not yet stored, by epoch: following
/// a backlog, a reader fills many batches per epoch, so the epochs in flight alone do not
/// bound its memory.
#[derive(Default)]
struct InFlight {
    epochs: std::collections::VecDeque<(Epoch, usize)>,
    records: usize,
}

impl InFlight {
    /// Counts `n` records read in `epoch`.
    fn add(&mut self, epoch: Epoch, n: usize) {
        match self.epochs.back_mut() {
            Some((e, c)) if *e == epoch => *c += n,
            _ => self.epochs.push_back((epoch, n)),
        }
        self.records += n;
    }

    /// Forgets the epochs `stored` says are done, and returns the records still in flight.
    fn settle(&mut self, stored: impl Fn(Epoch) -> bool) -> usize {
        while let Some(&(e, n)) = self.epochs.front() {
            if !stored(e) {
                break;
            }
            self.epochs.pop_front();
            self.records -= n;
        }
        self.records
    }
}

/// Sends records of epoch `at` (not before the input's current epoch), and works until the
/// dataflow has finished every epoch before `behind` (backpressure, as in [`ship`]).
#[allow(clippy::too_many_arguments)]
fn ship_at(
    worker: &mut timely::worker::Worker,
    input: &mut timely::dataflow::InputHandleVec<Epoch, RawRecord>,
    probe: &ProbeHandle<Epoch>,
    st: &Status,
    buf: &mut Vec<RawRecord>,
    epoch: &mut Epoch,
    at: Epoch,
    behind: Epoch,
) {
    if at > *epoch {
        *epoch = at;
        input.advance_to(at);
    }
    send(input, st, buf);
    settle(worker, probe, st, behind);
}

/// Counts and sends `buf`'s records at the input's current epoch.
fn send(input: &mut timely::dataflow::InputHandleVec<Epoch, RawRecord>, st: &Status, buf: &mut Vec<RawRecord>) {
    st.received.fetch_add(buf.len() as u64, Relaxed);
    if crate::metrics::enabled() && !buf.is_empty() {
        TIMING.with_borrow_mut(|t| t.sent(*input.time(), buf, crate::clock::wall_ms()));
    }
    input.send_batch(buf);
    buf.clear();
}

/// Works the dataflow until every epoch before `before` is done (or the run failed).
fn settle(worker: &mut timely::worker::Worker, probe: &ProbeHandle<Epoch>, st: &Status, before: Epoch) {
    worker.step_or_park_while(Some(PARK), || probe.less_than(&before) && st.error().is_none());
    timing_done(probe);
}

/// Readings whose ingest time is further back than this (a replay of old records, a
/// time-compressed demo's clock ahead of the wall) are left out of the latency histogram.
const LATENCY_RECENT_MS: i64 = 3_600_000;
/// Ingest times at most this far ahead of this host's clock count as now (clock skew).
const LATENCY_SKEW_MS: i64 = 5_000;
/// Readings of one epoch timed at most (the rest of a large epoch is not sampled).
const LATENCY_PER_EPOCH: usize = 65_536;
/// Readings timed at most per batch sent: a larger batch (a replay, a backlog) is sampled
/// evenly, so the histogram costs a fast replay almost nothing; live batches are smaller
/// and every reading of them is timed.
const LATENCY_PER_BATCH: usize = 256;

/// One worker's epochs in flight: when each got its first input, and the ingest times of
/// its recent readings, for the epoch-duration and end-to-end latency histograms
/// (`crate::metrics`).
#[derive(Default)]
struct Timing {
    epochs: std::collections::VecDeque<(Epoch, Instant, Vec<i64>)>,
}

thread_local! {
    static TIMING: std::cell::RefCell<Timing> = std::cell::RefCell::default();
}

impl Timing {
    /// Notes `records` sent at `epoch`, at wall clock `now_ms`.
    fn sent(&mut self, epoch: Epoch, records: &[RawRecord], now_ms: i64) {
        if self.epochs.back().is_none_or(|(e, _, _)| *e != epoch) {
            self.epochs.push_back((epoch, Instant::now(), Vec::new()));
        }
        let Some((_, _, ingest)) = self.epochs.back_mut() else {
            return;
        };
        let room = LATENCY_PER_EPOCH.saturating_sub(ingest.len());
        let stride = records.len().div_ceil(LATENCY_PER_BATCH).max(1);
        ingest.extend(
            records
                .iter()
                .step_by(stride)
                .filter_map(|r| r.ingest_ms)
                .filter(|t| now_ms - t <= LATENCY_RECENT_MS && *t <= now_ms + LATENCY_SKEW_MS)
                .take(room),
        );
    }

    /// Observes the epochs `complete` says are done, at wall clock `now_ms`.
    fn done(&mut self, complete: impl Fn(Epoch) -> bool, now_ms: i64) {
        let m = crate::metrics::shared();
        while let Some((e, _, _)) = self.epochs.front() {
            if !complete(*e) {
                break;
            }
            let Some((_, opened, ingest)) = self.epochs.pop_front() else {
                break;
            };
            m.epoch_duration.observe(opened.elapsed().as_secs_f64());
            let latency = m.latency.local();
            for t in ingest {
                latency.observe((now_ms - t).max(0) as f64 / 1000.0);
            }
            latency.flush();
        }
    }
}

/// Observes this worker's epochs `probe` has passed.
fn timing_done(probe: &ProbeHandle<Epoch>) {
    if crate::metrics::enabled() {
        TIMING.with_borrow_mut(|t| t.done(|e| !probe.less_equal(&e), crate::clock::wall_ms()));
    }
}

/// Sends one replay epoch's records, closes the epoch, and works until at most [`AHEAD`]
/// epochs are in flight (backpressure: a source never runs far ahead of the sinks).
fn ship(
    worker: &mut timely::worker::Worker,
    input: &mut timely::dataflow::InputHandleVec<Epoch, RawRecord>,
    probe: &ProbeHandle<Epoch>,
    st: &Status,
    buf: &mut Vec<RawRecord>,
    epoch: &mut Epoch,
) {
    send(input, st, buf);
    *epoch += 1;
    input.advance_to(*epoch);
    settle(worker, probe, st, epoch.saturating_sub(AHEAD));
}

/// A replay partition that delivers nothing for this long, before its end, fails the run.
const KAFKA_STALL: Duration = Duration::from_secs(120);

/// Feeds one worker's Kafka partitions into the dataflow until they end (replay) or until
/// `spec.stop` is set (follow). Commits each epoch's positions to the consumer group once
/// the dataflow has finished that epoch and stored its outputs. Returns the reader and the
/// positions it ended at, for the caller to commit when the whole run is stored.
#[allow(clippy::too_many_arguments)]
fn read_kafka(
    worker: &mut timely::worker::Worker,
    input: &mut timely::dataflow::InputHandleVec<Epoch, RawRecord>,
    reports: &mut Option<timely::dataflow::InputHandleVec<Epoch, Report>>,
    probe: &ProbeHandle<Epoch>,
    st: &Status,
    spec: &SourceSpec,
    mut reader: PartitionReader,
    settings: &EngineSettings,
    epoch: &mut Epoch,
    ck: Option<(&Committer, bool)>,
) -> (PartitionReader, Vec<(i32, i64)>) {
    // Grown as needed: following a topic live, a read brings a few records (`batch` of
    // them, 50,000 by default, would hold 2.8 MB per worker for nothing).
    let mut buf: Vec<RawRecord> = Vec::new();
    // Reports the positions and ingest marks after epoch `e` for the checkpoint (through
    // the dataflow, at `e`, so the probe passes `e` only once worker 0 has them), moves that
    // input on to `next` (the epoch the reader goes on with), and keeps the positions to
    // commit.
    let mut note = |to_commit: &mut std::collections::VecDeque<(Epoch, Vec<(i32, i64)>)>,
                    e: Epoch,
                    reader: &PartitionReader,
                    next: Epoch| {
        let p = reader.positions();
        if let Some(r) = reports.as_mut() {
            r.send(Report::Positions(p.clone()));
            r.send(Report::Ingest(reader.ingest_marks()));
            r.advance_to(next);
        }
        to_commit.push_back((e, p));
    };
    // Positions reached by the end of each epoch, committed once the probe has passed the
    // epoch: its lake files are written and its Kafka records acknowledged (see `durable`).
    let mut to_commit: std::collections::VecDeque<(Epoch, Vec<(i32, i64)>)> = Default::default();
    let commit_done =
        |reader: &PartitionReader, to_commit: &mut std::collections::VecDeque<(Epoch, Vec<(i32, i64)>)>, sync: bool| {
            st.set_partitions(&reader.lag());
            let mut last = None;
            while let Some((e, _)) = to_commit.front() {
                if probe.less_equal(e) {
                    break;
                }
                last = to_commit.pop_front();
            }
            if let Some((epoch, p)) = last {
                // Checkpoint first: the group's offsets never run ahead of it.
                if let Some((c, true)) = ck {
                    c.save(epoch, st);
                }
                if let Err(e) = reader.commit(&p, sync) {
                    tracing::warn!(error = %e, "committing offsets failed (the next commit retries)");
                }
            }
        };
    // Epoch e holds the offsets [start + e*n, start + (e+1)*n) of every partition: the
    // same range always makes the same epochs, so the same outputs.
    let per_partition = per_partition(settings.batch, reader.partitions().len());
    // Resuming: the recovery epochs re-read up to the checkpoint's positions, in both modes.
    let recovery = settings.flow.recovery_epochs();
    while *epoch < recovery && st.error().is_none() {
        if let Err(e) = reader.read_epoch(*epoch, per_partition, KAFKA_STALL, &mut buf) {
            st.fail(e.to_string());
        }
        note(&mut to_commit, *epoch, &reader, *epoch + 1);
        ship(worker, input, probe, st, &mut buf, epoch);
        commit_done(&reader, &mut to_commit, false);
    }
    if spec.until_end {
        loop {
            let more = match reader.read_epoch(*epoch, per_partition, KAFKA_STALL, &mut buf) {
                Ok(m) => m,
                Err(e) => {
                    st.fail(e.to_string());
                    false
                }
            };
            note(&mut to_commit, *epoch, &reader, *epoch + 1);
            ship(worker, input, probe, st, &mut buf, epoch);
            commit_done(&reader, &mut to_commit, false);
            if !more || st.error().is_some() {
                break;
            }
        }
    } else {
        let started = Instant::now();
        let period = settings.epoch;
        let ahead = follow_ahead(period);
        // At most this many records read and not yet stored: as many as replay allows.
        let max_in_flight = settings.batch * (AHEAD as usize + 1);
        let mut in_flight = InFlight::default();
        let mut committed_at = Instant::now();
        let first = *epoch;
        while !spec.stop.load(Relaxed) && st.error().is_none() {
            let now = first + (started.elapsed().as_nanos() / period.as_nanos().max(1)) as Epoch;
            if now > *epoch {
                note(&mut to_commit, *epoch, &reader, now);
                *epoch = now;
                input.advance_to(*epoch);
            }
            // Backpressure: read only while the stored outputs are at most `ahead` epochs
            // behind, and fewer than `max_in_flight` records wait for them.
            let behind = epoch.saturating_sub(ahead);
            let mut read = 0;
            let waiting = in_flight.settle(|e| !probe.less_equal(&e));
            if !probe.less_than(&behind) && waiting < max_in_flight {
                match reader.read_available(settings.batch.min(max_in_flight - waiting), &mut buf) {
                    Ok(n) => read = n,
                    Err(e) => st.fail(e.to_string()),
                }
                in_flight.add(*epoch, read);
                send(input, st, &mut buf);
            }
            worker.step_or_park(if read == 0 {
                Some(Duration::from_millis(2))
            } else {
                Some(Duration::ZERO)
            });
            timing_done(probe);
            if committed_at.elapsed() >= FOLLOW_COMMIT_EVERY {
                commit_done(&reader, &mut to_commit, false);
                committed_at = Instant::now();
            }
        }
    }
    // The last positions are committed by the caller once the input has closed and every
    // output is stored: closing the input seals the open hours.
    note(&mut to_commit, *epoch, &reader, *epoch + 1);
    let end = reader.positions();
    (reader, end)
}

/// Replay: records per partition per epoch, for a worker with `partitions` partitions.
fn per_partition(batch: usize, partitions: usize) -> u64 {
    (batch / partitions.max(1)).max(1) as u64
}

/// The recovery epochs a resume needs: as many as the longest re-read range takes, cut as
/// each partition's reader cuts it (partition `p` is read by worker `p % workers`, `workers`
/// counting every worker of every process).
pub fn recovery_epochs(
    start: &std::collections::BTreeMap<i32, i64>,
    read_end: &std::collections::BTreeMap<i32, i64>,
    workers: usize,
    batch: usize,
) -> Epoch {
    let count = |w: usize| start.keys().filter(|p| **p as usize % workers == w).count();
    start
        .iter()
        .map(|(p, s)| {
            let n = per_partition(batch, count(*p as usize % workers));
            let len = (read_end.get(p).copied().unwrap_or(*s) - s).max(0) as u64;
            len.div_ceil(n)
        })
        .max()
        .unwrap_or(0)
}

/// Commits what the workers stored: the lake's checkpoints (Kafka runs, docs/RECOVERY.md)
/// and the hours' manifests (docs/LAKE.md), from what the workers report.
struct Committer {
    recorder: Recorder,
    /// The lake: its storage, its retries, its keys.
    lake: Arc<LakeWriter>,
    topic: String,
    workers: usize,
    processes: usize,
    flow: FlowConfig,
    /// The manifests of the hours committed lately (the others are loaded when changed).
    manifests: Mutex<std::collections::BTreeMap<i64, Manifest>>,
    /// Replaced table versions no manifest lists any more, and when to delete them.
    replaced: Mutex<std::collections::VecDeque<(Instant, String)>>,
}

impl Committer {
    /// Commits every epoch up to `epoch`, whose outputs are all stored (`Epoch::MAX`: the end
    /// of the run): saves the checkpoint, then the manifest of each hour those epochs
    /// changed, then deletes the table versions the manifests stopped listing at least
    /// `lake.keep_replaced` ago (at the end of the run, all of them). A failure
    /// that outlasts the retries fails the run: without checkpoints a crash cannot be
    /// resumed, and without manifests readers that follow them would not see new data.
    fn save(&self, epoch: Epoch, st: &Status) {
        let Some(taken) = self
            .recorder
            .take(epoch, &self.topic, self.workers, self.processes, &self.flow)
        else {
            return;
        };
        if let Err(e) = self.commit(&taken, epoch == Epoch::MAX) {
            st.fail(e);
        }
    }

    fn commit(&self, taken: &crate::checkpoint::Taken, last: bool) -> Result<(), String> {
        let (storage, retry) = (self.lake.storage().as_ref(), self.lake.retry());
        if let Some(c) = &taken.checkpoint {
            retry
                .run("storing the checkpoint", || c.save(storage))
                .map_err(|e| format!("writing the checkpoint: {e}"))?;
        }
        let mut manifests = self.manifests.lock().unwrap_or_else(|e| e.into_inner());
        let mut replaced = self.replaced.lock().unwrap_or_else(|e| e.into_inner());
        for (&hour, keys) in &taken.files {
            let m = match manifests.entry(hour) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let stored = retry
                        .run("reading a manifest", || Manifest::load(storage, hour))
                        .map_err(|e| format!("reading the manifest of an hour: {e}"))?;
                    v.insert(stored.unwrap_or_else(|| Manifest::new(hour)))
                }
            };
            let superseded = m.add(keys.iter().cloned());
            m.commit += 1;
            m.read_end = taken.read_end.clone();
            retry
                .run("storing a manifest", || m.save(storage, hour))
                .map_err(|e| format!("writing the manifest of {}: {e}", m.hour))?;
            let due = Instant::now() + self.lake.keep_replaced();
            replaced.extend(superseded.into_iter().map(|k| (due, k)));
        }
        // Older hours change no more (a late reopening loads its manifest again).
        manifests.retain(|&h, _| h >= taken.oldest);
        let now = Instant::now();
        while let Some((due, k)) = replaced.front() {
            if !last && *due > now {
                break;
            }
            retry
                .run(&format!("deleting {k}"), || storage.delete(k))
                .map_err(|e| format!("deleting a replaced file: {e}"))?;
            replaced.pop_front();
        }
        Ok(())
    }
}

/// Worker 0 of a run from files, memory or the demo's collector: commits every epoch the
/// probe has passed (Kafka runs commit with their offsets, in `read_kafka`).
fn commit_stored(committer: Option<&Committer>, probe: &ProbeHandle<Epoch>, st: &Status) {
    if let Some(c) = committer {
        if let Some(done) = probe
            .with_frontier(|f| f.first().copied())
            .and_then(|t| t.checked_sub(1))
        {
            c.save(done, st);
        }
    }
}

/// The part each sealed batch becomes, as a report for the checkpoint and the manifests;
/// and the batches themselves, passed on.
fn report_parts<'scope>(
    sealed: timely::dataflow::Stream<'scope, Epoch, Vec<HourBatch>>,
    lake: Arc<LakeWriter>,
) -> (
    timely::dataflow::Stream<'scope, Epoch, Vec<Report>>,
    timely::dataflow::Stream<'scope, Epoch, Vec<HourBatch>>,
) {
    use timely::dataflow::channels::pact::Pipeline;
    use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
    use timely::dataflow::operators::generic::OutputBuilder;
    let mut builder = OperatorBuilder::new("ReportParts".to_owned(), sealed.scope());
    let mut input = builder.new_input(sealed, Pipeline);
    let (o_rep, s_rep) = builder.new_output::<Vec<Report>>();
    let (o_pass, s_pass) = builder.new_output::<Vec<HourBatch>>();
    let (mut o_rep, mut o_pass) = (OutputBuilder::from(o_rep), OutputBuilder::from(o_pass));
    builder.build(move |_| {
        move |_frontiers| {
            let (mut h_rep, mut h_pass) = (o_rep.activate(), o_pass.activate());
            input.for_each_stamp(|cap, data| {
                let t = *cap.least().expect("every message has a time");
                let (c_rep, c_pass) = (cap.delayed(&t, 0), cap.delayed(&t, 1));
                let (mut rep, mut pass) = (h_rep.session(&c_rep), h_pass.session(&c_pass));
                for batch in data {
                    rep.give_iterator(batch.iter().map(|b| Report::Part {
                        hour: b.hour,
                        worker: b.worker,
                        seq: b.seq,
                        open: b.kind == BatchKind::Open,
                        files: lake.keys(b),
                    }));
                    pass.give_container(batch);
                }
            });
        }
    });
    (s_rep, s_pass)
}

/// Sends every report to worker 0, which files it with its recorder. The returned stream
/// carries nothing: probing it tells when worker 0 has every report of an epoch.
fn report_to_worker_0<'scope>(
    positions: timely::dataflow::Stream<'scope, Epoch, Vec<Report>>,
    parts: Option<timely::dataflow::Stream<'scope, Epoch, Vec<Report>>>,
    c: Arc<Committer>,
    index: usize,
) -> timely::dataflow::Stream<'scope, Epoch, Vec<()>> {
    use timely::dataflow::channels::pact::Exchange;
    use timely::dataflow::operators::generic::Operator;
    use timely::dataflow::operators::Concat;
    let all = match parts {
        Some(p) => positions.concat(p),
        None => positions,
    };
    all.unary::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Exchange::new(|_: &Report| 0u64),
        "ReportToWorker0",
        move |_, _| {
            move |input, _output| {
                input.for_each(|cap, data| {
                    debug_assert_eq!(index, 0, "reports go to worker 0 only");
                    let t = *cap.least().expect("every message has a time");
                    for r in data.iter() {
                        c.recorder.record(t, r);
                    }
                });
            }
        },
    )
}

/// One change of the hourly collection: ((device, hour), stats), time, diff.
type HourlyUpdate = (((u32, i64), HourStats), Epoch, isize);

/// Sends every rejection to the dead-letter topic and every new hourly aggregate to the
/// changelog topic, from the worker that holds it. `probe` passes an epoch once the brokers
/// have acknowledged all of its records.
fn attach_kafka_sinks(
    out: &fmsflow_dataflows::Outputs<'_>,
    k: Arc<KafkaSinks>,
    st: Arc<Status>,
    probe: &ProbeHandle<Epoch>,
    recovery_epochs: Epoch,
) {
    let (k2, st1, st2, st3, st4) = (k.clone(), st.clone(), st.clone(), st.clone(), st);
    durable_sink(
        out.rejections.clone(),
        "DeadLetters",
        Tally::new(),
        move |t, batch: &mut Vec<Rejection>, tally| {
            // Recovery epochs re-read records whose dead letters were sent before the checkpoint.
            if t < recovery_epochs {
                return;
            }
            for r in batch.iter() {
                if let Err(e) = k.dead_letter(r, Some(tally.start(t))) {
                    st1.fail(e.to_string());
                }
            }
        },
        move |e| st2.fail(e),
    )
    .probe_with(probe);
    durable_sink(
        out.hourly.clone().inner,
        "Changelog",
        Tally::new(),
        move |t, batch: &mut Vec<HourlyUpdate>, tally| {
            // The changelog already holds the values the recovery epochs rebuild.
            if t < recovery_epochs {
                return;
            }
            // The collection retracts the old value of a key and adds the new one: send the new.
            for (((device, hour), stats), at, diff) in batch.iter() {
                if *diff > 0 {
                    if let Err(e) = k2.hourly(*device, *hour, stats, *at, Some(tally.start(t))) {
                        st3.fail(e.to_string());
                    }
                }
            }
        },
        move |e| st4.fail(e),
    )
    .probe_with(probe);
}

/// Batches waiting for the writer at most; beyond this the worker blocks (backpressure).
const WRITER_QUEUE: usize = 8;

/// The queues to one worker's lake writer threads. All batches of an hour go to the same
/// thread, so they are written in order (a later batch replaces the hour's tables).
struct WriterQueues(Vec<std::sync::mpsc::SyncSender<(HourBatch, Ticket)>>);

impl WriterQueues {
    /// Queues `b` for its hour's writer; blocks while that queue is full (backpressure).
    fn send(&self, b: HourBatch, ticket: Ticket) {
        let q = &self.0[b.hour.rem_euclid(self.0.len() as i64) as usize];
        // A writer thread is gone only after a fatal error, recorded in status.
        if let Err(SendError((_, ticket))) = q.send((b, ticket)) {
            ticket.fail("the lake writer has stopped".into());
        }
    }
}

/// Starts the [`LakeWriter::writers`] threads that encode and store one worker's hour
/// batches, finishing each batch's ticket once its files are in place. Several threads
/// overlap the waits of storage (an fsync, an upload) with each other.
fn spawn_writers(
    index: usize,
    lake: Arc<LakeWriter>,
    st: Arc<Status>,
) -> (WriterQueues, Vec<std::thread::JoinHandle<()>>) {
    let n = lake.writers();
    let (queues, threads) = (0..n)
        .map(|k| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(HourBatch, Ticket)>(WRITER_QUEUE);
            let (lake, st) = (lake.clone(), st.clone());
            let name = if n == 1 {
                format!("lake-writer-{index}")
            } else {
                format!("lake-writer-{index}.{k}")
            };
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    for (b, ticket) in rx {
                        write_one(&lake, &st, b, ticket);
                    }
                })
                .expect("spawning a lake writer thread");
            (tx, handle)
        })
        .unzip();
    (WriterQueues(queues), threads)
}

/// Encodes and stores one batch, then finishes its ticket (or fails it and the run).
fn write_one(lake: &LakeWriter, st: &Status, mut b: HourBatch, ticket: Ticket) {
    if let Some(e) = st.error() {
        ticket.fail(format!("not written: the run has failed ({e})"));
        return;
    }
    match lake.write(&mut b) {
        Ok(w) => {
            if b.hourly.is_some() || b.quality.is_some() {
                // An open part has no tables.
                let counter = if b.kind == BatchKind::Seal {
                    &st.hours_sealed
                } else {
                    &st.late_rewrites
                };
                counter.fetch_add(1, Relaxed);
            }
            st.files_written.fetch_add(w.files, Relaxed);
            st.rows_written.fetch_add(w.rows, Relaxed);
            ticket.finish();
        }
        Err(e) => {
            let e = format!("writing hour {} to the lake: {e}", b.hour);
            st.fail(e.clone());
            ticket.fail(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_epochs_hold_four_times_the_fleet_within_one_to_eight_batches() {
        let block = crate::connectors::file::BLOCK;
        assert_eq!(file_chunks(50_000, 100), (50_000, block));
        assert_eq!(file_chunks(50_000, 12_500), (50_000, block));
        assert_eq!(file_chunks(50_000, 15_000), (60_000, 2 * block));
        assert_eq!(file_chunks(50_000, 100_000), (400_000, 8 * block));
        assert_eq!(file_chunks(50_000, 10_000_000), (400_000, 8 * block));
        // Small batches are asked for: kept whatever the fleet.
        assert_eq!(file_chunks(20, 100), (20, block));
        assert_eq!(file_chunks(9_999, 100_000), (9_999, block));
        assert_eq!(file_chunks(0, 0), (1, block));
    }

    #[test]
    fn following_stays_two_seconds_ahead_at_most() {
        assert_eq!(follow_ahead(Duration::from_millis(20)), 100);
        assert_eq!(follow_ahead(Duration::from_millis(200)), 10);
        assert_eq!(follow_ahead(Duration::from_secs(5)), AHEAD);
    }

    #[test]
    fn timing_observes_epochs_once_done_and_only_recent_readings() {
        let m = crate::metrics::shared();
        let (epochs, readings) = (m.epoch_duration.get_sample_count(), m.latency.get_sample_count());
        let now = 1_800_000_000_000;
        let rec = |ingest_ms: Option<i64>| RawRecord {
            payload: Default::default(),
            ingest_ms,
            pos: fmsflow_dataflows::SourcePos { source: 0, offset: 0 },
        };
        let mut t = Timing::default();
        // Recent, a little ahead (skew), none, a day old, far ahead (a compressed clock).
        let batch = [
            rec(Some(now - 250)),
            rec(Some(now + 1_000)),
            rec(None),
            rec(Some(now - 86_400_000)),
            rec(Some(now + 600_000)),
        ];
        t.sent(3, &batch, now);
        t.sent(3, &batch[..1], now);
        t.sent(4, &batch[..1], now);
        t.done(|e| e < 4, now + 50);
        // Other tests record too: at least ours arrived, and epoch 4 is still waiting.
        assert!(m.epoch_duration.get_sample_count() > epochs);
        assert!(m.latency.get_sample_count() >= readings + 3);
        assert_eq!(t.epochs.len(), 1);
        assert_eq!(t.epochs[0].2, vec![now - 250]);
        t.done(|_| true, now);
        assert!(t.epochs.is_empty());
    }

    #[test]
    fn in_flight_counts_records_until_their_epoch_is_stored() {
        let mut f = InFlight::default();
        f.add(1, 10);
        f.add(1, 5);
        f.add(3, 7);
        assert_eq!(f.settle(|_| false), 22);
        assert_eq!(f.settle(|e| e < 2), 7);
        f.add(4, 1);
        assert_eq!(f.settle(|e| e < 4), 1);
        assert_eq!(f.settle(|_| true), 0);
    }
}
