//! Prompt-sized Q4_K products in 8-bit integers on AVX-512 VNNI, as
//! llama.cpp's CPU backend runs its k-quant prompts: the activation rows
//! are quantized once to Q8_K (the decode path's own partner blocks, the
//! same bits), each task's Q4_K weight rows are unpacked into a
//! VNNI-friendly layout (16 weight rows side by side, four values of each
//! in a 32-bit lane), and `vpdpbusd` multiplies 64 weight nibbles by 64
//! activation bytes a step. The integer sums of each 32-value sub-block are
//! exact; its scale, the block's `d`, `dmin` and the activations' scale
//! are applied in f32, so a prompt row agrees with the same row decoded
//! (whose sums are the same integers) to f32 rounding, not bit for bit.
//!
//! Against the f32 tiles on widened weights this does a quarter of the
//! instructions per multiply-add; the widened path stays for machines
//! without VNNI and for the other block types.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8K, GgmlType};

use super::blocks::{scales_and_mins, BlockMatrix};

/// Activation rows a register tile covers.
const TILE_ROWS: usize = 4;
/// Weight rows in one 512-bit register: 16 lanes of four values each.
const GROUP: usize = 16;
/// Groups a register tile covers.
const TILE_GROUPS: usize = 2;
/// Values a Q4_K / Q8_K super-block holds.
const QK: usize = 256;
/// Bytes of a Q8_K block: `d` (f32), 256 × i8, 16 × i16 sums.
const Q8K_BYTES: usize = 292;
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == Q8K_BYTES);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

/// Whether this path runs: AVX-512F/BW and VNNI, not capped below AVX-512.
pub fn available() -> bool {
    super::features::avx512vnni()
}

/// Activation rows quantized to Q8_K once for every weight row they meet,
/// with each block's eight 32-value sums packed as i16 pairs (the
/// minimums' partner).
pub struct Q8kRows {
    blocks: Vec<BlockQ8K>,
    /// Per row and block: four words, sub-block sums `2p` (low half) and
    /// `2p + 1` (high half).
    pair_sums: Vec<i32>,
    rows: usize,
    cols: usize,
}

impl Q8kRows {
    /// `x` (`[rows, cols]`, `cols` a multiple of 256) quantized as
    /// [`BlockMatrix::quantize_input`] does (the same bits), the rows
    /// shared out over the compute team when `parallel`.
    pub fn quantize(x: &[f32], rows: usize, cols: usize, parallel: bool) -> Self {
        assert!(cols.is_multiple_of(QK) && x.len() >= rows * cols);
        let nb = cols / QK;
        let mut blocks = vec![BlockQ8K::zeros(); rows * nb];
        let mut pair_sums = vec![0i32; rows * nb * 4];
        let out = (
            SharedBytes(blocks.as_mut_ptr() as *mut u8),
            SharedBytes(pair_sums.as_mut_ptr() as *mut u8),
        );
        // Rows in chunks of 16 per task.
        let chunk = 16;
        let one = |t: usize| {
            let (blocks, sums) = (out.0, out.1);
            for r in t * chunk..((t + 1) * chunk).min(rows) {
                for b in 0..nb {
                    let i = r * nb + b;
                    let src = &x[r * cols + b * QK..r * cols + (b + 1) * QK];
                    // SAFETY: block `i` and its four sum words belong to
                    // this task alone (rows are split between tasks), and
                    // both buffers hold `rows · nb` of them.
                    unsafe {
                        let dst = &mut *(blocks.0 as *mut BlockQ8K).add(i);
                        quantize_block(src, dst);
                        let words = std::slice::from_raw_parts_mut((sums.0 as *mut i32).add(4 * i), 4);
                        words.copy_from_slice(&pair_words(dst));
                    }
                }
            }
        };
        let tasks = rows.div_ceil(chunk);
        if parallel && tasks > 1 {
            super::team::for_each(tasks, one);
        } else {
            (0..tasks).for_each(one);
        }
        Self {
            blocks,
            pair_sums,
            rows,
            cols,
        }
    }

    /// The Q8_K blocks, row after row.
    pub fn blocks(&self) -> &[BlockQ8K] {
        &self.blocks
    }
}

