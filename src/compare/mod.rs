//! `greencode compare`: several models on the same held-out data and the
//! same prompts, side by side in the form of the Flab-Pruner paper's
//! efficiency analysis: quality (bits per byte, KL and top-1 agreement
//! against the first model, infill exact match, HumanEval pass@1 when
//! asked) and cost (decode tokens/s, joules and FLOPs per token, CO2 per
//! request, peak memory), each cost also as a ratio to the first model.
//!
//! Quality is computed in this process by the same functions `eval ppl`,
//! `eval kl`, `eval infill` and `eval humaneval` run, so the numbers are
//! theirs. Cost is measured by `greencode bench generate` in a child
//! process per model: a process's peak resident memory covers everything
//! it loaded, so one process per model is what gives each model its own.

pub mod chart;
pub mod table;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use serde::Serialize;

use crate::energy::Carbon;
use crate::eval::humaneval::{self, HumanEvalOptions, Problem};
use crate::eval::infill::{self, InfillItem};
use crate::eval::kl::{id_map, kl_on_files};
use crate::eval::perplexity::perplexity;
use crate::eval::sandbox::Sandbox;
use crate::generate::LoadedModel;
use crate::output::out_dir::{write_dir, write_json, OutDirError};
use crate::output::progress::Progress;

/// One model to compare.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Its name in the table and on the chart.
    pub name: String,
    /// Folder or GGUF file.
    pub path: PathBuf,
    /// Quantize its weights to Q8_0 at load.
    pub quantize_q8: bool,
}

/// HumanEval's problems and sandbox, when asked for.
pub struct HumanEvalSetup {
    /// The problems (possibly the first N).
    pub problems: Vec<Problem>,
    /// Where completions run.
    pub sandbox: Sandbox,
    /// Generation and execution options.
    pub options: HumanEvalOptions,
}

/// What `compare` runs.
pub struct CompareConfig {
    /// The models, the first being the reference of KL and of every ratio.
    pub models: Vec<ModelSpec>,
    /// Held-out files scored for bits per byte and KL (`eval ppl`'s and
    /// `eval kl`'s set, the same for every model).
    pub files: Vec<PathBuf>,
    /// Tokens scored per file.
    pub window: usize,
    /// Infill items (`eval infill`'s set).
    pub infill: Vec<InfillItem>,
    /// HumanEval, when asked for.
    pub humaneval: Option<HumanEvalSetup>,
    /// The cost benchmark: prompt tokens, new tokens, passes (`bench generate`'s).
    pub prompt_tokens: usize,
    /// Tokens generated per pass.
    pub new_tokens: usize,
    /// Measured passes per model.
    pub passes: usize,
    /// Compute threads (of the children too).
    pub threads: usize,
    /// CO2 per joule.
    pub carbon: Carbon,
    /// The greencode executable the cost children run.
    pub exe: PathBuf,
}

/// Why a comparison failed.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A model could not be loaded or evaluated.
    #[error("{model}: {message}")]
    Model {
        /// The model's name.
        model: String,
        /// What went wrong.
        message: String,
    },
    /// Writing the output folder failed.
    #[error(transparent)]
    Out(#[from] OutDirError),
}

impl CompareError {
    fn model(spec: &ModelSpec, e: impl std::fmt::Display) -> Self {
        Self::Model {
            model: spec.name.clone(),
            message: e.to_string(),
        }
    }
}

/// Quality on the held-out data.
#[derive(Debug, Clone, Serialize)]
pub struct Quality {
    /// Bits per UTF-8 byte (`eval ppl`).
    pub bits_per_byte: f64,
    /// KL(first ‖ this) per token, nats (`eval kl`; None for the first).
    pub kl: Option<f64>,
    /// Share of positions where this model's top token is the first's (None for the first).
    pub top1_agreement: Option<f64>,
    /// Single-line infill exact match (`eval infill`).
    pub infill_exact_match: f64,
    /// Single-line infill edit similarity.
    pub infill_edit_similarity: f64,
    /// HumanEval pass@1 (with `--humaneval`).
    pub humaneval_pass_at_1: Option<f64>,
}

/// Cost on the same prompts, measured by `bench generate` in a child process.
#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    /// Median decode tokens per second at batch 1.
    pub decode_tokens_per_second: f64,
    /// Median joules per token of a pass (prompt and generated).
    pub joules_per_token: Option<f64>,
    /// FLOPs per token of a pass (analytic).
    pub flops_per_token: f64,
    /// Grams CO2e of one request (a pass: the prompt and the new tokens).
    pub co2_grams_per_request: Option<f64>,
    /// Peak resident memory of the child process, bytes.
    pub peak_resident_bytes: Option<u64>,
    /// The energy meter (`nvml`, `rapl`, `estimated`).
    pub energy_source: Option<String>,
    /// How the weights were held (`bf16`, `f32`, `q8_0`, …).
    pub weights: String,
}

