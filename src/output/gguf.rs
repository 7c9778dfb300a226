//! `greencode quantize`: a Hugging Face Qwen2 folder (original or pruned),
//! or a GGUF file to convert, written as one GGUF file that llama.cpp loads: its `qwen2` architecture
//! metadata and tensor names, the tokenizer embedded as `tokenizer.ggml.*`,
//! per-layer FFN widths kept, and the 2-D weights stored as f32, f16, Q8_0
//! or Q4_K (rows whose length is not a multiple of Q4_K's 256-wide blocks
//! fall back to Q5_0, then Q8_0, as llama.cpp's quantizer does). Norms and
//! biases stay f32. The file is written to a temporary name and renamed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};

use super::gguf_writer::{self, GgufWriter, TensorEntry};
use crate::cpu::block_quantize;
use serde::Serialize;
use serde_json::Value as Json;

use crate::generate::loaded::{LoadError, LoadedModel};
use crate::model::gguf_names::gguf_name;
use crate::model::ModelError;
use crate::tokenizer::CodeTokenizer;

/// The weight types `greencode quantize` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    /// 32-bit floats (no quantization).
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16 (exact for a bf16 checkpoint such as tiny-coder's).
    Bf16,
    /// 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// 4-bit super-blocks of 256 (llama.cpp's Q4_K) for every matrix.
    Q4K,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output matrix and
    /// for the value projections and FFN down projections of the layers
    /// llama-quantize gives more bits.
    Q4KM,
    /// llama.cpp's Q5_K_M mix: Q5_K, with Q6_K where Q4_K_M has it.
    Q5KM,
    /// llama.cpp's Q6_K: every matrix Q6_K.
    Q6K,
}

impl WeightType {
    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K | Self::Q4KM => GgmlDType::Q4K,
            Self::Q5KM => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// The type llama-quantize gives the 2-D weight `name` (GGUF name, rows
    /// of `cols` values) in this mix, before the fallbacks for rows that do
    /// not fit its blocks (`llama_tensor_get_type` for a qwen2 model of
    /// `layers` layers without experts or importance matrix).
    fn tensor_type(self, name: &str, cols: usize, layers: usize, tied: bool) -> GgmlDType {
        let default = self.ggml();
        if !matches!(self, Self::Q4KM | Self::Q5KM | Self::Q6K) {
            return default;
        }
        // The output matrix (the embeddings, when tied) gets Q6_K, or Q8_0
        // when its rows do not fit the mix's blocks.
        if name == "output.weight" || (tied && name == "token_embd.weight") {
            return if cols.is_multiple_of(default.block_size()) {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q8_0
            };
        }
        let layer = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        let more_bits = |i: usize| i < layers / 8 || i >= 7 * layers / 8 || (i - layers / 8) % 3 == 2;
        match layer {
            Some(i) if (name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight")) && more_bits(i) => {
                GgmlDType::Q6K
            }
            _ => default,
        }
    }

    /// The type the 2-D weight `name` (rows of `cols` values) is written
    /// in: [`Self::tensor_type`] after llama-quantize's fallbacks.
    pub fn stored_type(self, name: &str, cols: usize, layers: usize, tied: bool) -> GgmlDType {
        storage_type(self.tensor_type(name, cols, layers, tied), cols).0
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 32,
            Self::Q8_0 => 7,
            Self::Q4K => 14, // MOSTLY_Q4_K_S: every weight Q4_K where the rows allow
            Self::Q4KM => 15,
            Self::Q5KM => 17,
            Self::Q6K => 18,
        }
    }
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The model could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A model operation failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation or the GGUF writer failed.
    #[error("GGUF: {}", crate::model::error::candle_reason(.0))]
    Candle(#[from] candle_core::Error),
    /// tokenizer.json lacks something llama.cpp needs.
    #[error("{path}: {message}")]
    Tokenizer {
        /// tokenizer.json.
        path: PathBuf,
        /// What is missing or unsupported.
        message: String,
    },
    /// Writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The GGUF file.
    pub path: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data per GGML type (`F32`, `F16`, `Q8_0`, …).
    pub bytes_by_type: BTreeMap<String, u64>,
    /// Tensors stored in a fallback type, with the reason.
    pub fallbacks: Vec<String>,
    /// Size of the file.
    pub file_bytes: u64,
}

/// The tokenizer as GGUF metadata: tokens by id, their types, BPE merges.
struct GgufVocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    pre: &'static str,
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

use crate::tokenizer::QWEN2_SPLIT;

