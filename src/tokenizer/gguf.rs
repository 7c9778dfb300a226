//! A tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata
//! (llama.cpp's form of a byte-level BPE vocabulary: tokens, merges, token
//! types and the pre-tokenizer's name), as a `tokenizer.json` would describe it.

use std::path::Path;

use serde_json::json;

use super::{TokenizerError, QWEN2_SPLIT};

/// The `tokenizer.ggml.*` values of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model` (only `gpt2`, byte-level BPE, is supported).
    pub model: String,
    /// `tokenizer.ggml.tokens`, by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges`.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type`, by id (1 normal, 3 control, 4 user-defined, 5 unused).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.pre` (`gpt-2` when absent).
    pub pre: Option<String>,
}

/// Rebuilds the tokenizer `v` describes; errors name the GGUF file `path`.
pub fn from_gguf_vocab(v: GgufVocab, path: &Path) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let invalid = |reason: String| TokenizerError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    if v.model != "gpt2" {
        return Err(invalid(format!(
            "tokenizer.ggml.model is `{}`; only gpt2 (byte-level BPE) is supported",
            v.model
        )));
    }
    let pre = v.pre.clone().unwrap_or_else(|| "gpt-2".into());
    let pre_tokenizer = match pre.as_str() {
        "gpt-2" | "default" => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]}),
        other => {
            return Err(invalid(format!(
                "tokenizer.ggml.pre `{other}` is not supported (gpt-2, qwen2)"
            )))
        }
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, token) in v.tokens.iter().enumerate() {
        match v.token_types.get(id).copied().unwrap_or(1) {
            3 | 4 => added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": v.token_types[id] == 3
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
                  "vocab": vocab, "merges": v.merges},
    });
    spec.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| invalid(format!("tokenizer metadata: {e}")))
}
