//! Matrix × vector (and × a few vectors) for decoding: `y = x·Wᵀ` with
//! `W` `[out, in]` row-major, streaming each weight row once and reusing it
//! for every input row (the register tiles of `gemm`: three weight rows by
//! up to four input rows share every load). Matrices above
//! [`PARALLEL_MIN_WEIGHTS`] are split over the compute threads by output
//! features. The arithmetic is `gemm`'s, so a row's result has the same
//! bits whether it is computed alone, in a group, or in a prompt, and
//! batching does not change a sequence's tokens.
//!
//! Measured on the 2-vCPU dev machine (`cargo bench --bench matvec`): one
//! input row streams 100 MB of f32 weights at 15–17 GB/s on one thread and
//! 24–31 GB/s on two, the machine's bandwidth; the same matrix held in bf16
//! (50 MB) takes 0.5–0.65 of the time.

use super::blocks::{BlockMatrix, QuantizedInput};
use super::gemm::{split_columns, tiles};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape};

/// Most input rows for which the matrix-vector path is used.
pub const MAX_ROWS: usize = 16;

/// `y[r, o] = Σᵢ x[r, i] · w[o, i]` for `rows` input rows; `y` is `[rows, out]`.
pub fn matvec(x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize, threads: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * out];
    matvec_into(x, w, rows, inp, out, threads, &mut y);
    y
}

/// Weights below this many elements (4 MB of f32) are multiplied on one
/// thread: waking the pool costs more than it saves.
pub const PARALLEL_MIN_WEIGHTS: usize = 1 << 16;

/// [`matvec`] into a caller-owned `y` (`[rows, out]`, overwritten). Each
/// weight row is read once and used for every input row; the output
/// features are split over `threads` when the matrix is large enough.
/// Every `y[r, o]` is the same dot product whatever `rows` and `threads`
/// are, so results do not depend on the batch.
pub fn matvec_into(x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize, threads: usize, y: &mut [f32]) {
    matvec_multi(
        x,
        rows,
        inp,
        &mut [Projection {
            w: Weights::F32(w),
            out,
            y,
        }],
        threads,
    );
}

/// One weight matrix of a [`matvec_multi`] call and where its product goes.
pub struct Projection<'a> {
    /// `[out, in]` weights.
    pub w: Weights<'a>,
    /// Output features (rows of `w`).
    pub out: usize,
    /// `[rows, out]` result, overwritten.
    pub y: &'a mut [f32],
}

/// A weight matrix as the kernels read it.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    /// f32, row-major.
    F32(&'a [f32]),
    /// Q8_0 blocks.
    Q8(&'a super::quant::Q8Matrix),
    /// bf16, row-major (widened exactly to f32 by the kernels).
    Bf16(&'a super::bf16::Bf16Matrix),
    /// llama.cpp's block formats (Q4_K, Q6_K, Q5_0, …), dotted against
    /// quantized activations.
    Blocks(&'a super::blocks::BlockMatrix),
    /// f16, row-major (widened exactly to f32 by the kernels).
    F16(&'a super::f16::F16Matrix),
}

impl Weights<'_> {
    /// The form's name as llama.cpp writes it (`f32`, `bf16`, `f16`,
    /// `q8_0`, `q4_K`, …).
    pub fn format(&self) -> &'static str {
        match self {
            Self::F32(_) => "f32",
            Self::Bf16(_) => "bf16",
            Self::F16(_) => "f16",
            Self::Q8(_) => "q8_0",
            Self::Blocks(m) => m.block_type().name(),
        }
    }

    /// Whether the values were quantized (Q8_0 and the block formats; f16
    /// and bf16 hold exact values).
    pub fn quantized(&self) -> bool {
        matches!(self, Self::Q8(_) | Self::Blocks(_))
    }

    pub(crate) fn covers(&self, out: usize, inp: usize) -> bool {
        match self {
            Self::F32(w) => w.len() >= out * inp,
            Self::Q8(m) => m.rows() >= out && m.cols() == inp,
            Self::Bf16(m) => m.rows() >= out && m.cols() == inp,
            Self::Blocks(m) => m.rows() >= out && m.cols() == inp,
            Self::F16(m) => m.rows() >= out && m.cols() == inp,
        }
    }

    /// Row `r` in f32 into `out` (the row's length).
    pub(crate) fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            Self::F32(w) => out.copy_from_slice(&w[r * out.len()..(r + 1) * out.len()]),
            Self::Q8(m) => m.dequantize_row(r, out),
            Self::Bf16(m) => m.row_to_f32(r, out),
            Self::Blocks(m) => m.dequantize_row(r, out),
            Self::F16(m) => m.row_to_f32(r, out),
        }
    }
}

