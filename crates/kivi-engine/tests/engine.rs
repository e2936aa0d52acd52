//! The continuous-batching engine against independent references: a request's tokens in a busy
//! batch (others arriving, finishing, preempted) equal its tokens run alone through `Session`
//! (the one-sequence generation loop); the block pool returns to empty; budget exhaustion
//! queues and preempts instead of failing; submit errors.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use kivi_core::{CacheConfig, KiviConfig};
use kivi_engine::engine::Sink;
use kivi_engine::{
    Engine, EngineConfig, Event, FinishReason, Finished, GenerateParams, Request, RequestId,
    SamplingParams, Scheduler, Session, SubmitError,
};
use kivi_model::llama::{Model, Naming};
use kivi_model::random::{preset, RandomWeights};
use kivi_model::tensor::DType;
use rand::Rng;

fn tiny_model(seed: u64) -> Arc<Model> {
    let c = preset("tiny").unwrap();
    let src = RandomWeights::new(&c, DType::F32, seed).unwrap();
    Arc::new(Model::load(&src, Naming::Gguf, c).unwrap())
}

fn random_prompt(rng: &mut impl Rng, len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|_| rng.gen_range(0..vocab as u32)).collect()
}

/// Tokens of `request` generated alone by `Session` with the engine's prefill chunk.
fn alone(model: &Model, cache: &CacheConfig, request: &Request, chunk: usize) -> Vec<u32> {
    let mut s = Session::new(model, cache).unwrap();
    let params = GenerateParams {
        max_tokens: request.max_tokens,
        sampling: request.sampling,
        prefill_chunk: chunk,
        stop_at_eos: true,
    };
    let (out, _) = s
        .generate(&request.prompt, &params, &request.stop_tokens, |_| true)
        .unwrap();
    // Session returns the stop token too; the engine does not send it.
    let mut out = out;
    if out.last().is_some_and(|t| request.stop_tokens.contains(t)) {
        out.pop();
    }
    out
}

fn channel_sink() -> (Sink, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    (Box::new(move |e| tx.send(e).is_ok()), rx)
}

fn collect(rx: &mpsc::Receiver<Event>) -> (Vec<u32>, Finished) {
    let mut toks = Vec::new();
    loop {
        match rx.recv().expect("the engine always ends with Finished") {
            Event::Token(t) => toks.push(t),
            Event::Finished(f) => return (toks, f),
        }
    }
}

fn kivi_small() -> CacheConfig {
    // Small R and G so short sequences already flush keys into quantized blocks.
    CacheConfig::Kivi(KiviConfig {
        group_size: 16,
        residual_len: 32,
        ..KiviConfig::kivi2()
    })
}

fn random_request(rng: &mut impl Rng, vocab: usize, max_prompt: usize, max_out: usize) -> Request {
    let len = rng.gen_range(1..=max_prompt);
    Request {
        prompt: random_prompt(rng, len, vocab),
        max_tokens: rng.gen_range(1..=max_out),
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    }
}

/// Drives a scheduler on this thread: request `i` arrives before step `arrivals[i]`. Checks after
/// every step that reserved KV memory stays inside the budget. Returns every request's events.
fn drive(
    sched: &mut Scheduler,
    requests: &[Request],
    arrivals: &[usize],
    mut cancel_at: impl FnMut(usize) -> Option<RequestId>,
) -> Vec<(Vec<u32>, Finished)> {
    let mut rxs = Vec::new();
    let mut step = 0;
    let mut next = 0;
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| arrivals[i]);
    let mut ids = vec![RequestId(0); requests.len()];
    rxs.resize_with(requests.len(), || None);
    loop {
        while next < order.len() && arrivals[order[next]] <= step {
            let i = order[next];
            sched.validate(&requests[i]).unwrap();
            let (sink, rx) = channel_sink();
            ids[i] = RequestId(i as u64);
            sched.add(ids[i], requests[i].clone(), sink, Instant::now());
            rxs[i] = Some(rx);
            next += 1;
        }
        if let Some(id) = cancel_at(step) {
            sched.cancel(id);
        }
        let busy = sched.step();
        if let Some(b) = sched.config().kv_memory_bytes {
            let r = sched.cache().memory_reserved().total_bytes();
            assert!(r <= b, "step {step}: {r} bytes reserved > budget {b}");
        }
        step += 1;
        if !busy && next == order.len() {
            break;
        }
        assert!(step < 100_000, "the scheduler does not finish");
    }
    rxs.into_iter()
        .map(|rx| collect(&rx.expect("every request arrived")))
        .collect()
}

