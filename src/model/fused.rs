//! The fused CPU step: new tokens for a ragged batch of sequences (one
//! token each when decoding, a prompt chunk when prefilling, or a mix),
//! computed on host memory without a tensor library in the loop. The
//! projections run once over every row of the step: matrix × vector
//! (`matvec`, each weight streamed once) up to 16 rows, the tiled kernel
//! (`gemm`) above; both give a row the same bits, so neither the batch nor
//! the way a prompt is cut into chunks changes a sequence's tokens. The KV
//! cache is written and read in place, query heads share their key/value
//! head without copies, a prompt's queries attend in blocks whose scores
//! come from the tiled kernel, and every intermediate lives in buffers
//! reused from step to step. The cache is a table of pool blocks
//! (`model::kv_pool`), possibly shared with other sequences and stored in
//! f32, f16 or bf16: scores are computed a block of keys at a time and the
//! values weighed block after block, read in their stored type, so in f32
//! every output has the bits a contiguous cache gave it.
//!
//! It runs for f32 models on the CPU (weights held in f32, bf16 or Q8_0,
//! see `Linear`); `Qwen2::step` sends everything else
//! (other devices and dtypes, models with LoRA adapters) through the tensor
//! path.

use std::cell::RefCell;

use candle_core::{CpuStorage, Storage, StorageRef, Tensor};

use super::error::{ModelError, Result};
use super::flop_probe;
use super::kv_cache::PagedView;
use super::kv_pool::{KvDtype, Part, KV_BLOCK};
use super::linear::Linear;
use super::qwen2::Qwen2;
use super::step::{LogitsFor, SeqStep};
use crate::cpu::gemm::{gemm_multi, gemm_nt_elem, SharedOut, WeightElem};
use crate::cpu::host_ops::{add_bias, rms_norm, rope, silu_mul, softmax_values_heads};
use crate::cpu::matvec::{matvec_multi, Projection, Weights, MAX_ROWS, PARALLEL_MIN_WEIGHTS};
use crate::cpu::team;

/// Read access to an f32 tensor's host memory for the length of a step.
struct HostSlice<'a> {
    _guard: StorageRef<'a>,
    ptr: *const f32,
    len: usize,
}

impl HostSlice<'_> {
    fn get(&self) -> &[f32] {
        // SAFETY: `ptr..ptr+len` lies inside the CPU storage that `_guard`
        // keeps locked for reading (and alive) as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

fn host(t: &Tensor) -> Result<HostSlice<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let (ptr, len) = match (&*guard, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => (v[start..end].as_ptr(), end - start),
        _ => {
            return Err(ModelError::Input(
                "fused decode needs contiguous f32 CPU tensors".into(),
            ))
        }
    };
    Ok(HostSlice {
        _guard: guard,
        ptr,
        len,
    })
}

/// A projection's weights as the kernels read them: its compact form
/// (bf16, f16, Q8_0 or other blocks) when held so, else its f32 tensor.
enum WeightView<'a> {
    F32(HostSlice<'a>),
    Compact(Weights<'a>),
}

impl WeightView<'_> {
    fn get(&self) -> Weights<'_> {
        match self {
            Self::F32(h) => Weights::F32(h.get()),
            Self::Compact(w) => *w,
        }
    }
}

/// The weight as held.
fn weights(l: &Linear) -> Result<WeightView<'_>> {
    Ok(match (l.compact(), l.dense()) {
        (Some(w), _) => WeightView::Compact(w),
        (None, Some(w)) => WeightView::F32(host(w)?),
        (None, None) => unreachable!("a projection holds a compact form or a tensor"),
    })
}

/// Row `id` of an embedding matrix into `row` (in f32).
fn embedding_row(embed: &WeightView<'_>, id: usize, row: &mut [f32]) {
    embed.get().row_to_f32(id, row);
}

/// Host views of one decoder layer's weights.
struct LayerView<'a> {
    ln1: HostSlice<'a>,
    ln2: HostSlice<'a>,
    wq: WeightView<'a>,
    wk: WeightView<'a>,
    wv: WeightView<'a>,
    wo: WeightView<'a>,
    bq: Option<HostSlice<'a>>,
    bk: Option<HostSlice<'a>>,
    bv: Option<HostSlice<'a>>,
    wg: WeightView<'a>,
    wu: WeightView<'a>,
    wd: WeightView<'a>,
    ffn: usize,
}

