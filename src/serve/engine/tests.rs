//! The engine on a fake model (no weights): admission order, batch limits,
//! cancellation, queue overflow, prefix sharing and eviction from the KV
//! pool, queueing and preemption when the pool is full; two models side by
//! side (turns, one pool, the meter split between them).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::energy::meter::FakeMeter;
use crate::generate::sampling::SamplingParams;
use crate::model::{LogitsFor, KV_BLOCK};

/// Keys and values of the fake model: 64 bytes a position, 2 KiB a block.
const FAKE_SHAPE: KvShape = KvShape {
    layers: 1,
    kv_heads: 1,
    head_dim: 8,
};

/// One sequence's part of one step: its first input token and how many tokens it ran.
type StepLog = Arc<Mutex<Vec<Vec<(u32, usize)>>>>;

/// A model whose greedy next token is always the last input token +
/// `stride` (1 unless set).
struct FakeModel {
    vocab: usize,
    delay: Duration,
    log: StepLog,
    stride: usize,
    shape: KvShape,
    /// Joules each step adds to this meter per token it runs, and the log
    /// of which model ran each step.
    metered: Option<Metered>,
}

/// A fake model's meter, joules per token, its id and the log of which model ran each step.
type Metered = (FakeMeter, f64, usize, Arc<Mutex<Vec<usize>>>);

impl EngineModel for FakeModel {
    fn context_len(&self) -> usize {
        2048
    }

    fn kv_shape(&self) -> Option<KvShape> {
        Some(self.shape)
    }

    fn new_cache(&self, capacity: usize) -> crate::model::error::Result<KvCache> {
        Ok(KvCache::new(1, 1, 8, capacity, DType::F32, &Device::Cpu)?)
    }

