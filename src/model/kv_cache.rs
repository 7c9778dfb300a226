//! One sequence's keys and values. On the CPU they live in blocks of a
//! [`KvPool`] (`model::kv_pool`): the sequence holds a table of blocks,
//! takes one as it grows past a block boundary, shares full blocks of a
//! common prefix with other sequences, and copies a shared block before
//! writing into it. A cache made on its own ([`KvCache::new`]) gets a
//! private pool sized to its capacity. On a GPU the cache is a pair of
//! device tensors per layer, preallocated to the capacity and written with
//! `slice_set`.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::kv_pool::{BlockId, KvDtype, KvPool, KvShape, Part, KV_BLOCK};
use super::RopeShift;

/// The pool could not give a sequence the blocks it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvFull {
    /// Blocks still missing.
    pub missing: usize,
}

impl std::fmt::Display for KvFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the KV cache is full ({} more blocks needed)", self.missing)
    }
}

impl std::error::Error for KvFull {}

/// A sequence's blocks in a pool.
struct Paged {
    pool: Arc<KvPool>,
    /// Block of positions `i·KV_BLOCK..(i + 1)·KV_BLOCK`.
    table: Vec<BlockId>,
    /// The tokens whose keys and values are cached, in order.
    tokens: Vec<u32>,
    /// Prefix hash of each full block (when the pool shares).
    hashes: Vec<u64>,
}

impl Drop for Paged {
    fn drop(&mut self) {
        for &b in &self.table {
            self.pool.release(b);
        }
    }
}

/// Where the keys and values live.
enum Store {
    /// Blocks of a host pool.
    Paged(Paged),
    /// Per layer: keys and values, each a `[1, kv_heads, capacity, head_dim]` tensor.
    Device { layers: Vec<(Tensor, Tensor)>, len: usize },
}

/// Keys and values of every layer for one sequence.
pub struct KvCache {
    store: Store,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("paged", &self.is_host())
            .finish()
    }
}

/// A sequence's blocks, for the fused CPU step's attention.
pub(crate) struct PagedView<'a> {
    /// The pool the blocks are in.
    pub pool: &'a KvPool,
    /// The sequence's blocks, in position order.
    pub table: &'a [BlockId],
}

