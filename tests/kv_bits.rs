//! The f32 KV cache keeps today's bits: logits of the golden prompts
//! (prompt in two chunks, greedy decoding alone and as a batch of four)
//! hash to the values recorded before the paged pool replaced the
//! contiguous per-sequence cache (`tests/fixtures/kv/f32-bits.json`, one
//! per kernel family, written by this test with `GREENCODE_RECORD_BITS=1`).

mod common;

use greencode::cpu::features::{limit, Level};
use greencode::generate::loaded::LoadedModel;
use greencode::model::{LogitsFor, Qwen2, SeqStep};

/// FNV-1a over the bits of every logit.
fn hash_logits(h: &mut u64, t: &candle_core::Tensor) {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    for x in v {
        for b in x.to_bits().to_le_bytes() {
            *h ^= b as u64;
            *h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
}

fn argmax(t: &candle_core::Tensor) -> u32 {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a)))
        .unwrap() as u32
}

fn fingerprint(model: &Qwen2, prompts: &[Vec<u32>]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    // Each prompt alone: two prompt chunks with every logit, then 24 greedy tokens.
    for ids in prompts {
        let mut cache = model.new_cache(ids.len() + 24).unwrap();
        let cut = 7.min(ids.len() - 1);
        let a = model.forward_cached(&ids[..cut], &mut cache, LogitsFor::All).unwrap();
        hash_logits(&mut h, &a);
        let b = model.forward_cached(&ids[cut..], &mut cache, LogitsFor::All).unwrap();
        hash_logits(&mut h, &b);
        let mut next = argmax(&b.get(b.dim(0).unwrap() - 1).unwrap());
        for _ in 0..24 {
            let l = model.forward_cached(&[next], &mut cache, LogitsFor::Last).unwrap();
            hash_logits(&mut h, &l);
            next = argmax(&l);
        }
    }
    // All four as one batch: prompts together, then 16 steps of four rows.
    let mut caches: Vec<_> = prompts.iter().map(|p| model.new_cache(p.len() + 16).unwrap()).collect();
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    for _ in 0..17 {
        let mut batch: Vec<SeqStep> = caches
            .iter_mut()
            .zip(&inputs)
            .map(|(cache, tokens)| SeqStep {
                cache,
                tokens,
                logits: LogitsFor::Last,
            })
            .collect();
        let out = model.step(&mut batch).unwrap();
        inputs = out
            .iter()
            .map(|l| {
                hash_logits(&mut h, l);
                vec![argmax(l)]
            })
            .collect();
    }
    h
}

#[test]
fn f32_cache_keeps_todays_bits() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let golden = common::golden();
    let prompts: Vec<Vec<u32>> = golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| serde_json::from_value(c["ids"].clone()).unwrap())
        .collect();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kv/f32-bits.json");
    let record = std::env::var_os("GREENCODE_RECORD_BITS").is_some();
    let mut got = serde_json::Map::new();
    for level in Level::ALL.into_iter().filter(|l| l.available()) {
        limit(level);
        got.insert(
            level.name().into(),
            format!("{:016x}", fingerprint(&p.model, &prompts)).into(),
        );
    }
    limit(Level::Avx512);
    if record {
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        return;
    }
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (level, hash) in &got {
        assert_eq!(
            Some(hash),
            want.get(level),
            "logit bits of the f32 cache at kernel level {level}"
        );
    }
}