/// A buffer that parallel tasks fill in disjoint parts.
#[derive(Clone, Copy)]
struct SharedBytes(*mut u8);

// SAFETY: the tasks of `Q8kRows::quantize` write disjoint blocks, and the
// buffers outlive the parallel loop.
unsafe impl Send for SharedBytes {}
unsafe impl Sync for SharedBytes {}

/// One 256-value block quantized to Q8_K exactly as candle's
/// `BlockQ8K::from_float` does (scale `−127 / max`, rounding half away
/// from zero, the sums of 16), vectorized where the machine allows.
fn quantize_block(x: &[f32], out: &mut BlockQ8K) {
    #[cfg(target_arch = "x86_64")]
    if super::features::avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above); `x` holds 256
        // values and `out` is one block.
        unsafe { avx512::quantize_block(x, out) };
        return;
    }
    BlockQ8K::from_float(x, std::slice::from_mut(out));
}

/// A Q8_K block's eight 32-value sums as four words of i16 pairs.
fn pair_words(block: &BlockQ8K) -> [i32; 4] {
    // SAFETY: a Q8_K block is `repr(C)`: d (f32), qs (256 × i8), then its
    // 16 sums of 16 (i16) at byte 260.
    let sums: [i16; 16] =
        unsafe { ((block as *const BlockQ8K as *const u8).add(260) as *const [i16; 16]).read_unaligned() };
    std::array::from_fn(|p| {
        let lo = sums[4 * p] as i32 + sums[4 * p + 1] as i32;
        let hi = sums[4 * p + 2] as i32 + sums[4 * p + 3] as i32;
        (lo & 0xffff) | (hi << 16)
    })
}

/// 64 bytes, aligned for full-register loads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A task's weight rows unpacked for the kernel, group after group of
/// 16 rows, each group block after block.
#[derive(Default)]
struct Unpacked {
    /// Per group and block: 64 lines, line `g` holding values `4g..4g+4`
    /// of each of the 16 rows (row `l` in bytes `4l..4l+4`).
    values: Vec<Line>,
    /// Per group, block and sub-block: `d · scale` of each row.
    scales: Vec<f32>,
    /// Per group and block: `−dmin` of each row.
    neg_dmin: Vec<f32>,
    /// Per group, block and pair of sub-blocks: each row's two minimums
    /// as i16 pairs.
    min_pairs: Vec<i32>,
    /// Blocks a row.
    nb: usize,
}

thread_local! {
    static UNPACKED: std::cell::RefCell<Unpacked> = std::cell::RefCell::new(Unpacked::default());
}

impl Unpacked {
    /// Weight rows `rows` of `w` (Q4_K blocks of `nb` a row), the last
    /// group padded with zero rows.
    fn fill(&mut self, w: &[BlockQ4K], nb: usize, rows: std::ops::Range<usize>) {
        let groups = rows.len().div_ceil(GROUP);
        self.nb = nb;
        self.values.resize(groups * nb * 64, Line([0; 64]));
        self.scales.resize(groups * nb * 8 * GROUP, 0.0);
        self.neg_dmin.resize(groups * nb * GROUP, 0.0);
        self.min_pairs.resize(groups * nb * 4 * GROUP, 0);
        for g in 0..groups {
            for l in 0..GROUP {
                let o = rows.start + g * GROUP + l;
                for b in 0..nb {
                    let at = g * nb + b;
                    if o >= rows.end {
                        for line in &mut self.values[at * 64..(at + 1) * 64] {
                            line.0[4 * l..4 * l + 4].fill(0);
                        }
                        for j in 0..8 {
                            self.scales[(at * 8 + j) * GROUP + l] = 0.0;
                        }
                        self.neg_dmin[at * GROUP + l] = 0.0;
                        for p in 0..4 {
                            self.min_pairs[(at * 4 + p) * GROUP + l] = 0;
                        }
                        continue;
                    }
                    self.put(&w[o * nb + b], at, l);
                }
            }
        }
    }

