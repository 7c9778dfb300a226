//! Weights held in llama.cpp's block formats, exactly as a GGUF file stores
//! them: Q4_0, Q5_0, Q5_1 (32 values a block) and the k-quants Q4_K, Q5_K,
//! Q6_K (256 values a super-block). The block layouts, their
//! dequantization and their dot products are candle's ports of ggml's
//! (`candle_core::quantized::k_quants`, with AVX2 dot products chosen at
//! run time), so the numbers are llama.cpp's: each weight row is dotted
//! against the activation row quantized to the block type's partner
//! (Q8_K for the k-quants, Q8_0 for Q4_0 and Q5_0, Q8_1 for Q5_1), as llama.cpp's
//! CPU backend does, in decode-sized products (up to 16 rows; their results
//! do not depend on how many rows share the step). candle has AVX2 dot
//! products for Q4_0 and the k-quants; Q5_0 × Q8_0 and Q5_1 × Q8_1 (the
//! fallbacks of Q4_K and Q5_K for rows not a multiple of 256) are written
//! here after ggml's, and Q4_K × Q8_K and Q6_K × Q8_K on AVX-512BW (ggml's
//! AVX2 algorithms on 512-bit registers: +11–14% and another +11–18%
//! Q4_K_M decode on the 1.5B shape).
//! Prompt-sized products of Q4_K and Q6_K on AVX-512 VNNI run in 8-bit
//! integers (`gemm_vnni`, the decode path's Q8_K activations); the other
//! block types, and these without VNNI, widen a task's weight rows to f32 for the
//! tiled kernel instead (as for Q8_0), so a prompt's rows and a decoded row
//! may differ in the last bits, as in llama.cpp.
//!
//! A matrix holds only its blocks: a 4.5-bit Q4_K matrix occupies its file
//! size, not the 32 bits a value of f32.

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::GgmlDType;

/// The block formats held here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// 32 values: 4-bit, one f16 scale.
    Q4_0,
    /// 32 values: 5-bit, one f16 scale.
    Q5_0,
    /// 32 values: 5-bit, f16 scale and minimum.
    Q5_1,
    /// 256 values: 4-bit, 6-bit sub-block scales and minimums.
    Q4K,
    /// 256 values: 5-bit, 6-bit sub-block scales and minimums.
    Q5K,
    /// 256 values: 6-bit, 8-bit sub-block scales.
    Q6K,
}

impl BlockType {
    /// Every block type, 32-value ones first.
    pub const ALL: [BlockType; 6] = [Self::Q4_0, Self::Q5_0, Self::Q5_1, Self::Q4K, Self::Q5K, Self::Q6K];

    /// The block type of a GGML dtype, when it is one of these.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    /// The GGML dtype.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.ggml().type_size()
    }

    /// Its name as llama.cpp writes it (`q4_K`, `q5_0`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "q4_0",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q4K => "q4_K",
            Self::Q5K => "q5_K",
            Self::Q6K => "q6_K",
        }
    }
}

/// The blocks of a matrix, row after row, in their own type.
#[derive(Debug, Clone)]
enum Blocks {
    Q4_0(Vec<BlockQ4_0>),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
}

/// Calls `$body` with `$b` bound to the block slice of `$blocks`, whatever its type.
macro_rules! with_blocks {
    ($blocks:expr, $b:ident => $body:expr) => {
        match $blocks {
            Blocks::Q4_0($b) => $body,
            Blocks::Q5_0($b) => $body,
            Blocks::Q5_1($b) => $body,
            Blocks::Q4K($b) => $body,
            Blocks::Q5K($b) => $body,
            Blocks::Q6K($b) => $body,
        }
    };
}

/// Copies GGUF bytes into blocks of type `T` (`bytes` a whole number of them).
fn from_bytes<T: GgmlType>(bytes: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    let n = bytes.len() / size;
    let mut out = vec![T::zeros(); n];
    // SAFETY: `out` owns `n` blocks of `size` bytes, properly aligned; the
    // block types are `repr(C)` plain data (f16 and byte arrays), valid for
    // any bit pattern, and `bytes` holds at least `n × size` bytes.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr() as *mut u8, n * size) };
    out
}

/// The bytes of blocks of type `T`, as a GGUF file stores them.
fn to_bytes<T: GgmlType>(blocks: &[T]) -> &[u8] {
    // SAFETY: the block types are `repr(C)` plain data without padding
    // (candle asserts their sizes); the slice covers exactly their bytes.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks)) }
}

/// A `[rows, cols]` matrix of weights in one block format.
#[derive(Debug, Clone)]
pub struct BlockMatrix {
    rows: usize,
    cols: usize,
    ty: BlockType,
    blocks: Blocks,
}

/// Why bytes could not be taken as a block matrix.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Rows are not a whole number of blocks.
    #[error("rows of {cols} values are not a whole number of {ty:?} blocks of {block}")]
    Width {
        /// The block type.
        ty: BlockType,
        /// Values per row.
        cols: usize,
        /// Values per block.
        block: usize,
    },
    /// The byte count does not match the shape.
    #[error("{got} bytes for a [{rows}, {cols}] {ty:?} matrix, expected {want}")]
    Size {
        /// The block type.
        ty: BlockType,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Bytes given.
        got: usize,
        /// Bytes the shape needs.
        want: usize,
    },
}

/// Values per block of `ty`, when rows of `cols` are a whole number of them.
fn check_width(ty: BlockType, cols: usize) -> Result<usize, BlockError> {
    let block = ty.block_values();
    if cols.is_multiple_of(block) {
        Ok(block)
    } else {
        Err(BlockError::Width { ty, cols, block })
    }
}

