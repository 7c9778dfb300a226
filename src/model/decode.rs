//! The fused CPU decode step: one new token for each of a few sequences,
//! computed on host memory without a tensor library in the loop. Each
//! weight is streamed once per step by the threaded matrix × vector kernel
//! (`matvec`), the KV cache is written and read in place, query heads
//! share their key/value head without copies, and every intermediate lives
//! in buffers reused from step to step. Per sequence the arithmetic does
//! not depend on which other sequences share the step, so a greedy request
//! decodes the same tokens alone or in a batch.
//!
//! It runs for f32 models on the CPU; `Qwen2::step` sends everything else
//! (prompts, other devices and dtypes) through the tensor path.

use std::cell::RefCell;

use candle_core::{CpuStorage, Storage, StorageRef, Tensor};
use rayon::prelude::*;

use super::error::{ModelError, Result};
use super::flop_probe;
use super::linear::Linear;
use super::matvec::{dot_kernel, matvec_multi, Projection, Weights, PARALLEL_MIN_WEIGHTS};
use super::quant::Q8Matrix;
use super::qwen2::{Qwen2, SeqStep};

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

/// A projection's weights as the kernels read them: Q8_0 blocks when the
/// layer was quantized, else its f32 tensor.
enum WeightView<'a> {
    F32(HostSlice<'a>),
    Q8(&'a Q8Matrix),
}

impl WeightView<'_> {
    fn get(&self) -> Weights<'_> {
        match self {
            Self::F32(h) => Weights::F32(h.get()),
            Self::Q8(q) => Weights::Q8(q),
        }
    }
}

/// The Q8_0 blocks when quantized, else the f32 tensor.
fn weights(l: &Linear) -> Result<WeightView<'_>> {
    Ok(match (l.q8(), l.dense()) {
        (Some(q), _) => WeightView::Q8(q),
        (None, Some(w)) => WeightView::F32(host(w)?),
        (None, None) => unreachable!("a projection holds either Q8_0 blocks or a tensor"),
    })
}

/// Row `id` of an embedding matrix into `row` (dequantized when Q8_0).
fn embedding_row(embed: &WeightView<'_>, id: usize, hs: usize, row: &mut [f32]) {
    match embed {
        WeightView::F32(h) => row.copy_from_slice(&h.get()[id * hs..(id + 1) * hs]),
        WeightView::Q8(q) => q.dequantize_row(id, row),
    }
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

/// Buffers reused across steps (one set per thread that decodes).
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
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
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
    seq.tokens.len() == 1
        && seq.logits == super::qwen2::LogitsFor::Last
        && seq.cache.is_host()
        && model.device().is_cpu()
        && model.dtype() == candle_core::DType::F32
        && !model.has_lora()
}

/// `y = x·Wᵀ (+ b)` for `rows` rows, counted in the FLOP probe like a Linear.
#[allow(clippy::too_many_arguments)]
fn project(
    x: &[f32],
    w: Weights<'_>,
    b: Option<&[f32]>,
    rows: usize,
    inp: usize,
    out: usize,
    threads: usize,
    y: &mut [f32],
) {
    flop_probe::add(2 * (rows * inp * out) as u64);
    matvec_multi(x, rows, inp, &mut [Projection { w, out, y }], threads);
    if let Some(b) = b {
        for row in y.chunks_exact_mut(out) {
            for (o, bias) in row.iter_mut().zip(b) {
                *o += bias;
            }
        }
    }
}

/// Adds `b` to every `b.len()`-wide row of `y`.
fn add_bias(y: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        for row in y.chunks_exact_mut(b.len()) {
            for (o, bias) in row.iter_mut().zip(b) {
                *o += bias;
            }
        }
    }
}

/// RMSNorm of each `dim`-wide row of `x` into `y`, as candle computes it.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, dim: usize, y: &mut [f32]) {
    for (src, dst) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let sum2: f32 = src.iter().map(|v| v * v).sum();
        let m = (sum2 / dim as f32 + eps).sqrt();
        for ((d, s), a) in dst.iter_mut().zip(src).zip(w) {
            *d = *s / m * *a;
        }
    }
}

