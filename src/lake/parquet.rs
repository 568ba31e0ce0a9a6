//! Parquet encodings of the lake's four tables. Schemas are documented in
//! `docs/LAKE.md`; the partition columns `dt` and `hour` live in the path, Hive style.
//! Times are `TIMESTAMP(MILLIS, UTC)`. Rows arrive ordered by device then time, and row
//! groups are small enough that min/max statistics let readers prune by device.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder,
};
use arrow_array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, TimestampMillisecondArray,
};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use fmsflow_dataflows::rules::Outcome;
use fmsflow_dataflows::time::HOUR_MS;
use fmsflow_dataflows::{HourFigures, HourStats, ReadingColumns, Rejection, METRICS};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use super::LakeError;

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn ts_builder(n: usize) -> TimestampMillisecondBuilder {
    TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC")
}

fn encode(
    table: &'static str,
    hour: i64,
    fields: Vec<Field>,
    columns: Vec<ArrayRef>,
    row_group_rows: usize,
    no_statistics: &[&str],
) -> Result<Vec<u8>, LakeError> {
    encode_batches(table, hour, fields, [columns], 0, row_group_rows, no_statistics)
}

/// Encodes a file from its rows' columns given a batch at a time: each batch goes into the
/// writer (its row groups encoded as they fill) before the next is made. With the file's
/// `rows` (0: one batch, or not known), room for the whole file is made once its first row
/// groups show how large a row comes out: a buffer doubling as it fills ends with up to
/// twice the file, and holds the old copy besides while it moves (an hour at 1,000 msg/s:
/// an 86 MiB file in a 170 MiB buffer, 250 MiB while it grew).
#[allow(clippy::too_many_arguments)]
fn encode_batches(
    table: &'static str,
    hour: i64,
    fields: Vec<Field>,
    batches: impl IntoIterator<Item = Vec<ArrayRef>>,
    rows: usize,
    row_group_rows: usize,
    no_statistics: &[&str],
) -> Result<Vec<u8>, LakeError> {
    let err = |e: &dyn std::fmt::Display| LakeError::Encode {
        table,
        hour,
        message: e.to_string(),
    };
    let schema = Arc::new(Schema::new(fields));
    let mut props = WriterProperties::builder();
    // Integers and times are sorted or nearly so within a file (device, then time; offsets
    // rise with time): their deltas pack into a few bits, and Snappy has less left to do.
    for f in schema.fields() {
        if matches!(
            f.data_type(),
            DataType::Int32 | DataType::Int64 | DataType::Timestamp(..)
        ) {
            props = props.set_column_encoding(ColumnPath::from(f.name().as_str()), Encoding::DELTA_BINARY_PACKED);
        }
    }
    for name in no_statistics {
        props = props.set_column_statistics_enabled(ColumnPath::from(*name), EnabledStatistics::None);
    }
    let props = props
        .set_compression(Compression::SNAPPY)
        // Sensor values rarely repeat: dictionaries cost time and save nothing.
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_created_by("fmsflow".to_string())
        .build();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema.clone(), Some(props)).map_err(|e| err(&e))?;
    let mut sized = rows == 0;
    for columns in batches {
        let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| err(&e))?;
        if w.inner().capacity() == 0 {
            // About what the batch encodes to.
            w.inner_mut().reserve(batch.get_array_memory_size() / 2);
        }
        w.write(&batch).map_err(|e| err(&e))?;
        let flushed: i64 = w.flushed_row_groups().iter().map(|g| g.num_rows()).sum();
        if !sized && flushed > 0 {
            sized = true;
            let per_row = w.inner().len() as f64 / flushed as f64;
            let whole = (per_row * rows as f64 * 1.05) as usize + (64 << 10);
            let buf = w.inner_mut();
            buf.reserve_exact(whole.saturating_sub(buf.len()));
        }
    }
    w.close().map_err(|e| err(&e))?;
    Ok(buf)
}