impl BlockMatrix {
    /// Takes the raw bytes of a GGUF tensor of `[rows, cols]` in `ty`.
    pub fn from_bytes(ty: BlockType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, BlockError> {
        let block = check_width(ty, cols)?;
        let want = rows * cols / block * ty.block_bytes();
        if bytes.len() != want {
            return Err(BlockError::Size {
                ty,
                rows,
                cols,
                got: bytes.len(),
                want,
            });
        }
        let blocks = match ty {
            BlockType::Q4_0 => Blocks::Q4_0(from_bytes(bytes)),
            BlockType::Q5_0 => Blocks::Q5_0(from_bytes(bytes)),
            BlockType::Q5_1 => Blocks::Q5_1(from_bytes(bytes)),
            BlockType::Q4K => Blocks::Q4K(from_bytes(bytes)),
            BlockType::Q5K => Blocks::Q5K(from_bytes(bytes)),
            BlockType::Q6K => Blocks::Q6K(from_bytes(bytes)),
        };
        Ok(Self { rows, cols, ty, blocks })
    }

    /// Quantizes a row-major `[rows, cols]` f32 matrix as llama-quantize
    /// does ([`super::block_quantize`]).
    pub fn quantize(ty: BlockType, w: &[f32], rows: usize, cols: usize) -> Result<Self, BlockError> {
        check_width(ty, cols)?;
        assert_eq!(w.len(), rows * cols, "a [{rows}, {cols}] matrix");
        let bytes = super::block_quantize::quantize(ty.ggml(), w).expect("every block type is quantized there");
        Self::from_bytes(ty, rows, cols, &bytes)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The block type.
    pub fn block_type(&self) -> BlockType {
        self.ty
    }

    /// Bytes held: exactly the GGUF tensor's.
    pub fn bytes(&self) -> usize {
        self.as_bytes().len()
    }

    /// The blocks' bytes, as the GGUF file stores them.
    pub fn as_bytes(&self) -> &[u8] {
        with_blocks!(&self.blocks, b => to_bytes(b))
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / self.ty.block_values()
    }

    /// Row `r` in f32 into `out` (`cols` values), as ggml dequantizes it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let n = self.blocks_per_row();
        #[cfg(target_arch = "x86_64")]
        if let Blocks::Q4K(b) = &self.blocks {
            if super::features::avx512bw() {
                // SAFETY: the CPU has AVX-512F/BW and F16C (checked just
                // above); `out` holds the row's values (asserted inside).
                return unsafe { avx512::dequantize_q4k(&b[r * n..(r + 1) * n], out) };
            }
        }
        with_blocks!(&self.blocks, b => GgmlType::to_float(&b[r * n..(r + 1) * n], out))
    }

    /// The whole matrix in f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }

    /// The activation rows `x` (`[rows, cols]`) quantized to this type's
    /// dot-product partner, once for all the weight rows they meet.
    pub fn quantize_input(&self, x: &[f32], rows: usize) -> QuantizedInput {
        let cols = self.cols;
        let x = &x[..rows * cols];
        match self.ty {
            BlockType::Q4K | BlockType::Q5K | BlockType::Q6K => {
                let mut q = vec![BlockQ8K::zeros(); x.len() / BlockQ8K::BLCK_SIZE];
                super::q8k::quantize(x, &mut q);
                QuantizedInput::Q8K(q)
            }
            BlockType::Q4_0 | BlockType::Q5_0 => {
                let mut q = vec![BlockQ8_0::zeros(); x.len() / BlockQ8_0::BLCK_SIZE];
                BlockQ8_0::from_float(x, &mut q);
                QuantizedInput::Q8_0(q)
            }
            BlockType::Q5_1 => {
                let mut q = vec![BlockQ8_1::zeros(); x.len() / BlockQ8_1::BLCK_SIZE];
                BlockQ8_1::from_float(x, &mut q);
                QuantizedInput::Q8_1(q)
            }
        }
    }

    /// `Σᵢ w[o, i] · x[r, i]` for weight row `o` and quantized input row `r`.
    pub fn dot(&self, o: usize, input: &QuantizedInput, r: usize) -> f32 {
        let n = self.blocks_per_row();
        let row = o * n..(o + 1) * n;
        match (&self.blocks, input) {
            (Blocks::Q4K(b), QuantizedInput::Q8K(blocks)) => {
                let (x, y) = (&b[row], input_row(blocks, r, self.cols));
                #[cfg(target_arch = "x86_64")]
                if super::features::avx512bw() {
                    // SAFETY: the CPU has AVX-512F and BW (checked just above);
                    // `x` and `y` are blocks of one row.
                    return unsafe { avx512::dot_q4k_q8k_rows::<1>([x], y)[0] };
                }
                BlockQ4K::vec_dot(self.cols, x, y)
            }
            (Blocks::Q5K(b), QuantizedInput::Q8K(blocks)) => {
                BlockQ5K::vec_dot(self.cols, &b[row], input_row(blocks, r, self.cols))
            }
            (Blocks::Q6K(b), QuantizedInput::Q8K(blocks)) => {
                let (x, y) = (&b[row], input_row(blocks, r, self.cols));
                #[cfg(target_arch = "x86_64")]
                if super::features::avx512bw() {
                    // SAFETY: the CPU has AVX-512F and BW (checked just above);
                    // `x` and `y` are blocks of one row.
                    return unsafe { avx512::dot_q6k_q8k_rows::<1>([x], y)[0] };
                }
                BlockQ6K::vec_dot(self.cols, x, y)
            }
            (Blocks::Q4_0(b), QuantizedInput::Q8_0(blocks)) => {
                BlockQ4_0::vec_dot(self.cols, &b[row], input_row(blocks, r, self.cols))
            }
            (Blocks::Q5_0(b), QuantizedInput::Q8_0(blocks)) => {
                let (x, y) = (&b[row], input_row(blocks, r, self.cols));
                #[cfg(target_arch = "x86_64")]
                if super::features::avx2() {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above);
                    // `x` and `y` are blocks of one row.
                    return unsafe { avx2::dot_q5_0_q8_0(x, y) };
                }
                BlockQ5_0::vec_dot(self.cols, x, y)
            }
            (Blocks::Q5_1(b), QuantizedInput::Q8_1(blocks)) => {
                let (x, y) = (&b[row], input_row(blocks, r, self.cols));
                #[cfg(target_arch = "x86_64")]
                if super::features::avx2() {
                    // SAFETY: as above.
                    return unsafe { avx2::dot_q5_1_q8_1(x, y) };
                }
                BlockQ5_1::vec_dot(self.cols, x, y)
            }
            _ => unreachable!("input quantized for this matrix's block type"),
        }
    }
}

