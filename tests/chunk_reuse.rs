//! Reuse of cached runs that moved (`serve --cache-reuse N`, llama-server's
//! `--cache-reuse`): a run of tokens another sequence cached at other
//! positions is copied into a new sequence's own blocks with its keys
//! turned to the new positions. Checked on the real model: moved keys equal
//! keys rotated once at the new positions (layer 0, where a key depends
//! only on its token and position) within 1e-5; the source's shared blocks
//! are never written; a llama.vscode-style ring buffer whose oldest chunk
//! was evicted gets its moved chunks from the cache over HTTP; and greedy
//! agreement with a cold run over 50 held-out ring-buffer prompts is
//! measured (a moved run's values once attended to context that has since
//! left, so it is close to, not equal to, a cold run).

mod common;

use common::Server;
use greencode::data::corpus;
use greencode::generate::loaded::LoadedModel;
use greencode::model::{KvCache, KvDtype, KvPool, LogitsFor, RopeShift};
use serde_json::{json, Value};

/// Held-out tokens: the first `n` of a standard-library file.
fn held_out_tokens(p: &LoadedModel, file: usize, n: usize) -> Vec<u32> {
    let dir = corpus::stdlib_dir().unwrap();
    let files = corpus::eval_files(&dir, file + 1).unwrap();
    let mut ids = p.tokenizer.encode(&corpus::read_text(&files[file]).unwrap()).unwrap();
    assert!(ids.len() >= n, "held-out file too short");
    ids.truncate(n);
    ids
}

#[test]
fn moved_keys_equal_keys_rotated_once_and_the_source_is_never_written() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let model = &p.model;
    let shift = RopeShift::of(model.config());
    let pool = KvPool::new(model.kv_shape(), KvDtype::F32, 64, true);
    let text = held_out_tokens(&p, 0, 400);
    // The source: 70 tokens of context, then the run (250 tokens) at 70.
    let (ctx_a, run, ctx_b) = (&text[..70], &text[70..320], &text[320..343]);
    let mut source = KvCache::in_pool(&pool, 400);
    model
        .forward_cached(&[ctx_a, run].concat(), &mut source, LogitsFor::Last)
        .unwrap();
    let (_, hashes) = source.registered().expect("full blocks registered");
    let layers = model.num_layers();
    let snapshot = |c: &KvCache| -> Vec<Vec<f32>> {
        (0..layers)
            .flat_map(|l| (0..320).map(move |i| (l, i)))
            .map(|(l, i)| [c.keys_at(l, i).unwrap(), c.values_at(l, i).unwrap()].concat())
            .collect()
    };
    let before = snapshot(&source);

    // The run moves to 23 (another context before it) and back to 200: once
    // earlier and once later than where it was computed.
    for new_ctx in [ctx_b.to_vec(), text[..200].iter().rev().copied().collect::<Vec<u32>>()] {
        let at = new_ctx.len();
        let mut moved = KvCache::in_pool(&pool, 600);
        model.forward_cached(&new_ctx, &mut moved, LogitsFor::Last).unwrap();
        // The source's full blocks hold 70 + 250 = 320 → ten blocks of 32.
        let got = moved.append_moved(&hashes, 70, run, &shift);
        assert_eq!(got, run.len());
        assert_eq!(moved.len(), at + run.len());
        let mut cold = KvCache::in_pool(&KvPool::new(model.kv_shape(), KvDtype::F32, 64, false), 600);
        model
            .forward_cached(&[new_ctx.as_slice(), run].concat(), &mut cold, LogitsFor::Last)
            .unwrap();
        let (mut worst, mut largest) = (0f32, 0f32);
        for i in at..at + run.len() {
            let (m, c) = (moved.keys_at(0, i).unwrap(), cold.keys_at(0, i).unwrap());
            for (a, b) in m.iter().zip(&c) {
                worst = worst.max((a - b).abs());
                largest = largest.max(b.abs());
            }
            // Layer 0's values depend on the token alone: copied bit for bit.
            assert_eq!(moved.values_at(0, i), cold.values_at(0, i), "value row {i}");
        }
        assert!(largest > 1.0, "keys this small would hide the error");
        assert!(
            worst <= 1e-5,
            "moved keys differ from keys rotated once by {worst} (largest key {largest})"
        );
        // Deeper layers saw another context: their keys differ, as expected.
        let deep = (at..at + run.len())
            .map(|i| {
                let (m, c) = (
                    moved.keys_at(layers - 1, i).unwrap(),
                    cold.keys_at(layers - 1, i).unwrap(),
                );
                m.iter().zip(&c).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
            })
            .fold(0f32, f32::max);
        assert!(deep > 1e-3, "the last layer cannot match a different context exactly");
    }
    assert_eq!(snapshot(&source), before, "the source's blocks were written");
}

