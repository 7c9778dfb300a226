//! The KV pool: the keys and values of many sequences in fixed-size blocks
//! of [`KV_BLOCK`] positions, cut from one arena whose size is the memory
//! budget (vLLM's paged attention, with its automatic prefix caching).
//!
//! A sequence holds a table of blocks (`model::kv_cache`). A full block
//! can be registered under a hash of its tokens and of every token before
//! it; another sequence whose prompt starts the same way takes the block by
//! reference instead of computing it, whether its first owner is still
//! running or has finished. A shared or registered block is never written:
//! a sequence that must write into one copies it first. Blocks nobody
//! holds stay cached under their hash until their memory is needed, the
//! least recently released evicted first.
//!
//! The arena is allocated zeroed and untouched, so the process's resident
//! memory grows only as blocks are first written, and never past the budget.
//!
//! Several models served side by side share one pool ([`KvPool::shared`]):
//! each gets a view with its own shape and its own hash salt (a prefix
//! cached by one model is never found by another), over one arena, one
//! book and one eviction order. A block is sized for the largest model's
//! positions; a model with fewer layers or heads leaves the rest of its
//! blocks unused.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

/// Positions per block.
pub const KV_BLOCK: usize = 32;

/// How keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// 32-bit floats: the bits of the computation itself.
    F32,
    /// IEEE half precision (llama.cpp's default cache type).
    F16,
    /// bfloat16.
    Bf16,
}

impl KvDtype {
    /// Bytes of one stored value.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// The name on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("KV cache type must be f32, f16 or bf16, not {other:?}")),
        }
    }
}

/// The model dimensions a pool stores keys and values for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Decoder layers.
    pub layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

impl KvShape {
    /// Bytes of keys and values for one position in every layer.
    pub fn bytes_per_token(self, dtype: KvDtype) -> usize {
        self.layers * 2 * self.kv_heads * self.head_dim * dtype.bytes()
    }
}

/// A block's index in its pool.
pub type BlockId = u32;

/// Keys or values of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// Keys (rotated).
    Keys = 0,
    /// Values.
    Values = 1,
}

/// How a pool's blocks are used right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolUsage {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks held by at least one sequence.
    pub in_use: usize,
    /// Blocks nobody holds, kept for their registered prefix.
    pub cached: usize,
    /// Blocks never used or released without a hash.
    pub free: usize,
}

/// The zeroed memory the blocks live in.
struct Arena {
    ptr: *mut u8,
    _buf: Vec<u64>,
}

// SAFETY: the arena is plain memory; who may write which block is the
// pool's bookkeeping (a block is written only by the one sequence that
// holds it unshared and unregistered).
unsafe impl Send for Arena {}
// SAFETY: as above; concurrent readers read blocks nobody writes.
unsafe impl Sync for Arena {}

/// Who holds each block and which prefixes are cached.
struct Book {
    /// Holders of each block.
    refs: Vec<u32>,
    /// The registered prefix hash of each block.
    hash: Vec<Option<u64>>,
    by_hash: HashMap<u64, BlockId>,
    /// Blocks without content anyone can find.
    free: Vec<BlockId>,
    /// Unheld registered blocks by release time, oldest first.
    lru: BTreeMap<u64, BlockId>,
    /// When each block in `lru` was released.
    released_at: Vec<u64>,
    clock: u64,
}

/// What every view of a pool shares: the arena and its bookkeeping.
struct Shared {
    dtype: KvDtype,
    blocks: usize,
    /// Bytes of one block (the largest model's block).
    block_bytes: usize,
    /// Whether full blocks are registered for other sequences to share.
    sharing: bool,
    arena: Arena,
    book: Mutex<Book>,
    hasher: RandomState,
}

/// Keys and values of many sequences in blocks (see the module docs): one
/// model's view of the pool.
pub struct KvPool {
    /// This model's dimensions.
    shape: KvShape,
    /// Mixed into every prefix hash: the model's own namespace.
    salt: u64,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("shape", &self.shape)
            .field("dtype", &self.shared.dtype)
            .field("blocks", &self.shared.blocks)
            .field("sharing", &self.shared.sharing)
            .finish()
    }
}

