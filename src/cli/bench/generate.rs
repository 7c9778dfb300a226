//! `greencode bench generate`: one sequence end to end (time to first token,
//! decode tokens/s), or with `--batch`, `--synth` or a GPU `--device`
//! several sequences decoded together through the serving step.

use anyhow::{bail, Result};
use clap::Args;
use greencode::bench::batch::{bench_batch, synthetic_prompts, BatchBenchConfig, BatchBenchReport};
use greencode::bench::{bench_generate, BenchConfig};
use greencode::cpu::threads;
use greencode::energy::meter::{open_meter, Meter, PowerModel};
use greencode::energy::MeterChoice;
use greencode::model::device::DeviceSpec;
use greencode::model::synth::{synth_model, SynthShape};

use crate::cli::args::{open_model_on, DeviceArg, Format, ModelArg, RunQuant, RunQuantArg, SpeculateArgs};

#[derive(Args)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    run_quant: RunQuantArg,
    /// Speculative decoding for the single-sequence benchmark.
    #[command(flatten)]
    speculate: SpeculateArgs,
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
    /// Also measure the machine's memory read bandwidth (1 GiB read on the
    /// same threads, after the passes) and report the decode speed's share
    /// of the floor it sets.
    #[arg(long)]
    measure_bandwidth: bool,
    #[command(flatten)]
    batch: BenchBatchArgs,
}

pub fn run(a: BenchGenerateArgs, threads: usize) -> Result<()> {
    if a.batch.selected() {
        if a.speculate.k() > 0 {
            bail!("--speculate runs in the single-sequence benchmark (without --synth, --batch or a GPU --device)");
        }
        let shape = BenchShape {
            prompt_tokens: a.prompt_tokens,
            new_tokens: a.new_tokens,
            passes: a.passes,
            format: a.format,
            quantize_q8: a.run_quant.quantize == Some(RunQuant::Q8_0),
        };
        return run_batch_bench(&a.model, &a.batch, shape);
    }
    let p = a.run_quant.open(&a.model)?;
    let cfg = BenchConfig {
        prompt_tokens: a.prompt_tokens,
        new_tokens: a.new_tokens,
        passes: a.passes,
        measure_bandwidth: a.measure_bandwidth,
        speculate_k: a.speculate.k(),
    };
    let show = a.format == Format::Text;
    let power = PowerModel::default_for(threads::default_threads());
    let mut meter = open_meter(MeterChoice::Auto, power).ok();
    let meter_ref = meter.as_deref_mut().map(|m| m as &mut dyn Meter);
    let draft = a.speculate.draft_model(&p.tokenizer)?;
    let report = bench_generate(
        &p.model,
        draft.as_ref(),
        &p.tokenizer,
        &cfg,
        threads,
        meter_ref,
        |i, pass| {
            if show {
                println!(
                    "pass {}: ttft {:.1} ms ({:.0} prompt tok/s), decode {:.1} tok/s",
                    i + 1,
                    pass.ttft_ms,
                    pass.prompt_tokens_per_second,
                    pass.decode_tokens_per_second
                );
            }
        },
    )?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => {
            let model = p.name();
            let s = |x: &greencode::bench::Spread| format!("{:.1} / {:.1} / {:.1}", x.min, x.median, x.max);
            println!(
                "model {model} ({} weights), prompt {} + {} new tokens, {} threads (min / median / max)",
                report.weights, a.prompt_tokens, a.new_tokens, threads
            );
            println!("CPU kernels {} (machine: {})", report.kernels, report.machine);
            println!("time to first token (ms): {}", s(&report.ttft_ms));
            println!("prompt tokens/s:          {}", s(&report.prompt_tokens_per_second));
            println!("decode tokens/s:          {}", s(&report.decode_tokens_per_second));
            println!(
                "weights read per token:   {:.1} MB",
                report.weight_bytes_per_token as f64 / 1e6
            );
            if let (Some(bw), Some(f), Some(share)) = (
                report.bandwidth_gbs,
                report.floor_tokens_per_second,
                report.share_of_floor,
            ) {
                println!("memory bandwidth:         {bw:.1} GB/s (read, {threads} threads, this run)");
                println!("bandwidth floor:          {f:.1} tok/s ({:.0}% reached)", share * 100.0);
            }
            if let (Some(d), Some(acc)) = (report.drafted_per_pass, report.draft_acceptance) {
                println!(
                    "speculation ({}):{}{d:.1} draft tokens a pass, {:.0}% accepted (at most {} a step)",
                    if a.speculate.draft.is_some() { "draft" } else { "lookup" },
                    if a.speculate.draft.is_some() { "      " } else { "     " },
                    acc * 100.0,
                    report.speculate_k
                );
            }
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

/// `bench generate`'s batched mode.
#[derive(Args)]
pub struct BenchBatchArgs {
    /// Random weights of a real shape built in memory on the device (no
    /// files): codeqwen1.5-7b, flab-cq-5.7b, qwen2.5-coder-1.5b, qwen2.5-coder-7b or tiny.
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
    fn selected(&self) -> bool {
        self.synth.is_some() || !self.batch.is_empty() || self.device.device != DeviceSpec::Cpu
    }
}

/// Prompt, new tokens, passes and output format of `bench generate`.
struct BenchShape {
    /// Prompt tokens per sequence.
    prompt_tokens: usize,
    /// New tokens per sequence.
    new_tokens: usize,
    /// Measured passes.
    passes: usize,
    /// Output format.
    format: Format,
    /// Quantize the weights to Q8_0 first (`--quantize q8_0`).
    quantize_q8: bool,
}

/// Runs the batched benchmark once per batch size.
fn run_batch_bench(model_arg: &ModelArg, b: &BenchBatchArgs, shape: BenchShape) -> Result<()> {
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
    if r.device == "cpu" {
        println!("CPU kernels {} (machine: {})", r.kernels, r.machine);
    }
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
