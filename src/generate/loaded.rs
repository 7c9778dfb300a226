//! A model with its tokenizer: what every command and the server start
//! from, by one path for Hugging Face folders, GGUF files and synthetic
//! weights. Opening reads the configuration and the tokenizer and checks
//! them against each other; the weights are read afterwards
//! ([`PendingWeights::load`]), so the server can answer `/health` while a
//! large model loads on its engine thread.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::locate::is_gguf;
use crate::model::gguf::GgufFile;
use crate::model::synth::{synth_model, SynthShape};
use crate::model::{ModelError, Qwen2, Qwen2Config, WeightStore};
use crate::tokenizer::gguf::{from_gguf_vocab, GgufVocab};
use crate::tokenizer::{CodeTokenizer, TokenizerError};

/// Why a model could not be opened or loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The weights or config failed to load.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer failed to load.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Tokenizer and model disagree on the vocabulary.
    #[error("{path}: the tokenizer has {tokenizer} tokens but the model's vocabulary (`vocab_size`) has only {model}")]
    VocabMismatch {
        /// tokenizer.json.
        path: PathBuf,
        /// Tokens in the tokenizer.
        tokenizer: usize,
        /// The model's `vocab_size`.
        model: usize,
    },
}

/// Where the weights of an opened model come from.
enum Source {
    /// A Hugging Face folder's safetensors, mapped.
    Folder(WeightStore),
    /// A GGUF file's tensors.
    Gguf(Box<GgufFile>),
    /// Random weights of a real shape.
    Synth(SynthShape, u64),
}

/// The weights of an opened model, not yet read.
pub struct PendingWeights {
    source: Source,
    config: Qwen2Config,
    device: Device,
    dtype: DType,
    quantize_q8: bool,
}

impl std::fmt::Debug for PendingWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.source {
            Source::Folder(_) => "safetensors".to_owned(),
            Source::Gguf(g) => format!("GGUF {}", g.path().display()),
            Source::Synth(shape, seed) => format!("synth {} seed {seed}", shape.name()),
        };
        f.debug_struct("PendingWeights")
            .field("source", &source)
            .field("dtype", &self.dtype)
            .field("quantize_q8", &self.quantize_q8)
            .finish()
    }
}

impl PendingWeights {
    /// Reads the weights onto the device (quantizing each matrix to Q8_0 as
    /// it is read when asked, so the full-precision weights are never all in
    /// memory).
    pub fn load(self) -> Result<Qwen2, LoadError> {
        let Self {
            source,
            config,
            device,
            dtype,
            quantize_q8,
        } = self;
        Ok(match source {
            Source::Folder(mut store) => Qwen2::build(config, &mut store, quantize_q8)?,
            Source::Gguf(file) => file.load(config, &device, dtype, quantize_q8)?,
            Source::Synth(shape, seed) => {
                let mut model = synth_model(shape, &device, dtype, seed)?;
                if quantize_q8 {
                    model.quantize_q8()?;
                }
                model
            }
        })
    }
}

/// A model opened: configuration and tokenizer read and checked, weights pending.
#[derive(Debug)]
pub struct OpenedModel {
    /// The configuration the weights will be built from.
    pub config: Qwen2Config,
    /// The tokenizer.
    pub tokenizer: CodeTokenizer,
    /// The folder or `.gguf` file it came from.
    pub path: PathBuf,
    /// The weights, read by [`PendingWeights::load`].
    pub weights: PendingWeights,
}

impl OpenedModel {
    /// Opens the folder (or `.gguf` file) at `path` to compute on `device` in
    /// `dtype`; with `quantize_q8` the weights become Q8_0 as they are read.
    pub fn open(path: &Path, device: &Device, dtype: DType, quantize_q8: bool) -> Result<Self, LoadError> {
        let (config, tokenizer, source) = if is_gguf(path) {
            let file = GgufFile::open(path)?;
            let config = file.config()?;
            let vocab = GgufVocab {
                model: file.required_string("tokenizer.ggml.model")?,
                tokens: file.strings("tokenizer.ggml.tokens")?,
                merges: file.strings("tokenizer.ggml.merges")?,
                token_types: file.ints("tokenizer.ggml.token_type", 1)?,
                // A `pre` that is not a string is read as absent (GPT-2's split), as before.
                pre: file.string("tokenizer.ggml.pre").ok().flatten(),
            };
            let inner = from_gguf_vocab(vocab, path)?;
            let tokenizer = CodeTokenizer::new(inner, path.to_path_buf(), &config.eos_token_ids);
            (config, tokenizer, Source::Gguf(Box::new(file)))
        } else {
            if path.is_file() {
                return Err(ModelError::NotAFolder(path.to_path_buf()).into());
            }
            if !path.is_dir() {
                return Err(ModelError::MissingFolder(path.to_path_buf()).into());
            }
            let config = Qwen2Config::from_file(&path.join("config.json"))?;
            // Every weight file present and readable before the tokenizer is.
            let store = WeightStore::open(path, device, dtype)?;
            let tokenizer = CodeTokenizer::from_folder(path, &config.eos_token_ids)?;
            (config, tokenizer, Source::Folder(store))
        };
        Self::checked(config, tokenizer, path, source, device, dtype, quantize_q8)
    }

