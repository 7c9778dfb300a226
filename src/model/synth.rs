//! Random weights of real model shapes, for benchmarking where the real
//! weights cannot go (no downloads on the GPU machine; 26 GB of folders do not
//! travel): the shapes of CodeQwen1.5-7B, its Flab-Pruner 5.7B, Qwen2.5-Coder-1.5B
//! and 7B, and tiny-coder, initialised as transformers does (normal, std 0.02; norm
//! scales 1), so activations stay in range and greedy decoding never
//! overflows in bf16. Speed depends only on the shapes.
//!
//! Two outputs: a model built directly on the target device
//! ([`synth_model`]; on a GPU the weights are drawn there, nothing crosses
//! PCIe) and a Hugging Face folder ([`write_synth_folder`], bf16 safetensors
//! in shards of at most [`SHARD_BYTES`], written shard by shard so memory
//! stays bounded). Both are deterministic for a seed. On the CPU both draw
//! from the same host generator and round through bf16, so the in-memory model
//! equals the written folder loaded back; on CUDA the device generator
//! (cuRAND) draws, so CPU and GPU weights differ.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::{json, Value};

use super::config::Qwen2Config;
use super::error::{ModelError, Result};
use super::load::WeightStore;
use super::qwen2::Qwen2;

/// Standard deviation of the random matrices and biases (transformers'
/// `initializer_range` for Qwen2).
pub const INIT_STD: f32 = 0.02;

/// Largest safetensors shard [`write_synth_folder`] writes.
pub const SHARD_BYTES: usize = 4 << 30;

/// A model shape with published dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthShape {
    /// CodeQwen1.5-7B: 32 layers, hidden 4096, FFN 13440, vocab 92416, untied.
    CodeQwen7b,
    /// Flab-Pruner's CodeQwen pruning: 28 layers, FFN 13184, vocab 17176.
    FlabCq57b,
    /// Qwen2.5-Coder-1.5B: 28 layers, hidden 1536, FFN 8960, vocab 151936, tied.
    Qwen25Coder1_5b,
    /// Qwen2.5-Coder-7B: 28 layers, hidden 3584, FFN 18944, vocab 152064, untied.
    Qwen25Coder7b,
    /// The embedded tiny-coder's shape: 12 layers, hidden 384, vocab 16384, tied.
    Tiny,
}

impl SynthShape {
    /// Every shape, in the order the CLI lists them.
    pub const ALL: [SynthShape; 5] = [
        Self::CodeQwen7b,
        Self::FlabCq57b,
        Self::Qwen25Coder1_5b,
        Self::Qwen25Coder7b,
        Self::Tiny,
    ];

    /// The name `--shape` / `--synth` take.
    pub fn name(self) -> &'static str {
        match self {
            Self::CodeQwen7b => "codeqwen1.5-7b",
            Self::FlabCq57b => "flab-cq-5.7b",
            Self::Qwen25Coder1_5b => "qwen2.5-coder-1.5b",
            Self::Qwen25Coder7b => "qwen2.5-coder-7b",
            Self::Tiny => "tiny",
        }
    }

    /// The shape called `name`, or an error listing the known names.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|s| s.name()).collect();
            ModelError::Input(format!("unknown shape `{name}`: expected one of {}", names.join(", ")))
        })
    }

    /// The `config.json` of this shape (as published; RoPE base, epsilon and
    /// context length do not affect speed), marked as synthetic.
    pub fn config_json(self, seed: u64) -> Value {
        // (vocab, hidden, ffn, layers, heads, kv heads, context, rope theta, eps, tied)
        let (vocab, hidden, ffn, layers, heads, kv, ctx, theta, eps, tied) = match self {
            Self::CodeQwen7b => (92416, 4096, 13440, 32, 32, 4, 65536, 1_000_000.0, 1e-5, false),
            Self::FlabCq57b => (17176, 4096, 13184, 28, 32, 4, 65536, 1_000_000.0, 1e-5, false),
            Self::Qwen25Coder1_5b => (151936, 1536, 8960, 28, 12, 2, 32768, 1_000_000.0, 1e-6, true),
            Self::Qwen25Coder7b => (152064, 3584, 18944, 28, 28, 4, 32768, 1_000_000.0, 1e-6, false),
            Self::Tiny => (16384, 384, 1024, 12, 6, 2, 1024, 10_000.0, 1e-6, true),
        };
        json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "max_position_embeddings": ctx,
            "rope_theta": theta,
            "rms_norm_eps": eps,
            "tie_word_embeddings": tied,
            "hidden_act": "silu",
            "use_sliding_window": false,
            "rope_scaling": null,
            "initializer_range": INIT_STD,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "torch_dtype": "bfloat16",
            "greencode_synth": {"shape": self.name(), "seed": seed, "init_std": INIT_STD},
        })
    }

    /// The parsed configuration.
    pub fn config(self, seed: u64) -> Result<Qwen2Config> {
        let text = self.config_json(seed).to_string();
        Qwen2Config::from_json_str(&text, Path::new(&format!("<synth {}>", self.name())))
    }
}

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Init {
    /// Normal, mean 0, std [`INIT_STD`].
    Normal,
    /// All ones (RMSNorm scales).
    Ones,
}

