//! `greencode recover` as a user runs it: a pruned student distilled from
//! tiny-coder, the PEFT adapter files, the merged folder, exact resume after
//! an interruption, and clear errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::Device;
use greencode::data::corpus;
use serde_json::Value;

/// Shared fixtures: a small calibration folder and a pruned student (vocabulary
/// pruned, 2 layers dropped, FFN 512), built once per test binary.
struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    student: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let stdlib = corpus::stdlib_dir().unwrap();
        for f in corpus::calibration_files(&stdlib).unwrap().iter().take(4) {
            std::fs::copy(f, data.join(f.file_name().unwrap())).unwrap();
        }
        let student = dir.path().join("student");
        let out = common::prune_tiny(&data, &student, &["--drop-layers", "2", "--ffn-keep", "512"]);
        assert!(out.status.success(), "prune: {}", String::from_utf8_lossy(&out.stderr));
        Fixture {
            _dir: dir,
            data,
            student,
        }
    })
}

/// `recover` arguments for a short run into `out`.
fn args(out: &Path, extra: &[&str]) -> Vec<String> {
    let f = fixture();
    let mut a: Vec<String> = [
        "recover",
        "--student",
        f.student.to_str().unwrap(),
        "--teacher",
        common::tiny_coder().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--data",
        f.data.to_str().unwrap(),
        "--batch",
        "2",
        "--seq-len",
        "48",
        "--warmup",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !extra.contains(&"--rank") {
        a.extend(["--rank".to_string(), "4".to_string()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn recover(out: &Path, extra: &[&str]) -> std::process::Output {
    let a = args(out, extra);
    common::greencode(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

fn ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "recover failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn trains_writes_a_peft_adapter_and_a_merged_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("recovered");
    let o = recover(
        &out,
        &[
            "--steps", "12", "--lr", "3e-3", "--merge", "--format", "json", "--files", "2", "--window", "96",
        ],
    );
    ok(&o);
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["steps"], 12);
    assert_eq!(report["history"].as_array().unwrap().len(), 12);
    let (before, after) = (&report["before"], &report["after"]);
    let kl = |v: &Value| v["kl"].as_f64().unwrap();
    assert!(kl(after) < kl(before), "held-out KL must fall: {before} → {after}");
    assert!(report["teacher_bits_per_byte"].as_f64().unwrap() > 0.0);
    assert_eq!(json(&out.join("recover_report.json"))["steps"], 12);

    // PEFT's layout, read from the files.
    let adapter = out.join("adapter");
    let cfg = json(&adapter.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 32);
    assert_eq!(cfg["bias"], "none");
    let modules: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        modules,
        [
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ]
    );
    assert!(Path::new(cfg["base_model_name_or_path"].as_str().unwrap()).is_absolute());
    let tensors = candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let student_cfg = json(&fixture().student.join("config.json"));
    let layers = student_cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    assert_eq!(tensors.len(), layers * 7 * 2);
    let q_a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let q_b = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    assert_eq!(q_a.dims(), [4, 384]);
    assert_eq!(q_b.dims(), [384, 4]);
    let down_a = &tensors[&format!(
        "base_model.model.model.layers.{}.mlp.down_proj.lora_A.weight",
        layers - 1
    )];
    assert_eq!(down_a.dims(), [4, 512]);
    assert!(
        q_b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0,
        "B trained"
    );

    // The merged folder is an ordinary model: it loads and generates.
    assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
    assert_eq!(json(&out.join("config.json"))["greencode_recover"]["steps"], 12);
    let g = common::generate_json(&out, &["--prompt", "def add(a, b):\n", "--max-tokens", "8"]);
    assert_eq!(g["completion_tokens"], 8, "{g}");
    // No temporary or checkpoint folder is left behind.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["recovered"]);
}

#[test]
fn resume_after_an_interruption_reaches_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let common_args = [
        "--steps",
        "40",
        "--checkpoint-every",
        "2",
        "--files",
        "0",
        "--lr",
        "2e-3",
    ];
    let straight = tmp.path().join("straight");
    ok(&recover(&straight, &common_args));

    let resumed = tmp.path().join("resumed");
    let a = args(&resumed, &common_args);
    let child = Command::new(env!("CARGO_BIN_EXE_greencode"))
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ckpt = tmp.path().join("resumed.checkpoint");
    let t0 = Instant::now();
    while !ckpt.join("state.json").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Ctrl-C: the run saves the step it is on and stops.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    assert!(!resumed.exists(), "an interrupted run writes no output folder");
    let state = json(&ckpt.join("state.json"));
    let stopped_at = state["step"].as_u64().unwrap();
    assert!(stopped_at > 0 && stopped_at < 40, "{state}");

    // Without --resume the checkpoint is not silently overwritten.
    let again = recover(&resumed, &common_args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    // Changed options are refused.
    let mut changed: Vec<&str> = common_args.to_vec();
    let last = changed.len() - 1;
    changed[last] = "1e-3";
    changed.push("--resume");
    let wrong = recover(&resumed, &changed);
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("lr"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    let mut resume_args = common_args.to_vec();
    resume_args.push("--resume");
    ok(&recover(&resumed, &resume_args));
    assert!(!ckpt.exists(), "the checkpoint is removed once the run completes");
    let load =
        |dir: &Path| candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let (x, y) = (load(&straight), load(&resumed));
    assert_eq!(x.len(), y.len());
    for (name, t) in &x {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = y[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(a == b, "{name} differs after resuming at step {stopped_at}");
    }
    assert_eq!(
        json(&resumed.join("recover_report.json"))["resumed_at_step"],
        stopped_at
    );
}

#[test]
fn rewrite_trains_on_the_teachers_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rw");
    let o = recover(
        &out,
        &[
            "--steps",
            "2",
            "--rewrite",
            "4",
            "--loss",
            "kl+ce",
            "--files",
            "0",
            "--format",
            "json",
        ],
    );
    ok(&o);
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rw = &report["rewrite"];
    assert_eq!(rw["prompts"], 4);
    assert_eq!(rw["answer_tokens"], 12);
    // The pruned student (2 of 12 layers and half of every FFN gone) departs
    // from the teacher's greedy answer somewhere in 4 × 12 tokens...
    let diverged = rw["diverged"].as_u64().unwrap();
    assert!((1..=4).contains(&diverged), "{rw}");
    // ...and a student that is the teacher itself never does.
    let same = tmp.path().join("same");
    let mut a = args(
        &same,
        &["--steps", "1", "--rewrite", "4", "--files", "0", "--format", "json"],
    );
    let student = a.iter().position(|x| x == "--student").unwrap() + 1;
    a[student] = common::tiny_coder().to_str().unwrap().to_owned();
    let o = common::greencode(&a.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&o);
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["rewrite"]["diverged"], 0, "{}", report["rewrite"]);
}

#[test]
fn bad_input_gets_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let o = recover(&out, &["--rank", "0", "--files", "0"]);
    common::assert_clean_error(&o, &["--rank"]);
    let o = recover(&out, &["--targets", "q,lm_head", "--steps", "1", "--files", "0"]);
    common::assert_clean_error(&o, &["lm_head", "untie"]);
    let o = recover(&out, &["--targets", "q,zz", "--files", "0"]);
    common::assert_clean_error(&o, &["zz"]);
    let o = recover(&out, &["--loss", "mse", "--files", "0"]);
    common::assert_clean_error(&o, &["--loss"]);
    let o = recover(&out, &["--resume", "--files", "0"]);
    common::assert_clean_error(&o, &["no checkpoint"]);
    std::fs::create_dir(&out).unwrap();
    let o = recover(&out, &["--files", "0"]);
    common::assert_clean_error(&o, &["already exists"]);

    // A teacher whose vocabulary lacks the student's tokens: swap the roles.
    let swapped = tmp.path().join("swapped");
    let o = common::greencode(&[
        "recover",
        "--student",
        common::tiny_coder().to_str().unwrap(),
        "--teacher",
        fixture().student.to_str().unwrap(),
        "--out",
        swapped.to_str().unwrap(),
        "--data",
        fixture().data.to_str().unwrap(),
        "--files",
        "0",
    ]);
    common::assert_clean_error(&o, &["vocabularies cannot be mapped"]);
    assert!(!swapped.exists());
}

#[test]
fn ctrl_c_before_training_stops_before_the_first_step_and_writes_nothing() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("early");
    // The signal lands while the "before" evaluation runs.
    let a = args(&out, &["--steps", "5", "--files", "6", "--window", "256"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_greencode"))
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    // The data is loaded (the handler is installed) and evaluation begins.
    while err.read_line(&mut line).unwrap() > 0 && !line.contains("training windows") {
        line.clear();
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("interrupted before training started"), "{rest}");
    assert!(!out.exists() && !tmp.path().join("early.checkpoint").exists());
}
