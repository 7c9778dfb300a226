//! A loaded model with its tokenizer: what every subcommand starts from.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::model::{load_model_with, ModelError, Qwen2};
use crate::tokenizer::{CodeTokenizer, TokenizerError};

/// Why a model folder could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The weights or config failed to load.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer failed to load.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Tokenizer and model disagree on the vocabulary.
    #[error("{path}: the tokenizer has {tokenizer} tokens but the model's embedding has only {model} rows")]
    VocabMismatch {
        /// tokenizer.json.
        path: PathBuf,
        /// Tokens in the tokenizer.
        tokenizer: usize,
        /// Rows of the embedding.
        model: usize,
    },
}

/// A model, its tokenizer and where they came from.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network.
    pub model: Qwen2,
    /// Its tokenizer.
    pub tokenizer: CodeTokenizer,
    /// The folder it was loaded from.
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
        if folder.extension().is_some_and(|e| e == "gguf") && folder.is_file() {
            let g = crate::model::gguf_load::load_gguf(folder, device, dtype, quantize_q8)?;
            let tokenizer = CodeTokenizer::new(g.tokenizer, folder.to_path_buf(), &g.model.config().eos_token_ids);
            return Ok(Self {
                model: g.model,
                tokenizer,
                folder: folder.to_path_buf(),
            });
        }
        let model = load_model_with(folder, device, dtype, quantize_q8)?;
        let tokenizer = CodeTokenizer::from_folder(folder, &model.config().eos_token_ids)?;
        if tokenizer.vocab_size() > model.vocab_size() {
            return Err(LoadError::VocabMismatch {
                path: tokenizer.path().to_path_buf(),
                tokenizer: tokenizer.vocab_size(),
                model: model.vocab_size(),
            });
        }
        Ok(Self {
            model,
            tokenizer,
            folder: folder.to_path_buf(),
        })
    }

    /// A short name for the model: its folder's name.
    pub fn name(&self) -> String {
        crate::generate::locate::model_name(&self.folder)
    }
}
