//! Loading a GGUF file (llama.cpp's `qwen2` layout, as `greencode quantize`
//! or llama.cpp's converter write it): the configuration from its metadata,
//! the weights dequantized to f32 (and re-quantized to the very same Q8_0
//! blocks when the file is Q8_0, so decoding reads Q8_0), and the tokenizer
//! rebuilt from `tokenizer.ggml.*`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use serde_json::json;

use super::config::Qwen2Config;
use super::error::{candle_reason, ModelError, Result};
use super::gguf_names::hf_name;
use super::load::WeightStore;
use super::qwen2::Qwen2;

/// A model read from GGUF, with the tokenizer its metadata describes.
pub struct GgufModel {
    /// The network (f32; Q8_0 decode weights when the file is Q8_0).
    pub model: Qwen2,
    /// The tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
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

/// Reads the GGUF file at `path`. A file whose matrices are all Q8_0, or any
/// file with `quantize_q8`, gives a Q8_0 model; each matrix is dequantized
/// only while it is being turned into the model's own blocks.
pub fn load_gguf(path: &Path, device: &Device, dtype: DType, quantize_q8: bool) -> Result<GgufModel> {
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
    let tokens = meta_strings(&content, path, "tokenizer.ggml.tokens")?;
    let ffn = match meta(&content, path, "qwen2.feed_forward_length")? {
        Value::Array(v) => v.first().and_then(|x| x.to_u32().ok()).unwrap_or(0) as u64,
        _ => meta_u64(&content, path, "qwen2.feed_forward_length")?,
    };
    let f32_meta = |key: &str| -> Result<f64> {
        meta(&content, path, key)?
            .to_f32()
            .map(f64::from)
            .map_err(|e| bad(path, format!("`{key}`: {}", candle_reason(&e))))
    };
    let eos = meta_u64(&content, path, "tokenizer.ggml.eos_token_id").unwrap_or(0);
    let config = json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": tokens.len(),
        "hidden_size": meta_u64(&content, path, "qwen2.embedding_length")?,
        "intermediate_size": ffn,
        "num_hidden_layers": meta_u64(&content, path, "qwen2.block_count")?,
        "num_attention_heads": meta_u64(&content, path, "qwen2.attention.head_count")?,
        "num_key_value_heads": meta_u64(&content, path, "qwen2.attention.head_count_kv")?,
        "max_position_embeddings": meta_u64(&content, path, "qwen2.context_length")?,
        "rope_theta": f32_meta("qwen2.rope.freq_base")?,
        "rms_norm_eps": f32_meta("qwen2.attention.layer_norm_rms_epsilon")?,
        "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
        "eos_token_id": eos,
    });
    let config = Qwen2Config::from_json_str(&config.to_string(), path)?;
    let mut quantized = HashMap::new();
    let mut all_q8 = true;
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let hf = hf_name(&name).ok_or_else(|| bad(path, format!("unexpected tensor `{name}`")))?;
        let q = content
            .tensor(&mut file, &name, device)
            .map_err(|e| bad(path, format!("{name}: {}", candle_reason(&e))))?;
        if q.shape().rank() == 2 && q.dtype() != GgmlDType::Q8_0 {
            all_q8 = false;
        }
        quantized.insert(hf, (name, q));
    }
    let names: Vec<String> = quantized.keys().cloned().collect();
    let (file_path, device) = (path.to_path_buf(), device.clone());
    let mut store = WeightStore::lazy(
        path,
        dtype,
        names,
        Box::new(move |hf: &str| {
            let (name, q) = quantized
                .remove(hf)
                .ok_or_else(|| bad(&file_path, format!("tensor {hf} read twice")))?;
            q.dequantize(&device)
                .map_err(|e| bad(&file_path, format!("{name}: {}", candle_reason(&e))))
        }),
    );
    // ggml's Q8_0 of Q8_0 values is the identity: a Q8_0 file's blocks are kept as they are.
    let model = Qwen2::build(config, &mut store, all_q8 || quantize_q8)?;
    let tokenizer = tokenizer_from_meta(&content, path, &tokens)?;
    Ok(GgufModel { model, tokenizer })
}

/// Rebuilds a byte-level BPE tokenizer from `tokenizer.ggml.*`.
fn tokenizer_from_meta(c: &Content, path: &Path, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let model = meta(c, path, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| bad(path, candle_reason(&e)))?;
    if model != "gpt2" {
        return Err(bad(
            path,
            format!("tokenizer.ggml.model is `{model}`; only gpt2 (byte-level BPE) is supported"),
        ));
    }
    let merges = meta_strings(c, path, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = meta(c, path, "tokenizer.ggml.token_type")?
        .to_vec()
        .map_err(|e| bad(path, candle_reason(&e)))?
        .iter()
        .map(|v| v.to_i32().unwrap_or(1))
        .collect();
    let pre = c
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "gpt-2".into());
    let pre_tokenizer = match pre.as_str() {
        "gpt-2" | "default" => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": crate::tokenizer::QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]}),
        other => {
            return Err(bad(
                path,
                format!("tokenizer.ggml.pre `{other}` is not supported (gpt-2, qwen2)"),
            ))
        }
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        match types.get(id).copied().unwrap_or(1) {
            3 | 4 => added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": types[id] == 3
            })),
            5 if token.starts_with("[PAD") => continue,
            _ => {}
        }
        vocab.insert(token.clone(), json!(id));
    }
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    spec.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| bad(path, format!("tokenizer metadata: {e}")))
}