/// Costs as ratios to the first model's (1.0 for the first).
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Parameters.
    pub parameters: f64,
    /// FLOPs per token.
    pub flops_per_token: f64,
    /// Joules per token.
    pub joules_per_token: Option<f64>,
    /// CO2 per request.
    pub co2_per_request: Option<f64>,
    /// Peak memory.
    pub peak_memory: Option<f64>,
    /// Decode tokens per second.
    pub decode_tokens_per_second: f64,
}

/// One model's row.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRow {
    /// Its name.
    pub name: String,
    /// Where it was loaded from.
    pub path: String,
    /// Parameters (unique tensors).
    pub parameters: u64,
    /// Quality.
    pub quality: Quality,
    /// Cost.
    pub cost: Cost,
    /// Cost as ratios to the first model.
    pub ratios: Ratios,
}

/// The settings every row shares.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Held-out files scored.
    pub files: usize,
    /// Tokens per file.
    pub window: usize,
    /// Infill items.
    pub infill_items: usize,
    /// HumanEval problems (0 without `--humaneval`).
    pub humaneval_problems: usize,
    /// Benchmark prompt tokens.
    pub prompt_tokens: usize,
    /// Benchmark new tokens.
    pub new_tokens: usize,
    /// Benchmark passes.
    pub passes: usize,
    /// Compute threads.
    pub threads: usize,
    /// Grid intensity, gCO2e/kWh.
    pub grid_intensity: f64,
    /// Data-centre PUE.
    pub pue: f64,
    /// The machine's vector extensions.
    pub machine: String,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// What was run.
    pub settings: Settings,
    /// One row per model, the first being the reference.
    pub models: Vec<ModelRow>,
}

/// Runs the comparison, drawing a progress bar.
pub fn compare(cfg: &CompareConfig) -> Result<CompareReport, CompareError> {
    let first = cfg.models.first().ok_or_else(|| CompareError::Model {
        model: "(none)".into(),
        message: "no model to compare".into(),
    })?;
    let humaneval_n = cfg.humaneval.as_ref().map_or(0, |h| h.problems.len());
    let per_model = |i: usize| cfg.files.len() * if i == 0 { 1 } else { 2 } + cfg.infill.len() + humaneval_n + 1;
    let total: usize = (0..cfg.models.len()).map(per_model).sum();
    let progress = Progress::new("compare", total);
    let mut done = 0usize;
    let reference = load(first)?;
    let mut rows = Vec::with_capacity(cfg.models.len());
    for (i, spec) in cfg.models.iter().enumerate() {
        let loaded;
        let model = if i == 0 {
            &reference
        } else {
            loaded = load(spec)?;
            &loaded
        };
        let step = |what: &str, k: usize| progress.set(done + k, &format!("{}: {what}", spec.name));
        let ppl = perplexity(&model.model, &model.tokenizer, &cfg.files, cfg.window, |k, _| {
            step("bits per byte", k)
        })
        .map_err(|e| CompareError::model(spec, e))?;
        done += cfg.files.len();
        let kl = if i == 0 {
            None
        } else {
            let map = id_map(&model.tokenizer, &reference.tokenizer).map_err(|e| CompareError::model(spec, e))?;
            let r = kl_on_files(
                &reference.model,
                &model.model,
                &model.tokenizer,
                map.as_deref(),
                &cfg.files,
                cfg.window,
                |k, _| progress.set(done + k, &format!("{}: KL", spec.name)),
            )
            .map_err(|e| CompareError::model(spec, e))?;
            done += cfg.files.len();
            Some(r)
        };
        let fill = infill::evaluate(model, &cfg.infill, |k, _| {
            progress.set(done + k, &format!("{}: infill", spec.name))
        })
        .map_err(|e| CompareError::model(spec, e))?;
        done += cfg.infill.len();
        let pass_at_1 = match &cfg.humaneval {
            Some(h) => {
                let r = humaneval::evaluate(model, &h.problems, &h.sandbox, &h.options, |stage, k, _| {
                    progress.set(done + k, &format!("{}: HumanEval {stage}", spec.name))
                })
                .map_err(|e| CompareError::model(spec, e))?;
                done += h.problems.len();
                Some(r.pass_at_1)
            }
            None => None,
        };
        let parameters = crate::model::params::count_params(&model.model).total as u64;
        progress.set(done, &format!("{}: cost", spec.name));
        let cost = measure_cost(cfg, spec)?;
        done += 1;
        rows.push(ModelRow {
            name: spec.name.clone(),
            path: spec.path.display().to_string(),
            parameters,
            quality: Quality {
                bits_per_byte: ppl.bits_per_byte,
                kl: kl.as_ref().map(|r| r.kl),
                top1_agreement: kl.as_ref().map(|r| r.top1_agreement),
                infill_exact_match: fill.exact_match,
                infill_edit_similarity: fill.edit_similarity,
                humaneval_pass_at_1: pass_at_1,
            },
            cost,
            ratios: Ratios {
                parameters: 1.0,
                flops_per_token: 1.0,
                joules_per_token: None,
                co2_per_request: None,
                peak_memory: None,
                decode_tokens_per_second: 1.0,
            },
        });
    }
    progress.finish(&format!("{} models compared", rows.len()));
    set_ratios(&mut rows);
    Ok(CompareReport {
        settings: Settings {
            files: cfg.files.len(),
            window: cfg.window,
            infill_items: cfg.infill.len(),
            humaneval_problems: humaneval_n,
            prompt_tokens: cfg.prompt_tokens,
            new_tokens: cfg.new_tokens,
            passes: cfg.passes,
            threads: cfg.threads,
            grid_intensity: cfg.carbon.grid_intensity,
            pue: cfg.carbon.pue,
            machine: crate::cpu::features::machine(),
        },
        models: rows,
    })
}

