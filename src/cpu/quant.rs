//! Q8_0 weights for decoding: each row in blocks of 32 signed bytes with one
//! scale, quantized exactly as ggml does (scale = max |w| / 127 rounded to
//! f16, q = round(w / scale)), so the values equal those of a Q8_0 GGUF.
//! A decode step streams a quarter of the f32 bytes; the dot product turns
//! each block back into floats on the fly against f32 activations.

use half::f16;

/// Values per block.
pub const BLOCK: usize = 32;

/// A `[rows, cols]` matrix in Q8_0 (`cols` a multiple of [`BLOCK`]).
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// One scale per block, row-major (`rows × cols / 32`).
    scales: Vec<f32>,
    /// The quantized values, row-major.
    qs: Vec<i8>,
}

impl Q8Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix; `None` when `cols` is not
    /// a multiple of [`BLOCK`].
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return None;
        }
        let mut scales = Vec::with_capacity(rows * cols / BLOCK);
        let mut qs = Vec::with_capacity(rows * cols);
        for block in w.chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            scales.push(f16::from_f32(d).to_f32());
            qs.extend(block.iter().map(|v| (v * id).round() as i8));
        }
        Some(Self { rows, cols, scales, qs })
    }

    /// Takes the bytes of a GGUF Q8_0 tensor of `[rows, cols]` (blocks of an
    /// f16 scale and 32 signed bytes); `None` when the sizes disagree.
    pub fn from_ggml_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        const BLOCK_BYTES: usize = 2 + BLOCK;
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * cols / BLOCK * BLOCK_BYTES {
            return None;
        }
        let mut scales = Vec::with_capacity(rows * cols / BLOCK);
        let mut qs = Vec::with_capacity(rows * cols);
        for block in bytes.chunks_exact(BLOCK_BYTES) {
            scales.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            qs.extend(block[2..].iter().map(|&b| b as i8));
        }
        Some(Self { rows, cols, scales, qs })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The matrix back in f32 (`scale × q`), row-major; rows in parallel.
    pub fn dequantize(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols.max(1))
            .enumerate()
            .for_each(|(r, dst)| self.dequantize_row(r, dst));
        out
    }

    /// Row `r` in f32 (`scale × q`) into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (values, scales) = self.row(r);
        for ((dst, block), &d) in out.chunks_exact_mut(BLOCK).zip(values.chunks_exact(BLOCK)).zip(scales) {
            for (o, &v) in dst.iter_mut().zip(block) {
                *o = v as f32 * d;
            }
        }
    }

    /// Bytes held (values and scales).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * self.scales.len()
    }

    /// Row `r`'s values and block scales.
    pub fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let nb = self.cols / BLOCK;
        (
            &self.qs[r * self.cols..(r + 1) * self.cols],
            &self.scales[r * nb..(r + 1) * nb],
        )
    }
}

