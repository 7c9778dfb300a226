//! `greencode bench generate --batch N` (and `--synth`, `--device`): time to
//! first token and decode speed for N sequences decoded together through
//! the serving step (`Qwen2::step`), greedy, with the argmax taken on the
//! device so only N token ids cross to the host per step. Reports what the
//! GPU benchmarks compare: decode tokens/s, time to first token, joules per
//! token, peak GPU memory, and the share of the memory-bandwidth floor.

use candle_core::{Tensor, D};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::bench::Spread;
use crate::energy::meter::Meter;
use crate::model::error::{ModelError, Result};
use crate::model::{KvCache, Qwen2};
use crate::model::{LogitsFor, SeqStep};

/// Settings of a batched benchmark.
#[derive(Debug, Clone)]
pub struct BatchBenchConfig {
    /// Prompt length of every sequence, tokens.
    pub prompt_tokens: usize,
    /// Tokens generated per sequence (EOS ignored).
    pub new_tokens: usize,
    /// Measured passes (after one short warm-up pass).
    pub passes: usize,
    /// Sequences decoded together.
    pub batch: usize,
    /// Memory bandwidth of the device, bytes/s, for the floor (none: not reported).
    pub bandwidth: Option<f64>,
}

/// One measured pass.
#[derive(Debug, Clone, Serialize)]
pub struct BatchPass {
    /// Prefill of every prompt plus the first token, ms.
    pub ttft_ms: f64,
    /// Generated tokens of all sequences after the first, per second of decode.
    pub decode_tokens_per_second: f64,
    /// Meter joules of the whole pass per generated token (all sequences).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joules_per_token: Option<f64>,
    /// Meter joules of the decode phase per token decoded in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_joules_per_token: Option<f64>,
}

/// The benchmark's result for one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct BatchBenchReport {
    /// Model name (folder or synthetic shape).
    pub model: String,
    /// Device it ran on.
    pub device: String,
    /// Compute dtype.
    pub dtype: String,
    /// How the weights are held (`bf16`, `f32`, `q8_0`; see [`Qwen2::weight_format`]).
    pub weights: String,
    /// The CPU kernel family that ran (`avx2+fma`, `portable`).
    pub kernels: &'static str,
    /// The vector extensions the machine offers.
    pub machine: String,
    /// Sequences decoded together.
    pub batch: usize,
    /// Prompt length per sequence.
    pub prompt_tokens: usize,
    /// Tokens generated per sequence.
    pub new_tokens: usize,
    /// Parameters of the model (a tied matrix once).
    pub parameters: usize,
    /// Weight bytes every decode step reads at least once (all matrices
    /// except the embedding, which is gathered by row; the `lm_head`).
    pub weight_bytes_per_step: usize,
    /// Every pass.
    pub passes: Vec<BatchPass>,
    /// Time to first token over passes, ms.
    pub ttft_ms: Spread,
    /// Decode speed over passes, tokens/s summed over sequences.
    pub decode_tokens_per_second: Spread,
    /// Joules per generated token over passes, when metered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joules_per_token: Option<Spread>,
    /// Decode-phase joules per token over passes, when metered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_joules_per_token: Option<Spread>,
    /// The meter (`nvml`, `rapl`, `estimated`), when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy_source: Option<&'static str>,
    /// Most GPU memory the process held at the sampled points (after
    /// prefill and at the end of each pass), bytes; NVML only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_gpu_memory_bytes: Option<u64>,
    /// Most GPU memory in use on the device (all processes, from the driver:
    /// total − free) at the sampled points, bytes; GPUs only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_device_memory_used_bytes: Option<u64>,
    /// Decode tokens/s if every step only read the weights once at the given
    /// bandwidth (batch × bandwidth / weight bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_tokens_per_second: Option<f64>,
    /// Median decode speed over that floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_of_floor: Option<f64>,
}

/// `n` prompts of `len` ids drawn uniformly below `vocab` (seeded): random
/// weights need no real text, and a GPU machine no tokenizer.
pub fn synthetic_prompts(vocab: usize, n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(0..vocab as u32)).collect())
        .collect()
}

/// Bytes of the weights a decode step must read: every projection and the
/// `lm_head`, not the embedding (one row per token) unless it is the `lm_head`.
pub fn weight_bytes_per_step(model: &Qwen2) -> usize {
    let embedding_only = if model.config().tie_word_embeddings {
        0
    } else {
        model.embed_tokens().weight_bytes()
    };
    model.weight_bytes() - embedding_only
}