    fn step(&self, seqs: &mut [SeqStep<'_>]) -> crate::model::error::Result<Vec<Tensor>> {
        std::thread::sleep(self.delay);
        self.log
            .lock()
            .unwrap()
            .push(seqs.iter().map(|s| (s.tokens[0], s.tokens.len())).collect());
        if let Some((meter, per_token, id, order)) = &self.metered {
            let tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
            *meter.joules.lock().unwrap() += per_token * tokens as f64;
            order.lock().unwrap().push(*id);
        }
        let mut out = Vec::new();
        for s in seqs.iter_mut() {
            assert!(s.cache.len() + s.tokens.len() <= s.cache.capacity(), "cache overflow");
            s.cache.advance(s.tokens);
            let rows: Vec<u32> = match s.logits {
                LogitsFor::Last => vec![*s.tokens.last().unwrap()],
                LogitsFor::All => s.tokens.to_vec(),
            };
            let mut logits = vec![0f32; rows.len() * self.vocab];
            for (r, &t) in rows.iter().enumerate() {
                logits[r * self.vocab + (t as usize + self.stride) % self.vocab] = 10.0;
            }
            out.push(Tensor::from_vec(logits, (rows.len(), self.vocab), &Device::Cpu)?);
        }
        Ok(out)
    }

    fn flops(&self, new: usize, _offset: usize, _rows: usize) -> u64 {
        new as u64 * 1000
    }

    fn facts(&self) -> ModelFacts {
        ModelFacts {
            parameters: [("total", 0); 6],
            pruned_from: String::new(),
            quantization: "none",
            params_before_pruning: None,
            weight_bytes: 0,
        }
    }
}

struct Fixture {
    handle: EngineHandle,
    log: StepLog,
    metrics: Metrics,
}

fn start(config: EngineConfig, delay: Duration) -> Fixture {
    let vocab = 256;
    let log = StepLog::default();
    let model = FakeModel {
        vocab,
        delay,
        log: Arc::clone(&log),
        stride: 1,
        shape: FAKE_SHAPE,
        metered: None,
    };
    let tables = tables(vocab);
    let metrics = Metrics::new("fake");
    let accounting = Accounting {
        attributor: Attributor::new(Box::new(FakeMeter::default())).unwrap(),
        carbon: Carbon::new(475.0, 1.0).unwrap(),
    };
    let (handle, _thread) = spawn(move || Ok(model), tables, metrics.clone(), config, accounting);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !handle.is_ready() {
        assert!(Instant::now() < deadline, "the fake engine never became ready");
        std::thread::sleep(Duration::from_millis(1));
    }
    Fixture { handle, log, metrics }
}

fn tables(vocab: usize) -> TokenTables {
    TokenTables {
        token_bytes: Arc::new((0..vocab).map(|i| format!("<{i}>").into_bytes()).collect()),
        special: Arc::new(vec![false; vocab]),
    }
}

/// Limits, with a KV pool of `kv_blocks` blocks.
fn config(max_batch: usize, max_queue: usize, kv_blocks: usize) -> EngineConfig {
    EngineConfig {
        max_queue,
        max_batch,
        prefill_chunk: 512,
        prefix_caching: true,
        kv_cache_bytes: Some(kv_blocks * KV_BLOCK * FAKE_SHAPE.bytes_per_token(KvDtype::F32)),
        kv_dtype: KvDtype::F32,
        cache_reuse: 0,
        speculate_k: 0,
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> ValidRequest {
    ValidRequest {
        prompt_ids: prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_strings: Vec::new(),
        stop_ids: Vec::new(),
        healing: None,
        logprobs: None,
        prompt_logprobs: false,
        min_indent: 0,
        max_predict: None,
    }
}

impl Fixture {
    fn submit(&self, prompt: Vec<u32>, max_tokens: usize) -> UnboundedReceiver<Event> {
        self.handle
            .submit(vec![request(prompt, max_tokens)])
            .unwrap()
            .pop()
            .unwrap()
    }

    fn running(&self) -> i64 {
        self.metrics.running.with_label_values(&["fake"]).get()
    }

    fn finished(&self, reason: &str) -> u64 {
        self.metrics.requests.with_label_values(&["fake", reason]).get()
    }
}

/// All text of a job and how it ended.
fn collect(mut rx: UnboundedReceiver<Event>) -> (String, Done) {
    let mut text = String::new();
    loop {
        match rx.blocking_recv().expect("the engine ends every job with Done") {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Done(d) => return (text, d),
            Event::Error(e) => panic!("job failed: {e:?}"),
        }
    }
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn admits_in_arrival_order_within_the_batch_limit() {
    let f = start(config(2, 16, 64), Duration::from_millis(2));
    let rxs: Vec<_> = (0..5u32).map(|i| f.submit(vec![10 * i + 1, 10 * i + 2], 4)).collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let (text, done) = collect(rx);
        let base = 10 * i + 3;
        assert_eq!(text, format!("<{}><{}><{}><{}>", base, base + 1, base + 2, base + 3));
        assert_eq!(done.completion_tokens, 4);
        assert_eq!(done.finish_reason, FinishReason::Length);
    }
    let log = f.log.lock().unwrap();
    assert!(
        log.iter().all(|step| step.len() <= 2),
        "a step ran more than max_batch sequences"
    );
    assert!(log.iter().any(|step| step.len() == 2), "the batch was never filled");
    // Prompt chunks (2 tokens) start in arrival order.
    let prompt_starts: Vec<u32> = log.iter().flatten().filter(|(_, n)| *n == 2).map(|(t, _)| *t).collect();
    assert_eq!(prompt_starts, [1, 11, 21, 31, 41]);
    drop(log);
    wait_until("no request runs", || f.running() == 0);
}

#[test]
fn a_dropped_receiver_frees_its_slot() {
    let f = start(config(1, 16, 64), Duration::from_millis(3));
    let mut rx = f.submit(vec![1, 2, 3], 400);
    assert!(matches!(rx.blocking_recv(), Some(Event::Text { .. })));
    drop(rx); // the client goes away
              // With one slot, a second job can only run once the first left it.
    let (text, _) = collect(f.submit(vec![100, 101], 2));
    assert_eq!(text, "<102><103>");
    wait_until("the cancelled job is counted", || f.finished("cancelled") == 1);
    assert_eq!(f.running(), 0);
    let steps_of_first = f.log.lock().unwrap().iter().flatten().filter(|(t, _)| *t < 100).count();
    assert!(steps_of_first < 50, "the abandoned job ran {steps_of_first} steps");
}

#[test]
fn queue_overflow_is_rejected_and_recovers() {
    let f = start(config(1, 2, 64), Duration::from_millis(5));
    let a = f.submit(vec![1], 300);
    let b = f.submit(vec![2], 300);
    match f.handle.submit(vec![request(vec![3], 1)]) {
        Err(ApiError::QueueFull { max_queue, .. }) => assert_eq!(max_queue, 2),
        other => panic!("expected QueueFull, got {:?}", other.map(|v| v.len())),
    }
    drop((a, b));
    wait_until("the queue drains", || f.running() == 0 && f.finished("cancelled") == 2);
    let (text, _) = collect(f.submit(vec![7], 1));
    assert_eq!(text, "<8>");
}

#[test]
fn full_prompt_blocks_are_reused_until_their_memory_is_needed() {
    let f = start(config(1, 16, 5), Duration::ZERO);
    let prompt_a: Vec<u32> = (1..=70).collect();
    let (_, a) = collect(f.submit(prompt_a.clone(), 2));
    assert_eq!(a.cached_tokens, 0);
    // B extends A's prompt: A's two full blocks are reused, 7 tokens run.
    let mut prompt_b = prompt_a.clone();
    prompt_b.push(99);
    let (text_b, b) = collect(f.submit(prompt_b.clone(), 2));
    assert_eq!(b.cached_tokens, 2 * KV_BLOCK);
    assert_eq!(text_b, "<100><101>");
    assert!(f.log.lock().unwrap().iter().flatten().any(|&(t, n)| t == 65 && n == 7));
    // C shares nothing and needs all five blocks: the cached ones go.
    let (_, c) = collect(f.submit((100..230).collect(), 1));
    assert_eq!(c.cached_tokens, 0);
    let (_, d) = collect(f.submit(prompt_b, 2));
    assert_eq!(d.cached_tokens, 0, "an evicted prefix was reused");
    // A request larger than the whole pool is refused before it queues.
    match f.handle.submit(vec![request((1..=100).collect(), 100)]) {
        Err(ApiError::KvBudget { positions, .. }) => assert_eq!(positions, 5 * KV_BLOCK),
        other => panic!("expected KvBudget, got {:?}", other.map(|v| v.len())),
    }
}

#[test]
fn a_prefix_two_prompts_share_is_computed_once() {
    let f = start(config(2, 16, 64), Duration::from_millis(2));
    let prefix: Vec<u32> = (1..=100).collect();
    let reqs = [7u32, 9].map(|last| {
        let mut p = prefix.clone();
        p.push(last);
        request(p, 3)
    });
    let rxs = f.handle.submit(reqs.to_vec()).unwrap();
    let done: Vec<(String, Done)> = rxs.into_iter().map(collect).collect();
    assert_eq!(done[0].0, "<8><9><10>");
    assert_eq!(done[1].0, "<10><11><12>");
    assert_eq!(done[0].1.cached_tokens + done[1].1.cached_tokens, 3 * KV_BLOCK);
    let computed = f.metrics.prompt_tokens_computed.with_label_values(&["fake"]).get();
    assert_eq!(computed, 101 + (101 - 3 * KV_BLOCK as u64), "prompt tokens run");
}

#[test]
fn a_full_pool_preempts_the_newest_sequence_which_recomputes_and_finishes() {
    // Two sequences of up to 100 positions (4 blocks each) in a pool of 5:
    // both are admitted (together, or the second while the first decodes)
    // and cannot both grow to the end.
    let f = start(config(2, 16, 5), Duration::from_millis(1));
    let rxs = f
        .handle
        .submit(vec![
            request((1..=40).collect(), 60),
            request((101..=140).collect(), 60),
        ])
        .unwrap();
    let done: Vec<(String, Done)> = rxs.into_iter().map(collect).collect();
    let want = |first: u32| (first..first + 60).map(|t| format!("<{t}>")).collect::<String>();
    assert_eq!(done[0].0, want(41));
    assert_eq!(done[1].0, want(141));
    assert!(done
        .iter()
        .all(|(_, d)| d.finish_reason == FinishReason::Length && d.completion_tokens == 60));
    assert!(f.metrics.preemptions.with_label_values(&["fake"]).get() >= 1);
    // The preempted sequence ran its prompt and generated tokens again.
    let log = f.log.lock().unwrap();
    assert!(
        log.iter().flatten().any(|&(t, n)| t == 101 && n > 40),
        "no recomputation"
    );
}

#[test]
fn prompts_are_chunked_only_while_others_decode() {
    let mut cfg = config(4, 16, 64);
    cfg.prefill_chunk = 4;
    let f = start(cfg, Duration::from_millis(1));
    // Alone: the 20-token prompt runs in one step.
    let (text, _) = collect(f.submit((1..=20).collect(), 1));
    assert_eq!(text, "<21>");
    assert!(f.log.lock().unwrap().iter().flatten().any(|&(t, n)| t == 1 && n == 20));
    // With a sequence decoding: at most 4 prompt tokens a step, and the
    // decoding sequence gets a token in every step of the prompt.
    let mut long = f.submit(vec![200], 100);
    assert!(matches!(long.blocking_recv(), Some(Event::Text { .. })));
    let (text, _) = collect(f.submit((100..120).collect(), 1));
    assert_eq!(text, "<120>");
    drop(long);
    let log = f.log.lock().unwrap();
    let prompt_steps: Vec<&Vec<(u32, usize)>> = log
        .iter()
        .filter(|step| step.iter().any(|&(t, _)| (100..120).contains(&t)))
        .collect();
    assert_eq!(prompt_steps.len(), 5, "20 tokens in chunks of 4: {prompt_steps:?}");
    for step in prompt_steps {
        let prompt: usize = step
            .iter()
            .filter(|&&(t, _)| (100..120).contains(&t))
            .map(|&(_, n)| n)
            .sum();
        assert!(prompt <= 4, "{step:?}");
        assert!(
            step.iter().any(|&(t, n)| t >= 200 && n == 1),
            "the decoding sequence waited: {step:?}"
        );
    }
}

#[test]
fn a_prompt_arriving_during_another_with_its_prefix_waits_for_its_blocks() {
    let f = start(config(2, 16, 64), Duration::from_millis(30));
    let prefix: Vec<u32> = (0..600).map(|i| (i % 250) as u32 + 1).collect();
    let with = |last: u32| {
        let mut p = prefix.clone();
        p.push(last);
        p
    };
    let a = f.submit(with(7), 3);
    wait_until("A's first chunk ran", || !f.log.lock().unwrap().is_empty());
    let b = f.submit(with(9), 3);
    let (_, da) = collect(a);
    let (_, db) = collect(b);
    let computed = f.metrics.prompt_tokens_computed.with_label_values(&["fake"]).get();
    eprintln!("computed {computed}: {:?}", f.log.lock().unwrap());
    assert_eq!(da.cached_tokens + db.cached_tokens, 600 / KV_BLOCK * KV_BLOCK);
    assert_eq!(computed, 601 + 601 - (600 / KV_BLOCK * KV_BLOCK) as u64);
}

#[test]
fn two_models_take_turns_share_one_pool_and_split_the_meter() {
    let vocab = 256;
    let meter = FakeMeter::default();
    *meter.joules.lock().unwrap() = 1000.0; // before start: not counted
    let order = Arc::new(Mutex::new(Vec::new()));
    let process = Metrics::new("a").process();
    let small = KvShape {
        layers: 2,
        ..FAKE_SHAPE
    };
    let specs: Vec<EngineSpec<FakeModel>> = [(1, FAKE_SHAPE, 0.01), (2, small, 0.03)]
        .into_iter()
        .enumerate()
        .map(|(id, (stride, shape, per_token))| {
            let model = FakeModel {
                vocab,
                delay: Duration::from_millis(1),
                log: StepLog::default(),
                stride,
                shape,
                metered: Some((meter.clone(), per_token, id, Arc::clone(&order))),
            };
            EngineSpec {
                load: Box::new(move || Ok(model)),
                tables: tables(vocab),
                metrics: if id == 0 {
                    Metrics::new("a")
                } else {
                    process.for_model("b")
                },
                config: config(4, 16, 16),
            }
        })
        .collect();
    let metrics: Vec<Metrics> = specs.iter().map(|s| s.metrics.clone()).collect();
    let accounting = Accounting {
        attributor: Attributor::new(Box::new(meter.clone())).unwrap(),
        carbon: Carbon::new(475.0, 1.0).unwrap(),
    };
    let (handles, _thread) = spawn_many(specs, process.clone(), accounting);
    wait_until("both models are loaded", || handles.iter().all(|h| h.is_ready()));
    *meter.joules.lock().unwrap() += 5.0; // idle
    let rxs: Vec<_> = handles
        .iter()
        .map(|h| h.submit(vec![request(vec![10, 11], 40)]).unwrap().pop().unwrap())
        .collect();
    let done: Vec<(String, Done)> = rxs.into_iter().map(collect).collect();
    assert!(done[0].0.starts_with("<12><13><14>"), "model a: {}", done[0].0);
    assert!(done[1].0.starts_with("<13><15><17>"), "model b: {}", done[1].0);
    // Once both run, they alternate step by step.
    let order = order.lock().unwrap().clone();
    let first_b = order.iter().position(|&m| m == 1).unwrap();
    let window = &order[first_b..first_b + 30];
    assert!(
        window.windows(2).all(|w| w[0] != w[1]),
        "the models did not take turns: {window:?}"
    );
    // The meter's every joule is in one model's requests or idle.
    let energy = |m: &Metrics| m.energy.with_label_values(&[m.model(), "fake"]).get();
    let idle = process.idle_energy.with_label_values(&["", "fake"]).get();
    let total = energy(&metrics[0]) + energy(&metrics[1]) + energy(&process);
    let metered = *meter.joules.lock().unwrap() - 1000.0;
    assert!((total - metered).abs() < 1e-9, "booked {total} J of {metered} J");
    assert!((idle - 5.0).abs() < 1e-9, "idle {idle}");
    // Each model's steps were its own: b's tokens cost 3× a's.
    let (a, b) = (energy(&metrics[0]), energy(&metrics[1]));
    assert!((b / a - 3.0).abs() < 1e-6, "a {a} J, b {b} J");
    assert_eq!(done[0].1.cost.energy_joules + done[1].1.cost.energy_joules, a + b);
}
