//! The continuous-batching engine against independent references: a request's tokens in a busy
//! batch (others arriving, finishing, preempted) equal its tokens run alone through `Session`
//! (the one-sequence generation loop); the block pool returns to empty; budget exhaustion
//! queues and preempts instead of failing; submit errors.

use std::sync::mpsc;
use std::sync::Arc;

use kivi_core::{CacheConfig, KiviConfig};
use kivi_engine::engine::Sink;
use kivi_engine::{
    Engine, EngineConfig, Event, FinishReason, Finished, GenerateParams, Request, SamplingParams,
    Session,
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

#[test]
fn engine_batch_equals_alone_basic() {
    let model = tiny_model(rand::random());
    let mut rng = rand::thread_rng();
    let config = EngineConfig {
        max_batch_tokens: 64,
        max_running: 8,
        ..Default::default()
    };
    let chunk = config.effective_limits().1;
    let engine = Engine::start(model.clone(), config.clone()).unwrap();
    let mut pending = Vec::new();
    for _ in 0..12 {
        let len = rng.gen_range(1..150);
        let req = Request {
            prompt: random_prompt(&mut rng, len, model.config.vocab),
            max_tokens: rng.gen_range(1..40),
            sampling: SamplingParams::default(),
            stop_tokens: vec![],
        };
        let (sink, rx) = channel_sink();
        engine.submit(req.clone(), sink).unwrap();
        pending.push((req, rx));
    }
    for (req, rx) in pending {
        let (toks, fin) = collect(&rx);
        assert_eq!(fin.reason, FinishReason::Length);
        assert_eq!(toks, alone(&model, &config.cache, &req, chunk));
    }
    engine.shutdown();
    let s = engine.stats();
    assert_eq!(s.running + s.waiting, 0);
    assert_eq!(s.kv_blocks_used, 0);
    let _ = KiviConfig::default();
}
