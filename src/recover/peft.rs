//! The adapter in PEFT's on-disk layout: `adapter_config.json` with
//! `LoraConfig`'s keys and `adapter_model.safetensors` with PEFT's tensor
//! names (`base_model.model.<module>.lora_A.weight`, `[r, in]`; `lora_B`,
//! `[out, r]`), so `PeftModel.from_pretrained` loads it onto the student.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::model::lora::{LoraConfig, SharedAdapter};
use crate::output::out_dir::{self, OutDirError};

/// The adapter's configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's name of the `A` (`"A"`) or `B` (`"B"`) matrix of `module`
/// (a path such as `model.layers.0.self_attn.q_proj`).
pub fn tensor_name(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// `adapter_config.json` for adapters of `cfg` on the model at `base`.
pub fn adapter_config(base: &str, cfg: &LoraConfig) -> Value {
    let alpha = if cfg.alpha.fract() == 0.0 && cfg.alpha.abs() < 1e15 {
        json!(cfg.alpha as i64)
    } else {
        json!(cfg.alpha)
    };
    let mut modules: Vec<&str> = cfg.targets.iter().map(|t| t.module()).collect();
    modules.sort_unstable();
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": cfg.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": modules,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false,
    })
}

/// Writes the two adapter files into `dir` (f32 weights).
pub fn write(
    dir: &Path,
    base: &str,
    cfg: &LoraConfig,
    adapters: &[(String, SharedAdapter)],
) -> Result<(), OutDirError> {
    let path = dir.join(WEIGHTS_FILE);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (module, a) in adapters {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).map_err(|e| OutDirError::new(&path, e));
        tensors.insert(tensor_name(module, "A"), f32(a.a.as_tensor())?);
        tensors.insert(tensor_name(module, "B"), f32(a.b.as_tensor())?);
    }
    out_dir::write_safetensors(&path, &tensors)?;
    out_dir::write_json(&dir.join(CONFIG_FILE), &adapter_config(base, cfg))
}
