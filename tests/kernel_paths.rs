//! Every weight form's products on every instruction-set path this machine
//! has (`cpu::features::limit` caps the kernels at portable, AVX2, then
//! AVX-512): each decoded row within a stated tolerance of exact
//! arithmetic on the values the kernels hold, and bit-identical whatever
//! the batch and the threads; prompt-sized products for the block types
//! the tiled f32 kernel on the dequantized rows, bit for bit (Q4_K, Q6_K on
//! AVX-512 VNNI: 8-bit integer products, within f32 rounding of the rows
//! decoded alone), and for f32, bf16 and f16 the bits of each row decoded
//! alone. Rows 1, 2, 3,
//! 8, 16 (matrix × vector) and 3, 17, 100 (tiled), odd block counts a row.
//!
//! One test in its own binary: the cap is process-wide, and no other test
//! may run beside it.

mod common;

use greencode::cpu::bf16::Bf16Matrix;
use greencode::cpu::blocks::{BlockMatrix, BlockType};
use greencode::cpu::f16::F16Matrix;
use greencode::cpu::features::{self, Level};
use greencode::cpu::gemm::gemm_multi;
use greencode::cpu::matvec::{matvec, matvec_multi, Projection, Weights};
use greencode::cpu::quant::Q8Matrix;
use rand::{Rng, SeedableRng};

/// Activations: uniform in [-1, 1) from `seed` (8-bit block quantization
/// of rows with outliers far above the rest would lose the rest, in
/// llama.cpp as here).
fn activations(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..rows * cols).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// `[rows, out]` products of `x` with `w` by the decode path (matrix ×
/// vector) or the tiled one, on `threads`.
fn product(w: Weights, out: usize, cols: usize, x: &[f32], rows: usize, threads: usize, tiled: bool) -> Vec<f32> {
    let mut y = vec![0f32; rows * out];
    let mut p = [Projection { w, out, y: &mut y }];
    if tiled {
        gemm_multi(x, rows, cols, &mut p, threads);
    } else {
        matvec_multi(x, rows, cols, &mut p, threads);
    }
    y
}

/// The largest error of the rows `got` against `reference` (rows of the
/// same shape), or against exact arithmetic on `held` (the values the
/// kernels hold) when there is none, relative to Σ|w·x|.
fn worst_error(got: &[Vec<f32>], reference: Option<&[Vec<f32>]>, held: &[f32], x: &[f32], cols: usize) -> f64 {
    let mut worst = 0f64;
    for (r, row) in got.iter().enumerate() {
        for (o, &g) in row.iter().enumerate() {
            let terms = (0..cols).map(|i| held[o * cols + i] as f64 * x[r * cols + i] as f64);
            let want = match reference {
                Some(rows) => rows[r][o] as f64,
                None => terms.clone().sum(),
            };
            let scale: f64 = terms.map(f64::abs).sum();
            worst = worst.max((g as f64 - want).abs() / scale);
        }
    }
    worst
}

/// A form under test: its name, tolerance, columns and matrix.
enum Form {
    Blocks(BlockMatrix),
    Q8(Q8Matrix),
    Bf16(Bf16Matrix),
    F16(F16Matrix),
    F32(Vec<f32>),
}

impl Form {
    fn weights(&self) -> Weights<'_> {
        match self {
            Self::Blocks(m) => Weights::Blocks(m),
            Self::Q8(m) => Weights::Q8(m),
            Self::Bf16(m) => Weights::Bf16(m),
            Self::F16(m) => Weights::F16(m),
            Self::F32(w) => Weights::F32(w),
        }
    }

    fn held(&self) -> Vec<f32> {
        match self {
            Self::Blocks(m) => m.dequantize(),
            Self::Q8(m) => m.dequantize(),
            Self::Bf16(m) => m.to_f32(),
            Self::F16(m) => m.to_f32(),
            Self::F32(w) => w.clone(),
        }
    }

    /// The decode path's tolerance, relative to Σ|w·x|. Block types
    /// quantize the activations to 8 bits per block, as llama.cpp does
    /// (measured: 1.1% Q4_0 and Q5_0 with Q8_0 inputs, 0.7% Q5_1, 0.4% the
    /// k-quants); the others multiply in f32.
    fn tolerance(&self) -> f64 {
        match self {
            Self::Blocks(_) => 2e-2,
            _ => 1e-5,
        }
    }
}

