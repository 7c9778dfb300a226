//! `greencode serve`: the OpenAI-compatible completion server.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use greencode::cpu::threads;
use greencode::energy::{meter::PowerModel, Carbon, MeterChoice};
use greencode::model::synth::SynthShape;
use greencode::model::KvDtype;
use greencode::serve::engine::EngineConfig;

use super::args::{
    at_least_one, model_dir, model_value, DeviceArg, ModelArg, ModelValue, RunQuant, RunQuantArg, SpeculateArgs,
};
use greencode::serve::ModelEntry;

#[derive(Args)]
pub struct ServeArgs {
    /// A model to serve: a folder or GGUF file (default: $GREENCODE_MODEL,
    /// else the embedded models/tiny-coder). Repeat it to serve several
    /// side by side as `NAME=PATH` (the request's `model` picks one; the
    /// first answers requests that name none), each optionally followed by
    /// its own options, comma-separated: `quantize=q8_0`,
    /// `speculate=off|lookup`, `draft-max=N` (default: the flags below).
    #[arg(long = "model", value_name = "[NAME=]PATH[,OPTION...]")]
    models: Vec<String>,
    #[command(flatten)]
    gpu: ServeDeviceArgs,
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
    /// KV cache pool for all requests, MiB (default: 40% of the memory
    /// available after the weights, at most twice what --max-batch
    /// full-context sequences need). Requests wait when it is full.
    #[arg(long, value_parser = at_least_one)]
    kv_cache_mb: Option<usize>,
    /// How keys and values are stored: f16 (llama.cpp's default; half the
    /// memory of f32), bf16, or f32 (the bits `greencode generate` gives).
    #[arg(long, default_value = EngineConfig::default().kv_dtype.name(), value_parser = parse_kv_dtype)]
    kv_dtype: KvDtype,
    /// Do not share KV blocks between requests with the same prompt prefix.
    #[arg(long)]
    no_prefix_cache: bool,
    /// Reuse cached runs of at least N prompt tokens that moved to other
    /// positions (llama-server's --cache-reuse: editors' context chunks
    /// that shift), turning their keys instead of computing them again;
    /// close to a cold run, not bit-equal. 0 (the default) turns it off; N
    /// below 8 counts as 8.
    #[arg(long, value_name = "N", default_value_t = 0)]
    cache_reuse: usize,
    #[command(flatten)]
    speculate: SpeculateArgs,
    /// Old form of --no-prefix-cache: 0 turns prefix caching off, any other
    /// value leaves it on (what stays cached is now bounded by
    /// --kv-cache-mb, not by a count of requests).
    #[arg(long, value_name = "N")]
    prefix_cache: Option<usize>,
    /// Require `Authorization: Bearer KEY` on API routes.
    #[arg(long, env = "GREENCODE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Model name clients send (default: the model folder's name); one
    /// model only (name several with --model NAME=PATH).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// Energy meter: the first that works (NVML, RAPL, estimate), or one in particular.
    #[arg(long, value_enum, default_value_t = EnergyArg::Auto)]
    energy: EnergyArg,
    /// Estimated meter: watts per fully busy core (default: 85 W, CodeCarbon's
    /// TDP fallback, divided by the number of cores; the startup log says the result).
    #[arg(long)]
    cpu_watts: Option<f64>,
    /// Estimated meter: watts drawn regardless of load (default: 8.5).
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
pub enum EnergyArg {
    Auto,
    Nvml,
    Rapl,
    Estimated,
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

pub fn run(a: ServeArgs) -> Result<()> {
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
    if a.speculate.speculate == super::args::Speculate::Draft || a.speculate.draft.is_some() {
        bail!("serve speculates with --speculate lookup; a draft model (--speculate draft --draft DIR) runs in `generate` and `bench generate` for now");
    }
    let defaults = ModelEntry {
        name: a.served_model_name.clone(),
        dir: std::path::PathBuf::new(),
        quantize_q8: a.run_quant.quantize == Some(RunQuant::Q8_0),
        speculate_k: a.speculate.k(),
        synth: a.gpu.synth()?,
    };
    let models = model_entries(&a.models, &defaults, a.speculate.draft_max)?;
    if models.len() > 1 && (a.served_model_name.is_some() || defaults.synth.is_some()) {
        bail!("--served-model-name and --synth take one model; with several, name each as --model NAME=PATH");
    }
    greencode::serve::run(greencode::serve::ServeConfig {
        models,
        host: a.host,
        port: a.port,
        max_queue: a.max_queue,
        max_batch: a.max_batch,
        prefill_chunk: a.prefill_chunk,
        prefix_caching: !a.no_prefix_cache && a.prefix_cache != Some(0),
        kv_cache_bytes: a.kv_cache_mb.map(|mb| mb << 20),
        kv_dtype: a.kv_dtype,
        cache_reuse: a.cache_reuse,
        api_key: a.api_key,
        shutdown_grace: std::time::Duration::from_secs(a.shutdown_grace),
        energy: match a.energy {
            EnergyArg::Auto => MeterChoice::Auto,
            EnergyArg::Nvml => MeterChoice::Nvml,
            EnergyArg::Rapl => MeterChoice::Rapl,
            EnergyArg::Estimated => MeterChoice::Estimated,
        },
        power_model,
        carbon,
        device: a.gpu.device.device,
    })
}

/// The models of the `--model` values (the default model when none), each
/// starting from `defaults` (the global flags).
fn model_entries(values: &[String], defaults: &ModelEntry, draft_max: usize) -> Result<Vec<ModelEntry>> {
    if values.is_empty() {
        return Ok(vec![ModelEntry {
            dir: model_dir(&ModelArg { model: None })?,
            ..defaults.clone()
        }]);
    }
    values.iter().map(|v| model_entry(v, defaults, draft_max)).collect()
}

/// One `--model` value: `[NAME=]PATH[,OPTION...]` (see [`model_value`]).
fn model_entry(value: &str, defaults: &ModelEntry, draft_max: usize) -> Result<ModelEntry> {
    let ModelValue { name, dir, options } = model_value(value)?;
    let mut entry = ModelEntry {
        name: name.or_else(|| defaults.name.clone()),
        dir,
        ..defaults.clone()
    };
    let mut speculate = None;
    let mut k = None;
    for option in &options {
        match option.split_once('=').unwrap_or((option, "")) {
            ("quantize", "q8_0") | ("q8_0", "") => entry.quantize_q8 = true,
            ("quantize", "none") => entry.quantize_q8 = false,
            ("speculate", "off") => speculate = Some(false),
            ("speculate", "lookup") => speculate = Some(true),
            ("draft-max", n) => match n.parse::<usize>() {
                Ok(n) if n >= 1 => k = Some(n),
                _ => bail!("--model {value:?}: `draft-max` must be a whole number ≥ 1, got {n:?}"),
            },
            _ => bail!(
                "--model {value:?}: unknown option {option:?} (options: quantize=q8_0|none, speculate=off|lookup, draft-max=N)"
            ),
        }
    }
    let on = speculate.unwrap_or(defaults.speculate_k > 0 || k.is_some());
    entry.speculate_k = if on { k.unwrap_or(draft_max) } else { 0 };
    Ok(entry)
}

/// `--kv-dtype`: f32, f16 or bf16.
fn parse_kv_dtype(s: &str) -> Result<KvDtype, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ModelEntry {
        ModelEntry {
            name: None,
            dir: Default::default(),
            quantize_q8: false,
            speculate_k: 0,
            synth: None,
        }
    }

    #[test]
    fn a_model_value_gives_its_name_path_and_options() {
        let dir = env!("CARGO_MANIFEST_DIR").to_owned() + "/models/tiny-coder";
        let e = model_entry(
            &format!("small={dir},q8_0,speculate=lookup,draft-max=4"),
            &defaults(),
            8,
        )
        .unwrap();
        assert_eq!(e.name.as_deref(), Some("small"));
        assert!(e.dir.ends_with("tiny-coder") && e.quantize_q8);
        assert_eq!(e.speculate_k, 4);
        let e = model_entry(&dir, &defaults(), 8).unwrap();
        assert_eq!((e.name, e.speculate_k), (None, 0));
        let lookup = ModelEntry {
            speculate_k: 8,
            ..defaults()
        };
        assert_eq!(
            model_entry(&format!("a={dir},speculate=off"), &lookup, 8)
                .unwrap()
                .speculate_k,
            0
        );
        let err = model_entry(&format!("a={dir},fast"), &defaults(), 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown option \"fast\""), "{err}");
        assert!(model_entry("a=/no/such/dir", &defaults(), 8).is_err());
    }
}
