//! `greencode serve` over real loopback HTTP: every completion parameter,
//! FIM, token healing, stop strings, streaming, chat and the IDE routes.

mod common;

use common::{golden, Server};
use serde_json::{json, Value};

fn text_of(v: &Value) -> &str {
    v["choices"][0]["text"].as_str().unwrap()
}

#[test]
fn greedy_completion_matches_golden_and_reports_usage() {
    let s = Server::start(&[]);
    // The startup log says which folder was loaded and how its weights are held.
    let loaded = format!("loaded {}: weights held as bf16", common::tiny_coder().display());
    assert!(s.log().iter().any(|l| l.contains(&loaded)), "{:?}", s.log());
    // ...and which CPU kernels run on which instruction sets.
    assert!(
        s.log()
            .iter()
            .any(|l| l.contains(&loaded) && l.contains("; CPU kernels ") && l.contains("(machine: ")),
        "{:?}",
        s.log()
    );
    let g = golden();
    let case = &g["cases"][0];
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": "tiny-coder", "prompt": case["prompt"], "max_tokens": 32, "temperature": 0, "token_healing": false}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(text_of(&v), case["greedy32_text"].as_str().unwrap());
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["model"], "tiny-coder");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["usage"]["prompt_tokens"], 10);
    assert_eq!(v["usage"]["completion_tokens"], 32);
    assert_eq!(v["usage"]["total_tokens"], 42);

    // Default max_tokens is 16; EOS ends with finish_reason "stop" and no text.
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "def f(x):\n    return x\n\n\n", "temperature": 0}),
    );
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": g["cases"][1]["prompt"], "temperature": 0, "token_healing": false}),
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(text_of(&v), "");
    assert_eq!(v["usage"]["completion_tokens"], 1);
}

#[test]
fn fim_on_every_route_returns_the_golden_infill() {
    let s = Server::start(&[]);
    let (prefix, suffix, want) = common::fim_case();
    let body = json!({"prompt": prefix, "suffix": suffix, "max_tokens": 32, "temperature": 0, "token_healing": false});
    let (status, v) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(text_of(&v), want);
    assert_eq!(v["usage"]["prompt_tokens"], 24);
    // Mistral's route answers in chat's shape, as Codestral's API does.
    let (_, v) = s.post("/v1/fim/completions", &body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], want);
    let (status, v) = s.post(
        "/infill",
        &json!({"input_prefix": prefix, "input_suffix": suffix, "n_predict": 32, "temperature": 0, "top_k": 1, "extra_llama_field": true}),
    );
    assert_eq!(status, 200, "{v}");
    // /infill heals by default: the same infill, token boundaries aside, begins alike.
    assert!(v["content"].as_str().unwrap().starts_with(" "), "{v}");
    assert_eq!(v["stop"], true);

    // Empty prompt with a suffix is valid.
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "", "suffix": "\n    return x\n", "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{v}");
}

#[test]
fn fim_generation_stops_at_fim_markers_which_never_show() {
    let s = Server::start(&[]);
    // Whatever the model generates, FIM and EOS markers never appear in the text.
    for seed in 0..4 {
        let (_, v) = s.post(
            "/v1/completions",
            &json!({"prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))\n", "max_tokens": 48, "seed": seed, "temperature": 1.0}),
        );
        let text = text_of(&v);
        assert!(!text.contains("<|"), "{text}");
    }
}