/// The pool is back to empty and nothing is left in the cache.
fn assert_drained(sched: &Scheduler) {
    let c = sched.cache();
    assert!(sched.is_idle());
    assert_eq!(c.n_sequences(), 0);
    assert_eq!(c.blocks_in_use(), 0, "blocks leaked");
    assert_eq!(c.memory().total_bytes(), 0);
    let st = sched.stats();
    assert_eq!(st.kv_blocks_used, 0);
    assert_eq!(st.running + st.waiting, 0);
}

#[test]
fn arrivals_and_finishes_mid_batch_give_the_tokens_of_a_run_alone() {
    let model = tiny_model(rand::random());
    let mut rng = rand::thread_rng();
    for cache in [CacheConfig::F16, kivi_small()] {
        let config = EngineConfig {
            cache,
            max_batch_tokens: 48,
            max_running: 6,
            ..Default::default()
        };
        let mut sched = Scheduler::new(model.clone(), config).unwrap();
        let chunk = sched.prefill_chunk();
        let requests: Vec<Request> = (0..14)
            .map(|_| random_request(&mut rng, model.config.vocab, 120, 50))
            .collect();
        let arrivals: Vec<usize> = (0..14).map(|_| rng.gen_range(0..60)).collect();
        let got = drive(&mut sched, &requests, &arrivals, |_| None);
        for (i, (req, (toks, fin))) in requests.iter().zip(&got).enumerate() {
            assert_eq!(fin.reason, FinishReason::Length, "request {i}");
            assert_eq!(fin.generated_tokens, req.max_tokens);
            assert_eq!(fin.prompt_tokens, req.prompt.len());
            assert_eq!(
                toks,
                &alone(&model, &cache, req, chunk),
                "{cache:?} request {i}"
            );
        }
        assert_drained(&sched);
        let st = sched.stats();
        let prompt: usize = requests.iter().map(|r| r.prompt.len()).sum();
        let out: usize = requests.iter().map(|r| r.max_tokens).sum();
        assert_eq!(st.prompt_tokens_total, prompt as u64);
        assert_eq!(st.generated_tokens_total, out as u64);
        assert_eq!(st.requests_finished, 14);
    }
}

#[test]
fn seeded_sampling_and_stop_tokens_match_a_run_alone() {
    let model = tiny_model(rand::random());
    let mut rng = rand::thread_rng();
    let config = EngineConfig {
        cache: kivi_small(),
        max_batch_tokens: 40,
        max_running: 5,
        ..Default::default()
    };
    let mut sched = Scheduler::new(model.clone(), config.clone()).unwrap();
    let requests: Vec<Request> = (0..10)
        .map(|_| {
            let mut r = random_request(&mut rng, model.config.vocab, 60, 40);
            r.sampling = SamplingParams {
                temperature: rng.gen_range(0.5..1.5),
                top_k: rng.gen_range(0..20),
                top_p: rng.gen_range(0.7..1.0),
                seed: rng.gen(),
            };
            // Stop on a few tokens: some requests end with Stop.
            r.stop_tokens = (0..rng.gen_range(0..6))
                .map(|_| rng.gen_range(0..model.config.vocab as u32))
                .collect();
            r
        })
        .collect();
    let arrivals: Vec<usize> = (0..10).map(|_| rng.gen_range(0..30)).collect();
    let got = drive(&mut sched, &requests, &arrivals, |_| None);
    let mut stops = 0;
    for (req, (toks, fin)) in requests.iter().zip(&got) {
        let want = alone(&model, &config.cache, req, sched.prefill_chunk());
        assert_eq!(toks, &want);
        assert!(!toks.iter().any(|t| req.stop_tokens.contains(t)));
        if fin.reason == FinishReason::Stop {
            stops += 1;
            assert!(toks.len() < req.max_tokens);
        } else {
            assert_eq!(fin.reason, FinishReason::Length);
            assert_eq!(toks.len(), req.max_tokens);
        }
    }
    println!("{stops} of 10 requests stopped on a stop token");
    assert_drained(&sched);
}

