//! greencode: prune code LLMs by the Flab-Pruner method and serve them with
//! per-request energy, FLOPs and CO2 accounting.
//!
//! Dependencies point one way: the CLI (`main.rs`) calls the stages
//! (`generate`, `eval`, `bench`), which use the runtime (`model`, `tokenizer`,
//! `sampling`), which uses candle.
#![warn(missing_docs)]

pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod energy;
pub mod eval;
pub mod generate;
pub mod metrics;
pub mod model;
pub mod output;
pub mod prune;
pub mod recover;
pub mod serve;
pub mod tokenizer;
