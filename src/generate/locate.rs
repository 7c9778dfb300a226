//! Which model folder a subcommand uses: `--model`, else `GREENCODE_MODEL`,
//! else the embedded `models/tiny-coder` found beside the installed binary
//! (`<prefix>/models`, `<prefix>/share/greencode/models`) or in the source
//! tree the binary was built from.

use std::path::{Path, PathBuf};

/// Environment variable naming the default model folder.
pub const MODEL_ENV: &str = "GREENCODE_MODEL";

/// Folder name of the embedded default model.
pub const DEFAULT_MODEL: &str = "tiny-coder";

/// Resolves the model folder; `None` when nothing was given and the
/// embedded model cannot be found.
pub fn model_dir(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(MODEL_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    default_candidates()
        .into_iter()
        .find(|p| p.join("config.json").is_file())
}

/// Where the embedded model is looked for, in order.
pub fn default_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        let exe = exe.canonicalize().unwrap_or(exe);
        for dir in exe.ancestors().skip(1).take(3) {
            out.push(dir.join("models").join(DEFAULT_MODEL));
            out.push(dir.join("share/greencode/models").join(DEFAULT_MODEL));
        }
    }
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(DEFAULT_MODEL));
    out
}

/// Whether `path` names a GGUF file rather than a model folder.
pub fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e == "gguf")
}

/// A model's short name: its folder's name (after resolving `.` and links).
pub fn model_name(dir: &Path) -> String {
    let path = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    // A GGUF file is named without its extension (`tiny-coder-q8_0.gguf` → `tiny-coder-q8_0`).
    let name = if is_gguf(&path) {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
}
