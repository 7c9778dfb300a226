//! A per-sequence key/value cache, preallocated to the context length, so a
//! step writes its positions in place instead of concatenating tensors.
//!
//! On the CPU in f32 the cache is plain host memory, which the fused decode
//! path (`model::fused`) reads and writes directly; elsewhere it is a pair
//! of device tensors per layer written with `slice_set`.

use candle_core::{DType, Device, Result, Tensor};

/// Where the keys and values live.
#[derive(Debug)]
enum Store {
    /// Per layer: keys and values, each `[kv_heads, capacity, head_dim]` row-major.
    Host(Vec<(Vec<f32>, Vec<f32>)>),
    /// Per layer: keys and values, each a `[1, kv_heads, capacity, head_dim]` tensor.
    Device(Vec<(Tensor, Tensor)>),
}

/// Keys and values of every layer for one sequence.
#[derive(Debug)]
pub struct KvCache {
    store: Store,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
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
        let store = if device.is_cpu() && dtype == DType::F32 {
            let size = kv_heads * capacity * head_dim;
            Store::Host((0..num_layers).map(|_| (vec![0f32; size], vec![0f32; size])).collect())
        } else {
            Store::Device(
                (0..num_layers)
                    .map(|_| {
                        let k = Tensor::zeros((1, kv_heads, capacity, head_dim), dtype, device)?;
                        let v = Tensor::zeros((1, kv_heads, capacity, head_dim), dtype, device)?;
                        Ok((k, v))
                    })
                    .collect::<Result<_>>()?,
            )
        };
        Ok(Self {
            store,
            len: 0,
            capacity,
            kv_heads,
            head_dim,
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
        let (len, cap, hd, heads) = (self.len, self.capacity, self.head_dim, self.kv_heads);
        match &mut self.store {
            Store::Device(layers) => {
                let (kb, vb) = &layers[layer];
                kb.slice_set(k, 2, len)?;
                vb.slice_set(v, 2, len)?;
                Ok((kb.narrow(2, 0, len + t)?, vb.narrow(2, 0, len + t)?))
            }
            Store::Host(layers) => {
                // Writes `new` after the cached positions of each head and
                // returns every position up to them as one tensor.
                let write_and_view = |buf: &mut [f32], new: &Tensor| -> Result<Tensor> {
                    let new: Vec<f32> = new.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    let mut all = Vec::with_capacity(heads * (len + t) * hd);
                    for h in 0..heads {
                        let dst = &mut buf[(h * cap + len) * hd..(h * cap + len + t) * hd];
                        dst.copy_from_slice(&new[h * t * hd..(h + 1) * t * hd]);
                        all.extend_from_slice(&buf[h * cap * hd..(h * cap + len + t) * hd]);
                    }
                    Tensor::from_vec(all, (1, heads, len + t, hd), k.device())
                };
                let (kb, vb) = &mut layers[layer];
                Ok((write_and_view(kb, k)?, write_and_view(vb, v)?))
            }
        }
    }

    /// Keys and values of `layer` as host memory (`[kv_heads, capacity,
    /// head_dim]` each), when the cache lives on the host.
    pub fn host_layer_mut(&mut self, layer: usize) -> Option<(&mut [f32], &mut [f32])> {
        match &mut self.store {
            Store::Host(layers) => layers.get_mut(layer).map(|(k, v)| (k.as_mut_slice(), v.as_mut_slice())),
            Store::Device(_) => None,
        }
    }

    /// Keys and values of `layer` (`[1, kv_heads, capacity, head_dim]` each),
    /// when the cache lives in device tensors.
    pub fn device_layer(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        match &self.store {
            Store::Device(layers) => layers.get(layer).map(|(k, v)| (k, v)),
            Store::Host(_) => None,
        }
    }

    /// Whether the cache lives in host memory (the fused CPU decode path can use it).
    pub fn is_host(&self) -> bool {
        matches!(self.store, Store::Host(_))
    }

    /// Marks `t` more positions as filled (after every layer appended them).
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
