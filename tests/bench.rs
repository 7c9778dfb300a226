//! `greencode bench generate --format json` on tiny-coder: every pass timed
//! and metered, and the memory-bandwidth floor; `bench verify`'s step costs
//! and the speed-ups they imply; `bench editor`.

mod common;

#[test]
fn bench_generate_reports_speed_and_energy_per_pass() {
    let model = common::tiny_coder();
    let out = common::greencode(&[
        "bench",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        "16",
        "--new-tokens",
        "8",
        "--passes",
        "2",
        "--measure-bandwidth",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["passes"].as_array().unwrap().len(), 2);
    // The floor: tiny-coder's matrices in bf16 (the tied embedding once, as
    // the output matrix), the bandwidth measured, the share of it reached.
    let bytes = r["weight_bytes_per_token"].as_f64().unwrap();
    assert!((40e6..60e6).contains(&bytes), "{r}");
    let (bw, floor) = (
        r["bandwidth_gbs"].as_f64().unwrap(),
        r["floor_tokens_per_second"].as_f64().unwrap(),
    );
    assert!(bw > 0.1 && (floor - bw * 1e9 / bytes).abs() < 1e-6 * floor, "{r}");
    let share = r["share_of_floor"].as_f64().unwrap();
    let decode = r["decode_tokens_per_second"]["median"].as_f64().unwrap();
    assert!((share - decode / floor).abs() < 1e-9 * share.max(1.0), "{r}");
    for key in [
        "ttft_ms",
        "prompt_tokens_per_second",
        "decode_tokens_per_second",
        "joules_per_token",
    ] {
        let s = &r[key];
        let (min, median, max) = (
            s["min"].as_f64().unwrap(),
            s["median"].as_f64().unwrap(),
            s["max"].as_f64().unwrap(),
        );
        assert!(min > 0.0 && min <= median && median <= max, "{key}: {s}");
    }
    assert!(["nvml", "rapl", "estimated"].contains(&r["energy_source"].as_str().unwrap()));
    // tiny-coder's checkpoint is bf16: held as such, not widened to f32.
    assert_eq!(r["weights"], "bf16");
    // The kernels that ran and the machine's instruction sets are named.
    assert!(
        [
            "avx2+fma",
            "avx2+fma, q8_0 avx512f, prompts avx512f",
            "avx2+fma, q8_0 avx512f, q4_K q6_K avx512bw, prompts avx512f",
            "avx2+fma, q8_0 avx512f, q4_K q6_K avx512bw, prompts avx512f, q4_K q6_K prompts avx512vnni",
            "portable"
        ]
        .contains(&r["kernels"].as_str().unwrap()),
        "{r}"
    );
    assert!(!r["machine"].as_str().unwrap().is_empty());
}

#[test]
fn generate_and_bench_run_quantized_to_q8_0() {
    let model = common::tiny_coder();
    let r = common::generate_json(
        &model,
        &[
            "--quantize",
            "q8_0",
            "--prompt",
            "def add(a, b):\n",
            "--max-tokens",
            "8",
        ],
    );
    assert!(r["completion_tokens"].as_u64().unwrap() >= 1);
    assert_eq!(r["weights"], "q8_0", "{r}");
    let out = common::greencode(&[
        "bench",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--quantize",
        "q8_0",
        "--prompt-tokens",
        "16",
        "--new-tokens",
        "4",
        "--passes",
        "1",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b["weights"], "q8_0", "{b}");
    assert!(b["decode_tokens_per_second"]["median"].as_f64().unwrap() > 0.0);
    let out = common::greencode(&["generate", "--quantize", "q4_0", "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("q8_0"));
}

#[test]
fn bench_verify_times_steps_by_row_count_and_derives_the_speed_up() {
    let model = common::tiny_coder();
    let args = |acceptance: &str| {
        common::greencode(&[
            "bench",
            "verify",
            "--model",
            model.to_str().unwrap(),
            "--depth",
            "40",
            "--max-rows",
            "4",
            "--passes",
            "2",
            "--acceptance",
            acceptance,
            "--format",
            "json",
        ])
    };
    let out = args("0.5,0.9");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["depth"], 40);
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 4, "{r}");
    let relative: Vec<f64> = steps.iter().map(|s| s["relative"].as_f64().unwrap()).collect();
    assert_eq!(relative[0], 1.0);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["rows"], i + 1);
        let ms = &s["ms"];
        assert!(
            ms["min"].as_f64().unwrap() > 0.0 && ms["min"].as_f64() <= ms["max"].as_f64(),
            "{r}"
        );
    }
    // The speed-up at each draft length k: (1 + a + … + a^k) / t(k + 1) · t(1).
    for (implied, a) in r["implied"].as_array().unwrap().iter().zip([0.5f64, 0.9]) {
        let by_draft: Vec<f64> = implied["by_draft"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(by_draft.len(), 3);
        for (k, &v) in by_draft.iter().enumerate().map(|(i, v)| (i + 1, v)) {
            let tokens: f64 = (0..=k).map(|i| a.powi(i as i32)).sum();
            assert!((v - tokens / relative[k]).abs() < 1e-9 * v, "{r}");
        }
        let best = implied["best_draft"].as_u64().unwrap() as usize;
        assert_eq!(implied["speed_up"].as_f64().unwrap(), by_draft[best - 1], "{r}");
        assert!(by_draft.iter().all(|&v| v <= by_draft[best - 1]));
    }
    let out = args("1.5");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--acceptance 1.5"));
}

/// `bench editor --client CLIENT` against `s`, as JSON.
fn bench_editor(s: &common::Server, client: &str, keystrokes: &str) -> serde_json::Value {
    let out = common::greencode(&[
        "bench",
        "editor",
        "--url",
        &s.base,
        "--client",
        client,
        "--keystrokes",
        keystrokes,
        "--files",
        "2",
        "--max-tokens",
        "16",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `cached_tokens` of every request the server logged (at least `n`).
fn logged_cached(s: &common::Server, n: usize) -> Vec<u64> {
    s.log_with("\"event\":\"request\"", n)
        .iter()
        .filter(|l| l.contains("\"event\":\"request\""))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["cached_tokens"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn bench_editor_replays_continue_keystrokes_each_cancelling_the_one_before() {
    let s = common::Server::start(&[]);
    let v = bench_editor(&s, "continue", "8");
    assert_eq!(v["client"], "continue");
    assert!(v["client_source"].as_str().unwrap().contains("continuedev/continue"));
    assert_eq!(v["requests"], 8);
    assert_eq!(v["errors"], 0);
    for k in ["ttft", "first_line"] {
        let (p50, p99) = (v[k]["p50_ms"].as_f64().unwrap(), v[k]["p99_ms"].as_f64().unwrap());
        assert!(p50 > 0.0 && p99 >= p50, "{k}: {v}");
    }
    assert!(
        v["first_line"]["p50_ms"].as_f64() >= v["ttft"]["p50_ms"].as_f64(),
        "{v}"
    );
    // A line's end in each of the two files is read whole, with its energy.
    assert_eq!(v["accepted"], 2, "{v}");
    assert!(v["joules_per_accepted"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["cached_share"].as_f64().unwrap() > 0.5, "{v}");
    // Every keystroke reached the server, and each one after a file's first
    // found the blocks of the one it cancelled.
    let cached = logged_cached(&s, 8);
    assert_eq!(cached.len(), 8, "{cached:?}");
    assert!(cached.iter().filter(|&&c| c > 0).count() >= 6, "{cached:?}");
}

#[test]
fn bench_editor_replays_llama_vscode_with_its_ring_buffer_and_warm_ups() {
    let s = common::Server::start(&["--cache-reuse", "64"]);
    let v = bench_editor(&s, "llama-vscode", "6");
    assert_eq!(v["client"], "llama-vscode");
    assert_eq!(v["requests"], 6);
    assert_eq!(v["errors"], 0);
    // Not streamed: the whole answer is the first line; a warm-up per finished line.
    assert!(v["ttft"].is_null(), "{v}");
    assert!(v["first_line"]["p50_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(v["accepted"], 2, "{v}");
    assert_eq!(v["warmups"], 2, "{v}");
    assert!(v["cached_share"].as_f64().unwrap() > 0.5, "{v}");
    assert!(v["mean_prompt_chars"].as_f64().unwrap() > 1000.0, "{v}");
    let cached = logged_cached(&s, 8);
    assert_eq!(cached.len(), 8, "keystrokes and warm-ups: {cached:?}");
}
