//! Training checkpoints beside the output folder (`OUT.checkpoint/`): the
//! adapters, the optimiser moments and the step, written whole or not at
//! all, so `--resume` continues exactly where a run stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::Param;
use crate::output::out_dir::{self, OutDirError};

/// Training progress saved in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Everything that fixes the run's trajectory; a resumed run must match it.
    pub spec: serde_json::Value,
    /// Steps completed.
    pub step: usize,
    /// Steps the run will take.
    pub total_steps: usize,
    /// Training seconds so far.
    pub train_seconds: f64,
    /// Loss log so far.
    pub history: Vec<LogPoint>,
}

/// One logged step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogPoint {
    /// 1-based step.
    pub step: usize,
    /// Training loss of the step's batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// The checkpoint folder for the output folder `out`.
pub fn dir_for(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map_or_else(|| "recover".into(), |n| n.to_string_lossy().into_owned());
    out.with_file_name(format!("{name}.checkpoint"))
}

const STATE: &str = "state.json";
const TENSORS: &str = "train_state.safetensors";

/// Writes `state` and every parameter (value and moments) to `dir`.
pub fn save(dir: &Path, state: &TrainState, params: &[(String, &Param)]) -> Result<(), OutDirError> {
    out_dir::write_dir(dir, |tmp| -> Result<(), OutDirError> {
        let mut tensors = HashMap::new();
        for (name, p) in params {
            tensors.insert(name.clone(), p.var.as_tensor().clone());
            tensors.insert(format!("{name}.m"), p.m.clone());
            tensors.insert(format!("{name}.v"), p.v.clone());
        }
        out_dir::write_safetensors(&tmp.join(TENSORS), &tensors)?;
        out_dir::write_json(&tmp.join(STATE), state)
    })
}

/// Reads a checkpoint: the state and the tensors by name.
pub fn load(dir: &Path) -> Result<(TrainState, HashMap<String, Tensor>), OutDirError> {
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| OutDirError::new(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| OutDirError::new(&state_path, e))?;
    let tensors_path = dir.join(TENSORS);
    let tensors =
        candle_core::safetensors::load(&tensors_path, &Device::Cpu).map_err(|e| OutDirError::new(&tensors_path, e))?;
    Ok((state, tensors))
}

/// Restores `params` from checkpoint tensors; names every missing or
/// mis-shaped tensor.
pub fn restore(
    tensors: &HashMap<String, Tensor>,
    params: &mut [(String, &mut Param)],
    dir: &Path,
) -> Result<(), OutDirError> {
    for (name, p) in params.iter_mut() {
        let get = |key: &str| -> Result<&Tensor, OutDirError> {
            let t = tensors
                .get(key)
                .ok_or_else(|| OutDirError::new(dir, format!("checkpoint lacks tensor {key}")))?;
            if t.dims() != p.var.as_tensor().dims() {
                return Err(OutDirError::new(
                    dir,
                    format!(
                        "checkpoint tensor {key} has shape {:?}, the run needs {:?}",
                        t.dims(),
                        p.var.dims()
                    ),
                ));
            }
            Ok(t)
        };
        let value = get(name)?.clone();
        let m = get(&format!("{name}.m"))?.clone();
        let v = get(&format!("{name}.v"))?.clone();
        p.var.set(&value).map_err(|e| OutDirError::new(dir, e))?;
        p.m = m;
        p.v = v;
    }
    Ok(())
}
