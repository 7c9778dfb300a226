//! `greencode serve`: an OpenAI-compatible completion server with
//! fill-in-the-middle for IDEs. Handlers validate and tokenize; one engine
//! thread owns the model.

pub mod chat;
pub mod engine;
pub mod error;
pub mod openai;
pub mod prompt;
pub mod routes;
pub mod sse;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::energy::meter::PowerModel;
use crate::energy::{open_meter, Attributor, Carbon, MeterChoice};
use crate::generate::loaded::OpenedModel;
use crate::metrics::Metrics;

/// One model to serve: where it comes from and the options that go with it.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    /// Name clients send in `model` (None: the folder's name, or the
    /// synthetic shape's).
    pub name: Option<String>,
    /// Model folder or GGUF file (with `synth`, only its tokenizer is read).
    pub dir: PathBuf,
    /// Quantize the weights to Q8_0 at load.
    pub quantize_q8: bool,
    /// Most draft tokens per step with the lookup drafter (0: no speculation).
    pub speculate_k: usize,
    /// Serve random weights of this shape and seed, built on the device.
    pub synth: Option<(crate::model::synth::SynthShape, u64)>,
}

impl ModelEntry {
    /// The name clients use.
    pub fn served_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| match self.synth {
            Some((shape, _)) => shape.name().to_owned(),
            None => crate::generate::locate::model_name(&self.dir),
        })
    }
}

/// Everything `serve` needs, resolved from the command line.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The models, the first being the default for requests that name none.
    pub models: Vec<ModelEntry>,
    /// Address to bind.
    pub host: String,
    /// Port to bind (0: any free port, printed at start).
    pub port: u16,
    /// Most requests queued or running at once, per model; more get 429.
    pub max_queue: usize,
    /// Most sequences per engine step.
    pub max_batch: usize,
    /// Most prompt tokens per engine step while others decode.
    pub prefill_chunk: usize,
    /// Share KV blocks between requests with the same prompt prefix.
    pub prefix_caching: bool,
    /// The KV pool's size in bytes, for all models (None: the default share of free memory).
    pub kv_cache_bytes: Option<usize>,
    /// How the pool stores keys and values.
    pub kv_dtype: crate::model::KvDtype,
    /// Shortest moved run of cached tokens reused with re-rotated keys (0: off).
    pub cache_reuse: usize,
    /// Required bearer token.
    pub api_key: Option<String>,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Which energy meter (`--energy`).
    pub energy: MeterChoice,
    /// Power model of the estimated meter.
    pub power_model: PowerModel,
    /// Grid intensity and PUE.
    pub carbon: Carbon,
    /// Device the models compute on (f32 on the CPU, bf16 on a GPU).
    pub device: crate::model::device::DeviceSpec,
}

/// A model opened (configuration and tokenizer read), its weights still to load.
struct Opened {
    info: Arc<prompt::ModelInfo>,
    chat: Arc<chat::ChatTemplate>,
    weights: crate::generate::loaded::PendingWeights,
    path: PathBuf,
    entry: ModelEntry,
}

