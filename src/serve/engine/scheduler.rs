//! The engine's loop: each turn admits waiting jobs into free slots (reusing
//! a kept prefix cache when the prompt starts with one), runs one ragged
//! step over every active slot (decode tokens and bounded prompt chunks
//! together), samples, detokenizes and sends each slot's new text, splits
//! the step's measured energy over the slots by FLOPs, and closes finished
//! or abandoned slots.

use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use super::detok::Detokenizer;
use super::{Accounting, Cost, Done, EngineConfig, EngineModel, Event, Job, TokenTables};
use crate::energy::StepShare;
use crate::generate::sampling::Sampler;
use crate::generate::stop::{StopMatcher, StopOutcome};
use crate::generate::{healed_token_logprob, token_logprob, FinishReason, TokenLogprob};
use crate::metrics::Metrics;
use crate::model::{KvCache, LogitsFor, SeqStep};
use crate::serve::error::ApiError;

/// Prompt tokens a step may take when no sequence is decoding: nobody waits
/// on the step, and one long step computes a prompt faster than several
/// short ones (each reads all the weights).
pub const SOLO_PREFILL: usize = 512;

/// Fewest shared leading tokens worth reusing a cached prefix for.
const MIN_PREFIX_REUSE: usize = 8;

/// New caches hold at least this many positions (bounded by the context), so
/// a follow-up request that extends a prompt fits in the cache it reuses.
const REUSABLE_CAPACITY: usize = 4096;

/// A finished sequence's KV cache kept for prompt-prefix reuse.
struct CachedPrefix {
    /// The tokens whose keys and values the cache holds.
    tokens: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

/// How often an idle engine reads the meter (idle energy, power gauge).
const IDLE_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Where a slot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Prompt tokens remain to be run.
    Prefill,
    /// Generating one token per step.
    Decode,
}

/// One running sequence.
struct Slot {
    job: Job,
    state: SlotState,
    cache: KvCache,
    sampler: Sampler,
    /// Prompt tokens already in the cache.
    prompt_done: usize,
    /// Prompt tokens reused from an earlier request's cache.
    cached_tokens: usize,
    generated: Vec<u32>,
    detok: Detokenizer,
    stops: StopMatcher,
    pending_logprobs: Vec<TokenLogprob>,
    prompt_logprobs: Vec<TokenLogprob>,
    joules: f64,
    flops: u64,
    start: Instant,
    last_token_at: Option<Instant>,
    finish: Option<FinishReason>,
    cancelled: bool,
}

/// The engine thread's state: the model, the waiting jobs, the running
/// slots and the kept prefixes.
pub(super) struct Engine<'a, M> {
    model: &'a M,
    tables: TokenTables,
    metrics: &'a Metrics,
    acc: &'a mut Accounting,
    config: EngineConfig,
    waiting: std::collections::VecDeque<Job>,
    slots: Vec<Slot>,
    last_tick: Instant,
    /// Caches of finished requests, least recently used evicted first.
    prefixes: Vec<CachedPrefix>,
    clock: u64,
}

impl<'a, M: EngineModel> Engine<'a, M> {
    /// An engine with nothing waiting or running.
    pub(super) fn new(
        model: &'a M,
        tables: TokenTables,
        metrics: &'a Metrics,
        acc: &'a mut Accounting,
        config: EngineConfig,
    ) -> Self {
        Self {
            model,
            tables,
            metrics,
            acc,
            config,
            waiting: std::collections::VecDeque::new(),
            slots: Vec::new(),
            last_tick: Instant::now(),
            prefixes: Vec::new(),
            clock: 0,
        }
    }

