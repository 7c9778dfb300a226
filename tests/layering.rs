//! The dependency directions of ARCHITECTURE.md, checked on the sources:
//! every `crate::` path in a part's files (inline paths included) must name
//! a part that part may use.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The `.rs` files of `part` (a folder or one file under `src/`).
fn files(part: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(part);
    if root.is_file() {
        return vec![root];
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    assert!(!out.is_empty(), "no sources under src/{part}");
    out
}

/// The top-level modules `crate::X` that the part's code names.
fn uses(part: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in files(part) {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, _) in text.match_indices("crate::") {
            let before = text[..i].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `greencode_crate::` and the like
            }
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            assert!(!name.is_empty(), "{}: a grouped `crate::{{…}}` import", file.display());
            out.insert(name);
        }
    }
    out
}

#[test]
fn each_part_uses_only_the_parts_below_it() {
    // What the offline stages (prune, recover) may use besides themselves.
    const STAGE: &[&str] = &[
        "eval",
        "output",
        "generate",
        "data",
        "model",
        "tokenizer",
        "energy",
        "metrics",
    ];
    let rules: [(&str, &[&str]); 15] = [
        ("cpu", &[]),
        ("cuda", &[]),
        ("metrics.rs", &[]),
        ("tokenizer", &[]),
        ("model", &["cpu", "cuda"]),
        ("energy", &["model"]),
        ("data", &["tokenizer"]),
        ("generate", &["model", "tokenizer"]),
        ("output", &["generate", "model", "tokenizer", "cpu"]),
        ("eval", &["generate", "data", "model", "tokenizer"]),
        ("prune", STAGE),
        ("recover", STAGE),
        (
            "serve",
            &["eval", "generate", "data", "model", "tokenizer", "energy", "metrics"],
        ),
        (
            "compare",
            &[
                "eval",
                "output",
                "generate",
                "data",
                "model",
                "tokenizer",
                "energy",
                "cpu",
            ],
        ),
        (
            "bench",
            &[
                "serve",
                "generate",
                "data",
                "model",
                "tokenizer",
                "energy",
                "metrics",
                "cpu",
                "cuda",
            ],
        ),
    ];
    let mut broken = Vec::new();
    for (part, allowed) in rules {
        // A part may always name itself (`crate::model::…` inside `model`).
        let own = part.trim_end_matches(".rs");
        for used in uses(part) {
            if used != own && !allowed.contains(&used.as_str()) {
                broken.push(format!("src/{part} uses crate::{used}"));
            }
        }
    }
    assert!(broken.is_empty(), "against ARCHITECTURE.md: {broken:?}");
}

#[test]
fn energy_reads_only_the_models_shapes() {
    for file in files("energy") {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, _) in text.match_indices("crate::model::") {
            let rest = &text[i + "crate::model::".len()..];
            assert!(
                rest.starts_with("params::"),
                "{}: crate::model::{}",
                file.display(),
                &rest[..20.min(rest.len())]
            );
        }
    }
}
