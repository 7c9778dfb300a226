//! Single-line infilling on held-out code: in every function of the eval
//! files one body line is masked; the model sees the code before it and
//! after it in its fill-in-the-middle format and writes the line. Scored by
//! exact match (whitespace-trimmed) and edit similarity. The set depends only
//! on the files' text, so it is the same on every run (its hash is reported).

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::complete::complete_greedy;
use super::perplexity::EvalError;
use crate::data::corpus;
use crate::generate::loaded::LoadedModel;
use crate::tokenizer::TokenizerError;

/// Bytes of code kept before the masked line (cut at a line start).
pub const PREFIX_BYTES: usize = 1500;
/// Bytes of code kept after the masked line (cut at a line end).
pub const SUFFIX_BYTES: usize = 500;
/// Most tokens generated for one line.
pub const MAX_LINE_TOKENS: usize = 48;
/// Shortest masked line (non-blank characters), so trivial lines are not asked.
const MIN_LINE_CHARS: usize = 8;

/// One masked line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InfillItem {
    /// File name (in the corpus folder).
    pub file: String,
    /// 1-based line number of the masked line.
    pub line: usize,
    /// Code before the masked line (ends with a newline).
    pub prefix: String,
    /// The masked line, without its newline.
    pub middle: String,
    /// Code after the masked line (starts with its newline).
    pub suffix: String,
}

/// One scored item (a line of `--out`).
#[derive(Debug, Clone, Serialize)]
pub struct InfillResult {
    /// File name.
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// The masked line.
    pub expected: String,
    /// What the model wrote.
    pub generated: String,
    /// Equal after trimming whitespace.
    pub exact: bool,
    /// 1 − Levenshtein distance / longer length, on characters.
    pub similarity: f64,
}

/// The summary of a run.
#[derive(Debug, Clone, Serialize)]
pub struct InfillReport {
    /// Items scored.
    pub items: usize,
    /// Fraction exactly matched.
    pub exact_match: f64,
    /// Mean edit similarity.
    pub edit_similarity: f64,
    /// FNV-1a hash of the scored items (hex): equal hashes, equal sets.
    pub set_hash: String,
    /// Files the items come from.
    pub files: Vec<String>,
    /// Wall time.
    pub seconds: f64,
    /// Every item's result.
    #[serde(skip)]
    pub results: Vec<InfillResult>,
}

