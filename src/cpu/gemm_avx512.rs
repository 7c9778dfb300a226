//! Prompt-sized products on AVX-512 with the bits of the AVX2 tiles.
//!
//! Every output of [`super::gemm`] is one 8-lane accumulator over 8-float
//! steps, summed as a tree, plus the tail. A 16-lane register would change
//! that order; instead each 512-bit register carries two weight rows side
//! by side (lanes 0–7 row `c`, lanes 8–15 row `c + 1`, the same 8 floats
//! of `k` each), against the input's 8 floats broadcast to both halves.
//! Each half runs exactly the AVX2 lane arithmetic, so a prompt's rows keep
//! the bits a decoded token has, at twice the work per instruction (one
//! core here: 233 against 129 GFLOP/s of FMA).
//!
//! The weight rows of a task are written pair-interleaved into a buffer
//! once (they are widened to f32 into a buffer anyway for every format but
//! f32), then register tiles of 4 input rows × 3 row pairs (12 FMAs of 16
//! lanes per 3 weight loads and 4 broadcasts) run over L2-sized blocks.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Input rows per register tile.
const TILE_ROWS: usize = 4;
/// Weight row pairs per register tile.
const TILE_PAIRS: usize = 3;

/// Whether the paired tiles run here.
pub fn available() -> bool {
    super::features::avx512()
}

/// Weight rows (`rows` of `k` f32 values, row-major in `w`) pair-interleaved
/// into `out`: for each pair, its 8-float steps `[row a | row b]`, then row
/// a's tail and row b's tail (`k % 8` each). An odd last row pairs with zeros.
pub fn interleave(w: &[f32], rows: usize, k: usize, out: &mut Vec<f32>) {
    let full = k / 8 * 8;
    let pairs = rows.div_ceil(2);
    out.clear();
    out.resize(pairs * 2 * k, 0.0);
    for p in 0..pairs {
        let dst = &mut out[p * 2 * k..(p + 1) * 2 * k];
        for half in 0..2 {
            let row = 2 * p + half;
            if row >= rows {
                continue;
            }
            let src = &w[row * k..(row + 1) * k];
            for s in 0..full / 8 {
                dst[16 * s + 8 * half..16 * s + 8 * half + 8].copy_from_slice(&src[8 * s..8 * s + 8]);
            }
            let tail = k - full;
            dst[2 * full + half * tail..2 * full + (half + 1) * tail].copy_from_slice(&src[full..]);
        }
    }
}

/// `store(r, c, Σᵢ x[r·ldx + i] · w[c][i])` for every input row `r <
/// rows` and weight row `c < cols` of a buffer from [`interleave`]. The CPU
/// must have AVX-512F ([`available`]).
pub fn tiles(
    x: &[f32],
    ldx: usize,
    rows: usize,
    paired: &[f32],
    cols: usize,
    k: usize,
    mut store: impl FnMut(usize, usize, f32),
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(available(), "the paired tiles need AVX-512F");
    assert!(x.len() >= (rows - 1) * ldx + k && paired.len() >= cols.div_ceil(2) * 2 * k);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (asserted) and every read lies inside `x`
    // and `paired` (asserted above).
    unsafe {
        blocks(x, ldx, rows, paired, cols, k, &mut store)
    }
}