/// `readings/`: one row per accepted reading, from the rows' columns given in pieces (each
/// encoded before the next is made), `rows` in all.
pub fn readings(
    pieces: impl IntoIterator<Item = ReadingColumns>,
    rows: usize,
    hour: i64,
    row_group_rows: usize,
) -> Result<Vec<u8>, LakeError> {
    let mut fields = vec![
        Field::new("device", DataType::Int32, false),
        Field::new("time", ts(), false),
    ];
    fields.extend(METRICS.iter().map(|m| Field::new(*m, DataType::Float64, false)));
    fields.extend([
        Field::new("is_fail", DataType::Boolean, false),
        Field::new("ingest_time", ts(), true),
        Field::new("source", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
    ]);
    // The rows come as columns, taken over by the arrays where the types agree (times,
    // metrics; the device ids converted in place), with no null bitmap where there are no
    // nulls.
    let arrays = |rows: ReadingColumns| {
        let ReadingColumns {
            device,
            time_ms,
            metrics,
            is_fail,
            ingest_ms,
            pos,
        } = rows;
        let device: Vec<i32> = device.into_iter().map(|d| d as i32).collect();
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(Int32Array::from(device)),
            Arc::new(TimestampMillisecondArray::from(time_ms).with_timezone("UTC")),
        ];
        cols.extend(metrics.map(|m| Arc::new(Float64Array::from(m)) as ArrayRef));
        cols.extend([
            Arc::new(BooleanArray::from(is_fail)) as ArrayRef,
            Arc::new(TimestampMillisecondArray::from(ingest_ms).with_timezone("UTC")),
            Arc::new(Int32Array::from_iter_values(pos.iter().map(|p| p.source as i32))),
            Arc::new(Int64Array::from_iter_values(pos.iter().map(|p| p.offset as i64))),
        ]);
        cols
    };
    // A row group spans many devices and a whole hour, so the min and max of a metric there
    // cover nearly its whole range and prune nothing; computing them cost 15-20 % of the
    // encoding (docs/BENCHMARKS.md).
    let batches = pieces.into_iter().filter(|r| !r.is_empty()).map(arrays);
    encode_batches("readings", hour, fields, batches, rows, row_group_rows, &METRICS)
}

/// `hourly/`: one row per device with readings in the hour.
pub fn hourly(rows: &[(u32, HourStats)], hour: i64, row_group_rows: usize) -> Result<Vec<u8>, LakeError> {
    let n = rows.len();
    let mut device = Int32Builder::with_capacity(n);
    let mut start = ts_builder(n);
    let mut count = Int64Builder::with_capacity(n);
    let mut fails = Int64Builder::with_capacity(n);
    let mut first = ts_builder(n);
    let mut last = ts_builder(n);
    let mut stats: Vec<Float64Builder> = (0..24).map(|_| Float64Builder::with_capacity(n)).collect();
    for (d, s) in rows {
        device.append_value(*d as i32);
        start.append_value(hour * HOUR_MS);
        count.append_value(s.count as i64);
        fails.append_value(s.fails as i64);
        first.append_value(s.first_ms);
        last.append_value(s.last_ms);
        for (b, v) in stats.iter_mut().zip(s.figures().metrics.as_flattened()) {
            b.append_value(*v);
        }
    }
    let mut fields = vec![
        Field::new("device", DataType::Int32, false),
        Field::new("hour_start", ts(), false),
        Field::new("count", DataType::Int64, false),
        Field::new("fail_count", DataType::Int64, false),
        Field::new("first_time", ts(), false),
        Field::new("last_time", ts(), false),
    ];
    for m in METRICS {
        for s in HourFigures::STATS {
            fields.push(Field::new(format!("{m}_{s}"), DataType::Float64, false));
        }
    }
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(device.finish()),
        Arc::new(start.finish()),
        Arc::new(count.finish()),
        Arc::new(fails.finish()),
        Arc::new(first.finish()),
        Arc::new(last.finish()),
    ];
    cols.extend(stats.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    encode("hourly", hour, fields, cols, row_group_rows, &[])
}

