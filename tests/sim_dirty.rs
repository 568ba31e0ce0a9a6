//! The simulator's dirty records are all caught, each by the expected rule, counted exactly:
//! a real HTTP simulator on 127.0.0.1 is polled over HTTP and everything it served goes
//! through the engine.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use fmsflow::clock::Clock;
use fmsflow::engine::{self, EngineSettings, Source};
use fmsflow::sim::{serve, Sim, SimSettings};
use fmsflow::status::Status;
use fmsflow_dataflows::dataflow::FlowConfig;
use fmsflow_dataflows::{RawRecord, RuleConfig, SourcePos};

const DEVICES: u32 = 25;

async fn get(client: &reqwest::Client, url: String) -> (u16, Vec<u8>) {
    let r = client.get(url).send().await.expect("the simulator answers");
    (r.status().as_u16(), r.bytes().await.expect("a body").to_vec())
}

#[test]
fn every_dirty_record_is_caught_by_its_rule() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A compressed clock (1 s of simulated time per wall millisecond) so that consecutive
    // rounds are distinct seconds, as polls 10 s apart are in production.
    let clock = Clock::fast(1000.0);
    let sim = Sim::new(
        SimSettings {
            devices: DEVICES,
            seed: 7,
            dirty_rate: 0.3,
        },
        clock.clone(),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, task) = rt
        .block_on(serve(sim.clone(), 0, async move {
            let _ = stop_rx.await;
        }))
        .unwrap();

    let records: Vec<RawRecord> = rt.block_on(async {
        let client = reqwest::Client::new();
        assert_eq!(get(&client, format!("http://{addr}/health")).await.0, 200);
        assert_eq!(get(&client, format!("http://{addr}/0/")).await.0, 404);
        assert_eq!(get(&client, format!("http://{addr}/{}/", DEVICES + 1)).await.0, 404);
        assert_eq!(get(&client, format!("http://{addr}/abc/")).await.0, 404);
        let mut out = Vec::new();
        let mut second = clock.now_ms() / 1000;
        for _round in 0..40 {
            // Wait for the simulated clock to reach a new second: no natural duplicates.
            while clock.now_ms() / 1000 == second {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            second = clock.now_ms() / 1000;
            for d in 1..=DEVICES {
                let (status, body) = get(&client, format!("http://{addr}/{d}/")).await;
                assert_eq!(status, 200);
                let offset = out.len() as u64;
                out.push(RawRecord {
                    payload: body.into(),
                    ingest_ms: Some(clock.now_ms()),
                    pos: SourcePos { source: 0, offset },
                });
            }
            if clock.now_ms() / 1000 != second {
                // A round that spans two simulated seconds is fine; the next waits for a fresh one.
                second = clock.now_ms() / 1000;
            }
        }
        out
    });
    let truth = sim.stats();
    let _ = stop_tx.send(());
    rt.block_on(task).unwrap().unwrap();
    assert_eq!(truth.served as usize, records.len());

    for workers in [1, 3] {
        let status = Arc::new(Status::default());
        let flow = FlowConfig {
            rules: RuleConfig {
                fleet_size: DEVICES,
                ..RuleConfig::default()
            },
            ..FlowConfig::default()
        };
        let settings = EngineSettings {
            flow,
            workers,
            batch: 97,
            epoch: Duration::from_millis(50),
            cluster: None,
            replay_rate: None,
        };
        engine::run(
            settings,
            Source::Memory(Arc::new(records.clone())),
            None,
            None,
            status.clone(),
            None,
        )
        .unwrap();
        let caught: BTreeMap<String, u64> = status
            .rejections_by_rule()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(
            caught, truth.dirty,
            "rejections by rule at {workers} workers equal what the simulator served"
        );
        let dirty: u64 = truth.dirty.values().sum();
        assert!(
            truth.dirty.values().all(|n| *n > 0),
            "every kind was served: {:?}",
            truth.dirty
        );
        assert_eq!(status.valid.load(Relaxed), truth.served - dirty);
    }
}
