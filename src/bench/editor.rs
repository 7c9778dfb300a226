//! `greencode bench editor`: an editor's completion traffic replayed over
//! loopback HTTP against greencode or any server that speaks the client's
//! protocol (llama-server among them). In each held-out file a cursor
//! types lines character by character; every keystroke sends a completion
//! request in the client's own shape, and the request before it is
//! cancelled (its stream dropped once the new one is on its way, so the
//! two overlap as in an IDE). Two clients, their bodies as in
//! `tests/fixtures/editors/` (sources named there):
//!
//! - `continue` (Continue's autocomplete against an OpenAI-compatible
//!   provider): a Qwen FIM prompt it builds itself, streamed from
//!   `/v1/completions` with its dozen stop strings; the prefix keeps whole
//!   lines within a budget (the first lines drop as the cursor moves on),
//!   as Continue prunes it.
//! - `llama-vscode` (llama.vscode): `/infill`, not streamed, with 32 lines
//!   before the cursor line, 8 after, the line typed so far and a ring
//!   buffer of 16-line chunks from other held-out files (4 of them, sized
//!   to tiny-coder's 1,024-token context). When a line is finished the
//!   ring takes a new chunk and drops its oldest, and the client sends its
//!   warm-up request (`n_predict: 0`) with the new ring, as llama.vscode
//!   does between bursts of typing.
//!
//! Reports time to first token (streamed clients) and to the first line
//! (the answer, for clients that do not stream) p50/p99; the share of
//! prompt tokens served from the cache (from the answers' `timings`, or
//! `usage`); errors; and, against greencode, joules per accepted
//! completion (the completion at a line's end is read whole and counts as
//! accepted; cancelled ones cost energy too).

use std::io::BufRead;
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};

use super::serve::{post_json, Percentiles};

/// Which editor's requests to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditorClient {
    /// Continue's autocomplete, OpenAI-compatible provider.
    Continue,
    /// llama.vscode (llama.vim sends the same body).
    LlamaVscode,
}

impl EditorClient {
    /// The name `--client` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Continue => "continue",
            Self::LlamaVscode => "llama-vscode",
        }
    }

    /// Where its request shape was read.
    pub fn source(self) -> &'static str {
        match self {
            Self::Continue => {
                "continuedev/continue core/llm/llms/OpenAI.ts@732eb248, core/autocomplete/CompletionProvider.ts@3a156a86"
            }
            Self::LlamaVscode => "ggml-org/llama.vscode@351c26ea src/llama-server.ts",
        }
    }
}

/// Continue's stop strings for Qwen FIM templates (its `getStopTokens`).
const CONTINUE_STOPS: [&str; 12] = [
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<|im_start|>",
    "<|im_end|>",
    "/src/",
    "#- coding: utf-8",
    "```",
];

/// Characters of prefix and suffix Continue's prompt keeps (whole lines),
/// sized to tiny-coder's context.
const CONTINUE_PREFIX_CHARS: usize = 1800;
const CONTINUE_SUFFIX_CHARS: usize = 600;

/// Lines before and after the cursor llama.vscode sends (sized to the context).
const VSCODE_PREFIX_LINES: usize = 32;
const VSCODE_SUFFIX_LINES: usize = 8;

/// What to replay and where.
#[derive(Debug, Clone)]
pub struct EditorBenchConfig {
    /// Server base URL (`http://127.0.0.1:8080`).
    pub url: String,
    /// `model` field sent (None: omitted).
    pub model: Option<String>,
    /// Whose requests.
    pub client: EditorClient,
    /// The files typed into: name and text.
    pub files: Vec<(String, String)>,
    /// Chunks of other files for llama.vscode's ring buffer, in the order they enter it.
    pub chunks: Vec<(String, String)>,
    /// Chunks the ring holds.
    pub ring_chunks: usize,
    /// Keystrokes in all, spread evenly over the files.
    pub keystrokes: usize,
    /// Characters of a file before the cursor at its first keystroke.
    pub start_chars: usize,
    /// Most tokens of each completion.
    pub max_tokens: usize,
}

