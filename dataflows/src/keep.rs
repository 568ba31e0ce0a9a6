//! How the sealing stage holds an hour's readings until the hour is written: as [`Kept`]
//! rows in chunks of [`KEEP_CHUNK`], and in a live engine
//! ([`crate::dataflow::FlowConfig::pack_open_hours`]), once an hour has [`PACK_AFTER`]
//! chunks at a worker, each full chunk sorted and packed into about a quarter of the bytes
//! ([`Packed`]). When the hour is written its readings come out ordered by device, time,
//! source position ([`HourReadings`]): as columns made by a counting sort when nothing was
//! packed, else merged from the sorted runs a piece at a time as the lake encodes them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::model::{Reading, ReadingColumns, SourcePos};
use crate::varint::{get_varint, put_varint, unzigzag, zigzag};

/// Readings per chunk of an hour's kept readings (1.4 MB).
pub const KEEP_CHUNK: usize = 16_384;

/// Whole chunks an hour holds unpacked at a worker before its full chunks are packed:
/// 65,536 readings (5.8 MB), 2 minutes of 1,000 msg/s on two workers.
pub const PACK_AFTER: usize = 4;

/// A reading as the sealing stage keeps it until its hour is written: only what the lake's
/// `readings` table holds, in 88 bytes instead of a [`Reading`]'s 104 (no payload place,
/// no padding in the source position, the ingest time's presence a flag).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Kept {
    pub(crate) time_ms: i64,
    /// Meaningful when `flags` has [`Kept::INGEST`].
    pub(crate) ingest_ms: i64,
    pub(crate) offset: u64,
    pub(crate) metrics: [f64; 6],
    pub(crate) device: u32,
    pub(crate) source: u32,
    pub(crate) flags: u8,
}

/// The order of the lake's rows: device, time, source position.
type Key = (u32, i64, u32, u64);

impl Kept {
    const FAIL: u8 = 1;
    const INGEST: u8 = 2;
    /// A placeholder for the slots of [`sort_readings`] before they are filled.
    const EMPTY: Kept = Kept {
        time_ms: 0,
        ingest_ms: 0,
        offset: 0,
        metrics: [0.0; 6],
        device: 0,
        source: 0,
        flags: 0,
    };

    #[inline]
    fn of(r: &Reading) -> Kept {
        Kept {
            time_ms: r.time_ms,
            ingest_ms: r.ingest_ms.unwrap_or(0),
            offset: r.pos.offset,
            metrics: r.metrics,
            device: r.device,
            source: r.pos.source,
            flags: (r.is_fail as u8 * Kept::FAIL) | (r.ingest_ms.is_some() as u8 * Kept::INGEST),
        }
    }

    #[inline]
    fn key(&self) -> Key {
        (self.device, self.time_ms, self.source, self.offset)
    }

    /// Appends the reading as a row of `cols`.
    #[inline]
    fn push_to(&self, cols: &mut ReadingColumns) {
        cols.push_row(
            self.device,
            self.time_ms,
            self.metrics,
            self.flags & Kept::FAIL != 0,
            (self.flags & Kept::INGEST != 0).then_some(self.ingest_ms),
            SourcePos {
                source: self.source,
                offset: self.offset,
            },
        );
    }
}

/// An hour's readings at one worker, until the hour is written.
#[derive(Default)]
pub struct KeptReadings {
    /// Chunks of [`KEEP_CHUNK`] in arrival order, each filled before the next is made: a few
    /// readings at a time (a live epoch's) hold no more room than many (kept in the timely
    /// containers they came in, a live epoch's few readings held about 4 KB each).
    pub(crate) chunks: Vec<Vec<Kept>>,
    /// Full chunks packed, each a sorted run.
    packed: Vec<Packed>,
    /// Packing is off ([`crate::dataflow::FlowConfig::pack_open_hours`], measurements).
    unpacked: bool,
    /// Readings held.
    len: usize,
}

