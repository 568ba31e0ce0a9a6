//! The query API and the web dashboard: JSON over HTTP on every engine process
//! (`--http ADDR:PORT`), answered from the process's [`view::LiveView`] and, in a cluster,
//! from every other process's (the receiving process fans the query out, as of one epoch).
//!
//! Paths (documented in `openapi.json`, served at `/api/v1/openapi.json`):
//! `/api/v1/status`, `/api/v1/devices/{id}/hourly`, `/api/v1/devices/{id}/latest`,
//! `/api/v1/fleet/hourly`, `/api/v1/quality`; the dashboard at `/`.

pub mod answers;
pub mod archive;
pub mod client;
/// The `api_request` fuzz target's harness: the router over an in-memory view, and the
/// checks of its answers (docs/FUZZING.md).
#[doc(hidden)]
pub mod fuzzing;
pub mod view;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use fmsflow_dataflows::dataflow::Epoch;
use fmsflow_dataflows::time::{format_rfc3339, parse_rfc3339, HOUR_MS};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::status::Status;
use answers::*;
use view::LiveView;

/// How long a process asked for an epoch its view has not reached yet waits for it.
const CATCH_UP: Duration = Duration::from_secs(2);
/// How long a fanned-out query waits for another process's answer.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest range of hours one query may cover (31 days).
pub const MAX_HOURS: i64 = 31 * 24;
/// The range a device or quality query covers when `from` is not given.
pub const DEFAULT_HOURS: i64 = 24;

/// The API server's settings.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// Where to listen, `host:port` (port 0 picks a free one).
    pub listen: String,
    /// Bearer token every `/api/` request must carry; `None`: no authentication (refused
    /// unless `listen` is a loopback address).
    pub token: Option<String>,
    /// Base URLs (`http://host:port`) of every process's API, in process order; empty for a
    /// single process.
    pub peers: Vec<String>,
    /// This process's index in `peers`.
    pub process: usize,
    /// Queries answered at once; more get 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// Requests a second one client address may make (bursts of twice as many); more get
    /// 429 with `Retry-After`. 0: no limit.
    pub rate_limit: f64,
    /// Devices are 1..=devices.
    pub devices: u32,
    /// `collector.interval`: every device is polled this often (for availability).
    pub poll_interval: std::time::Duration,
}

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    /// The address does not parse or cannot be bound.
    #[error("--http {addr}: {message}")]
    Bind { addr: String, message: String },
    /// A non-loopback address without a token.
    #[error(
        "--http {0} is not a loopback address: set api.token (FMSFLOW_API__TOKEN) so the API asks \
         for it, or listen on 127.0.0.1"
    )]
    NoToken(String),
    /// `peers` does not name this process.
    #[error("api.peers has {peers} entries: it must list every process's API in process order, this one's ({process}) included")]
    Peers { peers: usize, process: usize },
}

/// A running API server: stops when dropped.
pub struct ApiServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Api {
    view: Arc<LiveView>,
    status: Arc<Status>,
    settings: ApiSettings,
    client: reqwest::Client,
    limit: Arc<Semaphore>,
    started: Instant,
    metrics: Metrics,
    clients: RateLimit,
}

/// Longest request target (path and query) the API reads; longer gets 414.
const MAX_URI: usize = 4096;
/// Largest request body the API accepts (it takes none); larger gets 413.
const MAX_BODY: u64 = 1024;
/// Client addresses the rate limit remembers before it forgets the idle ones.
const MAX_CLIENTS: usize = 10_000;

/// Per-client token buckets: `rate` requests a second, bursts of twice that. The cluster's
/// own processes (the addresses of `api.peers`) are not limited: a query fans out to them.
struct RateLimit {
    rate: f64,
    peers: std::collections::HashSet<std::net::IpAddr>,
    clients: std::sync::Mutex<HashMap<std::net::IpAddr, (f64, Instant)>>,
}

impl RateLimit {
    fn new(rate: f64, peers: &[String]) -> Self {
        use std::net::ToSocketAddrs;
        let peers = peers
            .iter()
            .filter_map(|u| {
                u.split("://")
                    .nth(1)
                    .map(|r| r.split('/').next().unwrap_or(r).to_string())
            })
            .filter_map(|hostport| hostport.to_socket_addrs().ok())
            .flatten()
            .map(|a| a.ip())
            .collect();
        RateLimit {
            rate,
            peers,
            clients: Default::default(),
        }
    }

