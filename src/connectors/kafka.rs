//! Kafka: the topics, the producer the collector and the engine's outputs share, the engine's
//! partition readers, and the two output topics (the hourly changelog and the dead letters).
//!
//! Partitions are assigned to timely workers by hand (`assign`, never group rebalancing):
//! partition `p` belongs to the worker whose global index is `p % peers`, so every process of a
//! cluster computes the same assignment without talking. The consumer group is used only to
//! record committed offsets (lag monitoring), never to decide who reads what.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fmsflow_dataflows::time::{format_rfc3339, parse_rfc3339, HOUR_MS};
use fmsflow_dataflows::{Bytes, HourStats, RawRecord, Rejection, SourcePos, METRICS};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientContext, Message};

use crate::durable::Ticket;

/// How long a metadata or offset request to the brokers may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the Kafka connectors. All name the topic or partition involved.
#[derive(Debug, thiserror::Error)]
pub enum KafkaConnError {
    /// A client could not be created (bad setting) or a request failed; with the brokers'
    /// last error that librdkafka reported (a TLS handshake, authentication, a refused
    /// connection), which is often why.
    #[error("kafka: {what}: {source}{}", broker.as_ref().map(|b| format!(" (the last error from the brokers: {b})")).unwrap_or_default())]
    Client {
        what: String,
        source: Box<KafkaError>,
        broker: Option<String>,
    },
    /// The raw topic does not exist.
    #[error("kafka: topic {0:?} does not exist (create it with `fmsflow collect`, or with the admin tools)")]
    NoTopic(String),
    /// A `--from` value that does not parse.
    #[error("--from {0:?}: {1}")]
    BadStart(String, String),
    /// A partition stopped delivering records before its end during a replay.
    #[error("kafka: partition {partition} of {topic:?} delivered nothing for {secs} s at offset {offset} (replaying up to {end})")]
    Stalled {
        topic: String,
        partition: i32,
        offset: i64,
        end: i64,
        secs: u64,
    },
}

fn client_err(what: impl Into<String>) -> impl FnOnce(KafkaError) -> KafkaConnError {
    let what = what.into();
    move |source| KafkaConnError::Client {
        what,
        source: Box::new(source),
        broker: last_broker_error(),
    }
}

/// `e`, with the brokers' own error added when it has none: the admin client does not
/// serve librdkafka's log and error events, so a consumer of the same settings is asked to
/// connect for a few seconds (a TLS handshake refused, a wrong password, a closed port).
fn why_unreachable(s: &KafkaSettings, e: KafkaConnError) -> KafkaConnError {
    let KafkaConnError::Client {
        what,
        source,
        broker: None,
    } = e
    else {
        return e;
    };
    let probe: Result<BaseConsumer<LogContext>, _> = base_config(&s.brokers, &s.security)
        .set("group.id", format!("{}.probe", s.group))
        .create_with_context(LogContext);
    let mut broker = None;
    if let Ok(consumer) = probe {
        let until = Instant::now() + Duration::from_secs(5);
        let _ = consumer.fetch_metadata(None, Duration::from_millis(500));
        while broker.is_none() && Instant::now() < until {
            let _ = consumer.poll(Duration::from_millis(100));
            broker = last_broker_error();
        }
    }
    KafkaConnError::Client { what, source, broker }
}

/// The last error librdkafka reported about the brokers, in the last minute.
static LAST_BROKER_ERROR: Mutex<Option<(Instant, String)>> = Mutex::new(None);

fn last_broker_error() -> Option<String> {
    let last = LAST_BROKER_ERROR.lock().unwrap_or_else(|e| e.into_inner());
    last.as_ref()
        .filter(|(at, _)| at.elapsed() < Duration::from_secs(60))
        .map(|(_, e)| e.clone())
}

/// How long a request about the raw topic's partitions is retried while it fails for a
/// reason that passes by itself (see [`passing`]).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a topic the brokers do not know may be one just created, whose metadata has not
/// reached the broker that answers yet.
const UNKNOWN_TOPIC_GRACE: Duration = Duration::from_secs(5);

/// Whether a request failed for a reason that passes by itself: a partition without a leader
/// for a moment (a topic just created, a broker restarting, a leader election), metadata not
/// yet propagated, or a broker that did not answer in time.
fn passing(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::NotLeaderForPartition
                | C::LeaderNotAvailable
                | C::PreferredLeaderNotAvailable
                | C::FencedLeaderEpoch
                | C::UnknownLeaderEpoch
                | C::UnknownTopicOrPartition
                | C::RequestTimedOut
                | C::BrokerNotAvailable
                | C::OperationTimedOut
                | C::AllBrokersDown
                | C::BrokerTransportFailure
        )
    )
}

/// Runs `request` until it succeeds, fails for a reason that does not pass by itself, or
/// has failed for [`SETTLE_TIMEOUT`]; between tries it waits 50 ms, doubling up to 1 s.
fn settled<T>(what: impl Fn() -> String, request: impl FnMut() -> Result<T, KafkaError>) -> Result<T, KafkaConnError> {
    crate::backoff::retry(
        SETTLE_TIMEOUT,
        Duration::from_millis(50),
        Duration::from_secs(1),
        passing,
        |e, pause, _| tracing::info!(error = %e, "kafka: {}: retrying in {pause:?}", what()),
        request,
    )
    .map_err(|e| client_err(what())(e))
}

/// Where the brokers are and what the topics are called: `[kafka]` in the configuration.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port,host:port`.
    pub brokers: String,
    /// Raw FMS payloads, keyed by device id (written by `fmsflow collect`).
    pub raw_topic: String,
    /// The hourly changelog: key `device/hour`, value the aggregate as JSON.
    pub hourly_topic: String,
    /// Dead letters: the original bytes, with the rule and reason in headers.
    pub rejects_topic: String,
    /// Partitions of a topic this program creates.
    pub partitions: i32,
    /// Replication factor of a topic this program creates.
    pub replication: i32,
    /// Consumer group the engine commits its offsets to.
    pub group: String,
    /// How every client talks to the brokers (`[kafka.security]`).
    pub security: KafkaSecurity,
}