#[test]
fn long_fim_files_are_truncated_not_refused() {
    let s = Server::start(&[]);
    let prefix = "x = compute_something(alpha, beta)\n".repeat(200);
    let suffix = "y = compute_other(gamma)\n".repeat(200);
    let (status, headers, body) = s.post_raw(
        "/v1/completions",
        json!({"prompt": prefix, "suffix": suffix, "max_tokens": 8, "temperature": 0, "token_healing": false})
            .to_string()
            .as_bytes(),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    let dropped: usize = headers
        .get("x-greencode-truncated-tokens")
        .expect("truncation header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(dropped > 1000, "{dropped}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap() + 8, 1024);
}

#[test]
fn token_healing_completes_a_partial_identifier() {
    let s = Server::start(&[]);
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "def f(x):\n    retu", "max_tokens": 4, "temperature": 0}),
    );
    assert!(text_of(&v).starts_with("rn"), "{v}");
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "    retu", "max_tokens": 4, "temperature": 0}),
    );
    assert!(text_of(&v).starts_with("rn"), "{v}");
    // Off: the model continues after "retu" as tokenized.
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "def f(x):\n    retu", "max_tokens": 4, "temperature": 0, "token_healing": false}),
    );
    assert!(!text_of(&v).starts_with("rn"), "{v}");
    // With logprobs, the healed token is the text the client got ("rn"), its
    // alternatives are tokens that start with the backed-off "retu" (shown
    // past it), and at temperature 0 it is the best of them.
    for stream in [false, true] {
        let body = json!({"prompt": "def f(x):\n    retu", "max_tokens": 3, "temperature": 0,
                          "logprobs": 3, "stream": stream});
        let (text, lps): (String, Vec<Value>) = if stream {
            let events = s.stream("/v1/completions", &body);
            let lps = events
                .iter()
                .filter_map(|(_, data)| serde_json::from_str::<Value>(data).ok())
                .map(|e| e["choices"][0]["logprobs"].clone())
                .filter(Value::is_object)
                .collect();
            (common::stream_text(&events), lps)
        } else {
            let (_, v) = s.post("/v1/completions", &body);
            (text_of(&v).to_owned(), vec![v["choices"][0]["logprobs"].clone()])
        };
        let tokens: Vec<&str> = lps
            .iter()
            .flat_map(|l| l["tokens"].as_array().unwrap())
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(tokens.concat(), text, "{lps:?}");
        assert_eq!(tokens[0], "rn", "{lps:?}");
        let chosen = lps[0]["token_logprobs"][0].as_f64().unwrap();
        let top = lps[0]["top_logprobs"][0].as_object().unwrap();
        assert!(top.contains_key("rn"), "{top:?}");
        assert!(top.values().all(|l| l.as_f64().unwrap() <= chosen), "{top:?}");
        // A distribution over the tokens it could be: at most 1 in all.
        assert!(top.values().map(|l| l.as_f64().unwrap().exp()).sum::<f64>() <= 1.0 + 1e-4);
    }
    // Echoed, the prompt's tokens stop before the backed-off ones and the
    // healed token is whole: all of them join to the prompt and completion.
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "def f(x):\n    retu", "max_tokens": 3, "temperature": 0, "logprobs": 1, "echo": true}),
    );
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(text_of(&v).starts_with("def f(x):\n    return"), "{v}");
    assert_eq!(tokens.concat(), text_of(&v), "{v}");
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    let mut at = 0;
    for (t, o) in tokens.iter().zip(&offsets) {
        assert_eq!(*o, at, "{v}");
        at += t.chars().count() as u64;
    }
}

#[test]
fn stop_sequences_cut_across_token_boundaries() {
    let s = Server::start(&[]);
    let g = golden();
    let case = &g["cases"][0];
    // Greedy text: "#     return n[0]\n#     return n[1]\n…"; "n[1]" spans several tokens.
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": case["prompt"], "max_tokens": 32, "temperature": 0, "token_healing": false, "stop": ["n[1]", "zzz"]}),
    );
    assert_eq!(text_of(&v), "#     return n[0]\n#     return ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": case["prompt"], "max_tokens": 32, "temperature": 0, "token_healing": false, "stop": "]\n#"}),
    );
    assert_eq!(text_of(&v), "#     return n[0");
    // Streamed, the held-back text is cut the same way.
    let events = s.stream(
        "/v1/completions",
        &json!({"prompt": case["prompt"], "max_tokens": 32, "temperature": 0, "token_healing": false, "stop": ["n[1]"], "stream": true}),
    );
    assert_eq!(common::stream_text(&events), "#     return n[0]\n#     return ");
}