/// Every tensor of a model of `cfg`'s shape, in checkpoint order.
fn tensor_specs(cfg: &Qwen2Config) -> Vec<(String, Vec<usize>, Init)> {
    let h = cfg.hidden_size;
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let ffn = cfg.intermediate_size.unwrap_or(4 * h);
    let mut out = vec![(
        "model.embed_tokens.weight".to_owned(),
        vec![cfg.vocab_size, h],
        Init::Normal,
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut add = |name: &str, shape: Vec<usize>, init| out.push((format!("{p}.{name}"), shape, init));
        add("input_layernorm.weight", vec![h], Init::Ones);
        for (name, rows) in [("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)] {
            add(&format!("self_attn.{name}.weight"), vec![rows, h], Init::Normal);
            add(&format!("self_attn.{name}.bias"), vec![rows], Init::Normal);
        }
        add("self_attn.o_proj.weight", vec![h, nh * hd], Init::Normal);
        add("post_attention_layernorm.weight", vec![h], Init::Ones);
        add("mlp.gate_proj.weight", vec![ffn, h], Init::Normal);
        add("mlp.up_proj.weight", vec![ffn, h], Init::Normal);
        add("mlp.down_proj.weight", vec![h, ffn], Init::Normal);
    }
    out.push(("model.norm.weight".to_owned(), vec![h], Init::Ones));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_owned(), vec![cfg.vocab_size, h], Init::Normal));
    }
    out
}

/// Parameters of a model of `cfg`'s shape (a tied matrix counts once).
pub fn param_count(cfg: &Qwen2Config) -> usize {
    tensor_specs(cfg)
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum()
}

/// Elements drawn from one generator: chunks are drawn in parallel, each
/// from its own seed, so values do not depend on the thread count.
const CHUNK: usize = 1 << 16;

