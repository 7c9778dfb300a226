//! Properties of the runtime: the layer mask, KV-cached decoding, batching.

mod common;

use candle_core::Tensor;
use greencode::generate::loaded::LoadedModel;
use greencode::model::LayerMask;
use greencode::model::{LogitsFor, SeqStep};

fn prompt_ids(p: &LoadedModel) -> Vec<u32> {
    p.tokenizer
        .encode("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n")
        .unwrap()
}

/// A 128-position cache holding `ids`.
fn prefilled(p: &LoadedModel, ids: &[u32]) -> greencode::model::KvCache {
    let mut cache = p.model.new_cache(128).unwrap();
    p.model.forward_cached(ids, &mut cache, LogitsFor::Last).unwrap();
    cache
}

/// Logits of one more token `id` after `cache`.
fn next(p: &LoadedModel, id: u32, cache: &mut greencode::model::KvCache, which: LogitsFor) -> Tensor {
    p.model.forward_cached(&[id], cache, which).unwrap()
}

#[test]
fn full_layer_mask_equals_plain_forward_and_masking_changes_output() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let ids = prompt_ids(&p);
    let input = Tensor::new(ids.as_slice(), p.model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let plain = p.model.logits(&input, None).unwrap();
    let masked = p
        .model
        .logits(&input, Some(&LayerMask::all(p.model.num_layers())))
        .unwrap();
    assert_eq!(common::max_abs_diff(&plain, &masked), 0.0);
    let skip = p
        .model
        .logits(&input, Some(&LayerMask::without(p.model.num_layers(), &[5])))
        .unwrap();
    assert!(
        common::max_abs_diff(&plain, &skip) > 1e-2,
        "skipping a layer must change the logits"
    );
}

#[test]
fn kv_cached_decoding_equals_full_forward() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let ids = prompt_ids(&p);
    let input = Tensor::new(ids.as_slice(), p.model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full = p.model.logits(&input, None).unwrap().squeeze(0).unwrap();

    let mut cache = p.model.new_cache(64).unwrap();
    let split = ids.len() / 2;
    let first = p
        .model
        .forward_cached(&ids[..split], &mut cache, LogitsFor::All)
        .unwrap();
    assert!(common::max_abs_diff(&first, &full.narrow(0, 0, split).unwrap()) < 1e-4);
    for (i, &id) in ids.iter().enumerate().skip(split) {
        let step = p.model.forward_cached(&[id], &mut cache, LogitsFor::Last).unwrap();
        let want = full.narrow(0, i, 1).unwrap();
        let d = common::max_abs_diff(&step, &want);
        assert!(d < 1e-4, "position {i}: max |Δlogit| {d}");
    }
    assert_eq!(cache.len(), ids.len());
}

#[test]
fn batched_rows_equal_single_rows() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let ids = prompt_ids(&p);
    let a = &ids[..16];
    let b = &ids[4..20];
    let batch = Tensor::new([a, b].concat().as_slice(), p.model.device())
        .unwrap()
        .reshape((2, 16))
        .unwrap();
    let both = p.model.logits(&batch, None).unwrap();
    for (row, seq) in [a, b].into_iter().enumerate() {
        let single = p
            .model
            .logits(&Tensor::new(seq, p.model.device()).unwrap().unsqueeze(0).unwrap(), None)
            .unwrap();
        assert!(common::max_abs_diff(&both.get(row).unwrap(), &single.squeeze(0).unwrap()) < 1e-4);
    }
}

#[test]
fn out_of_vocabulary_and_over_context_inputs_are_errors() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let bad = Tensor::new(&[[1u32, 99_999]], p.model.device()).unwrap();
    let e = p.model.logits(&bad, None).unwrap_err();
    assert!(
        e.to_string().contains("token id 99999 is outside the vocabulary"),
        "{e}"
    );
    let mut cache = p.model.new_cache(8).unwrap();
    let e = p
        .model
        .forward_cached(&[5; 9], &mut cache, LogitsFor::Last)
        .unwrap_err();
    assert!(e.to_string().contains("exceeds the context length 8"), "{e}");
}

