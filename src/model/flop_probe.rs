//! A process-wide count of the matrix-multiply FLOPs the forward passes
//! actually execute, so tests can check the analytic count in
//! `energy::flops` against what the kernels do. Counting is one relaxed
//! atomic add per matmul.

use std::sync::atomic::{AtomicU64, Ordering};

static EXECUTED: AtomicU64 = AtomicU64::new(0);

/// Records `flops` executed.
pub fn add(flops: u64) {
    EXECUTED.fetch_add(flops, Ordering::Relaxed);
}

/// FLOPs recorded since the last call, resetting the count.
pub fn take() -> u64 {
    EXECUTED.swap(0, Ordering::Relaxed)
}