impl BlockMatrix {
    /// `y[r, o]` for the weight rows `cols` and every input row of `input`
    /// (`rows` of them), handed to `store(r, o, value)`: the decode-sized
    /// product.
    pub fn product(
        &self,
        input: &QuantizedInput,
        rows: usize,
        cols: std::ops::Range<usize>,
        mut store: impl FnMut(usize, usize, f32),
    ) {
        // Four weight rows at a time against each input row on AVX-512BW
        // (Q4_K, Q6_K): the activations' registers are built once for the
        // four; the rest row by row, with the same arithmetic.
        #[cfg(target_arch = "x86_64")]
        if super::features::avx512bw() {
            let n = self.blocks_per_row();
            let four = match (&self.blocks, input) {
                (Blocks::Q4K(b), QuantizedInput::Q8K(q)) => Some(Four::Q4K(b, q)),
                (Blocks::Q6K(b), QuantizedInput::Q8K(q)) => Some(Four::Q6K(b, q)),
                _ => None,
            };
            if let (Some(four), 2..) = (four, rows) {
                // A batch: each weight row's blocks unpacked once for up
                // to eight activation rows.
                for o in cols {
                    let mut r0 = 0;
                    while r0 < rows {
                        let take = (rows - r0).min(8);
                        let q = match four {
                            Four::Q4K(_, q) | Four::Q6K(_, q) => q,
                        };
                        let y = |i: usize| input_row(q, r0 + i, self.cols);
                        let mut v = [0f32; 8];
                        macro_rules! acts {
                            ($r:literal) => {
                                // SAFETY: the CPU has AVX-512F/BW and F16C
                                // (checked above); the rows are whole rows
                                // of blocks.
                                v[..$r].copy_from_slice(&unsafe {
                                    match four {
                                        Four::Q4K(b, _) => avx512::dot_q4k_q8k_acts::<$r>(
                                            &b[o * n..(o + 1) * n],
                                            std::array::from_fn(y),
                                        ),
                                        Four::Q6K(b, _) => avx512::dot_q6k_q8k_acts::<$r>(
                                            &b[o * n..(o + 1) * n],
                                            std::array::from_fn(y),
                                        ),
                                    }
                                })
                            };
                        }
                        match take {
                            8 => acts!(8),
                            7 => acts!(7),
                            6 => acts!(6),
                            5 => acts!(5),
                            4 => acts!(4),
                            3 => acts!(3),
                            2 => acts!(2),
                            _ => acts!(1),
                        }
                        for (i, &v) in v[..take].iter().enumerate() {
                            store(r0 + i, o, v);
                        }
                        r0 += take;
                    }
                }
                return;
            }
            if let Some(four) = four {
                let mut o = cols.start;
                while o + 4 <= cols.end {
                    for r in 0..rows {
                        let range = |i: usize| (o + i) * n..(o + i + 1) * n;
                        // SAFETY: the CPU has AVX-512F/BW and F16C (checked
                        // above); the rows are whole rows of blocks.
                        let v = unsafe {
                            match four {
                                Four::Q4K(b, q) => avx512::dot_q4k_q8k_rows::<4>(
                                    std::array::from_fn(|i| &b[range(i)]),
                                    input_row(q, r, self.cols),
                                ),
                                Four::Q6K(b, q) => avx512::dot_q6k_q8k_rows::<4>(
                                    std::array::from_fn(|i| &b[range(i)]),
                                    input_row(q, r, self.cols),
                                ),
                            }
                        };
                        for (i, v) in v.into_iter().enumerate() {
                            store(r, o + i, v);
                        }
                    }
                    o += 4;
                }
                for o in o..cols.end {
                    for r in 0..rows {
                        store(r, o, self.dot(o, input, r));
                    }
                }
                return;
            }
        }
        for o in cols {
            for r in 0..rows {
                store(r, o, self.dot(o, input, r));
            }
        }
    }
}

/// The weight and activation blocks of a product the four-row kernels take.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Four<'a> {
    Q4K(&'a [BlockQ4K], &'a [BlockQ8K]),
    Q6K(&'a [BlockQ6K], &'a [BlockQ8K]),
}

