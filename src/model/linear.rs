//! A projection `y = x·Wᵀ + b` that flattens leading dimensions so the
//! matrix multiply is always one 2-D product (the fast path on every
//! backend). The weight is held in the compute dtype, or on the CPU in a
//! compact form only: bf16 when every value is one (exact, half the bytes
//! of f32), Q8_0 blocks (after quantization, or as a GGUF file holds them),
//! or another of llama.cpp's block formats as a GGUF file holds them
//! (Q4_K, Q6_K, Q5_0, …), or f16 values as an f16 GGUF file holds them.
//! Decode-sized products read the compact form directly and prompt-sized
//! ones turn one matrix at a time into f32, so the full-precision weights
//! are never all held.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, D};

use super::lora::{frozen_matmul, SharedAdapter};
use crate::cpu::bf16::Bf16Matrix;
use crate::cpu::blocks::BlockMatrix;
use crate::cpu::f16::F16Matrix;
use crate::cpu::matvec::{matvec_multi, Projection, Weights, MAX_ROWS};
use crate::cpu::quant::Q8Matrix;

/// How a projection's weight is held.
#[derive(Debug, Clone)]
enum Stored {
    /// `[out, in]` in the compute dtype.
    Dense(Tensor),
    /// Q8_0 blocks (CPU, f32 compute).
    Q8(Arc<Q8Matrix>),
    /// bf16 values (CPU, f32 compute; exact).
    Bf16(Arc<Bf16Matrix>),
    Blocks(Arc<BlockMatrix>),
    F16(Arc<F16Matrix>),
}

/// A matrix read from a file already in a compact form, held as it is.
#[derive(Debug, Clone)]
pub enum HeldMatrix {
    /// Q8_0 blocks.
    Q8(Q8Matrix),
    /// Another of llama.cpp's block formats.
    Blocks(BlockMatrix),
    /// f16 values.
    F16(F16Matrix),
}

impl HeldMatrix {
    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::Q8(q) => (q.rows(), q.cols()),
            Self::Blocks(m) => (m.rows(), m.cols()),
            Self::F16(m) => (m.rows(), m.cols()),
        }
    }
}

/// A linear layer with an optional bias; weights are `[out, in]` as in HF.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Stored,
    bias: Option<Tensor>,
    lora: Option<SharedAdapter>,
}

