//! Polls the FMS API over HTTP: every device once per interval, polls spread evenly over the
//! interval with jitter, a bound on requests in flight, a per-request timeout, and retries
//! with backoff. Failures are counted and logged at most once per few seconds; they never
//! stop the poller.
//!
//! A device that hangs cannot hold up the others: the schedule never waits for a request
//! (each poll waits for its slot in a task of its own), and a device is polled again only once
//! its previous poll has ended. A poll that falls due while the device's previous one is still
//! running (waiting for a slot, asking, or retrying) is skipped and counted
//! (`fmsflow_collector_polls_skipped_total`), so a hanging device holds at most one of the
//! `concurrency` slots, for at most `(retries + 1) × timeout` plus the backoff.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fmsflow_dataflows::{RawRecord, SourcePos};
use tokio::sync::Semaphore;

use crate::clock::Clock;
use crate::fms::{mix, unit};
use crate::status::Status;

/// Poller settings.
#[derive(Clone, Debug)]
pub struct PollSettings {
    /// Base URL; devices are at `{base}/{id}/`.
    pub base: String,
    /// Devices 1..=devices.
    pub devices: u32,
    /// Wall-clock time between two polls of one device.
    pub interval: Duration,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Retries after a failure.
    pub retries: u32,
}

/// Polls until `stop` is set, handing each response body to `deliver` as a raw record
/// stamped with the poll time from `clock`.
pub async fn poll(
    settings: PollSettings,
    clock: Clock,
    status: Arc<Status>,
    deliver: Arc<dyn Fn(u32, RawRecord) + Send + Sync>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let client = match reqwest::Client::builder()
        .timeout(settings.timeout)
        .pool_max_idle_per_host(settings.concurrency)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            status.fail(format!("cannot build the HTTP client: {e}"));
            return;
        }
    };
    let limit = Arc::new(Semaphore::new(settings.concurrency));
    // Each device's poll that has not ended yet, by id.
    let busy: Arc<Vec<AtomicBool>> = Arc::new((0..=settings.devices).map(|_| AtomicBool::new(false)).collect());
    let mut polls = tokio::task::JoinSet::new();
    let seq = Arc::new(AtomicU64::new(0));
    let last_log = Arc::new(std::sync::Mutex::new(Instant::now() - Duration::from_secs(60)));
    let n = settings.devices as u64;
    let start = tokio::time::Instant::now();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let round_start = start + settings.interval * round as u32;
        for d in 1..=settings.devices {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // Spread polls over the interval, with a little jitter so they never align.
            let slot = settings
                .interval
                .mul_f64(((d as u64 - 1) as f64 + 0.5 * unit(mix(round, d as u64, 3))) / n as f64);
            tokio::time::sleep_until(round_start + slot).await;
            crate::metrics::shared().polls_expected.inc();
            while polls.try_join_next().is_some() {}
            if busy[d as usize].swap(true, Ordering::AcqRel) {
                crate::metrics::shared().polls_skipped.inc();
                let mut last = last_log.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() > Duration::from_secs(5) {
                    *last = Instant::now();
                    tracing::warn!(
                        device = d,
                        "poll skipped: the device's previous poll is still running (it hangs, or every slot is taken; counted, logged every 5 s)"
                    );
                }
                continue;
            }
            let (client, settings, clock, status, deliver, seq, last_log, limit) = (
                client.clone(),
                settings.clone(),
                clock.clone(),
                status.clone(),
                deliver.clone(),
                seq.clone(),
                last_log.clone(),
                limit.clone(),
            );
            let done = PollDone(busy.clone(), d as usize);
            polls.spawn(async move {
                let _done = done;
                let Ok(_permit) = limit.acquire_owned().await else {
                    return;
                };
                let url = format!("{}/{d}/", settings.base.trim_end_matches('/'));
                let mut backoff = Duration::from_millis(50);
                let metrics = crate::metrics::shared();
                for attempt in 0..=settings.retries {
                    let asked = Instant::now();
                    let answer = fetch(&client, &url).await;
                    let class = match &answer {
                        Ok(_) => "2xx",
                        Err((class, _)) => class,
                    };
                    metrics.poll(class, asked.elapsed().as_secs_f64());
                    match answer {
                        Ok(body) => {
                            let offset = seq.fetch_add(1, Ordering::Relaxed);
                            let raw = RawRecord {
                                payload: body.into(),
                                ingest_ms: Some(clock.now_ms()),
                                pos: SourcePos { source: 0, offset },
                            };
                            deliver(d, raw);
                            return;
                        }
                        Err((_, e)) => {
                            status.poll_errors.fetch_add(1, Ordering::Relaxed);
                            let mut last = last_log.lock().unwrap_or_else(|e| e.into_inner());
                            if last.elapsed() > Duration::from_secs(5) {
                                *last = Instant::now();
                                tracing::warn!(url = %url, attempt, error = %e, "poll failed (further failures are counted, logged every 5 s)");
                            }
                        }
                    }
                    if attempt < settings.retries {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            });
        }
        round += 1;
    }
    // Let the polls due finish so nothing polled is lost.
    while polls.join_next().await.is_some() {}
}

/// Marks a device's poll ended when its task ends, however it ends.
struct PollDone(Arc<Vec<AtomicBool>>, usize);

impl Drop for PollDone {
    fn drop(&mut self) {
        self.0[self.1].store(false, Ordering::Release);
    }
}

/// One request: the body, or the outcome's class (`crate::metrics::POLL_CLASSES`) and why.
async fn fetch(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, (&'static str, String)> {
    let failed = |e: reqwest::Error| (if e.is_timeout() { "timeout" } else { "error" }, e.to_string());
    let resp = client.get(url).send().await.map_err(failed)?;
    let status = resp.status();
    if !status.is_success() {
        let class = match status.as_u16() {
            500.. => "5xx",
            400.. => "4xx",
            _ => "error",
        };
        return Err((class, format!("HTTP {status}")));
    }
    resp.bytes().await.map(|b| b.to_vec()).map_err(failed)
}
