//! `greencode bench serve`: a load generator over loopback HTTP for any
//! OpenAI-compatible server. Each client sends streaming completions one
//! after another; per level of concurrency it reports aggregate generated
//! tokens per second, time to first token and inter-token latency
//! percentiles, and errors.

use std::io::BufRead;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What to send and where.
#[derive(Debug, Clone)]
pub struct ServeBenchConfig {
    /// Server base URL (`http://127.0.0.1:8080`).
    pub url: String,
    /// `model` field sent (None: omitted).
    pub model: Option<String>,
    /// The prompt text.
    pub prompt: String,
    /// `max_tokens` per request.
    pub new_tokens: usize,
    /// Concurrency levels.
    pub clients: Vec<usize>,
    /// Requests each client sends per level.
    pub requests_per_client: usize,
    /// Token id to ban so generation runs to `max_tokens` (the model's EOS).
    pub ban_token: Option<u32>,
}

/// Percentiles of a latency, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

impl Percentiles {
    /// The median and 99th percentile of `v` (seconds), in milliseconds.
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self {
                p50_ms: f64::NAN,
                p99_ms: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] * 1e3;
        Self {
            p50_ms: at(0.5),
            p99_ms: at(0.99),
        }
    }
}

/// Results at one concurrency level.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    /// Concurrent clients.
    pub clients: usize,
    /// Requests completed.
    pub requests: usize,
    /// Requests that failed.
    pub errors: usize,
    /// Generated tokens over all requests (the usage chunk's count, else chunks with text).
    pub tokens: usize,
    /// Generated tokens per second over the level's wall time.
    pub tokens_per_second: f64,
    /// Time to first token.
    pub ttft: Percentiles,
    /// Time between tokens.
    pub itl: Percentiles,
    /// Wall time of the level, seconds.
    pub seconds: f64,
}

struct One {
    ttft: f64,
    itls: Vec<f64>,
    tokens: usize,
}

/// POSTs the JSON `body` to `route` of the server at `url`; an error for
/// anything but 200.
pub(crate) fn post_json(
    agent: &ureq::Agent,
    url: &str,
    route: &str,
    body: &serde_json::Value,
) -> Result<ureq::http::Response<ureq::Body>, String> {
    let resp = agent
        .post(format!("{}{route}", url.trim_end_matches('/')))
        .header("content-type", "application/json")
        .send(body.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    if resp.status().as_u16() != 200 {
        return Err(format!("HTTP {}", resp.status()));
    }
    Ok(resp)
}

/// POSTs a completion `body` (with `model` when given) to the server at
/// `url` and returns the answer's body, read as it arrives; an error for
/// anything but 200.
pub(crate) fn post_completion(
    agent: &ureq::Agent,
    url: &str,
    model: Option<&str>,
    mut body: serde_json::Value,
) -> Result<std::io::BufReader<impl std::io::Read>, String> {
    if let Some(m) = model {
        body["model"] = m.into();
    }
    let resp = post_json(agent, url, "/v1/completions", &body)?;
    Ok(std::io::BufReader::new(resp.into_body().into_reader()))
}

/// One streaming request; `tag` makes its prompt unique, so no request is
/// served from another's cached prefix.
fn one_request(agent: &ureq::Agent, cfg: &ServeBenchConfig, tag: &str) -> Result<One, String> {
    let mut body = serde_json::json!({
        "prompt": format!("# {tag}\n{}", cfg.prompt),
        "max_tokens": cfg.new_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(id) = cfg.ban_token {
        body["logit_bias"] = serde_json::json!({ id.to_string(): -100 });
    }
    let start = Instant::now();
    let reader = post_completion(agent, &cfg.url, cfg.model.as_deref(), body)?;
    let mut last: Option<Instant> = None;
    let mut one = One {
        ttft: f64::NAN,
        itls: Vec::new(),
        tokens: 0,
    };
    let mut usage_tokens = None;
    for line in reader.lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if v.get("error").is_some() {
            return Err(v["error"].to_string());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            usage_tokens = Some(n as usize);
        }
        let text = v["choices"][0]["text"].as_str().unwrap_or("");
        if text.is_empty() {
            continue;
        }
        let now = Instant::now();
        match last {
            None => one.ttft = (now - start).as_secs_f64(),
            Some(t) => one.itls.push((now - t).as_secs_f64()),
        }
        last = Some(now);
        one.tokens += 1;
    }
    // The server's own count when it sends usage (a chunk may carry no text).
    if let Some(n) = usage_tokens {
        one.tokens = n;
    }
    Ok(one)
}

/// Runs every concurrency level in turn.
pub fn bench_serve(cfg: &ServeBenchConfig, mut progress: impl FnMut(&LevelReport)) -> Vec<LevelReport> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into();
    // One unmeasured request first: the first request a server sees pays
    // for page faults and allocations no later one does.
    let _ = one_request(&agent, cfg, "warm-up");
    let mut reports = Vec::new();
    for &clients in &cfg.clients {
        let start = Instant::now();
        let results: Vec<Result<One, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    let agent = agent.clone();
                    scope.spawn(move || {
                        (0..cfg.requests_per_client)
                            .map(|r| one_request(&agent, cfg, &format!("level {clients} client {c} request {r}")))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        let seconds = start.elapsed().as_secs_f64();
        let ok: Vec<&One> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        let tokens: usize = ok.iter().map(|o| o.tokens).sum();
        let report = LevelReport {
            clients,
            requests: ok.len(),
            errors: results.len() - ok.len(),
            tokens,
            tokens_per_second: tokens as f64 / seconds,
            ttft: Percentiles::of(ok.iter().map(|o| o.ttft).filter(|t| t.is_finite()).collect()),
            itl: Percentiles::of(ok.iter().flat_map(|o| o.itls.iter().copied()).collect()),
            seconds,
        };
        progress(&report);
        reports.push(report);
    }
    reports
}
