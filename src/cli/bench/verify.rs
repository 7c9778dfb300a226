//! `greencode bench verify`: a speculative verify step's cost against a
//! plain one, by row count, and the speed-up draft acceptances imply.

use anyhow::{bail, Result};
use clap::Args;
use greencode::bench::verify::{bench_verify, VerifyConfig};

use crate::cli::args::{Format, ModelArg, RunQuantArg};

#[derive(Args)]
pub struct BenchVerifyArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    run_quant: RunQuantArg,
    /// Tokens in the cache before each step.
    #[arg(long, default_value_t = 256)]
    depth: usize,
    /// Most rows a step takes (1 + the longest draft).
    #[arg(long, default_value_t = 9)]
    max_rows: usize,
    /// Measured passes.
    #[arg(long, default_value_t = 5)]
    passes: usize,
    /// Draft acceptances (0–1, comma-separated) to give the implied speed-up for.
    #[arg(long, value_delimiter = ',', default_value = "0.7,0.9")]
    acceptance: Vec<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(a: BenchVerifyArgs, threads: usize) -> Result<()> {
    if let Some(bad) = a.acceptance.iter().find(|x| !(0.0..=1.0).contains(*x)) {
        bail!("--acceptance {bad}: an acceptance is between 0 and 1");
    }
    if a.max_rows < 2 || a.passes == 0 {
        bail!("--max-rows must be at least 2 and --passes at least 1");
    }
    let p = a.run_quant.open(&a.model)?;
    let cfg = VerifyConfig {
        depth: a.depth,
        max_rows: a.max_rows,
        passes: a.passes,
        acceptances: a.acceptance.clone(),
    };
    let show = a.format == Format::Text;
    let mut pass = 0;
    let report = bench_verify(&p.model, &p.tokenizer, &cfg, threads, || {
        pass += 1;
        if show {
            eprintln!("pass {pass} of {}", a.passes);
        }
    })?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => {
            println!(
                "model {} ({} weights), depth {}, {} threads, {} passes; CPU kernels {}",
                p.name(),
                report.weights,
                report.depth,
                report.threads,
                report.passes,
                report.kernels
            );
            println!("rows  ms (min / median / max)      × one row");
            for s in &report.steps {
                println!(
                    "{:>4}  {:>8.2} / {:>8.2} / {:>8.2}  {:>6.2}",
                    s.rows, s.ms.min, s.ms.median, s.ms.max, s.relative
                );
            }
            for i in &report.implied {
                println!(
                    "acceptance {:.2}: best draft {} ({:.2} tokens a step), speed-up {:.2}×",
                    i.acceptance, i.best_draft, i.tokens_per_step, i.speed_up
                );
            }
        }
    }
    Ok(())
}
