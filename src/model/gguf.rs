//! Reading a GGUF file (llama.cpp's `qwen2` layout, as `greencode quantize`
//! or llama.cpp's converter write it) in two steps: [`GgufFile::open`] reads
//! the header, the metadata and the tensor index, from which the
//! configuration comes (and the tokenizer, which the generation layer
//! rebuilds from the `tokenizer.ggml.*` values read here);
//! [`GgufFile::load`] then reads the weights: matrices in Q8_0 or another
//! of llama.cpp's block formats are held as the file stores them (on the
//! CPU), the rest dequantized to f32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use crate::cpu::blocks::{BlockMatrix, BlockType};
use crate::cpu::f16::F16Matrix;
use crate::cpu::quant::Q8Matrix;
use candle_core::{DType, Device};
use serde_json::json;

use super::config::Qwen2Config;
use super::error::{candle_reason, ModelError, Result};
use super::gguf_names::hf_name;
use super::linear::HeldMatrix;
use super::load::WeightStore;
use super::qwen2::Qwen2;

/// An open GGUF file: its metadata and tensor index read, its weights not yet.
pub struct GgufFile {
    path: PathBuf,
    file: std::fs::File,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::WeightFile {
        path: path.to_path_buf(),
        format: "GGUF",
        reason: reason.into(),
    }
}

fn meta<'a>(c: &'a Content, path: &Path, key: &str) -> Result<&'a Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| bad(path, format!("metadata key `{key}` is missing")))
}

fn meta_u64(c: &Content, path: &Path, key: &str) -> Result<u64> {
    let v = meta(c, path, key)?;
    v.to_u64()
        .map_err(|e| bad(path, format!("`{key}`: {}", candle_reason(&e))))
}

fn meta_strings(c: &Content, path: &Path, key: &str) -> Result<Vec<String>> {
    let arr = meta(c, path, key)?
        .to_vec()
        .map_err(|e| bad(path, format!("`{key}`: {}", candle_reason(&e))))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| bad(path, format!("`{key}`: {}", candle_reason(&e))))
        })
        .collect()
}

impl GgufFile {
    /// Opens `path` and reads its metadata and tensor index, refusing an
    /// architecture other than `qwen2`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = Content::read(&mut file).map_err(|e| bad(path, candle_reason(&e)))?;
        let arch = meta(&content, path, "general.architecture")?
            .to_string()
            .map_err(|e| bad(path, candle_reason(&e)))?;
        if arch != "qwen2" {
            return Err(bad(
                path,
                format!("general.architecture is `{arch}`; only qwen2 is supported"),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata string (`None` when the key is absent).
    pub fn string(&self, key: &str) -> Result<Option<String>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .cloned()
                .map(Some)
                .map_err(|e| bad(&self.path, format!("`{key}`: {}", candle_reason(&e)))),
        }
    }

    /// A metadata string that must be present.
    pub fn required_string(&self, key: &str) -> Result<String> {
        self.string(key)?
            .ok_or_else(|| bad(&self.path, format!("metadata key `{key}` is missing")))
    }

    /// A metadata array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        meta_strings(&self.content, &self.path, key)
    }

    /// A metadata array of integers (entries that are not integers read as `default`).
    pub fn ints(&self, key: &str, default: i32) -> Result<Vec<i32>> {
        Ok(meta(&self.content, &self.path, key)?
            .to_vec()
            .map_err(|e| bad(&self.path, candle_reason(&e)))?
            .iter()
            .map(|v| v.to_i32().unwrap_or(default))
            .collect())
    }