    /// Takes a token of `client`'s bucket, if it has one.
    fn allow(&self, client: std::net::IpAddr) -> bool {
        if self.rate <= 0.0 || self.peers.contains(&client) {
            return true;
        }
        let (now, burst) = (Instant::now(), (2.0 * self.rate).max(1.0));
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() >= MAX_CLIENTS {
            clients.retain(|_, (_, seen)| now.duration_since(*seen) < Duration::from_secs(60));
        }
        let (tokens, seen) = clients.entry(client).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*seen).as_secs_f64() * self.rate).min(burst);
        *seen = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Starts the API on its own thread (and runtime, so a busy engine or a slow peer never
/// holds the caller). Binds before returning: a taken port fails here.
pub fn start(settings: ApiSettings, view: Arc<LiveView>, status: Arc<Status>) -> Result<ApiServer, ApiStartError> {
    let listen = settings.listen.clone();
    let bind_err = |message: String| ApiStartError::Bind {
        addr: listen.clone(),
        message,
    };
    let addr: SocketAddr = settings
        .listen
        .parse()
        .map_err(|e| bind_err(format!("not an address like 127.0.0.1:8080 ({e})")))?;
    if settings.token.is_none() && !addr.ip().is_loopback() {
        return Err(ApiStartError::NoToken(settings.listen.clone()));
    }
    if !settings.peers.is_empty() && settings.process >= settings.peers.len() {
        return Err(ApiStartError::Peers {
            peers: settings.peers.len(),
            process: settings.process,
        });
    }
    let listener = std::net::TcpListener::bind(addr).map_err(|e| bind_err(e.to_string()))?;
    listener.set_nonblocking(true).map_err(|e| bind_err(e.to_string()))?;
    let addr = listener.local_addr().map_err(|e| bind_err(e.to_string()))?;
    let client = reqwest::Client::builder()
        .timeout(PEER_TIMEOUT)
        .pool_max_idle_per_host(16)
        .build()
        .map_err(|e| bind_err(format!("HTTP client: {e}")))?;
    let metrics = Metrics::new(settings.devices);
    let clients = RateLimit::new(settings.rate_limit, &settings.peers);
    let api = Arc::new(Api {
        view,
        status,
        limit: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
        settings,
        client,
        started: Instant::now(),
        metrics,
        clients,
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fmsflow-api")
        .enable_all()
        .build()
        .map_err(|e| bind_err(format!("runtime: {e}")))?;
    let thread = std::thread::Builder::new()
        .name("fmsflow-api".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "the API's listener failed");
                        return;
                    }
                };
                let app = router(api).into_make_service_with_connect_info::<SocketAddr>();
                let served = axum::serve(listener, app).with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                });
                if let Err(e) = served.await {
                    tracing::error!(error = %e, "the API server stopped");
                }
            })
        })
        .map_err(|e| bind_err(format!("thread: {e}")))?;
    Ok(ApiServer {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

fn router(api: Arc<Api>) -> Router {
    let v1 = Router::new()
        .route("/status", get(status))
        .route("/devices/{id}/hourly", get(device_hourly))
        .route("/devices/{id}/latest", get(device_latest))
        .route("/fleet/hourly", get(fleet_hourly))
        .route("/quality", get(quality))
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), authorize))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::not_found("no such API path (see /api/v1/openapi.json)") })
        // After every route: it applies to the routes there are. axum adds `Allow`.
        .method_not_allowed_fallback(|| async {
            ApiError::with(
                StatusCode::METHOD_NOT_ALLOWED,
                "the API answers GET (and HEAD) only".to_string(),
            )
        });
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), authorize));
    Router::new()
        .nest("/api/v1", v1)
        .merge(metrics)
        .route("/", get(|| asset("index.html")))
        .route("/app.js", get(|| asset("app.js")))
        .route("/style.css", get(|| asset("style.css")))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        // A path under the API's prefix that the nested router does not take (`/api/v1/`)
        // gets the API's 404 too; any other unknown path a plain one.
        .fallback(|uri: axum::http::Uri| async move {
            if uri.path() == "/api/v1" || uri.path().starts_with("/api/v1/") {
                ApiError::not_found("no such API path (see /api/v1/openapi.json)").into_response()
            } else {
                StatusCode::NOT_FOUND.into_response()
            }
        })
        .layer(axum::middleware::from_fn_with_state(api.clone(), guard))
        .layer(axum::middleware::from_fn_with_state(api.clone(), observe))
        .with_state(api)
}

