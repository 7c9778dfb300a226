//! A per-sequence key/value cache, preallocated to the context length, so a
//! decode step writes one position in place instead of concatenating tensors.

use candle_core::{DType, Device, Result, Tensor};

/// Keys and values of every layer for one sequence: `[1, kv_heads, capacity, head_dim]`.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Allocates room for `capacity` positions in `num_layers` layers.
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let layers = (0..num_layers)
            .map(|_| {
                let k = Tensor::zeros((1, kv_heads, capacity, head_dim), dtype, device)?;
                let v = Tensor::zeros((1, kv_heads, capacity, head_dim), dtype, device)?;
                Ok((k, v))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything after the first `len` positions (for prefix reuse).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Writes `k`, `v` (`[1, kv_heads, t, head_dim]`) of `layer` at the current
    /// end and returns the keys and values of all positions up to and including them.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let (kb, vb) = &self.layers[layer];
        kb.slice_set(k, 2, self.len)?;
        vb.slice_set(v, 2, self.len)?;
        Ok((kb.narrow(2, 0, self.len + t)?, vb.narrow(2, 0, self.len + t)?))
    }

    /// Marks `t` more positions as filled (after every layer appended them).
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
