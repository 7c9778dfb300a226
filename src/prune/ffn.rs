//! FFN neuron pruning: which intermediate neurons of each layer survive.
//! Flab-Pruner's positional heuristics keep the same indices in every layer
//! (`top`: the first WIDTH, `bottom`: the last, `middle`: centred, `random`:
//! a seeded sample); `act` keeps, per layer, the neurons with the largest
//! mean |silu(gate)·up| on calibration data times the norm of their
//! `down_proj` column (their typical contribution to the residual stream).

use candle_core::Tensor;
use rand::{seq::SliceRandom, SeedableRng};
use serde::Serialize;

use super::PruneError;
use crate::model::{LayerMask, Qwen2};
use crate::output::progress::Progress;

/// How neurons are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnScore {
    /// The first WIDTH indices.
    Top,
    /// The last WIDTH indices.
    Bottom,
    /// WIDTH indices centred in the range.
    Middle,
    /// A seeded random sample, the same in every layer.
    Random,
    /// Activation-aware: mean |activation| × ‖down column‖, per layer.
    Act,
}

/// Per-layer neuron importance (for `act`), computed once for any width.
pub struct NeuronScores(pub Vec<Vec<f32>>);

/// Measures neuron importance over calibration batches for the layers `mask` keeps.
pub fn activation_scores(model: &Qwen2, batches: &[Tensor], mask: &LayerMask) -> Result<NeuronScores, PruneError> {
    let n = model.num_layers();
    let mut sums: Vec<Option<Tensor>> = vec![None; n];
    let mut tokens = 0usize;
    let progress = Progress::new("FFN activation statistics", batches.len());
    for (bi, b) in batches.iter().enumerate() {
        tokens += b.elem_count();
        let mut h = model.embed(b)?;
        for (i, sum) in sums.iter_mut().enumerate() {
            if !mask.is_active(i) {
                continue;
            }
            let (mid, x) = model.layer_attention(i, &h)?;
            let mlp = &model.layers[i].mlp;
            let act = mlp.activations(&x)?;
            let s = act.abs()?.sum((0, 1))?;
            *sum = Some(match sum.take() {
                Some(prev) => (prev + s)?,
                None => s,
            });
            h = (mid + mlp.down_proj.forward(&act)?)?;
        }
        progress.set(bi + 1, "");
    }
    progress.finish(&format!("{tokens} tokens"));
    let mut scores = Vec::with_capacity(n);
    for (i, sum) in sums.into_iter().enumerate() {
        let width = model.layers[i].mlp.width();
        let Some(sum) = sum else {
            scores.push(vec![0.0; width]);
            continue;
        };
        let mean = (sum / tokens as f64)?;
        let col_norm = model.layers[i].mlp.down_proj.weight()?.sqr()?.sum(0)?.sqrt()?;
        scores.push((mean * col_norm)?.to_vec1::<f32>()?);
    }
    Ok(NeuronScores(scores))
}

/// The neurons to keep in layer `layer`, ascending.
pub fn choose(
    score: FfnScore,
    layer_width: usize,
    keep: usize,
    layer: usize,
    seed: u64,
    act: Option<&NeuronScores>,
) -> Result<Vec<u32>, PruneError> {
    if keep == 0 || keep > layer_width {
        return Err(PruneError::Target(format!(
            "--ffn-keep {keep} is outside 1..={layer_width} (the layer's FFN width)"
        )));
    }
    let mut idx: Vec<u32> = match score {
        FfnScore::Top => (0..keep as u32).collect(),
        FfnScore::Bottom => ((layer_width - keep) as u32..layer_width as u32).collect(),
        FfnScore::Middle => {
            let start = (layer_width - keep) / 2;
            (start as u32..(start + keep) as u32).collect()
        }
        FfnScore::Random => {
            let mut all: Vec<u32> = (0..layer_width as u32).collect();
            all.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            all.truncate(keep);
            all
        }
        FfnScore::Act => {
            let s = &act.expect("activation scores for `act`").0[layer];
            let mut order: Vec<u32> = (0..layer_width as u32).collect();
            order.sort_by(|&a, &b| s[b as usize].total_cmp(&s[a as usize]).then(a.cmp(&b)));
            order.truncate(keep);
            order
        }
    };
    idx.sort_unstable();
    Ok(idx)
}