/// A stable 64-bit hash of a tensor name (FNV-1a), so each tensor's values
/// depend on its name and the seed, not on the order tensors are drawn in.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `n` host values for tensor `name`, rounded to bf16 (what a bf16
/// checkpoint holds).
fn host_values(name: &str, n: usize, init: Init, seed: u64) -> Vec<half::bf16> {
    let mut out = vec![half::bf16::ONE; n];
    if init == Init::Ones {
        return out;
    }
    let base = seed ^ name_hash(name);
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(base.wrapping_add((c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        // Box–Muller: two uniforms give two independent normals.
        for pair in chunk.chunks_mut(2) {
            let u1: f32 = 1.0 - rng.random::<f32>(); // (0, 1]: ln never sees 0
            let u2: f32 = rng.random();
            let r = (-2.0 * u1.ln()).sqrt() * INIT_STD;
            let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
            pair[0] = half::bf16::from_f32(r * c);
            if let Some(second) = pair.get_mut(1) {
                *second = half::bf16::from_f32(r * s);
            }
        }
    });
    out
}

/// One tensor on `device` in `dtype`: drawn on the host (CPU) or by the
/// device's own generator (GPU, after [`Device::set_seed`]).
fn make_tensor(name: &str, shape: &[usize], init: Init, seed: u64, device: &Device, dtype: DType) -> Result<Tensor> {
    if device.is_cpu() {
        let n = shape.iter().product();
        return Ok(Tensor::from_vec(host_values(name, n, init, seed), shape, device)?.to_dtype(dtype)?);
    }
    Ok(match init {
        Init::Ones => Tensor::ones(shape, dtype, device)?,
        Init::Normal => Tensor::randn(0f32, INIT_STD, shape, device)?.to_dtype(dtype)?,
    })
}

/// Builds a model of `shape` with random weights directly on `device`,
/// computing in `dtype`. Refuses on the CPU when the weights would not fit
/// in available memory.
pub fn synth_model(shape: SynthShape, device: &Device, dtype: DType, seed: u64) -> Result<Qwen2> {
    let config = shape.config(seed)?;
    let bytes = param_count(&config) * dtype.size_in_bytes();
    if device.is_cpu() {
        if let Some(avail) = super::device::available_memory() {
            if bytes > avail {
                return Err(ModelError::Input(format!(
                    "shape {} needs {:.1} GiB for its weights in {dtype:?} but only {:.1} GiB of memory is available",
                    shape.name(),
                    bytes as f64 / (1u64 << 30) as f64,
                    avail as f64 / (1u64 << 30) as f64
                )));
            }
        }
    } else {
        device.set_seed(seed)?;
    }
    let mut tensors = HashMap::new();
    for (name, dims, init) in tensor_specs(&config) {
        let t = make_tensor(&name, &dims, init, seed, device, dtype)?;
        tensors.insert(name, t);
    }
    let folder = PathBuf::from(format!("<synth {}>", shape.name()));
    let mut store = WeightStore::from_tensors(&folder, dtype, tensors);
    Qwen2::from_store(config, &mut store)
}

/// What [`write_synth_folder`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SynthSummary {
    /// The shape's name.
    pub shape: &'static str,
    /// The output folder.
    pub folder: PathBuf,
    /// Parameters written.
    pub parameters: usize,
    /// Bytes of weights (bf16).
    pub weight_bytes: usize,
    /// Safetensors files written.
    pub shards: usize,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The tokenizer files copied from the tokenizer source folder.
const TOKENIZER_FILES: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];

