//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The embedded tiny-coder folder.
pub fn tiny_coder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-coder")
}

/// golden.json of tiny-coder.
pub fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(tiny_coder().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// golden.json case 4 split into its FIM prefix and suffix, with the greedy infill.
pub fn fim_case() -> (String, String, String) {
    let g = golden();
    let case = &g["cases"][3];
    let prompt = case["prompt"].as_str().unwrap();
    let prefix = prompt
        .strip_prefix("<|fim_prefix|>")
        .unwrap()
        .split("<|fim_suffix|>")
        .next()
        .unwrap();
    let suffix = prompt
        .split("<|fim_suffix|>")
        .nth(1)
        .unwrap()
        .strip_suffix("<|fim_middle|>")
        .unwrap();
    (
        prefix.into(),
        suffix.into(),
        case["greedy32_text"].as_str().unwrap().into(),
    )
}

/// The concatenated `choices[0].text` of a completion stream's chunks.
pub fn stream_text(events: &[(Option<String>, String)]) -> String {
    events
        .iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(_, d)| {
            serde_json::from_str::<serde_json::Value>(d).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(candle_core::D::Minus1)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The bits of every value of an f32 tensor, in order (for bit-for-bit comparisons).
pub fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

/// A temporary copy of tiny-coder: weight files are symlinked, small files copied,
/// so a test can break one file without touching the original.
pub fn model_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_coder()).unwrap() {
        let path = entry.unwrap().path();
        let dest = dir.path().join(path.file_name().unwrap());
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::os::unix::fs::symlink(&path, &dest).unwrap();
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
    dir
}

/// `greencode prune` of tiny-coder into `out` on the `calib` folder with a
/// small calibration set (4 windows of 128 tokens, no held-out evaluation),
/// plus `extra` options.
pub fn prune_tiny(calib: &Path, out: &Path, extra: &[&str]) -> Output {
    let model = tiny_coder();
    let mut args = vec![
        "prune",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--calib-samples",
        "4",
        "--calib-len",
        "128",
        "--eval-files",
        "0",
    ];
    args.extend_from_slice(extra);
    greencode(&args)
}

/// tiny-coder pruned by two layers and to 512 FFN neurons, its vocabulary
/// pruned on four calibration files (a model of its own shape and
/// tokenizer, made in seconds), in a temporary folder: (folder, model).
#[allow(dead_code)]
pub fn fast_pruned_copy() -> (tempfile::TempDir, std::path::PathBuf) {
    pruned_copy("tiny-pruned", &["--drop-layers", "2", "--ffn-keep", "512"])
}

/// tiny-coder pruned with `extra` options on four calibration files into
/// `name` inside a temporary folder: (folder, model).
#[allow(dead_code)]
pub fn pruned_copy(name: &str, extra: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let stdlib = greencode::data::corpus::stdlib_dir().unwrap();
    for f in greencode::data::corpus::calibration_files(&stdlib)
        .unwrap()
        .iter()
        .take(4)
    {
        std::fs::copy(f, data.join(f.file_name().unwrap())).unwrap();
    }
    let pruned = dir.path().join(name);
    let out = prune_tiny(&data, &pruned, extra);
    assert!(out.status.success(), "prune: {}", String::from_utf8_lossy(&out.stderr));
    (dir, pruned)
}

/// Runs the greencode binary with `args`.
pub fn greencode(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_greencode"))
        .args(args)
        .env_remove("GREENCODE_MODEL")
        // candle appends a backtrace to its errors when this is set: error
        // lines must stay one line anyway.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the greencode binary runs")
}

/// Runs `greencode generate --model MODEL --format json ARGS…`, asserts it
/// succeeded, and returns its JSON.
pub fn generate_json(model: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["generate", "--model", model.to_str().unwrap(), "--format", "json"];
    all.extend_from_slice(args);
    let out = greencode(&all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Asserts a run failed cleanly: non-zero exit, one `error:` line on stderr
/// containing every `needle`, no panic.
pub fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks {n:?}: {stderr}");
    }
}

/// Asserts a long-running command failed cleanly: non-zero exit, no panic,
/// and its last stderr line an `error:` containing every `needle` (progress
/// lines may come before it).
pub fn assert_fails_with(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(last.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(last.contains(n), "error line lacks {n:?}: {stderr}");
    }
}

/// A `greencode serve` process on a free loopback port, killed on drop
/// (started by the library's `bench::server`, as `bench serve` starts one).
pub struct Server {
    process: greencode::bench::server::ServerProcess,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Server {
    /// Starts the server with extra arguments and waits until `/health` is
    /// 200. Its KV cache is f32 unless `extra` says otherwise, so its
    /// greedy tokens are the golden ones and `greencode generate`'s bit for bit.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_env(extra, &[])
    }

    /// As [`Server::start`], with environment variables set.
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut args = extra.to_vec();
        if !extra.contains(&"--kv-dtype") {
            args.extend(["--kv-dtype", "f32"]);
        }
        Self::start_as_is(&args, env)
    }

    /// As [`Server::start_env`], with the server's own defaults (f16 KV
    /// cache). The model is tiny-coder unless `extra` names models.
    pub fn start_as_is(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let model = tiny_coder();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_greencode"));
        cmd.args(["--threads", "1", "serve", "--port", "0"]);
        if !extra.contains(&"--model") {
            cmd.args(["--model", model.to_str().unwrap()]);
        }
        cmd.args(extra)
            .env_remove("GREENCODE_MODEL")
            .env_remove("GREENCODE_API_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let process = greencode::bench::server::ServerProcess::start(cmd, std::time::Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        let base = process.url().to_owned();
        Self { process, base }
    }

    /// Lines the server wrote to stderr so far.
    pub fn log(&self) -> Vec<String> {
        self.process.log()
    }

    /// The log once at least `n` lines contain `needle` (a request's log
    /// line can land just after its response), or after 10 s.
    #[allow(dead_code)]
    pub fn log_with(&self, needle: &str, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.iter().filter(|l| l.contains(needle)).count() >= n || std::time::Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The child process.
    pub fn child(&mut self) -> &mut std::process::Child {
        self.process.child()
    }

    /// GET → (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let resp = agent().get(format!("{}{path}", self.base)).call();
        match resp {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.into_body().read_to_string().unwrap_or_default())
            }
            Err(_) => (0, String::new()),
        }
    }

    /// POST raw bytes → (status, headers, body).
    pub fn post_raw(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, ureq::http::HeaderMap, String) {
        let mut req = agent()
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send(body).expect("request completes");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r
            .into_body()
            .with_config()
            .limit(100 << 20)
            .read_to_string()
            .unwrap_or_default();
        (status, headers, body)
    }

    /// POST JSON → (status, parsed body).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let (status, _, text) = self.post_raw(path, body.to_string().as_bytes(), &[]);
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON answer ({status}): {text}"));
        (status, v)
    }

    /// POST JSON with `stream: true` → the `data:` payloads in order (and `event:` names).
    pub fn stream(&self, path: &str, body: &serde_json::Value) -> Vec<(Option<String>, String)> {
        use std::io::BufRead;
        let r = agent()
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .send(body.to_string().as_bytes())
            .expect("request completes");
        assert_eq!(r.status().as_u16(), 200);
        let ct = r.headers().get("content-type").unwrap().to_str().unwrap().to_owned();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let reader = std::io::BufReader::new(r.into_body().into_reader());
        let mut out = Vec::new();
        let mut event = None;
        for line in reader.lines() {
            let line = line.unwrap();
            if let Some(e) = line.strip_prefix("event: ") {
                event = Some(e.to_owned());
            } else if let Some(d) = line.strip_prefix("data: ") {
                out.push((event.take(), d.to_owned()));
            }
        }
        out
    }
}

