//! `greencode prune`: the Flab-Pruner method as an offline command.
//! Order: vocabulary → layers → FFN neurons; the result is an ordinary
//! Hugging Face folder, written to a temporary name and renamed when
//! complete, with `prune_report.json` beside the weights.

pub mod apply;
pub mod ffn;
pub mod layers;
pub mod vocab;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use crate::data::corpus::{self, CorpusError};
use crate::data::{calib, DataError};
use crate::eval::kl::{kl_on_files, KlReport};
use crate::eval::perplexity::{perplexity, EvalError, PerplexityReport};
use crate::generate::loaded::{LoadError, LoadedModel};
use crate::model::{LayerMask, ModelError, Qwen2};
use crate::output::hf_folder::{self, ModelFiles};
use crate::output::out_dir::{self, OutDirError};
use crate::output::progress::Progress;
use crate::tokenizer::{CodeTokenizer, TokenizerError};
use apply::{build, count_params, pruned_tensors, ParamCount, PrunePlan};
use ffn::FfnScore;
use layers::{CalibSet, LayerMetric, LayerStep};

/// Why pruning failed.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// The source model failed to load.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A model operation failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Tokenizing failed, or the tokenizer cannot be pruned.
    #[error("{0}")]
    Tokenizer(String),
    /// A corpus could not be read.
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    /// Evaluation failed.
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// The calibration data is missing or unusable.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The requested target cannot be met.
    #[error("{0}")]
    Target(String),
    /// The output folder is in the way or cannot be written.
    #[error("{0}")]
    Output(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {}", crate::model::error::candle_reason(.0))]
    Candle(#[from] candle_core::Error),
}

impl From<OutDirError> for PruneError {
    fn from(e: OutDirError) -> Self {
        Self::Output(e.to_string())
    }
}

impl From<TokenizerError> for PruneError {
    fn from(e: TokenizerError) -> Self {
        Self::Tokenizer(e.to_string())
    }
}

/// Everything `prune` needs, resolved from the command line.
#[derive(Debug, Clone)]
pub struct PruneConfig {
    /// Source model folder.
    pub model_dir: PathBuf,
    /// Output folder.
    pub out_dir: PathBuf,
    /// `--calib` (None: the stdlib calibration split).
    pub calib: Option<String>,
    /// Fraction of parameters to remove (chooses the knobs below).
    pub target: Option<f64>,
    /// Layers to remove.
    pub drop_layers: usize,
    /// FFN width to keep (None: unchanged).
    pub ffn_keep: Option<usize>,
    /// Keep tokens used at least this often (0: no vocabulary pruning).
    pub vocab_min_count: usize,
    /// Layer scoring.
    pub layer_metric: LayerMetric,
    /// Neuron scoring.
    pub ffn_score: FfnScore,
    /// Calibration windows.
    pub calib_samples: usize,
    /// Tokens per calibration window.
    pub calib_len: usize,
    /// Seed for `random` FFN choice.
    pub seed: u64,
    /// Replace an existing output folder.
    pub force: bool,
    /// Held-out files for the report (0: skip the held-out evaluation).
    pub eval_files: usize,
    /// FFN widths considered by `--target` are multiples of this.
    pub width_multiple: usize,
}

/// Held-out quality of one model.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOut {
    /// Bits per UTF-8 byte (comparable across vocabularies).
    pub bits_per_byte: f64,
    /// Per-token perplexity (not comparable across vocabularies).
    pub ppl: f64,
    /// Predicted tokens.
    pub tokens: usize,
}

impl From<&PerplexityReport> for HeldOut {
    fn from(r: &PerplexityReport) -> Self {
        Self {
            bits_per_byte: r.bits_per_byte,
            ppl: r.ppl,
            tokens: r.tokens,
        }
    }
}

/// A candidate considered by `--target`.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCandidate {
    /// Layers removed.
    pub drop_layers: usize,
    /// FFN width kept.
    pub ffn_width: usize,
    /// Fraction of parameters removed.
    pub removed_fraction: f64,
    /// KL on the validation slice (nats/token).
    pub validation_kl: f64,
}

