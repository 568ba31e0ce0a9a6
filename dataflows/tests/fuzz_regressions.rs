//! Replays through the `payload` fuzz target's own check
//! (`fmsflow_dataflows::fuzzing::check_payload`) every input it ever failed on,
//! `fuzz/regressions/payload/`, and its seed corpus, `fuzz/seeds/payload/`: a crash the
//! fuzzer found stays fixed without running the fuzzer. See docs/FUZZING.md.

use fmsflow_dataflows::fuzzing::{check_payload, replay_kept_inputs};

#[test]
fn every_input_the_fuzzer_failed_on_passes() {
    replay_kept_inputs("regressions", "payload", check_payload);
}

#[test]
fn every_seed_passes() {
    assert!(
        replay_kept_inputs("seeds", "payload", check_payload) >= 10,
        "fuzz/seeds/payload holds the seed corpus"
    );
}
