//! `greencode eval infill`: the single-line infilling set is deterministic,
//! pinned by hash, disjoint from the pruning calibration files, and scored
//! end to end through the CLI.

mod common;

use greencode::data::corpus;
use greencode::eval::infill;

/// Hash and size of the full set from python 3.11's first 40 stdlib files.
const PINNED_HASH: &str = "28a00f50ef931886";
const PINNED_ITEMS: usize = 1474;

#[test]
fn set_is_deterministic_pinned_and_disjoint_from_calibration() {
    let golden = common::golden();
    let want_files: Vec<String> = serde_json::from_value(golden["stdlib_eval"]["files"].clone()).unwrap();
    let dir = corpus::stdlib_dir().expect("python3 finds its standard library");
    let files = corpus::eval_files(&dir, corpus::EVAL_FILES).unwrap();
    let first = infill::build_set(&files).unwrap();
    let again = infill::build_set(&files).unwrap();
    assert_eq!(first, again, "two builds of the set differ");
    assert!(first.len() > 100, "only {} items", first.len());
    let calibration: Vec<String> = corpus::calibration_files(&dir)
        .unwrap()
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let eval_names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for item in &first {
        assert!(eval_names.contains(&item.file), "{} is not an eval file", item.file);
        assert!(
            !calibration.contains(&item.file),
            "{} is also a calibration file",
            item.file
        );
        assert!(item.prefix.ends_with('\n') || item.prefix.is_empty());
        assert!(item.suffix.starts_with('\n'));
        assert!(!item.middle.contains('\n'));
    }
    if eval_names != want_files {
        return common::missing_data(
            "the pinned infill set hash",
            &format!(
                "this python3's stdlib ({}) has another first-40 file list than golden.json's",
                dir.display()
            ),
        );
    }
    assert_eq!(
        (infill::set_hash(&first).as_str(), first.len()),
        (PINNED_HASH, PINNED_ITEMS)
    );
}

#[test]
fn eval_infill_cli_scores_a_spread_subset() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("infill.jsonl");
    let model = common::tiny_coder();
    let out = common::greencode(&[
        "eval",
        "infill",
        "--model",
        model.to_str().unwrap(),
        "--limit",
        "4",
        "--out",
        out_path.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["items"], 4);
    let stdlib = corpus::stdlib_dir().unwrap();
    let full = infill::build_set(&corpus::eval_files(&stdlib, corpus::EVAL_FILES).unwrap()).unwrap();
    let subset = infill::spread(full, 4);
    assert_eq!(report["set_hash"], infill::set_hash(&subset));
    let em = report["exact_match"].as_f64().unwrap();
    let sim = report["edit_similarity"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&em) && (0.0..=1.0).contains(&sim));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for (row, item) in rows.iter().zip(&subset) {
        assert_eq!(row["expected"], item.middle.as_str());
        assert_eq!(row["line"], item.line);
        let generated = row["generated"].as_str().unwrap();
        assert!(!generated.contains('\n'), "a single line was asked: {generated:?}");
        let mean = rows.iter().map(|r| r["similarity"].as_f64().unwrap()).sum::<f64>() / 4.0;
        assert!((mean - sim).abs() < 1e-9);
    }
}
