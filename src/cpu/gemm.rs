//! The f32 product kernel of the CPU runtime: `y = x·Wᵀ` with `x`
//! `[rows, k]` and `W` `[cols, k]`, both read along `k`, so weights stay in
//! their checkpoint layout and nothing is packed. Weights are f32 or bf16
//! (widened exactly in registers as they are loaded, `WeightElem`).
//! Register tiles of 4 input rows × 3 weight rows share every load (12
//! independent FMA chains, 7 loads per 12 FMAs); in a prompt an input tile
//! stays in L1 while a block of about 192 KB of weight rows passes from L2.
//!
//! Every output, whatever the tile, is the same arithmetic: one 8-lane
//! accumulator over 8-float steps (AVX2 FMA when the CPU has it, detected
//! at run time), the lanes summed as a tree, then the tail. Decoding
//! (`matvec`), prompts ([`gemm_multi`]) and attention scores all use it, so
//! a token's activations have the same bits whether it is decoded alone, in
//! a batch, or inside a prompt chunk of any length.
//!
//! One job in one file (about 750 lines, over the project's 600): the tile
//! drivers, their AVX2 twins and the bit tests share private types
//! (`WeightElem`, `Operands`, the widening buffers) that splitting would
//! have to make crate-visible.

use super::matvec::{Projection, Weights, MAX_ROWS};

/// Input rows per register tile.
const TILE_ROWS: usize = 4;
/// Weight rows per register tile.
const TILE_COLS: usize = 3;
/// Output features per parallel task (a multiple of [`TILE_COLS`]): small
/// enough that a thread slowed by another process leaves its share to the
/// others, large enough that each of a prompt's input tiles is reused
/// against many weight rows.
const TASK_COLS: usize = 48;
/// Output features a task of the VNNI k-quant path computes: two register
/// tiles of 32 weight rows.
const VNNI_TASK_COLS: usize = 64;

/// A weight element the tiles read: f32 as it is, or bf16 or f16 widened
/// exactly to f32 (see [`super::bf16`], [`super::f16`]), so all give the
/// same bits for the same values.
pub(crate) trait WeightElem: Copy + Send + Sync {
    /// Values per 64-byte cache line (one prefetch each).
    const PER_LINE: usize = 64 / std::mem::size_of::<Self>();
    /// Narrower than f32: widening costs instructions in every tile that
    /// loads the value, so products of 8 or more rows widen once per block.
    const NARROW: bool = std::mem::size_of::<Self>() < 4;

    /// The value as an f32 (exact).
    fn to_f32(self) -> f32;

    /// Eight values from `p` as f32 lanes; `p..p + 8` must be readable and
    /// the CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightElem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl WeightElem for half::bf16 {
    #[inline]
    fn to_f32(self) -> f32 {
        super::bf16::widen(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let halves = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
    }
}

impl WeightElem for half::f16 {
    #[inline]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// `y[r·ldy + c] = Σᵢ x[r·ldx + i] · w[c·ldw + i]` for `r < rows`,
/// `c < cols`, `i < k`, on the calling thread.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt(
    x: &[f32],
    ldx: usize,
    rows: usize,
    w: &[f32],
    ldw: usize,
    cols: usize,
    k: usize,
    y: &mut [f32],
    ldy: usize,
) {
    gemm_nt_elem(x, ldx, rows, w, ldw, cols, k, y, ldy);
}

/// [`gemm_nt`] with `w` in any [`WeightElem`] (attention scores against
/// keys stored in f16 or bf16), each output the same arithmetic.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_nt_elem<W: WeightElem>(
    x: &[f32],
    ldx: usize,
    rows: usize,
    w: &[W],
    ldw: usize,
    cols: usize,
    k: usize,
    y: &mut [f32],
    ldy: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(x.len() >= (rows - 1) * ldx + k && w.len() >= (cols - 1) * ldw + k);
    assert!(y.len() >= (rows - 1) * ldy + cols);
    let y = SharedOut(y.as_mut_ptr());
    // SAFETY: (r, c) < (rows, cols), so r·ldy + c < y.len() (asserted above).
    tiles(x, ldx, rows, w, ldw, 0..cols, k, |r, c, v| unsafe {
        *y.at(r * ldy + c) = v
    });
}

