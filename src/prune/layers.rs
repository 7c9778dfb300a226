//! Layer pruning. `kl` (default): greedy; at each step every remaining layer
//! is tried removed (a layer mask, no weight copies; the hidden states of
//! the layers before it are reused) and the one whose removal gives the
//! smallest KL(original ‖ candidate) over all calibration positions goes.
//! Baselines: ShortGPT's block influence (`bi`: 1 − mean cos between a
//! layer's input and output, lowest removed in one shot) and the angular
//! distance of Gromov et al. (`angular`: the block of n consecutive layers
//! whose input and output are closest).

use candle_core::{Tensor, D};
use rayon::prelude::*;
use serde::Serialize;

use super::PruneError;
use crate::model::{LayerMask, Qwen2};
use crate::output::progress::Progress;

/// How layers are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerMetric {
    /// Greedy KL against the unpruned model.
    Kl,
    /// ShortGPT block influence.
    Bi,
    /// Angular distance between a block's input and output.
    Angular,
}

/// One removal decision.
#[derive(Debug, Clone, Serialize)]
pub struct LayerStep {
    /// Original index of the layer removed.
    pub removed: usize,
    /// Its score (KL in nats/token for `kl`; BI or angular distance otherwise).
    pub score: f64,
    /// Every candidate's score at this step (original index, score).
    pub candidates: Vec<(usize, f64)>,
}

/// The reference distribution at every position of one batch, kept as
/// plain rows so KL against a candidate is one fused pass.
pub struct RefRows {
    /// Probabilities, `rows × vocab`.
    p: Vec<f32>,
    /// Σ p·log p per row.
    neg_entropy: Vec<f32>,
    vocab: usize,
}

impl RefRows {
    fn new(logits: &Tensor) -> Result<Self, PruneError> {
        let vocab = logits.dim(D::Minus1)?;
        let mut p: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let neg_entropy = p
            .par_chunks_mut(vocab)
            .map(|row| {
                let lse = log_sum_exp(row);
                let mut ne = 0.0f64;
                for x in row.iter_mut() {
                    let lp = *x - lse;
                    *x = lp.exp();
                    ne += (*x * lp) as f64;
                }
                ne as f32
            })
            .collect();
        Ok(Self { p, neg_entropy, vocab })
    }

    /// Σ over rows of KL(reference ‖ softmax(logits)).
    fn kl_sum(&self, logits: &Tensor) -> Result<f64, PruneError> {
        let q: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        if q.len() != self.p.len() {
            return Err(PruneError::Target(
                "candidate logits do not match the reference shape".into(),
            ));
        }
        Ok(q.par_chunks(self.vocab)
            .zip(self.p.par_chunks(self.vocab))
            .zip(self.neg_entropy.par_iter())
            .map(|((q, p), &ne)| {
                let dot: f64 = q.iter().zip(p).map(|(&a, &b)| (a * b) as f64).sum();
                ne as f64 - dot + log_sum_exp(q) as f64
            })
            .sum())
    }
}

/// log Σ exp(x), stable.
fn log_sum_exp(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = x.iter().map(|&v| (v - m).exp()).sum();
    m + s.ln()
}

/// Calibration inputs in mini-batches, with the reference distributions.
pub struct CalibSet {
    /// Token batches `[b, len]`.
    pub batches: Vec<Tensor>,
    /// The reference model's distribution at every position of each batch.
    pub reference: Vec<RefRows>,
}

impl CalibSet {
    /// Batches `windows` (`batch` per tensor) and computes the reference log-probabilities.
    pub fn new(model: &Qwen2, windows: &[Vec<u32>], batch: usize) -> Result<Self, PruneError> {
        let batches = to_batches(model, windows, batch)?;
        let progress = Progress::new("reference log-probs", batches.len());
        let mut reference = Vec::with_capacity(batches.len());
        for (i, b) in batches.iter().enumerate() {
            reference.push(RefRows::new(&model.logits(b, None)?)?);
            progress.set(i + 1, "");
        }
        progress.finish(&format!("{} windows", windows.len()));
        Ok(Self { batches, reference })
    }

    /// Tokens per batch position count (all positions of all windows).
    pub fn positions(&self) -> usize {
        self.batches.iter().map(|b| b.elem_count()).sum()
    }
}

/// Token windows as `[b, len]` tensors.
pub fn to_batches(model: &Qwen2, windows: &[Vec<u32>], batch: usize) -> Result<Vec<Tensor>, PruneError> {
    windows
        .chunks(batch.max(1))
        .map(|chunk| {
            let len = chunk[0].len();
            let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
            Ok(Tensor::from_vec(flat, (chunk.len(), len), model.device())?)
        })
        .collect()
}

/// Mean KL per position of `model` under `mask` against the reference.
pub fn mean_kl(model: &Qwen2, set: &CalibSet, mask: Option<&LayerMask>) -> Result<f64, PruneError> {
    let mut total = 0.0;
    for (b, r) in set.batches.iter().zip(&set.reference) {
        total += r.kl_sum(&model.logits(b, mask)?)?;
    }
    Ok(total / set.positions() as f64)
}