/// What the replay measured.
#[derive(Debug, Clone, Serialize)]
pub struct EditorReport {
    /// `--client`.
    pub client: &'static str,
    /// Where the client's request shape was read.
    pub client_source: &'static str,
    /// Keystrokes sent.
    pub requests: usize,
    /// Keystrokes (and warm-ups) that failed.
    pub errors: usize,
    /// Warm-up requests sent (llama.vscode's ring updates).
    pub warmups: usize,
    /// Time to first token over the keystrokes (streamed clients).
    pub ttft: Option<Percentiles>,
    /// Time to the first line of the completion (the whole answer, for
    /// clients that do not stream).
    pub first_line: Percentiles,
    /// Prompt tokens served from the cache over the answers read whole.
    pub cached_share: Option<f64>,
    /// Mean prompt tokens of those answers, as the server counted them
    /// (servers cut context differently to fit).
    pub mean_prompt_tokens: Option<f64>,
    /// Completions read whole (accepted).
    pub accepted: usize,
    /// Energy the server booked to requests during the replay, per accepted
    /// completion (greencode's `/metrics`; None for a server without them).
    pub joules_per_accepted: Option<f64>,
    /// Mean prompt length in characters (what the client sent as context).
    pub mean_prompt_chars: f64,
}

/// One keystroke: the file, where the cursor is, and whether it finishes a line.
#[derive(Debug, Clone, PartialEq)]
pub struct Keystroke {
    /// Index into the files.
    pub file: usize,
    /// Byte offset of the cursor (after the typed character).
    pub cursor: usize,
    /// The line is typed up to its end: the user takes this completion.
    pub line_end: bool,
}

/// The keystrokes: in each file, from the first line start at or after
/// `start_chars`, one per character of the lines that follow.
pub fn keystrokes(cfg: &EditorBenchConfig) -> Vec<Keystroke> {
    let per_file = cfg.keystrokes.div_ceil(cfg.files.len().max(1));
    let mut out = Vec::new();
    for (file, (_, text)) in cfg.files.iter().enumerate() {
        let mut cursor = cfg.start_chars.min(text.len());
        cursor = text[cursor..].find('\n').map_or(text.len(), |i| cursor + i + 1);
        let mut typed = 0;
        while typed < per_file && out.len() < cfg.keystrokes && cursor < text.len() {
            let c = text[cursor..].chars().next().expect("inside the text");
            if c == '\n' {
                cursor += 1; // the newline itself is no completion request
                continue;
            }
            cursor += c.len_utf8();
            typed += 1;
            let line_end = text[cursor..].starts_with('\n');
            out.push(Keystroke {
                file,
                cursor,
                line_end: line_end || typed == per_file,
            });
        }
    }
    out
}

