//! Our own Qwen2 decoder on candle: q/k/v bias, grouped-query attention
//! without copying keys per query head, RoPE, RMSNorm, SiLU MLP with
//! per-layer widths read from the weights, tied or untied `lm_head`, a layer
//! mask that skips layers without copying weights, full-sequence logits and
//! KV-cached incremental decoding.
//!
//! Struct and field names follow the checkpoint's tensor names
//! (`model.layers.N.self_attn.q_proj`), so pruning maps tensors to fields
//! mechanically.

use candle_core::{DType, Device, Tensor, D};

use super::config::Qwen2Config;
use super::error::{ModelError, Result};
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::load::WeightStore;
use super::lora::{init_rng, LoraAdapter, LoraConfig, LoraTarget, SharedAdapter};

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
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Kernels::Fused)
    }

    fn forward_with(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
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
struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    fn new(cfg: &Qwen2Config, dtype: DType, device: &Device) -> Result<Self> {
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
    fn apply(&self, x: &Tensor, offset: usize, kernels: Kernels) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        Ok(match kernels {
            Kernels::Fused => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?,
            Kernels::Differentiable => candle_nn::rotary_emb::rope_slow(x, &cos, &sin)?,
        })
    }
}

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
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Attention over `[b, t, hidden]` at positions `0..t`, without a cache.
    fn forward(&self, x: &Tensor, rope: &RotaryEmbedding, kernels: Kernels) -> Result<Tensor> {
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
    fn forward_ragged(
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

/// One sequence's part of a ragged batch step.
pub struct SeqStep<'a> {
    /// The sequence's KV cache (its length is the start position).
    pub cache: &'a mut KvCache,
    /// New tokens to append.
    pub tokens: &'a [u32],
    /// Which of the new positions get logits.
    pub logits: LogitsFor,
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
    super::flop_probe::add(4 * (b * nh * hd) as u64 * super::flop_probe::causal_scores(t, offset));
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
    fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
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
fn project(lin: &Linear, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
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
    fn projections_mut(&mut self) -> [&mut Linear; 7] {
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

    fn forward(&self, x: &Tensor, rope: &RotaryEmbedding, kernels: Kernels) -> Result<Tensor> {
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
    fn forward_ragged(
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

/// Which positions of a cached forward get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last new position (generation).
    Last,
    /// Every new position (scoring).
    All,
}

/// A Qwen2 causal language model.
#[derive(Debug, Clone)]
pub struct Qwen2 {
    embed_tokens: Linear,
    /// Decoder layers, in order.
    pub layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
    rope: RotaryEmbedding,
    config: Qwen2Config,
    dtype: DType,
    kernels: Kernels,
}

impl Qwen2 {
    /// Builds the model from `store`, checking every tensor's shape against `config`.
    pub fn from_store(config: Qwen2Config, store: &mut WeightStore) -> Result<Self> {
        Self::build(config, store, false)
    }

    /// As [`Qwen2::from_store`]; with `quantize_q8` each matrix becomes
    /// Q8_0 as soon as it is taken, so the full-precision weights are never
    /// all in memory (see [`Qwen2::quantize_q8`]). Otherwise an f32 CPU
    /// model holds every matrix whose values are all bf16 (a bf16
    /// checkpoint) in bf16, exactly (see [`Linear::compact_bf16`]).
    pub fn build(config: Qwen2Config, store: &mut WeightStore, quantize_q8: bool) -> Result<Self> {
        let h = config.hidden_size;
        let (nh, nkv, hd) = (config.num_attention_heads, config.num_key_value_heads, config.head_dim);
        let v = config.vocab_size;
        let embed_tokens = store.take("model.embed_tokens.weight", &[Some(v), Some(h)])?;
        let device = embed_tokens.device().clone();
        let dtype = embed_tokens.dtype();
        let mut embed_tokens = Linear::new(embed_tokens, None);
        let compact_bf16 = !quantize_q8 && device.is_cpu() && dtype == DType::F32;
        // Each matrix in its held form as soon as it is taken.
        let hold = |lin: &mut Linear| -> Result<()> {
            if quantize_q8 {
                lin.quantize_q8()?;
            } else if compact_bf16 {
                lin.compact_bf16()?;
            }
            Ok(())
        };
        hold(&mut embed_tokens)?;
        let eps = config.rms_norm_eps as f32;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linear = |name: &str, out: usize, inp: Option<usize>, bias: bool| -> Result<Linear> {
                let w = store.take(&format!("{p}.{name}.weight"), &[Some(out), inp])?;
                let b = if bias {
                    Some(store.take(&format!("{p}.{name}.bias"), &[Some(out)])?)
                } else {
                    None
                };
                Ok(Linear::new(w, b))
            };
            let self_attn = Attention {
                q_proj: linear("self_attn.q_proj", nh * hd, Some(h), true)?,
                k_proj: linear("self_attn.k_proj", nkv * hd, Some(h), true)?,
                v_proj: linear("self_attn.v_proj", nkv * hd, Some(h), true)?,
                o_proj: Linear::new(
                    store.take(&format!("{p}.self_attn.o_proj.weight"), &[Some(h), Some(nh * hd)])?,
                    None,
                ),
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
            };
            // The FFN width is whatever gate_proj holds: pruned layers may differ.
            let gate = store.take(&format!("{p}.mlp.gate_proj.weight"), &[None, Some(h)])?;
            let width = gate.dim(0)?;
            let mlp = Mlp {
                gate_proj: Linear::new(gate, None),
                up_proj: Linear::new(
                    store.take(&format!("{p}.mlp.up_proj.weight"), &[Some(width), Some(h)])?,
                    None,
                ),
                down_proj: Linear::new(
                    store.take(&format!("{p}.mlp.down_proj.weight"), &[Some(h), Some(width)])?,
                    None,
                ),
            };
            let norm = |store: &mut WeightStore, name: &str| -> Result<RmsNorm> {
                Ok(RmsNorm {
                    weight: store.take(&format!("{p}.{name}.weight"), &[Some(h)])?,
                    eps,
                })
            };
            let mut layer = DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: norm(store, "input_layernorm")?,
                post_attention_layernorm: norm(store, "post_attention_layernorm")?,
            };
            // Before the next layer is read: one layer in full precision at a time.
            for lin in layer.projections_mut() {
                hold(lin)?;
            }
            layers.push(layer);
        }
        let norm = RmsNorm {
            weight: store.take("model.norm.weight", &[Some(h)])?,
            eps,
        };
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            let mut head = Linear::new(store.take("lm_head.weight", &[Some(v), Some(h)])?, None);
            hold(&mut head)?;
            head
        };
        let rope = RotaryEmbedding::new(&config, dtype, &device)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            device,
            rope,
            config,
            dtype,
            kernels: Kernels::Fused,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Context length in tokens.
    pub fn context_len(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// Rows of the embedding and `lm_head` matrices.
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// FFN width of each layer.
    pub fn ffn_widths(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.mlp.width()).collect()
    }

    /// The `[vocab, hidden]` embedding matrix.
    pub fn embed_tokens(&self) -> &Linear {
        &self.embed_tokens
    }

    /// The `[vocab, hidden]` output projection (the embedding itself when tied).
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// The final norm.
    pub fn final_norm(&self) -> &RmsNorm {
        &self.norm
    }

    /// A fresh KV cache for one sequence of up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let c = &self.config;
        Ok(KvCache::new(
            self.layers.len(),
            c.num_key_value_heads,
            c.head_dim,
            capacity.min(self.context_len()),
            self.dtype,
            self.device(),
        )?)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Embeds `[b, t]` token ids into `[b, t, hidden]`.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let ids = tokens.flatten_all()?;
        self.check_ids(&ids.to_vec1::<u32>()?)?;
        Ok(self.embed_tokens.rows(&ids)?.reshape((b, t, self.config.hidden_size))?)
    }

    /// Runs layer `i` on hidden states `[b, t, hidden]` at positions starting at 0.
    pub fn layer_forward(&self, i: usize, hidden: &Tensor) -> Result<Tensor> {
        self.layers[i].forward(hidden, &self.rope, self.kernels)
    }

    /// The attention half of layer `i` on `[b, t, hidden]` (positions from 0):
    /// the residual stream after attention, and the normed MLP input.
    pub fn layer_attention(&self, i: usize, hidden: &Tensor) -> Result<(Tensor, Tensor)> {
        let l = &self.layers[i];
        let h = l
            .self_attn
            .forward(&l.input_layernorm.forward(hidden)?, &self.rope, Kernels::Fused)?;
        let mid = (hidden + h)?;
        let x = l.post_attention_layernorm.forward(&mid)?;
        Ok((mid, x))
    }

    /// Every weight under its checkpoint name (`lm_head.weight` only when
    /// untied); quantized matrices come back as their exact f32 values.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.named(|lin| Ok(lin.weight()?), |t| Ok(t.clone()))
    }

    /// Every weight's checkpoint name and element count, without
    /// materialising any (cheap on a quantized model).
    pub fn named_sizes(&self) -> Vec<(String, usize)> {
        self.named(
            |lin| {
                let (out, inp) = lin.dims();
                Ok(out * inp)
            },
            |t| Ok(t.elem_count()),
        )
        .expect("sizes never fail")
    }

    /// Walks every weight in checkpoint order: `matrix` for projections and
    /// embeddings, `vector` for biases and norms.
    fn named<T>(
        &self,
        matrix: impl Fn(&Linear) -> Result<T>,
        vector: impl Fn(&Tensor) -> Result<T>,
    ) -> Result<Vec<(String, T)>> {
        let mut out = vec![("model.embed_tokens.weight".to_owned(), matrix(&self.embed_tokens)?)];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            for (name, lin) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                out.push((format!("{p}.self_attn.{name}.weight"), matrix(lin)?));
                if let Some(b) = lin.bias() {
                    out.push((format!("{p}.self_attn.{name}.bias"), vector(b)?));
                }
            }
            for (name, lin) in [
                ("gate_proj", &l.mlp.gate_proj),
                ("up_proj", &l.mlp.up_proj),
                ("down_proj", &l.mlp.down_proj),
            ] {
                out.push((format!("{p}.mlp.{name}.weight"), matrix(lin)?));
            }
            out.push((
                format!("{p}.input_layernorm.weight"),
                vector(l.input_layernorm.weight())?,
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                vector(l.post_attention_layernorm.weight())?,
            ));
        }
        out.push(("model.norm.weight".to_owned(), vector(self.norm.weight())?));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_owned(), matrix(&self.lm_head)?));
        }
        Ok(out)
    }

    /// Final norm and `lm_head`: `[b, t, hidden]` → `[b, t, vocab]`.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward_with(hidden, self.kernels)?;
        let (b, t, hs) = h.dims3()?;
        let logits = project(&self.lm_head, &h.reshape((b * t, hs))?, self.kernels)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Logits at every position of `tokens` (`[b, t]` u32) → `[b, t, vocab]`,
    /// running only the layers `mask` enables (all when `None`).
    pub fn logits(&self, tokens: &Tensor, mask: Option<&LayerMask>) -> Result<Tensor> {
        let t = tokens.dim(1)?;
        if t > self.context_len() {
            return Err(ModelError::Input(format!(
                "sequence of {t} tokens exceeds the context length {}",
                self.context_len()
            )));
        }
        let mut h = self.embed(tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            if mask.is_none_or(|m| m.is_active(i)) {
                h = layer.forward(&h, &self.rope, self.kernels)?;
            }
        }
        self.head(&h)
    }

    /// Quantizes every projection, the `lm_head` and the embeddings to
    /// Q8_0 in place (see [`Linear::quantize_q8`]), dropping the
    /// full-precision matrices as it goes; tied embeddings share the
    /// `lm_head`'s blocks, as in a Q8_0 GGUF. Returns how many matrices were
    /// quantized (rows that are not a multiple of 32 stay as they are).
    pub fn quantize_q8(&mut self) -> Result<usize> {
        self.change_matrices(Linear::quantize_q8)
    }

    /// Applies `change` to every matrix (layer projections, embeddings, an
    /// untied `lm_head`; a tied one shares the embeddings' result) and
    /// counts those it reports changed.
    fn change_matrices(&mut self, mut change: impl FnMut(&mut Linear) -> candle_core::Result<bool>) -> Result<usize> {
        let mut n = 0;
        for (_, _, lin) in self.projections_mut() {
            n += usize::from(change(lin)?);
        }
        n += usize::from(change(&mut self.embed_tokens)?);
        if self.config.tie_word_embeddings {
            self.lm_head = self.embed_tokens.clone();
        } else {
            n += usize::from(change(&mut self.lm_head)?);
        }
        Ok(n)
    }

    /// Bytes the weights occupy as held (quantized matrices count their blocks).
    pub fn weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = self.embed_tokens.weight_bytes() + dense(self.norm.weight());
        if !self.config.tie_word_embeddings {
            n += self.lm_head.weight_bytes();
        }
        for l in &self.layers {
            for lin in l.projections() {
                n += lin.weight_bytes() + lin.bias().map_or(0, dense);
            }
            n += dense(l.input_layernorm.weight()) + dense(l.post_attention_layernorm.weight());
        }
        n
    }

    /// Selects the kernels of full-sequence forwards ([`Qwen2::logits`],
    /// [`Qwen2::head`], [`Qwen2::layer_forward`]); serving steps always run fused.
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Every layer projection with its PEFT module path
    /// (`model.layers.N.self_attn.q_proj`) and target kind, in layer order.
    fn projections_mut(&mut self) -> Vec<(String, LoraTarget, &mut Linear)> {
        const KINDS: [(LoraTarget, &str); 7] = [
            (LoraTarget::Q, "self_attn"),
            (LoraTarget::K, "self_attn"),
            (LoraTarget::V, "self_attn"),
            (LoraTarget::O, "self_attn"),
            (LoraTarget::Gate, "mlp"),
            (LoraTarget::Up, "mlp"),
            (LoraTarget::Down, "mlp"),
        ];
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for ((target, block), lin) in KINDS.into_iter().zip(l.projections_mut()) {
                out.push((format!("model.layers.{i}.{block}.{}", target.module()), target, lin));
            }
        }
        out
    }

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

    /// The weight format decode runs on: `q8_0` after [`Qwen2::quantize_q8`], else `none`.
    pub fn quantization(&self) -> &'static str {
        let any_q8 = self.lm_head.q8().is_some()
            || self
                .layers
                .iter()
                .any(|l| l.mlp.down_proj.q8().is_some() || l.self_attn.q_proj.q8().is_some());
        if any_q8 {
            "q8_0"
        } else {
            "none"
        }
    }

    /// Holds every bf16-held matrix as an f32 tensor again (the layout a
    /// bf16 checkpoint had before [`Linear::compact_bf16`]): the same
    /// values, twice the bytes; for comparisons of the two layouts.
    pub fn hold_dense(&mut self) -> Result<()> {
        self.change_matrices(|lin| lin.hold_dense().map(|()| true))?;
        Ok(())
    }

    /// How the weights are held: `q8_0`, `bf16` (exact values of a bf16
    /// checkpoint) or the compute dtype (`f32`, `bf16`, `f16`); `mixed`
    /// when the matrices differ (some matrices of a checkpoint bf16-exact,
    /// others not; rows Q8_0 cannot block).
    pub fn weight_format(&self) -> String {
        let form = |l: &Linear| {
            if l.q8().is_some() {
                "q8_0".to_owned()
            } else if l.bf16().is_some() {
                "bf16".to_owned()
            } else {
                format!("{:?}", self.dtype).to_lowercase()
            }
        };
        let mut forms = self
            .layers
            .iter()
            .flat_map(|l| l.projections())
            .chain([&self.lm_head])
            .map(form);
        let first = forms.next().unwrap_or_default();
        if forms.all(|f| f == first) {
            first
        } else {
            "mixed".to_owned()
        }
    }

    /// RoPE cosine and sine tables, `[max_positions, head_dim / 2]` each.
    pub(crate) fn rope_tables(&self) -> (&Tensor, &Tensor) {
        (&self.rope.cos, &self.rope.sin)
    }

    /// One serving step over a ragged batch: appends each sequence's new
    /// tokens to its cache, running the projections and MLP once over all
    /// rows and attention per sequence. Returns each sequence's logits
    /// (`[n, vocab]`, `n` = 1 for [`LogitsFor::Last`]). On an f32 CPU model
    /// without LoRA adapters every sequence takes the fused step
    /// (`model::fused`), a batch of only decoding sequences on CUDA the
    /// fused GPU step (`model::decode_cuda`); the rest go through the
    /// tensor path.
    pub fn step(&self, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
        self.check_steps(seqs)?;
        if super::decode_cuda::eligible(self, seqs) {
            return super::decode_cuda::decode_step(self, seqs);
        }
        let fused: Vec<bool> = seqs.iter().map(|s| super::fused::eligible(self, s)).collect();
        if fused.iter().all(|&f| !f) {
            return self.step_tensors(seqs);
        }
        if fused.iter().all(|&f| f) {
            return super::fused::fused_step(self, seqs);
        }
        // Mixed: split, run both paths, put the logits back in order.
        let (mut decode, mut prompt): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
        for (s, f) in seqs.iter_mut().zip(&fused) {
            let part = SeqStep {
                cache: &mut *s.cache,
                tokens: s.tokens,
                logits: s.logits,
            };
            if *f {
                decode.push(part);
            } else {
                prompt.push(part);
            }
        }
        let mut decoded = super::fused::fused_step(self, &mut decode)?.into_iter();
        let mut prompted = self.step_tensors(&mut prompt)?.into_iter();
        Ok(fused
            .iter()
            .map(|&f| if f { decoded.next() } else { prompted.next() }.expect("one logits tensor per sequence"))
            .collect())
    }

    /// Refuses a step with a sequence that adds no token, overflows its
    /// cache, or names a token outside the vocabulary.
    fn check_steps(&self, seqs: &[SeqStep<'_>]) -> Result<()> {
        for s in seqs {
            if s.tokens.is_empty() {
                return Err(ModelError::Input("no tokens to run".into()));
            }
            if s.cache.len() + s.tokens.len() > s.cache.capacity() {
                return Err(ModelError::Input(format!(
                    "sequence of {} tokens exceeds the context length {}",
                    s.cache.len() + s.tokens.len(),
                    s.cache.capacity()
                )));
            }
            self.check_ids(s.tokens)?;
        }
        Ok(())
    }

    /// [`Qwen2::step`] always through candle tensors, never the fused CPU
    /// step: the reference the fused kernels are tested against.
    pub fn step_unfused(&self, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
        self.check_steps(seqs)?;
        self.step_tensors(seqs)
    }

    /// [`Qwen2::step`] through candle tensors, for any device and dtype
    /// (the inputs were checked by `step`).
    fn step_tensors(&self, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let total = ids.len();
        let ids = Tensor::new(ids.as_slice(), self.device())?;
        let mut h = self
            .embed_tokens
            .rows(&ids)?
            .reshape((1, total, self.config.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward_ragged(&h, &self.rope, seqs, i)?;
        }
        // Rows that get logits: gathered so the head runs once.
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(seqs.len());
        let mut start = 0u32;
        for s in seqs.iter_mut() {
            let t = s.tokens.len() as u32;
            let picked: Vec<u32> = match s.logits {
                LogitsFor::Last => vec![start + t - 1],
                LogitsFor::All => (start..start + t).collect(),
            };
            counts.push(picked.len());
            rows.extend(picked);
            s.cache.advance(t as usize);
            start += t;
        }
        let rows = Tensor::new(rows.as_slice(), self.device())?;
        let logits = self
            .head(&h.squeeze(0)?.index_select(&rows, 0)?.unsqueeze(0)?)?
            .squeeze(0)?;
        let mut out = Vec::with_capacity(counts.len());
        let mut at = 0;
        for n in counts {
            out.push(logits.narrow(0, at, n)?);
            at += n;
        }
        Ok(out)
    }

    /// Appends `tokens` to the sequence in `cache` and returns logits for the
    /// new positions (`[n, vocab]`, `n` = 1 for [`LogitsFor::Last`]).
    pub fn forward_cached(&self, tokens: &[u32], cache: &mut KvCache, which: LogitsFor) -> Result<Tensor> {
        let mut one = [SeqStep {
            cache,
            tokens,
            logits: which,
        }];
        let mut logits = self.step(&mut one)?;
        Ok(logits.pop().expect("one sequence gives one logits tensor"))
    }
}

/// Summed negative log-likelihood (nats) of the next tokens under `logits`
/// (`[t, vocab]`, position i predicting `targets[i]`).
pub fn sum_nll(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?;
    let v: Vec<f32> = picked.to_vec1()?;
    Ok(-v.iter().map(|&x| x as f64).sum::<f64>())
}
