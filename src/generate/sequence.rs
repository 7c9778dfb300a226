//! Single-sequence generation: prefill the prompt into a KV cache, then pick
//! and feed one token at a time until EOS, a stop token, `max_tokens`, the
//! context end, or the caller asks to stop; with speculation on, feed the
//! last token and the lookup drafter's guesses in one step and keep the
//! guesses the picks agree with (the tokens are the same as without it).
//! Timing is measured here so `generate` and `bench generate` report the
//! same quantities.

use std::time::{Duration, Instant};

use candle_core::DType;

use super::draft::{DraftModel, DraftState};
use super::logprobs::{token_logprob, TokenLogprob};
use super::sampling::{Sampler, SamplingParams};
use super::speculate;
use crate::model::error::{ModelError, Result};
use crate::model::LogitsFor;
use crate::model::Qwen2;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (at least one).
    pub prompt_ids: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Ids that end generation (EOS and, for infilling, FIM end markers).
    pub stop_ids: Vec<u32>,
    /// Keep going past stop ids (benchmarks).
    pub ignore_stop_ids: bool,
    /// When set, the first generated token must be one of these (token healing).
    pub first_token_allowed: Option<Vec<u32>>,
    /// Also return the log-probability of every prompt token (with this many alternatives).
    pub prompt_logprobs: Option<usize>,
    /// Most draft tokens the lookup drafter proposes per step (0: no
    /// speculation). The tokens are those generated without it.
    pub speculate_k: usize,
}

impl GenerationRequest {
    /// A request with the given prompt and budget and every option off.
    pub fn new(prompt_ids: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            prompt_ids,
            max_tokens,
            sampling,
            stop_ids: Vec::new(),
            ignore_stop_ids: false,
            first_token_allowed: None,
            prompt_logprobs: None,
            speculate_k: 0,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id was generated, or the caller stopped it.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What generation produced and how long it took.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// Generated ids, including the stop id that ended generation, if one did.
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// From the start to the first generated token (prefill plus one pick).
    pub time_to_first_token: Duration,
    /// From the first generated token to the last.
    pub decode_time: Duration,
    /// Log-probabilities of prompt tokens 1.. (when asked for).
    pub prompt_logprobs: Vec<TokenLogprob>,
    /// Draft tokens proposed (speculative decoding).
    pub drafted: usize,
    /// Of those, tokens the model agreed with (each saved a step).
    pub accepted: usize,
}

impl GenerationOutput {
    /// Decode rate: tokens after the first per second of decode time.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let n = self.token_ids.len().saturating_sub(1);
        if n == 0 || self.decode_time.is_zero() {
            return 0.0;
        }
        n as f64 / self.decode_time.as_secs_f64()
    }
}

/// What a token callback tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep generating.
    Continue,
    /// Stop now (the caller found a stop sequence or went away).
    Stop,
}

/// Generates from `req`, calling `on_token` with each new id as it is chosen
/// and the raw model logits it was chosen from.
pub fn generate(
    model: &Qwen2,
    req: &GenerationRequest,
    on_token: impl FnMut(u32, &[f32]) -> Flow,
) -> Result<GenerationOutput> {
    generate_with(model, None, req, on_token)
}

