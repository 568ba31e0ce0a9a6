//! fmsflow's pure dataflow definitions: the reading model, the quality rules, the
//! aggregate (difference) types and the dataflow builder. Nothing here does I/O: bytes come
//! in through input handles as [`RawRecord`]s, typed streams and differential collections
//! come out, and `src/` (the binary) attaches sources and sinks.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod dataflow;
#[doc(hidden)]
pub mod fuzzing;
#[doc(hidden)]
pub mod keep;
pub mod model;
pub mod oracle;
pub mod rules;
pub mod stats;
pub mod time;
mod varint;

pub use dataflow::{build, route_hour, Epoch, Outputs};
pub use keep::HourReadings;
pub use model::{
    Bytes, DeviceHour, DeviceLatest, PayloadAt, QualityKey, RawRecord, Reading, ReadingColumns, SourcePos, METRICS,
};
pub use rules::{validate, validate_keeping, Deduper, Rejection, Rule, RuleConfig};
pub use stats::{HourFigures, HourStats, MetricStats};
