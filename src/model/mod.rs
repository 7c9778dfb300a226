//! The model runtime every other part uses: configuration, loading, the
//! Qwen2 forward passes and the KV cache.

pub mod attention;
pub mod config;
mod decode_cuda;
pub mod device;
pub mod error;
pub mod flop_probe;
mod fused;
pub mod gguf;
pub mod gguf_names;
pub mod kv_cache;
pub mod kv_pool;
pub mod layers;
pub mod linear;
pub mod load;
pub mod lora;
pub mod params;
pub mod qwen2;
pub mod rope_shift;
pub mod step;
pub mod synth;
mod weight_forms;

pub use config::Qwen2Config;
pub use error::ModelError;
pub use kv_cache::{KvCache, KvFull};
pub use kv_pool::{KvDtype, KvPool, KvShape, KV_BLOCK};
pub use layers::{Kernels, LayerMask};
pub use load::WeightStore;
pub use qwen2::Qwen2;
pub use rope_shift::RopeShift;
pub use step::{LogitsFor, SeqStep};
