//! The runtime's CPU kernels: products of f32 activations with weights held
//! as f32, bf16, Q8_0 or llama.cpp's block formats (`blocks`: Q4_0, Q5_0,
//! Q5_1, Q4_K, Q5_K, Q6_K; `gemm` for prompt-sized row counts,
//! `matvec` for decoding), the row operations of the fused step
//! (`host_ops`), the compute team that runs them in parallel (`team`,
//! sized once by `threads`). They know slices and weight blocks, never the
//! model: `model::fused` puts them together into a Qwen2 step.

pub mod bf16;
pub mod block_quantize;
pub mod blocks;
pub mod f16;
pub mod features;
pub mod gemm;
pub mod gemm_avx512;
pub mod gemm_vnni;
pub mod host_ops;
pub mod matvec;
pub(crate) mod q8k;
pub mod quant;
pub mod team;
pub mod threads;
