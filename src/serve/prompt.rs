//! Prompts as the model runs them: the served model's token tables
//! (`ModelInfo`), plain prompts refused when they do not fit, fill-in-the-
//! middle prompts with context-aware truncation (extra files first, then the
//! far end of the prefix and of the suffix), and token healing of a prompt
//! that ends mid-token.

use std::sync::Arc;

use super::error::ApiError;
use crate::tokenizer::CodeTokenizer;

/// What the handlers know about the served model.
#[derive(Debug)]
pub struct ModelInfo {
    /// Name clients use in `model`.
    pub name: String,
    /// The tokenizer (shared with the engine).
    pub tokenizer: Arc<CodeTokenizer>,
    /// Bytes of each token id.
    pub token_bytes: Arc<Vec<Vec<u8>>>,
    /// Whether each id is a special token.
    pub special: Arc<Vec<bool>>,
    /// Context length in tokens.
    pub context_len: usize,
    /// Rows of the model's vocabulary.
    pub vocab_size: usize,
    /// Bytes of the longest token: text longer than the context times this
    /// cannot fit, whatever it tokenizes to.
    pub max_token_bytes: usize,
}

impl ModelInfo {
    /// The tables the engine's detokenizers share.
    pub fn tables(&self) -> super::engine::TokenTables {
        super::engine::TokenTables {
            token_bytes: Arc::clone(&self.token_bytes),
            special: Arc::clone(&self.special),
        }
    }

    /// The id of the special token written `text`, if it is one.
    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.tokenizer
            .token_id(text)
            .filter(|&id| self.special.get(id as usize).copied().unwrap_or(false))
    }

    /// Precomputes token tables for `tokenizer`.
    pub fn new(name: String, tokenizer: Arc<CodeTokenizer>, context_len: usize, vocab_size: usize) -> Self {
        let token_bytes = tokenizer.token_bytes();
        let mut special = vec![false; token_bytes.len().max(vocab_size)];
        for id in tokenizer.special_ids() {
            if let Some(s) = special.get_mut(id as usize) {
                *s = true;
            }
        }
        let max_token_bytes = token_bytes.iter().map(Vec::len).max().unwrap_or(1).max(1);
        Self {
            name,
            tokenizer,
            max_token_bytes,
            token_bytes: Arc::new(token_bytes),
            special: Arc::new(special),
            context_len,
            vocab_size,
        }
    }
}

/// One prompt as the client gave it.
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
}

/// Token healing of one prompt: the last prompt token was removed and the
/// first generated token must start with its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Healing {
    /// Bytes of the removed token (already part of the client's text).
    pub prefix_len: usize,
    /// Ids the first token may take.
    pub allowed: Vec<u32>,
}

/// Most bytes of text that can matter to a prompt: past this, the
/// context is full whatever the text tokenizes to.
fn text_limit(info: &ModelInfo) -> usize {
    info.context_len.saturating_mul(info.max_token_bytes)
}

/// The last `limit` bytes of `text` (from a line start when there is one),
/// so a huge prefix is not tokenized only to be cut.
fn tail(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut at = text.len() - limit;
    while !text.is_char_boundary(at) {
        at += 1;
    }
    match text[at..].find('\n') {
        Some(i) if at + i + 1 < text.len() => &text[at + i + 1..],
        _ => &text[at..],
    }
}

/// The first `limit` bytes of `text` (on a char boundary).
fn head(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut at = limit;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    &text[..at]
}

fn encode(info: &ModelInfo, text: &str) -> Result<Vec<u32>, ApiError> {
    info.tokenizer
        .encode(text)
        .map_err(|e| ApiError::param("prompt", e.to_string()))
}

/// Most prompt tokens token healing backs off.
pub const MAX_HEAL_TOKENS: usize = 4;

/// Token healing: backs off the longest run of trailing prompt tokens (at
/// most [`MAX_HEAL_TOKENS`], never special ones, never the whole prompt)
/// whose bytes are still a prefix of some vocabulary token, and lists the
/// tokens the first generated token may then be. A prompt ending in
/// `"    retu"` (`"   "`, `" ret"`, `"u"`) backs off `" ret"` and `"u"`, so
/// the model continues with `" return"` and the client sees `"rn"`.
pub fn heal(ids: &mut Vec<u32>, info: &ModelInfo) -> Option<Healing> {
    let candidates = |prefix: &[u8]| -> Vec<u32> {
        info.token_bytes
            .iter()
            .enumerate()
            .filter(|(id, b)| !info.special[*id] && b.starts_with(prefix))
            .map(|(id, _)| id as u32)
            .collect()
    };
    let mut best: Option<(usize, Vec<u8>, Vec<u32>)> = None;
    let mut removed: Vec<u8> = Vec::new();
    for back in 1..=MAX_HEAL_TOKENS.min(ids.len().saturating_sub(1)) {
        let id = ids[ids.len() - back];
        if info.special.get(id as usize).copied().unwrap_or(true) {
            break;
        }
        let mut bytes = info.token_bytes.get(id as usize)?.clone();
        bytes.extend_from_slice(&removed);
        removed = bytes;
        let allowed = candidates(&removed);
        if allowed.is_empty() {
            break;
        }
        best = Some((back, removed.clone(), allowed));
    }
    let (back, prefix, allowed) = best?;
    ids.truncate(ids.len() - back);
    Some(Healing {
        prefix_len: prefix.len(),
        allowed,
    })
}

