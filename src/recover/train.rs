//! The training loop: batches in step order, the loss and its gradients
//! (two halves of each batch side by side), AdamW, periodic and interrupt
//! checkpoints, and a `--minutes` budget turned into a step count.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::checkpoint::{self, LogPoint, TrainState};
use super::data::{Example, TrainSet};
use super::loss::{self, LossKind};
use super::optim::{self, Param};
use super::{Budget, RecoverConfig, RecoverError};
use crate::model::Qwen2;

/// The training loop's fixed inputs.
pub(super) struct Trainer<'a> {
    pub(super) cfg: &'a RecoverConfig,
    pub(super) teacher: &'a Qwen2,
    pub(super) student: &'a Qwen2,
    /// The teacher's ids of the student's vocabulary, for selecting logits.
    pub(super) teacher_ids: Option<Tensor>,
    pub(super) to_teacher: Option<&'a [u32]>,
    pub(super) set: &'a TrainSet,
}

/// Steps timed before a `--minutes` budget is turned into a step count.
const TIMING_STEPS: usize = 3;

impl Trainer<'_> {
    /// Runs steps until the budget is spent; on a stop request saves a
    /// checkpoint and returns [`RecoverError::Interrupted`].
    pub(super) fn train(
        &self,
        state: &mut TrainState,
        params: &mut [(String, Param)],
        ckpt_dir: &Path,
    ) -> Result<(), RecoverError> {
        let cfg = self.cfg;
        let planned = |state: &TrainState| match cfg.budget {
            Budget::Minutes(_) if state.total_steps == 0 => TIMING_STEPS,
            _ => state.total_steps,
        };
        let mut progress = crate::output::progress::Progress::new("recover", planned(state));
        let session_start = Instant::now();
        let session_base_seconds = state.train_seconds;
        let session_first_step = state.step;
        while state.step < planned(state) {
            let step = state.step;
            let batch = self.set.batch(step, cfg.batch);
            let vars: Vec<Var> = params.iter().map(|(_, p)| p.var.clone()).collect();
            let (loss_value, grads) = self.loss_and_grads(&batch, &vars)?;
            if !loss_value.is_finite() {
                return Err(RecoverError::Data(format!(
                    "the loss became {loss_value} at step {}; lower --lr",
                    step + 1
                )));
            }
            // The schedule needs the total; with --minutes it is known after timing.
            let total_for_schedule = if state.total_steps == 0 {
                usize::MAX
            } else {
                state.total_steps
            };
            let mut refs: Vec<&mut Param> = params.iter_mut().map(|(_, p)| p).collect();
            let info = optim::step(&cfg.optim, &mut refs, &grads, step, total_for_schedule)?;
            state.step += 1;
            state.train_seconds = session_base_seconds + session_start.elapsed().as_secs_f64();
            state.history.push(LogPoint {
                step: state.step,
                loss: loss_value,
                lr: info.lr,
                grad_norm: info.grad_norm,
            });
            if let Budget::Minutes(m) = cfg.budget {
                if state.total_steps == 0 && state.step == TIMING_STEPS {
                    let per_step = state.train_seconds / state.step as f64;
                    state.total_steps = ((m * 60.0 / per_step) as usize).max(TIMING_STEPS);
                    eprintln!(
                        "recover: {per_step:.2} s per step: {} steps fit in {m} minutes",
                        state.total_steps
                    );
                    progress.set_total(state.total_steps);
                }
            }
            let done_here = state.step - session_first_step;
            let tok_s = (done_here * cfg.batch * cfg.seq_len) as f64 / session_start.elapsed().as_secs_f64().max(1e-9);
            progress.set(
                state.step,
                &format!(
                    "/{} loss {loss_value:.4} lr {:.1e} {tok_s:.0} tok/s",
                    state.total_steps, info.lr
                ),
            );
            let interrupted = cfg.stop.is_some_and(|s| s.load(Ordering::SeqCst));
            let periodic = cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every);
            if (interrupted || periodic) && state.step < planned(state) {
                let refs: Vec<(String, &Param)> = params.iter().map(|(n, p)| (n.clone(), p)).collect();
                checkpoint::save(ckpt_dir, state, &refs)?;
            }
            if interrupted && state.step < planned(state) {
                return Err(RecoverError::Interrupted {
                    step: state.step,
                    total: state.total_steps,
                    checkpoint: ckpt_dir.to_path_buf(),
                });
            }
        }
        progress.finish(&format!(
            "{} steps, final loss {:.4}",
            state.step,
            state.history.last().map_or(f64::NAN, |p| p.loss)
        ));
        Ok(())
    }

    /// The batch's loss and its gradients. Two halves of the batch run
    /// forward and backward side by side on the thread pool (each op of a
    /// half on one thread: candle's element-wise ops do not parallelise
    /// without spinning), and their gradients add up in a fixed order, so
    /// the result does not depend on scheduling.
    fn loss_and_grads(&self, batch: &[Example], vars: &[Var]) -> Result<(f64, GradStore), RecoverError> {
        let norms = Norms::of(batch);
        let part = |examples: &[Example]| -> Result<(f64, GradStore), RecoverError> {
            let loss = self.loss(examples, &norms)?;
            Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, loss.backward()?))
        };
        if batch.len() < 2 || rayon::current_num_threads() < 2 {
            return part(batch);
        }
        let (left, right) = batch.split_at(batch.len() / 2);
        let (a, b) = rayon::join(|| part(left), || part(right));
        let ((loss_a, mut grads), (loss_b, grads_b)) = (a?, b?);
        for v in vars {
            let sum = match (grads.get(v.as_tensor()), grads_b.get(v.as_tensor())) {
                (Some(x), Some(y)) => (x + y)?,
                (None, Some(y)) => y.clone(),
                _ => continue,
            };
            grads.insert(v.as_tensor(), sum);
        }
        Ok((loss_a + loss_b, grads))
    }

    /// The training loss of `batch`, a part of a batch whose totals are
    /// `norms` (a differentiable scalar; the parts' losses add up to the
    /// whole batch's mean loss).
    fn loss(&self, batch: &[Example], norms: &Norms) -> Result<Tensor, RecoverError> {
        let (b, t) = (batch.len(), self.cfg.seq_len);
        let flat: Vec<u32> = batch.iter().flat_map(|e| e.tokens.iter().copied()).collect();
        let device = self.student.device();
        let ids = Tensor::from_vec(flat.clone(), (b, t), device)?;
        let student_logits = self.student.logits(&ids, None)?;
        let mut total: Option<Tensor> = None;
        let mut add = |x: Tensor| -> Result<(), RecoverError> {
            total = Some(match total.take() {
                Some(t) => (t + x)?,
                None => x,
            });
            Ok(())
        };
        if self.cfg.loss.needs_teacher() {
            let teacher_flat: Vec<u32> = match self.to_teacher {
                Some(map) => flat.iter().map(|&i| map[i as usize]).collect(),
                None => flat,
            };
            let teacher_logits = self
                .teacher
                .logits(&Tensor::from_vec(teacher_flat, (b, t), self.teacher.device())?, None)?;
            let teacher_logits = match &self.teacher_ids {
                Some(ix) => teacher_logits.index_select(ix, 2)?,
                None => teacher_logits,
            };
            let share = (b * t) as f64 / norms.positions as f64;
            add((loss::kl(&teacher_logits, &student_logits)? * share)?)?;
        }
        if matches!(self.cfg.loss, LossKind::Ce | LossKind::KlCe) {
            let mask: Vec<f32> = batch
                .iter()
                .flat_map(|e| (1..t).map(move |i| if i >= e.answer_from { 1.0 } else { 0.0 }))
                .collect();
            let share = mask.iter().sum::<f32>() as f64 / norms.answer_tokens.max(1) as f64;
            let mask = Tensor::from_vec(mask, (b, t - 1), device)?.to_dtype(student_logits.dtype())?;
            add((loss::next_token_ce(&student_logits, &ids, &mask)? * share)?)?;
        }
        Ok(total.expect("every loss kind adds a term"))
    }
}

/// A whole batch's counts, for splitting its mean loss into parts.
struct Norms {
    /// Positions (KL terms).
    positions: usize,
    /// Next-token targets that count for cross-entropy.
    answer_tokens: usize,
}

impl Norms {
    fn of(batch: &[Example]) -> Self {
        Self {
            positions: batch.iter().map(|e| e.tokens.len()).sum(),
            answer_tokens: batch
                .iter()
                .map(|e| e.tokens.len().saturating_sub(e.answer_from.max(1)))
                .sum(),
        }
    }
}