/// Runs the server until SIGTERM or Ctrl-C.
pub fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    anyhow::ensure!(!cfg.models.is_empty(), "no model to serve");
    // Configuration and tokenizer are read now; the weights load on the
    // engine thread while `/health` answers 503.
    let device = cfg.device.open()?;
    let dtype = cfg.device.dtype();
    let mut opened: Vec<Opened> = Vec::with_capacity(cfg.models.len());
    for entry in &cfg.models {
        let name = entry.served_name();
        if let Some(other) = opened.iter().find(|o| o.info.name == name) {
            anyhow::bail!(
                "two models are served as `{name}` ({} and {}); name them apart with --model NAME=PATH",
                other.entry.dir.display(),
                entry.dir.display()
            );
        }
        let model = match entry.synth {
            Some((shape, seed)) => OpenedModel::synth(shape, seed, &entry.dir, &device, dtype, entry.quantize_q8)?,
            None => OpenedModel::open(&entry.dir, &device, dtype, entry.quantize_q8)?,
        };
        let OpenedModel {
            config,
            tokenizer,
            path,
            weights,
        } = model;
        let info = Arc::new(prompt::ModelInfo::new(
            name,
            Arc::new(tokenizer),
            config.max_position_embeddings,
            config.vocab_size,
        ));
        opened.push(Opened {
            info,
            chat: Arc::new(chat::ChatTemplate::from_folder(&entry.dir)),
            weights,
            path,
            entry: entry.clone(),
        });
    }
    let names: Vec<String> = opened.iter().map(|o| o.info.name.clone()).collect();
    let first = Metrics::new(&names[0]);
    let process = if names.len() > 1 {
        first.process()
    } else {
        first.clone()
    };
    let meter = open_meter(cfg.energy, cfg.power_model)?;
    eprintln!(
        "greencode: energy source `{}`: {}; CO2 at {} g/kWh × PUE {}",
        meter.source().as_str(),
        meter.describe(),
        cfg.carbon.grid_intensity,
        cfg.carbon.pue
    );
    let accounting = engine::Accounting {
        attributor: Attributor::new(meter)?,
        carbon: cfg.carbon,
    };
    let (load_tx, load_rx) = tokio::sync::oneshot::channel::<String>();
    let load_tx = Arc::new(std::sync::Mutex::new(Some(load_tx)));
    let mut specs = Vec::with_capacity(opened.len());
    let mut served = Vec::with_capacity(opened.len());
    for (i, o) in opened.into_iter().enumerate() {
        let metrics = if i == 0 {
            first.clone()
        } else {
            first.for_model(&o.info.name)
        };
        let (weights, path, load_tx) = (o.weights, o.path, Arc::clone(&load_tx));
        let load = move || {
            weights
                .load()
                .inspect(|m| {
                    let mib = m.weight_bytes() as f64 / (1 << 20) as f64;
                    eprintln!(
                        "greencode: loaded {}: weights held as {} ({mib:.1} MiB); {}",
                        path.display(),
                        m.weight_format(),
                        m.kernels()
                    );
                })
                .map(engine::ServedModel::new)
                .map_err(|e| {
                    let message = format!("{}: {e}", path.display());
                    if let Some(tx) = load_tx.lock().ok().and_then(|mut t| t.take()) {
                        let _ = tx.send(message.clone());
                    }
                    anyhow::anyhow!(message)
                })
        };
        specs.push(engine::EngineSpec {
            load: Box::new(load),
            tables: o.info.tables(),
            metrics: metrics.clone(),
            config: engine::EngineConfig {
                max_queue: cfg.max_queue.max(1),
                max_batch: cfg.max_batch.max(1),
                prefill_chunk: cfg.prefill_chunk.max(1),
                prefix_caching: cfg.prefix_caching,
                kv_cache_bytes: cfg.kv_cache_bytes,
                kv_dtype: cfg.kv_dtype,
                cache_reuse: cfg.cache_reuse,
                speculate_k: o.entry.speculate_k,
            },
        });
        served.push((o.info, metrics, o.chat, o.entry));
    }
    let (handles, _thread) = engine::spawn_many(specs, process, accounting);
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let states: Vec<routes::AppState> = served
        .into_iter()
        .zip(handles)
        .map(|((info, metrics, chat, entry), engine)| routes::AppState {
            info,
            engine,
            metrics,
            api_key: cfg.api_key.clone().filter(|k| !k.is_empty()),
            chat,
            created,
            source: entry.dir.display().to_string(),
        })
        .collect();
    // One I/O thread: the cores belong to the model's compute.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
        let addr = listener.local_addr()?;
        let list = names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        eprintln!("greencode: serving {list} on http://{addr} (OpenAI API under /v1)");
        let stopping = Arc::new(tokio::sync::Notify::new());
        let notify = Arc::clone(&stopping);
        let server = axum::serve(listener, routes::router(states)).with_graceful_shutdown(async move {
            shutdown_signal().await;
            eprintln!("greencode: shutting down, finishing in-flight requests");
            notify.notify_one();
        });
        let grace = cfg.shutdown_grace;
        tokio::select! {
            r = server => r.context("server failed")?,
            _ = async { stopping.notified().await; tokio::time::sleep(grace).await } => {
                eprintln!("greencode: in-flight requests did not finish within {grace:?}; exiting");
            }
            Ok(e) = load_rx => anyhow::bail!("{e}"),
        }
        eprintln!("greencode: stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
