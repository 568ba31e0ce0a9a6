//! With the `hdfs` feature: puts the directory of `libjvm.so` in the RUNPATH of every binary
//! this package links (the `fmsflow` binary, tests, benches), so it starts without
//! `LD_LIBRARY_PATH`. hdfs-sys links libjvm but its own link arguments do not reach the
//! binaries of the crates that use it. Without the feature this does nothing: the default
//! build needs no JVM.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory hdfs-sys linked against: it passes `JVM_PATH=<dir>` to its direct
/// dependents as `DEP_HDFS_METADATA`.
fn from_hdfs_sys() -> Option<PathBuf> {
    let v = std::env::var("DEP_HDFS_METADATA").ok()?;
    v.strip_prefix("JVM_PATH=").map(PathBuf::from)
}

/// `JAVA_HOME`, or the `java.home` of the `java` on the PATH.
fn java_home() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("JAVA_HOME") {
        return Some(PathBuf::from(h));
    }
    let out = Command::new("java")
        .args(["-XshowSettings:properties", "-version"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.trim().strip_prefix("java.home = ").map(|s| PathBuf::from(s.trim())))
}

fn from_java_home() -> Option<PathBuf> {
    let home = java_home()?;
    ["lib/server", "jre/lib/amd64/server", "lib/amd64/server"]
        .iter()
        .map(|d| home.join(d))
        .find(|d| Path::new(d).join("libjvm.so").exists())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=JAVA_HOME");
    if std::env::var_os("CARGO_FEATURE_HDFS").is_none() {
        return;
    }
    let Some(dir) = from_hdfs_sys().or_else(from_java_home) else {
        panic!("the hdfs feature needs a JDK: no libjvm.so found; set JAVA_HOME to a JDK 8 or later");
    };
    let dir = dir.canonicalize().unwrap_or(dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
}
