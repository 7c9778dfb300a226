//! Evaluation on held-out code: the corpus rules shared with pruning, and
//! perplexity / bits per byte.

pub mod complete;
pub mod humaneval;
pub mod infill;
pub mod kl;
pub mod output;
pub mod perplexity;
pub mod sandbox;