/// [`generate`], drafting with `draft` instead of the lookup drafter when
/// one is given and `req.speculate_k` > 0.
pub fn generate_with(
    model: &Qwen2,
    draft_model: Option<&DraftModel>,
    req: &GenerationRequest,
    mut on_token: impl FnMut(u32, &[f32]) -> Flow,
) -> Result<GenerationOutput> {
    let n_prompt = req.prompt_ids.len();
    let ctx = model.context_len();
    if n_prompt == 0 {
        return Err(ModelError::Input("the prompt is empty".into()));
    }
    if n_prompt >= ctx {
        return Err(ModelError::Input(format!(
            "the prompt has {n_prompt} tokens but the context length is {ctx} (at least one position must remain for generation)"
        )));
    }
    let budget = req.max_tokens.min(ctx - n_prompt);
    let start = Instant::now();
    let mut cache = model.new_cache(n_prompt + budget)?;
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut out = Vec::with_capacity(budget);
    let mut first_token_at = None;
    let mut finish = FinishReason::Length;
    let mut prompt_logprobs = Vec::new();
    let logits = match req.prompt_logprobs {
        None => model.forward_cached(&req.prompt_ids, &mut cache, LogitsFor::Last)?,
        Some(k) => {
            let all = model.forward_cached(&req.prompt_ids, &mut cache, LogitsFor::All)?;
            let rows: Vec<Vec<f32>> = all.to_dtype(DType::F32)?.to_vec2()?;
            for (i, row) in rows.iter().enumerate().take(n_prompt - 1) {
                prompt_logprobs.push(token_logprob(row, req.prompt_ids[i + 1], k));
            }
            all.narrow(0, n_prompt - 1, 1)?
        }
    };
    // Rows of logits to pick from, in order; `draft[r]` is the token row
    // r + 1 was computed after (speculation: row r's pick must equal it for
    // the next row to count).
    let mut rows: Vec<Vec<f32>> = vec![logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?];
    let mut draft: Vec<u32> = Vec::new();
    let mut k = speculate::START_K.min(req.speculate_k);
    let mut drafter = match draft_model {
        Some(d) if req.speculate_k > 0 => Some(DraftState::new(d, n_prompt + budget)?),
        _ => None,
    };
    let mut speculating = req.speculate_k > 0;
    let mut pays = speculate::Payoff::default();
    let (mut drafted, mut accepted) = (0usize, 0usize);
    'generation: while out.len() < budget {
        let mut held = 0;
        for (r, raw) in rows.iter().enumerate() {
            let allowed = req.first_token_allowed.as_deref().filter(|_| out.is_empty());
            let id = sampler.next(raw, &req.prompt_ids, &out, allowed);
            out.push(id);
            first_token_at.get_or_insert_with(Instant::now);
            if !req.ignore_stop_ids && req.stop_ids.contains(&id) {
                finish = FinishReason::Stop;
                break 'generation;
            }
            if on_token(id, raw) == Flow::Stop {
                finish = FinishReason::Stop;
                break 'generation;
            }
            if out.len() == budget {
                break 'generation;
            }
            match draft.get(r) {
                Some(&d) if d == id => held += 1,
                _ => break,
            }
        }
        if !draft.is_empty() {
            drafted += draft.len();
            accepted += held;
            k = speculate::next_k(draft.len(), held, req.speculate_k);
            pays.round(held + 1);
            if !pays.pays() {
                speculating = false;
            }
        }
        // The cache keeps every token but the last picked (rejected draft rows go).
        cache.truncate(n_prompt + out.len() - 1);
        let last = *out.last().expect("a token was picked");
        draft = if speculating && out.len() > speculate::PLAIN_FIRST && !pays.wants_plain() {
            let known: Vec<u32> = req.prompt_ids.iter().chain(&out).copied().collect();
            let k = k.min(budget - out.len() - 1);
            let started = Instant::now();
            let proposed = match drafter.as_mut() {
                Some(d) => d.propose(&known, k)?,
                None => speculate::lookup(&known, k),
            };
            // A draft model's first proposal also reads the prompt: a
            // one-off cost, not what each round costs.
            if drafted > 0 || drafter.is_none() {
                pays.drafted_in(started.elapsed());
            }
            proposed
        } else {
            Vec::new()
        };
        let tokens: Vec<u32> = std::iter::once(last).chain(draft.iter().copied()).collect();
        let which = if draft.is_empty() {
            LogitsFor::Last
        } else {
            LogitsFor::All
        };
        let started = Instant::now();
        rows = model
            .forward_cached(&tokens, &mut cache, which)?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        if draft.is_empty() {
            // The first decode step is cold (caches, first pages): not timed.
            if out.len() > 1 {
                pays.plain_in(started.elapsed());
            }
        } else {
            pays.verified_in(started.elapsed());
        }
    }
    let end = Instant::now();
    let first = first_token_at.unwrap_or(end);
    Ok(GenerationOutput {
        token_ids: out,
        finish_reason: finish,
        prompt_tokens: n_prompt,
        time_to_first_token: first - start,
        decode_time: end - first,
        prompt_logprobs,
        drafted,
        accepted,
    })
}
