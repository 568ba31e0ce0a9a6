//! The checks of the `payload` fuzz target (`fuzz/fuzz_targets/payload.rs`), kept here so
//! that the fuzz target, its regression test (`tests/fuzz_regressions.rs`) and the proptest
//! fuzzing (`tests/fuzz.rs`) run the same code. Not part of the crate's API.
//!
//! Each function panics when an invariant does not hold: that is what libFuzzer reports as
//! a crash and what makes a test fail.
//!
//! [`check_payload`] reads a fuzz input as one control byte followed by the payload bytes:
//!
//! | bits of byte 0 | meaning |
//! | --- | --- |
//! | 0..=3 | the ingest time, relative to the payload's own `time` when it has one ([`ingest_for`]) |
//! | 4 | 0: the rest is one payload; 1: the rest is up to [`MAX_RECORDS`] payloads, one a line, then run through a [`Deduper`] |
//! | 5..=7 | with bit 4: the readings go to the [`Deduper`] in epochs of 1 + this many |
//!
//! Every record is checked against a reference decoding ([`Reference`]: serde's derived
//! `Deserialize` of the payload's fields, which the hand-written decoders in `rules.rs` must
//! agree with) and a model of the rules' order, then the accepted ones against a model of
//! the duplicate rule.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::{RawRecord, Reading, SourcePos, METRICS};
use crate::rules::{validate, validate_keeping, Deduper, Rejection, Rule, RuleConfig};
use crate::time::{days_from_civil, format_rfc3339, parse_rfc3339, HOUR_MS};

/// The most records one multi-record input is split into.
pub const MAX_RECORDS: usize = 64;

/// The ingest time when a payload has no readable `time` (2025-07-07T08:21:29Z, the golden
/// files' time).
const BASE_MS: i64 = 1_751_876_489_000;

/// The fuzz target's entry: decodes `data` (see the module's documentation) and checks every
/// record it holds. Panics when an invariant does not hold.
pub fn check_payload(data: &[u8]) {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let cfg = RuleConfig::default();
    if control & 0x10 == 0 {
        check_record(&cfg, rest, control, SourcePos { source: 3, offset: 77 });
        return;
    }
    let epoch_len = 1 + (control >> 5) as usize;
    let mut model = DedupModel::new(cfg.max_age_ms + HOUR_MS);
    let mut epoch = Vec::new();
    for (i, line) in rest.split(|b| *b == b'\n').take(MAX_RECORDS).enumerate() {
        let pos = SourcePos {
            source: 1,
            offset: i as u64,
        };
        if let Some(r) = check_record(&cfg, line, control, pos) {
            epoch.push(r);
        }
        if (i + 1) % epoch_len == 0 {
            model.epoch(std::mem::take(&mut epoch));
        }
    }
    model.epoch(epoch);
}

/// The ingest time that the control byte's bits 0..=3 choose for a payload whose event time
/// is `time_ms`: none, the time rules' limits and either side of them, or far away.
pub fn ingest_for(control: u8, time_ms: Option<i64>, cfg: &RuleConfig) -> Option<i64> {
    let t = time_ms.unwrap_or(BASE_MS);
    Some(match control & 0x0f {
        0 => return None,
        1 => t,
        2 => t.saturating_sub(cfg.max_future_ms),
        3 => t.saturating_sub(cfg.max_future_ms).saturating_sub(1),
        4 => t.saturating_add(cfg.max_age_ms),
        5 => t.saturating_add(cfg.max_age_ms).saturating_add(1),
        6 => t.saturating_add(1),
        7 => t.saturating_sub(1),
        8 => t.saturating_add(HOUR_MS),
        9 => t.saturating_add(3 * HOUR_MS),
        10 => i64::MIN,
        11 => i64::MAX,
        12 => 0,
        13 => BASE_MS,
        14 => t.saturating_add(7 * HOUR_MS),
        _ => t.saturating_sub(10 * 60 * 1000),
    })
}

