//! llama.cpp's routes as llama-server's clients call them: `/completion`
//! (text or token ids, whole or streamed), `/infill` warm-up requests with
//! `n_predict: 0` that fill the cache for the next request, `timings` and
//! `tokens_cached` in every final answer, and the fields llama.vscode and
//! llama.vim send besides (ignored, as llama-server ignores what it does
//! not know).

mod common;

use common::Server;
use serde_json::{json, Value};

/// Fields llama.vscode and llama.vim add to their requests that these
/// routes accept without acting on them (their exact bodies, and
/// `response_fields`, are `tests/editor_clients.rs`'s).
fn client_extras(body: &mut Value) {
    for (k, v) in [
        ("cache_prompt", json!(true)),
        ("samplers", json!(["top_k", "top_p", "infill"])),
        ("t_max_prompt_ms", json!(500)),
        ("id_slot", json!(0)),
    ] {
        body[k] = v;
    }
}

fn check_timings(v: &Value) {
    let t = &v["timings"];
    for k in ["cache_n", "prompt_n", "predicted_n"] {
        assert!(t[k].is_u64(), "timings.{k}: {v}");
    }
    for k in ["prompt_ms", "predicted_ms", "prompt_per_second", "predicted_per_second"] {
        assert!(t[k].as_f64().is_some_and(|x| x >= 0.0), "timings.{k}: {v}");
    }
    assert_eq!(t["cache_n"], v["tokens_cached"]);
    assert_eq!(t["predicted_n"], v["tokens_predicted"]);
    assert_eq!(
        t["cache_n"].as_u64().unwrap() + t["prompt_n"].as_u64().unwrap(),
        v["tokens_evaluated"].as_u64().unwrap()
    );
}

#[test]
fn completion_answers_golden_tokens_whole_and_streamed() {
    let s = Server::start(&[]);
    let g = common::golden();
    let case = &g["cases"][0];
    let mut body = json!({"prompt": case["ids"], "n_predict": 32, "temperature": 0});
    client_extras(&mut body);
    let (st, v) = s.post("/completion", &body);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["content"], case["greedy32_text"]);
    assert_eq!(v["stop"], true);
    assert_eq!(v["model"], "tiny-coder");
    assert_eq!(v["tokens_predicted"], 32);
    assert_eq!(v["stop_type"], "limit");
    check_timings(&v);

    body["stream"] = json!(true);
    let events = s.stream("/completion", &body);
    let parsed: Vec<Value> = events.iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    let last = parsed.last().unwrap();
    assert_eq!(last["stop"], true);
    check_timings(last);
    let text: String = parsed.iter().map(|e| e["content"].as_str().unwrap()).collect();
    assert_eq!(text, case["greedy32_text"].as_str().unwrap());
    assert!(parsed[..parsed.len() - 1]
        .iter()
        .all(|e| e["stop"] == false && e.get("timings").is_none()));

    // Text prompts work too.
    let (st, v) = s.post("/completion", &json!({"prompt": "def add(a, b):\n", "n_predict": 8}));
    assert_eq!(st, 200, "{v}");
    assert!(v["tokens_predicted"].as_u64().unwrap() >= 1);
}

#[test]
fn an_n_predict_0_warm_up_fills_the_cache_for_the_next_request() {
    let s = Server::start(&[]);
    let text = std::fs::read_to_string(common::tiny_coder().join("MODEL_CARD.md")).unwrap();
    let prefix: String = text.chars().take(1500).collect();
    // llama.vscode's warm-up: the context around the cursor, nothing to predict.
    let mut warm = json!({
        "input_prefix": prefix,
        "input_suffix": "\n",
        "input_extra": [{"filename": "util.py", "text": "def helper():\n    return 1\n"}],
        "prompt": "",
        "n_predict": 0,
        "t_max_predict_ms": 1,
    });
    client_extras(&mut warm);
    let (st, v) = s.post("/infill", &warm);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["content"], "");
    assert_eq!(v["tokens_predicted"], 0);
    assert_eq!(v["tokens_cached"], 0);
    let evaluated = v["tokens_evaluated"].as_u64().unwrap();
    assert!(evaluated > 300, "{v}");
    check_timings(&v);
    // The real request a moment later: the same context, tokens to predict.
    let mut real = warm.clone();
    real["n_predict"] = json!(16);
    real["temperature"] = json!(0);
    let (st, v) = s.post("/infill", &real);
    assert_eq!(st, 200, "{v}");
    let cached = v["tokens_cached"].as_u64().unwrap();
    let block = greencode::model::KV_BLOCK as u64;
    assert!(
        cached + block >= evaluated,
        "reused {cached} of the warm-up's {evaluated} tokens: {v}"
    );
    assert!(v["tokens_predicted"].as_u64().unwrap() >= 1);
    check_timings(&v);
}