impl KeptReadings {
    /// Keeps every chunk unpacked, however many (a replay of files; the comparison of
    /// `examples/hourseal.rs`).
    pub fn never_pack(&mut self) {
        self.unpacked = true;
    }

    /// Keeps a batch of readings.
    pub fn keep(&mut self, batch: &[Reading]) {
        self.len += batch.len();
        let mut rest = batch;
        while !rest.is_empty() {
            let last = match self.chunks.last_mut() {
                Some(last) if last.len() < last.capacity() => last,
                _ => {
                    let fresh = self.pack_full().unwrap_or_else(|| Vec::with_capacity(KEEP_CHUNK));
                    self.chunks.push(fresh);
                    self.chunks.last_mut().expect("just pushed")
                }
            };
            let n = (last.capacity() - last.len()).min(rest.len());
            last.extend(rest[..n].iter().map(Kept::of));
            rest = &rest[n..];
        }
    }

    /// Called when the last chunk is full: once the hour has [`PACK_AFTER`] chunks, packs the
    /// unpacked ones (all full) and returns one of their emptied vectors for reuse.
    fn pack_full(&mut self) -> Option<Vec<Kept>> {
        if self.unpacked || self.chunks.len() + self.packed.len() < PACK_AFTER {
            return None;
        }
        let mut spare = None;
        for mut chunk in self.chunks.drain(..) {
            chunk.sort_unstable_by_key(Kept::key);
            self.packed.push(Packed::of(&chunk));
            chunk.clear();
            spare = Some(chunk);
        }
        spare
    }

    /// Whether no reading is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of readings held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Heap bytes held (the chunks' capacity and the packed bytes).
    pub fn held_bytes(&self) -> usize {
        let chunks: usize = self
            .chunks
            .iter()
            .map(|c| c.capacity() * std::mem::size_of::<Kept>())
            .sum();
        chunks + self.packed.iter().map(|p| p.bytes.capacity()).sum::<usize>()
    }

    /// Takes every reading held, ordered by device, time, source position: as columns when
    /// nothing was packed, else as the sorted runs, merged as they are read out.
    pub fn take(&mut self) -> HourReadings {
        self.len = 0;
        let chunks = std::mem::take(&mut self.chunks);
        if self.packed.is_empty() {
            return sort_readings(&chunks).into();
        }
        let mut runs: Vec<Run> = std::mem::take(&mut self.packed).into_iter().map(Run::Packed).collect();
        for mut chunk in chunks {
            chunk.sort_unstable_by_key(Kept::key);
            runs.push(Run::Plain(chunk));
        }
        HourReadings {
            columns: ReadingColumns::default(),
            runs,
        }
    }
}

/// An hour's readings at one worker as the sealing stage hands them to the lake, ordered by
/// device, time, source position: as columns, or (a live hour, packed while it was open) as
/// sorted runs merged as they are read out, so that the hour is never unpacked whole.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HourReadings {
    columns: ReadingColumns,
    runs: Vec<Run>,
}

impl From<ReadingColumns> for HourReadings {
    fn from(columns: ReadingColumns) -> Self {
        HourReadings {
            columns,
            runs: Vec::new(),
        }
    }
}