/// The payload's fields as serde's derived `Deserialize` reads them: the reference the
/// rules' own decoders (byte keys, the fast paths, `Nullable`) must agree with.
#[derive(Debug, Deserialize)]
pub struct Reference {
    /// `time`.
    pub time: Option<String>,
    /// `DeviceId`.
    #[serde(rename = "DeviceId")]
    pub device_id: Option<i64>,
    /// `sensor1`.
    pub sensor1: Option<f64>,
    /// `sensor2`.
    pub sensor2: Option<f64>,
    /// `sensor3`.
    pub sensor3: Option<f64>,
    /// `motor1`.
    pub motor1: Option<f64>,
    /// `motor2`.
    pub motor2: Option<f64>,
    /// `motor3`.
    pub motor3: Option<f64>,
    /// `isFail`.
    #[serde(rename = "isFail")]
    pub is_fail: Option<bool>,
}

impl Reference {
    fn metrics(&self) -> [Option<f64>; 6] {
        [
            self.sensor1,
            self.sensor2,
            self.sensor3,
            self.motor1,
            self.motor2,
            self.motor3,
        ]
    }
}

/// What a payload must yield: (device, time, metrics, isFail) of the reading, or the rule
/// that rejects it and a text its reason must contain.
type Expected = Result<(u32, i64, [f64; 6], bool), (Rule, String)>;

/// The rules' decision for a payload the reference decodes, in the order `validate` applies
/// them.
fn model(r: &Reference, ingest_ms: Option<i64>, cfg: &RuleConfig) -> Expected {
    let metrics = r.metrics();
    let missing = [("DeviceId", r.device_id.is_none()), ("time", r.time.is_none())]
        .into_iter()
        .chain(METRICS.iter().zip(metrics).map(|(m, v)| (*m, v.is_none())))
        .chain([("isFail", r.is_fail.is_none())])
        .find(|(_, absent)| *absent);
    if let Some((field, _)) = missing {
        return Err((Rule::MissingField, format!("`{field}`")));
    }
    let (id, time) = (r.device_id.unwrap_or_default(), r.time.as_deref().unwrap_or_default());
    if id < 1 || id > i64::from(cfg.fleet_size) {
        return Err((Rule::UnknownDevice, id.to_string()));
    }
    let Some(t) = parse_rfc3339(time) else {
        return Err((Rule::BadTime, "RFC 3339".into()));
    };
    if let Some(i) = ingest_ms {
        let ahead = i128::from(t) - i128::from(i);
        if ahead > i128::from(cfg.max_future_ms) {
            return Err((Rule::FutureTime, "after ingest".into()));
        }
        if -ahead > i128::from(cfg.max_age_ms) {
            return Err((Rule::StaleTime, "before ingest".into()));
        }
    }
    let metrics = metrics.map(Option::unwrap_or_default);
    for (i, v) in metrics.iter().enumerate() {
        if !v.is_finite() {
            return Err((Rule::NonFinite, METRICS[i].into()));
        }
        let (lo, hi) = cfg.ranges[i];
        if *v < lo || *v > hi {
            return Err((Rule::OutOfRange, METRICS[i].into()));
        }
    }
    Ok((id as u32, t, metrics, r.is_fail.unwrap_or_default()))
}

/// Validates one payload at the ingest time `control` chooses (see [`ingest_for`]) and checks
/// the outcome. Returns the accepted reading.
pub fn check_record(cfg: &RuleConfig, payload: &[u8], control: u8, pos: SourcePos) -> Option<Reading> {
    let reference = reference_of(payload);
    let event_ms = match &reference {
        Some(Ok(r)) => r.time.as_deref().and_then(parse_rfc3339),
        _ => None,
    };
    check_outcome(cfg, payload, ingest_for(control, event_ms, cfg), pos, reference)
}

