//! The engine: one thread that owns the model (or the models served side by
//! side, each with its own engine state, taking turns: `driver`) and runs
//! continuous batching, talking to handlers only through channels. Each loop turn admits waiting
//! jobs into free slots (up to `max_batch`, and while the KV pool has room),
//! runs one ragged step over every active slot (decode tokens and bounded
//! prompt chunks together), and sends each slot's new text. Keys and values
//! live in one [`KvPool`] per process, bounded in bytes (`--kv-cache-mb`),
//! whose full blocks are shared by prefix between requests (of the same
//! model: each model has its own view of the pool). A job whose
//! client went away (its event receiver is dropped) is reaped before the
//! next step; sends are best-effort and a failed send ends that job only.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use candle_core::Tensor;

use super::error::ApiError;
use super::validate::ValidRequest;
use crate::energy::{Attributor, Carbon, FlopCounter};
use crate::generate::{FinishReason, TokenLogprob};
use crate::metrics::{Metrics, ModelFacts};
use crate::model::{KvCache, KvDtype, KvPool, KvShape, Qwen2, RopeShift, SeqStep};

/// What the engine needs from a model: the shape of its keys and values
/// (or per-sequence caches), one ragged step, and its cost and description
/// for the metrics. The server runs a [`ServedModel`]; tests run the engine
/// on a fake.
pub trait EngineModel {
    /// Longest sequence (prompt + generated) in tokens.
    fn context_len(&self) -> usize;
    /// Keys and values per position when they can live in a host [`KvPool`]
    /// (None: each sequence gets its own device cache from [`new_cache`](Self::new_cache)).
    fn kv_shape(&self) -> Option<KvShape>;
    /// An empty per-sequence cache for up to `capacity` positions (models without a pool).
    fn new_cache(&self, capacity: usize) -> crate::model::error::Result<KvCache>;
    /// Appends each sequence's tokens to its cache and returns its logits
    /// (`[n, vocab]`; `n` = 1 for [`LogitsFor::Last`](crate::model::LogitsFor::Last)).
    fn step(&self, seqs: &mut [SeqStep<'_>]) -> crate::model::error::Result<Vec<Tensor>>;
    /// FLOPs of a forward over `new` tokens after `offset` cached ones with `rows` logits rows.
    fn flops(&self, new: usize, offset: usize, rows: usize) -> u64;
    /// Parameter counts and provenance (published as metrics and on `/v1/models`).
    fn facts(&self) -> ModelFacts;
    /// The RoPE frequencies cached keys are turned by when a run of them
    /// moves to other positions (None: such runs are computed again).
    fn rope_shift(&self) -> Option<RopeShift> {
        None
    }
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

    fn kv_shape(&self) -> Option<KvShape> {
        let m = &self.model;
        (m.device().is_cpu() && m.dtype() == candle_core::DType::F32).then(|| m.kv_shape())
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

    fn rope_shift(&self) -> Option<RopeShift> {
        Some(RopeShift::of(self.model.config()))
    }

    fn facts(&self) -> ModelFacts {
        let c = crate::model::params::count_params(&self.model);
        let config = self.model.config();
        ModelFacts {
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
            weight_bytes: self.model.weight_bytes() as u64,
        }
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
    /// Stopped by a stop string (not an end token): llama.cpp's `word`.
    pub stop_word: bool,
    /// Draft tokens proposed for it (speculative decoding).
    pub drafted: usize,
    /// Of those, tokens the model agreed with.
    pub accepted: usize,
    /// Prompt tokens of the request.
    pub prompt_tokens: usize,
    /// Of those, tokens reused from a cached prefix (not recomputed).
    pub cached_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt log-probabilities (echo with logprobs).
    pub prompt_logprobs: Vec<TokenLogprob>,
    /// From arrival until the prompt was in the cache (queue and prefill), seconds.
    pub prompt_seconds: f64,
    /// From then until the end (generation), seconds.
    pub predicted_seconds: f64,
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
    arrived: std::time::Instant,
    _permit: OwnedSemaphorePermit,
}

/// The handlers' side of the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std_mpsc::Sender<(usize, Job)>,
    /// Which of the engine thread's models this handle submits to.
    model: usize,
    permits: Arc<Semaphore>,
    max_queue: usize,
    ready: Arc<AtomicBool>,
    /// Positions the KV pool holds (0: no pool, no bound beyond the context).
    kv_positions: Arc<AtomicUsize>,
    /// What the model is, once loaded.
    facts: Arc<std::sync::OnceLock<ModelFacts>>,
    metrics: Metrics,
}

impl EngineHandle {
    /// Whether the model is loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The model's parameter counts and provenance (None while loading).
    pub fn facts(&self) -> Option<&ModelFacts> {
        self.facts.get()
    }

    /// Queues the jobs of one request (all or none); each gets its event stream.
    pub fn submit(&self, reqs: Vec<ValidRequest>) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ApiError> {
        if !self.is_ready() {
            return Err(ApiError::Unavailable("the model is still loading"));
        }
        let positions = self.kv_positions.load(Ordering::Acquire);
        if let Some(r) = reqs
            .iter()
            .find(|r| positions > 0 && r.prompt_ids.len() + r.max_tokens > positions)
        {
            return Err(ApiError::KvBudget {
                prompt: r.prompt_ids.len(),
                max_tokens: r.max_tokens,
                positions,
            });
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
            let job = Job {
                req,
                events,
                arrived: std::time::Instant::now(),
                _permit: permit,
            };
            self.tx
                .send((self.model, job))
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
    /// Share full KV blocks between requests with the same prompt prefix
    /// (running or finished; cached until their memory is needed).
    pub prefix_caching: bool,
    /// The KV pool's size in bytes (None: [`default_kv_bytes`]).
    pub kv_cache_bytes: Option<usize>,
    /// How the pool stores keys and values (default f16, llama.cpp's:
    /// half the memory of f32 for a mean KL of about 1e-7 on held-out
    /// code, `tests/kv_pool.rs`).
    pub kv_dtype: KvDtype,
    /// Shortest run of prompt tokens that is moved from where a recent
    /// sequence cached it instead of computed (llama-server's
    /// `--cache-reuse`; 0: off, the default, as there). Needs prefix caching.
    pub cache_reuse: usize,
    /// Most draft tokens a sequence checks per step with the lookup
    /// drafter (`--speculate lookup`; 0: no speculation, the default).
    pub speculate_k: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_queue: 128,
            max_batch: 16,
            prefill_chunk: 64,
            prefix_caching: true,
            kv_cache_bytes: None,
            kv_dtype: KvDtype::F16,
            cache_reuse: 0,
            speculate_k: 0,
        }
    }
}

/// Share of the memory available after the weights that the KV pool takes by default.
pub const KV_DEFAULT_SHARE: f64 = 0.4;

/// The default KV pool size: [`KV_DEFAULT_SHARE`] of the memory available
/// now (after the weights are loaded), and no more than twice what
/// `max_batch` full-context sequences need (the second half keeps finished
/// prefixes), at least one full-context sequence.
pub fn default_kv_bytes(bytes_per_token: usize, context: usize, max_batch: usize) -> usize {
    let full = bytes_per_token * context;
    let available = crate::model::device::available_memory().unwrap_or(8 << 30) as f64;
    ((available * KV_DEFAULT_SHARE) as usize)
        .min(2 * max_batch * full)
        .max(full)
}

/// Makes the process's KV pool, one view per model whose keys and values
/// live on the host (None for a model with device caches), and logs its
/// size. The pool's options (size, dtype, prefix caching) are the first
/// model's configuration: they are the process's.
fn make_pools<M: EngineModel>(models: &[M], configs: &[EngineConfig]) -> Vec<Option<Arc<KvPool>>> {
    let config = &configs[0];
    let hosted: Vec<(usize, KvShape)> = models
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.kv_shape().map(|s| (i, s)))
        .collect();
    let mut pools = vec![None; models.len()];
    if hosted.is_empty() {
        return pools;
    }
    let per_token = hosted
        .iter()
        .map(|(_, s)| s.bytes_per_token(config.kv_dtype))
        .max()
        .unwrap_or(0);
    let context = hosted.iter().map(|&(i, _)| models[i].context_len()).max().unwrap_or(0);
    let batch: usize = hosted.iter().map(|&(i, _)| configs[i].max_batch).sum();
    let bytes = config
        .kv_cache_bytes
        .unwrap_or_else(|| default_kv_bytes(per_token, context, batch));
    let shapes: Vec<KvShape> = hosted.iter().map(|(_, s)| *s).collect();
    let views = KvPool::shared(&shapes, config.kv_dtype, bytes, config.prefix_caching);
    let pool = &views[0];
    let (blocks, positions) = (pool.blocks(), pool.positions());
    eprintln!(
        "greencode: KV cache {:.1} MiB ({}, {} blocks of {} positions, {} KB a position{}): {} positions, {:.1} full-context sequences of {}; prefix caching {}",
        (blocks * pool.block_bytes()) as f64 / (1 << 20) as f64,
        config.kv_dtype.name(),
        blocks,
        crate::model::KV_BLOCK,
        per_token as f64 / 1000.0,
        if shapes.len() > 1 { ", shared by every model" } else { "" },
        positions,
        positions as f64 / context.max(1) as f64,
        context,
        if config.prefix_caching { "on" } else { "off" },
    );
    for ((i, _), view) in hosted.into_iter().zip(views) {
        pools[i] = Some(view);
    }
    pools
}

/// One model for the engine thread: how to load it (on that thread), its
/// token tables, its metrics and its limits.
pub struct EngineSpec<M> {
    /// Builds the model.
    pub load: Box<dyn FnOnce() -> anyhow::Result<M> + Send>,
    /// The detokenizer's tables of its tokenizer.
    pub tables: TokenTables,
    /// Its series (its `model` label).
    pub metrics: Metrics,
    /// Its batching limits; the KV pool's options are taken from the first model's.
    pub config: EngineConfig,
}

/// Starts the engine thread for one model; `load` builds the model on that
/// thread (so the server can answer `/health` with 503 meanwhile).
pub fn spawn<M: EngineModel + 'static>(
    load: impl FnOnce() -> anyhow::Result<M> + Send + 'static,
    tables: TokenTables,
    metrics: Metrics,
    config: EngineConfig,
    accounting: Accounting,
) -> (EngineHandle, std::thread::JoinHandle<anyhow::Result<()>>) {
    let process = metrics.clone();
    let spec = EngineSpec {
        load: Box::new(load),
        tables,
        metrics,
        config,
    };
    let (mut handles, thread) = spawn_many(vec![spec], process, accounting);
    (handles.remove(0), thread)
}

/// Starts one engine thread for several models served side by side: they
/// load in order, share the KV pool, the meter and the compute team, and
/// take turns step by step. `process` labels what belongs to no one model.
/// The handles are ready once every model has loaded.
pub fn spawn_many<M: EngineModel + 'static>(
    specs: Vec<EngineSpec<M>>,
    process: Metrics,
    accounting: Accounting,
) -> (Vec<EngineHandle>, std::thread::JoinHandle<anyhow::Result<()>>) {
    let (tx, rx) = std_mpsc::channel::<(usize, Job)>();
    let ready = Arc::new(AtomicBool::new(false));
    let kv_positions = Arc::new(AtomicUsize::new(0));
    let handles: Vec<EngineHandle> = specs
        .iter()
        .enumerate()
        .map(|(model, spec)| EngineHandle {
            tx: tx.clone(),
            model,
            permits: Arc::new(Semaphore::new(spec.config.max_queue)),
            max_queue: spec.config.max_queue,
            ready: Arc::clone(&ready),
            kv_positions: Arc::clone(&kv_positions),
            facts: Arc::default(),
            metrics: spec.metrics.clone(),
        })
        .collect();
    drop(tx);
    let facts: Vec<_> = handles.iter().map(|h| Arc::clone(&h.facts)).collect();
    let thread = std::thread::Builder::new()
        .name("greencode-engine".into())
        .spawn(move || {
            let mut models = Vec::with_capacity(specs.len());
            let mut rest = Vec::with_capacity(specs.len());
            for (spec, facts) in specs.into_iter().zip(facts) {
                let model = (spec.load)()?;
                let described = model.facts();
                spec.metrics.set_model_facts(&described);
                let _ = facts.set(described);
                models.push(model);
                rest.push((spec.tables, spec.metrics, spec.config));
            }
            let configs: Vec<EngineConfig> = rest.iter().map(|r| r.2).collect();
            let pools = make_pools(&models, &configs);
            if let Some(p) = pools.iter().flatten().next() {
                kv_positions.store(p.positions(), Ordering::Release);
            }
            ready.store(true, Ordering::Release);
            eprintln!(
                "greencode: model{} loaded, ready",
                if models.len() > 1 { "s" } else { "" }
            );
            let acc = RefCell::new(accounting);
            let engines = models
                .iter()
                .zip(pools)
                .zip(&rest)
                .map(|((model, pool), (tables, metrics, config))| {
                    Engine::new(model, pool, tables.clone(), metrics, &process, &acc, *config)
                })
                .collect();
            Driver::new(engines, &acc, &process).run(&rx);
            Ok(())
        })
        .expect("spawning a thread");
    (handles, thread)
}

mod detok;
mod driver;
mod reuse;
mod scheduler;
#[cfg(test)]
mod tests;

use driver::Driver;
use scheduler::Engine;
pub use scheduler::SOLO_PREFILL;
