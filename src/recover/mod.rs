//! `greencode recover`: LoRA recovery of a pruned model by distillation
//! from the original. Adapters (A random, B zero) on the chosen projections
//! of the frozen student learn to match the teacher's next-token
//! distribution (KL over every position), the data's next token, or both;
//! AdamW with warm-up and cosine decay; checkpoints that resume exactly; the
//! adapter written in PEFT's layout, optionally merged into a plain
//! Hugging Face folder; held-out KL and perplexity before and after.

pub mod checkpoint;
pub mod data;
pub mod held_out;
pub mod loss;
pub mod optim;
pub mod peft;
pub mod rewrite;
mod train;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Tensor};
use serde::Serialize;
use serde_json::{json, Value};

use crate::eval::kl::id_map;
use crate::eval::perplexity::EvalError;
use crate::generate::loaded::{LoadError, LoadedModel};
use crate::model::lora::{LoraConfig, SharedAdapter};
use crate::model::{Kernels, ModelError, Qwen2, WeightStore};
use crate::output::hf_folder::{self, ModelFiles};
use crate::output::out_dir::{self, OutDirError};
use crate::tokenizer::CodeTokenizer;
use checkpoint::{LogPoint, TrainState};
use data::TrainSet;
use held_out::{HeldOut, HeldOutScores};
use loss::LossKind;
use optim::{AdamWConfig, Param};
use rewrite::RewriteStats;
use train::Trainer;

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
    Load(#[from] LoadError),
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
    #[error("tensor operation failed: {}", crate::model::error::candle_reason(.0))]
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
    /// Interrupted before the first step of this session: nothing new to save.
    #[error("interrupted before training started; nothing was written")]
    Cancelled,
}

impl From<data::DataError> for RecoverError {
    fn from(e: data::DataError) -> Self {
        Self::Data(e.to_string())
    }
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
    let teacher = LoadedModel::load_cpu(&cfg.teacher)?;
    let mut student = LoadedModel::load_cpu(&cfg.student)?;
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
    let mut set = training_set(cfg, &student.tokenizer)?;
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

    let (mut state, resumed_at_step) = start_state(cfg, &spec, &mut params, &ckpt_dir)?;
    // Ctrl-C during loading or the first evaluation stops here, not a step later.
    if cfg.stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
        return Err(RecoverError::Cancelled);
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
    let stored = rounded(&merged, student.model.config().storage_dtype())?;
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

/// The training windows: `--data` (default the stdlib calibration split)
/// without any held-out evaluation file.
fn training_set(cfg: &RecoverConfig, tok: &CodeTokenizer) -> Result<TrainSet, RecoverError> {
    let mut texts = crate::data::calib::load(cfg.data.as_deref()).map_err(|e| RecoverError::Data(e.to_string()))?;
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
    let set = TrainSet::from_texts(tok, &texts, cfg.seq_len, cfg.lora.seed)?;
    eprintln!(
        "recover: {} training windows of {} tokens ({} tokens); student {}, teacher {}",
        set.windows.len(),
        cfg.seq_len,
        set.tokens(),
        cfg.student.display(),
        cfg.teacher.display()
    );
    Ok(set)
}

/// A fresh training state, or with `--resume` the checkpoint's (its
/// parameters and moments restored into `params`) and the step it was at.
fn start_state(
    cfg: &RecoverConfig,
    spec: &Value,
    params: &mut [(String, Param)],
    ckpt_dir: &Path,
) -> Result<(TrainState, Option<usize>), RecoverError> {
    if !cfg.resume {
        let total_steps = match cfg.budget {
            Budget::Steps(n) => n,
            Budget::Minutes(_) => 0,
        };
        let state = TrainState {
            spec: spec.clone(),
            step: 0,
            total_steps,
            train_seconds: 0.0,
            history: Vec::new(),
        };
        return Ok((state, None));
    }
    let (saved, tensors) = checkpoint::load(ckpt_dir)?;
    check_same_spec(&saved.spec, spec, ckpt_dir)?;
    let mut refs: Vec<(String, &mut Param)> = params.iter_mut().map(|(n, p)| (n.clone(), p)).collect();
    checkpoint::restore(&tensors, &mut refs, ckpt_dir)?;
    eprintln!("recover: resuming at step {} of {}", saved.step, saved.total_steps);
    let at = saved.step;
    Ok((saved, Some(at)))
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
    student: &LoadedModel,
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
        let mut config = Value::Object(student.model.config().raw.clone());
        config["greencode_recover"] = json!({
            "adapter": "adapter",
            "steps": report.steps,
            "rank": cfg.lora.rank,
            "alpha": cfg.lora.alpha,
        });
        hf_folder::write_model_files(
            tmp,
            ModelFiles {
                source: &cfg.student,
                config: &config,
                tensors: merged.named_tensors()?.into_iter().collect(),
                dtype: student.model.config().storage_dtype(),
                tokenizer: None,
            },
        )?;
        Ok(())
    })
}
