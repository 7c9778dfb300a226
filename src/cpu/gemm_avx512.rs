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
//! f32), then register tiles of 6 input rows × 4 row pairs (24 FMAs of 16
//! lanes per 4 weight loads and 6 broadcasts; 4 × 3 tiles reached 38% of
//! the FMA peak, these 53% before chunking) run over `k` in chunks of 512:
//! a tile's input rows stay in L1 while the task's weights (64-byte
//! aligned: +20% over 16) pass from L2,
//! the accumulators parked between chunks (which keeps each lane's order).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Input rows per register tile.
const TILE_ROWS: usize = 6;
/// Weight row pairs per register tile.
const TILE_PAIRS: usize = 4;

/// Whether the paired tiles run here.
pub fn available() -> bool {
    super::features::avx512()
}

/// One 64-byte line of floats: the paired buffer's unit, so every 512-bit
/// weight load is aligned and touches one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// Weight rows pair-interleaved for the tiles, 64-byte aligned.
#[derive(Default)]
pub struct Paired {
    lines: Vec<Line>,
    /// Floats from one pair to the next: `2k` rounded up to whole lines.
    stride: usize,
}

impl Paired {
    fn floats(&self) -> &[f32] {
        // SAFETY: `Line` is 16 f32 with no padding; the slice covers exactly
        // the lines' values.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.lines.len() * 16) }
    }
}