/// An HTTP agent that returns 4xx/5xx as responses, not errors.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(120)))
        .build()
        .into()
}

/// A test's data is missing on this machine (another Python's standard
/// library, no `prometheus` binary): a failure under CI (`CI` set, as
/// `.ci/run` sets it), else the test is skipped with the reason.
pub fn missing_data(test: &str, reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {reason}; CI must provide what this test reads"
    );
    eprintln!("SKIPPED {test}: {reason}");
}

/// Makes `module` importable by python3, pip-installing `package` when it is missing.
pub fn ensure_python_package(module: &str, package: &str) {
    let has = || {
        Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has() {
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", package])
            .status()
            .expect("python3 runs");
        assert!(status.success(), "pip install {package} failed");
    }
    assert!(has(), "the {package} package is not importable");
}

/// Weights as trained weights look: mostly small, a few large, from `seed`.
pub fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..rows * cols)
        .map(|_| {
            let v: f32 = rng.random::<f32>() * 2.0 - 1.0;
            if rng.random::<f32>() < 0.01 {
                v * 8.0
            } else {
                v * v * v * 0.1
            }
        })
        .collect()
}

/// Every tensor of the GGUF `file` as the `gguf` Python package (llama.cpp's
/// numpy reference) dequantizes it, by name (`tests/python/gguf_dequantize.py`).
pub fn gguf_package_dequantize(file: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    ensure_python_package("gguf", "gguf");
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/gguf_dequantize.py");
    let o = Command::new("python3")
        .arg(script)
        .arg(file)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.strip_suffix(".f32")?.to_owned();
            let values = std::fs::read(&p)
                .unwrap()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Some((name, values))
        })
        .collect()
}