/// Several products of the same `x` (`[rows, inp]`), e.g. the query, key
/// and value projections, in one parallel pass over `threads`: the output
/// features of all matrices together are cut into tasks of `TASK_COLS`.
/// Q8_0, bf16, f16 and block-format weights are turned into f32 a task's
/// rows at a time.
pub fn gemm_multi(x: &[f32], rows: usize, inp: usize, projections: &mut [Projection<'_>], threads: usize) {
    // Q4_K and Q6_K prompts on VNNI: the activations in Q8_K once for
    // every task.
    let integer = |w: &Weights<'_>| matches!(w, Weights::Blocks(m) if super::gemm_vnni::takes(m.block_type()));
    let q8k = (rows > MAX_ROWS && super::gemm_vnni::available() && projections.iter().any(|p| integer(&p.w)))
        .then(|| super::gemm_vnni::Q8kRows::quantize(x, rows, inp, threads > 1));
    split_columns(
        x,
        rows,
        inp,
        projections,
        if q8k.is_some() { VNNI_TASK_COLS } else { TASK_COLS },
        threads > 1,
        |w, cols, y| match w {
            Weights::Blocks(m) if q8k.is_some() && integer(&w) => {
                let q8k = q8k.as_ref().expect("quantized above");
                // SAFETY: this task alone writes these columns.
                super::gemm_vnni::columns(m, q8k, cols, |r, c, v| unsafe { y.store(r, c, v) })
            }
            // Prompts on AVX-512: the task's rows in f32, pair-interleaved,
            // through the paired tiles (the same bits as the AVX2 tiles).
            _ if rows > MAX_ROWS && super::gemm_avx512::available() => DEQUANTIZED.with(|buf| {
                PAIRED.with(|paired| {
                    let (mut buf, mut paired) = (buf.borrow_mut(), paired.borrow_mut());
                    let rows_f32: &[f32] = match w {
                        Weights::F32(w) => &w[cols.start * inp..cols.end * inp],
                        _ => {
                            widen_rows(w, cols.clone(), inp, &mut buf);
                            &buf
                        }
                    };
                    super::gemm_avx512::interleave(rows_f32, cols.len(), inp, &mut paired);
                    let lo = cols.start;
                    // SAFETY: this task alone writes these columns.
                    super::gemm_avx512::tiles(x, inp, rows, &paired, cols.len(), inp, |r, c, v| unsafe {
                        y.store(r, lo + c, v)
                    });
                })
            }),
            // SAFETY (both stores): this task alone writes these columns.
            Weights::F32(w) => tiles(x, inp, rows, w, inp, cols, inp, |r, c, v| unsafe { y.store(r, c, v) }),
            // The task's weight rows in f32 first: the tiles then run the
            // f32 arithmetic at full speed (bf16 widens exactly, so its bits
            // equal matvec's, which widens in registers).
            Weights::Q8(_) | Weights::Bf16(_) | Weights::F16(_) | Weights::Blocks(_) => DEQUANTIZED.with(|buf| {
                let mut buf = buf.borrow_mut();
                widen_rows(w, cols.clone(), inp, &mut buf);
                let lo = cols.start;
                tiles(x, inp, rows, &buf, inp, 0..cols.len(), inp, |r, c, v| unsafe {
                    y.store(r, lo + c, v)
                });
            }),
        },
    );
}

/// Weight rows `cols` of `w` in f32 into `buf` (`inp` values a row).
fn widen_rows(w: Weights<'_>, cols: std::ops::Range<usize>, inp: usize, buf: &mut Vec<f32>) {
    buf.resize(cols.len() * inp, 0.0);
    for (row, r) in buf.chunks_exact_mut(inp).zip(cols) {
        w.row_to_f32(r, row);
    }
}

/// One projection's `[rows, out]` output, written by parallel tasks that
/// each own some of its columns.
#[derive(Clone, Copy)]
pub(crate) struct ColumnsOut {
    y: SharedOut,
    out: usize,
}

impl ColumnsOut {
    /// Writes `v` at row `r`, column `c`; the caller owns column `c`, and
    /// `r` < rows, `c` < out (checked by [`split_columns`] for the buffer).
    #[inline]
    pub(crate) unsafe fn store(self, r: usize, c: usize, v: f32) {
        *self.y.at(r * self.out + c) = v;
    }
}

/// Checks the shapes of several products of `x` (`[rows, inp]`), counts
/// their output features across all matrices in order, cuts them into
/// chunks of `chunk`, and calls `body(weights, columns, output)` for each
/// projection's part of each chunk, in parallel when `parallel`.
pub(crate) fn split_columns(
    x: &[f32],
    rows: usize,
    inp: usize,
    projections: &mut [Projection<'_>],
    chunk: usize,
    parallel: bool,
    body: impl Fn(Weights<'_>, std::ops::Range<usize>, ColumnsOut) + Sync,
) {
    assert!(x.len() >= rows * inp);
    for p in projections.iter() {
        assert!(p.w.covers(p.out, inp) && p.y.len() >= rows * p.out);
    }
    let total: usize = projections.iter().map(|p| p.out).sum();
    let chunk = chunk.max(1);
    let targets: Vec<(Weights<'_>, ColumnsOut)> = projections
        .iter_mut()
        .map(|p| {
            let y = ColumnsOut {
                y: SharedOut(p.y.as_mut_ptr()),
                out: p.out,
            };
            (p.w, y)
        })
        .collect();
    let one = |ci: usize| {
        // The global feature index runs over the matrices in order.
        let (g0, g1) = (ci * chunk, ((ci + 1) * chunk).min(total));
        let mut base = 0;
        for &(w, y) in &targets {
            let cols = g0.max(base) - base..g1.min(base + y.out).saturating_sub(base);
            if !cols.is_empty() {
                body(w, cols, y);
            }
            base += y.out;
        }
    };
    let chunks = total.div_ceil(chunk);
    if parallel && chunks > 1 {
        super::team::for_each(chunks, one);
    } else {
        (0..chunks).for_each(one);
    }
}

/// Weight rows a few-row product of bf16 weights widens together: the
/// block stays in L1/L2 while every 4-row tile reads it.
const WIDEN_COLS: usize = 12;

thread_local! {
    /// A few-row product's block of bf16 weight rows in f32.
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A task's Q8_0 or bf16 weight rows in f32, reused from task to task.
    static DEQUANTIZED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A task's weight rows pair-interleaved for the AVX-512 tiles.
    static PAIRED: std::cell::RefCell<super::gemm_avx512::Paired> = std::cell::RefCell::new(Default::default());
}

/// Columns `cols` of `x·Wᵀ` for every row, handed to `store(row, col, value)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiles<W: WeightElem>(
    x: &[f32],
    ldx: usize,
    rows: usize,
    w: &[W],
    ldw: usize,
    cols: std::ops::Range<usize>,
    k: usize,
    mut store: impl FnMut(usize, usize, f32),
) {
    if rows == 0 || cols.is_empty() {
        return;
    }
    assert!(x.len() >= (rows - 1) * ldx + k && w.len() >= (cols.end - 1) * ldw + k);
    #[cfg(target_arch = "x86_64")]
    {
        if super::features::avx2() {
            let op = avx2::Operands {
                x: x.as_ptr(),
                ldx,
                rows,
                w: w.as_ptr(),
                ldw,
                k,
            };
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above) and
            // every row read lies inside `x` and `w` (asserted above).
            unsafe { avx2::tiles(op, cols, &mut store) };
            return;
        }
    }
    for r in 0..rows {
        for c in cols.clone() {
            store(r, c, dot_portable(&w[c * ldw..c * ldw + k], &x[r * ldx..r * ldx + k]));
        }
    }
}

/// Weight rows per L2 block of a prompt product: about 192 KB of f32
/// values (a multiple of [`TILE_COLS`]).
fn weight_block_cols(k: usize) -> usize {
    ((48 * 1024 / k.max(1)) / TILE_COLS * TILE_COLS).max(TILE_COLS)
}

/// The dot product of the portable path: eight lanes of separate multiply
/// and add over 8-float steps, summed as the AVX2 tree, then the tail.
pub(crate) fn dot_portable<W: WeightElem>(a: &[W], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / 8 * 8;
    let mut acc = [0f32; 8];
    for (x, y) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += x[j].to_f32() * y[j];
        }
    }
    let four: [f32; 4] = std::array::from_fn(|j| acc[j] + acc[j + 4]);
    let two = [four[0] + four[2], four[1] + four[3]];
    let tail: f32 = a[full..n].iter().zip(&b[full..n]).map(|(x, y)| x.to_f32() * y).sum();
    (two[0] + two[1]) + tail
}

