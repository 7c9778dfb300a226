//! The KV pool behind a real server: an editor's abandoned stream leaves
//! its prompt for the next keystroke, two requests with one prefix compute
//! it once, and a pool too small for sixteen long requests queues and
//! preempts them without failing any, or changing their greedy text, or
//! growing the process past its budget.

mod common;

use std::io::BufRead;

use common::Server;
use greencode::data::corpus;
use greencode::model::KV_BLOCK;
use serde_json::{json, Value};

/// The first `chars` characters of the `i`-th held-out file of the CPython
/// standard library that has that many.
fn held_out(i: usize, chars: usize) -> String {
    let dir = corpus::stdlib_dir().unwrap();
    corpus::eval_files(&dir, 200)
        .unwrap()
        .iter()
        .map(|f| corpus::read_text(f).unwrap())
        .filter(|t| t.chars().count() >= chars)
        .nth(i)
        .expect("enough held-out files")
        .chars()
        .take(chars)
        .collect()
}

/// A counter or gauge of `/metrics` for the served model.
fn metric(s: &Server, name: &str) -> f64 {
    let text = s.get("/metrics").1;
    let prefix = format!("{name}{{model=\"tiny-coder\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
        .parse()
        .unwrap()
}

/// Starts a stream and drops it after its first text chunk, as an editor
/// cancels a completion on the next keystroke.
fn stream_and_abandon(s: &Server, prompt: &str, max_tokens: usize) {
    let body =
        json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true, "token_healing": false});
    let r = common::agent()
        .post(format!("{}/v1/completions", s.base))
        .header("content-type", "application/json")
        .send(body.to_string().as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let reader = std::io::BufReader::new(r.into_body().into_reader());
    for line in reader.lines() {
        if line.unwrap().starts_with("data: ") {
            return; // dropping the reader closes the connection
        }
    }
    panic!("the stream ended before its first token");
}

#[test]
fn the_next_keystroke_reuses_the_abandoned_streams_prompt() {
    // The server's defaults: an f16 cache.
    let s = Server::start_as_is(&[], &[]);
    assert!(
        s.log().iter().any(|l| l.contains("KV cache") && l.contains("(f16,")),
        "{:?}",
        s.log()
    );
    let tok = greencode::generate::loaded::read_tokenizer(&common::tiny_coder()).unwrap();
    for (i, max_tokens) in [4, 16, 64].into_iter().enumerate() {
        let prompt = held_out(i, 2500);
        stream_and_abandon(&s, &prompt, max_tokens);
        // At once: the first request may still be running.
        let next = format!("{prompt}\n    return None\n");
        let (st, v) = s.post(
            "/v1/completions",
            &json!({"prompt": next, "max_tokens": 4, "temperature": 0, "token_healing": false}),
        );
        assert_eq!(st, 200, "{v}");
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() as usize;
        let first = tok.encode(&prompt).unwrap().len();
        assert!(first > 400, "a long prompt: {first}");
        assert!(
            cached + KV_BLOCK >= first,
            "max_tokens {max_tokens}: reused {cached} of the first request's {first} prompt tokens"
        );
    }
}

