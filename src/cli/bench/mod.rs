//! `greencode bench`: one file per benchmark (`generate`, with its batched
//! mode; `serve`, `editor` and `soak` against a server; `kernels`;
//! `verify`, a speculative verify step's cost).

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use greencode::bench::server::ServerProcess;

use super::args::{model_dir, ModelArg};

mod editor;
mod generate;
mod kernels;
mod serve;
mod soak;
mod verify;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time to first token and decode tokens/s at batch 1.
    Generate(generate::BenchGenerateArgs),
    /// Load an OpenAI-compatible server with concurrent streaming clients.
    Serve(serve::BenchServeArgs),
    /// Editor keystrokes on held-out files, each cancelling the completion before: time to first token.
    Editor(editor::BenchEditorArgs),
    /// Many short requests, some abandoned part-way: errors and memory growth.
    Soak(soak::SoakArgs),
    /// Check greencode's GPU kernels against the candle path and time both.
    Kernels(kernels::BenchKernelsArgs),
    /// A speculative verify step's cost by row count, and the speed-up it allows.
    Verify(verify::BenchVerifyArgs),
}

/// Runs one `bench` subcommand with `threads` compute threads.
pub fn run(command: BenchCommand, threads: usize) -> Result<()> {
    match command {
        BenchCommand::Generate(a) => generate::run(a, threads),
        BenchCommand::Serve(a) => serve::run(a, threads),
        BenchCommand::Editor(a) => editor::run(a, threads),
        BenchCommand::Soak(a) => soak::run(a, threads),
        BenchCommand::Kernels(a) => kernels::run(a),
        BenchCommand::Verify(a) => verify::run(a, threads),
    }
}

/// The server a load generator talks to: `url` when given, else
/// `greencode serve` (this executable) started on the model on a free
/// port, which lives as long as the returned process handle.
fn server_url(url: &Option<String>, model: &ModelArg, threads: usize) -> Result<(Option<ServerProcess>, String)> {
    if let Some(u) = url {
        return Ok((None, u.clone()));
    }
    let mut cmd = std::process::Command::new(std::env::current_exe().context("finding this executable")?);
    cmd.args(["--threads", &threads.to_string(), "serve", "--port", "0", "--model"])
        .arg(model_dir(model)?);
    let server = ServerProcess::start(cmd, Duration::from_secs(120))?;
    let url = server.url().to_owned();
    Ok((Some(server), url))
}
