//! Replay from NDJSON files. Each line is one raw record: either a bare FMS payload, or the
//! replay format `<ingest_ms> <payload>` (an integer ingest time, one space, the payload
//! exactly as received), which `fmsflow gen` writes and which keeps the time rules exact.
//! Bare lines carry no ingest time, so the future/stale rules do not apply to them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use fmsflow_dataflows::{Bytes, RawRecord, SourcePos};

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
    // At most 18 digits, then a space: always an i64 (10¹⁸ − 1 < 2⁶³). A 19th digit (it may
    // wrap) only rules the prefix out.
    let mut ingest: i64 = 0;
    for (i, &b) in line.iter().enumerate().take(19) {
        match b {
            b'0'..=b'9' => ingest = ingest.wrapping_mul(10).wrapping_add((b - b'0') as i64),
            b' ' if i > 0 => return (Some(ingest), &line[i + 1..]),
            _ => break,
        }
    }
    (None, line)
}

/// The index of the first newline in `hay`.
#[inline]
fn find_newline(hay: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8};
        // SSE2 is part of x86_64: 16 bytes per comparison (std's `memchr` reads a word at a
        // time, and was the largest cost of reading a line).
        let mut i = 0;
        while i + 16 <= hay.len() {
            // SAFETY: `i + 16 <= hay.len()`, so the unaligned 16-byte load stays in `hay`;
            // SSE2 is always available on x86_64.
            let mask = unsafe {
                let v = _mm_loadu_si128(hay.as_ptr().add(i) as *const __m128i);
                _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\n' as i8)))
            };
            if mask != 0 {
                return Some(i + mask.trailing_zeros() as usize);
            }
            i += 16;
        }
        hay[i..].iter().position(|&b| b == b'\n').map(|p| i + p)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        hay.iter().position(|&b| b == b'\n')
    }
}

/// Bytes per block when workers share a file.
pub const BLOCK: u64 = 8 << 20;

/// Reads the lines of one file that belong to this worker. The file is cut into blocks of
/// `block` bytes dealt round-robin to the workers, and a line belongs to the block it starts
/// in: no two workers read the same bytes, yet all of them move through the file (and so
/// through event time) together. A record's offset is the byte offset of its line, unique
/// and stable for the file.
pub struct FileReader {
    file: File,
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
    /// File bytes read ahead: `buf[lo..hi]` are the bytes from offset `at` on. The records'
    /// payloads are slices of it (no allocation or copy per record), so a refill reads into
    /// a new buffer; each lives until the last payload in it is dropped (its epoch is done).
    buf: Bytes,
    lo: usize,
    hi: usize,
    /// The file has no bytes beyond `buf[..hi]`.
    eof: bool,
}

/// Bytes read from a file at a time.
const READ_SIZE: usize = 1 << 20;

impl FileReader {
    /// Opens worker `index`'s share of `path` as source `source`.
    pub fn open(path: &Path, source: u32, index: usize, peers: usize, block: u64) -> Result<Self, FileSourceError> {
        let err = |e| FileSourceError::Read {
            path: path.display().to_string(),
            source: e,
        };
        let file = File::open(path).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let mut r = FileReader {
            file,
            path: path.display().to_string(),
            source,
            len,
            block: block.max(1),
            peers: peers.max(1) as u64,
            at: 0,
            end: 0,
            current: index as u64,
            buf: Bytes::new(),
            lo: 0,
            hi: 0,
            eof: false,
        };
        r.enter_block()?;
        Ok(r)
    }

    fn error(&self, e: std::io::Error) -> FileSourceError {
        FileSourceError::Read {
            path: self.path.clone(),
            source: e,
        }
    }

    /// Reads more into a new buffer, after the unread bytes (moved to its front; it is
    /// twice their size when they alone fill a read's worth, a very long line); sets `eof`
    /// when the file has no more.
    fn fill(&mut self) -> Result<(), FileSourceError> {
        let unread = self.hi - self.lo;
        let size = READ_SIZE.max(2 * unread);
        let mut next = Vec::with_capacity(size);
        next.extend_from_slice(&self.buf[self.lo..self.hi]);
        next.resize(size, 0);
        let n = loop {
            match self.file.read(&mut next[unread..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.error(e)),
            }
        };
        next.truncate(unread + n);
        self.eof = n == 0;
        self.buf = Bytes::from(next);
        (self.lo, self.hi) = (0, unread + n);
        Ok(())
    }

    /// Where in `buf` the next line (with its newline, if it has one) from offset `at` is,
    /// and moves past it; `None` at the end of the file.
    fn next_line(&mut self) -> Result<Option<std::ops::Range<usize>>, FileSourceError> {
        let mut searched = 0;
        loop {
            if let Some(p) = find_newline(&self.buf[self.lo + searched..self.hi]) {
                let (start, stop) = (self.lo, self.lo + searched + p + 1);
                self.lo = stop;
                self.at += (stop - start) as u64;
                return Ok(Some(start..stop));
            }
            if self.eof {
                if self.lo == self.hi {
                    return Ok(None);
                }
                let start = self.lo;
                self.at += (self.hi - start) as u64;
                self.lo = self.hi;
                return Ok(Some(start..self.hi));
            }
            searched = self.hi - self.lo;
            self.fill()?;
        }
    }

