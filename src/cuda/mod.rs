//! greencode's own CUDA kernels as candle ops (sources in `kernels/`, built
//! to PTX by build.rs with `--features cuda`): fused decode attention over a
//! sequence's cache. They know tensors and launch geometry, never the model:
//! `model::decode_cuda` puts them together into a Qwen2 decode step.

pub mod decode_attention;
