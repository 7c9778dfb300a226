//! `greencode bench generate`: time to first token and decode speed at
//! batch 1, over several passes, on any model. The prompt is greencode's
//! own source text (`prompt.txt`) tokenized by the model, so it is realistic code and the
//! same on every machine.

use serde::Serialize;

use crate::energy::meter::Meter;
use crate::generate::sampling::SamplingParams;
use crate::generate::{generate_with, Flow, GenerationRequest};
use crate::model::error::{ModelError, Result};
use crate::model::Qwen2;
use crate::tokenizer::CodeTokenizer;

/// Text the benchmark prompt is cut from: greencode's Qwen2 source as it
/// stood when the benchmarks were first recorded, kept fixed so prompts
/// (and so every recorded number) stay comparable as the code moves.
const PROMPT_SOURCE: &str = include_str!("prompt.txt");

/// Settings of one benchmark run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens generated per pass (EOS ignored).
    pub new_tokens: usize,
    /// Measured passes (one unmeasured warm-up pass runs first).
    pub passes: usize,
    /// Measure the memory read bandwidth after the passes (for the floor).
    pub measure_bandwidth: bool,
    /// Most draft tokens per step with the lookup drafter (0: no speculation).
    pub speculate_k: usize,
}

/// One measured pass.
#[derive(Debug, Clone, Serialize)]
pub struct BenchPass {
    /// Time to first token, ms.
    pub ttft_ms: f64,
    /// Prompt tokens per second (prompt length / time to first token).
    pub prompt_tokens_per_second: f64,
    /// Decode tokens per second after the first token.
    pub decode_tokens_per_second: f64,
    /// Joules per token (prompt and generated) by the energy meter, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joules_per_token: Option<f64>,
}

/// Minimum, median and maximum of a quantity over passes.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    /// Smallest value.
    pub min: f64,
    /// Median value.
    pub median: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `v` (at least one value).
    pub(crate) fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            min: v[0],
            median,
            max: v[n - 1],
        }
    }
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Prompt length used.
    pub prompt_tokens: usize,
    /// Tokens generated per pass.
    pub new_tokens: usize,
    /// Compute threads.
    pub threads: usize,
    /// How the weights are held (`bf16`, `f32`, `q8_0`; see [`Qwen2::weight_format`]).
    pub weights: String,
    /// The CPU kernel family that ran (`avx2+fma`, `portable`).
    pub kernels: &'static str,
    /// The vector extensions the machine offers.
    pub machine: String,
    /// Every pass.
    pub passes: Vec<BenchPass>,
    /// Time to first token over passes, ms.
    pub ttft_ms: Spread,
    /// Prompt speed over passes.
    pub prompt_tokens_per_second: Spread,
    /// Decode speed over passes.
    pub decode_tokens_per_second: Spread,
    /// Joules per token over passes, when metered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joules_per_token: Option<Spread>,
    /// The meter that measured them (`nvml`, `rapl`, `estimated`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy_source: Option<&'static str>,
    /// Weight bytes a decoded token reads (every matrix once; the
    /// embedding only as the tied output matrix).
    pub weight_bytes_per_token: usize,
    /// FLOPs of one pass (the prompt's forward and each decode step, by
    /// the model's analytic count) per token of the pass (prompt and
    /// generated: the basis of `joules_per_token`).
    pub flops_per_token: f64,
    /// The process's peak resident memory when the passes ended, bytes
    /// (Linux's high-water mark: weights, caches and the loader's buffers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_resident_bytes: Option<u64>,
    /// The machine's read bandwidth measured in this run on the same
    /// threads, GB/s (`None` where not measured: on a GPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_gbs: Option<f64>,
    /// Decode speed the bandwidth allows: bandwidth ÷ bytes per token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_tokens_per_second: Option<f64>,
    /// Median decode speed over that floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_of_floor: Option<f64>,
    /// Most draft tokens per step (0: speculation off).
    pub speculate_k: usize,
    /// Draft tokens proposed per pass (speculation on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drafted_per_pass: Option<f64>,
    /// Share of draft tokens the model agreed with (speculation on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft_acceptance: Option<f64>,
}

/// The first `n` tokens of the benchmark text (repeated if it is shorter).
pub fn bench_prompt(tok: &CodeTokenizer, n: usize) -> Result<Vec<u32>> {
    let base = tok
        .encode(PROMPT_SOURCE)
        .map_err(|e| ModelError::Input(e.to_string()))?;
    if base.is_empty() {
        return Err(ModelError::Input("the benchmark text tokenizes to nothing".into()));
    }
    Ok(base.iter().copied().cycle().take(n).collect())
}

