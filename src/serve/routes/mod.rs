//! HTTP routes, one file per endpoint: each handler authorizes, parses its
//! body into the typed wire struct, validates, submits jobs to the engine
//! and turns engine events into OpenAI (or llama.cpp) responses, whole or
//! as server-sent events (`sse`). This file holds what they share: the
//! state, the router, the plan of a completion request and the collection
//! of a whole response.

mod chat;
mod completions;
mod info;
mod llama;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::mpsc;

use super::chat::ChatTemplate;
use super::engine::{Done, EngineHandle, Event};
use super::error::ApiError;
use super::openai::{CompletionChoice, CompletionLogprobs, CompletionResponse, TopLogprobs, Usage};
use super::prompt::{BuiltPrompt, ModelInfo};
use super::validate::{Settings, ValidRequest};
use crate::generate::TokenLogprob;
use crate::metrics::Metrics;

/// Header telling how many prompt tokens FIM truncation dropped.
pub const TRUNCATED_HEADER: &str = "x-greencode-truncated-tokens";

/// Largest request body accepted (TGI's limit).
pub const BODY_LIMIT: usize = 2_000_000;

/// One served model's state: what a handler answering for it uses.
#[derive(Clone)]
pub struct AppState {
    /// The served model's tokenizer and tables.
    pub info: Arc<ModelInfo>,
    /// The engine.
    pub engine: EngineHandle,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// How chat messages become a prompt.
    pub chat: Arc<ChatTemplate>,
    /// Unix seconds when the server started.
    pub created: u64,
    /// Where the model was loaded from.
    pub source: String,
}

/// Every served model's state, the first answering requests that name no model.
#[derive(Clone)]
pub struct Served(Arc<Vec<AppState>>);

/// The part of a request body that picks the model.
#[derive(serde::Deserialize)]
struct ModelField {
    model: Option<serde_json::Value>,
}

impl Served {
    /// The default model (the first served).
    fn first(&self) -> &AppState {
        &self.0[0]
    }

    /// The model a request body names. With one model served any name is
    /// that model (as llama-server answers: editors are configured with
    /// names of their own); with several, an unknown name is refused (404)
    /// and a body without one (or one that is not JSON, refused later with
    /// the reason) goes to the first.
    fn pick(&self, body: &Result<Bytes, BytesRejection>) -> Result<AppState, Box<Response>> {
        if self.0.len() == 1 {
            return Ok(self.first().clone());
        }
        let name = match body {
            Ok(bytes) => serde_json::from_slice::<ModelField>(bytes).ok().and_then(|f| f.model),
            Err(_) => None,
        };
        match name {
            Some(serde_json::Value::String(name)) => match self.0.iter().find(|s| s.info.name == name) {
                Some(state) => Ok(state.clone()),
                None => {
                    let served = self.0.iter().map(|s| format!("`{}`", s.info.name)).collect::<Vec<_>>();
                    let first = self.first();
                    Err(Box::new(first.reject(ApiError::ModelNotFound(name, served.join(", ")))))
                }
            },
            _ => Ok(self.first().clone()),
        }
    }
}

/// The router with every route, for the served models (at least one).
pub fn router(states: Vec<AppState>) -> Router {
    assert!(!states.is_empty(), "a router needs a model");
    let state = Served(Arc::new(states));
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/fim/completions", post(completions::fim))
        .route("/infill", post(llama::infill))
        .route("/completion", post(llama::completion))
        .route("/v1/chat/completions", post(chat::chat))
        .route("/v1/models", get(info::models))
        .route("/health", get(info::health))
        .route("/metrics", get(info::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(super) fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

impl AppState {
    pub(super) fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else { return Ok(()) };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
    }

    /// Authorizes the request, reads its body, plans it with `plan` and
    /// submits its jobs; a refusal is counted and answered as OpenAI's error.
    pub(super) fn admit(
        &self,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
        plan: impl FnOnce(&AppState, &[u8]) -> Result<CompletionPlan, ApiError>,
    ) -> Result<(CompletionPlan, Vec<mpsc::UnboundedReceiver<Event>>), Box<Response>> {
        let run = || {
            self.authorize(headers)?;
            let body = body_bytes(body)?;
            let plan = plan(self, &body)?;
            let receivers = self.engine.submit(plan.jobs())?;
            Ok((plan, receivers))
        };
        run().map_err(|e| Box::new(self.reject(e)))
    }

    /// [`admit`](Self::admit) on the blocking pool: reading and tokenizing a
    /// large body takes the CPU for a while, and the one I/O thread must
    /// keep answering the other requests meanwhile.
    pub(super) async fn admit_off_thread(
        &self,
        headers: HeaderMap,
        body: Result<Bytes, BytesRejection>,
        plan: fn(&AppState, &[u8]) -> Result<CompletionPlan, ApiError>,
    ) -> Result<(CompletionPlan, Vec<mpsc::UnboundedReceiver<Event>>), Box<Response>> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || state.admit(&headers, body, plan))
            .await
            .unwrap_or_else(|_| Err(Box::new(self.reject(ApiError::Internal))))
    }

    pub(super) fn reject(&self, e: ApiError) -> Response {
        self.metrics
            .rejected
            .with_label_values(&[self.metrics.model(), e.status().as_str()])
            .inc();
        e.into_response()
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit: BODY_LIMIT }
        } else {
            ApiError::InvalidJson(rej.body_text())
        }
    })
}

