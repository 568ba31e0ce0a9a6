//! The quality rules. [`validate`] applies every stateless rule to one raw record and
//! either returns a typed [`Reading`] or a [`Rejection`] that keeps the original bytes, the
//! rule and a human reason. The one stateful rule, `duplicate`, is [`Deduper`]; the dataflow
//! applies it after routing each reading to the worker that owns its hour.
//!
//! Rule names are stable: they appear in the lake, in the dead-letter output and in metrics.

use std::borrow::Cow;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::model::{Bytes, PayloadAt, RawRecord, Reading, SourcePos, METRICS};
use crate::time::{hour_of, parse_rfc3339, HOUR_MS};
use crate::varint::{get_varint, put_varint, unzigzag, zigzag};

/// Why a record was rejected. The `name` of each variant is stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Rule {
    /// The body is not JSON (or is truncated).
    MalformedJson,
    /// A required field is absent or `null`.
    MissingField,
    /// A field has the wrong JSON type (or the body is JSON but not an object).
    WrongType,
    /// `DeviceId` is outside 1..=fleet size.
    UnknownDevice,
    /// `time` is not an RFC 3339 timestamp.
    BadTime,
    /// `time` is further in the future than allowed, relative to the ingest time.
    FutureTime,
    /// `time` is older than allowed, relative to the ingest time.
    StaleTime,
    /// A metric does not fit a finite double (for example `1e999`).
    NonFinite,
    /// A metric is outside its configured range.
    OutOfRange,
    /// A reading for the same (device, time) was already accepted.
    Duplicate,
}

impl Rule {
    /// Every rule, in a fixed order.
    pub const ALL: [Rule; 10] = [
        Rule::MalformedJson,
        Rule::MissingField,
        Rule::WrongType,
        Rule::UnknownDevice,
        Rule::BadTime,
        Rule::FutureTime,
        Rule::StaleTime,
        Rule::NonFinite,
        Rule::OutOfRange,
        Rule::Duplicate,
    ];

    /// The stable name used in the lake, the dead-letter output and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Rule::MalformedJson => "malformed_json",
            Rule::MissingField => "missing_field",
            Rule::WrongType => "wrong_type",
            Rule::UnknownDevice => "unknown_device",
            Rule::BadTime => "bad_time",
            Rule::FutureTime => "future_time",
            Rule::StaleTime => "stale_time",
            Rule::NonFinite => "non_finite",
            Rule::OutOfRange => "out_of_range",
            Rule::Duplicate => "duplicate",
        }
    }

    /// The rule with this stable name.
    pub fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// The outcome of one record for the quality counts: accepted, or rejected by a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// Accepted as a reading.
    Valid,
    /// Rejected by this rule.
    Rejected(Rule),
}

impl Outcome {
    /// `"valid"` or the rule's name.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Valid => "valid",
            Outcome::Rejected(r) => r.name(),
        }
    }
}

/// Parameters of the rules. Defaults are documented in the README's configuration reference.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleConfig {
    /// Devices are 1..=fleet_size.
    pub fleet_size: u32,
    /// Largest allowed `time - ingest` in ms (clock skew of devices).
    pub max_future_ms: i64,
    /// Largest allowed `ingest - time` in ms (how late a reading may arrive).
    pub max_age_ms: i64,
    /// Inclusive (min, max) per metric in [`METRICS`] order.
    pub ranges: [(f64, f64); 6],
}

impl Default for RuleConfig {
    fn default() -> Self {
        RuleConfig {
            fleet_size: 100,
            max_future_ms: 5 * 60 * 1000,
            max_age_ms: 6 * HOUR_MS,
            ranges: [
                (0.0, 250.0),
                (0.0, 250.0),
                (0.0, 250.0),
                (0.0, 3000.0),
                (0.0, 3000.0),
                (0.0, 3000.0),
            ],
        }
    }
}

/// A rejected record: the original bytes, the rule that caught it and a human reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The rule that caught it.
    pub rule: Rule,
    /// A sentence for the operator, naming the field and value.
    pub reason: String,
    /// The body exactly as received.
    pub payload: Vec<u8>,
    /// Device id when it could be read and is in the fleet, else 0.
    pub device: u32,
    /// Event time when it could be read.
    pub time_ms: Option<i64>,
    /// Ingest time of the raw record.
    pub ingest_ms: Option<i64>,
    /// Source position of the raw record.
    pub pos: SourcePos,
}

impl Rejection {
    /// The hour a rejection is counted in: the ingest hour (the hour it arrived), else the
    /// event hour, else hour 0 for records that carry no time at all.
    pub fn hour(&self) -> i64 {
        self.ingest_ms.or(self.time_ms).map(hour_of).unwrap_or(0)
    }

    /// A duplicate of an accepted reading whose original bytes were `payload`.
    pub fn duplicate(r: &Reading, payload: Vec<u8>, first: SourcePos) -> Self {
        Rejection {
            rule: Rule::Duplicate,
            reason: format!(
                "device {} already has a reading at {} (first seen at source {} offset {})",
                r.device,
                crate::time::format_rfc3339(r.time_ms),
                first.source,
                first.offset
            ),
            device: r.device,
            time_ms: Some(r.time_ms),
            ingest_ms: r.ingest_ms,
            pos: r.pos,
            payload,
        }
    }
}

/// The FMS payload, borrowed from the input bytes. Every field is optional here so that a
/// missing field is told apart from a mistyped one.
#[derive(Default)]
struct Wire<'a> {
    /// UTF-8 (serde_json checks it, [`Wire::fast`] takes ASCII only), kept as bytes because
    /// only an error's reason needs it as text.
    time: Option<Cow<'a, [u8]>>,
    device_id: Option<i64>,
    /// sensor1..3, motor1..3.
    metrics: [Option<f64>; 6],
    is_fail: Option<bool>,
    /// An unknown key held a control character (see [`Key::Control`]).
    control_key: bool,
}

/// The error of a key that is not valid JSON text (serde_json's own words for a bad string).
const BAD_KEY: &str = "invalid unicode code point or control character in an object key";

/// A key of the FMS object. Read as raw bytes: serde_json then skips the UTF-8 check it does
/// for every string read as `str`, which was the largest single cost of decoding a reading.
enum Key {
    Time,
    DeviceId,
    Metric(usize),
    IsFail,
    Other,
    /// An unknown key with a control character: JSON if it was escaped (`"a\tb"`), not if
    /// it was raw, and the unescaped bytes no longer tell which. [`check`] has serde_json
    /// check the payload's strings as text then.
    Control,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Key, E> {
                Ok(match b {
                    b"time" => Key::Time,
                    b"DeviceId" => Key::DeviceId,
                    b"sensor1" => Key::Metric(0),
                    b"sensor2" => Key::Metric(1),
                    b"sensor3" => Key::Metric(2),
                    b"motor1" => Key::Metric(3),
                    b"motor2" => Key::Metric(4),
                    b"motor3" => Key::Metric(5),
                    b"isFail" => Key::IsFail,
                    // The known keys are plain ASCII; only an unknown key can hold what JSON
                    // forbids in a string and serde_json does not check in raw bytes: invalid
                    // UTF-8 (lone surrogate escapes included) and raw control characters.
                    _ if std::str::from_utf8(b).is_err() => return Err(E::custom(BAD_KEY)),
                    _ if b.iter().any(|c| *c < 0x20) => Key::Control,
                    _ => Key::Other,
                })
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Key, E> {
                self.visit_bytes(s.as_bytes())
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A JSON value that [`Nullable`] reads into `Option<Self>`: the conversions serde's own
/// `Deserialize` for `Self` makes, and its wording for the rest (`expected f64`, ...).
trait Scalar<'de>: Sized {
    /// What serde's visitor for the type says it expected.
    const EXPECTING: &'static str;
    fn from_u64<E: serde::de::Error>(v: u64, exp: &dyn serde::de::Expected) -> Result<Self, E> {
        Err(E::invalid_type(serde::de::Unexpected::Unsigned(v), exp))
    }
    fn from_i64<E: serde::de::Error>(v: i64, exp: &dyn serde::de::Expected) -> Result<Self, E> {
        Err(E::invalid_type(serde::de::Unexpected::Signed(v), exp))
    }
    fn from_f64<E: serde::de::Error>(v: f64, exp: &dyn serde::de::Expected) -> Result<Self, E> {
        Err(E::invalid_type(serde::de::Unexpected::Float(v), exp))
    }
    fn from_bool<E: serde::de::Error>(v: bool, exp: &dyn serde::de::Expected) -> Result<Self, E> {
        Err(E::invalid_type(serde::de::Unexpected::Bool(v), exp))
    }
    fn from_str<E: serde::de::Error>(v: Cow<'de, str>, exp: &dyn serde::de::Expected) -> Result<Self, E> {
        Err(E::invalid_type(serde::de::Unexpected::Str(&v), exp))
    }
}

impl<'de> Scalar<'de> for f64 {
    const EXPECTING: &'static str = "f64";
    fn from_u64<E: serde::de::Error>(v: u64, _: &dyn serde::de::Expected) -> Result<Self, E> {
        Ok(v as f64)
    }
    fn from_i64<E: serde::de::Error>(v: i64, _: &dyn serde::de::Expected) -> Result<Self, E> {
        Ok(v as f64)
    }
    fn from_f64<E: serde::de::Error>(v: f64, _: &dyn serde::de::Expected) -> Result<Self, E> {
        Ok(v)
    }
}

impl<'de> Scalar<'de> for i64 {
    const EXPECTING: &'static str = "i64";
    fn from_u64<E: serde::de::Error>(v: u64, exp: &dyn serde::de::Expected) -> Result<Self, E> {
        i64::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), exp))
    }
    fn from_i64<E: serde::de::Error>(v: i64, _: &dyn serde::de::Expected) -> Result<Self, E> {
        Ok(v)
    }
}