/// The text of lines `lines` of `text` (each with its newline).
fn line_span(lines: &[&str], from: usize, to: usize) -> String {
    lines[from.min(lines.len())..to.min(lines.len())]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Continue's prompt at a keystroke: `<|fim_prefix|>`, the file's path as
/// a comment, the prefix (whole lines within the budget, then the line so
/// far), `<|fim_suffix|>`, the suffix (whole lines within the budget),
/// `<|fim_middle|>`.
fn continue_body(cfg: &EditorBenchConfig, k: &Keystroke) -> Value {
    let (name, text) = &cfg.files[k.file];
    let line_start = text[..k.cursor].rfind('\n').map_or(0, |i| i + 1);
    let before: Vec<&str> = text[..line_start].lines().collect();
    // Drop lines from the top while over the budget (the start holds still
    // between keystrokes, so the server can keep its cached prefix).
    let mut first = 0;
    let mut kept: usize = before.iter().map(|l| l.len() + 1).sum();
    while kept > CONTINUE_PREFIX_CHARS && first < before.len() {
        kept -= before[first].len() + 1;
        first += 1;
    }
    let prefix = format!(
        "{}{}",
        line_span(&before, first, before.len()),
        &text[line_start..k.cursor]
    );
    let line_end = text[k.cursor..].find('\n').map_or(text.len(), |i| k.cursor + i);
    let mut suffix = String::new();
    for l in text[line_end..].lines().skip(1) {
        if suffix.len() + l.len() + 1 > CONTINUE_SUFFIX_CHARS {
            break;
        }
        suffix.push_str(l);
        suffix.push('\n');
    }
    let mut body = json!({
        "max_tokens": cfg.max_tokens,
        "temperature": 0.01,
        "stream": true,
        "stop": CONTINUE_STOPS,
        "prompt": format!("<|fim_prefix|>\n# {name}\n{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"),
        // Not Continue's: lets the replay read cached tokens from the last chunk.
        "stream_options": {"include_usage": true},
    });
    if let Some(m) = &cfg.model {
        body["model"] = m.as_str().into();
    }
    body
}

/// llama.vscode's ring buffer entries.
fn ring_extra(ring: &[(String, String)]) -> Value {
    ring.iter()
        .map(|(f, t)| json!({"text": t, "time": 1_747_238_400_123u64, "filename": f}))
        .collect()
}

/// llama.vscode's `/infill` body at a keystroke.
fn vscode_body(cfg: &EditorBenchConfig, k: &Keystroke, ring: &[(String, String)]) -> Value {
    let (_, text) = &cfg.files[k.file];
    let line_start = text[..k.cursor].rfind('\n').map_or(0, |i| i + 1);
    let before: Vec<&str> = text[..line_start].lines().collect();
    let line_end = text[k.cursor..].find('\n').map_or(text.len(), |i| k.cursor + i);
    let after: Vec<&str> = text[line_end..].lines().skip(1).collect();
    let typed = &text[line_start..k.cursor];
    let indent = typed.len() - typed.trim_start().len();
    let mut body = json!({
        "id_slot": 0,
        "input_prefix": line_span(&before, before.len().saturating_sub(VSCODE_PREFIX_LINES), before.len()),
        "input_suffix": line_span(&after, 0, VSCODE_SUFFIX_LINES),
        "input_extra": ring_extra(ring),
        "prompt": typed,
        "n_predict": cfg.max_tokens,
        "n_cmpl": 1,
        "top_k": 40,
        "top_p": 0.99,
        "stream": false,
        "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": true,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 2500,
    });
    if indent > 0 {
        body["n_indent"] = indent.into();
    }
    if let Some(m) = &cfg.model {
        body["model"] = m.as_str().into();
    }
    body
}

/// llama.vscode's warm-up request after a ring update.
fn vscode_warmup(ring: &[(String, String)]) -> Value {
    json!({
        "id_slot": 0,
        "input_prefix": "",
        "input_suffix": "",
        "input_extra": ring_extra(ring),
        "prompt": "",
        "n_predict": 0,
        "samplers": [],
        "cache_prompt": true,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 1,
    })
}

/// Cached and computed prompt tokens of an answer: llama.cpp's `timings`
/// (greencode and llama-server send them) or OpenAI's `usage`.
fn cache_counts(v: &Value) -> Option<(u64, u64)> {
    let t = &v["timings"];
    if let (Some(c), Some(p)) = (t["cache_n"].as_u64(), t["prompt_n"].as_u64()) {
        return Some((c, p));
    }
    let u = &v["usage"];
    let total = u["prompt_tokens"].as_u64()?;
    let cached = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
    Some((cached, total.saturating_sub(cached)))
}

/// An answer being read.
struct Answer {
    /// Time to the first token (streamed answers).
    ttft: Option<f64>,
    /// Time to the first line (or the whole answer).
    first_line: f64,
    /// The rest of a streamed answer, still open.
    rest: Option<Box<dyn BufRead>>,
    /// Cached and computed prompt tokens, when the answer said.
    cache: Option<(u64, u64)>,
}

/// Sends one keystroke's request; once the server has taken it, `cancel`
/// drops the keystroke before. A streamed answer is read to its first line.
fn send(agent: &ureq::Agent, cfg: &EditorBenchConfig, body: &Value, cancel: impl FnOnce()) -> Result<Answer, String> {
    let start = Instant::now();
    match cfg.client {
        EditorClient::LlamaVscode => {
            let resp = post_json(agent, &cfg.url, "/infill", body);
            cancel();
            let text = resp?.into_body().read_to_string().map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            Ok(Answer {
                ttft: None,
                first_line: start.elapsed().as_secs_f64(),
                rest: None,
                cache: cache_counts(&v),
            })
        }
        EditorClient::Continue => {
            let resp = post_json(agent, &cfg.url, "/v1/completions", body);
            cancel();
            let mut reader: Box<dyn BufRead> = Box::new(std::io::BufReader::new(resp?.into_body().into_reader()));
            let (mut ttft, mut text, mut line) = (None, String::new(), String::new());
            loop {
                line.clear();
                if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                    // Ended (a stop string) before a newline: that was its line.
                    let t = start.elapsed().as_secs_f64();
                    return Ok(Answer {
                        ttft: Some(ttft.unwrap_or(t)),
                        first_line: t,
                        rest: None,
                        cache: None,
                    });
                }
                let Some(data) = line.trim_end().strip_prefix("data: ") else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if v.get("error").is_some() {
                    return Err(v["error"].to_string());
                }
                let piece = v["choices"][0]["text"].as_str().unwrap_or("");
                if !piece.is_empty() {
                    ttft.get_or_insert(start.elapsed().as_secs_f64());
                    text.push_str(piece);
                }
                let finished = !v["choices"][0]["finish_reason"].is_null();
                if text.contains('\n') || finished {
                    let t = start.elapsed().as_secs_f64();
                    return Ok(Answer {
                        ttft: Some(ttft.unwrap_or(t)),
                        first_line: t,
                        rest: Some(reader),
                        cache: cache_counts(&v),
                    });
                }
            }
        }
    }
}

