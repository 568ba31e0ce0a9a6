//! `fmsflow sim`: the FMS API simulator. `GET /{id}/` for ids 1..=N returns one reading in
//! exactly the FMS contract; other paths are 404; `/health` answers `ok`; `/stats` reports
//! how many responses were served and how many of each kind of dirty record, so tests know
//! the truth (`/stats/devices`: the same per device); `/metrics` has the same as Prometheus
//! series.
//!
//! **Faults.** A device can be given a fault, and then answers this instead of its reading:
//! - `silence`: 503 (a device gone quiet);
//! - `error`: 500 with a JSON error body;
//! - `hang`: nothing for `--hang-for` (60 s, far beyond `collector.timeout`), then 504; a
//!   simulator that stops releases the requests it holds at once;
//! - `garbage`: 200 with a body that is not an FMS reading: the reading cut short, an HTML
//!   error page, random bytes or JSON of another shape ([`crate::fms::garbage_payload`]).
//!
//! `PUT /control/fault/{id}?kind=<kind>` gives device `id` a fault and `DELETE
//! /control/fault/{id}` ends it; `PUT /control/silence/{id}` and `DELETE
//! /control/silence/{id}` do the same for `silence` (the monitoring test silences a device
//! this way). `--fault-share F --fault-kinds K,...` gives a share of the fleet a fault from the
//! start (see [`Sim::fault_share`]).
//!
//! **The truth** (`/stats`): `served` counts every 200 answer, the ones a collector produces
//! to Kafka: clean, dirty and garbage. `dirty` counts those the engine must reject, by the
//! rule that rejects them, garbage included. `faults` counts the answers of faulty devices by
//! kind: `silence`, `error` and `hang` answers carry no reading and reach no topic; `garbage`
//! answers are also in `served` and `dirty`. So the raw topic holds `served` records, the
//! lake `served − Σ dirty` readings, and the dead letters `dirty`, rule by rule.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use fmsflow_dataflows::Rule;

use crate::clock::Clock;
use crate::fms::{clean_payload, dirty_kind, dirty_payload, garbage_payload, mix};

/// What the simulator serves.
#[derive(Clone, Debug)]
pub struct SimSettings {
    /// Devices 1..=devices exist.
    pub devices: u32,
    /// Seed of all values.
    pub seed: u64,
    /// Fraction of dirty responses.
    pub dirty_rate: f64,
}

/// What a faulty device answers instead of its reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// 503: the device is silent.
    Silence,
    /// 500 with a JSON error body.
    Error,
    /// No answer until the hang time passes (or the simulator stops), then 504.
    Hang,
    /// 200 with a body that is not an FMS reading.
    Garbage,
}

impl Fault {
    /// Every fault, in the order of [`crate::metrics::SIM_FAULTS`].
    pub const ALL: [Fault; 4] = [Fault::Silence, Fault::Error, Fault::Hang, Fault::Garbage];

    /// The kind's name, as `?kind=`, `--fault-kinds` and `/stats` spell it.
    pub fn name(self) -> &'static str {
        crate::metrics::SIM_FAULTS[self as usize]
    }

    /// The state code of a device with this fault (0: none).
    fn code(self) -> u8 {
        self as u8 + 1
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "silence" | "silenced" => Ok(Fault::Silence),
            "error" => Ok(Fault::Error),
            "hang" => Ok(Fault::Hang),
            "garbage" => Ok(Fault::Garbage),
            _ => Err(format!(
                "unknown fault kind {s:?}: one of silence, error, hang, garbage"
            )),
        }
    }
}

/// How long a hanging device holds a request by default (`--hang-for`).
pub const DEFAULT_HANG: Duration = Duration::from_secs(60);

/// One device's answers so far.
#[derive(Default)]
struct DeviceCounts {
    /// 200 answers (clean, dirty, garbage).
    served: AtomicU64,
    /// Of those, the ones the engine must reject.
    dirty: AtomicU64,
    /// Answers without a reading: silenced, error, hang.
    refused: AtomicU64,
}

