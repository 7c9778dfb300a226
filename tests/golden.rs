//! Our Qwen2 against PyTorch's float32 reference outputs (golden.json).

mod common;

use candle_core::Tensor;
use greencode::eval::perplexity::sum_nll;
use greencode::generate::loaded::LoadedModel;
use greencode::generate::sampling::SamplingParams;
use greencode::generate::{generate, Flow, GenerationRequest};

#[test]
fn every_golden_case_matches_pytorch() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let golden = common::golden();
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let ids = p.tokenizer.encode(prompt).unwrap();
        assert_eq!(ids, want_ids, "tokenization of {prompt:?}");

        let input = Tensor::new(ids.as_slice(), p.model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = p.model.logits(&input, None).unwrap().squeeze(0).unwrap();
        let last: Vec<f32> = logits.get(ids.len() - 1).unwrap().to_vec1().unwrap();
        let mut order: Vec<usize> = (0..last.len()).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        let top10: Vec<u32> = order[..10].iter().map(|&i| i as u32).collect();
        let want_top: Vec<u32> = serde_json::from_value(case["last_top10_ids"].clone()).unwrap();
        assert_eq!(top10, want_top, "top-10 ids of {prompt:?}");
        let want_logits: Vec<f32> = serde_json::from_value(case["last_top10_logits"].clone()).unwrap();
        for (k, (&i, &w)) in order[..10].iter().zip(&want_logits).enumerate() {
            // golden.json rounds logits to 4 decimals: allow that on top of 1e-3.
            assert!(
                (last[i] - w).abs() <= 1e-3 + 5e-5,
                "logit {k} of {prompt:?}: {} vs {w}",
                last[i]
            );
        }

        let n = ids.len() - 1;
        let nll = sum_nll(&logits.narrow(0, 0, n).unwrap(), &ids[1..]).unwrap() / n as f64;
        let want_nll = case["prompt_mean_nll"].as_f64().unwrap();
        assert!(
            (nll - want_nll).abs() <= 1e-4,
            "mean NLL of {prompt:?}: {nll} vs {want_nll}"
        );

        let mut req = GenerationRequest::new(ids, 32, SamplingParams::greedy());
        req.stop_ids = p.tokenizer.eos_ids().to_vec();
        let out = generate(&p.model, &req, |_, _| Flow::Continue).unwrap();
        let want_greedy: Vec<u32> = serde_json::from_value(case["greedy32_ids"].clone()).unwrap();
        assert_eq!(out.token_ids, want_greedy, "greedy continuation of {prompt:?}");
        assert_eq!(
            p.tokenizer.decode(&out.token_ids, false).unwrap(),
            case["greedy32_text"].as_str().unwrap()
        );
    }
}

#[test]
fn generate_cli_json_matches_golden_fim_case() {
    let golden = common::golden();
    let case = &golden["cases"][3];
    let (prefix, suffix, _) = common::fim_case();
    let model = common::tiny_coder();
    let out = common::greencode(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &prefix,
        "--suffix",
        &suffix,
        "--max-tokens",
        "32",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["token_ids"], case["greedy32_ids"]);
    assert_eq!(v["prompt_tokens"], 24);
    assert_eq!(v["completion_tokens"], 32);
    assert_eq!(v["text"], case["greedy32_text"]);
    assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["time_to_first_token_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn generate_cli_streams_text_and_stops_at_eos() {
    let model = common::tiny_coder();
    // Golden case 2 stops at once with EOS: the JSON keeps the id, the text omits it.
    let out = common::greencode(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "import os\nimport sys\n\n\ndef main(argv):\n    ",
        "--format",
        "json",
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["token_ids"], serde_json::json!([0]));
    assert_eq!(v["text"], "");
    assert_eq!(v["finish_reason"], "stop");

    let out = common::greencode(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "def fibonacci(n):\n",
        "--max-tokens",
        "32",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text,
        format!("{}\n", common::golden()["cases"][0]["greedy32_text"].as_str().unwrap())
    );
}