#[test]
fn a_raw_fim_prompt_with_special_token_stops_is_served_as_given() {
    // Continue's autocomplete against an OpenAI-compatible server: it
    // writes the FIM prompt itself and sends `raw` with the FIM markers as
    // stop strings (more than OpenAI's four).
    let s = Server::start(&[]);
    let g = common::golden();
    let (_, _, want) = common::fim_case();
    let stops = [
        "<|endoftext|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|file_sep|>",
        "\n\n\n",
    ];
    let body = json!({
        "model": "tiny-coder",
        "prompt": g["cases"][3]["prompt"],
        "raw": true,
        "max_tokens": 32,
        "temperature": 0,
        "stop": stops,
    });
    let (st, v) = s.post("/v1/completions", &body);
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["usage"]["prompt_tokens"], 24,
        "the prompt's FIM markers are single tokens: {v}"
    );
    let text = v["choices"][0]["text"].as_str().unwrap();
    // The same infill as the `suffix` form, cut at the text stop if it occurs.
    assert_eq!(text, want.split("\n\n\n").next().unwrap());
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = s.stream("/v1/completions", &streamed);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    // Seventeen text stops are refused, naming the field (Continue sends up
    // to a dozen; OpenAI's own limit of 4 would refuse it).
    let many: Vec<String> = (0..17).map(|i| format!("stop{i}")).collect();
    let (st, v) = s.post("/v1/completions", &json!({"prompt": "x", "stop": many}));
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "stop");
}

