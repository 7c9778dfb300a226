//! The held-out corpus: python3's standard library (never in tiny-coder's
//! training data). Its first files in byte order are the evaluation set;
//! pruning calibrates on the files after them, so the two never overlap.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a corpus could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// python3 could not be run to find the standard library.
    #[error("cannot locate python3's standard library (`python3` failed: {0}); pass --corpus DIR instead")]
    NoPython(String),
    /// The folder does not exist.
    #[error("corpus folder {0} does not exist")]
    Missing(PathBuf),
    /// The folder holds no `*.py` file at its top level.
    #[error("corpus folder {0} holds no *.py file at its top level")]
    Empty(PathBuf),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Number of leading stdlib files that form the held-out evaluation set.
pub const EVAL_FILES: usize = 40;

/// The folder of python3's standard library.
pub fn stdlib_dir() -> Result<PathBuf, CorpusError> {
    let out = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .output()
        .map_err(|e| CorpusError::NoPython(e.to_string()))?;
    if !out.status.success() {
        return Err(CorpusError::NoPython(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Resolves a `--corpus` argument: `stdlib` or a folder.
pub fn resolve(arg: &str) -> Result<PathBuf, CorpusError> {
    if arg == "stdlib" {
        stdlib_dir()
    } else {
        Ok(PathBuf::from(arg))
    }
}

/// Every `*.py` file directly in `dir`, sorted by the bytes of its name.
pub fn python_files(dir: &Path) -> Result<Vec<PathBuf>, CorpusError> {
    if !dir.is_dir() {
        return Err(CorpusError::Missing(dir.to_path_buf()));
    }
    let entries = std::fs::read_dir(dir).map_err(|source| CorpusError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "py"))
        .collect();
    files.sort_by(|a, b| {
        let name = |p: &PathBuf| p.file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_default();
        name(a).cmp(&name(b))
    });
    if files.is_empty() {
        return Err(CorpusError::Empty(dir.to_path_buf()));
    }
    Ok(files)
}

/// The evaluation files: the first `n` of [`python_files`].
pub fn eval_files(dir: &Path, n: usize) -> Result<Vec<PathBuf>, CorpusError> {
    let mut files = python_files(dir)?;
    files.truncate(n);
    Ok(files)
}

/// The calibration files: everything after the first [`EVAL_FILES`].
pub fn calibration_files(dir: &Path) -> Result<Vec<PathBuf>, CorpusError> {
    let files = python_files(dir)?;
    Ok(files.into_iter().skip(EVAL_FILES).collect())
}

/// Reads a file as text (invalid UTF-8 replaced, as a lenient reader would).
pub fn read_text(path: &Path) -> Result<String, CorpusError> {
    let bytes = std::fs::read(path).map_err(|source| CorpusError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