impl<'a> LayerView<'a> {
    fn of(l: &'a super::layers::DecoderLayer) -> Result<Self> {
        let a = &l.self_attn;
        Ok(Self {
            ln1: host(l.input_layernorm.weight())?,
            ln2: host(l.post_attention_layernorm.weight())?,
            wq: weights(&a.q_proj)?,
            wk: weights(&a.k_proj)?,
            wv: weights(&a.v_proj)?,
            wo: weights(&a.o_proj)?,
            bq: a.q_proj.bias().map(host).transpose()?,
            bk: a.k_proj.bias().map(host).transpose()?,
            bv: a.v_proj.bias().map(host).transpose()?,
            wg: weights(&l.mlp.gate_proj)?,
            wu: weights(&l.mlp.up_proj)?,
            wd: weights(&l.mlp.down_proj)?,
            ffn: l.mlp.width(),
        })
    }
}

/// Buffers reused across steps (one set per thread that runs steps).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    picked: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// Attention scores of one (sequence, head, query block) work item.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn sized(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// Whether `seq` can take the fused path of `model`.
pub(crate) fn eligible(model: &Qwen2, seq: &SeqStep<'_>) -> bool {
    !seq.tokens.is_empty()
        && seq.cache.is_host()
        && model.device().is_cpu()
        && model.dtype() == candle_core::DType::F32
        && !model.has_lora()
}

/// `y = x·Wᵀ` for `rows` rows and several weight matrices at once: matrix ×
/// vector up to [`MAX_ROWS`] rows, the tiled kernel above (same bits per row).
fn multiply(x: &[f32], rows: usize, inp: usize, projections: &mut [Projection<'_>], threads: usize) {
    flop_probe::add(2 * (rows * inp * projections.iter().map(|p| p.out).sum::<usize>()) as u64);
    if rows <= MAX_ROWS {
        matvec_multi(x, rows, inp, projections, threads);
    } else {
        gemm_multi(x, rows, inp, projections, threads);
    }
}

/// Query rows of a prompt attended together, with all the query heads of a
/// key/value head: their scores against every key up to the block's last
/// row come from one tiled product (a decoding sequence's block is its one
/// row).
const QUERY_BLOCK: usize = 16;

/// One unit of attention work: the query heads of one key/value head, for
/// a block of a sequence's rows.
#[derive(Clone, Copy)]
struct AttentionItem {
    seq: usize,
    /// The key/value head; the item covers all its query heads.
    kv_head: usize,
    /// First row of the block, as an index into the step's rows.
    row: usize,
    /// Rows in the block.
    rows: usize,
}

/// Attention of every work item of layer `li`: scores of a block's query
/// rows (all heads of one key/value head) against the keys up to its last
/// row (tiled kernel, one cache block of keys at a time), then each row's
/// softmax over the keys it may see, times the values (read block by
/// block in order), into `att` (`[rows, qw]`). `q` holds the step's
/// queries, `[rows, qw]`, already rotated and scaled; the caches already
/// hold this step's keys and values, read in their stored type.
#[allow(clippy::too_many_arguments)]
fn attend(
    seqs: &[SeqStep<'_>],
    li: usize,
    items: &[AttentionItem],
    row_pos: &[usize],
    q: &[f32],
    att: &mut [f32],
    dims: (usize, usize, usize),
    parallel: bool,
) {
    let views: Vec<PagedView<'_>> = seqs
        .iter()
        .map(|seq| seq.cache.paged().expect("the step checked for host caches"))
        .collect();
    let out = SharedOut(att.as_mut_ptr());
    let one = |item: &AttentionItem| {
        let view = &views[item.seq];
        match view.pool.dtype() {
            KvDtype::F32 => attend_item::<f32>(view, li, item, row_pos, q, &out, dims),
            KvDtype::F16 => attend_item::<half::f16>(view, li, item, row_pos, q, &out, dims),
            KvDtype::Bf16 => attend_item::<half::bf16>(view, li, item, row_pos, q, &out, dims),
        }
    };
    if parallel {
        team::for_each(items.len(), |i| one(&items[i]));
    } else {
        items.iter().for_each(one);
    }
}

/// One work item of [`attend`], the cache read as `W`.
fn attend_item<W: WeightElem>(
    view: &PagedView<'_>,
    li: usize,
    item: &AttentionItem,
    row_pos: &[usize],
    q: &[f32],
    out: &SharedOut,
    (qw, group, hd): (usize, usize, usize),
) {
    let last = row_pos[item.row + item.rows - 1] + 1;
    // The item's blocks of keys and of values, `KV_BLOCK` rows each (the
    // last one cut to `last`).
    let rows_of = |part: Part| -> Vec<&[W]> {
        view.table[..last.div_ceil(KV_BLOCK)]
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let rows = (last - i * KV_BLOCK).min(KV_BLOCK);
                let at = view.pool.rows_ptr(b, li, part, item.kv_head) as *const W;
                // SAFETY: the pool stores `W` (matched by the caller); the
                // block holds `KV_BLOCK` rows of `hd`, and nobody writes the
                // step's blocks during attention.
                unsafe { std::slice::from_raw_parts(at, rows * hd) }
            })
            .collect()
    };
    let (keys, values) = (rows_of(Part::Keys), rows_of(Part::Values));
    let first_head = item.kv_head * group;
    // SAFETY: each item alone writes the heads of its key/value head in its rows.
    let out_heads = |r: usize| unsafe { out.slice(r * qw + first_head * hd, group * hd) };
    let n = item.rows * group;
    SCORES.with(|sc| {
        let mut sc = sc.borrow_mut();
        let (queries, block) = sized(&mut sc, n * hd + n * last).split_at_mut(n * hd);
        // The group's query heads of every row side by side: one product
        // reads each key once for all of them.
        for (i, dst) in queries.chunks_exact_mut(group * hd).enumerate() {
            let at = (item.row + i) * qw + first_head * hd;
            dst.copy_from_slice(&q[at..at + group * hd]);
        }
        for (i, k) in keys.iter().enumerate() {
            gemm_nt_elem(
                queries,
                hd,
                n,
                k,
                hd,
                k.len() / hd,
                hd,
                &mut block[i * KV_BLOCK..],
                last,
            );
        }
        // Each row's heads see the same keys: one pass over the values
        // serves them all.
        for (i, scores) in block.chunks_exact_mut(group * last).enumerate() {
            let r = item.row + i;
            let visible = row_pos[r] + 1;
            softmax_values_heads(scores, last, group, visible, &values, hd, out_heads(r));
        }
    });
}

