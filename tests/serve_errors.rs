//! Errors and limits of `greencode serve`: OpenAI-style JSON for every bad
//! request, the queue bound, the API key, hostile input, graceful shutdown.

mod common;

use common::Server;
use serde_json::{json, Value};

fn assert_error(status: u16, body: &str, want_status: u16, needle: &str) -> Value {
    assert_eq!(status, want_status, "{body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message: {body}"));
    assert!(v["error"]["type"].is_string(), "{body}");
    assert!(v["error"].as_object().unwrap().contains_key("param"), "{body}");
    assert!(v["error"].as_object().unwrap().contains_key("code"), "{body}");
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    v
}

#[test]
fn each_error_class_maps_to_its_status() {
    let s = Server::start(&[]);
    let (st, _, b) = s.post_raw("/v1/completions", b"{\"prompt\": ", &[]);
    assert_error(st, &b, 400, "invalid JSON");
    let (st, _, b) = s.post_raw("/v1/completions", br#"{"prompt": "x", "max_tokens": "ten"}"#, &[]);
    let v = assert_error(st, &b, 400, "max_tokens");
    assert_eq!(v["error"]["param"], "max_tokens");
    let long = "value = compute(alpha, beta)\n".repeat(400);
    let (st, _, b) = s.post_raw(
        "/v1/completions",
        json!({"prompt": long, "max_tokens": 16}).to_string().as_bytes(),
        &[],
    );
    let v = assert_error(st, &b, 400, "maximum context length is 1024 tokens");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("max_tokens is 16"));
    let big = vec![b' '; 2_000_001];
    let (st, _, b) = s.post_raw("/v1/completions", &big, &[]);
    assert_error(st, &b, 413, "2000000 bytes");
    // One model served: any name reaches it (#25); an editor's default
    // max_tokens beyond the context is cut to the room the prompt leaves.
    let (st, _, b) = s.post_raw(
        "/v1/completions",
        br#"{"prompt": "x", "model": "gpt-4", "max_tokens": 4096, "temperature": 0, "logit_bias": {"0": -100, "4": -100, "5": -100}}"#,
        &[],
    );
    assert_eq!(st, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["model"], "tiny-coder");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["total_tokens"], 1024);
    let (st, _, b) = s.post_raw("/v1/nothing", b"{}", &[]);
    assert_error(st, &b, 404, "/v1/nothing");
    assert_eq!(s.get("/v1/completions").0, 405);
    let (st, _, b) = s.post_raw("/v1/chat/completions", br#"{"messages": []}"#, &[]);
    assert_error(st, &b, 400, "messages");
}

