//! The engine's loop: each turn reaps slots whose client left, admits
//! waiting jobs while the batch and the KV pool have room, plans one ragged
//! step over every active slot (decode tokens and bounded prompt chunks
//! together), reserves the KV blocks it writes (preempting the newest
//! sequences when the pool is full), runs it, samples, detokenizes and
//! sends each slot's new text, splits the step's measured energy over the
//! slots by FLOPs, and closes finished slots.
//!
//! Prefix sharing: a prompt takes the pool's cached blocks of its prefix at
//! admission and again before each of its chunks (blocks a request still
//! running has computed since), and a prompt whose next block another
//! prompt is computing in this step waits for it instead of computing it
//! twice. Preemption (vLLM's recompute policy): when a slot cannot get a
//! block, the most recently admitted slot gives all of its blocks back and
//! is parked; re-admitted first when there is room, it recomputes its
//! prompt and the tokens it generated (reusing whatever of them is still
//! cached) and goes on from the next token, with its sampler's state
//! intact.
//!
//! Runs (`reuse`): a prompt is matched at admission against recent
//! sequences whose blocks are still cached: the exact continuation of its
//! cached prefix inside a block (a keystroke's prompt shares part of a
//! block with the one before), and with `--cache-reuse` runs that moved;
//! before each chunk, a run starting where the cache ends is copied in
//! (keys turned to their new positions), and chunks stop where the next
//! run starts.

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::detok::Detokenizer;
use super::reuse::{Run, Sources};
use super::{Accounting, Cost, Done, EngineConfig, EngineModel, Event, Job, TokenTables};
use crate::energy::StepShare;
use crate::generate::sampling::Sampler;
use crate::generate::stop::{StopMatcher, StopOutcome};
use crate::generate::{healed_token_logprob, token_logprob, FinishReason, TokenLogprob};
use crate::metrics::Metrics;
use crate::model::{KvCache, KvPool, LogitsFor, RopeShift, SeqStep, KV_BLOCK};
use crate::serve::error::ApiError;

/// Prompt tokens a step may take when no sequence is decoding: nobody waits
/// on the step, and one long step computes a prompt faster than several
/// short ones (each reads all the weights).
pub const SOLO_PREFILL: usize = 512;

/// One admitted sequence.
struct Slot {
    job: Job,
    /// Admission order: preemption takes the newest first.
    order: u64,
    /// Gave its blocks back; waits to be re-admitted.
    parked: bool,
    cache: KvCache,
    sampler: Sampler,
    /// Prompt tokens that have been in the cache (computed or reused).
    prompt_done: usize,
    /// Prompt tokens reused from blocks other requests computed.
    cached_tokens: usize,
    /// Prefix hashes of the prompt's full blocks (sharing pools).
    block_hashes: Vec<u64>,
    /// Runs of the prompt cached elsewhere, to move in rather than compute.
    runs: VecDeque<Run>,
    generated: Vec<u32>,
    detok: Detokenizer,
    stops: StopMatcher,
    pending_logprobs: Vec<TokenLogprob>,
    prompt_logprobs: Vec<TokenLogprob>,
    joules: f64,
    flops: u64,
    start: Instant,
    /// When the whole prompt was first in the cache.
    prompt_done_at: Option<Instant>,
    last_token_at: Option<Instant>,
    finish: Option<FinishReason>,
    /// `finish` came from a stop string.
    stop_word: bool,
    /// Draft length for the next speculative step.
    spec_k: usize,
    /// Draft tokens proposed and accepted so far.
    drafted: usize,
    accepted: usize,
    cancelled: bool,
}

impl Slot {
    /// Prompt and generated tokens: what the cache holds once caught up.
    fn known_len(&self) -> usize {
        self.job.req.prompt_ids.len() + self.generated.len()
    }

    /// Known tokens `from..to`.
    fn known(&self, from: usize, to: usize) -> Vec<u32> {
        let prompt = &self.job.req.prompt_ids;
        (from..to)
            .map(|i| {
                if i < prompt.len() {
                    prompt[i]
                } else {
                    self.generated[i - prompt.len()]
                }
            })
            .collect()
    }

    /// Decoding: the cache holds everything but the last generated token.
    fn decoding(&self) -> bool {
        !self.generated.is_empty() && self.known_len() == self.cache.len() + 1
    }

