//! GPU checks, built only with `--features cuda` and skipped (with a note)
//! where no CUDA device can be opened: the fused decode-attention kernel
//! against the candle path, and the model's CUDA path against its CPU path.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use greencode::bench_kernels::{check_decode_attention, rel_err, ATTENTION_CASES};
use greencode::model::qwen2::LogitsFor;
use greencode::model::synth::{synth_model, SynthShape};

/// GPU 0, or `None` (and a note on stderr) where there is none.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

#[test]
fn decode_attention_kernel_matches_the_candle_path() {
    let Some(dev) = gpu() else { return };
    for dtype in [DType::BF16, DType::F32] {
        // Fresh random inputs each time: run every case twice.
        for _ in 0..2 {
            for r in check_decode_attention(&dev, dtype, &ATTENTION_CASES, 0).unwrap() {
                eprintln!("{} {:?}: rel err {:.2e} (candle {:.2e})", r.dtype, r.case, r.rel_err, r.candle_rel_err);
                assert!(r.pass, "{r:?}");
            }
        }
    }
}

/// The same weights (drawn on the host, copied to the GPU) give the same
/// greedy tokens and close logits on the GPU in f32 as on the CPU, through
/// prefill and the fused decode steps.
#[test]
fn cuda_model_path_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    let cpu = synth_model(SynthShape::Tiny, &Device::Cpu, DType::F32, 5).unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = cpu
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_device(&dev).unwrap()))
        .collect();
    let mut store =
        greencode::model::WeightStore::from_tensors(std::path::Path::new("<gpu copy>"), DType::F32, tensors);
    let gpu_model = greencode::model::Qwen2::from_store(cpu.config().clone(), &mut store).unwrap();
    let prompt: Vec<u32> = (0..40).map(|i| (i * 389 + 2) % 16384).collect();
    let (mut cc, mut gc) = (cpu.new_cache(64).unwrap(), gpu_model.new_cache(64).unwrap());
    let mut lc = cpu.forward_cached(&prompt, &mut cc, LogitsFor::Last).unwrap();
    let mut lg = gpu_model.forward_cached(&prompt, &mut gc, LogitsFor::Last).unwrap();
    for step in 0..12 {
        let e = rel_err(&lg.to_device(&Device::Cpu).unwrap(), &lc).unwrap();
        assert!(e < 1e-3, "step {step}: relative error {e}");
        let id = lc.squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        lc = cpu.forward_cached(&[id], &mut cc, LogitsFor::Last).unwrap();
        lg = gpu_model.forward_cached(&[id], &mut gc, LogitsFor::Last).unwrap();
    }
}
