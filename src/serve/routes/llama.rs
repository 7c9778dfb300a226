//! llama.cpp's own routes, as llama.vscode, llama.vim and llama-server's
//! other clients call them: `POST /infill` (fill-in-the-middle, with other
//! files as extra context) and `POST /completion` (a plain prompt, text or
//! token ids). Unknown fields are ignored, as llama-server does.
//! `n_predict: 0` only fills the cache (warm-up requests). Answers whole or
//! streamed as llama.cpp's events, the last with `timings`,
//! `tokens_cached`, `truncated` and `generation_settings`, cut to the
//! `response_fields` asked for (each returned flat under its path, as
//! llama-server does: llama.vim reads `timings/prompt_n`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{with_truncation_header, AppState, CompletionPlan, Served};
use crate::generate::infill_sampler::InfillRule;
use crate::serve::engine::{Done, Event};
use crate::serve::error::ApiError;
use crate::serve::openai::{
    CommonParams, GenerationSettings, InfillRequest, LlamaCompletionRequest, LlamaParams, LlamaResponse, Timings,
};
use crate::serve::prompt::{self, PromptInput};
use crate::serve::sse::{sse_error, sse_json, sse_task, SseStream};
use crate::serve::validate::{self, Settings};

/// The settings of llama.cpp's generation fields: `n_predict` -1 (or
/// absent) is up to 256 tokens or half the context, 0 fills the cache
/// only; `n_indent` and `t_max_predict_ms` stop as llama-server does.
fn llama_settings(p: &LlamaParams, state: &AppState) -> Result<Settings, ApiError> {
    let n_predict = match p.n_predict {
        None | Some(-1) => 256.min(state.info.context_len as i64 / 2),
        Some(n) if n >= 0 => n,
        Some(n) => {
            return Err(ApiError::param(
                "n_predict",
                format!("`n_predict` must be -1 or ≥ 0, got {n}"),
            ))
        }
    };
    if let Some(n) = p.n_cmpl.filter(|n| !(1..=validate::MAX_N as i64).contains(n)) {
        return Err(ApiError::param(
            "n_cmpl",
            format!("`n_cmpl` must be between 1 and {}, got {n}", validate::MAX_N),
        ));
    }
    let chain = sampler_chain(p.samplers.as_ref())?;
    let on = |name: &str| chain.as_ref().is_none_or(|c| c.iter().any(|s| s == name));
    let common = CommonParams {
        // Validated as one token; zero is set below.
        max_tokens: Some(n_predict.max(1)),
        n: p.n_cmpl,
        // llama-server's defaults; a sampler left out of the chain is off
        // (no temperature sampler: the distribution as it is).
        temperature: match p.temperature.unwrap_or(0.8) {
            t if t > 0.0 && !on("temperature") => Some(1.0),
            t => Some(t),
        },
        top_k: Some(if on("top_k") { p.top_k.unwrap_or(40) } else { 0 }),
        top_p: Some(if on("top_p") { p.top_p.unwrap_or(0.95) } else { 1.0 }),
        min_p: Some(if on("min_p") { p.min_p.unwrap_or(0.05) } else { 0.0 }),
        stream: p.stream,
        stop: p.stop.clone(),
        seed: p.seed,
        repetition_penalty: p.repeat_penalty,
        ..CommonParams::default()
    };
    let mut settings = validate::settings(&common, &state.info, 256)?;
    if chain.as_ref().is_some_and(|c| c.iter().any(|s| s == "infill")) {
        let mut end_ids = state.info.tokenizer.eos_ids().to_vec();
        if let Some(fim) = state.info.tokenizer.fim() {
            end_ids.extend(fim.stop.iter().copied());
        }
        settings.sampling.infill = Some(InfillRule {
            token_bytes: std::sync::Arc::clone(&state.info.token_bytes),
            end_ids,
        });
    }
    settings.max_tokens = (n_predict as u64).min(state.info.context_len as u64) as usize;
    settings.min_indent = p.n_indent.unwrap_or(0).max(0) as usize;
    settings.max_predict = p
        .t_max_predict_ms
        .filter(|&ms| ms > 0)
        .map(|ms| std::time::Duration::from_millis(ms as u64));
    Ok(settings)
}

