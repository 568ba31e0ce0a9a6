//! The lake on HDFS (`hdfs://host:port/path`), through `hdrs` (libhdfs in a JVM inside the
//! process), built only with the cargo feature `hdfs`.
//!
//! At run time the JVM needs the Hadoop client jars on `CLASSPATH` (`scripts/hdfs start`
//! writes one; docs/LAKE.md says how to build it from a Hadoop install); `libjvm.so` is found
//! through the RUNPATH `build.rs` gives the binary.
//!
//! HDFS cannot rename over an existing file, so replacing a file (an hour's `hourly` and
//! `quality`) deletes the old one just before the rename: for that moment the file is
//! missing, never half written. New files (every `readings` and `rejects` part) appear by a
//! single rename.

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hdrs::{Client, ClientBuilder};

use super::{LakeError, Storage};

/// How long one NameNode call may hang before it fails (Hadoop's default is 120 s), so a
/// stuck NameNode shows up as retried errors instead of a silent stall.
const RPC_TIMEOUT_MS: &str = "10000";

/// First pause (doubling after) before the client asks the NameNode again whether a closed
/// file is complete; the NameNode usually learns of the last block a few milliseconds after
/// the close. Hadoop's 400 ms made every file cost 190 ms on a local HDFS (lake writes of
/// 48 hours: 47,729 rows/s, against 208,411 with 20 ms; docs/BENCHMARKS.md).
const COMPLETE_RETRY_MS: &str = "10";

/// Makes the JVM that libhdfs starts leave SIGINT, SIGTERM and SIGHUP to fmsflow (`-Xrs` in
/// `LIBHDFS_OPTS`). Without it the JVM takes them: on a stop it runs its shutdown hooks,
/// which close every HDFS client while the run is still writing its last epochs, and the
/// drain fails with `Filesystem closed`. Call before any thread starts (it sets a variable of
/// the process's environment).
pub fn jvm_leaves_signals_alone() {
    let opts = std::env::var("LIBHDFS_OPTS").unwrap_or_default();
    if !opts.split_whitespace().any(|o| o == "-Xrs") {
        std::env::set_var("LIBHDFS_OPTS", format!("{opts} -Xrs").trim());
    }
}

pub struct HdfsStorage {
    client: Client,
    /// `hdfs://host:port`
    namenode: String,
    /// The lake's folder on HDFS, absolute, without a trailing `/`.
    base: String,
    next_tmp: AtomicU64,
    /// This machine's name, in temporary file names.
    host: String,
}

fn io_err(op: &'static str, path: &str, source: std::io::Error) -> LakeError {
    LakeError::Io {
        op,
        path: path.to_string(),
        source,
    }
}

impl HdfsStorage {
    /// Connects to the NameNode of `hdfs://host:port/path` and checks that it answers and
    /// that the lake's folder can be made.
    pub fn open(url: &str) -> Result<HdfsStorage, LakeError> {
        let bad = |problem: String| LakeError::Url {
            url: url.to_string(),
            problem,
        };
        let rest = url
            .strip_prefix("hdfs://")
            .ok_or_else(|| bad("is not an hdfs:// URL".into()))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() {
            return Err(bad("names no NameNode; use hdfs://host:port/path".into()));
        }
        if std::env::var_os("CLASSPATH").is_none_or(|c| c.is_empty()) {
            return Err(bad(
                "CLASSPATH is not set: the HDFS client runs in a JVM that needs the Hadoop client jars on \
                 CLASSPATH (`scripts/hdfs start` writes one to its env file; with a Hadoop install, \
                 CLASSPATH=$(hadoop classpath --glob); see docs/LAKE.md)"
                    .into(),
            ));
        }
        let namenode = format!("hdfs://{authority}");
        let client = ClientBuilder::new(&namenode)
            .with_config("ipc.client.rpc-timeout.ms", RPC_TIMEOUT_MS)
            .with_config("ipc.client.connect.max.retries", "3")
            .with_config(
                "dfs.client.block.write.locateFollowingBlock.initial.delay.ms",
                COMPLETE_RETRY_MS,
            )
            .connect()
            .map_err(|e| bad(format!("connecting the HDFS client failed: {e}")))?;
        let base = format!("/{}", path.trim_matches('/'));
        let s = HdfsStorage {
            client,
            namenode,
            base,
            next_tmp: AtomicU64::new(0),
            host: super::host_name(),
        };
        // The client connects lazily: make the folder now, so an unreachable NameNode or a
        // refused path fails at start with its address.
        s.client.create_dir(&s.base).map_err(|e| {
            bad(format!(
                "cannot make the lake folder {} on the NameNode {} ({e}); is HDFS running and is the folder \
                 writable?",
                s.base, s.namenode
            ))
        })?;
        Ok(s)
    }

    fn path(&self, key: &str) -> String {
        format!("{}/{}", self.base.trim_end_matches('/'), key.trim_start_matches('/'))
    }

    fn exists(&self, path: &str) -> Result<bool, LakeError> {
        match self.client.metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("looking up", path, e)),
        }
    }
}

/// Where [`Storage::put_atomic`] moves the old version of a file it replaces, until the new
/// one is in place: `.NAME.replaced` beside it (hidden, so never listed; not a temporary
/// file, so never swept).
fn replaced_path(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/.{name}.replaced"),
        None => format!(".{path}.replaced"),
    }
}

/// A temporary file of another host's process is abandoned once untouched this long.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

