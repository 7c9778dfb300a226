//! The command line's device and synthetic-model parts (part of the binary,
//! beside `main.rs`): `--device`, `greencode synth`, `bench generate
//! --synth/--batch` and `bench kernels`. Clap types stay here and in
//! `main.rs`; the library gets resolved values.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use greencode::bench_batch::{bench_batch, synthetic_prompts, BatchBenchConfig, BatchBenchReport};
use greencode::device::DeviceSpec;
use greencode::model::synth::{synth_model, write_synth_folder, SynthShape};
use greencode::pipeline::Pipeline;

use super::{model_dir, Format, ModelArg};

/// `--device`: where the model computes.
#[derive(Args, Clone, Copy)]
pub struct DeviceArg {
    /// Device: `cpu` (f32 arithmetic; bf16 checkpoints stay bf16 in memory) or `cuda[:N]` (bf16; needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

/// `serve`'s device and synthetic-weight options.
#[derive(Args)]
pub struct ServeDeviceArgs {
    #[command(flatten)]
    pub device: DeviceArg,
    /// Serve random weights of a real shape built on the device (benchmarks;
    /// the tokenizer comes from --model, default the embedded tiny-coder).
    #[arg(long)]
    synth: Option<String>,
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0, requires = "synth")]
    synth_seed: u64,
}

impl ServeDeviceArgs {
    /// The synthetic shape and seed, when `--synth` was given.
    pub fn synth(&self) -> Result<Option<(SynthShape, u64)>> {
        Ok(match &self.synth {
            Some(name) => Some((SynthShape::from_name(name)?, self.synth_seed)),
            None => None,
        })
    }
}

/// Loads the model folder of `arg` on `device` in that device's dtype.
pub fn open_model_on(arg: &ModelArg, device: DeviceSpec, quantize_q8: bool) -> Result<Pipeline> {
    let dir = model_dir(arg)?;
    Ok(Pipeline::load_with(&dir, &device.open()?, device.dtype(), quantize_q8)?)
}

