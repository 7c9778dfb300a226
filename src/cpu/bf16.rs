//! Weights held in bfloat16 on the CPU. Most code models ship bf16
//! checkpoints (tiny-coder does); loading them into f32 doubles the bytes
//! every decode step streams without adding a bit of information. A bf16
//! value is the top half of an f32, so the kernels widen each weight
//! exactly (a 16-bit shift) and run the f32 arithmetic unchanged: outputs
//! have the bits of the f32 path while decode reads half the bytes.
//!
//! A matrix is held this way only when every value is exactly a bf16
//! ([`Bf16Matrix::from_f32_exact`]); anything else (random synthetic
//! weights, a merged LoRA) stays in f32.

use half::bf16;

/// A row-major `[rows, cols]` matrix of bf16 values.
#[derive(Debug, Clone)]
pub struct Bf16Matrix {
    rows: usize,
    cols: usize,
    values: Vec<bf16>,
}

impl Bf16Matrix {
    /// The matrix in bf16 when every value of `w` (`rows × cols`, row-major)
    /// is exactly a bf16 (its low 16 bits are zero); `None` otherwise, so
    /// nothing is ever rounded.
    pub fn from_f32_exact(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if w.len() != rows * cols || w.iter().any(|v| v.to_bits() & 0xffff != 0) {
            return None;
        }
        let values = w.iter().map(|&v| bf16::from_bits((v.to_bits() >> 16) as u16)).collect();
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
    pub fn values(&self) -> &[bf16] {
        &self.values
    }

    /// The matrix in f32 (exact), row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.values.len()];
        for (o, v) in out.iter_mut().zip(&self.values) {
            *o = widen(*v);
        }
        out
    }

    /// Row `r` in f32 (exact) into `out` (`cols` values).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let row = &self.values[r * self.cols..(r + 1) * self.cols];
        for (o, v) in out.iter_mut().zip(row) {
            *o = widen(*v);
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        2 * self.values.len()
    }
}

/// A bf16 value's bits shifted up into an f32, as the kernels widen eight
/// at a time in registers: a shift the compiler vectorizes
/// (`bf16::to_f32` also quiets signalling NaNs, which keeps it scalar;
/// +1–2% prompt tokens/s).
#[inline]
pub(crate) fn widen(v: bf16) -> f32 {
    f32::from_bits(u32::from(v.to_bits()) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_values_round_trip_exactly_and_others_are_refused() {
        let exact: Vec<f32> = [1.0f32, -0.5, 3.140625, 0.0, -0.0, 1e-30, f32::INFINITY]
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        let m = Bf16Matrix::from_f32_exact(&exact, 7, 1).expect("every value is a bf16");
        assert_eq!(m.bytes(), 14);
        let back = m.to_f32();
        assert!(back.iter().zip(&exact).all(|(a, b)| a.to_bits() == b.to_bits()));
        let mut row = [0f32; 1];
        m.row_to_f32(2, &mut row);
        assert_eq!(row[0], 3.140625);
        // 0.1 needs more than bf16's 8 significant bits.
        assert!(Bf16Matrix::from_f32_exact(&[1.0, 0.1], 1, 2).is_none());
        assert!(Bf16Matrix::from_f32_exact(&[1.0], 1, 2).is_none(), "shape mismatch");
    }
}
