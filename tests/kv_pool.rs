//! The paged KV pool with the real model: sequences whose blocks are
//! scattered through a shared pool, share a prefix with a running sequence,
//! or are cut back into a shared block (copy on write) get the bits of a
//! private f32 cache; f16 and bf16 caches stay close to f32 on held-out code.

mod common;

use candle_core::Tensor;
use greencode::data::corpus;
use greencode::generate::loaded::LoadedModel;
use greencode::model::{KvCache, KvDtype, KvPool, LogitsFor, Qwen2, KV_BLOCK};

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a)))
        .unwrap() as u32
}

/// Held-out code from the CPython standard library, tokenized.
fn held_out(p: &LoadedModel, files: usize, tokens: usize) -> Vec<Vec<u32>> {
    let dir = corpus::stdlib_dir().unwrap();
    corpus::eval_files(&dir, files)
        .unwrap()
        .iter()
        .map(|f| {
            let mut ids = p.tokenizer.encode(&corpus::read_text(f).unwrap()).unwrap();
            ids.truncate(tokens);
            ids
        })
        .filter(|ids| ids.len() == tokens)
        .collect()
}

/// Logits of `prompt` (every position) then of `decode` greedy tokens, in `cache`.
fn run(model: &Qwen2, cache: &mut KvCache, prompt: &[u32], decode: usize) -> (Vec<u32>, Vec<Vec<u32>>) {
    let mut out = Vec::new();
    let l = model.forward_cached(prompt, cache, LogitsFor::All).unwrap();
    out.push(bits(&l));
    let mut next = argmax(rows(&l).last().unwrap());
    let mut tokens = Vec::new();
    for _ in 0..decode {
        tokens.push(next);
        let l = model.forward_cached(&[next], cache, LogitsFor::Last).unwrap();
        out.push(bits(&l));
        next = argmax(&rows(&l)[0]);
    }
    (tokens, out)
}

#[test]
fn shared_scattered_and_copied_blocks_keep_the_bits_of_a_private_cache() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let model = &p.model;
    let prompt = held_out(&p, 1, 150).remove(0);
    let mut private = model.new_cache(200).unwrap();
    let (want_tokens, want) = run(model, &mut private, &prompt, 12);

    let pool = KvPool::new(model.kv_shape(), KvDtype::F32, 40, true);
    // Another sequence first, so this one's blocks are not the first ones.
    let mut other = KvCache::in_pool(&pool, 200);
    model
        .forward_cached(&[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], &mut other, LogitsFor::Last)
        .unwrap();
    let mut a = KvCache::in_pool(&pool, 200);
    let (tokens, got) = run(model, &mut a, &prompt, 12);
    assert_eq!(tokens, want_tokens);
    assert_eq!(got, want, "a pooled cache changed the logits");

    // B takes A's full prompt blocks while A is still alive, and computes the rest.
    let mut b = KvCache::in_pool(&pool, 200);
    let reused = b.adopt(&prompt, prompt.len() - 1);
    assert_eq!(reused, (prompt.len() - 1) / KV_BLOCK * KV_BLOCK);
    let rest = model.forward_cached(&prompt[reused..], &mut b, LogitsFor::All).unwrap();
    let all_rows = want[0].len() / prompt.len();
    assert_eq!(bits(&rest), want[0][reused * all_rows..], "logits after shared blocks");

    // B cut back into a shared block copies it before writing: its new
    // token's logits are what a private cache gives, and A's blocks stay intact.
    let cut = KV_BLOCK + 5;
    b.truncate(cut);
    let again = model
        .forward_cached(&prompt[cut..cut + 3], &mut b, LogitsFor::All)
        .unwrap();
    assert_eq!(bits(&again), want[0][cut * all_rows..(cut + 3) * all_rows]);
    let mut a_next = model
        .forward_cached(&[want_tokens[11]], &mut a, LogitsFor::Last)
        .unwrap();
    let mut p_next = model
        .forward_cached(&[want_tokens[11]], &mut private, LogitsFor::Last)
        .unwrap();
    assert_eq!(bits(&a_next), bits(&p_next), "a shared block was written");
    // Dropping a sequence gives its blocks back (the full ones stay cached).
    let before = pool.usage();
    drop(b);
    let after = pool.usage();
    assert!(after.in_use < before.in_use);
    a_next = model.forward_cached(&[1], &mut a, LogitsFor::Last).unwrap();
    p_next = model.forward_cached(&[1], &mut private, LogitsFor::Last).unwrap();
    assert_eq!(bits(&a_next), bits(&p_next));
}

/// Mean KL(f32 ‖ cache) and top-1 agreement over every position of the windows.
fn compare(model: &Qwen2, windows: &[Vec<u32>], dtype: KvDtype) -> (f64, f64) {
    let (mut kl, mut agree, mut n) = (0f64, 0usize, 0usize);
    for ids in windows {
        let mut reference = model.new_cache(ids.len()).unwrap();
        let pool = KvPool::new(model.kv_shape(), dtype, ids.len().div_ceil(KV_BLOCK), false);
        let mut cache = KvCache::in_pool(&pool, ids.len());
        // In chunks of 64, so most positions attend to keys stored by earlier chunks.
        for chunk in ids.chunks(64) {
            let want = rows(&model.forward_cached(chunk, &mut reference, LogitsFor::All).unwrap());
            let got = rows(&model.forward_cached(chunk, &mut cache, LogitsFor::All).unwrap());
            for (w, g) in want.iter().zip(&got) {
                let lse = |v: &[f32]| {
                    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                    m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
                };
                let (lw, lg) = (lse(w), lse(g));
                kl += w
                    .iter()
                    .zip(g)
                    .map(|(&a, &b)| {
                        let pa = (a as f64 - lw).exp();
                        pa * ((a as f64 - lw) - (b as f64 - lg))
                    })
                    .sum::<f64>();
                agree += usize::from(argmax(w) == argmax(g));
                n += 1;
            }
        }
    }
    (kl / n as f64, agree as f64 / n as f64)
}

#[test]
fn half_precision_caches_stay_close_to_f32_on_held_out_code() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let windows = held_out(&p, 12, 512);
    assert!(windows.len() >= 8, "too few held-out files of 512 tokens");
    for dtype in [KvDtype::F16, KvDtype::Bf16] {
        let (kl, agree) = compare(&p.model, &windows, dtype);
        eprintln!(
            "{} cache vs f32: mean KL {kl:.3e}, top-1 agreement {:.4} over {} windows of 512",
            dtype.name(),
            agree,
            windows.len()
        );
        let (kl_bound, agree_bound) = match dtype {
            KvDtype::F16 => (1e-4, 0.99),
            _ => (1e-3, 0.97),
        };
        assert!(kl <= kl_bound, "{}: mean KL {kl}", dtype.name());
        assert!(agree >= agree_bound, "{}: agreement {agree}", dtype.name());
    }
}
