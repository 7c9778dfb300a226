//! One thread count for all CPU compute, set once at start-up: the fused
//! step's compute team and rayon's pool (candle's ops, training, pruning)
//! get the same size; only one of them is busy at a time.
//!
//! candle asks for its thread count on every matmul and, when unset, parses
//! /proc/cpuinfo each time (REFERENCE.md: about 30% of decode). Setting
//! `RAYON_NUM_THREADS` before any pool exists fixes both candle's count and
//! the size of rayon's global pool; `CANDLE_NUM_THREADS=1` keeps candle's
//! spinning element-wise pool from competing with it.

/// The number of threads to use when none is given: the cores this process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Fixes the compute thread count for the rest of the process. Call it
/// before any model work and before other threads start.
pub fn init(threads: usize) {
    let n = threads.max(1);
    // Safe in edition 2021; called from main before other threads exist.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    // candle runs large element-wise ops on a second pool of its own whose
    // threads spin at barriers; next to the compute pool that oversubscribes
    // the cores (prefill at 1,000 tokens: +20–25% without it). One thread
    // there keeps those ops on the caller; matmuls still use every thread.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    crate::cpu::team::set_size(n);
    // An already-built pool (a second call) is not an error worth reporting.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
}