    /// One block of one row into lane `l` of slot `at` (group · nb + block).
    fn put(&mut self, block: &BlockQ4K, at: usize, l: usize) {
        // SAFETY: a Q4_K block is `repr(C)`: d, dmin (f16), 12 scale
        // bytes, then 128 bytes of nibbles.
        let bytes: &[u8; 144] = unsafe { &*(block as *const BlockQ4K as *const [u8; 144]) };
        let d = half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
        let dmin = half::f16::from_le_bytes([bytes[2], bytes[3]]).to_f32();
        let sm: [u8; 16] = unsafe { std::mem::transmute(scales_and_mins(bytes[4..16].try_into().unwrap())) };
        // Values in order: per 32 bytes, the low nibbles are 32 values,
        // the high nibbles the next 32.
        let mut v = [0u8; QK];
        for (j, q) in bytes[16..].chunks_exact(32).enumerate() {
            for (i, &q) in q.iter().enumerate() {
                v[64 * j + i] = q & 0xF;
                v[64 * j + 32 + i] = q >> 4;
            }
        }
        for (line, four) in self.values[at * 64..(at + 1) * 64].iter_mut().zip(v.chunks_exact(4)) {
            line.0[4 * l..4 * l + 4].copy_from_slice(four);
        }
        for (j, &scale) in sm[..8].iter().enumerate() {
            // Exact: an 11-bit mantissa times a 6-bit integer.
            self.scales[(at * 8 + j) * GROUP + l] = d * f32::from(scale);
        }
        self.neg_dmin[at * GROUP + l] = -dmin;
        for p in 0..4 {
            self.min_pairs[(at * 4 + p) * GROUP + l] = i32::from(sm[8 + 2 * p]) | (i32::from(sm[9 + 2 * p]) << 16);
        }
    }
}