/// Validates `payload` at `ingest_ms` and checks every property its outcome must have.
/// Returns the accepted reading. Panics when a property does not hold.
pub fn check_at(cfg: &RuleConfig, payload: &[u8], ingest_ms: Option<i64>, pos: SourcePos) -> Option<Reading> {
    check_outcome(cfg, payload, ingest_ms, pos, reference_of(payload))
}

/// The reference decoding of a payload that is a JSON object (or empty, as `validate` sees
/// it: its first byte other than JSON whitespace is `{`, or it has none); `None` for others.
fn reference_of(payload: &[u8]) -> Option<Result<Reference, serde_json::Error>> {
    let first = payload.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    first
        .is_none_or(|b| *b == b'{')
        .then(|| serde_json::from_slice::<Reference>(payload))
}

/// [`check_at`] with the payload's reference decoding (`None`: not a JSON object).
fn check_outcome(
    cfg: &RuleConfig,
    payload: &[u8],
    ingest_ms: Option<i64>,
    pos: SourcePos,
    reference: Option<Result<Reference, serde_json::Error>>,
) -> Option<Reading> {
    let text = || String::from_utf8_lossy(payload).into_owned();
    let raw = RawRecord {
        payload: payload.to_vec().into(),
        ingest_ms,
        pos,
    };
    let outcome = validate_keeping(raw.clone(), cfg);
    let plain = validate(raw, cfg);
    assert_eq!(
        plain,
        outcome.clone().map(|(r, _)| r),
        "validate and validate_keeping agree on {:?}",
        text()
    );
    let accepted = match outcome {
        Ok((r, kept)) => {
            assert_eq!(kept, payload, "an accepted reading's bytes are handed back for dedup");
            assert_eq!((r.ingest_ms, r.pos), (ingest_ms, pos));
            assert_eq!(r.payload_at, Default::default());
            assert!(
                (1..=cfg.fleet_size).contains(&r.device),
                "device {} accepted from {:?}",
                r.device,
                text()
            );
            for (v, (lo, hi)) in r.metrics.iter().zip(cfg.ranges.iter()) {
                assert!(
                    v.is_finite() && *lo <= *v && *v <= *hi,
                    "metric {v} accepted from {:?}",
                    text()
                );
            }
            if let Some(i) = ingest_ms {
                let ahead = i128::from(r.time_ms) - i128::from(i);
                assert!(
                    ahead <= i128::from(cfg.max_future_ms) && -ahead <= i128::from(cfg.max_age_ms),
                    "time {} accepted at ingest {i} from {:?}",
                    r.time_ms,
                    text()
                );
            }
            check_time_format(r.time_ms);
            let _ = (r.hour(), r.key());
            Ok(r)
        }
        Err(rej) => {
            assert!(
                !rej.reason.trim().is_empty(),
                "a rejection by {:?} without a reason: {:?}",
                rej.rule,
                text()
            );
            assert_eq!(rej.payload, payload, "a rejection keeps the exact original bytes");
            assert_eq!((rej.ingest_ms, rej.pos), (ingest_ms, pos));
            assert_ne!(rej.rule, Rule::Duplicate, "only the Deduper finds duplicates");
            assert!(
                rej.device == 0 || (1..=cfg.fleet_size).contains(&rej.device),
                "a rejection's device is 0 or in the fleet, not {}",
                rej.device
            );
            // The rules after `unknown_device` know the device, those after `bad_time` the
            // time too; `non_finite` is also a decoding error (a number too large for a
            // double), which knows neither.
            let (knows_device, knows_time) = match rej.rule {
                Rule::BadTime => (true, false),
                Rule::FutureTime | Rule::StaleTime | Rule::OutOfRange => (true, true),
                Rule::NonFinite => (rej.device != 0, rej.device != 0),
                _ => (rej.device != 0 && rej.rule != Rule::UnknownDevice, false),
            };
            assert_eq!(
                rej.device != 0,
                knows_device,
                "{:?} of {:?}: device {}",
                rej.rule,
                text(),
                rej.device
            );
            assert_eq!(rej.time_ms.is_some(), knows_time, "{:?} of {:?}", rej.rule, text());
            let _ = rej.hour();
            Err(rej)
        }
    };
    match reference {
        // Not an object: JSON of another type, or not JSON.
        None => {
            let rej = accepted
                .as_ref()
                .err()
                .unwrap_or_else(|| panic!("a non-object accepted: {:?}", text()));
            assert!(
                matches!(rej.rule, Rule::MalformedJson | Rule::WrongType),
                "a non-object rejected by {:?}: {:?}",
                rej.rule,
                text()
            );
            if serde_json::from_slice::<serde_json::Value>(payload).is_ok() {
                assert_eq!(rej.rule, Rule::WrongType, "{:?} is JSON: {}", text(), rej.reason);
            }
        }
        Some(Err(e)) => {
            let rej = accepted
                .as_ref()
                .err()
                .unwrap_or_else(|| panic!("accepted what serde cannot decode ({e}): {:?}", text()));
            assert!(
                matches!(rej.rule, Rule::MalformedJson | Rule::WrongType | Rule::NonFinite),
                "rejected by {:?} ({}) what serde cannot decode ({e}): {:?}",
                rej.rule,
                rej.reason,
                text()
            );
        }
        Some(Ok(r)) => match (model(&r, ingest_ms, cfg), &accepted) {
            (Ok((device, time_ms, metrics, is_fail)), Ok(got)) => {
                assert_eq!(
                    (got.device, got.time_ms, got.metrics.map(f64::to_bits), got.is_fail),
                    (device, time_ms, metrics.map(f64::to_bits), is_fail),
                    "the reading of {:?} is the one serde decodes",
                    text()
                );
            }
            (Ok(_), Err(rej)) => panic!(
                "rejected by {:?} ({}) a payload serde decodes to a valid reading ({r:?}): {:?}",
                rej.rule,
                rej.reason,
                text()
            ),
            (Err((rule, _)), Ok(_)) => panic!("accepted a payload the {rule:?} rule rejects ({r:?}): {:?}", text()),
            (Err((rule, says)), Err(rej)) => {
                assert_eq!(
                    rej.rule,
                    rule,
                    "the rule that rejects {:?} ({}); serde: {r:?}",
                    text(),
                    rej.reason
                );
                assert!(
                    rej.reason.contains(&says),
                    "the reason of {rule:?} names {says}: {:?}",
                    rej.reason
                );
            }
        },
    }
    accepted.ok()
}