/// Row pairs per L2 block: about 192 KB of f32 values.
fn block_pairs(k: usize) -> usize {
    ((24 * 1024 / k.max(1)) / TILE_PAIRS * TILE_PAIRS).max(TILE_PAIRS)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn blocks(
    x: &[f32],
    ldx: usize,
    rows: usize,
    paired: &[f32],
    cols: usize,
    k: usize,
    store: &mut impl FnMut(usize, usize, f32),
) {
    let pairs = cols.div_ceil(2);
    let step = block_pairs(k);
    for p0 in (0..pairs).step_by(step) {
        let p1 = (p0 + step).min(pairs);
        for r in (0..rows).step_by(TILE_ROWS) {
            let rn = TILE_ROWS.min(rows - r);
            let mut p = p0;
            while p < p1 {
                let pn = TILE_PAIRS.min(p1 - p);
                let xt = x.as_ptr().add(r * ldx);
                let wt = paired.as_ptr().add(p * 2 * k);
                macro_rules! run {
                    ($r:literal, $p:literal) => {
                        emit(fixed::<$r, $p>(xt, ldx, wt, k), r, 2 * p, cols, store)
                    };
                }
                match (rn, pn) {
                    (4, 3) => run!(4, 3),
                    (4, 2) => run!(4, 2),
                    (4, 1) => run!(4, 1),
                    (3, 3) => run!(3, 3),
                    (3, 2) => run!(3, 2),
                    (3, 1) => run!(3, 1),
                    (2, 3) => run!(2, 3),
                    (2, 2) => run!(2, 2),
                    (2, 1) => run!(2, 1),
                    (1, 3) => run!(1, 3),
                    (1, 2) => run!(1, 2),
                    _ => run!(1, 1),
                }
                p += pn;
            }
        }
    }
}

/// Hands a tile's outputs (`[R][2P]`, weight rows from `c`) to `store`,
/// dropping the zero row an odd count was padded with.
#[cfg(target_arch = "x86_64")]
#[inline]
fn emit<const R: usize, const P: usize>(
    out: [[[f32; 2]; P]; R],
    r: usize,
    c: usize,
    cols: usize,
    store: &mut impl FnMut(usize, usize, f32),
) {
    for (i, row) in out.iter().enumerate() {
        for (j, pair) in row.iter().enumerate() {
            for (h, &v) in pair.iter().enumerate() {
                let col = c + 2 * j + h;
                if col < cols {
                    store(r + i, col, v);
                }
            }
        }
    }
}

/// `R` input rows × `P` row pairs, each output the AVX2 tile's arithmetic.
#[cfg(target_arch = "x86_64")]
#[inline]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn fixed<const R: usize, const P: usize>(
    x: *const f32,
    ldx: usize,
    w: *const f32,
    k: usize,
) -> [[[f32; 2]; P]; R] {
    let full = k / 8 * 8;
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let mut wv = [_mm512_setzero_ps(); P];
    let mut i = 0;
    while i < full {
        for p in 0..P {
            wv[p] = _mm512_loadu_ps(w.add(p * 2 * k + 2 * i));
        }
        for r in 0..R {
            let xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(x.add(r * ldx + i)));
            for p in 0..P {
                acc[r][p] = _mm512_fmadd_ps(wv[p], xv, acc[r][p]);
            }
        }
        i += 8;
    }
    let tail = k - full;
    let mut out = [[[0f32; 2]; P]; R];
    for r in 0..R {
        let xr = x.add(r * ldx);
        for p in 0..P {
            let halves = [
                _mm512_castps512_ps256(acc[r][p]),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[r][p]))),
            ];
            for h in 0..2 {
                let wt = w.add(p * 2 * k + 2 * full + h * tail);
                out[r][p][h] = finish(halves[h], wt, xr.add(full), tail);
            }
        }
    }
    out
}

/// The AVX2 tiles' end of a dot product: the eight lanes summed as a tree
/// (halves, pairs, the last two), plus the tail in order.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn finish(lanes: __m256, w: *const f32, x: *const f32, n: usize) -> f32 {
    let four = _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    let one = _mm_add_ss(two, _mm_movehdup_ps(two));
    let mut tail = 0f32;
    for i in 0..n {
        tail += *w.add(i) * *x.add(i);
    }
    _mm_cvtss_f32(one) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paired_tiles_give_the_avx2_tiles_bits() {
        if !available() {
            eprintln!("no AVX-512F here: the paired tiles are untested on this machine");
            return;
        }
        for (rows, cols, k) in [(1, 1, 8), (5, 7, 29), (17, 13, 291), (9, 6, 1024), (100, 49, 384)] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
                .collect();
            let w: Vec<f32> = (0..cols * k)
                .map(|i| ((i * 104_729 % 2039) as f32 - 1019.0) / 301.0)
                .collect();
            let mut want = vec![0f32; rows * cols];
            super::super::gemm::gemm_nt(&x, k, rows, &w, k, cols, k, &mut want, cols);
            let mut paired = Vec::new();
            interleave(&w, cols, k, &mut paired);
            let mut got = vec![f32::NAN; rows * cols];
            tiles(&x, k, rows, &paired, cols, k, |r, c, v| got[r * cols + c] = v);
            let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "[{rows}, {k}] × [{cols}, {k}]: bits differ from the AVX2 tiles");
        }
    }
}
