//! The editors' own request bodies, copied field for field from their
//! sources into `tests/fixtures/editors/` (each file names the repository,
//! commit and path it was read from, and what the client reads back):
//! Continue (OpenAI-compatible and llama.cpp providers), llama.vscode and
//! llama.vim (`/infill` completions and their cache warm-ups), and Tabby's
//! `openai/completion`, `mistral/completion` and `llama.cpp/completion`
//! kinds. Each is sent as the client sends it and, for the streamed ones,
//! also whole; every answer is checked the way that client parses it.

mod common;

use common::Server;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/editors")
        .join(format!("{name}.json"));
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        fx["source"].as_str().is_some_and(|s| !s.is_empty()),
        "{name}: no source named"
    );
    fx
}

/// The `data:` payloads of a streamed answer, each parsed as the client
/// parses it (`[DONE]` kept as the text it is).
fn stream(s: &Server, fx: &Value) -> Vec<Result<Value, String>> {
    assert_eq!(fx["stream"], true);
    s.stream(fx["route"].as_str().unwrap(), &fx["body"])
        .into_iter()
        .map(|(_, data)| serde_json::from_str(&data).map_err(|_| data))
        .collect()
}

/// The fixture's body sent whole (`stream: false`).
fn whole(s: &Server, fx: &Value) -> Value {
    let mut body = fx["body"].clone();
    body["stream"] = Value::Bool(false);
    let (st, v) = s.post(fx["route"].as_str().unwrap(), &body);
    assert_eq!(st, 200, "{}: {v}", fx["client"]);
    v
}

/// Checks an OpenAI-style stream the way Tabby reads it: every message
/// before `[DONE]` parses and has the text at `text_at`, and one has a
/// `finish_reason` (the client stops there, before `[DONE]`).
fn check_openai_stream(events: &[Result<Value, String>], text_at: &[&str]) -> String {
    let mut text = String::new();
    let mut finished = false;
    for ev in events {
        match ev {
            Ok(v) => {
                assert!(!finished, "a message after the finish: {v}");
                let choice = &v["choices"][0];
                let piece = text_at
                    .iter()
                    .try_fold(choice, |c, k| c.get(*k))
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("no choices[0].{} in {v}", text_at.join(".")));
                text.push_str(piece);
                finished = !choice["finish_reason"].is_null();
            }
            Err(done) => {
                assert_eq!(done, "[DONE]");
                assert!(finished, "[DONE] before any finish_reason");
            }
        }
    }
    assert!(finished, "the stream never finished");
    text
}

#[test]
fn continue_openai_provider_streams_text_chunks() {
    let s = Server::start(&[]);
    let fx = fixture("continue-openai");
    assert_eq!(fx["route"], "/v1/completions");
    // Its stop list holds a dozen strings, special tokens among them, and
    // max_tokens is 4096 against a 1,024-token context.
    let text = check_openai_stream(&stream(&s, &fx), &["text"]);
    for stop in fx["body"]["stop"].as_array().unwrap() {
        assert!(!text.contains(stop.as_str().unwrap()), "{text:?} holds a stop");
    }
    // Sampled (temperature 0.01, no seed): whole answers have the same shape.
    assert!(whole(&s, &fx)["choices"][0]["text"].is_string());
}

#[test]
fn continue_llamacpp_provider_streams_content() {
    let s = Server::start(&[]);
    let fx = fixture("continue-llamacpp");
    let events = stream(&s, &fx);
    let mut text = String::new();
    for ev in &events {
        let v = ev.as_ref().expect("llama.cpp's stream has no [DONE]");
        text.push_str(v["content"].as_str().expect("content in every event"));
    }
    assert_eq!(events.last().unwrap().as_ref().unwrap()["stop"], true);
    assert!(!text.contains("<|file_sep|>"), "{text:?}");
    assert!(whole(&s, &fx)["content"].is_string());
}