/// `y[r, c]` for the Q4_K weight rows `cols` of `w` and every row of
/// `input`, handed to `store(r, c, value)`. Needs [`available`].
pub fn q4k_columns(
    w: &BlockMatrix,
    input: &Q8kRows,
    cols: std::ops::Range<usize>,
    mut store: impl FnMut(usize, usize, f32),
) {
    let blocks = w.q4k_blocks().expect("a Q4_K matrix");
    assert_eq!(w.cols(), input.cols, "activation width");
    assert!(cols.end <= w.rows());
    assert!(available(), "AVX-512 VNNI");
    let nb = input.cols / QK;
    UNPACKED.with(|u| {
        let mut u = u.borrow_mut();
        u.fill(blocks, nb, cols.clone());
        let groups = cols.len().div_ceil(GROUP);
        for r0 in (0..input.rows).step_by(TILE_ROWS) {
            let m = TILE_ROWS.min(input.rows - r0);
            for g0 in (0..groups).step_by(TILE_GROUPS) {
                let v = TILE_GROUPS.min(groups - g0);
                let operands = Operands {
                    x: input.blocks[r0 * nb..].as_ptr() as *const u8,
                    sums: input.pair_sums[r0 * nb * 4..].as_ptr(),
                    values: u.values[g0 * nb * 64..].as_ptr(),
                    scales: u.scales[g0 * nb * 8 * GROUP..].as_ptr(),
                    neg_dmin: u.neg_dmin[g0 * nb * GROUP..].as_ptr(),
                    min_pairs: u.min_pairs[g0 * nb * 4 * GROUP..].as_ptr(),
                    nb,
                };
                let mut out = [[[0f32; GROUP]; TILE_GROUPS]; TILE_ROWS];
                macro_rules! run {
                    ($m:literal, $v:literal) => {{
                        // SAFETY: the CPU has AVX-512F/BW and VNNI (asserted
                        // above); the tile's rows and groups lie inside the
                        // buffers (`m` rows from `r0`, `v` groups from `g0`).
                        let t = unsafe { avx512::tile::<$m, $v>(operands) };
                        for (o, t) in out.iter_mut().zip(t) {
                            o[..$v].copy_from_slice(&t);
                        }
                    }};
                }
                match (m, v) {
                    (4, 2) => run!(4, 2),
                    (4, _) => run!(4, 1),
                    (3, 2) => run!(3, 2),
                    (3, _) => run!(3, 1),
                    (2, 2) => run!(2, 2),
                    (2, _) => run!(2, 1),
                    (_, 2) => run!(1, 2),
                    _ => run!(1, 1),
                }
                for (i, row) in out.iter().enumerate().take(m) {
                    for (gi, lanes) in row.iter().enumerate().take(v) {
                        for (l, &value) in lanes.iter().enumerate() {
                            let c = (g0 + gi) * GROUP + l;
                            if c < cols.len() {
                                store(r0 + i, cols.start + c, value);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Where a register tile reads: the first activation row's blocks and
/// pair sums (rows follow at `nb` blocks), the first group's unpacked
/// weights (groups follow at `nb` blocks).
#[derive(Clone, Copy)]
struct Operands {
    x: *const u8,
    sums: *const i32,
    values: *const Line,
    scales: *const f32,
    neg_dmin: *const f32,
    min_pairs: *const i32,
    nb: usize,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use candle_core::quantized::k_quants::BlockQ8K;

    use super::{Operands, GROUP, Q8K_BYTES, QK};

    /// `M` activation rows against `V` groups of 16 weight rows over every
    /// block: per 32-value sub-block, `vpdpbusd` sums in i32 (exact), then
    /// `d·scale` applied in f32; per block the minimums (`vpdpwssd` of
    /// their i16 pairs with the sub-block sums) and the activations' scale.
    #[allow(clippy::needless_range_loop)] // registers indexed by row and group
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const M: usize, const V: usize>(op: Operands) -> [[[f32; GROUP]; V]; M] {
        let nb = op.nb;
        let mut acc = [[_mm512_setzero_ps(); V]; M];
        for b in 0..nb {
            let mut blk = [[_mm512_setzero_ps(); V]; M];
            let xb: [*const u8; M] = std::array::from_fn(|m| op.x.add((m * nb + b) * Q8K_BYTES));
            for j in 0..8 {
                let mut isum = [[_mm512_setzero_si512(); V]; M];
                for g in 8 * j..8 * j + 8 {
                    let w: [__m512i; V] =
                        std::array::from_fn(|v| _mm512_load_si512(op.values.add((v * nb + b) * 64 + g) as *const _));
                    for m in 0..M {
                        let a = _mm512_set1_epi32((xb[m].add(4 + 4 * g) as *const i32).read_unaligned());
                        for v in 0..V {
                            isum[m][v] = _mm512_dpbusd_epi32(isum[m][v], w[v], a);
                        }
                    }
                }
                for v in 0..V {
                    let sc = _mm512_loadu_ps(op.scales.add(((v * nb + b) * 8 + j) * GROUP));
                    for m in 0..M {
                        blk[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m][v]), sc, blk[m][v]);
                    }
                }
            }
            for v in 0..V {
                let pairs: [__m512i; 4] = std::array::from_fn(|p| {
                    _mm512_loadu_si512(op.min_pairs.add(((v * nb + b) * 4 + p) * GROUP) as *const _)
                });
                let neg_dmin = _mm512_loadu_ps(op.neg_dmin.add((v * nb + b) * GROUP));
                for m in 0..M {
                    let sums = op.sums.add((m * nb + b) * 4);
                    let mut mins = _mm512_setzero_si512();
                    for (p, pair) in pairs.iter().enumerate() {
                        mins = _mm512_dpwssd_epi32(mins, *pair, _mm512_set1_epi32(*sums.add(p)));
                    }
                    blk[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mins), neg_dmin, blk[m][v]);
                }
            }
            for m in 0..M {
                let d = _mm512_set1_ps((xb[m] as *const f32).read_unaligned());
                for v in 0..V {
                    acc[m][v] = _mm512_fmadd_ps(blk[m][v], d, acc[m][v]);
                }
            }
        }
        let mut out = [[[0f32; GROUP]; V]; M];
        for m in 0..M {
            for v in 0..V {
                _mm512_storeu_ps(out[m][v].as_mut_ptr(), acc[m][v]);
            }
        }
        out
    }

    /// [`super::quantize_block`] on AVX-512F: the same arithmetic as
    /// candle's scalar loop (the first value of the largest magnitude sets
    /// the scale; `round` is emulated exactly, half away from zero).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize_block(x: &[f32], out: &mut BlockQ8K) {
        assert!(x.len() >= QK);
        let xp = x.as_ptr();
        let dst = out as *mut BlockQ8K as *mut u8;
        let mut vmax = _mm512_setzero_ps();
        for i in 0..16 {
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xp.add(16 * i))));
        }
        let amax = _mm512_reduce_max_ps(vmax);
        if amax == 0.0 {
            std::ptr::write_bytes(dst, 0, Q8K_BYTES);
            return;
        }
        let mut max = 0f32;
        for i in 0..16 {
            let hit =
                _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(_mm512_loadu_ps(xp.add(16 * i))), _mm512_set1_ps(amax));
            if hit != 0 {
                max = *xp.add(16 * i + hit.trailing_zeros() as usize);
                break;
            }
        }
        let iscale = -127f32 / max;
        let (scale, half, one) = (_mm512_set1_ps(iscale), _mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
        let sign = _mm512_set1_epi32(i32::MIN);
        for i in 0..16 {
            let v = _mm512_mul_ps(scale, _mm512_loadu_ps(xp.add(16 * i)));
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
            // v − t is exact; a fraction of at least one half rounds away.
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(v, t)), half);
            let step = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_and_si512(_mm512_castps_si512(v), sign),
                _mm512_castps_si512(one),
            ));
            let r = _mm512_mask_add_ps(t, away, t, step);
            let r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-128.0)), _mm512_set1_ps(127.0));
            let q = _mm512_cvttps_epi32(r);
            _mm_storeu_si128(dst.add(4 + 16 * i) as *mut __m128i, _mm512_cvtepi32_epi8(q));
            (dst.add(260 + 2 * i) as *mut i16).write_unaligned(_mm512_reduce_add_epi32(q) as i16);
        }
        (dst as *mut f32).write_unaligned(1.0 / iscale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::blocks::BlockType;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                ((h >> 8) % 20_001) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    fn bytes(b: &[BlockQ8K]) -> &[u8] {
        // SAFETY: plain data, `repr(C)`.
        unsafe { std::slice::from_raw_parts(b.as_ptr() as *const u8, std::mem::size_of_val(b)) }
    }

    #[test]
    fn quantized_rows_are_candles_bits() {
        let (rows, cols) = (21, 3 * QK);
        let mut x = values(rows * cols, 7);
        // Ties at the rounding point, repeated largest magnitudes of both
        // signs, an all-zero block.
        x[5] = 1.0;
        x[9] = -1.0;
        x[10] = 0.5 / 127.0 * 1.0;
        x[cols..cols + QK].fill(0.0);
        x[2 * cols + 3] = -1.5;
        x[2 * cols + 4] = 1.5;
        let ours = Q8kRows::quantize(&x, rows, cols, false);
        let mut theirs = vec![BlockQ8K::zeros(); rows * cols / QK];
        BlockQ8K::from_float(&x, &mut theirs);
        assert_eq!(bytes(ours.blocks()), bytes(&theirs));
        let parallel = Q8kRows::quantize(&x, rows, cols, true);
        assert_eq!(bytes(parallel.blocks()), bytes(&theirs));
        assert_eq!(parallel.pair_sums, ours.pair_sums);
    }

    #[test]
    fn integer_products_agree_with_the_decode_path() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: the int8 prompt path is untested on this machine");
            return;
        }
        for (rows, out) in [(1, 16), (5, 37), (17, 70)] {
            let cols = 3 * QK;
            let w = BlockMatrix::quantize(BlockType::Q4K, &values(out * cols, 3), out, cols).unwrap();
            let x = values(rows * cols, 11);
            let q = Q8kRows::quantize(&x, rows, cols, false);
            let decode = w.quantize_input(&x, rows);
            let mut got = vec![f32::NAN; rows * out];
            q4k_columns(&w, &q, 3..out, |r, c, v| got[r * out + c] = v);
            for r in 0..rows {
                for c in 0..out {
                    let g = got[r * out + c];
                    if c < 3 {
                        assert!(g.is_nan(), "column {c} outside the range written");
                        continue;
                    }
                    let want = w.dot(c, &decode, r);
                    assert!(
                        (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "row {r} col {c}: {g} vs {want}"
                    );
                }
            }
        }
    }
}
