//! The engine: one thread that owns the model and runs generation jobs in
//! arrival order, talking to handlers only through channels. A job whose
//! client went away (its event receiver is dropped) stops at the next token;
//! sends are best-effort and a failed send ends that job only.
//!
//! This engine runs one sequence at a time; continuous batching replaces the
//! loop body behind the same [`EngineHandle`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::detok::Detokenizer;
use super::error::ApiError;
use super::stop::{StopMatcher, StopOutcome};
use super::validate::{ModelInfo, ValidRequest};
use crate::generate::{generate, token_logprob, FinishReason, Flow, GenerationRequest, TokenLogprob};
use crate::metrics::Metrics;
use crate::model::Qwen2;

/// What the engine tells a handler about one job.
#[derive(Debug)]
pub enum Event {
    /// New text, with the log-probabilities of the tokens it came from (when asked).
    Text {
        /// The text (after stop-string handling).
        text: String,
        /// One entry per generated token since the last event.
        logprobs: Vec<TokenLogprob>,
    },
    /// The job ended.
    Done(Done),
    /// The job failed.
    Error(ApiError),
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Done {
    /// `stop` or `length`.
    pub finish_reason: FinishReason,
    /// Prompt tokens run.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt log-probabilities (echo with logprobs).
    pub prompt_logprobs: Vec<TokenLogprob>,
}

/// A job on its way to the engine.
struct Job {
    req: ValidRequest,
    events: mpsc::UnboundedSender<Event>,
    _permit: OwnedSemaphorePermit,
}

/// The handlers' side of the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std_mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    max_queue: usize,
    ready: Arc<AtomicBool>,
    metrics: Metrics,
}

impl EngineHandle {
    /// Whether the model is loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Queues the jobs of one request (all or none); each gets its event stream.
    pub fn submit(&self, reqs: Vec<ValidRequest>) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ApiError> {
        if !self.is_ready() {
            return Err(ApiError::Unavailable("the model is still loading"));
        }
        let permits = Arc::clone(&self.permits)
            .try_acquire_many_owned(reqs.len() as u32)
            .map_err(|_| ApiError::QueueFull {
                max_queue: self.max_queue,
                retry_after_s: 1,
            })?;
        let mut permits = Some(permits);
        let mut receivers = Vec::with_capacity(reqs.len());
        let n = reqs.len();
        for (i, req) in reqs.into_iter().enumerate() {
            let (events, rx) = mpsc::unbounded_channel();
            let all = permits.as_mut().expect("permits remain until the last job");
            let permit = if i + 1 == n {
                permits.take().expect("last job takes the rest")
            } else {
                all.split(1).expect("one permit per job")
            };
            self.metrics.waiting.with_label_values(&[self.metrics.model()]).inc();
            self.tx
                .send(Job {
                    req,
                    events,
                    _permit: permit,
                })
                .map_err(|_| ApiError::Unavailable("the engine has stopped"))?;
            receivers.push(rx);
        }
        Ok(receivers)
    }
}

