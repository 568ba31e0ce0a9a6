use fmsflow::gen::{generate, GenSettings};
use fmsflow_dataflows::{
    rules::{validate, RuleConfig},
    RawRecord, SourcePos,
};
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() {
    let s = GenSettings {
        devices: 100,
        hours: 1,
        interval_s: 10,
        start_ms: 1751846400000,
        seed: 42,
        dirty_rate: 0.0,
        late_rate: 0.0,
        max_late_ms: 0,
    };
    let (recs, _) = generate(&s);
    let cfg = RuleConfig::default();
    let mut rows: Vec<_> = recs
        .iter()
        .enumerate()
        .map(|(i, (ing, p))| {
            validate(
                RawRecord {
                    payload: p.clone().into_bytes().into(),
                    ingest_ms: Some(*ing),
                    pos: SourcePos {
                        source: 0,
                        offset: i as u64 * 190,
                    },
                },
                &cfg,
            )
            .unwrap()
        })
        .collect();
    rows.sort_by_key(|r| (r.device, r.time_ms));
    let hour = rows[0].hour();
    let mut cols = fmsflow_dataflows::ReadingColumns::with_capacity(rows.len());
    rows.iter().for_each(|r| cols.push(r));
    let mut size = 0;
    let n = 30;
    let copies: Vec<_> = (0..n).map(|_| cols.clone()).collect();
    let t = std::time::Instant::now();
    for c in copies {
        size = fmsflow::lake::parquet::readings([c], rows.len(), hour, 16384)
            .unwrap()
            .len();
    }
    let el = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "{:>12} rows={} bytes={} ({:.1} B/row) {:.0} ns/row",
        std::env::var("PQV").unwrap_or_default(),
        rows.len(),
        size,
        size as f64 / rows.len() as f64,
        el * 1e9 / rows.len() as f64
    );
}