/// `prune_report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    /// Source model folder.
    pub source: String,
    /// Parameters before.
    pub params_before: ParamCount,
    /// Parameters after.
    pub params_after: ParamCount,
    /// Fraction of unique parameters removed.
    pub removed_fraction: f64,
    /// Vocabulary decisions.
    pub vocab: Option<vocab::VocabPlan>,
    /// Layers kept (original indices).
    pub kept_layers: Vec<usize>,
    /// Layer removal steps with candidate scores.
    pub layer_steps: Vec<LayerStep>,
    /// Layer metric used.
    pub layer_metric: LayerMetric,
    /// FFN width per kept layer.
    pub ffn_widths: Vec<usize>,
    /// Neuron scoring used.
    pub ffn_score: FfnScore,
    /// The `--target` search, if any.
    pub target: Option<f64>,
    /// Candidates the target search evaluated.
    pub target_candidates: Vec<TargetCandidate>,
    /// Calibration windows × tokens.
    pub calibration: (usize, usize),
    /// Held-out evaluation before pruning.
    pub held_out_before: Option<HeldOut>,
    /// Held-out evaluation after pruning.
    pub held_out_after: Option<HeldOut>,
    /// KL(original ‖ pruned) on the held-out set, original renormalised over kept ids.
    pub held_out_kl: Option<KlReport>,
    /// Held-out files used.
    pub held_out_files: usize,
    /// Seconds per stage.
    pub seconds: Vec<(String, f64)>,
}

/// Calibration batch size (windows per forward pass).
const BATCH: usize = 4;

/// `--drop-layers` and `--ffn-keep` against the model, before the
/// calibration work (seconds to minutes) that would otherwise come first.
fn check_sizes(cfg: &PruneConfig, model: &Qwen2) -> Result<(), PruneError> {
    let total = model.num_layers();
    if cfg.target.is_none() && cfg.drop_layers >= total {
        return Err(PruneError::Target(format!(
            "--drop-layers {}: cannot remove {} of {total} layers (at least one must remain)",
            cfg.drop_layers, cfg.drop_layers
        )));
    }
    let width = model.ffn_widths().into_iter().max().unwrap_or(0);
    match cfg.ffn_keep {
        Some(0) => Err(PruneError::Target("--ffn-keep must be at least 1".into())),
        Some(keep) if keep > width => Err(PruneError::Target(format!(
            "--ffn-keep {keep} exceeds the FFN width {width}"
        ))),
        _ => Ok(()),
    }
}

