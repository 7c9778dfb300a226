//! Every Prometheus metric greencode exports, defined in one place: names,
//! help texts and buckets live here and nowhere else. All series carry a
//! `model` label: the served model's name, or, with several models served,
//! an empty one (no label) on the series that belong to the process rather
//! than to one model (idle energy, power, GPU memory, the shared KV pool).

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets (seconds): vLLM's time-to-first-token buckets with finer
/// steps below 5 ms, where CPU decode steps fall.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.003, 0.004, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Energy-per-token buckets (joules): 0.1 mJ to 100 J, CPU tiny models to
/// 7B models at batch 1 on a GPU.
pub const ENERGY_PER_TOKEN_BUCKETS: &[f64] = &[
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0,
    100.0,
];

/// What the metrics say about the served model: plain numbers and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFacts {
    /// Parameters by component (`embeddings`, `attention`, `mlp`, `norms`,
    /// `lm_head`, `total`).
    pub parameters: [(&'static str, usize); 6],
    /// The model it was pruned from (empty when none).
    pub pruned_from: String,
    /// The weight format decode runs on (`q8_0` or `none`).
    pub quantization: &'static str,
    /// Parameters before pruning, when pruned.
    pub params_before_pruning: Option<u64>,
    /// Bytes its weights hold in memory, as loaded.
    pub weight_bytes: u64,
}

/// The server's metrics and the registry that renders them.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    model: String,
    /// Finished requests by finish reason (`stop`, `length`, `cancelled`, `error`).
    pub requests: IntCounterVec,
    /// Prompt tokens processed.
    pub prompt_tokens: IntCounterVec,
    /// Tokens generated.
    pub generation_tokens: IntCounterVec,
    /// Requests being generated now.
    pub running: IntGaugeVec,
    /// Requests admitted and waiting for the engine.
    pub waiting: IntGaugeVec,
    /// Time to first token.
    pub ttft: HistogramVec,
    /// Time between consecutive tokens of a request.
    pub itl: HistogramVec,
    /// Whole-request latency.
    pub e2e: HistogramVec,
    /// Requests refused before reaching the engine, by HTTP status.
    pub rejected: IntCounterVec,
    /// Prompt tokens served from cached prefixes instead of recomputed.
    pub prefix_hit_tokens: IntCounterVec,
    /// Draft tokens proposed by speculative decoding, by drafter.
    pub spec_drafted: IntCounterVec,
    /// Draft tokens the model agreed with, by drafter.
    pub spec_accepted: IntCounterVec,
    /// Prompt tokens whose keys and values were moved from where a recent
    /// sequence cached them at other positions (`--cache-reuse`).
    pub moved_tokens: IntCounterVec,
    /// Tokens run through the model as prompt (prompt chunks, and a
    /// preempted sequence's recomputation): what prefix sharing saves.
    pub prompt_tokens_computed: IntCounterVec,
    /// Sequences preempted (blocks freed, recomputed later) for lack of KV memory.
    pub preemptions: IntCounterVec,
    /// Time from arrival to admission into a running slot.
    pub queue_time: HistogramVec,
    /// KV pool blocks by state (`in_use`, `cached`, `free`).
    pub kv_blocks: IntGaugeVec,
    /// Share of the KV pool's blocks held by running sequences.
    pub kv_usage: GaugeVec,
    /// All measured energy (requests and idle), by meter source.
    pub energy: CounterVec,
    /// The idle part of `energy`.
    pub idle_energy: CounterVec,
    /// FLOPs executed for requests.
    pub flops: CounterVec,
    /// Estimated emissions of all measured energy.
    pub co2: CounterVec,
    /// Joules per generated token, per request.
    pub energy_per_token: HistogramVec,
    /// Mean power over the last interval.
    pub power_watts: GaugeVec,
    /// GPU memory of this process.
    pub gpu_memory: GaugeVec,
    /// Parameters of the served model by component.
    pub model_parameters: GaugeVec,
    /// 1, labelled with the model, what it was pruned from, and its quantization.
    pub model_info: GaugeVec,
    /// Parameters of the model a pruned model was made from (absent if not pruned).
    pub pruned_from_parameters: GaugeVec,
    /// Bytes the served model's weights hold in memory.
    pub weight_bytes: GaugeVec,
}

