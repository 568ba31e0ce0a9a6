//! Fuzzing `rules::validate` with proptest: arbitrary bytes, JSON-shaped noise and mutations
//! of valid payloads (truncation, byte flips, insertions, deletions, spliced tokens). The
//! rules must never panic; every rejection must carry a reason and the exact original bytes;
//! every accepted reading must satisfy the rules it passed; the outcome is the one serde's
//! derived decoding of the fields implies. The checks are the `payload` fuzz target's
//! (`fmsflow_dataflows::fuzzing`, see docs/FUZZING.md).

use fmsflow_dataflows::fuzzing::check_at;
use fmsflow_dataflows::rules::{validate, RuleConfig};
use fmsflow_dataflows::{RawRecord, SourcePos};
use proptest::prelude::*;

/// Valid FMS payloads to mutate: the API's form, compact, reordered, with the time variants
/// the parser accepts.
const TEMPLATES: &[&str] = &[
    r#"{"time": "2025-07-07T08:21:29Z", "DeviceId": 1, "sensor1": 85.69, "sensor2": 85.81, "sensor3": 82.15, "motor1": 1245.16, "motor2": 874.81, "motor3": 1119.36, "isFail": false}"#,
    r#"{"time":"2025-07-07T08:21:29.250Z","DeviceId":100,"sensor1":0,"sensor2":250,"sensor3":1e2,"motor1":3000,"motor2":0.5,"motor3":-0.0,"isFail":true}"#,
    r#"{"isFail":false,"motor3":1,"motor2":2,"motor1":3,"sensor3":4,"sensor2":5,"sensor1":6,"DeviceId":42,"time":"2025-07-07T10:21:29+02:00"}"#,
    "{\n  \"time\": \"2025-07-07 08:21:29z\",\n  \"DeviceId\": 7,\n  \"sensor1\": 85.69,\n  \"sensor2\": 85.81,\n  \"sensor3\": 82.15,\n  \"motor1\": 1245.16,\n  \"motor2\": 874.81,\n  \"motor3\": 1119.36,\n  \"isFail\": false,\n  \"extra\": [1, {\"a\": null}]\n}\n",
];

/// Bytes and tokens that steer a mutation into the decoder's and the time parser's corners.
#[rustfmt::skip]
const TOKENS: &[&str] = &[
    "1e999", "-1e999", "1e-999", "null", "true", "\"", "\\", "\\u", "\\ud800", "[", "]",
    "{", "}", ",", ":", "-0", "99999999999999999999", "NaN", "\u{feff}", "\u{0}", "\t",
    "\u{1F600}", "\"DeviceId\": 2, ", "\"time\": 0, ", "T", "Z", "+24:00", ".", "60",
    "2024-02-29",
];

/// Values to put in place of a field's value: each steers towards one rule or its limit.
#[rustfmt::skip]
const VALUES: &[&str] = &[
    "1e999", "-1e999", "1e-999", "null", "\"x\"", "true", "[]", "{}", "0", "-0", "-1",
    "1.5", "101", "100", "4294967297", "250", "250.0001", "3000", "3001",
    "1.7976931348623157e308", "99999999999999999999", "\"2025-02-30T00:00:00Z\"",
    "\"2025-07-07T08:26:29Z\"", "\"2025-07-07T08:26:30Z\"", "\"2025-07-07T02:21:29Z\"",
    "\"2025-07-07T02:21:28Z\"", "\"2025-07-07T08:21:29\\u005a\"",
    "\"2025-07-07T08:21:29.999999Z\"",
];