    /// Needs logits at every prompt position (echo with logprobs): takes no shared blocks.
    fn scoring(&self) -> bool {
        self.job.req.prompt_logprobs
    }
}

/// One slot's part of a planned step.
struct Input {
    slot: usize,
    tokens: Vec<u32>,
    logits: LogitsFor,
    /// Draft tokens after the decode token, to check (speculative decoding).
    draft: Vec<u32>,
}

/// The engine thread's state: the model, the KV pool, the waiting jobs and
/// the admitted slots.
pub(super) struct Engine<'a, M> {
    model: &'a M,
    /// Keys and values of every host-cached sequence (None: device caches).
    pool: Option<Arc<KvPool>>,
    tables: TokenTables,
    metrics: &'a Metrics,
    /// The series of the whole process (the pool's gauges).
    process: &'a Metrics,
    /// The process's meter and carbon conversion, shared by every model's engine.
    acc: &'a RefCell<Accounting>,
    config: EngineConfig,
    waiting: std::collections::VecDeque<Job>,
    slots: Vec<Slot>,
    admitted: u64,
    /// Recent sequences' cached runs (exact continuations of a prompt's
    /// cached prefix; moved runs with `--cache-reuse`) and the turn that moves keys.
    moved: Option<(Sources, RopeShift)>,
}

impl<'a, M: EngineModel> Engine<'a, M> {
    /// An engine with nothing waiting or running.
    pub(super) fn new(
        model: &'a M,
        pool: Option<Arc<KvPool>>,
        tables: TokenTables,
        metrics: &'a Metrics,
        process: &'a Metrics,
        acc: &'a RefCell<Accounting>,
        config: EngineConfig,
    ) -> Self {
        let sharing = pool.as_ref().is_some_and(|p| p.sharing());
        let moved = model.rope_shift().filter(|_| sharing).map(|shift| {
            (
                Sources::new((config.cache_reuse > 0).then_some(config.cache_reuse)),
                shift,
            )
        });
        let engine = Self {
            model,
            pool,
            tables,
            metrics,
            process,
            acc,
            config,
            waiting: std::collections::VecDeque::new(),
            slots: Vec::new(),
            admitted: 0,
            moved,
        };
        engine.record_pool();
        engine
    }

    /// Whether nothing waits or runs.
    pub(super) fn is_idle(&self) -> bool {
        self.slots.is_empty() && self.waiting.is_empty()
    }

    /// Queues a job that arrived.
    pub(super) fn push(&mut self, job: Job) {
        self.waiting.push_back(job);
    }

    /// One turn: reaps, admits, runs one step when any slot is active, and
    /// publishes the pool's state.
    pub(super) fn turn(&mut self) {
        self.reap();
        self.admit();
        if self.slots.iter().any(|s| !s.parked) {
            self.step();
        }
        self.record_pool();
    }

    /// Closes the slots whose client left, before they cost another step
    /// (their full blocks stay cached for the next request).
    fn reap(&mut self) {
        for slot in self.slots.iter_mut() {
            if slot.job.events.is_closed() {
                slot.cancelled = true;
            }
        }
        self.finish_done();
    }

    /// Blocks a sequence of `tokens` (of which `cached` come from the pool)
    /// needs to compute them and take its first new token.
    fn blocks_needed(tokens: usize, cached: usize) -> usize {
        (tokens + 1).div_ceil(KV_BLOCK) - cached / KV_BLOCK
    }

    /// Whether a sequence needing `need` more blocks fits beside the
    /// active slots' remaining prompts and one block of growth for each
    /// decoding slot (when none of this model runs, whether the blocks
    /// other models hold leave room; with the whole pool free, always:
    /// `submit` refused what the whole pool cannot hold).
    fn fits(&self, need: usize) -> bool {
        let Some(pool) = &self.pool else { return true };
        let active: Vec<&Slot> = self.slots.iter().filter(|s| !s.parked).collect();
        if active.is_empty() {
            return pool.available() >= need.min(pool.blocks());
        }
        let promised: usize = active
            .iter()
            .map(|s| {
                if s.decoding() {
                    1
                } else {
                    s.cache.blocks_to_reserve(s.known_len() - s.cache.len())
                }
            })
            .sum();
        pool.available() >= need + promised
    }