    /// The model configuration its `qwen2.*` metadata describes.
    pub fn config(&self) -> Result<Qwen2Config> {
        let (content, path) = (&self.content, self.path.as_path());
        let vocab = match meta(content, path, "tokenizer.ggml.tokens")? {
            Value::Array(tokens) => tokens.len(),
            _ => return Err(bad(path, "`tokenizer.ggml.tokens` is not an array")),
        };
        let ffn = match meta(content, path, "qwen2.feed_forward_length")? {
            Value::Array(v) => v.first().and_then(|x| x.to_u32().ok()).unwrap_or(0) as u64,
            _ => meta_u64(content, path, "qwen2.feed_forward_length")?,
        };
        let f32_meta = |key: &str| -> Result<f64> {
            meta(content, path, key)?
                .to_f32()
                .map(f64::from)
                .map_err(|e| bad(path, format!("`{key}`: {}", candle_reason(&e))))
        };
        let eos = meta_u64(content, path, "tokenizer.ggml.eos_token_id").unwrap_or(0);
        let config = json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": meta_u64(content, path, "qwen2.embedding_length")?,
            "intermediate_size": ffn,
            "num_hidden_layers": meta_u64(content, path, "qwen2.block_count")?,
            "num_attention_heads": meta_u64(content, path, "qwen2.attention.head_count")?,
            "num_key_value_heads": meta_u64(content, path, "qwen2.attention.head_count_kv")?,
            "max_position_embeddings": meta_u64(content, path, "qwen2.context_length")?,
            "rope_theta": f32_meta("qwen2.rope.freq_base")?,
            "rms_norm_eps": f32_meta("qwen2.attention.layer_norm_rms_epsilon")?,
            "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
            "eos_token_id": eos,
        });
        Qwen2Config::from_json_str(&config.to_string(), path)
    }

    /// Reads the weights into a model of `config` on `device`. On the CPU
    /// in f32, a matrix the file holds in f16, Q8_0 or another block format
    /// (Q4_K, Q6_K, Q5_0, …) is held in it as it is: the model's matrices
    /// occupy the file's bytes. Anything else is dequantized to f32 when
    /// taken (and with `quantize_q8` every matrix becomes Q8_0).
    pub fn load(mut self, config: Qwen2Config, device: &Device, dtype: DType, quantize_q8: bool) -> Result<Qwen2> {
        let path = self.path.clone();
        let hold_blocks = device.is_cpu() && dtype == DType::F32;
        let mut quantized = HashMap::new();
        let mut held = Vec::new();
        let names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        for name in names {
            let hf = hf_name(&name).ok_or_else(|| bad(&path, format!("unexpected tensor `{name}`")))?;
            let q = self
                .content
                .tensor(&mut self.file, &name, device)
                .map_err(|e| bad(&path, format!("{name}: {}", candle_reason(&e))))?;
            if hold_blocks && q.shape().rank() == 2 {
                if let Some(m) = held_matrix(&q, &path, &name)? {
                    held.push((hf, m));
                    continue;
                }
            }
            quantized.insert(hf, (name, q));
        }
        let names: Vec<String> = quantized.keys().cloned().collect();
        let device = device.clone();
        let store = WeightStore::lazy(
            &self.path,
            dtype,
            names,
            Box::new(move |hf: &str| {
                let (name, q) = quantized
                    .remove(hf)
                    .ok_or_else(|| bad(&path, format!("tensor {hf} read twice")))?;
                q.dequantize(&device)
                    .map_err(|e| bad(&path, format!("{name}: {}", candle_reason(&e))))
            }),
        );
        let mut store = store.with_held(&self.path, held);
        Qwen2::build(config, &mut store, quantize_q8)
    }
}

/// The matrix `q` (of tensor `name`) held as the file stores it, when its
/// type is one the CPU kernels read directly.
fn held_matrix(q: &QTensor, path: &Path, name: &str) -> Result<Option<HeldMatrix>> {
    let dtype = q.dtype();
    let blocks = BlockType::of(dtype);
    if !matches!(dtype, GgmlDType::Q8_0 | GgmlDType::F16) && blocks.is_none() {
        return Ok(None);
    }
    let fault = |reason: String| bad(path, format!("{name}: {reason}"));
    let (rows, cols) = q.shape().dims2().map_err(|e| fault(candle_reason(&e)))?;
    let bytes = q.data().map_err(|e| fault(candle_reason(&e)))?;
    let size = |ty: &str| {
        fault(format!(
            "{} bytes do not make a [{rows}, {cols}] {ty} matrix",
            bytes.len()
        ))
    };
    Ok(Some(match (dtype, blocks) {
        (GgmlDType::Q8_0, _) => {
            HeldMatrix::Q8(Q8Matrix::from_ggml_bytes(rows, cols, &bytes).ok_or_else(|| size("Q8_0"))?)
        }
        (GgmlDType::F16, _) => {
            HeldMatrix::F16(F16Matrix::from_le_bytes(rows, cols, &bytes).ok_or_else(|| size("f16"))?)
        }
        (_, Some(ty)) => {
            HeldMatrix::Blocks(BlockMatrix::from_bytes(ty, rows, cols, &bytes).map_err(|e| fault(e.to_string()))?)
        }
        (_, None) => unreachable!("returned above for other types"),
    }))
}
