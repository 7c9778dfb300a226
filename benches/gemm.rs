//! Prompt-sized products: greencode's tiled kernel (`cpu::gemm`) against
//! candle's matmul (the `gemm` crate) on tiny-coder's projection shapes for
//! a 256-token prompt, at 1 and 2 threads. `cargo bench --bench gemm`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use greencode::cpu::gemm::gemm_multi;
use greencode::cpu::matvec::{Projection, Weights};

fn best_of(n: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..n {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let rows = 256usize;
    for threads in [1usize, 2] {
        // candle reads its thread count from the environment once per process;
        // run the bench twice with CANDLE_NUM_THREADS=1 / 2 to compare at each.
        // Ours runs on the compute team (the cores available) when `threads`
        // > 1; the rayon pool is candle's.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for (name, k, n) in [
            ("q+k+v", 384usize, 640usize),
            ("o", 384, 384),
            ("gate+up", 384, 2048),
            ("down", 1024, 384),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i % 13) as f32 - 6.0) / 13.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
            let mut y = vec![0f32; rows * n];
            let ours = best_of(20, || {
                let mut p = [Projection {
                    w: Weights::F32(&w),
                    out: n,
                    y: &mut y,
                }];
                gemm_multi(&x, rows, k, &mut p, threads)
            });
            let xt = Tensor::from_slice(&x, (rows, k), &Device::Cpu).unwrap();
            let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu).unwrap();
            let theirs = pool.install(|| best_of(20, || drop(xt.matmul(&wt.t().unwrap()).unwrap())));
            let flops = 2.0 * (rows * k * n) as f64;
            println!(
                "{name:8} [{rows}x{k}]·[{n}x{k}]ᵀ threads {threads}: greencode {:.1} GFLOP/s, candle {:.1} GFLOP/s ({:.2}×)",
                flops / ours / 1e9,
                flops / theirs / 1e9,
                theirs / ours
            );
        }
    }
}