/// TLS and SASL settings of every Kafka client (`[kafka.security]`), passed to librdkafka as
/// they are. Secrets (`ssl_key_password`, `sasl_password`) are better given as
/// `FMSFLOW_KAFKA__SECURITY__…` environment variables.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl` (empty: `plaintext`).
    pub protocol: String,
    /// CA certificate(s) (PEM) that signed the brokers' certificates; empty: the system's.
    pub ssl_ca_location: String,
    /// This client's certificate (PEM), when the brokers ask for one.
    pub ssl_certificate_location: String,
    /// This client's private key (PEM).
    pub ssl_key_location: String,
    /// The key's password, if it is encrypted.
    pub ssl_key_password: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (with a `sasl_*` protocol).
    pub sasl_mechanism: String,
    /// SASL user name.
    pub sasl_username: String,
    /// SASL password.
    pub sasl_password: String,
}

impl std::fmt::Debug for KafkaSecurity {
    /// Never shows the secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &str| if s.is_empty() { "" } else { "<set>" };
        f.debug_struct("KafkaSecurity")
            .field("protocol", &self.protocol)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field("ssl_key_password", &hidden(&self.ssl_key_password))
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &hidden(&self.sasl_password))
            .finish()
    }
}

/// The protocols `kafka.security.protocol` takes.
pub const SECURITY_PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
/// The mechanisms `kafka.security.sasl_mechanism` takes.
pub const SASL_MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

impl KafkaSecurity {
    /// The first setting that cannot work, as (key, problem).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        let protocol = self.protocol();
        if !SECURITY_PROTOCOLS.contains(&protocol.as_str()) {
            return Some((
                "kafka.security.protocol",
                format!("must be one of {SECURITY_PROTOCOLS:?}, not {:?}", self.protocol),
            ));
        }
        let sasl = protocol.starts_with("sasl_");
        if sasl && !SASL_MECHANISMS.contains(&self.sasl_mechanism.as_str()) {
            return Some((
                "kafka.security.sasl_mechanism",
                format!("must be one of {SASL_MECHANISMS:?} with {protocol}"),
            ));
        }
        if sasl && (self.sasl_username.is_empty() || self.sasl_password.is_empty()) {
            return Some((
                "kafka.security.sasl_username",
                format!(
                    "and kafka.security.sasl_password must be set with {protocol} (the password best as \
                     FMSFLOW_KAFKA__SECURITY__SASL_PASSWORD)"
                ),
            ));
        }
        for (key, path) in [
            ("kafka.security.ssl_ca_location", &self.ssl_ca_location),
            (
                "kafka.security.ssl_certificate_location",
                &self.ssl_certificate_location,
            ),
            ("kafka.security.ssl_key_location", &self.ssl_key_location),
        ] {
            if !path.is_empty() && !std::path::Path::new(path).is_file() {
                return Some((key, format!("{path:?} is not a readable file")));
            }
        }
        None
    }

    /// The protocol, lower case (`plaintext` when empty).
    fn protocol(&self) -> String {
        match self.protocol.to_ascii_lowercase() {
            p if p.is_empty() => "plaintext".into(),
            p => p,
        }
    }

    /// The settings besides the protocol that are set, by their key in `[kafka.security]`:
    /// librdkafka's name with `_` for `.`.
    pub fn given(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("ssl_ca_location", &self.ssl_ca_location),
            ("ssl_certificate_location", &self.ssl_certificate_location),
            ("ssl_key_location", &self.ssl_key_location),
            ("ssl_key_password", &self.ssl_key_password),
            ("sasl_mechanism", &self.sasl_mechanism),
            ("sasl_username", &self.sasl_username),
            ("sasl_password", &self.sasl_password),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| (key, value.as_str()))
    }

    /// Sets these settings on a client's configuration.
    fn apply(&self, c: &mut ClientConfig) {
        c.set("security.protocol", self.protocol());
        for (key, value) in self.given() {
            c.set(key.replace('_', "."), value);
        }
    }
}

impl KafkaSettings {
    /// A raw topic with the output topics and the group named after it (`{raw}.hourly`,
    /// `{raw}.rejects`, `{raw}.group`): for runs, tests and benchmarks with topics of their own.
    pub fn named_after(brokers: &str, raw: &str, partitions: i32, replication: i32) -> Self {
        KafkaSettings {
            brokers: brokers.to_string(),
            raw_topic: raw.to_string(),
            hourly_topic: format!("{raw}.hourly"),
            rejects_topic: format!("{raw}.rejects"),
            partitions,
            replication,
            group: format!("{raw}.group"),
            security: KafkaSecurity::default(),
        }
    }
}

/// The settings every client here starts from: the brokers and `[kafka.security]`.
pub fn base_config(brokers: &str, security: &KafkaSecurity) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "fmsflow")
        .set("log_level", "3");
    security.apply(&mut c);
    c
}

/// Creates each topic that does not exist yet with the configured partitions and replication.
pub fn ensure_topics(s: &KafkaSettings, topics: &[&str]) -> Result<(), KafkaConnError> {
    ensure_topics_with(s, topics, &[])
}

/// [`ensure_topics`], giving created topics these topic-level settings (for example
/// `("retention.ms", "-1")` for a topic of archived records, whose old timestamps time
/// retention would delete at once).
pub fn ensure_topics_with(s: &KafkaSettings, topics: &[&str], config: &[(&str, &str)]) -> Result<(), KafkaConnError> {
    let admin: AdminClient<LogContext> = base_config(&s.brokers, &s.security)
        .create_with_context(LogContext)
        .map_err(client_err("creating the admin client"))?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            config.iter().fold(
                NewTopic::new(t, s.partitions, TopicReplication::Fixed(s.replication)),
                |n, (k, v)| n.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let results = rt
        .block_on(admin.create_topics(new.iter(), &opts))
        .map_err(|e| why_unreachable(s, client_err(format!("creating topics {topics:?}"))(e)))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaConnError::Client {
                    what: format!("creating topic {topic:?}"),
                    source: Box::new(KafkaError::AdminOp(code)),
                    broker: None,
                })
            }
        }
    }
    Ok(())
}

/// Counts of a producer's deliveries, for status lines and tests.
#[derive(Default, Debug)]
pub struct Delivery {
    /// Records handed to the producer.
    pub sent: AtomicU64,
    /// Records the brokers acknowledged (`acks=all`).
    pub delivered: AtomicU64,
    /// Records that could not be delivered (after librdkafka's own retries).
    pub failed: AtomicU64,
    last_error: Mutex<Option<(Instant, String)>>,
}

impl Delivery {
    /// The last delivery error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, e)| e.clone())
    }
}

