//! `greencode eval ppl --corpus stdlib` reproduces golden.json's held-out perplexity.

mod common;

use greencode::data::corpus;
use greencode::eval::perplexity::perplexity;
use greencode::generate::loaded::LoadedModel;

#[test]
fn stdlib_perplexity_matches_golden() {
    let golden = common::golden();
    let eval = &golden["stdlib_eval"];
    let want_files: Vec<String> = serde_json::from_value(eval["files"].clone()).unwrap();
    let dir = match corpus::stdlib_dir() {
        Ok(d) => d,
        Err(e) => return common::missing_data("stdlib_perplexity_matches_golden", &e.to_string()),
    };
    let files = corpus::eval_files(&dir, corpus::EVAL_FILES).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    if names != want_files {
        return common::missing_data(
            "stdlib_perplexity_matches_golden",
            &format!(
                "this python3's stdlib ({}) has a different first-40 file list than golden.json's (other Python version)",
                dir.display()
            ),
        );
    }
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let report = perplexity(&p.model, &p.tokenizer, &files, 1024, |_, _| {}).unwrap();
    assert_eq!(report.files, want_files);
    assert_eq!(report.tokens as u64, eval["tokens"].as_u64().unwrap());
    assert_eq!(report.bytes as u64, eval["bytes"].as_u64().unwrap());
    let want_ppl = eval["ppl"].as_f64().unwrap();
    assert!((report.ppl - want_ppl).abs() < 0.01, "ppl {} vs {want_ppl}", report.ppl);
    let want_bpb = eval["bits_per_byte"].as_f64().unwrap();
    assert!(
        (report.bits_per_byte - want_bpb).abs() < 1e-3,
        "bpb {} vs {want_bpb}",
        report.bits_per_byte
    );
}

#[test]
fn eval_ppl_cli_json_on_a_small_corpus() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.py"), "def add(a, b):\n    return a + b\n").unwrap();
    std::fs::write(dir.path().join("a.py"), "import os\n\nprint(os.getcwd())\n").unwrap();
    std::fs::write(dir.path().join("c.txt"), "not python").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/z.py"), "x = 1\n").unwrap();
    let model = common::tiny_coder();
    let out = common::greencode(&[
        "eval",
        "ppl",
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        dir.path().to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["files"], serde_json::json!(["a.py", "b.py"]));
    let nll = v["mean_nll"].as_f64().unwrap();
    assert!(nll > 0.0 && nll < 10.0);
    assert!((v["ppl"].as_f64().unwrap() - nll.exp()).abs() < 1e-9);
    assert!(v["tokens"].as_u64().unwrap() > 10);
}
