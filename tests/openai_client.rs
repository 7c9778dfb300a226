//! The official `openai` Python client against `greencode serve`.

mod common;

use std::process::Command;

#[test]
fn openai_python_client_drives_completions_streaming_fim_and_chat() {
    common::ensure_python_package("openai", "openai");
    let s = common::Server::start(&["--api-key", "sekret"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let golden = common::tiny_coder().join("golden.json");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&s.base)
        .arg(&golden)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"));
}