/// Counts deliveries; logs failures at most every 5 s.
pub struct DeliveryContext(Arc<Delivery>);

/// librdkafka's log lines, into this program's log (rdkafka's default goes to the `log`
/// crate, which nothing here reads).
fn forward_log(level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        L::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        _ => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// librdkafka's client-level errors (broker down, transport), into this program's log.
fn forward_error(error: KafkaError, reason: &str) {
    tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    let mut last = LAST_BROKER_ERROR.lock().unwrap_or_else(|e| e.into_inner());
    // "All brokers are down" follows the error that says why: keep that one.
    let summary = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
    if !(summary
        && last
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(60)))
    {
        *last = Some((Instant::now(), explained(&error, reason)));
    }
}

/// What a broker error says, for a message: librdkafka's reason and, for a refused SASL
/// login (a wrong user or password, a mechanism the brokers do not take), which settings to
/// check.
fn explained(error: &KafkaError, reason: &str) -> String {
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication) {
        format!(
            "{reason}; the brokers refused the SASL authentication: check kafka.security.sasl_username, \
             kafka.security.sasl_password (FMSFLOW_KAFKA__SECURITY__SASL_PASSWORD) and \
             kafka.security.sasl_mechanism"
        )
    } else {
        reason.to_string()
    }
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(error, reason)
    }
}

/// The consumers' context: librdkafka's log and errors into this program's log.
pub struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(error, reason)
    }
}

impl rdkafka::consumer::ConsumerContext for LogContext {}

impl ProducerContext for DeliveryContext {
    /// The engine's sinks pass a ticket, finished when the record is acknowledged, and the
    /// time it was sent (for the `kafka` sink's write latency).
    type DeliveryOpaque = Box<(Instant, Option<Ticket>)>;
    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Box<(Instant, Option<Ticket>)>) {
        let (sent, ticket) = *opaque;
        let metrics = crate::metrics::shared();
        match result {
            Ok(_) => {
                self.0.delivered.fetch_add(1, Relaxed);
                if let Some(t) = ticket {
                    metrics.sink_write("kafka", sent.elapsed().as_secs_f64(), 0);
                    t.finish();
                }
            }
            Err((e, m)) => {
                self.0.failed.fetch_add(1, Relaxed);
                metrics.produce_errors.inc();
                if let Some(t) = ticket {
                    metrics.sink_error("kafka");
                    t.fail(format!("a record to {:?} could not be delivered: {e}", m.topic()));
                }
                let mut last = self.0.last_error.lock().unwrap_or_else(|e| e.into_inner());
                let quiet = last.as_ref().is_some_and(|(t, _)| t.elapsed() < Duration::from_secs(5));
                if !quiet {
                    tracing::error!(topic = m.topic(), error = %e, "a record could not be delivered (further failures are counted, logged every 5 s)");
                }
                let logged_at = match last.as_ref() {
                    Some((t, _)) if quiet => *t,
                    _ => Instant::now(),
                };
                *last = Some((logged_at, e.to_string()));
            }
        }
    }
}

/// An idempotent producer (`acks=all`, `enable.idempotence`): a record is written once, in
/// order per partition, through broker failures. Sending waits while librdkafka's queue is
/// full, so a slow cluster slows the sender instead of dropping records.
pub struct KafkaProducer {
    inner: ThreadedProducer<DeliveryContext>,
    /// Delivery counts.
    pub delivery: Arc<Delivery>,
}

impl KafkaProducer {
    /// Connects to `brokers` (lazily: the first send finds them).
    pub fn new(brokers: &str) -> Result<Self, KafkaConnError> {
        Self::with(brokers, &KafkaSecurity::default())
    }

    /// [`KafkaProducer::new`] with TLS or SASL settings (`settings.security`).
    pub fn with(brokers: &str, security: &KafkaSecurity) -> Result<Self, KafkaConnError> {
        let delivery = Arc::new(Delivery::default());
        let inner = base_config(brokers, security)
            .set("enable.idempotence", "true")
            // One produce request in flight per broker. librdkafka (2.12) lets an idempotent
            // partition have one request of 5 or more records in flight at a time; while it
            // waits, a partition with a batch due keeps its broker thread polling without
            // sleeping. With more requests allowed, every due partition spins like that: a
            // core per producer while a broker is slow to answer, which on a shared machine
            // makes the broker slower still (docs/BENCHMARKS.md, live latency). With one,
            // the next request is built and waits to be sent, and the thread sleeps.
            .set("max.in.flight.requests.per.connection", "1")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "200000")
            // Give up on a record only after 5 minutes of failing to deliver it.
            .set("message.timeout.ms", "300000")
            .create_with_context(DeliveryContext(delivery.clone()))
            .map_err(client_err("creating the producer"))?;
        Ok(KafkaProducer { inner, delivery })
    }

    /// Queues one record. `timestamp_ms` becomes the record's timestamp (the ingest time the
    /// engine's rules use). A `ticket` is finished when the brokers acknowledge the record,
    /// or failed if it cannot be delivered.
    pub fn send(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        timestamp_ms: Option<i64>,
        headers: Option<OwnedHeaders>,
        ticket: Option<Ticket>,
    ) -> Result<(), KafkaConnError> {
        if ticket.is_some() {
            crate::metrics::shared().sink_write_bytes("kafka", key.len() + payload.len());
        }
        let mut record = BaseRecord::with_opaque_to(topic, Box::new((Instant::now(), ticket)))
            .key(key)
            .payload(payload);
        if let Some(ts) = timestamp_ms {
            record = record.timestamp(ts);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        let mut waited = Instant::now();
        loop {
            match self.inner.send(record) {
                Ok(()) => {
                    self.delivery.sent.fetch_add(1, Relaxed);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    if waited.elapsed() > Duration::from_secs(10) {
                        waited = Instant::now();
                        tracing::warn!(
                            topic,
                            "the producer's queue has been full for 10 s: the brokers are slow or down"
                        );
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, r)) => {
                    let err = client_err(format!("producing to {topic:?}"))(e);
                    crate::metrics::shared().produce_errors.inc();
                    if let Some(t) = r.delivery_opaque.1 {
                        crate::metrics::shared().sink_error("kafka");
                        t.fail(err.to_string());
                    }
                    return Err(err);
                }
            }
        }
    }

    /// Waits until every queued record is delivered or has failed, at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaConnError> {
        self.inner.flush(timeout).map_err(client_err("flushing the producer"))
    }
}

