//! `greencode prune` end to end on tiny-coder with a small calibration set:
//! exactness of each transformation, the output folder, and bad input.

mod common;

use common::prune_tiny as prune;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use greencode::data::corpus;
use greencode::generate::loaded::LoadedModel;
use greencode::model::LayerMask;
use greencode::prune::apply::{build, PrunePlan};
use serde_json::Value;

/// A small calibration folder: six files of the stdlib calibration split.
fn calib_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let stdlib = corpus::stdlib_dir().unwrap();
    for f in corpus::calibration_files(&stdlib).unwrap().iter().take(6) {
        std::fs::copy(f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    dir
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "prune failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn logits(p: &LoadedModel, ids: &[u32], mask: Option<&LayerMask>) -> Tensor {
    let x = Tensor::new(ids, p.model.device()).unwrap().unsqueeze(0).unwrap();
    p.model.logits(&x, mask).unwrap().squeeze(0).unwrap()
}

fn report(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("prune_report.json")).unwrap()).unwrap()
}

const PROMPT: &str = "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n";

#[test]
fn calibration_and_held_out_files_never_overlap() {
    let stdlib = corpus::stdlib_dir().unwrap();
    let eval: Vec<PathBuf> = corpus::eval_files(&stdlib, corpus::EVAL_FILES).unwrap();
    let calib = corpus::calibration_files(&stdlib).unwrap();
    assert_eq!(eval.len(), corpus::EVAL_FILES);
    assert!(!calib.is_empty());
    for f in &calib {
        assert!(!eval.contains(f), "{} is in both", f.display());
    }
    let all = corpus::python_files(&stdlib).unwrap();
    assert_eq!(eval.len() + calib.len(), all.len());
    // The default calibration corpus is exactly that split.
    let texts = greencode::data::calib::load(None).unwrap();
    assert_eq!(texts.len(), calib.len());
    for t in &texts {
        assert!(!eval.iter().any(|e| e.display().to_string() == t.name), "{}", t.name);
    }
}

#[test]
fn pruning_nothing_gives_identical_logits() {
    let calib = calib_dir();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("same");
    ok(&prune(calib.path(), &dest, &["--vocab-min-count", "0"]));
    let a = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let b = LoadedModel::load_cpu(&dest).unwrap();
    let ids = a.tokenizer.encode(PROMPT).unwrap();
    assert_eq!(b.tokenizer.encode(PROMPT).unwrap(), ids);
    assert_eq!(
        common::max_abs_diff(&logits(&a, &ids, None), &logits(&b, &ids, None)),
        0.0
    );
    let r = report(&dest);
    assert_eq!(r["removed_fraction"], 0.0);
    assert_eq!(r["params_before"], r["params_after"]);
    assert_eq!(r["params_before"]["total"], 25_183_104);
}

#[test]
fn vocabulary_pruning_keeps_logits_of_kept_tokens() {
    let calib = calib_dir();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("vocab");
    ok(&prune(calib.path(), &dest, &[]));
    let r = report(&dest);
    let kept: Vec<u32> = serde_json::from_value(r["vocab"]["kept"].clone()).unwrap();
    assert!(kept.len() < 16384 && kept.len() > 1000, "{}", kept.len());
    assert!(r["vocab"]["closure"].as_u64().unwrap() > 0);
    // Specials and all 256 byte-level base tokens survive.
    for id in 0..6 {
        assert!(kept.contains(&id));
    }
    let a = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let b = LoadedModel::load_cpu(&dest).unwrap();
    assert_eq!(b.model.vocab_size(), kept.len());
    assert_eq!(b.model.config().pruned_from.as_deref(), Some("tiny-coder"));
    // A prompt made of kept tokens: same logits restricted to the kept ids.
    let ids: Vec<u32> = a
        .tokenizer
        .encode(PROMPT)
        .unwrap()
        .into_iter()
        .filter(|id| kept.binary_search(id).is_ok())
        .collect();
    assert!(ids.len() > 20);
    let new_ids: Vec<u32> = ids.iter().map(|id| kept.binary_search(id).unwrap() as u32).collect();
    let text = a.tokenizer.decode(&ids, false).unwrap();
    assert_eq!(
        b.tokenizer.decode(&new_ids, false).unwrap(),
        text,
        "kept ids decode to the same text"
    );
    let simple = "    return self\n";
    let orig_ids = a.tokenizer.encode(simple).unwrap();
    let mapped: Vec<u32> = orig_ids
        .iter()
        .map(|id| kept.binary_search(id).expect("common tokens are kept") as u32)
        .collect();
    assert_eq!(
        b.tokenizer.encode(simple).unwrap(),
        mapped,
        "the pruned tokenizer gives the mapped ids"
    );
    let index = Tensor::new(kept.as_slice(), a.model.device()).unwrap();
    let restricted = logits(&a, &ids, None).index_select(&index, 1).unwrap();
    assert_eq!(common::max_abs_diff(&restricted, &logits(&b, &new_ids, None)), 0.0);
    // `eval kl` compares the pruned model with the original over the kept tokens.
    let tiny = common::tiny_coder();
    let kl = |model: &Path, reference: &Path| {
        common::greencode(&[
            "eval",
            "kl",
            "--model",
            model.to_str().unwrap(),
            "--reference",
            reference.to_str().unwrap(),
            "--files",
            "2",
            "--format",
            "json",
        ])
    };
    let same = kl(&dest, &dest);
    assert!(same.status.success(), "{}", String::from_utf8_lossy(&same.stderr));
    let v: Value = serde_json::from_slice(&same.stdout).unwrap();
    assert_eq!(v["kl"], 0.0);
    assert_eq!(v["top1_agreement"], 1.0);
    let out = kl(&dest, &tiny);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Restricted to kept tokens and renormalised, the logits are equal: KL is ~0.
    assert!(v["kl"].as_f64().unwrap() < 1e-4, "{v}");
    assert!(v["tokens"].as_u64().unwrap() > 100);
    common::assert_clean_error(&kl(&tiny, &dest), &["not in the reference's vocabulary"]);

    // Any text still tokenizes and decodes back, even with tokens the corpus never used.
    let text = "naïve Ωmega ✓ — 你好, zzqxj_unusual_identifier = 0x7FfF\n\ttabs\r\n";
    let enc = b.tokenizer.encode(text).unwrap();
    assert_eq!(b.tokenizer.decode(&enc, false).unwrap(), text);
}