/// llama.cpp's `samplers`: a list of names or a string of their letters
/// (None: the default chain, everything on).
fn sampler_chain(v: Option<&Value>) -> Result<Option<Vec<String>>, ApiError> {
    let letter = |c: char| match c {
        'k' => Some("top_k"),
        'p' => Some("top_p"),
        'm' => Some("min_p"),
        't' => Some("temperature"),
        'i' => Some("infill"),
        'e' => Some("penalties"),
        _ => None,
    };
    let names = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => Some(s.chars().filter_map(letter).map(str::to_owned).collect()),
        Some(Value::Array(list)) => list.iter().map(|x| x.as_str().map(str::to_owned)).collect(),
        Some(_) => None,
    };
    names
        .map(Some)
        .ok_or_else(|| ApiError::param("samplers", "`samplers` must be a list of sampler names or a string"))
}

/// Reads an `/infill` body into the plan of its FIM prompt.
fn plan_infill(state: &AppState, body: &[u8]) -> Result<CompletionPlan, ApiError> {
    let req: InfillRequest = validate::parse_body(body)?;
    let settings = llama_settings(&req.params, state)?;
    let extra: Vec<(String, String)> = req
        .input_extra
        .iter()
        .map(|e| (e.filename.clone(), e.text.clone()))
        .collect();
    let prefix = PromptInput::Text(format!("{}{}", req.input_prefix, req.prompt));
    let prompt = prompt::fim_prompt(
        &prefix,
        &req.input_suffix,
        &extra,
        &state.info,
        settings.max_tokens,
        settings.token_healing,
    )?;
    let mut plan = CompletionPlan::single(prompt, settings);
    plan.response_fields = req.params.response_fields.unwrap_or_default();
    Ok(plan)
}

/// Reads a `/completion` body into the plan of its plain prompt.
fn plan_completion(state: &AppState, body: &[u8]) -> Result<CompletionPlan, ApiError> {
    let req: LlamaCompletionRequest = validate::parse_body(body)?;
    let settings = llama_settings(&req.params, state)?;
    let mut inputs = validate::prompts(req.prompt, &state.info, false)?;
    if inputs.len() != 1 {
        return Err(ApiError::param(
            "prompt",
            "`prompt` must be one text or one list of token ids",
        ));
    }
    let input = inputs.pop().expect("one prompt");
    let prompt = prompt::plain_prompt(&input, &state.info, settings.max_tokens, settings.token_healing)?;
    let mut plan = CompletionPlan::single(prompt, settings);
    plan.response_fields = req.params.response_fields.unwrap_or_default();
    Ok(plan)
}

pub(super) async fn infill(
    State(served): State<Served>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let state = match served.pick(&body) {
        Ok(state) => state,
        Err(refused) => return *refused,
    };
    answer(state, headers, body, plan_infill).await
}

pub(super) async fn completion(
    State(served): State<Served>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let state = match served.pick(&body) {
        Ok(state) => state,
        Err(refused) => return *refused,
    };
    answer(state, headers, body, plan_completion).await
}

/// Admits the request `plan` reads and answers it whole or streamed.
async fn answer(
    state: AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    plan: fn(&AppState, &[u8]) -> Result<CompletionPlan, ApiError>,
) -> Response {
    let (plan, receivers) = match state.admit_off_thread(headers, body, plan).await {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    let truncated = plan.truncated();
    let resp = if plan.settings.stream {
        stream(state, plan, receivers).into_response()
    } else {
        let mut answers = Vec::with_capacity(receivers.len());
        for (index, rx) in receivers.into_iter().enumerate() {
            match collect(rx).await {
                Ok((content, done)) => answers.push(last_event(&state, &plan, index, content, &done)),
                Err(e) => return with_truncation_header(e.into_response(), truncated),
            }
        }
        // One candidate is an object, several an array (as llama-server answers).
        match answers.len() {
            1 => Json(answers.remove(0)).into_response(),
            _ => Json(answers).into_response(),
        }
    };
    with_truncation_header(resp, truncated)
}

/// The whole text of a job and how it ended.
async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<(String, Done), ApiError> {
    let mut content = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text { text, .. } => content.push_str(&text),
            Event::Done(d) => return Ok((content, d)),
            Event::Error(e) => return Err(e),
        }
    }
    Err(ApiError::Internal)
}

