//! `greencode generate`: one completion (or an infill with `--suffix`)
//! streamed to stdout, or one JSON object with `--format json`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use greencode::generate::sampling::SamplingParams;
use greencode::generate::{generate_with, Flow, GenerationRequest};
use greencode::tokenizer::TextStream;

use super::args::{open_model_on, DeviceArg, Format, ModelArg, RunQuantArg, SpeculateArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    device: DeviceArg,
    #[command(flatten)]
    run_quant: RunQuantArg,
    #[command(flatten)]
    speculate: SpeculateArgs,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Text after the cursor: generate the middle (fill-in-the-middle).
    #[arg(long)]
    suffix: Option<String>,
    /// Most tokens to generate (1 up to the model's context length).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    top_k: usize,
    /// Random seed (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// Output: streamed text, or one JSON object at the end.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

fn read_prompt(a: &GenerateArgs) -> Result<String> {
    match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("{}", f.display())),
        (None, None) => Ok(String::new()),
    }
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let prompt = read_prompt(&a)?;
    if prompt.is_empty() && a.suffix.is_none() {
        bail!("the prompt is empty: give --prompt, --prompt-file, or --suffix for an infill");
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be a number ≥ 0, got {}", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let p = open_model_on(&a.model, a.device.device, a.run_quant.q8())?;
    let context = p.model.config().max_position_embeddings;
    if a.max_tokens > context {
        // As the server answers a request asking for more.
        bail!(
            "--max-tokens {} exceeds the model's context length {context}",
            a.max_tokens
        );
    }
    let tok = &p.tokenizer;
    let mut stop_ids = tok.eos_ids().to_vec();
    let prompt_ids = match &a.suffix {
        Some(suffix) => {
            let ids = tok.fim_prompt(&prompt, suffix)?;
            stop_ids.extend(tok.fim().map(|f| f.stop.clone()).unwrap_or_default());
            ids
        }
        None => tok.encode(&prompt)?,
    };
    let mut req = GenerationRequest::new(
        prompt_ids,
        a.max_tokens,
        SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            seed: a.seed,
            ..SamplingParams::default()
        },
    );
    req.stop_ids = stop_ids;
    req.speculate_k = a.speculate.k();
    let mut stream = TextStream::new();
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let draft = a.speculate.draft_model(tok)?;
    let out = generate_with(&p.model, draft.as_ref(), &req, |id, _| {
        if a.format == Format::Text {
            if let Ok(Some(piece)) = stream.push(tok, id) {
                if let Err(e) = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush()) {
                    write_err = Some(e);
                    return Flow::Stop;
                }
            }
        }
        Flow::Continue
    })?;
    if let Some(e) = write_err {
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
        return Ok(());
    }
    match a.format {
        Format::Text => writeln!(stdout)?,
        Format::Json => {
            let text = tok.decode(&out.token_ids, true)?;
            let obj = serde_json::json!({
                "token_ids": out.token_ids,
                "text": text,
                "finish_reason": out.finish_reason.as_str(),
                "weights": p.model.weight_format(),
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.token_ids.len(),
                "tokens_per_second": out.decode_tokens_per_second(),
                "time_to_first_token_ms": out.time_to_first_token.as_secs_f64() * 1e3,
                "drafted_tokens": out.drafted,
                "accepted_draft_tokens": out.accepted,
            });
            writeln!(stdout, "{obj}")?;
        }
    }
    Ok(())
}
