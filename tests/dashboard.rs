//! The web dashboard in a real browser: `fmsflow demo --fast` serves it, Debian's headless
//! Chromium (driven by playwright-core from npm, both installed by `scripts/test`) loads it,
//! and `tests/dashboard.js` checks that the charts render with data and update. The
//! screenshot is kept as a test artifact: `target/test-artifacts/dashboard.png`.

mod common;

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Kills the demo when the test ends, however it ends.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_dashboard_renders_live_charts_in_headless_chromium() {
    let node_path = std::env::var("FMSFLOW_NODE_PATH").unwrap_or_default();
    assert!(
        PathBuf::from(&node_path).join("playwright-core").is_dir(),
        "FMSFLOW_NODE_PATH ({node_path:?}) holds no playwright-core: run the tests with `bash scripts/test`, \
         which installs it and Debian's chromium"
    );
    let chromium = std::env::var("FMSFLOW_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        PathBuf::from(&chromium).exists(),
        "no browser at {chromium}: `bash scripts/test` installs it"
    );

    let dir = tempfile::tempdir().unwrap();
    let port = common::free_ports(1)[0];
    let demo = Demo(
        Command::new(common::bin())
            .args(["demo", "--fast", "--duration", "10m", "--workers", "1"])
            .args(["--http", &format!("127.0.0.1:{port}")])
            .args(["--lake", &format!("file://{}", dir.path().join("lake").display())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting fmsflow demo"),
    );
    common::wait_for("the demo's dashboard", Duration::from_secs(60), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("node")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dashboard.js"))
        .arg(format!("http://127.0.0.1:{port}/"))
        .arg(&shot)
        .env("NODE_PATH", &node_path)
        .env("FMSFLOW_CHROMIUM", &chromium)
        .output()
        .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the dashboard check failed:\n{stdout}\n{stderr}");
    eprintln!("dashboard: {stdout}");
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot at {}",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.canonicalize().unwrap().display());
    drop(demo);
}
