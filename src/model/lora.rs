//! LoRA adapters on a frozen model: `y = x·Wᵀ + b + (α/r)·(x·Aᵀ)·Bᵀ` with
//! trainable `A [r, in]` and `B [out, r]`; and the frozen-weight matmul that
//! training uses so the backward pass computes input gradients only.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::error::{ModelError, Result};
use super::layers::Kernels;
use super::qwen2::Qwen2;

/// A projection LoRA can adapt, named as PEFT's `target_modules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
    /// `lm_head` (untied models only).
    LmHead,
}

impl LoraTarget {
    /// Every target, in PEFT's usual order.
    pub const ALL: [LoraTarget; 8] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
        Self::LmHead,
    ];

    /// Parses a short (`q`, `gate`) or module (`q_proj`, `gate_proj`) name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim() {
            "q" | "q_proj" => Self::Q,
            "k" | "k_proj" => Self::K,
            "v" | "v_proj" => Self::V,
            "o" | "o_proj" => Self::O,
            "gate" | "gate_proj" => Self::Gate,
            "up" | "up_proj" => Self::Up,
            "down" | "down_proj" => Self::Down,
            "lm_head" => Self::LmHead,
            _ => return None,
        })
    }

    /// The module name PEFT matches (`q_proj`, …, `lm_head`).
    pub fn module(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
            Self::LmHead => "lm_head",
        }
    }
}

/// What to adapt and how.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// Rank `r` (> 0).
    pub rank: usize,
    /// Scale numerator: the update is multiplied by `alpha / rank`.
    pub alpha: f64,
    /// Projections that get an adapter.
    pub targets: Vec<LoraTarget>,
    /// Seed of `A`'s random initialisation.
    pub seed: u64,
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One adapter: trainable `A [r, in]` (random) and `B [out, r]` (zero at start).
#[derive(Debug)]
pub struct LoraAdapter {
    /// Down-projection `[r, in]`.
    pub a: Var,
    /// Up-projection `[out, r]`.
    pub b: Var,
    /// `alpha / r`.
    pub scale: f64,
}

impl LoraAdapter {
    /// A fresh adapter for a `[out, in]` weight: `A` uniform in ±1/√in (PEFT's
    /// Kaiming-uniform default), `B` zero, so the model is unchanged.
    pub fn new(
        out: usize,
        inp: usize,
        cfg: &LoraConfig,
        rng: &mut rand::rngs::StdRng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if cfg.rank == 0 {
            return Err(ModelError::Input("LoRA rank must be at least 1".into()));
        }
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f64> = (0..cfg.rank * inp).map(|_| rng.random_range(-bound..bound)).collect();
        let a = Tensor::from_vec(a, (cfg.rank, inp), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out, cfg.rank), dtype, device)?;
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: cfg.scale(),
        })
    }

    /// The update `scale·(x·Aᵀ)·Bᵀ` for `x` `[rows, in]`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        Ok((x.matmul(&self.a.as_tensor().t()?)?.matmul(&self.b.as_tensor().t()?)? * self.scale)?)
    }

    /// `W + scale·B·A` for the frozen `[out, in]` weight `w`.
    pub fn merge_into(&self, w: &Tensor) -> Result<Tensor> {
        let ba = self.b.as_tensor().matmul(self.a.as_tensor())?;
        Ok((w + (ba * self.scale)?.to_dtype(w.dtype())?)?)
    }
}

/// Shared handle to an adapter (the model holds one, the trainer another).
pub type SharedAdapter = Arc<LoraAdapter>;

/// A fresh seeded generator for adapter initialisation.
pub fn init_rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// `x·Wᵀ` for a constant `W` whose backward pass returns only `dL/dx = dL/dy·W`.
/// candle's matmul backward also computes the weight's gradient even when the
/// weight is frozen: as costly as the forward, and thrown away.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Ok(x.matmul(&weight.t()?)?);
    }
    Ok(x.contiguous()?.apply_op1(FrozenMatmul { weight: weight.clone() })?)
}

struct FrozenMatmul {
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "greencode-frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("greencode-frozen-matmul: contiguous input only");
        };
        // Wrap the input as a tensor again (one copy of the activations, small
        // next to the product) and let candle's gemm do the work.
        let x = match storage {
            CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], layout.shape(), &Device::Cpu)?,
            CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], layout.shape(), &Device::Cpu)?,
            _ => candle_core::bail!("greencode-frozen-matmul: f32 or f64 only"),
        };
        let y = x.matmul(&self.weight.t()?)?;
        let shape = y.shape().clone();
        let y = y.flatten_all()?;
        let out = match storage {
            CpuStorage::F64(_) => CpuStorage::F64(y.to_vec1()?),
            _ => CpuStorage::F32(y.to_vec1()?),
        };
        Ok((out, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
}

impl Qwen2 {
    /// Attaches fresh LoRA adapters (`B` = 0, so outputs are unchanged) to
    /// `cfg.targets` in every layer, replacing any attached before. Returns
    /// them by PEFT module path, in layer order. `lm_head` is refused on a
    /// model with tied embeddings (an adapter there would untie them).
    pub fn attach_lora(&mut self, cfg: &LoraConfig) -> Result<Vec<(String, SharedAdapter)>> {
        if cfg.targets.contains(&LoraTarget::LmHead) && self.config.tie_word_embeddings {
            return Err(ModelError::Input(
                "LoRA on lm_head needs untied embeddings; this model ties lm_head to embed_tokens (an adapter would untie them)".into(),
            ));
        }
        let (dtype, device) = (self.dtype, self.device().clone());
        let mut rng = init_rng(cfg.seed);
        let mut out = Vec::new();
        for (path, target, lin) in self.projections_mut() {
            if cfg.targets.contains(&target) {
                let (rows, cols) = lin.dims();
                let adapter = std::sync::Arc::new(LoraAdapter::new(rows, cols, cfg, &mut rng, dtype, &device)?);
                lin.set_lora(adapter.clone());
                out.push((path, adapter));
            }
        }
        if cfg.targets.contains(&LoraTarget::LmHead) {
            let (rows, cols) = self.lm_head.dims();
            let adapter = std::sync::Arc::new(LoraAdapter::new(rows, cols, cfg, &mut rng, dtype, &device)?);
            self.lm_head.set_lora(adapter.clone());
            out.push(("lm_head".to_owned(), adapter));
        }
        Ok(out)
    }

    /// Whether any LoRA adapter is attached.
    pub fn has_lora(&self) -> bool {
        self.lm_head.lora().is_some()
            || self
                .layers
                .iter()
                .any(|l| l.projections().iter().any(|lin| lin.lora().is_some()))
    }

    /// A copy with every adapter folded into its weight (`W + scale·B·A`).
    pub fn merged_lora(&self) -> Result<Qwen2> {
        let mut out = self.clone();
        for (_, _, lin) in out.projections_mut() {
            *lin = lin.merged()?;
        }
        out.lm_head = out.lm_head.merged()?;
        out.kernels = Kernels::Fused;
        Ok(out)
    }
}
