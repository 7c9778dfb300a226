//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The embedded tiny-coder folder.
pub fn tiny_coder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-coder")
}

/// golden.json of tiny-coder.
pub fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(tiny_coder().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A temporary copy of tiny-coder: weight files are symlinked, small files copied,
/// so a test can break one file without touching the original.
pub fn model_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_coder()).unwrap() {
        let path = entry.unwrap().path();
        let dest = dir.path().join(path.file_name().unwrap());
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::os::unix::fs::symlink(&path, &dest).unwrap();
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
    dir
}

/// Runs the greencode binary with `args`.
pub fn greencode(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_greencode"))
        .args(args)
        .env_remove("GREENCODE_MODEL")
        .output()
        .expect("the greencode binary runs")
}

/// Asserts a run failed cleanly: non-zero exit, one `error:` line on stderr
/// containing every `needle`, no panic.
pub fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks {n:?}: {stderr}");
    }
}