#[derive(Clone, Debug)]
enum Mutation {
    /// Cut the payload at this fraction of its length.
    Truncate(u16),
    /// XOR one byte with a non-zero mask.
    Flip(u16, u8),
    /// Insert raw bytes.
    Insert(u16, Vec<u8>),
    /// Insert one of [`TOKENS`].
    Token(u16, usize),
    /// Remove up to this many bytes.
    Delete(u16, u8),
    /// Duplicate a span (repeats a field, a digit, a quote ...).
    Repeat(u16, u8),
    /// Replace the value of the n-th field (after the n-th `":`) with one of [`VALUES`].
    Value(u8, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<u16>().prop_map(Mutation::Truncate),
        2 => (any::<u16>(), 1u8..=255).prop_map(|(at, m)| Mutation::Flip(at, m)),
        1 => (any::<u16>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
        2 => (any::<u16>(), 0..TOKENS.len()).prop_map(|(at, t)| Mutation::Token(at, t)),
        1 => (any::<u16>(), 1u8..40).prop_map(|(at, n)| Mutation::Delete(at, n)),
        1 => (any::<u16>(), 1u8..40).prop_map(|(at, n)| Mutation::Repeat(at, n)),
        6 => (0u8..12, 0..VALUES.len()).prop_map(|(n, v)| Mutation::Value(n, v)),
    ]
}

/// A position in `0..=len` from a fraction in `u16`.
fn at(fraction: u16, len: usize) -> usize {
    (fraction as usize * (len + 1)) >> 16
}

fn mutate(template: &str, mutations: &[Mutation]) -> Vec<u8> {
    let mut b = template.as_bytes().to_vec();
    for m in mutations {
        let len = b.len();
        match m {
            Mutation::Truncate(f) => b.truncate(at(*f, len)),
            Mutation::Flip(f, mask) if len > 0 => b[at(*f, len - 1)] ^= mask,
            Mutation::Flip(..) => {}
            Mutation::Insert(f, bytes) => {
                let i = at(*f, len);
                b.splice(i..i, bytes.iter().copied());
            }
            Mutation::Token(f, t) => {
                let i = at(*f, len);
                b.splice(i..i, TOKENS[*t].bytes());
            }
            Mutation::Delete(f, n) => {
                let i = at(*f, len);
                b.drain(i..(i + *n as usize).min(len));
            }
            Mutation::Repeat(f, n) => {
                let i = at(*f, len);
                let span = b[i..(i + *n as usize).min(len)].to_vec();
                b.splice(i..i, span);
            }
            Mutation::Value(n, v) => {
                let key_end = |i: &usize| b[*i] == b':' && *i > 0 && b[*i - 1] == b'"';
                if let Some(colon) = (0..len).filter(key_end).nth(*n as usize) {
                    let end = b[colon..]
                        .iter()
                        .position(|c| matches!(c, b',' | b'}' | b'\n'))
                        .map_or(len, |e| colon + e);
                    b.splice(colon + 1..end, VALUES[*v].bytes());
                }
            }
        }
    }
    b
}

/// An ingest time: none, near the templates' event time (so the time rules decide), or far
/// anywhere (but not so far that `time - ingest` overflows).
fn ingest() -> impl Strategy<Value = Option<i64>> {
    let t = 1_751_876_489_000i64;
    prop_oneof![
        1 => Just(None),
        3 => (t - 3_600_000..t + 8 * 3_600_000).prop_map(Some),
        1 => (-(1i64 << 62)..(1i64 << 62)).prop_map(Some),
    ]
}

/// Validates `payload` and checks the properties every outcome must have: the `payload`
/// fuzz target's check (`fmsflow_dataflows::fuzzing`), which panics when one does not hold.
fn check(payload: Vec<u8>, ingest_ms: Option<i64>) -> Result<(), TestCaseError> {
    let pos = SourcePos { source: 3, offset: 77 };
    check_at(&RuleConfig::default(), &payload, ingest_ms, pos);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8192, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(payload in proptest::collection::vec(any::<u8>(), 0..400), ingest in ingest()) {
        check(payload, ingest)?;
    }

    #[test]
    fn json_shaped_noise(
        payload in proptest::collection::vec(
            proptest::sample::select(b"{}[]\",:.-+eE0123456789 \\untrlfasDvicIdmeosF".to_vec()),
            0..200,
        ),
        ingest in ingest(),
    ) {
        check(payload, ingest)?;
    }

    #[test]
    fn mutated_valid_payloads(
        template in 0..TEMPLATES.len(),
        mutations in proptest::collection::vec(mutation(), 1..3),
        ingest in ingest(),
    ) {
        check(mutate(TEMPLATES[template], &mutations), ingest)?;
    }
}

/// The templates themselves are valid, so that mutating them explores near-valid input.
#[test]
fn templates_are_valid() {
    let ingest = Some(1_751_876_490_000);
    for t in TEMPLATES {
        let raw = RawRecord {
            payload: t.as_bytes().to_vec().into(),
            ingest_ms: ingest,
            pos: SourcePos::default(),
        };
        let r = validate(raw, &RuleConfig::default());
        assert!(r.is_ok(), "{t}: {:?}", r.err().map(|e| e.reason));
    }
}