#[test]
fn removing_layers_equals_masking_them_and_ffn_keep_all_is_identity() {
    let calib = calib_dir();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("layers");
    ok(&prune(
        calib.path(),
        &dest,
        &["--vocab-min-count", "0", "--drop-layers", "2"],
    ));
    let r = report(&dest);
    let kept: Vec<usize> = serde_json::from_value(r["kept_layers"].clone()).unwrap();
    assert_eq!(kept.len(), 10);
    let removed: Vec<usize> = (0..12).filter(|i| !kept.contains(i)).collect();
    let steps = r["layer_steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["candidates"].as_array().unwrap().len(), 12);
    assert_eq!(steps[1]["candidates"].as_array().unwrap().len(), 11);
    let a = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let b = LoadedModel::load_cpu(&dest).unwrap();
    assert_eq!(b.model.num_layers(), 10);
    let ids = a.tokenizer.encode(PROMPT).unwrap();
    let masked = logits(&a, &ids, Some(&LayerMask::without(12, &removed)));
    assert_eq!(common::max_abs_diff(&masked, &logits(&b, &ids, None)), 0.0);

    // FFN keep-all (every neuron index) rebuilds the same model.
    let plan = PrunePlan {
        vocab: None,
        kept_layers: (0..12).collect(),
        ffn: Some(vec![(0..1024).collect(); 12]),
    };
    let same = build(&a.model, &plan).unwrap();
    let x = Tensor::new(ids.as_slice(), a.model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    assert_eq!(
        common::max_abs_diff(&a.model.logits(&x, None).unwrap(), &same.logits(&x, None).unwrap()),
        0.0
    );
}

#[test]
fn ffn_pruning_by_each_score_writes_a_working_folder() {
    let calib = calib_dir();
    let out = tempfile::tempdir().unwrap();
    for score in ["top", "act", "random"] {
        let dest = out.path().join(score);
        ok(&prune(
            calib.path(),
            &dest,
            &[
                "--ffn-keep",
                "768",
                "--ffn-score",
                score,
                "--drop-layers",
                "1",
                "--layer-metric",
                "bi",
            ],
        ));
        let b = LoadedModel::load_cpu(&dest).unwrap();
        assert_eq!(b.model.ffn_widths(), vec![768; 11]);
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dest.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["intermediate_size"], 768);
        assert_eq!(cfg["num_hidden_layers"], 11);
        assert_eq!(cfg["greencode_prune"]["ffn_score"], score);
    }
    // The pruned folder works with generate and eval ppl.
    let dest = out.path().join("act");
    let v = common::generate_json(&dest, &["--prompt", "def add(a, b):\n", "--max-tokens", "8"]);
    assert_eq!(v["completion_tokens"], 8);
    let ppl = common::greencode(&[
        "eval",
        "ppl",
        "--model",
        dest.to_str().unwrap(),
        "--files",
        "2",
        "--format",
        "json",
    ]);
    assert!(ppl.status.success(), "{}", String::from_utf8_lossy(&ppl.stderr));
    let v: Value = serde_json::from_slice(&ppl.stdout).unwrap();
    assert!(v["bits_per_byte"].as_f64().unwrap() > 0.0);
}

#[test]
fn target_mode_reaches_the_ratio_and_reports_held_out_quality() {
    let calib = calib_dir();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("t22");
    let model = common::tiny_coder();
    let run = common::greencode(&[
        "prune",
        "--model",
        model.to_str().unwrap(),
        "--out",
        dest.to_str().unwrap(),
        "--calib",
        calib.path().to_str().unwrap(),
        "--target",
        "0.22",
        "--calib-samples",
        "6",
        "--calib-len",
        "128",
        "--eval-files",
        "2",
    ]);
    ok(&run);
    // The held-out evaluation shows its three passes as it goes.
    let log = String::from_utf8_lossy(&run.stderr);
    for pass in ["original", "pruned", "KL"] {
        assert!(log.contains(&format!("held-out evaluation: {pass}:")), "{log}");
    }
    let r = report(&dest);
    assert!(
        r["removed_fraction"].as_f64().unwrap() >= 0.22,
        "{}",
        r["removed_fraction"]
    );
    let cands = r["target_candidates"].as_array().unwrap();
    assert!(cands.len() >= 2, "{cands:?}");
    for c in cands {
        assert!(c["removed_fraction"].as_f64().unwrap() >= 0.22);
        assert!(c["validation_kl"].as_f64().unwrap() > 0.0);
    }
    let before = r["held_out_before"]["bits_per_byte"].as_f64().unwrap();
    let after = r["held_out_after"]["bits_per_byte"].as_f64().unwrap();
    assert!(after > before, "pruning should cost some quality: {before} → {after}");
    assert!(r["held_out_kl"]["kl"].as_f64().unwrap() > 0.0);
    let after_params = r["params_after"]["total"].as_u64().unwrap();
    let b = LoadedModel::load_cpu(&dest).unwrap();
    assert_eq!(
        greencode::prune::apply::count_params(&b.model).total as u64,
        after_params
    );
    for stage in ["vocabulary", "target search", "held-out evaluation", "total"] {
        assert!(
            r["seconds"].as_array().unwrap().iter().any(|s| s[0] == stage),
            "{stage}"
        );
    }
}

#[test]
fn pruned_tokenizer_loads_in_python_tokenizers_and_round_trips_held_out_code() {
    let calib = calib_dir();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("py");
    ok(&prune(calib.path(), &dest, &[]));
    common::ensure_python_package("tokenizers", "tokenizers");
    let held_out = corpus::eval_files(&corpus::stdlib_dir().unwrap(), 40).unwrap();
    let file = held_out
        .iter()
        .find(|f| f.ends_with("argparse.py"))
        .unwrap_or(&held_out[0]);
    let script = "import sys\nfrom tokenizers import Tokenizer\nt = Tokenizer.from_file(sys.argv[1])\ns = open(sys.argv[2], encoding='utf-8').read()\nids = t.encode(s).ids\nassert t.decode(ids) == s\nassert max(ids) < t.get_vocab_size()\nprint(len(ids), t.get_vocab_size())\n";
    let o = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            dest.join("tokenizer.json").to_str().unwrap(),
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Same ids as our own tokenizer.
    let b = LoadedModel::load_cpu(&dest).unwrap();
    let ours = b.tokenizer.encode(&std::fs::read_to_string(file).unwrap()).unwrap();
    let printed = String::from_utf8_lossy(&o.stdout);
    assert_eq!(printed.split_whitespace().next().unwrap(), ours.len().to_string());
}

#[test]
fn bad_input_is_refused_and_leaves_no_folder() {
    let calib = calib_dir();
    let out = tempfile::tempdir().unwrap();
    // Output exists.
    let exists = out.path().join("exists");
    std::fs::create_dir(&exists).unwrap();
    common::assert_fails_with(&prune(calib.path(), &exists, &[]), &["already exists", "--force"]);
    ok(&prune(calib.path(), &exists, &["--force", "--vocab-min-count", "0"]));
    assert!(exists.join("config.json").is_file());
    // Unreachable target.
    let dest = out.path().join("never");
    common::assert_fails_with(
        &prune(calib.path(), &dest, &["--target", "0.99"]),
        &["--target 0.99 is unreachable"],
    );
    assert!(!dest.exists());
    // Calibration corpus missing or empty.
    common::assert_fails_with(
        &prune(Path::new("/nonexistent/calib"), &dest, &[]),
        &["/nonexistent/calib"],
    );
    let empty = tempfile::tempdir().unwrap();
    common::assert_fails_with(&prune(empty.path(), &dest, &[]), &["holds no text"]);
    let jsonl = empty.path().join("bad.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"x = 1\"}\n{\"txt\": 5}\n").unwrap();
    common::assert_fails_with(&prune(&jsonl, &dest, &[]), &["bad.jsonl:2", "`text`"]);
    // Unknown architecture.
    let m = common::model_copy();
    let cfg_path = m.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = "llama".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let o = common::greencode(&[
        "prune",
        "--model",
        m.path().to_str().unwrap(),
        "--out",
        dest.to_str().unwrap(),
        "--calib",
        calib.path().to_str().unwrap(),
    ]);
    common::assert_fails_with(&o, &["unsupported architecture `llama`"]);
    // Too many layers.
    common::assert_fails_with(
        &prune(calib.path(), &dest, &["--drop-layers", "12"]),
        &["cannot remove 12 of 12 layers"],
    );
    assert!(!dest.exists());
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "only the forced folder remains: {leftovers:?}");
}