/// Shared simulator state.
pub struct Sim {
    settings: SimSettings,
    clock: Clock,
    served: AtomicU64,
    /// Dirty readings served, by rule (garbage not included).
    dirty: [AtomicU64; Rule::ALL.len()],
    /// Garbage served, by the rule that rejects it.
    garbage: [AtomicU64; Rule::ALL.len()],
    /// Answers of faulty devices, by kind (`Fault::ALL` order).
    faulted: [AtomicU64; Fault::ALL.len()],
    /// Readings served per device: the `n` of its next dirty draw.
    requests: Vec<AtomicU64>,
    devices: Vec<DeviceCounts>,
    /// Each device's last clean response and its time.
    last_clean: Vec<Mutex<Option<(i64, String)>>>,
    /// Each device's fault, by id (0: none, else `Fault::code`).
    fault: Vec<AtomicU8>,
    /// How long a hanging device holds a request, in ms.
    hang_ms: AtomicU64,
    /// Set when the server stops: hanging requests end at once.
    stopping: tokio::sync::watch::Sender<bool>,
    metrics: crate::metrics::SimMetrics,
}

/// Counts of what the simulator served.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SimStats {
    /// Device responses served with a 200: clean, dirty and garbage (what reaches Kafka).
    pub served: u64,
    /// Served responses the engine must reject, by rule name (garbage included).
    pub dirty: BTreeMap<String, u64>,
    /// Answers of faulty devices, by fault kind (`garbage` ones are in `served` too).
    #[serde(default)]
    pub faults: BTreeMap<String, u64>,
}

/// One device's counts, in `/stats/devices`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceStats {
    /// 200 answers: clean, dirty and garbage.
    pub served: u64,
    /// Of those, the ones the engine must reject.
    pub dirty: u64,
    /// Answers without a reading (silenced, error, hang).
    pub refused: u64,
    /// The device's fault now, if any.
    pub fault: Option<String>,
}

impl Sim {
    /// A simulator on `clock`.
    pub fn new(settings: SimSettings, clock: Clock) -> Arc<Self> {
        let n = settings.devices as usize + 1;
        Arc::new(Sim {
            clock,
            served: AtomicU64::new(0),
            dirty: std::array::from_fn(|_| AtomicU64::new(0)),
            garbage: std::array::from_fn(|_| AtomicU64::new(0)),
            faulted: std::array::from_fn(|_| AtomicU64::new(0)),
            requests: (0..n).map(|_| AtomicU64::new(0)).collect(),
            devices: (0..n).map(|_| DeviceCounts::default()).collect(),
            last_clean: (0..n).map(|_| Mutex::new(None)).collect(),
            fault: (0..n).map(|_| AtomicU8::new(0)).collect(),
            hang_ms: AtomicU64::new(DEFAULT_HANG.as_millis() as u64),
            stopping: tokio::sync::watch::Sender::new(false),
            metrics: crate::metrics::SimMetrics::new(),
            settings,
        })
    }

