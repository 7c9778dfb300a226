//! Arguments several commands share (`--model`, `--quantize`, `--device`,
//! `--format`, the held-out corpus flags) and how they resolve into the
//! values the library takes.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use greencode::data::corpus;
use greencode::generate::draft::DraftModel;
use greencode::generate::locate;
use greencode::generate::LoadedModel;
use greencode::model::device::DeviceSpec;

#[derive(Args)]
pub struct ModelArg {
    /// Model folder (default: $GREENCODE_MODEL, else the embedded models/tiny-coder).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// Weight format to run in (quantized at load, from the full-precision folder).
#[derive(Args)]
pub struct RunQuantArg {
    /// Quantize the weights at load: `q8_0` (decode reads a quarter of the bytes).
    #[arg(long, value_enum)]
    pub quantize: Option<RunQuant>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum RunQuant {
    #[value(name = "q8_0")]
    Q8_0,
}

impl RunQuantArg {
    /// Whether Q8_0 was asked for.
    pub fn q8(&self) -> bool {
        self.quantize == Some(RunQuant::Q8_0)
    }

    /// Loads the model on the CPU, quantizing each matrix as it is read when asked.
    pub fn open(&self, model: &ModelArg) -> Result<LoadedModel> {
        Ok(LoadedModel::load_with(
            &model_dir(model)?,
            &Device::Cpu,
            DType::F32,
            self.q8(),
        )?)
    }
}

/// `--speculate` and `--draft-max`: speculative decoding with the lookup drafter.
#[derive(Args, Clone)]
pub struct SpeculateArgs {
    /// Speculative decoding: `lookup` drafts the tokens that followed the
    /// latest earlier occurrence of the last few tokens (prompt, suffix and
    /// generated text) and checks them in one step; the tokens are exactly
    /// those generated without it (greedy, or sampled with a seed).
    #[arg(long, value_enum, default_value_t = Speculate::Off)]
    pub speculate: Speculate,
    /// Most draft tokens checked per step (the draft length adapts between 1 and this).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = at_least_one)]
    pub draft_max: usize,
    /// The draft model of `--speculate draft`: a smaller model sharing the
    /// target's tokenizer (a pruned copy; a vocabulary-pruned one maps its
    /// ids back through the token text).
    #[arg(long, value_name = "DIR")]
    pub draft: Option<PathBuf>,
}

/// `--speculate`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Speculate {
    /// No speculation.
    Off,
    /// Draft from earlier occurrences in the request's own text.
    Lookup,
    /// Draft with a smaller model (`--draft DIR`).
    Draft,
}

impl SpeculateArgs {
    /// Most draft tokens per step (0: no speculation).
    pub fn k(&self) -> usize {
        match self.speculate {
            Speculate::Off => 0,
            Speculate::Lookup | Speculate::Draft => self.draft_max,
        }
    }

    /// The draft model for a target with tokenizer `target` (None unless
    /// `--speculate draft`), loaded on the CPU.
    pub fn draft_model(&self, target: &greencode::tokenizer::CodeTokenizer) -> Result<Option<DraftModel>> {
        match (self.speculate, &self.draft) {
            (Speculate::Draft, Some(dir)) => {
                let d = LoadedModel::load_with(dir, &Device::Cpu, DType::F32, false)?;
                Ok(Some(
                    DraftModel::new(d.model, &d.tokenizer, target)
                        .map_err(|e| anyhow::anyhow!("--draft {}: {e}", dir.display()))?,
                ))
            }
            (Speculate::Draft, None) => bail!("--speculate draft needs --draft DIR (a pruned copy of the model)"),
            (_, Some(_)) => bail!("--draft is the model of --speculate draft"),
            _ => Ok(None),
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// `--device`: where the model computes.
#[derive(Args, Clone, Copy)]
pub struct DeviceArg {
    /// Device: `cpu` (f32 arithmetic; bf16 checkpoints stay bf16 in memory) or `cuda[:N]` (bf16; needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

/// Which held-out files an evaluation reads.
#[derive(Args)]
pub struct HeldOutArgs {
    /// Folder of *.py files, or `stdlib` for python3's standard library.
    #[arg(long, default_value = "stdlib")]
    pub corpus: String,
    /// Number of files (the first in byte order of their names).
    #[arg(long, default_value_t = corpus::EVAL_FILES)]
    pub files: usize,
    /// Tokens scored per file (its first ones).
    #[arg(long, default_value_t = 1024, value_parser = at_least_one)]
    pub window: usize,
}

impl HeldOutArgs {
    /// The corpus folder and the files to read from it.
    pub fn resolve(&self) -> Result<(PathBuf, Vec<PathBuf>)> {
        if self.files == 0 {
            bail!("--files must be at least 1");
        }
        let dir = corpus::resolve(&self.corpus)?;
        let files = corpus::eval_files(&dir, self.files)?;
        Ok((dir, files))
    }
}

/// A count that must be at least 1 (clap names the flag in its error).
pub fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// The model folder `--model` names, else the default one (see `generate::locate`).
pub fn model_dir(arg: &ModelArg) -> Result<PathBuf> {
    let Some(dir) = locate::model_dir(arg.model.as_deref()) else {
        bail!(
            "no model given and the embedded model was not found (looked in {}); pass --model DIR or set {}",
            locate::default_candidates()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            locate::MODEL_ENV
        );
    };
    Ok(dir)
}

/// A `--model` value of the commands that take several models (`serve`,
/// `compare`): `[NAME=]PATH[,OPTION...]`.
pub struct ModelValue {
    /// The name given before `=`.
    pub name: Option<String>,
    /// The model folder or GGUF file.
    pub dir: PathBuf,
    /// The options after the path, in order (`quantize=q8_0`, `q8_0`, …).
    pub options: Vec<String>,
}

/// Splits a `[NAME=]PATH[,OPTION...]` value. A value that is an existing
/// path as a whole is that path (commas and `=` in it included); a path
/// that does not exist is an error naming the value.
pub fn model_value(value: &str) -> Result<ModelValue> {
    if std::path::Path::new(value).exists() {
        let dir = model_dir(&ModelArg {
            model: Some(value.into()),
        })?;
        return Ok(ModelValue {
            name: None,
            dir,
            options: Vec::new(),
        });
    }
    let mut parts = value.split(',');
    let head = parts.next().unwrap_or_default();
    let (name, path) = match head.split_once('=') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') && !std::path::Path::new(head).exists() => {
            (Some(name.to_owned()), path)
        }
        _ => (None, head),
    };
    if path.is_empty() {
        bail!("--model {value:?}: no path (the form is [NAME=]PATH[,OPTION...])");
    }
    if !std::path::Path::new(path).exists() {
        bail!("--model {value:?}: model folder {path} does not exist");
    }
    let dir = model_dir(&ModelArg {
        model: Some(path.into()),
    })?;
    Ok(ModelValue {
        name,
        dir,
        options: parts.map(str::to_owned).collect(),
    })
}

/// Loads the model folder of `arg` on `device` in that device's dtype.
pub fn open_model_on(arg: &ModelArg, device: DeviceSpec, quantize_q8: bool) -> Result<LoadedModel> {
    let dir = model_dir(arg)?;
    Ok(LoadedModel::load_with(
        &dir,
        &device.open()?,
        device.dtype(),
        quantize_q8,
    )?)
}