/// The best single dot product this CPU supports: the reference every
/// tile's output is tested against (the runtime only calls the tiles).
#[cfg(test)]
fn dot_kernel() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if super::features::avx2() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
            return |a, b| unsafe { avx2::dot(a, b) };
        }
    }
    dot_portable::<f32>
}

/// The end of every dot product of the tiles (the AVX-512 paired tiles
/// share it, so their bits are these).
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::finish;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{weight_block_cols, WeightElem, TILE_COLS, TILE_ROWS, WIDEN_COLS};
    // Batched decoding (up to `MAX_ROWS` rows, the matrix × vector path):
    // its weights come from memory, so its tiles prefetch them.
    use crate::cpu::matvec::MAX_ROWS;

    /// The end of every dot product: the eight lanes summed as a tree in
    /// registers (halves, then pairs, then the last two), plus the tail
    /// past the last 8-float step (`n` floats from `w` and `x`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn finish<W: WeightElem>(lanes: __m256, w: *const W, x: *const f32, n: usize) -> f32 {
        let four = _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
        let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        let one = _mm_add_ss(two, _mm_movehdup_ps(two));
        let mut tail = 0f32;
        for i in 0..n {
            tail += (*w.add(i)).to_f32() * *x.add(i);
        }
        _mm_cvtss_f32(one) + tail
    }

    /// `R` × `C` dot products of length `k`: input rows at `x + r·ldx`,
    /// weight rows at `w + c·ldw`. Indexed loops over the register arrays
    /// keep everything in registers once unrolled.
    #[inline]
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fixed<W: WeightElem, const R: usize, const C: usize>(
        x: *const f32,
        ldx: usize,
        w: *const W,
        ldw: usize,
        k: usize,
    ) -> [[f32; C]; R] {
        fixed_ahead::<W, R, C, false>(x, ldx, w, ldw, k, 0)
    }

    /// [`fixed`], and when `AHEAD` also a software prefetch of the weights
    /// `ahead` floats past each weight row, one cache line per 16 floats:
    /// with few input rows a tile is computed once per weight load, and
    /// without it the FMAs wait on memory in turns with the loads. The
    /// address may lie past the weights (a prefetch never faults; it is
    /// computed with wrapping arithmetic).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn fixed_ahead<W: WeightElem, const R: usize, const C: usize, const AHEAD: bool>(
        x: *const f32,
        ldx: usize,
        w: *const W,
        ldw: usize,
        k: usize,
        ahead: usize,
    ) -> [[f32; C]; R] {
        let full = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut wv = [_mm256_setzero_ps(); C];
        let mut i = 0;
        while i < full {
            // One prefetch per 64-byte line of each weight row.
            if AHEAD && i % W::PER_LINE == 0 {
                for c in 0..C {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(c * ldw + i + ahead) as *const i8);
                }
            }
            for c in 0..C {
                wv[c] = W::load8(w.add(c * ldw + i));
            }
            for r in 0..R {
                let xv = _mm256_loadu_ps(x.add(r * ldx + i));
                for c in 0..C {
                    acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
                }
            }
            i += 8;
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                out[r][c] = finish(acc[r][c], w.add(c * ldw + full), x.add(r * ldx + full), k - full);
            }
        }
        out
    }

    /// Hands a tile's outputs to `store`.
    #[inline]
    fn emit<const R: usize, const C: usize>(
        out: [[f32; C]; R],
        r: usize,
        c: usize,
        store: &mut impl FnMut(usize, usize, f32),
    ) {
        for (i, row) in out.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                store(r + i, c + j, v);
            }
        }
    }

    /// A product's operands: `rows` input rows at `x + r·ldx`, weight rows
    /// at `w + c·ldw`, dot products of length `k`.
    pub(super) struct Operands<W> {
        pub(super) x: *const f32,
        pub(super) ldx: usize,
        pub(super) rows: usize,
        pub(super) w: *const W,
        pub(super) ldw: usize,
        pub(super) k: usize,
    }

    impl<W> Clone for Operands<W> {
        fn clone(&self) -> Self {
            *self
        }
    }

    impl<W> Copy for Operands<W> {}

    impl<W> Operands<W> {
        /// The same inputs against other weights.
        fn with_weights<V>(self, w: *const V, ldw: usize) -> Operands<V> {
            Operands {
                x: self.x,
                ldx: self.ldx,
                rows: self.rows,
                w,
                ldw,
                k: self.k,
            }
        }
    }

    /// [`super::tiles`] on AVX2; the caller checked the bounds.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tiles<W: WeightElem>(
        op: Operands<W>,
        cols: std::ops::Range<usize>,
        store: &mut impl FnMut(usize, usize, f32),
    ) {
        let Operands {
            x,
            ldx,
            rows,
            w,
            ldw,
            k,
        } = op;
        // Up to three rows (decoding): one strip of tiles as wide as the
        // registers allow, each weight row read once, the next tile's
        // weights prefetched while this one is computed (+2–4% decode).
        macro_rules! strip {
            ($r:literal, $c:literal) => {{
                let mut c = cols.start;
                while c + $c <= cols.end {
                    let wt = w.add(c * ldw);
                    emit(
                        fixed_ahead::<W, $r, $c, true>(x, ldx, wt, ldw, k, $c * ldw),
                        0,
                        c,
                        store,
                    );
                    c += $c;
                }
                while c < cols.end {
                    emit(fixed::<W, $r, 1>(x, ldx, w.add(c * ldw), ldw, k), 0, c, store);
                    c += 1;
                }
            }};
        }
        match rows {
            1 => strip!(1, 8),
            2 => strip!(2, 6),
            3 => strip!(3, 4),
            _ if W::NARROW && rows >= 8 => widened_tiles(op, cols, store),
            _ => row_tiles(op, cols, store),
        }
    }

    /// Four or more rows, in 4 × 3 register tiles. Up to [`MAX_ROWS`]
    /// (batched decoding; the weights come from memory): each weight tile
    /// against every input tile, prefetching the weight tile two on. More
    /// (prompts; compute-bound): each input tile stays in L1 while a block
    /// of weight rows ([`weight_block_cols`], ≈ 192 KB) passes from L2, so a
    /// tile's step loads 3 vectors from L2 instead of 4 (+6–11% on
    /// tiny-coder's prompt products, `cargo bench --bench gemm`).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_tiles<W: WeightElem>(
        op: Operands<W>,
        cols: std::ops::Range<usize>,
        store: &mut impl FnMut(usize, usize, f32),
    ) {
        let (rows, ldw, k) = (op.rows, op.ldw, op.k);
        if rows > MAX_ROWS {
            let block = weight_block_cols(k);
            for c0 in cols.clone().step_by(block) {
                let c1 = (c0 + block).min(cols.end);
                for r in (0..rows).step_by(TILE_ROWS) {
                    let mut c = c0;
                    if r + TILE_ROWS <= rows {
                        // Full tiles straight to the 4 × 3 kernel.
                        let xt = op.x.add(r * op.ldx);
                        while c + TILE_COLS <= c1 {
                            emit(fixed::<W, 4, 3>(xt, op.ldx, op.w.add(c * ldw), ldw, k), r, c, store);
                            c += TILE_COLS;
                        }
                    }
                    while c < c1 {
                        tile(op, r, c, c1, store);
                        c += TILE_COLS;
                    }
                }
            }
            return;
        }
        for c in cols.clone().step_by(TILE_COLS) {
            for r in (0..rows).step_by(TILE_ROWS) {
                // Every row tile fetches the weight tile two tiles on:
                // prefetching from the first row tile alone left the memory
                // idle while the others ran (8 rows over a 100 MB matrix:
                // +15–20%; decode step at 8 sequences: +10–13%,
                // BENCHMARKS.md).
                let full = r + TILE_ROWS <= rows && c + 3 * TILE_COLS <= cols.end;
                if full {
                    let (xt, wt) = (op.x.add(r * op.ldx), op.w.add(c * ldw));
                    let ahead = 2 * TILE_COLS * ldw;
                    emit(fixed_ahead::<W, 4, 3, true>(xt, op.ldx, wt, ldw, k, ahead), r, c, store);
                } else {
                    tile(op, r, c, cols.end, store);
                }
            }
        }
    }

    /// The tile of up to 4 input rows from `r` and 3 weight rows from `c`
    /// (fewer at the ends: rows below `op.rows`, columns below `end`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<W: WeightElem>(
        op: Operands<W>,
        r: usize,
        c: usize,
        end: usize,
        store: &mut impl FnMut(usize, usize, f32),
    ) {
        let (rn, cn) = (TILE_ROWS.min(op.rows - r), TILE_COLS.min(end - c));
        let (xt, wt) = (op.x.add(r * op.ldx), op.w.add(c * op.ldw));
        macro_rules! run {
            ($r:literal, $c:literal) => {
                emit(fixed::<W, $r, $c>(xt, op.ldx, wt, op.ldw, op.k), r, c, store)
            };
        }
        match (rn, cn) {
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
    }

    /// Narrow weights (bf16) for 8 or more rows: blocks of [`WIDEN_COLS`]
    /// weight rows are widened to f32 once, the next block prefetched
    /// meanwhile, and the f32 tiles run over every input row. Widening
    /// inside the tiles repeats it for every 4-row tile; at 16 rows this is
    /// 6–8% faster per decode step (paired runs, BENCHMARKS.md), at 4 rows
    /// slower. Same values, hence the same bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widened_tiles<W: WeightElem>(
        op: Operands<W>,
        cols: std::ops::Range<usize>,
        store: &mut impl FnMut(usize, usize, f32),
    ) {
        let (w, ldw, k) = (op.w, op.ldw, op.k);
        super::WIDENED.with(|buf| {
            let mut buf = buf.borrow_mut();
            let mut c0 = cols.start;
            while c0 < cols.end {
                let n = WIDEN_COLS.min(cols.end - c0);
                if buf.len() < n * k {
                    buf.resize(n * k, 0.0);
                }
                for i in 0..n {
                    let src = w.add((c0 + i) * ldw);
                    let dst = buf.as_mut_ptr().add(i * k);
                    let mut j = 0;
                    while j + 8 <= k {
                        if j % W::PER_LINE == 0 {
                            // The same row of the next block.
                            _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(WIDEN_COLS * ldw + j) as *const i8);
                        }
                        _mm256_storeu_ps(dst.add(j), W::load8(src.add(j)));
                        j += 8;
                    }
                    while j < k {
                        *dst.add(j) = (*src.add(j)).to_f32();
                        j += 1;
                    }
                }
                row_tiles(op.with_weights(buf.as_ptr(), k), 0..n, &mut |r, c, v| {
                    store(r, c0 + c, v)
                });
                c0 += n;
            }
        });
    }

    /// One dot product (the 1 × 1 tile).
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        // SAFETY: both rows hold at least `n` floats.
        unsafe { fixed::<f32, 1, 1>(b.as_ptr(), 0, a.as_ptr(), 0, n)[0][0] }
    }
}

