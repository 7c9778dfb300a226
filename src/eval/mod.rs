//! Evaluation on held-out code: the corpus rules shared with pruning, and
//! perplexity / bits per byte.

pub mod corpus;
pub mod kl;
pub mod perplexity;
