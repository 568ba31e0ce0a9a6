//! The record model: raw bytes as they arrive, the typed reading the rules produce, and the
//! keys of the aggregate collections.

pub use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The six measured metrics, in the order they are stored in [`Reading::metrics`] and in
/// [`crate::HourStats::metrics`]. These are also the FMS payload's field names.
pub const METRICS: [&str; 6] = ["sensor1", "sensor2", "sensor3", "motor1", "motor2", "motor3"];

/// Where a raw record came from: a source (file index, Kafka partition, poller) and its
/// offset within it. Also the tie-breaker that makes "first of two duplicates" deterministic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SourcePos {
    /// Source id: a file index, a Kafka partition, or a poller id.
    pub source: u32,
    /// Position within the source: a line number or a Kafka offset.
    pub offset: u64,
}

/// One payload exactly as received, with its ingest timestamp.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawRecord {
    /// The body as received (normally one FMS JSON object). A view of shared bytes: a file
    /// replay's payloads are slices of the buffer their lines were read into (no allocation
    /// or copy per record); other sources give each record its own (`Bytes::from(vec)`).
    pub payload: Bytes,
    /// When the record entered the pipeline (poll time / Kafka record timestamp), ms since
    /// the epoch. The time rules compare against this, never against the wall clock, so a
    /// replay decides the same. `None` (archived NDJSON without ingest times) disables the
    /// future/stale rules for that record.
    pub ingest_ms: Option<i64>,
    /// Source position.
    pub pos: SourcePos,
}

/// A reading that passed the stateless rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Device id, 1..=fleet size.
    pub device: u32,
    /// Event time (the payload's `time`), ms since the epoch.
    pub time_ms: i64,
    /// sensor1..3, motor1..3 in [`METRICS`] order.
    pub metrics: [f64; 6],
    /// The payload's `isFail`.
    pub is_fail: bool,
    /// Ingest time, as on the raw record.
    pub ingest_ms: Option<i64>,
    /// Source position, as on the raw record.
    pub pos: SourcePos,
    /// Where the dataflow keeps the original bytes while the duplicate rule may still need
    /// them for a rejection. The reading itself travels without them.
    pub payload_at: PayloadAt,
}

/// Where an accepted reading's payload waits for the duplicate rule: on the worker that
/// validated it, as the `slot`-th accepted reading of its epoch there. A reading crosses to
/// the worker that deduplicates its (device, hour) without its bytes; only a duplicate's
/// bytes are fetched back, to go into its rejection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadAt {
    /// The worker that validated the reading (timely's worker index).
    pub worker: u32,
    /// The reading's number among the readings that worker accepted in the epoch.
    pub slot: u32,
}

impl Reading {
    /// A placeholder, for moving a reading out of a slot.
    pub const EMPTY: Reading = Reading {
        device: 0,
        time_ms: 0,
        metrics: [0.0; 6],
        is_fail: false,
        ingest_ms: None,
        pos: SourcePos { source: 0, offset: 0 },
        payload_at: PayloadAt { worker: 0, slot: 0 },
    };
    /// The hour index (hours since the epoch) of the event time.
    #[inline]
    pub fn hour(&self) -> i64 {
        crate::time::hour_of(self.time_ms)
    }
    /// The aggregate key of this reading.
    #[inline]
    pub fn key(&self) -> DeviceHour {
        (self.device, self.hour())
    }
}

#[cfg(test)]
impl Reading {
    /// A reading of `device` at `time_ms` (also its ingest time) from offset `offset` of
    /// source 0, for unit tests.
    pub(crate) fn at(device: u32, time_ms: i64, offset: u64) -> Reading {
        Reading {
            device,
            time_ms,
            pos: SourcePos { source: 0, offset },
            ingest_ms: Some(time_ms),
            ..Reading::EMPTY
        }
    }
}

/// Readings as columns, one vector per field (the payload is not kept): the rows of the
/// lake's `readings` table in the order the sealing stage sorted them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadingColumns {
    /// [`Reading::device`] of each row.
    pub device: Vec<u32>,
    /// [`Reading::time_ms`] of each row.
    pub time_ms: Vec<i64>,
    /// [`Reading::metrics`], one column per metric in [`METRICS`] order.
    pub metrics: [Vec<f64>; 6],
    /// [`Reading::is_fail`] of each row.
    pub is_fail: Vec<bool>,
    /// [`Reading::ingest_ms`] of each row.
    pub ingest_ms: Vec<Option<i64>>,
    /// [`Reading::pos`] of each row.
    pub pos: Vec<SourcePos>,
}

