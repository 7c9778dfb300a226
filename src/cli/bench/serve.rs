//! `greencode bench serve`: concurrent streaming clients against a server
//! (started here on the model when no `--url` is given).

use anyhow::{bail, Result};
use clap::Args;
use greencode::bench::serve::{bench_serve, ServeBenchConfig};
use greencode::generate::loaded::read_tokenizer;

use crate::cli::args::{model_dir, Format, ModelArg};

#[derive(Args)]
pub struct BenchServeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Server to load (default: start `greencode serve` on the model, on a free port).
    #[arg(long)]
    url: Option<String>,
    /// `model` name to send (default: none).
    #[arg(long)]
    model_name: Option<String>,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    clients: Vec<usize>,
    /// Prompt length in tokens (of the model's tokenizer).
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Requests each client sends per level.
    #[arg(long, default_value_t = 2)]
    requests_per_client: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(a: BenchServeArgs, threads: usize) -> Result<()> {
    if a.clients.is_empty() || a.clients.contains(&0) || a.new_tokens == 0 || a.requests_per_client == 0 {
        bail!("--clients, --new-tokens and --requests-per-client must be at least 1");
    }
    let dir = model_dir(&a.model)?;
    // Only the tokenizer is needed here: the weights are never opened.
    let tok = read_tokenizer(&dir)?;
    let prompt = tok.decode(&greencode::bench::bench_prompt(&tok, a.prompt_tokens)?, false)?;
    let (_server, url) = super::server_url(&a.url, &a.model, threads)?;
    let cfg = ServeBenchConfig {
        url,
        model: a.model_name,
        prompt,
        new_tokens: a.new_tokens,
        clients: a.clients,
        requests_per_client: a.requests_per_client,
        ban_token: tok.eos_ids().first().copied(),
    };
    let show = a.format == Format::Text;
    if show {
        println!("| clients | requests | errors | tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |");
        println!("|---|---|---|---|---|---|");
    }
    let reports = bench_serve(&cfg, |r| {
        if show {
            println!(
                "| {} | {} | {} | {:.1} | {:.0} / {:.0} | {:.1} / {:.1} |",
                r.clients,
                r.requests,
                r.errors,
                r.tokens_per_second,
                r.ttft.p50_ms,
                r.ttft.p99_ms,
                r.itl.p50_ms,
                r.itl.p99_ms
            );
        }
    });
    if a.format == Format::Json {
        println!("{}", serde_json::to_string(&reports)?);
    }
    Ok(())
}