/// Starts the engine thread; `load` builds the model on that thread (so the
/// server can answer `/health` with 503 meanwhile).
pub fn spawn(
    load: impl FnOnce() -> anyhow::Result<Qwen2> + Send + 'static,
    info: Arc<ModelInfo>,
    metrics: Metrics,
    max_queue: usize,
) -> (EngineHandle, std::thread::JoinHandle<anyhow::Result<()>>) {
    let (tx, rx) = std_mpsc::channel::<Job>();
    let ready = Arc::new(AtomicBool::new(false));
    let handle = EngineHandle {
        tx,
        permits: Arc::new(Semaphore::new(max_queue)),
        max_queue,
        ready: Arc::clone(&ready),
        metrics: metrics.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("greencode-engine".into())
        .spawn(move || {
            let model = load()?;
            ready.store(true, Ordering::Release);
            eprintln!("greencode: model loaded, ready");
            while let Ok(job) = rx.recv() {
                metrics.waiting.with_label_values(&[metrics.model()]).dec();
                run_job(&model, &info, &metrics, job);
            }
            Ok(())
        })
        .expect("spawning a thread");
    (handle, thread)
}

fn run_job(model: &Qwen2, info: &ModelInfo, metrics: &Metrics, job: Job) {
    let label = [metrics.model()];
    if job.events.is_closed() {
        metrics
            .requests
            .with_label_values(&[metrics.model(), "cancelled"])
            .inc();
        return;
    }
    let req = &job.req;
    let start = Instant::now();
    metrics.running.with_label_values(&label).inc();
    let skip = req.healing.as_ref().map_or(0, |h| h.prefix_len);
    let mut detok = Detokenizer::new(Arc::clone(&info.token_bytes), Arc::clone(&info.special), skip);
    let mut stops = StopMatcher::new(req.stop_strings.clone());
    let mut pending_logprobs = Vec::new();
    let mut stopped_by_string = false;
    let mut cancelled = false;
    let mut last_token_at: Option<Instant> = None;
    let mut gen = GenerationRequest::new(req.prompt_ids.clone(), req.max_tokens, req.sampling.clone());
    gen.stop_ids = req.stop_ids.clone();
    gen.first_token_allowed = req.healing.as_ref().map(|h| h.allowed.clone());
    gen.prompt_logprobs = req.prompt_logprobs.then_some(req.logprobs.unwrap_or(0));
    let send = |ev: Event| job.events.send(ev).is_ok();

    let result = generate(model, &gen, |id, raw| {
        let now = Instant::now();
        match last_token_at {
            None => metrics
                .ttft
                .with_label_values(&label)
                .observe((now - start).as_secs_f64()),
            Some(t) => metrics.itl.with_label_values(&label).observe((now - t).as_secs_f64()),
        }
        last_token_at = Some(now);
        if let Some(k) = req.logprobs {
            pending_logprobs.push(token_logprob(raw, id, k));
        }
        let piece = detok.push(id);
        let (text, stop) = match stops.push(&piece) {
            StopOutcome::Emit(t) => (t, false),
            StopOutcome::Stopped(t) => (t, true),
        };
        if (!text.is_empty() || !pending_logprobs.is_empty())
            && !send(Event::Text {
                text,
                logprobs: std::mem::take(&mut pending_logprobs),
            })
        {
            cancelled = true;
            return Flow::Stop;
        }
        if job.events.is_closed() {
            cancelled = true;
            return Flow::Stop;
        }
        if stop {
            stopped_by_string = true;
            return Flow::Stop;
        }
        Flow::Continue
    });
    metrics.running.with_label_values(&label).dec();
    metrics
        .e2e
        .with_label_values(&label)
        .observe(start.elapsed().as_secs_f64());
    let out = match result {
        Ok(out) => out,
        Err(e) => {
            eprintln!("greencode: generation failed: {e}");
            metrics.requests.with_label_values(&[metrics.model(), "error"]).inc();
            send(Event::Error(ApiError::Internal));
            return;
        }
    };
    metrics
        .prompt_tokens
        .with_label_values(&label)
        .inc_by(out.prompt_tokens as u64);
    metrics
        .generation_tokens
        .with_label_values(&label)
        .inc_by(out.token_ids.len() as u64);
    if cancelled {
        metrics
            .requests
            .with_label_values(&[metrics.model(), "cancelled"])
            .inc();
        return;
    }
    if !stopped_by_string {
        let tail = detok.flush();
        let text = match stops.push(&tail) {
            StopOutcome::Emit(t) => t + &stops.flush(),
            StopOutcome::Stopped(t) => t,
        };
        if !text.is_empty() || !pending_logprobs.is_empty() {
            send(Event::Text {
                text,
                logprobs: std::mem::take(&mut pending_logprobs),
            });
        }
    }
    let finish_reason = if stopped_by_string {
        FinishReason::Stop
    } else {
        out.finish_reason
    };
    metrics
        .requests
        .with_label_values(&[metrics.model(), finish_reason.as_str()])
        .inc();
    send(Event::Done(Done {
        finish_reason,
        prompt_tokens: out.prompt_tokens,
        completion_tokens: out.token_ids.len(),
        prompt_logprobs: out.prompt_logprobs,
    }));
}
