//! `compare.svg`: quality against energy per token, one labelled point per
//! model (bits per byte: lower is better; joules per generated token:
//! further left is cheaper), drawn with plotters' SVG backend.

use plotters::prelude::*;

use super::CompareReport;

/// The chart as SVG text.
pub fn svg(r: &CompareReport) -> Result<String, String> {
    let points: Vec<(f64, f64, &str)> = r
        .models
        .iter()
        .filter_map(|m| Some((m.cost.joules_per_token? * 1e3, m.quality.bits_per_byte, m.name.as_str())))
        .collect();
    if points.is_empty() {
        return Err("no model has a measured energy per token (no energy meter)".into());
    }
    let span = |v: Vec<f64>| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let pad = ((hi - lo) * 0.25).max(hi.abs() * 0.05).max(1e-6);
        (lo - pad).max(0.0)..hi + pad
    };
    let xs = span(points.iter().map(|p| p.0).collect());
    let ys = span(points.iter().map(|p| p.1).collect());
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (760, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Quality against energy per token", ("sans-serif", 22))
            .margin(24)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(xs, ys)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("millijoules per token (prompt and generated)")
            .y_desc("bits per byte on held-out code (lower is better)")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(points.iter().map(|&(x, y, name)| {
                EmptyElement::at((x, y))
                    + Circle::new((0, 0), 6, BLUE.filled())
                    + Text::new(name.to_owned(), (10, -16), ("sans-serif", 15))
            }))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}
