//! Which epochs the durable outputs cover. A sink whose writes finish on another thread (the
//! lake writer, the Kafka producer's delivery reports) holds a capability for each epoch
//! until every write of that epoch has finished. A probe placed after such sinks therefore
//! passes an epoch only once the lake files and the Kafka records of that epoch are stored,
//! on every worker of every process: that is when the engine may commit the source offsets
//! the epoch read.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fmsflow_dataflows::dataflow::Epoch;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::scheduling::SyncActivator;

/// The writes of one sink that have started and not finished, by epoch. Shared between the
/// sink's operator (which starts writes) and whatever finishes them.
#[derive(Default)]
pub struct Tally {
    inner: Mutex<TallyInner>,
}

#[derive(Default)]
struct TallyInner {
    outstanding: BTreeMap<Epoch, u64>,
    error: Option<String>,
    waker: Option<SyncActivator>,
}

impl Tally {
    /// A new, empty tally.
    pub fn new() -> Arc<Tally> {
        Arc::new(Tally::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TallyInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts one write of `epoch`; the returned ticket must be finished or failed.
    pub fn start(self: &Arc<Self>, epoch: Epoch) -> Ticket {
        *self.lock().outstanding.entry(epoch).or_default() += 1;
        Ticket {
            tally: self.clone(),
            epoch,
        }
    }

    /// Whether every write of `epoch` started so far has finished.
    pub fn settled(&self, epoch: Epoch) -> bool {
        !self.lock().outstanding.contains_key(&epoch)
    }

    /// The first write failure, if any.
    pub fn error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    fn end(&self, epoch: Epoch, error: Option<String>) {
        let mut g = self.lock();
        if let Some(n) = g.outstanding.get_mut(&epoch) {
            *n -= 1;
            if *n == 0 {
                g.outstanding.remove(&epoch);
            }
        }
        if g.error.is_none() {
            g.error = error;
        }
        // Wake the sink so that it releases the epoch (or reports the error).
        if let Some(w) = &g.waker {
            let _ = w.activate();
        }
    }
}

/// One started write. Dropping a ticket without finishing it leaves its epoch open forever,
/// so every path must end in [`Ticket::finish`] or [`Ticket::fail`].
pub struct Ticket {
    tally: Arc<Tally>,
    epoch: Epoch,
}

impl Ticket {
    /// The write is stored.
    pub fn finish(self) {
        self.tally.end(self.epoch, None);
    }
    /// The write failed for good; the run must stop (the epoch stays uncovered).
    pub fn fail(self, error: String) {
        let tally = self.tally.clone();
        tally.end(self.epoch, Some(error));
        // The epoch must not look covered: start a write that never ends.
        std::mem::forget(tally.start(self.epoch));
    }
}

/// A sink that hands each container of `stream` to `write` (with its epoch and the tally to
/// start writes on) and holds the epoch until all of them finish. Its output carries no data;
/// probe it to learn which epochs are stored. `on_error` is called once with the first
/// failure reported to the tally.
pub fn durable_sink<'scope, C, W, E>(
    stream: Stream<'scope, Epoch, C>,
    name: &str,
    tally: Arc<Tally>,
    mut write: W,
    mut on_error: E,
) -> Stream<'scope, Epoch, Vec<()>>
where
    C: timely::Container + Default + 'static,
    W: FnMut(Epoch, &mut C, &Arc<Tally>) + 'static,
    E: FnMut(String) + 'static,
{
    let worker = stream.scope().worker();
    stream.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(Pipeline, name, move |root, info| {
        tally.lock().waker = Some(worker.sync_activator_for(info.address.to_vec()));
        let mut root = Some(root);
        let mut held: BTreeMap<Epoch, Capability<Epoch>> = BTreeMap::new();
        let mut reported = false;
        move |(input, frontier), _output| {
            input.for_each(|cap, data| {
                let t = *cap.least().expect("every message has a time");
                write(t, data, &tally);
                if let (false, Some(r)) = (held.contains_key(&t), root.as_ref()) {
                    held.insert(t, r.delayed(&t));
                }
            });
            held.retain(|t, _| !tally.settled(*t));
            if !reported {
                if let Some(e) = tally.error() {
                    reported = true;
                    on_error(e);
                }
            }
            match frontier.frontier().iter().min() {
                Some(f) => {
                    if let Some(r) = root.as_mut() {
                        r.downgrade(f);
                    }
                }
                None => root = None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use timely::dataflow::operators::vec::Input;
    use timely::dataflow::operators::Probe;
    use timely::dataflow::ProbeHandle;

    /// The probe after a durable sink passes an epoch only when that epoch's writes finish,
    /// whatever order they finish in.
    #[test]
    fn holds_each_epoch_until_its_writes_finish() {
        timely::execute_directly(|worker| {
            let probe = ProbeHandle::new();
            let tickets: Arc<Mutex<Vec<Ticket>>> = Arc::default();
            let errors: Arc<Mutex<Vec<String>>> = Arc::default();
            let (t2, e2) = (tickets.clone(), errors.clone());
            let mut input = worker.dataflow::<Epoch, _, _>(|scope| {
                let (handle, stream) = scope.new_input::<u32>();
                durable_sink(
                    stream,
                    "Test",
                    Tally::new(),
                    move |t, data: &mut Vec<u32>, tally| {
                        for _ in data.drain(..) {
                            t2.lock().unwrap().push(tally.start(t));
                        }
                    },
                    move |e| e2.lock().unwrap().push(e),
                )
                .probe_with(&probe);
                handle
            });
            let settle = |worker: &mut timely::worker::Worker| {
                for _ in 0..20 {
                    worker.step();
                }
            };
            input.send(1);
            input.send(2);
            input.advance_to(1);
            input.send(3);
            input.advance_to(2);
            settle(worker);
            assert!(probe.less_than(&1), "epoch 0 has unfinished writes");
            let mut t = std::mem::take(&mut *tickets.lock().unwrap());
            assert_eq!(t.len(), 3);
            // Epoch 1's write finishes first: epoch 0 still holds everything back.
            t.pop().unwrap().finish();
            settle(worker);
            assert!(probe.less_than(&1));
            t.pop().unwrap().finish();
            settle(worker);
            assert!(probe.less_than(&1), "one write of epoch 0 is still open");
            t.pop().unwrap().finish();
            settle(worker);
            assert!(!probe.less_than(&2), "every write finished");
            // A failed write never lets its epoch pass, and is reported once.
            input.send(4);
            input.advance_to(3);
            settle(worker);
            tickets.lock().unwrap().pop().unwrap().fail("disk full".into());
            settle(worker);
            assert!(probe.less_than(&3));
            assert_eq!(*errors.lock().unwrap(), vec!["disk full".to_string()]);
            drop(input);
            settle(worker);
            assert!(!probe.done(), "the failed epoch is held for good");
            // As the engine does after a failure: drop the dataflow that cannot complete.
            for id in worker.installed_dataflows() {
                worker.drop_dataflow(id);
            }
        });
    }
}
