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
pub mod bench_batch;
pub mod bench_kernels;
pub mod bench_serve;
pub mod bench_soak;
pub mod device;
pub mod energy;
pub mod eval;
pub mod generate;
pub mod gguf_export;
pub mod interrupt;
pub mod locate;
pub mod metrics;
pub mod model;
pub mod out_dir;
pub mod pipeline;
pub mod progress;
pub mod prune;
pub mod recover;
pub mod sampling;
pub mod serve;
pub mod stop;
pub mod tokenizer;
