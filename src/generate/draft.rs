//! A draft model for speculative decoding: a smaller model of the same
//! family (a pruned copy of the target, its vocabulary possibly pruned)
//! that proposes the next tokens greedily; the target checks them in one
//! step. Ids cross between the two vocabularies through the token text:
//! every draft token must be a target token (a vocabulary-pruned copy's
//! are), and a target token the draft lacks reaches the draft spelled in
//! the draft's own tokens (its text encoded by the draft's tokenizer), so
//! the draft's cache may hold more positions than the sequence has tokens.

use candle_core::DType;

use super::sampling::argmax;
use crate::model::error::{ModelError, Result};
use crate::model::{KvCache, LogitsFor, Qwen2};
use crate::tokenizer::CodeTokenizer;

/// A draft model and the id maps between its vocabulary and the target's.
pub struct DraftModel {
    model: Qwen2,
    /// Target id of each draft id.
    to_target: Vec<u32>,
    /// The draft ids that spell each target id (one id when the draft has
    /// the token; empty when it cannot spell it).
    spelled: Vec<Vec<u32>>,
}

impl DraftModel {
    /// Wraps `model` (with its tokenizer `draft`) as a draft for a target
    /// whose tokenizer is `target`; fails when a draft token is not a target token.
    pub fn new(model: Qwen2, draft: &CodeTokenizer, target: &CodeTokenizer) -> Result<Self> {
        let mut to_target = Vec::with_capacity(draft.vocab_size());
        let mut spelled = vec![Vec::new(); target.vocab_size().max(model.config().vocab_size)];
        for id in 0..draft.vocab_size() as u32 {
            let token = draft.inner().id_to_token(id).unwrap_or_default();
            let Some(t) = target.token_id(&token) else {
                return Err(ModelError::Input(format!(
                    "the draft's token {token:?} (id {id}) is not in the target's vocabulary: a draft must share the target's tokenizer (a vocabulary-pruned copy does)"
                )));
            };
            to_target.push(t);
            if let Some(slot) = spelled.get_mut(t as usize) {
                *slot = vec![id];
            }
        }
        let bytes = target.token_bytes();
        for (t, ids) in spelled.iter_mut().enumerate() {
            if ids.is_empty() {
                if let Some(b) = bytes.get(t).filter(|b| !b.is_empty()) {
                    *ids = draft.encode(&String::from_utf8_lossy(b)).unwrap_or_default();
                }
            }
        }
        Ok(Self {
            model,
            to_target,
            spelled,
        })
    }

    /// The draft network.
    pub fn model(&self) -> &Qwen2 {
        &self.model
    }
}

/// A draft's cache along one sequence: which target tokens it has seen.
pub struct DraftState<'a> {
    draft: &'a DraftModel,
    cache: KvCache,
    /// Target ids whose draft ids are in the cache, in order.
    fed: Vec<u32>,
    /// The cache's length after each of them.
    ends: Vec<usize>,
}

impl<'a> DraftState<'a> {
    /// An empty state for a sequence of up to `capacity` positions.
    pub fn new(draft: &'a DraftModel, capacity: usize) -> Result<Self> {
        // Spelled tokens take more positions in the draft than in the sequence.
        let capacity = (2 * capacity).min(draft.model.context_len());
        Ok(Self {
            draft,
            cache: draft.model.new_cache(capacity)?,
            fed: Vec::new(),
            ends: Vec::new(),
        })
    }

    /// Up to `k` target ids the draft expects after `known` (greedy), fewer
    /// where the draft's cache ends, none when it cannot spell a token of
    /// `known`. Keeps what its cache shares with `known` and feeds the rest.
    pub fn propose(&mut self, known: &[u32], k: usize) -> Result<Vec<u32>> {
        if k == 0 || known.is_empty() {
            return Ok(Vec::new());
        }
        // The cache keeps the common prefix, less one token when it holds
        // all of `known`: the last token is fed again for its logits.
        let common = self.fed.iter().zip(known).take_while(|(a, b)| a == b).count();
        let keep = common.min(known.len() - 1);
        self.fed.truncate(keep);
        self.ends.truncate(keep);
        self.cache.truncate(self.ends.last().copied().unwrap_or(0));
        let mut ids = Vec::new();
        let mut ends = Vec::with_capacity(known.len() - keep);
        let mut end = self.cache.len();
        for &t in &known[keep..] {
            let spelled = self.draft.spelled.get(t as usize).map_or(&[][..], |s| s.as_slice());
            if spelled.is_empty() {
                return Ok(Vec::new());
            }
            ids.extend_from_slice(spelled);
            end += spelled.len();
            ends.push(end);
        }
        let k = k.min(self.cache.capacity().saturating_sub(end));
        if k == 0 {
            return Ok(Vec::new());
        }
        let model = &self.draft.model;
        let mut logits = model.forward_cached(&ids, &mut self.cache, LogitsFor::Last)?;
        self.fed.extend_from_slice(&known[keep..]);
        self.ends.extend(ends);
        let mut out = Vec::with_capacity(k);
        for i in 0..k {
            let row: Vec<f32> = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?;
            let d = argmax(&row[..self.draft.to_target.len().min(row.len())]);
            let t = self.draft.to_target[d as usize];
            out.push(t);
            if i + 1 < k {
                logits = model.forward_cached(&[d], &mut self.cache, LogitsFor::Last)?;
                self.fed.push(t);
                self.ends.push(self.cache.len());
            }
        }
        Ok(out)
    }
}
