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

/// RMSNorm with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?)
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
    fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
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
    fn forward(&self, x: &Tensor, rope: &RotaryEmbedding) -> Result<Tensor> {
        let offset = 0;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x)?.reshape((b, t, nh, hd))?.transpose(1, 2)?;
        let k = self.k_proj.forward(x)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = rope.apply(&q, offset)?;
        let k = rope.apply(&k, offset)?;
        let y = attend(&q, &k, &v, offset, nkv)?; // [b, nh, t, hd]
        let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        Ok(self.o_proj.forward(&y)?)
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
            let q = rope.apply(&split(&q_all, nh)?, offset)?;
            let k = rope.apply(&split(&k_all, nkv)?, offset)?;
            let v = split(&v_all, nkv)?.contiguous()?;
            let (k, v) = seq.cache.append(layer, &k, &v)?;
            // One decode token on a GPU: the fused kernel reads the cache in place.
            let y = if t == 1 && super::decode_attention::applies(&q) {
                super::decode_attention::decode_attention(&q, &k, &v)?
            } else {
                attend(&q, &k, &v, offset, nkv)?
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
pub(crate) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, offset: usize, nkv: usize) -> Result<Tensor> {
    let t = q.dim(2)?;
    if t <= QUERY_BLOCK {
        return attend_block(q, k, v, offset, nkv);
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
        )?);
        i0 += bs;
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// [`attend`] for one block of queries (all keys given are visible up to the causal limit).
fn attend_block(q: &Tensor, k: &Tensor, v: &Tensor, offset: usize, nkv: usize) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let l = k.dim(2)?;
    let group = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let q = (q.contiguous()?.reshape((b, nkv, group * t, hd))? * scale)?;
    let scores = q.matmul(&k.t()?)?; // [b, nkv, group·t, l]
                                     // QKᵀ and PV: 2 FLOPs per multiply-add each.
    super::flop_probe::add(4 * (b * nkv * group * t * l * hd) as u64);
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
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
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
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&self.activations(x)?).map_err(Into::into)
    }

    /// The intermediate activations `silu(gate(x)) · up(x)`, `[.., width]`.
    pub fn activations(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        let up = self.up_proj.forward(x)?;
        Ok((gate * up)?)
    }

    /// Intermediate width of this layer.
    pub fn width(&self) -> usize {
        self.gate_proj.out_features()
    }
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
    fn forward(&self, x: &Tensor, rope: &RotaryEmbedding) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, rope)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
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
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
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
    embed_tokens: Tensor,
    /// Decoder layers, in order.
    pub layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    lm_head_q8: Option<std::sync::Arc<super::quant::Q8Matrix>>,
    rope: RotaryEmbedding,
    config: Qwen2Config,
    dtype: DType,
}