#[test]
fn untied_lm_head_and_per_layer_ffn_widths_load_from_a_folder() {
    use greencode::prune::apply::{pruned_tensors, PrunePlan};
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    // Different FFN widths per layer, written as a single model.safetensors, untied.
    let widths: Vec<usize> = (0..12).map(|i| 1024 - 64 * (i % 4)).collect();
    let plan = PrunePlan {
        vocab: None,
        kept_layers: (0..12).collect(),
        ffn: Some(widths.iter().map(|&w| (0..w as u32).collect()).collect()),
    };
    let (mut config, mut tensors) = pruned_tensors(&p.model, &plan).unwrap();
    config["tie_word_embeddings"] = false.into();
    let head = (tensors["model.embed_tokens.weight"].clone() * 0.5).unwrap();
    tensors.insert("lm_head.weight".into(), head);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(
        common::tiny_coder().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let q = LoadedModel::load_cpu(dir.path()).unwrap();
    assert_eq!(q.model.ffn_widths(), widths);
    assert!(!q.model.config().tie_word_embeddings);
    // Halving lm_head halves the logits.
    let ids = prompt_ids(&p);
    let x = Tensor::new(ids.as_slice(), p.model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let same_ffn = greencode::prune::apply::build(&p.model, &plan).unwrap();
    let want = (same_ffn.logits(&x, None).unwrap() * 0.5).unwrap();
    assert!(common::max_abs_diff(&q.model.logits(&x, None).unwrap(), &want) < 1e-4);
    // An untied config without lm_head.weight names the tensor.
    tensors.remove("lm_head.weight");
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let e = LoadedModel::load_cpu(dir.path()).unwrap_err();
    assert!(e.to_string().contains("tensor `lm_head.weight` not found"), "{e}");
}

#[test]
fn ragged_batch_steps_equal_sequences_run_alone() {
    use greencode::generate::sampling::{argmax, SamplingParams};
    use greencode::generate::{generate, Flow, GenerationRequest};
    use greencode::model::SeqStep;
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let snippets = [
        "def fibonacci(n):\n",
        "import os\nimport sys\n",
        "class Stack:\n    def __init__(self):\n",
        "for i in range(10):\n    print(",
        "#include <stdio.h>\nint main(void) {\n",
        "def add(a, b):\n    return",
        "x = [1, 2, 3]\ny = ",
        "with open(path) as f:\n    data = ",
    ];
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| {
            p.tokenizer
                .encode(&format!("{}{}", "# file\n".repeat(i % 3), snippets[i % 8]))
                .unwrap()
        })
        .collect();
    let steps = 10;
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|ids| {
            let mut req = GenerationRequest::new(ids.clone(), steps, SamplingParams::greedy());
            req.ignore_stop_ids = true;
            generate(&p.model, &req, |_, _| Flow::Continue).unwrap().token_ids
        })
        .collect();
    // Batched: the first 8 start at step 0, the other 8 join at step 3 (their
    // prompt chunks run in the same steps as the others' decode tokens).
    let mut caches: Vec<_> = (0..16).map(|_| p.model.new_cache(256).unwrap()).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); 16];
    for step in 0..steps + 3 {
        let active: Vec<usize> = (0..16)
            .filter(|&i| {
                let start = if i < 8 { 0 } else { 3 };
                step >= start && out[i].len() < steps
            })
            .collect();
        let inputs: Vec<Vec<u32>> = active
            .iter()
            .map(|&i| {
                if out[i].is_empty() {
                    prompts[i].clone()
                } else {
                    vec![*out[i].last().unwrap()]
                }
            })
            .collect();
        let mut batch: Vec<SeqStep> = Vec::new();
        for ((i, cache), tokens) in caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .zip(&inputs)
        {
            let _ = i;
            batch.push(SeqStep {
                cache,
                tokens,
                logits: greencode::model::LogitsFor::Last,
            });
        }
        let logits = p.model.step(&mut batch).unwrap();
        for (&i, l) in active.iter().zip(&logits) {
            let row: Vec<f32> = l.squeeze(0).unwrap().to_vec1().unwrap();
            out[i].push(argmax(&row));
        }
    }
    for i in 0..16 {
        assert_eq!(out[i], alone[i], "sequence {i} differs in a batch");
    }
}