impl HourReadings {
    /// Readings held.
    pub fn len(&self) -> usize {
        self.columns.len() + self.runs.iter().map(Run::len).sum::<usize>()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every reading.
    pub fn clear(&mut self) {
        *self = HourReadings::default();
    }

    /// The readings in order as columns of at most `rows` rows each (columns held whole
    /// come out whole); a packed run's bytes are freed as soon as it is read.
    pub fn chunks(self, rows: usize) -> Chunks {
        let mut cursors: Vec<Cursor> = self
            .runs
            .into_iter()
            .map(|r| match r {
                Run::Packed(p) => Cursor::Packed(p.unpack()),
                Run::Plain(v) => Cursor::Plain(v.into_iter()),
            })
            .collect();
        let mut heads = vec![Kept::EMPTY; cursors.len()];
        let mut heap = BinaryHeap::with_capacity(cursors.len());
        for (i, c) in cursors.iter_mut().enumerate() {
            if let Some(r) = c.next() {
                heads[i] = r;
                heap.push(Reverse((r.key(), i)));
            }
        }
        Chunks {
            columns: Some(self.columns).filter(|c| !c.is_empty()),
            cursors,
            heads,
            heap,
            rows: rows.max(1),
        }
    }

    /// Every reading as one set of columns.
    pub fn into_columns(self) -> ReadingColumns {
        let mut all = ReadingColumns::default();
        for c in self.chunks(usize::MAX) {
            if all.is_empty() {
                all = c;
            } else {
                all.append(c);
            }
        }
        all
    }

    /// The readings' (device, time, source position), in order.
    pub fn keys(&self) -> std::vec::IntoIter<(u32, i64, SourcePos)> {
        self.clone().into_columns().keys().collect::<Vec<_>>().into_iter()
    }

    /// The devices with readings, in order.
    pub fn devices(&self) -> Vec<u32> {
        let mut devices: Vec<u32> = self.columns.device.clone();
        for r in &self.runs {
            match r {
                Run::Packed(p) => devices.extend(p.clone().unpack().map(|k| k.device)),
                Run::Plain(v) => devices.extend(v.iter().map(|k| k.device)),
            }
        }
        devices.sort_unstable();
        devices.dedup();
        devices
    }
}

/// The columns of [`HourReadings::chunks`].
pub struct Chunks {
    columns: Option<ReadingColumns>,
    cursors: Vec<Cursor>,
    /// Each cursor's next reading, in the heap by key while there is one.
    heads: Vec<Kept>,
    heap: BinaryHeap<Reverse<(Key, usize)>>,
    rows: usize,
}

impl Iterator for Chunks {
    type Item = ReadingColumns;

    fn next(&mut self) -> Option<ReadingColumns> {
        if let Some(c) = self.columns.take() {
            return Some(c);
        }
        if self.heap.is_empty() {
            return None;
        }
        let mut out = ReadingColumns::with_capacity(self.rows.min(self.heap.len() * KEEP_CHUNK));
        while out.len() < self.rows {
            let Some(Reverse((_, i))) = self.heap.pop() else { break };
            self.heads[i].push_to(&mut out);
            match self.cursors[i].next() {
                Some(r) => {
                    self.heads[i] = r;
                    self.heap.push(Reverse((r.key(), i)));
                }
                // Read: its bytes go now, not with the last run.
                None => self.cursors[i] = Cursor::Plain(Vec::new().into_iter()),
            }
        }
        Some(out)
    }
}

/// Where a run is read from.
enum Cursor {
    Packed(Unpack),
    Plain(std::vec::IntoIter<Kept>),
}

impl Cursor {
    #[inline]
    fn next(&mut self) -> Option<Kept> {
        match self {
            Cursor::Packed(u) => u.next(),
            Cursor::Plain(v) => v.next(),
        }
    }
}

/// Bits of a packed row's head byte (after [`Kept::FAIL`] and [`Kept::INGEST`]).
const SAME_DEVICE: u8 = 4;
const SAME_SOURCE: u8 = 8;
/// The metrics' decimal scale: bits 4..7 hold k (each metric stored as the integer
/// metric × 10^k) or [`RAW`] (each stored as its 8 bytes).
const SCALE_SHIFT: u8 = 4;
const RAW: u8 = 15;
/// The largest decimal scale tried: sensors send a few decimals.
const MAX_SCALE: u8 = 6;
const POW10: [f64; MAX_SCALE as usize + 1] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];

