//! The serving step: new tokens for a ragged batch of sequences, each
//! appended to its own KV cache, with logits for the positions asked for.
//! An f32 CPU model takes the fused CPU step (`fused`), a batch of decoding
//! sequences on CUDA the fused GPU step (`decode_cuda`); everything else the
//! candle tensor path written here.

use candle_core::Tensor;

use super::error::{ModelError, Result};
use super::kv_cache::KvCache;
use super::qwen2::Qwen2;

/// One sequence's part of a ragged batch step.
pub struct SeqStep<'a> {
    /// The sequence's KV cache (its length is the start position).
    pub cache: &'a mut KvCache,
    /// New tokens to append.
    pub tokens: &'a [u32],
    /// Which of the new positions get logits.
    pub logits: LogitsFor,
}

/// Which positions of a cached forward get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last new position (generation).
    Last,
    /// Every new position (scoring).
    All,
}

impl Qwen2 {
    /// One serving step over a ragged batch: appends each sequence's new
    /// tokens to its cache, running the projections and MLP once over all
    /// rows and attention per sequence. Returns each sequence's logits
    /// (`[n, vocab]`, `n` = 1 for [`LogitsFor::Last`]). On an f32 CPU model
    /// without LoRA adapters every sequence takes the fused step
    /// (`model::fused`), a batch of only decoding sequences on CUDA the
    /// fused GPU step (`model::decode_cuda`); the rest go through the
    /// tensor path.
    pub fn step(&self, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
        self.check_steps(seqs)?;
        if super::decode_cuda::eligible(self, seqs) {
            return super::decode_cuda::decode_step(self, seqs);
        }
        let fused: Vec<bool> = seqs.iter().map(|s| super::fused::eligible(self, s)).collect();
        if fused.iter().all(|&f| !f) {
            return self.step_tensors(seqs);
        }
        if fused.iter().all(|&f| f) {
            return super::fused::fused_step(self, seqs);
        }
        // Mixed: split, run both paths, put the logits back in order.
        let (mut decode, mut prompt): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
        for (s, f) in seqs.iter_mut().zip(&fused) {
            let part = SeqStep {
                cache: &mut *s.cache,
                tokens: s.tokens,
                logits: s.logits,
            };
            if *f {
                decode.push(part);
            } else {
                prompt.push(part);
            }
        }
        let mut decoded = super::fused::fused_step(self, &mut decode)?.into_iter();
        let mut prompted = self.step_tensors(&mut prompt)?.into_iter();
        Ok(fused
            .iter()
            .map(|&f| if f { decoded.next() } else { prompted.next() }.expect("one logits tensor per sequence"))
            .collect())
    }

    /// Refuses a step with a sequence that adds no token, overflows its
    /// cache, or names a token outside the vocabulary; takes the blocks
    /// the new positions need (a full pool is an error here: the engine
    /// reserves before it steps and preempts when it cannot).
    fn check_steps(&self, seqs: &mut [SeqStep<'_>]) -> Result<()> {
        for s in seqs {
            if s.tokens.is_empty() {
                return Err(ModelError::Input("no tokens to run".into()));
            }
            if s.cache.len() + s.tokens.len() > s.cache.capacity() {
                return Err(ModelError::Input(format!(
                    "sequence of {} tokens exceeds the context length {}",
                    s.cache.len() + s.tokens.len(),
                    s.cache.capacity()
                )));
            }
            self.check_ids(s.tokens)?;
            s.cache
                .reserve(s.tokens.len())
                .map_err(|e| ModelError::Input(e.to_string()))?;
        }
        Ok(())
    }

    /// [`Qwen2::step`] always through candle tensors, never the fused CPU
    /// step: the reference the fused kernels are tested against.
    pub fn step_unfused(&self, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
        self.check_steps(seqs)?;
        self.step_tensors(seqs)
    }

    /// [`Qwen2::step`] through candle tensors, for any device and dtype
    /// (the inputs were checked by `step`).
    fn step_tensors(&self, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let total = ids.len();
        let ids = Tensor::new(ids.as_slice(), self.device())?;
        let mut h = self
            .embed_tokens
            .rows(&ids)?
            .reshape((1, total, self.config.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward_ragged(&h, &self.rope, seqs, i)?;
        }
        // Rows that get logits: gathered so the head runs once.
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(seqs.len());
        let mut start = 0u32;
        for s in seqs.iter_mut() {
            let t = s.tokens.len() as u32;
            let picked: Vec<u32> = match s.logits {
                LogitsFor::Last => vec![start + t - 1],
                LogitsFor::All => (start..start + t).collect(),
            };
            counts.push(picked.len());
            rows.extend(picked);
            s.cache.advance(s.tokens);
            start += t;
        }
        let rows = Tensor::new(rows.as_slice(), self.device())?;
        let logits = self
            .head(&h.squeeze(0)?.index_select(&rows, 0)?.unsqueeze(0)?)?
            .squeeze(0)?;
        let mut out = Vec::with_capacity(counts.len());
        let mut at = 0;
        for n in counts {
            out.push(logits.narrow(0, at, n)?);
            at += n;
        }
        Ok(out)
    }

    /// Appends `tokens` to the sequence in `cache` and returns logits for the
    /// new positions (`[n, vocab]`, `n` = 1 for [`LogitsFor::Last`]).
    pub fn forward_cached(&self, tokens: &[u32], cache: &mut KvCache, which: LogitsFor) -> Result<Tensor> {
        let mut one = [SeqStep {
            cache,
            tokens,
            logits: which,
        }];
        let mut logits = self.step(&mut one)?;
        Ok(logits.pop().expect("one sequence gives one logits tensor"))
    }
}
