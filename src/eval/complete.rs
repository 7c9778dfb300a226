//! Greedy completion of a prompt until a stop string, a stop id or the token
//! budget: what the HumanEval and infilling evaluations both run.

use crate::generate::loaded::LoadedModel;
use crate::generate::sampling::SamplingParams;
use crate::generate::stop::{StopMatcher, StopOutcome};
use crate::generate::{generate, Flow, GenerationRequest};
use crate::model::error::ModelError;
use crate::tokenizer::TextStream;

use super::perplexity::EvalError;

/// Greedily completes `prompt_ids`, returning the text before the first of
/// `stops` (all of it when none matches within `max_tokens`). Generation
/// also ends at EOS and at `extra_stop_ids`.
pub fn complete_greedy(
    p: &LoadedModel,
    prompt_ids: Vec<u32>,
    max_tokens: usize,
    stops: &[&str],
    extra_stop_ids: &[u32],
) -> Result<String, EvalError> {
    let tok = &p.tokenizer;
    let mut req = GenerationRequest::new(prompt_ids, max_tokens, SamplingParams::default());
    req.stop_ids = tok.eos_ids().iter().chain(extra_stop_ids).copied().collect();
    let mut stream = TextStream::new();
    let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
    let mut text = String::new();
    let mut stopped = false;
    let mut decode_err = None;
    generate(&p.model, &req, |id, _| match stream.push(tok, id) {
        Ok(Some(piece)) => match matcher.push(&piece) {
            StopOutcome::Emit(s) => {
                text.push_str(&s);
                Flow::Continue
            }
            StopOutcome::Stopped(s) => {
                text.push_str(&s);
                stopped = true;
                Flow::Stop
            }
        },
        Ok(None) => Flow::Continue,
        Err(e) => {
            decode_err = Some(e);
            Flow::Stop
        }
    })
    .map_err(EvalError::from)?;
    if let Some(e) = decode_err {
        return Err(e.into());
    }
    if !stopped {
        text.push_str(&matcher.flush());
    }
    Ok(text)
}

/// Mean negative log-likelihood (nats per token) of `continuation` after
/// `context`: the tokens of the joint text past the longest common token
/// prefix with the context alone are scored.
pub fn continuation_nll(p: &LoadedModel, context: &str, continuation: &str) -> Result<f64, EvalError> {
    use crate::eval::perplexity::sum_nll;
    let tok = &p.tokenizer;
    let context_ids = tok.encode(context)?;
    let mut ids = tok.encode(&format!("{context}{continuation}"))?;
    ids.truncate(p.model.context_len());
    let shared = context_ids.iter().zip(&ids).take_while(|(a, b)| a == b).count().max(1);
    if ids.len() <= shared {
        return Err(ModelError::Input("the continuation adds no token within the context length".into()).into());
    }
    let input = candle_core::Tensor::new(ids.as_slice(), p.model.device())?.unsqueeze(0)?;
    let logits = p.model.logits(&input, None)?.squeeze(0)?;
    let scored = ids.len() - shared;
    let nll = sum_nll(&logits.narrow(0, shared - 1, scored)?, &ids[shared..])?;
    Ok(nll / scored as f64)
}
