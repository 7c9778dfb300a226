//! Log-probabilities of chosen tokens and their best alternatives, as
//! OpenAI's `logprobs` reports them; a healed token's are taken among the
//! tokens that start with the bytes the prompt already holds.

/// The log-probability of a chosen token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub id: u32,
    /// Its log-probability under the model (before penalties and sampling filters).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
    /// Leading bytes of this token and of every `top` token that the prompt
    /// already holds (token healing backed them off): the text is the rest.
    pub healed_bytes: usize,
}

/// Log-softmax of `logits`, then the entry for `id` and the `k` best.
pub fn token_logprob(logits: &[f32], id: u32, k: usize) -> TokenLogprob {
    logprob_among(logits, 0..logits.len() as u32, id, k, 0)
}

/// A healed token's log-probabilities: the softmax over `allowed` alone
/// (the tokens that start with the `healed_bytes` the prompt already holds),
/// i.e. the probability of each continuation given the prompt's text, and
/// the `k` best of them.
pub fn healed_token_logprob(logits: &[f32], allowed: &[u32], id: u32, k: usize, healed_bytes: usize) -> TokenLogprob {
    logprob_among(logits, allowed.iter().copied(), id, k, healed_bytes)
}

/// Log-softmax over the tokens `among`, then the entry for `id` and the `k`
/// best of them.
fn logprob_among(
    logits: &[f32],
    among: impl Iterator<Item = u32> + Clone,
    id: u32,
    k: usize,
    healed_bytes: usize,
) -> TokenLogprob {
    let logit = |i: u32| logits.get(i as usize).copied().unwrap_or(f32::NEG_INFINITY);
    let max = among.clone().map(logit).fold(f32::NEG_INFINITY, f32::max);
    let log_sum = among.clone().map(|i| ((logit(i) - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    let mut top = Vec::new();
    let mut order: Vec<u32> = if k > 0 { among.collect() } else { Vec::new() };
    if !order.is_empty() {
        let k = k.min(order.len());
        order.select_nth_unstable_by(k - 1, |&a, &b| logit(b).total_cmp(&logit(a)));
        order.truncate(k);
        order.sort_by(|&a, &b| logit(b).total_cmp(&logit(a)).then(a.cmp(&b)));
        top = order.into_iter().map(|i| (i, logit(i) - log_sum)).collect();
    }
    TokenLogprob {
        id,
        logprob: logit(id) - log_sum,
        top,
        healed_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healed_token_is_weighed_among_the_tokens_it_could_be() {
        let logits = [2.0f32, 1.0, 0.5, 3.0, -1.0];
        let allowed = [1u32, 2, 4];
        let full = token_logprob(&logits, 1, 5);
        let healed = healed_token_logprob(&logits, &allowed, 1, 5, 3);
        assert_eq!(healed.healed_bytes, 3);
        // Only the allowed tokens, best first, summing to one.
        assert_eq!(healed.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 4]);
        let total: f64 = healed.top.iter().map(|t| (t.1 as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        // Renormalised: each is more likely than under the full softmax,
        // by the same factor.
        let full_of = |id: u32| full.top.iter().find(|t| t.0 == id).unwrap().1;
        let shift = healed.logprob - full.logprob;
        assert!(shift > 0.0);
        for &(id, l) in &healed.top {
            assert!((l - full_of(id) - shift).abs() < 1e-5);
        }
    }
}
