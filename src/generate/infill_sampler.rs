//! llama.cpp's `infill` sampler, which llama.vscode and llama.vim put in
//! their sampler chain (`"samplers": ["top_k", "top_p", "infill"]`): it
//! ends a fill-in-the-middle completion when ending is plausible and
//! narrows the rest to tokens worth showing, so IDE suggestions stay
//! short. On the candidates left by top-k / top-p, with probabilities:
//!
//! 1. when the end-of-generation tokens hold more than a third of the mass
//!    per candidate (3 · p(end) · n > p(text)), only they remain;
//! 2. otherwise a token whose text begins another's gives its mass to the
//!    likelier of the two and leaves;
//! 3. text tokens under 0.2 leave (an end token only if no text token
//!    is left), then text tokens under 1 / (text tokens + 1) leave.

use std::sync::Arc;

/// What the rule needs to know about the vocabulary.
#[derive(Clone)]
pub struct InfillRule {
    /// Bytes of each token id.
    pub token_bytes: Arc<Vec<Vec<u8>>>,
    /// End-of-generation ids (EOS and the FIM end tokens); the first ends a lone end.
    pub end_ids: Vec<u32>,
}

impl std::fmt::Debug for InfillRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InfillRule").field("end_ids", &self.end_ids).finish()
    }
}

impl PartialEq for InfillRule {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.token_bytes, &other.token_bytes) && self.end_ids == other.end_ids
    }
}

impl InfillRule {
    fn is_end(&self, id: u32) -> bool {
        self.end_ids.contains(&id)
    }

    fn bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], |b| b)
    }

    /// Applies the rule to `cand` (ids with probabilities summing to 1, most
    /// likely first), leaving the survivors renormalised.
    pub fn apply(&self, cand: &mut Vec<(u32, f32)>) {
        let (mut p_end, mut p_text) = (0f32, 0f32);
        for &(id, p) in cand.iter() {
            if self.is_end(id) {
                p_end += p;
            } else {
                p_text += p;
            }
        }
        if 3.0 * p_end * cand.len() as f32 > p_text {
            cand.retain(|&(id, _)| self.is_end(id));
            normalise(cand);
            return;
        }
        // A token whose text begins another's: the likelier takes both masses.
        for i in 0..cand.len() {
            for j in 0..cand.len() {
                if i == j || cand[i].1 <= 0.0 || cand[j].1 <= 0.0 {
                    continue;
                }
                let (a, b) = (self.bytes(cand[i].0), self.bytes(cand[j].0));
                if !a.is_empty() && b.starts_with(a) {
                    let (keep, gone) = if cand[j].1 > cand[i].1 { (j, i) } else { (i, j) };
                    cand[keep].1 += cand[gone].1;
                    cand[gone].1 = 0.0;
                }
            }
        }
        cand.retain(|&(id, p)| p >= 0.2 || (self.is_end(id) && p > 0.0));
        let texts = cand.iter().filter(|&&(id, _)| !self.is_end(id)).count();
        if texts == 0 {
            cand.clear();
            cand.push((self.end_ids.first().copied().unwrap_or(0), 1.0));
            return;
        }
        normalise(cand);
        let floor = 1.0 / (texts + 1) as f32;
        cand.retain(|&(id, p)| p >= floor || self.is_end(id));
        normalise(cand);
    }
}

/// Scales the probabilities of `cand` to sum to 1.
pub(crate) fn normalise(cand: &mut [(u32, f32)]) {
    let total: f32 = cand.iter().map(|c| c.1).sum();
    if total > 0.0 {
        cand.iter_mut().for_each(|c| c.1 /= total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> InfillRule {
        let words = ["<end>", " ret", " return", " x", "y"];
        InfillRule {
            token_bytes: Arc::new(words.iter().map(|w| w.as_bytes().to_vec()).collect()),
            end_ids: vec![0],
        }
    }

    #[test]
    fn a_likely_end_leaves_only_the_end() {
        let mut c = vec![(1, 0.5), (0, 0.2), (3, 0.3)];
        rule().apply(&mut c);
        assert_eq!(c, vec![(0, 1.0)]);
    }

    #[test]
    fn prefixes_merge_and_unlikely_text_leaves() {
        // " ret" begins " return": " return" (likelier) takes 0.15 + 0.45.
        let mut c = vec![(2, 0.45), (1, 0.15), (3, 0.25), (4, 0.14), (0, 0.01)];
        rule().apply(&mut c);
        let ids: Vec<u32> = c.iter().map(|x| x.0).collect();
        // " x" (0.25 of 0.86) is under 1/3 once two text tokens are left.
        assert_eq!(ids, vec![2, 0]);
        assert!((c[0].1 - 0.6 / 0.61).abs() < 1e-5, "{c:?}");
        assert!((c.iter().map(|x| x.1).sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn no_text_left_ends() {
        let mut c = vec![(3, 0.19), (4, 0.19), (1, 0.18), (2, 0.17), (0, 0.01)];
        // Not likely enough to end at once (3 · 0.01 · 5 < 0.73), but no text token reaches 0.2:
        // " ret" and " return" merge into 0.35, which stays.
        rule().apply(&mut c);
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 0]);
        let mut c = vec![(3, 0.19), (4, 0.19), (0, 0.01)];
        rule().apply(&mut c);
        assert_eq!(c, vec![(0, 1.0)]);
    }
}
