//! `greencode recover`: LoRA recovery of a pruned model by distillation
//! from the original. Adapters (A random, B zero) on the chosen projections
//! of the frozen student learn to match the teacher's next-token
//! distribution (KL over every position), the data's next token, or both;
//! AdamW with warm-up and cosine decay; checkpoints that resume exactly; the
//! adapter written in PEFT's layout, optionally merged into a plain
//! Hugging Face folder; held-out KL and perplexity before and after.

pub mod checkpoint;
pub mod data;
pub mod loss;
pub mod optim;
pub mod peft;
pub mod rewrite;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::Serialize;
use serde_json::{json, Value};

use crate::eval::kl::{id_map, kl_on_files};
use crate::eval::perplexity::{perplexity, EvalError};
use crate::model::lora::{LoraConfig, SharedAdapter};
use crate::model::{Kernels, ModelError, Qwen2, WeightStore};
use crate::out_dir::{self, OutDirError};
use crate::pipeline::{Pipeline, PipelineError};
use crate::tokenizer::CodeTokenizer;
use checkpoint::{LogPoint, TrainState};
use data::{Example, TrainSet};
use loss::LossKind;
use optim::{AdamWConfig, Param};
use rewrite::RewriteStats;

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Budget {
    /// A fixed number of optimiser steps.
    Steps(usize),
    /// Wall-clock minutes of training (evaluation not counted); the step
    /// count is fixed from the speed of the first steps, so the learning-rate
    /// schedule still ends where the time does.
    Minutes(f64),
}

/// Everything `recover` needs.
#[derive(Debug, Clone)]
pub struct RecoverConfig {
    /// The pruned model to adapt.
    pub student: PathBuf,
    /// The original model to distil from.
    pub teacher: PathBuf,
    /// Output folder (must not exist).
    pub out: PathBuf,
    /// Training data as `prune --calib` reads it (default: the stdlib calibration split).
    pub data: Option<String>,
    /// Adapter rank, scale, targets and seed.
    pub lora: LoraConfig,
    /// Steps or minutes.
    pub budget: Budget,
    /// Optimiser settings.
    pub optim: AdamWConfig,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Training loss.
    pub loss: LossKind,
    /// `--rewrite N`: prompts to complete with both models.
    pub rewrite: Option<usize>,
    /// Also write the merged model.
    pub merge: bool,
    /// Continue from `OUT.checkpoint`.
    pub resume: bool,
    /// Steps between checkpoints (0: only when interrupted).
    pub checkpoint_every: usize,
    /// Held-out files for KL and perplexity before and after (may be empty).
    pub held_out: Vec<PathBuf>,
    /// Tokens scored per held-out file.
    pub eval_window: usize,
    /// Set by a signal handler: save a checkpoint and stop after this step.
    pub stop: Option<&'static AtomicBool>,
}

/// Why recovery failed or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// Invalid options.
    #[error("{0}")]
    Usage(String),
    /// A model failed to load.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// A model operation failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The two tokenizers cannot be mapped onto each other.
    #[error("student and teacher vocabularies cannot be mapped: {0}")]
    Vocab(String),
    /// The training data is missing or unusable.
    #[error("{0}")]
    Data(String),
    /// Evaluation failed.
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// Output or checkpoint files.
    #[error(transparent)]
    Output(#[from] OutDirError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Interrupted; the checkpoint holds every completed step.
    #[error("interrupted after step {step} of {total}; the checkpoint {} holds it: run the same command with --resume to continue", checkpoint.display())]
    Interrupted {
        /// Steps completed.
        step: usize,
        /// Steps planned.
        total: usize,
        /// Where the checkpoint is.
        checkpoint: PathBuf,
    },
}

impl From<data::DataError> for RecoverError {
    fn from(e: data::DataError) -> Self {
        Self::Data(e.to_string())
    }
}

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

/// What a recovery run did; written as `recover_report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RecoverReport {
    /// Student folder.
    pub student: String,
    /// Teacher folder.
    pub teacher: String,
    /// Steps taken in total.
    pub steps: usize,
    /// Sequences per step × tokens per sequence.
    pub tokens_per_step: usize,
    /// Training wall-clock seconds (all sessions of a resumed run).
    pub train_seconds: f64,
    /// Training tokens per second.
    pub tokens_per_second: f64,
    /// Trainable (adapter) parameters.
    pub trainable_parameters: usize,
    /// The run's settings.
    pub spec: Value,
    /// Held-out files scored.
    pub held_out_files: usize,
    /// Before training (adapters zero).
    pub before: Option<HeldOutScores>,
    /// After training, measured on the merged weights rounded to the
    /// student's storage dtype (what a merged folder holds).
    pub after: Option<HeldOutScores>,
    /// The teacher's own bits per byte on the same text.
    pub teacher_bits_per_byte: Option<f64>,
    /// Fraction of the student–teacher bits-per-byte gap closed by training.
    pub gap_closed: Option<f64>,
    /// What `--rewrite` found.
    pub rewrite: Option<RewriteStats>,
    /// Step at which this session resumed (None: a fresh run).
    pub resumed_at_step: Option<usize>,
    /// Loss log.
    pub history: Vec<LogPoint>,
}