    /// Positions the reader at the first line that starts in block `current`.
    fn enter_block(&mut self) -> Result<(), FileSourceError> {
        let start = (self.current * self.block).min(self.len);
        self.end = ((self.current + 1) * self.block).min(self.len);
        // The line that starts at `start` is this block's only if a newline ends just before it.
        let from = start.saturating_sub(1);
        if let Err(e) = self.file.seek(SeekFrom::Start(from)) {
            return Err(self.error(e));
        }
        (self.lo, self.hi, self.eof, self.at) = (0, 0, false, from);
        if start > 0 && start < self.len {
            self.next_line()?;
        } else {
            self.at = start;
            if start == 0 {
                return Ok(());
            }
            // At the end of the file: nothing to read here.
            self.lo = 0;
            self.hi = 0;
            self.eof = true;
        }
        Ok(())
    }

    /// The block being read.
    pub fn current_block(&self) -> u64 {
        self.current
    }

    /// Whether this worker's share is read.
    pub fn done(&self) -> bool {
        self.current * self.block >= self.len
    }

    /// Moves to this worker's next block.
    pub fn next_block(&mut self) -> Result<(), FileSourceError> {
        self.current += self.peers;
        if self.done() {
            return Ok(());
        }
        self.enter_block()
    }

    /// Appends up to `max` records of the current block to `out`; returns whether the block
    /// may hold more.
    pub fn read_in_block(&mut self, max: usize, out: &mut Vec<RawRecord>) -> Result<bool, FileSourceError> {
        let mut taken = 0;
        while taken < max {
            if self.at >= self.end {
                return Ok(false);
            }
            let offset = self.at;
            let (source, end) = (self.source, self.end);
            let Some(line) = self.next_line()? else {
                self.at = end;
                return Ok(false);
            };
            let mut l = &self.buf[line.clone()];
            while let [rest @ .., b'\n' | b'\r'] = l {
                l = rest;
            }
            if l.is_empty() {
                continue;
            }
            let (ingest_ms, payload) = split_line(l);
            let from = line.start + (l.len() - payload.len());
            out.push(RawRecord {
                payload: self.buf.slice(from..line.start + l.len()),
                ingest_ms,
                pos: SourcePos { source, offset },
            });
            taken += 1;
        }
        Ok(self.at < self.end)
    }
}

/// Epoch numbers per block: chunk `c` of block `k` is epoch `k * CHUNKS_PER_BLOCK + c`. More
/// than a block can have: a record is at least one byte and a newline, so an 8 MiB block
/// holds at most 4 Mi records, and chunks of one record each still get epochs of their own
/// (many small epochs are what a test of many commits asks for).
pub const CHUNKS_PER_BLOCK: u64 = 1 << 23;

/// One worker's share of a replay, in epochs cut at fixed places in the files: chunk `c` (of
/// `batch` records) of block `k` of every file is epoch `k * CHUNKS_PER_BLOCK + c`, however
/// many workers and processes share the files. So a record's epoch depends only on where it
/// is, and everything that depends on epochs (which of two duplicates is first: the one of
/// the earlier epoch, then the earlier position) comes out the same for every layout: a
/// replay on 3 processes of 2 workers writes the lake that 1 worker writes.
///
/// With at least as many files as workers, whole files are dealt round-robin; otherwise
/// every worker reads its blocks of every file ([`FileReader`]). A worker with several files
/// goes through them together, block by block.
pub struct Replay {
    readers: Vec<FileReader>,
    batch: usize,
    /// (block, chunk) being read; `None`: between blocks.
    at: Option<(u64, u64)>,
}

