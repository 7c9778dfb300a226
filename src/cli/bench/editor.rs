//! `greencode bench editor`: keystrokes on held-out files, each streaming
//! a completion and cancelling the one before, against a server (started
//! here on the model when no `--url` is given).

use anyhow::{bail, Result};
use clap::Args;
use greencode::bench::editor::{bench_editor, EditorBenchConfig};
use greencode::data::corpus;

use crate::cli::args::{Format, ModelArg};

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
    /// Keystrokes in all.
    #[arg(long, default_value_t = 50)]
    keystrokes: usize,
    /// Held-out files typed into (CPython's standard library, the eval split).
    #[arg(long, default_value_t = 5)]
    files: usize,
    /// Characters before the cursor at a file's first keystroke.
    #[arg(long, default_value_t = 1500)]
    start_chars: usize,
    /// `max_tokens` of each completion (llama.vscode's default `n_predict`).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(a: BenchEditorArgs, threads: usize) -> Result<()> {
    if a.keystrokes == 0 || a.files == 0 || a.max_tokens == 0 {
        bail!("--keystrokes, --files and --max-tokens must be at least 1");
    }
    // Files long enough to type a line per keystroke past the start.
    let need = a.start_chars + 80 * a.keystrokes.div_ceil(a.files);
    let dir = corpus::stdlib_dir()?;
    let files: Vec<String> = corpus::eval_files(&dir, corpus::EVAL_FILES)?
        .iter()
        .filter_map(|f| corpus::read_text(f).ok())
        .filter(|t| t.len() >= need)
        .take(a.files)
        .collect();
    if files.len() < a.files {
        bail!(
            "only {} held-out files in {} have {need} characters",
            files.len(),
            dir.display()
        );
    }
    let (_server, url) = super::server_url(&a.url, &a.model, threads)?;
    let report = bench_editor(&EditorBenchConfig {
        url,
        model: a.model_name,
        files,
        keystrokes: a.keystrokes,
        start_chars: a.start_chars,
        max_tokens: a.max_tokens,
    });
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => println!(
            "{} keystrokes ({} errors), prompts of {:.0} characters on average: time to first token p50 {:.1} ms, p99 {:.1} ms",
            report.requests, report.errors, report.mean_prompt_chars, report.ttft.p50_ms, report.ttft.p99_ms
        ),
    }
    Ok(())
}