/// Where a read of the raw topic starts (`--from`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// Each partition's first retained record.
    Earliest,
    /// Each partition's end: only records produced from now on.
    Latest,
    /// The first record of each partition whose timestamp is at or after this time (ms).
    Timestamp(i64),
    /// Explicit offsets; a partition not listed starts at its earliest record.
    Offsets(BTreeMap<i32, i64>),
    /// The lake's checkpoint (`--from checkpoint`); turned into a [`StartAt::Resume`] once
    /// the checkpoint is read.
    Checkpoint,
    /// Resuming from a checkpoint: see [`ResumePlan`].
    Resume(ResumePlan),
}

/// Where a resumed run reads: each partition from `start` (the re-read point) to `read_end`
/// (where the checkpoint's reader was) in the recovery epochs `0..epochs`, then on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumePlan {
    pub start: BTreeMap<i32, i64>,
    pub read_end: BTreeMap<i32, i64>,
    pub epochs: u64,
}

impl std::str::FromStr for StartAt {
    type Err = KafkaConnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| KafkaConnError::BadStart(s.to_string(), why.to_string());
        match s {
            "earliest" => return Ok(StartAt::Earliest),
            "latest" => return Ok(StartAt::Latest),
            "checkpoint" => return Ok(StartAt::Checkpoint),
            _ => {}
        }
        if let Some(t) = s.strip_prefix("timestamp:") {
            return parse_rfc3339(t)
                .map(StartAt::Timestamp)
                .ok_or_else(|| bad("expected timestamp:<RFC 3339 time>, e.g. timestamp:2025-07-07T08:00:00Z"));
        }
        if let Some(list) = s.strip_prefix("offsets:") {
            let mut m = BTreeMap::new();
            for item in list.split(',').filter(|i| !i.is_empty()) {
                let (p, o) = item
                    .split_once('=')
                    .ok_or_else(|| bad("expected offsets:<partition>=<offset>,..."))?;
                let p: i32 = p
                    .trim()
                    .parse()
                    .map_err(|_| bad(&format!("partition {p:?} is not a number")))?;
                let o: i64 = o
                    .trim()
                    .parse()
                    .map_err(|_| bad(&format!("offset {o:?} is not a number")))?;
                if p < 0 || o < 0 {
                    return Err(bad("partitions and offsets are not negative"));
                }
                if m.insert(p, o).is_some() {
                    return Err(bad(&format!("partition {p} is listed twice")));
                }
            }
            if m.is_empty() {
                return Err(bad("no <partition>=<offset> given"));
            }
            return Ok(StartAt::Offsets(m));
        }
        Err(bad(
            "expected earliest, latest, checkpoint, timestamp:<RFC 3339> or offsets:<partition>=<offset>,...",
        ))
    }
}

/// What the engine reads from Kafka.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    /// Brokers and topic names.
    pub settings: KafkaSettings,
    /// Where each partition starts.
    pub from: StartAt,
    /// Replay: stop at each partition's end as it is when the run starts, with epochs cut at
    /// fixed offsets so that the same range always gives the same outputs. Otherwise follow
    /// the topic until `stop` is set, with epochs cut by the wall clock.
    pub until_end: bool,
    /// Set to stop a following read.
    pub stop: Arc<AtomicBool>,
}

struct Part {
    id: i32,
    /// Offset of the first record read.
    start: i64,
    /// Resuming: where the recovery epochs end (the checkpoint's position).
    recover_end: Option<i64>,
    /// Offset after the last record taken.
    next: i64,
    /// Replay: the partition's end (exclusive).
    end: Option<i64>,
    /// Records received but not taken yet (they belong to a later epoch).
    pending: VecDeque<RawRecord>,
    /// Ingest time (record timestamp) of the last record taken.
    last_ingest: Option<i64>,
    /// Offset after the last record received.
    received: i64,
    paused: bool,
}

impl Part {
    /// Takes the oldest pending record if `below` accepts its offset, moving `next` past it.
    fn take_if(&mut self, below: impl Fn(i64) -> bool) -> Option<RawRecord> {
        let r = self.pending.pop_front_if(|r| below(r.pos.offset as i64))?;
        self.next = r.pos.offset as i64 + 1;
        self.last_ingest = r.ingest_ms.or(self.last_ingest);
        Some(r)
    }

    /// Replay: nothing more of this partition will be taken.
    fn done(&self) -> bool {
        self.pending.is_empty() && self.end.is_some_and(|e| self.next >= e)
    }
}

/// Records taken from librdkafka per call of `rd_kafka_consume_batch_queue`.
const BATCH: usize = 4096;

/// The records of a reader's partitions, taken from librdkafka in batches: every partition's
/// fetch queue is forwarded to this one queue, which one call empties up to [`BATCH`] records
/// at a time. (The crate's `poll` hands out one record a call, each with an event object, an
/// `Arc` and a lock of the consumer's queue: the reader alone ran at 0.8 M records/s on one
/// thread, against 2.1 M for Kafka's own consumer.) The consumer's queue, which then carries
/// only errors and logs, is still polled.
struct Batches {
    queue: *mut rdkafka::bindings::rd_kafka_queue_t,
    got: Vec<*mut rdkafka::bindings::rd_kafka_message_t>,
    /// The batch's records as (partition, offset, payload's place in `bytes`, ingest time),
    /// and their payloads one after another: the records' payloads are slices of one buffer
    /// per batch (an allocation per batch, not per record).
    taken: Vec<(i32, i64, std::ops::Range<usize>, Option<i64>)>,
    bytes: Vec<u8>,
}

// SAFETY: a librdkafka queue may be served from any thread; the reader owns this one, and the
// messages in `got` only between two statements of `PartitionReader::fill`.
unsafe impl Send for Batches {}

