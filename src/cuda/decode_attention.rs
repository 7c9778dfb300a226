//! Fused decode attention: one new query token of one sequence over its
//! KV cache, grouped-query, as a candle `CustomOp3`. On CUDA it launches
//! `kernels/decode_attention.cu` (one launch instead of candle's five, and
//! the narrowed cache is read in place, not copied); on the CPU the op runs
//! the same arithmetic in plain loops, which tests compare with both the
//! candle path and the GPU kernel. The model uses it on CUDA only
//! ([`applies`]); everywhere else the candle path in the model's `attention::attend` runs. The
//! caller counts the op's FLOPs (`model::flop_probe`).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// PTX of `kernels/decode_attention.cu` (compiled by build.rs), shared with
/// the fused decode step.
#[cfg(feature = "cuda")]
pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));

/// Name the PTX module is loaded under (once per device).
#[cfg(feature = "cuda")]
pub(crate) const MODULE: &str = "greencode_decode_attention";

/// Largest head width the kernel handles (32 lanes × 8 values).
pub const MAX_HEAD_DIM: usize = 256;

/// The op: `softmax(q·Kᵀ·scale)·V` for one query position.
#[derive(Debug, Clone, Copy)]
pub struct DecodeAttention {
    /// Score scale, 1/√head_dim.
    pub scale: f32,
}

/// Shapes and strides shared by the CPU and CUDA implementations.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    nh: usize,
    nkv: usize,
    hd: usize,
    len: usize,
    /// Elements between consecutive key/value heads in the cache.
    head_stride: usize,
    q_offset: usize,
    k_offset: usize,
    v_offset: usize,
}

impl Geometry {
    /// Checks `q` `[1, nh, 1, hd]` (contiguous) and `k`, `v` `[1, nkv, len, hd]`
    /// (rows of `hd` contiguous, heads `head_stride` apart, as a narrowed cache).
    fn of(q: &Layout, k: &Layout, v: &Layout) -> Result<Self> {
        let (qd, kd) = (q.dims(), k.dims());
        if qd.len() != 4 || qd[0] != 1 || qd[2] != 1 {
            candle_core::bail!("decode attention: q must be [1, heads, 1, head_dim], got {qd:?}");
        }
        if kd.len() != 4 || kd[0] != 1 || kd[3] != qd[3] || v.dims() != kd {
            candle_core::bail!(
                "decode attention: k, v must be [1, kv_heads, len, {}], got {kd:?} and {:?}",
                qd[3],
                v.dims()
            );
        }
        let (nh, hd, nkv, len) = (qd[1], qd[3], kd[1], kd[2]);
        if nkv == 0 || nh % nkv != 0 || len == 0 {
            candle_core::bail!("decode attention: {nh} query heads over {nkv} key/value heads and {len} positions");
        }
        let Some((q_offset, _)) = q.contiguous_offsets() else {
            candle_core::bail!("decode attention: q must be contiguous");
        };
        let (ks, vs) = (k.stride(), v.stride());
        if ks != vs || ks[3] != 1 || ks[2] != hd {
            candle_core::bail!("decode attention: cache rows must be contiguous (strides {ks:?}, {vs:?})");
        }
        Ok(Self {
            nh,
            nkv,
            hd,
            len,
            head_stride: ks[1],
            q_offset,
            k_offset: k.start_offset(),
            v_offset: v.start_offset(),
        })
    }

    fn out_shape(&self) -> Shape {
        Shape::from((1, self.nh, 1, self.hd))
    }
}

