//! `fmsflow sim`: the FMS API simulator. `GET /{id}/` for ids 1..=N returns one reading in
//! exactly the FMS contract; other paths are 404; `/health` answers `ok`; `/stats` reports
//! how many responses were served and how many of each kind of dirty record, so tests know
//! the truth; `/metrics` has the same as Prometheus series. `PUT /control/silence/{id}`
//! silences a device (it answers 503 until `DELETE /control/silence/{id}`), to rehearse a
//! device going quiet.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use fmsflow_dataflows::Rule;

use crate::clock::Clock;
use crate::fms::{clean_payload, dirty_kind, dirty_payload};

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

/// Shared simulator state.
pub struct Sim {
    settings: SimSettings,
    clock: Clock,
    served: AtomicU64,
    dirty: [AtomicU64; Rule::ALL.len()],
    requests: Vec<AtomicU64>,
    /// Each device's last clean response and its time.
    last_clean: Vec<Mutex<Option<(i64, String)>>>,
    /// Devices answering 503, by id.
    silenced: Vec<std::sync::atomic::AtomicBool>,
    /// 503 answers of silenced devices.
    silenced_served: AtomicU64,
    metrics: crate::metrics::SimMetrics,
}

/// Counts of what the simulator served.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SimStats {
    /// Device responses served (clean and dirty).
    pub served: u64,
    /// Dirty responses by rule name.
    pub dirty: std::collections::BTreeMap<String, u64>,
}

impl Sim {
    /// A simulator on `clock`.
    pub fn new(settings: SimSettings, clock: Clock) -> Arc<Self> {
        let n = settings.devices as usize + 1;
        Arc::new(Sim {
            clock,
            served: AtomicU64::new(0),
            dirty: std::array::from_fn(|_| AtomicU64::new(0)),
            requests: (0..n).map(|_| AtomicU64::new(0)).collect(),
            last_clean: (0..n).map(|_| Mutex::new(None)).collect(),
            silenced: (0..n).map(|_| std::sync::atomic::AtomicBool::new(false)).collect(),
            silenced_served: AtomicU64::new(0),
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
        self.served.fetch_add(1, Ordering::Relaxed);
        if let Some(kind) = dirty_kind(s.seed, device, n, s.dirty_rate) {
            if let Some(body) = dirty_payload(
                kind,
                s.seed,
                device,
                s.devices,
                now,
                last.as_ref().map(|l| l.1.as_str()),
            ) {
                self.dirty[Rule::ALL.iter().position(|r| *r == kind).unwrap_or(0)].fetch_add(1, Ordering::Relaxed);
                return body;
            }
        }
        let body = clean_payload(s.seed, device, now);
        // Two polls of a device within one second get the same reading time: the second is a
        // duplicate the engine rejects, so it is counted as one.
        if last.as_ref().is_some_and(|(t, _)| *t == now) {
            self.dirty[Rule::ALL.iter().position(|r| *r == Rule::Duplicate).unwrap_or(0)]
                .fetch_add(1, Ordering::Relaxed);
        }
        *last = Some((now, body.clone()));
        body
    }

    /// What was served so far.
    pub fn stats(&self) -> SimStats {
        SimStats {
            served: self.served.load(Ordering::Relaxed),
            dirty: Rule::ALL
                .iter()
                .zip(self.dirty.iter())
                .map(|(r, c)| (r.name().to_string(), c.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// The HTTP routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/stats", get(stats))
            .route("/metrics", get(metrics))
            .route("/control/silence/{id}", put(silence).delete(unsilence))
            .route("/{id}/", get(device))
            .route("/{id}", get(device))
            .with_state(self.clone())
    }
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    json(serde_json::to_string(&sim.stats()).unwrap_or_default())
}

async fn metrics(State(sim): State<Arc<Sim>>) -> Response {
    let stats = sim.stats();
    let dirty: u64 = stats.dirty.values().sum();
    let silenced = sim.silenced_served.load(Ordering::Relaxed);
    // In `SIM_KINDS` then `Rule::ALL` order.
    let counts: Vec<u64> = [stats.served.saturating_sub(dirty), silenced]
        .into_iter()
        .chain(
            Rule::ALL
                .iter()
                .map(|r| stats.dirty.get(r.name()).copied().unwrap_or(0)),
        )
        .collect();
    let now_silenced = sim.silenced.iter().filter(|s| s.load(Ordering::Relaxed)).count();
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        sim.metrics.render(&counts, now_silenced),
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

async fn silence(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    set_silenced(&sim, &id, true)
}

async fn unsilence(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    set_silenced(&sim, &id, false)
}

fn set_silenced(sim: &Sim, id: &str, on: bool) -> Response {
    match known(sim, id) {
        Some(d) => {
            sim.silenced[d as usize].store(on, Ordering::Relaxed);
            tracing::info!(device = d, silenced = on, "simulator control");
            format!("device {d} {}\n", if on { "silenced" } else { "answering" }).into_response()
        }
        None => not_found(sim, id),
    }
}

async fn device(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    match known(&sim, &id) {
        Some(d) if sim.silenced[d as usize].load(Ordering::Relaxed) => {
            sim.silenced_served.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "device silenced (PUT/DELETE /control/silence/{id})\n",
            )
                .into_response()
        }
        Some(d) => json(sim.respond(d)),
        None => not_found(&sim, &id),
    }
}

/// Binds 127.0.0.1:`port` (0 picks a free port) and serves until `shutdown` resolves.
pub async fn serve(
    sim: Arc<Sim>,
    port: u16,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let app = sim.router();
    let handle = tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await });
    Ok((addr, handle))
}