/// A time the rules accepted formats as RFC 3339 that reads back as the same time (when its
/// year has four digits, as every time `parse_rfc3339` reads does, offset aside).
fn check_time_format(time_ms: i64) {
    let text = format_rfc3339(time_ms);
    let (from, to) = (
        days_from_civil(0, 1, 1) * 86_400_000,
        days_from_civil(10_000, 1, 1) * 86_400_000,
    );
    let back = parse_rfc3339(&text);
    if (from..to).contains(&time_ms) {
        assert_eq!(back, Some(time_ms), "{time_ms} formats as {text}");
    } else {
        assert!(back.is_none_or(|b| b == time_ms), "{time_ms} formats as {text}");
    }
}

/// The duplicate rule as specified: of the readings of a (device, time), the one of the
/// earliest epoch, then of the smallest source position, is accepted; a time is remembered
/// at least until the newest time seen is more than the retention past the end of its hour.
struct DedupModel {
    deduper: Deduper,
    retention_ms: i64,
    /// The accepted reading's position of every (device, time), never forgotten.
    accepted: BTreeMap<(u32, i64), SourcePos>,
    /// The newest ingest (or event) time of the epochs so far.
    high_water_ms: i64,
}

impl DedupModel {
    fn new(retention_ms: i64) -> Self {
        DedupModel {
            deduper: Deduper::new(retention_ms),
            retention_ms,
            accepted: BTreeMap::new(),
            high_water_ms: i64::MIN,
        }
    }

