//! The code corpora that pruning, recovery and evaluation share: the
//! held-out evaluation files (python3's standard library, never in
//! tiny-coder's training data: `corpus`) and the calibration or training
//! text read from folders, globs or JSONL (`calib`), so the two never
//! overlap and every stage reads them by the same rules.

pub mod calib;
pub mod corpus;

pub use calib::{CalibText, Windows};
pub use corpus::CorpusError;

/// Why calibration or training text could not be read or cut into windows.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A corpus folder could not be read.
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    /// Tokenizing the text failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// The data is missing or unusable; the message names the file or flag.
    #[error("{0}")]
    Unusable(String),
}
