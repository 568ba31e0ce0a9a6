//! Time (and, under `valgrind --tool=callgrind`, instructions) of the stateless rules alone
//! on clean FMS payloads: `cargo run --release -p fmsflow-dataflows --example parsebench`.
use fmsflow_dataflows::rules::{validate_keeping, RuleConfig};
use fmsflow_dataflows::time::format_rfc3339;
use fmsflow_dataflows::{RawRecord, SourcePos};

fn main() {
    let t0 = 1_751_846_400_000i64; // 2025-07-07T00:00:00Z
    let mut raws = Vec::new();
    for tick in 0..720i64 {
        for device in 1..=100u32 {
            let x = (tick * 7 + device as i64 * 13) as f64;
            let time = t0 + tick * 10_000;
            let payload = format!(
                r#"{{"time": "{}", "DeviceId": {device}, "sensor1": {:.2}, "sensor2": {:.2}, "sensor3": {:.2}, "motor1": {:.2}, "motor2": {:.2}, "motor3": {:.2}, "isFail": {}}}"#,
                format_rfc3339(time),
                50.0 + (x * 0.37) % 100.0,
                60.0 + (x * 0.51) % 120.0,
                70.0 + (x * 0.13) % 110.0,
                400.0 + (x * 3.7) % 900.0,
                900.0 + (x * 5.3) % 1100.0,
                300.0 + (x * 2.9) % 950.0,
                tick % 97 == 0
            );
            raws.push(RawRecord {
                payload: payload.into_bytes().into(),
                ingest_ms: Some(time + 150),
                pos: SourcePos {
                    source: 0,
                    offset: raws.len() as u64,
                },
            });
        }
    }
    let cfg = RuleConfig::default();
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(20);
    let t = std::time::Instant::now();
    let mut sum = 0.0;
    for _ in 0..rounds {
        for r in &raws {
            if let Ok((reading, _)) = validate_keeping(r.clone(), &cfg) {
                sum += reading.metrics[0];
            }
        }
    }
    let n = raws.len() * rounds;
    println!(
        "{n} payloads, {:.1} ns each (checksum {sum})",
        t.elapsed().as_nanos() as f64 / n as f64
    );
}
