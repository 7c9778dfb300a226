//! Distillation and language-modelling losses over a batch `[b, t, vocab]`.

use candle_core::{Result, Tensor, D};

/// Which loss trains the adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// KL(teacher ‖ student) over every position.
    Kl,
    /// Cross-entropy of the data's next token.
    Ce,
    /// The sum of both.
    #[serde(rename = "kl+ce")]
    KlCe,
}

impl LossKind {
    /// Parses `kl`, `ce` or `kl+ce`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kl" => Some(Self::Kl),
            "ce" => Some(Self::Ce),
            "kl+ce" => Some(Self::KlCe),
            _ => None,
        }
    }

    /// Whether the teacher's logits are needed.
    pub fn needs_teacher(self) -> bool {
        matches!(self, Self::Kl | Self::KlCe)
    }
}

/// Mean over positions of KL(p ‖ q), where `teacher_logp` holds log p
/// (a constant) and `student_logits` the student's logits, both `[b, t, v]`
/// over the same ids.
pub fn kl(teacher_logp: &Tensor, student_logits: &Tensor) -> Result<Tensor> {
    let logq = candle_nn::ops::log_softmax(student_logits, D::Minus1)?;
    let (b, t, _) = student_logits.dims3()?;
    let per_pos = (teacher_logp.exp()? * (teacher_logp - logq)?)?.sum(D::Minus1)?;
    per_pos.sum_all()? / (b * t) as f64
}

/// Mean cross-entropy of `tokens[:, i + 1]` given the logits at `i`, over
/// the positions `mask` marks (1.0) among the first `t - 1`; `mask` is
/// `[b, t - 1]`.
pub fn next_token_ce(student_logits: &Tensor, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let t = student_logits.dim(1)?;
    let logq = candle_nn::ops::log_softmax(&student_logits.narrow(1, 0, t - 1)?, D::Minus1)?;
    let targets = tokens.narrow(1, 1, t - 1)?.unsqueeze(D::Minus1)?.contiguous()?;
    let nll = logq.gather(&targets, D::Minus1)?.squeeze(D::Minus1)?.neg()?; // [b, t-1]
    let count = mask.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    (nll * mask)?.sum_all()? / count.max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn kl_is_zero_for_equal_distributions_and_positive_otherwise() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[[1f32, 2.0, 3.0], [0.0, 0.0, 1.0]]], &dev).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let same = kl(&logp, &logits).unwrap().to_scalar::<f32>().unwrap();
        assert!(same.abs() < 1e-6);
        let other = Tensor::new(&[[[3f32, 2.0, 1.0], [0.0, 0.0, 1.0]]], &dev).unwrap();
        let d = kl(&logp, &other).unwrap().to_scalar::<f32>().unwrap();
        // By hand: first position KL of softmax(1,2,3) vs softmax(3,2,1), second 0.
        let p = [0.09003057f64, 0.24472847, 0.66524096];
        let q = [0.66524096f64, 0.24472847, 0.09003057];
        let want: f64 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>() / 2.0;
        assert!((d as f64 - want).abs() < 1e-5, "{d} vs {want}");
    }

    #[test]
    fn ce_counts_only_masked_positions() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[[0f32, 0.0], [5.0, 0.0], [0.0, 0.0]]], &dev).unwrap();
        let tokens = Tensor::new(&[[0u32, 1, 0]], &dev).unwrap();
        let all = Tensor::ones((1, 2), DType::F32, &dev).unwrap();
        let only_second = Tensor::new(&[[0f32, 1.0]], &dev).unwrap();
        let ce_all = next_token_ce(&logits, &tokens, &all)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let ce_2 = next_token_ce(&logits, &tokens, &only_second)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let ln2 = std::f32::consts::LN_2;
        let second = (1.0f32 + (-5f32).exp()).ln(); // −log softmax(5, 0)[0]
        assert!((ce_2 - second).abs() < 1e-4, "{ce_2} vs {second}");
        assert!((ce_all - (ln2 + second) / 2.0).abs() < 1e-4);
    }
}
