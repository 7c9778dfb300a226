//! Which model a subcommand uses: `--model`, `GREENCODE_MODEL`, then the
//! embedded model beside an installed binary.

mod common;

use std::process::Command;

fn generate_json(cmd: &mut Command) -> serde_json::Value {
    let out = cmd
        .args([
            "generate",
            "--prompt",
            "def fibonacci(n):\n",
            "--max-tokens",
            "4",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn installed_binary_finds_the_embedded_model_under_its_prefix() {
    let prefix = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(prefix.path().join("bin")).unwrap();
    std::fs::create_dir_all(prefix.path().join("share/greencode/models")).unwrap();
    let bin = prefix.path().join("bin/greencode");
    std::fs::copy(env!("CARGO_BIN_EXE_greencode"), &bin).unwrap();
    std::os::unix::fs::symlink(
        common::tiny_coder(),
        prefix.path().join("share/greencode/models/tiny-coder"),
    )
    .unwrap();
    let v = generate_json(Command::new(&bin).env_remove("GREENCODE_MODEL"));
    assert_eq!(v["token_ids"], serde_json::json!([8, 263, 374, 294]));
}

#[test]
fn the_environment_variable_and_the_flag_take_precedence() {
    // GREENCODE_MODEL pointing nowhere is an error naming that folder ...
    let out = Command::new(env!("CARGO_BIN_EXE_greencode"))
        .env("GREENCODE_MODEL", "/nonexistent/env-model")
        .args(["generate", "--prompt", "x"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/env-model"));
    // ... and --model wins over it.
    let model = common::tiny_coder();
    let out = Command::new(env!("CARGO_BIN_EXE_greencode"))
        .env("GREENCODE_MODEL", "/nonexistent/env-model")
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "def fibonacci(n):\n",
        ])
        .args(["--max-tokens", "4", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["completion_tokens"], 4);
}