/// A validated completion request: prompts, choices and output options.
pub(super) struct CompletionPlan {
    pub(super) prompts: Vec<BuiltPrompt>,
    pub(super) settings: Settings,
    pub(super) echo: bool,
    pub(super) logprobs: Option<usize>,
    /// llama.cpp's `response_fields`: the final answer's fields to return (empty: all).
    pub(super) response_fields: Vec<String>,
}

impl CompletionPlan {
    /// One prompt, one choice set, no echo and no logprobs (chat, infill).
    pub(super) fn single(prompt: BuiltPrompt, settings: Settings) -> Self {
        Self {
            prompts: vec![prompt],
            settings,
            echo: false,
            logprobs: None,
            response_fields: Vec::new(),
        }
    }

    pub(super) fn jobs(&self) -> Vec<ValidRequest> {
        let mut jobs = Vec::new();
        for p in &self.prompts {
            for j in 0..self.settings.n {
                let mut sampling = self.settings.sampling.clone();
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(j as u64));
                jobs.push(ValidRequest {
                    prompt_ids: p.ids.clone(),
                    max_tokens: self.settings.max_tokens.min(p.room),
                    sampling,
                    stop_strings: self.settings.stop.clone(),
                    stop_ids: p.stop_ids.iter().chain(&self.settings.stop_ids).copied().collect(),
                    healing: p.healing.clone(),
                    logprobs: self.logprobs,
                    prompt_logprobs: self.echo && self.logprobs.is_some(),
                    min_indent: self.settings.min_indent,
                    max_predict: self.settings.max_predict,
                });
            }
        }
        jobs
    }

    pub(super) fn truncated(&self) -> usize {
        self.prompts.iter().map(|p| p.truncated).sum()
    }

    /// The prompt a job index belongs to.
    pub(super) fn prompt_of(&self, job: usize) -> &BuiltPrompt {
        &self.prompts[job / self.settings.n]
    }
}

pub(super) fn with_truncation_header(mut resp: Response, truncated: usize) -> Response {
    if truncated > 0 {
        resp.headers_mut()
            .insert(TRUNCATED_HEADER, HeaderValue::from(truncated as u64));
    }
    resp
}

/// Builds the legacy logprobs object for a choice.
pub(super) fn logprobs_object(
    state: &AppState,
    prompt: Option<(&[u32], &[TokenLogprob])>,
    generated: &[TokenLogprob],
    start_offset: usize,
) -> CompletionLogprobs {
    // A healed token's text leaves out the bytes the prompt already holds,
    // so the tokens join to the completion's text; after echoed prompt
    // tokens (which stop before the backed-off ones) it is whole, so all
    // the tokens join to the echoed prompt and the completion.
    let echoed = prompt.is_some();
    let skip = |lp: &TokenLogprob| if echoed { 0 } else { lp.healed_bytes };
    let text_from = |id: u32, skip: usize| {
        let bytes = state.info.token_bytes.get(id as usize).map_or(&[][..], |b| b);
        String::from_utf8_lossy(bytes.get(skip..).unwrap_or_default()).into_owned()
    };
    let text_of = |id: u32| text_from(id, 0);
    let top =
        |lp: &TokenLogprob| -> TopLogprobs { lp.top.iter().map(|&(id, l)| (text_from(id, skip(lp)), l)).collect() };
    let mut out = CompletionLogprobs::default();
    let mut offset = start_offset;
    let mut push = |out: &mut CompletionLogprobs, text: String, lp: Option<f32>, tops: Option<TopLogprobs>| {
        out.text_offset.push(offset);
        offset += text.chars().count();
        out.tokens.push(text);
        out.token_logprobs.push(lp);
        out.top_logprobs.push(tops);
    };
    if let Some((ids, lps)) = prompt {
        for (i, &id) in ids.iter().enumerate() {
            match i.checked_sub(1).and_then(|j| lps.get(j)) {
                Some(lp) => push(&mut out, text_of(id), Some(lp.logprob), Some(top(lp))),
                None => push(&mut out, text_of(id), None, None),
            }
        }
    }
    for lp in generated {
        push(&mut out, text_from(lp.id, skip(lp)), Some(lp.logprob), Some(top(lp)));
    }
    out
}

pub(super) async fn collect_completion(
    state: &AppState,
    plan: &CompletionPlan,
    receivers: Vec<mpsc::UnboundedReceiver<Event>>,
) -> Result<CompletionResponse, ApiError> {
    let mut choices = Vec::with_capacity(receivers.len());
    let mut usage = Usage::default();
    for (index, mut rx) in receivers.into_iter().enumerate() {
        let prompt = plan.prompt_of(index);
        let mut text = if plan.echo { prompt.text.clone() } else { String::new() };
        let mut lps = Vec::new();
        let mut done: Option<Done> = None;
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text { text: t, logprobs } => {
                    text.push_str(&t);
                    lps.extend(logprobs);
                }
                Event::Done(d) => done = Some(d),
                Event::Error(e) => return Err(e),
            }
        }
        let done = done.ok_or(ApiError::Internal)?;
        usage.add(&done, index % plan.settings.n == 0);
        let logprobs = plan.logprobs.map(|_| {
            let echo = plan
                .echo
                .then_some((prompt.ids.as_slice(), done.prompt_logprobs.as_slice()));
            logprobs_object(state, echo, &lps, 0)
        });
        choices.push(CompletionChoice {
            text,
            index,
            logprobs,
            finish_reason: Some(done.finish_reason.as_str()),
        });
    }
    Ok(CompletionResponse {
        id: new_id("cmpl"),
        object: "text_completion",
        created: now_secs(),
        model: state.info.name.clone(),
        choices,
        usage: Some(usage),
    })
}
