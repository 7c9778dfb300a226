//! Reuse of cached token runs that moved (llama-server's `--cache-reuse`).
//! Editors resend context that shifts: llama.vscode's ring buffer of chunks
//! from other files drops its oldest chunk and every later chunk moves
//! forward, so the prompt no longer shares a prefix with the last one and
//! the block-aligned prefix cache misses. The engine remembers the tokens of
//! recent sequences whose blocks are still cached; a new prompt is matched
//! against them once, at admission, into runs (prompt position, source
//! position, length) of at least `min_run` tokens, and each run's keys and
//! values are copied into the new sequence's own blocks with the keys
//! turned to their new positions (`KvCache::append_moved`) instead of being
//! computed. A moved run's values once attended to context that may have
//! left, so the result is close to, not equal to, a cold run; two rules
//! keep it close (measured on 50 held-out ring buffers, `tests/chunk_reuse.rs`):
//! the first token is always computed (moved to position 0, a token is a
//! poor attention sink: 66% of greedy completions matched a cold run
//! without this rule, 92% with it), and runs stop at the first token no
//! source holds, as llama-server's do (moving the edited file's text too,
//! past a new chunk, raised the cached share from 0.51 to 0.81 but
//! matched only 66%). The feature is off unless asked for.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

/// Tokens a window of the match index covers; shorter runs are never reused.
pub(super) const WINDOW: usize = 8;

/// Recent sequences remembered as sources.
const SOURCES: usize = 8;

/// Positions of one window tried (code repeats itself: the first match
/// of a window is often not the run).
const POSITIONS: usize = 8;

/// A finished sequence whose full blocks may still be cached.
#[derive(Debug)]
pub(super) struct Source {
    /// Tokens of its registered blocks.
    tokens: Vec<u32>,
    /// Prefix hash of each of those blocks (what the pool finds them by).
    pub(super) hashes: Vec<u64>,
    /// Positions (the first few) of each window of `WINDOW` tokens, by the window's hash.
    windows: HashMap<u64, Vec<usize>>,
}

/// A run of a prompt whose keys and values a source holds at another position.
#[derive(Debug, Clone)]
pub(super) struct Run {
    /// Where the run starts in the prompt.
    pub(super) at: usize,
    /// The sequence that cached it.
    pub(super) source: Arc<Source>,
    /// Where the run starts in the source.
    pub(super) from: usize,
    /// Tokens in the run.
    pub(super) len: usize,
}

/// The remembered sources and the matching rule.
#[derive(Debug)]
pub(super) struct Sources {
    recent: VecDeque<Arc<Source>>,
    /// Shortest moved run (None: only exact continuations).
    min_run: Option<usize>,
    hasher: std::collections::hash_map::RandomState,
}

impl Sources {
    /// Remembers up to [`SOURCES`] sequences; moved runs shorter than
    /// `min_run` (at least [`WINDOW`]; None: no moved runs) are computed instead.
    pub(super) fn new(min_run: Option<usize>) -> Self {
        Self {
            recent: VecDeque::new(),
            min_run: min_run.map(|n| n.max(WINDOW)),
            hasher: Default::default(),
        }
    }

    /// Remembers a sequence's registered tokens and block hashes (the newest
    /// first; one holding the same tokens replaces the older).
    pub(super) fn record(&mut self, tokens: Vec<u32>, hashes: Vec<u64>) {
        self.recent.retain(|s| s.hashes != hashes);
        let mut windows: HashMap<u64, Vec<usize>> = HashMap::new();
        if self.min_run.is_some() {
            for (i, w) in tokens.windows(WINDOW).enumerate() {
                let at = windows.entry(self.hasher.hash_one(w)).or_default();
                if at.len() < POSITIONS {
                    at.push(i);
                }
            }
        }
        self.recent.push_front(Arc::new(Source {
            tokens,
            hashes,
            windows,
        }));
        self.recent.truncate(SOURCES);
    }