#[test]
fn seeds_reproduce_and_n_gives_distinct_choices() {
    let s = Server::start(&[]);
    let body = json!({"prompt": "import ", "max_tokens": 12, "temperature": 1.0, "seed": 1234});
    let (_, a) = s.post("/v1/completions", &body);
    let (_, b) = s.post("/v1/completions", &body);
    assert_eq!(text_of(&a), text_of(&b));
    let texts: Vec<String> = (0..4)
        .map(|seed| {
            let (_, v) = s.post(
                "/v1/completions",
                &json!({"prompt": "import ", "max_tokens": 12, "temperature": 1.0, "seed": seed}),
            );
            text_of(&v).to_owned()
        })
        .collect();
    assert!(
        texts.iter().any(|t| t != &texts[0]),
        "different seeds should differ: {texts:?}"
    );

    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "import ", "max_tokens": 8, "n": 3, "seed": 5}),
    );
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    assert_eq!(v["usage"]["prompt_tokens"], 1, "the prompt counts once");
    // top_k 1 and min_p/top_p extremes are greedy.
    let greedy = s
        .post(
            "/v1/completions",
            &json!({"prompt": "import ", "max_tokens": 8, "temperature": 0}),
        )
        .1;
    for params in [json!({"top_k": 1}), json!({"top_p": 0.000001}), json!({"min_p": 1.0})] {
        let mut body = json!({"prompt": "import ", "max_tokens": 8, "temperature": 1.0, "seed": 9});
        body.as_object_mut()
            .unwrap()
            .extend(params.as_object().unwrap().clone());
        let (_, v) = s.post("/v1/completions", &body);
        assert_eq!(text_of(&v), text_of(&greedy), "{params}");
    }
}

#[test]
fn penalties_and_logit_bias_change_greedy_output() {
    let s = Server::start(&[]);
    let g = golden();
    let prompt = g["cases"][0]["prompt"].clone();
    let base = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "token_healing": false});
    let plain = text_of(&s.post("/v1/completions", &base).1).to_owned();
    for extra in [
        json!({"presence_penalty": 2.0}),
        json!({"frequency_penalty": 2.0}),
        json!({"repetition_penalty": 1.8}),
        json!({"logit_bias": {"8": -100}}),
    ] {
        let mut body = base.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, v) = s.post("/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        assert_ne!(text_of(&v), plain, "{extra} should change the output");
    }
    // A +100 bias forces a token.
    let mut body = base.clone();
    body["logit_bias"] = json!({"66": 100});
    body["max_tokens"] = json!(3);
    let (_, v) = s.post("/v1/completions", &body);
    assert_eq!(text_of(&v), "]]]");
}

#[test]
fn logprobs_and_echo_have_openai_shapes() {
    let s = Server::start(&[]);
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "def fibonacci(n):\n", "max_tokens": 5, "temperature": 0, "logprobs": 2, "token_healing": false}),
    );
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["text_offset"].as_array().unwrap().len(), 5);
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, text_of(&v));
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the best one.
        let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!((lp["token_logprobs"][i].as_f64().unwrap() - best).abs() < 1e-5);
        assert!(best <= 0.0);
    }
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "def fibonacci(n):\n", "max_tokens": 3, "temperature": 0, "logprobs": 1, "echo": true, "token_healing": false}),
    );
    assert!(text_of(&v).starts_with("def fibonacci(n):\n"));
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 10 + 3);
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["token_logprobs"][1].as_f64().unwrap() < 0.0);
    // Prompt mean NLL from echo logprobs equals golden.json's.
    let nll: f64 = (1..10).map(|i| -lp["token_logprobs"][i].as_f64().unwrap()).sum::<f64>() / 9.0;
    assert!(
        (nll - golden()["cases"][0]["prompt_mean_nll"].as_f64().unwrap()).abs() < 1e-4,
        "{nll}"
    );
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn prompt_forms_strings_lists_and_token_ids() {
    let s = Server::start(&[]);
    let greedy = |prompt: Value| {
        let (status, v) = s.post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "token_healing": false}),
        );
        assert_eq!(status, 200, "{v}");
        v
    };
    let from_text = greedy(json!("def fibonacci(n):\n"));
    let ids = json!([326, 293, 474, 268, 3684, 78, 13, 83, 339, 204]);
    let from_ids = greedy(ids.clone());
    assert_eq!(text_of(&from_text), text_of(&from_ids));
    let many = greedy(json!(["def fibonacci(n):\n", "import os\n"]));
    assert_eq!(many["choices"].as_array().unwrap().len(), 2);
    assert_eq!(text_of(&many), text_of(&from_text));
    let lists = greedy(json!([ids, [961, 2047, 204]]));
    assert_eq!(lists["choices"][1]["text"], many["choices"][1]["text"]);
}

