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
use crate::energy::{Attributor, Carbon, FlopCounter, StepShare};
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
    /// Prompt tokens run.
    pub prompt_tokens: usize,
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

/// Starts the engine thread; `load` builds the model on that thread (so the
/// server can answer `/health` with 503 meanwhile).
pub fn spawn(
    load: impl FnOnce() -> anyhow::Result<Qwen2> + Send + 'static,
    info: Arc<ModelInfo>,
    metrics: Metrics,
    max_queue: usize,
    mut accounting: Accounting,
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
            metrics.set_model_parameters(&model);
            let flops = FlopCounter::new(&model);
            ready.store(true, Ordering::Release);
            eprintln!("greencode: model loaded, ready");
            let mut last_tick = Instant::now();
            loop {
                match rx.recv_timeout(IDLE_TICK) {
                    Ok(job) => {
                        metrics.waiting.with_label_values(&[metrics.model()]).dec();
                        record_idle(&mut accounting, &metrics, &mut last_tick);
                        run_job(&model, &info, &metrics, &flops, &mut accounting, job);
                        last_tick = Instant::now();
                    }
                    Err(std_mpsc::RecvTimeoutError::Timeout) => record_idle(&mut accounting, &metrics, &mut last_tick),
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            Ok(())
        })
        .expect("spawning a thread");
    (handle, thread)
}

/// How often an idle engine reads the meter (idle energy, power gauge).
const IDLE_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Books the energy since the last reading as idle and updates the power gauge.
fn record_idle(acc: &mut Accounting, metrics: &Metrics, last_tick: &mut Instant) {
    let joules = acc.attributor.idle();
    let secs = last_tick.elapsed().as_secs_f64();
    *last_tick = Instant::now();
    let source = acc.attributor.meter().source().as_str();
    metrics.add_energy(source, joules, true, acc.carbon.grams(joules));
    if secs > 0.0 {
        metrics
            .power_watts
            .with_label_values(&[metrics.model()])
            .set(joules / secs);
    }
    if let Some(mem) = acc.attributor.meter().gpu_memory_bytes() {
        metrics.gpu_memory.with_label_values(&[metrics.model()]).set(mem as f64);
    }
}

fn run_job(model: &Qwen2, info: &ModelInfo, metrics: &Metrics, flops: &FlopCounter, acc: &mut Accounting, job: Job) {
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
    let prompt_len = req.prompt_ids.len();
    let prefill_rows = if req.prompt_logprobs { prompt_len } else { 1 };
    let source = acc.attributor.meter().source().as_str();
    let mut joules = 0.0;
    let mut steps = 0usize;

    let result = generate(model, &gen, |id, raw| {
        // The forward that produced this token just ended: book its energy.
        let step_flops = if steps == 0 {
            flops.forward(prompt_len, 0, prefill_rows)
        } else {
            flops.forward(1, prompt_len + steps - 1, 1)
        };
        steps += 1;
        joules += acc.attributor.step(&[StepShare { flops: step_flops }])[0];
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
    // The rest (the final forward, when a stop id ended generation) is this job's too.
    joules += acc.attributor.step(&[StepShare { flops: 1 }])[0];
    metrics.running.with_label_values(&label).dec();
    let seconds = start.elapsed().as_secs_f64();
    metrics.e2e.with_label_values(&label).observe(seconds);
    let out = match result {
        Ok(out) => out,
        Err(e) => {
            eprintln!("greencode: generation failed: {e}");
            metrics.requests.with_label_values(&[metrics.model(), "error"]).inc();
            send(Event::Error(ApiError::Internal));
            return;
        }
    };
    let generated = out.token_ids.len();
    metrics
        .prompt_tokens
        .with_label_values(&label)
        .inc_by(out.prompt_tokens as u64);
    metrics
        .generation_tokens
        .with_label_values(&label)
        .inc_by(generated as u64);
    let (prefill_flops, decode_flops) = flops.generation(prompt_len, prefill_rows, generated);
    let cost = Cost {
        energy_joules: joules,
        flops: prefill_flops + decode_flops,
        co2_grams: acc.carbon.grams(joules),
        gpu_memory_bytes: acc.attributor.meter().gpu_memory_bytes(),
        energy_source: source,
    };
    metrics.add_energy(source, joules, false, cost.co2_grams);
    metrics.flops.with_label_values(&label).inc_by(cost.flops as f64);
    if generated > 0 {
        metrics
            .energy_per_token
            .with_label_values(&label)
            .observe(joules / generated as f64);
    }
    if let Some(mem) = cost.gpu_memory_bytes {
        metrics.gpu_memory.with_label_values(&label).set(mem as f64);
    }
    if seconds > 0.0 {
        metrics.power_watts.with_label_values(&label).set(joules / seconds);
    }
    let log = |finish: &str| {
        eprintln!(
            "{}",
            serde_json::json!({
                "event": "request",
                "model": metrics.model(),
                "finish_reason": finish,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": generated,
                "seconds": seconds,
                "energy_joules": cost.energy_joules,
                "prefill_flops": prefill_flops,
                "decode_flops": decode_flops,
                "co2_grams": cost.co2_grams,
                "gpu_memory_bytes": cost.gpu_memory_bytes,
                "energy_source": cost.energy_source,
            })
        );
    };
    if cancelled {
        metrics
            .requests
            .with_label_values(&[metrics.model(), "cancelled"])
            .inc();
        log("cancelled");
        return;
    }
    if !stopped_by_string {
        let tail = detok.flush();
        let text = match stops.push(&tail) {
            StopOutcome::Emit(t) => t + &stops.flush(),
            StopOutcome::Stopped(t) => {
                stopped_by_string = true;
                t
            }
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
    log(finish_reason.as_str());
    send(Event::Done(Done {
        finish_reason,
        prompt_tokens: out.prompt_tokens,
        completion_tokens: generated,
        prompt_logprobs: out.prompt_logprobs,
        cost,
    }));
}