/// A prompt ready to run, with what the response needs to know about it.
#[derive(Debug, Clone)]
pub struct BuiltPrompt {
    /// Ids to run.
    pub ids: Vec<u32>,
    /// Healing applied.
    pub healing: Option<Healing>,
    /// Tokens dropped to fit the context (FIM truncation).
    pub truncated: usize,
    /// The client's prompt text (for `echo`).
    pub text: String,
    /// Stop ids for this prompt.
    pub stop_ids: Vec<u32>,
    /// Tokens the context has left after it (a larger `max_tokens` is cut to this).
    pub room: usize,
}

/// Builds a plain (non-FIM) prompt, refusing one that leaves no room for a
/// token (`max_tokens` is only reported in the error; a larger one than the
/// room is cut to it when the jobs are made).
pub fn plain_prompt(
    input: &PromptInput,
    info: &ModelInfo,
    max_tokens: usize,
    healing: bool,
) -> Result<BuiltPrompt, ApiError> {
    if let PromptInput::Text(t) = input {
        if t.len() > text_limit(info) {
            // Refused before tokenizing: no tokenization of it can fit.
            return Err(ApiError::PromptTooLong {
                bytes: t.len(),
                context: info.context_len,
                max_token_bytes: info.max_token_bytes,
            });
        }
    }
    let (mut ids, text, textual) = match input {
        PromptInput::Text(t) => (encode(info, t)?, t.clone(), true),
        PromptInput::Ids(ids) => (
            ids.clone(),
            info.tokenizer.decode(ids, false).unwrap_or_default(),
            false,
        ),
    };
    if ids.is_empty() {
        return Err(ApiError::param(
            "prompt",
            "`prompt` is empty (an empty prompt needs a `suffix`)",
        ));
    }
    if ids.len() >= info.context_len {
        return Err(ApiError::ContextLength {
            prompt: ids.len(),
            max_tokens,
            context: info.context_len,
            param: "prompt",
        });
    }
    let healing = if healing && textual { heal(&mut ids, info) } else { None };
    Ok(BuiltPrompt {
        room: info.context_len - ids.len(),
        ids,
        healing,
        truncated: 0,
        text,
        stop_ids: info.tokenizer.eos_ids().to_vec(),
    })
}