#[test]
fn a_budget_too_small_for_the_batch_preempts_and_changes_no_token() {
    let model = tiny_model(rand::random());
    let mut rng = rand::thread_rng();
    for cache in [CacheConfig::F16, kivi_small()] {
        // Room for the fixed windows of a few sequences and a handful of blocks.
        let probe = Scheduler::new(
            model.clone(),
            EngineConfig {
                cache,
                ..Default::default()
            },
        )
        .unwrap();
        let c = probe.cache();
        let per_seq = c.blocks_for_tokens(400) as u64 * c.block_bytes() + c.seq_fixed_bytes();
        let budget = per_seq * 5 / 2;
        let config = EngineConfig {
            cache,
            kv_memory_bytes: Some(budget),
            max_batch_tokens: 64,
            max_running: 16,
            ..Default::default()
        };
        let mut sched = Scheduler::new(model.clone(), config).unwrap();
        let chunk = sched.prefill_chunk();
        // Prompts fit one 256-token block, and every request grows to 300..400 tokens (two
        // blocks): about 5 are admitted, at most 2.5 can finish side by side. All arrive at once.
        let requests: Vec<Request> = (0..10)
            .map(|_| {
                let p = rng.gen_range(20..200);
                Request {
                    prompt: random_prompt(&mut rng, p, model.config.vocab),
                    max_tokens: rng.gen_range(300..=400) - p,
                    sampling: SamplingParams::default(),
                    stop_tokens: vec![],
                }
            })
            .collect();
        let got = drive(&mut sched, &requests, &[0; 10], |_| None);
        let st = sched.stats();
        assert!(
            st.preemptions_total > 0,
            "{cache:?}: no preemption happened"
        );
        let per_request: u32 = got.iter().map(|(_, f)| f.preemptions).sum();
        assert_eq!(per_request as u64, st.preemptions_total);
        for (i, (req, (toks, fin))) in requests.iter().zip(&got).enumerate() {
            assert_eq!(fin.reason, FinishReason::Length);
            assert_eq!(
                toks,
                &alone(&model, &cache, req, chunk),
                "{cache:?} request {i} ({} preemptions)",
                fin.preemptions
            );
        }
        println!(
            "{cache:?}: budget {budget} B, {} preemptions, peak reserved {} B",
            st.preemptions_total,
            sched.peak_kv_reserved()
        );
        assert!(sched.peak_kv_reserved() <= budget);
        assert_drained(&sched);
    }
}

#[test]
fn cancelled_requests_free_their_blocks() {
    let model = tiny_model(rand::random());
    let mut rng = rand::thread_rng();
    let config = EngineConfig {
        cache: kivi_small(),
        max_batch_tokens: 64,
        max_running: 4,
        ..Default::default()
    };
    let mut sched = Scheduler::new(model.clone(), config).unwrap();
    let requests: Vec<Request> = (0..8)
        .map(|_| {
            let mut r = random_request(&mut rng, model.config.vocab, 100, 60);
            r.max_tokens = 60;
            r
        })
        .collect();
    // Cancel request 1 while it runs and request 7 while it waits (4 run at a time).
    let got = drive(&mut sched, &requests, &[0; 8], |step| match step {
        5 => Some(RequestId(1)),
        6 => Some(RequestId(7)),
        _ => None,
    });
    assert_eq!(got[1].1.reason, FinishReason::Cancelled);
    assert_eq!(got[7].1.reason, FinishReason::Cancelled);
    assert_eq!(got[7].0.len(), 0);
    for i in [0, 2, 3, 4, 5, 6] {
        assert_eq!(got[i].1.reason, FinishReason::Length, "request {i}");
    }
    assert_drained(&sched);
}