impl ReadingColumns {
    /// Empty columns with room for `n` rows each.
    pub fn with_capacity(n: usize) -> ReadingColumns {
        ReadingColumns {
            device: Vec::with_capacity(n),
            time_ms: Vec::with_capacity(n),
            metrics: std::array::from_fn(|_| Vec::with_capacity(n)),
            is_fail: Vec::with_capacity(n),
            ingest_ms: Vec::with_capacity(n),
            pos: Vec::with_capacity(n),
        }
    }

    /// Appends a reading as a row.
    #[inline]
    pub fn push(&mut self, r: &Reading) {
        self.push_row(r.device, r.time_ms, r.metrics, r.is_fail, r.ingest_ms, r.pos);
    }

    /// Appends a row of these fields.
    #[inline]
    pub fn push_row(
        &mut self,
        device: u32,
        time_ms: i64,
        metrics: [f64; 6],
        is_fail: bool,
        ingest_ms: Option<i64>,
        pos: SourcePos,
    ) {
        self.device.push(device);
        self.time_ms.push(time_ms);
        for (col, v) in self.metrics.iter_mut().zip(metrics) {
            col.push(v);
        }
        self.is_fail.push(is_fail);
        self.ingest_ms.push(ingest_ms);
        self.pos.push(pos);
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.device.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.device.is_empty()
    }

    /// Removes every row.
    pub fn clear(&mut self) {
        *self = ReadingColumns::default();
    }

    /// Appends `other`'s rows after these.
    pub fn append(&mut self, mut other: ReadingColumns) {
        self.device.append(&mut other.device);
        self.time_ms.append(&mut other.time_ms);
        for (m, o) in self.metrics.iter_mut().zip(other.metrics.iter_mut()) {
            m.append(o);
        }
        self.is_fail.append(&mut other.is_fail);
        self.ingest_ms.append(&mut other.ingest_ms);
        self.pos.append(&mut other.pos);
    }

    /// Each row's (device, event time, source position), in row order.
    pub fn keys(&self) -> impl Iterator<Item = (u32, i64, SourcePos)> + '_ {
        (0..self.len()).map(|i| (self.device[i], self.time_ms[i], self.pos[i]))
    }

    /// The rows of each device, in row order, for rows grouped by device (as the sealing
    /// stage orders them): one `(device, columns)` per run of equal devices.
    pub fn split_by_device(self) -> Vec<(u32, ReadingColumns)> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < self.len() {
            let device = self.device[start];
            let end = start + self.device[start..].iter().take_while(|&&d| d == device).count();
            let range = start..end;
            out.push((
                device,
                ReadingColumns {
                    device: self.device[range.clone()].to_vec(),
                    time_ms: self.time_ms[range.clone()].to_vec(),
                    metrics: std::array::from_fn(|m| self.metrics[m][range.clone()].to_vec()),
                    is_fail: self.is_fail[range.clone()].to_vec(),
                    ingest_ms: self.ingest_ms[range.clone()].to_vec(),
                    pos: self.pos[range].to_vec(),
                },
            ));
            start = end;
        }
        out
    }
}

/// A device's newest accepted reading among one epoch's readings at one worker, and how many
/// readings of the device that worker accepted in the epoch: what a live status display
/// needs, without a copy of every reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceLatest {
    /// Device id.
    pub device: u32,
    /// Event time of the device's newest reading in the epoch.
    pub time_ms: i64,
    /// That reading's `isFail`.
    pub is_fail: bool,
    /// That reading's metrics, in [`crate::METRICS`] order.
    pub metrics: [f64; 6],
    /// Readings of the device accepted in the epoch.
    pub readings: u64,
}

/// Key of the hourly aggregates: (device id, hour index since the epoch).
pub type DeviceHour = (u32, i64);

/// Key of the quality counts: (device id or 0 when unknown, hour index, rule name). The
/// rule name `"valid"` counts accepted readings, so valid / total is one lookup.
pub type QualityKey = (u32, i64, &'static str);
