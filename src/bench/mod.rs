//! The benchmarks and load generators behind `greencode bench`: one
//! sequence end to end (`generate`), sequences decoded together through the
//! serving step (`batch`), concurrent streaming clients against a server
//! (`serve`), an editor's keystrokes each cancelling the completion before
//! (`editor`), many short and abandoned requests (`soak`), the cost of a
//! speculative verify step against a plain one (`verify`), the custom
//! kernels against the candle path (`kernels`), and the `greencode serve`
//! child process the load generators start (`server`, shared with the
//! integration tests), and the memory bandwidth the floors divide by
//! (`bandwidth`).

pub mod bandwidth;
pub mod batch;
pub mod editor;
pub mod generate;
pub mod kernels;
pub mod serve;
pub mod server;
pub mod soak;
pub mod verify;

pub use generate::{bench_generate, bench_prompt, check_fits, BenchConfig, BenchReport, Spread};
