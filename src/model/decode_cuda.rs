//! The CUDA decode step: one new token for each of n sequences in a fixed
//! number of launches per layer, whatever n is. Projections and the MLP run
//! once over all n rows (as in the tensor path); RoPE on queries and keys
//! plus the writes into every sequence's KV cache take one launch
//! (`rope_append`), and attention of every sequence over its own cache one
//! more (`decode_attention_batch`), both in `kernels/decode_attention.cu`.
//! The tensor path (`Qwen2::step_tensors`) instead runs RoPE, cache writes
//! and attention per sequence: about seven launches each, so at batch 16 the
//! host's launch overhead, not the GPU, would set the pace.
//!
//! The kernels find each sequence's caches through a small table of device
//! addresses, positions and capacities (`meta`, int64 `[layers, 4, n]`),
//! copied to the GPU once per step. `GREENCODE_NO_CUDA_KERNELS=1` runs the
//! tensor path instead (for comparisons).

use candle_core::{DType, Tensor};

use super::error::Result;
use super::qwen2::Qwen2;
use super::step::SeqStep;

/// Whether the fused CUDA step serves this batch: a CUDA model in bf16 or
/// f32, a head width the kernels handle, one new token per sequence, and
/// caches in device tensors.
pub(crate) fn eligible(model: &Qwen2, seqs: &[SeqStep<'_>]) -> bool {
    let hd = model.config().head_dim;
    cfg!(feature = "cuda")
        && !seqs.is_empty()
        && model.device().is_cuda()
        && matches!(model.dtype(), DType::BF16 | DType::F32)
        && hd.is_multiple_of(32)
        && hd <= crate::cuda::decode_attention::MAX_HEAD_DIM
        && seqs.iter().all(|s| s.tokens.len() == 1 && !s.cache.is_host())
        && !crate::cuda::decode_attention::kernels_disabled()
}

/// Runs the step (the inputs were checked by `Qwen2::step` and [`eligible`]);
/// returns each sequence's `[1, vocab]` logits.
pub(crate) fn decode_step(model: &Qwen2, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        gpu::decode_step(model, seqs)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (model, seqs);
        Err(super::error::ModelError::Input(
            "the fused CUDA decode step needs a `--features cuda` build".into(),
        ))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    //! The ops and the step itself.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor};

    use super::super::error::{ModelError, Result};
    use super::super::qwen2::Qwen2;
    use super::super::step::SeqStep;

    use crate::cuda::decode_attention::{MODULE, PTX};

    /// Warps per attention block (`WARPS` in the .cu file).
    const WARPS: u32 = 16;

    /// Head counts and width of the model.
    #[derive(Debug, Clone, Copy)]
    struct Heads {
        nh: usize,
        nkv: usize,
        hd: usize,
    }

    /// The contiguous device slice of a captured tensor, from its offset on.
    fn slice_of<'a, T: CudaDType>(
        storage: &'a Storage,
        layout: &Layout,
    ) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
        let Storage::Cuda(cs) = storage else {
            candle_core::bail!("fused decode: tensor not on a CUDA device");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused decode: tensor not contiguous");
        };
        Ok(cs.as_cuda_slice::<T>()?.slice(start..end))
    }

    /// Element type name in the kernels' names.
    fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
        match dtype {
            DType::BF16 => Ok("bf16"),
            DType::F32 => Ok("f32"),
            d => candle_core::bail!("fused decode takes bf16 or f32, got {d:?}"),
        }
    }

    /// RoPE on q and k at each sequence's position, k and v written into the
    /// caches (a side effect through the addresses in `meta`); returns the
    /// rotated q. Inputs q `[n, nh·hd]`, k and v `[n, nkv·hd]`.
    struct RopeAppend {
        cos: Tensor,
        sin: Tensor,
        meta: Tensor,
        heads: Heads,
    }

    impl RopeAppend {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            qs: &CudaStorage,
            ql: &Layout,
            ks: &CudaStorage,
            kl: &Layout,
            vs: &CudaStorage,
            vl: &Layout,
        ) -> candle_core::Result<CudaStorage> {
            let Heads { nh, nkv, hd } = self.heads;
            let n = ql.dims()[0];
            let contiguous = |l: &Layout, cols: usize| -> candle_core::Result<(usize, usize)> {
                match l.contiguous_offsets() {
                    Some(o) if l.dims() == [n, cols] => Ok(o),
                    _ => candle_core::bail!(
                        "rope_append: expected a contiguous [{n}, {cols}] input, got {:?}",
                        l.dims()
                    ),
                }
            };
            let (q0, q1) = contiguous(ql, nh * hd)?;
            let (k0, k1) = contiguous(kl, nkv * hd)?;
            let (v0, v1) = contiguous(vl, nkv * hd)?;
            let dev = qs.device();
            let q = qs.as_cuda_slice::<T>()?.slice(q0..q1);
            let k = ks.as_cuda_slice::<T>()?.slice(k0..k1);
            let v = vs.as_cuda_slice::<T>()?.slice(v0..v1);
            let (cos_s, cos_l) = self.cos.storage_and_layout();
            let (sin_s, sin_l) = self.sin.storage_and_layout();
            let (meta_s, meta_l) = self.meta.storage_and_layout();
            let cos = slice_of::<T>(&cos_s, cos_l)?;
            let sin = slice_of::<T>(&sin_s, sin_l)?;
            let meta = slice_of::<i64>(&meta_s, meta_l)?;
            // SAFETY: the kernel writes all n·nh·hd outputs (one block per
            // sequence and head, hd/2 threads writing two values each).
            let out = unsafe { dev.alloc::<T>(n * nh * hd)? };
            let func = dev.get_or_load_custom_func(&format!("rope_append_{}", suffix(qs.dtype())?), MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&q);
            b.arg(&k);
            b.arg(&v);
            b.arg(&cos);
            b.arg(&sin);
            b.arg(&meta);
            b.arg(&out);
            candle_core::builder_arg!(b, n as i32, nh as i32, nkv as i32, hd as i32);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, (nh + nkv) as u32, 1),
                block_dim: ((hd / 2) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match `rope_append_*`'s signature; meta holds
            // live cache addresses whose capacity covers every position
            // (checked by `Qwen2::step`).
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
    }

    impl CustomOp3 for RopeAppend {
        fn name(&self) -> &'static str {
            "greencode-rope-append"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("rope_append runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            qs: &CudaStorage,
            ql: &Layout,
            ks: &CudaStorage,
            kl: &Layout,
            vs: &CudaStorage,
            vl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let out = match qs.dtype() {
                DType::BF16 => self.launch::<half::bf16>(qs, ql, ks, kl, vs, vl)?,
                DType::F32 => self.launch::<f32>(qs, ql, ks, kl, vs, vl)?,
                d => candle_core::bail!("rope_append takes bf16 or f32, got {d:?}"),
            };
            Ok((out, ql.shape().clone()))
        }
    }

    /// Attention of each sequence's rotated query `[n, nh·hd]` over its cache.
    struct AttendBatch {
        meta: Tensor,
        heads: Heads,
    }

    impl AttendBatch {
        fn launch<T: CudaDType + DeviceRepr>(&self, qs: &CudaStorage, ql: &Layout) -> candle_core::Result<CudaStorage> {
            let Heads { nh, nkv, hd } = self.heads;
            let n = ql.dims()[0];
            let Some((q0, q1)) = ql.contiguous_offsets().filter(|_| ql.dims() == [n, nh * hd]) else {
                candle_core::bail!("decode_attention_batch: expected a contiguous [{n}, {}] query", nh * hd);
            };
            let dev = qs.device();
            let q = qs.as_cuda_slice::<T>()?.slice(q0..q1);
            let (meta_s, meta_l) = self.meta.storage_and_layout();
            let meta = slice_of::<i64>(&meta_s, meta_l)?;
            // SAFETY: one block per (head, sequence) writes that head's hd outputs.
            let out = unsafe { dev.alloc::<T>(n * nh * hd)? };
            let name = format!("decode_attention_batch_{}", suffix(qs.dtype())?);
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&q);
            b.arg(&meta);
            b.arg(&out);
            let scale = 1.0f32 / (hd as f32).sqrt();
            candle_core::builder_arg!(b, n as i32, nh as i32, nkv as i32, hd as i32, scale);
            let cfg = LaunchConfig {
                grid_dim: (nh as u32, n as u32, 1),
                block_dim: (WARPS * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel's signature; every cache
            // holds its position's key and value (rope_append ran first on
            // this stream).
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
    }

    impl CustomOp1 for AttendBatch {
        fn name(&self) -> &'static str {
            "greencode-decode-attention-batch"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("decode_attention_batch runs on CUDA only")
        }

        fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let out = match qs.dtype() {
                DType::BF16 => self.launch::<half::bf16>(qs, ql)?,
                DType::F32 => self.launch::<f32>(qs, ql)?,
                d => candle_core::bail!("decode_attention_batch takes bf16 or f32, got {d:?}"),
            };
            Ok((out, ql.shape().clone()))
        }
    }

    /// The device address of a contiguous CUDA tensor's first element.
    fn address(t: &Tensor) -> Result<i64> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(ModelError::Input("fused decode: cache not on a CUDA device".into()));
        };
        let stream = cs.device().cuda_stream();
        let (base, bytes) = match cs.dtype() {
            DType::BF16 => (cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0, 2),
            DType::F32 => (cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 4),
            d => return Err(ModelError::Input(format!("fused decode: cache dtype {d:?}"))),
        };
        Ok((base + (layout.start_offset() * bytes) as u64) as i64)
    }

    /// `[layers, 4, n]`: per layer the key and value cache addresses, the
    /// position and the capacity of every sequence.
    fn meta_table(model: &Qwen2, seqs: &[SeqStep<'_>]) -> Result<Tensor> {
        let (layers, n) = (model.num_layers(), seqs.len());
        let mut meta = vec![0i64; layers * 4 * n];
        for l in 0..layers {
            let row = &mut meta[l * 4 * n..(l + 1) * 4 * n];
            for (s, seq) in seqs.iter().enumerate() {
                let (k, v) = seq
                    .cache
                    .device_layer(l)
                    .ok_or_else(|| ModelError::Input("fused decode: cache has no device tensors".into()))?;
                row[s] = address(k)?;
                row[n + s] = address(v)?;
                row[2 * n + s] = seq.cache.len() as i64;
                row[3 * n + s] = seq.cache.capacity() as i64;
            }
        }
        Ok(Tensor::from_vec(meta, (layers, 4, n), model.device())?)
    }

    /// See [`super::decode_step`].
    pub(super) fn decode_step(model: &Qwen2, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
        let cfg = model.config();
        let heads = Heads {
            nh: cfg.num_attention_heads,
            nkv: cfg.num_key_value_heads,
            hd: cfg.head_dim,
        };
        let eps = cfg.rms_norm_eps as f32;
        let n = seqs.len();
        let ids: Vec<u32> = seqs.iter().map(|s| s.tokens[0]).collect();
        let ids = Tensor::new(ids.as_slice(), model.device())?;
        let mut h = model.embed_tokens().rows(&ids)?; // [n, hidden]
        let meta = meta_table(model, seqs)?;
        let (cos, sin) = model.rope_tables();
        // QKᵀ and PV: 2 FLOPs per multiply-add each, as `attention::attend` counts.
        let context: usize = seqs.iter().map(|s| s.cache.len() + 1).sum();
        for (i, layer) in model.layers.iter().enumerate() {
            let a = &layer.self_attn;
            let x = candle_nn::ops::rms_norm(&h, layer.input_layernorm.weight(), eps)?;
            let q = a.q_proj.forward(&x)?;
            let k = a.k_proj.forward(&x)?;
            let v = a.v_proj.forward(&x)?;
            let m = meta.get(i)?;
            let q = q.apply_op3_no_bwd(
                &k,
                &v,
                &RopeAppend {
                    cos: cos.clone(),
                    sin: sin.clone(),
                    meta: m.clone(),
                    heads,
                },
            )?;
            let y = q.apply_op1_no_bwd(&AttendBatch { meta: m, heads })?;
            super::super::flop_probe::add(4 * (context * heads.nh * heads.hd) as u64);
            let h2 = (h + a.o_proj.forward(&y)?)?;
            let x = candle_nn::ops::rms_norm(&h2, layer.post_attention_layernorm.weight(), eps)?;
            h = (h2 + layer.mlp.down_proj.forward(&layer.mlp.activations(&x)?)?)?;
        }
        for s in seqs.iter_mut() {
            s.cache.advance(1);
        }
        let logits = model.head(&h.unsqueeze(0)?)?.squeeze(0)?; // [n, vocab]
        (0..n).map(|i| Ok(logits.narrow(0, i, 1)?)).collect()
    }
}
