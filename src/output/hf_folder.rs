//! The files of a Hugging Face model folder written from a model greencode
//! changed (pruned, or with LoRA adapters merged): `config.json`, one
//! `model.safetensors` in the source checkpoint's dtype, `tokenizer.json`
//! (the source's, or a rewritten one), and the tokenizer's side files and
//! `generation_config.json` carried over from the source folder.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::Value;

use super::out_dir::{self, OutDirError};

/// A model folder's contents, ready to write.
pub struct ModelFiles<'a> {
    /// The folder the model came from (tokenizer and side files).
    pub source: &'a Path,
    /// `config.json` as written.
    pub config: &'a Value,
    /// Every weight under its checkpoint name.
    pub tensors: HashMap<String, Tensor>,
    /// The dtype the weights are stored in (the source's `torch_dtype`).
    pub dtype: DType,
    /// A rewritten `tokenizer.json` (vocabulary pruning); else the source's is copied.
    pub tokenizer: Option<&'a Value>,
}

/// Why the weights could not be converted to their storage dtype.
fn convert_error(dest: &Path, e: candle_core::Error) -> OutDirError {
    OutDirError::new(&dest.join("model.safetensors"), crate::model::error::candle_reason(&e))
}

/// Writes `files` into the folder `dest` (normally the temporary folder
/// of [`out_dir::write_dir`]).
pub fn write_model_files(dest: &Path, files: ModelFiles<'_>) -> Result<(), OutDirError> {
    let tensors: HashMap<String, Tensor> = files
        .tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(files.dtype)?)))
        .collect::<Result<_, candle_core::Error>>()
        .map_err(|e| convert_error(dest, e))?;
    out_dir::write_json(&dest.join("config.json"), files.config)?;
    out_dir::write_safetensors(&dest.join("model.safetensors"), &tensors)?;
    match files.tokenizer {
        Some(json) => out_dir::write_json(&dest.join("tokenizer.json"), json)?,
        None => out_dir::copy_file(files.source, dest, "tokenizer.json")?,
    }
    copy_side_files(files.source, dest, files.config)
}

/// Copies the tokenizer's side files and `generation_config.json` (with the
/// special token ids of `config`) from `model_dir` into `dest`.
fn copy_side_files(model_dir: &Path, dest: &Path, config: &Value) -> Result<(), OutDirError> {
    for extra in ["tokenizer_config.json", "special_tokens_map.json"] {
        if model_dir.join(extra).is_file() {
            out_dir::copy_file(model_dir, dest, extra)?;
        }
    }
    let gen_path = model_dir.join("generation_config.json");
    if let Ok(text) = std::fs::read_to_string(&gen_path) {
        if let Ok(mut g) = serde_json::from_str::<Value>(&text) {
            for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                if let Some(v) = config.get(key) {
                    if g.get(key).is_some() {
                        g[key] = v.clone();
                    }
                }
            }
            out_dir::write_json(&dest.join("generation_config.json"), &g)?;
        }
    }
    Ok(())
}