/// The final answer (or last stream event) of candidate `index`: counts,
/// stop type, timings and settings, as the fields the client asked for.
fn last_event(state: &AppState, plan: &CompletionPlan, index: usize, content: String, d: &Done) -> Value {
    let prompt_n = d.prompt_tokens - d.cached_tokens;
    let (prompt_ms, predicted_ms) = (d.prompt_seconds * 1e3, d.predicted_seconds * 1e3);
    let per = |ms: f64, n: usize| if n > 0 { ms / n as f64 } else { 0.0 };
    let rate = |ms: f64, n: usize| if ms > 0.0 { n as f64 / ms * 1e3 } else { 0.0 };
    let sampling = &plan.settings.sampling;
    let answer = LlamaResponse {
        index,
        content,
        stop: true,
        model: state.info.name.clone(),
        tokens_predicted: d.completion_tokens,
        tokens_evaluated: d.prompt_tokens,
        tokens_cached: d.cached_tokens,
        stop_type: Some(match (d.finish_reason.as_str(), d.stop_word) {
            ("length", _) => "limit",
            (_, true) => "word",
            _ => "eos",
        }),
        timings: Some(Timings {
            cache_n: d.cached_tokens,
            prompt_n,
            prompt_ms,
            prompt_per_token_ms: per(prompt_ms, prompt_n),
            prompt_per_second: rate(prompt_ms, prompt_n),
            predicted_n: d.completion_tokens,
            predicted_ms,
            predicted_per_token_ms: per(predicted_ms, d.completion_tokens),
            predicted_per_second: rate(predicted_ms, d.completion_tokens),
        }),
        truncated: Some(plan.prompt_of(index).truncated > 0),
        generation_settings: Some(GenerationSettings {
            n_ctx: state.info.context_len,
            n_predict: plan.settings.max_tokens.min(plan.prompt_of(index).room),
            model: state.info.name.clone(),
            temperature: f64::from(sampling.temperature),
            seed: sampling.seed,
        }),
    };
    let whole = serde_json::to_value(answer).unwrap_or_default();
    select_fields(whole, &plan.response_fields)
}

/// `answer` cut to `paths` (`a/b` names field `b` of object `a`), each
/// value returned under its whole path; paths that name nothing are left
/// out. No paths: the whole answer.
fn select_fields(answer: Value, paths: &[String]) -> Value {
    if paths.is_empty() {
        return answer;
    }
    let picked = paths
        .iter()
        .filter_map(|path| {
            let value = path
                .split('/')
                .try_fold(&answer, |v, key| v.as_object().and_then(|o| o.get(key)))?;
            Some((path.clone(), value.clone()))
        })
        .collect();
    Value::Object(picked)
}

/// The candidates' events, one candidate after another (each buffered
/// while the ones before it stream), each tagged with its `index`.
fn stream(state: AppState, plan: CompletionPlan, receivers: Vec<mpsc::UnboundedReceiver<Event>>) -> SseStream {
    sse_task(move |tx| {
        Box::pin(async move {
            for (index, mut rx) in receivers.into_iter().enumerate() {
                let mut predicted = 0;
                while let Some(ev) = rx.recv().await {
                    let event = match ev {
                        Event::Text { text, .. } => {
                            predicted += 1;
                            let piece = LlamaResponse {
                                index,
                                content: text,
                                stop: false,
                                model: state.info.name.clone(),
                                tokens_predicted: predicted,
                                tokens_evaluated: 0,
                                tokens_cached: 0,
                                stop_type: None,
                                timings: None,
                                truncated: None,
                                generation_settings: None,
                            };
                            serde_json::to_value(piece).unwrap_or_default()
                        }
                        Event::Done(d) => last_event(&state, &plan, index, String::new(), &d),
                        Event::Error(e) => {
                            let _ = tx.send(Ok(sse_error(&e))).await;
                            return;
                        }
                    };
                    if tx.send(Ok(sse_json(&event))).await.is_err() {
                        return;
                    }
                }
            }
        })
    })
}
