//! Output folders that appear whole or not at all: filled under a temporary
//! name beside the target, then renamed into place; files inside are
//! ordinary shared data (0644), never the writer's private default.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

/// Why an output folder could not be written; names the path.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct OutDirError {
    /// The file or folder concerned.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

impl OutDirError {
    /// An error about `path`.
    pub fn new(path: &Path, e: impl std::fmt::Display) -> Self {
        Self {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// Fills a fresh temporary folder with `fill`, then renames it to `out`
/// (replacing an existing `out`). On error the temporary folder is removed
/// and `out` is untouched.
pub fn write_dir<E: From<OutDirError>>(out: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| OutDirError::new(parent, e))?;
    let name = out
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| OutDirError::new(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| OutDirError::new(&tmp, e))?;
    let result = fill(&tmp).and_then(|()| {
        if out.exists() {
            std::fs::remove_dir_all(out).map_err(|e| OutDirError::new(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| OutDirError::new(out, e))?;
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes `value` as pretty JSON with a final newline.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), OutDirError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| OutDirError::new(path, e))? + "\n";
    std::fs::write(path, text).map_err(|e| OutDirError::new(path, e))
}

/// Writes `tensors` as one safetensors file readable by everyone.
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), OutDirError> {
    candle_core::safetensors::save(tensors, path).map_err(|e| OutDirError::new(path, e))?;
    // The writer creates the file private; a model folder is shared data.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(|e| OutDirError::new(path, e))
}

/// Copies `file` from folder `from` into folder `to`.
pub fn copy_file(from: &Path, to: &Path, file: &str) -> Result<(), OutDirError> {
    std::fs::copy(from.join(file), to.join(file)).map_err(|e| OutDirError::new(&from.join(file), e))?;
    Ok(())
}
