//! `fmsflow gen`: writes N devices × M hours of readings in the replay format
//! (`<ingest_ms> <payload>` per line), with optional dirty and late records, for tests and
//! benchmarks. Deterministic from the seed.

use std::collections::BTreeMap;

use crate::fms::{clean_payload, dirty_kind, dirty_payload, mix, unit};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenSettings {
    /// Devices 1..=devices.
    pub devices: u32,
    /// Hours of data.
    pub hours: u32,
    /// Seconds between two readings of a device.
    pub interval_s: u32,
    /// Event time of the first reading, ms since the epoch.
    pub start_ms: i64,
    /// Seed.
    pub seed: u64,
    /// Fraction of dirty records.
    pub dirty_rate: f64,
    /// Fraction of readings delivered late (up to `max_late_ms` after their time).
    pub late_rate: f64,
    /// Largest delivery delay of a late reading.
    pub max_late_ms: i64,
}

impl GenSettings {
    /// Clean readings of `devices` devices over `hours` hours, one per device every 10 s from
    /// 2025-07-07T00:00:00Z, seed 42: the input of the benchmarks.
    pub fn clean(devices: u32, hours: u32) -> Self {
        GenSettings {
            devices,
            hours,
            interval_s: 10,
            start_ms: 1_751_846_400_000,
            seed: 42,
            dirty_rate: 0.0,
            late_rate: 0.0,
            max_late_ms: 0,
        }
    }
}

/// Records as (ingest ms, payload) ordered by ingest time, and how many of each dirty kind
/// they hold (the truth tests compare the engine's rejections with).
pub type Generated = (Vec<(i64, String)>, BTreeMap<&'static str, u64>);

/// Generates every record.
pub fn generate(s: &GenSettings) -> Generated {
    generate_at_most(s, u64::MAX)
}

/// Generates the first `limit` records (all, if there are fewer): whole rounds of the fleet
/// from the start, the last round cut short.
pub fn generate_at_most(s: &GenSettings, limit: u64) -> Generated {
    let mut dirty = BTreeMap::new();
    let ticks = s.hours as u64 * 3600 / s.interval_s.max(1) as u64;
    let total = (ticks * s.devices as u64).min(limit);
    let mut out = Vec::with_capacity(total as usize);
    let mut last_clean: Vec<Option<String>> = vec![None; s.devices as usize + 1];
    let mut late = false;
    for tick in 0..ticks {
        let base = s.start_ms + tick as i64 * s.interval_s as i64 * 1000;
        for d in 1..=s.devices {
            if out.len() as u64 == total {
                break;
            }
            let h = mix(s.seed, d as u64, tick);
            let time = base + (unit(h) * 1000.0) as i64 / 1000 * 1000;
            let mut ingest = time + 50 + (unit(h.rotate_left(17)) * 400.0) as i64;
            if s.late_rate > 0.0 && unit(h.rotate_left(33)) < s.late_rate {
                ingest += (unit(h.rotate_left(49)) * s.max_late_ms as f64) as i64;
                late = true;
            }
            let payload = match dirty_kind(s.seed, d, tick, s.dirty_rate) {
                Some(kind) => dirty_payload(kind, s.seed, d, s.devices, time, last_clean[d as usize].as_deref())
                    .inspect(|_| {
                        *dirty.entry(kind.name()).or_default() += 1;
                    }),
                None => None,
            };
            let payload = payload.unwrap_or_else(|| {
                let p = clean_payload(s.seed, d, time);
                last_clean[d as usize] = Some(p.clone());
                p
            });
            out.push((ingest, payload));
        }
    }
    if late {
        out.sort_by_key(|(i, _)| *i);
    }
    (out, dirty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_is_the_start_of_the_whole() {
        let s = GenSettings::clean(3, 1);
        let (all, _) = generate(&s);
        assert_eq!(all.len(), 3 * 360);
        let (some, _) = generate_at_most(&s, 7);
        assert_eq!(some, all[..7]);
        let (more, _) = generate_at_most(&s, 10_000);
        assert_eq!(more, all);
    }
}
