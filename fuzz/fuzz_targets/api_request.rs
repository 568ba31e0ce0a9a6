//! An arbitrary HTTP request (method, request target, headers, body, in HTTP/1.1's wire
//! form) sent in-process to the query API's real router, over a view the real engine filled.
//! The harness, the input format and every check are in `fmsflow::api::fuzzing`, which the
//! regression test `tests/api_fuzz_regressions.rs` runs too.
#![no_main]

use std::sync::OnceLock;

use fmsflow::api::fuzzing::Harness;

/// Made once: the engine's run that fills the view takes a moment.
static HARNESS: OnceLock<Harness> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| HARNESS.get_or_init(Harness::new).check(data));