/// ggml's AVX2 dot products of Q5_0 × Q8_0 and Q5_1 × Q8_1 blocks (candle
/// runs these two in scalar code). The blocks are read at their `repr(C)`
/// offsets: Q5_0 = d (f16), qh (4 bytes), qs (16); Q5_1 = d, m (f16), qh,
/// qs; Q8_0 = d (f16), qs (32 × i8); Q8_1 = d, s (f16), qs.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use candle_core::quantized::k_quants::{BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1};
    use half::f16;

    const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22 && std::mem::size_of::<BlockQ5_1>() == 24);
    const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34 && std::mem::size_of::<BlockQ8_1>() == 36);

    /// The f16 at byte `at` of a block.
    #[inline]
    unsafe fn half_at(p: *const u8, at: usize) -> f32 {
        f16::from_le_bytes([*p.add(at), *p.add(at + 1)]).to_f32()
    }

    /// 32 nibbles of 16 bytes as 32 bytes (low nibbles first).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let tmp = _mm_loadu_si128(p as *const __m128i);
        let bytes = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4));
        _mm256_and_si256(_mm256_set1_epi8(0xF), bytes)
    }

    /// The 32 bits at `p` as 32 bytes: 0xFF where the bit is set, else 0.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn bits(p: *const u8) -> __m256i {
        let x32 = u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
        let shuffle = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32 as i32), shuffle);
        let mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
        _mm256_cmpeq_epi8(_mm256_or_si256(bytes, mask), _mm256_set1_epi64x(-1))
    }

    /// Σ x·y over 32 signed bytes each, as 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot_i8(x: __m256i, y: __m256i) -> __m256 {
        let products = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), products))
    }

    /// Σ x·y over 32 unsigned (x) by signed (y) bytes, as 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot_u8_i8(x: __m256i, y: __m256i) -> __m256 {
        let products = _mm256_maddubs_epi16(x, y);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), products))
    }

    /// The eight lanes summed.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
    }

    /// Σ over the blocks of `x` (Q5_0) and `y` (Q8_0, as many).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
        assert_eq!(x.len(), y.len());
        let mut acc = _mm256_setzero_ps();
        for (xb, yb) in x.iter().zip(y) {
            let (xp, yp) = (xb as *const BlockQ5_0 as *const u8, yb as *const BlockQ8_0 as *const u8);
            let d = _mm256_set1_ps(half_at(xp, 0) * half_at(yp, 0));
            // A value is its nibble plus 16 × its high bit, minus 16: a
            // clear high bit sets the byte's top nibble (−16 + nibble).
            let high = _mm256_andnot_si256(bits(xp.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
            let qx = _mm256_or_si256(nibbles(xp.add(6)), high);
            let qy = _mm256_loadu_si256(yp.add(2) as *const __m256i);
            acc = _mm256_fmadd_ps(d, dot_i8(qx, qy), acc);
        }
        hsum(acc)
    }

    /// Σ over the blocks of `x` (Q5_1) and `y` (Q8_1, as many).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q5_1_q8_1(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
        assert_eq!(x.len(), y.len());
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (xb, yb) in x.iter().zip(y) {
            let (xp, yp) = (xb as *const BlockQ5_1 as *const u8, yb as *const BlockQ8_1 as *const u8);
            // Q5_1: value = d·q + m with q in 0..32; Q8_1 carries s = d·Σq.
            mins += half_at(xp, 2) * half_at(yp, 2);
            let d = _mm256_set1_ps(half_at(xp, 0) * half_at(yp, 0));
            let high = _mm256_and_si256(bits(xp.add(4)), _mm256_set1_epi8(0x10));
            let qx = _mm256_or_si256(nibbles(xp.add(8)), high);
            let qy = _mm256_loadu_si256(yp.add(4) as *const __m256i);
            acc = _mm256_fmadd_ps(d, dot_u8_i8(qx, qy), acc);
        }
        hsum(acc) + mins
    }
}