/// A chunk of readings sorted by device, time, source position, packed row by row: a head
/// byte (fail, ingest time present, same device and same source as the row before, the
/// metrics' decimal scale), then as variable-length integers the device's step, the time
/// (from the previous row of the device, or from the chunk's earliest), the ingest delay,
/// the source if it changed, the offset's step, and each metric as a decimal integer (its
/// step from the device's previous row at the same scale), or its 8 bytes where no scale up
/// to [`MAX_SCALE`] gives it back exactly. Readings parsed from JSON numbers with two
/// decimals take ~22 bytes instead of 88.
#[derive(Clone, Debug, PartialEq)]
struct Packed {
    bytes: Vec<u8>,
    rows: usize,
    /// The chunk's earliest time.
    base_ms: i64,
}

/// The decimal scale at which every metric is an integer that gives it back exactly.
fn scale_of(metrics: &[f64; 6]) -> Option<u8> {
    (0..=MAX_SCALE).find(|&k| {
        let p = POW10[k as usize];
        metrics.iter().all(|&v| {
            let m = (v * p).round();
            // Checked as it is read back: -0.0 comes back as 0.0 and is kept raw.
            m.abs() < (1u64 << 53) as f64 && ((m as i64) as f64 / p).to_bits() == v.to_bits()
        })
    })
}

impl Packed {
    /// Packs readings sorted by [`Kept::key`].
    fn of(rows: &[Kept]) -> Packed {
        let base_ms = rows.iter().map(|r| r.time_ms).min().unwrap_or(0);
        let mut bytes = Vec::with_capacity(rows.len() * 24);
        let mut prev = Kept::EMPTY;
        let mut prev_scale = RAW;
        let mut prev_m = [0i64; 6];
        for (i, r) in rows.iter().enumerate() {
            let same_device = i > 0 && r.device == prev.device;
            let same_source = i > 0 && r.source == prev.source;
            let scale = scale_of(&r.metrics).unwrap_or(RAW);
            let head = r.flags
                | if same_device { SAME_DEVICE } else { 0 }
                | if same_source { SAME_SOURCE } else { 0 }
                | scale << SCALE_SHIFT;
            bytes.push(head);
            if !same_device {
                put_varint(&mut bytes, u64::from(r.device - prev.device));
            }
            let from = if same_device { prev.time_ms } else { base_ms };
            put_varint(&mut bytes, r.time_ms.wrapping_sub(from) as u64);
            if r.flags & Kept::INGEST != 0 {
                put_varint(&mut bytes, zigzag(r.ingest_ms.wrapping_sub(r.time_ms)));
            }
            if !same_source {
                put_varint(&mut bytes, u64::from(r.source));
            }
            put_varint(&mut bytes, zigzag(r.offset.wrapping_sub(prev.offset) as i64));
            if scale == RAW {
                r.metrics.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
            } else {
                let p = POW10[scale as usize];
                let step = same_device && scale == prev_scale;
                for (m, v) in prev_m.iter_mut().zip(r.metrics) {
                    let now = (v * p).round() as i64;
                    put_varint(&mut bytes, zigzag(if step { now.wrapping_sub(*m) } else { now }));
                    *m = now;
                }
            }
            prev = *r;
            prev_scale = scale;
        }
        bytes.shrink_to_fit();
        Packed {
            bytes,
            rows: rows.len(),
            base_ms,
        }
    }

    /// The rows back, in order.
    fn unpack(self) -> Unpack {
        Unpack {
            left: self.rows,
            packed: self,
            at: 0,
            prev: Kept::EMPTY,
            prev_scale: RAW,
            prev_m: [0; 6],
        }
    }
}

/// Reads a [`Packed`] chunk's rows in order.
struct Unpack {
    packed: Packed,
    at: usize,
    left: usize,
    prev: Kept,
    prev_scale: u8,
    prev_m: [i64; 6],
}

impl Iterator for Unpack {
    type Item = Kept;

