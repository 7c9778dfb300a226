//! `greencode bench soak`: many short requests from concurrent clients, a
//! share of them abandoned part-way (a stream dropped after a few chunks, or
//! a plain request given up on before its answer), to check that a server
//! stays correct and its memory flat under IDE-like traffic. Every outcome
//! other than a completed answer or an intended abandonment is an error.

use std::io::BufRead;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;

/// What to send.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Server base URL.
    pub url: String,
    /// Requests in all.
    pub requests: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Fraction of requests abandoned part-way.
    pub cancel_fraction: f64,
    /// Tokens asked per request.
    pub max_tokens: usize,
    /// Random seed (which requests are abandoned, and when).
    pub seed: u64,
}

/// How the soak went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakReport {
    /// Requests sent.
    pub requests: usize,
    /// Answers received in full.
    pub completed: usize,
    /// Requests abandoned on purpose.
    pub cancelled: usize,
    /// Anything else (HTTP errors, broken streams, bad JSON).
    pub errors: usize,
    /// The first few error messages.
    pub error_samples: Vec<String>,
    /// Wall time.
    pub seconds: f64,
}

enum Outcome {
    Completed,
    Cancelled,
    Error(String),
}

/// Runs the soak and reports its outcomes.
pub fn soak(cfg: &SoakConfig) -> SoakReport {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cfg.clients.max(1))
            .map(|c| {
                let next = &next;
                s.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= cfg.requests {
                            break;
                        }
                        out.push(one(cfg, i, &mut rng));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut r = SoakReport {
        requests: outcomes.len(),
        seconds: start.elapsed().as_secs_f64(),
        ..SoakReport::default()
    };
    for o in outcomes {
        match o {
            Outcome::Completed => r.completed += 1,
            Outcome::Cancelled => r.cancelled += 1,
            Outcome::Error(e) => {
                r.errors += 1;
                if r.error_samples.len() < 5 {
                    r.error_samples.push(e);
                }
            }
        }
    }
    r
}

fn one(cfg: &SoakConfig, i: usize, rng: &mut impl Rng) -> Outcome {
    let stream = rng.random_bool(0.5);
    let cancel = rng.random_bool(cfg.cancel_fraction.clamp(0.0, 1.0));
    let body = serde_json::json!({
        "prompt": format!("# request {i}\ndef handler_{i}(event):\n    "),
        "max_tokens": cfg.max_tokens,
        "temperature": 0.7,
        "seed": i,
        "stream": stream,
    });
    let url = format!("{}/v1/completions", cfg.url.trim_end_matches('/'));
    // A plain request is abandoned by giving up before its answer can arrive.
    let timeout = if cancel && !stream {
        Duration::from_millis(rng.random_range(5..40))
    } else {
        Duration::from_secs(300)
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let resp = match agent
        .post(&url)
        .header("content-type", "application/json")
        .send(body.to_string().as_bytes())
    {
        Ok(r) => r,
        Err(ureq::Error::Timeout(_)) if cancel => return Outcome::Cancelled,
        Err(e) => return Outcome::Error(format!("request {i}: {e}")),
    };
    if resp.status().as_u16() != 200 {
        return Outcome::Error(format!("request {i}: HTTP {}", resp.status()));
    }
    let mut reader = std::io::BufReader::new(resp.into_body().into_reader());
    if !stream {
        let mut text = String::new();
        return match std::io::Read::read_to_string(&mut reader, &mut text) {
            Ok(_) => match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(v) if v["choices"][0]["text"].is_string() => Outcome::Completed,
                Ok(v) => Outcome::Error(format!("request {i}: no text in {v}")),
                Err(e) => Outcome::Error(format!("request {i}: bad JSON: {e}")),
            },
            Err(_) if cancel => Outcome::Cancelled,
            Err(e) => Outcome::Error(format!("request {i}: {e}")),
        };
    }
    let drop_after = if cancel { Some(rng.random_range(1..4)) } else { None };
    let mut chunks = 0;
    for line in reader.lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) => return Outcome::Error(format!("request {i}: stream broke: {e}")),
        };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            // A short answer can end before the planned disconnect.
            return if cancel { Outcome::Cancelled } else { Outcome::Completed };
        }
        if let Err(e) = serde_json::from_str::<serde_json::Value>(data) {
            return Outcome::Error(format!("request {i}: bad chunk: {e}"));
        }
        chunks += 1;
        if drop_after == Some(chunks) {
            return Outcome::Cancelled; // dropping the reader closes the connection
        }
    }
    Outcome::Error(format!("request {i}: stream ended without [DONE]"))
}

/// Resident memory of process `pid` in bytes (Linux), if readable.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(&pid.to_string(), "VmRSS:")
}

/// The most resident memory this process has had, in bytes (Linux's
/// high-water mark), if readable.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("self", "VmHWM:")
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