/// The reference arithmetic over host slices (f32 accumulation, two-pass
/// softmax), shared by the CPU op for every storage type.
fn cpu_attend<T: Copy>(q: &[T], k: &[T], v: &[T], g: &Geometry, scale: f32, f: impl Fn(T) -> f32) -> Vec<f32> {
    let group = g.nh / g.nkv;
    let mut out = vec![0f32; g.nh * g.hd];
    let mut scores = vec![0f32; g.len];
    for h in 0..g.nh {
        let base = g.q_offset + h * g.hd;
        let qh: Vec<f32> = q[base..base + g.hd].iter().map(|&x| f(x) * scale).collect();
        let kv = (h / group) * g.head_stride;
        for (j, s) in scores.iter_mut().enumerate() {
            let row = &k[g.k_offset + kv + j * g.hd..][..g.hd];
            *s = qh.iter().zip(row).map(|(a, &b)| a * f(b)).sum();
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let o = &mut out[h * g.hd..(h + 1) * g.hd];
        for (j, &p) in scores.iter().enumerate() {
            let row = &v[g.v_offset + kv + j * g.hd..][..g.hd];
            for (acc, &x) in o.iter_mut().zip(row) {
                *acc += p * f(x);
            }
        }
        o.iter_mut().for_each(|x| *x /= sum);
    }
    out
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "greencode-decode-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::of(ql, kl, vl)?;
        let out = match (qs, ks, vs) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(cpu_attend(q, k, v, &g, self.scale, |x| x))
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                let o = cpu_attend(q, k, v, &g, self.scale, half::bf16::to_f32);
                CpuStorage::BF16(o.into_iter().map(half::bf16::from_f32).collect())
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                let o = cpu_attend(q, k, v, &g, self.scale, half::f16::to_f32);
                CpuStorage::F16(o.into_iter().map(half::f16::from_f32).collect())
            }
            _ => candle_core::bail!("decode attention: q, k, v must share one float dtype"),
        };
        Ok((out, g.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = Geometry::of(ql, kl, vl)?;
        let out = match (qs.dtype_of(), ks.dtype_of(), vs.dtype_of()) {
            (DType::BF16, DType::BF16, DType::BF16) => {
                cuda::launch::<half::bf16>("decode_attention_bf16", qs, ks, vs, &g, self.scale)?
            }
            (DType::F32, DType::F32, DType::F32) => {
                cuda::launch::<f32>("decode_attention_f32", qs, ks, vs, &g, self.scale)?
            }
            (a, b, c) => candle_core::bail!("decode attention on CUDA takes bf16 or f32, got {a:?}, {b:?}, {c:?}"),
        };
        Ok((out, g.out_shape()))
    }
}

/// The storage's dtype, through candle's backend trait.
#[cfg(feature = "cuda")]
trait DTypeOf {
    fn dtype_of(&self) -> DType;
}

#[cfg(feature = "cuda")]
impl DTypeOf for candle_core::CudaStorage {
    fn dtype_of(&self) -> DType {
        candle_core::backend::BackendStorage::dtype(self)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The launch of `kernels/decode_attention.cu`.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Result};

    use super::Geometry;

    use super::{MODULE, PTX};

    /// Warps per block (`WARPS` in the .cu file).
    const WARPS: u32 = 16;

    /// Runs kernel `name` on storages of element type `T`.
    pub(super) fn launch<T: CudaDType + DeviceRepr>(
        name: &str,
        qs: &CudaStorage,
        ks: &CudaStorage,
        vs: &CudaStorage,
        g: &Geometry,
        scale: f32,
    ) -> Result<CudaStorage> {
        let dev = qs.device();
        let q = qs.as_cuda_slice::<T>()?.slice(g.q_offset..g.q_offset + g.nh * g.hd);
        let k = ks.as_cuda_slice::<T>()?.slice(g.k_offset..);
        let v = vs.as_cuda_slice::<T>()?.slice(g.v_offset..);
        // SAFETY: every element is written by the kernel (each block writes
        // its head's hd outputs).
        let out = unsafe { dev.alloc::<T>(g.nh * g.hd)? };
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(&out);
        candle_core::builder_arg!(
            b,
            g.nh as i32,
            g.nkv as i32,
            g.hd as i32,
            g.len as i32,
            g.head_stride as i64,
            scale
        );
        let cfg = LaunchConfig {
            grid_dim: (g.nh as u32, 1, 1),
            block_dim: (WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature; the
        // geometry was checked against the tensors' layouts.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Whether `GREENCODE_NO_CUDA_KERNELS` (non-empty, not `0`) switched
/// greencode's own CUDA kernels off, leaving the candle path everywhere (for
/// comparisons and as a fallback).
pub(crate) fn kernels_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("GREENCODE_NO_CUDA_KERNELS").is_some_and(|v| !v.is_empty() && v != "0"))
}

/// Whether the fused op serves this query: a single position of a CUDA
/// tensor in bf16 or f32 with a head width the kernel handles.
pub fn applies(q: &Tensor) -> bool {
    let hd = q.dims().last().copied().unwrap_or(0);
    q.device().is_cuda()
        && matches!(q.dtype(), DType::BF16 | DType::F32)
        && q.rank() == 4
        && q.dims()[2] == 1
        && hd.is_multiple_of(32)
        && (32..=MAX_HEAD_DIM).contains(&hd)
        && !kernels_disabled()
}

/// Attention of `q` `[1, nh, 1, hd]` over every position of `k`, `v`
/// `[1, nkv, len, hd]` (a narrowed cache is read in place) → `[1, nh, 1, hd]`.
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let hd = q.dim(3)?;
    let q = q.contiguous()?;
    q.apply_op3_no_bwd(
        k,
        v,
        &DecodeAttention {
            scale: 1.0 / (hd as f32).sqrt(),
        },
    )
}
