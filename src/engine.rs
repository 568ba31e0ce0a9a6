//! `fmsflow run`'s runtime: starts W timely workers in this process, builds the dataflow on
//! each, feeds it from a source, and attaches the lake sink. Only this driver advances
//! epochs: by batch when replaying, by wall-clock period when live.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fmsflow_dataflows::dataflow::{Epoch, FlowConfig, HourBatch};
use fmsflow_dataflows::{build, RawRecord};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::ProbeHandle;

use crate::connectors::file::FileReader;
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
}

/// Runs the dataflow to completion (end of the files, or all live senders dropped).
pub fn run(
    settings: EngineSettings,
    source: Source,
    lake: Option<Arc<LakeWriter>>,
    status: Arc<Status>,
) -> Result<(), EngineError> {
    let workers = settings.workers;
    let (files, memory, receivers) = match source {
        Source::Files(f) => (Some(f), None, None),
        Source::Memory(m) => (None, Some(m), None),
        Source::Live(rx) => (None, None, Some(rx)),
    };
    let live = Arc::new(Mutex::new(
        receivers.map(|rx| rx.into_iter().map(Some).collect::<Vec<_>>()),
    ));
    let st = status.clone();
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let index = worker.index();
        let peers = worker.peers();
        let probe = ProbeHandle::new();
        let (st_r, st_j) = (st.clone(), st.clone());
        // Encoding and writing run beside the worker, so fsync waits overlap the dataflow.
        let (mut to_writer, writer) = match &lake {
            Some(lake) => {
                let (tx, handle) = spawn_writer(index, lake.clone(), st.clone());
                (Some(tx), Some(handle))
            }
            None => (None, None),
        };
        let flow = settings.flow.clone();
        let mut input = worker.dataflow::<Epoch, _, _>(|scope| {
            let (handle, raw) = scope.new_input::<RawRecord>();
            let out = build(raw, &flow);
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
            // Without a lake nothing needs sealing: the aggregates are the output.
            out.hourly.clone().inner.probe_with(&probe);
            out.quality.clone().inner.probe_with(&probe);
            if let Some(tx) = to_writer.take() {
                out.sealed()
                    .probe_with(&probe)
                    .sink(Pipeline, "LakeSink", move |(input, _)| {
                        input.for_each_stamp(|_, data| {
                            for batch in data {
                                for b in batch.drain(..) {
                                    // The writer thread is gone only after a fatal error, recorded in status.
                                    let _ = tx.send(b);
                                }
                            }
                        });
                    });
            }
            handle
        });

        let mut epoch: Epoch = 0;
        let mut buf: Vec<RawRecord> = Vec::with_capacity(settings.batch);
        if let Some(files) = &files {
            let mine: Vec<(usize, &PathBuf)> = if files.len() >= peers {
                files.iter().enumerate().filter(|(i, _)| i % peers == index).collect()
            } else {
                files.iter().enumerate().collect()
            };
            let (sub_index, sub_peers) = if files.len() >= peers { (0, 1) } else { (index, peers) };
            for (i, path) in mine {
                let mut reader =
                    match FileReader::open(path, i as u32, sub_index, sub_peers, crate::connectors::file::BLOCK) {
                        Ok(r) => r,
                        Err(e) => {
                            st.fail(e.to_string());
                            break;
                        }
                    };
                loop {
                    let more = match reader.read_chunk(settings.batch - buf.len(), &mut buf) {
                        Ok(m) => m,
                        Err(e) => {
                            st.fail(e.to_string());
                            false
                        }
                    };
                    if buf.len() >= settings.batch {
                        ship(worker, &mut input, &probe, &st, &mut buf, &mut epoch);
                    }
                    if !more || st.error().is_some() {
                        break;
                    }
                }
            }
            st.received.fetch_add(buf.len() as u64, Relaxed);
            input.send_batch(&mut buf);
        } else if let Some(records) = &memory {
            let mut it = records.iter().skip(index).step_by(peers).peekable();
            while it.peek().is_some() {
                buf.extend(it.by_ref().take(settings.batch).cloned());
                ship(worker, &mut input, &probe, &st, &mut buf, &mut epoch);
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
                loop {
                    let now = (started.elapsed().as_nanos() / period.as_nanos().max(1)) as Epoch;
                    if now > epoch {
                        epoch = now;
                        input.advance_to(epoch);
                    }
                    match rx.recv_timeout(Duration::from_millis(5)) {
                        Ok(r) => {
                            st.received.fetch_add(1, Relaxed);
                            input.send(r);
                            while let Ok(r) = rx.try_recv() {
                                st.received.fetch_add(1, Relaxed);
                                input.send(r);
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    worker.step();
                }
            } else {
                // No channel for this worker: its input closes at once and the others go on.
                tracing::debug!(worker = index, "no live input for this worker");
            }
        }
        drop(input);
        worker.step_or_park_while(Some(PARK), || !probe.done());
        // Dropping the dataflow's sink closes the writer's channel; wait for the last files.
        for id in worker.installed_dataflows() {
            worker.drop_dataflow(id);
        }
        if let Some(w) = writer {
            if w.join().is_err() {
                st.fail(format!("the lake writer of worker {index} panicked"));
            }
        }
    })
    .map_err(|message| EngineError::Start { workers, message })?;
    for r in guards.join() {
        r.map_err(|e| EngineError::Failed(format!("a worker stopped: {e}")))?;
    }
    match status.error() {
        Some(e) => Err(EngineError::Failed(e)),
        None => Ok(()),
    }
}

/// How long a worker with nothing to do may sleep before it looks again. Another worker's
/// data or progress wakes it sooner; sleeping rather than spinning leaves the core to the
/// workers and lake writers that have work (they outnumber the cores on small machines).
const PARK: Duration = Duration::from_millis(10);

/// Replay reads ahead of the dataflow by at most this many epochs.
const AHEAD: u64 = 2;

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
    st.received.fetch_add(buf.len() as u64, Relaxed);
    input.send_batch(buf);
    buf.clear();
    *epoch += 1;
    input.advance_to(*epoch);
    let behind = epoch.saturating_sub(AHEAD);
    worker.step_or_park_while(Some(PARK), || probe.less_than(&behind));
}

/// Batches waiting for the writer at most; beyond this the worker blocks (backpressure).
const WRITER_QUEUE: usize = 8;

/// Starts the thread that encodes and stores one worker's hour batches.
fn spawn_writer(
    index: usize,
    lake: Arc<LakeWriter>,
    st: Arc<Status>,
) -> (std::sync::mpsc::SyncSender<HourBatch>, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<HourBatch>(WRITER_QUEUE);
    let handle = std::thread::Builder::new()
        .name(format!("lake-writer-{index}"))
        .spawn(move || {
            for b in rx {
                if st.error().is_some() {
                    continue;
                }
                match lake.write(&b) {
                    Ok(w) => {
                        if b.hourly.is_some() || b.quality.is_some() {
                            let counter = if b.seq == 0 {
                                &st.hours_sealed
                            } else {
                                &st.late_rewrites
                            };
                            counter.fetch_add(1, Relaxed);
                        }
                        st.files_written.fetch_add(w.files, Relaxed);
                        st.rows_written.fetch_add(w.rows, Relaxed);
                    }
                    Err(e) => st.fail(format!("writing hour {} to the lake: {e}", b.hour)),
                }
            }
        })
        .expect("spawning a lake writer thread");
    (tx, handle)
}
