//! `greencode bench kernels`: checks greencode's fused kernels against the
//! candle path they replace, and times both. Correctness is the relative
//! error ‖out − ref‖ / ‖ref‖ against an f32 reference computed by the candle
//! path on upcast inputs, on fresh random inputs for every case; speed is
//! the median of several timed batches of launches, after a warm-up, with
//! the device synchronized around each batch.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::cuda::decode_attention::decode_attention;
use crate::model::attention::attend;
use crate::model::error::Result;
use crate::model::Kernels;

/// One decode-attention problem: one query token over `len` cached positions.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AttentionCase {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Cached positions attended to.
    pub len: usize,
}

/// The cases `bench kernels` runs: the real shapes' heads at short and long
/// contexts, tiny-coder's, and odd lengths that leave warps without keys.
pub const ATTENTION_CASES: [AttentionCase; 7] = [
    AttentionCase {
        heads: 32,
        kv_heads: 4,
        head_dim: 128,
        len: 768,
    },
    AttentionCase {
        heads: 32,
        kv_heads: 4,
        head_dim: 128,
        len: 4096,
    },
    AttentionCase {
        heads: 32,
        kv_heads: 4,
        head_dim: 128,
        len: 1,
    },
    AttentionCase {
        heads: 12,
        kv_heads: 2,
        head_dim: 128,
        len: 517,
    },
    AttentionCase {
        heads: 6,
        kv_heads: 2,
        head_dim: 64,
        len: 300,
    },
    AttentionCase {
        heads: 8,
        kv_heads: 8,
        head_dim: 256,
        len: 33,
    },
    AttentionCase {
        heads: 4,
        kv_heads: 1,
        head_dim: 32,
        len: 9,
    },
];

/// Largest relative error accepted for a dtype (bf16 operands: 1e-2; f32: 1e-4).
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 1e-2,
    }
}

/// The outcome of one case.
#[derive(Debug, Clone, Serialize)]
pub struct KernelResult {
    /// Which kernel.
    pub kernel: &'static str,
    /// The problem.
    pub case: AttentionCase,
    /// Storage dtype of the inputs.
    pub dtype: String,
    /// Relative error of the fused kernel against the f32 reference.
    pub rel_err: f64,
    /// Relative error of the candle path in the same dtype (for scale).
    pub candle_rel_err: f64,
    /// Whether `rel_err` is within [`tolerance`] and finite.
    pub pass: bool,
    /// Median time of one fused launch, µs (when timed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused_us: Option<f64>,
    /// Median time of the candle path, µs (when timed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candle_us: Option<f64>,
    /// candle time over fused time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speedup: Option<f64>,
}

/// ‖a − b‖ / ‖b‖ over all elements, in f64 (NaN if either has a NaN).
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a: Vec<f32> = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// Median wall time of `f`, µs per call: `reps` batches of `iters` calls,
/// the device synchronized before and after each batch.
fn time_us(device: &Device, iters: usize, reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..iters.min(10) {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e6 / iters as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Random inputs of a case in `dtype` on `device`: q `[1, nh, 1, hd]` and a
/// cache of room for `len + 64` positions narrowed to `len` (so the kernel
/// sees the strides of a real cache).
fn inputs(case: &AttentionCase, dtype: DType, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let cap = case.len + 64;
    let draw = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)
    };
    let q = draw((1, case.heads, 1, case.head_dim))?;
    let k = draw((1, case.kv_heads, cap, case.head_dim))?.narrow(2, 0, case.len)?;
    let v = draw((1, case.kv_heads, cap, case.head_dim))?.narrow(2, 0, case.len)?;
    Ok((q, k, v))
}

