//! Loading a Hugging Face model folder: `config.json` plus either one
//! `model.safetensors` or shards listed in `model.safetensors.index.json`.
//! Every tensor is checked against the shape the config implies before the
//! model is built, and every error names the file it comes from.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::config::Qwen2Config;
use super::error::{ModelError, Result};
use super::qwen2::Qwen2;

/// Loads the model in `folder` onto `device`, computing in `dtype`.
pub fn load_model(folder: &Path, device: &Device, dtype: DType) -> Result<Qwen2> {
    if !folder.is_dir() {
        return Err(ModelError::MissingFolder(folder.to_path_buf()));
    }
    let config = Qwen2Config::from_file(&folder.join("config.json"))?;
    let mut store = WeightStore::open(folder, device, dtype)?;
    Qwen2::from_store(config, &mut store)
}

/// The weight files of a folder, tensor by tensor, with the file each came from.
pub struct WeightStore {
    folder: PathBuf,
    dtype: DType,
    tensors: HashMap<String, (Tensor, PathBuf)>,
}

impl WeightStore {
    /// Reads every weight file of `folder` (single or sharded safetensors).
    pub fn open(folder: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in weight_files(folder)? {
            let loaded = candle_core::safetensors::load(&file, device).map_err(|e| ModelError::Safetensors {
                path: file.clone(),
                reason: e.to_string(),
            })?;
            for (name, tensor) in loaded {
                tensors.insert(name, (tensor, file.clone()));
            }
        }
        Ok(Self {
            folder: folder.to_path_buf(),
            dtype,
            tensors,
        })
    }

    /// A store over tensors already in memory (a model built by pruning).
    pub fn from_tensors(folder: &Path, dtype: DType, tensors: HashMap<String, Tensor>) -> Self {
        let path = folder.join("<memory>");
        Self {
            folder: folder.to_path_buf(),
            dtype,
            tensors: tensors.into_iter().map(|(k, t)| (k, (t, path.clone()))).collect(),
        }
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes the tensor `name`, checks its shape (`None` = any size on that
    /// axis) and converts it to the compute dtype.
    pub fn take(&mut self, name: &str, expected: &[Option<usize>]) -> Result<Tensor> {
        let (tensor, path) = self.tensors.remove(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_owned(),
            folder: self.folder.clone(),
        })?;
        let dims = tensor.dims();
        let fits = dims.len() == expected.len() && dims.iter().zip(expected).all(|(d, e)| e.is_none_or(|e| e == *d));
        if !fits {
            let words: Vec<String> = expected
                .iter()
                .map(|e| e.map_or("*".to_owned(), |n| n.to_string()))
                .collect();
            return Err(ModelError::ShapeMismatch {
                path,
                name: name.to_owned(),
                got: dims.to_vec(),
                expected: format!("[{}]", words.join(", ")),
            });
        }
        Ok(tensor.to_dtype(self.dtype)?)
    }
}

/// The safetensors files of a folder: the shards named by the index, else
/// `model.safetensors`.
pub fn weight_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let index = folder.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
            path: index.clone(),
            source,
        })?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.clone(),
            source,
        })?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::ConfigField {
                path: index.clone(),
                field: "weight_map".into(),
                reason: "missing or not an object".into(),
            })?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| ModelError::ConfigField {
                path: index.clone(),
                field: format!("weight_map.{tensor}"),
                reason: "expected a file name".into(),
            })?;
            files.insert(file.to_owned());
        }
        files
            .into_iter()
            .map(|f| {
                let path = folder.join(&f);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(ModelError::MissingFile {
                        path,
                        what: "a weight shard named by model.safetensors.index.json",
                    })
                }
            })
            .collect()
    } else {
        let single = folder.join("model.safetensors");
        if single.is_file() {
            Ok(vec![single])
        } else {
            Err(ModelError::MissingFile {
                path: single,
                what: "the weights (no model.safetensors.index.json either)",
            })
        }
    }
}
