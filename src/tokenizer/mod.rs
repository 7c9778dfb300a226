//! The model's tokenizer (`tokenizer.json` through the `tokenizers` crate),
//! its special tokens, and its fill-in-the-middle format, detected from the
//! vocabulary.

pub mod gguf;

use std::path::{Path, PathBuf};

/// Why a tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.json` is absent.
    #[error("{0}: file not found (the tokenizer)")]
    Missing(PathBuf),
    /// `tokenizer.json` could not be parsed.
    #[error("{path}: invalid tokenizer: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The library's error.
        reason: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
    /// The model has no fill-in-the-middle tokens.
    #[error("this model has no fill-in-the-middle tokens (looked for Qwen2.5-Coder, StarCoder/CodeQwen, CodeLlama and DeepSeek-Coder formats); `suffix` cannot be used")]
    NoFim,
}

/// The fill-in-the-middle conventions greencode recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FimStyle {
    /// `<|fim_prefix|>…<|fim_suffix|>…<|fim_middle|>` (Qwen2.5-Coder).
    QwenCoder,
    /// `<fim_prefix>…<fim_suffix>…<fim_middle>` (StarCoder, CodeQwen1.5).
    StarCoder,
    /// `▁<PRE> … ▁<SUF>… ▁<MID>` (CodeLlama).
    CodeLlama,
    /// `<｜fim▁begin｜>…<｜fim▁hole｜>…<｜fim▁end｜>` (DeepSeek-Coder).
    DeepSeek,
}

/// The token ids of a model's fill-in-the-middle format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FimTokens {
    /// Which convention.
    pub style: FimStyle,
    /// Starts the prefix.
    pub prefix: u32,
    /// Starts the suffix.
    pub suffix: u32,
    /// Starts the middle (generation follows).
    pub middle: u32,
    /// Tokens that end an infill besides EOS (pad, file separator, end-of-text markers).
    pub stop: Vec<u32>,
}

/// Qwen2's pre-tokenizer split regex (llama.cpp calls this rule `qwen2`).
pub const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A loaded tokenizer with the model's special tokens resolved.
pub struct CodeTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    eos: Vec<u32>,
    fim: Option<FimTokens>,
}

impl std::fmt::Debug for CodeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeTokenizer")
            .field("path", &self.path)
            .field("vocab", &self.vocab_size())
            .field("eos", &self.eos)
            .field("fim", &self.fim)
            .finish()
    }
}

impl CodeTokenizer {
    /// Loads `tokenizer.json` from a model folder; `config_eos` are the
    /// end-of-sequence ids from the model's config.
    pub fn from_folder(folder: &Path, config_eos: &[u32]) -> Result<Self, TokenizerError> {
        let path = folder.join("tokenizer.json");
        if !path.is_file() {
            return Err(TokenizerError::Missing(path));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self::new(inner, path, config_eos))
    }

    /// Wraps an already parsed tokenizer.
    pub fn new(inner: tokenizers::Tokenizer, path: PathBuf, config_eos: &[u32]) -> Self {
        let mut eos: Vec<u32> = config_eos.to_vec();
        for name in [
            "<|endoftext|>",
            "<|im_end|>",
            "</s>",
            "<|end_of_text|>",
            "<｜end▁of▁sentence｜>",
        ] {
            if let Some(id) = inner.token_to_id(name) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        let fim = detect_fim(&inner);
        Self { inner, path, eos, fim }
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `tokenizers` object, for what this wrapper does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The fill-in-the-middle tokens, if the model has them.
    pub fn fim(&self) -> Option<&FimTokens> {
        self.fim.as_ref()
    }

    /// The id of a token given by its text, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes text; special tokens written in the text (`<|fim_prefix|>`)
    /// become their ids; no BOS/EOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Codec(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, leaving special tokens out when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// Ids of special (added, `special: true`) tokens, such as EOS and FIM markers.
    pub fn special_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The exact bytes each token id stands for in decoded text (special
    /// tokens: their content). Byte-level BPE tokens map back through the
    /// GPT-2 byte alphabet; other tokenizers fall back to decoding one token.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let byte_level = matches!(
            self.inner.get_decoder(),
            Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_))
        );
        let table = unicode_to_byte();
        let added = self.inner.get_added_tokens_decoder();
        (0..self.vocab_size() as u32)
            .map(|id| {
                let Some(token) = self.inner.id_to_token(id) else {
                    return Vec::new();
                };
                if added.contains_key(&id) || !byte_level {
                    if byte_level {
                        return token.into_bytes();
                    }
                    return self.decode(&[id], false).map(String::into_bytes).unwrap_or_default();
                }
                token
                    .chars()
                    .map(|c| table.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| token.into_bytes())
            })
            .collect()
    }

    /// The prompt ids for infilling between `prefix` and `suffix` in the
    /// model's format (prefix–suffix–middle order).
    pub fn fim_prompt(&self, prefix: &str, suffix: &str) -> Result<Vec<u32>, TokenizerError> {
        let fim = self.fim.as_ref().ok_or(TokenizerError::NoFim)?;
        let mut ids = vec![fim.prefix];
        ids.extend(self.encode(prefix)?);
        ids.push(fim.suffix);
        ids.extend(self.encode(suffix)?);
        ids.push(fim.middle);
        Ok(ids)
    }
}

