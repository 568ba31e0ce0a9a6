//! The engine as one timely cluster over several processes (`fmsflow run --hosts … --process
//! I`): connecting the processes, with a bounded wait and an error naming whoever is missing,
//! and telling which process was lost when a connection breaks mid-run.
//!
//! Timely's own start-up retries a missing peer for ever and prints to stdout; here each
//! pair of processes connects (the higher index dials the lower) and shakes hands first:
//! both sides check they belong to the same cluster (the same host list and worker count)
//! before the sockets go to timely. A stray connection (a port scanner, a health check) is
//! dropped without harm.
//!
//! A timely cluster cannot go on without one of its processes: when a connection breaks,
//! timely's network thread for that peer panics. [`watch_for_lost_peers`] turns that panic
//! into one clear line naming the process, and the engine stops with
//! [`crate::engine::EngineError::PeerLost`] so a supervisor restarts the whole cluster, which
//! resumes from the lake's checkpoint.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// This process's place in a cluster of engine processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// Index of this process, 0-based.
    pub process: usize,
    /// `host:port` of every process, in process order; this one listens on its own.
    pub addresses: Vec<String>,
    /// How long start-up waits for every other process.
    pub connect_timeout: Duration,
}

/// Errors connecting the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// This process's own address cannot be listened on.
    #[error("cluster: process {process} cannot listen on its address {address}: {message}")]
    Listen {
        process: usize,
        address: String,
        message: String,
    },
    /// Some processes did not connect in time.
    #[error(
        "cluster: process {process} waited {waited:?} (cluster.connect_timeout) and is still missing {}; \
         start every process with the same --hosts and --workers and its own --process",
        missing.join(", ")
    )]
    Missing {
        process: usize,
        waited: Duration,
        missing: Vec<String>,
    },
    /// A peer belongs to another cluster (another host list or worker count).
    #[error("cluster: process {peer} ({address}) {problem}")]
    Mismatch {
        peer: usize,
        address: String,
        problem: String,
    },
}

const MAGIC: &[u8; 8] = b"FMSFLOW1";
/// How long one handshake may take once connected.
const HANDSHAKE: Duration = Duration::from_secs(5);
/// Between attempts to reach a peer that is not up yet.
const RETRY: Duration = Duration::from_millis(200);
/// How often start-up says whom it is still waiting for.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// What each side tells the other: who it is and what cluster it thinks it is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    index: u64,
    processes: u64,
    workers: u64,
    hosts: u64,
}

impl Hello {
    fn of(c: &Cluster, workers: usize) -> Hello {
        Hello {
            index: c.process as u64,
            processes: c.addresses.len() as u64,
            workers: workers as u64,
            hosts: fnv(c.addresses.join(",").as_bytes()),
        }
    }