/// Runs recovery and writes the output folder; returns the report.
pub fn run(cfg: &RecoverConfig) -> Result<RecoverReport, RecoverError> {
    check_usage(cfg)?;
    let ckpt_dir = checkpoint::dir_for(&cfg.out);
    match (cfg.resume, ckpt_dir.exists()) {
        (true, false) => {
            return Err(RecoverError::Usage(format!(
                "--resume: no checkpoint at {} (it is written every --checkpoint-every steps and when a run is interrupted)",
                ckpt_dir.display()
            )))
        }
        (false, true) => {
            return Err(RecoverError::Usage(format!(
                "a checkpoint of an interrupted run exists at {}: pass --resume to continue it, or delete it",
                ckpt_dir.display()
            )))
        }
        _ => {}
    }
    let teacher = Pipeline::load_cpu(&cfg.teacher)?;
    let mut student = Pipeline::load_cpu(&cfg.student)?;
    if student.model.context_len() < cfg.seq_len {
        return Err(RecoverError::Usage(format!(
            "--seq-len {} exceeds the student's context length {}",
            cfg.seq_len,
            student.model.context_len()
        )));
    }
    if cfg.lora.targets.contains(&crate::model::lora::LoraTarget::LmHead) && student.model.config().tie_word_embeddings
    {
        return Err(RecoverError::Usage(
            "--targets lm_head needs a model with untied embeddings; this student ties lm_head to embed_tokens (an adapter would untie them)".into(),
        ));
    }
    let to_teacher = id_map(&student.tokenizer, &teacher.tokenizer).map_err(|e| RecoverError::Vocab(e.to_string()))?;
    let mut texts = crate::prune::calib::load(cfg.data.as_deref()).map_err(|e| RecoverError::Data(e.to_string()))?;
    let held_out_names: Vec<String> = cfg.held_out.iter().map(|p| p.display().to_string()).collect();
    let before_filter = texts.len();
    texts.retain(|t| !held_out_names.contains(&t.name));
    if texts.len() < before_filter {
        eprintln!(
            "recover: left {} held-out evaluation files out of the training data",
            before_filter - texts.len()
        );
    }
    if texts.is_empty() {
        return Err(RecoverError::Data("the training data holds only held-out files".into()));
    }
    let mut set = TrainSet::from_texts(&student.tokenizer, &texts, cfg.seq_len, cfg.lora.seed)?;
    eprintln!(
        "recover: {} training windows of {} tokens ({} tokens); student {}, teacher {}",
        set.windows.len(),
        cfg.seq_len,
        set.tokens(),
        cfg.student.display(),
        cfg.teacher.display()
    );
    let spec = spec(cfg);

    let held_out = HeldOut::new(cfg, &teacher, &student)?;
    let before = held_out.score(
        &teacher.model,
        &student.model,
        &student.tokenizer,
        to_teacher.as_deref(),
    )?;

    let rewrite_stats = match cfg.rewrite {
        Some(n) => {
            let answer = (cfg.seq_len / 4).clamp(1, 64);
            let (examples, stats) =
                rewrite::rewrite(&teacher.model, &student.model, to_teacher.as_deref(), &set, n, answer)?;
            eprintln!(
                "recover: rewrite: {} of {} prompts diverged from the teacher; training on its answers",
                stats.diverged, stats.prompts
            );
            set.rewritten = examples;
            Some(stats)
        }
        None => None,
    };

    let adapters = student.model.attach_lora(&cfg.lora)?;
    student.model.set_kernels(Kernels::Differentiable);
    let mut params: Vec<(String, Param)> = Vec::new();
    for (module, a) in &adapters {
        params.push((peft::tensor_name(module, "A"), Param::new(a.a.clone())?));
        params.push((peft::tensor_name(module, "B"), Param::new(a.b.clone())?));
    }
    let trainable: usize = params.iter().map(|(_, p)| p.var.elem_count()).sum();

    let mut state = TrainState {
        spec: spec.clone(),
        step: 0,
        total_steps: match cfg.budget {
            Budget::Steps(n) => n,
            Budget::Minutes(_) => 0,
        },
        train_seconds: 0.0,
        history: Vec::new(),
    };
    let mut resumed_at_step = None;
    if cfg.resume {
        let (saved, tensors) = checkpoint::load(&ckpt_dir)?;
        check_same_spec(&saved.spec, &spec, &ckpt_dir)?;
        let mut refs: Vec<(String, &mut Param)> = params.iter_mut().map(|(n, p)| (n.clone(), p)).collect();
        checkpoint::restore(&tensors, &mut refs, &ckpt_dir)?;
        resumed_at_step = Some(saved.step);
        eprintln!("recover: resuming at step {} of {}", saved.step, saved.total_steps);
        state = saved;
    }

    let trainer = Trainer {
        cfg,
        teacher: &teacher.model,
        student: &student.model,
        teacher_ids: to_teacher
            .as_deref()
            .map(|m| Tensor::new(m, teacher.model.device()))
            .transpose()?,
        to_teacher: to_teacher.as_deref(),
        set: &set,
    };
    trainer.train(&mut state, &mut params, &ckpt_dir)?;

    // What a merged folder holds: adapters folded in, rounded to the storage dtype.
    student.model.set_kernels(Kernels::Fused);
    let merged = student.model.merged_lora()?;
    let stored = rounded(&merged, storage_dtype(&student))?;
    let after = held_out.score(&teacher.model, &stored, &student.tokenizer, to_teacher.as_deref())?;
    let gap_closed = match (&before, &after, held_out.teacher_bpb) {
        (Some(b), Some(a), Some(t)) if b.bits_per_byte - t > 0.0 => {
            Some((b.bits_per_byte - a.bits_per_byte) / (b.bits_per_byte - t))
        }
        _ => None,
    };
    let tokens_per_step = cfg.batch * cfg.seq_len;
    let report = RecoverReport {
        student: cfg.student.display().to_string(),
        teacher: cfg.teacher.display().to_string(),
        steps: state.step,
        tokens_per_step,
        train_seconds: state.train_seconds,
        tokens_per_second: (state.step * tokens_per_step) as f64 / state.train_seconds.max(1e-9),
        trainable_parameters: trainable,
        spec,
        held_out_files: cfg.held_out.len(),
        before,
        after,
        teacher_bits_per_byte: held_out.teacher_bpb,
        gap_closed,
        rewrite: rewrite_stats,
        resumed_at_step,
        history: state.history.clone(),
    };
    write_output(cfg, &student, &adapters, &stored, &report)?;
    let _ = std::fs::remove_dir_all(&ckpt_dir);
    Ok(report)
}