    fn next(&mut self) -> Option<Kept> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let bytes = &self.packed.bytes[..];
        let at = &mut self.at;
        let head = bytes[*at];
        *at += 1;
        let same_device = head & SAME_DEVICE != 0;
        let mut r = Kept {
            flags: head & (Kept::FAIL | Kept::INGEST),
            ..self.prev
        };
        if !same_device {
            r.device = self.prev.device + get_varint(bytes, at) as u32;
        }
        let from = if same_device {
            self.prev.time_ms
        } else {
            self.packed.base_ms
        };
        r.time_ms = from.wrapping_add(get_varint(bytes, at) as i64);
        r.ingest_ms = if head & Kept::INGEST != 0 {
            r.time_ms.wrapping_add(unzigzag(get_varint(bytes, at)))
        } else {
            0
        };
        if head & SAME_SOURCE == 0 {
            r.source = get_varint(bytes, at) as u32;
        }
        r.offset = self.prev.offset.wrapping_add(unzigzag(get_varint(bytes, at)) as u64);
        let scale = head >> SCALE_SHIFT;
        if scale == RAW {
            for v in r.metrics.iter_mut() {
                *v = f64::from_le_bytes(bytes[*at..*at + 8].try_into().expect("8 bytes"));
                *at += 8;
            }
        } else {
            let p = POW10[scale as usize];
            let step = same_device && scale == self.prev_scale;
            for (v, m) in r.metrics.iter_mut().zip(self.prev_m.iter_mut()) {
                let d = unzigzag(get_varint(bytes, at));
                *m = if step { m.wrapping_add(d) } else { d };
                *v = *m as f64 / p;
            }
        }
        self.prev = r;
        self.prev_scale = scale;
        Some(r)
    }
}

/// A sorted run of an hour's readings.
#[derive(Clone, Debug, PartialEq)]
enum Run {
    Packed(Packed),
    Plain(Vec<Kept>),
}

impl Run {
    fn len(&self) -> usize {
        match self {
            Run::Packed(p) => p.rows,
            Run::Plain(v) => v.len(),
        }
    }
}

/// Joins chunks into columns ordered by device, time, source position, moving no reading.
/// Device ids are a small dense range (1..=fleet size), so readings are bucketed by device
/// as references (a counting sort), and a device's run is sorted only if it is not in order
/// already (late or interleaved readings). Sparse ids fall back to a comparison sort.
/// (Writing each field straight to its row instead, reading the chunks in order, measured
/// slower: it needs the columns zeroed first and sorts each run's rows in every column.)
pub(crate) fn sort_readings(chunks: &[Vec<Kept>]) -> ReadingColumns {
    let n: usize = chunks.iter().map(Vec::len).sum();
    let max_device = chunks.iter().flatten().map(|r| r.device as usize).max().unwrap_or(0);
    let by_time = |r: &&Kept| (r.time_ms, r.source, r.offset);
    let mut order: Vec<&Kept> = Vec::with_capacity(n);
    if max_device > 4 * n + 1024 {
        order.extend(chunks.iter().flatten());
        order.sort_unstable_by_key(|r| r.key());
    } else {
        let mut next = vec![0usize; max_device + 2];
        for r in chunks.iter().flatten() {
            next[r.device as usize + 1] += 1;
        }
        for d in 1..next.len() {
            next[d] += next[d - 1];
        }
        let bounds = next.clone();
        order.resize(n, &NO_READING);
        for r in chunks.iter().flatten() {
            let slot = &mut next[r.device as usize];
            order[*slot] = r;
            *slot += 1;
        }
        for w in bounds.windows(2) {
            let run = &mut order[w[0]..w[1]];
            if !run.is_sorted_by_key(by_time) {
                run.sort_unstable_by_key(by_time);
            }
        }
    }
    let mut out = ReadingColumns::with_capacity(n);
    order.into_iter().for_each(|r| r.push_to(&mut out));
    out
}

