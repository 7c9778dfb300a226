//! The Grafana dashboard against a real Prometheus scraping a real greencode
//! serving two models side by side: every PromQL expression evaluates,
//! queries only metrics the server exports, the energy, token and latency
//! panels return data, and the comparison row one value per model.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn query(base: &str, promql: &str) -> Value {
    let r = common::agent()
        .get(format!("{base}/api/v1/query"))
        .query("query", promql)
        .call()
        .unwrap();
    serde_json::from_str(&r.into_body().read_to_string().unwrap()).unwrap()
}

#[test]
fn every_dashboard_expression_evaluates_against_real_prometheus() {
    let Ok(prom_bin) = which("prometheus") else {
        return common::missing_data(
            "every_dashboard_expression_evaluates_against_real_prometheus",
            "no `prometheus` binary (apt-get install prometheus; .ci/run does)",
        );
    };
    let tiny = common::tiny_coder();
    let (_pruned_dir, pruned) = common::fast_pruned_copy();
    let s = Server::start(&[
        "--model",
        &format!("orig={}", tiny.display()),
        "--model",
        &format!("small={},q8_0", pruned.display()),
    ]);
    let target = s.base.trim_start_matches("http://").to_owned();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: greencode\n    static_configs:\n      - targets: [\"{target}\"]\n"),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(prom_bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    let _prom = Prometheus(child);
    let prom = format!("http://127.0.0.1:{port}");

    // Traffic over several scrapes.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut sent = 0;
    while Instant::now() < deadline {
        let (st, _) = s.post(
            "/v1/completions",
            &json!({"model": if sent % 2 == 0 { "orig" } else { "small" }, "prompt": "def add(a, b):\n", "max_tokens": 8, "seed": sent}),
        );
        assert_eq!(st, 200);
        sent += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    // Wait until Prometheus holds enough samples for rate() over 1m.
    let ready = Instant::now() + Duration::from_secs(30);
    loop {
        let v = common::agent()
            .get(format!("{prom}/api/v1/query"))
            .query("query", "count_over_time(greencode_generation_tokens_total[1m])")
            .call();
        let n = v
            .ok()
            .and_then(|r| serde_json::from_str::<Value>(&r.into_body().read_to_string().ok()?).ok())
            .and_then(|v| {
                v["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|x| x.parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        if n >= 5.0 {
            break;
        }
        assert!(Instant::now() < ready, "Prometheus never scraped greencode");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every series exists once traffic has run.
    let (_, exported) = s.get("/metrics");
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/greencode-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(vars.contains(&"model") && vars.contains(&"instance"));
    let mut with_data = Vec::new();
    let mut count = 0;
    let mut comparison = Vec::new();
    let mut in_comparison = false;
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        if panel["type"] == "row" {
            in_comparison = title.starts_with("Model comparison");
            continue;
        }
        for t in panel["targets"].as_array().unwrap() {
            let raw = t["expr"].as_str().unwrap();
            for name in metric_names(raw) {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|b| exported.contains(&format!("# TYPE {b} histogram")))
                    })
                    .unwrap_or(&name);
                // GPU memory is exported where there is a GPU (NVML).
                assert!(
                    exported.contains(&format!("# TYPE {base} ")) || base == "greencode_gpu_memory_used_bytes",
                    "{title}: {name} is not a metric the server exports"
                );
            }
            let expr = raw
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1m")
                .replace("$__interval", "15s")
                .replace("$model", ".*")
                .replace("$instance", ".*");
            let v = query(&prom, &expr);
            assert_eq!(v["status"], "success", "{title}: {expr}: {v}");
            count += 1;
            let result = v["data"]["result"].as_array().unwrap();
            if !result.is_empty() {
                with_data.push(title.to_owned());
            }
            if in_comparison {
                let mut models: Vec<String> = result
                    .iter()
                    .filter(|r| {
                        r["value"][1]
                            .as_str()
                            .and_then(|x| x.parse::<f64>().ok())
                            .is_some_and(|x| x.is_finite() && x > 0.0)
                    })
                    .map(|r| r["metric"]["model"].as_str().unwrap_or("").to_owned())
                    .collect();
                models.sort();
                comparison.push((title.to_owned(), models));
            }
        }
    }
    assert!(count >= 15, "{count} expressions");
    for must in [
        "Energy per request",
        "Energy per generated token",
        "Tokens per second",
        "Time to first token",
        "Inter-token latency",
        "Power",
        "CO2 rate",
        "Parameters saved by pruning",
    ] {
        assert!(
            with_data.iter().any(|t| t == must),
            "panel {must:?} returned no data; with data: {with_data:?}"
        );
    }
    // The comparison row: one positive value per model on each panel.
    assert_eq!(comparison.len(), 5, "{comparison:?}");
    for (title, models) in &comparison {
        assert_eq!(models, &["orig", "small"], "{title}");
    }
}

/// The `greencode_*` metric names an expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("greencode_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

fn which(name: &str) -> Result<String, ()> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map_err(|_| ())?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && !path.is_empty() {
        Ok(path)
    } else {
        Err(())
    }
}