fn check_usage(cfg: &RecoverConfig) -> Result<(), RecoverError> {
    let usage = |m: String| Err(RecoverError::Usage(m));
    if cfg.out.exists() {
        return usage(format!(
            "output folder {} already exists; choose another --out or delete it",
            cfg.out.display()
        ));
    }
    if cfg.lora.rank == 0 {
        return usage("--rank must be at least 1".into());
    }
    if cfg.lora.targets.is_empty() {
        return usage("--targets names no projection".into());
    }
    if cfg.batch == 0 {
        return usage("--batch must be at least 1".into());
    }
    if cfg.seq_len < 2 {
        return usage("--seq-len must be at least 2".into());
    }
    match cfg.budget {
        Budget::Steps(0) => return usage("--steps must be at least 1".into()),
        Budget::Minutes(m) if !(m > 0.0 && m.is_finite()) => {
            return usage(format!("--minutes must be a positive number, got {m}"))
        }
        _ => {}
    }
    if !(cfg.optim.lr > 0.0 && cfg.optim.lr.is_finite()) {
        return usage(format!("--lr must be positive, got {}", cfg.optim.lr));
    }
    Ok(())
}

/// The settings that fix a run's trajectory; a resumed run must match them.
fn spec(cfg: &RecoverConfig) -> Value {
    let canon = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let mut targets: Vec<&str> = cfg.lora.targets.iter().map(|t| t.module()).collect();
    targets.sort_unstable();
    json!({
        "student": canon(&cfg.student),
        "teacher": canon(&cfg.teacher),
        "data": cfg.data.clone().unwrap_or_else(|| "stdlib".into()),
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha,
        "targets": targets,
        "seed": cfg.lora.seed,
        "lr": cfg.optim.lr,
        "warmup": cfg.optim.warmup,
        "weight_decay": cfg.optim.weight_decay,
        "clip": cfg.optim.clip,
        "batch": cfg.batch,
        "seq_len": cfg.seq_len,
        "loss": cfg.loss,
        "rewrite": cfg.rewrite,
        "budget": cfg.budget,
    })
}

