//! Connectors: where raw records come from. One module per connector.

pub mod file;
pub mod fms_http;