/// The Q4_K × Q8_K dot product on AVX-512BW: ggml's AVX2 algorithm on
/// 512-bit registers, 128 values a step. Blocks at their `repr(C)`
/// offsets: Q4_K = d, dmin (f16), scales (12 bytes: eight 6-bit scales and
/// eight 6-bit minimums), qs (128 bytes of nibbles: per 64 values, the low
/// nibbles of 32 bytes then their high nibbles); Q8_K = d (f32), qs (256 ×
/// i8), bsums (16 × i16, sums of 16 values).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8K};

    use super::scales_and_mins;

    const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144 && std::mem::size_of::<BlockQ8K>() == 292);
    const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

    /// Byte shuffles that spread a Q6_K block's 16 scales over the 16-bit
    /// lanes of 64 values: for half `j` of the block, the scales of values
    /// 0–63 (`[j][0]`, `[j][1]`) and of values 64–127 (`[j][2]`, `[j][3]`),
    /// each scale repeated for the 8 lanes of its 16 values.
    const Q6K_SCALE_SHUFFLES: [[[u8; 16]; 4]; 2] = {
        let mut out = [[[0u8; 16]; 4]; 2];
        let mut j = 0;
        while j < 2 {
            let mut q = 0;
            while q < 4 {
                let mut b = 0;
                while b < 16 {
                    out[j][q][b] = (8 * j + 2 * q + b / 8) as u8;
                    b += 1;
                }
                q += 1;
            }
            j += 1;
        }
        out
    };

    /// Prefetches the block `2 · bytes` past `xp` (`lines` cache lines):
    /// the one two on, while this one is computed; past a row's end the
    /// address is only a hint.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn prefetch_two_on(xp: *const u8, bytes: usize, lines: usize) {
        let ahead = xp.wrapping_add(2 * bytes) as *const i8;
        for line in 0..lines {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
        }
    }

    /// A Q8_K block's scale.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn q8k_scale(yp: *const u8) -> f32 {
        f32::from_le_bytes([*yp, *yp.add(1), *yp.add(2), *yp.add(3)])
    }

    /// The eight sums of a Q8_K block's 32-value sub-blocks, from its 16
    /// sums of 16.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn q8k_sub_sums(yp: *const u8) -> __m128i {
        let bsums = yp.add(260);
        _mm_hadd_epi16(
            _mm_loadu_si128(bsums as *const __m128i),
            _mm_loadu_si128(bsums.add(16) as *const __m128i),
        )
    }

    /// The sum of four i32 lanes, exactly.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn sum_i32x4(m: __m128i) -> i32 {
        let m = _mm_add_epi32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
        let m = _mm_add_epi32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
        _mm_cvtsi128_si32(m)
    }

    /// A Q4_K block's `d` and `dmin` (f16 → f32) and its eight scales then
    /// eight minimums as bytes ([`scales_and_mins`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn q4k_header(xp: *const u8) -> (f32, f32, __m128i) {
        let dd = _mm_cvtph_ps(_mm_cvtsi32_si128((xp as *const i32).read_unaligned()));
        let sm = scales_and_mins(&*(xp.add(4) as *const [u8; 12]));
        (
            _mm_cvtss_f32(dd),
            _mm_cvtss_f32(_mm_movehdup_ps(dd)),
            _mm_loadu_si128(sm.as_ptr() as *const __m128i),
        )
    }

    /// The [`SPREAD`] permutations in registers.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn q4k_spread() -> [[__m512i; 2]; 2] {
        let load = |p: &[u16; 32]| _mm512_loadu_si512(p.as_ptr() as *const _);
        [
            [load(&SPREAD[0][0]), load(&SPREAD[0][1])],
            [load(&SPREAD[1][0]), load(&SPREAD[1][1])],
        ]
    }

    /// A Q6_K block's scale `d` (f16 → f32).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn q6k_scale(xp: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
            (xp.add(208) as *const u16).read_unaligned(),
        ))))
    }

    /// Half `j` of a Q6_K block's 6-bit values: values 0–63 and 64–127 of
    /// the half, from its low 4 bits (`ql`) and high 2 bits (`qh`, shifted
    /// per lane by `s01` and `s23`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn q6k_values(xp: *const u8, j: usize, s01: __m512i, s23: __m512i) -> (__m512i, __m512i) {
        let (m4, m2) = (_mm512_set1_epi8(0xF), _mm512_set1_epi8(3));
        let low = _mm512_loadu_si512(xp.add(64 * j) as *const _);
        let high = _mm256_loadu_si256(xp.add(128 + 32 * j) as *const __m256i);
        let high = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(high), high);
        let h01 = _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(high, s01), m2));
        let h23 = _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(high, s23), m2));
        (
            _mm512_or_si512(_mm512_and_si512(low, m4), h01),
            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(low), m4), h23),
        )
    }

    /// Per 16-bit lane: shifts of Q6_K's high bits, `a` for the first 32
    /// bytes of a half, `b` for the next 32 (`s01`, `s23` of [`q6k_values`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn q6k_shifts() -> (__m512i, __m512i) {
        let shifts = |a: i16, b: i16| {
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_set1_epi16(a)), _mm256_set1_epi16(b))
        };
        (shifts(0, 2), shifts(4, 6))
    }

    /// 32 scale bytes (two shuffles of `scales`) widened to 32 i16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn spread(scales: __m128i, a: &[u8; 16], b: &[u8; 16]) -> __m512i {
        let lo = _mm_shuffle_epi8(scales, _mm_loadu_si128(a.as_ptr() as *const __m128i));
        let hi = _mm_shuffle_epi8(scales, _mm_loadu_si128(b.as_ptr() as *const __m128i));
        _mm512_cvtepi8_epi16(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi))
    }

    /// Σ over the blocks of `x` (Q6_K) and `y` (Q8_K, as many) for `R`
    /// weight rows against one activation row: ggml's AVX2 algorithm on
    /// 512-bit registers, the activations' registers (and their `32·y`
    /// terms) built once per block for all `R` rows; each row's arithmetic
    /// is the same whatever `R`. Q6_K = ql (128 bytes: low 4 bits), qh (64:
    /// high 2 bits), scales (16 × i8, one per 16 values), d (f16); a value
    /// is `d · scale · (q − 32)`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q6k_q8k_rows<const R: usize>(x: [&[BlockQ6K]; R], y: &[BlockQ8K]) -> [f32; R] {
        for row in &x {
            assert_eq!(row.len(), y.len());
        }
        let m32 = _mm512_set1_epi8(32);
        let (s01, s23) = q6k_shifts();
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, yb) in y.iter().enumerate() {
            let yp = yb as *const BlockQ8K as *const u8;
            let yd = q8k_scale(yp);
            let q8 = yp.add(4);
            // Per half j: activations of values 0–63 and 64–127, and 32·y.
            let mut ys = [[_mm512_setzero_si512(); 4]; 2];
            for (j, half) in ys.iter_mut().enumerate() {
                let y01 = _mm512_loadu_si512(q8.add(128 * j) as *const _);
                let y23 = _mm512_loadu_si512(q8.add(128 * j + 64) as *const _);
                *half = [y01, y23, _mm512_maddubs_epi16(m32, y01), _mm512_maddubs_epi16(m32, y23)];
            }
            for i in 0..R {
                let xp = &x[i][b] as *const BlockQ6K as *const u8;
                // 210 bytes: four lines.
                prefetch_two_on(xp, 210, 4);
                let d = yd * q6k_scale(xp);
                let scales = _mm_loadu_si128(xp.add(192) as *const __m128i);
                let mut sumi = _mm512_setzero_si512();
                for (j, masks) in Q6K_SCALE_SHUFFLES.iter().enumerate() {
                    let (v01, v23) = q6k_values(xp, j, s01, s23);
                    let [y01, y23, s01y, s23y] = ys[j];
                    // (q − 32)·y as q·y − 32·y.
                    let p01 = _mm512_sub_epi16(_mm512_maddubs_epi16(v01, y01), s01y);
                    let p23 = _mm512_sub_epi16(_mm512_maddubs_epi16(v23, y23), s23y);
                    let p01 = _mm512_madd_epi16(spread(scales, &masks[0], &masks[1]), p01);
                    let p23 = _mm512_madd_epi16(spread(scales, &masks[2], &masks[3]), p23);
                    sumi = _mm512_add_epi32(sumi, _mm512_add_epi32(p01, p23));
                }
                acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc[i]);
            }
        }
        let mut out = [0f32; R];
        for i in 0..R {
            out[i] = _mm512_reduce_add_ps(acc[i]);
        }
        out
    }

    /// Lane indices that spread eight i16 scales over 32 lanes: `a` for
    /// lanes 0–15, `b` for 16–31.
    const fn spread_index(a: u16, b: u16) -> [u16; 32] {
        let mut out = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            out[i] = if i < 16 { a } else { b };
            i += 1;
        }
        out
    }

    /// Per half of a block, the scales of its low nibbles (sub-blocks
    /// 4·half and 4·half + 2) and of its high nibbles (+ 1, + 3).
    const SPREAD: [[[u16; 32]; 2]; 2] = [
        [spread_index(0, 2), spread_index(1, 3)],
        [spread_index(4, 6), spread_index(5, 7)],
    ];

    /// Σ over the blocks of `x` (Q4_K) and `y` (Q8_K, as many) for `R`
    /// weight rows against one activation row: the activations' registers
    /// and minimum sums are built once per block for all `R` rows. Each
    /// row's arithmetic is the same whatever `R` (the same bits).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4k_q8k_rows<const R: usize>(x: [&[BlockQ4K]; R], y: &[BlockQ8K]) -> [f32; R] {
        for row in &x {
            assert_eq!(row.len(), y.len());
        }
        let m4 = _mm512_set1_epi8(0xF);
        let spread = q4k_spread();
        let mut acc = [_mm512_setzero_ps(); R];
        let mut mins_total = [0f32; R];
        for (b, yb) in y.iter().enumerate() {
            let yp = yb as *const BlockQ8K as *const u8;
            let (yd, sums) = (q8k_scale(yp), q8k_sub_sums(yp));
            let q8 = yp.add(4);
            // Low nibbles meet values [0, 32) and [64, 96) of each half,
            // high nibbles [32, 64) and [96, 128).
            let ys = [
                [join(q8, q8.add(64)), join(q8.add(32), q8.add(96))],
                [join(q8.add(128), q8.add(192)), join(q8.add(160), q8.add(224))],
            ];
            for i in 0..R {
                let xp = &x[i][b] as *const BlockQ4K as *const u8;
                // 144 bytes: three lines.
                prefetch_two_on(xp, 144, 3);
                let (xd, xdmin, packed) = q4k_header(xp);
                let (d, dmin) = (yd * xd, yd * xdmin);
                let scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(packed));
                // Σ_j min_j · (sub-block j's activation sum), exactly in i32.
                let m = _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_srli_si128::<8>(packed)), sums);
                mins_total[i] += dmin * sum_i32x4(m) as f32;
                let q4 = xp.add(16);
                let mut sumi = _mm512_setzero_si512();
                for half in 0..2 {
                    let bits = _mm512_loadu_si512(q4.add(64 * half) as *const _);
                    let lo = _mm512_and_si512(bits, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(bits), m4);
                    let s_lo = _mm512_permutexvar_epi16(spread[half][0], scales);
                    let s_hi = _mm512_permutexvar_epi16(spread[half][1], scales);
                    let p_lo = _mm512_madd_epi16(s_lo, _mm512_maddubs_epi16(lo, ys[half][0]));
                    let p_hi = _mm512_madd_epi16(s_hi, _mm512_maddubs_epi16(hi, ys[half][1]));
                    sumi = _mm512_add_epi32(sumi, _mm512_add_epi32(p_lo, p_hi));
                }
                acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc[i]);
            }
        }
        let mut out = [0f32; R];
        for i in 0..R {
            out[i] = _mm512_reduce_add_ps(acc[i]) - mins_total[i];
        }
        out
    }

    /// Σ for one Q4_K weight row `x` against `R` activation rows (Q8_K, as
    /// many blocks each): each weight block is unpacked once (nibbles,
    /// scales, minimums) for all `R` rows, as a batched decode step needs.
    /// Each (weight row, activation row) pair has the arithmetic of
    /// [`dot_q4k_q8k_rows`], so the bits do not depend on the batch.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4k_q8k_acts<const R: usize>(x: &[BlockQ4K], y: [&[BlockQ8K]; R]) -> [f32; R] {
        for row in &y {
            assert_eq!(row.len(), x.len());
        }
        let m4 = _mm512_set1_epi8(0xF);
        let spread = q4k_spread();
        let mut acc = [_mm512_setzero_ps(); R];
        let mut mins_total = [0f32; R];
        for (b, xb) in x.iter().enumerate() {
            let xp = xb as *const BlockQ4K as *const u8;
            prefetch_two_on(xp, 144, 3);
            let (xd, xdmin, packed) = q4k_header(xp);
            let scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(packed));
            let mins = _mm_cvtepu8_epi16(_mm_srli_si128::<8>(packed));
            let q4 = xp.add(16);
            // Per half: low nibbles, high nibbles, and their scales.
            let mut w = [[_mm512_setzero_si512(); 4]; 2];
            for (half, wh) in w.iter_mut().enumerate() {
                let bits = _mm512_loadu_si512(q4.add(64 * half) as *const _);
                *wh = [
                    _mm512_and_si512(bits, m4),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(bits), m4),
                    _mm512_permutexvar_epi16(spread[half][0], scales),
                    _mm512_permutexvar_epi16(spread[half][1], scales),
                ];
            }
            for r in 0..R {
                let yp = &y[r][b] as *const BlockQ8K as *const u8;
                let yd = q8k_scale(yp);
                let m = _mm_madd_epi16(mins, q8k_sub_sums(yp));
                mins_total[r] += (yd * xdmin) * sum_i32x4(m) as f32;
                let q8 = yp.add(4);
                let mut sumi = _mm512_setzero_si512();
                for (half, [lo, hi, s_lo, s_hi]) in w.iter().enumerate() {
                    let base = 128 * half;
                    let y_lo = join(q8.add(base), q8.add(base + 64));
                    let y_hi = join(q8.add(base + 32), q8.add(base + 96));
                    let p_lo = _mm512_madd_epi16(*s_lo, _mm512_maddubs_epi16(*lo, y_lo));
                    let p_hi = _mm512_madd_epi16(*s_hi, _mm512_maddubs_epi16(*hi, y_hi));
                    sumi = _mm512_add_epi32(sumi, _mm512_add_epi32(p_lo, p_hi));
                }
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(yd * xd), _mm512_cvtepi32_ps(sumi), acc[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(acc[r]) - mins_total[r];
        }
        out
    }

    /// Σ for one Q6_K weight row `x` against `R` activation rows: each
    /// weight block unpacked once (6-bit values, spread scales) for all `R`
    /// rows; each pair has the arithmetic of [`dot_q6k_q8k_rows`].
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q6k_q8k_acts<const R: usize>(x: &[BlockQ6K], y: [&[BlockQ8K]; R]) -> [f32; R] {
        for row in &y {
            assert_eq!(row.len(), x.len());
        }
        let m32 = _mm512_set1_epi8(32);
        let (s01, s23) = q6k_shifts();
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, xb) in x.iter().enumerate() {
            let xp = xb as *const BlockQ6K as *const u8;
            prefetch_two_on(xp, 210, 4);
            let xd = q6k_scale(xp);
            let scales = _mm_loadu_si128(xp.add(192) as *const __m128i);
            // Per half: values 0–63 and 64–127, and their scales.
            let mut w = [[_mm512_setzero_si512(); 4]; 2];
            for (j, (wj, masks)) in w.iter_mut().zip(&Q6K_SCALE_SHUFFLES).enumerate() {
                let (v01, v23) = q6k_values(xp, j, s01, s23);
                *wj = [
                    v01,
                    v23,
                    spread(scales, &masks[0], &masks[1]),
                    spread(scales, &masks[2], &masks[3]),
                ];
            }
            for r in 0..R {
                let yp = &y[r][b] as *const BlockQ8K as *const u8;
                let yd = q8k_scale(yp);
                let q8 = yp.add(4);
                let mut sumi = _mm512_setzero_si512();
                for (j, [v01, v23, sc01, sc23]) in w.iter().enumerate() {
                    let y01 = _mm512_loadu_si512(q8.add(128 * j) as *const _);
                    let y23 = _mm512_loadu_si512(q8.add(128 * j + 64) as *const _);
                    let p01 = _mm512_sub_epi16(_mm512_maddubs_epi16(*v01, y01), _mm512_maddubs_epi16(m32, y01));
                    let p23 = _mm512_sub_epi16(_mm512_maddubs_epi16(*v23, y23), _mm512_maddubs_epi16(m32, y23));
                    let p01 = _mm512_madd_epi16(*sc01, p01);
                    let p23 = _mm512_madd_epi16(*sc23, p23);
                    sumi = _mm512_add_epi32(sumi, _mm512_add_epi32(p01, p23));
                }
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(yd * xd), _mm512_cvtepi32_ps(sumi), acc[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(acc[r]);
        }
        out
    }

    /// Q4_K blocks to f32 as ggml dequantizes them (`d·sc·q − dmin·m`, a
    /// product then a difference, no fused multiply-add, so the bits are
    /// ggml's), 32 values per step.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn dequantize_q4k(x: &[BlockQ4K], out: &mut [f32]) {
        assert!(out.len() >= x.len() * 256);
        let m4 = _mm_set1_epi8(0xF);
        for (b, xb) in x.iter().enumerate() {
            let xp = xb as *const BlockQ4K as *const u8;
            let (d, dmin, packed) = q4k_header(xp);
            let bytes: [u8; 16] = std::mem::transmute(packed);
            let q = xp.add(16);
            let dst = out.as_mut_ptr().add(256 * b);
            for j in 0..4 {
                // 32 bytes: low nibbles are values 64j..64j+32 (sub-block
                // 2j), high nibbles the next 32 (sub-block 2j + 1).
                for (half, shift) in [(0usize, false), (1, true)] {
                    let sub = 2 * j + half;
                    let d1 = _mm512_set1_ps(d * f32::from(bytes[sub]));
                    let m1 = _mm512_set1_ps(dmin * f32::from(bytes[8 + sub]));
                    for part in 0..2 {
                        let raw = _mm_loadu_si128(q.add(32 * j + 16 * part) as *const __m128i);
                        let nib = if shift {
                            _mm_and_si128(_mm_srli_epi16::<4>(raw), m4)
                        } else {
                            _mm_and_si128(raw, m4)
                        };
                        let v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(nib));
                        let y = _mm512_sub_ps(_mm512_mul_ps(d1, v), m1);
                        _mm512_storeu_ps(dst.add(64 * j + 32 * half + 16 * part), y);
                    }
                }
            }
        }
    }

    /// Two 32-byte halves as one 64-byte register.
    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn join(lo: *const u8, hi: *const u8) -> __m512i {
        let a = _mm256_loadu_si256(lo as *const __m256i);
        let b = _mm256_loadu_si256(hi as *const __m256i);
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
    }
}

