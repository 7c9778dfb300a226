//! Parameter counts by component, counting unique tensors (a tied
//! embedding/`lm_head` matrix counts once).

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
