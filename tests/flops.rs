//! The analytic FLOP count equals the matmul FLOPs the forward passes
//! execute (counted by the model's probe), on tiny-coder and on a pruned
//! tiny-coder, for prefill (short and blocked), decode and scoring.

mod common;

use greencode::energy::FlopCounter;
use greencode::generate::loaded::LoadedModel;
use greencode::generate::sampling::SamplingParams;
use greencode::generate::{generate, Flow, GenerationRequest};
use greencode::model::flop_probe;
use greencode::model::LogitsFor;
use greencode::model::Qwen2;
use greencode::prune::apply::{build, PrunePlan};

fn check(model: &Qwen2, prompt: &[u32]) {
    let counter = FlopCounter::new(&model.shapes());
    // Generation: prefill + decode steps.
    for (max_tokens, prompt_logprobs) in [(1usize, None), (9, None), (5, Some(2))] {
        let mut req = GenerationRequest::new(prompt.to_vec(), max_tokens, SamplingParams::greedy());
        req.prompt_logprobs = prompt_logprobs;
        flop_probe::take();
        let out = generate(model, &req, |_, _| Flow::Continue).unwrap();
        let executed = flop_probe::take();
        let rows = if prompt_logprobs.is_some() { prompt.len() } else { 1 };
        let (prefill, decode) = counter.generation(prompt.len(), rows, out.token_ids.len());
        assert_eq!(
            executed,
            prefill + decode,
            "generation of {max_tokens} after {} tokens",
            prompt.len()
        );
    }
    // A continued sequence: a chunk at an offset.
    let mut cache = model.new_cache(1024).unwrap();
    model
        .forward_cached(&prompt[..prompt.len() / 2], &mut cache, LogitsFor::Last)
        .unwrap();
    flop_probe::take();
    let rest = &prompt[prompt.len() / 2..];
    model.forward_cached(rest, &mut cache, LogitsFor::All).unwrap();
    assert_eq!(
        flop_probe::take(),
        counter.forward(rest.len(), prompt.len() / 2, rest.len())
    );
}

#[test]
fn analytic_flops_equal_executed_flops_on_original_and_pruned_models() {
    let p = LoadedModel::load_cpu(&common::tiny_coder()).unwrap();
    let text = std::fs::read_to_string(common::tiny_coder().join("MODEL_CARD.md")).unwrap();
    let long: Vec<u32> = p.tokenizer.encode(&text).unwrap().into_iter().take(300).collect();
    assert_eq!(long.len(), 300, "a prompt longer than two query blocks");
    let short = p.tokenizer.encode("def fibonacci(n):\n").unwrap();
    check(&p.model, &short);
    check(&p.model, &long);

    // Pruned: 2 layers gone, FFN 768 in every layer, a smaller vocabulary.
    let mut kept: Vec<u32> = (0..12000).collect();
    kept.extend(long.iter().chain(&short).copied().filter(|&id| id >= 12000));
    kept.sort_unstable();
    kept.dedup();
    let plan = PrunePlan {
        vocab: Some(kept.clone()),
        kept_layers: vec![0, 1, 3, 4, 5, 6, 7, 8, 9, 11],
        ffn: Some(vec![(0..768).collect(); 10]),
    };
    let pruned = build(&p.model, &plan).unwrap();
    let map = |ids: &[u32]| -> Vec<u32> { ids.iter().map(|id| kept.binary_search(id).unwrap() as u32).collect() };
    check(&pruned, &map(&short));
    check(&pruned, &map(&long));
    let full = FlopCounter::new(&p.model.shapes()).forward(100, 0, 1);
    let smaller = FlopCounter::new(&pruned.shapes()).forward(100, 0, 1);
    assert!(smaller < full * 8 / 10, "{smaller} vs {full}");
}