/// A Q4_K block's 12 bytes of 6-bit scales and minimums as 16 bytes:
/// the eight scales, then the eight minimums (ggml's word arithmetic).
#[inline]
pub(crate) fn scales_and_mins(s: &[u8; 12]) -> [u32; 4] {
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (w0, w1, w2) = (w(0), w(1), w(2));
    [
        w0 & K1,
        (w2 & K2) | (((w0 >> 6) & K3) << 4),
        w1 & K1,
        ((w2 >> 4) & K2) | (((w1 >> 6) & K3) << 4),
    ]
}

/// Row `r` of quantized input blocks for rows of `cols` values.
fn input_row<T: GgmlType>(blocks: &[T], r: usize, cols: usize) -> &[T] {
    let n = cols / T::BLCK_SIZE;
    &blocks[r * n..(r + 1) * n]
}

/// Activation rows quantized for [`BlockMatrix::dot`], row after row.
pub enum QuantizedInput {
    /// For the k-quants: Q8_K blocks of 256.
    Q8K(Vec<BlockQ8K>),
    /// For Q4_0 and Q5_0: Q8_0 blocks of 32.
    Q8_0(Vec<BlockQ8_0>),
    /// For Q5_1: Q8_1 blocks of 32 (with their sums).
    Q8_1(Vec<BlockQ8_1>),
}

