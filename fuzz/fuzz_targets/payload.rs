//! Arbitrary bytes into the payload decoder and the quality rules, then the accepted
//! readings into the duplicate rule. The input format and every check are in
//! `fmsflow_dataflows::fuzzing`, which the regression test `tests/fuzz_regressions.rs` of
//! `dataflows` runs too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fmsflow_dataflows::fuzzing::check_payload(data));