    /// Runs of `prompt[start..end]` found in the sources, in prompt order.
    /// First the exact continuation of the cached prefix `prompt[..start]`:
    /// a source that holds the same tokens up to `start` holds the next
    /// ones at the same positions, computed after the same context, so any
    /// length of it is exactly what computing would give (this is how a
    /// keystroke reuses the block it ends inside). Then moved runs (each at
    /// least `min_run` long) one after another, never at position 0: at
    /// each position the longest match any source offers, up to the first
    /// position none offers a run at.
    pub(super) fn plan(&self, prompt: &[u32], start: usize, end: usize) -> Vec<Run> {
        let end = end.min(prompt.len());
        let mut runs = Vec::new();
        let mut at = start;
        let exact = self
            .recent
            .iter()
            .filter(|s| s.tokens.len() > at && at < end && s.tokens[..at] == prompt[..at])
            .map(|s| (common(&s.tokens[at..], &prompt[at..end]), s))
            .max_by_key(|&(len, _)| len);
        if let Some((len, s)) = exact.filter(|&(len, _)| len > 0) {
            runs.push(Run {
                at,
                source: Arc::clone(s),
                from: at,
                len,
            });
            at += len;
        }
        let Some(min_run) = self.min_run else { return runs };
        // Position 0 is always computed: it is the attention sink every later
        // token leans on, and a moved token was never one.
        at = at.max(1);
        while at + min_run <= end {
            let key = self.hasher.hash_one(&prompt[at..at + WINDOW]);
            let best = self
                .recent
                .iter()
                .flat_map(|s| s.windows.get(&key).into_iter().flatten().map(move |&from| (s, from)))
                .map(|(s, from)| (common(&s.tokens[from..], &prompt[at..end]), s, from))
                .max_by_key(|&(len, _, _)| len);
            match best {
                Some((len, s, from)) if len >= min_run => {
                    runs.push(Run {
                        at,
                        source: Arc::clone(s),
                        from,
                        len,
                    });
                    at += len;
                }
                // Runs end at the first token no source holds (llama-server's
                // rule): what follows saw other context, nearer the cursor.
                _ => break,
            }
        }
        runs
    }
}

/// Length of the common start of `a` and `b`.
fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_buffer_that_dropped_its_oldest_chunk_moves_up_to_its_new_chunk() {
        let chunk = |c: u32| (0..40).map(|i| c * 1000 + i).collect::<Vec<u32>>();
        let old: Vec<u32> = [chunk(1), chunk(2), chunk(3), vec![7; 3], chunk(9)].concat();
        let mut sources = Sources::new(Some(16));
        sources.record(old.clone(), vec![1, 2, 3, 4]);
        // Chunk 1 left, a shorter chunk 4 came in: chunks 2–3 and the
        // file (9) moved, each by its own distance.
        let new: Vec<u32> = [chunk(2), chunk(3), chunk(4)[..30].to_vec(), vec![7; 3], chunk(9)].concat();
        let runs = sources.plan(&new, 0, new.len() - 1);
        let spans: Vec<(usize, usize, usize)> = runs.iter().map(|r| (r.at, r.from, r.len)).collect();
        // Position 0 is computed; the file after the new chunk is too.
        assert_eq!(spans, vec![(1, 41, 79)]);
        // Runs follow one another while sources hold them.
        sources.record(chunk(4), vec![5]);
        let runs = sources.plan(&new, 0, new.len() - 1);
        let spans: Vec<(usize, usize, usize)> = runs.iter().map(|r| (r.at, r.from, r.len)).collect();
        assert_eq!(spans, vec![(1, 41, 79), (80, 0, 30), (110, 120, 42)]);
    }

    #[test]
    fn short_matches_are_left_to_compute() {
        let mut sources = Sources::new(Some(32));
        sources.record((0..64).collect(), vec![1, 2]);
        let prompt: Vec<u32> = (100..120).chain(0..20).chain(200..240).collect();
        assert!(sources.plan(&prompt, 0, prompt.len()).is_empty());
    }
}

#[cfg(test)]
mod exact_tests {
    use super::*;

    #[test]
    fn the_exact_continuation_of_the_cached_prefix_is_found_at_any_length() {
        let mut sources = Sources::new(None);
        let old: Vec<u32> = (0..100).collect();
        sources.record(old.clone(), vec![1, 2, 3]);
        // Shares 70 tokens with the source; 64 are cached (two blocks).
        let prompt: Vec<u32> = (0..70).chain(500..520).collect();
        let runs = sources.plan(&prompt, 64, prompt.len() - 1);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].at, runs[0].from, runs[0].len), (64, 64, 6));
        // A source with other tokens before `start` offers nothing exact.
        let other: Vec<u32> = (1000..1064).chain(64..100).collect();
        let mut sources = Sources::new(None);
        sources.record(other, vec![9]);
        assert!(sources.plan(&prompt, 64, prompt.len() - 1).is_empty());
    }

    #[test]
    fn a_window_that_repeats_is_tried_at_each_place() {
        let mut sources = Sources::new(Some(16));
        // The window [7; 8] first occurs in a short run, then in the long one.
        let old: Vec<u32> = [vec![7; 8], vec![1], vec![7; 8], (100..140).collect()].concat();
        sources.record(old, vec![1]);
        let prompt: Vec<u32> = [vec![5], vec![7; 8], (100..140).collect(), vec![9]].concat();
        let runs = sources.plan(&prompt, 0, prompt.len() - 1);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].at, runs[0].from, runs[0].len), (1, 9, 48));
    }
}