fn read_vocab(tokenizer: &CodeTokenizer, rows: usize) -> Result<GgufVocab, ExportError> {
    let path = tokenizer.path();
    let err = |message: String| ExportError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let text = tokenizer.inner().to_string(false).map_err(|e| err(e.to_string()))?;
    let json: Json = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(err(format!(
            "model.type is {}, only byte-level BPE is exported",
            model["type"]
        )));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| err("model.vocab is missing".into()))?;
    let mut tokens: Vec<Option<String>> = vec![None; rows];
    let mut types = vec![UNUSED; rows];
    let mut place = |id: u64, token: &str, kind: i32| -> Result<(), ExportError> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            err(format!(
                "token id {id} ({token:?}) is beyond the model's {rows} embedding rows"
            ))
        })?;
        *slot = Some(token.to_owned());
        types[id as usize] = kind;
        Ok(())
    };
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| err(format!("model.vocab[{token:?}] is not an id")))?;
        place(id, token, NORMAL)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            return Err(err("added_tokens entries need `id` and `content`".into()));
        };
        let kind = if added["special"].as_bool().unwrap_or(false) {
            CONTROL
        } else {
            USER_DEFINED
        };
        place(id, content, kind)?;
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| err("model.merges is missing".into()))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 => Ok(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            other => Err(err(format!("model.merges holds {other}, not a merge"))),
        })
        .collect::<Result<_, _>>()?;
    Ok(GgufVocab {
        tokens,
        types,
        merges,
        pre: pre_tokenizer_name(&json["pre_tokenizer"]).map_err(err)?,
    })
}

/// llama.cpp's name for the tokenizer's split rule (`tokenizer.ggml.pre`).
fn pre_tokenizer_name(pre: &Json) -> Result<&'static str, String> {
    let byte_level_with_regex = |p: &Json| p["type"] == "ByteLevel" && p["use_regex"].as_bool().unwrap_or(true);
    if byte_level_with_regex(pre) {
        return Ok("gpt-2"); // ByteLevel's own regex is GPT-2's
    }
    if pre["type"] == "Sequence" {
        let parts = pre["pretokenizers"].as_array().cloned().unwrap_or_default();
        let split = parts.iter().find(|p| p["type"] == "Split");
        let regex = split.and_then(|s| s["pattern"]["Regex"].as_str());
        if regex == Some(QWEN2_SPLIT) {
            return Ok("qwen2");
        }
        if split.is_none() && parts.iter().any(byte_level_with_regex) {
            return Ok("gpt-2");
        }
    }
    Err(format!(
        "pre_tokenizer {pre} matches no split rule llama.cpp names (gpt-2, qwen2)"
    ))
}

/// The type a 2-D weight with rows of `cols` values is stored in, and why
/// it differs from the one asked for: llama-quantize's fallbacks (Q4_K →
/// Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, then f16).
fn storage_type(asked: GgmlDType, cols: usize) -> (GgmlDType, Option<String>) {
    let mut ty = asked;
    while !cols.is_multiple_of(ty.block_size()) {
        ty = match ty {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            _ => GgmlDType::F16,
        };
    }
    let why = (ty != asked).then(|| {
        format!(
            "rows of {cols} are not a multiple of {:?}'s block of {}: stored as {ty:?}",
            asked,
            asked.block_size()
        )
    });
    (ty, why)
}

