//! fmsflow's runtime: connectors, the engine driver, the lake, the simulator and the demo.
//! The pure dataflow (model, rules, aggregates) is the `fmsflow-dataflows` crate.

pub mod checkpoint;
pub mod clock;
pub mod collect;
pub mod config;
pub mod connectors;
pub mod demo;
pub mod durable;
pub mod engine;
pub mod fms;
pub mod gen;
pub mod lake;
pub mod sim;
pub mod status;