/// `greencode synth`.
#[derive(Args)]
pub struct SynthArgs {
    /// Shape: codeqwen1.5-7b, flab-cq-5.7b, qwen2.5-coder-1.5b or tiny.
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
pub fn run_synth(a: SynthArgs) -> Result<()> {
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

/// `bench generate`'s batched mode.
#[derive(Args)]
pub struct BenchBatchArgs {
    /// Random weights of a real shape built in memory on the device (no
    /// files): codeqwen1.5-7b, flab-cq-5.7b, qwen2.5-coder-1.5b or tiny.
    #[arg(long, conflicts_with = "model")]
    synth: Option<String>,
    #[command(flatten)]
    device: DeviceArg,
    /// Sequences decoded together, comma-separated for several runs (e.g.
    /// `1,16`). Any of --synth, --batch or a non-CPU --device selects the
    /// batched benchmark (greedy through the serving step, argmax on the device).
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Seed of the synthetic weights and prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device memory bandwidth in GB/s, to report the share of the floor
    /// (4250 measured on the H200).
    #[arg(long)]
    bandwidth_gbs: Option<f64>,
}

impl BenchBatchArgs {
    /// Whether the batched benchmark runs instead of the batch-1 CPU one.
    pub fn selected(&self) -> bool {
        self.synth.is_some() || !self.batch.is_empty() || self.device.device != DeviceSpec::Cpu
    }
}

/// Prompt, new tokens, passes and output format of `bench generate`.
pub struct BenchShape {
    /// Prompt tokens per sequence.
    pub prompt_tokens: usize,
    /// New tokens per sequence.
    pub new_tokens: usize,
    /// Measured passes.
    pub passes: usize,
    /// Output format.
    pub format: Format,
    /// Quantize the weights to Q8_0 first (`--quantize q8_0`).
    pub quantize_q8: bool,
}

/// Runs the batched benchmark once per batch size.
pub fn run_batch_bench(model_arg: &ModelArg, b: &BenchBatchArgs, shape: BenchShape) -> Result<()> {
    use greencode::energy::meter::{open_meter, Meter, PowerModel};
    use greencode::energy::MeterChoice;
    if let Some(bw) = b.bandwidth_gbs {
        if !(bw.is_finite() && bw > 0.0) {
            bail!("--bandwidth-gbs must be a number > 0, got {bw}");
        }
    }
    if b.batch.contains(&0) {
        bail!("--batch sizes must be at least 1");
    }
    let batches = if b.batch.is_empty() { vec![1] } else { b.batch.clone() };
    let spec = b.device.device;
    let device = spec.open()?;
    let load_start = std::time::Instant::now();
    let (mut model, name, text_prompt) = match &b.synth {
        Some(s) => {
            let shape = SynthShape::from_name(s)?;
            (
                synth_model(shape, &device, spec.dtype(), b.seed)?,
                shape.name().to_owned(),
                None,
            )
        }
        None => {
            let p = open_model_on(model_arg, spec, shape.quantize_q8)?;
            let ids = greencode::bench::bench_prompt(&p.tokenizer, shape.prompt_tokens)?;
            let name = p.name();
            (p.model, name, Some(ids))
        }
    };
    if shape.quantize_q8 && b.synth.is_some() {
        model.quantize_q8()?;
    }
    device.synchronize()?;
    if shape.format == Format::Text {
        println!(
            "model {name} ready on {spec} in {:.1} s",
            load_start.elapsed().as_secs_f64()
        );
    }
    let mut meter = open_meter(
        MeterChoice::Auto,
        PowerModel::default_for(greencode::cpu::threads::default_threads()),
    )
    .ok();
    for batch in batches {
        let prompts = match &text_prompt {
            Some(ids) => vec![ids.clone(); batch],
            None => synthetic_prompts(model.vocab_size(), batch, shape.prompt_tokens, b.seed),
        };
        let cfg = BatchBenchConfig {
            prompt_tokens: shape.prompt_tokens,
            new_tokens: shape.new_tokens,
            passes: shape.passes,
            batch,
            bandwidth: b.bandwidth_gbs.map(|g| g * 1e9),
        };
        let meter_ref = meter.as_deref_mut().map(|m| m as &mut dyn Meter);
        let show = shape.format == Format::Text;
        let report = bench_batch(&model, &name, &prompts, &cfg, meter_ref, |i, p| {
            if show {
                println!(
                    "batch {batch} pass {}: ttft {:.1} ms, decode {:.1} tok/s",
                    i + 1,
                    p.ttft_ms,
                    p.decode_tokens_per_second
                );
            }
        })?;
        match shape.format {
            Format::Json => println!("{}", serde_json::to_string(&report)?),
            Format::Text => print_batch_report(&report),
        }
    }
    Ok(())
}

fn print_batch_report(r: &BatchBenchReport) {
    let s = |x: &greencode::bench::Spread| format!("{:.1} / {:.1} / {:.1}", x.min, x.median, x.max);
    println!(
        "{} on {} ({}, {} weights), batch {}, prompt {} + {} new tokens (min / median / max)",
        r.model, r.device, r.dtype, r.weights, r.batch, r.prompt_tokens, r.new_tokens
    );
    println!("time to first token (ms): {}", s(&r.ttft_ms));
    println!("decode tokens/s:          {}", s(&r.decode_tokens_per_second));
    if let (Some(j), Some(src)) = (&r.joules_per_token, r.energy_source) {
        println!(
            "joules per token:         {:.4} / {:.4} / {:.4} ({src})",
            j.min, j.median, j.max
        );
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if let Some(m) = r.peak_gpu_memory_bytes {
        println!("peak GPU memory:          {:.2} GiB (this process, NVML)", gib(m));
    }
    if let Some(m) = r.peak_device_memory_used_bytes {
        println!("peak device memory used:  {:.2} GiB (all processes, driver)", gib(m));
    }
    if let (Some(f), Some(share)) = (r.floor_tokens_per_second, r.share_of_floor) {
        println!("bandwidth floor:          {f:.0} tok/s ({:.0}% reached)", share * 100.0);
    }
}

/// `bench kernels`.
#[derive(Args)]
pub struct BenchKernelsArgs {
    #[command(flatten)]
    device: DeviceArg,
    /// Launches per timed batch (0: check correctness only).
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// Checks and times greencode's kernels against the candle path; fails when
/// a check fails.
pub fn run_bench_kernels(a: BenchKernelsArgs) -> Result<()> {
    use greencode::bench_kernels::{check_decode_attention, tolerance, ATTENTION_CASES};
    let spec = a.device.device;
    let device = spec.open()?;
    let mut failed = 0;
    for dtype in [candle_core::DType::BF16, candle_core::DType::F32] {
        for r in check_decode_attention(&device, dtype, &ATTENTION_CASES, a.iters)? {
            failed += usize::from(!r.pass);
            match a.format {
                Format::Json => println!("{}", serde_json::to_string(&r)?),
                Format::Text => {
                    let c = &r.case;
                    let time = match (r.fused_us, r.candle_us, r.speedup) {
                        (Some(f), Some(c), Some(s)) => format!("fused {f:.1} µs, candle {c:.1} µs, {s:.2}×"),
                        _ => String::new(),
                    };
                    println!(
                        "{} {} heads {}/{} hd {} len {}: rel err {:.2e} (candle {:.2e}, limit {:.0e}) {} {time}",
                        r.kernel,
                        r.dtype,
                        c.heads,
                        c.kv_heads,
                        c.head_dim,
                        c.len,
                        r.rel_err,
                        r.candle_rel_err,
                        tolerance(dtype),
                        if r.pass { "ok" } else { "FAIL" },
                    );
                }
            }
        }
    }
    if spec != DeviceSpec::Cpu {
        let m = greencode::bench_kernels::check_model_path(&device)?;
        failed += usize::from(!m.pass);
        match a.format {
            Format::Json => println!("{}", serde_json::to_string(&m)?),
            Format::Text => println!(
                "model path (tiny, f32) {spec} vs cpu: max rel err {:.2e} over {} steps, greedy tokens {} {}",
                m.max_rel_err,
                m.steps,
                if m.same_tokens { "equal" } else { "DIFFER" },
                if m.pass { "ok" } else { "FAIL" }
            ),
        }
    }
    if failed > 0 {
        bail!("{failed} kernel check(s) failed");
    }
    Ok(())
}