/// A `quality/` row: (device, outcome) and its count.
pub type QualityRow = ((u32, Outcome), i64);

/// `quality/`: one row per (device, outcome) in the hour; outcome `valid` or a rule name.
pub fn quality(rows: &[QualityRow], hour: i64, row_group_rows: usize) -> Result<Vec<u8>, LakeError> {
    let n = rows.len();
    let mut device = Int32Builder::with_capacity(n);
    let mut outcome = StringBuilder::with_capacity(n, n * 12);
    let mut count = Int64Builder::with_capacity(n);
    for ((d, o), c) in rows {
        device.append_value(*d as i32);
        outcome.append_value(o.name());
        count.append_value(*c);
    }
    let fields = vec![
        Field::new("device", DataType::Int32, false),
        Field::new("outcome", DataType::Utf8, false),
        Field::new("count", DataType::Int64, false),
    ];
    let cols: Vec<ArrayRef> = vec![
        Arc::new(device.finish()),
        Arc::new(outcome.finish()),
        Arc::new(count.finish()),
    ];
    encode("quality", hour, fields, cols, row_group_rows, &[])
}

/// `rejects/`: the dead letters: original bytes, rule, reason, source position.
pub fn rejects(rows: &[Rejection], hour: i64, row_group_rows: usize) -> Result<Vec<u8>, LakeError> {
    let n = rows.len();
    let mut device = Int32Builder::with_capacity(n);
    let mut rule = StringBuilder::with_capacity(n, n * 12);
    let mut reason = StringBuilder::with_capacity(n, n * 64);
    let mut payload = BinaryBuilder::with_capacity(n, n * 200);
    let mut time = ts_builder(n);
    let mut ingest = ts_builder(n);
    let mut source = Int32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    for r in rows {
        device.append_value(r.device as i32);
        rule.append_value(r.rule.name());
        reason.append_value(&r.reason);
        payload.append_value(&r.payload);
        time.append_option(r.time_ms);
        ingest.append_option(r.ingest_ms);
        source.append_value(r.pos.source as i32);
        offset.append_value(r.pos.offset as i64);
    }
    let fields = vec![
        Field::new("device", DataType::Int32, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("payload", DataType::Binary, false),
        Field::new("event_time", ts(), true),
        Field::new("ingest_time", ts(), true),
        Field::new("source", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
    ];
    let cols: Vec<ArrayRef> = vec![
        Arc::new(device.finish()),
        Arc::new(rule.finish()),
        Arc::new(reason.finish()),
        Arc::new(payload.finish()),
        Arc::new(time.finish()),
        Arc::new(ingest.finish()),
        Arc::new(source.finish()),
        Arc::new(offset.finish()),
    ];
    encode("rejects", hour, fields, cols, row_group_rows, &[])
}

/// Decodes a Parquet file into its record batches.
pub fn read(bytes: &[u8]) -> Result<Vec<RecordBatch>, parquet::errors::ParquetError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(bytes))?.build()?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

/// An `hourly/` file's rows, as written by [`hourly`]: per device, the hour's figures.
pub fn read_hourly(bytes: &[u8]) -> Result<Vec<(u32, HourFigures)>, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int32Type, Int64Type, TimestampMillisecondType};
    let mut out = Vec::new();
    for b in read(bytes).map_err(|e| e.to_string())? {
        let col = |name: &str| b.column_by_name(name).ok_or_else(|| format!("no column {name}"));
        let typed = |name: &str, t: &str| format!("column {name} is not {t}");
        let device = col("device")?
            .as_primitive_opt::<Int32Type>()
            .ok_or_else(|| typed("device", "Int32"))?;
        let int = |name: &str| -> Result<_, String> {
            col(name)?
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| typed(name, "Int64"))
        };
        let time = |name: &str| -> Result<_, String> {
            col(name)?
                .as_primitive_opt::<TimestampMillisecondType>()
                .ok_or_else(|| typed(name, "a timestamp"))
        };
        let (count, fails) = (int("count")?, int("fail_count")?);
        let (first, last) = (time("first_time")?, time("last_time")?);
        let mut stats = Vec::with_capacity(24);
        for m in METRICS {
            for s in HourFigures::STATS {
                let name = format!("{m}_{s}");
                stats.push(
                    col(&name)?
                        .as_primitive_opt::<Float64Type>()
                        .ok_or_else(|| typed(&name, "Float64"))?,
                );
            }
        }
        for i in 0..b.num_rows() {
            let d = u32::try_from(device.value(i)).map_err(|_| format!("device {} is negative", device.value(i)))?;
            out.push((
                d,
                HourFigures {
                    count: count.value(i) as u64,
                    fails: fails.value(i) as u64,
                    first_ms: first.value(i),
                    last_ms: last.value(i),
                    metrics: std::array::from_fn(|m| std::array::from_fn(|s| stats[m * 4 + s].value(i))),
                },
            ));
        }
    }
    Ok(out)
}

