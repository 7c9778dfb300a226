//! Bad input to the CLI: each case is one clear `error:` line naming the file
//! or field, a non-zero exit and no panic.

mod common;

use std::path::Path;

use common::{assert_clean_error, greencode, model_copy};

fn generate_with(model: &Path, prompt: &str) -> std::process::Output {
    greencode(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-tokens",
        "2",
    ])
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn help_lists_subcommands_with_descriptions() {
    let out = greencode(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["generate", "eval", "bench"] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(cmd) && l.len() > cmd.len() + 8),
            "{cmd} missing in:\n{text}"
        );
    }
}

#[test]
fn missing_model_folder() {
    let out = generate_with(Path::new("/nonexistent/model"), "x");
    assert_clean_error(&out, &["model folder /nonexistent/model does not exist"]);
}

#[test]
fn missing_config_file_and_field() {
    let dir = model_copy();
    edit_config(dir.path(), |c| {
        c.remove("hidden_size");
    });
    assert_clean_error(
        &generate_with(dir.path(), "x"),
        &["config.json", "field `hidden_size`: missing"],
    );
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_clean_error(&generate_with(dir.path(), "x"), &["config.json: file not found"]);
}

#[test]
fn malformed_config_field_and_json() {
    let dir = model_copy();
    edit_config(dir.path(), |c| {
        c.insert("num_hidden_layers".into(), "twelve".into());
    });
    assert_clean_error(
        &generate_with(dir.path(), "x"),
        &["config.json", "field `num_hidden_layers`: expected a positive integer"],
    );
    std::fs::write(dir.path().join("config.json"), "{\"vocab_size\": 16384,").unwrap();
    assert_clean_error(&generate_with(dir.path(), "x"), &["config.json: invalid JSON"]);
    edit_config_fresh(dir.path(), |c| {
        c.insert("model_type".into(), "llama".into());
    });
    assert_clean_error(
        &generate_with(dir.path(), "x"),
        &["field `model_type`", "unsupported architecture `llama`"],
    );
}

fn edit_config_fresh(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    std::fs::copy(common::tiny_coder().join("config.json"), dir.join("config.json")).unwrap();
    edit_config(dir, edit);
}

#[test]
fn tensor_shape_mismatch_names_tensor_and_file() {
    let dir = model_copy();
    edit_config(dir.path(), |c| {
        c.insert("num_key_value_heads".into(), 3.into());
    });
    assert_clean_error(
        &generate_with(dir.path(), "x"),
        &[
            "model-00002-of-00004.safetensors",
            "`model.layers.0.self_attn.k_proj.weight` has shape [128, 384], expected [192, 384]",
        ],
    );
}

#[test]
fn a_vocabulary_smaller_than_the_tokenizer_is_refused_by_every_command() {
    let dir = model_copy();
    edit_config(dir.path(), |c| {
        c.insert("vocab_size".into(), 16000.into());
    });
    let needles = [
        "tokenizer.json",
        "the tokenizer has 16384 tokens but the model's vocabulary (`vocab_size`) has only 16000",
    ];
    assert_clean_error(&generate_with(dir.path(), "x"), &needles);
    // The server loads by the same path (it had no such check before).
    let out = greencode(&["serve", "--model", dir.path().to_str().unwrap(), "--port", "0"]);
    assert_clean_error(&out, &needles);
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = model_copy();
    let shard = dir.path().join("model-00003-of-00004.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::remove_file(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(
        &generate_with(dir.path(), "x"),
        &["model-00003-of-00004.safetensors: not a valid safetensors file"],
    );
}

#[test]
fn missing_shard_and_missing_tokenizer() {
    let dir = model_copy();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert_clean_error(&generate_with(dir.path(), "x"), &["tokenizer.json: file not found"]);
    std::fs::remove_file(dir.path().join("model-00002-of-00004.safetensors")).unwrap();
    assert_clean_error(
        &generate_with(dir.path(), "x"),
        &["model-00002-of-00004.safetensors: file not found"],
    );
}