impl<'de> Scalar<'de> for bool {
    const EXPECTING: &'static str = "a boolean";
    fn from_bool<E: serde::de::Error>(v: bool, _: &dyn serde::de::Expected) -> Result<Self, E> {
        Ok(v)
    }
}

/// Borrowed when the string has no escapes.
impl<'de> Scalar<'de> for Cow<'de, str> {
    const EXPECTING: &'static str = "a string";
    fn from_str<E: serde::de::Error>(v: Cow<'de, str>, _: &dyn serde::de::Expected) -> Result<Self, E> {
        Ok(v)
    }
}

/// Reads a field's value as `Option<T>` (`null` is `None`) with one `deserialize_any`, where
/// serde's `Option<T>` dispatches twice (and its `Cow<str>` always allocates). Decodes and
/// words its errors exactly as `Option<T>` does; the golden tests hold both to that.
struct Nullable<T>(std::marker::PhantomData<T>);

impl<T> Nullable<T> {
    fn new() -> Self {
        Nullable(std::marker::PhantomData)
    }
}

impl<'de, T: Scalar<'de>> serde::de::DeserializeSeed<'de> for Nullable<T> {
    type Value = Option<T>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Scalar<'de>> serde::de::Visitor<'de> for Nullable<T> {
    type Value = Option<T>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(T::EXPECTING)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Option<T>, E> {
        T::from_u64(v, &self).map(Some)
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Option<T>, E> {
        T::from_i64(v, &self).map(Some)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Option<T>, E> {
        T::from_f64(v, &self).map(Some)
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Option<T>, E> {
        T::from_bool(v, &self).map(Some)
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Option<T>, E> {
        T::from_str(Cow::Borrowed(v), &self).map(Some)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<T>, E> {
        T::from_str(Cow::Owned(v.to_owned()), &self).map(Some)
    }
}

/// The fields as a derived `Deserialize` reads them (null is absent, a repeated field is an
/// error, unknown fields are skipped), but with byte keys.
impl<'de: 'a, 'a> Deserialize<'de> for Wire<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Wire<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an FMS reading object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Wire<'a>, M::Error> {
                use serde::de::Error;
                let mut w = Wire::default();
                let mut seen = [false; 9];
                let mut once = |i: usize, name: &'static str| {
                    if std::mem::replace(&mut seen[i], true) {
                        Err(M::Error::duplicate_field(name))
                    } else {
                        Ok(())
                    }
                };
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Time => {
                            once(0, "time")?;
                            w.time = map.next_value_seed(Nullable::<Cow<str>>::new())?.map(|t| match t {
                                Cow::Borrowed(t) => Cow::Borrowed(t.as_bytes()),
                                Cow::Owned(t) => Cow::Owned(t.into_bytes()),
                            });
                        }
                        Key::DeviceId => {
                            once(1, "DeviceId")?;
                            w.device_id = map.next_value_seed(Nullable::new())?;
                        }
                        Key::Metric(i) => {
                            once(2 + i, METRICS[i])?;
                            w.metrics[i] = map.next_value_seed(Nullable::new())?;
                        }
                        Key::IsFail => {
                            once(8, "isFail")?;
                            w.is_fail = map.next_value_seed(Nullable::new())?;
                        }
                        Key::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                        Key::Control => {
                            w.control_key = true;
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(w)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Exact powers of ten, for [`Wire::fast`]'s decimals.
const POW10: [f64; 19] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18,
];

/// Declares [`KEYS`] and [`is_key`] from one list.
macro_rules! keys {
    ($($slot:literal => $key:literal,)*) => {
        /// The payload's keys with their closing quote, in the order of their slots in
        /// [`Wire::fast`], which is also the order the FMS API writes them in.
        const KEYS: [&[u8]; 9] = [$($key),*];
        /// Whether `rest` starts with the key of `slot` (a comparison of constant length,
        /// which compiles to a few word compares).
        #[inline]
        fn is_key(rest: &[u8], slot: usize) -> bool {
            match slot {
                $($slot => rest.starts_with($key),)*
                _ => false,
            }
        }
    };
}

keys! {
    0 => b"time\"",
    1 => b"DeviceId\"",
    2 => b"sensor1\"",
    3 => b"sensor2\"",
    4 => b"sensor3\"",
    5 => b"motor1\"",
    6 => b"motor2\"",
    7 => b"motor3\"",
    8 => b"isFail\"",
}

/// A cursor over a payload, for [`Wire::fast`]. Every method returns `None` on anything it
/// does not handle, which sends the payload to serde_json.
struct Scan<'a> {
    p: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.p.get(self.i).copied()
    }
    #[inline]
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    #[inline]
    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.i += 1)
    }
    /// A string's body after its opening quote, up to the closing quote: printable ASCII with
    /// no escapes only (so it is UTF-8 and what serde_json would borrow as is).
    #[inline]
    fn plain_str(&mut self) -> Option<&'a [u8]> {
        let rest = &self.p[self.i..];
        let n = rest.iter().position(|&b| b == b'"')?;
        let s = &rest[..n];
        // Branch-free over the whole body, so the compiler can do it in wide words.
        let plain = s
            .iter()
            .fold(true, |ok, &b| ok & (0x20..0x7f).contains(&b) & (b != b'\\'));
        self.i += n + 1;
        plain.then_some(s)
    }
    /// A key, after its opening quote: the slot of a known key in [`KEYS`]. The key
    /// `expected` (the one that follows the previous in the usual order) is tried first, with
    /// one comparison.
    #[inline]
    fn key(&mut self, expected: usize) -> Option<usize> {
        let rest = &self.p[self.i..];
        let slot = if is_key(rest, expected) {
            expected
        } else {
            (0..KEYS.len()).find(|&s| is_key(rest, s))?
        };
        self.i += KEYS[slot].len();
        Some(slot)
    }
    /// Digits as an integer, counted into `count`. Only ever used for at most 18 digits,
    /// which are exact in a `u64` and in a double.
    #[inline]
    fn digits(&mut self, mut acc: u64, count: &mut u32) -> u64 {
        while let Some(c @ b'0'..=b'9') = self.peek() {
            acc = acc.wrapping_mul(10).wrapping_add((c - b'0') as u64);
            *count += 1;
            self.i += 1;
        }
        acc
    }
    /// JSON's integer part, `0|[1-9][0-9]*`.
    #[inline]
    fn int_part(&mut self, count: &mut u32) -> Option<u64> {
        match self.peek()? {
            b'0' => {
                self.i += 1;
                *count += 1;
                // One leading zero only: `01` is an error serde reports.
                (!matches!(self.peek(), Some(b'0'..=b'9'))).then_some(0)
            }
            b'1'..=b'9' => Some(self.digits(0, count)),
            _ => None,
        }
    }
    /// A number without exponent and of at most 18 digits, `-?(0|[1-9][0-9]*)(\.[0-9]+)?`.
    /// Its value comes from the operations serde_json performs (the significand as a double,
    /// divided by an exact power of ten, then negated), so its bits are the same. An exponent
    /// is left for the caller to refuse as the character after the number.
    #[inline]
    fn number(&mut self) -> Option<f64> {
        let negative = self.eat(b'-').is_some();
        let mut count = 0;
        let int = self.int_part(&mut count)?;
        let (sig, frac) = if self.eat(b'.').is_some() {
            let before = count;
            let sig = self.digits(int, &mut count);
            // `1.` is an error serde reports.
            (count > before).then_some((sig, count - before))?
        } else {
            (int, 0)
        };
        if count > 18 {
            return None;
        }
        let f = sig as f64 / POW10[frac as usize];
        Some(if negative { -f } else { f })
    }
    /// An unsigned integer of at most 18 digits (a `DeviceId`).
    #[inline]
    fn unsigned(&mut self) -> Option<i64> {
        let mut count = 0;
        let v = self.int_part(&mut count)?;
        (count <= 18).then_some(v as i64)
    }
    #[inline]
    fn literal(&mut self, word: &[u8]) -> bool {
        let hit = self.p[self.i..].starts_with(word);
        if hit {
            self.i += word.len();
        }
        hit
    }
}