#[test]
fn engine_threads_batching_cancel_and_errors() {
    let model = tiny_model(rand::random());
    let mut rng = rand::thread_rng();
    let config = EngineConfig {
        cache: kivi_small(),
        max_batch_tokens: 64,
        max_running: 8,
        max_waiting: 64,
        ..Default::default()
    };
    let chunk = config.effective_limits().1;
    let engine = Engine::start(model.clone(), config.clone()).unwrap();
    let mut pending = Vec::new();
    for _ in 0..12 {
        let req = random_request(&mut rng, model.config.vocab, 150, 40);
        let (sink, rx) = channel_sink();
        engine.submit(req.clone(), sink).unwrap();
        pending.push((req, rx));
    }
    // A client that goes away after 3 tokens: no events after its sink said false.
    let (tx, gone_rx) = mpsc::channel();
    let mut seen = 0;
    let sink: Sink = Box::new(move |e| {
        seen += 1;
        tx.send(e).unwrap();
        seen < 3
    });
    let mut long = random_request(&mut rng, model.config.vocab, 20, 1);
    long.max_tokens = 500;
    engine.submit(long, sink).unwrap();
    // A request cancelled through the API.
    let (sink, cancel_rx) = channel_sink();
    let mut r = random_request(&mut rng, model.config.vocab, 20, 1);
    r.max_tokens = 900;
    let id = engine.submit(r, sink).unwrap();
    engine.cancel(id);

    for (req, rx) in pending {
        let (toks, fin) = collect(&rx);
        assert_eq!(fin.reason, FinishReason::Length);
        assert_eq!(toks, alone(&model, &config.cache, &req, chunk));
    }
    let (_, fin) = collect(&cancel_rx);
    assert_eq!(fin.reason, FinishReason::Cancelled);

    // Invalid requests.
    let vocab = model.config.vocab as u32;
    let ctx = model.config.context_len;
    let base = Request {
        prompt: vec![1, 2, 3],
        max_tokens: 4,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    };
    let invalid = [
        Request {
            prompt: vec![],
            ..base.clone()
        },
        Request {
            max_tokens: 0,
            ..base.clone()
        },
        Request {
            prompt: vec![1; ctx],
            ..base.clone()
        },
        Request {
            prompt: vec![1, vocab],
            ..base.clone()
        },
    ];
    for r in invalid {
        let e = engine.submit(r.clone(), Box::new(|_| true)).unwrap_err();
        assert!(matches!(e, SubmitError::Invalid(_)), "{e}");
        assert!(!e.to_string().is_empty());
    }
    engine.shutdown();
    let e = engine.submit(base, Box::new(|_| true)).unwrap_err();
    assert!(matches!(e, SubmitError::ShuttingDown));
    engine.shutdown(); // idempotent
    let events: Vec<Event> = gone_rx.try_iter().collect();
    assert_eq!(events.len(), 3, "no event after the sink returned false");
    assert!(events.iter().all(|e| matches!(e, Event::Token(_))));
    let s = engine.stats();
    assert_eq!(s.running + s.waiting, 0);
    assert_eq!(s.kv_blocks_used, 0);
    assert_eq!(s.requests_finished, 14);
}

#[test]
fn queue_full_and_prompt_larger_than_the_budget() {
    let model = tiny_model(rand::random());
    let probe = Scheduler::new(model.clone(), EngineConfig::default()).unwrap();
    let block = probe.cache().block_bytes();
    let config = EngineConfig {
        kv_memory_bytes: Some(4 * block),
        max_waiting: 3,
        max_running: 1,
        ..Default::default()
    };
    let engine = Engine::start(model.clone(), config).unwrap();
    // 4 f16 blocks = 2 layers x 2 blocks: 512 tokens at most.
    let big = Request {
        prompt: vec![1; 600],
        max_tokens: 1,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    };
    let e = engine.submit(big, Box::new(|_| true)).unwrap_err();
    assert!(matches!(e, SubmitError::Invalid(_)), "{e}");
    // A long request holds the only running slot; the queue fills behind it.
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let first = Request {
        prompt: vec![1; 10],
        max_tokens: 400,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    };
    // The sink blocks on the first token until the test has filled the queue.
    let mut waited = false;
    engine
        .submit(
            first,
            Box::new(move |_| {
                if !waited {
                    waited = true;
                    started_tx.send(()).unwrap();
                    let _ = gate_rx.recv();
                }
                true
            }),
        )
        .unwrap();
    // The first request runs (its sink is blocked on the engine thread): fill the queue.
    started_rx.recv().unwrap();
    assert_eq!(engine.stats().running, 1);
    let small = Request {
        prompt: vec![2; 5],
        max_tokens: 2,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    };
    let mut rxs = Vec::new();
    for _ in 0..3 {
        let (sink, rx) = channel_sink();
        engine.submit(small.clone(), sink).unwrap();
        rxs.push(rx);
    }
    let e = engine
        .submit(small.clone(), Box::new(|_| true))
        .unwrap_err();
    assert!(matches!(e, SubmitError::QueueFull(3)), "{e}");
    assert_eq!(e.to_string(), "the request queue is full (3 waiting)");
    gate_tx.send(()).unwrap();
    for rx in rxs {
        assert_eq!(collect(&rx).1.reason, FinishReason::Length);
    }
    engine.shutdown();
    assert_eq!(engine.stats().kv_blocks_used, 0);
}