impl KvCache {
    /// Room for `capacity` positions in `num_layers` layers: on the CPU in
    /// f32, the blocks of a private pool; elsewhere device tensors.
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if device.is_cpu() && dtype == DType::F32 {
            let shape = KvShape {
                layers: num_layers,
                kv_heads,
                head_dim,
            };
            let pool = KvPool::new(shape, KvDtype::F32, capacity.div_ceil(KV_BLOCK), false);
            return Ok(Self::in_pool(&pool, capacity));
        }
        let layers = (0..num_layers)
            .map(|_| {
                let k = Tensor::zeros((1, kv_heads, capacity, head_dim), dtype, device)?;
                let v = Tensor::zeros((1, kv_heads, capacity, head_dim), dtype, device)?;
                Ok((k, v))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            store: Store::Device { layers, len: 0 },
            capacity,
            kv_heads,
            head_dim,
        })
    }

    /// An empty sequence of up to `capacity` positions whose blocks come from `pool`.
    pub fn in_pool(pool: &Arc<KvPool>, capacity: usize) -> Self {
        let shape = pool.shape();
        Self {
            store: Store::Paged(Paged {
                pool: Arc::clone(pool),
                table: Vec::new(),
                tokens: Vec::new(),
                hashes: Vec::new(),
            }),
            capacity,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        match &self.store {
            Store::Paged(p) => p.tokens.len(),
            Store::Device { len, .. } => *len,
        }
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions the cache can hold (its context bound; a pool may run out first).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Cuts the sequence back to its first `len` positions, releasing the
    /// blocks past them (a shared block cut into is copied before its next write).
    pub fn truncate(&mut self, len: usize) {
        match &mut self.store {
            Store::Paged(p) => {
                let len = len.min(p.tokens.len());
                p.tokens.truncate(len);
                p.hashes.truncate(len / KV_BLOCK);
                for b in p.table.drain(len.div_ceil(KV_BLOCK)..) {
                    p.pool.release(b);
                }
            }
            Store::Device { len: l, .. } => *l = (*l).min(len),
        }
    }

    /// Makes room for `extra` more positions: the blocks they fall in,
    /// with a shared or registered block under the next position copied
    /// first. Fails (keeping what it took) when the pool has too few blocks.
    pub fn reserve(&mut self, extra: usize) -> std::result::Result<(), KvFull> {
        let Store::Paged(p) = &mut self.store else {
            return Ok(());
        };
        let len = p.tokens.len();
        if !len.is_multiple_of(KV_BLOCK) && extra > 0 {
            let i = len / KV_BLOCK;
            let b = p.table[i];
            if !p.pool.writable(b) {
                let copy = p.pool.alloc().ok_or(KvFull { missing: 1 })?;
                p.pool.copy_rows(b, copy, len % KV_BLOCK);
                p.pool.release(b);
                p.table[i] = copy;
            }
        }
        let need = (len + extra).div_ceil(KV_BLOCK);
        while p.table.len() < need {
            match p.pool.alloc() {
                Some(b) => p.table.push(b),
                None => {
                    return Err(KvFull {
                        missing: need - p.table.len(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Blocks [`reserve`](Self::reserve)`(extra)` would take from the pool.
    pub fn blocks_to_reserve(&self, extra: usize) -> usize {
        match &self.store {
            Store::Paged(p) => {
                let len = p.tokens.len();
                let cow = !len.is_multiple_of(KV_BLOCK) && extra > 0 && !p.pool.writable(p.table[len / KV_BLOCK]);
                (len + extra).div_ceil(KV_BLOCK).saturating_sub(p.table.len()) + usize::from(cow)
            }
            Store::Device { .. } => 0,
        }
    }

    /// Takes, by reference, the pool's cached blocks that continue this
    /// sequence along `tokens` (the whole sequence, of which the cache
    /// holds a prefix; whole blocks only, up to position `max`); returns
    /// how many tokens they hold. The sequence must end on a block boundary.
    pub fn adopt(&mut self, tokens: &[u32], max: usize) -> usize {
        let Store::Paged(p) = &mut self.store else {
            return 0;
        };
        if !p.pool.sharing() || !p.tokens.len().is_multiple_of(KV_BLOCK) {
            return 0;
        }
        let len = p.tokens.len();
        for b in p.table.drain(len / KV_BLOCK..) {
            p.pool.release(b);
        }
        let end = max.min(tokens.len());
        if end <= len || tokens[..len] != p.tokens[..] {
            return 0;
        }
        let prev = p.hashes.last().copied().unwrap_or(0);
        let pool = Arc::clone(&p.pool);
        let mut taken = 0;
        for (block, h) in tokens[len..end]
            .chunks_exact(KV_BLOCK)
            .zip(pool.chain_hashes(prev, &tokens[len..end]))
        {
            let Some(b) = pool.lookup(h) else { break };
            p.table.push(b);
            p.hashes.push(h);
            p.tokens.extend_from_slice(block);
            taken += KV_BLOCK;
        }
        taken
    }

    /// Tokens of `tokens` (at most `max`) that [`adopt`](Self::adopt) would
    /// take from `pool` for a new sequence (nothing taken).
    pub fn cached_prefix(pool: &KvPool, tokens: &[u32], max: usize) -> usize {
        if !pool.sharing() {
            return 0;
        }
        let end = max.min(tokens.len());
        pool.chain_hashes(0, &tokens[..end])
            .take_while(|&h| pool.contains(h))
            .count()
            * KV_BLOCK
    }

    /// Prefix hashes of the full blocks of `tokens` in `pool` (for
    /// recognising the same prefix in two sequences before either has it).
    pub fn block_hashes(pool: &KvPool, tokens: &[u32]) -> Vec<u64> {
        pool.chain_hashes(0, tokens).collect()
    }

    /// The tokens of this sequence's registered (full) blocks and their
    /// prefix hashes: what a later sequence can find again in the pool
    /// while the blocks stay cached (None: nothing registered).
    pub fn registered(&self) -> Option<(Vec<u32>, Vec<u64>)> {
        match &self.store {
            Store::Paged(p) if !p.hashes.is_empty() => {
                Some((p.tokens[..p.hashes.len() * KV_BLOCK].to_vec(), p.hashes.clone()))
            }
            _ => None,
        }
    }

    /// Appends `tokens` whose keys and values another sequence cached at
    /// positions `from..` (in the blocks registered under its prefix hashes
    /// `source`), moved to this sequence's next positions: keys turned by
    /// `shift` to their new positions, values copied, into this sequence's
    /// own blocks (a shared block is copied before it is written; the
    /// source's blocks are only read). The run is cut at the first source
    /// block no longer cached, and nothing is taken when the pool has no
    /// room. Returns how many tokens were appended.
    pub fn append_moved(&mut self, source: &[u64], from: usize, tokens: &[u32], shift: &RopeShift) -> usize {
        let Store::Paged(p) = &self.store else { return 0 };
        let pool = Arc::clone(&p.pool);
        if !pool.sharing() || shift.head_dim() != self.head_dim {
            return 0;
        }
        let end = (from + tokens.len()).min(source.len() * KV_BLOCK);
        let first = from / KV_BLOCK;
        let mut held = Vec::new();
        for &h in source.iter().take(end.div_ceil(KV_BLOCK)).skip(first) {
            match pool.lookup(h) {
                Some(b) => held.push(b),
                None => break,
            }
        }
        let n = end.min((first + held.len()) * KV_BLOCK).saturating_sub(from);
        let appended = if n > 0 && self.reserve(n).is_ok() {
            let at = self.len();
            self.write_moved(&held, from, at, n, shift);
            self.advance(&tokens[..n]);
            n
        } else {
            0
        };
        for b in held {
            pool.release(b);
        }
        appended
    }

    /// Copies `n` rows from position `from` of the blocks `held` (the first
    /// holding position `from`) to this sequence's positions `at..`,
    /// turning the keys; the destination blocks are reserved and writable.
    fn write_moved(&mut self, held: &[BlockId], from: usize, at: usize, n: usize, shift: &RopeShift) {
        let Store::Paged(p) = &self.store else { return };
        let (pool, hd, heads) = (&p.pool, self.head_dim, self.kv_heads);
        let (dtype, layers) = (pool.dtype(), pool.shape().layers);
        let bytes = hd * dtype.bytes();
        let mut key = vec![0f32; hd];
        for j in 0..n {
            let (src, dst) = (from + j, at + j);
            let (sb, sr) = (held[src / KV_BLOCK - from / KV_BLOCK], src % KV_BLOCK);
            let (db, dr) = (p.table[dst / KV_BLOCK], dst % KV_BLOCK);
            let turn = shift.turn(src, dst);
            for layer in 0..layers {
                for h in 0..heads {
                    let (s, d) = (
                        pool.rows_ptr(sb, layer, Part::Values, h),
                        pool.rows_ptr(db, layer, Part::Values, h),
                    );
                    // SAFETY: both rows are inside their blocks; `db` is this
                    // sequence's own writable block and `sb` a registered one,
                    // so they differ and nobody writes `sb`.
                    unsafe { std::ptr::copy_nonoverlapping(s.add(sr * bytes), d.add(dr * bytes), bytes) };
                    let (s, d) = (
                        pool.rows_ptr(sb, layer, Part::Keys, h),
                        pool.rows_ptr(db, layer, Part::Keys, h),
                    );
                    // SAFETY: as above.
                    unsafe {
                        read_row_at(s, dtype, sr, &mut key);
                        shift.apply(&mut key, &turn);
                        write_row_at(d, dtype, dr, &key);
                    }
                }
            }
        }
    }

    /// Keys (`Part::Keys`) or values of position `pos` in `layer`, every
    /// key/value head, as f32 (None: a device cache or a position not cached).
    fn row_at(&self, layer: usize, pos: usize, part: Part) -> Option<Vec<f32>> {
        let Store::Paged(p) = &self.store else { return None };
        if pos >= p.tokens.len() || layer >= p.pool.shape().layers {
            return None;
        }
        let mut out = vec![0f32; self.kv_heads * self.head_dim];
        let (b, r) = (p.table[pos / KV_BLOCK], pos % KV_BLOCK);
        for (h, head) in out.chunks_exact_mut(self.head_dim).enumerate() {
            // SAFETY: the sequence holds block `b`, which has row `r` of every head.
            unsafe { read_row_at(p.pool.rows_ptr(b, layer, part, h), p.pool.dtype(), r, head) };
        }
        Some(out)
    }

    /// The (rotated) keys of position `pos` in `layer`, every key/value head, as f32.
    pub fn keys_at(&self, layer: usize, pos: usize) -> Option<Vec<f32>> {
        self.row_at(layer, pos, Part::Keys)
    }

    /// The values of position `pos` in `layer`, every key/value head, as f32.
    pub fn values_at(&self, layer: usize, pos: usize) -> Option<Vec<f32>> {
        self.row_at(layer, pos, Part::Values)
    }

    /// Writes one position's keys and values of `layer` (`kv_heads · head_dim`
    /// each) at `pos`, in the pool's dtype; the position's block was reserved.
    pub(crate) fn write_row(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let Store::Paged(p) = &mut self.store else {
            panic!("write_row on a device cache");
        };
        let hd = self.head_dim;
        let (b, r) = (p.table[pos / KV_BLOCK], pos % KV_BLOCK);
        for (part, src) in [(Part::Keys, k), (Part::Values, v)] {
            for h in 0..self.kv_heads {
                let row = &src[h * hd..(h + 1) * hd];
                let at = p.pool.rows_ptr(b, layer, part, h);
                // SAFETY: this sequence holds block `b` unshared (reserve
                // copied it otherwise), row `r` of `hd` values is inside it.
                unsafe { write_row_at(at, p.pool.dtype(), r, row) };
            }
        }
    }

    /// Values `0..len` of `part` of `head` in `layer`, as f32.
    fn gather(p: &Paged, layer: usize, part: Part, head: usize, len: usize, hd: usize, out: &mut Vec<f32>) {
        for (i, &b) in p.table.iter().enumerate().take(len.div_ceil(KV_BLOCK)) {
            let rows = (len - i * KV_BLOCK).min(KV_BLOCK);
            let at = p.pool.rows_ptr(b, layer, part, head);
            let from = out.len();
            out.resize(from + rows * hd, 0.0);
            // SAFETY: the block holds `KV_BLOCK` ≥ `rows` rows of `hd` values
            // of the pool's dtype: read as one row of `rows · hd`.
            unsafe { read_row_at(at, p.pool.dtype(), 0, &mut out[from..]) };
        }
    }

    /// Writes `k`, `v` (`[1, kv_heads, t, head_dim]`) of `layer` at the current
    /// end and returns the keys and values of all positions up to and including them.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let (hd, heads) = (self.head_dim, self.kv_heads);
        let len = self.len();
        if let Store::Device { layers, .. } = &mut self.store {
            let (kb, vb) = &layers[layer];
            kb.slice_set(k, 2, len)?;
            vb.slice_set(v, 2, len)?;
            return Ok((kb.narrow(2, 0, len + t)?, vb.narrow(2, 0, len + t)?));
        }
        self.reserve(t).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let host = |x: &Tensor| -> Result<Vec<f32>> { x.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
        let (kn, vn) = (host(k)?, host(v)?);
        // Position-major rows of every head, as `write_row` takes them.
        let row = |src: &[f32], j: usize| -> Vec<f32> {
            (0..heads)
                .flat_map(|h| src[(h * t + j) * hd..(h * t + j + 1) * hd].iter().copied())
                .collect()
        };
        for j in 0..t {
            self.write_row(layer, len + j, &row(&kn, j), &row(&vn, j));
        }
        let Store::Paged(p) = &self.store else { unreachable!() };
        let view = |part: Part| -> Result<Tensor> {
            let mut all = Vec::with_capacity(heads * (len + t) * hd);
            for h in 0..heads {
                Self::gather(p, layer, part, h, len + t, hd, &mut all);
            }
            Tensor::from_vec(all, (1, heads, len + t, hd), k.device())
        };
        Ok((view(Part::Keys)?, view(Part::Values)?))
    }

    /// The blocks, when the cache is paged.
    pub(crate) fn paged(&self) -> Option<PagedView<'_>> {
        match &self.store {
            Store::Paged(p) => Some(PagedView {
                pool: &p.pool,
                table: &p.table,
            }),
            Store::Device { .. } => None,
        }
    }

    /// Keys and values of `layer` (`[1, kv_heads, capacity, head_dim]` each),
    /// when the cache lives in device tensors.
    pub fn device_layer(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        match &self.store {
            Store::Device { layers, .. } => layers.get(layer).map(|(k, v)| (k, v)),
            Store::Paged(_) => None,
        }
    }

    /// Whether the cache lives in host memory (the fused CPU step can use it).
    pub fn is_host(&self) -> bool {
        matches!(self.store, Store::Paged(_))
    }

    /// Marks `tokens` as cached (after every layer wrote them); full
    /// blocks of a sharing pool are registered for other sequences.
    pub fn advance(&mut self, tokens: &[u32]) {
        match &mut self.store {
            Store::Device { len, .. } => *len += tokens.len(),
            Store::Paged(p) => {
                p.tokens.extend_from_slice(tokens);
                if !p.pool.sharing() {
                    return;
                }
                let (done, prev) = (p.hashes.len(), p.hashes.last().copied().unwrap_or(0));
                let new: Vec<u64> = p.pool.chain_hashes(prev, &p.tokens[done * KV_BLOCK..]).collect();
                for (i, h) in (done..).zip(new) {
                    p.pool.register(p.table[i], h);
                    p.hashes.push(h);
                }
            }
        }
    }
}

/// Reads row `r` (`out.len()` values of `dtype`) of the rows at `at` as f32.
///
/// # Safety
/// `at` must point to at least `r + 1` rows of `out.len()` values of `dtype`.
unsafe fn read_row_at(at: *const u8, dtype: KvDtype, r: usize, out: &mut [f32]) {
    let hd = out.len();
    match dtype {
        KvDtype::F32 => out.copy_from_slice(std::slice::from_raw_parts((at as *const f32).add(r * hd), hd)),
        KvDtype::F16 => {
            for (o, x) in out
                .iter_mut()
                .zip(std::slice::from_raw_parts((at as *const half::f16).add(r * hd), hd))
            {
                *o = x.to_f32();
            }
        }
        KvDtype::Bf16 => {
            for (o, x) in out
                .iter_mut()
                .zip(std::slice::from_raw_parts((at as *const half::bf16).add(r * hd), hd))
            {
                *o = x.to_f32();
            }
        }
    }
}

/// Writes `row` as row `r` of the rows at `at`, in `dtype`.
///
/// # Safety
/// `at` must point to at least `r + 1` writable rows of `row.len()` values of `dtype`.
unsafe fn write_row_at(at: *mut u8, dtype: KvDtype, r: usize, row: &[f32]) {
    let hd = row.len();
    match dtype {
        KvDtype::F32 => std::slice::from_raw_parts_mut((at as *mut f32).add(r * hd), hd).copy_from_slice(row),
        KvDtype::F16 => {
            for (d, x) in std::slice::from_raw_parts_mut((at as *mut half::f16).add(r * hd), hd)
                .iter_mut()
                .zip(row)
            {
                *d = half::f16::from_f32(*x);
            }
        }
        KvDtype::Bf16 => {
            for (d, x) in std::slice::from_raw_parts_mut((at as *mut half::bf16).add(r * hd), hd)
                .iter_mut()
                .zip(row)
            {
                *d = half::bf16::from_f32(*x);
            }
        }
    }
}
