//! Evaluation on held-out code (the corpora are `data`'s): perplexity and
//! bits per byte, KL and top-1 agreement against a reference, HumanEval
//! pass@1 in a sandbox, and single-line infilling.

pub mod complete;
pub mod humaneval;
pub mod infill;
pub mod kl;
pub mod output;
pub mod perplexity;
pub mod sandbox;