/// `body(rows)` for consecutive blocks of up to [`MAX_ROWS`] of `rows` rows
/// on the team; a single block (a decode step's rows) runs on this thread.
fn row_blocks(rows: usize, body: impl Fn(std::ops::Range<usize>) + Sync) {
    team::for_each(rows.div_ceil(MAX_ROWS), |i| {
        let first = i * MAX_ROWS;
        body(first..(first + MAX_ROWS).min(rows));
    });
}

/// RoPE on every row's query and key heads at the row's position, and the
/// queries scaled for attention, in row blocks (each row as alone, so the
/// same bits).
fn rotate_rows(
    q: &mut [f32],
    k: &mut [f32],
    row_pos: &[usize],
    (cos, sin): (&[f32], &[f32]),
    (qw, kvw, hd): (usize, usize, usize),
    scale: f32,
) {
    let (qp, kp) = (SharedOut(q.as_mut_ptr()), SharedOut(k.as_mut_ptr()));
    row_blocks(row_pos.len(), |block| {
        for (r, &pos) in row_pos.iter().enumerate().take(block.end).skip(block.start) {
            // SAFETY: each block alone touches its rows of q and k, each
            // inside its buffer (`row_pos.len()` rows of `qw` and `kvw`).
            let (qs, ks) = unsafe { (qp.slice(r * qw, qw), kp.slice(r * kvw, kvw)) };
            rope(qs, cos, sin, hd, pos);
            rope(ks, cos, sin, hd, pos);
            for qv in qs.iter_mut() {
                *qv *= scale;
            }
        }
    });
}

/// [`rms_norm`] of every `dim`-wide row of `x` into `y`, in row blocks
/// (each row as alone, so the same bits).
fn norm_rows(x: &[f32], w: &[f32], eps: f32, dim: usize, y: &mut [f32]) {
    let out = SharedOut(y.as_mut_ptr());
    row_blocks(x.len() / dim, |block| {
        let (at, n) = (block.start * dim, block.len() * dim);
        // SAFETY: each block alone writes y[at..at + n], inside y (as long as x).
        rms_norm(&x[at..at + n], w, eps, dim, unsafe { out.slice(at, n) });
    });
}

