//! `greencode quantize`: GGUF files for tiny-coder and pruned tiny-coder, as
//! llama.cpp's own reader (the `gguf` PyPI package) sees them, and the
//! weights read back by candle's GGUF reader.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device};
use greencode::generate::loaded::LoadedModel;
use serde_json::Value;

fn quantize(model: &Path, ty: &str, out: &Path) -> Value {
    let o = common::greencode(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--type",
        ty,
        "--out",
        out.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// What llama.cpp's Python reader sees.
fn inspect(path: &Path) -> Value {
    common::ensure_python_package("gguf", "gguf");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/gguf_inspect.py");
    let o = Command::new("python3").arg(script).arg(path).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn tensor<'a>(info: &'a Value, name: &str) -> &'a Value {
    info["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t[0] == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

fn expected_names(layers: usize) -> Vec<String> {
    let mut names = vec!["token_embd.weight".to_owned(), "output_norm.weight".to_owned()];
    for i in 0..layers {
        for t in [
            "attn_q.weight",
            "attn_q.bias",
            "attn_k.weight",
            "attn_k.bias",
            "attn_v.weight",
            "attn_v.bias",
            "attn_output.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
            "attn_norm.weight",
            "ffn_norm.weight",
        ] {
            names.push(format!("blk.{i}.{t}"));
        }
    }
    names.sort();
    names
}

#[test]
fn tiny_coder_gguf_has_llama_cpp_metadata_names_and_types() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-q8_0.gguf");
    let report = quantize(&common::tiny_coder(), "q8_0", &out);
    assert_eq!(report["tensors"], 146);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o644);
    let info = inspect(&out);
    let f = &info["fields"];
    assert_eq!(f["general.architecture"], "qwen2");
    assert_eq!(f["general.file_type"], 7);
    for (key, want) in [
        ("qwen2.block_count", 12),
        ("qwen2.context_length", 1024),
        ("qwen2.embedding_length", 384),
        ("qwen2.feed_forward_length", 1024),
        ("qwen2.attention.head_count", 6),
        ("qwen2.attention.head_count_kv", 2),
        ("tokenizer.ggml.eos_token_id", 0),
    ] {
        assert_eq!(f[key], want, "{key}");
    }
    assert_eq!(f["qwen2.rope.freq_base"], 10000.0);
    assert_eq!(f["tokenizer.ggml.model"], "gpt2");
    assert_eq!(f["tokenizer.ggml.pre"], "gpt-2");
    assert_eq!(f["tokenizer.ggml.add_bos_token"], false);
    let tokenizer: Value =
        serde_json::from_str(&std::fs::read_to_string(common::tiny_coder().join("tokenizer.json")).unwrap()).unwrap();
    assert_eq!(f["tokenizer.ggml.tokens"]["len"], 16384);
    assert_eq!(f["tokenizer.ggml.tokens"]["head"][0], "<|endoftext|>");
    assert_eq!(f["tokenizer.ggml.tokens"]["head"][1], "<|fim_prefix|>");
    assert_eq!(
        f["tokenizer.ggml.merges"]["len"],
        tokenizer["model"]["merges"].as_array().unwrap().len()
    );
    let types: Vec<i64> = serde_json::from_value(f["tokenizer.ggml.token_type"]["head"].clone()).unwrap();
    assert_eq!(
        types,
        [3, 3, 3, 3, 3, 3, 1, 1],
        "special tokens are CONTROL (3), the rest NORMAL (1)"
    );
    let mut names: Vec<String> = info["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t[0].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, expected_names(12), "tied embeddings: no output.weight");
    assert_eq!(tensor(&info, "token_embd.weight")[1], serde_json::json!([384, 16384]));
    assert_eq!(tensor(&info, "token_embd.weight")[2], "Q8_0");
    assert_eq!(
        tensor(&info, "blk.0.ffn_down.weight")[1],
        serde_json::json!([1024, 384])
    );
    assert_eq!(tensor(&info, "blk.0.ffn_down.weight")[2], "Q8_0");
    assert_eq!(tensor(&info, "blk.0.attn_k.bias")[2], "F32");
    assert_eq!(tensor(&info, "output_norm.weight")[2], "F32");
}

#[test]
fn weights_read_back_f16_and_bf16_exactly_and_q8_0_as_quantized() {
    let dir = tempfile::tempdir().unwrap();
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let originals: std::collections::HashMap<String, candle_core::Tensor> =
        p.model.named_tensors().unwrap().into_iter().collect();
    for ty in ["f16", "bf16", "q8_0"] {
        let out = dir.path().join(format!("tiny-{ty}.gguf"));
        quantize(&common::tiny_coder(), ty, &out);
        let mut file = std::fs::File::open(&out).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        for (hf, gguf) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.layers.5.self_attn.q_proj.weight", "blk.5.attn_q.weight"),
            ("model.layers.5.self_attn.q_proj.bias", "blk.5.attn_q.bias"),
            ("model.layers.11.mlp.down_proj.weight", "blk.11.ffn_down.weight"),
        ] {
            let q = content.tensor(&mut file, gguf, &Device::Cpu).unwrap();
            let got = q.dequantize(&Device::Cpu).unwrap();
            let orig = &originals[hf];
            let want = if orig.rank() == 1 {
                orig.clone()
            } else if ty == "f16" {
                orig.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap()
            } else if ty == "bf16" {
                // tiny-coder's checkpoint is bf16: the file holds its values.
                assert_eq!(q.dtype(), GgmlDType::BF16, "{gguf}");
                orig.clone()
            } else {
                QTensor::quantize(orig, GgmlDType::Q8_0)
                    .unwrap()
                    .dequantize(&Device::Cpu)
                    .unwrap()
            };
            assert_eq!(got.dims(), orig.dims(), "{gguf}");
            assert_eq!(common::max_abs_diff(&got, &want), 0.0, "{ty} {gguf}");
            let err = common::max_abs_diff(&got, orig);
            let scale = orig.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err <= scale / 100.0, "{ty} {gguf}: error {err} for max |w| {scale}");
        }
    }
}