/// A placeholder for the slots of [`sort_readings`] before they are filled.
static NO_READING: Kept = Kept::EMPTY;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Readings of `chunks` (device, time, offset) with flags and metrics that exercise every
    /// field.
    fn readings_of(chunks: &[Vec<(u32, i64, u64)>], scale: u32) -> Vec<Vec<Reading>> {
        chunks
            .iter()
            .map(|c| {
                c.iter()
                    .map(|&(d, t, o)| Reading {
                        // Some without an ingest time, some failed: the flags survive.
                        ingest_ms: (o % 3 != 0).then_some(t + o as i64),
                        is_fail: o % 5 == 0,
                        metrics: [o as f64, -1.5, 0.0, t as f64, 1e300, -0.0],
                        ..Reading::at(d * scale, t, o)
                    })
                    .collect()
            })
            .collect()
    }

    /// Columns of `readings` in the lake's order, sorted the plain way.
    fn expected(readings: &[Reading]) -> ReadingColumns {
        let mut sorted = readings.to_vec();
        sorted.sort_by_key(|r| (r.device, r.time_ms, r.pos));
        let mut rows = ReadingColumns::default();
        sorted.iter().for_each(|r| rows.push(r));
        rows
    }

    proptest! {
        /// Both the bucketed path (dense ids) and the fallback (sparse ids) order by device,
        /// time, source position, keeping every reading.
        #[test]
        fn sorts_by_device_time_position(
            chunks in proptest::collection::vec(
                proptest::collection::vec((1u32..6, 0i64..50, 0u64..1000), 0..40), 0..5),
            sparse in any::<bool>(),
        ) {
            let chunks = readings_of(&chunks, if sparse { 1_000_000 } else { 1 });
            let mut kept = KeptReadings::default();
            chunks.iter().for_each(|c| kept.keep(c));
            prop_assert!(kept.chunks.iter().rev().skip(1).all(|c| c.len() == KEEP_CHUNK));
            let got = sort_readings(&kept.chunks);
            let all: Vec<Reading> = chunks.into_iter().flatten().collect();
            let want = expected(&all);
            prop_assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
            prop_assert_eq!(got, want);
        }

        /// A packed chunk gives back every field of every row bit for bit: decimals at any
        /// scale, values no scale gives back (kept raw: 0.1 + 0.2, -0.0, NaN, 1e300), devices,
        /// sources and offsets going up and down, ingest times before and after.
        #[test]
        fn a_packed_chunk_gives_back_every_row(
            rows in proptest::collection::vec(
                (0u32..4, 0i64..4_000_000, 0u32..3, any::<u64>(), -5_000i64..5_000, any::<u8>(),
                 proptest::array::uniform6(prop_oneof![
                     (-1_000_000i64..1_000_000, 0u8..8).prop_map(|(m, k)| m as f64 / 10f64.powi(k.into())),
                     Just(0.1 + 0.2), Just(-0.0), Just(f64::NAN), Just(1e300), any::<f64>(),
                 ])),
                0..300),
        ) {
            let mut rows: Vec<Kept> = rows
                .into_iter()
                .map(|(device, time_ms, source, offset, delay, flags, metrics)| Kept {
                    time_ms: 1_751_846_400_000 + time_ms,
                    ingest_ms: if flags & Kept::INGEST != 0 { 1_751_846_400_000 + time_ms + delay } else { 0 },
                    offset,
                    metrics,
                    device: device * 1000,
                    source,
                    flags: flags & (Kept::FAIL | Kept::INGEST),
                })
                .collect();
            rows.sort_unstable_by_key(Kept::key);
            let packed = Packed::of(&rows);
            let back: Vec<Kept> = packed.unpack().collect();
            prop_assert_eq!(back.len(), rows.len());
            for (b, r) in back.iter().zip(&rows) {
                prop_assert_eq!(b.key(), r.key());
                prop_assert_eq!((b.ingest_ms, b.flags), (r.ingest_ms, r.flags));
                prop_assert_eq!(b.metrics.map(f64::to_bits), r.metrics.map(f64::to_bits));
            }
        }
    }

    #[test]
    fn kept_readings_fill_whole_chunks_in_88_bytes() {
        assert_eq!(std::mem::size_of::<Kept>(), 88);
        let mut kept = KeptReadings::default();
        let readings = |n: usize, from: u64| (0..n as u64).map(|i| Reading::at(1, 0, from + i)).collect::<Vec<_>>();
        kept.keep(&readings(KEEP_CHUNK + 10, 0));
        kept.keep(&readings(3, KEEP_CHUNK as u64 + 10));
        kept.keep(&readings(2, KEEP_CHUNK as u64 + 13));
        let lens: Vec<usize> = kept.chunks.iter().map(Vec::len).collect();
        assert_eq!(lens, [KEEP_CHUNK, 15]);
        assert!(kept.chunks.iter().all(|c| c.capacity() == KEEP_CHUNK));
        let offsets: Vec<u64> = kept.chunks.iter().flatten().map(|k| k.offset).collect();
        assert_eq!(offsets, (0..KEEP_CHUNK as u64 + 15).collect::<Vec<_>>());
    }

    /// An hour held long enough to pack (a live hour: 1,000 devices every second, arriving
    /// a second at a time, some late and out of order, from three partitions) comes out as
    /// the same columns as when sorted unpacked, in about a quarter of the memory.
    #[test]
    fn a_packed_hour_comes_out_as_the_same_columns() {
        let hour0 = 1_751_846_400_000i64;
        let mut all = Vec::new();
        let mut seconds = Vec::new();
        let mut offsets = [0u64; 3];
        for s in 0..110i64 {
            let mut second = Vec::new();
            for d in 1..=1_000u32 {
                // One in seven a second late, every second's order shuffled by device.
                let device = (d * 389) % 1_000 + 1;
                let late = if (d + s as u32).is_multiple_of(7) { 1_000 } else { 0 };
                let source = device % 3;
                offsets[source as usize] += 1;
                let v = |i: u32| f64::from((device * 7 + i * 13 + s as u32 * 3) % 100_000) / 100.0;
                second.push(Reading {
                    device,
                    time_ms: hour0 + s * 1_000 - late,
                    pos: SourcePos {
                        source,
                        offset: offsets[source as usize],
                    },
                    ingest_ms: (device % 50 != 0).then_some(hour0 + s * 1_000 + 300),
                    is_fail: (device + s as u32).is_multiple_of(11),
                    metrics: [
                        v(0),
                        v(1),
                        v(2),
                        v(3) * 10.0,
                        v(4),
                        if device == 9 { 0.1 + 0.2 } else { v(5) },
                    ],
                    ..Reading::EMPTY
                });
            }
            all.extend_from_slice(&second);
            seconds.push(second);
        }
        let mut kept = KeptReadings::default();
        seconds.iter().for_each(|s| kept.keep(s));
        assert!(kept.packed.len() >= 2, "{} packed chunks", kept.packed.len());
        assert_eq!(kept.chunks.len(), 1, "only the last chunk is unpacked");
        let held = kept.held_bytes() - KEEP_CHUNK * std::mem::size_of::<Kept>();
        let packed_rows: usize = kept.packed.iter().map(|p| p.rows).sum();
        let per_row = held as f64 / packed_rows as f64;
        assert!(per_row < 30.0, "{per_row:.1} bytes per packed reading");
        let hour = kept.take();
        assert!(kept.is_empty());
        let want = expected(&all);
        assert_eq!(hour.len(), want.len());
        let devices: std::collections::BTreeSet<u32> = want.device.iter().copied().collect();
        assert_eq!(hour.devices(), devices.into_iter().collect::<Vec<_>>());
        assert_eq!(hour.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
        // Read out in pieces, the same rows in the same order.
        let pieces: Vec<ReadingColumns> = hour.clone().chunks(50_000).collect();
        assert!(pieces.iter().all(|p| p.len() <= 50_000) && pieces.len() == want.len().div_ceil(50_000));
        let mut joined = ReadingColumns::default();
        pieces.into_iter().for_each(|p| joined.append(p));
        assert_eq!(joined, want);
        assert_eq!(hour.into_columns(), want);
        // Held again after the take: the state starts over.
        kept.keep(&seconds[0]);
        assert_eq!(kept.take().into_columns(), expected(&seconds[0]));
    }
}
