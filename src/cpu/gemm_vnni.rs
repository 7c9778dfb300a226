//! Prompt-sized Q4_K and Q6_K products in 8-bit integers on AVX-512 VNNI,
//! as llama.cpp's CPU backend runs its k-quant prompts: the activation
//! rows are quantized once to Q8_K (through `q8k`, as the decode path's
//! rows are: the same bits), each task's weight rows are unpacked into a
//! VNNI-friendly layout (16 weight rows side by side, four values of each
//! in a 32-bit lane, as unsigned bytes: Q4_K's nibbles, Q6_K's `q + 32`),
//! and `vpdpbusd` multiplies 64 weight values by 64 activation bytes a
//! step. The integer sums of each sub-block are exact; its scale, the
//! block's `d`, its correction (Q4_K's minimums, Q6_K's `−32`, against the
//! activations' block sums) and the activations' scale are applied in f32,
//! so a prompt row agrees with the same row decoded (whose sums are the
//! same integers) to f32 rounding, not bit for bit.
//!
//! Against the f32 tiles on widened weights this does a quarter of the
//! instructions per multiply-add; the widened path stays for machines
//! without VNNI and for the other block types.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8K, GgmlType};

use super::blocks::{scales_and_mins, BlockMatrix, BlockType};

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
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144 && std::mem::size_of::<BlockQ6K>() == 210);

/// Whether this path runs: AVX-512F/BW and VNNI, not capped below AVX-512.
pub fn available() -> bool {
    super::features::avx512vnni()
}

/// Whether the kernel takes weights of block type `ty` (Q4_K, Q6_K).
pub fn takes(ty: BlockType) -> bool {
    Kind::of(ty).is_some()
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
                        super::q8k::quantize_block(src, dst);
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

/// How a block type's super-block meets the kernel: its scales apply to
/// `subs` sub-blocks (of `256 / subs` values), and a correction term per
/// block is `fix · Σ_p pair_p · (the activations' sums)`, over `pairs`
/// i16 pairs (Q4_K: `−dmin`, the minimums against the 32-value sums;
/// Q6_K: `−32·d`, the scales against the 16-value sums, since its values
/// are stored as `q + 32`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    /// Q4_K: 8 sub-blocks of 32, 4-bit values, 6-bit scales and minimums.
    Q4K,
    /// Q6_K: 16 sub-blocks of 16, 6-bit values, 8-bit signed scales.
    Q6K,
}

impl Kind {
    /// The kind of `ty`, if the kernel takes it.
    pub(crate) fn of(ty: BlockType) -> Option<Self> {
        match ty {
            BlockType::Q4K => Some(Self::Q4K),
            BlockType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    const fn subs(self) -> usize {
        match self {
            Self::Q4K => 8,
            Self::Q6K => 16,
        }
    }

    const fn pairs(self) -> usize {
        self.subs() / 2
    }

    const fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }
}

/// A task's weight rows unpacked for the kernel, group after group of
/// 16 rows, each group block after block.
#[derive(Default)]
struct Unpacked {
    /// Per group and block: 64 lines, line `g` holding values `4g..4g+4`
    /// of each of the 16 rows (row `l` in bytes `4l..4l+4`), as u8.
    values: Vec<Line>,
    /// Per group, block and sub-block: `d · scale` of each row.
    scales: Vec<f32>,
    /// Per group and block: each row's correction factor ([`Kind`]).
    fix: Vec<f32>,
    /// Per group, block and pair: each row's correction pairs as i16 pairs.
    fix_pairs: Vec<i32>,
}

thread_local! {
    static UNPACKED: std::cell::RefCell<Unpacked> = std::cell::RefCell::new(Unpacked::default());
}

/// One block of one weight row, unpacked: its 256 values (u8, in order),
/// `d · scale` per sub-block, the correction factor and pairs.
struct RowBlock {
    values: [u8; QK],
    scales: [f32; 16],
    fix: f32,
    fix_pairs: [i32; 8],
}

impl RowBlock {
    const ZERO: Self = Self {
        values: [0; QK],
        scales: [0.0; 16],
        fix: 0.0,
        fix_pairs: [0; 8],
    };