/// The FMS API's own layout of a reading, as the separators before each value (one space
/// after every `:` and `,`, keys in this order). [`Wire::layout`] reads a payload of exactly
/// this shape with one comparison per separator.
const LAYOUT: [&[u8]; 9] = [
    b"{\"time\": \"",
    b"\", \"DeviceId\": ",
    b", \"sensor1\": ",
    b", \"sensor2\": ",
    b", \"sensor3\": ",
    b", \"motor1\": ",
    b", \"motor2\": ",
    b", \"motor3\": ",
    b", \"isFail\": ",
];

/// How many of the 8 bytes of `x` (little-endian, so in text order) are ASCII digits before
/// the first one that is not, 0..=8. A byte `b` is a digit when both `b` and `b + 6` have
/// the high nibble 3. (A carry out of a byte only happens past a non-digit, whose later
/// bytes do not count.)
#[inline]
fn digit_run(x: u64) -> usize {
    const HIGH: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    const THREES: u64 = 0x3030_3030_3030_3030;
    let not_digit = ((x & HIGH) ^ THREES) | ((x.wrapping_add(0x0606_0606_0606_0606) & HIGH) ^ THREES);
    (not_digit.trailing_zeros() / 8) as usize
}

/// The value of the first `n` (1..=8) bytes of `x`, all ASCII digits, in text order: the
/// digits are moved to the top bytes (zeros before them) and combined in pairs, fours and
/// eights with three multiplications.
#[inline]
fn digits_value(x: u64, n: usize) -> u64 {
    let v = x.wrapping_sub(0x3030_3030_3030_3030) << (8 * (8 - n));
    let v = v.wrapping_mul(10).wrapping_add(v >> 8);
    ((v & 0x0000_00FF_0000_00FF)
        .wrapping_mul(100 + (1_000_000 << 32))
        .wrapping_add(((v >> 16) & 0x0000_00FF_0000_00FF).wrapping_mul(1 + (10_000 << 32))))
        >> 32
}

impl Scan<'_> {
    /// The 8 bytes at the cursor, if there are 8.
    #[inline]
    fn word(&self) -> Option<u64> {
        let b = self.p.get(self.i..self.i + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
    /// A run of 1..=7 digits at the cursor as (value, count), read 8 bytes at a time; `None`
    /// when that does not apply (fewer than 8 bytes left, or 8 digits or more), for the caller
    /// to read the number digit by digit.
    #[inline]
    fn short_digits(&mut self) -> Option<(u64, usize)> {
        let x = self.word()?;
        let n = digit_run(x);
        if n == 0 || n == 8 {
            return None;
        }
        self.i += n;
        Some((digits_value(x, n), n))
    }
    /// [`Scan::number`], reading short digit runs a word at a time. Same operations on the
    /// same integer, so the same double.
    #[inline]
    fn number_words(&mut self) -> Option<f64> {
        let start = self.i;
        let negative = self.eat(b'-').is_some();
        let quick = (|| {
            let (int, n) = self.short_digits()?;
            // `01` is an error serde reports: the digit-by-digit path refuses it.
            if n > 1 && self.p[self.i - n] == b'0' {
                return None;
            }
            // At most 14 digits: exact as an `i64` and as a double, whose conversion from
            // `i64` is one instruction (from `u64` it is several).
            if self.peek() != Some(b'.') {
                return Some(int as i64 as f64);
            }
            self.i += 1;
            let (frac, m) = self.short_digits()?;
            Some((int * POW10_U64[m] + frac) as i64 as f64 / POW10[m])
        })();
        match quick {
            Some(f) => Some(if negative { -f } else { f }),
            None => {
                self.i = start;
                self.number()
            }
        }
    }
}

/// Powers of ten as integers, for [`Scan::number_words`].
const POW10_U64: [u64; 8] = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000];