/// Builds the full set from `files`: per function (`def` line), the middle
/// one of its candidate body lines (code, not blank, comment, docstring,
/// decorator or nested definition), each line at most once.
pub fn build_set(files: &[PathBuf]) -> Result<Vec<InfillItem>, corpus::CorpusError> {
    let mut items = Vec::new();
    for path in files {
        let text = corpus::read_text(path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.split('\n').collect();
        let in_docstring = docstring_lines(&lines);
        let mut taken = std::collections::BTreeSet::new();
        for (def_at, def_line) in lines.iter().enumerate() {
            let stripped = def_line.trim_start();
            if !(stripped.starts_with("def ") || stripped.starts_with("async def ")) {
                continue;
            }
            let indent = def_line.len() - stripped.len();
            let body_end = (def_at + 1..lines.len())
                .find(|&j| !lines[j].trim().is_empty() && indent_of(lines[j]) <= indent)
                .unwrap_or(lines.len());
            let candidates: Vec<usize> = (def_at + 1..body_end)
                .filter(|&j| !in_docstring[j] && is_candidate(lines[j]))
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let at = candidates[candidates.len() / 2];
            if taken.insert(at) {
                items.push(make_item(&name, &lines, at));
            }
        }
    }
    Ok(items)
}

/// `n` items spread evenly over `set` (all of it when `n` ≥ its size).
pub fn spread(set: Vec<InfillItem>, n: usize) -> Vec<InfillItem> {
    if n >= set.len() {
        return set;
    }
    let len = set.len();
    let picks: std::collections::BTreeSet<usize> = (0..n).map(|i| i * len / n).collect();
    set.into_iter()
        .enumerate()
        .filter(|(i, _)| picks.contains(i))
        .map(|(_, item)| item)
        .collect()
}

/// FNV-1a (64-bit) over every field of every item, as hex.
pub fn set_hash(items: &[InfillItem]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for item in items {
        let line = item.line.to_string();
        for field in [&item.file, &line, &item.prefix, &item.middle, &item.suffix] {
            for b in field.bytes().chain([0xff]) {
                h ^= b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    format!("{h:016x}")
}

/// Runs the model on every item.
pub fn evaluate(
    p: &LoadedModel,
    items: &[InfillItem],
    mut progress: impl FnMut(usize, usize),
) -> Result<InfillReport, EvalError> {
    let fim = p.tokenizer.fim().ok_or(TokenizerError::NoFim)?.clone();
    let start = Instant::now();
    let mut results = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        progress(i, items.len());
        let ids = p.tokenizer.fim_prompt(&item.prefix, &item.suffix)?;
        let generated = complete_greedy(p, ids, MAX_LINE_TOKENS, &["\n"], &fim.stop)?;
        results.push(InfillResult {
            file: item.file.clone(),
            line: item.line,
            exact: generated.trim() == item.middle.trim(),
            similarity: edit_similarity(generated.trim(), item.middle.trim()),
            expected: item.middle.clone(),
            generated,
        });
    }
    progress(items.len(), items.len());
    let n = results.len().max(1) as f64;
    let mut files: Vec<String> = items.iter().map(|i| i.file.clone()).collect();
    files.dedup();
    Ok(InfillReport {
        items: results.len(),
        exact_match: results.iter().filter(|r| r.exact).count() as f64 / n,
        edit_similarity: results.iter().map(|r| r.similarity).sum::<f64>() / n,
        set_hash: set_hash(items),
        files,
        seconds: start.elapsed().as_secs_f64(),
        results,
    })
}

/// 1 − Levenshtein(a, b) / max(len a, len b), over characters (1 for two empty strings).
pub fn edit_similarity(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 1.0;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    1.0 - row[b.len()] as f64 / longest as f64
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_candidate(line: &str) -> bool {
    let s = line.trim();
    let skip = ["#", "@", "def ", "async def ", "class "];
    s.chars().filter(|c| !c.is_whitespace()).count() >= MIN_LINE_CHARS && !skip.iter().any(|p| s.starts_with(p))
}

/// Marks lines inside (or opening/closing) triple-quoted strings.
fn docstring_lines(lines: &[&str]) -> Vec<bool> {
    let mut open: Option<&str> = None;
    lines
        .iter()
        .map(|line| {
            let mut inside = open.is_some();
            let mut rest = *line;
            loop {
                let next = match open {
                    Some(q) => rest.find(q).map(|at| (at, q)),
                    None => ["\"\"\"", "'''"]
                        .iter()
                        .filter_map(|q| rest.find(q).map(|at| (at, *q)))
                        .min_by_key(|(at, _)| *at),
                };
                let Some((at, q)) = next else { break };
                inside = true;
                open = if open.is_some() { None } else { Some(q) };
                rest = &rest[at + 3..];
            }
            inside
        })
        .collect()
}

fn make_item(file: &str, lines: &[&str], at: usize) -> InfillItem {
    let mut start = at;
    let mut prefix_len = 0;
    while start > 0 && prefix_len + lines[start - 1].len() < PREFIX_BYTES {
        start -= 1;
        prefix_len += lines[start].len() + 1;
    }
    let mut end = at + 1;
    let mut suffix_len = 0;
    while end < lines.len() && suffix_len + lines[end].len() < SUFFIX_BYTES {
        suffix_len += lines[end].len() + 1;
        end += 1;
    }
    let prefix: String = lines[start..at].iter().map(|l| format!("{l}\n")).collect();
    let suffix: String = lines[at + 1..end].iter().map(|l| format!("\n{l}")).collect();
    InfillItem {
        file: file.to_owned(),
        line: at + 1,
        prefix,
        middle: lines[at].to_owned(),
        suffix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_similarity_is_levenshtein_based() {
        assert_eq!(edit_similarity("abc", "abc"), 1.0);
        assert_eq!(edit_similarity("", ""), 1.0);
        assert!((edit_similarity("kitten", "sitting") - (1.0 - 3.0 / 7.0)).abs() < 1e-12);
        assert_eq!(edit_similarity("abc", ""), 0.0);
    }

    #[test]
    fn masks_one_code_line_per_function() {
        let dir = tempfile::tempdir().unwrap();
        let src = "import os\n\ndef f(x):\n    \"\"\"Docstring line that is long.\n    more docs here\n    \"\"\"\n    # a comment line here\n    y = x + 1000\n    z = y * 2000\n    return z + y\n\nclass C:\n    def g(self):\n        return self.value_of_thing\n";
        let path = dir.path().join("m.py");
        std::fs::write(&path, src).unwrap();
        let items = build_set(&[path]).unwrap();
        let middles: Vec<&str> = items.iter().map(|i| i.middle.as_str()).collect();
        assert_eq!(middles, ["    z = y * 2000", "        return self.value_of_thing"]);
        let first = &items[0];
        assert_eq!(first.line, 9);
        assert_eq!(format!("{}{}{}", first.prefix, first.middle, first.suffix), src);
        assert!(first.prefix.ends_with('\n') && first.suffix.starts_with('\n'));
    }
}