    /// A Q4_K block (`repr(C)`: d, dmin (f16), 12 scale bytes, 128 bytes
    /// of nibbles; per 32 bytes, the low nibbles are 32 values and the high
    /// nibbles the next 32).
    fn q4k(&mut self, bytes: &[u8]) {
        let d = half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
        let dmin = half::f16::from_le_bytes([bytes[2], bytes[3]]).to_f32();
        // SAFETY: four u32 are sixteen bytes.
        let sm: [u8; 16] = unsafe { std::mem::transmute(scales_and_mins(bytes[4..16].try_into().unwrap())) };
        unpack_q4k(&bytes[16..144], &mut self.values);
        for (out, &scale) in self.scales.iter_mut().zip(&sm[..8]) {
            // Exact: an 11-bit mantissa times a 6-bit integer.
            *out = d * f32::from(scale);
        }
        self.fix = -dmin;
        for (p, out) in self.fix_pairs[..4].iter_mut().enumerate() {
            *out = i32::from(sm[8 + 2 * p]) | (i32::from(sm[9 + 2 * p]) << 16);
        }
    }

    /// A Q6_K block (`repr(C)`: ql (128 bytes, low 4 bits), qh (64, high 2
    /// bits), 16 signed scales, d (f16)); a value is `d · scale · (q − 32)`.
    fn q6k(&mut self, bytes: &[u8]) {
        let d = half::f16::from_le_bytes([bytes[208], bytes[209]]).to_f32();
        unpack_q6k(&bytes[..192], &mut self.values);
        let scales = &bytes[192..208];
        for (out, &scale) in self.scales.iter_mut().zip(scales) {
            // Exact: an 11-bit mantissa times an 8-bit integer.
            *out = d * f32::from(scale as i8);
        }
        self.fix = -32.0 * d;
        for (p, out) in self.fix_pairs.iter_mut().enumerate() {
            let (a, b) = (scales[2 * p] as i8, scales[2 * p + 1] as i8);
            *out = (i32::from(a) & 0xffff) | (i32::from(b) << 16);
        }
    }
}

/// Q4_K's 128 bytes of nibbles as 256 values in order.
fn unpack_q4k(q: &[u8], out: &mut [u8; QK]) {
    #[cfg(target_arch = "x86_64")]
    if super::features::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above); 128 bytes in, 256 out.
        unsafe { avx2::unpack_q4k(q, out) };
        return;
    }
    for (j, q) in q.chunks_exact(32).enumerate() {
        for (i, &q) in q.iter().enumerate() {
            out[64 * j + i] = q & 0xF;
            out[64 * j + 32 + i] = q >> 4;
        }
    }
}

/// Q6_K's low and high bits (192 bytes) as 256 values `q` in order (0–63).
fn unpack_q6k(q: &[u8], out: &mut [u8; QK]) {
    #[cfg(target_arch = "x86_64")]
    if super::features::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above); 192 bytes in, 256 out.
        unsafe { avx2::unpack_q6k(q, out) };
        return;
    }
    let (ql, qh) = q.split_at(128);
    for j in 0..2 {
        for l in 0..32 {
            let (a, b, h) = (ql[64 * j + l], ql[64 * j + 32 + l], qh[32 * j + l]);
            out[128 * j + l] = (a & 0xF) | ((h & 3) << 4);
            out[128 * j + 32 + l] = (b & 0xF) | (((h >> 2) & 3) << 4);
            out[128 * j + 64 + l] = (a >> 4) | (((h >> 4) & 3) << 4);
            out[128 * j + 96 + l] = (b >> 4) | (((h >> 6) & 3) << 4);
        }
    }
}