impl QuantizedInput {
    /// Whether these are the partner blocks of `ty`'s dot product.
    pub fn serves(&self, ty: BlockType) -> bool {
        matches!(
            (self, ty),
            (Self::Q8K(_), BlockType::Q4K | BlockType::Q5K | BlockType::Q6K)
                | (Self::Q8_0(_), BlockType::Q4_0 | BlockType::Q5_0)
                | (Self::Q8_1(_), BlockType::Q5_1)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth, signed test matrix.
    fn matrix(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32 / 13.0))
            .collect()
    }

    #[test]
    fn bytes_round_trip_and_sizes_are_the_files() {
        for ty in BlockType::ALL {
            let (rows, cols) = (3, 512);
            let m = BlockMatrix::quantize(ty, &matrix(rows, cols), rows, cols).unwrap();
            assert_eq!(m.bytes(), rows * cols / ty.block_values() * ty.block_bytes());
            let back = BlockMatrix::from_bytes(ty, rows, cols, m.as_bytes()).unwrap();
            assert_eq!(back.dequantize(), m.dequantize(), "{ty:?}");
            assert!(BlockMatrix::from_bytes(ty, rows, cols, &m.as_bytes()[1..]).is_err());
        }
        assert!(BlockMatrix::quantize(BlockType::Q4K, &matrix(1, 384), 1, 384).is_err());
    }