impl Batches {
    /// Forwards the fetch queues of `partitions` to a new queue. Before the assignment: the
    /// first records fetched then already come here (a fetch start keeps a forwarding the
    /// application set).
    fn forward(
        consumer: &BaseConsumer<LogContext>,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Batches, KafkaConnError> {
        use rdkafka::bindings::{
            rd_kafka_queue_destroy, rd_kafka_queue_forward, rd_kafka_queue_get_partition, rd_kafka_queue_new,
        };
        let rk = consumer.client().native_ptr();
        let name = std::ffi::CString::new(topic).map_err(|_| {
            client_err("naming the topic")(KafkaError::ClientCreation(format!("{topic:?} contains NUL")))
        })?;
        // SAFETY: `rk` is the consumer's live handle; the queue is destroyed by `Drop`, before
        // the consumer (the reader's field order).
        let batches = Batches {
            queue: unsafe { rd_kafka_queue_new(rk) },
            got: Vec::with_capacity(BATCH),
            taken: Vec::with_capacity(BATCH),
            bytes: Vec::new(),
        };
        for &p in partitions {
            // SAFETY: the topic name is NUL-terminated and outlives the call; the partition's
            // queue handle is released right after its forwarding is set.
            unsafe {
                let pq = rd_kafka_queue_get_partition(rk, name.as_ptr(), p);
                if pq.is_null() {
                    return Err(client_err(format!("reading partition {p} of {topic:?}"))(
                        KafkaError::ClientCreation("librdkafka has no queue for it".into()),
                    ));
                }
                rd_kafka_queue_forward(pq, batches.queue);
                rd_kafka_queue_destroy(pq);
            }
        }
        Ok(batches)
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // SAFETY: created by `rd_kafka_queue_new` and destroyed once, while the client lives.
        unsafe { rdkafka::bindings::rd_kafka_queue_destroy(self.queue) }
    }
}

/// One worker's partitions of the raw topic, read in batches through one queue (see
/// [`Batches`]): each record goes to its partition's pending buffer, from which epochs are
/// cut.
pub struct PartitionReader {
    /// Before `consumer`: dropped first.
    batches: Batches,
    consumer: BaseConsumer<LogContext>,
    topic: String,
    /// Resuming: the number of recovery epochs.
    recovery_epochs: u64,
    parts: Vec<Part>,
    /// Partition id to index in `parts`.
    index: BTreeMap<i32, usize>,
    last_log: Instant,
}

/// Files one record into its partition's pending buffer. Returns 1 if the record is of one of
/// the reader's partitions, else 0.
fn file(
    index: &BTreeMap<i32, usize>,
    parts: &mut [Part],
    partition: i32,
    offset: i64,
    payload: Bytes,
    ingest_ms: Option<i64>,
) -> usize {
    let Some(&i) = index.get(&partition) else {
        return 0;
    };
    let part = &mut parts[i];
    part.received = offset + 1;
    // Past the end of a replay: not ours to take.
    if part.end.is_none_or(|e| offset < e) {
        part.pending.push_back(RawRecord {
            payload,
            ingest_ms,
            pos: SourcePos {
                source: partition as u32,
                offset: offset as u64,
            },
        });
    }
    1
}

/// What a consumer error means: records that no longer exist at the read position are an
/// error of the run; broker and transport errors are retried by librdkafka, and logged (at
/// most every 10 s).
fn consumer_error(topic: &str, last_log: &mut Instant, e: KafkaError) -> Result<(), KafkaConnError> {
    if matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange)
    ) {
        return Err(client_err(format!(
            "reading {topic:?}: records at the read position no longer exist (deleted by retention?)"
        ))(e));
    }
    if last_log.elapsed() > Duration::from_secs(10) {
        *last_log = Instant::now();
        tracing::warn!(topic = %topic, error = %e, "kafka consumer error (librdkafka retries; logged every 10 s)");
    }
    Ok(())
}