/// A `quality/` file's rows, as written by [`quality`]: per (device, outcome), the count.
pub fn read_quality(bytes: &[u8]) -> Result<Vec<QualityRow>, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type};
    let mut out = Vec::new();
    for b in read(bytes).map_err(|e| e.to_string())? {
        let col = |name: &str| b.column_by_name(name).ok_or_else(|| format!("no column {name}"));
        let device = col("device")?
            .as_primitive_opt::<Int32Type>()
            .ok_or("column device is not Int32")?;
        let outcome = col("outcome")?
            .as_string_opt::<i32>()
            .ok_or("column outcome is not a string")?;
        let count = col("count")?
            .as_primitive_opt::<Int64Type>()
            .ok_or("column count is not Int64")?;
        for i in 0..b.num_rows() {
            let d = u32::try_from(device.value(i)).map_err(|_| format!("device {} is negative", device.value(i)))?;
            let o = match outcome.value(i) {
                "valid" => Outcome::Valid,
                name => Outcome::Rejected(
                    fmsflow_dataflows::rules::Rule::from_name(name)
                        .ok_or_else(|| format!("unknown outcome `{name}`"))?,
                ),
            };
            out.push(((d, o), count.value(i)));
        }
    }
    Ok(out)
}

/// Per device, the sum of Int64 column `column` of a file's rows, or (`None`) their number.
pub fn per_device(batches: &[RecordBatch], column: Option<&str>) -> Result<BTreeMap<i32, i64>, String> {
    use arrow_array::cast::AsArray;
    let mut out = BTreeMap::new();
    for b in batches {
        let col = |name: &str| b.column_by_name(name).ok_or_else(|| format!("no column {name}"));
        let devices = col("device")?
            .as_primitive_opt::<arrow_array::types::Int32Type>()
            .ok_or("device is not Int32")?;
        let values = match column {
            Some(c) => Some(
                col(c)?
                    .as_primitive_opt::<arrow_array::types::Int64Type>()
                    .ok_or_else(|| format!("{c} is not Int64"))?,
            ),
            None => None,
        };
        for i in 0..b.num_rows() {
            *out.entry(devices.value(i)).or_default() += values.map_or(1, |v| v.value(i));
        }
    }
    Ok(out)
}