impl Unpacked {
    /// Weight rows `rows` of `w` (`kind`'s blocks, `nb` a row), the last
    /// group padded with zero rows.
    fn fill(&mut self, kind: Kind, w: &[u8], nb: usize, rows: std::ops::Range<usize>) {
        let (subs, pairs, bytes) = (kind.subs(), kind.pairs(), kind.block_bytes());
        let groups = rows.len().div_ceil(GROUP);
        self.values.resize(groups * nb * 64, Line([0; 64]));
        self.scales.resize(groups * nb * subs * GROUP, 0.0);
        self.fix.resize(groups * nb * GROUP, 0.0);
        self.fix_pairs.resize(groups * nb * pairs * GROUP, 0);
        let mut unpacked: [RowBlock; GROUP] = std::array::from_fn(|_| RowBlock::ZERO);
        for g in 0..groups {
            for b in 0..nb {
                let at = g * nb + b;
                for (l, rb) in unpacked.iter_mut().enumerate() {
                    let o = rows.start + g * GROUP + l;
                    if o < rows.end {
                        let block = &w[(o * nb + b) * bytes..(o * nb + b + 1) * bytes];
                        match kind {
                            Kind::Q4K => rb.q4k(block),
                            Kind::Q6K => rb.q6k(block),
                        }
                    } else {
                        *rb = RowBlock::ZERO;
                    }
                    for j in 0..subs {
                        self.scales[(at * subs + j) * GROUP + l] = rb.scales[j];
                    }
                    self.fix[at * GROUP + l] = rb.fix;
                    for p in 0..pairs {
                        self.fix_pairs[(at * pairs + p) * GROUP + l] = rb.fix_pairs[p];
                    }
                }
                transpose(&unpacked, &mut self.values[at * 64..(at + 1) * 64]);
            }
        }
    }
}

/// Sixteen rows' 256 values into 64 lines: line `g`, bytes `4l..4l+4` =
/// row `l`'s values `4g..4g+4`.
fn transpose(rows: &[RowBlock], lines: &mut [Line]) {
    #[cfg(target_arch = "x86_64")]
    if super::features::avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above); 16 rows in,
        // 64 lines out.
        unsafe { avx512::transpose(rows, lines) };
        return;
    }
    for (g, line) in lines.iter_mut().enumerate() {
        for (l, row) in rows.iter().enumerate() {
            line.0[4 * l..4 * l + 4].copy_from_slice(&row.values[4 * g..4 * g + 4]);
        }
    }
}

