//! `greencode bench soak` against a real server: short requests, some
//! abandoned mid-stream or before their answer; no other error, nothing left
//! running, and the report says so.

mod common;

#[test]
fn soak_with_cancellations_leaves_no_errors_and_nothing_running() {
    let model = common::tiny_coder();
    let out = common::greencode(&[
        "--threads",
        "2",
        "bench",
        "soak",
        "--model",
        model.to_str().unwrap(),
        "--requests",
        "60",
        "--clients",
        "6",
        "--cancel",
        "0.5",
        "--max-tokens",
        "8",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let report = &r["report"];
    assert_eq!(report["requests"], 60);
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["completed"].as_u64().unwrap() > 0, "{report}");
    assert!(report["cancelled"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(r["running_after"].as_f64(), Some(0.0));
    assert!(r["rss_before_bytes"].as_u64().unwrap() > 0);
    assert!(r["rss_after_bytes"].as_u64().unwrap() > 0);
}
