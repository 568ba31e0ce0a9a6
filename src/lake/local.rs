//! The local-directory backend: write to a hidden temporary file beside the target, fsync,
//! rename over the target, fsync the directory (so the rename itself survives a crash of
//! the machine, not only of the process; a directory made for the file is synced into its
//! parent the same way).

use std::io::Write;
use std::path::PathBuf;

use super::{process_runs, temp_file_owner, LakeError, Storage};

static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A lake in a local directory.
pub struct LocalStorage {
    root: PathBuf,
    fsync: bool,
}

impl LocalStorage {
    /// A lake rooted at `root` (created on first write).
    pub fn new(root: PathBuf, fsync: bool) -> Self {
        LocalStorage { root, fsync }
    }
}

/// Flushes a directory's entries (a rename or a new name in it) to the disk.
fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Storage for LocalStorage {
    fn put_atomic(&self, key: &str, bytes: &[u8]) -> Result<(), LakeError> {
        let path = self.root.join(key);
        let io = |op, source| LakeError::Io {
            op,
            path: path.display().to_string(),
            source,
        };
        let dir = path.parent().unwrap_or(&self.root);
        // The directories this write makes: each must be synced into its parent.
        let made: Vec<&std::path::Path> = if self.fsync {
            dir.ancestors().take_while(|d| !d.exists()).collect()
        } else {
            Vec::new()
        };
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
        for d in made.iter().rev() {
            sync_dir(d.parent().unwrap_or(d)).map_err(|e| io("syncing the parent directory of", e))?;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("part");
        // Unique per process and write, so concurrent writers never share a temporary file.
        let n = TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}-{n}.tmp", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating a temporary file for", e))?;
        let written = f
            .write_all(bytes)
            .map_err(|e| io("writing", e))
            .and_then(|()| match self.fsync {
                true => f.sync_all().map_err(|e| io("syncing", e)),
                false => Ok(()),
            });
        drop(f);
        // A failed write (a full disk) takes its partial file with it: the retry must not find
        // the space it needs taken by the attempts before it.
        let placed = written.and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| io("renaming into place", e)));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if self.fsync {
            sync_dir(dir).map_err(|e| io("syncing the directory of", e))?;
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, LakeError> {
        let path = self.root.join(key);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LakeError::Io {
                op: "reading",
                path: path.display().to_string(),
                source,
            }),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, LakeError> {
        let mut out = Vec::new();
        let mut stack = vec![prefix.trim_end_matches('/').to_string()];
        while let Some(dir) = stack.pop() {
            let path = self.root.join(&dir);
            let entries = match std::fs::read_dir(&path) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(LakeError::Io {
                        op: "listing",
                        path: path.display().to_string(),
                        source,
                    })
                }
            };
            for entry in entries {
                let entry = entry.map_err(|source| LakeError::Io {
                    op: "listing",
                    path: path.display().to_string(),
                    source,
                })?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // Hidden names are temporary files of writes in progress.
                if name.starts_with('.') {
                    continue;
                }
                let key = format!("{dir}/{name}");
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(key);
                } else {
                    out.push(key);
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), LakeError> {
        let path = self.root.join(key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LakeError::Io {
                op: "deleting",
                path: path.display().to_string(),
                source,
            }),
        }
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }

    /// Temporary files (`.NAME.PID-N.tmp`) of processes no longer running: a write killed
    /// between creating its temporary file and renaming it into place.
    fn sweep_abandoned(&self) -> Result<usize, LakeError> {
        let mut swept = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path);
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if temp_file_owner(&name).is_some_and(|(pid, _)| !process_runs(pid)) {
                    match std::fs::remove_file(&path) {
                        Ok(()) => swept += 1,
                        // Another process of the cluster, sweeping too, got there first.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(source) => {
                            return Err(LakeError::Io {
                                op: "deleting an abandoned temporary file",
                                path: path.display().to_string(),
                                source,
                            })
                        }
                    }
                }
            }
        }
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoned_temporary_files_are_swept_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path().to_path_buf(), false);
        s.put_atomic("readings/dt=2025-07-07/hour=00/part-00000-w000.parquet", b"x")
            .unwrap();
        let hour = dir.path().join("readings/dt=2025-07-07/hour=00");
        // A dead process: pid_max on Linux is at most 2^22, so this id runs nowhere.
        let dead = hour.join(".part-00001-w000.parquet.4294967294-7.tmp");
        let live = hour.join(format!(".part-00002-w000.parquet.{}-8.tmp", std::process::id()));
        let other = hour.join(".notes.tmp");
        for f in [&dead, &live, &other] {
            std::fs::write(f, b"partial").unwrap();
        }
        assert_eq!(s.sweep_abandoned().unwrap(), 1);
        assert!(!dead.exists() && live.exists() && other.exists());
        assert_eq!(
            s.list("readings").unwrap(),
            vec!["readings/dt=2025-07-07/hour=00/part-00000-w000.parquet"]
        );
        assert_eq!(temp_file_owner(".checkpoint.json.1234-5.tmp"), Some((1234, None)));
        assert_eq!(
            temp_file_owner(".part-00000-w000.parquet.77-0@node-1.example.com.tmp"),
            Some((77, Some("node-1.example.com")))
        );
        assert_eq!(temp_file_owner("part-00000.parquet"), None);
    }
}