impl Qwen2 {
    /// Builds the model from `store`, checking every tensor's shape against `config`.
    pub fn from_store(config: Qwen2Config, store: &mut WeightStore) -> Result<Self> {
        let h = config.hidden_size;
        let (nh, nkv, hd) = (config.num_attention_heads, config.num_key_value_heads, config.head_dim);
        let v = config.vocab_size;
        let embed_tokens = store.take("model.embed_tokens.weight", &[Some(v), Some(h)])?;
        let device = embed_tokens.device().clone();
        let dtype = embed_tokens.dtype();
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
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: norm(store, "input_layernorm")?,
                post_attention_layernorm: norm(store, "post_attention_layernorm")?,
            });
        }
        let norm = RmsNorm {
            weight: store.take("model.norm.weight", &[Some(h)])?,
            eps,
        };
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            store.take("lm_head.weight", &[Some(v), Some(h)])?
        };
        let rope = RotaryEmbedding::new(&config, dtype, &device)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            lm_head_q8: None,
            rope,
            config,
            dtype,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
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
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// The `[vocab, hidden]` output matrix (the embedding itself when tied).
    pub fn lm_head(&self) -> &Tensor {
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
        Ok(self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    /// Runs layer `i` on hidden states `[b, t, hidden]` at positions starting at 0.
    pub fn layer_forward(&self, i: usize, hidden: &Tensor) -> Result<Tensor> {
        self.layers[i].forward(hidden, &self.rope)
    }

    /// The attention half of layer `i` on `[b, t, hidden]` (positions from 0):
    /// the residual stream after attention, and the normed MLP input.
    pub fn layer_attention(&self, i: usize, hidden: &Tensor) -> Result<(Tensor, Tensor)> {
        let l = &self.layers[i];
        let h = l.self_attn.forward(&l.input_layernorm.forward(hidden)?, &self.rope)?;
        let mid = (hidden + h)?;
        let x = l.post_attention_layernorm.forward(&mid)?;
        Ok((mid, x))
    }

    /// Every weight under its checkpoint name (`lm_head.weight` only when untied).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_owned(), self.embed_tokens.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            for (name, lin) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                out.push((format!("{p}.self_attn.{name}.weight"), lin.weight().clone()));
                if let Some(b) = lin.bias() {
                    out.push((format!("{p}.self_attn.{name}.bias"), b.clone()));
                }
            }
            for (name, lin) in [
                ("gate_proj", &l.mlp.gate_proj),
                ("up_proj", &l.mlp.up_proj),
                ("down_proj", &l.mlp.down_proj),
            ] {
                out.push((format!("{p}.mlp.{name}.weight"), lin.weight().clone()));
            }
            out.push((
                format!("{p}.input_layernorm.weight"),
                l.input_layernorm.weight().clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.weight().clone(),
            ));
        }
        out.push(("model.norm.weight".to_owned(), self.norm.weight().clone()));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_owned(), self.lm_head.clone()));
        }
        out
    }

    /// Final norm and `lm_head`: `[b, t, hidden]` → `[b, t, vocab]`.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(hidden)?;
        let (b, t, hs) = h.dims3()?;
        let logits = h.reshape((b * t, hs))?.matmul(&self.lm_head.t()?)?;
        super::flop_probe::add(2 * (b * t * hs * self.config.vocab_size) as u64);
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
                h = layer.forward(&h, &self.rope)?;
            }
        }
        self.head(&h)
    }

    /// Quantizes every projection and the `lm_head` to Q8_0 in place (see
    /// [`Linear::quantize_q8`]); with tied embeddings the embedding rows take
    /// the same dequantized values, as in a Q8_0 GGUF. Returns how many
    /// matrices were quantized (rows that are not a multiple of 32 stay f32).
    pub fn quantize_q8(&mut self) -> Result<usize> {
        let mut n = 0;
        for l in &mut self.layers {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            for lin in [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ] {
                n += usize::from(lin.quantize_q8()?);
            }
        }
        let mut head = Linear::new(self.lm_head.clone(), None);
        if head.quantize_q8()? {
            n += 1;
            self.lm_head = head.weight().clone();
            if self.config.tie_word_embeddings {
                self.embed_tokens = self.lm_head.clone();
            }
            self.lm_head_q8 = head.q8_shared();
        }
        Ok(n)
    }

    /// The weight format decode runs on: `q8_0` after [`Qwen2::quantize_q8`], else `none`.
    pub fn quantization(&self) -> &'static str {
        let any_q8 = self.lm_head_q8.is_some()
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

    /// The `lm_head` in Q8_0, when quantized.
    pub(crate) fn lm_head_q8(&self) -> Option<&super::quant::Q8Matrix> {
        self.lm_head_q8.as_deref()
    }

    /// RoPE cosine and sine tables, `[max_positions, head_dim / 2]` each.
    pub(crate) fn rope_tables(&self) -> (&Tensor, &Tensor) {
        (&self.rope.cos, &self.rope.sin)
    }

    /// One serving step over a ragged batch: appends each sequence's new
    /// tokens to its cache, running the projections and MLP once over all
    /// rows and attention per sequence. Returns each sequence's logits
    /// (`[n, vocab]`, `n` = 1 for [`LogitsFor::Last`]). Sequences decoding
    /// one token on an f32 CPU model take the fused path (`model::decode`),
    /// a batch of only such sequences on CUDA the fused GPU step
    /// (`model::decode_cuda`); the rest (prompt chunks) go through the
    /// tensor path.
    pub fn step(&self, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
        self.check_steps(seqs)?;
        if super::decode_cuda::eligible(self, seqs) {
            return super::decode_cuda::decode_step(self, seqs);
        }
        let fused: Vec<bool> = seqs.iter().map(|s| super::decode::eligible(self, s)).collect();
        if fused.iter().all(|&f| !f) {
            return self.step_tensors(seqs);
        }
        if fused.iter().all(|&f| f) {
            return super::decode::decode_step(self, seqs);
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
        let mut decoded = super::decode::decode_step(self, &mut decode)?.into_iter();
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
            .index_select(&ids, 0)?
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