/// `Σ scale_b · Σ q·x` over the blocks of one row: the portable version.
fn dot_q8_portable(q: &[i8], d: &[f32], x: &[f32]) -> f32 {
    q.chunks_exact(BLOCK)
        .zip(d)
        .zip(x.chunks_exact(BLOCK))
        .map(|((qb, &db), xb)| db * qb.iter().zip(xb).map(|(&a, &b)| a as f32 * b).sum::<f32>())
        .sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_q8_avx2(q: &[i8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = d.len();
    assert!(q.len() >= nb * BLOCK && x.len() >= nb * BLOCK);
    // SAFETY: block b reads q[32b..32b+32] and x[32b..32b+32], inside both
    // slices (asserted above); AVX2 and FMA are enabled for this function.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            let qp = q.as_ptr().add(b * BLOCK);
            let xp = x.as_ptr().add(b * BLOCK);
            // As in the AVX-512 kernel: the values 2 KB on.
            if b % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(32 * 64));
            }
            let mut sum = _mm256_setzero_ps();
            for k in 0..4 {
                let bytes = _mm_loadl_epi64(qp.add(8 * k) as *const __m128i);
                let vals = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
                sum = _mm256_fmadd_ps(vals, _mm256_loadu_ps(xp.add(8 * k)), sum);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(*d.get_unchecked(b)), sum, acc);
        }
        let lanes: [f32; 8] = std::mem::transmute(acc);
        lanes.iter().sum()
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn dot_q8_avx512(q: &[i8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = d.len();
    assert!(q.len() >= nb * BLOCK && x.len() >= nb * BLOCK);
    // SAFETY: block b reads q[32b..32b+32] and x[32b..32b+32], inside both
    // slices (asserted above); AVX-512F is enabled for this function.
    unsafe {
        let mut acc = _mm512_setzero_ps();
        for b in 0..nb {
            let qp = q.as_ptr().add(b * BLOCK);
            let xp = x.as_ptr().add(b * BLOCK);
            // The values 2 KB on (the next rows), one line per two blocks:
            // +40% decode on the 1.5B Q8_0 file against none (0.25, 0.5, 1
            // and 4 KB gave less). A hint: past the end it only wastes a fetch.
            if b % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(32 * 64));
            }
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp as *const __m128i)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(16) as *const __m128i)));
            let sum = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(16)), _mm512_mul_ps(lo, _mm512_loadu_ps(xp)));
            acc = _mm512_fmadd_ps(_mm512_set1_ps(*d.get_unchecked(b)), sum, acc);
        }
        _mm512_reduce_add_ps(acc)
    }
}

/// A Q8_0 × f32 dot product: `(values, scales, x)`.
pub type DotQ8 = fn(&[i8], &[f32], &[f32]) -> f32;

/// The best Q8_0 × f32 dot product this CPU supports (AVX-512F where
/// present, else AVX2 + FMA, else portable).
pub fn dot_q8_kernel() -> DotQ8 {
    #[cfg(target_arch = "x86_64")]
    {
        if super::features::avx512() {
            // SAFETY: the CPU supports AVX-512F, AVX2 and FMA (checked just above).
            return |q, d, x| unsafe { dot_q8_avx512(q, d, x) };
        }
        if super::features::avx2() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
            return |q, d, x| unsafe { dot_q8_avx2(q, d, x) };
        }
    }
    dot_q8_portable
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn sample(n: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919) % 1013) as f32 - 506.0) / 97.0).collect()
    }

    #[test]
    fn values_equal_ggml_q8_0() {
        let (rows, cols) = (7, 96);
        let w = sample(rows * cols);
        let ours = Q8Matrix::quantize(&w, rows, cols).unwrap().dequantize();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let theirs: Vec<f32> = QTensor::quantize(&t, GgmlDType::Q8_0)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ours, theirs);
        assert!(Q8Matrix::quantize(&sample(40), 1, 40).is_none());
    }

    #[test]
    fn dot_equals_the_dequantized_product() {
        let (rows, cols) = (5, 384);
        let w = sample(rows * cols);
        let m = Q8Matrix::quantize(&w, rows, cols).unwrap();
        let deq = m.dequantize();
        let x: Vec<f32> = (0..cols).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
        // Every kernel this machine can run, not only the one chosen.
        let mut kernels: Vec<(&str, DotQ8)> = vec![("portable", dot_q8_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu::features::avx2() {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                kernels.push(("avx2", |q, d, x| unsafe { dot_q8_avx2(q, d, x) }));
            }
            if crate::cpu::features::avx512() {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                kernels.push(("avx512", |q, d, x| unsafe { dot_q8_avx512(q, d, x) }));
            }
        }
        kernels.push(("chosen", dot_q8_kernel()));
        for r in 0..rows {
            let (q, d) = m.row(r);
            let want: f64 = deq[r * cols..(r + 1) * cols]
                .iter()
                .zip(&x)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            for (name, dot) in &kernels {
                let got = dot(q, d, &x);
                assert!(
                    (got as f64 - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "{name}: {got} vs {want}"
                );
            }
        }
    }
}
