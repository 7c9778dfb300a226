//! `greencode bench kernels`: greencode's GPU kernels checked against the
//! candle path and timed.

use anyhow::{bail, Result};
use clap::Args;
use greencode::bench::kernels::{check_decode_attention, tolerance, ATTENTION_CASES};
use greencode::model::device::DeviceSpec;

use crate::cli::args::{DeviceArg, Format};

/// `bench kernels`.
#[derive(Args)]
pub struct BenchKernelsArgs {
    #[command(flatten)]
    device: DeviceArg,
    /// Launches per timed batch (0: check correctness only).
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// Checks and times greencode's kernels against the candle path; fails when
/// a check fails.
pub fn run(a: BenchKernelsArgs) -> Result<()> {
    let spec = a.device.device;
    let device = spec.open()?;
    let mut failed = 0;
    for dtype in [candle_core::DType::BF16, candle_core::DType::F32] {
        for r in check_decode_attention(&device, dtype, &ATTENTION_CASES, a.iters)? {
            failed += usize::from(!r.pass);
            match a.format {
                Format::Json => println!("{}", serde_json::to_string(&r)?),
                Format::Text => {
                    let c = &r.case;
                    let time = match (r.fused_us, r.candle_us, r.speedup) {
                        (Some(f), Some(c), Some(s)) => format!("fused {f:.1} µs, candle {c:.1} µs, {s:.2}×"),
                        _ => String::new(),
                    };
                    println!(
                        "{} {} heads {}/{} hd {} len {}: rel err {:.2e} (candle {:.2e}, limit {:.0e}) {} {time}",
                        r.kernel,
                        r.dtype,
                        c.heads,
                        c.kv_heads,
                        c.head_dim,
                        c.len,
                        r.rel_err,
                        r.candle_rel_err,
                        tolerance(dtype),
                        if r.pass { "ok" } else { "FAIL" },
                    );
                }
            }
        }
    }
    if spec != DeviceSpec::Cpu {
        let m = greencode::bench::kernels::check_model_path(&device)?;
        failed += usize::from(!m.pass);
        match a.format {
            Format::Json => println!("{}", serde_json::to_string(&m)?),
            Format::Text => println!(
                "model path (tiny, f32) {spec} vs cpu: max rel err {:.2e} over {} steps, greedy tokens {} {}",
                m.max_rel_err,
                m.steps,
                if m.same_tokens { "equal" } else { "DIFFER" },
                if m.pass { "ok" } else { "FAIL" }
            ),
        }
    }
    if failed > 0 {
        bail!("{failed} kernel check(s) failed");
    }
    Ok(())
}
