//! Memory bandwidth of the decode kernel: `matvec` over weights the size of
//! a whole model (so they stream from DRAM, not cache), in tiny-coder's row
//! lengths, at 1 and 2 threads and 1–8 rows, held in f32 and in bf16.
//! `cargo bench --bench matvec`;
//! with `MODEL_SHAPED=1`, one decode step's 49 products instead.

use std::time::Instant;

use greencode::cpu::bf16::Bf16Matrix;
use greencode::cpu::matvec::{matvec_into, matvec_multi, Projection, Weights};

fn main() {
    if std::env::var_os("MODEL_SHAPED").is_some() {
        return model_shaped();
    }
    let total = 25_000_000usize; // ≈ tiny-coder's 25 M parameters, 100 MB in f32
    for inp in [384usize, 1024] {
        let out = total / inp;
        // bf16 values, so the same matrix can also be held in bf16.
        let w: Vec<f32> = (0..out * inp)
            .map(|i| half::bf16::from_f32(((i % 97) as f32 - 48.0) / 97.0).to_f32())
            .collect();
        let w16 = Bf16Matrix::from_f32_exact(&w, out, inp).expect("bf16 values");
        for threads in [1usize, 2] {
            for rows in [1usize, 2, 4, 8] {
                let x: Vec<f32> = (0..rows * inp).map(|i| (i % 13) as f32 / 13.0).collect();
                let mut y = vec![0f32; rows * out];
                for (name, weights, bytes) in [("f32 ", Weights::F32(&w), 4), ("bf16", Weights::Bf16(&w16), 2)] {
                    let mut best = f64::INFINITY;
                    // Two threads: the caller and the compute team's helper.
                    for _ in 0..5 {
                        let t = Instant::now();
                        let mut p = [Projection {
                            w: weights,
                            out,
                            y: &mut y,
                        }];
                        matvec_multi(&x, rows, inp, &mut p, threads);
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    println!(
                        "in {inp:5} out {out:6} rows {rows} threads {threads} {name}: {:.1} GB/s of weights ({:.2} ms)",
                        (out * inp * bytes) as f64 / best / 1e9,
                        best * 1e3
                    );
                }
            }
        }
    }
}

/// One decode step's products as the fused step calls them: tiny-coder's 12
/// layers of q+k+v, o, gate+up and down (each its own allocation) and the
/// 16,384-row head, one input row, through `matvec_multi` on the compute
/// team (as the step calls it). Compare its GB/s with the one-matrix
/// figures above: the difference is what 49 calls a token cost.
/// `MODEL_SHAPED=1 cargo bench --bench matvec`.
fn model_shaped() {
    let (hs, ffn, vocab) = (384usize, 1024usize, 16384usize);
    let mat =
        |out: usize, inp: usize| -> Vec<f32> { (0..out * inp).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect() };
    let layers: Vec<[Vec<f32>; 6]> = (0..12)
        .map(|_| {
            [
                mat(384, hs),
                mat(128, hs),
                mat(128, hs),
                mat(hs, 384),
                mat(ffn, hs),
                mat(ffn, hs),
            ]
        })
        .collect();
    let downs: Vec<Vec<f32>> = (0..12).map(|_| mat(hs, ffn)).collect();
    let head = mat(vocab, hs);
    let bytes = 4 * (12 * (384 * hs + 2 * 128 * hs + hs * 384 + 3 * ffn * hs) + vocab * hs);
    let x = vec![0.5f32; ffn];
    let (mut a, mut b, mut c) = (vec![0f32; 384], vec![0f32; 128], vec![0f32; 128]);
    let (mut g, mut u, mut o) = (vec![0f32; ffn], vec![0f32; ffn], vec![0f32; vocab]);
    for threads in [1usize, 2] {
        let mut best = f64::INFINITY;
        for _ in 0..20 {
            let t = Instant::now();
            for (l, down) in layers.iter().zip(&downs) {
                matvec_multi(
                    &x,
                    1,
                    hs,
                    &mut [
                        Projection {
                            w: Weights::F32(&l[0]),
                            out: 384,
                            y: &mut a,
                        },
                        Projection {
                            w: Weights::F32(&l[1]),
                            out: 128,
                            y: &mut b,
                        },
                        Projection {
                            w: Weights::F32(&l[2]),
                            out: 128,
                            y: &mut c,
                        },
                    ],
                    threads,
                );
                matvec_into(&x, &l[3], 1, 384, hs, threads, &mut a);
                matvec_multi(
                    &x,
                    1,
                    hs,
                    &mut [
                        Projection {
                            w: Weights::F32(&l[4]),
                            out: ffn,
                            y: &mut g,
                        },
                        Projection {
                            w: Weights::F32(&l[5]),
                            out: ffn,
                            y: &mut u,
                        },
                    ],
                    threads,
                );
                matvec_into(&x, down, 1, ffn, hs, threads, &mut a);
            }
            matvec_into(&x, &head, 1, hs, vocab, threads, &mut o);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "decode-step shapes (49 calls) threads {threads}: {:.1} GB/s of weights ({:.2} ms a token)",
            bytes as f64 / best / 1e9,
            best * 1e3
        );
    }
}
