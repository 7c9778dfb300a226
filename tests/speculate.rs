//! Speculative decoding with the lookup drafter (`serve --speculate
//! lookup`): greedy text equals the text without speculation, on the golden
//! prompts and on 50 held-out fill-in-the-middle prompts, alone and in
//! concurrent batches; drafted and accepted tokens are reported per request
//! and in `/metrics`; a stream cancelled while it speculates frees its slot.

mod common;

use std::io::BufRead;

use common::Server;
use greencode::data::corpus;
use serde_json::{json, Value};

/// 50 held-out FIM requests: 30 lines before a line in the middle of a
/// standard-library file, 10 after it.
fn held_out_fim() -> Vec<Value> {
    let dir = corpus::stdlib_dir().unwrap();
    corpus::eval_files(&dir, 120)
        .unwrap()
        .iter()
        .map(|f| corpus::read_text(f).unwrap())
        .filter(|t| t.lines().count() >= 120)
        .take(50)
        .map(|t| {
            let lines: Vec<&str> = t.lines().collect();
            let at = lines.len() / 2;
            json!({
                "prompt": lines[at - 30..at].join("\n") + "\n",
                "suffix": lines[at..at + 10].join("\n") + "\n",
                "max_tokens": 32,
                "temperature": 0,
            })
        })
        .collect()
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned()
}

