//! Energy accounting over real HTTP: every response says what it cost, the
//! energy adds up, `/metrics` parses, and bad settings are refused.

mod common;

use std::collections::HashMap;

use common::Server;
use serde_json::{json, Value};

/// Parses Prometheus text into (name{labels} → value), checking every line's syntax.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "bad comment line: {line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        out.insert(series.to_owned(), value);
    }
    out
}

/// Whether an NVIDIA driver and GPU 0 with an energy counter are present
/// (checked with NVML directly, not through greencode's meter).
fn nvml_present() -> bool {
    nvml_wrapper::Nvml::init()
        .ok()
        .and_then(|n| n.device_by_index(0).ok()?.total_energy_consumption().ok())
        .is_some()
}

/// Whether a readable RAPL package counter is present.
fn rapl_present() -> bool {
    std::fs::read_dir("/sys/class/powercap").is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("intel-rapl:")
                && name.matches(':').count() == 1
                && std::fs::read_to_string(e.path().join("energy_uj")).is_ok()
        })
    })
}

/// The meter `--energy auto` must pick on this machine: the first
/// hardware counter present (NVML, then RAPL), else the estimate.
fn expected_source() -> &'static str {
    if nvml_present() {
        "nvml"
    } else if rapl_present() {
        "rapl"
    } else {
        "estimated"
    }
}

fn metric(m: &HashMap<String, f64>, prefix: &str) -> f64 {
    m.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum()
}