/// The real SmolLM2 (Q4_1 weights: the Q8 activation kernels) when its file is here.
#[test]
fn smollm2_batch_equals_alone() {
    let cache_dir = match std::env::var_os("KIVI_CACHE").filter(|d| !d.is_empty()) {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/kivi"),
    };
    let path = cache_dir.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        println!("skipped: {} not found", path.display());
        return;
    }
    let model = Arc::new(kivi_model::loader::load(&path).unwrap().model);
    let mut rng = rand::thread_rng();
    let config = EngineConfig {
        cache: CacheConfig::Kivi(KiviConfig {
            residual_len: 32,
            ..KiviConfig::kivi2()
        }),
        max_batch_tokens: 48,
        max_running: 4,
        ..Default::default()
    };
    let mut sched = Scheduler::new(model.clone(), config.clone()).unwrap();
    let requests: Vec<Request> = (0..5)
        .map(|_| random_request(&mut rng, 2000, 70, 24))
        .collect();
    let arrivals: Vec<usize> = (0..5).map(|_| rng.gen_range(0..8)).collect();
    let got = drive(&mut sched, &requests, &arrivals, |_| None);
    for (req, (toks, _)) in requests.iter().zip(&got) {
        assert_eq!(
            toks,
            &alone(&model, &config.cache, req, sched.prefill_chunk())
        );
    }
    assert_drained(&sched);
}

#[test]
fn a_sequence_outgrowing_the_whole_budget_ends_with_length() {
    let model = tiny_model(rand::random());
    let mut rng = rand::thread_rng();
    let probe = Scheduler::new(model.clone(), EngineConfig::default()).unwrap();
    let c = probe.cache();
    // Two 256-token f16 blocks per layer: 512 tokens at most.
    let budget = c.blocks_for_tokens(300) as u64 * c.block_bytes();
    let config = EngineConfig {
        kv_memory_bytes: Some(budget),
        ..Default::default()
    };
    let mut sched = Scheduler::new(model.clone(), config.clone()).unwrap();
    let req = Request {
        prompt: random_prompt(&mut rng, 10, model.config.vocab),
        max_tokens: 800,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    };
    let got = drive(&mut sched, std::slice::from_ref(&req), &[0], |_| None);
    let (toks, fin) = &got[0];
    assert_eq!(fin.reason, FinishReason::Length);
    // 512 tokens stored: the prompt and 502 generated, the last one never fed.
    assert_eq!(toks.len(), 503);
    let want = alone(&model, &config.cache, &req, sched.prefill_chunk());
    assert_eq!(toks[..], want[..503]);
    assert_drained(&sched);
}

/// The CPU model behind the contract of a device runner: greedy items are answered with the token
/// id (argmax taken inside the runner, as the GPU does on the device), only sampled items get
/// logits, and the cache holds at most `slots` sequences (`add_sequence` fails beyond them).
/// With `device_sampling`, it also claims to sample on the device: `Some(true)` answers
/// `Want::Sample` items with the token the host sampler picks with the given draw, `Some(false)`
/// with the logits row (a runner's fallback).
struct SlotRunner {
    inner: kivi_model::runner::CpuRunner,
    slots: usize,
    greedy_answers: usize,
    device_sampling: Option<bool>,
    sample_answers: usize,
}