/// Where the rows of a step come from and how its attention is cut up.
struct StepRows {
    /// Row r belongs to sequence `seq[r]`, at position `pos[r]`.
    seq: Vec<usize>,
    pos: Vec<usize>,
    /// Each sequence's first row.
    first: Vec<usize>,
    /// Attention work: every (sequence, query block, key/value head).
    items: Vec<AttentionItem>,
    /// Causal attention scores of the whole step (all heads), for the
    /// parallel split and the FLOP probe.
    scores: usize,
}

impl StepRows {
    fn of(seqs: &[SeqStep<'_>], nh: usize, nkv: usize) -> Self {
        let (mut seq, mut pos, mut first) = (Vec::new(), Vec::new(), Vec::with_capacity(seqs.len()));
        let mut items = Vec::new();
        for (si, s) in seqs.iter().enumerate() {
            let t = s.tokens.len();
            first.push(seq.len());
            for j in 0..t {
                seq.push(si);
                pos.push(s.cache.len() + j);
            }
            for r0 in (0..t).step_by(QUERY_BLOCK) {
                for kv_head in 0..nkv {
                    items.push(AttentionItem {
                        seq: si,
                        kv_head,
                        row: first[si] + r0,
                        rows: QUERY_BLOCK.min(t - r0),
                    });
                }
            }
        }
        let scores = pos.iter().map(|p| p + 1).sum::<usize>() * nh;
        Self {
            seq,
            pos,
            first,
            items,
            scores,
        }
    }
}

/// One step for sequences that each add one or more tokens (the caller
/// checked [`eligible`]); returns each sequence's logits (`[n, vocab]`, `n`
/// = 1 for [`LogitsFor::Last`]).
///
/// The step runs on the calling thread; its parallel loops (about 50 a
/// decoded token) run on the compute [`team`](crate::cpu::team), whose helpers spin between
/// them.
pub(crate) fn fused_step(model: &Qwen2, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
    let c = model.config();
    let (hs, nh, nkv, hd, vocab) = (
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
    );
    let group = nh / nkv;
    let (qw, kvw) = (nh * hd, nkv * hd);
    let threads = team::size();
    let scale = 1.0 / (hd as f32).sqrt();
    let embed = weights(model.embed_tokens())?;
    let (cos, sin) = model.rope_tables();
    let (cos, sin) = (host(cos)?, host(sin)?);
    let layers = model.layers.iter().map(LayerView::of).collect::<Result<Vec<_>>>()?;
    let eps = c.rms_norm_eps as f32;
    let max_ffn = layers.iter().map(|l| l.ffn).max().unwrap_or(0);
    let StepRows {
        seq: row_seq,
        pos: row_pos,
        first: first_row,
        items,
        scores,
    } = StepRows::of(seqs, nh, nkv);
    let rows = row_seq.len();

    // The buffers are taken out of the thread-local for the step (and put
    // back after it), so nothing of theirs is borrowed across the step.
    let mut scratch = SCRATCH.with(RefCell::take);
    let result = (|| -> Result<Vec<Tensor>> {
        let s = &mut scratch;
        let x = sized(&mut s.x, rows * hs);
        for (row, (&si, &pos)) in x.chunks_exact_mut(hs).zip(row_seq.iter().zip(&row_pos)) {
            let seq = &seqs[si];
            let id = seq.tokens[pos - seq.cache.len()] as usize;
            embedding_row(&embed, id, row);
        }
        let xn = sized(&mut s.xn, rows * hs);
        let q = sized(&mut s.q, rows * qw);
        let k = sized(&mut s.k, rows * kvw);
        let v = sized(&mut s.v, rows * kvw);
        let att = sized(&mut s.att, rows * qw);
        let proj = sized(&mut s.proj, rows * hs);
        let gate = sized(&mut s.gate, rows * max_ffn);
        let up = sized(&mut s.up, rows * max_ffn);
        for (li, l) in layers.iter().enumerate() {
            norm_rows(x, l.ln1.get(), eps, hs, xn);
            multiply(
                xn,
                rows,
                hs,
                &mut [
                    Projection {
                        w: l.wq.get(),
                        out: qw,
                        y: q,
                    },
                    Projection {
                        w: l.wk.get(),
                        out: kvw,
                        y: k,
                    },
                    Projection {
                        w: l.wv.get(),
                        out: kvw,
                        y: v,
                    },
                ],
                threads,
            );
            add_bias(q, l.bq.as_ref().map(HostSlice::get));
            add_bias(k, l.bk.as_ref().map(HostSlice::get));
            add_bias(v, l.bv.as_ref().map(HostSlice::get));
            rotate_rows(q, k, &row_pos, (cos.get(), sin.get()), (qw, kvw, hd), scale);
            for r in 0..rows {
                let (si, pos) = (row_seq[r], row_pos[r]);
                let at = r * kvw..(r + 1) * kvw;
                seqs[si].cache.write_row(li, pos, &k[at.clone()], &v[at]);
            }
            flop_probe::add(4 * (scores * hd) as u64);
            let parallel = threads > 1 && scores * hd >= PARALLEL_MIN_WEIGHTS / 16;
            attend(seqs, li, &items, &row_pos, q, att, (qw, group, hd), parallel);
            multiply(
                att,
                rows,
                qw,
                &mut [Projection {
                    w: l.wo.get(),
                    out: hs,
                    y: proj,
                }],
                threads,
            );
            for (xi, pi) in x.iter_mut().zip(proj.iter()) {
                *xi += pi;
            }
            norm_rows(x, l.ln2.get(), eps, hs, xn);
            let (g, u) = (&mut gate[..rows * l.ffn], &mut up[..rows * l.ffn]);
            multiply(
                xn,
                rows,
                hs,
                &mut [
                    Projection {
                        w: l.wg.get(),
                        out: l.ffn,
                        y: g,
                    },
                    Projection {
                        w: l.wu.get(),
                        out: l.ffn,
                        y: u,
                    },
                ],
                threads,
            );
            let (gp, ups, ffn) = (SharedOut(g.as_mut_ptr()), &*u, l.ffn);
            row_blocks(rows, |block| {
                let (at, n) = (block.start * ffn, block.len() * ffn);
                // SAFETY: each block alone writes g[at..at + n], inside g (as long as u).
                silu_mul(unsafe { gp.slice(at, n) }, &ups[at..at + n]);
            });
            multiply(
                g,
                rows,
                l.ffn,
                &mut [Projection {
                    w: l.wd.get(),
                    out: hs,
                    y: proj,
                }],
                threads,
            );
            for (xi, pi) in x.iter_mut().zip(proj.iter()) {
                *xi += pi;
            }
        }
        // Logits only for the rows that want them.
        let mut counts = Vec::with_capacity(seqs.len());
        let mut wanted = Vec::new();
        for (si, seq) in seqs.iter().enumerate() {
            let (r0, t) = (first_row[si], seq.tokens.len());
            let rs = match seq.logits {
                LogitsFor::Last => r0 + t - 1..r0 + t,
                LogitsFor::All => r0..r0 + t,
            };
            counts.push(rs.len());
            wanted.extend(rs);
        }
        let picked = sized(&mut s.picked, wanted.len() * hs);
        for (dst, &r) in picked.chunks_exact_mut(hs).zip(&wanted) {
            dst.copy_from_slice(&x[r * hs..(r + 1) * hs]);
        }
        let normed = sized(&mut s.xn, wanted.len() * hs);
        rms_norm(picked, host(model.final_norm().weight())?.get(), eps, hs, normed);
        let mut logits = vec![0f32; wanted.len() * vocab];
        let head = weights(model.lm_head())?;
        multiply(
            normed,
            wanted.len(),
            hs,
            &mut [Projection {
                w: head.get(),
                out: vocab,
                y: &mut logits,
            }],
            threads,
        );
        for seq in seqs.iter_mut() {
            seq.cache.advance(seq.tokens);
        }
        let device = model.device();
        let mut out = Vec::with_capacity(counts.len());
        let mut at = 0;
        for n in counts {
            out.push(Tensor::from_slice(
                &logits[at * vocab..(at + n) * vocab],
                (n, vocab),
                device,
            )?);
            at += n;
        }
        Ok(out)
    })();
    SCRATCH.with(|cell| *cell.borrow_mut() = scratch);
    result
}