    /// Admits parked slots (oldest first), then waiting jobs in arrival
    /// order, while the batch has room and the pool can hold their prompts.
    fn admit(&mut self) {
        let label = [self.metrics.model()];
        let mut active = self.slots.iter().filter(|s| !s.parked).count();
        let mut parked: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].parked).collect();
        parked.sort_by_key(|&i| self.slots[i].order);
        for i in parked {
            // Room for all of it, its own cached blocks counted as taken:
            // re-admitted into a pool that is just as full, it would be
            // preempted again at its next block.
            let s = &self.slots[i];
            if active >= self.config.max_batch || !self.fits(Self::blocks_needed(s.known_len(), 0) + 1) {
                return;
            }
            self.slots[i].parked = false;
            active += 1;
        }
        while active < self.config.max_batch {
            let Some(job) = self.waiting.front() else { break };
            if job.events.is_closed() {
                self.waiting.pop_front();
                self.metrics.waiting.with_label_values(&label).dec();
                self.metrics
                    .requests
                    .with_label_values(&[self.metrics.model(), "cancelled"])
                    .inc();
                continue;
            }
            let prompt = &job.req.prompt_ids;
            let cached = match &self.pool {
                Some(p) if !job.req.prompt_logprobs => KvCache::cached_prefix(p, prompt, prompt.len() - 1),
                _ => 0,
            };
            if !self.fits(Self::blocks_needed(prompt.len(), cached)) {
                break;
            }
            let job = self.waiting.pop_front().expect("checked above");
            self.metrics.waiting.with_label_values(&label).dec();
            self.metrics
                .queue_time
                .with_label_values(&label)
                .observe(job.arrived.elapsed().as_secs_f64());
            let req = &job.req;
            let capacity = (req.prompt_ids.len() + req.max_tokens).min(self.model.context_len());
            let cache = match &self.pool {
                Some(pool) => KvCache::in_pool(pool, capacity),
                None => match self.model.new_cache(capacity) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("greencode: cannot allocate a KV cache: {e}");
                        let _ = job.events.send(Event::Error(ApiError::Internal));
                        continue;
                    }
                },
            };
            let block_hashes = match &self.pool {
                Some(p) if p.sharing() && !req.prompt_logprobs => KvCache::block_hashes(p, &req.prompt_ids),
                _ => Vec::new(),
            };
            let runs = match &self.moved {
                // The last prompt token is always computed: it gives the logits.
                Some((sources, _)) if !req.prompt_logprobs => {
                    sources.plan(&req.prompt_ids, cached, req.prompt_ids.len() - 1).into()
                }
                _ => VecDeque::new(),
            };
            let skip = req.healing.as_ref().map_or(0, |h| h.prefix_len);
            self.metrics.running.with_label_values(&label).inc();
            self.admitted += 1;
            self.slots.push(Slot {
                order: self.admitted,
                parked: false,
                cache,
                sampler: Sampler::new(req.sampling.clone()),
                prompt_done: 0,
                cached_tokens: 0,
                block_hashes,
                runs,
                generated: Vec::new(),
                detok: Detokenizer::new(
                    Arc::clone(&self.tables.token_bytes),
                    Arc::clone(&self.tables.special),
                    skip,
                ),
                stops: StopMatcher::new(req.stop_strings.clone()).with_min_indent(req.min_indent),
                pending_logprobs: Vec::new(),
                prompt_logprobs: Vec::new(),
                joules: 0.0,
                flops: 0,
                start: job.arrived,
                prompt_done_at: None,
                last_token_at: None,
                finish: None,
                stop_word: false,
                spec_k: crate::generate::speculate::START_K.min(self.config.speculate_k),
                drafted: 0,
                accepted: 0,
                cancelled: false,
                job,
            });
            active += 1;
        }
    }

    /// Takes the pool's cached blocks that continue slot `i` (at a block
    /// boundary, leaving at least one token to run), booking the prompt
    /// tokens they hold as reused.
    fn adopt_cached(&mut self, i: usize) {
        let sharing = self.pool.as_ref().is_some_and(|p| p.sharing());
        let slot = &mut self.slots[i];
        if !sharing || slot.scoring() || !slot.cache.len().is_multiple_of(KV_BLOCK) {
            return;
        }
        let known = slot.known(0, slot.known_len());
        if slot.cache.adopt(&known, known.len() - 1) == 0 {
            return;
        }
        let reused = Self::book_reused(slot);
        self.metrics
            .prefix_hit_tokens
            .with_label_values(&[self.metrics.model()])
            .inc_by(reused as u64);
    }

    /// Books the prompt tokens slot's cache gained without computing them
    /// as reused; returns how many.
    fn book_reused(slot: &mut Slot) -> usize {
        let in_prompt = slot.cache.len().min(slot.job.req.prompt_ids.len());
        let reused = in_prompt.saturating_sub(slot.prompt_done);
        slot.cached_tokens += reused;
        slot.prompt_done = slot.prompt_done.max(in_prompt);
        reused
    }

    /// Moves in the runs of slot `i`'s prompt that start where its cache
    /// ends (or that the cache already entered), until one is no longer
    /// cached; returns where the next run starts (chunks stop there).
    fn move_runs(&mut self, i: usize) -> Option<usize> {
        let (_, shift) = self.moved.as_ref()?;
        let slot = &mut self.slots[i];
        let (mut moved, mut exact) = (0, 0);
        while let Some(run) = slot.runs.front() {
            let at = slot.cache.len();
            if run.at + run.len <= at {
                slot.runs.pop_front();
                continue;
            }
            if run.at > at {
                break;
            }
            let skip = at - run.at;
            let want = run.len - skip;
            let tokens = &slot.job.req.prompt_ids[at..at + want];
            let got = slot
                .cache
                .append_moved(&run.source.hashes, run.from + skip, tokens, shift);
            if run.from == run.at {
                exact += got;
            } else {
                moved += got;
            }
            if got < want {
                slot.runs.pop_front(); // the rest was evicted: computed instead
                break;
            }
        }
        Self::book_reused(slot);
        let model = [self.metrics.model()];
        self.metrics
            .prefix_hit_tokens
            .with_label_values(&model)
            .inc_by(exact as u64);
        self.metrics.moved_tokens.with_label_values(&model).inc_by(moved as u64);
        slot.runs.front().map(|r| r.at)
    }

    /// Gives back every block of slot `i` and parks it until there is room.
    fn preempt(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.cache.truncate(0);
        slot.parked = true;
        self.metrics
            .preemptions
            .with_label_values(&[self.metrics.model()])
            .inc();
    }

    /// The newest active slot.
    fn newest_active(&self) -> Option<usize> {
        (0..self.slots.len())
            .filter(|&i| !self.slots[i].parked)
            .max_by_key(|&i| self.slots[i].order)
    }

    /// Takes the blocks `n` more positions of slot `i` need, preempting the
    /// newest slots while the pool is full; false when `i` itself was the
    /// newest and got parked.
    fn reserve(&mut self, i: usize, n: usize) -> bool {
        loop {
            if self.slots[i].cache.reserve(n).is_ok() {
                return true;
            }
            let victim = self.newest_active().expect("slot i is active");
            self.preempt(victim);
            if victim == i {
                return false;
            }
        }
    }

    /// The lookup drafter's proposal for decoding slot `i` (empty when it
    /// does not speculate: see `speculate`'s policy).
    fn draft(&self, i: usize) -> Vec<u32> {
        let slot = &self.slots[i];
        let req = &slot.job.req;
        // Host caches only: the GPU's decode kernels take one token per sequence.
        if self.config.speculate_k == 0 || self.pool.is_none() {
            return Vec::new();
        }
        // Room left: tokens still to generate after the next one, and cache positions.
        let room = (req.max_tokens.saturating_sub(slot.generated.len() + 1))
            .min(slot.cache.capacity().saturating_sub(slot.cache.len() + 1));
        let known = slot.known(0, slot.known_len());
        crate::generate::speculate::lookup(&known, slot.spec_k.min(room))
    }

    /// This step's inputs, oldest slot first: a decode token, or the next
    /// prompt chunk within the budget (small while someone decodes, so
    /// their next token is not held up by a whole prompt), each with its
    /// blocks reserved.
    fn plan(&mut self) -> Vec<Input> {
        let decoders = self.slots.iter().filter(|s| !s.parked && s.decoding()).count();
        let decoding = decoders > 0;
        let chunk = self.config.prefill_chunk.max(1);
        let mut budget = if decoding { chunk } else { chunk.max(SOLO_PREFILL) };
        let mut order: Vec<usize> = (0..self.slots.len()).filter(|&i| !self.slots[i].parked).collect();
        order.sort_by_key(|&i| self.slots[i].order);
        // Prompt blocks some slot is computing: a prompt that needs one waits.
        let mut claimed: HashSet<u64> = HashSet::new();
        let mut inputs = Vec::new();
        for i in order {
            if self.slots[i].parked {
                continue; // preempted for an older slot in this plan
            }
            let (tokens, logits, draft) = if self.slots[i].decoding() {
                let last = *self.slots[i]
                    .generated
                    .last()
                    .expect("decoding slots have generated a token");
                let draft = if decoders <= crate::generate::speculate::MAX_DECODING {
                    self.draft(i)
                } else {
                    Vec::new()
                };
                let logits = if draft.is_empty() {
                    LogitsFor::Last
                } else {
                    LogitsFor::All
                };
                (
                    std::iter::once(last).chain(draft.iter().copied()).collect(),
                    logits,
                    draft,
                )
            } else {
                self.adopt_cached(i);
                let next_run = self.move_runs(i);
                let slot = &self.slots[i];
                let at = slot.cache.len();
                if at.is_multiple_of(KV_BLOCK) {
                    let next = at / KV_BLOCK;
                    if slot.block_hashes.get(next).is_some_and(|h| claimed.contains(h)) {
                        continue;
                    }
                    claimed.extend(slot.block_hashes.iter().skip(next));
                }
                if budget == 0 {
                    continue;
                }
                let until = next_run.filter(|&r| r > at).unwrap_or(usize::MAX);
                let n = (slot.known_len() - at).min(budget).min(until - at);
                budget -= n;
                let logits = if slot.scoring() {
                    LogitsFor::All
                } else {
                    LogitsFor::Last
                };
                (slot.known(at, at + n), logits, Vec::new())
            };
            if self.reserve(i, tokens.len()) {
                inputs.push(Input {
                    slot: i,
                    tokens,
                    logits,
                    draft,
                });
            }
        }
        inputs
    }

    /// One ragged step over every active slot, then the results.
    fn step(&mut self) {
        let inputs = self.plan();
        if inputs.is_empty() {
            return;
        }
        let label = [self.metrics.model()];
        let shares: Vec<StepShare> = inputs
            .iter()
            .map(|input| {
                let offset = self.slots[input.slot].cache.len();
                let rows = if input.logits == LogitsFor::All {
                    input.tokens.len()
                } else {
                    1
                };
                StepShare {
                    flops: self.model.flops(input.tokens.len(), offset, rows),
                }
            })
            .collect();
        let computed: usize = inputs
            .iter()
            .filter(|input| !self.slots[input.slot].decoding())
            .map(|input| input.tokens.len())
            .sum();
        let starts: Vec<usize> = inputs.iter().map(|input| self.slots[input.slot].cache.len()).collect();
        let result = {
            let mut by_index: Vec<Option<&mut Slot>> = self.slots.iter_mut().map(Some).collect();
            let mut batch: Vec<SeqStep> = Vec::with_capacity(inputs.len());
            for input in &inputs {
                let slot = by_index[input.slot].take().expect("each slot appears once");
                batch.push(SeqStep {
                    cache: &mut slot.cache,
                    tokens: &input.tokens,
                    logits: input.logits,
                });
            }
            self.model.step(&mut batch)
        };
        let joules = self.acc.borrow_mut().attributor.step(&shares);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                eprintln!("greencode: step failed: {e}");
                for input in &inputs {
                    let slot = &mut self.slots[input.slot];
                    self.metrics
                        .requests
                        .with_label_values(&[self.metrics.model(), "error"])
                        .inc();
                    let _ = slot.job.events.send(Event::Error(ApiError::Internal));
                    slot.cancelled = true;
                }
                self.finish_done();
                return;
            }
        };
        self.metrics
            .prompt_tokens_computed
            .with_label_values(&label)
            .inc_by(computed as u64);
        for (((input, l), (share, j)), start) in inputs.iter().zip(logits).zip(shares.iter().zip(joules)).zip(starts) {
            let slot = &mut self.slots[input.slot];
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
            let prompt = &slot.job.req.prompt_ids;
            if slot.scoring() {
                let k = slot.job.req.logprobs.unwrap_or(0);
                for (r, row) in rows.iter().enumerate() {
                    // This row predicts token pos + 1; each is booked once
                    // (a preempted prompt runs again).
                    let pos = start + r;
                    if pos + 1 < prompt.len() && pos == slot.prompt_logprobs.len() {
                        slot.prompt_logprobs.push(token_logprob(row, prompt[pos + 1], k));
                    }
                }
            }
            slot.prompt_done = slot.prompt_done.max(slot.cache.len().min(prompt.len()));
            if slot.prompt_done == prompt.len() && slot.prompt_done_at.is_none() {
                slot.prompt_done_at = Some(Instant::now());
            }
            if slot.cache.len() < slot.known_len() {
                continue; // more prompt to run
            }
            if slot.job.req.max_tokens == 0 {
                // Only the cache was asked for (llama.cpp's `n_predict: 0`).
                slot.finish = Some(FinishReason::Length);
                continue;
            }
            if input.draft.is_empty() {
                let raw = rows.last().expect("at least one logits row");
                Self::accept_token(self.metrics, slot, raw);
                continue;
            }
            // Row r follows the decode token and r draft tokens: its token
            // is picked from it exactly as a step of one token would pick it
            // (penalties over the tokens so far, the next random number of
            // the request's stream), and the next row counts only while the
            // picked tokens equal the draft. So a request gets the same
            // tokens, and draws the same random numbers, with or without
            // speculation.
            let mut accepted = 0;
            for (r, row) in rows.iter().enumerate() {
                Self::accept_token(self.metrics, slot, row);
                if slot.finish.is_some() || slot.cancelled {
                    break;
                }
                if input.draft.get(r) != slot.generated.last() {
                    break;
                }
                accepted += 1;
            }
            // The cache keeps the decode token and the accepted drafts.
            slot.cache.truncate(start + 1 + accepted);
            slot.drafted += input.draft.len();
            slot.accepted += accepted;
            slot.spec_k = crate::generate::speculate::next_k(input.draft.len(), accepted, self.config.speculate_k);
            let label = [self.metrics.model(), "lookup"];
            self.metrics
                .spec_drafted
                .with_label_values(&label)
                .inc_by(input.draft.len() as u64);
            self.metrics
                .spec_accepted
                .with_label_values(&label)
                .inc_by(accepted as u64);
        }
        self.finish_done();
    }

    /// Publishes the pool's block counts (the process's: one pool for every model).
    fn record_pool(&self) {
        let Some(pool) = &self.pool else { return };
        let u = pool.usage();
        let label = self.process.model();
        for (state, n) in [("in_use", u.in_use), ("cached", u.cached), ("free", u.free)] {
            self.process.kv_blocks.with_label_values(&[label, state]).set(n as i64);
        }
        self.process
            .kv_usage
            .with_label_values(&[label])
            .set(u.in_use as f64 / u.total.max(1) as f64);
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
        let newline = text.contains('\n');
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
        // llama-server's `t_max_predict_ms`: past the time, stop at a newline.
        let out_of_time = req
            .max_predict
            .is_some_and(|limit| newline && slot.prompt_done_at.is_some_and(|t| t.elapsed() > limit));
        if stopped {
            slot.finish = Some(FinishReason::Stop);
            slot.stop_word = true;
        } else if slot.generated.len() >= req.max_tokens || out_of_time {
            slot.finish = Some(FinishReason::Length);
        }
    }

    /// Removes finished or cancelled slots, sending their final events.
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
        if let (Some((sources, _)), Some((tokens, hashes))) = (&mut self.moved, slot.cache.registered()) {
            sources.record(tokens, hashes);
        }
        let metrics = self.metrics;
        let label = [metrics.model()];
        let seconds = slot.start.elapsed().as_secs_f64();
        let prompt_seconds = slot.prompt_done_at.map_or(seconds, |t| (t - slot.start).as_secs_f64());
        let predicted_seconds = seconds - prompt_seconds;
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
        let cost = {
            let mut acc = self.acc.borrow_mut();
            Cost {
                energy_joules: slot.joules,
                flops: slot.flops,
                co2_grams: acc.carbon.grams(slot.joules),
                gpu_memory_bytes: acc.attributor.meter().gpu_memory_bytes(),
                energy_source: acc.attributor.meter().source().as_str(),
            }
        };
        let source = cost.energy_source;
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
                slot.stop_word = true;
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
            stop_word: slot.stop_word,
            drafted: slot.drafted,
            accepted: slot.accepted,
            prompt_tokens,
            cached_tokens,
            completion_tokens: generated,
            prompt_logprobs: std::mem::take(&mut slot.prompt_logprobs),
            prompt_seconds,
            predicted_seconds,
            cost,
        }));
    }
}
