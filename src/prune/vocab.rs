//! Vocabulary pruning: keep the tokens a calibration corpus uses, plus the
//! byte-level base tokens, the special tokens, and every token a kept
//! token's merges pass through (the merge closure, so no kept token becomes
//! unreachable). The rewritten `tokenizer.json` keeps the original relative
//! id order; a merge survives only if both parts and the result survive.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::PruneError;
use crate::tokenizer::CodeTokenizer;

/// Which tokens survive and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VocabPlan {
    /// Kept original ids, ascending; new id = position in this list.
    pub kept: Vec<u32>,
    /// Vocabulary size before.
    pub original: usize,
    /// Tokens used at least `min_count` times.
    pub used: usize,
    /// Kept only because a kept token's merges pass through them.
    pub closure: usize,
    /// Minimum count used.
    pub min_count: usize,
}

fn tokenizer_err(msg: impl Into<String>) -> PruneError {
    PruneError::Tokenizer(msg.into())
}

/// The tokens of `model.vocab` by id.
fn vocab_by_id(json: &Value) -> Result<HashMap<u32, String>, PruneError> {
    let vocab = json
        .pointer("/model/vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| tokenizer_err("tokenizer.json: `model.vocab` missing (only BPE tokenizers can be pruned)"))?;
    if json.pointer("/model/type").and_then(Value::as_str) != Some("BPE") {
        return Err(tokenizer_err(
            "tokenizer.json: only BPE tokenizers can be vocabulary-pruned",
        ));
    }
    vocab
        .iter()
        .map(|(tok, id)| {
            let id = id
                .as_u64()
                .ok_or_else(|| tokenizer_err(format!("tokenizer.json: vocab entry {tok:?} has no integer id")))?;
            Ok((id as u32, tok.clone()))
        })
        .collect()
}

/// A merge as its two parts.
fn merge_parts(m: &Value) -> Option<(String, String)> {
    match m {
        Value::String(s) => {
            let (a, b) = s.split_once(' ')?;
            Some((a.to_owned(), b.to_owned()))
        }
        Value::Array(p) if p.len() == 2 => Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())),
        _ => None,
    }
}

/// Whether a token is a base token (one character, or a `<0xNN>` byte-fallback token).
fn is_base(token: &str) -> bool {
    token.chars().count() == 1 || (token.len() == 6 && token.starts_with("<0x") && token.ends_with('>'))
}

/// Counts token use over `texts` and plans what to keep.
pub fn plan(json: &Value, tok: &CodeTokenizer, texts: &[&str], min_count: usize) -> Result<VocabPlan, PruneError> {
    let by_id = vocab_by_id(json)?;
    let by_token: HashMap<&str, u32> = by_id.iter().map(|(&id, t)| (t.as_str(), id)).collect();
    let original = tok.vocab_size();
    let mut counts = vec![0usize; original.max(by_id.keys().max().map_or(0, |&m| m as usize + 1))];
    for text in texts {
        for id in tok.encode(text)? {
            if let Some(c) = counts.get_mut(id as usize) {
                *c += 1;
            }
        }
    }
    let mut keep: HashSet<u32> = HashSet::new();
    let used: HashSet<u32> = (0..counts.len() as u32)
        .filter(|&id| counts[id as usize] >= min_count.max(1))
        .collect();
    keep.extend(&used);
    keep.extend(by_id.iter().filter(|(_, t)| is_base(t)).map(|(&id, _)| id));
    keep.extend(tok.special_ids());
    if let Some(added) = json.get("added_tokens").and_then(Value::as_array) {
        keep.extend(added.iter().filter_map(|a| a.get("id")?.as_u64()).map(|id| id as u32));
    }
    // The merge that makes each token.
    let merges = json
        .pointer("/model/merges")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut made_by: HashMap<String, (String, String)> = HashMap::new();
    for m in &merges {
        if let Some((a, b)) = merge_parts(m) {
            made_by.entry(format!("{a}{b}")).or_insert((a, b));
        }
    }
    let before_closure = keep.len();
    let mut work: Vec<u32> = keep.iter().copied().collect();
    while let Some(id) = work.pop() {
        let Some(token) = by_id.get(&id) else { continue };
        if let Some((a, b)) = made_by.get(token) {
            for part in [a, b] {
                if let Some(&pid) = by_token.get(part.as_str()) {
                    if keep.insert(pid) {
                        work.push(pid);
                    }
                }
            }
        }
    }
    let mut kept: Vec<u32> = keep.into_iter().collect();
    kept.sort_unstable();
    Ok(VocabPlan {
        closure: kept.len() - before_closure,
        kept,
        original,
        used: used.len(),
        min_count,
    })
}

/// Rewrites `tokenizer.json` for the kept ids.
pub fn rewrite(json: &Value, kept: &[u32]) -> Result<Value, PruneError> {
    let by_id = vocab_by_id(json)?;
    let new_id: HashMap<u32, u32> = kept.iter().enumerate().map(|(i, &id)| (id, i as u32)).collect();
    let kept_tokens: HashSet<&str> = kept.iter().filter_map(|id| by_id.get(id).map(String::as_str)).collect();
    let mut out = json.clone();
    let vocab: serde_json::Map<String, Value> = kept
        .iter()
        .filter_map(|id| Some((by_id.get(id)?.clone(), Value::from(new_id[id]))))
        .collect();
    out["model"]["vocab"] = Value::Object(vocab);
    if let Some(merges) = json.pointer("/model/merges").and_then(Value::as_array) {
        let kept_merges: Vec<Value> = merges
            .iter()
            .filter(|m| {
                merge_parts(m).is_some_and(|(a, b)| {
                    kept_tokens.contains(a.as_str())
                        && kept_tokens.contains(b.as_str())
                        && kept_tokens.contains(format!("{a}{b}").as_str())
                })
            })
            .cloned()
            .collect();
        out["model"]["merges"] = Value::Array(kept_merges);
    }
    if let Some(added) = out.get_mut("added_tokens").and_then(Value::as_array_mut) {
        for a in added.iter_mut() {
            let old = a.get("id").and_then(Value::as_u64).unwrap_or(u64::MAX) as u32;
            let new = new_id
                .get(&old)
                .ok_or_else(|| tokenizer_err(format!("added token {old} was not kept")))?;
            a["id"] = Value::from(*new);
        }
    }
    if let Some(pp) = out.get_mut("post_processor") {
        remap_ids(pp, &new_id);
    }
    Ok(out)
}

/// Remaps special-token ids inside a post-processor (template, Roberta/Bert pairs).
fn remap_ids(v: &mut Value, new_id: &HashMap<u32, u32>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                match (k.as_str(), child) {
                    ("ids", Value::Array(ids)) => {
                        for id in ids.iter_mut() {
                            if let Some(n) = id.as_u64().and_then(|o| new_id.get(&(o as u32))) {
                                *id = Value::from(*n);
                            }
                        }
                    }
                    ("sep" | "cls", Value::Array(pair)) if pair.len() == 2 => {
                        if let Some(n) = pair[1].as_u64().and_then(|o| new_id.get(&(o as u32))) {
                            pair[1] = Value::from(*n);
                        }
                    }
                    (_, child) => remap_ids(child, new_id),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| remap_ids(c, new_id)),
        _ => {}
    }
}
