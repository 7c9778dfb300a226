//! Weights held in IEEE half precision, as an f16 GGUF file stores them.
//! Every f16 is exactly an f32, so the kernels widen each weight as they
//! load it (F16C's `vcvtph2ps`, eight at a time) and run the f32
//! arithmetic unchanged: outputs have the bits of the same weights held in
//! f32, while decode reads half the bytes.

use half::f16;

/// A row-major `[rows, cols]` matrix of f16 values.
#[derive(Debug, Clone)]
pub struct F16Matrix {
    rows: usize,
    cols: usize,
    values: Vec<f16>,
}

impl F16Matrix {
    /// Takes the little-endian f16 values of a GGUF tensor of `[rows, cols]`;
    /// `None` when the sizes disagree.
    pub fn from_le_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 2 * rows * cols {
            return None;
        }
        let values = bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]))
            .collect();
        Some(Self { rows, cols, values })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Every value, row-major.
    pub fn values(&self) -> &[f16] {
        &self.values
    }

    /// The matrix in f32 (exact), row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        self.values.iter().map(|v| v.to_f32()).collect()
    }

    /// Row `r` in f32 (exact) into `out` (`cols` values).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let row = &self.values[r * self.cols..(r + 1) * self.cols];
        for (o, v) in out.iter_mut().zip(row) {
            *o = v.to_f32();
        }
    }

    /// Bytes held (the file's).
    pub fn bytes(&self) -> usize {
        2 * self.values.len()
    }
}