/// Writes the model in `folder` (a Hugging Face folder, or a GGUF file to
/// convert) to `out` as GGUF with weights of type `ty`, one tensor at a
/// time: a folder of bf16 weights is read in bf16 (exact, and half the
/// memory of f32), so a 7B model converts on a 24 GiB machine.
pub fn export(folder: &Path, out: &Path, ty: WeightType) -> Result<ExportReport, ExportError> {
    let dtype = match crate::model::load::stored_dtype(folder)? {
        Some(candle_core::DType::BF16) => candle_core::DType::BF16,
        _ => candle_core::DType::F32,
    };
    let LoadedModel { model, tokenizer, .. } = LoadedModel::load(folder, &candle_core::Device::Cpu, dtype)?;
    let cfg = model.config();
    let vocab = read_vocab(&tokenizer, model.vocab_size())?;
    let mut report = ExportReport {
        path: out.to_path_buf(),
        tensors: 0,
        bytes_by_type: BTreeMap::new(),
        fallbacks: Vec::new(),
        file_bytes: 0,
    };
    let mut entries = Vec::new();
    model.visit_weights(|hf, w| {
        let name = gguf_name(&hf).ok_or_else(|| ModelError::Input(format!("no GGUF name for tensor {hf}")))?;
        let dims = w.dims();
        let qty = if let [_, cols] = dims[..] {
            let asked = ty.tensor_type(&name, cols, cfg.num_hidden_layers, cfg.tie_word_embeddings);
            let (qty, why) = storage_type(asked, cols);
            if let Some(why) = why {
                eprintln!("greencode: warning: {name}: {why}");
                report.fallbacks.push(format!("{name}: {why}"));
            }
            qty
        } else {
            GgmlDType::F32
        };
        let entry = TensorEntry { name, dims, ty: qty };
        *report.bytes_by_type.entry(format!("{qty:?}")).or_default() += entry.bytes() as u64;
        entries.push(entry);
        Ok(())
    })?;
    report.tensors = entries.len();
    let ffn = model.ffn_widths();
    let ffn_value = if ffn.windows(2).all(|w| w[0] == w[1]) {
        gguf_file::Value::U32(ffn.first().copied().unwrap_or(0) as u32)
    } else {
        gguf_file::Value::Array(ffn.iter().map(|&w| gguf_file::Value::U32(w as u32)).collect())
    };
    let name = crate::generate::locate::model_name(folder);
    let s = |v: &str| gguf_file::Value::String(v.to_owned());
    let u = |v: usize| gguf_file::Value::U32(v as u32);
    let eos = cfg.eos_token_ids.first().copied().unwrap_or(0) as usize;
    let mut meta: Vec<(&str, gguf_file::Value)> = vec![
        ("general.architecture", s("qwen2")),
        ("general.type", s("model")),
        ("general.name", s(&name)),
        ("general.file_type", gguf_file::Value::U32(ty.file_type())),
        ("general.quantization_version", u(2)),
        ("general.alignment", u(gguf_writer::ALIGNMENT)),
        ("qwen2.block_count", u(model.num_layers())),
        ("qwen2.context_length", u(cfg.max_position_embeddings)),
        ("qwen2.embedding_length", u(cfg.hidden_size)),
        ("qwen2.feed_forward_length", ffn_value),
        ("qwen2.attention.head_count", u(cfg.num_attention_heads)),
        ("qwen2.attention.head_count_kv", u(cfg.num_key_value_heads)),
        ("qwen2.rope.freq_base", gguf_file::Value::F32(cfg.rope_theta as f32)),
        (
            "qwen2.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s(vocab.pre)),
        (
            "tokenizer.ggml.tokens",
            gguf_file::Value::Array(vocab.tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            gguf_file::Value::Array(vocab.types.iter().map(|&t| gguf_file::Value::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            gguf_file::Value::Array(vocab.merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.eos_token_id", u(eos)),
        ("tokenizer.ggml.padding_token_id", u(eos)),
        ("tokenizer.ggml.bos_token_id", u(eos)),
        ("tokenizer.ggml.add_bos_token", gguf_file::Value::Bool(false)),
        ("tokenizer.ggml.add_eos_token", gguf_file::Value::Bool(false)),
    ];
    if let Some(from) = &cfg.pruned_from {
        meta.push(("greencode.pruned_from", s(from)));
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let io = |source| ExportError::Io {
        path: out.to_path_buf(),
        source,
    };
    // The temporary file's name would only confuse: name the folder, or the
    // output with the OS reason.
    if !dir.is_dir() {
        return Err(ExportError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
        });
    }
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| {
        io(e.raw_os_error()
            .map_or_else(|| std::io::Error::from(e.kind()), std::io::Error::from_raw_os_error))
    })?;
    {
        let file = std::io::BufWriter::new(tmp.as_file_mut());
        let mut w = GgufWriter::new(file, &meta, entries).map_err(io)?;
        let model_io = |source| ModelError::Io {
            path: out.to_path_buf(),
            source,
        };
        model.visit_weights(|_, weight| {
            let qty = w.next_entry().map(|e| e.ty).expect("the table lists every weight");
            // One tensor in f32 at a time (2.2 GB for a 7B embedding).
            let bytes = tensor_bytes(weight.values()?, qty)?;
            w.tensor(&bytes).map_err(model_io)
        })?;
        w.finish().map_err(io)?.flush().map_err(io)?;
    }
    // Temporary files are private (0600); the result is an ordinary file.
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io)?;
    }
    tmp.persist(out).map_err(|e| io(e.error))?;
    report.file_bytes = std::fs::metadata(out).map_err(io)?.len();
    Ok(report)
}

/// `values`' bytes in `ty` as GGUF stores them: the block types by
/// llama.cpp's reference quantizers (the bytes llama-quantize writes), f16,
/// bf16 and f32 by plain conversion (round to nearest even).
fn tensor_bytes(values: Vec<f32>, ty: GgmlDType) -> candle_core::Result<Vec<u8>> {
    Ok(match ty {
        GgmlDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlDType::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlDType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => block_quantize::quantize(ty, &values)
            .ok_or_else(|| candle_core::Error::Msg(format!("greencode does not write {ty:?}")))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4k_falls_back_where_rows_do_not_fit_its_blocks() {
        assert_eq!(storage_type(GgmlDType::Q4K, 1024), (GgmlDType::Q4K, None));
        assert_eq!(storage_type(GgmlDType::Q4K, 384).0, GgmlDType::Q5_0);
        assert_eq!(storage_type(GgmlDType::Q4K, 400).0, GgmlDType::F16);
        assert_eq!(storage_type(GgmlDType::Q8_0, 384), (GgmlDType::Q8_0, None));
    }
}
