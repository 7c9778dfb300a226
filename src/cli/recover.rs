//! `greencode recover`: LoRA distillation of a pruned model from its
//! original, written as a PEFT adapter (and with `--merge` a merged folder).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use greencode::model::lora::{LoraConfig, LoraTarget};
use greencode::recover::{loss::LossKind, optim::AdamWConfig, Budget, RecoverConfig, RecoverError};

use super::args::{Format, HeldOutArgs};

#[derive(Args)]
pub struct RecoverArgs {
    /// The pruned model to adapt.
    #[arg(long)]
    student: PathBuf,
    /// The original model to distil from.
    #[arg(long)]
    teacher: PathBuf,
    /// Output folder (must not exist): the adapter in PEFT's layout, or with
    /// --merge a Hugging Face folder with the adapter under adapter/.
    #[arg(long)]
    out: PathBuf,
    /// Training data, as `prune --calib` reads it (default: python3's stdlib
    /// files after the held-out ones). Held-out files are always left out.
    #[arg(long)]
    data: Option<String>,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// Projections to adapt: q,k,v,o,gate,up,down and, for untied models, lm_head.
    #[arg(long, default_value = "q,k,v,o,gate,up,down", value_delimiter = ',')]
    targets: Vec<String>,
    /// Optimiser steps (default 200 when --minutes is not given).
    #[arg(long, conflicts_with = "minutes")]
    steps: Option<usize>,
    /// Train for this many minutes instead (the step count is fixed from the first steps' speed).
    #[arg(long)]
    minutes: Option<f64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Linear warm-up steps (at most a tenth of the run).
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the gradients' global norm to this (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Loss: kl (KL(teacher ‖ student) at every position), ce (the data's next token) or kl+ce.
    #[arg(long, default_value = "kl")]
    loss: String,
    /// Flab's data rewrite: complete N prompts with both models and train on the
    /// teacher's answer where the student's differs (N defaults to 64).
    #[arg(long, num_args = 0..=1, default_missing_value = "64")]
    rewrite: Option<usize>,
    /// Also write the merged model (a plain Hugging Face folder).
    #[arg(long)]
    merge: bool,
    /// Continue an interrupted run from OUT.checkpoint (same options).
    #[arg(long)]
    resume: bool,
    /// Steps between checkpoints (0: only when interrupted).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Seed of the adapters' initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    held_out: HeldOutArgs,
    /// Output format of the summary.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(a: RecoverArgs) -> Result<()> {
    keep_freed_memory();
    let mut targets = Vec::new();
    for t in &a.targets {
        let Some(target) = LoraTarget::parse(t) else {
            bail!("--targets: unknown projection `{t}` (expected q, k, v, o, gate, up, down, lm_head)");
        };
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    let Some(loss) = LossKind::parse(&a.loss) else {
        bail!("--loss must be kl, ce or kl+ce, got `{}`", a.loss);
    };
    let budget = match (a.steps, a.minutes) {
        (_, Some(m)) => Budget::Minutes(m),
        (Some(n), None) => Budget::Steps(n),
        (None, None) => Budget::Steps(200),
    };
    let held_out = if a.held_out.files == 0 {
        Vec::new()
    } else {
        a.held_out.resolve()?.1
    };
    let cfg = RecoverConfig {
        student: a.student,
        teacher: a.teacher,
        out: a.out,
        data: a.data,
        lora: LoraConfig {
            rank: a.rank,
            alpha: a.alpha,
            targets,
            seed: a.seed,
        },
        budget,
        optim: AdamWConfig {
            lr: a.lr,
            warmup: a.warmup,
            weight_decay: a.weight_decay,
            clip: a.clip,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        batch: a.batch,
        seq_len: a.seq_len,
        loss,
        rewrite: a.rewrite,
        merge: a.merge,
        resume: a.resume,
        checkpoint_every: a.checkpoint_every,
        held_out,
        eval_window: a.held_out.window,
        stop: Some(super::interrupt::install()),
    };
    let report = match greencode::recover::run(&cfg) {
        Ok(r) => r,
        Err(e @ (RecoverError::Interrupted { .. } | RecoverError::Cancelled)) => {
            eprintln!("{e}");
            std::process::exit(130);
        }
        Err(e) => return Err(e.into()),
    };
    if a.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "wrote {}: {} steps, {:.0} s, {:.0} tokens/s, {} adapter parameters",
        cfg.out.display(),
        report.steps,
        report.train_seconds,
        report.tokens_per_second,
        report.trainable_parameters
    );
    if let (Some(b), Some(af)) = (&report.before, &report.after) {
        println!(
            "held-out ({} files): KL {:.4} → {:.4} nats/token, bits/byte {:.4} → {:.4} (teacher {:.4}), ppl {:.2} → {:.2}",
            report.held_out_files,
            b.kl,
            af.kl,
            b.bits_per_byte,
            af.bits_per_byte,
            report.teacher_bits_per_byte.unwrap_or(f64::NAN),
            b.perplexity,
            af.perplexity
        );
    }
    if let Some(g) = report.gap_closed {
        println!("closed {:.1}% of the bits-per-byte gap to the teacher", g * 100.0);
    }
    Ok(())
}

/// Training allocates and frees the same vocabulary-sized tensors every step;
/// glibc would hand each one back to the kernel and fault it in again (a
/// third of the run's time). Keep freed memory in the heap instead.
fn keep_freed_memory() {
    // SAFETY: mallopt only tunes the allocator; called before the work starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
