//! HTTP routes: each handler authorizes, validates, submits jobs to the
//! engine and turns engine events into OpenAI (or llama.cpp) responses,
//! whole or as server-sent events.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::chat::{parse_messages, ChatTemplate};
use super::engine::{Done, EngineHandle, Event};
use super::error::ApiError;
use super::openai::*;
use super::validate::{self, BuiltPrompt, ModelInfo, PromptInput, Settings, ValidRequest};
use crate::generate::TokenLogprob;
use crate::metrics::Metrics;

/// Header telling how many prompt tokens FIM truncation dropped.
pub const TRUNCATED_HEADER: &str = "x-greencode-truncated-tokens";

/// Largest request body accepted (TGI's limit).
pub const BODY_LIMIT: usize = 2_000_000;

/// What every handler shares.
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
}

/// The router with every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/fim/completions", post(completions))
        .route("/infill", post(infill))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

impl AppState {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
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

    fn reject(&self, e: ApiError) -> Response {
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
struct CompletionPlan {
    prompts: Vec<BuiltPrompt>,
    settings: Settings,
    echo: bool,
    logprobs: Option<usize>,
}

impl CompletionPlan {
    fn jobs(&self) -> Vec<ValidRequest> {
        let mut jobs = Vec::new();
        for p in &self.prompts {
            for j in 0..self.settings.n {
                let mut sampling = self.settings.sampling.clone();
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(j as u64));
                jobs.push(ValidRequest {
                    prompt_ids: p.ids.clone(),
                    max_tokens: self.settings.max_tokens,
                    sampling,
                    stop_strings: self.settings.stop.clone(),
                    stop_ids: p.stop_ids.clone(),
                    healing: p.healing.clone(),
                    logprobs: self.logprobs,
                    prompt_logprobs: self.echo && self.logprobs.is_some(),
                });
            }
        }
        jobs
    }

    fn truncated(&self) -> usize {
        self.prompts.iter().map(|p| p.truncated).sum()
    }

    /// The prompt a job index belongs to.
    fn prompt_of(&self, job: usize) -> &BuiltPrompt {
        &self.prompts[job / self.settings.n]
    }
}

fn plan_completion(state: &AppState, body: &[u8]) -> Result<CompletionPlan, ApiError> {
    let mut map = validate::parse_object(body)?;
    let prompt = validate::take(&mut map, "prompt");
    let suffix = validate::take_string(&mut map, "suffix")?;
    let echo = validate::take_bool(&mut map, "echo")?.unwrap_or(false);
    let logprobs = match validate::take_int(&mut map, "logprobs")? {
        None => None,
        Some(k @ 0..=5) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::param(
                "logprobs",
                format!("`logprobs` must be between 0 and 5, got {k}"),
            ))
        }
    };
    match validate::take_int(&mut map, "best_of")? {
        None | Some(1) => {}
        Some(b) => {
            return Err(ApiError::param(
                "best_of",
                format!("`best_of` > 1 is not supported, got {b}"),
            ))
        }
    }
    let common = validate::common_params(map)?;
    let settings = validate::settings(&common, &state.info, 16)?;
    if echo && suffix.is_some() {
        return Err(ApiError::param("echo", "`echo` cannot be combined with `suffix`"));
    }
    let inputs = validate::prompts(prompt, &state.info, suffix.is_some())?;
    let prompts = inputs
        .iter()
        .map(|input| match &suffix {
            Some(s) => validate::fim_prompt(input, s, &[], &state.info, settings.max_tokens, settings.token_healing),
            None => validate::plain_prompt(input, &state.info, settings.max_tokens, settings.token_healing),
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
    })
}

fn with_truncation_header(mut resp: Response, truncated: usize) -> Response {
    if truncated > 0 {
        resp.headers_mut()
            .insert(TRUNCATED_HEADER, HeaderValue::from(truncated as u64));
    }
    resp
}

