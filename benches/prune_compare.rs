//! The pruning comparisons of PRUNING.md, in one process on tiny-coder:
//! layer metrics (kl, bi, angular) at 1, 2 and 3 layers removed and FFN
//! scores (top, act, random) at widths 768 and 512, each measured on the
//! held-out stdlib files (KL against the original, top-1 agreement, bits per
//! byte, perplexity). No vocabulary pruning here, so per-token perplexity is
//! comparable across rows.
//!
//! `cargo bench --bench prune_compare` (env `EVAL_FILES`, default 20;
//! `CALIB_SAMPLES`, default 32; calibration windows of 512 tokens).

use std::time::Instant;

use greencode::data::calib;
use greencode::data::corpus;
use greencode::eval::kl::kl_on_files;
use greencode::generate::loaded::LoadedModel;
use greencode::model::LayerMask;
use greencode::prune::apply::{build, count_params, PrunePlan};
use greencode::prune::ffn::{self, FfnScore};
use greencode::prune::layers::{choose_layers, CalibSet, LayerMetric};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    greencode::cpu::threads::init(greencode::cpu::threads::default_threads());
    let t0 = Instant::now();
    let src =
        LoadedModel::load_cpu(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-coder")).unwrap();
    let m = &src.model;
    let texts = calib::load(None).unwrap();
    let windows = calib::windows(&src.tokenizer, &texts, env("CALIB_SAMPLES", 32), 0, 512).unwrap();
    let set = CalibSet::new(m, &windows.calib, 4).unwrap();
    let files = corpus::eval_files(&corpus::stdlib_dir().unwrap(), env("EVAL_FILES", 20)).unwrap();
    let total = count_params(m).total as f64;
    let base = kl_on_files(m, m, &src.tokenizer, None, &files, 1024, |_, _| {}).unwrap();
    println!(
        "held-out: first {} stdlib files, {} tokens; calibration {} × 512 tokens",
        files.len(),
        base.tokens,
        windows.calib.len()
    );
    println!("| variant | params removed | held-out KL | top-1 agreement | bits/byte | ppl | calib KL |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| original | 0% | 0 | 100% | {:.4} | {:.2} | 0 |",
        base.model_bits_per_byte,
        base.model_mean_nll.exp()
    );
    let row = |name: String, plan: PrunePlan, calib_kl: f64| {
        let v = build(m, &plan).unwrap();
        let r = kl_on_files(m, &v, &src.tokenizer, None, &files, 1024, |_, _| {}).unwrap();
        println!(
            "| {name} | {:.1}% | {:.4} | {:.1}% | {:.4} | {:.2} | {calib_kl:.4} |",
            (1.0 - count_params(&v).total as f64 / total) * 100.0,
            r.kl,
            r.top1_agreement * 100.0,
            r.model_bits_per_byte,
            r.model_mean_nll.exp()
        );
    };
    for metric in [LayerMetric::Kl, LayerMetric::Bi, LayerMetric::Angular] {
        // kl and bi rank once (greedy steps are incremental); angular picks a block per n.
        let ranked = if metric == LayerMetric::Angular {
            None
        } else {
            Some(choose_layers(m, &set, 3, metric).unwrap())
        };
        for n in 1..=3 {
            let steps = match &ranked {
                Some(r) => r[..n].to_vec(),
                None => choose_layers(m, &set, n, metric).unwrap(),
            };
            let removed: Vec<usize> = steps.iter().map(|s| s.removed).collect();
            let mask = LayerMask::without(m.num_layers(), &removed);
            let calib_kl = greencode::prune::layers::mean_kl(m, &set, Some(&mask)).unwrap();
            let plan = PrunePlan {
                vocab: None,
                kept_layers: mask.active(),
                ffn: None,
            };
            row(
                format!("layers {metric:?} −{n} {removed:?}").to_lowercase(),
                plan,
                calib_kl,
            );
        }
    }
    let all = LayerMask::all(m.num_layers());
    let act = ffn::activation_scores(m, &set.batches, &all).unwrap();
    for width in [768, 512] {
        for score in [FfnScore::Top, FfnScore::Act, FfnScore::Random] {
            let ffn: Vec<Vec<u32>> = (0..m.num_layers())
                .map(|l| ffn::choose(score, m.layers[l].mlp.width(), width, l, 0, Some(&act)).unwrap())
                .collect();
            let plan = PrunePlan {
                vocab: None,
                kept_layers: all.active(),
                ffn: Some(ffn),
            };
            let v = build(m, &plan).unwrap();
            let calib_kl = greencode::prune::layers::mean_kl(&v, &set, None).unwrap();
            row(format!("ffn {score:?} {width}").to_lowercase(), plan, calib_kl);
        }
    }
    eprintln!("done in {:.0} s", t0.elapsed().as_secs_f64());
}