    #[test]
    fn dots_follow_the_dequantized_weights() {
        for ty in BlockType::ALL {
            let (rows, cols) = (5, 768);
            let w = matrix(rows, cols);
            let m = BlockMatrix::quantize(ty, &w, rows, cols).unwrap();
            let deq = m.dequantize();
            let x: Vec<f32> = (0..2 * cols).map(|i| ((i * 31 % 97) as f32 - 48.0) / 48.0).collect();
            let input = m.quantize_input(&x, 2);
            for r in 0..2 {
                for o in 0..rows {
                    let exact: f32 = (0..cols).map(|i| deq[o * cols + i] * x[r * cols + i]).sum();
                    let norm: f32 = (0..cols).map(|i| (deq[o * cols + i] * x[r * cols + i]).abs()).sum();
                    let got = m.dot(o, &input, r);
                    // The activations are quantized to 8 bits: within 1% of Σ|w·x|.
                    assert!((got - exact).abs() <= 0.01 * norm, "{ty:?} row {o}: {got} vs {exact}");
                }
            }
        }
    }

    #[test]
    fn our_simd_dots_equal_the_scalar_ones() {
        for ty in [BlockType::Q5_0, BlockType::Q5_1, BlockType::Q4K, BlockType::Q6K] {
            let (rows, cols) = (9, 256 * 3);
            let m = BlockMatrix::quantize(ty, &matrix(rows, cols), rows, cols).unwrap();
            let x: Vec<f32> = (0..cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let input = m.quantize_input(&x, 1);
            for o in 0..rows {
                let n = m.blocks_per_row();
                let scalar = match (&m.blocks, &input) {
                    (Blocks::Q5_0(b), QuantizedInput::Q8_0(blocks)) => {
                        BlockQ5_0::vec_dot_unopt(cols, &b[o * n..(o + 1) * n], blocks)
                    }
                    (Blocks::Q5_1(b), QuantizedInput::Q8_1(blocks)) => {
                        BlockQ5_1::vec_dot_unopt(cols, &b[o * n..(o + 1) * n], blocks)
                    }
                    (Blocks::Q4K(b), QuantizedInput::Q8K(blocks)) => {
                        BlockQ4K::vec_dot_unopt(cols, &b[o * n..(o + 1) * n], blocks)
                    }
                    (Blocks::Q6K(b), QuantizedInput::Q8K(blocks)) => {
                        BlockQ6K::vec_dot_unopt(cols, &b[o * n..(o + 1) * n], blocks)
                    }
                    _ => unreachable!(),
                };
                let got = m.dot(o, &input, 0);
                // Integer sums are exact; only the f32 order of the block sums differs.
                assert!(
                    (got - scalar).abs() <= 1e-5 * scalar.abs().max(1.0),
                    "{ty:?} row {o}: {got} vs {scalar}"
                );
            }
        }
    }
}