#[test]
fn pruned_and_uneven_models_keep_their_shapes() {
    use greencode::prune::apply::{pruned_tensors, PrunePlan};
    let dir = tempfile::tempdir().unwrap();
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    // Vocabulary cut to 12,000 tokens, layer 2 dropped, FFN widths differing per layer.
    let vocab: Vec<u32> = (0..12000).collect();
    let kept: Vec<usize> = (0..12).filter(|&i| i != 2).collect();
    let widths: Vec<usize> = (0..11).map(|i| 768 - 64 * (i % 3)).collect();
    let plan = PrunePlan {
        vocab: Some(vocab),
        kept_layers: kept,
        ffn: Some(widths.iter().map(|&w| (0..w as u32).collect()).collect()),
    };
    let (mut config, tensors) = pruned_tensors(&p.model, &plan).unwrap();
    config["pruned_from"] = "tiny-coder".into();
    let folder = dir.path().join("pruned");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(&tensors, folder.join("model.safetensors")).unwrap();
    // A tokenizer whose ids stop at 12,000: the original's first 12,000 entries.
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(common::tiny_coder().join("tokenizer.json")).unwrap()).unwrap();
    tok["model"]["vocab"]
        .as_object_mut()
        .unwrap()
        .retain(|_, id| id.as_u64().unwrap() < 12000);
    // A merge survives when both parts and the result do (or the tokenizer is invalid).
    let kept_vocab = tok["model"]["vocab"].as_object().unwrap().clone();
    tok["model"]["merges"].as_array_mut().unwrap().retain(|m| {
        let (a, b) = (m[0].as_str().unwrap(), m[1].as_str().unwrap());
        [a.to_owned(), b.to_owned(), format!("{a}{b}")]
            .iter()
            .all(|t| kept_vocab.contains_key(t))
    });
    std::fs::write(folder.join("tokenizer.json"), tok.to_string()).unwrap();

    let out = dir.path().join("pruned-q4_k.gguf");
    let report = quantize(&folder, "q4_k", &out);
    let info = inspect(&out);
    let f = &info["fields"];
    assert_eq!(f["qwen2.block_count"], 11);
    assert_eq!(f["qwen2.feed_forward_length"], serde_json::json!(widths));
    assert_eq!(f["tokenizer.ggml.tokens"]["len"], 12000);
    assert_eq!(f["greencode.pruned_from"], "tiny-coder");
    assert_eq!(tensor(&info, "token_embd.weight")[1], serde_json::json!([384, 12000]));
    assert_eq!(tensor(&info, "blk.1.ffn_down.weight")[1], serde_json::json!([704, 384]));
    // Rows of 384 and 704 do not fit Q4_K's 256-wide blocks: Q5_0, with a note per tensor.
    assert_eq!(tensor(&info, "blk.0.attn_q.weight")[2], "Q5_0");
    assert_eq!(tensor(&info, "blk.1.ffn_down.weight")[2], "Q5_0");
    assert_eq!(tensor(&info, "blk.0.ffn_down.weight")[2], "Q4_K");
    assert!(report["fallbacks"].as_array().unwrap().len() > 10);
    assert!(report["bytes_by_type"]["Q4K"].as_u64().unwrap() > 0);
}

#[test]
fn bad_input_fails_cleanly_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let out = dir.path().join("x.gguf");
    let o = common::greencode(&[
        "quantize",
        "--model",
        missing.to_str().unwrap(),
        "--type",
        "f16",
        "--out",
        out.to_str().unwrap(),
    ]);
    common::assert_clean_error(&o, &["no-such-model"]);
    let nowhere = dir.path().join("missing-dir/x.gguf");
    let o = common::greencode(&[
        "quantize",
        "--model",
        common::tiny_coder().to_str().unwrap(),
        "--type",
        "q8_0",
        "--out",
        nowhere.to_str().unwrap(),
    ]);
    common::assert_clean_error(&o, &["missing-dir"]);
    assert!(!out.exists() && !nowhere.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a temporary file was left behind"
    );
}

