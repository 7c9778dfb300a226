//! The weights of a Hugging Face model folder (one `model.safetensors`, or
//! shards listed in `model.safetensors.index.json`), or of tensors held in
//! memory, as a store the model builder takes them from
//! (`generate::loaded` opens folders with it).
//! Every tensor is checked against the shape the config implies before the
//! model is built, and every error names the file it comes from.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::error::{candle_reason, ModelError, Result};
use super::linear::{HeldMatrix, Linear};

/// Reads one tensor by name, on demand.
pub type TensorLoader = Box<dyn FnMut(&str) -> Result<Tensor> + Send>;

/// Where a store's tensors come from.
enum Source {
    /// Already in memory.
    Memory(HashMap<String, (Tensor, PathBuf)>),
    /// Read one at a time when taken (memory-mapped files, quantized blocks).
    Lazy {
        files: HashMap<String, PathBuf>,
        load: TensorLoader,
    },
}

/// The weights of a model, tensor by tensor, with the file each came from;
/// each is read (and converted) only when the model builder takes it.
pub struct WeightStore {
    folder: PathBuf,
    dtype: DType,
    source: Source,
    /// Matrices a file holds in a compact form, taken as they are.
    held: HashMap<String, (HeldMatrix, PathBuf)>,
}

impl WeightStore {
    /// Opens every weight file of `folder` (single or sharded safetensors),
    /// memory-mapped: nothing is copied until a tensor is taken.
    pub fn open(folder: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let paths = weight_files(folder)?;
        let mut files = HashMap::new();
        let mut index = HashMap::new();
        let mut mapped = Vec::with_capacity(paths.len());
        for file in &paths {
            // SAFETY: the files are mapped read-only for the duration of the
            // load; like every safetensors reader we assume nobody rewrites
            // them meanwhile.
            let one = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.map_err(|e| {
                ModelError::WeightFile {
                    path: file.clone(),
                    format: "safetensors",
                    reason: candle_reason(&e),
                }
            })?;
            for (name, _) in one.tensors() {
                index.insert(name.clone(), mapped.len());
                files.insert(name, file.clone());
            }
            mapped.push((file.clone(), one));
        }
        let device = device.clone();
        let load: TensorLoader = Box::new(move |name| {
            // `take` asks only for names it listed, so the index has them.
            let (path, file) = &mapped[index[name]];
            file.load(name, &device).map_err(|e| ModelError::WeightFile {
                path: path.clone(),
                format: "safetensors",
                reason: format!("{name}: {}", candle_reason(&e)),
            })
        });
        Ok(Self {
            folder: folder.to_path_buf(),
            dtype,
            source: Source::Lazy { files, load },
            held: HashMap::new(),
        })
    }

    /// A store over tensors already in memory (a model built by pruning).
    pub fn from_tensors(folder: &Path, dtype: DType, tensors: HashMap<String, Tensor>) -> Self {
        let path = folder.join("<memory>");
        Self {
            folder: folder.to_path_buf(),
            dtype,
            source: Source::Memory(tensors.into_iter().map(|(k, t)| (k, (t, path.clone()))).collect()),
            held: HashMap::new(),
        }
    }

    /// A store whose tensors `names` are produced by `load` when taken;
    /// errors name `path`.
    pub fn lazy(path: &Path, dtype: DType, names: impl IntoIterator<Item = String>, load: TensorLoader) -> Self {
        Self {
            folder: path.to_path_buf(),
            dtype,
            source: Source::Lazy {
                files: names.into_iter().map(|n| (n, path.to_path_buf())).collect(),
                load,
            },
            held: HashMap::new(),
        }
    }

    /// Adds matrices held in a compact form (read from `path`), which
    /// [`WeightStore::take_linear`] hands over as they are.
    pub fn with_held(mut self, path: &Path, held: impl IntoIterator<Item = (String, HeldMatrix)>) -> Self {
        self.held
            .extend(held.into_iter().map(|(name, m)| (name, (m, path.to_path_buf()))));
        self
    }

