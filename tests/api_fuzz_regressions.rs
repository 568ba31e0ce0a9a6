//! Replays through the `api_request` fuzz target's own harness and checks
//! (`fmsflow::api::fuzzing::Harness`) every input it ever failed on,
//! `fuzz/regressions/api_request/`, and its seed corpus, `fuzz/seeds/api_request/`: a bug the
//! fuzzer found stays fixed without running the fuzzer. See docs/FUZZING.md.

use fmsflow::api::fuzzing::Harness;
use fmsflow_dataflows::fuzzing::replay_kept_inputs;

#[test]
fn every_input_the_fuzzer_failed_on_and_every_seed_passes() {
    // One harness: it runs the engine once to fill its view.
    let harness = Harness::new();
    let check = |bytes: &[u8]| harness.check(bytes);
    replay_kept_inputs("regressions", "api_request", check);
    assert!(
        replay_kept_inputs("seeds", "api_request", check) >= 10,
        "fuzz/seeds/api_request holds the seed corpus"
    );
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/api_request");

    // The checks see real answers: the engine filled the view the router answers from.
    let answer = |seed: &str| {
        let bytes = std::fs::read(seeds.join(seed)).expect("a seed");
        harness.send(&bytes).expect("a request").1
    };
    let hourly = answer("device-hourly");
    assert_eq!(hourly.status, 200);
    let hourly: serde_json::Value = serde_json::from_slice(&hourly.body).expect("JSON");
    assert_eq!(hourly["hours"].as_array().map(Vec::len), Some(3), "{hourly}");
    let fleet: serde_json::Value = serde_json::from_slice(&answer("fleet-hourly").body).expect("JSON");
    assert_eq!(fleet["devices"].as_array().map(Vec::len), Some(5), "{fleet}");
    assert_eq!(answer("no-token").status, 401);
    assert_eq!(answer("unknown-device").status, 404);
}
