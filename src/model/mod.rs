//! The model runtime every other part uses: configuration, loading, the
//! Qwen2 forward passes and the KV cache.

pub mod config;
mod decode_cuda;
pub mod device;
pub mod error;
pub mod flop_probe;
mod fused;
pub mod gguf_load;
pub mod gguf_names;
pub mod kv_cache;
pub mod linear;
pub mod load;
pub mod lora;
pub mod params;
pub mod qwen2;
pub mod synth;

pub use config::Qwen2Config;
pub use error::ModelError;
pub use kv_cache::KvCache;
pub use load::{load_model, load_model_with, WeightStore};
pub use qwen2::{Kernels, LayerMask, Qwen2};