fn counter(s: &Server, name: &str) -> u64 {
    let (_, m) = s.get("/metrics");
    m.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn greedy_text_is_unchanged_by_lookup_speculation_alone_and_in_batches() {
    let plain = Server::start(&["--kv-dtype", "f32"]);
    let spec = Server::start(&["--kv-dtype", "f32", "--speculate", "lookup"]);
    let g = common::golden();
    for case in g["cases"].as_array().unwrap() {
        let body = json!({"prompt": case["ids"], "n_predict": 32, "temperature": 0});
        let (st, v) = spec.post("/completion", &body);
        assert_eq!(st, 200, "{v}");
        // The golden text up to the end token the server stops at.
        let golden = case["greedy32_text"].as_str().unwrap();
        let want = golden.split("<|endoftext|>").next().unwrap();
        assert_eq!(v["content"], want, "golden prompt");
        assert_eq!(v["content"], plain.post("/completion", &body).1["content"]);
    }
    let requests = held_out_fim();
    assert_eq!(requests.len(), 50);
    let want: Vec<String> = requests
        .iter()
        .map(|b| text(&plain.post("/v1/completions", b).1))
        .collect();
    let mut drafted_requests = 0;
    for (b, w) in requests.iter().zip(&want) {
        let (st, v) = spec.post("/v1/completions", b);
        assert_eq!(st, 200, "{v}");
        assert_eq!(&text(&v), w, "alone: {b}");
        let details = &v["usage"]["completion_tokens_details"];
        if details.is_object() {
            drafted_requests += 1;
            assert!(details["accepted_prediction_tokens"].is_u64());
            assert!(details["rejected_prediction_tokens"].is_u64());
        }
    }
    assert!(
        drafted_requests > 10,
        "only {drafted_requests} of 50 requests speculated"
    );
    // Batches of 4 and 16: the policy turns speculation off while more
    // than 2 decode, on again as they finish.
    for batch in [4, 16] {
        for (chunk, wants) in requests.chunks(batch).zip(want.chunks(batch)) {
            let got: Vec<String> = std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|b| scope.spawn(|| text(&spec.post("/v1/completions", b).1)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(&got, wants, "batch of {batch}");
        }
    }
    // The default f16 cache too: draft rows are written and read back the
    // way one-token steps write and read them.
    let (plain16, spec16) = (
        Server::start_as_is(&[], &[]),
        Server::start_as_is(&["--speculate", "lookup"], &[]),
    );
    for b in &requests[..20] {
        assert_eq!(
            text(&spec16.post("/v1/completions", b).1),
            text(&plain16.post("/v1/completions", b).1),
            "f16 cache: {b}"
        );
    }
    let drafted = counter(&spec, "greencode_spec_decode_draft_tokens_total");
    let accepted = counter(&spec, "greencode_spec_decode_accepted_tokens_total");
    assert!(
        drafted > 0 && accepted > 0 && accepted <= drafted,
        "{accepted} of {drafted}"
    );
    assert_eq!(counter(&plain, "greencode_spec_decode_draft_tokens_total"), 0);
}

#[test]
fn a_repetitive_completion_is_mostly_drafted_and_a_cancelled_one_frees_its_slot() {
    let s = Server::start(&["--speculate", "lookup"]);
    // A list that continues the same way: most tokens come from the prompt.
    let prompt: String = (0..40)
        .map(|i| format!("    value_{i} = config.get(\"value_{i}\")\n"))
        .collect();
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 48, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    let d = &v["usage"]["completion_tokens_details"];
    let accepted = d["accepted_prediction_tokens"].as_u64().unwrap();
    assert!(accepted * 2 > 48, "{v}");
    // Cancel a speculating stream after its first tokens.
    let r = common::agent()
        .post(format!("{}/v1/completions", s.base))
        .header("content-type", "application/json")
        .send(
            json!({"prompt": prompt, "max_tokens": 400, "temperature": 0, "stream": true,
                   "logit_bias": {"0": -100, "4": -100, "5": -100}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
    let mut reader = std::io::BufReader::new(r.into_body().into_reader());
    let mut line = String::new();
    for _ in 0..6 {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    drop(reader);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, m) = s.get("/metrics");
        if m.contains("greencode_num_requests_running{model=\"tiny-coder\"} 0") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled request kept its slot"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (st, v) = s.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(st, 200, "{v}");
}

#[test]
fn sampled_requests_draw_the_same_tokens_with_or_without_speculation() {
    // Each emitted token is the target's own draw from its row, with the
    // request's next random number: for a seed, the same text and the same
    // log-probabilities (the distribution is the target's, exactly). A
    // rule that kept a draft token without drawing it would differ here.
    let plain = Server::start(&["--kv-dtype", "f32"]);
    let spec = Server::start(&["--kv-dtype", "f32", "--speculate", "lookup"]);
    let requests: Vec<Value> = held_out_fim()
        .into_iter()
        .take(30)
        .enumerate()
        .map(|(i, mut b)| {
            b["temperature"] = json!(0.7);
            b["top_p"] = json!(0.95);
            b["seed"] = json!(i);
            b["logprobs"] = json!(2);
            b["frequency_penalty"] = json!(0.3);
            b
        })
        .collect();
    let answer = |s: &Server, b: &Value| {
        let (st, v) = s.post("/v1/completions", b);
        assert_eq!(st, 200, "{v}");
        (
            text(&v),
            v["choices"][0]["logprobs"].clone(),
            v["usage"]["completion_tokens_details"].clone(),
        )
    };
    let mut accepted = 0;
    for b in &requests {
        let (want, want_lp, _) = answer(&plain, b);
        let (got, got_lp, details) = answer(&spec, b);
        assert_eq!(got, want, "{b}");
        assert_eq!(got_lp, want_lp, "{b}");
        accepted += details["accepted_prediction_tokens"].as_u64().unwrap_or(0);
    }
    assert!(accepted > 20, "sampled requests accepted only {accepted} draft tokens");
    // In batches of 4 as well.
    for chunk in requests.chunks(4) {
        let got: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk.iter().map(|b| scope.spawn(|| answer(&spec, b).0)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want: Vec<String> = chunk.iter().map(|b| answer(&plain, b).0).collect();
        assert_eq!(got, want);
    }
}

#[test]
fn generate_gives_the_same_tokens_with_lookup_or_a_pruned_draft_model() {
    use greencode::generate::draft::DraftModel;
    use greencode::generate::sampling::SamplingParams;
    use greencode::generate::{generate, generate_with, Flow, GenerationRequest, LoadedModel};

    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    // The draft: tiny-coder pruned here (two layers, FFN 512, vocabulary
    // pruned: its ids map back through the token text).
    let (_dir, pruned) = common::fast_pruned_copy();
    let d = LoadedModel::load_cpu(&pruned).unwrap();
    assert!(d.tokenizer.vocab_size() < p.tokenizer.vocab_size());
    let draft = DraftModel::new(d.model, &d.tokenizer, &p.tokenizer).unwrap();
    let fim_stops = p.tokenizer.fim().unwrap().stop.clone();
    let mut prompts: Vec<(Vec<u32>, Vec<u32>)> = common::golden()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (serde_json::from_value(c["ids"].clone()).unwrap(), Vec::new()))
        .collect();
    for body in held_out_fim() {
        let ids = p
            .tokenizer
            .fim_prompt(body["prompt"].as_str().unwrap(), body["suffix"].as_str().unwrap())
            .unwrap();
        prompts.push((ids, fim_stops.clone()));
    }
    let sampled = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: Some(11),
        ..SamplingParams::default()
    };
    let (mut drafted, mut accepted) = (0, 0);
    let (mut by_draft, mut held_by_draft) = (0, 0);
    for (i, (ids, stops)) in prompts.iter().enumerate() {
        // Every prompt greedy; every fifth also sampled with a seed.
        let samplings = if i % 5 == 0 {
            vec![SamplingParams::greedy(), sampled.clone()]
        } else {
            vec![SamplingParams::greedy()]
        };
        for sampling in samplings {
            let mut req = GenerationRequest::new(ids.clone(), 32, sampling);
            req.stop_ids = stops.clone();
            let plain = generate(&p.model, &req, |_, _| Flow::Continue).unwrap();
            req.speculate_k = 8;
            let spec = generate(&p.model, &req, |_, _| Flow::Continue).unwrap();
            assert_eq!(plain.token_ids, spec.token_ids, "prompt {i}");
            assert_eq!(plain.finish_reason, spec.finish_reason, "prompt {i}");
            assert_eq!((plain.drafted, plain.accepted), (0, 0));
            drafted += spec.drafted;
            accepted += spec.accepted;
            let with_draft = generate_with(&p.model, Some(&draft), &req, |_, _| Flow::Continue).unwrap();
            assert_eq!(plain.token_ids, with_draft.token_ids, "prompt {i}, draft model");
            assert_eq!(plain.finish_reason, with_draft.finish_reason, "prompt {i}, draft model");
            by_draft += with_draft.drafted;
            held_by_draft += with_draft.accepted;
        }
    }
    // A draft model that does not pay is switched off after a few rounds
    // (on tiny-coder none pays), so fewer of its tokens are counted.
    eprintln!("draft model: drafted {by_draft}, accepted {held_by_draft}");
    assert!(
        held_by_draft > 20 && held_by_draft <= by_draft,
        "draft model: drafted {by_draft}, accepted {held_by_draft}"
    );
    assert!(
        accepted > 100 && accepted <= drafted,
        "drafted {drafted}, accepted {accepted}"
    );

    // The command line reports it.
    let out = common::generate_json(
        &common::tiny_coder(),
        &[
            "--prompt",
            "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2",
            "--max-tokens",
            "24",
            "--speculate",
            "lookup",
        ],
    );
    assert!(out["drafted_tokens"].as_u64().unwrap() > 0, "{out}");
}

#[test]
fn sampled_tokens_with_speculation_follow_the_targets_distribution() {
    // Many seeds of a lookup-speculated continuation of repetitive code
    // (most tokens come from verify rows), sampled at temperature 0.6. For
    // each emitted token, the target's distribution for its prefix (one
    // forward pass over the whole text) gives the chance of each rank:
    // the most likely token, the second, the 3rd–5th, the rest. Observed
    // counts of those ranks against the summed chances: a chi-square test
    // (3 degrees of freedom). A rule that keeps a likely draft token without
    // drawing it fails it (checked by breaking `generate::sequence` on
    // purpose: a draft token of probability above 0.2 kept undrawn).
    use candle_core::{Tensor, D};
    use greencode::generate::sampling::SamplingParams;
    use greencode::generate::{generate, Flow, GenerationRequest, LoadedModel};

    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let source: String = (0..8)
        .map(|i| format!("def add_{i}(x):\n    return x + {i}\n\n\n"))
        .collect();
    let ids = p.tokenizer.encode(&source).unwrap();
    let (mut observed, mut expected) = ([0f64; 4], [0f64; 4]);
    let class = |rank: usize| match rank {
        0 => 0,
        1 => 1,
        2..=4 => 2,
        _ => 3,
    };
    let (mut drafted, mut accepted, mut n) = (0, 0, 0);
    let temperature = 0.6;
    for seed in 0..160 {
        // No stop ids: every sequence draws all its tokens.
        let sampling = SamplingParams {
            temperature,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        let mut req = GenerationRequest::new(ids.clone(), 16, sampling);
        req.speculate_k = 8;
        let out = generate(&p.model, &req, |_, _| Flow::Continue).unwrap();
        drafted += out.drafted;
        accepted += out.accepted;
        let all: Vec<u32> = ids.iter().chain(&out.token_ids).copied().collect();
        let logits = p
            .model
            .logits(
                &Tensor::new(all.as_slice(), p.model.device())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        let probs = candle_nn::ops::softmax(&(logits / f64::from(temperature)).unwrap(), D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, &x) in out.token_ids.iter().enumerate() {
            let row = &probs[ids.len() + i - 1];
            let mut ranked: Vec<usize> = (0..row.len()).collect();
            ranked.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for (rank, &t) in ranked.iter().enumerate() {
                expected[class(rank)] += row[t] as f64;
                if t == x as usize {
                    observed[class(rank)] += 1.0;
                }
            }
            n += 1;
        }
    }
    let chi2: f64 = observed.iter().zip(&expected).map(|(o, e)| (o - e).powi(2) / e).sum();
    eprintln!(
        "ranks 1, 2, 3–5, rest: observed {observed:?}, expected {expected:.1?}; χ² {chi2:.1}; drafted {drafted}, accepted {accepted} of {n}"
    );
    assert!(
        accepted > n / 4,
        "too few drafted tokens kept to test: {accepted} of {n}"
    );
    // 16.27: the 0.1% critical value of χ² with 3 degrees of freedom.
    assert!(
        chi2 < 16.27,
        "token frequencies differ from the target's distribution: χ² {chi2:.1}"
    );
}
