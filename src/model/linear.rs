//! A dense projection `y = x·Wᵀ + b` that flattens leading dimensions so the
//! matrix multiply is always one 2-D product (the fast path on every backend).

use candle_core::{Result, Tensor, D};

/// A linear layer with an optional bias; weights are `[out, in]` as in HF.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Wraps a `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
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

    /// Applies the projection over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_features = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_features))?;
        super::flop_probe::add(2 * (rows * in_features * self.weight.dim(0)?) as u64);
        // Decoding shapes (a few rows) stream the weights with our threaded
        // matrix-vector kernel; everything else is a GEMM.
        let decode_shape = rows <= super::matvec::MAX_ROWS
            && x2.device().is_cpu()
            && x2.dtype() == candle_core::DType::F32
            && self.weight.dtype() == candle_core::DType::F32
            && self.weight.is_contiguous();
        let mut y = if decode_shape {
            x2.contiguous()?
                .apply_op2_no_bwd(&self.weight, &super::matvec::MatVecOp)?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("x has at least one dimension") = y.dim(D::Minus1)?;
        y.reshape(out_dims)
    }
}
