//! `greencode prune`: vocabulary, layer and FFN pruning of a model folder
//! into a new Hugging Face folder.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use greencode::data::corpus;
use greencode::prune::{ffn::FfnScore, layers::LayerMetric, PruneConfig};

use super::args::{model_dir, ModelArg};

#[derive(Clone, Copy, ValueEnum)]
pub enum LayerMetricArg {
    Kl,
    Bi,
    Angular,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FfnScoreArg {
    Top,
    Bottom,
    Middle,
    Random,
    Act,
}

#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Output folder (written under a temporary name, renamed when complete).
    #[arg(long)]
    out: PathBuf,
    /// Calibration data: a folder of source files, a glob, a JSONL file (`text`, or
    /// `prompt` + `completion`), or `stdlib` (default: python3's standard library
    /// files after the 40 held-out evaluation files).
    #[arg(long)]
    calib: Option<String>,
    /// Remove at least this fraction of parameters, choosing layers and FFN width by
    /// KL on a validation slice of the calibration data.
    #[arg(long, conflicts_with_all = ["drop_layers", "ffn_keep"])]
    target: Option<f64>,
    /// Layers to remove.
    #[arg(long, default_value_t = 0)]
    drop_layers: usize,
    /// FFN neurons to keep per layer (default: all).
    #[arg(long)]
    ffn_keep: Option<usize>,
    /// Keep tokens used at least this often in the calibration corpus (0: keep the whole vocabulary).
    #[arg(long, default_value_t = 1)]
    vocab_min_count: usize,
    /// How layers are chosen.
    #[arg(long, value_enum, default_value_t = LayerMetricArg::Kl)]
    layer_metric: LayerMetricArg,
    /// How FFN neurons are chosen.
    #[arg(long, value_enum, default_value_t = FfnScoreArg::Act)]
    ffn_score: FfnScoreArg,
    /// Calibration windows.
    #[arg(long, default_value_t = 32)]
    calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    calib_len: usize,
    /// Seed for `--ffn-score random`.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace the output folder if it exists.
    #[arg(long)]
    force: bool,
    /// Held-out stdlib files evaluated before and after (0: skip).
    #[arg(long, default_value_t = corpus::EVAL_FILES)]
    eval_files: usize,
}

pub fn run(a: PruneArgs) -> Result<()> {
    if a.calib_samples == 0 || a.calib_len < 2 {
        bail!("--calib-samples must be ≥ 1 and --calib-len ≥ 2");
    }
    let cfg = PruneConfig {
        model_dir: model_dir(&a.model)?,
        out_dir: a.out,
        calib: a.calib,
        target: a.target,
        drop_layers: a.drop_layers,
        ffn_keep: a.ffn_keep,
        vocab_min_count: a.vocab_min_count,
        layer_metric: match a.layer_metric {
            LayerMetricArg::Kl => LayerMetric::Kl,
            LayerMetricArg::Bi => LayerMetric::Bi,
            LayerMetricArg::Angular => LayerMetric::Angular,
        },
        ffn_score: match a.ffn_score {
            FfnScoreArg::Top => FfnScore::Top,
            FfnScoreArg::Bottom => FfnScore::Bottom,
            FfnScoreArg::Middle => FfnScore::Middle,
            FfnScoreArg::Random => FfnScore::Random,
            FfnScoreArg::Act => FfnScore::Act,
        },
        calib_samples: a.calib_samples,
        calib_len: a.calib_len,
        seed: a.seed,
        force: a.force,
        eval_files: a.eval_files,
        width_multiple: 256,
    };
    let report = greencode::prune::run(&cfg)?;
    println!(
        "wrote {}: {} → {} parameters ({:.1}% removed)",
        cfg.out_dir.display(),
        report.params_before.total,
        report.params_after.total,
        report.removed_fraction * 100.0
    );
    Ok(())
}