/// `cpu`, `cuda:N` or `metal:N`.
fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_owned(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The greedy next token of each sequence, argmax taken on the device.
fn greedy(logits: &[Tensor]) -> Result<Vec<u32>> {
    let all = Tensor::cat(logits, 0)?; // [n, vocab]
    Ok(all.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// Time of one pass and the meter readings around its phases.
struct PassTimes {
    ttft: f64,
    decode: f64,
    joules: Option<(f64, f64, f64)>,
    peak_mem: Option<u64>,
    peak_device_mem: Option<u64>,
}

/// Runs one pass: prefill every prompt in one step, then `new_tokens - 1`
/// decode steps of one token per sequence.
fn one_pass(
    model: &Qwen2,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    meter: &mut Option<&mut dyn Meter>,
) -> Result<PassTimes> {
    let read = |m: &mut Option<&mut dyn Meter>| m.as_mut().and_then(|m| m.joules().ok());
    let mem = |m: &mut Option<&mut dyn Meter>| m.as_mut().and_then(|m| m.gpu_memory_bytes());
    let len = prompts[0].len();
    let mut caches: Vec<KvCache> = prompts
        .iter()
        .map(|_| model.new_cache(len + new_tokens))
        .collect::<Result<_>>()?;
    let e0 = read(meter);
    let start = std::time::Instant::now();
    let mut seqs: Vec<SeqStep> = caches
        .iter_mut()
        .zip(prompts)
        .map(|(cache, p)| SeqStep {
            cache,
            tokens: p,
            logits: LogitsFor::Last,
        })
        .collect();
    let mut next = greedy(&model.step(&mut seqs)?)?;
    let ttft = start.elapsed().as_secs_f64();
    let e1 = read(meter);
    let mut peak = mem(meter);
    let mut peak_device = crate::model::device::gpu_memory_used(model.device());
    let decode_start = std::time::Instant::now();
    for _ in 1..new_tokens {
        let ids: Vec<[u32; 1]> = next.iter().map(|&id| [id]).collect();
        let mut seqs: Vec<SeqStep> = caches
            .iter_mut()
            .zip(&ids)
            .map(|(cache, id)| SeqStep {
                cache,
                tokens: id,
                logits: LogitsFor::Last,
            })
            .collect();
        next = greedy(&model.step(&mut seqs)?)?;
    }
    let decode = decode_start.elapsed().as_secs_f64();
    let e2 = read(meter);
    peak = peak.max(mem(meter));
    peak_device = peak_device.max(crate::model::device::gpu_memory_used(model.device()));
    Ok(PassTimes {
        ttft,
        decode,
        joules: e0.zip(e1).zip(e2).map(|((a, b), c)| (a, b, c)),
        peak_mem: peak,
        peak_device_mem: peak_device,
    })
}

/// Benchmarks `model` on `prompts` (one per sequence, all the same length).
pub fn bench_batch(
    model: &Qwen2,
    name: &str,
    prompts: &[Vec<u32>],
    cfg: &BatchBenchConfig,
    mut meter: Option<&mut dyn Meter>,
    mut progress: impl FnMut(usize, &BatchPass),
) -> Result<BatchBenchReport> {
    if cfg.prompt_tokens == 0 || cfg.new_tokens < 2 || cfg.passes == 0 || cfg.batch == 0 {
        return Err(ModelError::Input(
            "--prompt-tokens, --passes and --batch must be at least 1 and --new-tokens at least 2".into(),
        ));
    }
    if prompts.len() != cfg.batch || prompts.iter().any(|p| p.len() != cfg.prompt_tokens) {
        return Err(ModelError::Input(format!(
            "expected {} prompts of {} tokens",
            cfg.batch, cfg.prompt_tokens
        )));
    }
    crate::bench::check_fits(model, cfg.prompt_tokens, cfg.new_tokens)?;
    // Warm-up: loads kernels, creates handles, sizes the allocator's pools.
    one_pass(model, prompts, 4, &mut None)?;
    let generated = (cfg.batch * cfg.new_tokens) as f64;
    let decoded = (cfg.batch * (cfg.new_tokens - 1)) as f64;
    let mut passes = Vec::with_capacity(cfg.passes);
    let (mut peak, mut peak_device) = (None, None);
    for i in 0..cfg.passes {
        let t = one_pass(model, prompts, cfg.new_tokens, &mut meter)?;
        peak = peak.max(t.peak_mem);
        peak_device = peak_device.max(t.peak_device_mem);
        let pass = BatchPass {
            ttft_ms: t.ttft * 1e3,
            decode_tokens_per_second: decoded / t.decode,
            joules_per_token: t.joules.map(|(a, _, c)| (c - a) / generated),
            decode_joules_per_token: t.joules.map(|(_, b, c)| (c - b) / decoded),
        };
        progress(i, &pass);
        passes.push(pass);
    }
    let spread = |f: &dyn Fn(&BatchPass) -> Option<f64>| -> Option<Spread> {
        passes.iter().map(f).collect::<Option<Vec<f64>>>().map(Spread::of)
    };
    let decode = spread(&|p| Some(p.decode_tokens_per_second)).expect("at least one pass");
    let bytes = weight_bytes_per_step(model);
    let floor = cfg.bandwidth.map(|bw| cfg.batch as f64 * bw / bytes as f64);
    Ok(BatchBenchReport {
        model: name.to_owned(),
        device: device_name(model.device()),
        dtype: format!("{:?}", model.dtype()).to_lowercase(),
        weights: model.weight_format(),
        kernels: crate::cpu::features::kernels(),
        machine: crate::cpu::features::machine(),
        batch: cfg.batch,
        prompt_tokens: cfg.prompt_tokens,
        new_tokens: cfg.new_tokens,
        parameters: crate::model::params::count_params(model).total,
        weight_bytes_per_step: bytes,
        ttft_ms: spread(&|p| Some(p.ttft_ms)).expect("at least one pass"),
        joules_per_token: spread(&|p| p.joules_per_token),
        decode_joules_per_token: spread(&|p| p.decode_joules_per_token),
        energy_source: meter.as_ref().map(|m| m.source().as_str()),
        peak_gpu_memory_bytes: peak,
        peak_device_memory_used_bytes: peak_device,
        floor_tokens_per_second: floor,
        share_of_floor: floor.map(|f| decode.median / f),
        decode_tokens_per_second: decode,
        passes,
    })
}
