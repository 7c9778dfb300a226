//! Several models behind one server, over real HTTP: tiny-coder and a
//! pruned copy (made here by a fast prune, with its own pruned vocabulary)
//! each answer by name exactly as when served alone, both are listed and
//! labelled in `/metrics`, concurrent streams to both finish, and the
//! energy the server measured is split between them and idle time.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use common::{stream_text, tiny_coder, Server};
use serde_json::{json, Value};

struct Fixture {
    _dir: tempfile::TempDir,
    pruned: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (dir, pruned) = common::fast_pruned_copy();
        Fixture { _dir: dir, pruned }
    })
}

fn metrics(server: &Server) -> HashMap<String, f64> {
    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn completion(model: Option<&str>, prompt: &str) -> Value {
    let mut body = json!({"prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 1});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    body
}

const PROMPTS: [&str; 3] = [
    "def fibonacci(n):\n",
    "import os\n\ndef list_python_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
];

#[test]
fn two_models_answer_by_name_as_each_does_alone_and_share_the_meter() {
    let f = fixture();
    let (tiny, pruned) = (tiny_coder(), f.pruned.to_str().unwrap().to_owned());
    let both = Server::start(&[
        "--model",
        &format!("orig={}", tiny.display()),
        "--model",
        &format!("small={pruned}"),
        "--energy",
        "estimated",
    ]);
    let alone = [
        Server::start(&["--energy", "estimated"]),
        Server::start(&["--model", &pruned, "--energy", "estimated"]),
    ];

    // Listed, with what each is.
    let (status, list) = both.get("/v1/models");
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&list).unwrap();
    let cards = list["data"].as_array().unwrap();
    let ids: Vec<&str> = cards.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["orig", "small"]);
    let params: Vec<u64> = cards.iter().map(|c| c["parameters"].as_u64().unwrap()).collect();
    assert!(params[1] < params[0], "pruned {} vs {}", params[1], params[0]);
    assert_eq!(cards[1]["pruned_from"], "tiny-coder");
    assert_eq!(cards[1]["parameters_before_pruning"].as_u64(), Some(params[0]));
    assert!(cards[0].get("pruned_from").is_none());

    // Each name gets its model's tokens, equal to that model served alone.
    let mut joules = [0.0f64; 2];
    for (i, name) in ["orig", "small"].into_iter().enumerate() {
        for p in PROMPTS {
            let (s1, got) = both.post("/v1/completions", &completion(Some(name), p));
            let (s2, want) = alone[i].post("/v1/completions", &completion(None, p));
            assert_eq!((s1, s2), (200, 200), "{got} {want}");
            assert_eq!(got["model"], name);
            assert_eq!(got["choices"][0]["text"], want["choices"][0]["text"], "{name} on {p:?}");
            assert_eq!(got["choices"][0]["logprobs"], want["choices"][0]["logprobs"], "{name}");
            joules[i] += got["usage"]["energy_joules"].as_f64().unwrap();
        }
    }
    // The two models differ (else the test above proves nothing).
    let a = both.post("/v1/completions", &completion(Some("orig"), PROMPTS[1])).1;
    let b = both.post("/v1/completions", &completion(Some("small"), PROMPTS[1])).1;
    assert_ne!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // No name: the first model. An unknown name: 404, naming both.
    let (status, none) = both.post("/v1/completions", &completion(None, PROMPTS[1]));
    assert_eq!(status, 200);
    assert_eq!(
        (none["model"].clone(), none["choices"][0]["text"].clone()),
        ("orig".into(), a["choices"][0]["text"].clone())
    );
    for route in ["/v1/completions", "/v1/chat/completions", "/infill"] {
        let (status, err) = both.post(route, &json!({"model": "large", "prompt": "x", "messages": [{"role": "user", "content": "x"}], "input_prefix": "x"}));
        assert_eq!(status, 404, "{route}: {err}");
        assert_eq!(err["error"]["code"], "model_not_found");
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("`large`") && msg.contains("`orig`") && msg.contains("`small`"),
            "{msg}"
        );
    }
    let cost = |v: &Value| v["usage"]["energy_joules"].as_f64().unwrap();
    joules[0] += cost(&a) + cost(&none);
    joules[1] += cost(&b);

    // Concurrent streams to both all finish, each with its model's text.
    let want: Vec<String> = (0..8)
        .map(|i| {
            let v = alone[i % 2]
                .post("/v1/completions", &completion(None, PROMPTS[i % 3]))
                .1;
            v["choices"][0]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    let streamed: Vec<(String, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let both = &both;
                scope.spawn(move || {
                    let mut body = completion(Some(["orig", "small"][i % 2]), PROMPTS[i % 3]);
                    body["stream"] = json!(true);
                    body["stream_options"] = json!({"include_usage": true});
                    let events = both.stream("/v1/completions", &body);
                    assert_eq!(events.last().unwrap().1, "[DONE]");
                    let usage: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
                    (stream_text(&events), usage["usage"]["energy_joules"].as_f64().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (text, j)) in streamed.iter().enumerate() {
        assert_eq!(text, &want[i], "stream {i}");
        joules[i % 2] += j;
    }

    // Both labelled; each model's energy is its requests' energy; models
    // and idle (no model label) make up every joule counted.
    let m = metrics(&both);
    for (name, q) in [("orig", "none"), ("small", "none")] {
        let pruned_from = if name == "small" { "tiny-coder" } else { "" };
        let info =
            format!("greencode_model_info{{model=\"{name}\",pruned_from=\"{pruned_from}\",quantization=\"{q}\"}}");
        assert_eq!(m.get(&info), Some(&1.0), "{info}");
    }
    let energy = |model: &str| m[&format!("greencode_energy_joules_total{{model=\"{model}\",source=\"estimated\"}}")];
    for (i, name) in ["orig", "small"].into_iter().enumerate() {
        let counted = energy(name);
        assert!(
            (counted - joules[i]).abs() <= 0.01 * joules[i],
            "{name}: metrics {counted} J, responses {} J",
            joules[i]
        );
        assert!(counted > 0.0);
        assert_eq!(
            m[&format!("greencode_request_success_total{{finished_reason=\"length\",model=\"{name}\"}}")] as usize,
            if i == 0 { 3 + 1 + 1 + 4 } else { 3 + 1 + 4 }
        );
    }
    let idle = m["greencode_idle_energy_joules_total{model=\"\",source=\"estimated\"}"];
    assert!(idle > 0.0);
    assert_eq!(energy(""), idle, "what belongs to no model is idle");
    // One KV pool for the process.
    assert!(m.contains_key("greencode_kv_cache_blocks{model=\"\",state=\"free\"}"));
    assert!(!m
        .keys()
        .any(|k| k.starts_with("greencode_kv_cache_blocks{model=\"orig\"")));
}

#[test]
fn a_model_value_that_names_no_model_is_refused_clearly() {
    let out = common::greencode(&["serve", "--model", "a=/no/such/model", "--port", "0"]);
    common::assert_clean_error(&out, &["--model", "/no/such/model"]);
    let tiny = tiny_coder();
    let t = tiny.to_str().unwrap();
    let out = common::greencode(&["serve", "--model", &format!("a={t},fast"), "--port", "0"]);
    common::assert_clean_error(&out, &["unknown option \"fast\"", "quantize=q8_0"]);
    let out = common::greencode(&["serve", "--model", t, "--model", t, "--port", "0"]);
    common::assert_clean_error(&out, &["two models are served as `tiny-coder`"]);
}
