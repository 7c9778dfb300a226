//! The engine: one thread that owns the model and runs continuous batching,
//! talking to handlers only through channels. Each loop turn admits waiting
//! jobs into free slots (up to `max_batch`), runs one ragged step over every
//! active slot (decode tokens and bounded prompt chunks together), and sends
//! each slot's new text. A job whose client went away (its event receiver is
//! dropped) leaves at the next step; sends are best-effort and a failed send
//! ends that job only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use candle_core::Tensor;

use super::error::ApiError;
use super::validate::ValidRequest;
use crate::energy::{Attributor, Carbon, FlopCounter};
use crate::generate::{FinishReason, TokenLogprob};
use crate::metrics::{Metrics, ModelFacts};
use crate::model::KvCache;
use crate::model::Qwen2;
use crate::model::SeqStep;

/// What the engine needs from a model: per-sequence caches, one ragged step,
/// and its cost and description for the metrics. The server runs a
/// [`ServedModel`]; tests run the engine on a fake.
pub trait EngineModel {
    /// Longest sequence (prompt + generated) in tokens.
    fn context_len(&self) -> usize;
    /// An empty cache for up to `capacity` positions.
    fn new_cache(&self, capacity: usize) -> crate::model::error::Result<KvCache>;
    /// Appends each sequence's tokens to its cache and returns its logits
    /// (`[n, vocab]`; `n` = 1 for [`LogitsFor::Last`](crate::model::LogitsFor::Last)).
    fn step(&self, seqs: &mut [SeqStep<'_>]) -> crate::model::error::Result<Vec<Tensor>>;
    /// FLOPs of a forward over `new` tokens after `offset` cached ones with `rows` logits rows.
    fn flops(&self, new: usize, offset: usize, rows: usize) -> u64;
    /// Publishes parameter counts and provenance.
    fn describe(&self, metrics: &Metrics);
}

/// A loaded Qwen2 with its FLOP model: what `greencode serve` runs.
pub struct ServedModel {
    model: Qwen2,
    flops: FlopCounter,
}

impl ServedModel {
    /// Wraps a loaded model.
    pub fn new(model: Qwen2) -> Self {
        let flops = FlopCounter::new(&model.shapes());
        Self { model, flops }
    }
}

impl EngineModel for ServedModel {
    fn context_len(&self) -> usize {
        self.model.context_len()
    }

    fn new_cache(&self, capacity: usize) -> crate::model::error::Result<KvCache> {
        self.model.new_cache(capacity)
    }

    fn step(&self, seqs: &mut [SeqStep<'_>]) -> crate::model::error::Result<Vec<Tensor>> {
        self.model.step(seqs)
    }

    fn flops(&self, new: usize, offset: usize, rows: usize) -> u64 {
        self.flops.forward(new, offset, rows)
    }

    fn describe(&self, metrics: &Metrics) {
        let c = crate::model::params::count_params(&self.model);
        let config = self.model.config();
        metrics.set_model_facts(&ModelFacts {
            parameters: [
                ("embeddings", c.embeddings),
                ("attention", c.attention),
                ("mlp", c.mlp),
                ("norms", c.norms),
                ("lm_head", c.lm_head),
                ("total", c.total),
            ],
            pruned_from: config.pruned_from.clone().unwrap_or_default(),
            quantization: self.model.quantization(),
            params_before_pruning: config.params_before_pruning,
        });
    }
}

/// The detokenizer's tables: bytes of every token id, and which ids are special.
#[derive(Debug, Clone)]
pub struct TokenTables {
    /// Bytes of each token id.
    pub token_bytes: Arc<Vec<Vec<u8>>>,
    /// Whether each id is a special token (never shown).
    pub special: Arc<Vec<bool>>,
}

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

/// What one job cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cost {
    /// Joules attributed to the job.
    pub energy_joules: f64,
    /// FLOPs executed for it.
    pub flops: u64,
    /// Grams CO2e.
    pub co2_grams: f64,
    /// GPU memory of the process at the end (None on CPU).
    pub gpu_memory_bytes: Option<u64>,
    /// Meter label.
    pub energy_source: &'static str,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Done {
    /// `stop` or `length`.
    pub finish_reason: FinishReason,
    /// Prompt tokens of the request.
    pub prompt_tokens: usize,
    /// Of those, tokens reused from a cached prefix (not recomputed).
    pub cached_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt log-probabilities (echo with logprobs).
    pub prompt_logprobs: Vec<TokenLogprob>,
    /// Energy, FLOPs, CO2 and memory.
    pub cost: Cost,
}

/// The engine's energy accounting: the meter's attributor, the FLOP model
/// and the carbon conversion.
pub struct Accounting {
    /// Splits meter readings between requests and idle time.
    pub attributor: Attributor,
    /// CO2 per joule.
    pub carbon: Carbon,
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

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most requests queued or running; more get 429.
    pub max_queue: usize,
    /// Most sequences in one step.
    pub max_batch: usize,
    /// Most prompt tokens processed in one step (over all prefilling slots)
    /// while any sequence is decoding, so long prompts stall the others'
    /// decoding for one short step at a time; with none decoding a step
    /// takes up to [`SOLO_PREFILL`] (or this, if larger).
    pub prefill_chunk: usize,
    /// Finished requests' KV caches kept for prompt-prefix reuse (0: off).
    pub prefix_cache: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_queue: 128,
            max_batch: 16,
            prefill_chunk: 64,
            prefix_cache: 16,
        }
    }
}

/// Starts the engine thread; `load` builds the model on that thread (so the
/// server can answer `/health` with 503 meanwhile).
pub fn spawn<M: EngineModel>(
    load: impl FnOnce() -> anyhow::Result<M> + Send + 'static,
    tables: TokenTables,
    metrics: Metrics,
    config: EngineConfig,
    mut accounting: Accounting,
) -> (EngineHandle, std::thread::JoinHandle<anyhow::Result<()>>) {
    let (tx, rx) = std_mpsc::channel::<Job>();
    let ready = Arc::new(AtomicBool::new(false));
    let handle = EngineHandle {
        tx,
        permits: Arc::new(Semaphore::new(config.max_queue)),
        max_queue: config.max_queue,
        ready: Arc::clone(&ready),
        metrics: metrics.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("greencode-engine".into())
        .spawn(move || {
            let model = load()?;
            model.describe(&metrics);
            ready.store(true, Ordering::Release);
            eprintln!("greencode: model loaded, ready");
            Engine::new(&model, tables, &metrics, &mut accounting, config).run(&rx);
            Ok(())
        })
        .expect("spawning a thread");
    (handle, thread)
}

mod detok;
mod scheduler;
#[cfg(test)]
mod tests;

use scheduler::Engine;
pub use scheduler::SOLO_PREFILL;
