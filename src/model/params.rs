//! A model's size as plain numbers, for the parts that account for it
//! without touching weights (metrics, energy's FLOP model, prune reports):
//! parameter counts by component, counting unique tensors (a tied
//! embedding/`lm_head` matrix counts once), and the shapes FLOPs follow.

use serde::Serialize;

use super::Qwen2;

/// Parameters by component, unique tensors only (a tied matrix counts once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ParamCount {
    /// `embed_tokens`.
    pub embeddings: usize,
    /// q, k, v, o projections and biases.
    pub attention: usize,
    /// gate, up, down projections.
    pub mlp: usize,
    /// RMSNorm scales.
    pub norms: usize,
    /// `lm_head` when untied (0 when tied).
    pub lm_head: usize,
    /// Their sum.
    pub total: usize,
}

/// The shapes a forward pass's FLOPs follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShapes {
    /// Decoder layers.
    pub layers: usize,
    /// Σ over layers of Σ in × out of their seven projections.
    pub layer_matmul_params: u64,
    /// Query heads × head width (attention's width).
    pub attention_width: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Rows of `lm_head`.
    pub vocab: usize,
}

impl Qwen2 {
    /// The shapes of this model's (possibly pruned) layers.
    pub fn shapes(&self) -> ModelShapes {
        let cfg = self.config();
        let layer_matmul_params = self
            .layers
            .iter()
            .flat_map(|l| l.projections())
            .map(|w| {
                let (out, inp) = w.dims();
                (out * inp) as u64
            })
            .sum();
        ModelShapes {
            layers: self.layers.len(),
            layer_matmul_params,
            attention_width: cfg.num_attention_heads * cfg.head_dim,
            hidden: cfg.hidden_size,
            vocab: cfg.vocab_size,
        }
    }
}

/// Attention scores when `t` new tokens attend causally at cache offset
/// `offset`: each query against itself and every earlier position (the
/// counting rule of both the analytic FLOPs and `flop_probe`).
pub fn causal_scores(t: usize, offset: usize) -> u64 {
    (t * offset + t * (t + 1) / 2) as u64
}

/// Counts `model`'s parameters by component.
pub fn count_params(model: &Qwen2) -> ParamCount {
    let mut c = ParamCount::default();
    for (name, n) in model.named_sizes() {
        if name.contains("embed_tokens") {
            c.embeddings += n;
        } else if name.contains("self_attn") {
            c.attention += n;
        } else if name.contains(".mlp.") {
            c.mlp += n;
        } else if name.contains("norm") {
            c.norms += n;
        } else if name.starts_with("lm_head") {
            c.lm_head += n;
        }
        c.total += n;
    }
    c
}