#[test]
fn a_run_whose_blocks_were_evicted_is_cut_at_the_first_missing_block() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let model = &p.model;
    let shift = RopeShift::of(model.config());
    // Room for the source (5 blocks) and 5 more.
    let pool = KvPool::new(model.kv_shape(), KvDtype::F32, 10, true);
    let text = held_out_tokens(&p, 0, 160);
    let mut source = KvCache::in_pool(&pool, 160);
    model.forward_cached(&text, &mut source, LogitsFor::Last).unwrap();
    let (_, hashes) = source.registered().unwrap();
    drop(source); // released: cached until the memory is needed
                  // A sequence holds the first two blocks; others then take the 5 free
                  // blocks and the source's least recently released that nobody holds
                  // (blocks 2, 3 and, for the moved run's own second block, 4).
    let mut holder = KvCache::in_pool(&pool, 200);
    assert_eq!(holder.adopt(&text, 64), 64);
    let mut other = KvCache::in_pool(&pool, 200);
    model.forward_cached(&[7; 180], &mut other, LogitsFor::Last).unwrap();
    let mut moved = KvCache::in_pool(&pool, 200);
    model.forward_cached(&[9; 5], &mut moved, LogitsFor::Last).unwrap();
    let got = moved.append_moved(&hashes, 10, &text[10..150], &shift);
    assert_eq!(got, 54, "moved up to the end of block 1, where block 2 is gone");
    assert_eq!(moved.len(), 5 + 54);
    let got = moved.append_moved(&hashes, 64, &text[64..150], &shift);
    assert_eq!(got, 0, "nothing of block 2 on is cached");
    drop((holder, other));
}

/// Lines `from..from + n` of a held-out file (long lines cut), joined.
fn lines(text: &str, from: usize, n: usize) -> String {
    text.lines()
        .skip(from)
        .take(n)
        .map(|l| format!("{}\n", l.chars().take(100).collect::<String>()))
        .collect()
}

/// A llama.vscode-style editor: a ring buffer of 16-line chunks from other
/// held-out files (4 chunks, as sized for tiny-coder's 1,024-token
/// context) and a cursor in the file being edited.
struct Session {
    chunks: Vec<(String, String)>,
    file: String,
    name: String,
    cursor: usize,
}

impl Session {
    /// Session `k`: chunks `k..k + 5` of the pool of other files' chunks, a
    /// cursor somewhere in file `k`.
    fn new(k: usize, texts: &[(String, String)]) -> Self {
        let chunks = (0..5)
            .map(|j| {
                let (name, text) = &texts[(k * 5 + j + 1) % texts.len()];
                let start = (k * 7 + j * 13) % text.lines().count().saturating_sub(16).max(1);
                (name.clone(), lines(text, start, 16))
            })
            .collect();
        let (name, file) = texts[k % texts.len()].clone();
        let cursor = 20 + (k * 11) % file.lines().count().saturating_sub(40).max(1);
        Self {
            chunks,
            file,
            name,
            cursor,
        }
    }

    /// The `/infill` body with ring chunks `ring` (llama.vscode's fields).
    fn body(&self, ring: std::ops::Range<usize>, n_predict: i64) -> Value {
        let extra: Vec<Value> = self.chunks[ring]
            .iter()
            .map(|(f, t)| json!({"filename": f, "text": t}))
            .collect();
        let line = self.file.lines().nth(self.cursor).unwrap_or_default();
        let indent = line.len() - line.trim_start().len();
        json!({
            "input_prefix": lines(&self.file, self.cursor.saturating_sub(20), self.cursor.min(20)),
            "input_suffix": lines(&self.file, self.cursor + 1, 8),
            "input_extra": extra,
            "prompt": &line[..indent],
            "n_predict": n_predict,
            "n_indent": indent,
            "top_k": 40,
            "top_p": 0.99,
            "stream": false,
            "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": true,
            "t_max_prompt_ms": 500,
            "t_max_predict_ms": 1000,
            "temperature": 0,
            "file": self.name,
        })
    }
}

