//! The FMS device model shared by the simulator and the generator: plausible sensor and
//! motor values per device with drift and failure episodes, and every kind of dirty record
//! the quality rules catch. Everything is a pure function of (seed, device, time), so the
//! same seed gives the same data on every machine.

use fmsflow_dataflows::time::format_rfc3339;
use fmsflow_dataflows::Rule;

/// SplitMix64 finalizer over a combination of inputs: a stateless, reproducible "random".
pub fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ b.rotate_left(21)
        ^ c.rotate_left(42).wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) from a hash.
pub fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The clean reading of `device` at `time_ms`, as FMS JSON (values rounded to 2 decimals).
pub fn clean_payload(seed: u64, device: u32, time_ms: i64) -> String {
    let (m, fail) = clean_values(seed, device, time_ms);
    render(
        &format_rfc3339(time_ms),
        &device.to_string(),
        &m.map(|v| format!("{v:.2}")),
        if fail { "true" } else { "false" },
    )
}

/// The values behind [`clean_payload`].
pub fn clean_values(seed: u64, device: u32, time_ms: i64) -> ([f64; 6], bool) {
    let d = device as u64;
    // Each device has its own operating point, a slow daily cycle and noise.
    let day = 86_400_000.0;
    let phase = unit(mix(seed, d, 7)) * std::f64::consts::TAU;
    let cycle = ((time_ms as f64 / day) * std::f64::consts::TAU + phase).sin();
    // Failure episodes: 5-minute windows, ~2% of them, more on a few fragile devices.
    let window = time_ms.div_euclid(300_000) as u64;
    let fragile = if unit(mix(seed, d, 11)) < 0.1 { 5.0 } else { 1.0 };
    let fail = unit(mix(seed ^ 0xFA11, d, window)) < 0.02 * fragile;
    let mut m = [0.0; 6];
    for (i, v) in m.iter_mut().enumerate() {
        let (lo, hi) = if i < 3 { (60.0, 180.0) } else { (300.0, 2200.0) };
        let base = lo + (hi - lo) * unit(mix(seed, d, 100 + i as u64));
        let noise = unit(mix(seed, d ^ ((i as u64) << 40), time_ms as u64)) - 0.5;
        let hot = if fail { 1.12 } else { 1.0 };
        *v = ((base * (1.0 + 0.05 * cycle + 0.04 * noise) * hot).clamp(lo * 0.5, hi * 1.1) * 100.0).round() / 100.0;
    }
    (m, fail)
}

