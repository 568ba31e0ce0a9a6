//! Replay from NDJSON files. Each line is one raw record: either a bare FMS payload, or the
//! replay format `<ingest_ms> <payload>` (an integer ingest time, one space, the payload
//! exactly as received), which `fmsflow gen` writes and which keeps the time rules exact.
//! Bare lines carry no ingest time, so the future/stale rules do not apply to them.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use fmsflow_dataflows::{RawRecord, SourcePos};

/// Errors of the file source. Not retryable: the path or the file is wrong.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    /// The glob is malformed.
    #[error("bad file pattern `{pattern}`: {message}")]
    Pattern { pattern: String, message: String },
    /// Nothing matched.
    #[error("no file matches `{0}`")]
    NoMatch(String),
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
}

/// Expands a path or glob into a sorted list of files (the order fixes source ids).
pub fn expand(pattern: &str) -> Result<Vec<PathBuf>, FileSourceError> {
    let mut files: Vec<PathBuf> = glob::glob(pattern)
        .map_err(|e| FileSourceError::Pattern {
            pattern: pattern.to_string(),
            message: e.to_string(),
        })?
        .filter_map(Result::ok)
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(FileSourceError::NoMatch(pattern.to_string()));
    }
    Ok(files)
}

/// Splits a line into (ingest time, payload).
pub fn split_line(line: &[u8]) -> (Option<i64>, &[u8]) {
    let digits = line.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits > 0 && digits <= 18 && line.get(digits) == Some(&b' ') {
        let ingest = std::str::from_utf8(&line[..digits]).ok().and_then(|s| s.parse().ok());
        if ingest.is_some() {
            return (ingest, &line[digits + 1..]);
        }
    }
    (None, line)
}

/// Reads the lines of one file that belong to this worker (`line % peers == index`, or all
/// of them when `peers == 1`), in chunks.
pub struct FileReader {
    reader: BufReader<File>,
    path: String,
    source: u32,
    line: u64,
    index: u64,
    peers: u64,
    buf: Vec<u8>,
}

impl FileReader {
    /// Opens `path` as source `source`.
    pub fn open(path: &Path, source: u32, index: usize, peers: usize) -> Result<Self, FileSourceError> {
        let f = File::open(path).map_err(|e| FileSourceError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
        Ok(FileReader {
            reader: BufReader::with_capacity(1 << 20, f),
            path: path.display().to_string(),
            source,
            line: 0,
            index: index as u64,
            peers: peers as u64,
            buf: Vec::with_capacity(512),
        })
    }

    /// Appends up to `max` records to `out`; returns false at the end of the file.
    pub fn read_chunk(&mut self, max: usize, out: &mut Vec<RawRecord>) -> Result<bool, FileSourceError> {
        let mut taken = 0;
        while taken < max {
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| FileSourceError::Read {
                    path: self.path.clone(),
                    source: e,
                })?;
            if n == 0 {
                return Ok(false);
            }
            let line = self.line;
            self.line += 1;
            if line % self.peers != self.index {
                continue;
            }
            let mut l = &self.buf[..];
            while let [rest @ .., b'\n' | b'\r'] = l {
                l = rest;
            }
            if l.is_empty() {
                continue;
            }
            let (ingest_ms, payload) = split_line(l);
            out.push(RawRecord {
                payload: payload.to_vec(),
                ingest_ms,
                pos: SourcePos {
                    source: self.source,
                    offset: line,
                },
            });
            taken += 1;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_ingest_prefix() {
        assert_eq!(
            split_line(b"1751876489000 {\"a\":1}"),
            (Some(1_751_876_489_000), &b"{\"a\":1}"[..])
        );
        assert_eq!(split_line(b"{\"a\":1}"), (None, &b"{\"a\":1}"[..]));
        assert_eq!(split_line(b"123abc"), (None, &b"123abc"[..]));
    }

    #[test]
    fn shards_lines_across_workers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.ndjson");
        std::fs::write(&p, "1 a\n2 b\n\n3 c\r\n4 d\n").unwrap();
        let mut all = Vec::new();
        for i in 0..2 {
            let mut r = FileReader::open(&p, 7, i, 2).unwrap();
            while r.read_chunk(1, &mut all).unwrap() {}
        }
        let mut got: Vec<_> = all
            .iter()
            .map(|r| (r.pos.offset, r.ingest_ms, r.payload.clone()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (0, Some(1), b"a".to_vec()),
                (1, Some(2), b"b".to_vec()),
                (3, Some(3), b"c".to_vec()),
                (4, Some(4), b"d".to_vec())
            ]
        );
        assert!(all.iter().all(|r| r.pos.source == 7));
    }
}