    /// Runs one epoch through the deduper and checks its decisions.
    fn epoch(&mut self, readings: Vec<Reading>) {
        let (mut winners, mut losers) = (Vec::new(), Vec::new());
        self.deduper.epoch(readings.clone(), &mut winners, &mut losers);
        let mut out: Vec<SourcePos> = winners
            .iter()
            .map(|r| r.pos)
            .chain(losers.iter().map(|(r, _)| r.pos))
            .collect();
        let mut input: Vec<SourcePos> = readings.iter().map(|r| r.pos).collect();
        out.sort();
        input.sort();
        assert_eq!(out, input, "every reading of an epoch is accepted or a duplicate, once");
        for r in winners.iter().chain(losers.iter().map(|(r, _)| r)) {
            let given = readings
                .iter()
                .find(|g| g.pos == r.pos)
                .expect("a reading of the epoch");
            assert_eq!(r, given, "the deduper hands readings back unchanged");
        }
        let mut keys: BTreeMap<(u32, i64), Vec<SourcePos>> = BTreeMap::new();
        for r in &readings {
            keys.entry((r.device, r.time_ms)).or_default().push(r.pos);
        }
        for (key, positions) in keys {
            let first = *positions.iter().min().expect("a position");
            let won: Vec<SourcePos> = winners
                .iter()
                .filter(|r| (r.device, r.time_ms) == key)
                .map(|r| r.pos)
                .collect();
            let lost: Vec<SourcePos> = losers
                .iter()
                .filter(|(r, _)| (r.device, r.time_ms) == key)
                .map(|(_, f)| *f)
                .collect();
            let hour_end = (key.1.div_euclid(HOUR_MS) + 1).saturating_mul(HOUR_MS);
            let remembered = hour_end.saturating_add(self.retention_ms) > self.high_water_ms;
            match self.accepted.get(&key) {
                Some(earlier) if won.is_empty() => {
                    assert!(
                        lost.iter().all(|f| f == earlier),
                        "duplicates of {key:?} name {earlier:?}: {lost:?}"
                    );
                }
                Some(earlier) => {
                    assert!(
                        !remembered,
                        "{key:?} accepted again within the retention (first at {earlier:?}, high water {})",
                        self.high_water_ms
                    );
                }
                None => assert!(!won.is_empty(), "the first reading of {key:?} is accepted"),
            }
            if !won.is_empty() {
                assert_eq!(
                    won,
                    vec![first],
                    "the smallest position of {key:?} in its epoch is accepted"
                );
                assert!(
                    lost.iter().all(|f| *f == first),
                    "duplicates of {key:?} name {first:?}: {lost:?}"
                );
                self.accepted.insert(key, first);
            }
        }
        for (r, first) in &losers {
            let rej = Rejection::duplicate(r, Vec::new(), *first);
            assert!(rej.rule == Rule::Duplicate && !rej.reason.is_empty());
        }
        if let Some(newest) = readings.iter().map(|r| r.ingest_ms.unwrap_or(r.time_ms)).max() {
            self.high_water_ms = self.high_water_ms.max(newest);
        }
        assert!(self.deduper.len() <= self.accepted.len());
    }
}

/// The inputs of a fuzz target kept in the repository, `fuzz/<kind>/<target>/` (`kind`:
/// `seeds` or `regressions`), every file but the README, by name; runs each through `check`
/// and fails naming every input that panics. How many there are.
pub fn replay_kept_inputs(kind: &str, target: &str, check: impl Fn(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    if kind == "regressions" {
        // The directory holds a README when no input ever failed: it must be there.
        assert!(dir.join("README.md").is_file(), "{} has its README", dir.display());
    }
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut inputs: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    inputs.sort();
    let failed: Vec<&str> = inputs
        .iter()
        .filter(|(_, bytes)| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(bytes))).is_err())
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(failed.is_empty(), "{}: these inputs fail: {failed:?}", dir.display());
    inputs.len()
}
