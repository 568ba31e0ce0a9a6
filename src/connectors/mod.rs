//! Connectors: where raw records come from and where results go. One module per connector.

pub mod file;
pub mod fms_http;
pub mod kafka;