impl PartitionReader {
    /// Opens the partitions `p` of the raw topic with `p % peers == index`, at the offsets
    /// `spec.from` names.
    pub fn open(spec: &SourceSpec, index: usize, peers: usize) -> Result<Self, KafkaConnError> {
        let s = &spec.settings;
        let consumer: BaseConsumer<LogContext> = base_config(&s.brokers, &s.security)
            .set("group.id", &s.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // Records deleted under the reader (retention) are an error, never skipped.
            .set("auto.offset.reset", "error")
            // A partition whose prefetched records reached librdkafka's queue limits is not
            // fetched again for this long (librdkafka's default: 1 s). A worker that takes
            // records in bursts between epochs of dataflow work hit that limit at every
            // burst and then waited idle: the engine read 0.2-0.7 M records/s from a broker
            // that served 2 M.
            .set("fetch.queue.backoff.ms", "10")
            .create_with_context(LogContext)
            .map_err(client_err("creating a consumer"))?;
        // A topic just created may be unknown to the broker that answers, or have no leaders
        // yet, for a moment: its metadata then shows a topic error, or partitions with one. A
        // topic still unknown after a few seconds does not exist.
        let asked = Instant::now();
        let count = settled(
            || format!("reading the metadata of {:?}", s.raw_topic),
            || {
                let md = consumer.fetch_metadata(Some(&s.raw_topic), REQUEST_TIMEOUT)?;
                let Some(t) = md.topics().iter().find(|t| t.name() == s.raw_topic) else {
                    return Ok(0);
                };
                let error = t.error().or_else(|| t.partitions().iter().find_map(|p| p.error()));
                match error.map(RDKafkaErrorCode::from) {
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) if asked.elapsed() > UNKNOWN_TOPIC_GRACE => Ok(0),
                    Some(code) => Err(KafkaError::MetadataFetch(code)),
                    None => Ok(t.partitions().len()),
                }
            },
        )?;
        if count == 0 {
            return Err(KafkaConnError::NoTopic(s.raw_topic.clone()));
        }
        let mine: Vec<i32> = (0..count as i32).filter(|p| *p as usize % peers == index).collect();
        let mut parts = Vec::new();
        for &p in &mine {
            let (low, high) = settled(
                || format!("reading the offsets of partition {p}"),
                || consumer.fetch_watermarks(&s.raw_topic, p, REQUEST_TIMEOUT),
            )?;
            let start = match &spec.from {
                StartAt::Earliest => low,
                StartAt::Latest => high,
                StartAt::Offsets(m) => m.get(&p).copied().unwrap_or(low).clamp(low, high),
                StartAt::Resume(plan) => plan.start.get(&p).copied().unwrap_or(low).clamp(low, high),
                StartAt::Checkpoint => {
                    return Err(KafkaConnError::BadStart(
                        "checkpoint".into(),
                        "the checkpoint must be read before the partitions are opened".into(),
                    ))
                }
                StartAt::Timestamp(ts) => {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(&s.raw_topic, p, Offset::Offset(*ts))
                        .map_err(client_err("building an offset request"))?;
                    let found = settled(
                        || format!("looking up partition {p} by time"),
                        || consumer.offsets_for_times(tpl.clone(), REQUEST_TIMEOUT),
                    )?;
                    match found.find_partition(&s.raw_topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        _ => high,
                    }
                }
            };
            let recover_end = match &spec.from {
                StartAt::Resume(plan) => Some(plan.read_end.get(&p).copied().unwrap_or(start).max(start)),
                _ => None,
            };
            parts.push(Part {
                id: p,
                start,
                recover_end,
                next: start,
                end: spec.until_end.then_some(high),
                pending: VecDeque::new(),
                last_ingest: None,
                received: start,
                paused: false,
            });
        }
        let batches = Batches::forward(&consumer, &s.raw_topic, &mine)?;
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition_offset(&s.raw_topic, p.id, Offset::Offset(p.start))
                .map_err(client_err("building the assignment"))?;
        }
        consumer.assign(&tpl).map_err(client_err("assigning partitions"))?;
        tracing::info!(
            worker = index,
            partitions = ?parts.iter().map(|p| (p.id, p.start, p.end)).collect::<Vec<_>>(),
            "kafka partitions assigned (partition, start, end)"
        );
        let index = parts.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
        Ok(PartitionReader {
            batches,
            consumer,
            topic: s.raw_topic.clone(),
            recovery_epochs: match &spec.from {
                StartAt::Resume(plan) => plan.epochs,
                _ => 0,
            },
            parts,
            index,
            last_log: Instant::now(),
        })
    }

    /// The partitions this reader owns.
    pub fn partitions(&self) -> Vec<i32> {
        self.parts.iter().map(|p| p.id).collect()
    }

    /// For each partition: the offset after the last record taken, and the partition's end
    /// as the consumer last heard it from the broker (no request is made).
    pub fn lag(&self) -> Vec<(i32, i64, Option<i64>)> {
        self.parts
            .iter()
            .map(|p| (p.id, p.next, self.cached_end(p.id)))
            .collect()
    }

    /// The partition's end from librdkafka's cache, which every fetch response updates (the
    /// crate only offers `fetch_watermarks`, a request to the broker).
    fn cached_end(&self, partition: i32) -> Option<i64> {
        use rdkafka::bindings::{rd_kafka_get_watermark_offsets, rd_kafka_resp_err_t};
        let topic = std::ffi::CString::new(self.topic.as_str()).ok()?;
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client handle lives as long as `self.consumer`; librdkafka only reads
        // the NUL-terminated topic name and writes the two offsets.
        let err = unsafe {
            rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        (err == rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
    }

    /// For each partition, a lower bound of the ingest times of its records still to come,
    /// for the checkpoint's bookkeeping of hours a lagging partition can reopen: `i64::MAX`
    /// once the reader has taken everything the broker had (what comes later is produced
    /// later), else the ingest time of the last record taken (a partition's records come
    /// in about ingest order; the checkpoint allows `max_future` for the rest), or
    /// `i64::MIN` before its first.
    pub fn ingest_marks(&self) -> Vec<(i32, i64)> {
        self.parts
            .iter()
            .map(|p| {
                let caught_up = p.pending.is_empty() && self.cached_end(p.id).is_some_and(|end| p.next >= end);
                let mark = if caught_up {
                    i64::MAX
                } else {
                    p.last_ingest.unwrap_or(i64::MIN)
                };
                (p.id, mark)
            })
            .collect()
    }

    /// For each partition, the offset after the last record taken.
    pub fn positions(&self) -> Vec<(i32, i64)> {
        self.parts.iter().map(|p| (p.id, p.next)).collect()
    }

    /// Waits at most `timeout` for records and files every one that came (up to [`BATCH`])
    /// into its partition's pending buffer. Returns how many came.
    fn fill(&mut self, timeout: Duration) -> Result<usize, KafkaConnError> {
        use rdkafka::bindings::{
            rd_kafka_consume_batch_queue, rd_kafka_message_destroy, rd_kafka_message_timestamp, rd_kafka_resp_err_t,
            rd_kafka_timestamp_type_t,
        };
        // Errors and logs; a record here (none is expected) is filed like the others.
        let mut came = 0;
        while let Some(event) = self.consumer.poll(Duration::ZERO) {
            match event {
                Ok(m) => {
                    let (p, o, ingest_ms) = (m.partition(), m.offset(), m.timestamp().to_millis());
                    came += file(
                        &self.index,
                        &mut self.parts,
                        p,
                        o,
                        Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                        ingest_ms,
                    );
                }
                Err(e) => consumer_error(&self.topic, &mut self.last_log, e)?,
            }
        }
        // What is queued now; if nothing is, the first record within `timeout` (a batch call
        // with a timeout waits for a full batch) and what is queued with it.
        let queue = self.batches.queue;
        let got = self.batches.got.as_mut_ptr();
        // SAFETY: `got` has room for BATCH pointers, and librdkafka writes at most as many as
        // it is told; each message is read and then destroyed once, below, before `got` is
        // cleared.
        let mut n = unsafe { rd_kafka_consume_batch_queue(queue, 0, got, BATCH) };
        if n <= 0 && !timeout.is_zero() {
            let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            n = unsafe { rd_kafka_consume_batch_queue(queue, timeout_ms, got, 1) };
            if n == 1 {
                n += unsafe { rd_kafka_consume_batch_queue(queue, 0, got.add(1), BATCH - 1) }.max(0);
            }
        }
        if n <= 0 {
            return Ok(came);
        }
        unsafe { self.batches.got.set_len(n as usize) };
        let mut failed = None;
        for i in 0..n as usize {
            let ptr = self.batches.got[i];
            // SAFETY: a message librdkafka handed out and has not been destroyed yet; its
            // payload is `len` bytes (or null).
            let (err, partition, offset, payload, ingest_ms) = unsafe {
                let m = &*ptr;
                let payload: &[u8] = if m.payload.is_null() {
                    &[]
                } else {
                    std::slice::from_raw_parts(m.payload as *const u8, m.len)
                };
                let mut kind = rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
                let ts = rd_kafka_message_timestamp(ptr, &mut kind);
                let ingest_ms =
                    (ts != -1 && kind != rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE).then_some(ts);
                (m.err, m.partition, m.offset, payload, ingest_ms)
            };
            if err == rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                let b = &mut self.batches;
                b.taken.push((
                    partition,
                    offset,
                    b.bytes.len()..b.bytes.len() + payload.len(),
                    ingest_ms,
                ));
                b.bytes.extend_from_slice(payload);
            } else if failed.is_none() {
                failed = consumer_error(
                    &self.topic,
                    &mut self.last_log,
                    KafkaError::MessageConsumption(err.into()),
                )
                .err();
            }
            // SAFETY: destroyed once; `payload` is not used after this.
            unsafe { rd_kafka_message_destroy(ptr) };
        }
        self.batches.got.clear();
        // A fresh buffer for the next batch, of this one's size: the records hold this one.
        let size = self.batches.bytes.len();
        let bytes = Bytes::from(std::mem::replace(&mut self.batches.bytes, Vec::with_capacity(size)));
        for (partition, offset, at, ingest_ms) in self.batches.taken.drain(..) {
            came += file(
                &self.index,
                &mut self.parts,
                partition,
                offset,
                bytes.slice(at),
                ingest_ms,
            );
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(came),
        }
    }

    /// Pauses a partition whose pending records run far ahead of the epoch being cut, and
    /// resumes it when they are taken, so a fast partition cannot fill memory. A resumed
    /// partition is also sought to the record after the last one received: librdkafka can
    /// otherwise lose the fetch position across a pause (librdkafka issues #2190, #5591).
    fn flow_control(&mut self, limit: usize) -> Result<(), KafkaConnError> {
        for part in &mut self.parts {
            let want_paused = part.pending.len() >= limit;
            if want_paused != part.paused {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&self.topic, part.id);
                let r = if want_paused {
                    self.consumer.pause(&tpl)
                } else {
                    self.consumer.resume(&tpl)
                };
                r.map_err(client_err(format!("pausing or resuming partition {}", part.id)))?;
                if !want_paused {
                    self.consumer
                        .seek(&self.topic, part.id, Offset::Offset(part.received), REQUEST_TIMEOUT)
                        .map_err(client_err(format!("seeking partition {}", part.id)))?;
                }
                part.paused = want_paused;
            }
        }
        Ok(())
    }

    /// Replay: appends the records of `epoch` of every partition, the offsets
    /// `[start + epoch × per_partition, start + (epoch + 1) × per_partition)`, waiting for them
    /// as long as `stall` allows between two records. Returns whether any partition has
    /// records left.
    pub fn read_epoch(
        &mut self,
        epoch: u64,
        per_partition: u64,
        stall: Duration,
        out: &mut Vec<RawRecord>,
    ) -> Result<bool, KafkaConnError> {
        let recovery = self.recovery_epochs;
        let bound = |p: &Part| match p.recover_end {
            // Resuming: the recovery epochs stop at the checkpoint's position, later epochs
            // count from there.
            Some(end) if epoch < recovery => (p.start + ((epoch + 1) * per_partition) as i64).min(end),
            Some(end) => end + ((epoch - recovery + 1) * per_partition) as i64,
            None => p.start + ((epoch + 1) * per_partition) as i64,
        };
        let mut quiet_since = Instant::now();
        loop {
            let mut complete = true;
            for part in &mut self.parts {
                let b = bound(part);
                while let Some(r) = part.take_if(|o| o < b) {
                    out.push(r);
                }
                // This partition's share of the epoch is in once a later record is waiting,
                // or the offset bound or the replay's end is reached.
                let in_full = !part.pending.is_empty() || part.next >= b || part.done();
                complete &= in_full;
            }
            self.flow_control((2 * per_partition as usize).max(4 * BATCH))?;
            if complete {
                return Ok(self.parts.iter().any(|p| !p.done()));
            }
            if self.fill(Duration::from_millis(100))? > 0 {
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() > Duration::from_secs(1) && self.skip_gaps_at_end()? {
                continue;
            } else if quiet_since.elapsed() > stall {
                let p = self
                    .parts
                    .iter()
                    .find(|p| !p.done())
                    .expect("a partition is not complete");
                return Err(KafkaConnError::Stalled {
                    topic: self.topic.clone(),
                    partition: p.id,
                    offset: p.next,
                    end: p.end.unwrap_or(-1),
                    secs: stall.as_secs(),
                });
            }
        }
    }

    /// Replay: a partition whose last offsets before its end hold no records (transaction
    /// markers, compaction) never delivers a record at `end - 1`. The consumer's position
    /// (past everything it has delivered, gaps included) tells: at or past the end, the
    /// partition is complete. Returns whether a partition was completed so.
    fn skip_gaps_at_end(&mut self) -> Result<bool, KafkaConnError> {
        let waiting: Vec<usize> = (0..self.parts.len())
            .filter(|&i| self.parts[i].pending.is_empty() && !self.parts[i].done() && self.parts[i].end.is_some())
            .collect();
        if waiting.is_empty() {
            return Ok(false);
        }
        let positions = self
            .consumer
            .position()
            .map_err(client_err("reading the consumer's positions"))?;
        let mut any = false;
        for i in waiting {
            let part = &mut self.parts[i];
            if let Some(Offset::Offset(pos)) = positions.find_partition(&self.topic, part.id).map(|e| e.offset()) {
                let end = part.end.expect("filtered");
                if pos >= end && part.next < end {
                    part.next = end;
                    any = true;
                }
            }
        }
        Ok(any)
    }

    /// Follow: appends up to `max` records that are available now, without waiting. Records
    /// already received come first: after a resume, the recovery epochs leave behind what
    /// arrived past their bounds, and partitions they paused are resumed here.
    pub fn read_available(&mut self, max: usize, out: &mut Vec<RawRecord>) -> Result<usize, KafkaConnError> {
        let mut n = self.take_pending(max, out);
        // Following, nothing is cut ahead of the reader: no partition stays paused.
        self.flow_control(usize::MAX)?;
        while n < max && self.fill(Duration::ZERO)? > 0 {
            n += self.take_pending(max - n, out);
        }
        Ok(n)
    }

    /// Appends up to `max` of the records received and not taken yet, partition by partition.
    fn take_pending(&mut self, max: usize, out: &mut Vec<RawRecord>) -> usize {
        let mut n = 0;
        for part in &mut self.parts {
            while n < max {
                let Some(r) = part.take_if(|_| true) else {
                    break;
                };
                out.push(r);
                n += 1;
            }
        }
        n
    }

    /// Records in the consumer group that every record before these positions has been
    /// processed and all the outputs of its epoch are stored (for lag monitoring; a restart
    /// decides where to start itself). `sync` waits for the brokers to confirm (the last
    /// commit of a run); otherwise the commit is sent in the background.
    pub fn commit(&self, positions: &[(i32, i64)], sync: bool) -> Result<(), KafkaConnError> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for &(p, o) in positions {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(o))
                .map_err(client_err("building a commit"))?;
        }
        self.consumer
            .commit(
                &tpl,
                if sync {
                    rdkafka::consumer::CommitMode::Sync
                } else {
                    rdkafka::consumer::CommitMode::Async
                },
            )
            .map_err(client_err("committing offsets"))
    }
}

