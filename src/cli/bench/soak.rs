//! `greencode bench soak`: many short requests, some abandoned part-way,
//! checking for errors and memory growth.

use anyhow::{bail, Result};
use clap::Args;
use greencode::bench::server::ServerProcess;
use greencode::bench::soak::{rss_bytes, soak, SoakConfig};

use crate::cli::args::{Format, ModelArg};

#[derive(Args)]
pub struct SoakArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Server to load (default: start `greencode serve` on the model and
    /// report its memory before and after).
    #[arg(long)]
    url: Option<String>,
    /// Requests in all (after a warm-up of 10% more, at least 8 per client).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Fraction of requests abandoned part-way.
    #[arg(long, default_value_t = 0.3)]
    cancel: f64,
    /// Tokens asked per request.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// `greencode_num_requests_running` summed over models, from a /metrics page.
fn running_requests(url: &str) -> Option<f64> {
    let body = ureq::get(format!("{url}/metrics"))
        .call()
        .ok()?
        .into_body()
        .read_to_string()
        .ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with("greencode_num_requests_running"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

pub fn run(a: SoakArgs, threads: usize) -> Result<()> {
    if a.requests == 0 || a.clients == 0 || a.max_tokens == 0 || !(0.0..=1.0).contains(&a.cancel) {
        bail!("--requests, --clients and --max-tokens must be at least 1 and --cancel in [0, 1]");
    }
    let (server, url) = super::server_url(&a.url, &a.model, threads)?;
    let pid = server.as_ref().map(ServerProcess::pid);
    let mut cfg = SoakConfig {
        url: url.clone(),
        // Enough to reach steady state: every slot and kept prefix cache allocated.
        requests: (a.requests / 10).max(8 * a.clients),
        clients: a.clients,
        cancel_fraction: a.cancel,
        max_tokens: a.max_tokens,
        seed: a.seed.wrapping_add(1),
    };
    let warm = soak(&cfg);
    let settle = |what: &str| -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while running_requests(&url).is_some_and(|n| n > 0.0) {
            if std::time::Instant::now() > deadline {
                bail!("requests still running a minute after the {what}");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(())
    };
    settle("warm-up")?;
    let rss_before = pid.and_then(rss_bytes);
    cfg.requests = a.requests;
    cfg.seed = a.seed;
    let report = soak(&cfg);
    settle("soak")?;
    let rss_after = pid.and_then(rss_bytes);
    let obj = serde_json::json!({
        "report": report,
        "warm_up_errors": warm.errors,
        "running_after": running_requests(&url),
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
    });
    match a.format {
        Format::Json => println!("{obj}"),
        Format::Text => {
            println!(
                "{} requests from {} clients in {:.1} s: {} completed, {} abandoned on purpose, {} errors",
                report.requests, a.clients, report.seconds, report.completed, report.cancelled, report.errors
            );
            for e in &report.error_samples {
                println!("  error: {e}");
            }
            if let (Some(b), Some(f)) = (rss_before, rss_after) {
                let mib = |x: u64| x as f64 / (1 << 20) as f64;
                println!(
                    "server RSS: {:.1} MiB before, {:.1} MiB after ({:+.1} MiB)",
                    mib(b),
                    mib(f),
                    mib(f) - mib(b)
                );
            }
        }
    }
    if report.errors > 0 || warm.errors > 0 {
        bail!("{} requests failed", report.errors + warm.errors);
    }
    Ok(())
}