impl Metrics {
    /// Registers every metric for the served model `model`.
    pub fn new(model: &str) -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["model"]).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram_with = |name: &str, help: &str, buckets: &[f64]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &["model"])
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let histogram = |name: &str, help: &str| histogram_with(name, help, LATENCY_BUCKETS);
        let fcounter = |name: &str, help: &str, labels: &[&str]| {
            let c = CounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let fgauge = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let m = Self {
            requests: counter(
                "greencode_request_success_total",
                "Finished requests by finish reason.",
                &["model", "finished_reason"],
            ),
            prompt_tokens: counter("greencode_prompt_tokens_total", "Prompt tokens processed.", &["model"]),
            generation_tokens: counter("greencode_generation_tokens_total", "Tokens generated.", &["model"]),
            running: gauge("greencode_num_requests_running", "Requests being generated."),
            waiting: gauge("greencode_num_requests_waiting", "Requests waiting for the engine."),
            ttft: histogram("greencode_time_to_first_token_seconds", "Time to first token."),
            itl: histogram(
                "greencode_inter_token_latency_seconds",
                "Time between consecutive tokens.",
            ),
            e2e: histogram("greencode_e2e_request_latency_seconds", "Whole-request latency."),
            rejected: counter(
                "greencode_requests_rejected_total",
                "Requests refused before generation, by HTTP status.",
                &["model", "status"],
            ),
            prefix_hit_tokens: counter(
                "greencode_prefix_cache_hit_tokens_total",
                "Prompt tokens reused from cached prefixes.",
                &["model"],
            ),
            spec_drafted: counter(
                "greencode_spec_decode_draft_tokens_total",
                "Draft tokens proposed by speculative decoding.",
                &["model", "drafter"],
            ),
            spec_accepted: counter(
                "greencode_spec_decode_accepted_tokens_total",
                "Draft tokens the model agreed with (each saved a decode step).",
                &["model", "drafter"],
            ),
            moved_tokens: counter(
                "greencode_cache_reuse_tokens_total",
                "Prompt tokens moved from other positions of cached sequences (keys re-rotated) instead of computed.",
                &["model"],
            ),
            prompt_tokens_computed: counter(
                "greencode_prompt_tokens_computed_total",
                "Tokens run through the model as prompt (not served from cached blocks).",
                &["model"],
            ),
            preemptions: counter(
                "greencode_num_preemptions_total",
                "Sequences preempted for lack of KV cache memory (recomputed later).",
                &["model"],
            ),
            queue_time: histogram(
                "greencode_request_queue_time_seconds",
                "Time from arrival to admission into the running batch.",
            ),
            kv_blocks: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "greencode_kv_cache_blocks",
                        "KV cache pool blocks by state (in_use, cached, free).",
                    ),
                    &["model", "state"],
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            kv_usage: fgauge(
                "greencode_kv_cache_usage_ratio",
                "Share of the KV cache pool held by running sequences.",
                &["model"],
            ),
            energy: fcounter(
                "greencode_energy_joules_total",
                "All measured energy (requests and idle), joules.",
                &["model", "source"],
            ),
            idle_energy: fcounter(
                "greencode_idle_energy_joules_total",
                "Energy measured between steps, joules.",
                &["model", "source"],
            ),
            flops: fcounter(
                "greencode_flops_total",
                "Floating-point operations executed for requests.",
                &["model"],
            ),
            co2: fcounter(
                "greencode_co2_grams_total",
                "Estimated emissions of all measured energy, grams CO2e.",
                &["model"],
            ),
            energy_per_token: histogram_with(
                "greencode_energy_per_token_joules",
                "Joules per generated token, per request.",
                ENERGY_PER_TOKEN_BUCKETS,
            ),
            power_watts: fgauge(
                "greencode_power_watts",
                "Mean power over the last interval, watts.",
                &["model"],
            ),
            gpu_memory: fgauge(
                "greencode_gpu_memory_used_bytes",
                "GPU memory used by this process.",
                &["model"],
            ),
            model_parameters: fgauge(
                "greencode_model_parameters",
                "Parameters of the served model by component (unique tensors).",
                &["model", "component"],
            ),
            model_info: fgauge(
                "greencode_model_info",
                "Constant 1, labelled with what the served model is.",
                &["model", "pruned_from", "quantization"],
            ),
            pruned_from_parameters: fgauge(
                "greencode_pruned_from_parameters",
                "Parameters of the model the served model was pruned from.",
                &["model", "pruned_from"],
            ),
            weight_bytes: fgauge(
                "greencode_model_weight_bytes",
                "Bytes the served model's weights hold in memory, as loaded.",
                &["model"],
            ),
            registry,
            model: model.to_owned(),
        };
        m.running.with_label_values(&[&m.model]).set(0);
        m.waiting.with_label_values(&[&m.model]).set(0);
        m
    }

    /// The same registry and series for another served model (registered
    /// with [`new`](Self::new) for the first).
    pub fn for_model(&self, model: &str) -> Self {
        let m = Self {
            model: model.to_owned(),
            ..self.clone()
        };
        m.running.with_label_values(&[&m.model]).set(0);
        m.waiting.with_label_values(&[&m.model]).set(0);
        m
    }

    /// The same registry with the label of what belongs to the whole
    /// process: empty (no `model` label), for a server of several models.
    pub fn process(&self) -> Self {
        Self {
            model: String::new(),
            ..self.clone()
        }
    }

    /// Adds measured energy (and its CO2); `idle` also books it as idle.
    pub fn add_energy(&self, source: &str, joules: f64, idle: bool, co2_grams: f64) {
        self.energy.with_label_values(&[&self.model, source]).inc_by(joules);
        if idle {
            self.idle_energy
                .with_label_values(&[&self.model, source])
                .inc_by(joules);
        }
        self.co2.with_label_values(&[&self.model]).inc_by(co2_grams);
    }

    /// Publishes the served model's parameter counts and identity.
    pub fn set_model_facts(&self, facts: &ModelFacts) {
        for (component, n) in facts.parameters {
            self.model_parameters
                .with_label_values(&[&self.model, component])
                .set(n as f64);
        }
        self.model_info
            .with_label_values(&[&self.model, &facts.pruned_from, facts.quantization])
            .set(1.0);
        self.weight_bytes
            .with_label_values(&[&self.model])
            .set(facts.weight_bytes as f64);
        if let Some(before) = facts.params_before_pruning {
            self.pruned_from_parameters
                .with_label_values(&[&self.model, &facts.pruned_from])
                .set(before as f64);
        }
    }

    /// The `model` label value.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Renders every metric in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}
