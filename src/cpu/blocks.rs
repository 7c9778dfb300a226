//! Weights held in llama.cpp's block formats, exactly as a GGUF file stores
//! them: Q4_0, Q5_0, Q5_1 (32 values a block) and the k-quants Q4_K, Q5_K,
//! Q6_K (256 values a super-block). The block layouts, their
//! dequantization and their dot products are candle's ports of ggml's
//! (`candle_core::quantized::k_quants`, with AVX2 dot products chosen at
//! run time), so the numbers are llama.cpp's: each weight row is dotted
//! against the activation row quantized to the block type's partner
//! (Q8_K for the k-quants, Q8_0 for Q4_0 and Q5_0, Q8_1 for Q5_1), as llama.cpp's
//! CPU backend does. Every product takes this path, decode-sized or
//! prompt-sized, so a token's result does not depend on how many rows share
//! its step (the f32, bf16 and Q8_0 paths keep the same property by
//! running one arithmetic everywhere).
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

impl BlockMatrix {
    /// Takes the raw bytes of a GGUF tensor of `[rows, cols]` in `ty`.
    pub fn from_bytes(ty: BlockType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, BlockError> {
        let block = ty.block_values();
        if !cols.is_multiple_of(block) {
            return Err(BlockError::Width { ty, cols, block });
        }
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

    /// Quantizes a row-major `[rows, cols]` f32 matrix as ggml's reference
    /// quantizer does (for tests and `quantize`).
    pub fn quantize(ty: BlockType, w: &[f32], rows: usize, cols: usize) -> Result<Self, BlockError> {
        fn q<T: GgmlType>(w: &[f32]) -> Vec<T> {
            let mut out = vec![T::zeros(); w.len() / T::BLCK_SIZE];
            T::from_float(w, &mut out);
            out
        }
        let block = ty.block_values();
        if !cols.is_multiple_of(block) {
            return Err(BlockError::Width { ty, cols, block });
        }
        assert_eq!(w.len(), rows * cols, "a [{rows}, {cols}] matrix");
        let blocks = match ty {
            BlockType::Q4_0 => Blocks::Q4_0(q(w)),
            BlockType::Q5_0 => Blocks::Q5_0(q(w)),
            BlockType::Q5_1 => Blocks::Q5_1(q(w)),
            BlockType::Q4K => Blocks::Q4K(q(w)),
            BlockType::Q5K => Blocks::Q5K(q(w)),
            BlockType::Q6K => Blocks::Q6K(q(w)),
        };
        Ok(Self { rows, cols, ty, blocks })
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
                BlockQ8K::from_float(x, &mut q);
                QuantizedInput::Q8K { blocks: q, cols }
            }
            BlockType::Q4_0 | BlockType::Q5_0 => {
                let mut q = vec![BlockQ8_0::zeros(); x.len() / BlockQ8_0::BLCK_SIZE];
                BlockQ8_0::from_float(x, &mut q);
                QuantizedInput::Q8_0 { blocks: q, cols }
            }
            BlockType::Q5_1 => {
                let mut q = vec![BlockQ8_1::zeros(); x.len() / BlockQ8_1::BLCK_SIZE];
                BlockQ8_1::from_float(x, &mut q);
                QuantizedInput::Q8_1 { blocks: q, cols }
            }
        }
    }

    /// `Σᵢ w[o, i] · x[r, i]` for weight row `o` and quantized input row `r`.
    pub fn dot(&self, o: usize, input: &QuantizedInput, r: usize) -> f32 {
        let n = self.blocks_per_row();
        let row = o * n..(o + 1) * n;
        match (&self.blocks, input) {
            (Blocks::Q4K(b), QuantizedInput::Q8K { blocks, .. }) => {
                BlockQ4K::vec_dot(self.cols, &b[row], input_row(blocks, r, self.cols))
            }
            (Blocks::Q5K(b), QuantizedInput::Q8K { blocks, .. }) => {
                BlockQ5K::vec_dot(self.cols, &b[row], input_row(blocks, r, self.cols))
            }
            (Blocks::Q6K(b), QuantizedInput::Q8K { blocks, .. }) => {
                BlockQ6K::vec_dot(self.cols, &b[row], input_row(blocks, r, self.cols))
            }
            (Blocks::Q4_0(b), QuantizedInput::Q8_0 { blocks, .. }) => {
                BlockQ4_0::vec_dot(self.cols, &b[row], input_row(blocks, r, self.cols))
            }
            (Blocks::Q5_0(b), QuantizedInput::Q8_0 { blocks, .. }) => {
                BlockQ5_0::vec_dot(self.cols, &b[row], input_row(blocks, r, self.cols))
            }
            (Blocks::Q5_1(b), QuantizedInput::Q8_1 { blocks, .. }) => {
                BlockQ5_1::vec_dot(self.cols, &b[row], input_row(blocks, r, self.cols))
            }
            _ => unreachable!("input quantized for this matrix's block type"),
        }
    }
}

impl BlockMatrix {
    /// `y[r, o]` for the weight rows `cols` and every input row of `input`
    /// (`rows` of them), handed to `store(r, o, value)`.
    pub fn product(
        &self,
        input: &QuantizedInput,
        rows: usize,
        cols: std::ops::Range<usize>,
        mut store: impl FnMut(usize, usize, f32),
    ) {
        for o in cols {
            for r in 0..rows {
                store(r, o, self.dot(o, input, r));
            }
        }
    }
}

/// Row `r` of quantized input blocks for rows of `cols` values.
fn input_row<T: GgmlType>(blocks: &[T], r: usize, cols: usize) -> &[T] {
    let n = cols / T::BLCK_SIZE;
    &blocks[r * n..(r + 1) * n]
}

/// Activation rows quantized for [`BlockMatrix::dot`].
pub enum QuantizedInput {
    /// For the k-quants: Q8_K blocks of 256.
    Q8K {
        /// The blocks, row after row.
        blocks: Vec<BlockQ8K>,
        /// Values per row.
        cols: usize,
    },
    /// For Q4_0 and Q5_0: Q8_0 blocks of 32.
    Q8_0 {
        /// The blocks, row after row.
        blocks: Vec<BlockQ8_0>,
        /// Values per row.
        cols: usize,
    },
    /// For Q5_1: Q8_1 blocks of 32 (with their sums).
    Q8_1 {
        /// The blocks, row after row.
        blocks: Vec<BlockQ8_1>,
        /// Values per row.
        cols: usize,
    },
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

    const ALL: [BlockType; 6] = [
        BlockType::Q4_0,
        BlockType::Q5_0,
        BlockType::Q5_1,
        BlockType::Q4K,
        BlockType::Q5K,
        BlockType::Q6K,
    ];

    #[test]
    fn bytes_round_trip_and_sizes_are_the_files() {
        for ty in ALL {
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
        for ty in ALL {
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
}