impl KvPool {
    /// A pool of `blocks` blocks; with `sharing`, full blocks are
    /// registered under their prefix hash for other sequences to take.
    pub fn new(shape: KvShape, dtype: KvDtype, blocks: usize, sharing: bool) -> Arc<Self> {
        Self::views(&[shape], dtype, blocks, sharing).remove(0)
    }

    /// A pool of as many blocks as `bytes` holds.
    pub fn with_budget(shape: KvShape, dtype: KvDtype, bytes: usize, sharing: bool) -> Arc<Self> {
        Self::new(shape, dtype, bytes / Self::block_bytes_of(shape, dtype), sharing)
    }

    /// One pool of as many blocks as `bytes` holds, a block sized for the
    /// largest of `shapes`, and one view of it per shape (in order), each
    /// with its own prefix namespace.
    pub fn shared(shapes: &[KvShape], dtype: KvDtype, bytes: usize, sharing: bool) -> Vec<Arc<Self>> {
        let block = shapes
            .iter()
            .map(|&s| Self::block_bytes_of(s, dtype))
            .max()
            .unwrap_or(1);
        Self::views(shapes, dtype, bytes / block.max(1), sharing)
    }

    fn views(shapes: &[KvShape], dtype: KvDtype, blocks: usize, sharing: bool) -> Vec<Arc<Self>> {
        let block_bytes = shapes
            .iter()
            .map(|&s| Self::block_bytes_of(s, dtype))
            .max()
            .unwrap_or(0);
        let mut buf = vec![0u64; (blocks * block_bytes).div_ceil(8)];
        let ptr = buf.as_mut_ptr() as *mut u8;
        let shared = Arc::new(Shared {
            dtype,
            blocks,
            block_bytes,
            sharing,
            arena: Arena { ptr, _buf: buf },
            book: Mutex::new(Book {
                refs: vec![0; blocks],
                hash: vec![None; blocks],
                by_hash: HashMap::new(),
                free: (0..blocks as BlockId).rev().collect(),
                lru: BTreeMap::new(),
                released_at: vec![0; blocks],
                clock: 0,
            }),
            hasher: RandomState::new(),
        });
        shapes
            .iter()
            .enumerate()
            .map(|(i, &shape)| {
                Arc::new(Self {
                    shape,
                    salt: i as u64,
                    shared: Arc::clone(&shared),
                })
            })
            .collect()
    }

    fn block_bytes_of(shape: KvShape, dtype: KvDtype) -> usize {
        KV_BLOCK * shape.bytes_per_token(dtype)
    }

    /// Bytes of one block (every layer's keys and values of [`KV_BLOCK`]
    /// positions of the largest model sharing the pool).
    pub fn block_bytes(&self) -> usize {
        self.shared.block_bytes
    }

    /// Blocks in the pool.
    pub fn blocks(&self) -> usize {
        self.shared.blocks
    }

    /// Positions the whole pool holds.
    pub fn positions(&self) -> usize {
        self.shared.blocks * KV_BLOCK
    }

    /// How values are stored.
    pub fn dtype(&self) -> KvDtype {
        self.shared.dtype
    }

