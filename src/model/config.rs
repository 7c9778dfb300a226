//! Hugging Face `config.json` for Qwen2-family models, read tolerantly:
//! optional fields that are missing or `null` take the defaults of
//! transformers' `Qwen2Config`, unknown fields are ignored (and kept, so a
//! pruned model can write the file back with only the changed fields edited).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::{ModelError, Result};

/// A Qwen2 configuration with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2Config {
    /// Rows of the embedding matrix.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// FFN width named in the file (layers may differ; the weights decide).
    pub intermediate_size: Option<usize>,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// The beginning-of-sequence id, if any.
    pub bos_token_id: Option<u32>,
    /// The model a pruned model was made from (greencode's own field).
    pub pruned_from: Option<String>,
    /// Parameters of that model before pruning (greencode's own field).
    pub params_before_pruning: Option<u64>,
    /// The file as read, for writing back with edits.
    pub raw: Map<String, Value>,
}

impl Qwen2Config {
    /// The dtype the checkpoint is stored in (`torch_dtype`; f32 when
    /// absent), which a model written from this one keeps.
    pub fn storage_dtype(&self) -> candle_core::DType {
        match self.raw.get("torch_dtype").and_then(Value::as_str) {
            Some("bfloat16") => candle_core::DType::BF16,
            Some("float16") => candle_core::DType::F16,
            _ => candle_core::DType::F32,
        }
    }

    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ModelError::MissingFile {
                    path: path.to_path_buf(),
                    what: "the model configuration",
                }
            } else {
                ModelError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses a config from JSON text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Value::Object(raw) = value else {
            return Err(ModelError::ConfigField {
                path: path.to_path_buf(),
                field: "<root>".into(),
                reason: "expected a JSON object".into(),
            });
        };
        let f = Fields { raw: &raw, path };

        if let Some(model_type) = f.opt_str("model_type")? {
            if model_type != "qwen2" {
                return Err(f.err(
                    "model_type",
                    format!("unsupported architecture `{model_type}`; greencode runs Qwen2-family models (`qwen2`)"),
                ));
            }
        }
        if let Some(act) = f.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(f.err("hidden_act", format!("unsupported activation `{act}`; expected `silu`")));
            }
        }
        if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
            return Err(f.err("use_sliding_window", "sliding-window attention is not supported".into()));
        }
        if let Some(v) = raw.get("rope_scaling") {
            if !v.is_null() {
                return Err(f.err("rope_scaling", "RoPE scaling is not supported; expected null".into()));
            }
        }

        let vocab_size = f.req_usize("vocab_size")?;
        let hidden_size = f.req_usize("hidden_size")?;
        let num_hidden_layers = f.req_usize("num_hidden_layers")?;
        let num_attention_heads = f.req_usize("num_attention_heads")?;
        let num_key_value_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err(
                        "num_attention_heads",
                        format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err("head_dim", format!("{head_dim} is odd; RoPE needs an even head width")));
        }
        let eos_token_ids = match raw.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| as_u32(v).ok_or_else(|| f.err("eos_token_id", "expected token ids".into())))
                .collect::<Result<_>>()?,
            Some(v) => {
                vec![as_u32(v).ok_or_else(|| f.err("eos_token_id", "expected a token id or a list of them".into()))?]
            }
        };
        let bos_token_id = match raw.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(as_u32(v).ok_or_else(|| f.err("bos_token_id", "expected a token id".into()))?),
        };

        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size: f.opt_usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(32768),
            rope_theta: f.opt_f64("rope_theta")?.unwrap_or(10000.0),
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            eos_token_ids,
            bos_token_id,
            pruned_from: f.opt_str("pruned_from")?.map(str::to_owned),
            params_before_pruning: raw
                .get("greencode_prune")
                .and_then(|p| p.get("params_before"))
                .and_then(Value::as_u64),
            raw: raw.clone(),
        })
    }
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// Typed access to the fields of one config file, with errors naming them.
struct Fields<'a> {
    raw: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, reason: String) -> ModelError {
        ModelError::ConfigField {
            path: PathBuf::from(self.path),
            field: field.to_owned(),
            reason,
        }
    }

    fn present(&self, field: &str) -> Option<&Value> {
        self.raw.get(field).filter(|v| !v.is_null())
    }

    fn req_usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?
            .ok_or_else(|| self.err(field, "missing (a positive integer is required)".into()))
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(self.err(field, format!("expected a positive integer, got {v}"))),
            },
        }
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                _ => Err(self.err(field, format!("expected a positive number, got {v}"))),
            },
        }
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    fn opt_str(&self, field: &str) -> Result<Option<&str>> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(field, format!("expected a string, got {v}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Qwen2Config> {
        Qwen2Config::from_json_str(text, Path::new("config.json"))
    }

    const MIN: &str = r#"{"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}"#;

    #[test]
    fn missing_optional_fields_take_hf_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.max_position_embeddings, 32768);
        assert!(c.eos_token_ids.is_empty());
    }

    #[test]
    fn null_fields_and_unknown_fields_are_tolerated() {
        let c = parse(
            r#"{"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": null, "rope_theta": null, "sliding_window": null,
                "eos_token_id": [1, 2], "something_new": {"a": 1}}"#,
        )
        .unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert!(c.raw.contains_key("something_new"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"vocab_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4}"#).unwrap_err();
        assert!(e.to_string().contains("`hidden_size`: missing"), "{e}");
        let e = parse(r#"{"vocab_size": "big", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}"#)
            .unwrap_err();
        assert!(
            e.to_string().contains("`vocab_size`: expected a positive integer"),
            "{e}"
        );
        let e = parse(r#"{"model_type": "llama", "vocab_size": 1, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unsupported architecture `llama`"), "{e}");
        let e = parse(r#"{"vocab_size": 1, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3}"#)
            .unwrap_err();
        assert!(e.to_string().contains("`num_key_value_heads`"), "{e}");
        let e = parse("{not json").unwrap_err();
        assert!(e.to_string().starts_with("config.json: invalid JSON"), "{e}");
    }
}