/// Turns away what the API never reads before any work: a request target over [`MAX_URI`]
/// bytes (414), a body over [`MAX_BODY`] (413), a client over `api.rate_limit` (429).
async fn guard(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI {
        return ApiError::with(
            StatusCode::URI_TOO_LONG,
            format!("the request target is {target} bytes; at most {MAX_URI}"),
        )
        .into_response();
    }
    let body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if body > MAX_BODY || req.headers().contains_key(header::TRANSFER_ENCODING) {
        return ApiError::with(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the API takes no request body".to_string(),
        )
        .into_response();
    }
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if client.is_some_and(|c| !api.clients.allow(c)) {
        return ApiError::with(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "more than {} requests a second from this address (api.rate_limit); retry",
                api.settings.rate_limit
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// The `endpoint` label of a request path (a bounded set: ids never become labels).
fn endpoint_of(path: &str) -> &'static str {
    match path.strip_prefix("/api/v1/") {
        Some("status") => "status",
        Some("fleet/hourly") => "fleet_hourly",
        Some("quality") => "quality",
        Some("openapi.json") => "openapi",
        Some(p) if p.starts_with("devices/") && p.ends_with("/latest") => "device_latest",
        Some(p) if p.starts_with("devices/") && p.ends_with("/hourly") => "device_hourly",
        Some(_) => "other",
        None if path == "/metrics" => "metrics",
        None => "dashboard",
    }
}

/// Times every request into the query metrics.
async fn observe(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let endpoint = endpoint_of(req.uri().path());
    let started = Instant::now();
    let r = next.run(req).await;
    api.metrics
        .observe_query(endpoint, r.status().as_u16(), started.elapsed().as_secs_f64());
    r
}

/// Prometheus's text format: this process's metrics (see `crate::metrics`).
async fn metrics(State(api): State<Arc<Api>>) -> Response {
    let body = api.metrics.render(&api.status, Some(&api.view));
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// The dashboard's files, in the binary (the machines it runs on are offline).
async fn asset(name: &'static str) -> Response {
    let (body, kind) = match name {
        "index.html" => (include_str!("assets/index.html"), "text/html; charset=utf-8"),
        "app.js" => (include_str!("assets/app.js"), "text/javascript; charset=utf-8"),
        _ => (include_str!("assets/style.css"), "text/css; charset=utf-8"),
    };
    (
        [(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")],
        body,
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

/// With a token configured, every query must carry `Authorization: Bearer <token>`.
async fn authorize(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    if let Some(token) = &api.settings.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            let mut r = ApiError {
                status: StatusCode::UNAUTHORIZED,
                parameter: None,
                message: "this API needs `Authorization: Bearer <token>` (api.token)".into(),
            }
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An error answer: `{"error": {"status", "parameter"?, "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    parameter: Option<String>,
    message: String,
}

impl ApiError {
    fn bad(parameter: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            parameter: Some(parameter.to_string()),
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            parameter: None,
            message: message.into(),
        }
    }

    fn busy(message: impl Into<String>) -> Self {
        Self::with(StatusCode::SERVICE_UNAVAILABLE, message.into())
    }

    fn with(status: StatusCode, message: String) -> Self {
        ApiError {
            status,
            parameter: None,
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                status: self.status.as_u16(),
                parameter: self.parameter,
                message: self.message,
            },
        };
        let mut r = (self.status, axum::Json(body)).into_response();
        if matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        ) {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

type Answer<T> = Result<axum::Json<T>, ApiError>;

/// A request's parameters, checked against the ones its path takes.
struct Params<'a> {
    map: &'a HashMap<String, String>,
}

impl<'a> Params<'a> {
    fn new(map: &'a HashMap<String, String>, allowed: &[&str]) -> Result<Self, ApiError> {
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        for k in names {
            if !allowed.contains(&k.as_str()) && k != "as_of" && k != "scope" {
                return Err(ApiError::bad(
                    k,
                    format!("unknown parameter `{k}` (this path takes: {})", allowed.join(", ")),
                ));
            }
        }
        Ok(Params { map })
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        self.map.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn time(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                parse_rfc3339(v).ok_or_else(|| {
                    ApiError::bad(name, format!("`{v}` is not an RFC 3339 time like 2025-07-07T08:00:00Z"))
                })
            })
            .transpose()
    }

    fn number<T: std::str::FromStr>(&self, name: &str, what: &str) -> Result<Option<T>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| ApiError::bad(name, format!("`{v}` is not {what}")))
            })
            .transpose()
    }

    /// The hours `from..to` (`to` exclusive, rounded up to a whole hour); without `to`, up
    /// to the newest hour; without `from`, [`DEFAULT_HOURS`] before `to`.
    fn hours(&self, newest: Option<i64>) -> Result<(i64, i64), ApiError> {
        let to = match self.time("to")? {
            Some(t) => t.div_euclid(HOUR_MS) + (t.rem_euclid(HOUR_MS) > 0) as i64,
            // No reading yet: the hours up to now.
            None => newest.unwrap_or_else(|| crate::clock::wall_ms().div_euclid(HOUR_MS)) + 1,
        };
        let from = match self.time("from")? {
            Some(f) => f.div_euclid(HOUR_MS),
            None => to - DEFAULT_HOURS,
        };
        if from >= to {
            return Err(ApiError::bad("from", "`from` must be before `to`"));
        }
        if to - from > MAX_HOURS {
            return Err(ApiError::bad(
                "to",
                format!(
                    "the range covers {} hours; at most {MAX_HOURS} (31 days) at once",
                    to - from
                ),
            ));
        }
        Ok((from, to))
    }
}

/// The `{id}` of a `/devices/{id}/...` path: 400 (in the API's error shape) when it is not
/// text, percent-encoded bytes that are not UTF-8.
fn path_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id).map_err(|e| {
        ApiError::bad(
            "id",
            format!("the device id is not a positive integer ({})", e.body_text()),
        )
    })
}

/// The device of a `/devices/{id}/...` path: 404 outside the fleet.
fn device_of(api: &Api, id: &str) -> Result<u32, ApiError> {
    let d: u32 = id
        .parse()
        .map_err(|_| ApiError::bad("id", format!("device id `{id}` is not a positive integer")))?;
    if d == 0 || d > api.settings.devices {
        return Err(ApiError::not_found(format!(
            "unknown device {d}: the fleet is devices 1..={}",
            api.settings.devices
        )));
    }
    Ok(d)
}

/// One query's context: the epoch it is answered as of, and whether it is a peer's share.
struct Ctx {
    as_of: Epoch,
    local: bool,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Api {
    /// Admits a query (503 when too many are in flight) and fixes the epoch it is answered
    /// as of: this view's frontier, or for a peer's share the one the asking process chose.
    async fn begin(&self, p: &Params<'_>) -> Result<Ctx, ApiError> {
        let permit = self.limit.clone().try_acquire_owned().map_err(|_| {
            ApiError::busy(format!(
                "{} queries in flight already (api.max_in_flight); retry",
                self.settings.max_in_flight
            ))
        })?;
        let local = match p.get("scope") {
            None => false,
            Some("local") => true,
            Some(s) => return Err(ApiError::bad("scope", format!("`{s}`: the only scope is `local`"))),
        };
        let as_of = match p.number::<Epoch>("as_of", "an epoch number")? {
            None => self.view.frontier(),
            Some(t) => {
                if t > self.view.frontier() {
                    let view = self.view.clone();
                    let reached = tokio::task::spawn_blocking(move || view.wait_for(t, CATCH_UP))
                        .await
                        .unwrap_or(false);
                    if !reached {
                        return Err(ApiError::busy(format!(
                            "process {} has not reached epoch {t} within {CATCH_UP:?} (it is at {})",
                            self.settings.process,
                            self.view.frontier()
                        )));
                    }
                }
                t
            }
        };
        if as_of < self.view.horizon() {
            return Err(ApiError::busy(format!(
                "epoch {as_of} is older than what process {} keeps ({}); retry",
                self.settings.process,
                self.view.horizon()
            )));
        }
        Ok(Ctx {
            as_of,
            local,
            _permit: permit,
        })
    }

    fn as_of(&self, ctx: &Ctx) -> AsOf {
        let (epoch, complete) = self.view.epoch_label(ctx.as_of);
        AsOf {
            epoch,
            complete,
            processes: self.settings.peers.len().max(1),
        }
    }

    /// The other processes' shares of a query, as of `ctx.as_of` (none for a peer's share).
    async fn peers<T: DeserializeOwned + Send + 'static>(
        &self,
        ctx: &Ctx,
        path: &str,
        params: &Params<'_>,
        resolved: &[(&'static str, String)],
    ) -> Result<Vec<T>, ApiError> {
        if ctx.local || self.settings.peers.is_empty() {
            return Ok(Vec::new());
        }
        // The request's parameters, with the ones this process resolved (a default range,
        // the watermark's hour) in their place, so every process covers the same.
        let mut query: Vec<(&str, String)> = params
            .map
            .iter()
            .filter(|(k, _)| *k != "as_of" && *k != "scope" && !resolved.iter().any(|(r, _)| r == k))
            .map(|(k, v)| (k.as_str(), v.clone()))
            .chain(resolved.iter().cloned())
            .collect();
        query.push(("scope", "local".into()));
        query.push(("as_of", ctx.as_of.to_string()));
        let asks = self
            .settings
            .peers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.settings.process)
            .map(|(i, base)| {
                let mut req = self
                    .client
                    .get(format!("{}{path}", base.trim_end_matches('/')))
                    .query(&query);
                if let Some(t) = &self.settings.token {
                    req = req.bearer_auth(t);
                }
                let base = base.clone();
                async move {
                    let fail =
                        |e: &dyn std::fmt::Display| ApiError::busy(format!("process {i} ({base}) did not answer: {e}"));
                    let r = req.send().await.map_err(|e| fail(&e))?;
                    if !r.status().is_success() {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        return Err(fail(&format!("{status}: {body}")));
                    }
                    let body = r.bytes().await.map_err(|e| fail(&e))?;
                    serde_json::from_slice::<T>(&body).map_err(|e| fail(&e))
                }
            });
        let mut out = Vec::new();
        for r in futures_join(asks).await {
            out.push(r?);
        }
        Ok(out)
    }
}

/// Runs the futures concurrently and returns their results in order.
async fn futures_join<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a fan-out task panicked"));
    }
    out
}

async fn status(State(api): State<Arc<Api>>, Query(q): Query<HashMap<String, String>>) -> Answer<StatusAnswer> {
    let p = Params::new(&q, &[])?;
    let ctx = api.begin(&p).await?;
    let st = &api.status;
    let mut partitions: Vec<PartitionLag> = st
        .partitions()
        .into_iter()
        .map(|(partition, (position, end))| PartitionLag {
            partition,
            position,
            end,
            lag: end.map(|e| (e - position).max(0)),
        })
        .collect();
    partitions.sort_by_key(|p| p.partition);
    let me = ProcessStatus {
        process: api.settings.process,
        workers: api.view.workers(),
        frontier: api.view.epoch_label(api.view.frontier()).0,
        received: st.received.load(Relaxed),
        valid: st.valid.load(Relaxed),
        rejected: st.rejected.load(Relaxed),
        hours_sealed: st.hours_sealed.load(Relaxed),
        late_rewrites: st.late_rewrites.load(Relaxed),
        files_written: st.files_written.load(Relaxed),
        rows_written: st.rows_written.load(Relaxed),
        uptime_s: api.started.elapsed().as_secs_f64(),
        partitions,
        error: st.error(),
    };
    let watermark = api.view.watermark(ctx.as_of);
    let mut answer = StatusAnswer {
        as_of: api.as_of(&ctx),
        watermark: watermark.map(format_rfc3339),
        devices: api.settings.devices,
        workers: me.workers,
        processes: vec![me],
    };
    for peer in api.peers::<StatusAnswer>(&ctx, "/api/v1/status", &p, &[]).await? {
        answer.merge(peer);
    }
    Ok(axum::Json(answer))
}

async fn device_hourly(
    State(api): State<Arc<Api>>,
    id: Result<Path<String>, PathRejection>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer<DeviceHourly> {
    let p = Params::new(&q, &["from", "to"])?;
    let device = device_of(&api, &path_id(id)?)?;
    let ctx = api.begin(&p).await?;
    let newest = api.view.watermark(ctx.as_of).map(|w| w.div_euclid(HOUR_MS));
    let (from, to) = p.hours(newest)?;
    // Hours older than `api.keep_hours` are read from the lake: off the runtime's threads.
    let (view, as_of) = (api.view.clone(), ctx.as_of);
    let hours = off_thread(move || view.device_hourly(as_of, device, from, to))
        .await?
        .map_err(ApiError::busy)?;
    let mut answer = DeviceHourly {
        as_of: api.as_of(&ctx),
        device,
        from: format_rfc3339(from * HOUR_MS),
        to: format_rfc3339(to * HOUR_MS),
        hours: hours.iter().map(|(h, s)| HourRow::new(device, *h, s)).collect(),
    };
    let resolved = [("from", answer.from.clone()), ("to", answer.to.clone())];
    for peer in api
        .peers::<DeviceHourly>(&ctx, &format!("/api/v1/devices/{device}/hourly"), &p, &resolved)
        .await?
    {
        answer.hours.extend(peer.hours);
    }
    answer.hours.sort_by(|a, b| a.hour.cmp(&b.hour));
    Ok(axum::Json(answer))
}

async fn device_latest(
    State(api): State<Arc<Api>>,
    id: Result<Path<String>, PathRejection>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer<DeviceLatestAnswer> {
    let p = Params::new(&q, &[])?;
    let device = device_of(&api, &path_id(id)?)?;
    let ctx = api.begin(&p).await?;
    let mut best = api.view.device_latest(ctx.as_of, device).map(|l| LatestRow::new(&l));
    for peer in api
        .peers::<DeviceLatestAnswer>(&ctx, &format!("/api/v1/devices/{device}/latest"), &p, &[])
        .await?
    {
        if let Some(r) = peer.reading {
            if best.as_ref().is_none_or(|b| r.time_ms > b.time_ms) {
                best = Some(r);
            }
        }
    }
    if best.is_none() && !ctx.local {
        return Err(ApiError::not_found(format!(
            "device {device} has no accepted reading yet (as of epoch {})",
            api.as_of(&ctx).epoch
        )));
    }
    Ok(axum::Json(DeviceLatestAnswer {
        as_of: api.as_of(&ctx),
        device,
        reading: best,
    }))
}

/// Runs `f` (a scan of many keys, or the encoding of a large answer) on tokio's blocking
/// threads: the runtime's two threads stay free for point queries, which would otherwise
/// wait behind it.
async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::busy(format!("a query's work failed: {e}")))
}

/// The JSON answer, encoded off the runtime's threads.
async fn json_off_thread<T: Serialize + Send + 'static>(answer: T) -> Result<Response, ApiError> {
    let body = off_thread(move || serde_json::to_vec(&answer)).await?;
    let body = body.map_err(|e| ApiError::busy(format!("encoding the answer failed: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn fleet_hourly(
    State(api): State<Arc<Api>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let p = Params::new(&q, &["hour", "sort", "order", "limit"])?;
    let sort = SortKey::parse(p.get("sort").unwrap_or("device")).map_err(|m| ApiError::bad("sort", m))?;
    let descending = match p.get("order") {
        None => sort != SortKey::Device,
        Some("asc") => false,
        Some("desc") => true,
        Some(o) => return Err(ApiError::bad("order", format!("`{o}`: use asc or desc"))),
    };
    let limit: usize = p.number("limit", "a count of rows")?.unwrap_or(usize::MAX);
    if limit == 0 {
        return Err(ApiError::bad("limit", "must be at least 1"));
    }
    let ctx = api.begin(&p).await?;
    // Without `hour`: the watermark's, the same in every process (every worker sees every
    // worker's watermark).
    let hour = match p.time("hour")? {
        Some(t) => t.div_euclid(HOUR_MS),
        None => match api.view.watermark(ctx.as_of) {
            Some(w) => w.div_euclid(HOUR_MS),
            None => return Err(ApiError::not_found("no reading accepted yet: no hour has data")),
        },
    };
    // The top `limit` of each process's (disjoint) rows hold the top `limit` of all; only
    // those become rows.
    let (view, as_of) = (api.view.clone(), ctx.as_of);
    let mut rows: Vec<HourRow> = off_thread(move || {
        let mut stats = view.fleet_hour(as_of, hour)?;
        sort.sort_figures(&mut stats, descending);
        stats.truncate(limit);
        Ok::<_, String>(stats.iter().map(|(d, s)| HourRow::new(*d, hour, s)).collect())
    })
    .await?
    .map_err(ApiError::busy)?;
    let resolved = [("hour", format_rfc3339(hour * HOUR_MS))];
    for peer in api
        .peers::<FleetHourly>(&ctx, "/api/v1/fleet/hourly", &p, &resolved)
        .await?
    {
        rows.extend(peer.devices);
    }
    sort.sort(&mut rows, descending);
    rows.truncate(limit);
    if rows.is_empty() && !ctx.local {
        return Err(ApiError::not_found(format!(
            "no device has data for the hour {} (as of epoch {})",
            format_rfc3339(hour * HOUR_MS),
            api.as_of(&ctx).epoch
        )));
    }
    json_off_thread(FleetHourly {
        as_of: api.as_of(&ctx),
        hour: format_rfc3339(hour * HOUR_MS),
        sort: sort.name(),
        order: if descending { "desc" } else { "asc" }.to_string(),
        devices: rows,
    })
    .await
}

async fn quality(State(api): State<Arc<Api>>, Query(q): Query<HashMap<String, String>>) -> Answer<QualityAnswer> {
    let p = Params::new(&q, &["from", "to", "device", "by_device"])?;
    let device: Option<u32> = p.number("device", "a device id")?;
    if let Some(d) = device {
        device_of(&api, &d.to_string())?;
    }
    let by_device: Option<usize> = p.number("by_device", "a count of devices")?;
    let ctx = api.begin(&p).await?;
    let newest = api.view.watermark(ctx.as_of).map(|w| w.div_euclid(HOUR_MS));
    let (from, to) = p.hours(newest)?;
    let (view, as_of, per_device) = (api.view.clone(), ctx.as_of, by_device.is_some());
    let (all, per_device, spans) = off_thread(move || {
        let (all, per_device) = view.quality(as_of, from, to, device, per_device)?;
        Ok::<_, String>((all, per_device, view.spans(as_of, from, to)?))
    })
    .await?
    .map_err(ApiError::busy)?;
    let mut answer = QualityAnswer::new(api.as_of(&ctx), from, to, device, &all, &per_device, &spans);
    let resolved = [("from", answer.from.clone()), ("to", answer.to.clone())];
    for peer in api
        .peers::<QualityAnswer>(&ctx, "/api/v1/quality", &p, &resolved)
        .await?
    {
        answer.merge(peer);
    }
    // A peer's share lists every device it has; the asking process keeps the worst.
    if !ctx.local {
        answer.finish(by_device);
    }
    let devices = if device.is_some() { 1 } else { api.settings.devices };
    answer.rate(devices, api.settings.poll_interval.as_millis() as i64);
    Ok(axum::Json(answer))
}

/// The status of the whole answer in one line (for logs and the CLI).
pub fn describe(a: &AsOf) -> String {
    format!(
        "as of epoch {}{} ({} process{})",
        a.epoch,
        if a.complete { ", input complete" } else { "" },
        a.processes,
        if a.processes == 1 { "" } else { "es" }
    )
}

/// `fmsflow run`/`demo`'s API settings from the configuration and the command line.
pub fn settings_from(cfg: &crate::config::Config, listen: String, process: usize, devices: u32) -> ApiSettings {
    ApiSettings {
        listen,
        token: (!cfg.api.token.is_empty()).then(|| cfg.api.token.clone()),
        peers: cfg.api.peers.clone(),
        process,
        max_in_flight: cfg.api.max_in_flight,
        rate_limit: cfg.api.rate_limit,
        devices,
        poll_interval: cfg.collector.interval.0,
    }
}

/// Serializes an answer for the CLI's `--json`.
pub fn to_json<T: Serialize>(t: &T) -> String {
    serde_json::to_string_pretty(t).unwrap_or_default()
}