#[test]
fn fused_step_equals_the_tensor_path_for_prompts_and_decoding() {
    use greencode::model::SeqStep;
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let ids = prompt_ids(&p);
    let split = ids.len() / 2;
    let (mut fused_cache, mut tensor_cache) = (p.model.new_cache(256).unwrap(), p.model.new_cache(256).unwrap());
    // The prompt's first half as one chunk with logits on every row, then
    // the rest one token at a time.
    let mut chunks = vec![&ids[..split]];
    chunks.extend(ids[split..].chunks(1));
    for (i, chunk) in chunks.into_iter().enumerate() {
        let which = if i == 0 { LogitsFor::All } else { LogitsFor::Last };
        let fused = p.model.forward_cached(chunk, &mut fused_cache, which).unwrap();
        let mut step = [SeqStep {
            cache: &mut tensor_cache,
            tokens: chunk,
            logits: which,
        }];
        let plain = p.model.step_unfused(&mut step).unwrap().pop().unwrap();
        assert_eq!(fused.dims(), plain.dims());
        let d = common::max_abs_diff(&fused, &plain);
        assert!(d < 1e-4, "chunk {i}: max |Δlogit| {d}");
    }
}

#[test]
fn prompt_chunking_does_not_change_a_single_bit() {
    // Projections (matrix × vector or tiled), attention blocks and the
    // decode path share one arithmetic per output: the logits of every
    // position are bit-identical however the prompt is cut.
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let ids: Vec<u32> = prompt_ids(&p).into_iter().cycle().take(70).collect();
    let run = |cut: usize| -> Vec<u32> {
        let mut cache = p.model.new_cache(256).unwrap();
        let mut bits = Vec::new();
        for chunk in ids.chunks(cut) {
            let logits = p.model.forward_cached(chunk, &mut cache, LogitsFor::All).unwrap();
            bits.extend(common::bits(&logits));
        }
        bits
    };
    let whole = run(ids.len());
    for cut in [1, 3, 16, 17, 33] {
        assert!(run(cut) == whole, "chunks of {cut} differ from the whole prompt");
    }
}

#[test]
fn q8_0_model_decodes_like_its_dequantized_weights_and_stays_close_to_f32() {
    let f32_model = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let mut p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    assert_eq!(
        p.model.quantize_q8().unwrap(),
        12 * 7 + 1,
        "every projection and the tied lm_head"
    );
    assert_eq!(p.model.quantization(), "q8_0");
    let ids = prompt_ids(&p);
    // The fused decode reads Q8_0 blocks; the tensor path (LogitsFor::All)
    // multiplies by their dequantized values: the same weights.
    let split = ids.len() / 2;
    let mut fused_cache = prefilled(&p, &ids[..split]);
    let mut tensor_cache = prefilled(&p, &ids[..split]);
    let mut reference_cache = prefilled(&f32_model, &ids[..split]);
    for &id in &ids[split..] {
        let fused = next(&p, id, &mut fused_cache, LogitsFor::Last);
        let plain = next(&p, id, &mut tensor_cache, LogitsFor::All);
        let d = common::max_abs_diff(&fused, &plain);
        assert!(d < 1e-4, "fused Q8_0 vs dequantized tensor path: max |Δlogit| {d}");
        let f = next(&f32_model, id, &mut reference_cache, LogitsFor::Last);
        let d = common::max_abs_diff(&fused, &f);
        assert!(d < 0.25, "Q8_0 vs f32: max |Δlogit| {d}");
    }
}

