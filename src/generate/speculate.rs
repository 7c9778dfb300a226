//! Speculative decoding's lookup drafter and its draft-length rule
//! (`serve`, `generate` and `bench generate` with `--speculate lookup`).
//! Code repeats itself: identifiers, lines and whole blocks of the prompt
//! (and of the suffix, for a fill-in-the-middle prompt) come back in the
//! completion. The lookup drafter (vLLM's n-gram speculator, llama.cpp's
//! lookup decoding) finds the latest earlier place where the sequence's
//! last few tokens occurred and proposes the tokens that followed there.
//! The engine checks the proposal in one step, as extra rows of the
//! sequence: each row's token is picked as a one-token step would pick it
//! (greedy or sampled, with penalties, biases and logprobs, drawing the
//! request's next random number), and the rows count while the picked
//! tokens equal the draft. A draft is a single proposal, not a
//! distribution, so this is the accept/reject rule in its exact form: the
//! emitted tokens are the target's own draws, and a request gives the same
//! tokens (for a `seed`, the same text) with or without speculation.
//!
//! Policy: the draft length starts at [`START_K`], grows by one after a fully
//! accepted draft and halves after a fully rejected one (per sequence,
//! between 1 and the configured maximum); and the serving engine lets no
//! sequence speculate in a step that decodes more than
//! [`MAX_DECODING`] sequences, where the step is no longer bound by
//! reading the weights and extra rows cost time.

/// Speculative rounds measured before [`Payoff::pays`] judges.
const PAYOFF_ROUNDS: u32 = 4;

/// Share of the plain decode speed below which speculation stops.
const PAYOFF_FLOOR: f64 = 0.95;

/// Plain one-token steps a sequence takes before it speculates: their
/// time (the first one's excepted: a cold step) is what speculation must
/// beat.
pub const PLAIN_FIRST: usize = 3;

/// One plain step is taken again every this many speculative rounds, so
/// the comparison follows the machine's current speed.
pub const PLAIN_EVERY: u32 = 8;

/// Whether drafting pays in one sequence, by measurement: tokens emitted
/// per second of drafting and verifying, against tokens per second of
/// plain one-token steps (the sequence's first [`PLAIN_FIRST`] steps, and
/// any later step that had no draft). A drafter whose proposals cost more
/// than they save is switched off after [`PAYOFF_ROUNDS`] rounds; the
/// lookup drafter costs next to nothing, so only verify steps much slower
/// than plain ones switch it off.
#[derive(Debug, Default, Clone)]
pub struct Payoff {
    rounds: u32,
    emitted: usize,
    draft_secs: f64,
    verify_secs: f64,
    plain_steps: u32,
    plain_secs: f64,
    /// A plain step is due at the next multiple of [`PLAIN_EVERY`] rounds.
    plain_due: bool,
}

impl Payoff {
    /// Time spent proposing a draft.
    pub fn drafted_in(&mut self, t: std::time::Duration) {
        self.draft_secs += t.as_secs_f64();
    }

    /// Time of a verify step.
    pub fn verified_in(&mut self, t: std::time::Duration) {
        self.verify_secs += t.as_secs_f64();
    }

    /// Time of a plain one-token step.
    pub fn plain_in(&mut self, t: std::time::Duration) {
        self.plain_steps += 1;
        self.plain_secs += t.as_secs_f64();
        self.plain_due = false;
    }

    /// Whether the next step should be a plain one (to time it).
    pub fn wants_plain(&self) -> bool {
        self.rounds > 0 && self.rounds.is_multiple_of(PLAIN_EVERY) && self.plain_due
    }

    /// A speculative round emitted `tokens` (accepted drafts + the model's own).
    pub fn round(&mut self, tokens: usize) {
        self.rounds += 1;
        self.emitted += tokens;
        self.plain_due = true;
    }