impl<'a> Wire<'a> {
    /// Reads a payload in the FMS API's own [`LAYOUT`]: one comparison per separator and
    /// numbers read a word at a time. `None` for any other shape, which [`Wire::fast`] then
    /// reads in general. Where this returns a value it is the one the general reading gives.
    #[inline]
    fn layout(p: &'a [u8]) -> Option<Wire<'a>> {
        let mut s = Scan { p, i: 0 };
        let mut w = Wire::default();
        // Each separator is a constant, so its comparison compiles to a few word compares
        // (through an index that varies, it was a call to `memcmp`).
        macro_rules! sep {
            ($k:literal) => {{
                const SEP: &[u8] = LAYOUT[$k];
                if !s.p[s.i..].starts_with(SEP) {
                    return None;
                }
                s.i += SEP.len();
            }};
        }
        macro_rules! metric {
            ($m:literal, $k:literal) => {{
                sep!($k);
                w.metrics[$m] = Some(s.number_words()?);
            }};
        }
        sep!(0);
        w.time = Some(Cow::Borrowed(s.plain_str()?));
        // `plain_str` took the closing quote, which the next separator starts with.
        s.i -= 1;
        sep!(1);
        w.device_id = Some(s.unsigned()?);
        metric!(0, 2);
        metric!(1, 3);
        metric!(2, 4);
        metric!(3, 5);
        metric!(4, 6);
        metric!(5, 7);
        sep!(8);
        w.is_fail = Some(match &s.p[s.i..] {
            b"true}" => true,
            b"false}" => false,
            _ => return None,
        });
        Some(w)
    }

    /// Decodes the usual payload without serde: one flat object of the known fields, each
    /// at most once, of its expected JSON type (`time` a string without escapes, `DeviceId` an
    /// unsigned integer, metrics numbers without exponent, `isFail` a boolean). `None` for
    /// anything else (other keys, nulls, escapes, exponents, errors of any kind), which serde
    /// then decodes and, where it must, rejects with its words. Where this returns a value it
    /// is the value serde_json gives: a property test holds the two together.
    fn fast(p: &'a [u8]) -> Option<Wire<'a>> {
        Wire::layout(p).or_else(|| Wire::general(p))
    }

    /// [`Wire::fast`] for any layout.
    fn general(p: &'a [u8]) -> Option<Wire<'a>> {
        let mut s = Scan { p, i: 0 };
        let mut w = Wire::default();
        let mut seen = 0u16;
        let mut expected = 0;
        s.ws();
        s.eat(b'{')?;
        s.ws();
        if s.eat(b'}').is_none() {
            loop {
                s.eat(b'"')?;
                let slot = s.key(expected)?;
                expected = slot + 1;
                if seen & (1 << slot) != 0 {
                    return None;
                }
                seen |= 1 << slot;
                s.ws();
                s.eat(b':')?;
                s.ws();
                match slot {
                    0 => {
                        s.eat(b'"')?;
                        w.time = Some(Cow::Borrowed(s.plain_str()?));
                    }
                    1 => w.device_id = Some(s.unsigned()?),
                    8 => {
                        w.is_fail = Some(if s.literal(b"true") {
                            true
                        } else if s.literal(b"false") {
                            false
                        } else {
                            return None;
                        })
                    }
                    m => w.metrics[m - 2] = Some(s.number()?),
                }
                s.ws();
                match s.peek()? {
                    b',' => {
                        s.i += 1;
                        s.ws();
                    }
                    b'}' => {
                        s.i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        s.ws();
        (s.i == p.len()).then_some(w)
    }
}

/// The payload's fields other than the metrics, decoded exactly as [`Wire`] decodes them while
/// the metrics' values are skipped unread. Only decoded when a number in the payload does not
/// fit a double, to tell where that number is.
#[derive(Deserialize)]
#[allow(dead_code)] // read only for its errors
struct WireWithoutMetrics<'a> {
    #[serde(borrow)]
    time: Option<Cow<'a, str>>,
    #[serde(rename = "DeviceId")]
    device_id: Option<i64>,
    #[serde(rename = "isFail")]
    is_fail: Option<bool>,
}

fn out_of_range(e: &serde_json::Error) -> bool {
    e.to_string().starts_with("number out of range")
}

/// The rule of a decoding error. serde_json reports a number that does not fit a double (such
/// as `1e999`) as "number out of range": that is `non_finite` when the number is a metric's
/// value, and `wrong_type` in `DeviceId`, `time` or `isFail`, which a decoding that skips the
/// metrics reports at the same place.
fn classify(payload: &[u8], e: &serde_json::Error) -> Rule {
    use serde_json::error::Category;
    match e.classify() {
        _ if out_of_range(e) => match serde_json::from_slice::<WireWithoutMetrics>(payload) {
            Err(other) if out_of_range(&other) && (other.line(), other.column()) == (e.line(), e.column()) => {
                Rule::WrongType
            }
            _ => Rule::NonFinite,
        },
        Category::Syntax | Category::Eof | Category::Io => Rule::MalformedJson,
        Category::Data if e.to_string().starts_with(BAD_KEY) => Rule::MalformedJson,
        Category::Data => Rule::WrongType,
    }
}

/// Applies every stateless rule to one raw record. A rejection keeps the payload as the
/// original bytes; an accepted reading's payload is dropped (see [`validate_keeping`]).
pub fn validate(raw: RawRecord, cfg: &RuleConfig) -> Result<Reading, Rejection> {
    validate_keeping(raw, cfg).map(|(r, _)| r)
}

/// [`validate`], handing back an accepted reading's payload beside it, for a later
/// duplicate's rejection.
pub fn validate_keeping(raw: RawRecord, cfg: &RuleConfig) -> Result<(Reading, Bytes), Rejection> {
    match check(&raw, cfg) {
        Ok((device, time_ms, metrics, is_fail)) => Ok((
            Reading {
                device,
                time_ms,
                metrics,
                is_fail,
                ingest_ms: raw.ingest_ms,
                pos: raw.pos,
                payload_at: PayloadAt::default(),
            },
            raw.payload,
        )),
        Err((rule, reason, device, time_ms)) => Err(Rejection {
            rule,
            reason,
            // Its own bytes (no copy when the payload is its allocation's only view): a
            // rejection waits for its hour's files, and must not hold the read buffer that
            // a file replay's payloads are views of.
            payload: Vec::from(raw.payload),
            device,
            time_ms,
            ingest_ms: raw.ingest_ms,
            pos: raw.pos,
        }),
    }
}

type Checked = Result<(u32, i64, [f64; 6], bool), (Rule, String, u32, Option<i64>)>;

fn check(raw: &RawRecord, cfg: &RuleConfig) -> Checked {
    // serde would also decode a JSON array into `Wire` (the fields in declaration order): the
    // payload must be an object.
    let first = raw.payload.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if let Some(&b) = first.filter(|b| **b != b'{') {
        return Err(match serde_json::from_slice::<serde::de::IgnoredAny>(&raw.payload) {
            Ok(_) => (
                Rule::WrongType,
                format!("payload is JSON but not an object (it starts with `{}`)", b as char),
                0,
                None,
            ),
            Err(e) => (Rule::MalformedJson, format!("cannot decode payload: {e}"), 0, None),
        });
    }
    let wire: Wire = match Wire::fast(&raw.payload).map_or_else(|| serde_json::from_slice(&raw.payload), Ok) {
        Ok(w) => w,
        Err(e) => {
            return Err((
                classify(&raw.payload, &e),
                format!("cannot decode payload: {e}"),
                0,
                None,
            ))
        }
    };
    // A raw control character in a key is not JSON, an escaped one is (see `Key::Control`):
    // serde_json tells them apart when it skips the text, checking every string.
    if wire.control_key {
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&raw.payload) {
            return Err((Rule::MalformedJson, format!("cannot decode payload: {e}"), 0, None));
        }
    }
    let missing = |field: &str| {
        Err((
            Rule::MissingField,
            format!("field `{field}` is missing or null"),
            0,
            None,
        ))
    };
    let Some(device_id) = wire.device_id else {
        return missing("DeviceId");
    };
    let Some(time) = wire.time.as_deref() else {
        return missing("time");
    };
    // Valid UTF-8 (see `Wire::time`): the conversion is lossless.
    let text = || String::from_utf8_lossy(time);
    let metrics = wire.metrics;
    if let Some(i) = metrics.iter().position(Option::is_none) {
        return missing(METRICS[i]);
    }
    let Some(is_fail) = wire.is_fail else {
        return missing("isFail");
    };

    if device_id < 1 || device_id > cfg.fleet_size as i64 {
        let reason = format!("DeviceId {device_id} is not in the fleet 1..={}", cfg.fleet_size);
        return Err((Rule::UnknownDevice, reason, 0, None));
    }
    let device = device_id as u32;
    let Some(time_ms) = parse_rfc3339(time) else {
        return Err((
            Rule::BadTime,
            format!("time {:?} is not an RFC 3339 timestamp", text()),
            device,
            None,
        ));
    };
    if let Some(ingest) = raw.ingest_ms {
        if time_ms.saturating_sub(ingest) > cfg.max_future_ms {
            let reason = format!(
                "time {} is {} ms after ingest, more than the allowed {} ms",
                text(),
                time_ms.saturating_sub(ingest),
                cfg.max_future_ms
            );
            return Err((Rule::FutureTime, reason, device, Some(time_ms)));
        }
        if ingest.saturating_sub(time_ms) > cfg.max_age_ms {
            let reason = format!(
                "time {} is {} ms before ingest, older than the allowed {} ms",
                text(),
                ingest.saturating_sub(time_ms),
                cfg.max_age_ms
            );
            return Err((Rule::StaleTime, reason, device, Some(time_ms)));
        }
    }
    let metrics = metrics.map(|m| m.unwrap_or_default());
    for (i, v) in metrics.iter().enumerate() {
        if !v.is_finite() {
            return Err((
                Rule::NonFinite,
                format!("{} is {v}, not a finite number", METRICS[i]),
                device,
                Some(time_ms),
            ));
        }
        let (lo, hi) = cfg.ranges[i];
        if *v < lo || *v > hi {
            let reason = format!("{} is {v}, outside the allowed range [{lo}, {hi}]", METRICS[i]);
            return Err((Rule::OutOfRange, reason, device, Some(time_ms)));
        }
    }
    Ok((device, time_ms, metrics, is_fail))
}

/// The `duplicate` rule's memory: the accepted event times of each device, in order, kept
/// while a reading of that time can still pass the stale rule. Readings mostly arrive in
/// time order per device, so the usual check is one comparison with the device's newest
/// time; a late reading costs a binary search and the decoding of one block.
///
/// What earlier epochs accepted is kept delta-of-delta encoded ([`Times`]): a reading every
/// 10 s from a Kafka partition costs 2–3 bytes there instead of the 40 of a plain entry. At
/// real time this memory spans `rules.max_age` + 1 hour of every device's readings (7 hours
/// by default).
#[derive(Debug)]
pub struct Deduper {
    devices: crate::dataflow::FastMap<u32, DeviceTimes>,
    /// The devices with a reading accepted in the current epoch (a `fresh` that is not empty).
    touched: Vec<u32>,
    retention_ms: i64,
    high_water_ms: i64,
    /// Per source (a Kafka partition, a replay file): the newest ingest (or event) time seen
    /// from it, and the last epoch that brought it.
    sources: crate::dataflow::FastMap<u32, (i64, u64)>,
    /// Event times below this have been forgotten.
    pruned_below_ms: i64,
    next_epoch: u64,
}

/// A source no epoch has brought for this many epochs is idle: it no longer holds the
/// forgetting back (an empty partition, a replay file read to its end).
const IDLE_EPOCHS: u64 = 64;

/// One device's accepted times.
#[derive(Debug, Default)]
struct DeviceTimes {
    /// Those of earlier epochs.
    past: Times,
    /// Those of the current epoch, in time order.
    fresh: Vec<Fresh>,
}

impl DeviceTimes {
    /// The source position of the reading accepted at `time_ms`, if one was.
    fn find(&self, time_ms: i64) -> Option<SourcePos> {
        match self.fresh.binary_search_by_key(&time_ms, |f| f.time_ms) {
            Ok(j) => Some(self.fresh[j].pos),
            Err(_) => self.past.find(time_ms),
        }
    }
}

/// A reading accepted in the current epoch.
#[derive(Debug, Clone, Copy)]
struct Fresh {
    time_ms: i64,
    pos: SourcePos,
    /// Where the reading is in the epoch's batches (batch, index).
    at: (u32, u32),
}

/// Entries per block of [`Times`]: a late reading decodes one block (and re-encodes it, when
/// it is accepted), and a block's header costs about 70 bytes.
const BLOCK: u32 = 128;

/// (event time, source position) pairs of one device, in time order, in blocks of up to
/// [`BLOCK`] entries. A block stores each entry as the change of its differences from the
/// entry before (delta of delta), as zigzag variable-length integers: the time step's, then,
/// from the same source, the offset step's, or else the source and the offset in full. A
/// device read at a steady interval into a partition at a steady rate changes neither step:
/// about a byte each, where the steps themselves took two or three.
#[derive(Debug, Default)]
struct Times {
    blocks: VecDeque<Block>,
}

#[derive(Debug)]
struct Block {
    first_ms: i64,
    last_ms: i64,
    /// The last entry's position, which the next entry is encoded against.
    last_pos: SourcePos,
    /// The last entry's time step, and its offset step (0 after a change of source).
    last_step: i64,
    last_offset_step: i64,
    len: u32,
    bytes: Vec<u8>,
}

/// Time differences at or above this start a new block (they would not fit the tag).
const MAX_STEP_MS: i64 = 1 << 62;

impl Block {
    /// A block of one entry.
    fn start(time_ms: i64, pos: SourcePos) -> Block {
        let mut b = Block {
            first_ms: time_ms,
            last_ms: time_ms,
            last_pos: SourcePos { source: 0, offset: 0 },
            last_step: 0,
            last_offset_step: 0,
            len: 0,
            bytes: Vec::new(),
        };
        let fits = b.try_push(time_ms, pos);
        debug_assert!(fits);
        b
    }

    /// Appends an entry after the last one, unless the block is full or the time difference
    /// does not fit.
    fn try_push(&mut self, time_ms: i64, pos: SourcePos) -> bool {
        let step = match time_ms.checked_sub(self.last_ms) {
            Some(step) if self.len < BLOCK && (0..MAX_STEP_MS).contains(&step) => step,
            _ => return false,
        };
        // Both steps are within 0..2^62: the change fits 63 bits with its sign, and the tag.
        let same = pos.source == self.last_pos.source;
        put_varint(&mut self.bytes, zigzag(step - self.last_step) << 1 | u64::from(same));
        self.last_step = step;
        if same {
            let d = pos.offset.wrapping_sub(self.last_pos.offset) as i64;
            put_varint(&mut self.bytes, zigzag(d.wrapping_sub(self.last_offset_step)));
            self.last_offset_step = d;
        } else {
            put_varint(&mut self.bytes, u64::from(pos.source));
            put_varint(&mut self.bytes, pos.offset);
            self.last_offset_step = 0;
        }
        self.last_ms = time_ms;
        self.last_pos = pos;
        self.len += 1;
        if self.len == BLOCK {
            self.bytes.shrink_to_fit();
        }
        true
    }

    /// The entries, in time order.
    fn entries(&self) -> impl Iterator<Item = (i64, SourcePos)> + '_ {
        let (mut at, mut time_ms, mut step, mut offset_step) = (0, self.first_ms, 0i64, 0i64);
        let mut pos = SourcePos { source: 0, offset: 0 };
        (0..self.len).map(move |_| {
            let tag = get_varint(&self.bytes, &mut at);
            step += unzigzag(tag >> 1);
            time_ms += step;
            if tag & 1 == 1 {
                offset_step = offset_step.wrapping_add(unzigzag(get_varint(&self.bytes, &mut at)));
                pos.offset = pos.offset.wrapping_add(offset_step as u64);
            } else {
                pos.source = get_varint(&self.bytes, &mut at) as u32;
                pos.offset = get_varint(&self.bytes, &mut at);
                offset_step = 0;
            }
            (time_ms, pos)
        })
    }
}

impl Times {
    /// The newest time.
    fn last_ms(&self) -> Option<i64> {
        self.blocks.back().map(|b| b.last_ms)
    }

    /// The block that holds `time_ms` if any does: the first whose last time is not before it.
    fn block_of(&self, time_ms: i64) -> usize {
        self.blocks.partition_point(|b| b.last_ms < time_ms)
    }

    /// The position stored with `time_ms`, if it is stored.
    fn find(&self, time_ms: i64) -> Option<SourcePos> {
        let b = self.blocks.get(self.block_of(time_ms))?;
        if b.first_ms > time_ms {
            return None;
        }
        b.entries()
            .find(|(t, _)| *t >= time_ms)
            .filter(|(t, _)| *t == time_ms)
            .map(|(_, p)| p)
    }

    /// Stores a time that is not stored yet.
    fn insert(&mut self, time_ms: i64, pos: SourcePos) {
        if self.last_ms().is_none_or(|last| time_ms > last) {
            if !self.blocks.back_mut().is_some_and(|b| b.try_push(time_ms, pos)) {
                self.blocks.push_back(Block::start(time_ms, pos));
            }
            return;
        }
        // A late time: its block is decoded and written again.
        let i = self.block_of(time_ms);
        let mut entries: Vec<(i64, SourcePos)> = self.blocks[i].entries().collect();
        let j = entries.partition_point(|(t, _)| *t < time_ms);
        debug_assert!(entries.get(j).is_none_or(|(t, _)| *t != time_ms));
        entries.insert(j, (time_ms, pos));
        self.replace(i, entries);
    }

    /// Puts blocks of `entries` (in time order) in the place of block `i`, or just removes it.
    fn replace(&mut self, i: usize, entries: Vec<(i64, SourcePos)>) {
        self.blocks.remove(i);
        let mut built: Vec<Block> = Vec::new();
        for (t, p) in entries {
            if !built.last_mut().is_some_and(|b| b.try_push(t, p)) {
                built.push(Block::start(t, p));
            }
        }
        for (k, mut b) in built.into_iter().enumerate() {
            b.bytes.shrink_to_fit();
            self.blocks.insert(i + k, b);
        }
    }

    /// Forgets the times before `below_ms`.
    fn forget_before(&mut self, below_ms: i64) {
        while self.blocks.front().is_some_and(|b| b.last_ms < below_ms) {
            self.blocks.pop_front();
        }
        if self.blocks.front().is_some_and(|b| b.first_ms < below_ms) {
            let kept = self.blocks[0].entries().filter(|(t, _)| *t >= below_ms).collect();
            self.replace(0, kept);
        }
    }

    fn len(&self) -> usize {
        self.blocks.iter().map(|b| b.len as usize).sum()
    }
}

impl Deduper {
    /// A deduper that forgets an hour once every source that is not idle has brought an
    /// ingest (or event) time more than `retention_ms` past the hour's end. Use at least the
    /// stale rule's `max_age_ms`. Per source: a backlog is read at the same pace on every
    /// partition, so a denser one falls hours behind the others, and a duplicate it brings
    /// of one of its own readings must still be caught however far the others have gone.
    pub fn new(retention_ms: i64) -> Self {
        Deduper {
            devices: Default::default(),
            touched: Vec::new(),
            retention_ms,
            high_water_ms: i64::MIN,
            sources: Default::default(),
            pruned_below_ms: i64::MIN,
            next_epoch: 0,
        }
    }

    /// Applies the rule to one epoch's readings, in any order: of the readings of a (device,
    /// time), the one of the earliest epoch, then the smallest source position, is accepted
    /// (pushed to `winners`); every other is pushed to `losers` with the source position of
    /// the accepted one.
    pub fn epoch(
        &mut self,
        readings: impl IntoIterator<Item = Reading>,
        winners: &mut Vec<Reading>,
        losers: &mut Vec<(Reading, SourcePos)>,
    ) {
        let mut batch = [readings.into_iter().collect::<Vec<_>>()];
        self.epoch_in_place(&mut batch, losers);
        let [batch] = batch;
        winners.extend(batch);
    }

    /// [`Deduper::epoch`] over an epoch's readings as the batches they came in, in place:
    /// the accepted readings stay in `batches` (not in their order: a batch's duplicates are
    /// swapped out of it), and the others are moved to `losers`. No accepted reading is
    /// copied.
    pub fn epoch_in_place(&mut self, batches: &mut [Vec<Reading>], losers: &mut Vec<(Reading, SourcePos)>) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        // Where the duplicates are, by batch and index.
        let mut doubles: Vec<(u32, u32)> = Vec::new();
        for b in 0..batches.len() {
            for i in 0..batches[b].len() {
                let r = &batches[b][i];
                let (device, time_ms, pos) = (r.device, r.time_ms, r.pos);
                let at = r.ingest_ms.unwrap_or(time_ms);
                self.high_water_ms = self.high_water_ms.max(at);
                let source = self.sources.entry(pos.source).or_insert((at, epoch));
                *source = (source.0.max(at), epoch);
                let times = self.devices.entry(device).or_default();
                if times.past.last_ms().is_some_and(|last| last >= time_ms) && times.past.find(time_ms).is_some() {
                    // Accepted in an earlier epoch.
                    doubles.push((b as u32, i as u32));
                    continue;
                }
                let fresh = Fresh {
                    time_ms,
                    pos,
                    at: (b as u32, i as u32),
                };
                match times.fresh.last() {
                    Some(last) if last.time_ms >= time_ms => {
                        match times.fresh.binary_search_by_key(&time_ms, |f| f.time_ms) {
                            Ok(j) => {
                                let f = &mut times.fresh[j];
                                if pos < f.pos {
                                    // This one is accepted in place of the one accepted so far in
                                    // this epoch: they trade places.
                                    f.pos = pos;
                                    let (wb, wi) = (f.at.0 as usize, f.at.1 as usize);
                                    if wb == b {
                                        batches[b].swap(wi, i);
                                    } else {
                                        let (lo, hi) = batches.split_at_mut(b.max(wb));
                                        let (x, y) = if wb < b {
                                            (&mut lo[wb][wi], &mut hi[0][i])
                                        } else {
                                            (&mut hi[0][wi], &mut lo[b][i])
                                        };
                                        std::mem::swap(x, y);
                                    }
                                }
                                doubles.push((b as u32, i as u32));
                                continue;
                            }
                            Err(j) => times.fresh.insert(j, fresh),
                        }
                    }
                    Some(_) => times.fresh.push(fresh),
                    None => {
                        self.touched.push(device);
                        times.fresh.push(fresh);
                    }
                }
            }
        }
        // Only now is the accepted reading of every (device, time) known. From the last
        // place back, so that each `swap_remove` brings in a reading already decided on.
        doubles.sort_unstable_by(|a, b| b.cmp(a));
        for (b, i) in doubles {
            let d = batches[b as usize].swap_remove(i as usize);
            let first = self
                .devices
                .get(&d.device)
                .and_then(|t| t.find(d.time_ms))
                .unwrap_or(d.pos);
            losers.push((d, first));
        }
        // The epoch's accepted times join the past ones.
        for device in self.touched.drain(..) {
            if let Some(t) = self.devices.get_mut(&device) {
                for f in t.fresh.drain(..) {
                    t.past.insert(f.time_ms, f.pos);
                }
                if t.fresh.capacity() > 1024 {
                    t.fresh = Vec::new();
                }
            }
        }
        self.prune(epoch);
    }

    /// One reading as an epoch of its own: `Err` with the accepted reading's position if it
    /// is a duplicate.
    pub fn admit(&mut self, r: &Reading) -> Result<(), SourcePos> {
        let (mut winners, mut losers) = (Vec::new(), Vec::new());
        self.epoch(vec![r.clone()], &mut winners, &mut losers);
        match losers.pop() {
            Some((_, first)) => Err(first),
            None => Ok(()),
        }
    }

    /// Forgets readings no acceptable reading can duplicate any more: those of hours that
    /// ended more than the retention before the newest time the slowest source that is not
    /// idle has brought (the newest time seen, if every source is idle). Runs only when that
    /// boundary crosses into a new hour.
    fn prune(&mut self, epoch: u64) {
        let slowest = self
            .sources
            .values()
            .filter(|(_, seen)| seen + IDLE_EPOCHS >= epoch)
            .map(|(at, _)| *at)
            .min()
            .unwrap_or(self.high_water_ms);
        let Some(limit) = slowest.checked_sub(self.retention_ms) else {
            return;
        };
        let below = limit.div_euclid(HOUR_MS) * HOUR_MS;
        if below > self.pruned_below_ms {
            self.pruned_below_ms = below;
            self.devices.retain(|_, t| {
                t.past.forget_before(below);
                !t.past.blocks.is_empty()
            });
        }
    }

    /// Number of (device, time) pairs remembered.
    pub fn len(&self) -> usize {
        self.devices.values().map(|t| t.past.len() + t.fresh.len()).sum()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

#[cfg(test)]
mod dedup_tests {
    use super::*;

    fn r(device: u32, time_ms: i64, offset: u64) -> Reading {
        Reading::at(device, time_ms, offset)
    }

    fn run(d: &mut Deduper, epoch: Vec<Reading>) -> (Vec<u64>, Vec<(u64, u64)>) {
        let (mut w, mut l) = (Vec::new(), Vec::new());
        d.epoch(epoch, &mut w, &mut l);
        let mut w: Vec<u64> = w.iter().map(|r| r.pos.offset).collect();
        let mut l: Vec<(u64, u64)> = l.iter().map(|(r, f)| (r.pos.offset, f.offset)).collect();
        w.sort();
        l.sort();
        (w, l)
    }

    /// A source that lags hours behind another keeps the memory of its own hours: a
    /// duplicate it brings late is still caught (a 48-hour crash test doubled a reading
    /// before). An idle source holds nothing back.
    #[test]
    fn a_lagging_source_keeps_its_hours() {
        let at = |source: u32, device: u32, time_ms: i64, offset: u64| Reading {
            pos: SourcePos { source, offset },
            ..r(device, time_ms, offset)
        };
        let mut d = Deduper::new(HOUR_MS);
        // Source 1 delivers device 2 at hour 0 in every epoch; source 0 races 10 hours on.
        for e in 0..10i64 {
            run(
                &mut d,
                vec![at(0, 1, e * HOUR_MS, e as u64), at(1, 2, e * 1000, 100 + e as u64)],
            );
        }
        // A duplicate of device 2's first reading, from the lagging source: still caught.
        let (w, l) = run(&mut d, vec![at(1, 2, 0, 200)]);
        assert_eq!((w, l), (vec![], vec![(200, 100)]));
        // Source 1 goes quiet: after IDLE_EPOCHS epochs it holds nothing back.
        for e in 0..=IDLE_EPOCHS as i64 {
            run(&mut d, vec![at(0, 1, (10 + e) * HOUR_MS, 300 + e as u64)]);
        }
        assert!(d.len() < 3, "hours older than the retention are forgotten: {}", d.len());
    }

    #[test]
    fn first_by_epoch_then_position() {
        let mut d = Deduper::new(HOUR_MS);
        // Same epoch: the smallest offset wins whatever the order; late times slot in.
        let (w, l) = run(
            &mut d,
            vec![
                r(1, 5000, 9),
                r(1, 1000, 3),
                r(1, 5000, 4),
                r(2, 5000, 7),
                r(1, 3000, 1),
                r(1, 5000, 6),
            ],
        );
        assert_eq!(w, vec![1, 3, 4, 7]);
        assert_eq!(l, vec![(6, 4), (9, 4)]);
        // A later epoch never wins, even with a smaller offset.
        let (w, l) = run(&mut d, vec![r(1, 3000, 0), r(1, 4000, 2), r(2, 6000, 8)]);
        assert_eq!(w, vec![2, 8]);
        assert_eq!(l, vec![(0, 1)]);
        assert_eq!(d.len(), 6);
    }

    proptest::proptest! {
        /// In place, over an epoch's readings in batches, the rule decides as over the same
        /// readings in one: the same readings accepted, the same duplicates with the same
        /// accepted positions, epoch after epoch.
        #[test]
        fn in_place_over_batches_decides_as_over_one(
            epochs in proptest::collection::vec(
                proptest::collection::vec((1u32..4, 0i64..8, 0u64..40, 0usize..4), 0..30), 1..4),
        ) {
            let (mut one, mut split) = (Deduper::new(HOUR_MS), Deduper::new(HOUR_MS));
            for (e, epoch) in epochs.iter().enumerate() {
                let readings: Vec<Reading> = epoch
                    .iter()
                    .enumerate()
                    .map(|(i, &(d, t, o, _))| r(d, t * 1000, o * 1000 + (e * 100 + i) as u64))
                    .collect();
                let mut batches = vec![Vec::new(); 4];
                for (rd, &(_, _, _, b)) in readings.iter().zip(epoch) {
                    batches[b].push(rd.clone());
                }
                let (mut w1, mut l1, mut l2) = (Vec::new(), Vec::new(), Vec::new());
                one.epoch(readings, &mut w1, &mut l1);
                split.epoch_in_place(&mut batches, &mut l2);
                let mut w1: Vec<SourcePos> = w1.iter().map(|r| r.pos).collect();
                let mut w2: Vec<SourcePos> = batches.iter().flatten().map(|r| r.pos).collect();
                let mut l1: Vec<(SourcePos, SourcePos)> = l1.iter().map(|(r, f)| (r.pos, *f)).collect();
                let mut l2: Vec<(SourcePos, SourcePos)> = l2.iter().map(|(r, f)| (r.pos, *f)).collect();
                w1.sort();
                w2.sort();
                l1.sort();
                l2.sort();
                proptest::prop_assert_eq!(w1, w2);
                proptest::prop_assert_eq!(l1, l2);
            }
        }
    }

    proptest::proptest! {
        /// The encoded times hold what a plain ordered map holds, whatever the order of the
        /// inserts, the gaps between times (up to the whole `i64` range), the sources and
        /// offsets, and wherever the forgetting cuts.
        #[test]
        fn encoded_times_hold_what_a_map_holds(
            entries in proptest::collection::vec(
                (proptest::prop_oneof![
                    -3000i64..3000,
                    proptest::prelude::any::<i64>(),
                    proptest::prelude::Just(i64::MIN),
                    proptest::prelude::Just(i64::MAX)
                ],
                 proptest::prop_oneof![0u32..3, proptest::prelude::any::<u32>()],
                 proptest::prop_oneof![0u64..100, proptest::prelude::any::<u64>()]),
                0..400),
            cut in proptest::prelude::any::<i64>(),
        ) {
            let (mut times, mut map) = (Times::default(), std::collections::BTreeMap::new());
            for (t, source, offset) in entries {
                let pos = SourcePos { source, offset };
                if map.contains_key(&t) {
                    continue;
                }
                times.insert(t, pos);
                map.insert(t, pos);
                proptest::prop_assert_eq!(times.find(t), Some(pos));
            }
            let stored: Vec<(i64, SourcePos)> = times.blocks.iter().flat_map(Block::entries).collect();
            let expected: Vec<(i64, SourcePos)> = map.iter().map(|(t, p)| (*t, *p)).collect();
            proptest::prop_assert_eq!(&stored, &expected);
            proptest::prop_assert_eq!(times.len(), map.len());
            proptest::prop_assert!(times.blocks.iter().all(|b| b.len >= 1 && b.len <= BLOCK));
            for probe in [cut, cut.wrapping_add(1), cut.wrapping_sub(1)] {
                proptest::prop_assert_eq!(times.find(probe), map.get(&probe).copied());
            }
            times.forget_before(cut);
            let kept: Vec<(i64, SourcePos)> = times.blocks.iter().flat_map(Block::entries).collect();
            let expected: Vec<(i64, SourcePos)> = map.range(cut..).map(|(t, p)| (*t, *p)).collect();
            proptest::prop_assert_eq!(kept, expected);
        }
    }

    /// A device's reading every 10 s from one Kafka partition, among 10,000 devices on 6
    /// partitions: about 5 bytes each once encoded (a plain entry takes 40).
    #[test]
    fn regular_readings_encode_small() {
        let mut times = Times::default();
        for k in 0..10_000u64 {
            times.insert(
                1_700_000_000_000 + k as i64 * 10_000 + (k % 7) as i64,
                SourcePos {
                    source: 3,
                    offset: k * 1667 + k % 5,
                },
            );
        }
        // Steps that change by a few ms and a few offsets: a byte each (the plain steps took
        // three and two), and each block's first entry in full.
        let bytes: usize = times.blocks.iter().map(|b| b.bytes.len()).sum();
        assert!(
            bytes <= 10_000 * 2 + times.blocks.len() * 8,
            "{bytes} bytes for 10,000 readings"
        );
        assert_eq!(times.len(), 10_000);
    }

    #[test]
    fn forgets_hours_past_retention() {
        let mut d = Deduper::new(HOUR_MS);
        run(&mut d, vec![r(1, 1000, 0), r(2, HOUR_MS / 2, 1)]);
        assert_eq!(d.len(), 2);
        run(&mut d, vec![r(1, 3 * HOUR_MS + 10, 2)]);
        // Newest 3h: hours before 2h are forgotten, so device 1's first reading could be
        // accepted again (it would be stale by then).
        assert_eq!(d.len(), 1);
        assert_eq!(d.admit(&r(1, 1000, 5)), Ok(()));
    }
}

#[cfg(test)]
mod nullable_tests {
    use super::*;
    use proptest::prelude::*;
    use serde::de::DeserializeSeed;

    /// What serde's `Option<T>` makes of `json`, and what [`Nullable`] makes of it: the value
    /// or the error's text (position included).
    fn both<T>(json: &str) -> (Result<Option<T>, String>, Result<Option<T>, String>)
    where
        T: for<'de> Scalar<'de> + serde::de::DeserializeOwned,
    {
        let serde_way = serde_json::from_str::<Option<T>>(json).map_err(|e| e.to_string());
        let mut d = serde_json::Deserializer::from_str(json);
        let ours = Nullable::<T>::new()
            .deserialize(&mut d)
            .and_then(|v| d.end().map(|_| v))
            .map_err(|e| e.to_string());
        (serde_way, ours)
    }

    /// serde_json reports a container where a scalar belongs at the container's first byte
    /// when asked for the scalar, and just past it when asked for any value: the rule and the
    /// message are the same, only the column differs.
    fn same(json: &str) {
        if json.trim_start().starts_with(['[', '{']) {
            let json = json.trim_start();
            let (a, b) = both::<f64>(json);
            let strip = |r: Result<Option<f64>, String>| r.map_err(|e| e.split(" at line").next().map(str::to_owned));
            assert_eq!(strip(a).err(), strip(b).err(), "f64 from {json:?}");
            return;
        }
        let (a, b) = both::<f64>(json);
        assert_eq!(
            a.map(|v| v.map(f64::to_bits)),
            b.map(|v| v.map(f64::to_bits)),
            "f64 from {json:?}"
        );
        let (a, b) = both::<i64>(json);
        assert_eq!(a, b, "i64 from {json:?}");
        let (a, b) = both::<bool>(json);
        assert_eq!(a, b, "bool from {json:?}");
        let serde_way = serde_json::from_str::<Option<String>>(json).map_err(|e| e.to_string());
        let mut d = serde_json::Deserializer::from_str(json);
        let ours = Nullable::<Cow<str>>::new()
            .deserialize(&mut d)
            .and_then(|v| d.end().map(|_| v.map(Cow::into_owned)))
            .map_err(|e| e.to_string());
        assert_eq!(serde_way, ours, "string from {json:?}");
    }

    #[test]
    fn reads_values_as_option_does() {
        for json in [
            "null",
            "1",
            "-1",
            "0",
            "-0",
            "1.5",
            "-0.0",
            "1e2",
            "1e999",
            "-1e999",
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "true",
            "false",
            "\"x\"",
            "\"a\\nb\"",
            "\"\\ud800\"",
            "[]",
            "[1, 2]",
            "{}",
            "{\"a\": 1}",
            "[1,",
            "{\"a\"",
            "nul",
            "tru",
            "\"",
            "",
            " 85.69 ",
            "01",
            "1.",
            ".5",
            "+1",
            "NaN",
        ] {
            same(json);
        }
    }

    proptest! {
        #[test]
        fn reads_any_text_as_option_does(json in "[ \\[\\]{}\",:0-9eE.+\\-ntrufalsx\\\\]{0,12}") {
            same(&json);
        }
    }
}

#[cfg(test)]
mod fast_tests {
    use super::*;
    use proptest::prelude::*;

    type View = (Option<Vec<u8>>, Option<i64>, [Option<u64>; 6], Option<bool>);

    fn view(w: &Wire) -> View {
        (
            w.time.as_deref().map(<[u8]>::to_vec),
            w.device_id,
            w.metrics.map(|m| m.map(f64::to_bits)),
            w.is_fail,
        )
    }

    /// Whatever the fast path decodes, serde_json decodes to the same value, bit for bit.
    /// Returns whether the fast path took the payload.
    fn agree(p: &[u8]) -> bool {
        let Some(fast) = Wire::fast(p) else { return false };
        let text = String::from_utf8_lossy(p);
        let slow: Wire = serde_json::from_slice(p).unwrap_or_else(|e| panic!("fast path took {text:?}; serde: {e}"));
        assert_eq!(view(&fast), view(&slow), "{text:?}");
        true
    }

    const USUAL: &str = "{\"time\": \"2025-03-01T10:00:05Z\", \"DeviceId\": 17, \"sensor1\": 101.25, \"sensor2\": 99.1, \"sensor3\": 130, \"motor1\": 1500.07, \"motor2\": 401.5, \"motor3\": 2000.99, \"isFail\": false}";

    #[test]
    fn usual_payloads_take_the_fast_path() {
        assert!(agree(USUAL.as_bytes()));
        assert!(agree(USUAL.replace(' ', "").as_bytes()));
        assert!(agree(USUAL.replace("false", "true").replace(": ", " :\n\t").as_bytes()));
        assert!(agree(b"{}"));
        assert!(agree(
            b" {\"sensor1\": -0, \"motor1\": -0.0, \"motor2\": 0.00000000000000001} \r\n"
        ));
        assert!(Wire::layout(USUAL.as_bytes()).is_some(), "the API's own layout");
        assert!(Wire::layout(USUAL.replace(' ', "").as_bytes()).is_none());
        let w = Wire::fast(USUAL.as_bytes()).unwrap();
        assert_eq!(w.device_id, Some(17));
        assert_eq!(w.metrics[2], Some(130.0));
        assert_eq!(w.metrics[0].map(f64::to_bits), Some(101.25f64.to_bits()));
    }

    #[test]
    fn leaves_the_rest_to_serde() {
        for p in [
            "",
            "[]",
            "{",
            "{\"time\": null}",
            "{\"DeviceId\": -1}",
            "{\"DeviceId\": 1.0}",
            "{\"DeviceId\": 1e2}",
            "{\"sensor1\": 1e2}",
            "{\"sensor1\": 1.}",
            "{\"sensor1\": 01}",
            "{\"sensor1\": 1234567890123456789}",
            "{\"sensor1\": \"1\"}",
            "{\"time\": \"a\\nb\"}",
            "{\"time\": \"caf\u{e9}\"}",
            "{\"sensor1\": 1, \"sensor1\": 1}",
            "{\"other\": 1}",
            "{\"sensor1\": 1,}",
            "{\"isFail\": truex}",
            "{\"isFail\": 1}",
            "{} x",
            "{\"sensor1\" 1}",
        ] {
            assert!(Wire::fast(p.as_bytes()).is_none(), "{p:?}");
        }
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "time", "DeviceId", "sensor1", "sensor2", "sensor3", "motor1", "motor2", "motor3", "isFail"
            ])
            .prop_map(str::to_owned),
            "[a-zA-Z\\\\\"\u{1}\u{e9}]{0,4}",
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "-?(0|[1-9][0-9]{0,20})(\\.[0-9]{0,20})?([eE][+-]?[0-9]{1,3})?",
            "[0-9.eE+\\-]{1,6}",
            "\"[ -~\u{e9}\u{1}]{0,8}\"",
            prop::sample::select(vec!["true", "false", "null", "tru", "[]", "{}", "[1]", "{\"a\":1}"])
                .prop_map(str::to_owned),
        ]
    }

    proptest! {
        #[test]
        fn numbers_read_as_serde_reads_them(n in "-?(0|[1-9][0-9]{0,19})(\\.[0-9]{1,19})?") {
            let p = format!("{{\"motor3\": {n}}}");
            let took = agree(p.as_bytes());
            let digits = n.bytes().filter(u8::is_ascii_digit).count();
            prop_assert_eq!(took, digits <= 18, "{}", p);
        }

        #[test]
        fn numbers_in_the_api_layout_read_as_serde_reads_them(
            n in "-?(0|[1-9][0-9]{0,19})(\\.[0-9]{0,19})?",
            tail in prop::sample::select(vec!["", "e2", "E-1", "x", " ", "."]),
            metric in 0usize..6,
        ) {
            let p = USUAL.replacen(&format!(": {}", ["101.25", "99.1", "130", "1500.07", "401.5", "2000.99"][metric]), &format!(": {n}{tail}"), 1);
            let took = agree(p.as_bytes());
            let digits = n.bytes().filter(u8::is_ascii_digit).count();
            let number = digits <= 18 && !n.ends_with('.') && tail.is_empty();
            prop_assert_eq!(took, number || (tail == " " && digits <= 18 && !n.ends_with('.')), "{}", p);
            prop_assert_eq!(Wire::layout(p.as_bytes()).is_some(), number, "{}", p);
        }

        #[test]
        fn digit_words_read_as_digits_do(text in "[0-9]{0,9}[^0-9]{0,8}", pad in "[ -~]{8}") {
            let bytes = format!("{text}{pad}");
            let x = u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap());
            let run = bytes.bytes().take(8).take_while(u8::is_ascii_digit).count();
            prop_assert_eq!(digit_run(x), run);
            if (1..8).contains(&run) {
                prop_assert_eq!(digits_value(x, run), bytes[..run].parse::<u64>().unwrap());
            }
        }

        #[test]
        fn objects_read_as_serde_reads_them(
            fields in prop::collection::vec((key(), value(), "[ \t\n\r]{0,2}"), 0..11),
            tail in prop::sample::select(vec!["}", "} ", "", ",}", "}}", "} x"]),
        ) {
            let body: Vec<String> = fields.iter().map(|(k, v, ws)| format!("{ws}\"{k}\"{ws}:{ws}{v}{ws}")).collect();
            let p = format!("{{{}{tail}", body.join(","));
            agree(p.as_bytes());
        }

        #[test]
        fn damaged_payloads_read_as_serde_reads_them(at in 0usize..usize::MAX, byte in any::<u8>(), how in 0u8..3) {
            let mut p = USUAL.as_bytes().to_vec();
            let at = at % p.len();
            match how {
                0 => p[at] = byte,
                1 => p.insert(at, byte),
                _ => { p.remove(at); }
            }
            agree(&p);
        }
    }
}