#[test]
fn streaming_chunks_reassemble_the_completion() {
    let s = Server::start(&[]);
    // Longer than one KV block (32 positions), so the second request can reuse it.
    let prompt = "# Sequences of numbers: Fibonacci, factorials and primes.\n# Every function takes a non-negative integer n and returns a list.\n\ndef fibonacci(n):\n";
    let body = json!({"prompt": prompt, "max_tokens": 20, "temperature": 0, "token_healing": false});
    let whole = s.post("/v1/completions", &body).1;
    assert!(whole["usage"]["prompt_tokens"].as_u64().unwrap() > 32);
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/completions", &sbody);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    let mut text = String::new();
    for c in &chunks {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "text_completion");
        if let Some(choice) = c["choices"].as_array().unwrap().first() {
            text.push_str(choice["text"].as_str().unwrap());
        }
    }
    assert!(chunks.len() > 5, "tokens arrive one chunk at a time");
    assert_eq!(text, text_of(&whole));
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    for key in ["prompt_tokens", "completion_tokens", "total_tokens", "energy_source"] {
        assert_eq!(usage["usage"][key], whole["usage"][key], "{key}");
    }
    // The same prompt again: its prefix came from the cache, so fewer FLOPs were spent.
    assert!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(usage["usage"]["flops"].as_u64().unwrap() < whole["usage"]["flops"].as_u64().unwrap());
    for c in &chunks[..chunks.len() - 1] {
        assert!(c["usage"].is_null());
    }
}

#[test]
fn chat_completions_plain_and_streamed() {
    let s = Server::start(&[]);
    let body = json!({"model": "tiny-coder", "messages": [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list"}], "max_tokens": 12, "temperature": 0});
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(!content.contains("### "));
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let events = s.stream("/v1/chat/completions", &sbody);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
}

#[test]
fn models_health_and_metrics() {
    let s = Server::start(&["--served-model-name", "coder-small"]);
    let (status, body) = s.get("/v1/models");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][0]["id"], "coder-small");
    assert_eq!(v["data"][0]["max_model_len"], 1024);
    assert_eq!(s.get("/health").0, 200);
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": "coder-small", "prompt": "x = ", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{v}");
    // One model served: any name reaches it (as llama-server answers), and
    // the answer names the model that gave it.
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": "tiny-coder", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "coder-small");
    let (status, metrics) = s.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("greencode_request_success_total{finished_reason=\"length\",model=\"coder-small\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("greencode_generation_tokens_total{model=\"coder-small\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("greencode_time_to_first_token_seconds_count{model=\"coder-small\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("greencode_num_requests_running{model=\"coder-small\"} 0"),
        "{metrics}"
    );
}

/// The entries of each `top_logprobs` object in the order the server wrote
/// them (`serde_json::Value` would sort the keys).
fn top_logprobs_in_order(body: &str) -> Vec<Vec<(String, f64)>> {
    #[derive(serde::Deserialize)]
    struct Ordered(#[serde(deserialize_with = "entries")] Vec<(String, f64)>);
    fn entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, f64)>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<(String, f64)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of log-probabilities")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = m.next_entry()? {
                    out.push(e);
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
    #[derive(serde::Deserialize)]
    struct Logprobs {
        top_logprobs: Vec<Ordered>,
    }
    #[derive(serde::Deserialize)]
    struct Choice {
        logprobs: Logprobs,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        choices: Vec<Choice>,
    }
    let b: Body = serde_json::from_str(body).unwrap();
    b.choices[0].logprobs.top_logprobs.iter().map(|o| o.0.clone()).collect()
}

#[test]
fn top_logprobs_come_most_likely_first() {
    let s = Server::start(&[]);
    let body = json!({"prompt": "def fibonacci(n):\n", "max_tokens": 6, "temperature": 0, "logprobs": 5, "token_healing": false});
    let (st, _, text) = s.post_raw("/v1/completions", body.to_string().as_bytes(), &[]);
    assert_eq!(st, 200, "{text}");
    let positions = top_logprobs_in_order(&text);
    assert_eq!(positions.len(), 6);
    for top in positions {
        assert!(top.len() >= 2, "{top:?}");
        assert!(
            top.windows(2).all(|w| w[0].1 >= w[1].1),
            "not most likely first: {top:?}"
        );
    }
}
