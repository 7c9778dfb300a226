//! The generation layer that the CLI, the server, evaluation, pruning and
//! recovery share: which model folder a command uses (`locate`), loading a
//! model with its tokenizer by one path for folders and GGUF files
//! (`loaded`), choosing tokens (`sampling`), stop strings (`stop`),
//! log-probabilities (`logprobs`) and single-sequence generation
//! (`sequence`).

pub mod draft;
pub mod infill_sampler;
pub mod loaded;
pub mod locate;
pub mod logprobs;
pub mod sampling;
pub mod sequence;
pub mod speculate;
pub mod stop;

pub use loaded::{LoadError, LoadedModel};
pub use logprobs::{healed_token_logprob, token_logprob, TokenLogprob};
pub use sequence::{generate, generate_with, FinishReason, Flow, GenerationOutput, GenerationRequest};