    fn write(&self, s: &mut TcpStream) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(40);
        b.extend_from_slice(MAGIC);
        for v in [self.index, self.processes, self.workers, self.hosts] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        s.write_all(&b)
    }

    /// `Ok(None)`: not an fmsflow process (wrong magic).
    fn read(s: &mut TcpStream) -> std::io::Result<Option<Hello>> {
        let mut b = [0u8; 40];
        s.read_exact(&mut b)?;
        if &b[..8] != MAGIC {
            return Ok(None);
        }
        let at = |i: usize| u64::from_le_bytes(b[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
        Ok(Some(Hello {
            index: at(0),
            processes: at(1),
            workers: at(2),
            hosts: at(3),
        }))
    }

    /// Why `peer` (as it introduced itself) is not in this cluster, if it is not.
    fn mismatch(&self, peer: &Hello) -> Option<String> {
        if peer.processes != self.processes || peer.hosts != self.hosts {
            Some(format!(
                "was started with another --hosts list ({} processes); every process needs the same list, in the same order",
                peer.processes
            ))
        } else if peer.workers != self.workers {
            Some(format!(
                "runs {} workers and this process {}: every process needs the same --workers",
                peer.workers, self.workers
            ))
        } else {
            None
        }
    }
}

/// FNV-1a: a stable fingerprint of the host list (the same in every build).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Connects this process to every other one of `c`, each running `workers` workers: the
/// sockets in process order, `None` at this process's own place (what timely's
/// `initialize_networking_from_sockets` takes). Waits at most `c.connect_timeout`.
pub fn connect(c: &Cluster, workers: usize) -> Result<Vec<Option<TcpStream>>, ClusterError> {
    let me = Hello::of(c, workers);
    let n = c.addresses.len();
    let listener = listen(c)?;
    let deadline = Instant::now() + c.connect_timeout;
    // Both directions at once: this process dials the lower indexes while the higher ones
    // dial it.
    let slots: Arc<Mutex<Vec<Option<TcpStream>>>> = Arc::new(Mutex::new((0..n).map(|_| None).collect()));
    // Per missing peer, the last reason it was not reached.
    let why: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(vec!["never connected".to_string(); n]));
    let fatal: Arc<Mutex<Option<ClusterError>>> = Arc::default();
    let dialer = {
        let (c, slots, why, fatal) = (c.clone(), slots.clone(), why.clone(), fatal.clone());
        std::thread::spawn(move || {
            for peer in 0..c.process {
                match dial(&c, peer, me, deadline, &why) {
                    Ok(Some(s)) => slots.lock().unwrap_or_else(|e| e.into_inner())[peer] = Some(s),
                    Ok(None) => return,
                    Err(e) => {
                        *fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                }
            }
        })
    };
    let accepted = accept(c, &listener, me, deadline, &slots, &fatal);
    let _ = dialer.join();
    if let Some(e) = fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    accepted?;
    let slots = std::mem::take(&mut *slots.lock().unwrap_or_else(|e| e.into_inner()));
    let why = why.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<String> = (0..n)
        .filter(|i| *i != c.process && slots[*i].is_none())
        .map(|i| format!("process {i} ({}: {})", c.addresses[i], why[i]))
        .collect();
    if !missing.is_empty() {
        return Err(ClusterError::Missing {
            process: c.process,
            waited: c.connect_timeout,
            missing,
        });
    }
    Ok(slots)
}

fn listen(c: &Cluster) -> Result<TcpListener, ClusterError> {
    let address = &c.addresses[c.process];
    let err = |message: String| ClusterError::Listen {
        process: c.process,
        address: address.clone(),
        message,
    };
    let l = TcpListener::bind(address.as_str()).map_err(|e| err(e.to_string()))?;
    l.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
    Ok(l)
}

/// Prepares a handshaken socket for timely: blocking, no timeouts, no Nagle.
fn ready(s: TcpStream) -> std::io::Result<TcpStream> {
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Dials `peer` until it answers as the expected process or the deadline passes (`Ok(None)`,
/// its reason left in `why`).
fn dial(
    c: &Cluster,
    peer: usize,
    me: Hello,
    deadline: Instant,
    why: &Mutex<Vec<String>>,
) -> Result<Option<TcpStream>, ClusterError> {
    let address = &c.addresses[peer];
    let note = |reason: String| why.lock().unwrap_or_else(|e| e.into_inner())[peer] = reason;
    let mut reported = Instant::now();
    while Instant::now() < deadline {
        let attempt = (|| -> Result<TcpStream, String> {
            let addr = address
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve: {e}"))?
                .next()
                .ok_or("resolves to no address")?;
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let mut s = TcpStream::connect_timeout(&addr, left.min(HANDSHAKE)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(HANDSHAKE)).map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(HANDSHAKE)).map_err(|e| e.to_string())?;
            me.write(&mut s).map_err(|e| format!("handshake: {e}"))?;
            match Hello::read(&mut s).map_err(|e| format!("handshake: {e}"))? {
                None => Err("answers, but is not an fmsflow engine process".into()),
                Some(h) if h.index != peer as u64 => Err(format!("answers as process {}", h.index)),
                Some(h) => match me.mismatch(&h) {
                    Some(problem) => Err(format!("{MISMATCH}{problem}")),
                    None => Ok(s),
                },
            }
        })();
        match attempt {
            Ok(s) => {
                // The peer checked this process's hello, too, before it answered.
                let h = ready(s).map_err(|e| ClusterError::Mismatch {
                    peer,
                    address: address.clone(),
                    problem: e.to_string(),
                })?;
                tracing::info!(peer, address = %address, "connected to process {peer}");
                return Ok(Some(h));
            }
            Err(reason) => {
                if let Some(problem) = reason.strip_prefix(MISMATCH) {
                    return Err(ClusterError::Mismatch {
                        peer,
                        address: address.clone(),
                        problem: problem.to_string(),
                    });
                }
                if reported.elapsed() >= REPORT_EVERY {
                    eprintln!("cluster: waiting for process {peer} at {address} ({reason})");
                    reported = Instant::now();
                }
                note(reason);
            }
        }
        std::thread::sleep(RETRY.min(deadline.saturating_duration_since(Instant::now())));
    }
    Ok(None)
}

const MISMATCH: &str = "mismatch: ";

/// Accepts the processes of higher index until all are in or the deadline passes.
fn accept(
    c: &Cluster,
    listener: &TcpListener,
    me: Hello,
    deadline: Instant,
    slots: &Mutex<Vec<Option<TcpStream>>>,
    fatal: &Mutex<Option<ClusterError>>,
) -> Result<(), ClusterError> {
    let n = c.addresses.len();
    let expected: Vec<usize> = (c.process + 1..n).collect();
    let mut reported = Instant::now();
    loop {
        let missing: Vec<usize> = {
            let s = slots.lock().unwrap_or_else(|e| e.into_inner());
            expected.iter().copied().filter(|i| s[*i].is_none()).collect()
        };
        if missing.is_empty() || Instant::now() >= deadline || fatal.lock().unwrap_or_else(|e| e.into_inner()).is_some()
        {
            return Ok(());
        }
        match listener.accept() {
            Ok((mut s, from)) => {
                let hello = s
                    .set_nonblocking(false)
                    .and_then(|_| s.set_read_timeout(Some(HANDSHAKE)))
                    .and_then(|_| s.set_write_timeout(Some(HANDSHAKE)))
                    .and_then(|_| Hello::read(&mut s));
                let h = match hello {
                    Ok(Some(h)) => h,
                    Ok(None) | Err(_) => {
                        tracing::warn!(%from, "cluster: dropped a connection that is not an fmsflow process");
                        continue;
                    }
                };
                let peer = h.index as usize;
                if !expected.contains(&peer) {
                    tracing::warn!(%from, peer, "cluster: dropped a connection from a process that should not dial this one");
                    continue;
                }
                // Answer even a mismatch, so the other side sees it and stops too.
                let answered = me.write(&mut s);
                if let Some(problem) = me.mismatch(&h) {
                    return Err(ClusterError::Mismatch {
                        peer,
                        address: c.addresses[peer].clone(),
                        problem,
                    });
                }
                if answered.is_err() {
                    continue;
                }
                match ready(s) {
                    Ok(s) => {
                        tracing::info!(peer, %from, "process {peer} connected");
                        slots.lock().unwrap_or_else(|e| e.into_inner())[peer] = Some(s);
                    }
                    Err(e) => tracing::warn!(peer, error = %e, "cluster: a connection failed"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if reported.elapsed() >= REPORT_EVERY {
                    let names: Vec<String> = missing.iter().map(|i| format!("{i} ({})", c.addresses[*i])).collect();
                    eprintln!("cluster: waiting for process(es) {} to connect", names.join(", "));
                    reported = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(ClusterError::Listen {
                    process: c.process,
                    address: c.addresses[c.process].clone(),
                    message: e.to_string(),
                })
            }
        }
    }
}

/// The peer whose connection broke first: (its index, its address, what broke).
static LOST: OnceLock<(usize, String, String)> = OnceLock::new();

/// The process this one lost, if a connection broke.
pub fn lost() -> Option<&'static (usize, String, String)> {
    LOST.get()
}

/// Turns the panic of timely's network thread for a broken connection into one line naming
/// the lost process, and keeps the panics that follow from it (every worker's, as its
/// channels close) quiet. Other panics are reported as before.
pub fn watch_for_lost_peers(addresses: Vec<String>) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let addresses = Arc::new(addresses);
    if INSTALLED.set(()).is_err() {
        return;
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("");
        let peer = name
            .strip_prefix("timely:recv-")
            .or_else(|| name.strip_prefix("timely:send-"))
            .and_then(|i| i.parse::<usize>().ok());
        if let Some(peer) = peer {
            let cause = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let address = addresses.get(peer).cloned().unwrap_or_default();
            if LOST.set((peer, address.clone(), cause.clone())).is_ok() {
                eprintln!("cluster: lost process {peer} ({address}): {cause}; stopping");
            }
            return;
        }
        if LOST.get().is_some() {
            // A consequence of the lost connection, already reported.
            return;
        }
        previous(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addresses(n: usize) -> Vec<String> {
        let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect()
    }

    fn cluster(addresses: &[String], process: usize, timeout_ms: u64) -> Cluster {
        Cluster {
            process,
            addresses: addresses.to_vec(),
            connect_timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[test]
    fn three_processes_connect_each_pair_once_whatever_the_start_order() {
        let a = free_addresses(3);
        let handles: Vec<_> = [2usize, 0, 1]
            .into_iter()
            .map(|p| {
                let c = cluster(&a, p, 20_000);
                std::thread::spawn(move || (p, connect(&c, 2)))
            })
            .collect();
        for h in handles {
            let (p, r) = h.join().unwrap();
            let socks = r.unwrap_or_else(|e| panic!("process {p}: {e}"));
            assert_eq!(socks.len(), 3);
            for (i, s) in socks.iter().enumerate() {
                assert_eq!(s.is_none(), i == p, "process {p}, slot {i}");
            }
        }
    }

    #[test]
    fn a_missing_process_is_named_after_the_timeout() {
        let a = free_addresses(3);
        // Process 1 alone: 0 never answers, 2 never dials.
        let e = connect(&cluster(&a, 1, 600), 1).unwrap_err().to_string();
        assert!(e.contains(&format!("process 0 ({}", a[0])), "{e}");
        assert!(e.contains(&format!("process 2 ({}", a[2])), "{e}");
        assert!(e.contains("connect_timeout"), "{e}");
    }

    #[test]
    fn another_worker_count_or_host_list_is_refused_naming_the_peer() {
        let a = free_addresses(2);
        let c0 = cluster(&a, 0, 10_000);
        let zero = std::thread::spawn(move || connect(&c0, 2));
        let e = connect(&cluster(&a, 1, 10_000), 3).unwrap_err().to_string();
        assert!(e.contains("process 0") && e.contains("--workers"), "{e}");
        let e0 = zero.join().unwrap().unwrap_err().to_string();
        assert!(e0.contains("process 1") && e0.contains("--workers"), "{e0}");

        let mut b = a.clone();
        b.push("127.0.0.1:9".into());
        let c0 = cluster(&a, 0, 10_000);
        let zero = std::thread::spawn(move || connect(&c0, 1));
        let e = connect(&cluster(&b, 1, 10_000), 1).unwrap_err().to_string();
        assert!(e.contains("--hosts"), "{e}");
        assert!(zero.join().unwrap().unwrap_err().to_string().contains("--hosts"));
    }

    #[test]
    fn a_stray_connection_does_not_disturb_the_start() {
        let a = free_addresses(2);
        let c0 = cluster(&a, 0, 20_000);
        let zero = std::thread::spawn(move || connect(&c0, 1));
        // A port scanner: connects, sends junk, leaves.
        let probe = a[0].clone();
        crate_wait(|| {
            TcpStream::connect(&probe)
                .map(|mut s| s.write_all(b"GET / HTTP/1.0\r\n\r\n"))
                .is_ok()
        });
        let one = connect(&cluster(&a, 1, 20_000), 1).unwrap();
        assert!(one[0].is_some());
        assert!(zero.join().unwrap().unwrap()[1].is_some());
    }

    fn crate_wait(mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "condition not met");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