    /// The response body for one device request, counting it.
    pub fn respond(&self, device: u32) -> String {
        let s = &self.settings;
        let n = self.requests[device as usize].fetch_add(1, Ordering::Relaxed);
        // Whole seconds, as the FMS API reports.
        let now = self.clock.now_ms() / 1000 * 1000;
        let mut last = self.last_clean[device as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let counts = &self.devices[device as usize];
        self.served.fetch_add(1, Ordering::Relaxed);
        counts.served.fetch_add(1, Ordering::Relaxed);
        if let Some(kind) = dirty_kind(s.seed, device, n, s.dirty_rate) {
            if let Some(body) = dirty_payload(
                kind,
                s.seed,
                device,
                s.devices,
                now,
                last.as_ref().map(|l| l.1.as_str()),
            ) {
                self.dirty[rule_index(kind)].fetch_add(1, Ordering::Relaxed);
                counts.dirty.fetch_add(1, Ordering::Relaxed);
                return body;
            }
        }
        let body = clean_payload(s.seed, device, now);
        // Two polls of a device within one second get the same reading time: the second is a
        // duplicate the engine rejects, so it is counted as one.
        if last.as_ref().is_some_and(|(t, _)| *t == now) {
            self.dirty[rule_index(Rule::Duplicate)].fetch_add(1, Ordering::Relaxed);
            counts.dirty.fetch_add(1, Ordering::Relaxed);
        }
        *last = Some((now, body.clone()));
        body
    }

    /// A garbage answer of `device` (its body and content type), counting it as served and as
    /// dirty under the rule that rejects it.
    fn respond_garbage(&self, device: u32) -> (Vec<u8>, &'static str) {
        let counts = &self.devices[device as usize];
        let n = counts.served.fetch_add(1, Ordering::Relaxed);
        counts.dirty.fetch_add(1, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.faulted[Fault::Garbage as usize].fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now_ms() / 1000 * 1000;
        let (body, content_type, rule) = garbage_payload(self.settings.seed, device, n, now);
        self.garbage[rule_index(rule)].fetch_add(1, Ordering::Relaxed);
        (body, content_type)
    }

    /// Counts an answer of `device` without a reading (`fault` is not `Garbage`).
    fn refuse(&self, device: u32, fault: Fault) {
        self.faulted[fault as usize].fetch_add(1, Ordering::Relaxed);
        self.devices[device as usize].refused.fetch_add(1, Ordering::Relaxed);
    }

    /// The fault of `device` now, if any.
    pub fn fault(&self, device: u32) -> Option<Fault> {
        let code = self.fault.get(device as usize)?.load(Ordering::Relaxed);
        Fault::ALL.into_iter().find(|f| f.code() == code)
    }

    /// Gives `device` a fault, or (`None`) ends its fault. Devices outside 1..=devices are
    /// ignored.
    pub fn set_fault(&self, device: u32, fault: Option<Fault>) {
        if (1..=self.settings.devices).contains(&device) {
            self.fault[device as usize].store(fault.map_or(0, Fault::code), Ordering::Relaxed);
        }
    }

    /// Gives `share` of the fleet (rounded to whole devices) a fault, dealing `kinds` in
    /// turn. The devices are chosen from the seed, so the same seed and fleet choose the
    /// same ones. Returns them, by id.
    pub fn fault_share(&self, share: f64, kinds: &[Fault]) -> Vec<(u32, Fault)> {
        let n = self.settings.devices;
        if kinds.is_empty() {
            return Vec::new();
        }
        let k = ((share.clamp(0.0, 1.0) * n as f64).round() as usize).min(n as usize);
        let mut ids: Vec<u32> = (1..=n).collect();
        ids.sort_by_key(|d| mix(self.settings.seed ^ 0xFA17, *d as u64, 19));
        let mut chosen: Vec<(u32, Fault)> = ids[..k]
            .iter()
            .enumerate()
            .map(|(i, d)| (*d, kinds[i % kinds.len()]))
            .collect();
        chosen.sort();
        for (d, f) in &chosen {
            self.set_fault(*d, Some(*f));
        }
        chosen
    }

    /// How long a hanging device holds a request (default [`DEFAULT_HANG`]).
    pub fn set_hang_for(&self, hold: Duration) {
        self.hang_ms.store(hold.as_millis() as u64, Ordering::Relaxed);
    }

    /// Waits as a hanging device does: the hang time, or until the server stops.
    async fn hang(&self) {
        let hold = Duration::from_millis(self.hang_ms.load(Ordering::Relaxed));
        let mut stopping = self.stopping.subscribe();
        let _ = tokio::time::timeout(hold, stopping.wait_for(|s| *s)).await;
    }

    /// What was served so far.
    pub fn stats(&self) -> SimStats {
        SimStats {
            served: self.served.load(Ordering::Relaxed),
            dirty: Rule::ALL
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let n = self.dirty[i].load(Ordering::Relaxed) + self.garbage[i].load(Ordering::Relaxed);
                    (r.name().to_string(), n)
                })
                .collect(),
            faults: Fault::ALL
                .iter()
                .map(|f| (f.name().to_string(), self.faulted[*f as usize].load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Each device's counts so far, by id.
    pub fn device_stats(&self) -> BTreeMap<u32, DeviceStats> {
        (1..=self.settings.devices)
            .map(|d| {
                let c = &self.devices[d as usize];
                let stats = DeviceStats {
                    served: c.served.load(Ordering::Relaxed),
                    dirty: c.dirty.load(Ordering::Relaxed),
                    refused: c.refused.load(Ordering::Relaxed),
                    fault: self.fault(d).map(|f| f.name().to_string()),
                };
                (d, stats)
            })
            .collect()
    }

    /// The HTTP routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/stats", get(stats))
            .route("/stats/devices", get(device_stats))
            .route("/metrics", get(metrics))
            .route("/control/fault/{id}", put(set_fault).delete(clear_fault))
            .route("/control/silence/{id}", put(silence).delete(unsilence))
            .route("/{id}/", get(device))
            .route("/{id}", get(device))
            .with_state(self.clone())
    }
}

fn rule_index(rule: Rule) -> usize {
    Rule::ALL.iter().position(|r| *r == rule).unwrap_or(0)
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    json(serde_json::to_string(&sim.stats()).unwrap_or_default())
}

async fn device_stats(State(sim): State<Arc<Sim>>) -> Response {
    json(serde_json::to_string(&sim.device_stats()).unwrap_or_default())
}

async fn metrics(State(sim): State<Arc<Sim>>) -> Response {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let served = load(&sim.served);
    let dirty: u64 = sim.dirty.iter().map(load).sum();
    let garbage: u64 = sim.garbage.iter().map(load).sum();
    // In `SIM_KINDS` then `Rule::ALL` order: each answer counted once, garbage as `garbage`.
    let counts: Vec<u64> = [served.saturating_sub(dirty + garbage)]
        .into_iter()
        .chain(Fault::ALL.iter().map(|f| load(&sim.faulted[*f as usize])))
        .chain(sim.dirty.iter().map(load))
        .collect();
    let faulty: Vec<usize> = Fault::ALL
        .iter()
        .map(|f| {
            sim.fault
                .iter()
                .filter(|c| c.load(Ordering::Relaxed) == f.code())
                .count()
        })
        .collect();
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        sim.metrics.render(&counts, &faulty),
    )
        .into_response()
}

/// The device `id` names, if it is one.
fn known(sim: &Sim, id: &str) -> Option<u32> {
    id.parse::<u32>().ok().filter(|d| *d >= 1 && *d <= sim.settings.devices)
}

fn not_found(sim: &Sim, id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("no device {id:?}; devices are 1..={}\n", sim.settings.devices),
    )
        .into_response()
}

async fn set_fault(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let Some(kind) = query.get("kind") else {
        return (
            StatusCode::BAD_REQUEST,
            "say which fault: ?kind=silence|error|hang|garbage\n",
        )
            .into_response();
    };
    match kind.parse::<Fault>() {
        Ok(fault) => control(&sim, &id, Some(fault)),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

async fn clear_fault(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    control(&sim, &id, None)
}

async fn silence(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    control(&sim, &id, Some(Fault::Silence))
}

/// Ends a `silence` fault; another fault is left as it is (409).
async fn unsilence(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    match known(&sim, &id).map(|d| (d, sim.fault(d))) {
        Some((d, Some(other))) if other != Fault::Silence => (
            StatusCode::CONFLICT,
            format!("device {d} is not silenced but has the fault {other}; DELETE /control/fault/{d} ends it\n"),
        )
            .into_response(),
        _ => control(&sim, &id, None),
    }
}

fn control(sim: &Sim, id: &str, fault: Option<Fault>) -> Response {
    match known(sim, id) {
        Some(d) => {
            sim.set_fault(d, fault);
            tracing::info!(
                device = d,
                fault = fault.map_or("none", Fault::name),
                "simulator control"
            );
            match fault {
                Some(Fault::Silence) => format!("device {d} silenced\n"),
                Some(f) => format!("device {d}: fault {f}\n"),
                None => format!("device {d} answering\n"),
            }
            .into_response()
        }
        None => not_found(sim, id),
    }
}

async fn device(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    let Some(d) = known(&sim, &id) else {
        return not_found(&sim, &id);
    };
    match sim.fault(d) {
        None => json(sim.respond(d)),
        Some(Fault::Silence) => {
            sim.refuse(d, Fault::Silence);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "device silenced (PUT/DELETE /control/silence/{id})\n",
            )
                .into_response()
        }
        Some(Fault::Error) => {
            sim.refuse(d, Fault::Error);
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "application/json")],
                format!("{{\"error\": \"internal error reading device {d}\", \"fault\": \"error\"}}\n"),
            )
                .into_response()
        }
        Some(Fault::Hang) => {
            sim.refuse(d, Fault::Hang);
            sim.hang().await;
            (
                StatusCode::GATEWAY_TIMEOUT,
                "device hung (fault `hang`); the hang time passed or the simulator is stopping\n",
            )
                .into_response()
        }
        Some(Fault::Garbage) => {
            let (body, content_type) = sim.respond_garbage(d);
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
    }
}