/// Rotates each `hd`-wide head of `x` for position `pos` (halves rotated, as HF's `rotate_half`).
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], hd: usize, pos: usize) {
    let half = hd / 2;
    let (cos, sin) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
    for head in x.chunks_exact_mut(hd) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// Softmax attention of one query head over `len` cached positions of its
/// key/value head (`k`, `v`: `[capacity, hd]` rows), written to `out`.
fn attend_head(q: &[f32], k: &[f32], v: &[f32], len: usize, hd: usize, out: &mut [f32]) {
    let dot = dot_kernel();
    SCORES.with(|s| {
        let mut s = s.borrow_mut();
        let scores = sized(&mut s, len);
        let mut max = f32::NEG_INFINITY;
        for (j, score) in scores.iter_mut().enumerate() {
            *score = dot(q, &k[j * hd..(j + 1) * hd]);
            max = max.max(*score);
        }
        let mut sum = 0f32;
        for score in scores.iter_mut() {
            *score = (*score - max).exp();
            sum += *score;
        }
        out.fill(0.0);
        for (j, p) in scores.iter().enumerate() {
            let p = p / sum;
            for (o, vv) in out.iter_mut().zip(&v[j * hd..(j + 1) * hd]) {
                *o += p * vv;
            }
        }
    });
}

/// One decode step for sequences that each add one token and want its
/// logits (`[1, vocab]` per sequence). The caller checked [`eligible`].
///
/// The whole step runs on a compute-pool thread: its parallel loops then
/// fork and join inside the pool (a few µs) instead of each being injected
/// from outside and waited for on a lock (tens of µs, 80+ times a step).
pub(crate) fn decode_step(model: &Qwen2, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
    if rayon::current_thread_index().is_some() {
        decode_step_in_pool(model, seqs)
    } else {
        rayon::scope(|_| decode_step_in_pool(model, seqs))
    }
}

fn decode_step_in_pool(model: &Qwen2, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
    let c = model.config();
    let (hs, nh, nkv, hd, vocab) = (
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
    );
    let group = nh / nkv;
    let b = seqs.len();
    let threads = rayon::current_num_threads();
    let scale = 1.0 / (hd as f32).sqrt();
    let embed = weights(model.embed_tokens())?;
    let (cos, sin) = model.rope_tables();
    let (cos, sin) = (host(cos)?, host(sin)?);
    let layers = model
        .layers
        .iter()
        .map(|l| {
            let a = &l.self_attn;
            Ok(LayerView {
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
        })
        .collect::<Result<Vec<_>>>()?;
    let eps = c.rms_norm_eps as f32;
    let max_ffn = layers.iter().map(|l| l.ffn).max().unwrap_or(0);
    let positions: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
    let capacities: Vec<usize> = seqs.iter().map(|s| s.cache.capacity()).collect();

    // The buffers are taken out of the thread-local for the step: while this
    // thread waits in a parallel loop, the pool may run another step on it.
    let mut scratch = SCRATCH.with(RefCell::take);
    let result = (|| -> Result<Vec<Tensor>> {
        let s = &mut scratch;
        let x = sized(&mut s.x, b * hs);
        for (row, seq) in x.chunks_exact_mut(hs).zip(seqs.iter()) {
            let id = seq.tokens[0] as usize;
            embedding_row(&embed, id, hs, row);
        }
        let xn = sized(&mut s.xn, b * hs);
        let q = sized(&mut s.q, b * nh * hd);
        let k = sized(&mut s.k, b * nkv * hd);
        let v = sized(&mut s.v, b * nkv * hd);
        let att = sized(&mut s.att, b * nh * hd);
        let proj = sized(&mut s.proj, b * hs);
        let gate = sized(&mut s.gate, b * max_ffn);
        let up = sized(&mut s.up, b * max_ffn);
        for (li, l) in layers.iter().enumerate() {
            rms_norm(x, l.ln1.get(), eps, hs, xn);
            let bq = l.bq.as_ref().map(HostSlice::get);
            let bk = l.bk.as_ref().map(HostSlice::get);
            let bv = l.bv.as_ref().map(HostSlice::get);
            flop_probe::add(2 * (b * hs * (nh + 2 * nkv) * hd) as u64);
            matvec_multi(
                xn,
                b,
                hs,
                &mut [
                    Projection {
                        w: l.wq.get(),
                        out: nh * hd,
                        y: q,
                    },
                    Projection {
                        w: l.wk.get(),
                        out: nkv * hd,
                        y: k,
                    },
                    Projection {
                        w: l.wv.get(),
                        out: nkv * hd,
                        y: v,
                    },
                ],
                threads,
            );
            add_bias(q, bq);
            add_bias(k, bk);
            add_bias(v, bv);
            for (si, seq) in seqs.iter_mut().enumerate() {
                let pos = positions[si];
                let cap = capacities[si];
                let qs = &mut q[si * nh * hd..(si + 1) * nh * hd];
                let ks = &mut k[si * nkv * hd..(si + 1) * nkv * hd];
                rope(qs, cos.get(), sin.get(), hd, pos);
                rope(ks, cos.get(), sin.get(), hd, pos);
                for qv in qs.iter_mut() {
                    *qv *= scale;
                }
                let (kc, vc) = seq
                    .cache
                    .host_layer_mut(li)
                    .ok_or_else(|| ModelError::Input("fused decode needs a host KV cache".into()))?;
                for h in 0..nkv {
                    let at = (h * cap + pos) * hd;
                    kc[at..at + hd].copy_from_slice(&ks[h * hd..(h + 1) * hd]);
                    vc[at..at + hd].copy_from_slice(&v[(si * nkv + h) * hd..(si * nkv + h + 1) * hd]);
                }
                flop_probe::add(4 * (nkv * group * (pos + 1) * hd) as u64);
            }
            // Attention per (sequence, query head), in parallel when there is enough of it.
            let work: usize = positions.iter().map(|p| (p + 1) * nh * hd).sum();
            let caches: Vec<(&[f32], &[f32])> = seqs
                .iter_mut()
                .map(|seq| {
                    let (kc, vc) = seq.cache.host_layer_mut(li).expect("checked above");
                    (&*kc, &*vc)
                })
                .collect();
            let head = |(i, out): (usize, &mut [f32])| {
                let (si, h) = (i / nh, i % nh);
                let (kc, vc) = caches[si];
                let cap = capacities[si];
                let kvh = h / group;
                let base = kvh * cap * hd;
                let qh = &q[(si * nh + h) * hd..(si * nh + h + 1) * hd];
                attend_head(qh, &kc[base..], &vc[base..], positions[si] + 1, hd, out);
            };
            if threads > 1 && work >= PARALLEL_MIN_WEIGHTS / 16 {
                att.par_chunks_mut(hd).enumerate().for_each(head);
            } else {
                att.chunks_mut(hd).enumerate().for_each(head);
            }
            project(att, l.wo.get(), None, b, nh * hd, hs, threads, proj);
            for (xi, pi) in x.iter_mut().zip(proj.iter()) {
                *xi += pi;
            }
            rms_norm(x, l.ln2.get(), eps, hs, xn);
            let (g, u) = (&mut gate[..b * l.ffn], &mut up[..b * l.ffn]);
            flop_probe::add(4 * (b * hs * l.ffn) as u64);
            matvec_multi(
                xn,
                b,
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
            for (gi, ui) in g.iter_mut().zip(u.iter()) {
                *gi = *gi / (1.0 + (-*gi).exp()) * ui;
            }
            project(g, l.wd.get(), None, b, l.ffn, hs, threads, proj);
            for (xi, pi) in x.iter_mut().zip(proj.iter()) {
                *xi += pi;
            }
        }
        rms_norm(x, host(model.final_norm().weight())?.get(), eps, hs, xn);
        let mut logits = vec![0f32; b * vocab];
        let head = weights(model.lm_head())?;
        project(xn, head.get(), None, b, hs, vocab, threads, &mut logits);
        for seq in seqs.iter_mut() {
            seq.cache.advance(1);
        }
        let device = model.device();
        logits
            .chunks_exact(vocab)
            .map(|row| Ok(Tensor::from_slice(row, (1, vocab), device)?))
            .collect()
    })();
    SCRATCH.with(|cell| *cell.borrow_mut() = scratch);
    result
}