fn forms(out: usize) -> Vec<(String, usize, Form)> {
    let mut v = Vec::new();
    for ty in BlockType::ALL {
        // An odd number of blocks a row: 9 of 32, or 3 of 256.
        let cols = if ty.block_values() == 32 { 9 * 32 } else { 3 * 256 };
        let m = BlockMatrix::quantize(ty, &common::weights(out, cols, 2), out, cols).unwrap();
        v.push((ty.name().to_owned(), cols, Form::Blocks(m)));
    }
    let cols = 9 * 32;
    let w = common::weights(out, cols, 4);
    v.push((
        "q8_0".into(),
        cols,
        Form::Q8(Q8Matrix::quantize(&w, out, cols).unwrap()),
    ));
    let rounded: Vec<f32> = w.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    v.push((
        "bf16".into(),
        cols,
        Form::Bf16(Bf16Matrix::from_f32_exact(&rounded, out, cols).unwrap()),
    ));
    let bytes: Vec<u8> = w.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    v.push((
        "f16".into(),
        cols,
        Form::F16(F16Matrix::from_le_bytes(out, cols, &bytes).unwrap()),
    ));
    // An odd length for the plain f32 kernels.
    let odd = 291;
    v.push(("f32".into(), odd, Form::F32(common::weights(out, odd, 5))));
    v
}

#[test]
fn every_form_on_every_instruction_set_path() {
    greencode::cpu::threads::init(2);
    let out = 37;
    let levels: Vec<Level> = Level::ALL.into_iter().filter(|l| l.available()).collect();
    eprintln!(
        "instruction-set paths on this machine: {levels:?} ({})",
        features::machine()
    );
    for level in levels {
        features::limit(level);
        assert_eq!(features::avx2(), level >= Level::Avx2, "the cap holds");
        assert_eq!(features::avx512(), level >= Level::Avx512, "the cap holds");
        for (name, cols, form) in forms(out) {
            let what = format!("{name} on {}", level.name());
            let w = form.weights();
            let held = form.held();
            let x = activations(100, cols, 3);
            // Each row alone, on one thread: the reference bits.
            let alone: Vec<Vec<f32>> = (0..100)
                .map(|r| product(w, out, cols, &x[r * cols..(r + 1) * cols], 1, 1, false))
                .collect();
            let worst = worst_error(&alone, None, &held, &x, cols);
            assert!(worst < form.tolerance(), "{what}: error {worst:.2e} of Σ|w·x|");
            for rows in [1, 2, 3, 8, 16] {
                for threads in [1, 2] {
                    let y = product(w, out, cols, &x[..rows * cols], rows, threads, false);
                    for (r, want) in alone.iter().enumerate().take(rows) {
                        let got = &y[r * out..(r + 1) * out];
                        assert!(
                            got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{what}: row {r} of {rows} ({threads} threads) differs from the row alone"
                        );
                    }
                }
            }
            // Prompt-sized products: the tiled f32 kernel on the values held,
            // bit for bit, at any row count and thread count.
            for rows in [3, 17, 100] {
                let want = matvec(&x[..rows * cols], &held, rows, cols, out, 1);
                for threads in [1, 2] {
                    let y = product(w, out, cols, &x[..rows * cols], rows, threads, true);
                    if matches!(&form, Form::Blocks(m) if matches!(m.block_type(), BlockType::Q4K | BlockType::Q6K))
                        && rows > greencode::cpu::matvec::MAX_ROWS
                        && features::avx512vnni()
                    {
                        // 8-bit integer products on VNNI: the decode path's
                        // integer sums, scaled in another order.
                        let got: Vec<Vec<f32>> = y.chunks(out).map(<[f32]>::to_vec).collect();
                        let worst = worst_error(&got, Some(&alone[..rows]), &held, &x, cols);
                        assert!(worst < 1e-5, "{what}: VNNI product of {rows} rows: {worst:.2e}");
                    } else if matches!(form, Form::Blocks(_)) {
                        assert!(y == want, "{what}: tiled product of {rows} rows ({threads} threads)");
                    } else if matches!(form, Form::F32(_) | Form::Bf16(_) | Form::F16(_)) {
                        // Widened exactly, these run the decode path's
                        // arithmetic: a prompt row has the bits of the row alone.
                        for (r, want) in alone.iter().enumerate().take(rows) {
                            let got = &y[r * out..(r + 1) * out];
                            assert!(
                                got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{what}: tiled row {r} of {rows} ({threads} threads) differs from the row alone"
                            );
                        }
                    } else {
                        let worst = worst_error(
                            &y.chunks(out).map(<[f32]>::to_vec).collect::<Vec<_>>(),
                            None,
                            &held,
                            &x,
                            cols,
                        );
                        assert!(worst < 1e-5, "{what}: tiled product of {rows} rows: {worst:.2e}");
                    }
                }
            }
        }
    }
}