impl Replay {
    /// Worker `index` of `peers`'s share of `files` (source ids are their places in
    /// `files`), in chunks of `batch` records and blocks of `block` bytes.
    pub fn open(
        files: &[PathBuf],
        index: usize,
        peers: usize,
        batch: usize,
        block: u64,
    ) -> Result<Replay, FileSourceError> {
        let peers = peers.max(1);
        let whole = files.len() >= peers;
        let (sub_index, sub_peers) = if whole { (0, 1) } else { (index, peers) };
        let readers = files
            .iter()
            .enumerate()
            .filter(|(i, _)| !whole || i % peers == index)
            .map(|(i, p)| FileReader::open(p, i as u32, sub_index, sub_peers, block))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Replay {
            readers,
            batch: batch.max(1),
            at: None,
        })
    }

    /// Appends the next chunk (up to `batch` records of each file at the current block) to
    /// `out` and returns its epoch; `None` once the share is read.
    pub fn next(&mut self, out: &mut Vec<RawRecord>) -> Result<Option<u64>, FileSourceError> {
        loop {
            let (block, chunk) = match self.at {
                Some(at) => at,
                None => match self
                    .readers
                    .iter()
                    .filter(|r| !r.done())
                    .map(FileReader::current_block)
                    .min()
                {
                    Some(k) => (k, 0),
                    None => return Ok(None),
                },
            };
            let before = out.len();
            // Once, not by doubling: the engine's buffer comes back empty from each send.
            out.reserve(self.batch.min(1 << 16));
            let mut more = false;
            for r in self
                .readers
                .iter_mut()
                .filter(|r| !r.done() && r.current_block() == block)
            {
                more |= r.read_in_block(self.batch, out)?;
            }
            if more {
                self.at = Some((block, chunk + 1));
            } else {
                for r in self
                    .readers
                    .iter_mut()
                    .filter(|r| !r.done() && r.current_block() == block)
                {
                    r.next_block()?;
                }
                self.at = None;
            }
            if out.len() > before {
                return Ok(Some(block * CHUNKS_PER_BLOCK + chunk.min(CHUNKS_PER_BLOCK - 1)));
            }
        }
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
        assert_eq!(split_line(b" 1"), (None, &b" 1"[..]));
        assert_eq!(
            split_line(b"999999999999999999 x"),
            (Some(999_999_999_999_999_999), &b"x"[..])
        );
        assert_eq!(
            split_line(b"9999999999999999999 x"),
            (None, &b"9999999999999999999 x"[..])
        );
        assert_eq!(split_line(b"12"), (None, &b"12"[..]));
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
                let got = read_split(&p, 7, peers, block, 2);
                assert_eq!(got, want, "{peers} workers, block {block}");
            }
        }
    }

    /// Reads `p` as source `source` split among `peers` workers in blocks of `block` bytes,
    /// `chunk` records at a time: every record's (offset, ingest time, payload), sorted.
    /// Checks that every record carries `source`.
    fn read_split(p: &Path, source: u32, peers: usize, block: u64, chunk: usize) -> Vec<(u64, Option<i64>, Vec<u8>)> {
        let mut all = Vec::new();
        for i in 0..peers {
            let mut r = FileReader::open(p, source, i, peers, block).unwrap();
            while !r.done() {
                while r.read_in_block(chunk, &mut all).unwrap() {}
                r.next_block().unwrap();
            }
        }
        assert!(all.iter().all(|r| r.pos.source == source));
        let mut got: Vec<_> = all
            .iter()
            .map(|r| (r.pos.offset, r.ingest_ms, r.payload.to_vec()))
            .collect();
        got.sort();
        got
    }

    #[test]
    fn reads_lines_longer_than_a_read_and_across_reads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("long.ndjson");
        // Lines that end just before, at and after each 1 MiB read, and one of 3 MiB.
        let lens = [READ_SIZE - 9, 1, 15, 16, 17, 3 * READ_SIZE, 5, READ_SIZE + 3, 0, 2];
        let mut text = Vec::new();
        let mut want = Vec::new();
        for (i, n) in lens.iter().enumerate() {
            let payload = vec![b'a' + i as u8; *n];
            if !payload.is_empty() {
                want.push((text.len() as u64, Some(i as i64 + 1), payload.clone()));
            }
            if *n > 0 {
                text.extend_from_slice(format!("{} ", i + 1).as_bytes());
                text.extend_from_slice(&payload);
            }
            text.push(b'\n');
        }
        text.extend_from_slice(b"99 last");
        want.push((text.len() as u64 - 7, Some(99), b"last".to_vec()));
        std::fs::write(&p, &text).unwrap();
        for (peers, block) in [(1, BLOCK), (2, 1 << 20), (3, 12345)] {
            let got = read_split(&p, 0, peers, block, 3);
            assert!(got == want, "{peers} workers, block {block}");
        }
    }

    /// Every record of `files` with its epoch, as `peers` workers read them.
    fn replayed(files: &[PathBuf], peers: usize, batch: usize, block: u64) -> Vec<(u64, u32, u64)> {
        let mut all = Vec::new();
        for i in 0..peers {
            let mut r = Replay::open(files, i, peers, batch, block).unwrap();
            let mut last = None;
            let mut buf = Vec::new();
            while let Some(e) = r.next(&mut buf).unwrap() {
                assert!(last.is_none_or(|l| e >= l), "worker {i}: epoch {e} after {last:?}");
                last = Some(e);
                all.extend(buf.drain(..).map(|rec| (e, rec.pos.source, rec.pos.offset)));
            }
        }
        all.sort();
        all
    }

    #[test]
    fn a_records_epoch_is_the_same_for_every_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for f in 0..3 {
            let p = dir.path().join(format!("{f}.ndjson"));
            let text: String = (0..40 + 17 * f).map(|i| format!("{i} line {f}/{i}\n")).collect();
            std::fs::write(&p, text).unwrap();
            files.push(p);
        }
        for (block, batch) in [(64u64, 3usize), (100, 1), (1 << 20, 7)] {
            for n in 1..=3 {
                let one = replayed(&files[..n], 1, batch, block);
                assert_eq!(one.len(), (0..n).map(|f| 40 + 17 * f).sum::<usize>());
                for peers in 2..=6 {
                    assert_eq!(
                        replayed(&files[..n], peers, batch, block),
                        one,
                        "{n} files, {peers} workers, block {block}, batch {batch}"
                    );
                }
            }
        }
    }
}
