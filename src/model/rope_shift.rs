//! Moving cached keys to other positions. RoPE turns each pair of a key's
//! dimensions by an angle proportional to its position, so a key cached at
//! position `from` becomes the key at `to` by one more turn. The turn is the
//! difference of the two f32 angles the model's own tables use (taken
//! exactly, in f64), so a moved key equals the key rotated once at `to` up
//! to rounding, however far it moves (`tests/chunk_reuse.rs` asserts 1e-5).

use super::Qwen2Config;

/// The RoPE frequencies of a model, for re-rotating cached keys.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeShift {
    /// Angle per position of each pair of dimensions, as the model's tables compute it.
    inv_freq: Vec<f32>,
    head_dim: usize,
}

impl RopeShift {
    /// The frequencies `RotaryEmbedding` builds its tables from (the same
    /// f32 values from an f64 power, as transformers computes them).
    pub fn new(head_dim: usize, rope_theta: f64) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| (1.0 / rope_theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        Self { inv_freq, head_dim }
    }

    /// The frequencies of the model `cfg` describes.
    pub fn of(cfg: &Qwen2Config) -> Self {
        Self::new(cfg.head_dim, cfg.rope_theta)
    }

    /// Values per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Cosine and sine of the turn taking a key from position `from` to `to`.
    pub fn turn(&self, from: usize, to: usize) -> Vec<(f64, f64)> {
        self.inv_freq
            .iter()
            .map(|&f| {
                // The tables' angles are `pos as f32 * f`: their difference,
                // exactly, composes with the turn already applied.
                let angle = f64::from(to as f32 * f) - f64::from(from as f32 * f);
                (angle.cos(), angle.sin())
            })
            .collect()
    }

    /// Turns every head of `row` (`heads · head_dim` values, each head's
    /// halves paired as the model rotates them) by `turn`.
    pub fn apply(&self, row: &mut [f32], turn: &[(f64, f64)]) {
        let half = self.head_dim / 2;
        for head in row.chunks_exact_mut(self.head_dim) {
            let (a, b) = head.split_at_mut(half);
            for ((x1, x2), &(c, s)) in a.iter_mut().zip(b.iter_mut()).zip(turn) {
                let (y1, y2) = (f64::from(*x1), f64::from(*x2));
                *x1 = (y1 * c - y2 * s) as f32;
                *x2 = (y2 * c + y1 * s) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::host_ops::rope;

    /// The tables `RotaryEmbedding` and the fused step rotate with.
    fn tables(shift: &RopeShift, positions: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in 0..positions {
            for &f in &shift.inv_freq {
                cos.push((pos as f32 * f).cos());
                sin.push((pos as f32 * f).sin());
            }
        }
        (cos, sin)
    }

    #[test]
    fn a_moved_key_equals_the_key_rotated_once_at_its_new_position() {
        let shift = RopeShift::new(64, 1_000_000.0);
        let (cos, sin) = tables(&shift, 33_000);
        let raw: Vec<f32> = (0..128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let mut worst = 0f32;
        for (from, to) in [(0, 5), (700, 3), (1000, 1023), (31, 32_000), (32_000, 17), (500, 500)] {
            let mut moved = raw.clone();
            rope(&mut moved, &cos, &sin, 64, from);
            shift.apply(&mut moved, &shift.turn(from, to));
            let mut once = raw.clone();
            rope(&mut once, &cos, &sin, 64, to);
            for (m, o) in moved.iter().zip(&once) {
                worst = worst.max((m - o).abs());
            }
        }
        // Keys of magnitude up to 7 here: f32 rounding, not angle error.
        assert!(worst < 1e-5, "moved keys differ by {worst}");
    }
}