/// Each token's text of an unrestricted greedy `/completion` (one stream event each).
fn pieces(s: &Server, prompt: &str, n: usize) -> Vec<String> {
    let events = s.stream(
        "/completion",
        &json!({"prompt": prompt, "n_predict": n, "temperature": 0, "stream": true}),
    );
    events
        .iter()
        .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap())
        .filter(|e| e["stop"] == false)
        .map(|e| e["content"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn n_indent_and_t_max_predict_ms_stop_where_llama_server_would() {
    let s = Server::start(&[]);
    let prompt = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n";
    let all = pieces(&s, prompt, 64);
    let text: String = all.concat();
    let lines: Vec<&str> = text.split('\n').collect();
    assert!(lines.len() > 2, "the completion needs several lines: {text:?}");
    // n_indent: the first later line with text indented below the minimum
    // stops generation, its text cut after its leading blanks.
    let indent = |l: &str| l.chars().take_while(|c| *c == ' ' || *c == '\t').count();
    let deepest = lines[1..]
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent(l))
        .max()
        .unwrap();
    let n_indent = deepest + 1;
    let mut want = lines[0].to_owned();
    for l in &lines[1..] {
        want.push('\n');
        if !l.trim().is_empty() && indent(l) < n_indent {
            want.push_str(&l[..indent(l)]);
            break;
        }
        want.push_str(l);
    }
    let (st, v) = s.post(
        "/completion",
        &json!({"prompt": prompt, "n_predict": 64, "temperature": 0, "n_indent": n_indent}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["content"], want.as_str(), "n_indent {n_indent} over {text:?}");
    // t_max_predict_ms: past the time, generation ends with the first token
    // that carries a newline (after the first token, decoded at once).
    let (st, v) = s.post(
        "/completion",
        &json!({"prompt": prompt, "n_predict": 64, "temperature": 0, "t_max_predict_ms": 1}),
    );
    assert_eq!(st, 200, "{v}");
    let got = v["content"].as_str().unwrap();
    let ends: Vec<String> = (0..all.len())
        .filter(|&k| all[k].contains('\n'))
        .map(|k| all[..=k].concat())
        .collect();
    assert!(
        ends.iter().any(|e| e == got),
        "{got:?} does not end at a newline token of {all:?}"
    );
    assert!(got.len() < text.len(), "nothing was cut: {got:?}");
    assert_eq!(v["stop_type"], "limit");
}

#[test]
fn n_cmpl_returns_several_candidates_that_share_the_prompts_cache() {
    let s = Server::start(&[]);
    let text = std::fs::read_to_string(common::tiny_coder().join("MODEL_CARD.md")).unwrap();
    let prompt: String = text.chars().take(600).collect();
    let body = json!({"prompt": prompt, "n_predict": 8, "temperature": 0.9, "seed": 7, "n_cmpl": 3});
    let (st, v) = s.post("/completion", &body);
    assert_eq!(st, 200, "{v}");
    let list = v.as_array().expect("several candidates come as an array");
    assert_eq!(list.len(), 3);
    for (i, c) in list.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert!(c["tokens_predicted"].as_u64().unwrap() >= 1, "{c}");
        check_timings(c);
    }
    // The prompt ran once: the other candidates took its full blocks.
    let n = list[0]["tokens_evaluated"].as_u64().unwrap();
    let m = s.get("/metrics").1;
    let computed: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("greencode_prompt_tokens_computed_total{model=\"tiny-coder\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(n > 100, "{n}");
    let block = greencode::model::KV_BLOCK as u64;
    assert!(
        computed < n + 2 * block,
        "computed {computed} for three candidates of a {n}-token prompt"
    );
    // Streamed: every candidate's events carry its index and end with stop.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events: Vec<Value> = s
        .stream("/completion", &streamed)
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for i in 0..3u64 {
        let mine: Vec<&Value> = events.iter().filter(|e| e["index"] == i).collect();
        assert!(
            mine.len() >= 2 && mine.last().unwrap()["stop"] == true,
            "candidate {i}: {mine:?}"
        );
    }
    // Seeded: the same candidates again.
    let (_, again) = s.post("/completion", &body);
    let contents = |x: &Value| {
        x.as_array()
            .unwrap()
            .iter()
            .map(|c| c["content"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(contents(&again), contents(&v));
    let (st, v) = s.post("/completion", &json!({"prompt": "x", "n_cmpl": 0}));
    assert_eq!(st, 400);
    assert_eq!(v["error"]["param"], "n_cmpl");
}

#[test]
fn the_infill_sampler_ends_fim_suggestions_sooner_as_llama_server_does() {
    let s = Server::start(&[]);
    let dir = greencode::data::corpus::stdlib_dir().unwrap();
    let files = greencode::data::corpus::eval_files(&dir, 12).unwrap();
    let mut predicted = [0u64; 2];
    let mut ended = [0u64; 2];
    for f in &files {
        let text = greencode::data::corpus::read_text(f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() < 80 {
            continue;
        }
        let at = lines.len() / 2;
        for (i, samplers) in [json!(["top_k", "top_p"]), json!(["top_k", "top_p", "infill"])]
            .iter()
            .enumerate()
        {
            let body = json!({
                "input_prefix": lines[at - 30..at].join("\n") + "\n",
                "input_suffix": lines[at + 1..at + 9].join("\n") + "\n",
                "prompt": "",
                "n_predict": 64,
                "top_k": 40,
                "top_p": 0.99,
                "samplers": samplers,
                "seed": 7,
            });
            let (st, v) = s.post("/infill", &body);
            assert_eq!(st, 200, "{v}");
            predicted[i] += v["tokens_predicted"].as_u64().unwrap();
            ended[i] += u64::from(v["stop_type"] == "eos");
        }
    }
    // Same seed and candidates: without the rule's effect the two would agree.
    assert!(
        predicted[1] < predicted[0] && ended[1] > ended[0],
        "tokens without/with infill {predicted:?}, ended early {ended:?}"
    );
}

#[test]
fn stop_type_says_how_generation_ended() {
    let s = Server::start(&[]);
    let g = common::golden();
    let case = &g["cases"][0];
    let text = case["greedy32_text"].as_str().unwrap();
    // A stop string from the middle of the greedy text: llama.cpp's `word`.
    let word: String = text.chars().skip(10).take(4).collect();
    let (st, v) = s.post(
        "/completion",
        &json!({"prompt": case["ids"], "n_predict": 32, "temperature": 0, "stop": [word]}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["stop_type"], "word", "{v}");
    assert!(text.starts_with(v["content"].as_str().unwrap()));
    let (_, v) = s.post(
        "/completion",
        &json!({"prompt": case["ids"], "n_predict": 4, "temperature": 0}),
    );
    assert_eq!(v["stop_type"], "limit");
}