/// Binds 127.0.0.1:`port` (0 picks a free port) and serves until `shutdown` resolves; the
/// requests hanging devices hold are then answered at once.
pub async fn serve(
    sim: Arc<Sim>,
    port: u16,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let app = sim.router();
    let shutdown = async move {
        shutdown.await;
        sim.stopping.send_replace(true);
    };
    let handle = tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await });
    Ok((addr, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(devices: u32) -> Arc<Sim> {
        Sim::new(
            SimSettings {
                devices,
                seed: 5,
                dirty_rate: 0.0,
            },
            Clock::real(),
        )
    }

    #[test]
    fn a_fault_share_is_deterministic_and_deals_the_kinds_in_turn() {
        let kinds = [Fault::Error, Fault::Hang, Fault::Garbage];
        let a = sim(100).fault_share(0.1, &kinds);
        assert_eq!(a, sim(100).fault_share(0.1, &kinds));
        assert_eq!(a.len(), 10);
        for k in kinds {
            assert!(a.iter().filter(|(_, f)| *f == k).count() >= 3, "{a:?}");
        }
        let s = sim(100);
        s.fault_share(0.1, &kinds);
        for (d, f) in &a {
            assert_eq!(s.fault(*d), Some(*f));
        }
        assert_eq!((1..=100).filter(|d| s.fault(*d).is_some()).count(), 10);
        assert!(sim(100).fault_share(0.0, &kinds).is_empty());
        assert_eq!(sim(7).fault_share(1.0, &[Fault::Hang]).len(), 7);
    }

    #[test]
    fn garbage_counts_as_served_and_dirty_under_its_rule() {
        let s = sim(3);
        s.set_fault(2, Some(Fault::Garbage));
        for _ in 0..40 {
            s.respond_garbage(2);
        }
        s.respond(1);
        s.refuse(3, Fault::Error);
        let st = s.stats();
        assert_eq!(st.served, 41);
        assert_eq!(st.dirty.values().sum::<u64>(), 40, "{st:?}");
        assert!(
            st.dirty["malformed_json"] > 0 && st.dirty["missing_field"] > 0,
            "{st:?}"
        );
        assert_eq!(st.faults["garbage"], 40);
        assert_eq!(st.faults["error"], 1);
        let per = s.device_stats();
        assert_eq!((per[&2].served, per[&2].dirty, per[&2].refused), (40, 40, 0));
        assert_eq!(per[&2].fault.as_deref(), Some("garbage"));
        assert_eq!((per[&3].served, per[&3].refused), (0, 1));
        assert_eq!(per[&1].fault, None);
    }
}