/// Builds a fill-in-the-middle prompt. When prefix, suffix and `extra`
/// context exceed the room left by `max_tokens` (at most half the context
/// is kept for it), drops the extra context first, then keeps the end of
/// the prefix and the start of the suffix.
pub fn fim_prompt(
    prefix: &PromptInput,
    suffix: &str,
    extra: &[(String, String)],
    info: &ModelInfo,
    max_tokens: usize,
    healing: bool,
) -> Result<BuiltPrompt, ApiError> {
    let fim = info.tokenizer.fim().ok_or(ApiError::NoFim)?.clone();
    // Only the end of a prefix, the start of a suffix and the last extra
    // context can fit: text past what the context can hold is cut before
    // tokenizing (a megabyte prefix is not tokenized to keep its last lines).
    let limit = text_limit(info);
    let suffix = head(suffix, limit);
    let mut extra_bytes = 0;
    let extra: Vec<&(String, String)> = extra
        .iter()
        .rev()
        .take_while(|(n, b)| {
            extra_bytes += n.len() + b.len();
            extra_bytes <= limit
        })
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let (mut p, text, textual) = match prefix {
        PromptInput::Text(t) => (encode(info, tail(t, limit))?, t.clone(), true),
        PromptInput::Ids(ids) => (
            ids.clone(),
            info.tokenizer.decode(ids, false).unwrap_or_default(),
            false,
        ),
    };
    let mut s = encode(info, suffix)?;
    let file_sep = info.tokenizer.token_id("<|file_sep|>");
    let mut extra_ids = Vec::new();
    if let Some(sep) = file_sep {
        for (name, body) in extra {
            extra_ids.push(sep);
            extra_ids.extend(encode(info, &format!("{name}\n{body}"))?);
        }
    }
    let fixed = 3; // prefix, suffix and middle markers
    let room = info
        .context_len
        .saturating_sub(max_tokens.min(info.context_len / 2) + fixed);
    if room == 0 {
        return Err(ApiError::ContextLength {
            prompt: p.len() + s.len() + fixed,
            max_tokens,
            context: info.context_len,
            param: "prompt",
        });
    }
    let mut truncated = 0;
    if extra_ids.len() + p.len() + s.len() > room {
        let keep_extra = room.saturating_sub(p.len() + s.len()).min(extra_ids.len());
        truncated += extra_ids.len() - keep_extra;
        extra_ids.drain(..extra_ids.len() - keep_extra);
    }
    if p.len() + s.len() > room {
        // The suffix keeps at least a quarter of the room (or all it needs).
        let keep_s = s.len().min((room / 4).max(room.saturating_sub(p.len())));
        let keep_p = p.len().min(room - keep_s);
        truncated += (p.len() - keep_p) + (s.len() - keep_s);
        p.drain(..p.len() - keep_p);
        s.truncate(keep_s);
    }
    let healing = if healing && textual { heal(&mut p, info) } else { None };
    let mut ids = extra_ids;
    ids.push(fim.prefix);
    ids.extend(p);
    ids.push(fim.suffix);
    ids.extend(s);
    ids.push(fim.middle);
    let mut stop_ids = info.tokenizer.eos_ids().to_vec();
    stop_ids.extend(fim.stop.iter().copied());
    Ok(BuiltPrompt {
        room: info.context_len.saturating_sub(ids.len()),
        ids,
        healing,
        truncated,
        text,
        stop_ids,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// tiny-coder's tables with a 64-token context (shared with `validate`'s tests).
    pub(crate) fn info() -> ModelInfo {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-coder");
        let tok = CodeTokenizer::from_folder(&folder, &[0]).unwrap();
        ModelInfo::new("tiny-coder".into(), Arc::new(tok), 64, 16384)
    }

    #[test]
    fn healing_allows_tokens_extending_the_removed_one() {
        let info = info();
        let mut ids = info.tokenizer.encode("    retu").unwrap();
        let before = ids.clone();
        let h = heal(&mut ids, &info).unwrap();
        // "   ", " ret", "u": the last two are backed off.
        assert_eq!(before.len(), 3);
        assert_eq!(ids, before[..1]);
        assert_eq!(h.prefix_len, " retu".len());
        let full = info.tokenizer.encode(" return").unwrap();
        assert_eq!(full.len(), 1);
        assert!(h.allowed.contains(&full[0]));
        for id in &h.allowed {
            assert!(info.token_bytes[*id as usize].starts_with(b" retu"));
        }
    }

    #[test]
    fn fim_truncation_keeps_prefix_end_and_suffix_start() {
        let info = info();
        let prefix = PromptInput::Text("a = 1\n".repeat(40));
        let suffix = "b = 2\n".repeat(40);
        let built = fim_prompt(&prefix, &suffix, &[], &info, 16, false).unwrap();
        assert_eq!(built.ids.len(), 64 - 16);
        assert!(built.truncated > 0);
        let fim = info.tokenizer.fim().unwrap();
        assert_eq!(built.ids[0], fim.prefix);
        assert_eq!(*built.ids.last().unwrap(), fim.middle);
        let p_end = built.ids.iter().position(|&i| i == fim.suffix).unwrap();
        let kept_prefix = info.tokenizer.decode(&built.ids[1..p_end], false).unwrap();
        assert!(("a = 1\n".repeat(40)).ends_with(&kept_prefix));
        let kept_suffix = info
            .tokenizer
            .decode(&built.ids[p_end + 1..built.ids.len() - 1], false)
            .unwrap();
        assert!(("b = 2\n".repeat(40)).starts_with(&kept_suffix));
    }

    #[test]
    fn plain_prompt_over_context_is_refused_with_numbers() {
        let info = info();
        // 60 tokens leave 4 of the 64: room, not an error.
        let fits = plain_prompt(&PromptInput::Text("x = 1\n".repeat(15)), &info, 16, false).unwrap();
        assert_eq!(fits.room, 64 - fits.ids.len());
        let e = plain_prompt(&PromptInput::Text("x = 1\n".repeat(30)), &info, 16, false).unwrap_err();
        assert!(
            matches!(
                e,
                ApiError::ContextLength {
                    context: 64,
                    max_tokens: 16,
                    ..
                }
            ),
            "{e}"
        );
    }
}