impl HdfsStorage {
    /// Calls `f(path, name, modified)` for every file under the folder `prefix` (relative
    /// to the lake's root; "" for all of it), hidden ones included.
    fn walk(
        &self,
        prefix: &str,
        mut f: impl FnMut(&str, &str, std::time::SystemTime) -> Result<(), LakeError>,
    ) -> Result<(), LakeError> {
        let root = self.path(prefix.trim_end_matches('/'));
        let root = match root.trim_end_matches('/') {
            "" => "/".to_string(),
            r => r.to_string(),
        };
        if !self.exists(&root)? {
            return Ok(());
        }
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            let entries = self.client.read_dir(&dir).map_err(|e| io_err("listing", &dir, e))?;
            for m in entries.into_inner() {
                // hdrs gives paths without the hdfs://host:port part.
                let path = m.path().to_string();
                let path = path.strip_prefix(&self.namenode).unwrap_or(&path).to_string();
                if m.is_dir() {
                    stack.push(path);
                } else {
                    f(&path, path.rsplit('/').next().unwrap_or(""), m.modified())?;
                }
            }
        }
        Ok(())
    }
}

impl Storage for HdfsStorage {
    fn put_atomic(&self, key: &str, bytes: &[u8]) -> Result<(), LakeError> {
        let path = self.path(key);
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", &path));
        let dir = if dir.is_empty() { "/" } else { dir };
        self.client
            .create_dir(dir)
            .map_err(|e| io_err("making the folder", dir, e))?;
        // Named by process and host: processes of a cluster share the folder.
        let tmp = format!(
            "{}/.{name}.{}-{}@{}.tmp",
            dir.trim_end_matches('/'),
            std::process::id(),
            self.next_tmp.fetch_add(1, Relaxed),
            self.host
        );
        let written = (|| {
            let mut f = self
                .client
                .open_file()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.flush()?;
            f.try_close()
        })();
        if let Err(e) = written {
            let _ = self.client.remove_file(&tmp);
            return Err(io_err("writing", &tmp, e));
        }
        if self.client.rename_file(&tmp, &path).is_ok() {
            return Ok(());
        }
        // The rename fails when the target exists (HDFS renames never replace): move it
        // aside, rename again, then delete it. A reader that finds no target meanwhile (or
        // after a crash in between) reads the one moved aside: the old version, whole.
        let result = match self.exists(&path) {
            Ok(true) => {
                let aside = replaced_path(&path);
                let _ = self.client.remove_file(&aside);
                self.client
                    .rename_file(&path, &aside)
                    .and_then(|()| self.client.rename_file(&tmp, &path))
                    .map(|()| {
                        let _ = self.client.remove_file(&aside);
                    })
                    .map_err(|e| io_err("replacing", &path, e))
            }
            Ok(false) => self
                .client
                .rename_file(&tmp, &path)
                .map_err(|e| io_err("renaming into place", &path, e)),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = self.client.remove_file(&tmp);
        }
        result
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, LakeError> {
        let mut path = self.path(key);
        // Looked up first: opening a missing file makes libhdfs print a Java stack trace.
        if !self.exists(&path)? {
            // Mid-replacement (or killed there): the old version, moved aside.
            path = replaced_path(&path);
            if !self.exists(&path)? {
                return Ok(None);
            }
        }
        let mut f = self
            .client
            .open_file()
            .read(true)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        let mut out = Vec::new();
        f.read_to_end(&mut out).map_err(|e| io_err("reading", &path, e))?;
        Ok(Some(out))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, LakeError> {
        let base = format!("{}/", self.base.trim_end_matches('/'));
        let mut out = Vec::new();
        self.walk(prefix, |path, name, _| {
            // Hidden names are temporary files of writes in progress.
            if !name.starts_with('.') {
                out.extend(path.strip_prefix(&base).map(str::to_string));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Temporary files (`.NAME.PID-N@HOST.tmp`) of writes killed before their rename: those
    /// of this host's processes no longer running, and those of any host untouched for
    /// [`ABANDONED_AFTER`] (a process on another host cannot be looked up; no write of one
    /// file takes that long).
    fn sweep_abandoned(&self) -> Result<usize, LakeError> {
        let mut abandoned = Vec::new();
        let now = std::time::SystemTime::now();
        self.walk("", |path, name, modified| {
            let Some((pid, host)) = super::temp_file_owner(name) else {
                return Ok(());
            };
            let dead = host == Some(self.host.as_str()) && !super::process_runs(pid);
            let stale = now.duration_since(modified).is_ok_and(|age| age > ABANDONED_AFTER);
            if dead || stale {
                abandoned.push(path.to_string());
            }
            Ok(())
        })?;
        let mut swept = 0;
        for path in &abandoned {
            match self.client.remove_file(path) {
                Ok(()) => swept += 1,
                // Another process of the cluster, sweeping too, may have got there first.
                Err(e) => match self.exists(path) {
                    Ok(false) => {}
                    _ => return Err(io_err("deleting an abandoned temporary file", path, e)),
                },
            }
        }
        Ok(swept)
    }

    fn delete(&self, key: &str) -> Result<(), LakeError> {
        let path = self.path(key);
        match self.client.remove_file(&path) {
            Ok(()) => Ok(()),
            // A missing file fails with a bare I/O error: look it up to tell.
            Err(e) => match self.exists(&path) {
                Ok(false) => Ok(()),
                _ => Err(io_err("deleting", &path, e)),
            },
        }
    }

    fn backend(&self) -> &'static str {
        "hdfs"
    }
    fn describe(&self) -> String {
        format!("HDFS folder {} on {}", self.base, self.namenode)
    }
}
