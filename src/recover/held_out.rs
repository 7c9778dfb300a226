//! Held-out quality of a student against its teacher: KL, top-1 agreement,
//! bits per byte and perplexity on the held-out files, and the teacher's own
//! bits per byte on the same text.

use std::path::PathBuf;

use serde::Serialize;

use super::{RecoverConfig, RecoverError};
use crate::eval::kl::kl_on_files;
use crate::eval::perplexity::perplexity;
use crate::generate::loaded::LoadedModel;
use crate::model::Qwen2;
use crate::tokenizer::CodeTokenizer;

/// Held-out quality of the student.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOutScores {
    /// Mean KL(teacher ‖ student) per token (nats).
    pub kl: f64,
    /// Fraction of positions where the two models' top token agrees.
    pub top1_agreement: f64,
    /// The student's bits per byte.
    pub bits_per_byte: f64,
    /// The student's perplexity.
    pub perplexity: f64,
}

/// The held-out files and the teacher's own score on them.
pub(super) struct HeldOut<'a> {
    files: &'a [PathBuf],
    window: usize,
    /// The teacher's bits per byte (None: no held-out files).
    pub(super) teacher_bpb: Option<f64>,
}

impl<'a> HeldOut<'a> {
    /// Scores the teacher once, for the gap.
    pub(super) fn new(
        cfg: &'a RecoverConfig,
        teacher: &LoadedModel,
        student: &LoadedModel,
    ) -> Result<Self, RecoverError> {
        let window = cfg
            .eval_window
            .min(teacher.model.context_len())
            .min(student.model.context_len());
        let teacher_bpb = if cfg.held_out.is_empty() {
            None
        } else {
            Some(perplexity(&teacher.model, &teacher.tokenizer, &cfg.held_out, window, |_, _| {})?.bits_per_byte)
        };
        Ok(Self {
            files: &cfg.held_out,
            window,
            teacher_bpb,
        })
    }

    /// The student's scores (None: no held-out files).
    pub(super) fn score(
        &self,
        teacher: &Qwen2,
        student: &Qwen2,
        tok: &CodeTokenizer,
        to_teacher: Option<&[u32]>,
    ) -> Result<Option<HeldOutScores>, RecoverError> {
        if self.files.is_empty() {
            return Ok(None);
        }
        let r = kl_on_files(teacher, student, tok, to_teacher, self.files, self.window, |_, _| {})?;
        Ok(Some(HeldOutScores {
            kl: r.kl,
            top1_agreement: r.top1_agreement,
            bits_per_byte: r.model_bits_per_byte,
            perplexity: r.model_mean_nll.exp(),
        }))
    }
}
