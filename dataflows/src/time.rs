//! Event-time helpers: a strict, allocation-free RFC 3339 parser for the FMS `time` field,
//! hour arithmetic and civil-date formatting for the lake's `dt=`/`hour=` partitions.

/// Milliseconds in one hour.
pub const HOUR_MS: i64 = 3_600_000;

/// The hour index (hours since the Unix epoch) that contains `ms`.
#[inline]
pub fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS)
}

/// Days since 1970-01-01 for a proleptic Gregorian civil date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The lake partition of an hour index: (`YYYY-MM-DD`, hour of day).
pub fn partition_of_hour(hour: i64) -> (String, u32) {
    let days = hour.div_euclid(24);
    let (y, m, d) = civil_from_days(days);
    (format!("{y:04}-{m:02}-{d:02}"), hour.rem_euclid(24) as u32)
}

/// Formats milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (fractional part kept
/// only when non-zero), the FMS wire format.
pub fn format_rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let frac = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod / 60 % 60, sod % 60);
    if frac == 0 {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{frac:03}Z")
    }
}

#[inline]
fn digits(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let mut v = 0i64;
    for &c in b.get(at..at + n)? {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as i64;
    }
    Some(v)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses an RFC 3339 timestamp (`2025-07-07T08:21:29Z`, optional fraction, `Z` or
/// `±HH:MM` offset, `T` or space separator) into milliseconds since the epoch.
/// Returns `None` for anything else, including impossible dates such as February 30.
pub fn parse_rfc3339(s: impl AsRef<[u8]>) -> Option<i64> {
    let b = s.as_ref();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let y = digits(b, 0, 4)?;
    let mo = digits(b, 5, 2)? as u32;
    let d = digits(b, 8, 2)? as u32;
    let h = digits(b, 11, 2)?;
    let mi = digits(b, 14, 2)?;
    let se = digits(b, 17, 2)?;
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        let mut scale = 100;
        while i < b.len() && b[i].is_ascii_digit() {
            frac_ms += (b[i] - b'0') as i64 * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = digits(b, i + 1, 2)?;
            let om = digits(b, i + 4, 2)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let v = oh * 60 + om;
            if *c == b'-' {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se.min(59) - offset_min * 60;
    Some(secs * 1000 + frac_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fms_format() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2025-07-07T08:21:29Z"), Some(1_751_876_489_000));
        assert_eq!(parse_rfc3339("2025-07-07T08:21:29.250Z"), Some(1_751_876_489_250));
        assert_eq!(parse_rfc3339("2025-07-07T10:21:29+02:00"), Some(1_751_876_489_000));
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z").map(|_| ()), Some(()));
    }

    #[test]
    fn rejects_impossible_or_odd_times() {
        for s in [
            "",
            "2025-07-07",
            "2025-13-07T08:21:29Z",
            "2025-02-30T08:21:29Z",
            "2023-02-29T08:21:29Z",
            "2025-07-07T24:00:00Z",
            "2025-07-07T08:21:29",
            "2025-07-07T08:21:29Zjunk",
            "2025-07-07T08:21:29.Z",
            "yesterday at noon!!!",
        ] {
            assert_eq!(parse_rfc3339(s), None, "{s}");
        }
    }

    #[test]
    fn civil_round_trip() {
        for days in [-800_000i64, -1, 0, 1, 19_000, 20_276, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        let ms = parse_rfc3339("2025-07-07T08:21:29Z").unwrap();
        assert_eq!(format_rfc3339(ms), "2025-07-07T08:21:29Z");
        assert_eq!(partition_of_hour(hour_of(ms)), ("2025-07-07".to_string(), 8));
    }
}