#[test]
fn two_requests_with_one_long_prefix_compute_it_once() {
    let s = Server::start(&["--kv-dtype", "f32"]);
    let prefix = held_out(5, 2400);
    let tails = ["\n\ndef first():\n", "\n\nclass Second:\n"];
    let body =
        |t: &str| json!({"prompt": format!("{prefix}{t}"), "max_tokens": 8, "temperature": 0, "token_healing": false});
    let alone = Server::start(&["--no-prefix-cache"]);
    let mut want = Vec::new();
    let mut lens = Vec::new();
    for t in tails {
        let (_, v) = alone.post("/v1/completions", &body(t));
        want.push(v["choices"][0]["text"].clone());
        lens.push(v["usage"]["prompt_tokens"].as_u64().unwrap() as f64);
    }
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = tails
            .iter()
            .map(|t| {
                let (s, b) = (&s, body(t));
                scope.spawn(move || s.post("/v1/completions", &b).1)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, w) in answers.iter().zip(&want) {
        assert_eq!(&a["choices"][0]["text"], w, "shared blocks changed the greedy text");
    }
    let computed = metric(&s, "greencode_prompt_tokens_computed_total");
    let tok = greencode::generate::loaded::read_tokenizer(&common::tiny_coder()).unwrap();
    let shared = tok.encode(&prefix).unwrap().len() as f64 - 1.0;
    assert!(shared > 550.0, "a prefix of about 600 tokens: {shared}");
    let cached: f64 = answers
        .iter()
        .map(|a| a["usage"]["prompt_tokens_details"]["cached_tokens"].as_f64().unwrap())
        .sum();
    assert_eq!(
        computed + cached,
        lens[0] + lens[1],
        "every prompt token computed or reused"
    );
    assert!(
        computed <= lens[0] + lens[1] - shared + 2.0 * KV_BLOCK as f64,
        "computed {computed} prompt tokens for prompts of {lens:?}"
    );
}

fn rss(pid: u32) -> u64 {
    greencode::bench::soak::rss_bytes(pid).unwrap()
}

#[test]
fn a_pool_too_small_for_sixteen_requests_queues_and_preempts_them_all_to_the_end() {
    // 4 MiB of f32 keys and values: 320 positions of tiny-coder, about
    // one and a half of the sequences below (100-token prompts growing by 120).
    let budget: u64 = 4 << 20;
    let mut s = Server::start(&["--kv-cache-mb", "4", "--kv-dtype", "f32", "--max-batch", "16"]);
    let pid = s.child().id();
    let prompts: Vec<String> = (0..16).map(|i| held_out(10 + i, 330)).collect();
    let body = |p: &str| json!({"prompt": p, "max_tokens": 120, "temperature": 0});
    // One request warms the buffers a step uses; the process is idle after it.
    s.post("/v1/completions", &json!({"prompt": "x = 1", "max_tokens": 2}));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let idle = rss(pid);
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| {
            let (st, v) = s.post("/v1/completions", &body(p));
            assert_eq!(st, 200, "{v}");
            v["choices"][0].clone()
        })
        .collect();
    // Resident memory sampled while the sixteen run (the load at start
    // peaked higher than anything after it, so the high-water mark says nothing).
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut peak = idle;
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut top = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                top = top.max(rss(pid));
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            top
        });
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let s = &s;
                let b = body(p);
                scope.spawn(move || s.post("/v1/completions", &b))
            })
            .collect();
        let answers = handles.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        peak = peak.max(sampler.join().unwrap());
        answers
    });
    for (i, ((st, v), want)) in answers.iter().zip(&alone).enumerate() {
        assert_eq!(*st, 200, "request {i}: {v}");
        assert_eq!(
            v["choices"][0]["text"], want["text"],
            "request {i} differs from its run alone"
        );
        assert_eq!(v["choices"][0]["finish_reason"], want["finish_reason"], "request {i}");
    }
    assert!(
        metric(&s, "greencode_num_preemptions_total") >= 1.0,
        "nothing was preempted"
    );
    let queued = metric(&s, "greencode_request_queue_time_seconds_count");
    assert!(queued >= 33.0, "every request passed the queue: {queued}");
    let grown = peak.max(rss(pid)).saturating_sub(idle);
    assert!(
        grown <= budget + (10 << 20),
        "resident memory grew {:.1} MiB over idle with a {:.0} MiB KV budget",
        grown as f64 / (1 << 20) as f64,
        budget as f64 / (1 << 20) as f64
    );
}

#[test]
fn the_default_f16_cache_gives_the_golden_greedy_text() {
    let s = Server::start_as_is(&[], &[]);
    let golden = common::golden();
    for case in golden["cases"].as_array().unwrap() {
        let (st, v) = s.post(
            "/v1/completions",
            &json!({"prompt": case["prompt"], "max_tokens": 32, "temperature": 0, "token_healing": false}),
        );
        assert_eq!(st, 200, "{v}");
        // The server never shows the end-of-text token the reference ends with.
        let want = case["greedy32_text"].as_str().unwrap().replace("<|endoftext|>", "");
        assert_eq!(v["choices"][0]["text"], want.as_str(), "{}", case["prompt"]);
    }
}

#[test]
fn a_prompt_ending_inside_a_cached_block_reuses_its_tokens_exactly() {
    let text = held_out(2, 1200);
    // The second prompt shares about 60% of the first's characters, so it
    // diverges inside one of the first's blocks.
    let cut = text.char_indices().nth(700).unwrap().0;
    let second = format!("{}\n# a different ending\ndef other():\n    return 0\n", &text[..cut]);
    let body = |p: &str| json!({"prompt": p, "max_tokens": 12, "temperature": 0, "logprobs": 5});
    let warm = Server::start(&[]);
    let (st, _) = warm.post("/v1/completions", &body(&text));
    assert_eq!(st, 200);
    let (st, v) = warm.post("/v1/completions", &body(&second));
    assert_eq!(st, 200, "{v}");
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(
        cached > 0 && cached % KV_BLOCK as u64 != 0,
        "tokens up to the divergence, not whole blocks only: {cached}"
    );
    // Copied rows are the rows computing gives: a cold server answers the same.
    let cold = Server::start(&["--no-prefix-cache"]);
    let (_, c) = cold.post("/v1/completions", &body(&second));
    assert_eq!(c["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(v["choices"][0]["text"], c["choices"][0]["text"]);
    assert_eq!(v["choices"][0]["logprobs"], c["choices"][0]["logprobs"]);
}
