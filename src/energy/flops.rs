//! Analytic FLOPs of a forward pass from the model's real (pruned) shapes:
//! 2 × rows × in × out for every projection, `lm_head` only for the
//! positions that get logits, and causal attention: each query against
//! the keys it may see (itself and every earlier position). QKᵀ and PV
//! each cost 2 × heads × head_dim per score. The model's forward passes
//! count the same (`model::flop_probe`), whatever blocks they compute in.

use crate::model::params::{causal_scores, ModelShapes};

/// FLOPs per forward for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct FlopCounter {
    /// Σ over layers of Σ in × out of the projections (per token).
    layer_macs: u64,
    /// Number of layers (attention cost per layer).
    layers: u64,
    /// Query heads × head width.
    attn_width: u64,
    /// hidden × vocab (`lm_head`, per logits row).
    head_macs: u64,
}

impl FlopCounter {
    /// The FLOP model of a model with `shapes` (see `Qwen2::shapes`).
    pub fn new(shapes: &ModelShapes) -> Self {
        Self {
            layer_macs: shapes.layer_matmul_params,
            layers: shapes.layers as u64,
            attn_width: shapes.attention_width as u64,
            head_macs: (shapes.hidden * shapes.vocab) as u64,
        }
    }

    /// Scores computed when `t` new tokens attend at cache offset `offset`.
    pub fn attention_scores(t: usize, offset: usize) -> u64 {
        causal_scores(t, offset)
    }

    /// FLOPs of appending `t` tokens at `offset` with logits for `logits_rows` positions.
    pub fn forward(&self, t: usize, offset: usize, logits_rows: usize) -> u64 {
        let projections = 2 * self.layer_macs * t as u64;
        let attention = self.layers * 4 * self.attn_width * Self::attention_scores(t, offset);
        let head = 2 * self.head_macs * logits_rows as u64;
        projections + attention + head
    }

    /// FLOPs of a whole generation: a prefill of `prompt` tokens (logits on
    /// `prefill_logits` rows) and `generated − 1` single-token decode steps.
    pub fn generation(&self, prompt: usize, prefill_logits: usize, generated: usize) -> (u64, u64) {
        let prefill = self.forward(prompt, 0, prefill_logits);
        let decode = (1..generated).map(|k| self.forward(1, prompt + k - 1, 1)).sum();
        (prefill, decode)
    }
}
