//! The pipeline's notion of "now". Real time normally; for `demo --fast` a compressed
//! clock shared by the simulator and the poller, so event and ingest times agree and an
//! hour passes in seconds.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A clock that runs `speedup` times faster than the wall clock from `start_ms`.
#[derive(Clone, Debug)]
pub struct Clock {
    origin: Instant,
    start_ms: i64,
    speedup: f64,
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Clock {
    /// The wall clock.
    pub fn real() -> Self {
        Clock {
            origin: Instant::now(),
            start_ms: wall_ms(),
            speedup: 1.0,
        }
    }
    /// A compressed clock starting now.
    pub fn fast(speedup: f64) -> Self {
        Clock {
            origin: Instant::now(),
            start_ms: wall_ms(),
            speedup,
        }
    }
    /// Current time in ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.start_ms + (self.origin.elapsed().as_secs_f64() * 1000.0 * self.speedup) as i64
    }
    /// How many times faster than the wall clock.
    pub fn speedup(&self) -> f64 {
        self.speedup
    }
}