impl Linear {
    /// Wraps a `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Stored::Dense(weight),
            bias,
            lora: None,
        }
    }

    /// The same projection with `bias` added.
    pub fn with_bias(mut self, bias: Tensor) -> Self {
        self.bias = Some(bias);
        self
    }

    /// A projection over a matrix held in a compact form (no bias).
    pub fn from_held(weight: HeldMatrix) -> Self {
        Self {
            weight: match weight {
                HeldMatrix::Q8(q) => Stored::Q8(Arc::new(q)),
                HeldMatrix::Blocks(m) => Stored::Blocks(Arc::new(m)),
                HeldMatrix::F16(m) => Stored::F16(Arc::new(m)),
            },
            bias: None,
            lora: None,
        }
    }

    /// Replaces the weight by its Q8_0 blocks (ggml's exact rounding) and
    /// drops the full-precision tensor (or the other blocks). Returns false
    /// (and changes nothing) when rows are not a multiple of 32 or the
    /// weight is not on the CPU.
    pub fn quantize_q8(&mut self) -> Result<bool> {
        let (values, (rows, cols)) = match &self.weight {
            Stored::Q8(_) => return Ok(true),
            Stored::Bf16(m) => (m.to_f32(), (m.rows(), m.cols())),
            Stored::Blocks(m) => (m.dequantize(), (m.rows(), m.cols())),
            Stored::F16(m) => (m.to_f32(), (m.rows(), m.cols())),
            Stored::Dense(w) if !w.device().is_cpu() => return Ok(false),
            Stored::Dense(w) => (w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, w.dims2()?),
        };
        let Some(q) = Q8Matrix::quantize(&values, rows, cols) else {
            return Ok(false);
        };
        self.weight = Stored::Q8(Arc::new(q));
        Ok(true)
    }

    /// Holds an f32 CPU weight in bf16 when every value is exactly a bf16
    /// (a bf16 checkpoint loaded in f32): the same values in half the
    /// bytes. Returns whether the weight is held in bf16 now; anything else
    /// (another dtype or device, a value bf16 cannot hold) is left as it is.
    pub fn compact_bf16(&mut self) -> Result<bool> {
        let w = match &self.weight {
            Stored::Bf16(_) => return Ok(true),
            Stored::Q8(_) | Stored::Blocks(_) | Stored::F16(_) => return Ok(false),
            Stored::Dense(w) => w,
        };
        if !w.device().is_cpu() || w.dtype() != DType::F32 {
            return Ok(false);
        }
        let (rows, cols) = w.dims2()?;
        let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let Some(m) = Bf16Matrix::from_f32_exact(&values, rows, cols) else {
            return Ok(false);
        };
        self.weight = Stored::Bf16(Arc::new(m));
        Ok(true)
    }

    /// Holds a bf16- or f16-held weight as an f32 tensor again (same values);
    /// any other form is left as it is.
    pub fn hold_dense(&mut self) -> Result<()> {
        if let Stored::Bf16(_) | Stored::F16(_) = self.weight {
            self.weight = Stored::Dense(self.weight()?);
        }
        Ok(())
    }

    /// The Q8_0 blocks, when quantized.
    pub fn q8(&self) -> Option<&Q8Matrix> {
        match &self.weight {
            Stored::Q8(q) => Some(q),
            _ => None,
        }
    }

    /// The bf16 values, when held in bf16.
    pub fn bf16(&self) -> Option<&Bf16Matrix> {
        match &self.weight {
            Stored::Bf16(m) => Some(m),
            _ => None,
        }
    }

    /// The weight's blocks, when held in one of llama.cpp's block formats.
    pub fn blocks(&self) -> Option<&BlockMatrix> {
        match &self.weight {
            Stored::Blocks(m) => Some(m),
            _ => None,
        }
    }

    /// The weight tensor, when held as one (not in a compact form).
    pub fn dense(&self) -> Option<&Tensor> {
        match &self.weight {
            Stored::Dense(w) => Some(w),
            _ => None,
        }
    }

    /// The compact form as the CPU kernels read it (bf16, f16, Q8_0 or
    /// other blocks); `None` when held as a tensor.
    pub fn compact(&self) -> Option<Weights<'_>> {
        match &self.weight {
            Stored::Dense(_) => None,
            Stored::Q8(q) => Some(Weights::Q8(q)),
            Stored::Bf16(m) => Some(Weights::Bf16(m)),
            Stored::Blocks(m) => Some(Weights::Blocks(m)),
            Stored::F16(m) => Some(Weights::F16(m)),
        }
    }

    /// The `[out, in]` weight's exact values in f32, row-major, built once
    /// (no tensor in between: a 7B embedding is 2.2 GB of them).
    pub fn weight_values(&self) -> Result<Vec<f32>> {
        Ok(match &self.weight {
            Stored::Dense(w) => w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            Stored::Q8(q) => q.dequantize(),
            Stored::Bf16(m) => m.to_f32(),
            Stored::Blocks(m) => m.dequantize(),
            Stored::F16(m) => m.to_f32(),
        })
    }

    /// The `[out, in]` weight as a tensor: the held one, or the compact
    /// form's exact values (a new f32 CPU tensor).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            Stored::Dense(w) => Ok(w.clone()),
            _ => Tensor::from_vec(self.weight_values()?, self.dims(), &Device::Cpu),
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Stored::Dense(w) => w.dims2().unwrap_or((0, 0)),
            Stored::Q8(q) => (q.rows(), q.cols()),
            Stored::Bf16(m) => (m.rows(), m.cols()),
            Stored::Blocks(m) => (m.rows(), m.cols()),
            Stored::F16(m) => (m.rows(), m.cols()),
        }
    }

    /// Rows `ids` of the weight, `[ids.len(), in]` (an embedding lookup).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Stored::Dense(w) => w.index_select(ids, 0),
            Stored::Q8(_) | Stored::Bf16(_) | Stored::Blocks(_) | Stored::F16(_) => {
                let compact = self.compact().expect("a compact weight");
                let ids: Vec<u32> = ids.to_vec1()?;
                let (rows, cols) = self.dims();
                let mut out = vec![0f32; ids.len() * cols];
                for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(cols.max(1))) {
                    if id as usize >= rows {
                        return Err(candle_core::Error::Msg(format!("row {id} of a {rows}-row embedding")));
                    }
                    compact.row_to_f32(id as usize, dst);
                }
                Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)
            }
        }
    }

    /// Bytes the weight occupies as held.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Stored::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Stored::Q8(q) => q.bytes(),
            Stored::Bf16(m) => m.bytes(),
            Stored::Blocks(m) => m.bytes(),
            Stored::F16(m) => m.bytes(),
        }
    }

    /// The `[out]` bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.dims().0
    }

    /// Attaches a LoRA adapter (replacing any other).
    pub fn set_lora(&mut self, adapter: SharedAdapter) {
        self.lora = Some(adapter);
    }

    /// The attached LoRA adapter, if any.
    pub fn lora(&self) -> Option<&SharedAdapter> {
        self.lora.as_ref()
    }

    /// The same projection with its adapter folded into the weight
    /// (`W + scale·B·A`) and no adapter; a plain clone without one.
    pub fn merged(&self) -> candle_core::Result<Linear> {
        match &self.lora {
            Some(a) => Ok(Linear::new(
                a.merge_into(&self.weight()?).map_err(candle_core::Error::wrap)?,
                self.bias.clone(),
            )),
            None => Ok(self.clone()),
        }
    }

    /// Applies the projection over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false)
    }

    /// As [`Linear::forward`], for training: the frozen weight's backward
    /// computes only the input gradient (see [`frozen_matmul`]).
    pub fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, true)
    }

    fn forward_with(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_features = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_features))?;
        let (out, _) = self.dims();
        super::flop_probe::add(2 * (rows * in_features * out) as u64);
        let decode_shape = !differentiable && rows <= MAX_ROWS && x2.device().is_cpu() && x2.dtype() == DType::F32;
        let mut y = match &self.weight {
            // Decoding shapes stream the weights with our threaded
            // matrix-vector kernel; everything else is a GEMM.
            Stored::Dense(w) if decode_shape && w.dtype() == DType::F32 && w.is_contiguous() => {
                x2.contiguous()?.apply_op2_no_bwd(w, &crate::cpu::matvec::MatVecOp)?
            }
            Stored::Dense(w) if differentiable => frozen_matmul(&x2, w).map_err(candle_core::Error::wrap)?,
            Stored::Dense(w) => x2.matmul(&w.t()?)?,
            Stored::Q8(_) | Stored::Bf16(_) | Stored::F16(_) | Stored::Blocks(_) if decode_shape => {
                self.compact_product(&x2, rows, in_features, out)?
            }
            // Prompt-sized products: this one matrix in f32 for the GEMM, then freed.
            Stored::Q8(_) | Stored::Bf16(_) | Stored::Blocks(_) | Stored::F16(_) => {
                let w = self.weight()?.to_dtype(x2.dtype())?;
                if differentiable {
                    frozen_matmul(&x2, &w).map_err(candle_core::Error::wrap)?
                } else {
                    x2.matmul(&w.t()?)?
                }
            }
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(a) = &self.lora {
            y = (y + a.delta(&x2).map_err(candle_core::Error::wrap)?)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("x has at least one dimension") = y.dim(D::Minus1)?;
        y.reshape(out_dims)
    }

    /// `x2 · Wᵀ` (`[rows, in]` f32 on the CPU) through the kernels of the compact weight.
    fn compact_product(&self, x2: &Tensor, rows: usize, in_features: usize, out: usize) -> Result<Tensor> {
        let xs: Vec<f32> = x2.flatten_all()?.to_vec1()?;
        let mut ys = vec![0f32; rows * out];
        matvec_multi(
            &xs,
            rows,
            in_features,
            &mut [Projection {
                w: self.compact().expect("a compact weight"),
                out,
                y: &mut ys,
            }],
            candle_core::utils::get_num_threads(),
        );
        Tensor::from_vec(ys, (rows, out), x2.device())
    }
}