    /// Takes the kept cache sharing the longest prefix with `prompt` (at least
    /// [`MIN_PREFIX_REUSE`] tokens, room for `needed` positions), truncated to
    /// that prefix; at least one prompt token is left to run for logits.
    fn take_prefix(&mut self, prompt: &[u32], needed: usize, scoring: bool) -> Option<(KvCache, usize)> {
        if scoring {
            return None; // echo + logprobs needs logits at every prompt position
        }
        let (best, shared) = self
            .prefixes
            .iter()
            .enumerate()
            .filter(|(_, p)| p.cache.capacity() >= needed)
            .map(|(i, p)| (i, p.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count()))
            .max_by_key(|&(_, n)| n)?;
        let reuse = shared.min(prompt.len() - 1);
        if reuse < MIN_PREFIX_REUSE {
            return None;
        }
        let mut hit = self.prefixes.swap_remove(best);
        hit.cache.truncate(reuse);
        Some((hit.cache, reuse))
    }

    /// Keeps a finished slot's cache for reuse, evicting the least recently used.
    fn keep_prefix(&mut self, slot: &mut Slot) {
        if self.config.prefix_cache == 0 || slot.cache.is_empty() {
            return;
        }
        let in_cache = slot.cache.len();
        let prompt = &slot.job.req.prompt_ids;
        let mut tokens: Vec<u32> = prompt[..slot.prompt_done.min(in_cache)].to_vec();
        tokens.extend(slot.generated.iter().take(in_cache - tokens.len()));
        if self.prefixes.len() >= self.config.prefix_cache {
            if let Some(oldest) = (0..self.prefixes.len()).min_by_key(|&i| self.prefixes[i].last_used) {
                self.prefixes.swap_remove(oldest);
            }
        }
        self.clock += 1;
        let empty = KvCache::new(0, 0, 0, 0, candle_core::DType::F32, &candle_core::Device::Cpu);
        let Ok(empty) = empty else { return };
        self.prefixes.push(CachedPrefix {
            tokens,
            cache: std::mem::replace(&mut slot.cache, empty),
            last_used: self.clock,
        });
    }

    pub(super) fn run(&mut self, rx: &std_mpsc::Receiver<Job>) {
        loop {
            if self.slots.is_empty() && self.waiting.is_empty() {
                match rx.recv_timeout(IDLE_TICK) {
                    Ok(job) => self.enqueue(job),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        self.record_idle();
                        continue;
                    }
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
                // Energy up to now was idle; from here it belongs to steps.
                self.record_idle();
            }
            while let Ok(job) = rx.try_recv() {
                self.enqueue(job);
            }
            self.admit();
            if !self.slots.is_empty() {
                self.step();
            }
        }
    }

    fn enqueue(&mut self, job: Job) {
        self.waiting.push_back(job);
    }

    /// Moves waiting jobs into free slots; drops jobs whose client left.
    fn admit(&mut self) {
        let label = [self.metrics.model()];
        while self.slots.len() < self.config.max_batch {
            let Some(job) = self.waiting.pop_front() else { break };
            self.metrics.waiting.with_label_values(&label).dec();
            if job.events.is_closed() {
                self.metrics
                    .requests
                    .with_label_values(&[self.metrics.model(), "cancelled"])
                    .inc();
                continue;
            }
            let req = &job.req;
            let needed = req.prompt_ids.len() + req.max_tokens;
            let (cache, reused) = match self.take_prefix(&req.prompt_ids, needed, req.prompt_logprobs) {
                Some(hit) => hit,
                None => {
                    // Room for the whole context (up to a bound) so a follow-up request
                    // that extends this one can reuse the cache.
                    let capacity = needed.max(self.model.context_len().min(REUSABLE_CAPACITY));
                    match self.model.new_cache(capacity) {
                        Ok(c) => (c, 0),
                        Err(e) => {
                            eprintln!("greencode: cannot allocate a KV cache: {e}");
                            let _ = job.events.send(Event::Error(ApiError::Internal));
                            continue;
                        }
                    }
                }
            };
            if reused > 0 {
                self.metrics
                    .prefix_hit_tokens
                    .with_label_values(&label)
                    .inc_by(reused as u64);
            }
            let skip = req.healing.as_ref().map_or(0, |h| h.prefix_len);
            self.metrics.running.with_label_values(&label).inc();
            self.slots.push(Slot {
                state: SlotState::Prefill,
                cache,
                sampler: Sampler::new(req.sampling.clone()),
                prompt_done: reused,
                cached_tokens: reused,
                generated: Vec::new(),
                detok: Detokenizer::new(
                    Arc::clone(&self.tables.token_bytes),
                    Arc::clone(&self.tables.special),
                    skip,
                ),
                stops: StopMatcher::new(req.stop_strings.clone()),
                pending_logprobs: Vec::new(),
                prompt_logprobs: Vec::new(),
                joules: 0.0,
                flops: 0,
                start: Instant::now(),
                last_token_at: None,
                finish: None,
                cancelled: false,
                job,
            });
        }
    }