fn load(spec: &ModelSpec) -> Result<LoadedModel, CompareError> {
    LoadedModel::load_with(&spec.path, &Device::Cpu, DType::F32, spec.quantize_q8)
        .map_err(|e| CompareError::model(spec, e))
}

/// Runs `greencode bench generate` on the model in a child process and reads its report.
fn measure_cost(cfg: &CompareConfig, spec: &ModelSpec) -> Result<Cost, CompareError> {
    let mut cmd = Command::new(&cfg.exe);
    cmd.arg("--threads")
        .arg(cfg.threads.to_string())
        .args(["bench", "generate", "--model"])
        .arg(&spec.path)
        .args(["--prompt-tokens", &cfg.prompt_tokens.to_string()])
        .args(["--new-tokens", &cfg.new_tokens.to_string()])
        .args(["--passes", &cfg.passes.to_string()])
        .args(["--format", "json"]);
    if spec.quantize_q8 {
        cmd.args(["--quantize", "q8_0"]);
    }
    let out = cmd
        .output()
        .map_err(|e| CompareError::model(spec, format!("running {}: {e}", cfg.exe.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        return Err(CompareError::model(spec, format!("bench generate failed: {last}")));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| CompareError::model(spec, format!("bench generate's report: {e}")))?;
    let median = |key: &str| v[key]["median"].as_f64();
    let tokens = (cfg.prompt_tokens + cfg.new_tokens) as f64;
    let joules_per_token = median("joules_per_token");
    Ok(Cost {
        decode_tokens_per_second: median("decode_tokens_per_second")
            .ok_or_else(|| CompareError::model(spec, "bench generate reported no decode speed"))?,
        joules_per_token,
        flops_per_token: v["flops_per_token"].as_f64().unwrap_or(0.0),
        co2_grams_per_request: joules_per_token.map(|j| cfg.carbon.grams(j * tokens)),
        peak_resident_bytes: v["peak_resident_bytes"].as_u64(),
        energy_source: v["energy_source"].as_str().map(str::to_owned),
        weights: v["weights"].as_str().unwrap_or("").to_owned(),
    })
}

/// Fills each row's ratios to the first row.
fn set_ratios(rows: &mut [ModelRow]) {
    let Some(first) = rows.first().cloned() else { return };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let opt = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| ratio(a, b));
    for row in rows.iter_mut() {
        let (c, f) = (&row.cost, &first.cost);
        row.ratios = Ratios {
            parameters: ratio(row.parameters as f64, first.parameters as f64),
            flops_per_token: ratio(c.flops_per_token, f.flops_per_token),
            joules_per_token: opt(c.joules_per_token, f.joules_per_token),
            co2_per_request: opt(c.co2_grams_per_request, f.co2_grams_per_request),
            peak_memory: opt(
                c.peak_resident_bytes.map(|b| b as f64),
                f.peak_resident_bytes.map(|b| b as f64),
            ),
            decode_tokens_per_second: ratio(c.decode_tokens_per_second, f.decode_tokens_per_second),
        };
    }
}

/// Writes `compare.json`, `compare.md` and `compare.svg` into `out`, whole
/// or not at all. An existing `out` is replaced only when it holds a
/// previous comparison (its `compare.json`), never another folder.
pub fn write(report: &CompareReport, out: &Path) -> Result<(), CompareError> {
    if out.exists() {
        let empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_none());
        if !empty && !out.join("compare.json").is_file() {
            return Err(OutDirError::new(
                out,
                "exists and holds no earlier comparison (compare.json); choose another --out",
            )
            .into());
        }
    }
    write_dir(out, |dir| {
        write_json(&dir.join("compare.json"), report)?;
        let md = dir.join("compare.md");
        std::fs::write(&md, table::markdown(report)).map_err(|e| OutDirError::new(&md, e))?;
        let svg = dir.join("compare.svg");
        let drawn = chart::svg(report).map_err(|e| OutDirError::new(&svg, e))?;
        std::fs::write(&svg, drawn).map_err(|e| OutDirError::new(&svg, e))?;
        Ok::<(), CompareError>(())
    })
}