fn check_same_spec(saved: &Value, now: &Value, dir: &Path) -> Result<(), RecoverError> {
    let (Some(saved), Some(now)) = (saved.as_object(), now.as_object()) else {
        return Err(RecoverError::Usage(format!(
            "{}: unreadable run settings",
            dir.display()
        )));
    };
    for (key, value) in now {
        if saved.get(key) != Some(value) {
            return Err(RecoverError::Usage(format!(
                "--resume: the checkpoint at {} was made with {key} = {}, this command has {key} = {value}; resume with the same options",
                dir.display(),
                saved.get(key).unwrap_or(&Value::Null)
            )));
        }
    }
    Ok(())
}

/// The training loop's fixed inputs.
struct Trainer<'a> {
    cfg: &'a RecoverConfig,
    teacher: &'a Qwen2,
    student: &'a Qwen2,
    teacher_ids: Option<Tensor>,
    to_teacher: Option<&'a [u32]>,
    set: &'a TrainSet,
}

/// Steps timed before a `--minutes` budget is turned into a step count.
const TIMING_STEPS: usize = 3;

impl Trainer<'_> {
    fn train(
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
        let mut progress = crate::progress::Progress::new("recover", planned(state));
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

/// The held-out files and the teacher's own score on them.
struct HeldOut<'a> {
    files: &'a [PathBuf],
    window: usize,
    teacher_bpb: Option<f64>,
}

impl<'a> HeldOut<'a> {
    fn new(cfg: &'a RecoverConfig, teacher: &Pipeline, student: &Pipeline) -> Result<Self, RecoverError> {
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

    fn score(
        &self,
        teacher: &Qwen2,
        student: &Qwen2,
        tok: &CodeTokenizer,
        to_teacher: Option<&[u32]>,
    ) -> Result<Option<HeldOutScores>, RecoverError> {
        if self.files.is_empty() {
            return Ok(None);
        }
        let r = kl_on_files(teacher, student, tok, to_teacher, self.files, self.window)?;
        Ok(Some(HeldOutScores {
            kl: r.kl,
            top1_agreement: r.top1_agreement,
            bits_per_byte: r.model_bits_per_byte,
            perplexity: r.model_mean_nll.exp(),
        }))
    }
}

/// The dtype the student's checkpoint is stored in.
fn storage_dtype(student: &Pipeline) -> DType {
    crate::prune::apply::storage_dtype(student.model.config())
}

/// `model` with every weight rounded to `dtype` (and computed in f32 again).
fn rounded(model: &Qwen2, dtype: DType) -> Result<Qwen2, RecoverError> {
    let tensors = model
        .named_tensors()?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?.to_dtype(model.dtype())?)))
        .collect::<Result<_, candle_core::Error>>()?;
    let mut store = WeightStore::from_tensors(Path::new("<merged>"), model.dtype(), tensors);
    Ok(Qwen2::from_store(model.config().clone(), &mut store)?)
}

/// Writes the output folder: the PEFT adapter, and with `--merge` a full
/// Hugging Face folder with the adapter under `adapter/`.
fn write_output(
    cfg: &RecoverConfig,
    student: &Pipeline,
    adapters: &[(String, SharedAdapter)],
    merged: &Qwen2,
    report: &RecoverReport,
) -> Result<(), RecoverError> {
    let base = std::fs::canonicalize(&cfg.student)
        .unwrap_or_else(|_| cfg.student.clone())
        .display()
        .to_string();
    out_dir::write_dir(&cfg.out, |tmp| -> Result<(), RecoverError> {
        out_dir::write_json(&tmp.join("recover_report.json"), report)?;
        if !cfg.merge {
            peft::write(tmp, &base, &cfg.lora, adapters)?;
            return Ok(());
        }
        let adapter_dir = tmp.join("adapter");
        std::fs::create_dir(&adapter_dir).map_err(|e| OutDirError::new(&adapter_dir, e))?;
        peft::write(&adapter_dir, &base, &cfg.lora, adapters)?;
        let dtype = storage_dtype(student);
        let tensors = merged
            .named_tensors()?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
            .collect::<Result<_, candle_core::Error>>()?;
        let mut config = Value::Object(student.model.config().raw.clone());
        config["greencode_recover"] = json!({
            "adapter": "adapter",
            "steps": report.steps,
            "rank": cfg.lora.rank,
            "alpha": cfg.lora.alpha,
        });
        out_dir::write_json(&tmp.join("config.json"), &config)?;
        out_dir::write_safetensors(&tmp.join("model.safetensors"), &tensors)?;
        out_dir::copy_file(&cfg.student, tmp, "tokenizer.json")?;
        crate::prune::copy_side_files(&cfg.student, tmp, &config)?;
        Ok(())
    })
}
