//! `greencode synth`: a Hugging Face folder of random weights with a real
//! model's shape (for benchmarks where real weights cannot go).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use greencode::model::synth::{write_synth_folder, SynthShape};

use super::args::{model_dir, ModelArg};

/// `greencode synth`.
#[derive(Args)]
pub struct SynthArgs {
    /// Shape: codeqwen1.5-7b, flab-cq-5.7b, qwen2.5-coder-1.5b, qwen2.5-coder-7b or tiny.
    #[arg(long)]
    shape: String,
    /// Output folder (Hugging Face layout).
    #[arg(long)]
    out: PathBuf,
    /// Random seed (same seed, same weights).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder whose tokenizer.json is copied (default: the embedded tiny-coder).
    #[arg(long)]
    tokenizer_from: Option<PathBuf>,
    /// Write into a non-empty output folder.
    #[arg(long)]
    force: bool,
}

/// Writes a synthetic model folder.
pub fn run(a: SynthArgs) -> Result<()> {
    let shape = SynthShape::from_name(&a.shape)?;
    let tok = model_dir(&ModelArg {
        model: a.tokenizer_from.clone(),
    })?;
    let s = write_synth_folder(shape, &a.out, &tok, a.seed, a.force)?;
    println!(
        "wrote {}: {} random parameters of shape {} ({:.2} GB bf16, {} file{})",
        s.folder.display(),
        s.parameters,
        s.shape,
        s.weight_bytes as f64 / 1e9,
        s.shards,
        if s.shards == 1 { "" } else { "s" }
    );
    Ok(())
}
