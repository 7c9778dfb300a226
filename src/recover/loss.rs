//! Distillation and language-modelling losses over a batch `[b, t, vocab]`.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

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

/// Mean over positions of KL(p ‖ q) with p = softmax(`teacher_logits`) (a
/// constant) and q = softmax(`student_logits`), both `[b, t, v]` over the
/// same ids. On the CPU one fused pass per row computes the value, and the
/// backward pass the gradient `(q − p) / positions` directly, instead of a
/// dozen vocabulary-sized tensors each way.
pub fn kl(teacher_logits: &Tensor, student_logits: &Tensor) -> Result<Tensor> {
    let (b, t, v) = student_logits.dims3()?;
    if !student_logits.device().is_cpu() {
        let logp = candle_nn::ops::log_softmax(teacher_logits, D::Minus1)?.detach();
        let logq = candle_nn::ops::log_softmax(student_logits, D::Minus1)?;
        let per_pos = (logp.exp()? * (logp - logq)?)?.sum(D::Minus1)?;
        return per_pos.sum_all()? / (b * t) as f64;
    }
    let teacher = teacher_logits
        .reshape((b * t, v))?
        .to_dtype(student_logits.dtype())?
        .contiguous()?
        .detach();
    student_logits
        .reshape((b * t, v))?
        .contiguous()?
        .apply_op1(FusedKl { teacher })?
        .squeeze(0)
}

/// The fused KL of [`kl`]: the student's logits are the op's argument, the
/// teacher's are a constant it holds.
struct FusedKl {
    teacher: Tensor,
}

/// `(max, log Σ exp(x − max))` of one row.
fn log_sum_exp<F: Copy + Into<f64>>(row: &[F]) -> (f64, f64) {
    let max = row.iter().map(|&x| x.into()).fold(f64::NEG_INFINITY, f64::max);
    (max, row.iter().map(|&x| (x.into() - max).exp()).sum::<f64>().ln())
}

/// Σ over rows of KL(softmax(t) ‖ softmax(s)) for rows of `v` values.
fn kl_sum<F: Copy + Into<f64> + Sync>(s: &[F], t: &[F], v: usize) -> f64 {
    s.par_chunks(v)
        .zip(t.par_chunks(v))
        .map(|(s, t)| {
            let (ms, ls) = log_sum_exp(s);
            let (mt, lt) = log_sum_exp(t);
            let row: f64 = t
                .iter()
                .zip(s)
                .map(|(&ti, &si)| {
                    let logp = ti.into() - mt - lt;
                    logp.exp() * (logp - (si.into() - ms - ls))
                })
                .sum();
            // Per row KL ≥ 0; rounding can make a near-zero one negative.
            row.max(0.0)
        })
        .sum()
}

/// `(softmax(s) − softmax(t)) · scale`, row by row.
fn kl_grad<F: Copy + Into<f64> + Sync + Send>(s: &[F], t: &[F], v: usize, scale: f64, from: fn(f64) -> F) -> Vec<F> {
    let mut grad = vec![from(0.0); s.len()];
    grad.par_chunks_mut(v)
        .zip(s.par_chunks(v).zip(t.par_chunks(v)))
        .for_each(|(g, (s, t))| {
            let (ms, ls) = log_sum_exp(s);
            let (mt, lt) = log_sum_exp(t);
            for ((gi, &si), &ti) in g.iter_mut().zip(s).zip(t) {
                *gi = from(((si.into() - ms - ls).exp() - (ti.into() - mt - lt).exp()) * scale);
            }
        });
    grad
}

/// Runs `f` on the contiguous CPU data of `t` and its element range.
fn with_cpu<R>(t: &Tensor, f: impl FnOnce(&CpuStorage, usize, usize) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("greencode-fused-kl: CPU tensors only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("greencode-fused-kl: contiguous tensors only");
    };
    f(cpu, start, end)
}

impl CustomOp1 for FusedKl {
    fn name(&self) -> &'static str {
        "greencode-fused-kl"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = layout.shape().dims2()?;
        let Some((s0, s1)) = layout.contiguous_offsets() else {
            candle_core::bail!("greencode-fused-kl: contiguous input only");
        };
        let out = with_cpu(&self.teacher, |teacher, t0, t1| {
            Ok(match (storage, teacher) {
                (CpuStorage::F32(s), CpuStorage::F32(t)) => {
                    CpuStorage::F32(vec![(kl_sum(&s[s0..s1], &t[t0..t1], v) / n as f64) as f32])
                }
                (CpuStorage::F64(s), CpuStorage::F64(t)) => {
                    CpuStorage::F64(vec![kl_sum(&s[s0..s1], &t[t0..t1], v) / n as f64])
                }
                _ => candle_core::bail!("greencode-fused-kl: f32 or f64 logits of one dtype"),
            })
        })?;
        Ok((out, Shape::from(1)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let scale = grad_res
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?[0]
            / n as f64;
        let arg = arg.contiguous()?;
        let grad = with_cpu(&arg, |student, s0, s1| {
            with_cpu(&self.teacher, |teacher, t0, t1| match (student, teacher) {
                (CpuStorage::F32(s), CpuStorage::F32(t)) => Tensor::from_vec(
                    kl_grad(&s[s0..s1], &t[t0..t1], v, scale, |x| x as f32),
                    (n, v),
                    arg.device(),
                ),
                (CpuStorage::F64(s), CpuStorage::F64(t)) => {
                    Tensor::from_vec(kl_grad(&s[s0..s1], &t[t0..t1], v, scale, |x| x), (n, v), arg.device())
                }
                _ => candle_core::bail!("greencode-fused-kl: f32 or f64 logits of one dtype"),
            })
        })?;
        Ok(Some(grad))
    }
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
        let same = kl(&logits, &logits).unwrap().to_scalar::<f32>().unwrap();
        assert!(same.abs() < 1e-6);
        let other = Tensor::new(&[[[3f32, 2.0, 1.0], [0.0, 0.0, 1.0]]], &dev).unwrap();
        let d = kl(&logits, &other).unwrap().to_scalar::<f32>().unwrap();
        // By hand: first position KL of softmax(1,2,3) vs softmax(3,2,1), second 0.
        let p = [0.09003057f64, 0.24472847, 0.66524096];
        let q = [0.66524096f64, 0.24472847, 0.09003057];
        let want: f64 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>() / 2.0;
        assert!((d as f64 - want).abs() < 1e-5, "{d} vs {want}");
    }

    #[test]
    fn fused_kl_gradient_matches_the_composed_ops() {
        let dev = Device::Cpu;
        let t = Tensor::randn(0f64, 2.0, (2, 3, 7), &dev).unwrap();
        let s = candle_core::Var::from_tensor(&Tensor::randn(0f64, 2.0, (2, 3, 7), &dev).unwrap()).unwrap();
        let fused = kl(&t, s.as_tensor()).unwrap();
        let g_fused = fused.backward().unwrap().get(s.as_tensor()).unwrap().clone();
        let logp = candle_nn::ops::log_softmax(&t, D::Minus1).unwrap();
        let logq = candle_nn::ops::log_softmax(s.as_tensor(), D::Minus1).unwrap();
        let composed = ((logp.exp().unwrap() * (logp - logq).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            / 6.0)
            .unwrap();
        let g_composed = composed.backward().unwrap().get(s.as_tensor()).unwrap().clone();
        let (a, b) = (fused.to_scalar::<f64>().unwrap(), composed.to_scalar::<f64>().unwrap());
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        let diff = (g_fused - g_composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12, "gradient differs by {diff}");
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