#[test]
fn api_key_guards_api_routes_only() {
    let s = Server::start_env(&[], &[("GREENCODE_API_KEY", "sekret")]);
    let body = br#"{"prompt": "x", "max_tokens": 1}"#;
    let (st, _, b) = s.post_raw("/v1/completions", body, &[]);
    let v = assert_error(st, &b, 401, "API key");
    assert_eq!(v["error"]["type"], "authentication_error");
    let (st, _, b) = s.post_raw("/v1/completions", body, &[("authorization", "Bearer wrong")]);
    assert_error(st, &b, 401, "API key");
    let (st, _, b) = s.post_raw("/v1/completions", body, &[("authorization", "Bearer sekret")]);
    assert_eq!(st, 200, "{b}");
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.get("/metrics").0, 200);
    assert_eq!(s.get("/v1/models").0, 401);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let s = Server::start(&["--max-queue", "1"]);
    // Occupy the only slot with a long streaming request, read its first chunk.
    let agent = common::agent();
    let resp = agent
        .post(format!("{}/v1/completions", s.base))
        .send(json!({"prompt": "import os\n", "max_tokens": 1000, "stream": true, "temperature": 1.0, "logit_bias": {"0": -100, "4": -100, "5": -100}}).to_string().as_bytes())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut reader = std::io::BufReader::new(resp.into_body().into_reader());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut reader, &mut first).unwrap();
    assert!(first.starts_with("data: "));
    let (st, headers, b) = s.post_raw("/v1/completions", br#"{"prompt": "x", "max_tokens": 1}"#, &[]);
    let v = assert_error(st, &b, 429, "at capacity");
    assert_eq!(v["error"]["code"], "queue_full");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    drop(reader); // the client leaves: its slot frees at the next token
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (st, _, _) = s.post_raw("/v1/completions", br#"{"prompt": "x", "max_tokens": 1}"#, &[]);
        if st == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (_, metrics) = s.get("/metrics");
    assert!(
        metrics.contains("greencode_request_success_total{finished_reason=\"cancelled\",model=\"tiny-coder\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("greencode_requests_rejected_total{model=\"tiny-coder\",status=\"429\"}"),
        "{metrics}"
    );
}

#[test]
fn hostile_and_malformed_requests_get_4xx_json_and_the_server_survives() {
    let s = Server::start(&[]);
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let huge_prompt_list: Vec<String> = (0..100).map(|i| format!("p{i}")).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not json", b"hello".to_vec()),
        ("empty body", b"".to_vec()),
        ("array body", b"[1,2,3]".to_vec()),
        ("string body", b"\"prompt\"".to_vec()),
        ("null body", b"null".to_vec()),
        ("invalid utf-8", b"{\"prompt\": \"\xff\xfe\"}".to_vec()),
        ("deep json", format!("{{\"prompt\": {deep}}}").into_bytes()),
        ("10 MB body", vec![b'x'; 10_000_000]),
        ("unknown field", br#"{"prompt": "x", "frobnicate": true}"#.to_vec()),
        ("prompt number", br#"{"prompt": 5}"#.to_vec()),
        ("prompt object", br#"{"prompt": {"a": 1}}"#.to_vec()),
        ("prompt empty list", br#"{"prompt": []}"#.to_vec()),
        ("prompt missing", br#"{"max_tokens": 3}"#.to_vec()),
        ("prompt empty string", br#"{"prompt": ""}"#.to_vec()),
        ("prompt mixed list", br#"{"prompt": ["a", 1]}"#.to_vec()),
        ("prompt bad id", br#"{"prompt": [1, 99999999]}"#.to_vec()),
        ("prompt negative id", br#"{"prompt": [1, -5]}"#.to_vec()),
        (
            "too many prompts",
            json!({"prompt": huge_prompt_list}).to_string().into_bytes(),
        ),
        ("negative max_tokens", br#"{"prompt": "x", "max_tokens": -1}"#.to_vec()),
        ("zero max_tokens", br#"{"prompt": "x", "max_tokens": 0}"#.to_vec()),
        ("huge max_tokens", br#"{"prompt": "x", "max_tokens": 1e300}"#.to_vec()),
        (
            "max_tokens overflow",
            br#"{"prompt": "x", "max_tokens": 99999999999999999999999}"#.to_vec(),
        ),
        (
            "temperature string",
            br#"{"prompt": "x", "temperature": "hot"}"#.to_vec(),
        ),
        (
            "temperature negative",
            br#"{"prompt": "x", "temperature": -1}"#.to_vec(),
        ),
        ("temperature huge", br#"{"prompt": "x", "temperature": 1e9}"#.to_vec()),
        ("top_p zero", br#"{"prompt": "x", "top_p": 0}"#.to_vec()),
        ("top_p over", br#"{"prompt": "x", "top_p": 1.5}"#.to_vec()),
        ("top_k negative", br#"{"prompt": "x", "top_k": -7}"#.to_vec()),
        ("min_p over", br#"{"prompt": "x", "min_p": 2}"#.to_vec()),
        ("n zero", br#"{"prompt": "x", "n": 0}"#.to_vec()),
        ("n huge", br#"{"prompt": "x", "n": 1000000}"#.to_vec()),
        ("logprobs 6", br#"{"prompt": "x", "logprobs": 6}"#.to_vec()),
        ("logprobs bool", br#"{"prompt": "x", "logprobs": true}"#.to_vec()),
        ("echo string", br#"{"prompt": "x", "echo": "yes"}"#.to_vec()),
        ("stream number", br#"{"prompt": "x", "stream": 1}"#.to_vec()),
        (
            "stop seventeen",
            br#"{"prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}"#
                .to_vec(),
        ),
        ("stop empty", br#"{"prompt": "x", "stop": [""]}"#.to_vec()),
        ("stop number", br#"{"prompt": "x", "stop": 3}"#.to_vec()),
        ("presence over", br#"{"prompt": "x", "presence_penalty": 3}"#.to_vec()),
        (
            "frequency nan-ish",
            br#"{"prompt": "x", "frequency_penalty": -2.5}"#.to_vec(),
        ),
        (
            "repetition zero",
            br#"{"prompt": "x", "repetition_penalty": 0}"#.to_vec(),
        ),
        (
            "logit_bias key",
            br#"{"prompt": "x", "logit_bias": {"abc": 1}}"#.to_vec(),
        ),
        (
            "logit_bias value",
            br#"{"prompt": "x", "logit_bias": {"5": 1000}}"#.to_vec(),
        ),
        ("seed string", br#"{"prompt": "x", "seed": "s"}"#.to_vec()),
        ("suffix number", br#"{"prompt": "x", "suffix": 5}"#.to_vec()),
        (
            "echo with suffix",
            br#"{"prompt": "x", "suffix": "y", "echo": true}"#.to_vec(),
        ),
        ("best_of 3", br#"{"prompt": "x", "best_of": 3}"#.to_vec()),
        (
            "stream_options without stream",
            br#"{"prompt": "x", "stream_options": {"include_usage": true}}"#.to_vec(),
        ),
        (
            "stream_options unknown",
            br#"{"prompt": "x", "stream": true, "stream_options": {"x": 1}}"#.to_vec(),
        ),
        ("model number", br#"{"prompt": "x", "model": 5}"#.to_vec()),
        ("user number", br#"{"prompt": "x", "user": 5}"#.to_vec()),
    ];
    assert!(cases.len() >= 30);
    for (name, body) in &cases {
        let r = common::agent()
            .post(format!("{}/v1/completions", s.base))
            .header("content-type", "application/json")
            .send(&body[..]);
        let Ok(r) = r else {
            // A 10 MB body may be cut off by the server's 413 before it is all sent.
            assert_eq!(*name, "10 MB body", "{name}: transport error");
            continue;
        };
        let status = r.status().as_u16();
        let text = r.into_body().read_to_string().unwrap_or_default();
        assert!((400..500).contains(&status), "{name}: status {status}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
        assert!(v["error"]["message"].is_string(), "{name}: {text}");
    }
    // Chat and infill get the same treatment.
    for (path, body) in [
        ("/v1/chat/completions", &br#"{"messages": "hi"}"#[..]),
        (
            "/v1/chat/completions",
            br#"{"messages": [{"role": "user"}], "frobnicate": 1}"#,
        ),
        (
            "/v1/chat/completions",
            br#"{"messages": [{"role": 5, "content": "x"}]}"#,
        ),
        ("/infill", br#"{"input_prefix": 5}"#),
        ("/infill", br#"{"input_prefix": "x", "n_predict": -5}"#),
        ("/completion", br#"{"prompt": "x", "n_predict": -5}"#),
        ("/completion", br#"{"prompt": 5}"#),
        ("/completion", br#"{"n_predict": 4}"#),
    ] {
        let (st, _, b) = s.post_raw(path, body, &[]);
        assert!(
            (400..500).contains(&st),
            "{path} {}: {st} {b}",
            String::from_utf8_lossy(body)
        );
    }
    // Still alive and still right.
    let g = common::golden();
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"prompt": g["cases"][0]["prompt"], "max_tokens": 32, "temperature": 0, "token_healing": false}),
    );
    assert_eq!(st, 200);
    assert_eq!(v["choices"][0]["text"], g["cases"][0]["greedy32_text"]);
}

#[test]
fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let mut s = Server::start(&[]);
    let url = format!("{}/v1/completions", s.base);
    let inflight = std::thread::spawn(move || {
        let r = common::agent()
            .post(url)
            .send(json!({"prompt": "import os\n", "max_tokens": 200, "temperature": 1.0, "seed": 1, "logit_bias": {"0": -100, "4": -100, "5": -100}}).to_string().as_bytes())
            .unwrap();
        (r.status().as_u16(), r.into_body().read_to_string().unwrap())
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = s.child().id();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let (status, body) = inflight.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 200);
    let code = s.child().wait().unwrap();
    assert_eq!(code.code(), Some(0), "{:?}", s.log());
    // New connections are refused after shutdown.
    assert_eq!(s.get("/health").0, 0);
}

#[test]
fn serve_refuses_a_missing_model_and_a_busy_port() {
    let out = common::greencode(&["serve", "--model", "/nonexistent/m", "--port", "0"]);
    common::assert_clean_error(&out, &["model folder /nonexistent/m does not exist"]);
    let s = Server::start(&[]);
    let port = s.base.rsplit(':').next().unwrap().to_owned();
    let out = common::greencode(&["serve", "--port", &port]);
    common::assert_fails_with(&out, &["cannot listen on 127.0.0.1:"]);
}

#[test]
fn megabyte_prompts_are_cut_or_refused_before_tokenizing_and_any_content_type_is_read_as_json() {
    let s = Server::start(&[]);
    let line = "value = compute(alpha, beta)  # a line of held-out-looking code\n";
    let huge = line.repeat(1_900_000 / line.len());
    // A plain prompt that long cannot fit whatever it tokenizes to.
    let (st, _, b) = s.post_raw(
        "/v1/completions",
        json!({"prompt": huge, "max_tokens": 4}).to_string().as_bytes(),
        &[],
    );
    let v = assert_error(st, &b, 400, "cannot fit");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["param"], "prompt");
    // As a FIM prefix only its end can matter: the answer is the one its
    // last lines give.
    let tail = line.repeat(200);
    let body =
        |prefix: &str| json!({"prompt": prefix, "suffix": "\nprint(value)\n", "max_tokens": 8, "temperature": 0});
    let (st, headers, b) = s.post_raw("/v1/completions", body(&huge).to_string().as_bytes(), &[]);
    assert_eq!(st, 200, "{b}");
    assert!(headers.contains_key("x-greencode-truncated-tokens"));
    let (_, _, short) = s.post_raw("/v1/completions", body(&tail).to_string().as_bytes(), &[]);
    let text = |b: &str| serde_json::from_str::<Value>(b).unwrap()["choices"][0]["text"].clone();
    assert_eq!(text(&b), text(&short));
    // `curl -d` sends form-urlencoded: the body is read as JSON all the same
    // (as llama-server reads it), a choice README.md states.
    for content_type in [Some("application/x-www-form-urlencoded"), None] {
        let mut req = common::agent().post(format!("{}/v1/completions", s.base));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send(&br#"{"prompt": "x", "max_tokens": 1}"#[..]).unwrap();
        assert_eq!(r.status().as_u16(), 200, "{content_type:?}");
    }
}