    /// False once measured speculation runs below [`PAYOFF_FLOOR`] of plain decoding.
    pub fn pays(&self) -> bool {
        if self.rounds < PAYOFF_ROUNDS || self.verify_secs <= 0.0 {
            return true;
        }
        let speculative = self.emitted as f64 / (self.verify_secs + self.draft_secs);
        // Without a timed plain step, a verify step stands in for one (it
        // costs at least as much: the comparison then leans toward speculating).
        let plain = if self.plain_steps > 0 && self.plain_secs > 0.0 {
            self.plain_steps as f64 / self.plain_secs
        } else {
            self.rounds as f64 / self.verify_secs
        };
        speculative >= PAYOFF_FLOOR * plain
    }
}

/// Longest n-gram the drafter matches; shorter ones are tried after it.
const MAX_NGRAM: usize = 4;

/// Shortest n-gram the drafter matches (a single token matches too often).
const MIN_NGRAM: usize = 2;

/// Draft length a sequence starts with.
pub const START_K: usize = 4;

/// Decoding sequences in a step above which nobody speculates.
pub const MAX_DECODING: usize = 2;

/// Up to `k` tokens that followed the latest earlier occurrence of the
/// last 4, 3 or 2 tokens of `context` (the longest n-gram that occurs).
pub fn lookup(context: &[u32], k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if context.len() <= n {
            continue;
        }
        let key = &context[context.len() - n..];
        // Latest occurrence that ends before the context does.
        let found = (0..context.len() - n).rev().find(|&i| &context[i..i + n] == key);
        if let Some(i) = found {
            let from = i + n;
            let to = (from + k).min(context.len());
            return context[from..to].to_vec();
        }
    }
    Vec::new()
}

/// The next draft length after a draft of `k` tokens of which `accepted` held.
pub fn next_k(k: usize, accepted: usize, max: usize) -> usize {
    if accepted == k {
        (k + 1).min(max)
    } else if accepted == 0 {
        (k / 2).max(1)
    } else {
        k
    }
    .min(max)
    .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_longest_match_proposes_what_followed_it() {
        // "a b c d" occurred twice; the context ends in "b c": the latest
        // earlier "b c" was followed by "d x".
        let ctx = [1, 2, 3, 4, 9, 1, 2, 3, 4, 5, 2, 3];
        assert_eq!(lookup(&ctx, 2), vec![4, 5]);
        // The 4-gram "1 2 3 4" beats the later 2-gram.
        let ctx = [1, 2, 3, 4, 7, 8, 3, 4, 6, 1, 2, 3, 4];
        assert_eq!(lookup(&ctx, 3), vec![7, 8, 3]);
        // Nothing repeats: no draft; k caps the proposal and the context end.
        assert!(lookup(&[1, 2, 3, 4, 5], 4).is_empty());
        assert_eq!(lookup(&[5, 6, 7, 5, 6], 8), vec![7, 5, 6]);
    }

    #[test]
    fn a_draft_that_costs_more_than_it_saves_is_switched_off() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        // Lookup-like: drafting is free, 2 tokens a round: pays.
        let mut p = Payoff::default();
        for _ in 0..8 {
            p.drafted_in(ms(0));
            p.verified_in(ms(2));
            p.round(2);
        }
        assert!(p.pays());
        // A draft costing 6 ms a round for 3 tokens against a 2 ms step: 3/8 < 1/2.
        let mut p = Payoff::default();
        for i in 0..4 {
            assert!(p.pays(), "judged after {i} rounds");
            p.drafted_in(ms(6));
            p.verified_in(ms(2));
            p.round(3);
        }
        assert!(!p.pays());
        // 4 tokens for 8 ms would pay against the 2 ms verify step, but not
        // against the 1.25 ms plain step measured.
        let mut p = Payoff::default();
        p.plain_in(ms(1) + ms(1) / 4);
        for _ in 0..4 {
            p.drafted_in(ms(6));
            p.verified_in(ms(2));
            p.round(4);
        }
        assert!(!p.pays());
    }

    #[test]
    fn the_draft_length_follows_acceptance() {
        assert_eq!(next_k(4, 4, 8), 5);
        assert_eq!(next_k(8, 8, 8), 8);
        assert_eq!(next_k(4, 0, 8), 2);
        assert_eq!(next_k(1, 0, 8), 1);
        assert_eq!(next_k(4, 2, 8), 4);
    }
}