#[test]
fn quantizing_at_load_keeps_only_q8_0_blocks_and_equals_quantizing_after() {
    let dir = common::tiny_coder();
    let f32_model = LoadedModel::load_cpu(&dir).unwrap();
    let mut after = LoadedModel::load_cpu(&dir).unwrap();
    after.model.quantize_q8().unwrap();
    let at_load = LoadedModel::load_with(&dir, &candle_core::Device::Cpu, candle_core::DType::F32, true).unwrap();
    // Resident weights: 36 of every 128 f32 bytes (Q8_0 values, f32 scales) plus
    // norms and biases; no full-precision copy of any matrix is kept.
    let mut f32_held = f32_model.model.clone();
    f32_held.hold_dense().unwrap();
    let (full, q8) = (f32_held.weight_bytes(), at_load.model.weight_bytes());
    assert!((q8 as f64) < 0.3 * full as f64, "{q8} bytes resident vs {full} in f32");
    assert_eq!(q8, after.model.weight_bytes());
    for l in &at_load.model.layers {
        assert!(l.self_attn.q_proj.dense().is_none() && l.mlp.down_proj.dense().is_none());
    }
    assert!(at_load.model.lm_head().dense().is_none() && at_load.model.embed_tokens().dense().is_none());
    // Same blocks either way: prompt (tensor path) and decode agree exactly.
    let ids = prompt_ids(&at_load);
    let x = Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = at_load.model.logits(&x, None).unwrap();
    let b = after.model.logits(&x, None).unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    let mut c1 = prefilled(&at_load, &ids);
    let mut c2 = prefilled(&after, &ids);
    let d = common::max_abs_diff(
        &next(&at_load, ids[0], &mut c1, LogitsFor::Last),
        &next(&after, ids[0], &mut c2, LogitsFor::Last),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn a_bf16_checkpoint_is_held_in_bf16_with_the_bits_of_f32_weights() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let held = &p.model;
    assert_eq!(held.weight_format(), "bf16", "tiny-coder's checkpoint is bf16");
    assert!(held.layers.iter().all(|l| l.mlp.down_proj.bf16().is_some()));
    assert!(held.lm_head().bf16().is_some() && held.embed_tokens().dense().is_none());
    let mut dense = held.clone();
    dense.hold_dense().unwrap();
    assert_eq!(dense.weight_format(), "f32");
    let mut mixed = held.clone();
    mixed.layers[3].mlp.down_proj.hold_dense().unwrap();
    assert_eq!(mixed.weight_format(), "mixed (bf16, f32)");
    // Half the bytes (norms and biases stay f32).
    let (b16, b32) = (held.weight_bytes(), dense.weight_bytes());
    assert!((b16 as f64) < 0.51 * b32 as f64, "{b16} bytes held vs {b32} in f32");
    let bits = common::bits;
    // Tensor path (full forward).
    let ids = prompt_ids(&p);
    let x = Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    assert_eq!(
        bits(&held.logits(&x, None).unwrap()),
        bits(&dense.logits(&x, None).unwrap())
    );
    // Fused step: a prompt (tiled kernel on widened rows), then decoding
    // (matrix × vector widening in registers), alone and three at a time.
    let (mut c16, mut c32) = (held.new_cache(128).unwrap(), dense.new_cache(128).unwrap());
    let a = held.forward_cached(&ids, &mut c16, LogitsFor::All).unwrap();
    let b = dense.forward_cached(&ids, &mut c32, LogitsFor::All).unwrap();
    assert_eq!(bits(&a), bits(&b), "prompt logits");
    let mut id = ids[0];
    for step in 0..6 {
        let a = held.forward_cached(&[id], &mut c16, LogitsFor::Last).unwrap();
        let b = dense.forward_cached(&[id], &mut c32, LogitsFor::Last).unwrap();
        assert_eq!(bits(&a), bits(&b), "decode step {step}");
        id = a.flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
    }
    let run = |m: &greencode::model::Qwen2| -> Vec<Vec<u32>> {
        let mut caches: Vec<_> = (0..3).map(|_| m.new_cache(64).unwrap()).collect();
        let chunks = [&ids[..1], &ids[1..4], &ids[4..]];
        let mut steps: Vec<SeqStep> = caches
            .iter_mut()
            .zip(chunks)
            .map(|(cache, tokens)| SeqStep {
                cache,
                tokens,
                logits: LogitsFor::All,
            })
            .collect();
        m.step(&mut steps).unwrap().iter().map(bits).collect()
    };
    assert_eq!(run(held), run(&dense), "a ragged batch");
}
