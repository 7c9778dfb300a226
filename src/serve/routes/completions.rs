//! `POST /v1/completions`: text completions (with `suffix` as
//! fill-in-the-middle, `echo`, legacy `logprobs`), whole or streamed as
//! `text_completion` chunks; and `POST /v1/fim/completions`, Mistral's FIM
//! route (Codestral's API, as Tabby's `mistral/completion` and Continue's
//! Mistral provider call it): the same request, answered as Mistral does,
//! in chat's shape (`choices[].message.content`, streamed as `delta.content`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::mpsc;

use super::{collect_completion, logprobs_object, new_id, now_secs, with_truncation_header};
use super::{AppState, CompletionPlan, Served};
use crate::generate::TokenLogprob;
use crate::serve::engine::Event;
use crate::serve::error::ApiError;
use crate::serve::openai::{CompletionChoice, CompletionFields, CompletionLogprobs, CompletionResponse, Usage};
use crate::serve::prompt;
use crate::serve::sse::{sse_json, stream_openai, SseStream, StreamShape};
use crate::serve::validate;

fn plan_completion(state: &AppState, body: &[u8]) -> Result<CompletionPlan, ApiError> {
    let (fields, common) = validate::parse_request::<CompletionFields>(body)?;
    let CompletionFields {
        prompt,
        suffix,
        echo,
        logprobs,
        best_of,
        raw,
        random_seed,
    } = fields;
    let echo = echo.unwrap_or(false);
    let logprobs = match logprobs {
        None => None,
        Some(k @ 0..=5) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::param(
                "logprobs",
                format!("`logprobs` must be between 0 and 5, got {k}"),
            ))
        }
    };
    if let Some(b) = best_of.filter(|&b| b != 1) {
        return Err(ApiError::param(
            "best_of",
            format!("`best_of` > 1 is not supported, got {b}"),
        ));
    }
    let mut settings = validate::settings(&common, &state.info, 16)?;
    if common.seed.is_none() {
        settings.sampling.seed = random_seed.map(|s| s as u64);
    }
    if raw == Some(true) {
        settings.token_healing = false;
    }
    if echo && suffix.is_some() {
        return Err(ApiError::param("echo", "`echo` cannot be combined with `suffix`"));
    }
    let inputs = validate::prompts(prompt, &state.info, suffix.is_some())?;
    let prompts = inputs
        .iter()
        .map(|input| match &suffix {
            Some(s) => prompt::fim_prompt(input, s, &[], &state.info, settings.max_tokens, settings.token_healing),
            None => prompt::plain_prompt(input, &state.info, settings.max_tokens, settings.token_healing),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if prompts.len() * settings.n > validate::MAX_N {
        return Err(ApiError::param(
            "n",
            format!(
                "prompts × n must be at most {}, got {}",
                validate::MAX_N,
                prompts.len() * settings.n
            ),
        ));
    }
    Ok(CompletionPlan {
        prompts,
        settings,
        echo,
        logprobs,
        response_fields: Vec::new(),
    })
}

pub(super) async fn completions(
    State(served): State<Served>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let state = match served.pick(&body) {
        Ok(state) => state,
        Err(refused) => return *refused,
    };
    let (plan, receivers) = match state.admit_off_thread(headers, body, plan_completion).await {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    let truncated = plan.truncated();
    let resp = if plan.settings.stream {
        stream_completion(state, plan, receivers).into_response()
    } else {
        match collect_completion(&state, &plan, receivers).await {
            Ok(r) => Json(r).into_response(),
            Err(e) => e.into_response(),
        }
    };
    with_truncation_header(resp, truncated)
}

pub(super) async fn fim(
    State(served): State<Served>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let state = match served.pick(&body) {
        Ok(state) => state,
        Err(refused) => return *refused,
    };
    let (plan, receivers) = match state.admit_off_thread(headers, body, plan_completion).await {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    let truncated = plan.truncated();
    with_truncation_header(
        super::chat::answer_as_chat(state, plan, receivers, true).await,
        truncated,
    )
}

/// `text_completion` chunks (with echo and legacy logprobs).
struct CompletionShape {
    state: AppState,
    id: String,
    created: u64,
    /// The echoed prompt of each choice, when echo is on.
    echo: Vec<Option<String>>,
    logprobs: bool,
    /// Characters sent so far in the current choice (logprobs text offsets).
    offset: usize,
}

impl CompletionShape {
    fn chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<&'static str>,
    ) -> SseEvent {
        sse_json(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.state.info.name.clone(),
            choices: vec![CompletionChoice {
                text,
                index,
                logprobs,
                finish_reason: finish,
            }],
            usage: None,
        })
    }
}

impl StreamShape for CompletionShape {
    fn opening(&mut self, index: usize) -> Option<SseEvent> {
        self.offset = 0;
        let echo = self.echo.get(index).cloned().flatten()?;
        self.offset = echo.chars().count();
        Some(self.chunk(index, echo, None, None))
    }

    fn text(&mut self, index: usize, text: String, logprobs: &[TokenLogprob]) -> SseEvent {
        let lp = self
            .logprobs
            .then(|| logprobs_object(&self.state, None, logprobs, self.offset));
        self.offset += text.chars().count();
        self.chunk(index, text, lp, None)
    }

    fn finish(&mut self, index: usize, reason: &'static str) -> SseEvent {
        self.chunk(index, String::new(), None, Some(reason))
    }

    fn usage(&mut self, usage: Usage) -> SseEvent {
        sse_json(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.state.info.name.clone(),
            choices: vec![],
            usage: Some(usage),
        })
    }
}

fn stream_completion(
    state: AppState,
    plan: CompletionPlan,
    receivers: Vec<mpsc::UnboundedReceiver<Event>>,
) -> SseStream {
    let echo = (0..receivers.len())
        .map(|i| plan.echo.then(|| plan.prompt_of(i).text.clone()))
        .collect();
    let shape = CompletionShape {
        state,
        id: new_id("cmpl"),
        created: now_secs(),
        echo,
        logprobs: plan.logprobs.is_some(),
        offset: 0,
    };
    stream_openai(receivers, plan.settings.n, plan.settings.include_usage, shape)
}
