//! Perplexity and bits per byte on a corpus, by golden.json's rule: each
//! file's first `window` tokens, the mean NLL over all predicted positions
//! (window − 1 per file); bits per byte = summed NLL / ln 2 / UTF-8 bytes of
//! the decoded predicted tokens.

use std::path::PathBuf;

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use crate::data::corpus::{self, CorpusError};
use crate::model::error::ModelError;
use crate::model::Qwen2;
use crate::tokenizer::{CodeTokenizer, TokenizerError};

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The corpus could not be read.
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    /// Tokenizing failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {}", crate::model::error::candle_reason(.0))]
    Candle(#[from] candle_core::Error),
    /// Two models' vocabularies cannot be compared.
    #[error("{0}")]
    Vocab(String),
    /// The window does not fit the model.
    #[error("--window {window} exceeds the model's context length {context}")]
    Window {
        /// Requested window.
        window: usize,
        /// The model's context length.
        context: usize,
    },
}

/// The result of a perplexity run.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    /// Mean NLL per predicted token (nats).
    pub mean_nll: f64,
    /// exp(mean_nll).
    pub ppl: f64,
    /// Summed NLL in bits per UTF-8 byte of the predicted text.
    pub bits_per_byte: f64,
    /// Predicted tokens.
    pub tokens: usize,
    /// Bytes of the predicted text.
    pub bytes: usize,
    /// Names of the files read, in order.
    pub files: Vec<String>,
}

/// Scores `files` with `model`, each file's first `window` tokens.
pub fn perplexity(
    model: &Qwen2,
    tok: &CodeTokenizer,
    files: &[PathBuf],
    window: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<PerplexityReport, EvalError> {
    if window > model.context_len() {
        return Err(EvalError::Window {
            window,
            context: model.context_len(),
        });
    }
    let (mut nll, mut tokens, mut bytes) = (0.0f64, 0usize, 0usize);
    let mut names = Vec::with_capacity(files.len());
    for (i, path) in files.iter().enumerate() {
        progress(i, files.len());
        names.push(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let mut ids = tok.encode(&corpus::read_text(path)?)?;
        ids.truncate(window);
        if ids.len() < 2 {
            continue;
        }
        let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.logits(&input, None)?.squeeze(0)?;
        let n = ids.len() - 1;
        nll += sum_nll(&logits.narrow(0, 0, n)?, &ids[1..])?;
        tokens += n;
        bytes += tok.decode(&ids[1..], false)?.len();
    }
    progress(files.len(), files.len());
    let mean_nll = if tokens > 0 { nll / tokens as f64 } else { f64::NAN };
    Ok(PerplexityReport {
        mean_nll,
        ppl: mean_nll.exp(),
        bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
        tokens,
        bytes,
        files: names,
    })
}

/// Summed negative log-likelihood (nats) of the next tokens under `logits`
/// (`[t, vocab]`, position i predicting `targets[i]`).
pub fn sum_nll(logits: &Tensor, targets: &[u32]) -> candle_core::Result<f64> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?;
    let v: Vec<f32> = picked.to_vec1()?;
    Ok(-v.iter().map(|&x| x as f64).sum::<f64>())
}