    /// The dimensions this view's model stores.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Whether full blocks are shared by prefix.
    pub fn sharing(&self) -> bool {
        self.shared.sharing
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // The book stays consistent between statements: a panic elsewhere
        // while it was held leaves nothing half-done.
        self.shared.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks in use, cached and free.
    pub fn usage(&self) -> PoolUsage {
        let b = self.book();
        PoolUsage {
            total: self.shared.blocks,
            in_use: b.refs.iter().filter(|&&r| r > 0).count(),
            cached: b.lru.len(),
            free: b.free.len(),
        }
    }

    /// Blocks a sequence could take now (free or cached).
    pub fn available(&self) -> usize {
        let b = self.book();
        b.free.len() + b.lru.len()
    }

    /// A block for one holder: a free one, else the least recently
    /// released cached one (its prefix forgotten); None when every block is held.
    pub(crate) fn alloc(&self) -> Option<BlockId> {
        let mut b = self.book();
        let id = match b.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = b.lru.pop_first()?;
                if let Some(h) = b.hash[id as usize].take() {
                    b.by_hash.remove(&h);
                }
                id
            }
        };
        b.refs[id as usize] = 1;
        Some(id)
    }

    /// Drops one holder of `id`; an unheld block is cached under its hash or freed.
    pub(crate) fn release(&self, id: BlockId) {
        let mut b = self.book();
        let i = id as usize;
        debug_assert!(b.refs[i] > 0, "releasing a free block");
        b.refs[i] = b.refs[i].saturating_sub(1);
        if b.refs[i] == 0 {
            if b.hash[i].is_some() {
                b.clock += 1;
                let at = b.clock;
                b.released_at[i] = at;
                b.lru.insert(at, id);
            } else {
                b.free.push(id);
            }
        }
    }

    /// Takes the block registered under `hash`, if any (one more holder).
    pub(crate) fn lookup(&self, hash: u64) -> Option<BlockId> {
        let mut b = self.book();
        let id = *b.by_hash.get(&hash)?;
        let i = id as usize;
        if b.refs[i] == 0 {
            let at = b.released_at[i];
            b.lru.remove(&at);
        }
        b.refs[i] += 1;
        Some(id)
    }

    /// Whether a block is registered under `hash` (nothing taken).
    pub(crate) fn contains(&self, hash: u64) -> bool {
        self.book().by_hash.contains_key(&hash)
    }

    /// Registers the full block `id` under `hash` unless another block
    /// already holds that prefix.
    pub(crate) fn register(&self, id: BlockId, hash: u64) {
        let mut b = self.book();
        if b.by_hash.contains_key(&hash) || b.hash[id as usize].is_some() {
            return;
        }
        b.hash[id as usize] = Some(hash);
        b.by_hash.insert(hash, id);
    }

    /// Whether the one holder of `id` may write it (nobody else holds it and
    /// no prefix is registered under it).
    pub(crate) fn writable(&self, id: BlockId) -> bool {
        let b = self.book();
        b.refs[id as usize] == 1 && b.hash[id as usize].is_none()
    }

    /// The hash of a block of `tokens` that follows the prefix hashed `prev`
    /// (in this model's namespace).
    pub(crate) fn chain_hash(&self, prev: u64, tokens: &[u32]) -> u64 {
        self.shared.hasher.hash_one((self.salt, prev, tokens))
    }

    /// Prefix hashes of the successive full blocks of `tokens`, which
    /// follow the prefix hashed `prev` (0: the start of a sequence).
    pub(crate) fn chain_hashes<'a>(&'a self, prev: u64, tokens: &'a [u32]) -> impl Iterator<Item = u64> + 'a {
        tokens.chunks_exact(KV_BLOCK).scan(prev, move |prev, block| {
            *prev = self.chain_hash(*prev, block);
            Some(*prev)
        })
    }

    /// Where `rows` rows of `part` of `head` in `layer` of block `id` start;
    /// each row is `head_dim` values of the pool's dtype.
    pub(crate) fn rows_ptr(&self, id: BlockId, layer: usize, part: Part, head: usize) -> *mut u8 {
        let s = self.shape;
        assert!((id as usize) < self.shared.blocks && layer < s.layers && head < s.kv_heads);
        let rows = ((layer * 2 + part as usize) * s.kv_heads + head) * KV_BLOCK;
        let inside = rows * s.head_dim * self.shared.dtype.bytes();
        // SAFETY: the block is inside the arena (checked above) and this
        // model's rows inside the block (`block_bytes` is the largest
        // model's block).
        unsafe {
            self.shared
                .arena
                .ptr
                .add(id as usize * self.shared.block_bytes + inside)
        }
    }

    /// Copies the first `rows` positions of block `from` into block `to`
    /// (every layer, keys and values).
    pub(crate) fn copy_rows(&self, from: BlockId, to: BlockId, rows: usize) {
        let s = self.shape;
        let bytes = rows * s.head_dim * self.shared.dtype.bytes();
        for layer in 0..s.layers {
            for part in [Part::Keys, Part::Values] {
                for head in 0..s.kv_heads {
                    let (src, dst) = (
                        self.rows_ptr(from, layer, part, head),
                        self.rows_ptr(to, layer, part, head),
                    );
                    // SAFETY: distinct blocks, each `rows ≤ KV_BLOCK` rows long.
                    unsafe { std::ptr::copy_nonoverlapping(src, dst, bytes) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize) -> Arc<KvPool> {
        let shape = KvShape {
            layers: 2,
            kv_heads: 1,
            head_dim: 8,
        };
        KvPool::new(shape, KvDtype::F32, blocks, true)
    }

    #[test]
    fn released_registered_blocks_stay_findable_until_their_memory_is_needed() {
        let p = pool(2);
        let a = p.alloc().unwrap();
        let h = p.chain_hash(0, &[1, 2, 3]);
        p.register(a, h);
        assert!(!p.writable(a), "a registered block is read-only");
        p.release(a);
        assert_eq!(p.usage().cached, 1);
        assert_eq!(p.lookup(h), Some(a));
        p.release(a);
        let b = p.alloc().unwrap();
        assert_ne!(a, b, "free blocks go before cached ones");
        let c = p.alloc().unwrap();
        assert_eq!(c, a, "the cached block is evicted last");
        assert!(!p.contains(h), "evicting forgets the prefix");
        assert_eq!(p.alloc(), None);
    }

    #[test]
    fn the_least_recently_released_block_is_evicted_first() {
        let p = pool(2);
        let (a, b) = (p.alloc().unwrap(), p.alloc().unwrap());
        let (ha, hb) = (p.chain_hash(0, &[1]), p.chain_hash(0, &[2]));
        p.register(a, ha);
        p.register(b, hb);
        p.release(a);
        p.release(b);
        assert_eq!(p.lookup(ha), Some(a));
        p.release(a); // a is now the most recent
        assert_eq!(p.alloc(), Some(b));
        assert!(p.contains(ha) && !p.contains(hb));
    }

    #[test]
    fn models_sharing_a_pool_share_its_blocks_but_not_their_prefixes() {
        let (big, small) = (
            KvShape {
                layers: 3,
                kv_heads: 2,
                head_dim: 4,
            },
            KvShape {
                layers: 2,
                kv_heads: 2,
                head_dim: 4,
            },
        );
        let views = KvPool::shared(
            &[big, small],
            KvDtype::F32,
            2 * KV_BLOCK * big.bytes_per_token(KvDtype::F32),
            true,
        );
        let (a, b) = (&views[0], &views[1]);
        assert_eq!(
            (a.blocks(), b.blocks()),
            (2, 2),
            "blocks are sized for the larger model"
        );
        assert_eq!(b.shape(), small);
        let h = a.chain_hash(0, &[1, 2, 3]);
        assert_ne!(h, b.chain_hash(0, &[1, 2, 3]), "each model hashes in its own namespace");
        let x = a.alloc().unwrap();
        a.register(x, h);
        a.release(x);
        assert!(a.contains(h) && !b.contains(b.chain_hash(0, &[1, 2, 3])));
        // The other model takes the rest, then evicts the first model's cached block.
        let y = b.alloc().unwrap();
        assert_eq!(b.alloc(), Some(x), "one eviction order for both models");
        assert!(!a.contains(h));
        assert_eq!(a.usage().in_use, 2);
        // The small model's last row of its last block ends inside its block.
        let end = b.rows_ptr(y, 1, Part::Values, 1) as usize + KV_BLOCK * 4 * 4;
        let start = a.rows_ptr(y, 0, Part::Keys, 0) as usize;
        assert!(end <= start + a.block_bytes());
    }
}