    /// Random weights of `shape` (drawn on `device` from `seed`) with the
    /// tokenizer of the folder `tokenizer_from`.
    pub fn synth(
        shape: SynthShape,
        seed: u64,
        tokenizer_from: &Path,
        device: &Device,
        dtype: DType,
        quantize_q8: bool,
    ) -> Result<Self, LoadError> {
        let config = shape.config(seed)?;
        let tokenizer = CodeTokenizer::from_folder(tokenizer_from, &config.eos_token_ids)?;
        let path = PathBuf::from(format!("<synth {}>", shape.name()));
        let source = Source::Synth(shape, seed);
        Self::checked(config, tokenizer, &path, source, device, dtype, quantize_q8)
    }

    fn checked(
        config: Qwen2Config,
        tokenizer: CodeTokenizer,
        path: &Path,
        source: Source,
        device: &Device,
        dtype: DType,
        quantize_q8: bool,
    ) -> Result<Self, LoadError> {
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(LoadError::VocabMismatch {
                path: tokenizer.path().to_path_buf(),
                tokenizer: tokenizer.vocab_size(),
                model: config.vocab_size,
            });
        }
        let weights = PendingWeights {
            source,
            config: config.clone(),
            device: device.clone(),
            dtype,
            quantize_q8,
        };
        Ok(Self {
            config,
            tokenizer,
            path: path.to_path_buf(),
            weights,
        })
    }

    /// Reads the weights: the model with its tokenizer.
    pub fn load(self) -> Result<LoadedModel, LoadError> {
        Ok(LoadedModel {
            model: self.weights.load()?,
            tokenizer: self.tokenizer,
            folder: self.path,
        })
    }
}

/// The tokenizer of the folder or `.gguf` file at `path` alone (its
/// configuration's end-of-sequence ids included), without opening weights:
/// for clients of a server, such as `bench serve`.
pub fn read_tokenizer(path: &Path) -> Result<CodeTokenizer, LoadError> {
    if is_gguf(path) {
        return Ok(OpenedModel::open(path, &Device::Cpu, DType::F32, false)?.tokenizer);
    }
    let config = Qwen2Config::from_file(&path.join("config.json"))?;
    Ok(CodeTokenizer::from_folder(path, &config.eos_token_ids)?)
}

/// A model, its tokenizer and where they came from.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network.
    pub model: Qwen2,
    /// Its tokenizer.
    pub tokenizer: CodeTokenizer,
    /// The folder (or `.gguf` file) it was loaded from.
    pub folder: PathBuf,
}

impl LoadedModel {
    /// Loads the folder on the CPU in f32 (candle converts bf16 at every CPU
    /// matmul otherwise, which is slower).
    pub fn load_cpu(folder: &Path) -> Result<Self, LoadError> {
        Self::load(folder, &Device::Cpu, DType::F32)
    }

    /// Loads the folder (or a `.gguf` file) on `device`, computing in `dtype`.
    pub fn load(folder: &Path, device: &Device, dtype: DType) -> Result<Self, LoadError> {
        Self::load_with(folder, device, dtype, false)
    }

    /// As [`LoadedModel::load`]; with `quantize_q8` every matrix becomes Q8_0 as
    /// it is read, so the full-precision weights are never all in memory.
    pub fn load_with(folder: &Path, device: &Device, dtype: DType, quantize_q8: bool) -> Result<Self, LoadError> {
        OpenedModel::open(folder, device, dtype, quantize_q8)?.load()
    }

    /// A short name for the model: its folder's name.
    pub fn name(&self) -> String {
        crate::generate::locate::model_name(&self.folder)
    }
}