fn held_out_texts(n: usize) -> Vec<(String, String)> {
    let dir = corpus::stdlib_dir().unwrap();
    corpus::eval_files(&dir, n)
        .unwrap()
        .iter()
        .map(|f| {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            (name, corpus::read_text(f).unwrap())
        })
        .filter(|(_, t)| t.lines().count() > 60)
        .collect()
}

fn metric(s: &Server, name: &str) -> f64 {
    let (_, text) = s.get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}{{model=\"tiny-coder\"}} ")))
        .map_or(0.0, |v| v.parse().unwrap())
}

#[test]
fn an_evicted_ring_chunk_no_longer_costs_the_moved_chunks_over_http() {
    let texts = held_out_texts(12);
    let session = Session::new(0, &texts);
    let mut cached = Vec::new();
    for reuse in [None, Some("64")] {
        let mut args = vec!["--kv-dtype", "f32"];
        if let Some(n) = reuse {
            args.extend(["--cache-reuse", n]);
        }
        let s = Server::start_as_is(&args, &[]);
        // The editor warms the cache with the ring as it was (n_predict 0) …
        let (st, warm) = s.post("/infill", &session.body(0..4, 0));
        assert_eq!(st, 200, "{warm}");
        assert_eq!(warm["content"], "");
        // … then the oldest chunk is evicted and a new one comes in.
        let (st, v) = s.post("/infill", &session.body(1..5, 16));
        assert_eq!(st, 200, "{v}");
        let evaluated = v["tokens_evaluated"].as_u64().unwrap();
        let got = v["tokens_cached"].as_u64().unwrap();
        assert_eq!(v["timings"]["cache_n"], got);
        cached.push((got, evaluated));
        let moved = metric(&s, "greencode_cache_reuse_tokens_total");
        if reuse.is_some() {
            assert!(moved > 0.0, "nothing moved");
            assert!(moved <= got as f64, "moved tokens are counted as cached");
        } else {
            assert_eq!(moved, 0.0);
        }
    }
    let ((plain, _), (reused, evaluated)) = (cached[0], cached[1]);
    // Chunks 2–4 moved (three quarters of the ring) and the file moved too.
    assert!(plain < 32, "without reuse only the shared start could match: {plain}");
    assert!(
        reused > evaluated / 2,
        "with --cache-reuse {reused} of {evaluated} prompt tokens came from the cache"
    );
}

#[test]
fn moved_chunks_agree_with_cold_runs_on_held_out_ring_buffers() {
    let texts = held_out_texts(80);
    let reuse = Server::start_as_is(&["--kv-dtype", "f32", "--cache-reuse", "64"], &[]);
    let cold = Server::start_as_is(&["--kv-dtype", "f32", "--no-prefix-cache"], &[]);
    let (mut same, mut tokens_same, mut tokens_all, mut cached, mut evaluated) = (0, 0, 0, 0, 0);
    let n = 50;
    for k in 0..n {
        let session = Session::new(k, &texts);
        let (st, _) = reuse.post("/infill", &session.body(0..4, 0));
        assert_eq!(st, 200);
        let body = session.body(1..5, 16);
        let (st, a) = reuse.post("/infill", &body);
        assert_eq!(st, 200, "{a}");
        let (st, b) = cold.post("/infill", &body);
        assert_eq!(st, 200, "{b}");
        assert_eq!(b["tokens_cached"], 0);
        cached += a["tokens_cached"].as_u64().unwrap();
        evaluated += a["tokens_evaluated"].as_u64().unwrap();
        let (x, y) = (a["content"].as_str().unwrap(), b["content"].as_str().unwrap());
        same += usize::from(x == y);
        // Agreement by characters up to the first difference.
        let common = x.chars().zip(y.chars()).take_while(|(p, q)| p == q).count();
        tokens_same += common;
        tokens_all += y.chars().count().max(x.chars().count());
    }
    let share = cached as f64 / evaluated as f64;
    let agree = same as f64 / n as f64;
    let chars = tokens_same as f64 / tokens_all.max(1) as f64;
    eprintln!(
        "cache-reuse on {n} held-out ring buffers: cached share {share:.3}, identical completions {agree:.2}, \
         characters before the first difference {chars:.3}"
    );
    // Measured 2026-12-07: share 0.51, identical 0.92 (0.66 when position 0
    // was moved too, so the test fails if the attention-sink rule breaks).
    assert!(share > 0.4, "cached share {share}");
    assert!(agree >= 0.8, "only {agree} of completions agree with a cold run");
}
