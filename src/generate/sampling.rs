//! Choosing the next token from logits: penalties and biases first, then
//! greedy (temperature 0) or temperature / top-k / top-p / min-p sampling
//! from a seeded generator, so the same seed gives the same output.

use std::collections::HashMap;

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::infill_sampler::InfillRule;

/// How to pick tokens; the defaults are plain sampling at temperature 1.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass to keep (1 keeps all).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Drop tokens below this fraction of the top token's probability (0 keeps all).
    pub min_p: f32,
    /// Divides positive logits (multiplies negative ones) of tokens already seen (1 is off).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated.
    pub frequency_penalty: f32,
    /// Added to the logits of the given ids.
    pub logit_bias: HashMap<u32, f32>,
    /// Seed of the random generator (random when `None`).
    pub seed: Option<u64>,
    /// llama.cpp's `infill` sampler after top-k / top-p / min-p (FIM suggestions).
    pub infill: Option<InfillRule>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: HashMap::new(),
            seed: None,
            infill: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with nothing else changed.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// A sampler with its own random stream.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// Creates a sampler; seeded when `params.seed` is set.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// The parameters in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies penalties and biases in place. `prompt` counts for the
    /// repetition penalty only; `generated` for all three penalties.
    pub fn adjust(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &id in prompt.iter().chain(generated) {
                if seen.insert(id) {
                    if let Some(l) = logits.get_mut(id as usize) {
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &id in generated {
                *counts.entry(id).or_default() += 1;
            }
            for (id, n) in counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        for (&id, &bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
    }

    /// The next token from the model's raw logits: penalties and biases,
    /// then (for a healed prompt's first token) only the `allowed` ids, then a pick.
    pub fn next(&mut self, raw: &[f32], prompt: &[u32], generated: &[u32], allowed: Option<&[u32]>) -> u32 {
        let mut row = raw.to_vec();
        self.adjust(&mut row, prompt, generated);
        if let Some(allowed) = allowed {
            let mut only = vec![f32::NEG_INFINITY; row.len()];
            for &id in allowed {
                if let Some(l) = row.get(id as usize) {
                    only[id as usize] = *l;
                }
            }
            row = only;
        }
        self.pick(&row)
    }

    /// Picks the next token from already adjusted logits.
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, best first.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|&(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
        }
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let mut n = 0;
            for &x in &probs[..keep] {
                mass += x;
                n += 1;
                if mass >= p.top_p {
                    break;
                }
            }
            keep = n.max(1);
        }
        if let Some(rule) = &p.infill {
            let mut kept: Vec<(u32, f32)> = cand[..keep].iter().zip(&probs).map(|(c, &x)| (c.0, x)).collect();
            super::infill_sampler::normalise(&mut kept);
            rule.apply(&mut kept);
            let mut r = self.rng.random::<f32>() * kept.iter().map(|c| c.1).sum::<f32>();
            for &(id, x) in &kept {
                if r < x {
                    return id;
                }
                r -= x;
            }
            return kept.last().map_or(cand[0].0, |c| c.0);
        }
        let kept_mass: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * kept_mass;
        for (i, &x) in probs[..keep].iter().enumerate() {
            if r < x {
                return cand[i].0;
            }
            r -= x;
        }
        cand[keep - 1].0
    }
}

/// Index of the largest value; the first one on ties (as `torch.argmax`).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.pick(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn same_seed_same_choices() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        let mut a = Sampler::new(params.clone());
        let mut b = Sampler::new(params);
        let xa: Vec<u32> = (0..20).map(|_| a.pick(&logits)).collect();
        let xb: Vec<u32> = (0..20).map(|_| b.pick(&logits)).collect();
        assert_eq!(xa, xb);
        assert!(xa.iter().any(|&x| x != xa[0]), "sampling at temperature 1 should vary");
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1, 2.0, 1.9, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.pick(&logits), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // probabilities ≈ 0.66, 0.24, 0.09, 0.01: top_p 0.5 keeps only the first.
        let logits = [4.0, 3.0, 2.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            seed: Some(3),
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.pick(&logits), 0);
        }
    }

    #[test]
    fn penalties_and_bias_adjust_logits() {
        let s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logit_bias: [(3, -100.0)].into_iter().collect(),
            seed: Some(0),
            ..Default::default()
        });
        let mut l = vec![2.0, -2.0, 1.0, 5.0];
        s.adjust(&mut l, &[0], &[1, 1]);
        assert_eq!(l[0], 1.0); // 2 / 2
        assert_eq!(l[1], -4.0 - 0.5 - 0.5); // -2 * 2, presence, 2 × frequency
        assert_eq!(l[2], 1.0);
        assert_eq!(l[3], -95.0);
    }
}
