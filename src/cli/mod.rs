//! The `greencode` command line: one file per command, each holding its
//! clap arguments and its handler, which resolves them into the library's
//! settings (clap types never reach the library) and prints the result.
//! `args` holds the flags several commands share.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use greencode::cpu::threads;

mod args;
mod bench;
mod compare;
mod eval;
mod generate;
pub mod interrupt;
mod prune;
mod quantize;
mod recover;
mod serve;
mod synth;

/// greencode: prune code LLMs and serve them, showing what every answer cost.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
pub struct Cli {
    /// Compute threads (default: the number of cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate a completion (or an infill with --suffix) and stream it to stdout.
    Generate(generate::GenerateArgs),
    /// Write a model as one GGUF file (f32, f16, Q8_0 or Q4_K weights) that llama.cpp loads.
    Quantize(quantize::QuantizeArgs),
    /// Evaluate a model on held-out code.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Prune a model (vocabulary, layers, FFN neurons) into a new Hugging Face folder.
    Prune(prune::PruneArgs),
    /// Recover a pruned model's quality with LoRA, distilling from the original.
    Recover(recover::RecoverArgs),
    /// Serve an OpenAI-compatible completion API (with fill-in-the-middle for IDEs).
    Serve(serve::ServeArgs),
    /// Measure speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Write a Hugging Face folder of random weights with a real model's shape.
    Synth(synth::SynthArgs),
    /// Compare models side by side: quality on held-out code against energy,
    /// FLOPs, CO2 and memory (compare.json, compare.md, compare.svg).
    Compare(compare::CompareArgs),
}

/// Parses the command line, runs the command, and reports an error as one line.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(threads::default_threads);
    threads::init(threads);
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Eval(c) => eval::run(c),
        Command::Quantize(a) => quantize::run(a),
        Command::Prune(a) => prune::run(a),
        Command::Recover(a) => recover::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(c) => bench::run(c, threads),
        Command::Synth(a) => synth::run(a),
        Command::Compare(a) => compare::run(a, threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, `a: b: c`, each cause said once: our
/// errors put their source in their own message (`path: OS error`), and
/// candle's carry a backtrace when `RUST_BACKTRACE` is set, which is left out.
fn describe(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = match cause.downcast_ref::<candle_core::Error>() {
            Some(c) => greencode::model::error::candle_reason(c),
            None => cause.to_string(),
        };
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