#[test]
fn usage_reports_cost_and_energy_is_conserved_over_concurrent_requests() {
    let s = Server::start(&[]);
    let before = parse_metrics(&s.get("/metrics").1);
    let base = s.base.clone();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let base = base.clone();
            std::thread::spawn(move || {
                let r = common::agent()
                    .post(format!("{base}/v1/completions"))
                    .send(
                        json!({"prompt": format!("def f{i}(x):\n"), "max_tokens": 12, "n": 2, "seed": i})
                            .to_string()
                            .as_bytes(),
                    )
                    .unwrap();
                let v: Value = serde_json::from_str(&r.into_body().read_to_string().unwrap()).unwrap();
                v
            })
        })
        .collect();
    let responses: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Let the engine book its last idle tick, then read the counters.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let after = parse_metrics(&s.get("/metrics").1);
    let source = expected_source();
    let mut request_joules = 0.0;
    for v in &responses {
        let u = &v["usage"];
        assert_eq!(u["energy_source"], source, "{v}");
        assert!(u["gpu_memory_bytes"].is_null());
        let j = u["energy_joules"].as_f64().unwrap();
        // A hardware counter may not tick within a short request; the estimate always does.
        assert!(j > 0.0 || (source != "estimated" && j == 0.0), "{v}");
        assert!(u["flops"].as_u64().unwrap() > 1_000_000);
        let co2 = u["co2_grams"].as_f64().unwrap();
        assert!((co2 - j / 3.6e6 * 475.0).abs() < 1e-12, "CO2 = kWh × 475");
        request_joules += j;
    }
    let total = metric(&after, "greencode_energy_joules_total{") - metric(&before, "greencode_energy_joules_total{");
    let idle =
        metric(&after, "greencode_idle_energy_joules_total{") - metric(&before, "greencode_idle_energy_joules_total{");
    assert!(total > 0.0);
    let gap = (request_joules + idle - total).abs() / total;
    assert!(
        gap < 0.01,
        "requests {request_joules} J + idle {idle} J vs meter {total} J"
    );
    let flops = metric(&after, "greencode_flops_total{") - metric(&before, "greencode_flops_total{");
    let sum_flops: f64 = responses.iter().map(|v| v["usage"]["flops"].as_f64().unwrap()).sum();
    assert_eq!(flops, sum_flops);
    // The source label says where the numbers come from.
    assert!(after
        .keys()
        .any(|k| k.starts_with("greencode_energy_joules_total{") && k.contains(&format!("source=\"{source}\""))));
    assert_eq!(
        after["greencode_model_parameters{component=\"total\",model=\"tiny-coder\"}"],
        25_183_104.0
    );
    assert_eq!(
        after["greencode_model_info{model=\"tiny-coder\",pruned_from=\"\",quantization=\"none\"}"],
        1.0
    );
    assert!(metric(&after, "greencode_energy_per_token_joules_count{") >= 12.0);
    assert!(after.contains_key("greencode_power_watts{model=\"tiny-coder\"}"));
    // Streaming: the final usage chunk carries the cost too.
    let events = s.stream(
        "/v1/completions",
        &json!({"prompt": "import os\n", "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let usage: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    let j = usage["usage"]["energy_joules"].as_f64().unwrap();
    assert!(j > 0.0 || (source != "estimated" && j == 0.0), "{usage}");
    assert_eq!(usage["usage"]["energy_source"], source);
    // One structured log line per request.
    let log = s.log_with("\"event\":\"request\"", 13);
    let lines: Vec<Value> = log
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "request")
        .collect();
    assert!(lines.len() >= 13, "{log:?}");
    assert!(lines.iter().all(|l| {
        let j = l["energy_joules"].as_f64().unwrap();
        (j > 0.0 || (source != "estimated" && j == 0.0)) && l["energy_source"] == source
    }));
}

#[test]
fn metrics_parse_with_prometheus_client() {
    let s = Server::start(&[]);
    s.post("/v1/completions", &json!({"prompt": "x = ", "max_tokens": 3}));
    let text = s.get("/metrics").1;
    common::ensure_python_package("prometheus_client", "prometheus-client");
    let script = "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as p\nfams = {f.name: f for f in p(sys.stdin.read())}\nfor n in ['greencode_energy_joules', 'greencode_idle_energy_joules', 'greencode_flops', 'greencode_co2_grams', 'greencode_energy_per_token_joules', 'greencode_power_watts', 'greencode_model_parameters', 'greencode_model_info', 'greencode_time_to_first_token_seconds', 'greencode_inter_token_latency_seconds', 'greencode_e2e_request_latency_seconds', 'greencode_num_requests_running', 'greencode_num_requests_waiting', 'greencode_request_success', 'greencode_prompt_tokens', 'greencode_generation_tokens']:\n    assert n in fams, n\n    for s in fams[n].samples:\n        assert s.labels.get('model') == 'tiny-coder', (n, s)\nprint(len(fams))\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{text}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bad_energy_settings_are_refused() {
    let mut cases = vec![
        (vec!["--grid-intensity", "-1"], "--grid-intensity must be a number ≥ 0"),
        (vec!["--pue", "0.5"], "--pue must be a number ≥ 1.0"),
        (vec!["--energy", "solar"], "invalid value 'solar'"),
        (vec!["--cpu-watts", "0"], "--cpu-watts must be a number > 0"),
    ];
    // A meter that is absent is refused by name; where the hardware has
    // one, asking for it is no error.
    if !nvml_present() {
        cases.push((vec!["--energy", "nvml"], "NVML unavailable"));
    }
    if !rapl_present() {
        cases.push((vec!["--energy", "rapl"], "powercap"));
    }
    for (args, needle) in cases {
        let mut all = vec!["serve", "--port", "0"];
        all.extend(args.iter().copied());
        let out = common::greencode(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn a_q8_0_server_reports_its_quantization_and_costs() {
    let s = Server::start(&["--quantize", "q8_0"]);
    let (status, body) = s.post(
        "/v1/completions",
        &json!({"prompt": "def add(a, b):\n", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body["usage"]["energy_joules"].as_f64().unwrap() > 0.0);
    let m = parse_metrics(&s.get("/metrics").1);
    assert_eq!(
        m["greencode_model_info{model=\"tiny-coder\",pruned_from=\"\",quantization=\"q8_0\"}"],
        1.0
    );
}

#[test]
fn a_machine_without_a_gpu_driver_is_told_plainly() {
    if nvml_wrapper::Nvml::init().is_ok() {
        return; // an NVIDIA driver is installed: this message is not shown
    }
    let s = common::Server::start(&[]);
    let log = s.log();
    let line = log
        .iter()
        .find(|l| l.contains("energy meter:"))
        .unwrap_or_else(|| panic!("{log:?}"));
    assert!(line.contains("no NVIDIA driver on this machine"), "{line}");
    assert!(!line.contains("libloading"), "{line}");
}