/// The engine's Kafka outputs: the hourly changelog and the dead letters.
pub struct KafkaSinks {
    /// The shared producer.
    pub producer: KafkaProducer,
    /// Changelog topic.
    pub hourly_topic: String,
    /// Dead-letter topic.
    pub rejects_topic: String,
}

impl KafkaSinks {
    /// Sends a rejection to the dead-letter topic: the value is the original bytes, the key
    /// the device id (empty when unknown), and the headers say why and where it came from.
    pub fn dead_letter(&self, r: &Rejection, ticket: Option<Ticket>) -> Result<(), KafkaConnError> {
        let text = |v: String| v.into_bytes();
        let mut h = OwnedHeaders::new()
            .insert(Header {
                key: "rule",
                value: Some(r.rule.name().as_bytes()),
            })
            .insert(Header {
                key: "reason",
                value: Some(r.reason.as_bytes()),
            })
            .insert(Header {
                key: "source",
                value: Some(&text(r.pos.source.to_string())),
            })
            .insert(Header {
                key: "offset",
                value: Some(&text(r.pos.offset.to_string())),
            });
        if let Some(t) = r.time_ms {
            h = h.insert(Header {
                key: "time_ms",
                value: Some(&text(t.to_string())),
            });
        }
        if let Some(t) = r.ingest_ms {
            h = h.insert(Header {
                key: "ingest_ms",
                value: Some(&text(t.to_string())),
            });
        }
        let key = if r.device == 0 {
            String::new()
        } else {
            r.device.to_string()
        };
        // Stamped when sent, not with the record's ingest time: a replay of records older
        // than the topic's retention would otherwise have its dead letters deleted by time
        // retention minutes after they were written. The ingest time is in a header.
        self.producer
            .send(&self.rejects_topic, key.as_bytes(), &r.payload, None, Some(h), ticket)
    }