/// Checks the fused decode attention against the candle path on `device` in
/// `dtype` for every case; with `iters > 0` also times both.
pub fn check_decode_attention(
    device: &Device,
    dtype: DType,
    cases: &[AttentionCase],
    iters: usize,
) -> Result<Vec<KernelResult>> {
    let mut out = Vec::with_capacity(cases.len());
    for case in cases {
        let (q, k, v) = inputs(case, dtype, device)?;
        let offset = case.len - 1;
        let up = |t: &Tensor| t.to_dtype(DType::F32);
        let reference = attend(&up(&q)?, &up(&k)?, &up(&v)?, offset, case.kv_heads, Kernels::Fused)?;
        let fused = decode_attention(&q, &k, &v)?;
        let candle = attend(&q, &k, &v, offset, case.kv_heads, Kernels::Fused)?;
        let e = rel_err(&fused, &reference)?;
        let (fused_us, candle_us) = if iters > 0 {
            (
                Some(time_us(device, iters, 7, || Ok(decode_attention(&q, &k, &v)?))?),
                Some(time_us(device, iters, 7, || {
                    attend(&q, &k, &v, offset, case.kv_heads, Kernels::Fused)
                })?),
            )
        } else {
            (None, None)
        };
        out.push(KernelResult {
            kernel: "decode_attention",
            case: *case,
            dtype: format!("{dtype:?}").to_lowercase(),
            rel_err: e,
            candle_rel_err: rel_err(&candle, &reference)?,
            pass: e.is_finite() && e <= tolerance(dtype),
            speedup: fused_us.zip(candle_us).map(|(f, c)| c / f),
            fused_us,
            candle_us,
        });
    }
    Ok(out)
}

/// The model's path on a device against the CPU: the same weights, prompt
/// and greedy tokens, in f32.
#[derive(Debug, Clone, Serialize)]
pub struct ModelPathCheck {
    /// Always `model_path`.
    pub kernel: &'static str,
    /// Prefill plus decode steps compared.
    pub steps: usize,
    /// Largest relative error of the device's logits against the CPU's.
    pub max_rel_err: f64,
    /// Whether both picked the same greedy token at every step.
    pub same_tokens: bool,
    /// Both within [`tolerance`] for f32 ×10 (different summation orders) and equal tokens.
    pub pass: bool,
}

/// Runs the tiny shape (weights drawn on the host, copied to `device`) on
/// the CPU and on `device` in f32 through prefill and 12 decode steps (the
/// fused decode attention on CUDA), feeding both the CPU's greedy tokens.
pub fn check_model_path(device: &Device) -> Result<ModelPathCheck> {
    use crate::model::synth::{synth_model, SynthShape};
    use crate::model::LogitsFor;
    let cpu = synth_model(SynthShape::Tiny, &Device::Cpu, DType::F32, 5)?;
    let tensors = cpu
        .named_tensors()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(device)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    let mut store = crate::model::WeightStore::from_tensors(std::path::Path::new("<device copy>"), DType::F32, tensors);
    let dev_model = crate::model::Qwen2::from_store(cpu.config().clone(), &mut store)?;
    let prompt: Vec<u32> = (0..40).map(|i| (i * 389 + 2) % 16384).collect();
    let (mut cc, mut dc) = (cpu.new_cache(64)?, dev_model.new_cache(64)?);
    let mut lc = cpu.forward_cached(&prompt, &mut cc, LogitsFor::Last)?;
    let mut ld = dev_model.forward_cached(&prompt, &mut dc, LogitsFor::Last)?;
    let (mut worst, mut same) = (0f64, true);
    let steps = 13;
    for step in 0..steps {
        worst = worst.max(rel_err(&ld, &lc)?);
        let id = lc.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        same &= ld.squeeze(0)?.argmax(0)?.to_scalar::<u32>()? == id;
        if step + 1 < steps {
            lc = cpu.forward_cached(&[id], &mut cc, LogitsFor::Last)?;
            ld = dev_model.forward_cached(&[id], &mut dc, LogitsFor::Last)?;
        }
    }
    Ok(ModelPathCheck {
        kernel: "model_path",
        steps,
        max_rel_err: worst,
        same_tokens: same,
        pass: worst.is_finite() && worst <= 10.0 * tolerance(DType::F32) && same,
    })
}