/// Several products of the same input `x` (`[rows, inp]`), e.g. the query,
/// key and value projections, in one parallel pass: the output features of
/// all matrices together are split evenly over `threads`, so the threads
/// meet once instead of once per matrix.
pub fn matvec_multi(x: &[f32], rows: usize, inp: usize, projections: &mut [Projection<'_>], threads: usize) {
    let dot_q8 = super::quant::dot_q8_kernel();
    let inputs = QuantizedInputs::of(x, rows, projections);
    let total: usize = projections.iter().map(|p| p.out).sum();
    let threads = if total * inp < PARALLEL_MIN_WEIGHTS {
        1
    } else {
        threads.max(1)
    };
    let chunk = total.div_ceil(threads);
    split_columns(x, rows, inp, projections, chunk, threads > 1, |w, cols, y| match w {
        // SAFETY (both stores): this chunk alone writes these columns.
        Weights::F32(w) => tiles(x, inp, rows, w, inp, cols, inp, |r, c, v| unsafe { y.store(r, c, v) }),
        // SAFETY: as above.
        Weights::Bf16(m) => tiles(x, inp, rows, m.values(), inp, cols, inp, |r, c, v| unsafe {
            y.store(r, c, v)
        }),
        // SAFETY: as above.
        Weights::F16(m) => tiles(x, inp, rows, m.values(), inp, cols, inp, |r, c, v| unsafe {
            y.store(r, c, v)
        }),
        Weights::Q8(m) => {
            for o in cols {
                let (q, d) = m.row(o);
                for r in 0..rows {
                    // SAFETY: as above.
                    unsafe { y.store(r, o, dot_q8(q, d, &x[r * inp..(r + 1) * inp])) };
                }
            }
        }
        // SAFETY: as above.
        Weights::Blocks(m) => m.product(inputs.of_matrix(m), rows, cols, |r, c, v| unsafe { y.store(r, c, v) }),
    });
}

/// The activation rows quantized once per call for the block-format
/// matrices of a product (one copy per partner type).
pub(crate) struct QuantizedInputs(Vec<QuantizedInput>);

impl QuantizedInputs {
    /// Quantizes `x` once for each partner type the block-format matrices
    /// among `projections` need (query, key and value in Q4_K share one).
    pub(crate) fn of(x: &[f32], rows: usize, projections: &[Projection<'_>]) -> Self {
        let mut inputs: Vec<QuantizedInput> = Vec::new();
        for p in projections {
            if let Weights::Blocks(m) = p.w {
                if !inputs.iter().any(|i| i.serves(m.block_type())) {
                    inputs.push(m.quantize_input(x, rows));
                }
            }
        }
        Self(inputs)
    }

    /// The input quantized for `m`.
    pub(crate) fn of_matrix(&self, m: &BlockMatrix) -> &QuantizedInput {
        self.0
            .iter()
            .find(|i| i.serves(m.block_type()))
            .expect("every block matrix of the product was quantized for")
    }
}

/// candle op: `x [rows, in]` × `w [out, in]`ᵀ → `[rows, out]`, f32 on the CPU.
pub struct MatVecOp;

impl CustomOp2 for MatVecOp {
    fn name(&self) -> &'static str {
        "greencode-matvec"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("greencode-matvec: f32 tensors only");
        };
        let (rows, inp) = l1.shape().dims2()?;
        let (out, inp_w) = l2.shape().dims2()?;
        if inp != inp_w {
            candle_core::bail!("greencode-matvec: x has {inp} columns, w has {inp_w}");
        }
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("greencode-matvec: contiguous tensors only");
        };
        let threads = candle_core::utils::get_num_threads();
        let y = matvec(&x[x0..x1], &w[w0..w1], rows, inp, out, threads);
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                y[r * out + o] = (0..inp)
                    .map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn equals_the_plain_product_on_random_and_odd_shapes() {
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(rows, inp, out) in &[
            (1, 1, 1),
            (1, 17, 33),
            (3, 384, 129),
            (16, 1000, 7),
            (2, 15, 500),
            (5, 1024, 384),
            (1, 384, 16384),
        ] {
            let x: Vec<f32> = (0..rows * inp).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..out * inp).map(|_| rnd()).collect();
            let want = plain(&x, &w, rows, inp, out);
            for threads in [1, 2, 3] {
                let got = matvec(&x, &w, rows, inp, out, threads);
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{rows}x{inp}x{out} t{threads}: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_has_the_same_bits_alone_and_in_any_batch() {
        let (inp, out) = (389, 70);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 313.0)
            .collect();
        let x: Vec<f32> = (0..9 * inp)
            .map(|i| ((i * 104729 % 997) as f32 - 498.0) / 211.0)
            .collect();
        let batched = matvec(&x, &w, 9, inp, out, 2);
        for r in 0..9 {
            let alone = matvec(&x[r * inp..(r + 1) * inp], &w, 1, inp, out, 1);
            assert_eq!(alone, batched[r * out..(r + 1) * out], "row {r}");
        }
    }
}
