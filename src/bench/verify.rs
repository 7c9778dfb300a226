//! `greencode bench verify`: what a speculative verify step costs. One
//! sequence at a given depth takes steps of 1 to `max_rows` rows (the last
//! token plus k draft tokens, logits for every row, as the verify step
//! asks), each cut back afterwards, the row counts interleaved within each
//! pass. From those costs and a draft acceptance, the speed-up speculation
//! can give: with each draft token kept with probability `a` (given the
//! ones before it were), a step of k draft tokens emits on average
//! `(1 − a^(k+1)) / (1 − a)` tokens for `t(k + 1) / t(1)` of a plain step's
//! time (the lookup drafter's own cost is next to nothing).

use std::time::Instant;

use serde::Serialize;

use crate::bench::{bench_prompt, check_fits, Spread};
use crate::model::error::Result;
use crate::model::{LogitsFor, Qwen2};
use crate::tokenizer::CodeTokenizer;

/// Settings of the benchmark.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// Tokens in the cache before each step.
    pub depth: usize,
    /// Most rows a step takes (1 + the longest draft).
    pub max_rows: usize,
    /// Measured passes (one unmeasured warm-up pass runs first).
    pub passes: usize,
    /// Draft acceptances to give the implied speed-up for.
    pub acceptances: Vec<f64>,
}

/// The cost of steps of one row count.
#[derive(Debug, Clone, Serialize)]
pub struct StepCost {
    /// Rows in the step (1 + draft tokens).
    pub rows: usize,
    /// Milliseconds a step, over the passes.
    pub ms: Spread,
    /// Median time against the one-row step's.
    pub relative: f64,
}

/// The speed-up a draft acceptance implies at the best draft length.
#[derive(Debug, Clone, Serialize)]
pub struct Implied {
    /// Probability that a draft token is kept, given the ones before it were.
    pub acceptance: f64,
    /// Draft length with the largest speed-up.
    pub best_draft: usize,
    /// Tokens a step emits on average at that length.
    pub tokens_per_step: f64,
    /// Decode speed against plain one-token steps.
    pub speed_up: f64,
    /// The speed-up at every draft length, 1 to `max_rows − 1`.
    pub by_draft: Vec<f64>,
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// How the weights are held.
    pub weights: String,
    /// The CPU kernel family that ran.
    pub kernels: &'static str,
    /// Compute threads.
    pub threads: usize,
    /// Tokens in the cache before each step.
    pub depth: usize,
    /// Measured passes.
    pub passes: usize,
    /// Cost of a step by row count.
    pub steps: Vec<StepCost>,
    /// Speed-ups implied by the given acceptances.
    pub implied: Vec<Implied>,
}

/// Tokens a step of `k` draft tokens emits on average when each is kept
/// with probability `a` given the ones before it: the kept run plus the
/// target's own token.
pub fn tokens_per_step(a: f64, k: usize) -> f64 {
    (0..=k).map(|i| a.powi(i as i32)).sum()
}

/// Runs the benchmark on `model`, calling `progress` after each pass.
pub fn bench_verify(
    model: &Qwen2,
    tok: &CodeTokenizer,
    cfg: &VerifyConfig,
    threads: usize,
    mut progress: impl FnMut(),
) -> Result<VerifyReport> {
    let max_rows = cfg.max_rows.max(1);
    check_fits(model, cfg.depth, max_rows)?;
    let text = bench_prompt(tok, cfg.depth + max_rows)?;
    let (prefix, next) = text.split_at(cfg.depth);
    let mut cache = model.new_cache(cfg.depth + max_rows)?;
    model.forward_cached(prefix, &mut cache, LogitsFor::Last)?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); max_rows];
    for pass in 0..=cfg.passes {
        // A different order each pass, so drift over a pass is shared out.
        for i in 0..max_rows {
            let rows = (i + pass) % max_rows + 1;
            let which = if rows == 1 { LogitsFor::Last } else { LogitsFor::All };
            let started = Instant::now();
            let logits = model.forward_cached(&next[..rows], &mut cache, which)?;
            // The logits reach the host, as the engine's would.
            let _ = logits
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            cache.truncate(cfg.depth);
            if pass > 0 {
                times[rows - 1].push(ms);
            }
        }
        if pass > 0 {
            progress();
        }
    }
    let spreads: Vec<Spread> = times.into_iter().map(Spread::of).collect();
    let one = spreads[0].median;
    let steps: Vec<StepCost> = spreads
        .into_iter()
        .enumerate()
        .map(|(i, ms)| StepCost {
            rows: i + 1,
            relative: ms.median / one,
            ms,
        })
        .collect();
    let implied = cfg
        .acceptances
        .iter()
        .map(|&a| {
            let by_draft: Vec<f64> = (1..max_rows)
                .map(|k| tokens_per_step(a, k) / steps[k].relative)
                .collect();
            let (best, &speed_up) = by_draft
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .unwrap_or((0, &1.0));
            Implied {
                acceptance: a,
                best_draft: best + 1,
                tokens_per_step: tokens_per_step(a, best + 1),
                speed_up,
                by_draft,
            }
        })
        .collect();
    Ok(VerifyReport {
        weights: model.weight_format(),
        kernels: crate::cpu::features::kernels(),
        threads,
        depth: cfg.depth,
        passes: cfg.passes,
        steps,
        implied,
    })
}

#[cfg(test)]
mod tests {
    use super::tokens_per_step;

    #[test]
    fn a_step_emits_the_kept_run_and_one_more() {
        assert_eq!(tokens_per_step(0.0, 5), 1.0);
        assert_eq!(tokens_per_step(1.0, 5), 6.0);
        assert!((tokens_per_step(0.5, 2) - 1.75).abs() < 1e-12);
    }
}