impl kivi_model::runner::Runner for SlotRunner {
    fn model_config(&self) -> &kivi_model::config::Config {
        self.inner.model_config()
    }
    fn cache_config(&self) -> &CacheConfig {
        self.inner.cache_config()
    }
    fn forward(
        &mut self,
        items: &[kivi_model::runner::StepItem<'_>],
    ) -> kivi_model::Result<Vec<kivi_model::runner::StepOutput>> {
        use kivi_model::runner::{StepOutput, Want};
        let out = self.inner.forward(items)?;
        Ok(items
            .iter()
            .zip(out)
            .map(|(it, o)| match (it.want, o) {
                (Want::Greedy, StepOutput::Logits(l)) => {
                    self.greedy_answers += 1;
                    StepOutput::Token(kivi_engine::sampler::argmax(&l))
                }
                (Want::Sample(spec), StepOutput::Logits(l))
                    if self.device_sampling == Some(true) =>
                {
                    self.sample_answers += 1;
                    let sampler = kivi_engine::sampler::Sampler::new(SamplingParams {
                        temperature: spec.temperature,
                        top_k: spec.top_k,
                        top_p: spec.top_p,
                        seed: 0, // unused: the draw is given
                    });
                    StepOutput::Token(sampler.sample_with(&l, spec.u))
                }
                (_, o) => o,
            })
            .collect())
    }
    fn samples_on_device(&self) -> bool {
        self.device_sampling.is_some()
    }
    fn add_sequence(&mut self) -> kivi_model::Result<kivi_core::SeqId> {
        if self.inner.n_sequences() >= self.slots {
            return Err(kivi_model::ModelError::Backend(
                "no free sequence slot".into(),
            ));
        }
        self.inner.add_sequence()
    }
    fn remove_sequence(&mut self, seq: kivi_core::SeqId) -> kivi_model::Result<()> {
        self.inner.remove_sequence(seq)
    }
    fn seq_len(&self, seq: kivi_core::SeqId) -> kivi_model::Result<usize> {
        self.inner.seq_len(seq)
    }
    fn max_sequences(&self) -> Option<usize> {
        Some(self.slots)
    }
    fn block_bytes(&self) -> u64 {
        self.inner.block_bytes()
    }
    fn blocks_in_use(&self) -> usize {
        self.inner.blocks_in_use()
    }
    fn free_blocks(&self) -> usize {
        self.inner.free_blocks()
    }
    fn blocks_for_tokens(&self, n: usize) -> usize {
        self.inner.blocks_for_tokens(n)
    }
    fn blocks_needed(&self, seq: kivi_core::SeqId, n: usize) -> kivi_model::Result<usize> {
        self.inner.blocks_needed(seq, n)
    }
    fn seq_fixed_bytes(&self) -> u64 {
        self.inner.seq_fixed_bytes()
    }
    fn n_sequences(&self) -> usize {
        self.inner.n_sequences()
    }
    fn trim_free_blocks(&mut self, keep: usize) {
        self.inner.trim_free_blocks(keep)
    }
    fn memory(&self) -> kivi_core::MemoryUsage {
        self.inner.memory()
    }
    fn memory_reserved(&self) -> kivi_core::MemoryUsage {
        self.inner.memory_reserved()
    }
}

#[test]
fn a_runner_with_token_answers_and_few_slots_gives_the_tokens_of_a_run_alone() {
    use kivi_model::runner::Runner;
    let model = tiny_model(rand::random());
    let mut rng = rand::thread_rng();
    // Sampled items: on the host; "on the device" (the draw passed to the runner, which
    // answers with the token); the runner claiming it but answering with the logits row.
    let modes = [
        (CacheConfig::F16, None),
        (kivi_small(), None),
        (kivi_small(), Some(true)),
        (CacheConfig::F16, Some(false)),
    ];
    for (cache, device_sampling) in modes {
        let slots = 3;
        let runner = SlotRunner {
            inner: kivi_model::runner::CpuRunner::new(model.clone(), &cache).unwrap(),
            slots,
            greedy_answers: 0,
            device_sampling,
            sample_answers: 0,
        };
        // More running sequences allowed than slots: admission must wait for a slot.
        let config = EngineConfig {
            cache,
            max_batch_tokens: 40,
            max_running: 6,
            ..Default::default()
        };
        let mut sched = Scheduler::with_runner(runner, config);
        let chunk = sched.prefill_chunk();
        let n = 9;
        let requests: Vec<Request> = (0..n)
            .map(|i| {
                let mut r = random_request(&mut rng, model.config.vocab, 80, 30);
                if i % 4 == 1 {
                    r.sampling = SamplingParams {
                        temperature: 0.9,
                        top_k: 20,
                        top_p: 0.9,
                        seed: rng.gen(),
                    };
                }
                r
            })
            .collect();
        let arrivals: Vec<usize> = (0..n).map(|_| rng.gen_range(0..30)).collect();
        let mut rxs: Vec<Option<mpsc::Receiver<Event>>> = (0..n).map(|_| None).collect();
        let mut step = 0;
        loop {
            for i in 0..n {
                if arrivals[i] == step {
                    sched.validate(&requests[i]).unwrap();
                    let (sink, rx) = channel_sink();
                    sched.add(
                        RequestId(i as u64),
                        requests[i].clone(),
                        sink,
                        Instant::now(),
                    );
                    rxs[i] = Some(rx);
                }
            }
            let busy = sched.step();
            assert!(sched.runner().n_sequences() <= slots);
            step += 1;
            if !busy && step > 30 {
                break;
            }
            assert!(step < 100_000, "the scheduler does not finish");
        }
        for (i, (req, rx)) in requests.iter().zip(rxs).enumerate() {
            let (toks, fin) = collect(&rx.unwrap());
            assert_eq!(fin.reason, FinishReason::Length, "{cache:?} request {i}");
            assert_eq!(
                toks,
                alone(&model, &cache, req, chunk),
                "{cache:?} request {i}"
            );
        }
        assert!(sched.is_idle());
        let runner = sched.into_runner();
        assert!(runner.greedy_answers > 0);
        assert_eq!(runner.sample_answers > 0, device_sampling == Some(true));
        assert_eq!(runner.n_sequences(), 0);
        assert_eq!(runner.blocks_in_use(), 0);
    }
}

#[test]
fn an_engine_from_a_runner_factory_recovers_from_a_panic_with_a_fresh_runner() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let model = tiny_model(rand::random());
    let mut rng = rand::thread_rng();
    let config = EngineConfig {
        cache: kivi_small(),
        kv_memory_bytes: Some(64 << 20),
        max_batch_tokens: 64,
        max_running: 4,
        ..Default::default()
    };
    let chunk = config.effective_limits().1;
    let made = Arc::new(AtomicUsize::new(0));
    let (m, cache, count) = (model.clone(), config.cache, made.clone());
    let engine = Engine::start_with(
        move || {
            count.fetch_add(1, Ordering::SeqCst);
            kivi_model::runner::CpuRunner::new(m.clone(), &cache)
        },
        config,
    )
    .unwrap();
    assert_eq!(made.load(Ordering::SeqCst), 1);
    assert_eq!(engine.model_config().vocab, model.config.vocab);
    // A sink that panics on its first token: the engine ends the request with an error.
    let (tx, rx) = mpsc::channel();
    let bad = random_request(&mut rng, model.config.vocab, 40, 10);
    let sink: Sink = Box::new(move |e: Event| {
        let token = matches!(e, Event::Token(_));
        let _ = tx.send(e);
        assert!(!token, "a sink panicking on purpose");
        true
    });
    engine.submit(bad, sink).unwrap();
    let (toks, fin) = collect(&rx);
    assert_eq!(toks.len(), 1);
    assert!(matches!(fin.reason, FinishReason::Error(_)), "{fin:?}");
    // The next request runs on a new runner and gives the tokens of a run alone.
    let req = random_request(&mut rng, model.config.vocab, 60, 20);
    let (sink, rx) = channel_sink();
    engine.submit(req.clone(), sink).unwrap();
    let (toks, fin) = collect(&rx);
    assert_ne!(fin.reason, FinishReason::Cancelled);
    assert_eq!(toks, alone(&model, &kivi_small(), &req, chunk));
    assert_eq!(made.load(Ordering::SeqCst), 2);
    assert_eq!(engine.stats().kv_blocks_used, 0);
    engine.shutdown();
}

/// A client that has its answer reads stats that include the request's end (the server's
/// /metrics right after a response): the stats are published before the Finished event.
#[test]
fn stats_after_finished_show_the_request_freed() {
    let model = tiny_model(rand::random());
    let mut rng = rand::thread_rng();
    let config = EngineConfig {
        cache: kivi_small(),
        kv_memory_bytes: Some(64 << 20),
        ..Default::default()
    };
    let engine = Engine::start(model.clone(), config).unwrap();
    let vocab = model.config.vocab;
    for done in 1..=20u64 {
        let len = rng.gen_range(1..40);
        let request = Request {
            prompt: random_prompt(&mut rng, len, vocab),
            max_tokens: rng.gen_range(1..12),
            sampling: SamplingParams::default(),
            stop_tokens: vec![],
        };
        let (sink, rx) = channel_sink();
        engine.submit(request, sink).unwrap();
        collect(&rx);
        let s = engine.stats();
        assert_eq!((s.running, s.waiting), (0, 0), "request {done}");
        assert_eq!(s.kv_blocks_used, 0, "request {done}");
        assert_eq!(s.requests_finished, done);
    }
    engine.shutdown();
}
