//! fmsflow's runtime: connectors, the engine driver, the lake, the simulator and the demo.
//! The pure dataflow (model, rules, aggregates) is the `fmsflow-dataflows` crate.

pub mod api;
pub mod backoff;
pub mod checkpoint;
pub mod clock;
pub mod cluster;
pub mod collect;
pub mod config;
pub mod connectors;
pub mod demo;
pub mod durable;
pub mod engine;
pub mod fms;
pub mod gen;
pub mod lake;
pub mod metrics;
pub mod shutdown;
pub mod sim;
pub mod status;

/// Turns off transparent huge pages for this process (Linux; elsewhere nothing). mimalloc
/// asks for huge pages on its memory, so every fresh or returned 2 MiB region is zeroed in
/// full by the kernel on its first touch, however little of it is then used: with
/// 50,000-record epochs allocated and freed per worker, that zeroing took 15-30 % of the
/// workers' time (docs/BENCHMARKS.md). Call it first thing in `main`.
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process; no memory is passed.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