/// Writes a Hugging Face folder with random weights of `shape`: config.json,
/// bf16 safetensors (one `model.safetensors`, or shards of at most
/// [`SHARD_BYTES`] with `model.safetensors.index.json`), and the tokenizer
/// files of `tokenizer_from` (tiny-coder's byte-level BPE in practice; a
/// larger model vocabulary simply has ids the tokenizer never produces).
/// `out` must not exist or be empty unless `force`.
pub fn write_synth_folder(
    shape: SynthShape,
    out: &Path,
    tokenizer_from: &Path,
    seed: u64,
    force: bool,
) -> Result<SynthSummary> {
    let config = shape.config(seed)?;
    if out.exists() {
        let empty = out.read_dir().map_err(io_err(out))?.next().is_none();
        if !empty && !force {
            return Err(ModelError::Input(format!(
                "output folder {} exists and is not empty (pass --force to write into it)",
                out.display()
            )));
        }
    }
    let tok = tokenizer_from.join("tokenizer.json");
    if !tok.is_file() {
        return Err(ModelError::MissingFile {
            path: tok,
            what: "the tokenizer to copy into the synthetic folder",
        });
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;

    // Shards: consecutive tensors up to SHARD_BYTES each.
    let specs = tensor_specs(&config);
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut in_shard = 0usize;
    for (i, (_, dims, _)) in specs.iter().enumerate() {
        let bytes = dims.iter().product::<usize>() * 2;
        if in_shard > 0 && in_shard + bytes > SHARD_BYTES {
            shards.push(Vec::new());
            in_shard = 0;
        }
        shards.last_mut().expect("at least one shard").push(i);
        in_shard += bytes;
    }
    let n = shards.len();
    let file_name = |k: usize| {
        if n == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        }
    };
    let mut weight_map = serde_json::Map::new();
    for (k, members) in shards.iter().enumerate() {
        let mut tensors = HashMap::new();
        for &i in members {
            let (name, dims, init) = &specs[i];
            let t = make_tensor(name, dims, *init, seed, &Device::Cpu, DType::BF16)?;
            weight_map.insert(name.clone(), Value::String(file_name(k)));
            tensors.insert(name.clone(), t);
        }
        let path = out.join(file_name(k));
        candle_core::safetensors::save(&tensors, &path).map_err(|e| ModelError::Io {
            path: path.clone(),
            source: std::io::Error::other(crate::model::error::candle_reason(&e)),
        })?;
        // The writer creates the file private (0600); a model folder is shared data.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).map_err(io_err(&path))?;
        }
    }
    let parameters = param_count(&config);
    if n > 1 {
        let index = json!({"metadata": {"total_size": parameters * 2}, "weight_map": weight_map});
        let path = out.join("model.safetensors.index.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&index).expect("JSON values serialize"),
        )
        .map_err(io_err(&path))?;
    }
    let path = out.join("config.json");
    let text = serde_json::to_string_pretty(&shape.config_json(seed)).expect("JSON values serialize");
    std::fs::write(&path, text).map_err(io_err(&path))?;
    for f in TOKENIZER_FILES {
        let src = tokenizer_from.join(f);
        if src.is_file() {
            let dst = out.join(f);
            std::fs::copy(&src, &dst).map_err(io_err(&dst))?;
        }
    }
    Ok(SynthSummary {
        shape: shape.name(),
        folder: out.to_path_buf(),
        parameters,
        weight_bytes: parameters * 2,
        shards: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_their_published_sizes() {
        let billions = |s: SynthShape| param_count(&s.config(0).unwrap()) as f64 / 1e9;
        // CodeQwen1.5-7B is 7.25B; the Flab pruning 5.73B; Qwen2.5-Coder-1.5B 1.54B, 7B 7.62B.
        assert!((billions(SynthShape::CodeQwen7b) - 7.25).abs() < 0.01);
        assert!((billions(SynthShape::FlabCq57b) - 5.73).abs() < 0.02);
        assert!((billions(SynthShape::Qwen25Coder1_5b) - 1.54).abs() < 0.01);
        assert!((billions(SynthShape::Qwen25Coder7b) - 7.62).abs() < 0.01);
        let tiny = SynthShape::Tiny.config(0).unwrap();
        assert_eq!(
            (tiny.hidden_size, tiny.num_hidden_layers, tiny.vocab_size),
            (384, 12, 16384)
        );
    }

    #[test]
    fn unknown_shape_names_the_known_ones() {
        let e = SynthShape::from_name("llama-70b").unwrap_err().to_string();
        assert!(e.contains("codeqwen1.5-7b") && e.contains("tiny"), "{e}");
        assert_eq!(SynthShape::from_name("tiny").unwrap(), SynthShape::Tiny);
    }

    #[test]
    fn host_values_are_deterministic_and_have_the_init_std() {
        let a = host_values("x", 100_003, Init::Normal, 7);
        assert_eq!(a, host_values("x", 100_003, Init::Normal, 7));
        assert_ne!(a, host_values("y", 100_003, Init::Normal, 7));
        let v: Vec<f64> = a.iter().map(|x| x.to_f64()).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((std - INIT_STD as f64).abs() < 5e-4, "std {std}");
    }
}
