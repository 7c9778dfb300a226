//! `greencode bench editor`: keystrokes on held-out files in an editor's
//! own request shape (`--client`), each cancelling the one before, against
//! a server (started here on the model when no `--url` is given).

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use greencode::bench::editor::{bench_editor, EditorBenchConfig, EditorClient};
use greencode::data::corpus;

use crate::cli::args::{Format, ModelArg};

/// `--client`.
#[derive(Clone, Copy, ValueEnum)]
enum ClientArg {
    /// Continue's autocomplete (OpenAI-compatible provider): streamed `/v1/completions`.
    Continue,
    /// llama.vscode: `/infill` with a ring buffer of other files' chunks and warm-ups.
    LlamaVscode,
}

#[derive(Args)]
pub struct BenchEditorArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Server to replay against (default: start `greencode serve` on the model, on a free port).
    #[arg(long)]
    url: Option<String>,
    /// `model` name to send (default: none).
    #[arg(long)]
    model_name: Option<String>,
    /// Whose requests to replay.
    #[arg(long, value_enum, default_value_t = ClientArg::Continue)]
    client: ClientArg,
    /// Keystrokes in all (one per character typed).
    #[arg(long, default_value_t = 50)]
    keystrokes: usize,
    /// Held-out files typed into (CPython's standard library, the eval split).
    #[arg(long, default_value_t = 5)]
    files: usize,
    /// Characters before the cursor at a file's first keystroke.
    #[arg(long, default_value_t = 1500)]
    start_chars: usize,
    /// Most tokens of each completion (llama.vscode's default `n_predict`).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Chunks in llama.vscode's ring buffer (16 lines each; 4 fit tiny-coder's context).
    #[arg(long, default_value_t = 4)]
    ring_chunks: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// Lines of a ring-buffer chunk (llama.vscode's `ring_chunk_size`, scaled to the context).
const CHUNK_LINES: usize = 16;

pub fn run(a: BenchEditorArgs, threads: usize) -> Result<()> {
    if a.keystrokes == 0 || a.files == 0 || a.max_tokens == 0 {
        bail!("--keystrokes, --files and --max-tokens must be at least 1");
    }
    let dir = corpus::stdlib_dir()?;
    let all: Vec<(String, String)> = corpus::eval_files(&dir, corpus::EVAL_FILES)?
        .iter()
        .filter_map(|f| {
            let name = f.strip_prefix(&dir).unwrap_or(f).display().to_string();
            corpus::read_text(f).ok().map(|t| (name, t))
        })
        .collect();
    // Files long enough to type a line's worth of characters per keystroke past the start.
    let need = a.start_chars + 2 * a.keystrokes.div_ceil(a.files) + 200;
    let (files, others): (Vec<_>, Vec<_>) = all.into_iter().partition(|(_, t)| t.len() >= need);
    let mut files = files;
    let mut others = others;
    others.extend(files.split_off(a.files.min(files.len())));
    if files.len() < a.files {
        bail!(
            "only {} held-out files in {} have {need} characters",
            files.len(),
            dir.display()
        );
    }
    // The ring's chunks: 16-line pieces of the other held-out files, in turn.
    let chunks: Vec<(String, String)> = others
        .iter()
        .flat_map(|(name, text)| {
            let lines: Vec<&str> = text.lines().collect();
            lines
                .chunks(CHUNK_LINES)
                .filter(|c| c.len() == CHUNK_LINES)
                .take(2)
                .map(|c| (name.clone(), c.iter().map(|l| format!("{l}\n")).collect()))
                .collect::<Vec<_>>()
        })
        .collect();
    let (_server, url) = super::server_url(&a.url, &a.model, threads)?;
    let report = bench_editor(&EditorBenchConfig {
        url,
        model: a.model_name,
        client: match a.client {
            ClientArg::Continue => EditorClient::Continue,
            ClientArg::LlamaVscode => EditorClient::LlamaVscode,
        },
        files,
        chunks,
        ring_chunks: a.ring_chunks,
        keystrokes: a.keystrokes,
        start_chars: a.start_chars,
        max_tokens: a.max_tokens,
    });
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => {
            let ms =
                |p: &greencode::bench::serve::Percentiles| format!("p50 {:.1} ms, p99 {:.1} ms", p.p50_ms, p.p99_ms);
            println!(
                "{} ({}): {} keystrokes, {} warm-ups, {} errors, prompts of {:.0} characters on average",
                report.client,
                report.client_source,
                report.requests,
                report.warmups,
                report.errors,
                report.mean_prompt_chars
            );
            if let Some(t) = &report.ttft {
                println!("time to first token: {}", ms(t));
            }
            println!("time to first line: {}", ms(&report.first_line));
            if let (Some(s), Some(n)) = (report.cached_share, report.mean_prompt_tokens) {
                println!(
                    "cached share of prompt tokens: {:.1}% (of {n:.0} on average)",
                    s * 100.0
                );
            }
            match report.joules_per_accepted {
                Some(j) => println!("{} accepted completions, {j:.2} J each", report.accepted),
                None => println!(
                    "{} accepted completions (the server reports no energy)",
                    report.accepted
                ),
            }
        }
    }
    Ok(())
}