/// Weight rows (`rows` of `k` f32 values, row-major in `w`) pair-interleaved
/// into `out`: for each pair, its 8-float steps `[row a | row b]`, then row
/// a's tail and row b's tail (`k % 8` each). An odd last row pairs with zeros.
pub fn interleave(w: &[f32], rows: usize, k: usize, out: &mut Paired) {
    let full = k / 8 * 8;
    let pairs = rows.div_ceil(2);
    out.stride = (2 * k).div_ceil(16) * 16;
    out.lines.clear();
    out.lines.resize(pairs * out.stride / 16, Line([0.0; 16]));
    let stride = out.stride;
    // SAFETY: as in `Paired::floats`, mutably.
    let dst_all = unsafe { std::slice::from_raw_parts_mut(out.lines.as_mut_ptr() as *mut f32, out.lines.len() * 16) };
    for p in 0..pairs {
        let dst = &mut dst_all[p * stride..(p + 1) * stride];
        for half in 0..2 {
            let row = 2 * p + half;
            if row >= rows {
                continue;
            }
            let src = &w[row * k..(row + 1) * k];
            // Fixed-size pieces: the copies compile to moves, not calls.
            for (d, piece) in dst[..2 * full].chunks_exact_mut(16).zip(src[..full].chunks_exact(8)) {
                let d: &mut [f32; 8] = (&mut d[8 * half..8 * half + 8]).try_into().expect("8 floats");
                *d = piece.try_into().expect("8 floats");
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
    paired: &Paired,
    cols: usize,
    k: usize,
    mut store: impl FnMut(usize, usize, f32),
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(available(), "the paired tiles need AVX-512F");
    let stride = paired.stride;
    assert!(stride >= 2 * k && x.len() >= (rows - 1) * ldx + k);
    let paired = paired.floats();
    assert!(paired.len() >= cols.div_ceil(2) * stride);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (asserted) and every read lies inside `x`
    // and `paired` (asserted above).
    unsafe {
        blocks(x, ldx, rows, paired, stride, cols, k, &mut store)
    }
}

/// Floats of `k` per chunk: a tile's input rows (6 × 2 KB) stay in L1
/// while the weights of every pair of the task pass through it from L2.
const CHUNK: usize = 512;

/// Bytes of a task's paired weights above which chunks go outermost.
const L2_WEIGHTS: usize = 1 << 20;

/// Floats of accumulator state a tile parks between chunks.
const TILE_STATE: usize = TILE_ROWS * TILE_PAIRS * 16;

thread_local! {
    /// Accumulators of one row tile against every pair tile, between chunks.
    static STATE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn blocks(
    x: &[f32],
    ldx: usize,
    rows: usize,
    paired: &[f32],
    stride: usize,
    cols: usize,
    k: usize,
    store: &mut impl FnMut(usize, usize, f32),
) {
    let pairs = cols.div_ceil(2);
    let full = k / 8 * 8;
    let chunks = full.div_ceil(CHUNK).max(1);
    let (row_tiles, pair_tiles) = (rows.div_ceil(TILE_ROWS), pairs.div_ceil(TILE_PAIRS));
    // A task's weights beyond L2 (a 7B FFN's down projection: 48 rows of
    // 18,944) would pass from L3 once per row tile: then every row tile
    // takes a chunk before the next chunk, so a chunk's weights stay in L2.
    let chunk_outer = chunks > 1 && pairs * stride * 4 > L2_WEIGHTS;
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let parked = if chunk_outer {
            row_tiles * pair_tiles
        } else {
            pair_tiles
        };
        state.resize(parked * TILE_STATE, 0.0);
        let state = state.as_mut_ptr();
        let mut one = |rt: usize, chunk: usize, t: usize, slot: usize| {
            let (r, p) = (rt * TILE_ROWS, t * TILE_PAIRS);
            let (rn, pn) = (TILE_ROWS.min(rows - r), TILE_PAIRS.min(pairs - p));
            let steps = Steps {
                start: chunk * CHUNK,
                end: ((chunk + 1) * CHUNK).min(full),
                first: chunk == 0,
                last: chunk + 1 == chunks,
            };
            let tile = Tile {
                x: x.as_ptr().add(r * ldx),
                ldx,
                w: paired.as_ptr().add(p * stride),
                stride,
                k,
                state: state.add(slot * TILE_STATE),
            };
            let at = (r, 2 * p, cols);
            match rn {
                1 => by_pairs::<1>(pn, tile, steps, at, store),
                2 => by_pairs::<2>(pn, tile, steps, at, store),
                3 => by_pairs::<3>(pn, tile, steps, at, store),
                4 => by_pairs::<4>(pn, tile, steps, at, store),
                5 => by_pairs::<5>(pn, tile, steps, at, store),
                _ => by_pairs::<6>(pn, tile, steps, at, store),
            }
        };
        if chunk_outer {
            for chunk in 0..chunks {
                for rt in 0..row_tiles {
                    for t in 0..pair_tiles {
                        one(rt, chunk, t, rt * pair_tiles + t);
                    }
                }
            }
        } else {
            for rt in 0..row_tiles {
                for chunk in 0..chunks {
                    for t in 0..pair_tiles {
                        one(rt, chunk, t, t);
                    }
                }
            }
        }
    });
}

/// A register tile's operands: input rows at `x + r·ldx`, its pairs'
/// interleaved weights from `w` (`2k` floats a pair), and where its
/// accumulators wait between chunks.
#[derive(Clone, Copy)]
struct Tile {
    x: *const f32,
    ldx: usize,
    w: *const f32,
    stride: usize,
    k: usize,
    state: *mut f32,
}

/// The 8-float steps of `k` a chunk covers (`start..end`), and whether it
/// starts the accumulators or ends the dot products.
#[derive(Clone, Copy)]
struct Steps {
    start: usize,
    end: usize,
    first: bool,
    last: bool,
}

/// The tile of `R` input rows and `pn` (1 to 4) row pairs; on the last
/// chunk its outputs go to `store` at (row, column, columns) `at`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn by_pairs<const R: usize>(
    pn: usize,
    tile: Tile,
    steps: Steps,
    at: (usize, usize, usize),
    store: &mut impl FnMut(usize, usize, f32),
) {
    let (r, c, cols) = at;
    macro_rules! run {
        ($p:literal) => {
            if let Some(out) = fixed::<R, $p>(tile, steps) {
                emit(out, r, c, cols, store)
            }
        };
    }
    match pn {
        1 => run!(1),
        2 => run!(2),
        3 => run!(3),
        _ => run!(4),
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

/// `R` input rows × `P` row pairs over one chunk of `k`, each output the
/// AVX2 tile's arithmetic: the accumulators start at zero or where the last
/// chunk parked them, and are parked again, or finished into the outputs
/// on the last chunk.
#[cfg(target_arch = "x86_64")]
#[inline]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn fixed<const R: usize, const P: usize>(tile: Tile, steps: Steps) -> Option<[[[f32; 2]; P]; R]> {
    let Tile {
        x,
        ldx,
        w,
        stride,
        k,
        state,
    } = tile;
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    if !steps.first {
        for r in 0..R {
            for p in 0..P {
                acc[r][p] = _mm512_loadu_ps(state.add((r * P + p) * 16));
            }
        }
    }
    let mut wv = [_mm512_setzero_ps(); P];
    let mut i = steps.start;
    while i < steps.end {
        for p in 0..P {
            wv[p] = _mm512_load_ps(w.add(p * stride + 2 * i));
        }
        for r in 0..R {
            let xr = _mm256_loadu_ps(x.add(r * ldx + i));
            let xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(xr)));
            for p in 0..P {
                acc[r][p] = _mm512_fmadd_ps(wv[p], xv, acc[r][p]);
            }
        }
        i += 8;
    }
    if !steps.last {
        for r in 0..R {
            for p in 0..P {
                _mm512_storeu_ps(state.add((r * P + p) * 16), acc[r][p]);
            }
        }
        return None;
    }
    let full = k / 8 * 8;
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
                let wt = w.add(p * stride + 2 * full + h * tail);
                out[r][p][h] = super::gemm::finish(halves[h], wt, xr.add(full), tail);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes: single values, odd lengths, several chunks of `k`, and (the
    /// last) a task whose weights exceed [`L2_WEIGHTS`], so chunks go
    /// outermost.
    #[test]
    fn the_paired_tiles_give_the_avx2_tiles_bits() {
        assert!(24 * (2 * 6001usize).div_ceil(16) * 16 * 4 > L2_WEIGHTS);
        if !available() {
            eprintln!("no AVX-512F here: the paired tiles are untested on this machine");
            return;
        }
        for (rows, cols, k) in [
            (1, 1, 8),
            (5, 7, 29),
            (17, 13, 291),
            (9, 6, 1024),
            (100, 49, 384),
            (13, 48, 6001),
        ] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
                .collect();
            let w: Vec<f32> = (0..cols * k)
                .map(|i| ((i * 104_729 % 2039) as f32 - 1019.0) / 301.0)
                .collect();
            let mut want = vec![0f32; rows * cols];
            super::super::gemm::gemm_nt(&x, k, rows, &w, k, cols, k, &mut want, cols);
            let mut paired = Paired::default();
            interleave(&w, cols, k, &mut paired);
            let mut got = vec![f32::NAN; rows * cols];
            tiles(&x, k, rows, &paired, cols, k, |r, c, v| got[r * cols + c] = v);
            let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "[{rows}, {k}] × [{cols}, {k}]: bits differ from the AVX2 tiles");
        }
    }
}
