//! `POST /v1/chat/completions`: the model's chat template (or the plain
//! one) turns messages into a prompt; answers whole or streamed as
//! `chat.completion.chunk` chunks.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::mpsc;

use super::{collect_completion, new_id, now_secs, AppState, CompletionPlan, Served};
use crate::generate::TokenLogprob;
use crate::serve::engine::Event;
use crate::serve::error::ApiError;
use crate::serve::openai::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatFields, ChatMessage, ChatResponse, Usage,
};
use crate::serve::prompt::{self, PromptInput};
use crate::serve::sse::{sse_json, stream_openai, SseStream, StreamShape};
use crate::serve::validate;

/// `chat.completion.chunk` chunks.
struct ChatShape {
    state: AppState,
    id: String,
    created: u64,
    /// Mistral's FIM stream: every delta has `content` (Tabby's parser
    /// requires it), the last one too.
    content_always: bool,
}

impl ChatShape {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> SseEvent {
        sse_json(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.state.info.name.clone(),
            choices,
            usage,
        })
    }

    fn delta(&self, index: usize, delta: ChatDelta, finish: Option<&'static str>) -> SseEvent {
        self.chunk(
            vec![ChatChunkChoice {
                index,
                delta,
                logprobs: None,
                finish_reason: finish,
            }],
            None,
        )
    }
}

impl StreamShape for ChatShape {
    fn opening(&mut self, index: usize) -> Option<SseEvent> {
        let first = ChatDelta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        Some(self.delta(index, first, None))
    }

    fn text(&mut self, index: usize, text: String, _logprobs: &[TokenLogprob]) -> SseEvent {
        let delta = ChatDelta {
            role: None,
            content: Some(text),
        };
        self.delta(index, delta, None)
    }

    fn finish(&mut self, index: usize, reason: &'static str) -> SseEvent {
        let last = ChatDelta {
            role: None,
            content: self.content_always.then(String::new),
        };
        self.delta(index, last, Some(reason))
    }

    fn usage(&mut self, usage: Usage) -> SseEvent {
        self.chunk(vec![], Some(usage))
    }
}

/// Reads a chat body into the plan of its one prompt.
fn plan_chat(state: &AppState, body: &[u8]) -> Result<CompletionPlan, ApiError> {
    let (fields, common) = validate::parse_request::<ChatFields>(body)?;
    let messages = validate::chat_messages(fields.messages)?;
    if fields.logprobs.unwrap_or(false) {
        return Err(ApiError::param(
            "logprobs",
            "chat `logprobs` are not supported; use /v1/completions",
        ));
    }
    let prompt_text = state.chat.render(&messages)?;
    let prompt_len = state.info.tokenizer.encode(&prompt_text).map(|v| v.len()).unwrap_or(0);
    let default_max = state.info.context_len.saturating_sub(prompt_len).max(1);
    let mut settings = validate::settings(&common, &state.info, default_max)?;
    settings.stop.extend(state.chat.stop_strings());
    let prompt = prompt::plain_prompt(&PromptInput::Text(prompt_text), &state.info, settings.max_tokens, false)
        .map_err(|e| match e {
            ApiError::ContextLength {
                prompt,
                max_tokens,
                context,
                ..
            } => ApiError::ContextLength {
                prompt,
                max_tokens,
                context,
                param: "messages",
            },
            other => other,
        })?;
    Ok(CompletionPlan::single(prompt, settings))
}

pub(super) async fn chat(
    State(served): State<Served>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let state = match served.pick(&body) {
        Ok(state) => state,
        Err(refused) => return *refused,
    };
    let (plan, receivers) = match state.admit_off_thread(headers, body, plan_chat).await {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    answer_as_chat(state, plan, receivers, false).await
}

/// Answers a planned request as `chat.completion` (or its chunks): chat,
/// and Mistral's `/v1/fim/completions`, which answers in the same shape.
pub(super) async fn answer_as_chat(
    state: AppState,
    plan: CompletionPlan,
    receivers: Vec<mpsc::UnboundedReceiver<Event>>,
    fim: bool,
) -> Response {
    if plan.settings.stream {
        return stream_chat(state, plan, receivers, fim).into_response();
    }
    match collect_completion(&state, &plan, receivers).await {
        Ok(r) => Json(ChatResponse {
            id: new_id("chatcmpl"),
            object: "chat.completion",
            created: r.created,
            model: r.model,
            choices: r
                .choices
                .into_iter()
                .map(|c| ChatChoice {
                    index: c.index,
                    message: ChatMessage {
                        role: "assistant",
                        content: c.text,
                    },
                    logprobs: None,
                    finish_reason: c.finish_reason.unwrap_or("stop"),
                })
                .collect(),
            usage: r.usage.unwrap_or_default(),
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

fn stream_chat(
    state: AppState,
    plan: CompletionPlan,
    receivers: Vec<mpsc::UnboundedReceiver<Event>>,
    fim: bool,
) -> SseStream {
    let shape = ChatShape {
        state,
        id: new_id("chatcmpl"),
        created: now_secs(),
        content_always: fim,
    };
    stream_openai(receivers, plan.settings.n, plan.settings.include_usage, shape)
}