#[test]
fn empty_prompt_is_refused_unless_a_suffix_is_given() {
    let model = common::tiny_coder();
    assert_clean_error(&generate_with(&model, ""), &["the prompt is empty"]);
    let out = greencode(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "",
        "--suffix",
        "\n    return x\n",
        "--max-tokens",
        "3",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn prompt_longer_than_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.py");
    std::fs::write(&file, "value_number_one = compute(alpha, beta)\n".repeat(300)).unwrap();
    let model = common::tiny_coder();
    let out = greencode(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-file",
        file.to_str().unwrap(),
    ]);
    assert_clean_error(&out, &["the prompt has", "context length is 1024"]);
    let missing = dir.path().join("absent.py");
    let out = greencode(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-file",
        missing.to_str().unwrap(),
    ]);
    assert_clean_error(&out, &["absent.py"]);
}

#[test]
fn bad_sampling_values_and_missing_corpus() {
    let model = common::tiny_coder();
    let out = greencode(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--top-p",
        "0",
    ]);
    assert_clean_error(&out, &["--top-p"]);
    let out = greencode(&[
        "eval",
        "ppl",
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        "/nonexistent/corpus",
    ]);
    assert_clean_error(&out, &["corpus folder /nonexistent/corpus does not exist"]);
}

#[test]
fn a_file_for_the_model_folder_and_a_bad_gguf_are_named_as_such() {
    let model = common::tiny_coder();
    let config = model.join("config.json");
    assert_clean_error(
        &generate_with(&config, "x"),
        &["config.json is a file, not a model folder"],
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("model.gguf");
    std::fs::write(&bad, "garbage, not a GGUF header").unwrap();
    assert_clean_error(
        &generate_with(&bad, "x"),
        &["model.gguf: not a valid GGUF file", "unknown magic"],
    );
}

/// A clap usage error: failure, no panic, the first line names `flag` and
/// says what is wrong with its value.
fn assert_flag_error(out: &std::process::Output, flag: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.starts_with("error: ") && first.contains(flag) && first.contains(what),
        "{stderr}"
    );
}

#[test]
fn counts_and_negative_numbers_are_refused_naming_their_flag() {
    let model = common::tiny_coder();
    let m = model.to_str().unwrap();
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", m, "--prompt", "x"];
        args.extend_from_slice(extra);
        greencode(&args)
    };
    assert_flag_error(&gen(&["--max-tokens", "-1"]), "--max-tokens", "invalid");
    assert_clean_error(&gen(&["--temperature", "-1"]), &["--temperature must be a number ≥ 0"]);
    assert_clean_error(&gen(&["--max-tokens", "0"]), &["--max-tokens must be at least 1"]);
    assert_clean_error(
        &gen(&["--max-tokens", "5000"]),
        &["--max-tokens 5000 exceeds the model's context length 1024"],
    );
    let out = greencode(&["eval", "ppl", "--model", m, "--files", "0"]);
    assert_clean_error(&out, &["--files must be at least 1"]);
    let out = greencode(&["eval", "ppl", "--model", m, "--window", "0"]);
    assert_flag_error(&out, "--window", "must be at least 1");
    let out = greencode(&["serve", "--model", m, "--max-batch", "0"]);
    assert_flag_error(&out, "--max-batch", "must be at least 1");
}

#[test]
fn quantize_keeps_an_existing_file_and_refuses_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("kept.gguf");
    std::fs::write(&existing, "someone's file").unwrap();
    let out = greencode(&["quantize", "--type", "q8_0", "--out", existing.to_str().unwrap()]);
    assert_clean_error(&out, &["kept.gguf already exists (pass --force to replace it)"]);
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "someone's file");
    let out = greencode(&["quantize", "--type", "q8_0", "--out", dir.path().to_str().unwrap()]);
    assert_clean_error(&out, &["is a folder; give the path of the .gguf file to write"]);
}

#[test]
fn prune_checks_its_sizes_before_calibrating() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("pruned");
    let out = out_dir.to_str().unwrap();
    for (flag, value, says) in [
        ("--drop-layers", "20", "cannot remove 20 of 12 layers"),
        ("--ffn-keep", "5000", "--ffn-keep 5000 exceeds the FFN width 1024"),
    ] {
        let run = greencode(&["prune", "--out", out, flag, value]);
        // One line: nothing was calibrated (or warned about) first.
        assert_clean_error(&run, &[says]);
        assert!(!out_dir.exists());
    }
}
