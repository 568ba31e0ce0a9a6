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
    /// The clock of `fmsflow sim` and `fmsflow collect`: the wall clock, or, with
    /// `FMSFLOW_CLOCK_SPEEDUP=X`, one running X times faster than it from the Unix time
    /// `FMSFLOW_CLOCK_ORIGIN_MS` (default: now). Processes given the same two values agree on
    /// the time, so `scripts/soak --speedup` runs days of event and ingest time through
    /// separate processes within an hour.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let Some(s) = var("FMSFLOW_CLOCK_SPEEDUP") else {
            return Ok(Clock::real());
        };
        let speedup: f64 = s
            .trim()
            .parse()
            .ok()
            .filter(|x: &f64| x.is_finite() && *x > 0.0)
            .ok_or_else(|| format!("FMSFLOW_CLOCK_SPEEDUP={s:?}: expected a positive number"))?;
        let now = wall_ms();
        let origin = match var("FMSFLOW_CLOCK_ORIGIN_MS") {
            None => now,
            Some(o) => o
                .trim()
                .parse()
                .map_err(|_| format!("FMSFLOW_CLOCK_ORIGIN_MS={o:?}: expected a Unix time in milliseconds"))?,
        };
        Ok(Clock {
            origin: Instant::now(),
            start_ms: origin + ((now - origin) as f64 * speedup) as i64,
            speedup,
        })
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