/// Inputs to every layer (and the head, last) for each batch under `mask`.
fn layer_inputs(model: &Qwen2, set: &CalibSet, mask: &LayerMask) -> Result<Vec<Vec<Tensor>>, PruneError> {
    set.batches
        .iter()
        .map(|b| {
            let mut h = model.embed(b)?;
            let mut ins = Vec::with_capacity(model.num_layers() + 1);
            for i in 0..model.num_layers() {
                ins.push(h.clone());
                if mask.is_active(i) {
                    h = model.layer_forward(i, &h)?;
                }
            }
            ins.push(h);
            Ok(ins)
        })
        .collect()
}

/// Removes `n` layers by `metric`; returns the steps in removal order.
pub fn choose_layers(
    model: &Qwen2,
    set: &CalibSet,
    n: usize,
    metric: LayerMetric,
) -> Result<Vec<LayerStep>, PruneError> {
    let total = model.num_layers();
    if n >= total {
        return Err(PruneError::Target(format!(
            "cannot remove {n} of {total} layers (at least one must remain)"
        )));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    match metric {
        LayerMetric::Kl => greedy_kl(model, set, n),
        LayerMetric::Bi => block_influence(model, set, n),
        LayerMetric::Angular => angular(model, set, n),
    }
}

fn greedy_kl(model: &Qwen2, set: &CalibSet, n: usize) -> Result<Vec<LayerStep>, PruneError> {
    let total = model.num_layers();
    let mut mask = LayerMask::all(total);
    let mut inputs = layer_inputs(model, set, &mask)?;
    let positions = set.positions() as f64;
    let mut steps = Vec::with_capacity(n);
    let evaluations: usize = (0..n).map(|k| total - k).sum();
    let progress = Progress::new("layers (greedy KL)", evaluations);
    let mut done = 0;
    for _ in 0..n {
        let mut candidates = Vec::new();
        for c in mask.active() {
            let mut kl = 0.0;
            for (bi, ins) in inputs.iter().enumerate() {
                let mut h = ins[c].clone();
                for j in (c + 1..total).filter(|&j| mask.is_active(j)) {
                    h = model.layer_forward(j, &h)?;
                }
                kl += set.reference[bi].kl_sum(&model.head(&h)?)?;
            }
            candidates.push((c, kl / positions));
            done += 1;
            progress.set(done, &format!("layer {c}: KL {:.4}", kl / positions));
        }
        let &(best, score) = candidates
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one active layer");
        mask = LayerMask::without(total, &[mask_removed(&mask), vec![best]].concat());
        // Inputs of the layers after the removed one change; recompute them once.
        for ins in inputs.iter_mut() {
            let mut h = ins[best].clone();
            for (j, slot) in ins.iter_mut().enumerate().skip(best + 1) {
                *slot = h.clone();
                if j < total && mask.is_active(j) {
                    h = model.layer_forward(j, &h)?;
                }
            }
        }
        steps.push(LayerStep {
            removed: best,
            score,
            candidates,
        });
    }
    progress.finish(&format!(
        "removed {:?}",
        steps.iter().map(|s| s.removed).collect::<Vec<_>>()
    ));
    Ok(steps)
}

fn mask_removed(mask: &LayerMask) -> Vec<usize> {
    (0..mask.len()).filter(|&i| !mask.is_active(i)).collect()
}

/// Mean cosine similarity over all token positions of two `[b, t, h]` tensors.
fn mean_cos(a: &Tensor, b: &Tensor) -> Result<f64, PruneError> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?;
    let cos = (dot / ((na * nb)? + 1e-12)?)?;
    Ok(cos.mean_all()?.to_scalar::<f32>()? as f64)
}

fn block_influence(model: &Qwen2, set: &CalibSet, n: usize) -> Result<Vec<LayerStep>, PruneError> {
    let total = model.num_layers();
    let inputs = layer_inputs(model, set, &LayerMask::all(total))?;
    let mut bi = vec![0.0; total];
    for ins in &inputs {
        for (i, score) in bi.iter_mut().enumerate() {
            *score += (1.0 - mean_cos(&ins[i], &ins[i + 1])?) / inputs.len() as f64;
        }
    }
    let candidates: Vec<(usize, f64)> = bi.iter().copied().enumerate().collect();
    let mut order = candidates.clone();
    order.sort_by(|a, b| a.1.total_cmp(&b.1));
    Ok(order[..n]
        .iter()
        .map(|&(removed, score)| LayerStep {
            removed,
            score,
            candidates: candidates.clone(),
        })
        .collect())
}

fn angular(model: &Qwen2, set: &CalibSet, n: usize) -> Result<Vec<LayerStep>, PruneError> {
    let total = model.num_layers();
    let inputs = layer_inputs(model, set, &LayerMask::all(total))?;
    let mut candidates = Vec::new();
    for start in 0..=total - n {
        let mut d = 0.0;
        for ins in &inputs {
            let cos = mean_cos(&ins[start], &ins[start + n])?.clamp(-1.0, 1.0);
            d += cos.acos() / std::f64::consts::PI / inputs.len() as f64;
        }
        candidates.push((start, d));
    }
    let &(start, score) = candidates
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("at least one block");
    Ok((start..start + n)
        .map(|removed| LayerStep {
            removed,
            score,
            candidates: candidates.clone(),
        })
        .collect())
}
