//! Calibration (and training) text for pruning and recovery: a folder of
//! source files, a glob, a JSONL file (`text`, or `prompt` + `completion`), or by default python3's
//! standard library files after the held-out evaluation files, so that the
//! two never overlap.

use std::path::{Path, PathBuf};

use super::{corpus, DataError};
use crate::tokenizer::CodeTokenizer;

/// Source file extensions read from a calibration folder.
const CODE_EXTENSIONS: &[&str] = &[
    "py", "pyi", "c", "h", "cc", "cpp", "hpp", "cxx", "rs", "go", "java", "js", "ts", "rb", "sh", "md", "rst", "txt",
];

/// Files larger than this are skipped in folders and globs (generated code, data).
const MAX_FILE_BYTES: u64 = 2 << 20;

/// One calibration document.
#[derive(Debug, Clone)]
pub struct CalibText {
    /// Where it came from (file, or `FILE:LINE` for JSONL).
    pub name: String,
    /// Its text.
    pub text: String,
}

/// Reads the calibration corpus named by `--calib` (default: the stdlib
/// files after the first [`corpus::EVAL_FILES`]).
pub fn load(arg: Option<&str>) -> Result<Vec<CalibText>, DataError> {
    let texts = match arg {
        None | Some("stdlib") => {
            let dir = corpus::stdlib_dir()?;
            read_files(&corpus::calibration_files(&dir)?)?
        }
        Some(a) if a.ends_with(".jsonl") => read_jsonl(Path::new(a))?,
        Some(a) if a.contains(['*', '?', '[']) => {
            let mut files: Vec<PathBuf> = glob::glob(a)
                .map_err(|e| DataError::Unusable(format!("--calib {a}: invalid glob: {e}")))?
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            read_files(&files)?
        }
        Some(a) => {
            let dir = Path::new(a);
            if !dir.exists() {
                return Err(DataError::Unusable(format!("--calib {a}: no such file or folder")));
            }
            if dir.is_file() {
                read_files(&[dir.to_path_buf()])?
            } else {
                let mut files = Vec::new();
                walk(dir, &mut files);
                files.sort();
                read_files(&files)?
            }
        }
    };
    let texts: Vec<CalibText> = texts.into_iter().filter(|t| !t.text.trim().is_empty()).collect();
    if texts.is_empty() {
        return Err(DataError::Unusable(format!(
            "the calibration corpus ({}) holds no text",
            arg.unwrap_or("stdlib")
        )));
    }
    Ok(texts)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            walk(&p, out);
        } else if p
            .extension()
            .is_some_and(|x| CODE_EXTENSIONS.contains(&x.to_string_lossy().as_ref()))
            && e.metadata().is_ok_and(|m| m.len() <= MAX_FILE_BYTES)
        {
            out.push(p);
        }
    }
}

fn read_files(files: &[PathBuf]) -> Result<Vec<CalibText>, DataError> {
    files
        .iter()
        .map(|f| {
            Ok(CalibText {
                name: f.display().to_string(),
                text: corpus::read_text(f)?,
            })
        })
        .collect()
}

fn read_jsonl(path: &Path) -> Result<Vec<CalibText>, DataError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| DataError::Unusable(format!("--calib {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| DataError::Unusable(format!("{where_}: invalid JSON: {e}")))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str());
        let text = match (field("text"), field("prompt"), field("completion")) {
            (Some(t), _, _) => t.to_owned(),
            (None, Some(p), Some(c)) => format!("{p}{c}"),
            _ => {
                return Err(DataError::Unusable(format!(
                    "{where_}: expected a `text` field, or `prompt` and `completion`"
                )))
            }
        };
        out.push(CalibText { name: where_, text });
    }
    Ok(out)
}

/// Token windows cut from the corpus: `samples` for calibration and a
/// separate `validation` set, evenly spread over the whole token stream.
#[derive(Debug, Clone)]
pub struct Windows {
    /// Calibration windows, `len` tokens each.
    pub calib: Vec<Vec<u32>>,
    /// Validation windows (for choosing a plan), disjoint from `calib`.
    pub validation: Vec<Vec<u32>>,
}

/// Tokenizes the corpus (documents joined by the first EOS id) and cuts windows.
pub fn windows(
    tok: &CodeTokenizer,
    texts: &[CalibText],
    samples: usize,
    validation: usize,
    len: usize,
) -> Result<Windows, DataError> {
    let sep = tok.eos_ids().first().copied();
    let mut stream = Vec::new();
    for t in texts {
        stream.extend(tok.encode(&t.text)?);
        stream.extend(sep);
    }
    let want = samples + validation;
    let available = stream.len() / len;
    if available < 2 || available < validation + 1 {
        return Err(DataError::Unusable(format!(
            "the calibration corpus has {} tokens: too few for windows of {len} tokens",
            stream.len()
        )));
    }
    let n = want.min(available);
    let stride = available as f64 / n as f64;
    let all: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            let start = (i as f64 * stride) as usize * len;
            stream[start..start + len].to_vec()
        })
        .collect();
    // Every k-th window goes to validation, spread over the corpus.
    let n_val = validation.min(n - 1);
    let step = n.checked_div(n_val).unwrap_or(usize::MAX);
    let mut calib = Vec::new();
    let mut val = Vec::new();
    for (i, w) in all.into_iter().enumerate() {
        if n_val > 0 && i % step == step - 1 && val.len() < n_val {
            val.push(w);
        } else {
            calib.push(w);
        }
    }
    Ok(Windows { calib, validation: val })
}