/// Fails unless `prompt` + `new` tokens fit `model`'s context.
pub fn check_fits(model: &Qwen2, prompt: usize, new: usize) -> Result<()> {
    if prompt + new > model.context_len() {
        return Err(ModelError::Input(format!(
            "prompt {prompt} + new tokens {new} exceed the context length {}",
            model.context_len()
        )));
    }
    Ok(())
}

/// Runs the benchmark (drafting with `draft` when given and speculation is
/// on), reading `meter` (when given) around each pass and calling
/// `progress` after each pass.
pub fn bench_generate(
    model: &Qwen2,
    draft: Option<&crate::generate::draft::DraftModel>,
    tok: &CodeTokenizer,
    cfg: &BenchConfig,
    threads: usize,
    mut meter: Option<&mut dyn Meter>,
    mut progress: impl FnMut(usize, &BenchPass),
) -> Result<BenchReport> {
    if cfg.prompt_tokens == 0 || cfg.new_tokens == 0 || cfg.passes == 0 {
        return Err(ModelError::Input(
            "--prompt-tokens, --new-tokens and --passes must be at least 1".into(),
        ));
    }
    check_fits(model, cfg.prompt_tokens, cfg.new_tokens)?;
    let mut req = GenerationRequest::new(
        bench_prompt(tok, cfg.prompt_tokens)?,
        cfg.new_tokens,
        SamplingParams::greedy(),
    );
    req.ignore_stop_ids = true;
    req.speculate_k = cfg.speculate_k;
    generate_with(model, draft, &req, |_, _| Flow::Continue)?; // warm-up
    let mut passes = Vec::with_capacity(cfg.passes);
    let (mut drafted, mut accepted) = (0usize, 0usize);
    let read = |m: &mut Option<&mut dyn Meter>| m.as_mut().and_then(|m| m.joules().ok());
    for i in 0..cfg.passes {
        let before = read(&mut meter);
        let out = generate_with(model, draft, &req, |_, _| Flow::Continue)?;
        let after = read(&mut meter);
        drafted += out.drafted;
        accepted += out.accepted;
        let ttft = out.time_to_first_token.as_secs_f64();
        let tokens = (cfg.prompt_tokens + out.token_ids.len()) as f64;
        let pass = BenchPass {
            ttft_ms: ttft * 1e3,
            prompt_tokens_per_second: cfg.prompt_tokens as f64 / ttft,
            decode_tokens_per_second: out.decode_tokens_per_second(),
            joules_per_token: before.zip(after).map(|(b, a)| (a - b) / tokens),
        };
        progress(i, &pass);
        passes.push(pass);
    }
    let peak_resident_bytes = super::soak::peak_rss_bytes();
    let flops = crate::energy::FlopCounter::new(&model.shapes());
    let (p, n) = (cfg.prompt_tokens, cfg.new_tokens);
    let pass_flops = flops.forward(p, 0, 1)
        + (0..n.saturating_sub(1))
            .map(|i| flops.forward(1, p + i, 1))
            .sum::<u64>();
    let bytes = super::batch::weight_bytes_per_step(model);
    let bandwidth = cfg
        .measure_bandwidth
        .then(|| super::bandwidth::read_bandwidth(threads, 3));
    let floor = bandwidth.map(|bw| bw / bytes as f64);
    let decode = Spread::of(passes.iter().map(|p| p.decode_tokens_per_second).collect());
    let speculating = cfg.speculate_k > 0;
    Ok(BenchReport {
        speculate_k: cfg.speculate_k,
        drafted_per_pass: speculating.then(|| drafted as f64 / cfg.passes as f64),
        draft_acceptance: speculating.then(|| accepted as f64 / drafted.max(1) as f64),
        weight_bytes_per_token: bytes,
        flops_per_token: pass_flops as f64 / (p + n) as f64,
        peak_resident_bytes,
        bandwidth_gbs: bandwidth.map(|b| b / 1e9),
        floor_tokens_per_second: floor,
        share_of_floor: floor.map(|f| decode.median / f),
        prompt_tokens: cfg.prompt_tokens,
        new_tokens: cfg.new_tokens,
        threads,
        weights: model.weight_format(),
        kernels: crate::cpu::features::kernels(),
        machine: crate::cpu::features::machine(),
        ttft_ms: Spread::of(passes.iter().map(|p| p.ttft_ms).collect()),
        prompt_tokens_per_second: Spread::of(passes.iter().map(|p| p.prompt_tokens_per_second).collect()),
        decode_tokens_per_second: decode,
        joules_per_token: passes
            .iter()
            .map(|p| p.joules_per_token)
            .collect::<Option<Vec<f64>>>()
            .map(Spread::of),
        energy_source: meter.map(|m| m.source().as_str()),
        passes,
    })
}
