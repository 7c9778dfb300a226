//! `greencode bench editor`: an editor's completion traffic replayed over
//! loopback HTTP against any OpenAI-compatible server. Per held-out file
//! the cursor starts partway and moves down one line per keystroke; each
//! keystroke streams a completion of the file up to the cursor, and once
//! its first token has arrived the next keystroke is sent and the server
//! has taken it, the earlier stream is dropped (cancelled), as an IDE
//! aborts a completion the user typed past: the two requests overlap.
//! Reports the time to first token of every keystroke as p50/p99.

use std::io::BufRead;
use std::time::Instant;

use serde::Serialize;

use super::serve::{post_completion, Percentiles};

/// What to replay and where.
#[derive(Debug, Clone)]
pub struct EditorBenchConfig {
    /// Server base URL (`http://127.0.0.1:8080`).
    pub url: String,
    /// `model` field sent (None: omitted).
    pub model: Option<String>,
    /// The files typed into.
    pub files: Vec<String>,
    /// Keystrokes in all, spread evenly over the files.
    pub keystrokes: usize,
    /// Characters of a file before the cursor at its first keystroke.
    pub start_chars: usize,
    /// `max_tokens` of each completion (cancelled after its first token).
    pub max_tokens: usize,
}

/// What the replay measured.
#[derive(Debug, Clone, Serialize)]
pub struct EditorReport {
    /// Keystrokes sent.
    pub requests: usize,
    /// Keystrokes that got no first token.
    pub errors: usize,
    /// Time to first token over the keystrokes.
    pub ttft: Percentiles,
    /// Mean prompt length in characters.
    pub mean_prompt_chars: f64,
}

/// Prompts of the keystrokes: in each file, the text up to the end of a
/// line at or after `start_chars`, then one more line per keystroke.
pub fn keystroke_prompts(cfg: &EditorBenchConfig) -> Vec<String> {
    let per_file = cfg.keystrokes.div_ceil(cfg.files.len().max(1));
    let mut prompts = Vec::new();
    for text in &cfg.files {
        let mut cursor = cfg.start_chars.min(text.len());
        while !text.is_char_boundary(cursor) {
            cursor += 1;
        }
        for _ in 0..per_file {
            if prompts.len() == cfg.keystrokes {
                break;
            }
            match text[cursor..].find('\n') {
                Some(i) => cursor += i + 1,
                None => cursor = text.len(),
            }
            prompts.push(text[..cursor].to_owned());
        }
    }
    prompts
}

/// Streams one completion: once the server has taken it, `cancel` drops
/// the keystroke before (so the two overlap, as when an editor aborts a
/// request that is still running); returns the time to this one's first
/// token and its still open stream.
fn first_token(
    agent: &ureq::Agent,
    cfg: &EditorBenchConfig,
    prompt: &str,
    cancel: impl FnOnce(),
) -> Result<(f64, Box<dyn BufRead>), String> {
    let body = serde_json::json!({
        "prompt": prompt,
        "max_tokens": cfg.max_tokens,
        "temperature": 0,
        "stream": true,
    });
    let start = Instant::now();
    let mut reader = post_completion(agent, &cfg.url, cfg.model.as_deref(), body)?;
    cancel();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("the stream ended without a token".into());
        }
        if line.starts_with("data: ") && line.trim_end() != "data: [DONE]" {
            return Ok((start.elapsed().as_secs_f64(), Box::new(reader)));
        }
    }
}

/// Replays the keystrokes one after another, each cancelling the one before.
pub fn bench_editor(cfg: &EditorBenchConfig) -> EditorReport {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(300)))
        .build()
        .into();
    let prompts = keystroke_prompts(cfg);
    let mut ttfts = Vec::new();
    let mut errors = 0;
    let mut open = None;
    for p in &prompts {
        match first_token(&agent, cfg, p, || drop(open.take())) {
            Ok((t, stream)) => {
                ttfts.push(t);
                open = Some(stream);
            }
            Err(e) => {
                eprintln!("greencode: keystroke failed: {e}");
                errors += 1;
            }
        }
    }
    EditorReport {
        requests: prompts.len(),
        errors,
        ttft: Percentiles::of(ttfts),
        mean_prompt_chars: prompts.iter().map(|p| p.len()).sum::<usize>() as f64 / prompts.len().max(1) as f64,
    }
}
