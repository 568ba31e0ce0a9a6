//! `fmsflow collect`: polls the FMS API for every device and produces each payload, exactly
//! as received, to the raw topic: key the device id, record timestamp and `poll_ms` header
//! the poll time. The producer is idempotent (`acks=all`), so a broker failure neither loses
//! nor doubles a record. Bodies that are not JSON are produced too (the engine's
//! `malformed_json` rule sends them to the dead letters) and counted here.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::message::{Header, OwnedHeaders};

use crate::clock::Clock;
use crate::connectors::fms_http::{poll, PollSettings};
use crate::connectors::kafka::{ensure_topics, KafkaProducer, KafkaSettings};
use crate::status::Status;

/// What `fmsflow collect` does.
#[derive(Clone, Debug)]
pub struct CollectOptions {
    /// The HTTP polling.
    pub poll: PollSettings,
    /// Brokers and the raw topic.
    pub kafka: KafkaSettings,
    /// Stop after this long (default: until Ctrl-C).
    pub duration: Option<Duration>,
    /// Serve `/metrics` here.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Totals of a collector run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CollectSummary {
    /// Payloads received and handed to the producer.
    pub produced: u64,
    /// Payloads the brokers acknowledged.
    pub delivered: u64,
    /// Payloads that could not be delivered.
    pub failed: u64,
    /// Polls that failed (HTTP error, timeout, connection), retries included.
    pub poll_errors: u64,
    /// Payloads that are not JSON (produced all the same).
    pub non_json: u64,
    /// Requests by outcome class (`crate::metrics::POLL_CLASSES` order), retries included.
    pub polls: Vec<(&'static str, u64)>,
    /// Polls not made: the device's previous poll was still running.
    pub skipped: u64,
}

/// Runs the collector until Ctrl-C or `duration`, then flushes the producer.
pub fn run(opts: CollectOptions) -> anyhow::Result<CollectSummary> {
    let clock = Clock::from_env().map_err(anyhow::Error::msg)?;
    let k = &opts.kafka;
    ensure_topics(k, &[&k.raw_topic])?;
    let producer = Arc::new(KafkaProducer::with(&k.brokers, &k.security)?);
    let status = Arc::new(Status::default());
    let non_json = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let last_log = Arc::new(Mutex::new(Instant::now() - Duration::from_secs(60)));

    let deliver: Arc<dyn Fn(u32, fmsflow_dataflows::RawRecord) + Send + Sync> = {
        let (producer, status, non_json, topic, last_log) = (
            producer.clone(),
            status.clone(),
            non_json.clone(),
            k.raw_topic.clone(),
            last_log.clone(),
        );
        Arc::new(move |device, raw| {
            if serde_json::from_slice::<serde::de::IgnoredAny>(&raw.payload).is_err() {
                non_json.fetch_add(1, Relaxed);
                let mut last = last_log.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() > Duration::from_secs(5) {
                    *last = Instant::now();
                    tracing::warn!(
                        device,
                        "device sent a body that is not JSON (produced as received; counted, logged every 5 s)"
                    );
                }
            }
            let poll_ms = raw.ingest_ms.unwrap_or_default().to_string();
            let headers = OwnedHeaders::new().insert(Header {
                key: "poll_ms",
                value: Some(poll_ms.as_bytes()),
            });
            let key = device.to_string();
            if let Err(e) = producer.send(&topic, key.as_bytes(), &raw.payload, raw.ingest_ms, Some(headers), None) {
                status.fail(e.to_string());
            }
        })
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    eprintln!(
        "fmsflow collect: polling {} devices at {} every {:?} into {} on {}",
        opts.poll.devices, opts.poll.base, opts.poll.interval, k.raw_topic, k.brokers
    );
    let started = Instant::now();
    let metrics_server = match opts.metrics_listen {
        Some(addr) => match rt.block_on(serve_metrics(addr, opts.poll.devices, producer.delivery.clone())) {
            Ok(server) => Some(server),
            // The default address may be another collector's on a shared machine; an address
            // asked for must be served.
            Err(e) if addr.to_string() == DEFAULT_METRICS_LISTEN => {
                eprintln!("fmsflow collect: warning: {e:#}; serving no metrics (set --metrics-listen)");
                None
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    rt.block_on(async {
        let poller = tokio::spawn(poll(opts.poll.clone(), clock, status.clone(), deliver, stop.clone()));
        let mut ticker = tokio::time::interval(Duration::from_secs(5));
        ticker.tick().await;
        let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
        loop {
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = crate::shutdown::signal() => break,
                _ = until_deadline => break,
                _ = ticker.tick() => {
                    let d = &producer.delivery;
                    eprintln!(
                        "  {:>6.0} s: {} produced, {} delivered, {} failed; {} poll errors, {} not JSON",
                        started.elapsed().as_secs_f64(),
                        d.sent.load(Relaxed),
                        d.delivered.load(Relaxed),
                        d.failed.load(Relaxed),
                        status.poll_errors.load(Relaxed),
                        non_json.load(Relaxed),
                    );
                    let _ = std::io::stderr().flush();
                }
            }
            if status.error().is_some() {
                break;
            }
        }
        stop.store(true, Relaxed);
        // The poller returns once the requests in flight have finished and been produced.
        let _ = poller.await;
    });
    if let Some(server) = metrics_server {
        server.abort();
    }
    eprintln!("fmsflow collect: stopping; flushing the producer");
    producer
        .flush(Duration::from_secs(60))
        .context("records were still undelivered after 60 s")?;
    let d = &producer.delivery;
    let summary = CollectSummary {
        produced: d.sent.load(Relaxed),
        delivered: d.delivered.load(Relaxed),
        failed: d.failed.load(Relaxed),
        poll_errors: status.poll_errors.load(Relaxed),
        non_json: non_json.load(Relaxed),
        polls: crate::metrics::shared().polls_by_class(),
        skipped: crate::metrics::shared().polls_skipped.get(),
    };
    if let Some(e) = status.error() {
        anyhow::bail!("{e}");
    }
    anyhow::ensure!(
        summary.failed == 0,
        "{} records could not be delivered (last error: {})",
        summary.failed,
        d.last_error().unwrap_or_default()
    );
    Ok(summary)
}

/// `collector.metrics_listen`'s embedded default.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9101";

/// Binds `addr` and serves the collector's `/metrics` until aborted.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    devices: u32,
    delivery: Arc<crate::connectors::kafka::Delivery>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("collector.metrics_listen {addr}: cannot listen"))?;
    let metrics = Arc::new(crate::metrics::CollectorMetrics::new(devices));
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, delivery) = (metrics.clone(), delivery.clone());
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
                    metrics.render(delivery.sent.load(Relaxed), delivery.delivered.load(Relaxed)),
                )
            }
        }),
    );
    eprintln!("fmsflow collect: metrics on http://{}/metrics", listener.local_addr()?);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    }))
}