/// GPT-2's byte-level alphabet, inverted: the printable character standing
/// for each byte, mapped back to the byte.
fn unicode_to_byte() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut extra = 0;
    for b in 0u32..256 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map.insert(char::from_u32(c).expect("valid code point"), b as u8);
    }
    map
}

/// Finds the fill-in-the-middle tokens of a vocabulary.
fn detect_fim(tok: &tokenizers::Tokenizer) -> Option<FimTokens> {
    let id = |s: &str| tok.token_to_id(s);
    let styles: [(FimStyle, [&str; 3], &[&str]); 4] = [
        (
            FimStyle::QwenCoder,
            ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"],
            &["<|fim_pad|>", "<|file_sep|>", "<|endoftext|>", "<|repo_name|>"],
        ),
        (
            FimStyle::StarCoder,
            ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
            &["<fim_pad>", "<file_sep>", "<|endoftext|>", "<filename>"],
        ),
        (FimStyle::CodeLlama, ["▁<PRE>", "▁<SUF>", "▁<MID>"], &["▁<EOT>", "</s>"]),
        (
            FimStyle::DeepSeek,
            ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
            &["<｜end▁of▁sentence｜>", "<|EOT|>"],
        ),
    ];
    styles.iter().find_map(|(style, [p, s, m], stops)| {
        Some(FimTokens {
            style: *style,
            prefix: id(p)?,
            suffix: id(s)?,
            middle: id(m)?,
            stop: stops.iter().filter_map(|t| id(t)).collect(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> CodeTokenizer {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-coder");
        CodeTokenizer::from_folder(&folder, &[0]).unwrap()
    }

    #[test]
    fn encodes_like_the_reference() {
        let t = tiny();
        assert_eq!(
            t.encode("def fibonacci(n):\n").unwrap(),
            vec![326, 293, 474, 268, 3684, 78, 13, 83, 339, 204]
        );
        assert_eq!(t.decode(&[326, 293, 474], true).unwrap(), "def fib");
    }

    #[test]
    fn detects_qwen_fim_and_builds_the_same_ids_as_the_template() {
        let t = tiny();
        let fim = t.fim().unwrap();
        assert_eq!(fim.style, FimStyle::QwenCoder);
        assert_eq!((fim.prefix, fim.suffix, fim.middle), (1, 3, 2));
        assert!(fim.stop.contains(&4) && fim.stop.contains(&5));
        let built = t
            .fim_prompt("def area(w, h):\n    return ", "\n\n\nprint(area(2, 3))\n")
            .unwrap();
        let templ = t
            .encode("<|fim_prefix|>def area(w, h):\n    return <|fim_suffix|>\n\n\nprint(area(2, 3))\n<|fim_middle|>")
            .unwrap();
        assert_eq!(built, templ);
    }

    #[test]
    fn token_bytes_concatenate_to_the_text() {
        let t = tiny();
        let text = "caf\u{e9} = '\u{2192}'\n    return x  # \u{1F600}\n";
        let ids = t.encode(text).unwrap();
        let table = t.token_bytes();
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| table[id as usize].clone()).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
        assert_eq!(table[0], b"<|endoftext|>");
        assert_eq!(t.special_ids(), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn missing_tokenizer_names_the_file() {
        let e = CodeTokenizer::from_folder(Path::new("/nonexistent"), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/nonexistent/tokenizer.json: file not found (the tokenizer)"
        );
    }
}

/// Turns a stream of token ids into text pieces, holding back bytes of an
/// incomplete UTF-8 character until the token that completes it arrives.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream {
    /// A stream that starts empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id`; returns the text it completes, if any (special tokens give none).
    pub fn push(&mut self, tok: &CodeTokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let now = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            let piece = now[before.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }
}
