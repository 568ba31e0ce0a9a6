//! The `api_request` fuzz target's harness and checks (`fuzz/fuzz_targets/api_request.rs`),
//! kept here so that its regression test (`tests/api_fuzz_regressions.rs`) runs the same
//! code. Not part of the crate's API.
//!
//! [`Harness::check`] reads a fuzz input as an HTTP/1.1 request in its wire form (what hyper
//! would hand the router; see [`decode`]), sends it in-process, without a socket, to the
//! real router ([`fuzz_router`]) and checks the answer against docs/API.md. It panics when
//! the answer breaks a rule: that is what libFuzzer reports as a crash and what makes a
//! test fail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use axum::Router;
use fmsflow_dataflows::dataflow::{Epoch, FlowConfig};
use fmsflow_dataflows::{RawRecord, RuleConfig, SourcePos};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::answers::ErrorBody;
use super::view::LiveView;
use super::{router, Api, ApiSettings, RateLimit, MAX_BODY, MAX_URI};
use crate::engine::{self, EngineSettings, Source};
use crate::gen::{generate, GenSettings};
use crate::metrics::Metrics;
use crate::status::Status;

/// The bearer token of the harness's API.
pub const TOKEN: &str = "fuzz-token";
/// The harness's fleet: devices 1..=DEVICES.
pub const DEVICES: u32 = 20;
/// The harness's data: this many hours from 2025-07-07T00:00:00Z.
pub const HOURS: u32 = 3;
/// The most headers [`decode`] reads from one input.
pub const MAX_HEADERS: usize = 16;

/// The query API's real router ([`router`]) over a live view and a status filled by the real
/// engine, in this process, with no listener: `devices` devices, [`HOURS`] hours of readings
/// every 5 minutes with 5 % dirty records, the input complete. No peers, `max_in_flight` 64
/// and no rate limit (it only applies to requests that carry their client's address).
pub fn fuzz_router(devices: u32, token: Option<String>) -> Router {
    let view = LiveView::new(1, 168);
    let status = Arc::new(Status::default());
    let (generated, _) = generate(&GenSettings {
        interval_s: 300,
        dirty_rate: 0.05,
        ..GenSettings::clean(devices, HOURS)
    });
    let records: Vec<RawRecord> = generated
        .into_iter()
        .enumerate()
        .map(|(i, (ingest, payload))| RawRecord {
            payload: payload.into_bytes().into(),
            ingest_ms: Some(ingest),
            pos: SourcePos {
                source: 0,
                offset: i as u64,
            },
        })
        .collect();
    let settings = EngineSettings {
        flow: FlowConfig {
            rules: RuleConfig {
                fleet_size: devices,
                ..RuleConfig::default()
            },
            ..FlowConfig::default()
        },
        workers: 1,
        batch: 50,
        epoch: Duration::from_millis(50),
        cluster: None,
        replay_rate: None,
    };
    let source = Source::Memory(Arc::new(records));
    engine::run(settings, source, None, None, status.clone(), Some(view.clone())).expect("the engine fills the view");
    // Complete: no `as_of` makes a query wait, and no epoch is too old to read.
    assert_eq!(view.frontier(), Epoch::MAX, "the view has every epoch");
    assert_eq!(view.horizon(), 0, "the view keeps every epoch");
    let settings = ApiSettings {
        listen: "127.0.0.1:0".into(),
        token,
        peers: Vec::new(),
        process: 0,
        max_in_flight: 64,
        rate_limit: 0.0,
        devices,
        poll_interval: Duration::from_secs(10),
    };
    router(Arc::new(Api {
        view,
        status,
        limit: Arc::new(Semaphore::new(settings.max_in_flight)),
        clients: RateLimit::new(settings.rate_limit, &settings.peers),
        metrics: Metrics::new(devices),
        settings,
        client: reqwest::Client::new(),
        started: Instant::now(),
    }))
}

/// What the checks need to know about a request.
pub struct Sent {
    method: Method,
    path: String,
    /// Bytes of the path and query.
    target_len: usize,
    /// The first `Authorization` header is `Bearer <TOKEN>`.
    authorized: bool,
    /// The first `Content-Length` header's value, if it is a number.
    content_length: Option<u64>,
    chunked: bool,
}