/// Runs the whole pruning pipeline and writes the output folder.
pub fn run(cfg: &PruneConfig) -> Result<PruneReport, PruneError> {
    let t0 = Instant::now();
    let mut seconds: Vec<(String, f64)> = Vec::new();
    let mut lap = {
        let mut last = Instant::now();
        move |name: &str, seconds: &mut Vec<(String, f64)>| {
            seconds.push((name.to_owned(), last.elapsed().as_secs_f64()));
            last = Instant::now();
        }
    };
    if cfg.out_dir.exists() && !cfg.force {
        return Err(PruneError::Output(format!(
            "output folder {} already exists (pass --force to replace it)",
            cfg.out_dir.display()
        )));
    }
    if let Some(t) = cfg.target {
        if !(t > 0.0 && t < 1.0) {
            return Err(PruneError::Target(format!("--target must be in (0, 1), got {t}")));
        }
    }
    let source = LoadedModel::load_cpu(&cfg.model_dir)?;
    check_sizes(cfg, &source.model)?;
    let tok_path = cfg.model_dir.join("tokenizer.json");
    let tok_json: Value = serde_json::from_str(
        &std::fs::read_to_string(&tok_path)
            .map_err(|e| PruneError::Tokenizer(format!("{}: {e}", tok_path.display())))?,
    )
    .map_err(|e| PruneError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    let texts = calib::load(cfg.calib.as_deref())?;
    eprintln!("calibration corpus: {} documents", texts.len());
    lap("load", &mut seconds);

    // 1. Vocabulary.
    let vocab_plan = if cfg.vocab_min_count > 0 {
        let refs: Vec<&str> = texts.iter().map(|t| t.text.as_str()).collect();
        let p = vocab::plan(&tok_json, &source.tokenizer, &refs, cfg.vocab_min_count)?;
        eprintln!(
            "vocabulary: keep {} of {} tokens ({} used ≥ {} times, {} for the merge closure)",
            p.kept.len(),
            p.original,
            p.used,
            p.min_count,
            p.closure
        );
        Some(p)
    } else {
        None
    };
    let (work_model, work_tok, new_tok_json) = match &vocab_plan {
        Some(p) => {
            let plan = PrunePlan {
                vocab: Some(p.kept.clone()),
                kept_layers: (0..source.model.num_layers()).collect(),
                ffn: None,
            };
            let model = build(&source.model, &plan)?;
            let json = vocab::rewrite(&tok_json, &p.kept)?;
            let tok = tokenizer_from_json(&json, &cfg.model_dir, &model)?;
            (model, tok, Some(json))
        }
        None => (
            source.model.clone(),
            tokenizer_from_json(&tok_json, &cfg.model_dir, &source.model)?,
            None,
        ),
    };
    lap("vocabulary", &mut seconds);

    // Calibration windows, tokenized by the (pruned) tokenizer.
    let n_val = if cfg.target.is_some() {
        (cfg.calib_samples / 8).max(2)
    } else {
        0
    };
    let windows = calib::windows(&work_tok, &texts, cfg.calib_samples, n_val, cfg.calib_len)?;
    eprintln!(
        "calibration: {} windows of {} tokens (+{} validation)",
        windows.calib.len(),
        cfg.calib_len,
        windows.validation.len()
    );
    let set = CalibSet::new(&work_model, &windows.calib, BATCH)?;
    lap("reference", &mut seconds);

    let total_layers = work_model.num_layers();
    let width = work_model.ffn_widths().into_iter().max().unwrap_or(0);
    let before = count_params(&source.model);

    // 2 + 3. Layers and FFN: explicit, or chosen for a target.
    let (steps, ffn_width, candidates, chosen_ffn) = match cfg.target {
        None => {
            let steps = layers::choose_layers(&work_model, &set, cfg.drop_layers, cfg.layer_metric)?;
            lap("layers", &mut seconds);
            (steps, cfg.ffn_keep.unwrap_or(width), Vec::new(), None)
        }
        Some(target) => {
            let found = search_target(
                cfg,
                target,
                &source.model,
                &work_model,
                &set,
                &windows.validation,
                &vocab_plan,
                before,
            )?;
            lap("target search", &mut seconds);
            (found.steps, found.width, found.candidates, Some(found.ffn))
        }
    };
    if ffn_width % cfg.width_multiple != 0 {
        eprintln!(
            "warning: FFN width {ffn_width} is not a multiple of {}; k-quant quantization will fall back to other types",
            cfg.width_multiple
        );
    }
    let removed: Vec<usize> = steps.iter().map(|s| s.removed).collect();
    let mask = LayerMask::without(total_layers, &removed);
    let kept_layers = mask.active();
    let ffn = if let Some(chosen) = chosen_ffn {
        // The target search already chose (and evaluated) these neurons.
        chosen
    } else if ffn_width < width {
        let act = if cfg.ffn_score == FfnScore::Act {
            Some(ffn::activation_scores(&work_model, &set.batches, &mask)?)
        } else {
            None
        };
        let per_layer = kept_layers
            .iter()
            .map(|&l| {
                ffn::choose(
                    cfg.ffn_score,
                    work_model.layers[l].mlp.width(),
                    ffn_width,
                    l,
                    cfg.seed,
                    act.as_ref(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Some(per_layer)
    } else {
        // Wider than the model was refused by `check_sizes`.
        None
    };
    lap("ffn", &mut seconds);

    let plan = PrunePlan {
        vocab: vocab_plan.as_ref().map(|p| p.kept.clone()),
        kept_layers: kept_layers.clone(),
        ffn,
    };
    let pruned = build(&source.model, &plan)?;
    let after = count_params(&pruned);
    let removed_fraction = 1.0 - after.total as f64 / before.total as f64;
    eprintln!(
        "parameters: {} → {} ({:.1}% removed); layers kept {:?}, FFN width {}",
        before.total,
        after.total,
        removed_fraction * 100.0,
        kept_layers,
        ffn_width
    );

    // Held-out evaluation, before and after.
    let (held_before, held_after, held_kl, n_files) = if cfg.eval_files > 0 {
        let dir = corpus::stdlib_dir()?;
        let files = corpus::eval_files(&dir, cfg.eval_files)?;
        let window = 1024.min(source.model.context_len());
        // Three passes over the files: minutes on a large model, so shown.
        let stage = |label: &str| Progress::new(format!("held-out evaluation: {label}"), files.len());
        let p = stage("original");
        let b = perplexity(&source.model, &source.tokenizer, &files, window, |i, _| p.set(i, ""))?;
        p.finish(&format!("bits/byte {:.4}", b.bits_per_byte));
        let p = stage("pruned");
        let a = perplexity(&pruned, &work_tok, &files, window, |i, _| p.set(i, ""))?;
        p.finish(&format!("bits/byte {:.4}", a.bits_per_byte));
        let p = stage("KL");
        let to_reference = plan.vocab.as_deref();
        let kl = kl_on_files(
            &source.model,
            &pruned,
            &work_tok,
            to_reference,
            &files,
            window,
            |i, _| p.set(i, ""),
        )?;
        p.finish(&format!("KL {:.4}", kl.kl));
        eprintln!(
            "held-out ({} files): bits/byte {:.4} → {:.4}, KL(original ‖ pruned) {:.4}, top-1 agreement {:.1}%",
            files.len(),
            b.bits_per_byte,
            a.bits_per_byte,
            kl.kl,
            kl.top1_agreement * 100.0
        );
        (Some(HeldOut::from(&b)), Some(HeldOut::from(&a)), Some(kl), files.len())
    } else {
        (None, None, None, 0)
    };
    lap("held-out evaluation", &mut seconds);

    let report = PruneReport {
        source: cfg.model_dir.display().to_string(),
        params_before: before,
        params_after: after,
        removed_fraction,
        vocab: vocab_plan,
        kept_layers,
        layer_steps: steps,
        layer_metric: cfg.layer_metric,
        ffn_widths: pruned.ffn_widths(),
        ffn_score: cfg.ffn_score,
        target: cfg.target,
        target_candidates: candidates,
        calibration: (windows.calib.len(), cfg.calib_len),
        held_out_before: held_before,
        held_out_after: held_after,
        held_out_kl: held_kl,
        held_out_files: n_files,
        seconds: {
            let mut s = seconds;
            s.push(("total".into(), t0.elapsed().as_secs_f64()));
            s
        },
    };
    write_folder(cfg, &source, &plan, new_tok_json.as_ref(), &report)?;
    Ok(report)
}

/// What the target search chose.
struct TargetChoice {
    steps: Vec<LayerStep>,
    width: usize,
    ffn: Option<Vec<Vec<u32>>>,
    candidates: Vec<TargetCandidate>,
}

/// Picks layers and FFN width reaching `target`: for each FFN width (a
/// multiple of `width_multiple`), the fewest greedy layer removals that
/// reach the target; the candidate with the smallest validation KL wins.
/// Neurons are scored once on the full-depth model and the winner keeps
/// exactly the neurons it was evaluated with.
#[allow(clippy::too_many_arguments)]
fn search_target(
    cfg: &PruneConfig,
    target: f64,
    source: &Qwen2,
    work: &Qwen2,
    set: &CalibSet,
    validation: &[Vec<u32>],
    vocab_plan: &Option<vocab::VocabPlan>,
    before: ParamCount,
) -> Result<TargetChoice, PruneError> {
    let total = work.num_layers();
    let width = work.ffn_widths().into_iter().max().unwrap_or(0);
    let removed_fraction = |drop: &[usize], w: usize| -> Result<f64, PruneError> {
        let plan = PrunePlan {
            vocab: vocab_plan.as_ref().map(|p| p.kept.clone()),
            kept_layers: LayerMask::without(total, drop).active(),
            ffn: (w < width).then(|| vec![(0..w as u32).collect(); total - drop.len()]),
        };
        Ok(1.0 - count_params(&build(source, &plan)?).total as f64 / before.total as f64)
    };
    // Layer order for the deepest cut any width needs.
    let mut widths: Vec<usize> = (1..=width / cfg.width_multiple)
        .rev()
        .map(|k| k * cfg.width_multiple)
        .collect();
    if widths.first() != Some(&width) {
        widths.insert(0, width);
    }
    let positional: Vec<usize> = (0..total).rev().collect(); // stand-in order, only for counting
    let mut need: Vec<(usize, usize)> = Vec::new(); // (width, layers to drop)
    for &w in &widths {
        for d in 0..total {
            if removed_fraction(&positional[..d], w)? >= target {
                need.push((w, d));
                break;
            }
        }
    }
    if need.is_empty() {
        return Err(PruneError::Target(format!(
            "--target {target} is unreachable: even the smallest FFN width and {} layers removed fall short",
            total - 1
        )));
    }
    let max_drop = need.iter().map(|&(_, d)| d).max().unwrap_or(0);
    let steps = layers::choose_layers(work, set, max_drop, cfg.layer_metric)?;
    let order: Vec<usize> = steps.iter().map(|s| s.removed).collect();
    let act = if cfg.ffn_score == FfnScore::Act && need.iter().any(|&(w, _)| w < width) {
        Some(ffn::activation_scores(work, &set.batches, &LayerMask::all(total))?)
    } else {
        None
    };
    let val_set = CalibSet::new(work, validation, BATCH)?;
    let mut candidates = Vec::new();
    let mut ffn_choices = Vec::new();
    for &(w, d) in &need {
        let drop = &order[..d];
        let mask = LayerMask::without(total, drop);
        let kept = mask.active();
        let ffn = if w < width {
            Some(
                kept.iter()
                    .map(|&l| ffn::choose(cfg.ffn_score, work.layers[l].mlp.width(), w, l, cfg.seed, act.as_ref()))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        } else {
            None
        };
        let plan = PrunePlan {
            vocab: None,
            kept_layers: kept,
            ffn,
        };
        let candidate = build(work, &plan)?;
        ffn_choices.push(plan.ffn);
        let kl = layers::mean_kl(&candidate, &val_set, None)?;
        let frac = removed_fraction(drop, w)?;
        eprintln!(
            "  candidate: drop {d} layers {drop:?}, FFN width {w}: {:.1}% removed, validation KL {kl:.4}",
            frac * 100.0
        );
        candidates.push(TargetCandidate {
            drop_layers: d,
            ffn_width: w,
            removed_fraction: frac,
            validation_kl: kl,
        });
    }
    let best_index = (0..candidates.len())
        .min_by(|&a, &b| candidates[a].validation_kl.total_cmp(&candidates[b].validation_kl))
        .expect("at least one candidate");
    let best = candidates[best_index].clone();
    eprintln!(
        "plan: drop {} layers, FFN width {} ({:.1}% removed, validation KL {:.4})",
        best.drop_layers,
        best.ffn_width,
        best.removed_fraction * 100.0,
        best.validation_kl
    );
    Ok(TargetChoice {
        steps: steps[..best.drop_layers].to_vec(),
        width: best.ffn_width,
        ffn: ffn_choices.swap_remove(best_index),
        candidates,
    })
}

fn tokenizer_from_json(json: &Value, folder: &Path, model: &Qwen2) -> Result<CodeTokenizer, PruneError> {
    let inner: tokenizers::Tokenizer = serde_json::from_value(json.clone())
        .map_err(|e| PruneError::Tokenizer(format!("rewritten tokenizer.json does not load: {e}")))?;
    Ok(CodeTokenizer::new(
        inner,
        folder.join("tokenizer.json"),
        &model.config().eos_token_ids,
    ))
}

/// Writes the folder under a temporary name, then renames it into place.
fn write_folder(
    cfg: &PruneConfig,
    source: &LoadedModel,
    plan: &PrunePlan,
    tok_json: Option<&Value>,
    report: &PruneReport,
) -> Result<(), PruneError> {
    out_dir::write_dir(&cfg.out_dir, |tmp| -> Result<(), PruneError> {
        let (mut config, tensors) = pruned_tensors(&source.model, plan)?;
        config["pruned_from"] = Value::from(crate::generate::locate::model_name(&cfg.model_dir));
        config["greencode_prune"] = serde_json::json!({
            "kept_layers": report.kept_layers,
            "ffn_widths": report.ffn_widths,
            "vocab_size": plan.vocab.as_ref().map_or(source.model.vocab_size(), Vec::len),
            "layer_metric": report.layer_metric,
            "ffn_score": report.ffn_score,
            "removed_fraction": report.removed_fraction,
            "params_before": report.params_before.total,
            "params_after": report.params_after.total,
        });
        hf_folder::write_model_files(
            tmp,
            ModelFiles {
                source: &cfg.model_dir,
                config: &config,
                tensors,
                dtype: source.model.config().storage_dtype(),
                tokenizer: tok_json,
            },
        )?;
        out_dir::write_json(&tmp.join("prune_report.json"), report)?;
        Ok(())
    })
}
