//! Every Prometheus metric greencode exports, defined in one place: names,
//! help texts and buckets live here and nowhere else. All series carry a
//! `model` label.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// Latency buckets (seconds): vLLM's time-to-first-token buckets with finer
/// steps below 5 ms, where CPU decode steps fall.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.003, 0.004, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

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
        let histogram = |name: &str, help: &str| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                &["model"],
            )
            .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
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
            registry,
            model: model.to_owned(),
        };
        m.running.with_label_values(&[&m.model]).set(0);
        m.waiting.with_label_values(&[&m.model]).set(0);
        m
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
