//! Row operations of the fused CPU step on host memory: RMSNorm, RoPE,
//! bias, SiLU-gated products, and softmax × values for attention. `exp` is
//! a polynomial over 8 lanes (Cephes' single-precision coefficients, about
//! 1 ulp off the correctly rounded value) with AVX2+FMA when the CPU has
//! them, a scalar twin of the same polynomial otherwise. Decoding and
//! prompts call the same functions, so a token gets the same bits either way.

use super::gemm::WeightElem;

/// Adds `b` to every `b.len()`-wide row of `y`.
pub(crate) fn add_bias(y: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        for row in y.chunks_exact_mut(b.len()) {
            for (o, bias) in row.iter_mut().zip(b) {
                *o += bias;
            }
        }
    }
}

/// RMSNorm of each `dim`-wide row of `x` into `y`, as candle computes it.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, dim: usize, y: &mut [f32]) {
    for (src, dst) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let sum2: f32 = src.iter().map(|v| v * v).sum();
        let m = (sum2 / dim as f32 + eps).sqrt();
        for ((d, s), a) in dst.iter_mut().zip(src).zip(w) {
            *d = *s / m * *a;
        }
    }
}

/// Rotates each `hd`-wide head of `x` for position `pos` (halves rotated, as HF's `rotate_half`).
pub(crate) fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], hd: usize, pos: usize) {
    let half = hd / 2;
    let (cos, sin) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
    for head in x.chunks_exact_mut(hd) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// `gate[i] = silu(gate[i]) · up[i]`.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
            return unsafe { avx2::silu_mul(gate, up) };
        }
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp_scalar(-*g)) * u;
    }
}

/// Softmax of `scores` (one query's scores over its visible keys, in
/// order) applied to the value rows `v` (`[len, hd]`), written to `out`
/// (`hd` wide). `scores` is overwritten.
#[cfg(test)]
pub(crate) fn softmax_values(scores: &mut [f32], v: &[f32], hd: usize, out: &mut [f32]) {
    assert!(v.len() >= scores.len() * hd && out.len() == hd);
    let len = scores.len();
    softmax_values_heads(scores, len, 1, len, &[v], hd, out);
}

/// [`softmax_values`] for `heads` query heads that share one key/value head
/// (grouped-query attention): head `h`'s scores are
/// `scores[h·stride..h·stride + len]`, its output `out[h·hd..(h + 1)·hd]`.
/// The value rows are read once for all the heads instead of once per head;
/// every output has the bits [`softmax_values`] gives it (same sums, same
/// order).
pub(crate) fn softmax_values_heads<W: WeightElem>(
    scores: &mut [f32],
    stride: usize,
    heads: usize,
    len: usize,
    v: &[&[W]],
    hd: usize,
    out: &mut [f32],
) {
    assert!(heads > 0 && len <= stride && scores.len() >= (heads - 1) * stride + len);
    assert!(v.iter().map(|c| c.len() / hd).sum::<usize>() >= len && out.len() >= heads * hd);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() && hd.is_multiple_of(8) && hd <= 256 {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above);
            // the lengths were asserted above.
            return unsafe { avx2::softmax_values_heads(scores, stride, heads, len, v, hd, out) };
        }
    }
    for h in 0..heads {
        let scores = &mut scores[h * stride..h * stride + len];
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = exp_scalar(*s - max);
            sum += *s;
        }
        let out = &mut out[h * hd..(h + 1) * hd];
        out.fill(0.0);
        for (p, row) in scores.iter().zip(v.iter().flat_map(|c| c.chunks_exact(hd))) {
            for (o, vv) in out.iter_mut().zip(row) {
                *o = p.mul_add(vv.to_f32(), *o);
            }
        }
        let inv = 1.0 / sum;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    super::features::avx2()
}