fn render(time: &str, device: &str, m: &[String; 6], fail: &str) -> String {
    format!(
        "{{\"time\": \"{time}\", \"DeviceId\": {device}, \"sensor1\": {}, \"sensor2\": {}, \"sensor3\": {}, \"motor1\": {}, \"motor2\": {}, \"motor3\": {}, \"isFail\": {fail}}}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// A record that the rule `kind` must reject, made from device `device` at `time_ms`.
/// `Rule::Duplicate` needs the previous clean payload of the device (`last_clean`); without
/// one there is nothing to duplicate and `None` is returned.
pub fn dirty_payload(
    kind: Rule,
    seed: u64,
    device: u32,
    fleet: u32,
    time_ms: i64,
    last_clean: Option<&str>,
) -> Option<String> {
    let (m, fail) = clean_values(seed, device, time_ms);
    let mut vals = m.map(|v| format!("{v:.2}"));
    let fail = if fail { "true" } else { "false" };
    let time = format_rfc3339(time_ms);
    let dev = device.to_string();
    Some(match kind {
        Rule::MalformedJson => {
            let full = render(&time, &dev, &vals, fail);
            full[..full.len() / 2].to_string()
        }
        Rule::MissingField => render(&time, &dev, &vals, fail).replace(&format!("\"sensor2\": {}, ", vals[1]), ""),
        Rule::WrongType => {
            vals[0] = format!("\"{}\"", vals[0]);
            render(&time, &dev, &vals, fail)
        }
        Rule::UnknownDevice => render(&time, &(fleet + 1 + device).to_string(), &vals, fail),
        Rule::BadTime => render(&time.replace('T', "X"), &dev, &vals, fail),
        Rule::FutureTime => render(&format_rfc3339(time_ms + 86_400_000), &dev, &vals, fail),
        Rule::StaleTime => render(&format_rfc3339(time_ms - 2 * 86_400_000), &dev, &vals, fail),
        Rule::NonFinite => {
            vals[4] = "1e999".to_string();
            render(&time, &dev, &vals, fail)
        }
        Rule::OutOfRange => {
            vals[3] = "99999.5".to_string();
            render(&time, &dev, &vals, fail)
        }
        Rule::Duplicate => last_clean?.to_string(),
    })
}

/// The body of a 200 answer that is not an FMS reading, as a broken gateway or firmware sends
/// them (the simulator's `garbage` fault), the content type it comes with, and the rule that
/// rejects it. Four shapes, chosen from (`seed`, `device`, `n`): the reading cut short, an
/// HTML error page, random bytes (not UTF-8), and JSON of another shape.
pub fn garbage_payload(seed: u64, device: u32, n: u64, time_ms: i64) -> (Vec<u8>, &'static str, Rule) {
    let d = device as u64;
    match mix(seed ^ 0x6A2B, d, n) % 4 {
        0 => {
            let full = clean_payload(seed, device, time_ms);
            (full.as_bytes()[..full.len() / 3].to_vec(), "application/json", Rule::MalformedJson)
        }
        1 => (
            format!(
                "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n<body><h1>502 Bad Gateway</h1><p>device {device}: upstream sent an invalid response</p></body></html>\n"
            )
            .into_bytes(),
            "text/html; charset=utf-8",
            Rule::MalformedJson,
        ),
        2 => {
            // 0xFF first: never UTF-8, never the start of JSON.
            let mut bytes = vec![0xFF];
            for i in 0..6 {
                bytes.extend_from_slice(&mix(seed ^ 0xB17E5, d, n.wrapping_mul(8) + i).to_le_bytes());
            }
            (bytes, "application/octet-stream", Rule::MalformedJson)
        }
        _ => (
            format!(
                "{{\"status\": \"maintenance\", \"device\": {device}, \"message\": \"sensor bus offline\", \"time\": \"{}\"}}",
                format_rfc3339(time_ms)
            )
            .into_bytes(),
            "application/json",
            Rule::MissingField,
        ),
    }
}

/// Whether the `n`-th response for `device` is dirty, and of which kind.
pub fn dirty_kind(seed: u64, device: u32, n: u64, rate: f64) -> Option<Rule> {
    if rate <= 0.0 || unit(mix(seed ^ 0xD1_27, device as u64, n)) >= rate {
        return None;
    }
    let i = mix(seed ^ 0x4B1D, device as u64, n) % Rule::ALL.len() as u64;
    Some(Rule::ALL[i as usize])
}

#[cfg(test)]
mod tests {
    use super::*;
    use fmsflow_dataflows::{validate, RawRecord, RuleConfig, SourcePos};

    fn check(payload: &str, ingest: i64) -> Result<(), Rule> {
        let raw = RawRecord {
            payload: payload.as_bytes().to_vec().into(),
            ingest_ms: Some(ingest),
            pos: SourcePos::default(),
        };
        validate(raw, &RuleConfig::default()).map(|_| ()).map_err(|r| r.rule)
    }

    #[test]
    fn clean_payloads_pass_and_are_deterministic() {
        let t = 1_751_876_489_000;
        for d in 1..=100 {
            let p = clean_payload(42, d, t);
            assert_eq!(p, clean_payload(42, d, t));
            assert_eq!(check(&p, t + 300), Ok(()), "{p}");
        }
        assert_ne!(clean_payload(42, 1, t), clean_payload(43, 1, t));
    }

    #[test]
    fn every_garbage_shape_is_caught_by_the_rule_it_names() {
        let t = 1_751_876_489_000;
        let mut shapes = std::collections::BTreeSet::new();
        for d in 1..=20 {
            for n in 0..20 {
                let (body, ctype, rule) = garbage_payload(42, d, n, t);
                shapes.insert(ctype);
                let raw = RawRecord {
                    payload: body.clone().into(),
                    ingest_ms: Some(t + 300),
                    pos: SourcePos::default(),
                };
                let got = validate(raw, &RuleConfig::default()).map(|_| ()).map_err(|r| r.rule);
                assert_eq!(got, Err(rule), "{}", String::from_utf8_lossy(&body));
                assert_eq!(garbage_payload(42, d, n, t), (body, ctype, rule));
            }
        }
        assert_eq!(shapes.len(), 3, "every shape was made: {shapes:?}");
    }

    #[test]
    fn every_dirty_kind_is_caught_by_its_rule() {
        let t = 1_751_876_489_000;
        for kind in Rule::ALL {
            if kind == Rule::Duplicate {
                continue;
            }
            for d in [1, 50, 100] {
                let p = dirty_payload(kind, 42, d, 100, t, None).unwrap();
                assert_eq!(check(&p, t + 300), Err(kind), "{p}");
            }
        }
    }
}
