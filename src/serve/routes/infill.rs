//! `POST /infill`: llama.cpp's fill-in-the-middle route (as llama.vscode
//! and llama.vim call it), with other files as extra context; answers whole
//! or streamed as llama.cpp's events.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::mpsc;

use super::{collect_completion, with_truncation_header, AppState, CompletionPlan};
use crate::serve::engine::Event;
use crate::serve::error::ApiError;
use crate::serve::openai::{CommonParams, InfillRequest, InfillResponse};
use crate::serve::prompt::{self, PromptInput};
use crate::serve::sse::{sse_error, sse_json, sse_task, SseStream};
use crate::serve::validate;

/// Reads an `/infill` body (llama.cpp's fields) into the plan of its FIM prompt.
fn plan_infill(state: &AppState, body: &[u8]) -> Result<CompletionPlan, ApiError> {
    let req: InfillRequest = validate::parse_body(body)?;
    let n_predict = match req.n_predict {
        None | Some(-1) => 256.min(state.info.context_len as i64 / 2),
        Some(n) if n >= 1 => n,
        Some(n) => {
            return Err(ApiError::param(
                "n_predict",
                format!("`n_predict` must be -1 or ≥ 1, got {n}"),
            ))
        }
    };
    let common = CommonParams {
        max_tokens: Some(n_predict),
        temperature: req.temperature,
        top_k: req.top_k,
        top_p: req.top_p,
        min_p: req.min_p,
        stream: req.stream,
        stop: req.stop.clone(),
        seed: req.seed,
        repetition_penalty: req.repeat_penalty,
        ..CommonParams::default()
    };
    let settings = validate::settings(&common, &state.info, 256)?;
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
    Ok(CompletionPlan::single(prompt, settings))
}

pub(super) async fn infill(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (plan, receivers) = match state.admit(&headers, body, plan_infill) {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    let truncated = plan.truncated();
    let resp = if plan.settings.stream {
        stream_infill(state, plan, receivers).into_response()
    } else {
        match collect_completion(&state, &plan, receivers).await {
            Ok(r) => {
                let usage = r.usage.unwrap_or_default();
                let choice = &r.choices[0];
                Json(InfillResponse {
                    content: choice.text.clone(),
                    stop: true,
                    model: r.model,
                    tokens_predicted: usage.completion_tokens,
                    tokens_evaluated: usage.prompt_tokens,
                    stop_type: Some(if choice.finish_reason == Some("length") {
                        "limit"
                    } else {
                        "eos"
                    }),
                })
                .into_response()
            }
            Err(e) => e.into_response(),
        }
    };
    with_truncation_header(resp, truncated)
}

fn stream_infill(state: AppState, _plan: CompletionPlan, receivers: Vec<mpsc::UnboundedReceiver<Event>>) -> SseStream {
    sse_task(move |tx| {
        Box::pin(async move {
            let Some(mut rx) = receivers.into_iter().next() else {
                return;
            };
            let mut predicted = 0;
            while let Some(ev) = rx.recv().await {
                let event = match ev {
                    Event::Text { text, .. } => {
                        predicted += 1;
                        InfillResponse {
                            content: text,
                            stop: false,
                            model: state.info.name.clone(),
                            tokens_predicted: predicted,
                            tokens_evaluated: 0,
                            stop_type: None,
                        }
                    }
                    Event::Done(d) => InfillResponse {
                        content: String::new(),
                        stop: true,
                        model: state.info.name.clone(),
                        tokens_predicted: d.completion_tokens,
                        tokens_evaluated: d.prompt_tokens,
                        stop_type: Some(if d.finish_reason.as_str() == "length" {
                            "limit"
                        } else {
                            "eos"
                        }),
                    },
                    Event::Error(e) => {
                        let _ = tx.send(Ok(sse_error(&e))).await;
                        return;
                    }
                };
                if tx.send(Ok(sse_json(&event))).await.is_err() {
                    return;
                }
            }
        })
    })
}
