//! Synthetic models of real shapes (`greencode synth`, `bench generate
//! --synth`) and the tensor runtime path GPUs take (bf16, KV cache as device
//! tensors), exercised on the CPU with the `tiny` shape.

mod common;

use candle_core::{DType, Device, Tensor};
use greencode::bench::kernels::{check_decode_attention, check_model_path, rel_err, ATTENTION_CASES};
use greencode::generate::loaded::LoadedModel;
use greencode::model::synth::{synth_model, SynthShape};
use greencode::model::{LogitsFor, SeqStep};

const SEED: u64 = 11;

#[test]
fn synth_folder_loads_generates_and_equals_the_in_memory_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-synth");
    let run = common::greencode(&[
        "synth",
        "--shape",
        "tiny",
        "--seed",
        &SEED.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let g = common::generate_json(&out, &["--prompt", "def add(a, b):", "--max-tokens", "8"]);
    assert_eq!(g["completion_tokens"], 8);

    // The folder holds exactly what synth_model builds on the CPU.
    let loaded = LoadedModel::load_cpu(&out).unwrap();
    let built = synth_model(SynthShape::Tiny, &Device::Cpu, DType::F32, SEED).unwrap();
    let ids = Tensor::new(&[[1u32, 200, 3000, 16383]], &Device::Cpu).unwrap();
    let a = loaded.model.logits(&ids, None).unwrap();
    let b = built.logits(&ids, None).unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    let std: f32 = a
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        / 65536.0;
    assert!(
        std.is_finite() && std.sqrt() < 10.0,
        "logits out of range: rms {}",
        std.sqrt()
    );

    // A second write into the same folder needs --force.
    let again = common::greencode(&["synth", "--shape", "tiny", "--out", out.to_str().unwrap()]);
    common::assert_clean_error(&again, &["not empty", "--force"]);
}

#[test]
fn bench_generate_synth_reports_each_batch() {
    let out = common::greencode(&[
        "bench",
        "generate",
        "--synth",
        "tiny",
        "--batch",
        "1,3",
        "--prompt-tokens",
        "32",
        "--new-tokens",
        "6",
        "--passes",
        "1",
        "--bandwidth-gbs",
        "40",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (r, batch) in lines.iter().zip([1, 3]) {
        assert_eq!(r["batch"], batch);
        assert_eq!(r["model"], "tiny");
        assert_eq!(r["device"], "cpu");
        assert!(r["decode_tokens_per_second"]["median"].as_f64().unwrap() > 0.0);
        assert!(r["ttft_ms"]["median"].as_f64().unwrap() > 0.0);
        assert!(r["share_of_floor"].as_f64().unwrap() > 0.0);
        assert_eq!(r["parameters"], 25_183_104);
    }
}

#[test]
fn bad_synth_and_device_arguments_fail_cleanly() {
    let out = common::greencode(&["bench", "generate", "--synth", "gpt-9", "--passes", "1"]);
    common::assert_clean_error(&out, &["unknown shape `gpt-9`", "codeqwen1.5-7b"]);
    let out = common::greencode(&["synth", "--shape", "nope", "--out", "/tmp/never-written"]);
    common::assert_clean_error(&out, &["unknown shape"]);
    let out = common::greencode(&["generate", "--prompt", "x", "--device", "tpu:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected `cpu`, `cuda` or `cuda:N`"));
    let out = common::greencode(&["bench", "generate", "--synth", "tiny", "--batch", "0"]);
    common::assert_clean_error(&out, &["--batch"]);
    #[cfg(not(feature = "cuda"))]
    {
        let out = common::greencode(&["bench", "generate", "--synth", "tiny", "--device", "cuda"]);
        common::assert_clean_error(&out, &["needs a CUDA build", "--features cuda"]);
    }
}

/// The path a GPU runs (bf16 weights, KV cache as device tensors, the
/// tensor step) gives the same logits step by step as one full forward,
/// alone or batched with another sequence.
#[test]
fn bf16_tensor_path_decodes_like_the_full_forward() {
    let model = synth_model(SynthShape::Tiny, &Device::Cpu, DType::BF16, SEED).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 677 + 5) % 16384).collect();
    let full = model
        .logits(
            &Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(),
            None,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let split = 16;
    let mut a = model.new_cache(64).unwrap();
    let mut b = model.new_cache(64).unwrap();
    assert!(!a.is_host(), "bf16 caches are tensors, as on a GPU");
    let other: Vec<u32> = (0..10).map(|i| (i * 31 + 7) % 16384).collect();
    let mut seqs = [
        SeqStep {
            cache: &mut a,
            tokens: &ids[..split],
            logits: LogitsFor::All,
        },
        SeqStep {
            cache: &mut b,
            tokens: &other,
            logits: LogitsFor::Last,
        },
    ];
    let first = model.step(&mut seqs).unwrap();
    let e = rel_err(&first[0], &full.narrow(0, 0, split).unwrap()).unwrap();
    assert!(e < 2e-2, "prompt logits: relative error {e}");
    for (i, &id) in ids.iter().enumerate().skip(split) {
        let mut seqs = [
            SeqStep {
                cache: &mut a,
                tokens: &[id],
                logits: LogitsFor::Last,
            },
            SeqStep {
                cache: &mut b,
                tokens: &[3],
                logits: LogitsFor::Last,
            },
        ];
        let step = model.step(&mut seqs).unwrap();
        let e = rel_err(&step[0], &full.narrow(0, i, 1).unwrap()).unwrap();
        assert!(e < 2e-2, "position {i}: relative error {e}");
    }
    assert_eq!(a.len(), ids.len());
}

/// The fused decode-attention op's CPU arithmetic (what the CUDA kernel
/// implements) matches the candle path, in f32 and bf16, at sizes that
/// leave warps without keys; and the device-vs-CPU model check holds on the
/// CPU itself. (The GPU runs the same checks in tests/cuda_kernels.rs and
/// `bench kernels`.)
#[test]
fn decode_attention_op_matches_the_candle_path_on_the_cpu() {
    for dtype in [DType::F32, DType::BF16] {
        for r in check_decode_attention(&Device::Cpu, dtype, &ATTENTION_CASES[2..], 0).unwrap() {
            assert!(r.pass, "{r:?}");
        }
    }
    let m = check_model_path(&Device::Cpu).unwrap();
    assert!(m.pass && m.max_rel_err == 0.0, "{m:?}");
}
