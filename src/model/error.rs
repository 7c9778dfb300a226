//! Errors of loading and running a model. Every variant names the file,
//! field or tensor it is about, so one line tells the user what to fix.

use std::path::PathBuf;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model folder does not exist.
    #[error("model folder {0} does not exist")]
    MissingFolder(PathBuf),
    /// A file was given where a model folder (or a `.gguf` file) belongs.
    #[error("{0} is a file, not a model folder (give the folder holding config.json, or a .gguf file)")]
    NotAFolder(PathBuf),
    /// A file the model needs is absent.
    #[error("{path}: file not found ({what})")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// What the file was needed for.
        what: &'static str,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error, with line and column.
        source: serde_json::Error,
    },
    /// A config field is missing, has the wrong type or an unsupported value.
    #[error("{path}: field `{field}`: {reason}")]
    ConfigField {
        /// The config file.
        path: PathBuf,
        /// The field's name.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A weight file (safetensors or GGUF) is malformed or truncated.
    #[error("{path}: not a valid {format} file: {reason}")]
    WeightFile {
        /// The file.
        path: PathBuf,
        /// Its format: `safetensors` or `GGUF`.
        format: &'static str,
        /// The parser's error.
        reason: String,
    },
    /// A tensor the architecture needs is in no weight file.
    #[error("tensor `{name}` not found in the weight files of {folder}")]
    MissingTensor {
        /// The tensor's checkpoint name.
        name: String,
        /// The model folder.
        folder: PathBuf,
    },
    /// A tensor's shape disagrees with the config or with other tensors.
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected}")]
    ShapeMismatch {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor's checkpoint name.
        name: String,
        /// The shape found.
        got: Vec<usize>,
        /// The shape expected, in words (`[384, 384]`, `[*, 384]`).
        expected: String,
    },
    /// The input does not fit the model (too long, out-of-vocabulary ids).
    #[error("{0}")]
    Input(String),
    /// A tensor operation failed (a bug or an exhausted resource, not input).
    #[error("tensor operation failed: {}", candle_reason(.0))]
    Candle(#[from] candle_core::Error),
}

/// A candle error's message without the backtrace candle appends when
/// `RUST_BACKTRACE` is set (the user needs the line, not the frames).
pub fn candle_reason(e: &candle_core::Error) -> String {
    use candle_core::Error;
    match e {
        Error::WithBacktrace { inner, .. } => candle_reason(inner),
        // As candle words these two, with the inner error cleaned.
        Error::WithPath { inner, path } => format!("path: {path:?} {}", candle_reason(inner)),
        Error::Context { inner, context } => format!("{context}\n{}", candle_reason(inner)),
        other => other.to_string(),
    }
}

/// Result alias for the model runtime.
pub type Result<T> = std::result::Result<T, ModelError>;
