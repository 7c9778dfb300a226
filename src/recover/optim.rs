//! AdamW with linear warm-up, cosine decay and global-norm gradient
//! clipping; its state is plain tensors so a checkpoint can hold it exactly.

use candle_core::{backprop::GradStore, Result, Tensor, Var};

/// Optimiser settings.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warm-up from `lr / warmup` to `lr`.
    pub warmup: usize,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the gradients' global L2 norm to this (0: no clipping).
    pub clip: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
}

impl AdamWConfig {
    /// The learning rate at 0-based `step` of `total` (`usize::MAX` while
    /// unknown): linear warm-up over `warmup` steps but at most a tenth of
    /// the run, then a cosine from `lr` down to `lr / 10` at the last step.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = self.warmup.min((total / 10).max(1));
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        let floor = self.lr / 10.0;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// One trained tensor and its moment estimates.
pub struct Param {
    /// The trained value.
    pub var: Var,
    /// First moment.
    pub m: Tensor,
    /// Second moment.
    pub v: Tensor,
}

impl Param {
    /// A parameter with zero moments.
    pub fn new(var: Var) -> Result<Self> {
        let m = var.as_tensor().zeros_like()?;
        let v = m.clone();
        Ok(Self { var, m, v })
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// Applies one AdamW update to every parameter; `step` is 0-based.
pub fn step(
    cfg: &AdamWConfig,
    params: &mut [&mut Param],
    grads: &GradStore,
    step: usize,
    total: usize,
) -> Result<StepInfo> {
    let mut sq = 0f64;
    for p in params.iter() {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let grad_norm = sq.sqrt();
    let clip = if cfg.clip > 0.0 && grad_norm > cfg.clip {
        cfg.clip / grad_norm
    } else {
        1.0
    };
    let lr = cfg.lr_at(step, total);
    let t = (step + 1) as i32;
    let (bc1, bc2) = (1.0 - cfg.beta1.powi(t), 1.0 - cfg.beta2.powi(t));
    for p in params.iter_mut() {
        let Some(g) = grads.get(p.var.as_tensor()) else {
            continue;
        };
        let g = (g * clip)?;
        p.m = ((&p.m * cfg.beta1)? + (&g * (1.0 - cfg.beta1))?)?;
        p.v = ((&p.v * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?;
        let m_hat = (&p.m / bc1)?;
        let v_hat = (&p.v / bc2)?;
        let update = (m_hat / (v_hat.sqrt()? + cfg.eps)?)?;
        let theta = p.var.as_tensor();
        let next = ((theta * (1.0 - lr * cfg.weight_decay))? - (update * lr)?)?;
        p.var.set(&next)?;
    }
    Ok(StepInfo { lr, grad_norm })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg() -> AdamWConfig {
        AdamWConfig {
            lr: 0.1,
            warmup: 2,
            weight_decay: 0.0,
            clip: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_a_tenth() {
        let c = cfg();
        assert!((c.lr_at(0, 100) - 0.05).abs() < 1e-12);
        assert!((c.lr_at(1, 100) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(2, 100) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(100, 100) - 0.01).abs() < 1e-12);
        assert!(c.lr_at(50, 100) < c.lr_at(30, 100));
        // Warm-up is at most a tenth of a short run.
        let long_warmup = AdamWConfig { warmup: 50, ..c };
        assert!((long_warmup.lr_at(0, 20) - 0.05).abs() < 1e-12);
        assert!((long_warmup.lr_at(2, 20) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn minimises_a_quadratic() {
        // f(x) = Σ (x - 3)²: AdamW with a constant-ish rate walks x to 3.
        let var = Var::from_tensor(&Tensor::new(&[0f32, 10.0], &Device::Cpu).unwrap()).unwrap();
        let mut param = Param::new(var.clone()).unwrap();
        let c = AdamWConfig { warmup: 1, ..cfg() };
        for s in 0..400 {
            let loss = (var.as_tensor() - 3.0).unwrap().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            step(&c, &mut [&mut param], &grads, s, 100_000).unwrap();
        }
        let x: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!(x.iter().all(|v| (v - 3.0).abs() < 0.05), "{x:?}");
    }

    #[test]
    fn clipping_bounds_the_first_update() {
        // Adam's first step moves each coordinate by about lr whatever the
        // gradient's size; clipping must report the raw norm.
        let var = Var::from_tensor(&Tensor::new(&[0f32], &Device::Cpu).unwrap()).unwrap();
        let mut param = Param::new(var.clone()).unwrap();
        let loss = (var.as_tensor() * 1000.0).unwrap().sum_all().unwrap();
        let info = step(
            &AdamWConfig {
                clip: 1.0,
                warmup: 1,
                ..cfg()
            },
            &mut [&mut param],
            &loss.backward().unwrap(),
            0,
            10,
        )
        .unwrap();
        assert!((info.grad_norm - 1000.0).abs() < 1e-3);
        let x: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!((x[0] + 0.1).abs() < 1e-3, "{x:?}");
    }
}