#[test]
fn llama_vim_gets_flat_response_fields_after_its_warm_up() {
    let s = Server::start(&[]);
    let warm = fixture("llama-vim-warmup");
    let (st, _, _) = s.post_raw("/infill", warm["body"].to_string().as_bytes(), &[]);
    assert_eq!(st, 200);
    let fx = fixture("llama-vim-infill");
    let (st, _, raw) = s.post_raw("/infill", fx["body"].to_string().as_bytes(), &[]);
    assert_eq!(st, 200, "{raw}");
    // llama.vim's own checks before decoding: an object, `"content":"`.
    assert!(raw.starts_with('{'), "{raw}");
    assert!(raw.contains("\"content\":\""), "{raw}");
    let v: Value = serde_json::from_str(&raw).unwrap();
    let fields = fx["body"]["response_fields"].as_array().unwrap();
    let got = v.as_object().unwrap();
    for f in fields {
        assert!(got.contains_key(f.as_str().unwrap()), "{f} missing from {raw}");
    }
    assert_eq!(got.len(), fields.len(), "only the fields asked for: {raw}");
    for k in [
        "timings/prompt_n",
        "timings/prompt_ms",
        "timings/prompt_per_second",
        "timings/predicted_n",
        "timings/predicted_ms",
        "timings/predicted_per_second",
    ] {
        assert!(v[k].is_number(), "{k}: {raw}");
    }
    // The warm-up computed the ring's chunks: the completion found them cached.
    assert!(v["tokens_cached"].as_u64().unwrap() >= 32, "{raw}");
}

#[test]
fn llama_vscode_gets_three_candidates_with_settings_and_timings() {
    let s = Server::start(&[]);
    let warm = fixture("llama-vscode-warmup");
    let (st, v) = s.post("/infill", &warm["body"]);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["content"], "");
    let fx = fixture("llama-vscode-infill");
    assert_eq!(fx["body"]["n_cmpl"], 3);
    let (st, v) = s.post("/infill", &fx["body"]);
    assert_eq!(st, 200, "{v}");
    let all = v.as_array().expect("n_cmpl > 1 answers an array");
    assert_eq!(all.len(), 3);
    for (i, c) in all.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert!(c["content"].is_string(), "{c}");
        assert_eq!(c["generation_settings"]["n_ctx"], 1024);
        assert!(c["truncated"].is_boolean(), "{c}");
        assert!(c["tokens_cached"].as_u64().unwrap() >= 32, "{c}");
        for k in [
            "prompt_n",
            "prompt_ms",
            "prompt_per_second",
            "predicted_n",
            "predicted_ms",
            "predicted_per_second",
        ] {
            assert!(c["timings"][k].is_number(), "timings.{k}: {c}");
        }
    }
}

#[test]
fn tabby_openai_kind_streams_text_with_a_suffix() {
    let s = Server::start(&[]);
    let fx = fixture("tabby-openai-completion");
    assert!(fx["body"]["suffix"].is_string());
    check_openai_stream(&stream(&s, &fx), &["text"]);
    // Sampled (temperature 0.1, no seed): the whole answer has the same shape.
    assert!(whole(&s, &fx)["choices"][0]["text"].is_string());
    // The `_no_fim` kinds send `suffix: null`.
    let mut body = fx["body"].clone();
    body["suffix"] = Value::Null;
    body["stream"] = Value::Bool(false);
    let (st, v) = s.post("/v1/completions", &body);
    assert_eq!(st, 200, "{v}");
}

#[test]
fn tabby_mistral_kind_streams_chat_deltas_with_content_in_every_one() {
    let s = Server::start(&[]);
    let fx = fixture("tabby-mistral-completion");
    assert_eq!(fx["route"], "/v1/fim/completions");
    let text = check_openai_stream(&stream(&s, &fx), &["delta", "content"]);
    // `random_seed` (Mistral's `seed`) makes the whole answer the same text.
    let v = whole(&s, &fx);
    assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
}

#[test]
fn tabby_llamacpp_kind_gets_content_and_stop_in_every_event() {
    let s = Server::start(&[]);
    let fx = fixture("tabby-llamacpp-completion");
    let events = stream(&s, &fx);
    for ev in &events {
        let v = ev.as_ref().expect("no [DONE] on llama.cpp's routes");
        assert!(v["content"].is_string() && v["stop"].is_boolean(), "{v}");
    }
    assert_eq!(events.last().unwrap().as_ref().unwrap()["stop"], true);
    assert!(whole(&s, &fx)["content"].is_string());
}
