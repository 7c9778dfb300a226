//! Applying a pruning plan: slice the model's tensors (vocabulary rows,
//! kept layers renumbered, FFN neurons), edit the config, and build the
//! pruned model in memory or write it as a Hugging Face folder.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::Serialize;
use serde_json::Value;

use super::PruneError;
pub use crate::model::params::{count_params, ParamCount};
use crate::model::{Qwen2, Qwen2Config, WeightStore};

/// What survives pruning.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PrunePlan {
    /// Kept token ids (ascending), or `None` for the whole vocabulary.
    #[serde(skip)]
    pub vocab: Option<Vec<u32>>,
    /// Kept layers (original indices, ascending).
    pub kept_layers: Vec<usize>,
    /// Kept FFN neurons per kept layer, or `None` to keep all.
    #[serde(skip)]
    pub ffn: Option<Vec<Vec<u32>>>,
}

fn index(ids: &[u32], model: &Qwen2) -> candle_core::Result<Tensor> {
    Tensor::new(ids, model.device())
}

/// The pruned model's tensors under their new names, and its config.
pub fn pruned_tensors(model: &Qwen2, plan: &PrunePlan) -> Result<(Value, HashMap<String, Tensor>), PruneError> {
    let layer_pos: HashMap<usize, usize> = plan
        .kept_layers
        .iter()
        .enumerate()
        .map(|(new, &old)| (old, new))
        .collect();
    let vocab = plan.vocab.as_ref().map(|k| index(k, model)).transpose()?;
    let mut out = HashMap::new();
    for (name, t) in model.named_tensors()? {
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            let t = match &vocab {
                Some(ix) => t.index_select(ix, 0)?,
                None => t,
            };
            out.insert(name, t);
            continue;
        }
        let Some(rest) = name.strip_prefix("model.layers.") else {
            out.insert(name, t);
            continue;
        };
        let (idx, field) = rest.split_once('.').expect("layer tensor names have a field");
        let old: usize = idx.parse().expect("numeric layer index");
        let Some(&new) = layer_pos.get(&old) else { continue };
        let t = match (&plan.ffn, field) {
            (Some(ffn), "mlp.gate_proj.weight" | "mlp.up_proj.weight") => {
                t.index_select(&index(&ffn[new], model)?, 0)?
            }
            (Some(ffn), "mlp.down_proj.weight") => t.index_select(&index(&ffn[new], model)?, 1)?,
            _ => t,
        };
        out.insert(format!("model.layers.{new}.{field}"), t);
    }
    let config = pruned_config(model.config(), plan, model)?;
    Ok((config, out))
}

fn pruned_config(cfg: &Qwen2Config, plan: &PrunePlan, model: &Qwen2) -> Result<Value, PruneError> {
    let mut raw = cfg.raw.clone();
    let new_id = |old: u32| -> Option<u32> {
        match &plan.vocab {
            None => Some(old),
            Some(k) => k.binary_search(&old).ok().map(|i| i as u32),
        }
    };
    let vocab_size = plan.vocab.as_ref().map_or(cfg.vocab_size, Vec::len);
    raw.insert("vocab_size".into(), vocab_size.into());
    raw.insert("num_hidden_layers".into(), plan.kept_layers.len().into());
    let widths: Vec<usize> = match &plan.ffn {
        Some(f) => f.iter().map(Vec::len).collect(),
        None => plan.kept_layers.iter().map(|&i| model.layers[i].mlp.width()).collect(),
    };
    let max_width = widths.iter().copied().max().unwrap_or(0);
    raw.insert("intermediate_size".into(), max_width.into());
    if widths.iter().any(|&w| w != max_width) {
        raw.insert("intermediate_sizes".into(), widths.into());
    } else {
        raw.remove("intermediate_sizes");
    }
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        let remapped = match raw.get(key) {
            Some(Value::Number(n)) => n.as_u64().and_then(|o| new_id(o as u32)).map(Value::from),
            Some(Value::Array(ids)) => Some(Value::Array(
                ids.iter()
                    .filter_map(|v| v.as_u64().and_then(|o| new_id(o as u32)))
                    .map(Value::from)
                    .collect(),
            )),
            _ => continue,
        };
        match remapped {
            Some(v) => raw.insert(key.into(), v),
            None => raw.insert(key.into(), Value::Null),
        };
    }
    Ok(Value::Object(raw))
}

/// Builds the pruned model in memory.
pub fn build(model: &Qwen2, plan: &PrunePlan) -> Result<Qwen2, PruneError> {
    let (config, tensors) = pruned_tensors(model, plan)?;
    let cfg = Qwen2Config::from_json_str(&config.to_string(), Path::new("<pruned config.json>"))?;
    let mut store = WeightStore::from_tensors(Path::new("<pruned>"), model.dtype(), tensors);
    Ok(Qwen2::from_store(cfg, &mut store)?)
}