    /// Removes the matrix `name` as a projection without bias: as held when
    /// the file holds it compactly, else its tensor in the compute dtype.
    /// Its shape is checked as [`WeightStore::take`] checks it.
    pub fn take_linear(&mut self, name: &str, expected: &[Option<usize>]) -> Result<Linear> {
        let Some((m, path)) = self.held.remove(name) else {
            return Ok(Linear::new(self.take(name, expected)?, None));
        };
        let (rows, cols) = m.dims();
        check_shape(&path, name, &[rows, cols], expected)?;
        Ok(Linear::from_held(m))
    }

    /// Whether a tensor of that name exists (and was not taken yet).
    pub fn contains(&self, name: &str) -> bool {
        if self.held.contains_key(name) {
            return true;
        }
        match &self.source {
            Source::Memory(t) => t.contains_key(name),
            Source::Lazy { files, .. } => files.contains_key(name),
        }
    }

    fn remove(&mut self, name: &str) -> Result<Option<(Tensor, PathBuf)>> {
        Ok(match &mut self.source {
            Source::Memory(t) => t.remove(name),
            Source::Lazy { files, load } => match files.remove(name) {
                Some(path) => Some((load(name)?, path)),
                None => None,
            },
        })
    }

    /// Removes the tensor `name`, checks its shape (`None` = any size on that
    /// axis) and converts it to the compute dtype.
    pub fn take(&mut self, name: &str, expected: &[Option<usize>]) -> Result<Tensor> {
        let (tensor, path) = self.remove(name)?.ok_or_else(|| ModelError::MissingTensor {
            name: name.to_owned(),
            folder: self.folder.clone(),
        })?;
        check_shape(&path, name, tensor.dims(), expected)?;
        Ok(tensor.to_dtype(self.dtype)?)
    }
}

/// Checks that `dims` are `expected` (`None` = any size on that axis).
fn check_shape(path: &Path, name: &str, dims: &[usize], expected: &[Option<usize>]) -> Result<()> {
    let fits = dims.len() == expected.len() && dims.iter().zip(expected).all(|(d, e)| e.is_none_or(|e| e == *d));
    if !fits {
        let words: Vec<String> = expected
            .iter()
            .map(|e| e.map_or("*".to_owned(), |n| n.to_string()))
            .collect();
        return Err(ModelError::ShapeMismatch {
            path: path.to_path_buf(),
            name: name.to_owned(),
            got: dims.to_vec(),
            expected: format!("[{}]", words.join(", ")),
        });
    }
    Ok(())
}

/// The one dtype every weight of the folder is stored in (read from the
/// safetensors headers alone), or `None` for a GGUF file or mixed dtypes.
pub fn stored_dtype(path: &Path) -> Result<Option<DType>> {
    if !path.is_dir() {
        return Ok(None);
    }
    let mut seen = BTreeSet::new();
    for file in weight_files(path)? {
        let io = |source| ModelError::Io {
            path: file.clone(),
            source,
        };
        let mut f = std::fs::File::open(&file).map_err(io)?;
        let mut len = [0u8; 8];
        std::io::Read::read_exact(&mut f, &mut len).map_err(io)?;
        let mut header = vec![0u8; u64::from_le_bytes(len).min(100 << 20) as usize];
        std::io::Read::read_exact(&mut f, &mut header).map_err(io)?;
        let header: serde_json::Value = serde_json::from_slice(&header).map_err(|source| ModelError::Json {
            path: file.clone(),
            source,
        })?;
        for (name, info) in header.as_object().into_iter().flatten() {
            if name != "__metadata__" {
                seen.insert(info.get("dtype").and_then(|d| d.as_str()).unwrap_or("?").to_owned());
            }
        }
    }
    Ok(match seen.into_iter().collect::<Vec<_>>().as_slice() {
        [one] => match one.as_str() {
            "BF16" => Some(DType::BF16),
            "F16" => Some(DType::F16),
            "F32" => Some(DType::F32),
            _ => None,
        },
        _ => None,
    })
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