async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        state.authorize(&headers)?;
        let body = body_bytes(body)?;
        let plan = plan_completion(&state, &body)?;
        let receivers = state.engine.submit(plan.jobs())?;
        Ok::<_, ApiError>((plan, receivers))
    };
    let (plan, receivers) = match run.await {
        Ok(x) => x,
        Err(e) => return state.reject(e),
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

/// Builds the legacy logprobs object for a choice.
fn logprobs_object(
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
    let top = |lp: &TokenLogprob| -> HashMap<String, f32> {
        lp.top.iter().map(|&(id, l)| (text_from(id, skip(lp)), l)).collect()
    };
    let mut out = CompletionLogprobs::default();
    let mut offset = start_offset;
    let mut push = |out: &mut CompletionLogprobs, text: String, lp: Option<f32>, tops: Option<HashMap<String, f32>>| {
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

async fn collect_completion(
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

fn sse_json<T: Serialize>(value: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(value).expect("response types serialize"))
}

fn sse_error(e: &ApiError) -> SseEvent {
    SseEvent::default()
        .event("error")
        .data(serde_json::to_string(&e.body()).expect("error bodies serialize"))
}

type SseStream = Sse<axum::response::sse::KeepAliveStream<ReceiverStream<Result<SseEvent, Infallible>>>>;

/// Spawns a task that turns engine events into SSE events. When the client
/// leaves, the SSE channel closes, the task ends and drops the engine
/// receivers, which cancels generation at the next token.
fn sse_task<F>(make: F) -> SseStream
where
    F: FnOnce(mpsc::Sender<Result<SseEvent, Infallible>>) -> futures::future::BoxFuture<'static, ()>,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(make(tx));
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

/// How an OpenAI stream's chunks look on the wire: text completions and
/// chat completions differ only here; the event loop is shared.
trait StreamShape: Send + 'static {
    /// A chunk sent before a choice's first token, if any.
    fn opening(&mut self, index: usize) -> Option<SseEvent>;
    /// New text of choice `index`.
    fn text(&mut self, index: usize, text: String, logprobs: &[TokenLogprob]) -> SseEvent;
    /// The last chunk of choice `index`.
    fn finish(&mut self, index: usize, reason: &'static str) -> SseEvent;
    /// The final usage chunk.
    fn usage(&mut self, usage: Usage) -> SseEvent;
}

/// Streams the jobs of a request as OpenAI SSE chunks in `shape`, then the
/// optional usage chunk and `[DONE]`. When the client leaves, the SSE
/// channel closes, the task ends and drops the engine receivers, which
/// frees their slots at the next step.
fn stream_openai(
    plan: CompletionPlan,
    receivers: Vec<mpsc::UnboundedReceiver<Event>>,
    mut shape: impl StreamShape,
) -> SseStream {
    sse_task(move |tx| {
        Box::pin(async move {
            let mut usage = Usage::default();
            for (index, mut rx) in receivers.into_iter().enumerate() {
                if let Some(open) = shape.opening(index) {
                    if tx.send(Ok(open)).await.is_err() {
                        return;
                    }
                }
                while let Some(ev) = rx.recv().await {
                    let event = match ev {
                        Event::Text { text, logprobs } => shape.text(index, text, &logprobs),
                        Event::Done(d) => {
                            usage.add(&d, index % plan.settings.n == 0);
                            shape.finish(index, d.finish_reason.as_str())
                        }
                        Event::Error(e) => {
                            let _ = tx.send(Ok(sse_error(&e))).await;
                            return;
                        }
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
            if plan.settings.include_usage {
                let _ = tx.send(Ok(shape.usage(usage))).await;
            }
            let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        })
    })
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
    stream_openai(plan, receivers, shape)
}

/// `chat.completion.chunk` chunks.
struct ChatShape {
    state: AppState,
    id: String,
    created: u64,
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
        self.delta(index, ChatDelta::default(), Some(reason))
    }

    fn usage(&mut self, usage: Usage) -> SseEvent {
        self.chunk(vec![], Some(usage))
    }
}

async fn chat(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        state.authorize(&headers)?;
        let body = body_bytes(body)?;
        let mut map = validate::parse_object(&body)?;
        let messages = parse_messages(validate::take(&mut map, "messages"))?;
        if validate::take_bool(&mut map, "logprobs")?.unwrap_or(false) {
            return Err(ApiError::param(
                "logprobs",
                "chat `logprobs` are not supported; use /v1/completions",
            ));
        }
        validate::take_int(&mut map, "top_logprobs")?;
        let common = validate::common_params(map)?;
        let prompt_text = state.chat.render(&messages)?;
        let prompt_len = state.info.tokenizer.encode(&prompt_text).map(|v| v.len()).unwrap_or(0);
        let default_max = state.info.context_len.saturating_sub(prompt_len).max(1);
        let mut settings = validate::settings(&common, &state.info, default_max)?;
        settings.stop.extend(state.chat.stop_strings());
        let prompt = validate::plain_prompt(&PromptInput::Text(prompt_text), &state.info, settings.max_tokens, false)
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
        let plan = CompletionPlan {
            prompts: vec![prompt],
            settings,
            echo: false,
            logprobs: None,
        };
        let receivers = state.engine.submit(plan.jobs())?;
        Ok::<_, ApiError>((plan, receivers))
    };
    let (plan, receivers) = match run.await {
        Ok(x) => x,
        Err(e) => return state.reject(e),
    };
    if plan.settings.stream {
        return stream_chat(state, plan, receivers).into_response();
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

fn stream_chat(state: AppState, plan: CompletionPlan, receivers: Vec<mpsc::UnboundedReceiver<Event>>) -> SseStream {
    let shape = ChatShape {
        state,
        id: new_id("chatcmpl"),
        created: now_secs(),
    };
    stream_openai(plan, receivers, shape)
}

async fn infill(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        state.authorize(&headers)?;
        let body = body_bytes(body)?;
        let map = validate::parse_object(&body)?;
        let req: InfillRequest = serde_path_to_error::deserialize(serde_json::Value::Object(map)).map_err(|e| {
            let path = e.path().to_string();
            ApiError::param(path.clone(), format!("`{path}`: {}", e.into_inner()))
        })?;
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
        let prompt = validate::fim_prompt(
            &prefix,
            &req.input_suffix,
            &extra,
            &state.info,
            settings.max_tokens,
            settings.token_healing,
        )?;
        let plan = CompletionPlan {
            prompts: vec![prompt],
            settings,
            echo: false,
            logprobs: None,
        };
        let receivers = state.engine.submit(plan.jobs())?;
        Ok::<_, ApiError>((plan, receivers))
    };
    let (plan, receivers) = match run.await {
        Ok(x) => x,
        Err(e) => return state.reject(e),
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

async fn models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = state.authorize(&headers) {
        return state.reject(e);
    }
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.info.name.clone(),
            object: "model",
            created: state.created,
            owned_by: "greencode",
            max_model_len: state.info.context_len,
        }],
    })
    .into_response()
}

async fn health(State(state): State<AppState>) -> Response {
    if state.engine.is_ready() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
    } else {
        ApiError::Unavailable("the model is still loading").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}