/// An output buffer shared by parallel tasks that each write their own
/// cells (here, in `matvec` and in the fused step).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: every user writes disjoint cells from its tasks and keeps the
// buffer alive and unborrowed for the length of the parallel loop.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The cell at `i`; the caller guarantees exclusivity and bounds.
    pub(crate) unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }

    /// `len` cells from `at`; the caller guarantees exclusivity and bounds.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, at: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matvec::matvec;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn every_output_has_the_bits_of_the_single_dot_product() {
        let dot = dot_kernel();
        for &(rows, cols, k) in &[
            (1, 1, 1),
            (1, 20, 40),
            (2, 13, 100),
            (3, 11, 77),
            (5, 7, 15),
            (4, 3, 16),
            (17, 10, 33),
            (9, 50, 384),
            (33, 5, 1030),
        ] {
            let (ldx, ldw, ldy) = (k + 3, k + 1, cols + 2);
            let x = random(rows * ldx, 1);
            let w = random(cols * ldw, 2);
            let mut y = vec![f32::NAN; rows * ldy];
            gemm_nt(&x, ldx, rows, &w, ldw, cols, k, &mut y, ldy);
            for r in 0..rows {
                for c in 0..cols {
                    let want = dot(&w[c * ldw..c * ldw + k], &x[r * ldx..r * ldx + k]);
                    assert_eq!(
                        y[r * ldy + c].to_bits(),
                        want.to_bits(),
                        "{rows}x{cols}x{k} at ({r},{c})"
                    );
                }
                assert!(y[r * ldy + cols].is_nan(), "wrote past the columns");
            }
        }
    }

    /// Asserts that `w` (holding exactly `values`, `[out, inp]`) gives the
    /// bits of those values held in f32, at decode and prompt row counts
    /// on 1 and 2 threads.
    fn assert_widening_is_exact(w: Weights<'_>, values: &[f32], out: usize, inp: usize) {
        use crate::cpu::matvec::matvec_multi;
        for rows in [1, 2, 3, 5, 8, 16, 37, 100] {
            let x = random(rows * inp, 8);
            let want = matvec(&x, values, rows, inp, out, 1);
            for threads in [1, 2] {
                let mut y = vec![0f32; rows * out];
                let mut p = [Projection { w, out, y: &mut y }];
                if rows <= crate::cpu::matvec::MAX_ROWS {
                    matvec_multi(&x, rows, inp, &mut p, threads);
                } else {
                    gemm_multi(&x, rows, inp, &mut p, threads);
                }
                assert_eq!(y, want, "{out}x{inp}, {rows} rows, {threads} threads");
            }
        }
    }

    #[test]
    fn bf16_weights_give_the_bits_of_their_f32_values_in_every_path() {
        use crate::cpu::bf16::Bf16Matrix;
        // Odd lengths exercise the tails past the last 8-value step.
        for &(out, inp) in &[(70usize, 384usize), (33, 45)] {
            let values: Vec<f32> = random(out * inp, 7)
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            let m = Bf16Matrix::from_f32_exact(&values, out, inp).unwrap();
            assert_widening_is_exact(Weights::Bf16(&m), &values, out, inp);
        }
    }

    #[test]
    fn f16_weights_give_the_bits_of_their_f32_values_in_every_path() {
        use crate::cpu::f16::F16Matrix;
        for &(out, inp) in &[(70usize, 384usize), (33, 45)] {
            let halves: Vec<half::f16> = random(out * inp, 9).iter().map(|&v| half::f16::from_f32(v)).collect();
            let values: Vec<f32> = halves.iter().map(|v| v.to_f32()).collect();
            let bytes: Vec<u8> = halves.iter().flat_map(|v| v.to_le_bytes()).collect();
            let m = F16Matrix::from_le_bytes(out, inp, &bytes).unwrap();
            assert_widening_is_exact(Weights::F16(&m), &values, out, inp);
        }
    }

    #[test]
    fn multi_equals_matvec_bit_for_bit_for_f32_and_q8_weights() {
        let (rows, inp) = (37, 384);
        let x = random(rows * inp, 3);
        let wq = random(130 * inp, 4);
        let wk = random(65 * inp, 5);
        let q8 = crate::cpu::quant::Q8Matrix::quantize(&wk, 65, inp).unwrap();
        let wk8 = q8.dequantize();
        for threads in [1, 2, 3] {
            let (mut yq, mut yk) = (vec![0f32; rows * 130], vec![0f32; rows * 65]);
            let mut ps = [
                Projection {
                    w: Weights::F32(&wq),
                    out: 130,
                    y: &mut yq,
                },
                Projection {
                    w: Weights::Q8(&q8),
                    out: 65,
                    y: &mut yk,
                },
            ];
            // More than one thread runs the tasks on the compute team.
            gemm_multi(&x, rows, inp, &mut ps, threads);
            assert_eq!(yq, matvec(&x, &wq, rows, inp, 130, 1), "f32, {threads} threads");
            assert_eq!(yk, matvec(&x, &wk8, rows, inp, 65, 1), "q8_0, {threads} threads");
        }
    }
}
