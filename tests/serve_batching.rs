//! Continuous batching over HTTP: concurrent requests give the same tokens
//! as alone, and a client that leaves frees its slot.

mod common;

use common::{stream_text, Server};
use serde_json::{json, Value};

fn body(i: usize) -> Value {
    let snippets = [
        "def fibonacci(n):\n",
        "import os\n",
        "class Stack:\n    def push(self, x):\n",
        "for i in range(3):\n",
    ];
    json!({"prompt": format!("{}{}", "# part\n".repeat(i % 4), snippets[i % 4]), "max_tokens": 24,
           "temperature": 0, "token_healing": false, "logit_bias": {"0": -100}, "stream": true})
}

#[test]
fn sixteen_concurrent_greedy_streams_equal_the_same_requests_alone() {
    let s = std::sync::Arc::new(Server::start(&["--max-batch", "16"]));
    let alone: Vec<String> = (0..16)
        .map(|i| stream_text(&s.stream("/v1/completions", &body(i))))
        .collect();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let s = std::sync::Arc::clone(&s);
            std::thread::spawn(move || stream_text(&s.stream("/v1/completions", &body(i))))
        })
        .collect();
    let together: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for i in 0..16 {
        assert_eq!(together[i], alone[i], "request {i} differs when batched");
    }
    // They really ran together: the batch reached more than one sequence.
    let log = s.log_with("\"event\":\"request\"", 32);
    assert_eq!(log.iter().filter(|l| l.contains("\"event\":\"request\"")).count(), 32);
}

#[test]
fn a_disconnected_stream_frees_its_slot() {
    let s = Server::start(&[]);
    let resp = common::agent()
        .post(format!("{}/v1/completions", s.base))
        .send(json!({"prompt": "import os\n", "max_tokens": 1000, "stream": true, "logit_bias": {"0": -100, "4": -100, "5": -100}}).to_string().as_bytes())
        .unwrap();
    let mut reader = std::io::BufReader::new(resp.into_body().into_reader());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut reader, &mut first).unwrap();
    let running = |s: &Server| -> f64 {
        let m = s.get("/metrics").1;
        m.lines()
            .find(|l| l.starts_with("greencode_num_requests_running{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    assert_eq!(running(&s), 1.0);
    drop(reader);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while running(&s) != 0.0 {
        assert!(std::time::Instant::now() < deadline, "the slot was never freed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let m = s.get("/metrics").1;
    assert!(
        m.contains("greencode_request_success_total{finished_reason=\"cancelled\",model=\"tiny-coder\"} 1"),
        "{m}"
    );
    // The server still answers.
    let (st, _) = s.post("/v1/completions", &json!({"prompt": "x = ", "max_tokens": 2}));
    assert_eq!(st, 200);
}

#[test]
fn bench_serve_loads_a_server_and_reports_each_level() {
    let model = common::tiny_coder();
    let out = common::greencode(&[
        "--threads",
        "1",
        "bench",
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--clients",
        "1,3",
        "--prompt-tokens",
        "32",
        "--new-tokens",
        "6",
        "--requests-per-client",
        "1",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let levels = v.as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (level, clients) in levels.iter().zip([1, 3]) {
        assert_eq!(level["clients"], clients);
        assert_eq!(level["errors"], 0);
        assert_eq!(level["requests"], clients);
        assert_eq!(level["tokens"], 6 * clients, "{level}");
        assert!(level["tokens_per_second"].as_f64().unwrap() > 0.0);
        assert!(level["ttft"]["p50_ms"].as_f64().unwrap() > 0.0);
    }
    // Against an explicit URL (any OpenAI-compatible server) too.
    let s = Server::start(&[]);
    let out = common::greencode(&[
        "bench",
        "serve",
        "--url",
        &s.base,
        "--model-name",
        "tiny-coder",
        "--clients",
        "2",
        "--new-tokens",
        "3",
        "--prompt-tokens",
        "16",
        "--requests-per-client",
        "1",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["tokens"], 6);
}

#[test]
fn a_resent_prompt_with_one_more_line_reuses_the_cached_prefix() {
    let text = std::fs::read_to_string(common::tiny_coder().join("MODEL_CARD.md")).unwrap();
    let base: String = text.chars().take(2600).collect();
    let longer = format!("{base}\nx = 1\n");
    // One token: the time measured is the time to first token.
    let req = |prompt: &str| json!({"prompt": prompt, "max_tokens": 1, "temperature": 0, "token_healing": false});
    let timed = |s: &Server, prompt: &str| {
        let t = std::time::Instant::now();
        let (st, v) = s.post("/v1/completions", &req(prompt));
        assert_eq!(st, 200, "{v}");
        (t.elapsed().as_secs_f64(), v)
    };
    let warm = Server::start(&[]);
    let (_, first) = timed(&warm, &base);
    let n = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(n > 500, "a long prompt: {n}");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (t_warm, second) = timed(&warm, &longer);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // Whole KV blocks are shared: all but the partly filled last one.
    let block = greencode::model::KV_BLOCK as u64;
    assert!(cached + block >= n, "reused {cached} of {n} shared tokens");
    let m = warm.get("/metrics").1;
    assert!(
        m.contains(&format!(
            "greencode_prefix_cache_hit_tokens_total{{model=\"tiny-coder\"}} {cached}"
        )),
        "{m}"
    );
    // Same answer as a server without the cache, and much sooner.
    let cold = Server::start(&["--prefix-cache", "0"]);
    let (t_cold, third) = timed(&cold, &longer);
    assert_eq!(third["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(second["choices"][0]["text"], third["choices"][0]["text"]);
    assert!(t_cold > 5.0 * t_warm, "cold {t_cold:.3} s vs warm {t_warm:.3} s");
}