/// `y[r, c]` for the weight rows `cols` of `w` (Q4_K or Q6_K) and every
/// row of `input`, handed to `store(r, c, value)`. Needs [`available`].
pub fn columns(
    w: &BlockMatrix,
    input: &Q8kRows,
    cols: std::ops::Range<usize>,
    mut store: impl FnMut(usize, usize, f32),
) {
    let kind = Kind::of(w.block_type()).expect("a Q4_K or Q6_K matrix");
    assert_eq!(w.cols(), input.cols, "activation width");
    assert!(cols.end <= w.rows());
    assert!(available(), "AVX-512 VNNI");
    let nb = input.cols / QK;
    UNPACKED.with(|u| {
        let mut u = u.borrow_mut();
        u.fill(kind, w.as_bytes(), nb, cols.clone());
        let (subs, pairs) = (kind.subs(), kind.pairs());
        let groups = cols.len().div_ceil(GROUP);
        for r0 in (0..input.rows).step_by(TILE_ROWS) {
            let m = TILE_ROWS.min(input.rows - r0);
            for g0 in (0..groups).step_by(TILE_GROUPS) {
                let v = TILE_GROUPS.min(groups - g0);
                let x = input.blocks[r0 * nb..].as_ptr() as *const u8;
                let (sums, sums_block) = match kind {
                    // The 32-value sums, packed beside the blocks.
                    Kind::Q4K => (input.pair_sums[r0 * nb * 4..].as_ptr() as *const u8, 16),
                    // The Q8_K blocks' own 16-value sums.
                    Kind::Q6K => (x.wrapping_add(260), Q8K_BYTES),
                };
                let operands = Operands {
                    x,
                    sums,
                    sums_block,
                    values: u.values[g0 * nb * 64..].as_ptr(),
                    scales: u.scales[g0 * nb * subs * GROUP..].as_ptr(),
                    fix: u.fix[g0 * nb * GROUP..].as_ptr(),
                    fix_pairs: u.fix_pairs[g0 * nb * pairs * GROUP..].as_ptr(),
                    nb,
                };
                let mut out = [[[0f32; GROUP]; TILE_GROUPS]; TILE_ROWS];
                macro_rules! run {
                    ($m:literal, $v:literal) => {{
                        // SAFETY: the CPU has AVX-512F/BW and VNNI (asserted
                        // above); the tile's rows and groups lie inside the
                        // buffers (`m` rows from `r0`, `v` groups from `g0`).
                        let t = unsafe {
                            match kind {
                                Kind::Q4K => avx512::tile::<$m, $v, 8, 4>(operands),
                                Kind::Q6K => avx512::tile::<$m, $v, 16, 8>(operands),
                            }
                        };
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
/// correction sums (rows follow at `nb` blocks; the sums' blocks are
/// `sums_block` bytes apart), the first group's unpacked weights (groups
/// follow at `nb` blocks).
#[derive(Clone, Copy)]
struct Operands {
    x: *const u8,
    sums: *const u8,
    sums_block: usize,
    values: *const Line,
    scales: *const f32,
    fix: *const f32,
    fix_pairs: *const i32,
    nb: usize,
}

/// Value unpacking on AVX2.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::unpack_q4k`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn unpack_q4k(q: &[u8], out: &mut [u8; 256]) {
        assert!(q.len() >= 128);
        let m4 = _mm256_set1_epi8(0xF);
        for j in 0..4 {
            let bits = _mm256_loadu_si256(q.as_ptr().add(32 * j) as *const __m256i);
            let dst = out.as_mut_ptr().add(64 * j);
            _mm256_storeu_si256(dst as *mut __m256i, _mm256_and_si256(bits, m4));
            _mm256_storeu_si256(
                dst.add(32) as *mut __m256i,
                _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4),
            );
        }
    }

    /// [`super::unpack_q6k`]: per half, 32 low-bit bytes `a` and `b` and
    /// 32 high-bit bytes `h` give four runs of 32 values (byte shifts done
    /// on 16-bit lanes, the bits crossing into the next byte masked off).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn unpack_q6k(q: &[u8], out: &mut [u8; 256]) {
        assert!(q.len() >= 192);
        let (m4, m30) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x30));
        let load = |at: usize| _mm256_loadu_si256(q.as_ptr().add(at) as *const __m256i);
        for j in 0..2 {
            let (a, b, h) = (load(64 * j), load(64 * j + 32), load(128 + 32 * j));
            let runs = [
                _mm256_or_si256(
                    _mm256_and_si256(a, m4),
                    _mm256_and_si256(_mm256_slli_epi16::<4>(h), m30),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(b, m4),
                    _mm256_and_si256(_mm256_slli_epi16::<2>(h), m30),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(a), m4),
                    _mm256_and_si256(h, m30),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(b), m4),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(h), m30),
                ),
            ];
            for (i, run) in runs.into_iter().enumerate() {
                _mm256_storeu_si256(out.as_mut_ptr().add(128 * j + 32 * i) as *mut __m256i, run);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Line, Operands, RowBlock, GROUP, Q8K_BYTES};

    /// `M` activation rows against `V` groups of 16 weight rows over every
    /// block: per sub-block (`S` a block), `vpdpbusd` sums in i32 (exact),
    /// then `d·scale` applied in f32; per block the correction (`vpdpwssd`
    /// of the `P` i16 pairs with the activations' sums) and the
    /// activations' scale.
    #[allow(clippy::needless_range_loop)] // registers indexed by row and group
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const M: usize, const V: usize, const S: usize, const P: usize>(
        op: Operands,
    ) -> [[[f32; GROUP]; V]; M] {
        let nb = op.nb;
        let per_sub = 64 / S;
        let mut acc = [[_mm512_setzero_ps(); V]; M];
        for b in 0..nb {
            let mut blk = [[_mm512_setzero_ps(); V]; M];
            let xb: [*const u8; M] = std::array::from_fn(|m| op.x.add((m * nb + b) * Q8K_BYTES));
            for j in 0..S {
                let mut isum = [[_mm512_setzero_si512(); V]; M];
                for g in per_sub * j..per_sub * (j + 1) {
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
                    let sc = _mm512_loadu_ps(op.scales.add(((v * nb + b) * S + j) * GROUP));
                    for m in 0..M {
                        blk[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m][v]), sc, blk[m][v]);
                    }
                }
            }
            for v in 0..V {
                let pairs: [__m512i; P] = std::array::from_fn(|p| {
                    _mm512_loadu_si512(op.fix_pairs.add(((v * nb + b) * P + p) * GROUP) as *const _)
                });
                let fix = _mm512_loadu_ps(op.fix.add((v * nb + b) * GROUP));
                for m in 0..M {
                    let sums = op.sums.add((m * nb + b) * op.sums_block) as *const i32;
                    let mut dot = _mm512_setzero_si512();
                    for (p, pair) in pairs.iter().enumerate() {
                        dot = _mm512_dpwssd_epi32(dot, *pair, _mm512_set1_epi32(sums.add(p).read_unaligned()));
                    }
                    blk[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), fix, blk[m][v]);
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

    /// [`super::transpose`]: line `g` gathers word `g` of the 16 rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose(rows: &[RowBlock], lines: &mut [Line]) {
        assert!(rows.len() == GROUP && lines.len() == 64);
        let base = rows[0].values.as_ptr();
        let stride = std::mem::size_of::<RowBlock>();
        let index = _mm512_setr_epi32(
            0,
            stride as i32,
            2 * stride as i32,
            3 * stride as i32,
            4 * stride as i32,
            5 * stride as i32,
            6 * stride as i32,
            7 * stride as i32,
            8 * stride as i32,
            9 * stride as i32,
            10 * stride as i32,
            11 * stride as i32,
            12 * stride as i32,
            13 * stride as i32,
            14 * stride as i32,
            15 * stride as i32,
        );
        for (g, line) in lines.iter_mut().enumerate() {
            let words = _mm512_i32gather_epi32::<1>(index, base.add(4 * g) as *const _);
            _mm512_store_si512(line.0.as_mut_ptr() as *mut _, words);
        }
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
        for ty in [BlockType::Q4K, BlockType::Q6K] {
            for (rows, out) in [(1, 16), (5, 37), (17, 70)] {
                let cols = 3 * QK;
                let w = BlockMatrix::quantize(ty, &values(out * cols, 3), out, cols).unwrap();
                let x = values(rows * cols, 11);
                let q = Q8kRows::quantize(&x, rows, cols, false);
                let decode = w.quantize_input(&x, rows);
                let mut got = vec![f32::NAN; rows * out];
                columns(&w, &q, 3..out, |r, c, v| got[r * out + c] = v);
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
                            "{ty:?} row {r} col {c}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn vector_unpacking_equals_the_scalar_one() {
        let bytes: Vec<u8> = (0..192u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (mut fast, mut slow) = ([0u8; QK], [0u8; QK]);
        unpack_q4k(&bytes[..128], &mut fast);
        for (j, q) in bytes[..128].chunks_exact(32).enumerate() {
            for (i, &q) in q.iter().enumerate() {
                slow[64 * j + i] = q & 0xF;
                slow[64 * j + 32 + i] = q >> 4;
            }
        }
        assert_eq!(fast, slow, "Q4_K");
        unpack_q6k(&bytes, &mut fast);
        let (ql, qh) = bytes.split_at(128);
        for (n, out) in slow.iter_mut().enumerate() {
            // ggml's dequantize_row_q6_K, index by index.
            let (j, l, run) = (n / 128, n % 32, (n % 128) / 32);
            let low = ql[64 * j + l + 32 * (run % 2)];
            let low = if run < 2 { low & 0xF } else { low >> 4 };
            *out = low | (((qh[32 * j + l] >> (2 * run)) & 3) << 4);
        }
        assert_eq!(fast, slow, "Q6_K");
        let rows: Vec<RowBlock> = (0..GROUP)
            .map(|l| {
                let mut r = RowBlock::ZERO;
                for (i, v) in r.values.iter_mut().enumerate() {
                    *v = (l * 7 + i * 3) as u8;
                }
                r
            })
            .collect();
        let mut lines = vec![Line([0; 64]); 64];
        transpose(&rows, &mut lines);
        for (g, line) in lines.iter().enumerate() {
            for (l, row) in rows.iter().enumerate() {
                assert_eq!(
                    line.0[4 * l..4 * l + 4],
                    row.values[4 * g..4 * g + 4],
                    "line {g} row {l}"
                );
            }
        }
    }
}
