//! Our own Qwen2 decoder on candle: q/k/v bias, grouped-query attention
//! without copying keys per query head, RoPE, RMSNorm, SiLU MLP with
//! per-layer widths read from the weights, tied or untied `lm_head`, a layer
//! mask that skips layers without copying weights, full-sequence logits and
//! KV-cached incremental decoding. This file holds the model and its
//! full-sequence forwards; the parts are in `layers` and `attention`, the
//! serving step in `step`, how weights are held in `weight_forms`, and LoRA
//! in `lora`.
//!
//! Struct and field names follow the checkpoint's tensor names
//! (`model.layers.N.self_attn.q_proj`), so pruning maps tensors to fields
//! mechanically.

use candle_core::{DType, Device, Tensor};

use super::attention::Attention;
use super::config::Qwen2Config;
use super::error::{ModelError, Result};
use super::kv_cache::KvCache;
use super::layers::{project, DecoderLayer, Kernels, LayerMask, Mlp, RmsNorm, RotaryEmbedding};
use super::linear::Linear;
use super::load::WeightStore;
use super::lora::LoraTarget;

/// A Qwen2 causal language model.
#[derive(Debug, Clone)]
pub struct Qwen2 {
    pub(super) embed_tokens: Linear,
    /// Decoder layers, in order.
    pub layers: Vec<DecoderLayer>,
    pub(super) norm: RmsNorm,
    pub(super) lm_head: Linear,
    pub(super) device: Device,
    pub(super) rope: RotaryEmbedding,
    pub(super) config: Qwen2Config,
    pub(super) dtype: DType,
    pub(super) kernels: Kernels,
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
        let eps = config.rms_norm_eps as f32;
        // The final norm (never held compactly) tells the device and compute dtype.
        let norm = RmsNorm {
            weight: store.take("model.norm.weight", &[Some(h)])?,
            eps,
        };
        let device = norm.weight().device().clone();
        let dtype = norm.weight().dtype();
        let mut embed_tokens = store.take_linear("model.embed_tokens.weight", &[Some(v), Some(h)])?;
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
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linear = |name: &str, out: Option<usize>, inp: usize, bias: bool| -> Result<Linear> {
                let lin = store.take_linear(&format!("{p}.{name}.weight"), &[out, Some(inp)])?;
                Ok(if bias {
                    let out = lin.out_features();
                    lin.with_bias(store.take(&format!("{p}.{name}.bias"), &[Some(out)])?)
                } else {
                    lin
                })
            };
            let self_attn = Attention {
                q_proj: linear("self_attn.q_proj", Some(nh * hd), h, true)?,
                k_proj: linear("self_attn.k_proj", Some(nkv * hd), h, true)?,
                v_proj: linear("self_attn.v_proj", Some(nkv * hd), h, true)?,
                o_proj: linear("self_attn.o_proj", Some(h), nh * hd, false)?,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
            };
            // The FFN width is whatever gate_proj holds: pruned layers may differ.
            let gate_proj = linear("mlp.gate_proj", None, h, false)?;
            let width = gate_proj.out_features();
            let mlp = Mlp {
                gate_proj,
                up_proj: linear("mlp.up_proj", Some(width), h, false)?,
                down_proj: linear("mlp.down_proj", Some(h), width, false)?,
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
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            let mut head = store.take_linear("lm_head.weight", &[Some(v), Some(h)])?;
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

    /// The dimensions of its keys and values (for a [`KvPool`](super::KvPool)).
    pub fn kv_shape(&self) -> super::KvShape {
        super::KvShape {
            layers: self.layers.len(),
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        }
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

    pub(super) fn check_ids(&self, ids: &[u32]) -> Result<()> {
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
        let mut out = Vec::new();
        self.visit_weights(|name, w| {
            out.push((name, w.tensor()?));
            Ok(())
        })?;
        Ok(out)
    }

    /// Every weight's checkpoint name and element count, without
    /// materialising any (cheap on a quantized model).
    pub fn named_sizes(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        self.visit_weights(|name, w| {
            out.push((name, w.dims().iter().product()));
            Ok(())
        })
        .expect("sizes never fail");
        out
    }

    /// Hands every weight to `visit` in checkpoint order, one at a time
    /// (so a caller can convert and drop each before the next).
    pub fn visit_weights(&self, mut visit: impl FnMut(String, WeightRef<'_>) -> Result<()>) -> Result<()> {
        visit(
            "model.embed_tokens.weight".to_owned(),
            WeightRef::Matrix(&self.embed_tokens),
        )?;
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            for (name, lin) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                visit(format!("{p}.self_attn.{name}.weight"), WeightRef::Matrix(lin))?;
                if let Some(b) = lin.bias() {
                    visit(format!("{p}.self_attn.{name}.bias"), WeightRef::Vector(b))?;
                }
            }
            for (name, lin) in [
                ("gate_proj", &l.mlp.gate_proj),
                ("up_proj", &l.mlp.up_proj),
                ("down_proj", &l.mlp.down_proj),
            ] {
                visit(format!("{p}.mlp.{name}.weight"), WeightRef::Matrix(lin))?;
            }
            visit(
                format!("{p}.input_layernorm.weight"),
                WeightRef::Vector(l.input_layernorm.weight()),
            )?;
            visit(
                format!("{p}.post_attention_layernorm.weight"),
                WeightRef::Vector(l.post_attention_layernorm.weight()),
            )?;
        }
        visit("model.norm.weight".to_owned(), WeightRef::Vector(self.norm.weight()))?;
        if !self.config.tie_word_embeddings {
            visit("lm_head.weight".to_owned(), WeightRef::Matrix(&self.lm_head))?;
        }
        Ok(())
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

    /// Selects the kernels of full-sequence forwards ([`Qwen2::logits`],
    /// [`Qwen2::head`], [`Qwen2::layer_forward`]); serving steps always run fused.
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Every layer projection with its PEFT module path
    /// (`model.layers.N.self_attn.q_proj`) and target kind, in layer order.
    pub(super) fn projections_mut(&mut self) -> Vec<(String, LoraTarget, &mut Linear)> {
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

    /// RoPE cosine and sine tables, `[max_positions, head_dim / 2]` each.
    pub(crate) fn rope_tables(&self) -> (&Tensor, &Tensor) {
        (&self.rope.cos, &self.rope.sin)
    }
}

/// A weight as [`Qwen2::visit_weights`] hands it over.
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    /// A projection or embedding matrix, in whatever form it is held.
    Matrix(&'a Linear),
    /// A bias or norm scale.
    Vector(&'a Tensor),
}

impl WeightRef<'_> {
    /// Its shape, outermost first, without materialising it.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Self::Matrix(lin) => {
                let (out, inp) = lin.dims();
                vec![out, inp]
            }
            Self::Vector(t) => t.dims().to_vec(),
        }
    }

    /// Its exact values in f32, row-major.
    pub fn values(&self) -> Result<Vec<f32>> {
        match self {
            Self::Matrix(lin) => Ok(lin.weight_values()?),
            Self::Vector(t) => Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
        }
    }

    /// Its values as a tensor (a held matrix as its exact f32 values).
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Self::Matrix(lin) => Ok(lin.weight()?),
            Self::Vector(t) => Ok((*t).clone()),
        }
    }
}
