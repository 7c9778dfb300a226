//! LoRA on the runtime: zero adapters change nothing, merging equals the
//! unmerged forward, the differentiable kernels equal the fused ones, and
//! the gradients of the training loss match finite differences.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use greencode::generate::loaded::LoadedModel;
use greencode::model::lora::{LoraConfig, LoraTarget};
use greencode::model::{Kernels, Qwen2, Qwen2Config, WeightStore};
use greencode::recover::loss;
use rand::{Rng, SeedableRng};

fn ids(p: &LoadedModel) -> Tensor {
    let ids = p
        .tokenizer
        .encode(
            "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
        )
        .unwrap();
    Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn all_targets(rank: usize) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        targets: LoraTarget::ALL[..7].to_vec(),
        seed: 3,
    }
}

#[test]
fn zero_adapters_leave_the_logits_bit_identical() {
    let mut p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let x = ids(&p);
    for kernels in [Kernels::Fused, Kernels::Differentiable] {
        let mut base = p.model.clone();
        base.set_kernels(kernels);
        let want = base.logits(&x, None).unwrap();
        let mut adapted = p.model.clone();
        let adapters = adapted.attach_lora(&all_targets(8)).unwrap();
        assert_eq!(adapters.len(), 7 * adapted.num_layers());
        adapted.set_kernels(kernels);
        let got = adapted.logits(&x, None).unwrap();
        assert_eq!(common::max_abs_diff(&want, &got), 0.0, "{kernels:?}");
    }
    // The serving path too (the fused decode step steps aside for adapters).
    let adapters = p.model.attach_lora(&all_targets(4)).unwrap();
    assert!(!adapters.is_empty() && p.model.has_lora());
}

#[test]
fn differentiable_kernels_match_the_fused_forward() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let x = ids(&p);
    let fused = p.model.logits(&x, None).unwrap();
    let mut slow = p.model.clone();
    slow.set_kernels(Kernels::Differentiable);
    let d = common::max_abs_diff(&fused, &slow.logits(&x, None).unwrap());
    assert!(d < 1e-3, "differentiable forward differs by {d}");
}

#[test]
fn merged_adapters_equal_the_unmerged_forward() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let x = ids(&p);
    let mut adapted = p.model.clone();
    for (_, a) in adapted.attach_lora(&all_targets(8)).unwrap() {
        // Non-zero B so the adapters matter.
        let b = Tensor::randn(0f32, 0.02, a.b.dims(), &Device::Cpu).unwrap();
        a.b.set(&b).unwrap();
    }
    let unmerged = adapted.logits(&x, None).unwrap();
    let merged = adapted.merged_lora().unwrap();
    assert!(!merged.has_lora());
    let d = common::max_abs_diff(&unmerged, &merged.logits(&x, None).unwrap());
    assert!(d < 1e-3, "merged differs by {d}");
    let base = p.model.logits(&x, None).unwrap();
    assert!(
        common::max_abs_diff(&unmerged, &base) > 1e-2,
        "the adapters must change the output"
    );
    // Greedy generation through the serving step uses them too.
    let mut cache = merged.new_cache(64).unwrap();
    let ids: Vec<u32> = x.squeeze(0).unwrap().to_vec1().unwrap();
    let via_step = merged
        .forward_cached(&ids, &mut cache, greencode::model::LogitsFor::Last)
        .unwrap();
    let mut cache = adapted.new_cache(64).unwrap();
    let via_adapters = adapted
        .forward_cached(&ids, &mut cache, greencode::model::LogitsFor::Last)
        .unwrap();
    assert!(common::max_abs_diff(&via_step, &via_adapters) < 1e-3);
}

#[test]
fn lm_head_adapters_are_refused_on_tied_embeddings() {
    let mut p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let cfg = LoraConfig {
        targets: vec![LoraTarget::Q, LoraTarget::LmHead],
        ..all_targets(4)
    };
    let err = p.model.attach_lora(&cfg).unwrap_err().to_string();
    assert!(err.contains("lm_head") && err.contains("untie"), "{err}");
    let zero = LoraConfig {
        rank: 0,
        ..all_targets(4)
    };
    assert!(p.model.attach_lora(&zero).unwrap_err().to_string().contains("rank"));
}

