//! KL(reference ‖ model) on held-out files, for two models whose
//! vocabularies may differ: the text is tokenized by the model's tokenizer,
//! its ids are mapped to the reference's ids (a vocabulary-pruned model's
//! kept ids), and the reference's distribution is renormalised over the ids
//! the model has.

use std::path::PathBuf;

use candle_core::{Tensor, D};
use serde::Serialize;

use super::perplexity::EvalError;
use crate::data::corpus;
use crate::model::Qwen2;
use crate::tokenizer::CodeTokenizer;

/// The result of a KL run.
#[derive(Debug, Clone, Serialize)]
pub struct KlReport {
    /// Mean KL per position (nats).
    pub kl: f64,
    /// Fraction of positions where both models' most likely token agree.
    pub top1_agreement: f64,
    /// Positions compared.
    pub tokens: usize,
    /// The model's own mean NLL of the next token on the same text (nats).
    pub model_mean_nll: f64,
    /// The model's bits per UTF-8 byte of the predicted text.
    pub model_bits_per_byte: f64,
}

/// Maps every id of `model`'s tokenizer to the reference tokenizer's id of
/// the same token text (`None` when the two are identical). Fails when a
/// token of the model is not in the reference: KL needs the same text units.
pub fn id_map(model: &CodeTokenizer, reference: &CodeTokenizer) -> Result<Option<Vec<u32>>, EvalError> {
    let n = model.vocab_size() as u32;
    let mut map = Vec::with_capacity(n as usize);
    for id in 0..n {
        let token = model.inner().id_to_token(id).unwrap_or_default();
        let Some(rid) = reference.token_id(&token) else {
            return Err(EvalError::Vocab(format!(
                "token {token:?} (id {id}) of the model is not in the reference's vocabulary; KL needs the same tokenizer text"
            )));
        };
        map.push(rid);
    }
    let identity = map.iter().enumerate().all(|(i, &r)| i as u32 == r) && model.vocab_size() == reference.vocab_size();
    Ok(if identity { None } else { Some(map) })
}

/// Compares `model` (with `tok`) against `reference` on the first `window`
/// tokens of each file. `to_reference[i]` is the reference id of model id `i`
/// (`None`: identical vocabularies).
pub fn kl_on_files(
    reference: &Qwen2,
    model: &Qwen2,
    tok: &CodeTokenizer,
    to_reference: Option<&[u32]>,
    files: &[PathBuf],
    window: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<KlReport, EvalError> {
    let index = to_reference
        .map(|ids| Tensor::new(ids, reference.device()))
        .transpose()?;
    let (mut kl, mut agree, mut n) = (0.0f64, 0usize, 0usize);
    let (mut nll, mut predicted, mut bytes) = (0.0f64, 0usize, 0usize);
    for (i, path) in files.iter().enumerate() {
        progress(i, files.len());
        let mut ids = tok.encode(&corpus::read_text(path)?)?;
        ids.truncate(window.min(model.context_len()));
        if ids.is_empty() {
            continue;
        }
        let ref_ids: Vec<u32> = match to_reference {
            Some(map) => ids.iter().map(|&i| map[i as usize]).collect(),
            None => ids.clone(),
        };
        let q = model
            .logits(&Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?, None)?
            .squeeze(0)?;
        let p = reference
            .logits(
                &Tensor::new(ref_ids.as_slice(), reference.device())?.unsqueeze(0)?,
                None,
            )?
            .squeeze(0)?;
        let p = match &index {
            Some(ix) => p.index_select(ix, 1)?,
            None => p,
        };
        let logp = candle_nn::ops::log_softmax(&p, D::Minus1)?;
        let logq = candle_nn::ops::log_softmax(&q, D::Minus1)?;
        // Per token KL ≥ 0; float rounding can make a near-zero one negative.
        kl += (logp.exp()? * (&logp - &logq)?)?
            .sum(D::Minus1)?
            .maximum(0f32)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        let ap: Vec<u32> = logp.argmax(D::Minus1)?.to_vec1()?;
        let aq: Vec<u32> = logq.argmax(D::Minus1)?.to_vec1()?;
        agree += ap.iter().zip(&aq).filter(|(a, b)| a == b).count();
        n += ids.len();
        if ids.len() > 1 {
            nll += crate::eval::perplexity::sum_nll(&q.narrow(0, 0, ids.len() - 1)?, &ids[1..])?;
            predicted += ids.len() - 1;
            bytes += tok.decode(&ids[1..], false)?.len();
        }
    }
    Ok(KlReport {
        kl: kl / n.max(1) as f64,
        top1_agreement: agree as f64 / n.max(1) as f64,
        tokens: n,
        model_mean_nll: nll / predicted.max(1) as f64,
        model_bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
    })
}