/// Reads a streamed answer to its end; its cached-token counts, if it sent them.
fn read_rest(reader: Box<dyn BufRead>) -> Option<(u64, u64)> {
    let mut counts = None;
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if let Ok(v) = serde_json::from_str::<Value>(data) {
            counts = cache_counts(&v).or(counts);
        }
    }
    counts
}

/// Energy greencode booked to requests so far (None: the server has no such metric).
fn request_joules(agent: &ureq::Agent, url: &str) -> Option<f64> {
    let text = agent
        .get(format!("{}/metrics", url.trim_end_matches('/')))
        .call()
        .ok()?
        .into_body()
        .read_to_string()
        .ok()?;
    if !text.contains("\ngreencode_") {
        return None;
    }
    // A counter nothing has been booked to yet has no samples: 0.
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Some(sum("greencode_energy_joules_total") - sum("greencode_idle_energy_joules_total"))
}

/// Replays the keystrokes one after another, each cancelling the one before.
pub fn bench_editor(cfg: &EditorBenchConfig) -> EditorReport {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(300)))
        .build()
        .into();
    let keys = keystrokes(cfg);
    let mut ring: Vec<(String, String)> = cfg.chunks.iter().take(cfg.ring_chunks).cloned().collect();
    let mut next_chunk = ring.len();
    let joules_before = request_joules(&agent, &cfg.url);
    let (mut ttfts, mut lines, mut errors, mut warmups, mut accepted) = (Vec::new(), Vec::new(), 0, 0, 0);
    let (mut cached, mut computed, mut prompt_chars, mut answers) = (0u64, 0u64, 0usize, 0u64);
    let mut open: Option<Box<dyn BufRead>> = None;
    let mut tally = |counts: Option<(u64, u64)>| {
        if let Some((c, p)) = counts {
            cached += c;
            computed += p;
            answers += 1;
        }
    };
    for k in &keys {
        let body = match cfg.client {
            EditorClient::Continue => continue_body(cfg, k),
            EditorClient::LlamaVscode => vscode_body(cfg, k, &ring),
        };
        prompt_chars += ["prompt", "input_prefix", "input_suffix"]
            .iter()
            .filter_map(|f| body[*f].as_str())
            .map(str::len)
            .sum::<usize>()
            + ring.iter().map(|(_, t)| t.len()).sum::<usize>() * usize::from(cfg.client == EditorClient::LlamaVscode);
        match send(&agent, cfg, &body, || drop(open.take())) {
            Ok(a) => {
                ttfts.extend(a.ttft);
                lines.push(a.first_line);
                if k.line_end {
                    accepted += 1;
                    tally(a.rest.map_or(a.cache, read_rest));
                } else {
                    if cfg.client == EditorClient::LlamaVscode {
                        tally(a.cache);
                    }
                    open = a.rest;
                }
            }
            Err(e) => {
                eprintln!("greencode: keystroke failed: {e}");
                errors += 1;
            }
        }
        if k.line_end && cfg.client == EditorClient::LlamaVscode && !cfg.chunks.is_empty() {
            // Between lines llama.vscode's ring takes a chunk and warms the cache.
            ring.push(cfg.chunks[next_chunk % cfg.chunks.len()].clone());
            next_chunk += 1;
            if ring.len() > cfg.ring_chunks {
                ring.remove(0);
            }
            warmups += 1;
            if let Err(e) = post_json(&agent, &cfg.url, "/infill", &vscode_warmup(&ring))
                .and_then(|r| r.into_body().read_to_string().map(drop).map_err(|e| e.to_string()))
            {
                eprintln!("greencode: warm-up failed: {e}");
                errors += 1;
            }
        }
    }
    drop(open);
    let joules = match (joules_before, request_joules(&agent, &cfg.url)) {
        (Some(a), Some(b)) if accepted > 0 => Some((b - a) / accepted as f64),
        _ => None,
    };
    EditorReport {
        client: cfg.client.name(),
        client_source: cfg.client.source(),
        requests: keys.len(),
        errors,
        warmups,
        ttft: (!ttfts.is_empty()).then(|| Percentiles::of(ttfts)),
        first_line: Percentiles::of(lines),
        cached_share: (cached + computed > 0).then(|| cached as f64 / (cached + computed) as f64),
        mean_prompt_tokens: (answers > 0).then(|| (cached + computed) as f64 / answers as f64),
        accepted,
        joules_per_accepted: joules,
        mean_prompt_chars: prompt_chars as f64 / keys.len().max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(client: EditorClient) -> EditorBenchConfig {
        EditorBenchConfig {
            url: String::new(),
            model: None,
            client,
            files: vec![("a.py".into(), "import os\n\ndef f(x):\n    return x\n".into())],
            chunks: vec![("b.py".into(), "y = 2\n".into())],
            ring_chunks: 4,
            keystrokes: 40,
            start_chars: 3,
            max_tokens: 16,
        }
    }

    #[test]
    fn keystrokes_type_each_character_and_mark_line_ends() {
        let keys = keystrokes(&config(EditorClient::Continue));
        // From the line after "imp…": "", "def f(x):", "    return x".
        let text = &config(EditorClient::Continue).files[0].1;
        let typed: Vec<&str> = keys.iter().map(|k| &text[..k.cursor]).collect();
        assert_eq!(typed[0], "import os\n\nd");
        assert_eq!(keys.iter().filter(|k| k.line_end).count(), 2);
        assert_eq!(keys.len(), "def f(x):".len() + "    return x".len());
        assert!(keys[8].line_end && typed[8].ends_with("def f(x):"));
    }

    #[test]
    fn bodies_are_in_the_clients_shapes() {
        let cfg = config(EditorClient::Continue);
        let k = &keystrokes(&cfg)[14];
        let b = continue_body(&cfg, k);
        let prompt = b["prompt"].as_str().unwrap();
        assert!(
            prompt.starts_with("<|fim_prefix|>\n# a.py\nimport os\n\ndef f(x):\n    re"),
            "{prompt}"
        );
        assert!(prompt.ends_with("<|fim_suffix|><|fim_middle|>"), "{prompt}");
        assert_eq!(b["stop"].as_array().unwrap().len(), 12);
        let cfg = config(EditorClient::LlamaVscode);
        let ring = cfg.chunks.clone();
        let b = vscode_body(&cfg, k, &ring);
        assert_eq!(b["prompt"], "    re");
        assert_eq!(b["n_indent"], 4);
        assert_eq!(b["input_prefix"], "import os\n\ndef f(x):\n");
        assert_eq!(b["input_extra"][0]["filename"], "b.py");
        assert_eq!(vscode_warmup(&ring)["n_predict"], 0);
    }
}