/// A random two-layer Qwen2 in f64 with untied embeddings.
fn tiny_random_model() -> Qwen2 {
    let (h, layers, heads, kv, hd, ffn, vocab) = (16usize, 2usize, 4usize, 2usize, 4usize, 24usize, 37usize);
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": vocab, "hidden_size": h, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 0
    });
    let cfg = Qwen2Config::from_json_str(&config.to_string(), Path::new("<test>")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut rand = |shape: &[usize], std: f64| normal(shape, std, &mut rng);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rand(&[vocab, h], 0.5));
    t.insert("lm_head.weight".into(), rand(&[vocab, h], 0.3));
    t.insert("model.norm.weight".into(), (rand(&[h], 0.1) + 1.0).unwrap());
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, out, inp) in [
            ("self_attn.q_proj", heads * hd, h),
            ("self_attn.k_proj", kv * hd, h),
            ("self_attn.v_proj", kv * hd, h),
            ("self_attn.o_proj", h, heads * hd),
            ("mlp.gate_proj", ffn, h),
            ("mlp.up_proj", ffn, h),
            ("mlp.down_proj", h, ffn),
        ] {
            t.insert(format!("{p}.{name}.weight"), rand(&[out, inp], 0.3));
            if name.ends_with("q_proj") || name.ends_with("k_proj") || name.ends_with("v_proj") {
                t.insert(format!("{p}.{name}.bias"), rand(&[out], 0.1));
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{norm}.weight"), (rand(&[h], 0.1) + 1.0).unwrap());
        }
    }
    let mut store = WeightStore::from_tensors(Path::new("<random>"), DType::F64, t);
    Qwen2::from_store(cfg, &mut store).unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let mut model = tiny_random_model();
    let cfg = LoraConfig {
        rank: 3,
        alpha: 6.0,
        targets: LoraTarget::ALL.to_vec(),
        seed: 5,
    };
    let adapters = model.attach_lora(&cfg).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (_, a) in &adapters {
        a.b.set(&normal(a.b.dims(), 0.2, &mut rng)).unwrap();
    }
    model.set_kernels(Kernels::Differentiable);
    let dev = Device::Cpu;
    // 2 sequences of 9 tokens; the teacher's logits are a fixed random target.
    let tokens = Tensor::new(
        &[[1u32, 5, 9, 2, 33, 7, 7, 0, 12], [3, 3, 30, 4, 8, 19, 25, 6, 1]],
        &dev,
    )
    .unwrap();
    let teacher = normal(&[2, 9, 37], 1.0, &mut rng);
    let mask = Tensor::ones((2, 8), DType::F64, &dev).unwrap();
    let loss_of = |m: &Qwen2| -> Tensor {
        let logits = m.logits(&tokens, None).unwrap();
        let kl = loss::kl(&teacher, &logits).unwrap();
        let ce = loss::next_token_ce(&logits, &tokens, &mask).unwrap();
        (kl + ce).unwrap()
    };
    let grads = loss_of(&model).backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for (name, a) in adapters.iter().step_by(3) {
        for (which, var) in [("A", &a.a), ("B", &a.b)] {
            let analytic = grads.get(var.as_tensor()).expect("every adapter gets a gradient");
            let flat: Vec<f64> = analytic.flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for &k in &[0usize, base.len() / 2, base.len() - 1] {
                let at = |delta: f64| -> f64 {
                    let mut v = base.clone();
                    v[k] += delta;
                    var.set(&Tensor::from_vec(v, var.dims(), &dev).unwrap()).unwrap();
                    loss_of(&model).to_scalar::<f64>().unwrap()
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(base.clone(), var.dims(), &dev).unwrap())
                    .unwrap();
                // Central differences in f64 are exact to about |loss| × 2⁻⁵² / eps
                // (≈ 1e-9 here): that much absolute slack, then 1e-5 relative.
                let err = ((numeric - flat[k]).abs() - 1e-9).max(0.0) / numeric.abs().max(flat[k].abs()).max(1e-6);
                assert!(
                    err < 1e-5,
                    "{name}.lora_{which}[{k}]: analytic {} vs numeric {numeric}",
                    flat[k]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "checked {checked} entries");
}

/// f64 values of `shape`, normal with standard deviation `std`, drawn from
/// `rng` (Box–Muller), so a test's numbers do not change from run to run.
fn normal(shape: &[usize], std: f64, rng: &mut rand::rngs::StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}
