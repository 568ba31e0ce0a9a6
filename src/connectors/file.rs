//! Replay from NDJSON files. Each line is one raw record: either a bare FMS payload, or the
//! replay format `<ingest_ms> <payload>` (an integer ingest time, one space, the payload
//! exactly as received), which `fmsflow gen` writes and which keeps the time rules exact.
//! Bare lines carry no ingest time, so the future/stale rules do not apply to them.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
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

/// Bytes per block when workers share a file.
pub const BLOCK: u64 = 1 << 20;

/// Reads the lines of one file that belong to this worker. The file is cut into blocks of
/// `block` bytes dealt round-robin to the workers, and a line belongs to the block it starts
/// in: no two workers read the same bytes, yet all of them move through the file (and so
/// through event time) together. A record's offset is the byte offset of its line, unique
/// and stable for the file.
pub struct FileReader {
    reader: BufReader<File>,
    path: String,
    source: u32,
    len: u64,
    block: u64,
    peers: u64,
    /// Byte offset of the next line.
    at: u64,
    /// Lines starting at or after this offset belong to the next worker.
    end: u64,
    /// Block being read.
    current: u64,
    buf: Vec<u8>,
}

impl FileReader {
    /// Opens worker `index`'s share of `path` as source `source`.
    pub fn open(path: &Path, source: u32, index: usize, peers: usize, block: u64) -> Result<Self, FileSourceError> {
        let err = |e| FileSourceError::Read {
            path: path.display().to_string(),
            source: e,
        };
        let f = File::open(path).map_err(err)?;
        let len = f.metadata().map_err(err)?.len();
        let mut r = FileReader {
            reader: BufReader::with_capacity(1 << 20, f),
            path: path.display().to_string(),
            source,
            len,
            block: block.max(1),
            peers: peers.max(1) as u64,
            at: 0,
            end: 0,
            current: index as u64,
            buf: Vec::with_capacity(512),
        };
        r.enter_block()?;
        Ok(r)
    }

    /// Positions the reader at the first line that starts in block `current`.
    fn enter_block(&mut self) -> Result<(), FileSourceError> {
        let err = |e| FileSourceError::Read {
            path: self.path.clone(),
            source: e,
        };
        let start = (self.current * self.block).min(self.len);
        self.end = ((self.current + 1) * self.block).min(self.len);
        self.at = start;
        if start > 0 && start < self.len {
            // The line that starts at `start` is this block's only if a newline ends just before it.
            self.reader.seek(SeekFrom::Start(start - 1)).map_err(err)?;
            let mut skipped = Vec::new();
            self.at = start - 1 + self.reader.read_until(b'\n', &mut skipped).map_err(err)? as u64;
        } else {
            self.reader.seek(SeekFrom::Start(start)).map_err(err)?;
        }
        Ok(())
    }

    /// Appends up to `max` records to `out`; returns false at the end of this worker's share.
    pub fn read_chunk(&mut self, max: usize, out: &mut Vec<RawRecord>) -> Result<bool, FileSourceError> {
        let mut taken = 0;
        while taken < max {
            if self.at >= self.end {
                self.current += self.peers;
                if self.current * self.block >= self.len {
                    return Ok(false);
                }
                self.enter_block()?;
                continue;
            }
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
            let offset = self.at;
            self.at += n as u64;
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
                    offset,
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
        let text = "1 a\n2 bb\n\n3 c\r\n4 dddd\n5 e";
        std::fs::write(&p, text).unwrap();
        let want: Vec<(u64, Option<i64>, Vec<u8>)> = vec![
            (0, Some(1), b"a".to_vec()),
            (4, Some(2), b"bb".to_vec()),
            (10, Some(3), b"c".to_vec()),
            (15, Some(4), b"dddd".to_vec()),
            (22, Some(5), b"e".to_vec()),
        ];
        // Every split gives every line exactly once, whatever the block and chunk sizes.
        for block in [1, 2, 3, 5, 8, 1 << 20] {
            for peers in 1..=7 {
                let mut all = Vec::new();
                for i in 0..peers {
                    let mut r = FileReader::open(&p, 7, i, peers, block).unwrap();
                    while r.read_chunk(2, &mut all).unwrap() {}
                }
                let mut got: Vec<_> = all
                    .iter()
                    .map(|r| (r.pos.offset, r.ingest_ms, r.payload.clone()))
                    .collect();
                got.sort();
                assert_eq!(got, want, "{peers} workers, block {block}");
                assert!(all.iter().all(|r| r.pos.source == 7));
            }
        }
    }
}
