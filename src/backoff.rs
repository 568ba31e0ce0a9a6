//! Retrying an operation whose failures may pass by themselves, with growing pauses.

use std::time::{Duration, Instant};

/// Runs `op` until it succeeds, fails with an error `passes` says no retry can help, or the
/// next pause would take it past `limit` since the first try. Pauses start at `first` and
/// double up to `max`; `on_retry` sees each retried error, the pause about to be taken and
/// the time failed so far (for a log line).
pub fn retry<T, E>(
    limit: Duration,
    first: Duration,
    max: Duration,
    passes: impl Fn(&E) -> bool,
    mut on_retry: impl FnMut(&E, Duration, Duration),
    mut op: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let start = Instant::now();
    let mut pause = first;
    loop {
        match op() {
            Err(e) if passes(&e) && start.elapsed() + pause <= limit => {
                on_retry(&e, pause, start.elapsed());
                std::thread::sleep(pause);
                pause = (pause * 2).min(max);
            }
            other => return other,
        }
    }
}
