//! `compare.md`: the comparison as Markdown tables, quality and cost, then
//! each cost as a change against the first model (the paper's form:
//! "GPU memory −21%, FLOPs −20%, CO2 −14%").

use std::fmt::Write;

use super::CompareReport;

/// The Markdown page of a comparison.
pub fn markdown(r: &CompareReport) -> String {
    let s = &r.settings;
    let mut md = String::new();
    let first = r.models.first().map_or("", |m| m.name.as_str());
    let _ = writeln!(md, "# Model comparison\n");
    let _ = writeln!(
        md,
        "Quality on {} held-out files ({} tokens each) and {} infill items{}; cost by `greencode bench generate` \
         ({} prompt + {} new tokens, median of {} passes, {} threads, one child process per model) on a machine with {}. \
         CO2 at {} gCO2e/kWh × PUE {}. KL, top-1 agreement and every ratio are against `{first}`.\n",
        s.files,
        s.window,
        s.infill_items,
        if s.humaneval_problems > 0 {
            format!(" and {} HumanEval problems", s.humaneval_problems)
        } else {
            String::new()
        },
        s.prompt_tokens,
        s.new_tokens,
        s.passes,
        s.threads,
        s.machine,
        s.grid_intensity,
        s.pue,
    );
    let humaneval = r.models.iter().any(|m| m.quality.humaneval_pass_at_1.is_some());
    let _ = writeln!(md, "## Quality\n");
    let _ = writeln!(
        md,
        "| model | parameters | bits/byte | KL (nats/token) | top-1 agreement | infill exact match | infill edit similarity |{}",
        if humaneval { " HumanEval pass@1 |" } else { "" }
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|{}",
        if humaneval { "---:|" } else { "" }
    );
    for m in &r.models {
        let q = &m.quality;
        let _ = writeln!(
            md,
            "| {} | {} | {:.4} | {} | {} | {:.1}% | {:.3} |{}",
            m.name,
            millions(m.parameters as f64),
            q.bits_per_byte,
            q.kl.map_or("—".into(), |k| format!("{k:.4}")),
            q.top1_agreement.map_or("—".into(), |a| format!("{:.1}%", a * 100.0)),
            q.infill_exact_match * 100.0,
            q.infill_edit_similarity,
            if humaneval {
                format!(
                    " {} |",
                    q.humaneval_pass_at_1
                        .map_or("—".into(), |p| format!("{:.1}%", p * 100.0))
                )
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(md, "\n## Cost\n");
    let _ = writeln!(
        md,
        "| model | weights | decode tokens/s | joules/token | FLOPs/token | CO2/request | peak memory |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
    for m in &r.models {
        let c = &m.cost;
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {} | {} | {} | {} |",
            m.name,
            c.weights,
            c.decode_tokens_per_second,
            c.joules_per_token.map_or("—".into(), |j| format!("{:.2} mJ", j * 1e3)),
            millions(c.flops_per_token),
            c.co2_grams_per_request
                .map_or("—".into(), |g| format!("{:.3} mg", g * 1e3)),
            c.peak_resident_bytes
                .map_or("—".into(), |b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64)),
        );
    }
    let _ = writeln!(md, "\n## Against `{first}`\n");
    let _ = writeln!(
        md,
        "| model | parameters | FLOPs/token | energy/token | CO2/request | peak memory | decode speed |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for m in r.models.iter().skip(1) {
        let x = &m.ratios;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.2}× |",
            m.name,
            change(Some(x.parameters)),
            change(Some(x.flops_per_token)),
            change(x.joules_per_token),
            change(x.co2_per_request),
            change(x.peak_memory),
            x.decode_tokens_per_second,
        );
    }
    let _ = writeln!(md, "\n![Quality against energy per token](compare.svg)");
    md
}

/// `12.3M` for 12,345,678.
fn millions(n: f64) -> String {
    format!("{:.1}M", n / 1e6)
}

/// A ratio as a signed change: 0.79 → `−21%`.
fn change(ratio: Option<f64>) -> String {
    match ratio {
        Some(r) if r.is_finite() => {
            let pct = (r - 1.0) * 100.0;
            if pct < -0.05 {
                format!("−{:.0}%", -pct)
            } else {
                format!("+{pct:.0}%")
            }
        }
        _ => "—".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_ratio_reads_as_the_papers_change() {
        assert_eq!(super::change(Some(0.79)), "−21%");
        assert_eq!(super::change(Some(1.1)), "+10%");
        assert_eq!(super::change(None), "—");
    }
}
