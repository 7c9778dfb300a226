//! A dense projection `y = x·Wᵀ + b` that flattens leading dimensions so the
//! matrix multiply is always one 2-D product (the fast path on every backend).

use std::sync::Arc;

use candle_core::{Result, Tensor, D};

use super::lora::{frozen_matmul, SharedAdapter};
use super::quant::Q8Matrix;

/// A linear layer with an optional bias; weights are `[out, in]` as in HF.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    q8: Option<Arc<Q8Matrix>>,
    lora: Option<SharedAdapter>,
}

impl Linear {
    /// Wraps a `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            q8: None,
            lora: None,
        }
    }

    /// Quantizes the weight to Q8_0: the decode kernels then read the Q8_0
    /// blocks, and the weight tensor (used for prompts) holds their exact
    /// dequantized values, so every path computes with the same weights.
    /// Returns false (and changes nothing) when rows are not a multiple of 32.
    pub fn quantize_q8(&mut self) -> Result<bool> {
        let (rows, cols) = self.weight.dims2()?;
        let values: Vec<f32> = self
            .weight
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let Some(q) = Q8Matrix::quantize(&values, rows, cols) else {
            return Ok(false);
        };
        self.weight =
            Tensor::from_vec(q.dequantize(), (rows, cols), self.weight.device())?.to_dtype(self.weight.dtype())?;
        self.q8 = Some(Arc::new(q));
        Ok(true)
    }

    /// The Q8_0 blocks, when quantized.
    pub fn q8(&self) -> Option<&Q8Matrix> {
        self.q8.as_deref()
    }

    /// The Q8_0 blocks shared (no copy), when quantized.
    pub(crate) fn q8_shared(&self) -> Option<Arc<Q8Matrix>> {
        self.q8.clone()
    }

    /// The `[out, in]` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The `[out]` bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
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
                a.merge_into(&self.weight).map_err(candle_core::Error::wrap)?,
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
        super::flop_probe::add(2 * (rows * in_features * self.weight.dim(0)?) as u64);
        // Decoding shapes (a few rows) stream the weights with our threaded
        // matrix-vector kernel; everything else is a GEMM.
        let decode_shape = !differentiable
            && rows <= super::matvec::MAX_ROWS
            && x2.device().is_cpu()
            && x2.dtype() == candle_core::DType::F32
            && self.weight.dtype() == candle_core::DType::F32
            && self.weight.is_contiguous();
        let mut y = if differentiable {
            frozen_matmul(&x2, &self.weight).map_err(candle_core::Error::wrap)?
        } else if decode_shape {
            x2.contiguous()?
                .apply_op2_no_bwd(&self.weight, &super::matvec::MatVecOp)?
        } else {
            x2.matmul(&self.weight.t()?)?
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
}
