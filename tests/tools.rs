//! The repository's own tools that are not Rust: run for real on small inputs.

use std::io::Write;
use std::process::{Command, Stdio};

/// `scripts/lib/flamegraph.py` folds `perf script` samples into stacks (root first, Rust names
/// demangled), counts each function's own samples, and draws every frame of the SVG.
#[test]
fn the_flame_graph_script_folds_perf_samples() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tempfile::tempdir().expect("a temporary directory");
    let svg = out.path().join("flame.svg");
    let sample = |leaf: &str| {
        format!(
            "fmsflow 100 1.0: 1 cpu-clock:\n\
             \t    55d0a1 {leaf}+0x12 (/x/fmsflow)\n\
             \t    55d0b2 _ZN7fmsflow6engine6settle17h0123456789abcdefE+0x40 (/x/fmsflow)\n\
             \t    7f0001 start_thread+0x8 (/lib/libc.so.6)\n\n"
        )
    };
    let input = [
        sample("_ZN17fmsflow_dataflows5rules7Deduper14epoch_in_place17hfedcba9876543210E"),
        sample("_ZN17fmsflow_dataflows5rules7Deduper14epoch_in_place17hfedcba9876543210E"),
        sample("__memcpy_avx512_unaligned_erms"),
    ]
    .concat();
    let mut child = Command::new("python3")
        .arg(format!("{root}/scripts/lib/flamegraph.py"))
        .args(["--title", "test", "--out"])
        .arg(&svg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("the samples are written");
    let done = child.wait_with_output().expect("the script ends");
    let printed = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{printed}");
    assert!(printed.contains("3 samples"), "{printed}");
    assert!(
        printed.contains(" 66.7 %  fmsflow_dataflows::rules::Deduper::epoch_in_place"),
        "{printed}"
    );
    let folded = std::fs::read_to_string(out.path().join("flame.folded")).expect("the folded stacks");
    assert_eq!(
        folded.lines().next(),
        Some("fmsflow;start_thread;fmsflow::engine::settle;fmsflow_dataflows::rules::Deduper::epoch_in_place 2")
    );
    let drawn = std::fs::read_to_string(&svg).expect("the SVG");
    assert_eq!(drawn.matches("<rect x=").count(), 5, "one box per frame: {drawn}");
}