    /// Books the energy since the last reading as idle and updates the gauges.
    fn record_idle(&mut self) {
        let joules = self.acc.attributor.idle();
        let secs = self.last_tick.elapsed().as_secs_f64();
        self.last_tick = Instant::now();
        let source = self.acc.attributor.meter().source().as_str();
        self.metrics
            .add_energy(source, joules, true, self.acc.carbon.grams(joules));
        if secs > 0.0 && self.slots.is_empty() {
            self.metrics
                .power_watts
                .with_label_values(&[self.metrics.model()])
                .set(joules / secs);
        }
        if let Some(mem) = self.acc.attributor.meter().gpu_memory_bytes() {
            self.metrics
                .gpu_memory
                .with_label_values(&[self.metrics.model()])
                .set(mem as f64);
        }
    }

    /// One ragged step over every active slot, then the results.
    fn step(&mut self) {
        // Clients that left free their slots first (indices below stay valid).
        for slot in self.slots.iter_mut() {
            if slot.job.events.is_closed() {
                slot.cancelled = true;
            }
        }
        self.finish_cancelled();
        // Inputs: a decode token, or the next prompt chunk within the budget
        // (small while someone decodes, so their next token is not held up
        // by a whole prompt).
        let decoding = self.slots.iter().any(|s| s.state == SlotState::Decode);
        let chunk = self.config.prefill_chunk.max(1);
        let mut budget = if decoding { chunk } else { chunk.max(SOLO_PREFILL) };
        let mut inputs: Vec<(usize, Vec<u32>, LogitsFor, bool)> = Vec::new(); // slot, tokens, logits, completes prompt
        for (i, slot) in self.slots.iter_mut().enumerate() {
            match slot.state {
                SlotState::Decode => {
                    let last = *slot.generated.last().expect("decoding slots have generated a token");
                    inputs.push((i, vec![last], LogitsFor::Last, false));
                }
                SlotState::Prefill => {
                    if budget == 0 {
                        continue;
                    }
                    let prompt = &slot.job.req.prompt_ids;
                    let n = (prompt.len() - slot.prompt_done).min(budget);
                    budget -= n;
                    let chunk = prompt[slot.prompt_done..slot.prompt_done + n].to_vec();
                    let completes = slot.prompt_done + n == prompt.len();
                    let logits = if slot.job.req.prompt_logprobs {
                        LogitsFor::All
                    } else {
                        LogitsFor::Last
                    };
                    inputs.push((i, chunk, logits, completes));
                }
            }
        }
        if inputs.is_empty() {
            return;
        }
        let shares: Vec<StepShare> = inputs
            .iter()
            .map(|(i, tokens, logits, _)| {
                let offset = self.slots[*i].cache.len();
                let rows = if *logits == LogitsFor::All { tokens.len() } else { 1 };
                StepShare {
                    flops: self.model.flops(tokens.len(), offset, rows),
                }
            })
            .collect();
        let result = {
            let mut by_index: Vec<Option<&mut Slot>> = self.slots.iter_mut().map(Some).collect();
            let mut batch: Vec<SeqStep> = Vec::with_capacity(inputs.len());
            for (i, tokens, logits, _) in &inputs {
                let slot = by_index[*i].take().expect("each slot appears once");
                batch.push(SeqStep {
                    cache: &mut slot.cache,
                    tokens,
                    logits: *logits,
                });
            }
            self.model.step(&mut batch)
        };
        let joules = self.acc.attributor.step(&shares);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                eprintln!("greencode: step failed: {e}");
                for (i, ..) in &inputs {
                    let slot = &mut self.slots[*i];
                    self.metrics
                        .requests
                        .with_label_values(&[self.metrics.model(), "error"])
                        .inc();
                    let _ = slot.job.events.send(Event::Error(ApiError::Internal));
                    slot.cancelled = true;
                }
                self.finish_cancelled();
                return;
            }
        };
        for (((i, tokens, _, completes), l), (share, j)) in inputs.iter().zip(logits).zip(shares.iter().zip(joules)) {
            let slot = &mut self.slots[*i];
            slot.joules += j;
            slot.flops += share.flops;
            let rows: Vec<Vec<f32>> = match l.to_dtype(candle_core::DType::F32).and_then(|t| t.to_vec2()) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("greencode: reading logits failed: {e}");
                    slot.cancelled = true;
                    continue;
                }
            };
            if slot.state == SlotState::Prefill {
                if slot.job.req.prompt_logprobs {
                    let k = slot.job.req.logprobs.unwrap_or(0);
                    let prompt = &slot.job.req.prompt_ids;
                    for (r, row) in rows.iter().enumerate() {
                        let pos = slot.prompt_done + r; // this row predicts prompt[pos + 1]
                        if pos + 1 < prompt.len() {
                            slot.prompt_logprobs.push(token_logprob(row, prompt[pos + 1], k));
                        }
                    }
                }
                slot.prompt_done += tokens.len();
                if !completes {
                    continue;
                }
                slot.state = SlotState::Decode;
            }
            let raw = rows.last().expect("at least one logits row");
            Self::accept_token(self.metrics, slot, raw);
        }
        self.finish_done();
    }

    /// Picks and emits the next token of a slot whose logits are ready.
    fn accept_token(metrics: &Metrics, slot: &mut Slot, raw: &[f32]) {
        let label = [metrics.model()];
        let req = &slot.job.req;
        let allowed = req
            .healing
            .as_ref()
            .map(|h| h.allowed.as_slice())
            .filter(|_| slot.generated.is_empty());
        let id = slot.sampler.next(raw, &req.prompt_ids, &slot.generated, allowed);
        slot.generated.push(id);
        let now = Instant::now();
        match slot.last_token_at {
            None => metrics
                .ttft
                .with_label_values(&label)
                .observe((now - slot.start).as_secs_f64()),
            Some(t) => metrics.itl.with_label_values(&label).observe((now - t).as_secs_f64()),
        }
        slot.last_token_at = Some(now);
        if req.stop_ids.contains(&id) {
            slot.finish = Some(FinishReason::Stop);
            return;
        }
        if let Some(k) = req.logprobs {
            slot.pending_logprobs.push(match (allowed, &req.healing) {
                (Some(allowed), Some(h)) => healed_token_logprob(raw, allowed, id, k, h.prefix_len),
                _ => token_logprob(raw, id, k),
            });
        }
        let piece = slot.detok.push(id);
        let (text, stopped) = match slot.stops.push(&piece) {
            StopOutcome::Emit(t) => (t, false),
            StopOutcome::Stopped(t) => (t, true),
        };
        if (!text.is_empty() || !slot.pending_logprobs.is_empty())
            && slot
                .job
                .events
                .send(Event::Text {
                    text,
                    logprobs: std::mem::take(&mut slot.pending_logprobs),
                })
                .is_err()
        {
            slot.cancelled = true;
            return;
        }
        if stopped {
            slot.finish = Some(FinishReason::Stop);
        } else if slot.generated.len() >= req.max_tokens {
            slot.finish = Some(FinishReason::Length);
        }
    }

    /// Removes slots whose client left.
    fn finish_cancelled(&mut self) {
        let mut i = 0;
        while i < self.slots.len() {
            if self.slots[i].cancelled {
                let slot = self.slots.swap_remove(i);
                self.close(slot, None);
            } else {
                i += 1;
            }
        }
    }

    /// Removes finished (or cancelled) slots, sending their final events.
    fn finish_done(&mut self) {
        let mut i = 0;
        while i < self.slots.len() {
            if self.slots[i].cancelled {
                let slot = self.slots.swap_remove(i);
                self.close(slot, None);
            } else if let Some(f) = self.slots[i].finish {
                let slot = self.slots.swap_remove(i);
                self.close(slot, Some(f));
            } else {
                i += 1;
            }
        }
    }

    /// Books a slot's cost and metrics; `finish` None means cancelled.
    fn close(&mut self, mut slot: Slot, finish: Option<FinishReason>) {
        let metrics = self.metrics;
        let label = [metrics.model()];
        let seconds = slot.start.elapsed().as_secs_f64();
        metrics.e2e.with_label_values(&label).observe(seconds);
        let generated = slot.generated.len();
        let prompt_tokens = slot.prompt_done;
        metrics
            .prompt_tokens
            .with_label_values(&label)
            .inc_by(prompt_tokens as u64);
        metrics
            .generation_tokens
            .with_label_values(&label)
            .inc_by(generated as u64);
        let source = self.acc.attributor.meter().source().as_str();
        let cost = Cost {
            energy_joules: slot.joules,
            flops: slot.flops,
            co2_grams: self.acc.carbon.grams(slot.joules),
            gpu_memory_bytes: self.acc.attributor.meter().gpu_memory_bytes(),
            energy_source: source,
        };
        metrics.add_energy(source, slot.joules, false, cost.co2_grams);
        metrics.flops.with_label_values(&label).inc_by(cost.flops as f64);
        if generated > 0 {
            metrics
                .energy_per_token
                .with_label_values(&label)
                .observe(slot.joules / generated as f64);
        }
        if let Some(mem) = cost.gpu_memory_bytes {
            metrics.gpu_memory.with_label_values(&label).set(mem as f64);
        }
        if seconds > 0.0 {
            metrics.power_watts.with_label_values(&label).set(slot.joules / seconds);
        }
        let reason = finish.map_or("cancelled", FinishReason::as_str);
        let cached_tokens = slot.cached_tokens;
        self.keep_prefix(&mut slot);
        eprintln!(
            "{}",
            serde_json::json!({
                "event": "request",
                "model": metrics.model(),
                "finish_reason": reason,
                "prompt_tokens": prompt_tokens,
                "cached_tokens": cached_tokens,
                "completion_tokens": generated,
                "seconds": seconds,
                "energy_joules": cost.energy_joules,
                "flops": cost.flops,
                "co2_grams": cost.co2_grams,
                "gpu_memory_bytes": cost.gpu_memory_bytes,
                "energy_source": cost.energy_source,
            })
        );
        metrics.requests.with_label_values(&[metrics.model(), reason]).inc();
        // Last: a scrape that sees the request gone from `running` also sees
        // it counted, with its tokens and energy.
        metrics.running.with_label_values(&label).dec();
        let Some(mut finish_reason) = finish else { return };
        // Text held back for a stop string that never came is released now.
        let tail = slot.detok.flush();
        let text = match slot.stops.push(&tail) {
            StopOutcome::Emit(t) => t + &slot.stops.flush(),
            StopOutcome::Stopped(t) => {
                finish_reason = FinishReason::Stop;
                t
            }
        };
        if !text.is_empty() || !slot.pending_logprobs.is_empty() {
            let _ = slot.job.events.send(Event::Text {
                text,
                logprobs: std::mem::take(&mut slot.pending_logprobs),
            });
        }
        let _ = slot.job.events.send(Event::Done(Done {
            finish_reason,
            prompt_tokens,
            cached_tokens,
            completion_tokens: generated,
            prompt_logprobs: std::mem::take(&mut slot.prompt_logprobs),
            cost,
        }));
    }
}
