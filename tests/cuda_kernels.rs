//! GPU checks, built only with `--features cuda` and skipped (with a note)
//! where no CUDA device can be opened: the fused decode-attention kernel
//! against the candle path, and the model's CUDA path against its CPU path.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device};
use greencode::bench::kernels::{check_decode_attention, check_model_path, ATTENTION_CASES};

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
                eprintln!(
                    "{} {:?}: rel err {:.2e} (candle {:.2e})",
                    r.dtype, r.case, r.rel_err, r.candle_rel_err
                );
                assert!(r.pass, "{r:?}");
            }
        }
    }
}

/// The model's CUDA path (f32, fused decode attention) decodes like the CPU.
#[test]
fn cuda_model_path_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    let m = check_model_path(&dev).unwrap();
    assert!(m.pass, "{m:?}");
}