/// Reads an HTTP/1.1 request in its wire form: a request line `METHOD TARGET [VERSION]`,
/// header lines `name: value` up to an empty line (at most [`MAX_HEADERS`]; lines without a
/// colon are skipped), then the body. Lines end in `\n` or `\r\n`. `None` when the method,
/// the target or a header is not one hyper would accept: such a request never reaches the
/// router.
pub fn decode(data: &[u8]) -> Option<(Request<Body>, Sent)> {
    let mut rest = data;
    let mut line = || {
        let end = rest.iter().position(|b| *b == b'\n');
        let (l, r) = match end {
            Some(e) => (&rest[..e], &rest[e + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = r;
        l.strip_suffix(b"\r").unwrap_or(l)
    };
    let first = line();
    let mut parts = first.splitn(3, |b| *b == b' ');
    let method = Method::from_bytes(parts.next()?).ok()?;
    let uri = Uri::try_from(parts.next()?).ok()?;
    let mut builder = Request::builder().method(method.clone()).uri(uri.clone());
    let mut headers = 0;
    loop {
        let l = line();
        if l.is_empty() {
            break;
        }
        let Some(colon) = l.iter().position(|b| *b == b':') else {
            continue;
        };
        headers += 1;
        if headers > MAX_HEADERS {
            return None;
        }
        let name = HeaderName::from_bytes(&l[..colon]).ok()?;
        // As hyper reads it: without the whitespace around the value.
        let value = HeaderValue::from_bytes(l[colon + 1..].trim_ascii()).ok()?;
        builder = builder.header(name, value);
    }
    let request = builder.body(Body::from(rest.to_vec())).ok()?;
    let h = request.headers();
    let first_text = |name: HeaderName| h.get(name).and_then(|v| v.to_str().ok());
    let authorized = first_text(header::AUTHORIZATION) == Some(&format!("Bearer {TOKEN}"));
    let content_length = first_text(header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
    let chunked = h.contains_key(header::TRANSFER_ENCODING);
    let sent = Sent {
        target_len: uri.path_and_query().map_or(0, |p| p.as_str().len()),
        path: uri.path().to_string(),
        method,
        authorized,
        content_length,
        chunked,
    };
    Some((request, sent))
}

/// What the router answered.
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: axum::http::HeaderMap,
    /// Its body.
    pub body: Vec<u8>,
}

/// The paths that answer without a token.
const PUBLIC: [&str; 5] = ["/", "/app.js", "/style.css", "/favicon.ico", "/api/v1/openapi.json"];

/// Whether `path` is one of the routes that need the token when one is set.
fn protected(path: &str) -> bool {
    if matches!(
        path,
        "/metrics" | "/api/v1/status" | "/api/v1/fleet/hourly" | "/api/v1/quality"
    ) {
        return true;
    }
    let Some(rest) = path.strip_prefix("/api/v1/devices/") else {
        return false;
    };
    match rest.rsplit_once('/') {
        Some((id, "hourly" | "latest")) => !id.is_empty() && !id.contains('/'),
        _ => false,
    }
}

/// Checks an answer to `req` against docs/API.md. Panics when a rule does not hold.
pub fn check_answer(req: &Sent, a: &Answer) {
    let what = || {
        format!(
            "{} {} (authorized: {}) -> {} {:?} {:?}",
            req.method,
            req.path,
            req.authorized,
            a.status,
            a.headers,
            String::from_utf8_lossy(&a.body)
        )
    };
    let status = a.status.as_u16();
    // Every 5xx of docs/API.md is a 503 of a busy or partitioned cluster: none can happen
    // here (no peers, one request at a time, a complete view). A panic in a query's blocking
    // work would be answered as a 503.
    assert!(status < 500, "a server error: {}", what());
    let header = |name: HeaderName| a.headers.get(name).and_then(|v| v.to_str().ok());
    let head = req.method == Method::HEAD;
    // The guard turns these away before anything else, whatever the path.
    if req.target_len > MAX_URI {
        assert_eq!(status, 414, "a request target over {MAX_URI} bytes: {}", what());
        return;
    }
    if req.content_length.is_some_and(|n| n > MAX_BODY) || req.chunked {
        assert_eq!(status, 413, "a request with a body: {}", what());
        return;
    }
    assert!(status != 414 && status != 413, "turned away: {}", what());
    if status == 401 {
        assert_eq!(header(header::WWW_AUTHENTICATE), Some("Bearer"), "{}", what());
    }
    if status == 405 {
        assert!(header(header::ALLOW).is_some_and(|a| a.contains("GET")), "{}", what());
    }
    if a.status.is_success() && !req.authorized {
        assert!(
            PUBLIC.contains(&req.path.as_str()),
            "data without the token: {}",
            what()
        );
    }
    if protected(&req.path) && matches!(req.method, Method::GET | Method::HEAD) {
        assert_eq!(status == 401, !req.authorized, "the token decides: {}", what());
    }
    if req.path == "/api/v1" || req.path.starts_with("/api/v1/") {
        assert_eq!(
            header(header::CONTENT_TYPE),
            Some("application/json"),
            "every answer of /api/v1 is JSON: {}",
            what()
        );
        if head {
            return;
        }
        if a.status.is_success() {
            serde_json::from_slice::<serde_json::Value>(&a.body)
                .unwrap_or_else(|e| panic!("an answer that is not JSON ({e}): {}", what()));
        } else {
            let e: ErrorBody = serde_json::from_slice(&a.body)
                .unwrap_or_else(|e| panic!("an error without the error shape ({e}): {}", what()));
            assert_eq!(e.error.status, status, "the error names its status: {}", what());
            assert!(
                !e.error.message.trim().is_empty(),
                "an error without a message: {}",
                what()
            );
            // (`parameter` may be empty: `?=1` has a parameter without a name, unknown.)
        }
    }
}

/// The router and a runtime to run it on, made once and used for every input.
pub struct Harness {
    rt: tokio::runtime::Runtime,
    router: Router,
}

impl Harness {
    /// The router of [`fuzz_router`] with [`DEVICES`] devices and [`TOKEN`], on a tokio
    /// current-thread runtime.
    pub fn new() -> Harness {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Harness {
            rt,
            router: fuzz_router(DEVICES, Some(TOKEN.into())),
        }
    }

    /// Sends the request `data` holds (see [`decode`]) and checks the answer.
    pub fn check(&self, data: &[u8]) {
        if let Some((sent, answer)) = self.send(data) {
            check_answer(&sent, &answer);
        }
    }

    /// Sends the request `data` holds (see [`decode`]); `None` if it holds none.
    pub fn send(&self, data: &[u8]) -> Option<(Sent, Answer)> {
        let (request, sent) = decode(data)?;
        let answer = self.rt.block_on(async {
            let response = self
                .router
                .clone()
                .oneshot(request)
                .await
                .unwrap_or_else(|e| match e {});
            let (parts, body) = response.into_parts();
            let body = axum::body::to_bytes(body, 64 << 20).await.expect("the answer's body");
            Answer {
                status: parts.status,
                headers: parts.headers,
                body: body.to_vec(),
            }
        });
        Some((sent, answer))
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}
