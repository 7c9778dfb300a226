//! Memory bandwidth of the decode kernel: `matvec` over weights the size of
//! a whole model (so they stream from DRAM, not cache), in tiny-coder's row
//! lengths, at 1 and 2 threads and 1–8 rows. `cargo bench --bench matvec`.

use std::time::Instant;

use greencode::model::matvec::matvec_into;

fn main() {
    let total = 25_000_000usize; // ≈ tiny-coder's 25 M parameters, 100 MB in f32
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    for inp in [384usize, 1024] {
        let out = total / inp;
        let w: Vec<f32> = (0..out * inp).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
        for threads in [1usize, 2] {
            for rows in [1usize, 2, 4, 8] {
                let x: Vec<f32> = (0..rows * inp).map(|i| (i % 13) as f32 / 13.0).collect();
                let mut y = vec![0f32; rows * out];
                let mut best = f64::INFINITY;
                pool(threads).install(|| {
                    for _ in 0..5 {
                        let t = Instant::now();
                        matvec_into(&x, &w, rows, inp, out, threads, &mut y);
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                });
                println!(
                    "in {inp:5} out {out:6} rows {rows} threads {threads}: {:.1} GB/s of weights ({:.2} ms)",
                    (out * inp * 4) as f64 / best / 1e9,
                    best * 1e3
                );
            }
        }
    }
}
