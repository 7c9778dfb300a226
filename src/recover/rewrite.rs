//! Flab-Pruner's data rewrite (`--rewrite`): on prompts where the student's
//! greedy completion diverges from the teacher's, train on the teacher's.

use candle_core::{Tensor, D};

use super::data::{Example, TrainSet};
use crate::model::LogitsFor;
use crate::model::{ModelError, Qwen2};

/// What the rewrite found.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RewriteStats {
    /// Prompts tried.
    pub prompts: usize,
    /// Prompts where the student's completion differed from the teacher's.
    pub diverged: usize,
    /// Tokens per completion.
    pub answer_tokens: usize,
}

/// For `n` corpus windows spread over `set`, takes each window's first
/// `seq_len - answer_len` tokens as a prompt and completes it greedily with
/// both models (the teacher restricted to the student's vocabulary through
/// `to_teacher`); returns prompt + teacher answer wherever the two differ.
pub fn rewrite(
    teacher: &Qwen2,
    student: &Qwen2,
    to_teacher: Option<&[u32]>,
    set: &TrainSet,
    n: usize,
    answer_len: usize,
) -> Result<(Vec<Example>, RewriteStats), ModelError> {
    let n = n.min(set.windows.len());
    let select = to_teacher.map(|ids| Tensor::new(ids, teacher.device())).transpose()?;
    let mut out = Vec::new();
    let mut stats = RewriteStats {
        prompts: n,
        diverged: 0,
        answer_tokens: answer_len,
    };
    for i in 0..n {
        let window = &set.windows[i * set.windows.len() / n];
        let prompt = &window[..window.len().saturating_sub(answer_len).max(1)];
        let want = window.len() - prompt.len();
        let by_teacher = greedy(teacher, prompt, want, to_teacher, select.as_ref())?;
        let by_student = greedy(student, prompt, want, None, None)?;
        if by_teacher != by_student {
            stats.diverged += 1;
            let mut tokens = prompt.to_vec();
            tokens.extend(&by_teacher);
            out.push(Example {
                tokens,
                answer_from: prompt.len(),
            });
        }
    }
    Ok((out, stats))
}

/// Greedy continuation of `prompt` (student ids) by `model`, in student ids:
/// `to_model` maps student ids to the model's, and `select` picks the
/// model's logits of the student's ids (`None`: same vocabulary).
fn greedy(
    model: &Qwen2,
    prompt: &[u32],
    n: usize,
    to_model: Option<&[u32]>,
    select: Option<&Tensor>,
) -> Result<Vec<u32>, ModelError> {
    let to_model_ids = |ids: &[u32]| -> Vec<u32> {
        match to_model {
            Some(map) => ids.iter().map(|&i| map[i as usize]).collect(),
            None => ids.to_vec(),
        }
    };
    let mut cache = model.new_cache(prompt.len() + n)?;
    let mut logits = model.forward_cached(&to_model_ids(prompt), &mut cache, LogitsFor::Last)?;
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let scores = match select {
            Some(ix) => logits.index_select(ix, D::Minus1)?,
            None => logits.clone(),
        };
        let next = scores.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0];
        out.push(next);
        if k + 1 < n {
            logits = model.forward_cached(&to_model_ids(&[next]), &mut cache, LogitsFor::Last)?;
        }
    }
    Ok(out)
}
