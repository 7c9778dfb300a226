//! Training examples: fixed-length token windows cut from the calibration
//! corpus (never the held-out files), drawn in a seeded order that depends
//! only on the step, so an interrupted run resumes on the same batches.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::calib::CalibText;
use crate::tokenizer::{CodeTokenizer, TokenizerError};

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids (student vocabulary), `seq_len` long.
    pub tokens: Vec<u32>,
    /// Positions before this index are prompt: the cross-entropy loss counts
    /// only the tokens from here on (0 for plain corpus windows).
    pub answer_from: usize,
}

/// The pool batches are drawn from.
#[derive(Debug, Clone)]
pub struct TrainSet {
    /// Corpus windows.
    pub windows: Vec<Vec<u32>>,
    /// Rewritten examples (`--rewrite`): the teacher's answer where the
    /// student's diverged; half of every batch when present.
    pub rewritten: Vec<Example>,
    seed: u64,
}

impl TrainSet {
    /// Tokenizes `texts` (joined by the first EOS id) into non-overlapping
    /// windows of `seq_len` tokens. Fails when not even one window fits.
    pub fn from_texts(tok: &CodeTokenizer, texts: &[CalibText], seq_len: usize, seed: u64) -> Result<Self, DataError> {
        let sep = tok.eos_ids().first().copied();
        let mut stream = Vec::new();
        for t in texts {
            stream.extend(tok.encode(&t.text)?);
            stream.extend(sep);
        }
        let windows: Vec<Vec<u32>> = stream.chunks_exact(seq_len).map(<[u32]>::to_vec).collect();
        if windows.is_empty() {
            return Err(DataError::TooSmall {
                tokens: stream.len(),
                seq_len,
            });
        }
        Ok(Self {
            windows,
            rewritten: Vec::new(),
            seed,
        })
    }

    /// Tokens in the corpus windows.
    pub fn tokens(&self) -> usize {
        self.windows.iter().map(Vec::len).sum()
    }

    /// The `batch` examples of 0-based step `step`: corpus windows in a
    /// seeded shuffled order (reshuffled every pass over the corpus), and with
    /// rewritten examples, those in the first half of the batch (cycling).
    pub fn batch(&self, step: usize, batch: usize) -> Vec<Example> {
        let n_rewritten = if self.rewritten.is_empty() {
            0
        } else {
            (batch / 2).max(1).min(batch)
        };
        let mut out = Vec::with_capacity(batch);
        for j in 0..n_rewritten {
            let k = (step * n_rewritten + j) % self.rewritten.len();
            out.push(self.rewritten[k].clone());
        }
        let per_step = batch - n_rewritten;
        let n = self.windows.len();
        let mut epoch_order: Option<(usize, Vec<usize>)> = None;
        for j in 0..per_step {
            let i = step * per_step + j;
            let epoch = i / n;
            if epoch_order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                epoch_order = Some((epoch, self.order(epoch)));
            }
            let order = &epoch_order.as_ref().expect("set above").1;
            out.push(Example {
                tokens: self.windows[order[i % n]].clone(),
                answer_from: 0,
            });
        }
        out
    }

    fn order(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.windows.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        idx.shuffle(&mut rng);
        idx
    }
}

/// Why training data could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Tokenizing failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The corpus is shorter than one window.
    #[error("the training data has {tokens} tokens: fewer than one window of --seq-len {seq_len}")]
    TooSmall {
        /// Tokens available.
        tokens: usize,
        /// Requested window length.
        seq_len: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> TrainSet {
        TrainSet {
            windows: (0..n as u32).map(|i| vec![i; 4]).collect(),
            rewritten: Vec::new(),
            seed: 7,
        }
    }

    #[test]
    fn batches_depend_only_on_the_step_and_cover_each_epoch_once() {
        let s = set(10);
        assert_eq!(s.batch(3, 4), s.batch(3, 4));
        // Steps 0..5 with batch 2 visit every window of epoch 0 exactly once.
        let mut seen: Vec<u32> = (0..5).flat_map(|st| s.batch(st, 2)).map(|e| e.tokens[0]).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<u32>>());
        // The next epoch is another order.
        let e0: Vec<u32> = (0..5).flat_map(|st| s.batch(st, 2)).map(|e| e.tokens[0]).collect();
        let e1: Vec<u32> = (5..10).flat_map(|st| s.batch(st, 2)).map(|e| e.tokens[0]).collect();
        assert_ne!(e0, e1);
    }

    #[test]
    fn rewritten_examples_fill_half_of_each_batch() {
        let mut s = set(10);
        s.rewritten = vec![
            Example {
                tokens: vec![100; 4],
                answer_from: 2,
            },
            Example {
                tokens: vec![101; 4],
                answer_from: 2,
            },
        ];
        let b = s.batch(0, 4);
        assert_eq!(b.iter().filter(|e| e.answer_from == 2).count(), 2);
        assert_eq!(s.batch(1, 1).len(), 1);
    }
}
