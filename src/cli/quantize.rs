//! `greencode quantize`: a model folder (or a GGUF file, to convert)
//! written as one GGUF file that llama.cpp loads.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use greencode::output::gguf::{export, WeightType};

use super::args::{model_dir, Format, ModelArg};

#[derive(Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Weight type of the 2-D tensors (norms and biases stay f32).
    #[arg(long = "type", value_enum)]
    weight_type: QuantTypeArg,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace `--out` if it exists.
    #[arg(long)]
    force: bool,
    /// Output format of the report.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum QuantTypeArg {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks of 32.
    #[value(name = "q8_0")]
    Q8_0,
    /// Every matrix Q4_K (Q5_0 where rows are not a multiple of 256).
    #[value(name = "q4_k")]
    Q4K,
    /// llama.cpp's Q4_K_M mix, as llama-quantize chooses it.
    #[value(name = "q4_k_m")]
    Q4KM,
    /// llama.cpp's Q5_K_M mix.
    #[value(name = "q5_k_m")]
    Q5KM,
    /// llama.cpp's Q6_K.
    #[value(name = "q6_k")]
    Q6K,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let ty = match a.weight_type {
        QuantTypeArg::F32 => WeightType::F32,
        QuantTypeArg::F16 => WeightType::F16,
        QuantTypeArg::Bf16 => WeightType::Bf16,
        QuantTypeArg::Q8_0 => WeightType::Q8_0,
        QuantTypeArg::Q4K => WeightType::Q4K,
        QuantTypeArg::Q4KM => WeightType::Q4KM,
        QuantTypeArg::Q5KM => WeightType::Q5KM,
        QuantTypeArg::Q6K => WeightType::Q6K,
    };
    if a.out.is_dir() {
        bail!(
            "--out {} is a folder; give the path of the .gguf file to write",
            a.out.display()
        );
    }
    if a.out.exists() && !a.force {
        bail!("{} already exists (pass --force to replace it)", a.out.display());
    }
    let dir = model_dir(&a.model)?;
    let report = export(&dir, &a.out, ty)?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => {
            println!(
                "wrote {} ({} tensors, {} bytes)",
                report.path.display(),
                report.tensors,
                report.file_bytes
            );
            for (ty, bytes) in &report.bytes_by_type {
                println!("  {ty:6} {bytes} bytes");
            }
        }
    }
    Ok(())
}