/// Merges a file with an update of some of its rows: rows of `old` whose key columns match a
/// row of `new` are replaced; the result is ordered by the key columns.
pub fn merge(
    old: &[u8],
    new: &[u8],
    table: &'static str,
    hour: i64,
    row_group_rows: usize,
    key: &[&str],
) -> Result<Vec<u8>, LakeError> {
    use arrow_array::cast::AsArray;
    let err = |e: &dyn std::fmt::Display| LakeError::Encode {
        table,
        hour,
        message: format!("merging with the existing file: {e}"),
    };
    let (old, new) = (read(old).map_err(|e| err(&e))?, read(new).map_err(|e| err(&e))?);
    let Some(schema) = new.first().map(|b| b.schema()) else {
        return Err(err(&"the update is empty"));
    };
    // Keys: the device, then (for quality) the outcome.
    let key_of = |b: &RecordBatch, i: usize| -> Result<(i32, String), LakeError> {
        let col = |name: &str| b.column_by_name(name).ok_or_else(|| err(&format!("no column {name}")));
        let device = col(key[0])?
            .as_primitive_opt::<arrow_array::types::Int32Type>()
            .ok_or_else(|| err(&"device is not Int32"))?
            .value(i);
        let rest = match key.get(1) {
            Some(name) => col(name)?
                .as_string_opt::<i32>()
                .ok_or_else(|| err(&format!("{name} is not Utf8")))?
                .value(i)
                .to_string(),
            None => String::new(),
        };
        Ok((device, rest))
    };
    let mut rows: std::collections::BTreeMap<(i32, String), (usize, usize)> = std::collections::BTreeMap::new();
    let all: Vec<RecordBatch> = old.into_iter().chain(new).collect();
    // Later batches (the update) win.
    for (bi, b) in all.iter().enumerate() {
        for i in 0..b.num_rows() {
            rows.insert(key_of(b, i)?, (bi, i));
        }
    }
    let indices: Vec<(usize, usize)> = rows.into_values().collect();
    let columns = (0..schema.fields().len())
        .map(|c| {
            let arrays: Vec<&dyn arrow_array::Array> = all.iter().map(|b| b.column(c).as_ref()).collect();
            arrow_select::interleave::interleave(&arrays, &indices).map_err(|e| err(&e))
        })
        .collect::<Result<Vec<ArrayRef>, LakeError>>()?;
    let fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    encode(table, hour, fields, columns, row_group_rows, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use fmsflow_dataflows::{Reading, Rule, SourcePos};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    /// Rows given in pieces (as a live hour is read out) make the same file as given whole:
    /// the same row groups, the same rows; empty pieces add nothing.
    #[test]
    fn readings_in_pieces_are_the_file_of_the_whole() {
        let rows = |range: std::ops::Range<u32>| {
            let mut cols = ReadingColumns::default();
            for i in range {
                cols.push(&Reading {
                    device: 1 + i / 10,
                    time_ms: 1000 * i64::from(i % 10),
                    metrics: [f64::from(i) / 100.0; 6],
                    is_fail: i % 3 == 0,
                    ingest_ms: (i % 4 != 0).then_some(5),
                    pos: SourcePos {
                        source: i % 2,
                        offset: u64::from(i),
                    },
                    payload_at: Default::default(),
                });
            }
            cols
        };
        let whole = readings([rows(0..25)], 25, 0, 4).unwrap();
        let pieces = readings([rows(0..7), rows(7..7), rows(7..20), rows(20..25)], 25, 0, 4).unwrap();
        let read = |bytes: Vec<u8>| {
            let b = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap();
            let groups: Vec<i64> = b.metadata().row_groups().iter().map(|g| g.num_rows()).collect();
            let batches: Vec<RecordBatch> = b.build().unwrap().map(Result::unwrap).collect();
            (
                groups,
                arrow_select::concat::concat_batches(&batches[0].schema(), &batches).unwrap(),
            )
        };
        let (groups, all) = read(whole);
        assert_eq!(groups, [4, 4, 4, 4, 4, 4, 1]);
        assert_eq!(read(pieces), (groups, all));
    }

    #[test]
    fn readings_have_statistics_for_keys_not_for_metrics() {
        let mut cols = ReadingColumns::default();
        for (i, d) in [3u32, 3, 7].into_iter().enumerate() {
            let r = Reading {
                device: d,
                time_ms: 1000 * i as i64,
                metrics: [i as f64; 6],
                is_fail: false,
                ingest_ms: Some(5),
                pos: SourcePos::default(),
                payload_at: Default::default(),
            };
            cols.push(&r);
        }
        let bytes = readings([cols], 3, 0, 16).unwrap();
        let b = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap();
        let rg = b.metadata().row_group(0);
        for c in rg.columns() {
            let name = c.column_path().string();
            let has = c.statistics().is_some();
            assert_eq!(has, !METRICS.contains(&name.as_str()), "statistics of {name}");
        }
    }

    fn stats(device: u32, v: f64) -> (u32, HourStats) {
        let r = Reading {
            device,
            time_ms: 1000,
            metrics: [v; 6],
            is_fail: false,
            ingest_ms: None,
            pos: SourcePos::default(),
            payload_at: Default::default(),
        };
        (device, HourStats::of(&r))
    }

    fn rows(bytes: Vec<u8>) -> RecordBatch {
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        arrow_select::concat::concat_batches(&batches[0].schema(), &batches).unwrap()
    }

    #[test]
    fn merge_replaces_updated_rows_and_keeps_the_rest() {
        let old = hourly(&[stats(1, 1.0), stats(2, 2.0), stats(10, 10.0)], 5, 100).unwrap();
        let new = hourly(&[stats(2, 20.0), stats(4, 4.0)], 5, 100).unwrap();
        let b = rows(merge(&old, &new, "hourly", 5, 100, &["device"]).unwrap());
        let devices: Vec<i32> = b
            .column_by_name("device")
            .unwrap()
            .as_primitive::<arrow_array::types::Int32Type>()
            .values()
            .to_vec();
        assert_eq!(devices, vec![1, 2, 4, 10]);
        let means: Vec<f64> = b
            .column_by_name("sensor1_mean")
            .unwrap()
            .as_primitive::<arrow_array::types::Float64Type>()
            .values()
            .to_vec();
        assert_eq!(means, vec![1.0, 20.0, 4.0, 10.0]);
    }

    #[test]
    fn merge_quality_by_device_and_outcome() {
        let old = quality(
            &[
                ((1, Outcome::Valid), 5),
                ((1, Outcome::Rejected(Rule::Duplicate)), 1),
                ((2, Outcome::Valid), 3),
            ],
            5,
            100,
        )
        .unwrap();
        let new = quality(&[((1, Outcome::Rejected(Rule::Duplicate)), 2)], 5, 100).unwrap();
        let b = rows(merge(&old, &new, "quality", 5, 100, &["device", "outcome"]).unwrap());
        let counts: Vec<i64> = b
            .column_by_name("count")
            .unwrap()
            .as_primitive::<arrow_array::types::Int64Type>()
            .values()
            .to_vec();
        assert_eq!(counts, vec![2, 5, 3]);
    }

    /// The files read back are the rows written: every figure (over several row groups),
    /// every outcome.
    #[test]
    fn hourly_and_quality_files_read_back_as_written() {
        let mut rows: Vec<(u32, HourStats)> = (1..=9).map(|d| stats(d, f64::from(d) / 3.0)).collect();
        let mut more = stats(4, -2.5).1;
        more.add(&Reading {
            device: 4,
            time_ms: 7_000,
            metrics: [1e300, -0.0, 3.25, 7.0, 8.0, 9.0],
            is_fail: true,
            ingest_ms: None,
            pos: SourcePos::default(),
            payload_at: Default::default(),
        });
        rows[3].1 = more;
        let back = read_hourly(&hourly(&rows, 5, 4).unwrap()).unwrap();
        let want: Vec<(u32, HourFigures)> = rows.iter().map(|(d, s)| (*d, s.figures())).collect();
        assert_eq!(back, want);
        let counts: Vec<QualityRow> = std::iter::once(((1, Outcome::Valid), 5))
            .chain(
                Rule::ALL
                    .iter()
                    .enumerate()
                    .map(|(i, r)| ((2, Outcome::Rejected(*r)), i as i64 + 1)),
            )
            .collect();
        assert_eq!(read_quality(&quality(&counts, 5, 4).unwrap()).unwrap(), counts);
        assert!(read_hourly(&quality(&counts, 5, 4).unwrap())
            .unwrap_err()
            .contains("no column"));
    }
}
