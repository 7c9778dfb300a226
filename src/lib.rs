//! greencode: prune code LLMs by the Flab-Pruner method and serve them with
//! per-request energy, FLOPs and CO2 accounting.
//!
//! Each module is one layer and uses only the layers below it (see
//! ARCHITECTURE.md; `tests/layering.rs` checks it): the command line (in the
//! binary) calls `bench`, `compare`, `serve`, `prune`, `recover`; they use `eval` and
//! `output`, which use the generation layer (`generate`) and the corpora
//! (`data`), which use the model runtime (`model`, `tokenizer`), which uses
//! the kernels (`cpu`, `cuda`) and candle. `energy` reads model shapes only;
//! `metrics` takes plain numbers.
#![warn(missing_docs)]

pub mod bench;
pub mod compare;
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
