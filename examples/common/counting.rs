//! For the memory examples (`examples/hourmem.rs`, `examples/hourseal.rs`,
//! `dataflows/examples/statemem.rs`): the system allocator, counting the bytes it has out,
//! their numeric arguments, and a live fleet's readings.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting the bytes it has out in [`live`]: the global allocator of
/// every example that includes this module.
pub struct Counting;

#[global_allocator]
static ALLOC: Counting = Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Heap bytes out now.
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most heap bytes out at once since the start or the last [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts [`peak`] over from the bytes out now.
pub fn reset_peak() {
    PEAK.store(live(), Ordering::Relaxed);
}

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Numeric argument `i` (1-based), or `default`.
pub fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| panic!("argument {i} ({a:?}) is not a number"))
        })
        .unwrap_or(default)
}

/// A reading of `device` at `time_ms` as a live engine gets it: from partition device mod
/// the partitions (`offsets.len()`), at that partition's next offset, ingested 200 ms later.
#[allow(dead_code)] // hourmem generates its input as files
pub fn fleet_reading(device: u32, time_ms: i64, offsets: &mut [u64]) -> fmsflow_dataflows::Reading {
    let source = device % offsets.len() as u32;
    let offset = &mut offsets[source as usize];
    *offset += 1;
    fmsflow_dataflows::Reading {
        device,
        time_ms,
        ingest_ms: Some(time_ms + 200),
        pos: fmsflow_dataflows::SourcePos {
            source,
            offset: *offset,
        },
        ..fmsflow_dataflows::Reading::EMPTY
    }
}