/// Cephes' `expf` constants: the range, ln 2 split in two, the polynomial.
const EXP_HI: f32 = 88.376_26;
const EXP_LO: f32 = -87.336_54;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` by the same steps as the AVX2 lanes.
pub(crate) fn exp_scalar(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let p = p.mul_add(r * r, r + 1.0);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{WeightElem, EXP_HI, EXP_LO, LN2_HI, LN2_LO, LOG2E, P};

    /// `e^x` on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let full = n / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 ≤ full ≤ the length of both slices.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let y = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
                _mm256_storeu_ps(gate.as_mut_ptr().add(i), y);
            }
            i += 8;
        }
        for j in full..n {
            gate[j] = gate[j] / (1.0 + super::exp_scalar(-gate[j])) * up[j];
        }
    }

    /// See [`super::softmax_values_heads`]; `hd` is a multiple of 8, at most 256.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn softmax_values_heads<W: WeightElem>(
        scores: &mut [f32],
        stride: usize,
        heads: usize,
        len: usize,
        v: &[&[W]],
        hd: usize,
        out: &mut [f32],
    ) {
        let mut sums = [0f32; 3];
        let mut h0 = 0;
        while h0 < heads {
            let n = (heads - h0).min(3);
            for (i, sum) in sums.iter_mut().enumerate().take(n) {
                let at = (h0 + i) * stride;
                *sum = exponentiate(&mut scores[at..at + len]);
            }
            let (scores_at, out_at) = (scores.as_ptr(), out.as_mut_ptr());
            // Head h0 + i, i < n (each arm below asks only for those).
            let p = |i: usize| scores_at.wrapping_add((h0 + i) * stride);
            let o = |i: usize| out_at.wrapping_add((h0 + i) * hd);
            // Up to three heads × 32 columns: 12 accumulators, each value
            // vector loaded once for the three.
            let mut col = 0;
            while col < hd {
                let wide = col + 32 <= hd;
                // SAFETY: every head's scores hold `len` floats, the chunks
                // of `v` at least `len · hd` and each output `hd` (asserted by the caller);
                // `col + 32 ≤ hd` (or `+ 8` for the narrow tile).
                unsafe {
                    match (n, wide) {
                        (3, true) => {
                            weigh_values::<W, 3, 4>([p(0), p(1), p(2)], len, v, hd, col, [o(0), o(1), o(2)], sums)
                        }
                        (2, true) => {
                            weigh_values::<W, 2, 4>([p(0), p(1)], len, v, hd, col, [o(0), o(1)], [sums[0], sums[1]])
                        }
                        (1, true) => weigh_values::<W, 1, 4>([p(0)], len, v, hd, col, [o(0)], [sums[0]]),
                        (3, false) => {
                            weigh_values::<W, 3, 1>([p(0), p(1), p(2)], len, v, hd, col, [o(0), o(1), o(2)], sums)
                        }
                        (2, false) => {
                            weigh_values::<W, 2, 1>([p(0), p(1)], len, v, hd, col, [o(0), o(1)], [sums[0], sums[1]])
                        }
                        _ => weigh_values::<W, 1, 1>([p(0)], len, v, hd, col, [o(0)], [sums[0]]),
                    }
                }
                col += if wide { 32 } else { 8 };
            }
            h0 += n;
        }
    }

    /// Softmax numerators of one row of scores, in place (`e^(s − max)`),
    /// and their sum.
    #[target_feature(enable = "avx2,fma")]
    fn exponentiate(scores: &mut [f32]) -> f32 {
        let len = scores.len();
        let full = len / 8 * 8;
        // SAFETY (all loads and stores below): offsets stay below `full`.
        unsafe {
            let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i < full {
                vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(scores.as_ptr().add(i)));
                i += 8;
            }
            let lanes: [f32; 8] = std::mem::transmute(vmax);
            let max = scores[full..]
                .iter()
                .chain(&lanes)
                .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let vm = _mm256_set1_ps(max);
            let mut vsum = _mm256_setzero_ps();
            let mut i = 0;
            while i < full {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores.as_ptr().add(i)), vm));
                _mm256_storeu_ps(scores.as_mut_ptr().add(i), e);
                vsum = _mm256_add_ps(vsum, e);
                i += 8;
            }
            let lanes: [f32; 8] = std::mem::transmute(vsum);
            let mut sum = lanes.iter().sum::<f32>();
            for s in &mut scores[full..] {
                *s = super::exp_scalar(*s - max);
                sum += *s;
            }
            sum
        }
    }

    /// `out[h][col..col + 8·B] = Σ_j p[h][j] · v[j][col..col + 8·B] / sum[h]`
    /// for `H` heads, the value rows `j` taken in order through the chunks
    /// of `v`: one FMA per row and lane, so every lane has the same bits
    /// whatever `H`, `B` and the chunking are.
    ///
    /// # Safety
    /// `p[h]` holds `len` floats, the chunks of `v` at least `len` rows of
    /// `hd`, `out[h]` `hd`, and `col + 8·B ≤ hd`.
    #[inline]
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weigh_values<W: WeightElem, const H: usize, const B: usize>(
        p: [*const f32; H],
        len: usize,
        v: &[&[W]],
        hd: usize,
        col: usize,
        out: [*mut f32; H],
        sum: [f32; H],
    ) {
        let mut acc = [[_mm256_setzero_ps(); B]; H];
        let mut j = 0;
        for chunk in v {
            if j == len {
                break;
            }
            let rows = (chunk.len() / hd).min(len - j);
            let base = chunk.as_ptr().add(col);
            for i in 0..rows {
                let mut w = [_mm256_setzero_ps(); H];
                for h in 0..H {
                    w[h] = _mm256_set1_ps(*p[h].add(j + i));
                }
                let row = base.add(i * hd);
                for b in 0..B {
                    let x = W::load8(row.add(b * 8));
                    for h in 0..H {
                        acc[h][b] = _mm256_fmadd_ps(w[h], x, acc[h][b]);
                    }
                }
            }
            j += rows;
        }
        for h in 0..H {
            let inv = _mm256_set1_ps(1.0 / sum[h]);
            for b in 0..B {
                _mm256_storeu_ps(out[h].add(col + b * 8), _mm256_mul_ps(acc[h][b], inv));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_the_range_attention_and_silu_use() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_scalar(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_scalar(-1e30), exp_scalar(EXP_LO));
        assert!(exp_scalar(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn vector_lanes_equal_the_scalar_twin() {
        let g: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.37).collect();
        let u: Vec<f32> = (0..203).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut got = g.clone();
        silu_mul(&mut got, &u);
        for ((y, g), u) in got.iter().zip(&g).zip(&u) {
            let want = g / (1.0 + exp_scalar(-g)) * u;
            assert_eq!(y.to_bits(), want.to_bits(), "silu({g}) · {u}");
        }
    }

    #[test]
    fn heads_sharing_chunked_values_get_the_bits_of_one_head_at_a_time() {
        for (heads, len, stride, hd) in [
            (1, 9, 9, 64),
            (2, 33, 40, 64),
            (3, 130, 131, 64),
            (7, 17, 20, 128),
            (4, 5, 8, 40),
            (3, 1, 1, 8),
        ] {
            let scores: Vec<f32> = (0..heads * stride)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.31)
                .collect();
            let v: Vec<f32> = (0..len * hd).map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0).collect();
            let mut together = vec![0f32; heads * hd];
            // In chunks of 5 rows, as a paged cache hands its blocks over.
            let chunks: Vec<&[f32]> = v.chunks(5 * hd).collect();
            softmax_values_heads(&mut scores.clone(), stride, heads, len, &chunks, hd, &mut together);
            for h in 0..heads {
                let mut alone = vec![0f32; hd];
                softmax_values(&mut scores[h * stride..h * stride + len].to_vec(), &v, hd, &mut alone);
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&together[h * hd..(h + 1) * hd]),
                    bits(&alone),
                    "heads {heads} len {len} hd {hd} head {h}"
                );
            }
        }
    }

    #[test]
    fn softmax_values_matches_a_plain_softmax() {
        for (len, hd) in [(1, 8), (7, 64), (33, 64), (130, 128), (5, 12)] {
            let scores: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
            let v: Vec<f32> = (0..len * hd).map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0).collect();
            let mut out = vec![0f32; hd];
            softmax_values(&mut scores.clone(), &v, hd, &mut out);
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                let want: f64 = (0..len).map(|j| e[j] / sum * v[j * hd + d] as f64).sum();
                assert!(
                    (out[d] as f64 - want).abs() < 1e-5,
                    "len {len} hd {hd} d {d}: {} vs {want}",
                    out[d]
                );
            }
        }
    }
}
