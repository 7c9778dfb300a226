//! Grouped-query self-attention on candle tensors: the projections, RoPE,
//! the per-sequence cache appends of a ragged serving step, and causal
//! attention in query blocks that never computes the masked triangle. On
//! CUDA a single decode token goes to the fused kernel in `cuda/`.

use candle_core::{Tensor, D};

use super::error::Result;
use super::layers::{project, Kernels, RotaryEmbedding};
use super::linear::Linear;
use super::step::SeqStep;

/// Multi-head self-attention with grouped key/value heads.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection (with bias).
    pub q_proj: Linear,
    /// Key projection (with bias).
    pub k_proj: Linear,
    /// Value projection (with bias).
    pub v_proj: Linear,
    /// Output projection (no bias).
    pub o_proj: Linear,
    pub(super) num_heads: usize,
    pub(super) num_kv_heads: usize,
    pub(super) head_dim: usize,
}

impl Attention {
    /// Attention over `[b, t, hidden]` at positions `0..t`, without a cache.
    pub(super) fn forward(&self, x: &Tensor, rope: &RotaryEmbedding, kernels: Kernels) -> Result<Tensor> {
        let offset = 0;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = project(&self.q_proj, x, kernels)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?;
        let k = project(&self.k_proj, x, kernels)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?;
        let v = project(&self.v_proj, x, kernels)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = rope.apply(&q, offset, kernels)?;
        let k = rope.apply(&k, offset, kernels)?;
        let y = attend(&q, &k, &v, offset, nkv, kernels)?; // [b, nh, t, hd]
        let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        project(&self.o_proj, &y, kernels)
    }
}

impl Attention {
    /// Attention for a ragged batch: `x` is `[1, Σt, hidden]`, the new tokens of
    /// every sequence in order; projections run once over all rows, RoPE,
    /// cache appends and attention run per sequence against its own cache.
    pub(super) fn forward_ragged(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        seqs: &mut [SeqStep<'_>],
        layer: usize,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q_all = self.q_proj.forward(x)?;
        let k_all = self.k_proj.forward(x)?;
        let v_all = self.v_proj.forward(x)?;
        let mut outs = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for seq in seqs.iter_mut() {
            let t = seq.tokens.len();
            let offset = seq.cache.len();
            let split = |a: &Tensor, heads: usize| -> candle_core::Result<Tensor> {
                a.narrow(1, row, t)?.reshape((1, t, heads, hd))?.transpose(1, 2)
            };
            let q = rope.apply(&split(&q_all, nh)?, offset, Kernels::Fused)?;
            let k = rope.apply(&split(&k_all, nkv)?, offset, Kernels::Fused)?;
            let v = split(&v_all, nkv)?.contiguous()?;
            let (k, v) = seq.cache.append(layer, &k, &v)?;
            // One decode token on a GPU: the fused kernel reads the cache in place.
            let y = if t == 1 && crate::cuda::decode_attention::applies(&q) {
                // QKᵀ and PV: 2 FLOPs per multiply-add each, as `attend` counts.
                super::flop_probe::add(4 * (nh * k.dim(2)? * hd) as u64);
                crate::cuda::decode_attention::decode_attention(&q, &k, &v)?
            } else {
                attend(&q, &k, &v, offset, nkv, Kernels::Fused)?
            };
            outs.push(y.transpose(1, 2)?.reshape((1, t, nh * hd))?);
            row += t;
        }
        let y = Tensor::cat(&outs, 1)?;
        Ok(self.o_proj.forward(&y)?)
    }
}

/// Query rows per block of blocked causal attention.
pub const QUERY_BLOCK: usize = 128;

/// Causal attention of queries at positions `offset..offset + t` over keys at
/// `0..offset + t`. Query heads are grouped onto their key/value head by a
/// reshape (`[b, kv, group·t, d]`), never by repeating keys. Long prompts run
/// in blocks of [`QUERY_BLOCK`] query rows, each against only the keys it may
/// see, so the masked upper triangle is never computed.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    nkv: usize,
    kernels: Kernels,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    // QKᵀ and PV over the causal scores, 2 FLOPs per multiply-add each (the
    // masked part of a block is not counted: see `energy::flops`).
    super::flop_probe::add(4 * (b * nh * hd) as u64 * super::params::causal_scores(t, offset));
    if t <= QUERY_BLOCK {
        return attend_block(q, k, v, offset, nkv, kernels);
    }
    let v = v.contiguous()?;
    let mut outs = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
    let mut i0 = 0;
    while i0 < t {
        let bs = QUERY_BLOCK.min(t - i0);
        let visible = offset + i0 + bs;
        let qb = q.narrow(2, i0, bs)?;
        outs.push(attend_block(
            &qb,
            &k.narrow(2, 0, visible)?,
            &v.narrow(2, 0, visible)?,
            offset + i0,
            nkv,
            kernels,
        )?);
        i0 += bs;
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// [`attend`] for one block of queries (all keys given are visible up to the causal limit).
fn attend_block(q: &Tensor, k: &Tensor, v: &Tensor, offset: usize, nkv: usize, kernels: Kernels) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let l = k.dim(2)?;
    let group = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let q = (q.contiguous()?.reshape((b, nkv, group * t, hd))? * scale)?;
    let scores = q.matmul(&k.t()?)?; // [b, nkv, group·t, l]
    let scores = if t > 1 {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..l).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, l), q.device())?.to_dtype(scores.dtype())?;
        scores
            .reshape((b, nkv, group, t, l))?
            .broadcast_add(&mask)?
            .reshape((b, nkv, group * t, l))?
    } else {
        scores
    };
    let probs = match kernels {
        Kernels::Fused => candle_nn::ops::softmax_last_dim(&scores)?,
        Kernels::Differentiable => {
            // Subtracting a constant leaves softmax and its gradient unchanged.
            let max = scores.max_keepdim(D::Minus1)?.detach();
            let e = scores.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        }
    };
    let y = probs.matmul(&v.contiguous()?)?; // [b, nkv, group·t, hd]
    Ok(y.reshape((b, nh, t, hd))?)
}
