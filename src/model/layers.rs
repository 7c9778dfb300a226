//! The parts of a Qwen2 decoder layer as candle tensor code: RMSNorm, RoPE
//! tables, the SiLU-gated MLP and the pre-norm layer that joins them with
//! attention; the layer mask that skips layers without copying weights; and
//! the choice of fused or differentiable kernels for full-sequence forwards.
//! Field names follow the checkpoint's tensor names.

use candle_core::{DType, Device, Tensor};

use super::attention::Attention;
use super::config::Qwen2Config;
use super::error::Result;
use super::linear::Linear;
use super::step::SeqStep;

/// Which layers a forward pass runs; a skipped layer leaves the residual
/// stream unchanged, exactly as if it had been removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMask(Vec<bool>);

impl LayerMask {
    /// Every one of `n` layers active.
    pub fn all(n: usize) -> Self {
        Self(vec![true; n])
    }

    /// All of `n` layers except those listed.
    pub fn without(n: usize, removed: &[usize]) -> Self {
        let mut m = Self::all(n);
        for &i in removed {
            if i < n {
                m.0[i] = false;
            }
        }
        m
    }

    /// Whether layer `i` runs.
    pub fn is_active(&self, i: usize) -> bool {
        self.0.get(i).copied().unwrap_or(false)
    }

    /// Indices of the active layers, in order.
    pub fn active(&self) -> Vec<usize> {
        (0..self.0.len()).filter(|&i| self.0[i]).collect()
    }

    /// Number of layers the mask covers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the mask covers no layer.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Which implementations a full-sequence forward uses for RMSNorm, RoPE,
/// softmax and frozen projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// candle's fused kernels (fast; they drop gradients).
    #[default]
    Fused,
    /// Ops built from differentiable primitives, for training; frozen
    /// weights compute input gradients only.
    Differentiable,
}

/// RMSNorm with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f32,
}

impl RmsNorm {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Kernels::Fused)
    }

    pub(super) fn forward_with(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        Ok(match kernels {
            Kernels::Fused => candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?,
            Kernels::Differentiable => candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)?,
        })
    }

    /// The scale vector.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// Precomputed RoPE cosine and sine tables, `[max_positions, head_dim / 2]`.
#[derive(Debug, Clone)]
pub(super) struct RotaryEmbedding {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

impl RotaryEmbedding {
    pub(super) fn new(cfg: &Qwen2Config, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let n = cfg.max_position_embeddings;
        // As transformers: inv_freq in f32 from an f64 power, angles pos * inv_freq in f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / cfg.rope_theta.powf((2 * i) as f64 / cfg.head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for pos in 0..n {
            for &f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?,
        })
    }

    /// Rotates `x` (`[b, heads, t, head_dim]`) for positions `offset..offset + t`.
    pub(super) fn apply(&self, x: &Tensor, offset: usize, kernels: Kernels) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        Ok(match kernels {
            Kernels::Fused => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?,
            Kernels::Differentiable => candle_nn::rotary_emb::rope_slow(x, &cos, &sin)?,
        })
    }
}

/// The SiLU-gated feed-forward block.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Gate projection `[width, hidden]`.
    pub gate_proj: Linear,
    /// Up projection `[width, hidden]`.
    pub up_proj: Linear,
    /// Down projection `[hidden, width]`.
    pub down_proj: Linear,
}

impl Mlp {
    pub(super) fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        project(&self.down_proj, &self.activations_with(x, kernels)?, kernels)
    }

    /// The intermediate activations `silu(gate(x)) · up(x)`, `[.., width]`.
    pub fn activations(&self, x: &Tensor) -> Result<Tensor> {
        self.activations_with(x, Kernels::Fused)
    }

    fn activations_with(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let gate = project(&self.gate_proj, x, kernels)?.silu()?;
        let up = project(&self.up_proj, x, kernels)?;
        Ok((gate * up)?)
    }

    /// Intermediate width of this layer.
    pub fn width(&self) -> usize {
        self.gate_proj.out_features()
    }
}

/// Applies `lin` with the projection kernel `kernels` asks for.
pub(super) fn project(lin: &Linear, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    Ok(match kernels {
        Kernels::Fused => lin.forward(x)?,
        Kernels::Differentiable => lin.forward_differentiable(x)?,
    })
}

/// One pre-norm decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Attention block.
    pub self_attn: Attention,
    /// Feed-forward block.
    pub mlp: Mlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// The seven projections, in checkpoint order.
    pub fn projections(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// The seven projections, in checkpoint order, to change.
    pub(super) fn projections_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }

    pub(super) fn forward(&self, x: &Tensor, rope: &RotaryEmbedding, kernels: Kernels) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward_with(x, kernels)?, rope, kernels)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward_with(&x, kernels)?, kernels)?;
        Ok((x + h)?)
    }
}

impl DecoderLayer {
    pub(super) fn forward_ragged(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        seqs: &mut [SeqStep<'_>],
        layer: usize,
    ) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward_ragged(&self.input_layernorm.forward(x)?, rope, seqs, layer)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?, Kernels::Fused)?;
        Ok((x + h)?)
    }
}