fn logits_of(p: &LoadedModel, text: &str) -> candle_core::Tensor {
    let ids = p.tokenizer.encode(text).unwrap();
    let x = candle_core::Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    p.model.logits(&x, None).unwrap()
}

#[test]
fn exported_files_load_back_with_the_same_weights_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let hf = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let texts = [
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        "<|fim_prefix|>x = <|fim_suffix|>\n<|fim_middle|>",
        "naïve = 'größe' + \"日本\"  # ünïcödé\n\t\ttabs\r\n",
        "    retu",
    ];
    let text = "import os\n\ndef walk(path):\n    for root, dirs, files in os.walk(path):\n";
    for ty in ["f32", "q8_0", "f16"] {
        let out = dir.path().join(format!("tiny-{ty}.gguf"));
        quantize(&common::tiny_coder(), ty, &out);
        let g = LoadedModel::load_cpu(&out).unwrap();
        for t in texts {
            assert_eq!(
                g.tokenizer.encode(t).unwrap(),
                hf.tokenizer.encode(t).unwrap(),
                "{ty}: {t:?}"
            );
            let ids = hf.tokenizer.encode(t).unwrap();
            assert_eq!(
                g.tokenizer.decode(&ids, false).unwrap(),
                hf.tokenizer.decode(&ids, false).unwrap()
            );
        }
        assert_eq!(g.tokenizer.eos_ids(), hf.tokenizer.eos_ids());
        assert_eq!(g.tokenizer.fim(), hf.tokenizer.fim());
        let got = logits_of(&g, text);
        let d = match ty {
            "f32" => common::max_abs_diff(&got, &logits_of(&hf, text)),
            "q8_0" => {
                // The same weights as quantizing in-process, and decoding reads Q8_0.
                let mut q = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
                q.model.quantize_q8().unwrap();
                assert_eq!(g.model.quantization(), "q8_0");
                common::max_abs_diff(&got, &logits_of(&q, text))
            }
            _ => common::max_abs_diff(&got, &logits_of(&hf, text)) / 100.0, // f16 rounding: within 1%
        };
        assert!(d < 1e-4, "{ty}: max |Δlogit| {d}");
    }
    // The CLI runs from a GGUF file like from a folder.
    let f32_file = dir.path().join("tiny-f32.gguf");
    let args = ["--prompt", "def add(a, b):\n", "--max-tokens", "8"];
    let from_file = common::generate_json(&f32_file, &args);
    let from_folder = common::generate_json(&common::tiny_coder(), &args);
    assert_eq!(from_file["token_ids"], from_folder["token_ids"]);
    // A GGUF file converts like a folder: f32 GGUF → Q8_0 gives the blocks of
    // the folder's own Q8_0 export, tokenizer and metadata included.
    let converted = dir.path().join("converted-q8_0.gguf");
    quantize(&f32_file, "q8_0", &converted);
    let direct = dir.path().join("tiny-q8_0.gguf");
    let (a, b) = (inspect(&converted), inspect(&direct));
    assert_eq!(a["tensors"], b["tensors"]);
    let read = |p: &Path| {
        let mut f = std::fs::File::open(p).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        let tokenizer: Vec<String> = [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.pre",
        ]
        .iter()
        .map(|k| format!("{:?}", c.metadata[*k]))
        .collect();
        let t = c.tensor(&mut f, "blk.3.ffn_down.weight", &Device::Cpu).unwrap();
        (tokenizer, t.data().unwrap().to_vec())
    };
    assert!(
        read(&converted) == read(&direct),
        "the converted file differs from the direct export"
    );
}

#[test]
fn q4_k_m_follows_llama_quantizes_mix() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-q4_k_m.gguf");
    let report = quantize(&common::tiny_coder(), "q4_k_m", &out);
    let info = inspect(&out);
    assert_eq!(info["fields"]["general.file_type"], 15, "MOSTLY_Q4_K_M");
    // The types llama-quantize (0c1e570) gave tiny-coder's f16 file for
    // Q4_K_M, read from its output in session 8: 12 layers, tied embeddings,
    // rows of 384 (Q4_K → Q5_0, Q6_K → Q8_0) and of 1,024 (fit).
    let more_bits = [0, 3, 6, 9, 10, 11];
    assert_eq!(tensor(&info, "token_embd.weight")[2], "Q8_0");
    for i in 0..12 {
        let ty = |t: &str| tensor(&info, &format!("blk.{i}.{t}.weight"))[2].clone();
        let (down, v) = if more_bits.contains(&i) {
            ("Q6_K", "Q8_0")
        } else {
            ("Q4_K", "Q5_0")
        };
        assert_eq!(ty("ffn_down"), down, "layer {i}");
        assert_eq!(ty("attn_v"), v, "layer {i}");
        for t in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
            assert_eq!(ty(t), "Q5_0", "layer {i} {t}");
        }
    }
    assert!(report["fallbacks"].as_array().unwrap().len() > 60);
    // And it loads, held as those blocks.
    let p = LoadedModel::load_cpu(&out).unwrap();
    assert_eq!(p.model.weight_format(), "mixed (q5_0, q8_0, q6_K, q4_K)");
}