    /// Sends the current aggregate of (device, hour), valid as of dataflow time `epoch`.
    pub fn hourly(
        &self,
        device: u32,
        hour: i64,
        stats: &HourStats,
        epoch: u64,
        ticket: Option<Ticket>,
    ) -> Result<(), KafkaConnError> {
        let (key, value) = changelog_record(device, hour, stats, epoch);
        self.producer
            .send(&self.hourly_topic, key.as_bytes(), &value, None, None, ticket)
    }
}

/// The changelog record of one (device, hour): key `device/hour-start` (for example
/// `17/2025-07-07T08:00:00Z`) and the aggregate as JSON.
pub fn changelog_record(device: u32, hour: i64, s: &HourStats, epoch: u64) -> (String, Vec<u8>) {
    let hour_start = format_rfc3339(hour * HOUR_MS);
    let f = s.figures();
    let mut metrics = serde_json::Map::new();
    for (name, [min, max, mean, stddev]) in METRICS.iter().zip(f.metrics) {
        metrics.insert(
            name.to_string(),
            serde_json::json!({ "min": min, "max": max, "mean": mean, "stddev": stddev }),
        );
    }
    let value = serde_json::json!({
        "device": device,
        "hour": hour_start,
        "count": s.count,
        "fail_count": s.fails,
        "first_time": format_rfc3339(s.first_ms),
        "last_time": format_rfc3339(s.last_ms),
        "metrics": metrics,
        "valid_at_epoch": epoch,
    });
    (format!("{device}/{hour_start}"), value.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_sasl_login_names_the_settings_to_check() {
        let reason = "sasl_ssl://127.0.0.1:9392/bootstrap: SASL authentication error: Authentication failed";
        let e = explained(&KafkaError::Global(RDKafkaErrorCode::Authentication), reason);
        assert!(e.starts_with(reason), "{e}");
        assert!(e.contains("kafka.security.sasl_username"), "{e}");
        let refused = "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed";
        let e = explained(&KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure), refused);
        assert_eq!(e, refused);
    }

    #[test]
    fn start_positions_parse() {
        assert_eq!("earliest".parse::<StartAt>().unwrap(), StartAt::Earliest);
        assert_eq!("latest".parse::<StartAt>().unwrap(), StartAt::Latest);
        assert_eq!(
            "timestamp:2025-07-07T08:00:00Z".parse::<StartAt>().unwrap(),
            StartAt::Timestamp(1_751_875_200_000)
        );
        assert_eq!(
            "offsets:0=10,3=7".parse::<StartAt>().unwrap(),
            StartAt::Offsets([(0, 10), (3, 7)].into_iter().collect())
        );
        for bad in [
            "",
            "first",
            "timestamp:yesterday",
            "offsets:",
            "offsets:0",
            "offsets:a=1",
            "offsets:0=-1",
            "offsets:0=1,0=2",
        ] {
            let e = bad.parse::<StartAt>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("--from {bad:?}")), "{e}");
        }
        assert_eq!("checkpoint".parse::<StartAt>().unwrap(), StartAt::Checkpoint);
    }

    #[test]
    fn changelog_key_and_value() {
        let mut s = HourStats::default();
        let r = fmsflow_dataflows::validate(
            RawRecord {
                payload: br#"{"time": "2025-07-07T08:21:29Z", "DeviceId": 17, "sensor1": 85.69, "sensor2": 85.81, "sensor3": 82.15, "motor1": 1245.16, "motor2": 874.81, "motor3": 1119.36, "isFail": true}"#.to_vec().into(),
                ingest_ms: None,
                pos: SourcePos::default(),
            },
            &Default::default(),
        )
        .unwrap();
        s.add(&r);
        let (key, value) = changelog_record(17, r.hour(), &s, 4);
        assert_eq!(key, "17/2025-07-07T08:00:00Z");
        let v: serde_json::Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(v["count"], 1);
        assert_eq!(v["fail_count"], 1);
        assert_eq!(v["metrics"]["motor1"]["max"], 1245.16);
        assert_eq!(v["first_time"], "2025-07-07T08:21:29Z");
        assert_eq!(v["valid_at_epoch"], 4);
    }
}
