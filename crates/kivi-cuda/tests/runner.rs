//! The continuous-batching scheduler driving the GPU model (`GpuRunner`), against the CPU model
//! on the same f16 random weights.
//!
//! Requests arrive and finish mid-batch, more of them than the cache has sequence slots (they
//! queue). Every greedy token the GPU batch produced is checked against the CPU: the CPU
//! replays the sequence alone with the same chunk boundaries, fed the GPU's tokens (teacher
//! forcing), and where its top-2 logit margin is clear (> 2 % of the top logit, far above the
//! f16 rounding of the GPU's GEMM inputs) the GPU's token must be the CPU's argmax. A sampled
//! request exercises sampling on the GPU (the default) with the f16 cache and the logits copied
//! back to the host sampler with the KIVI caches. Half the requests arrive together and outgrow the block
//! pool while decoding, so sequences are preempted and recomputed (asserted for f16) and their
//! tokens are checked the same way. Afterwards the cache holds no sequence and no block.
//! Without a CUDA device the test prints `skipped: no CUDA device` and passes.

use std::sync::mpsc;
use std::time::Instant;

use kivi_core::{new_cache, CacheConfig, KiviConfig};
use kivi_cuda::{CudaBackend, Gpu, GpuCache, GpuRunner};
use kivi_engine::engine::{Event, FinishReason, Finished, Request, RequestId, Scheduler};
use kivi_engine::{EngineConfig, SamplingParams};
use kivi_model::config::Config;
use kivi_model::llama::{Llama, Logits, Model, Naming};
use kivi_model::random::{preset, RandomWeights};
use kivi_model::runner::{cache_shape, Runner};
use kivi_model::tensor::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn small_config() -> Config {
    let mut c = preset("smollm2-135m").unwrap();
    c.n_layer = 4;
    c.vocab = 4096;
    c
}

fn argmax(l: &[f32]) -> u32 {
    (0..l.len())
        .max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a)))
        .unwrap() as u32
}

/// Feeds the GPU's tokens to the CPU model alone (prompt in `chunk`-token chunks, then one token
/// per step) and checks each GPU token where the CPU's margin is clear. Returns the tokens
/// compared.
fn check_against_cpu(
    cpu: &Model,
    cache: &CacheConfig,
    prompt: &[u32],
    got: &[u32],
    chunk: usize,
    what: &str,
) -> usize {
    let mut c = new_cache(cache, cache_shape(&cpu.config)).unwrap();
    let seq = c.add_sequence();
    let mut logits = Vec::new();
    for part in prompt.chunks(chunk) {
        logits = cpu.forward(part, &mut *c, seq, Logits::Last).unwrap();
    }
    let mut compared = 0;
    for (j, &tok) in got.iter().enumerate() {
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let margin = sorted[0] - sorted[1];
        if margin > 0.02 * sorted[0].abs().max(1.0) {
            assert_eq!(
                tok,
                argmax(&logits),
                "{what} token {j}: GPU {tok}, CPU {} (margin {margin})",
                argmax(&logits)
            );
            compared += 1;
        }
        logits = cpu.forward(&[tok], &mut *c, seq, Logits::Last).unwrap();
    }
    compared
}

#[test]
fn gpu_scheduler_matches_cpu_with_arrivals_and_finishes_mid_batch() {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            return;
        }
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let config = small_config();
    let src = RandomWeights::new(&config, DType::F16, rng.gen()).unwrap();
    let cpu = Model::load(&src, Naming::Gguf, config.clone()).unwrap();
    let gpu_model = Llama::load_on(
        CudaBackend::new(gpu.clone()).unwrap(),
        &src,
        Naming::Gguf,
        config.clone(),
    )
    .unwrap();
    let vocab = config.vocab as u32;
    for cache in [
        CacheConfig::F16,
        CacheConfig::Kivi(KiviConfig::default()),
        CacheConfig::Kivi(KiviConfig {
            k_bits: 4,
            v_bits: 4,
            residual_len: 32,
            ..KiviConfig::default()
        }),
    ] {
        // 4 sequence slots, and a pool of blocks for about 2.5 sequences of 200 tokens: the
        // budget runs out before the slots do, so admission waits and sequences are preempted.
        let slots = 4;
        let probe = GpuCache::new(gpu.clone(), cache, cache_shape(&config), 1, 1).unwrap();
        let blocks = probe.blocks_for_tokens(200) * 5 / 2;
        let budget = blocks as u64 * probe.block_bytes();
        let windows = slots as u64 * probe.window_bytes_per_seq();
        drop(probe);
        let gcache = GpuCache::with_budget(
            gpu.clone(),
            cache,
            cache_shape(&config),
            windows + budget,
            slots,
        )
        .unwrap();
        assert_eq!(gcache.pool_blocks(), blocks);
        let mut runner = GpuRunner::new(&gpu_model, gcache);
        runner.set_device_sampling(cache == CacheConfig::F16);
        // More running sequences allowed than the cache has slots: admission must wait.
        let econf = EngineConfig {
            cache,
            kv_memory_bytes: Some(budget),
            max_running: 6,
            max_batch_tokens: 64,
            ..Default::default()
        };
        let mut sched = Scheduler::with_runner(runner, econf);
        let chunk = sched.prefill_chunk();
        let n = 10;
        let requests: Vec<Request> = (0..n)
            .map(|i| {
                // Even requests cross a 128-token block boundary while decoding, so running
                // sequences outgrow the pool and some are preempted (recomputed later).
                let (p, max_tokens) = if i % 2 == 0 {
                    (rng.gen_range(100..128), rng.gen_range(30..=50))
                } else {
                    (rng.gen_range(1..150), rng.gen_range(1..=50))
                };
                Request {
                    prompt: (0..p).map(|_| rng.gen_range(0..vocab)).collect(),
                    max_tokens,
                    sampling: if i == 3 {
                        SamplingParams {
                            temperature: 0.8,
                            top_k: 40,
                            top_p: 0.95,
                            seed: 7,
                        }
                    } else {
                        SamplingParams::default()
                    },
                    stop_tokens: vec![],
                }
            })
            .collect();
        // The even requests arrive together: 4 of them fill the slots with one block each, and
        // crossing 128 tokens each needs a second block while the pool has one left.
        let arrivals: Vec<usize> = (0..n)
            .map(|i| if i % 2 == 0 { 0 } else { rng.gen_range(0..40) })
            .collect();
        let mut rxs: Vec<Option<mpsc::Receiver<Event>>> = (0..n).map(|_| None).collect();
        let mut step = 0;
        let mut max_seqs = 0;
        loop {
            for i in 0..n {
                if arrivals[i] == step {
                    sched.validate(&requests[i]).unwrap();
                    let (tx, rx) = mpsc::channel();
                    let sink = Box::new(move |e| tx.send(e).is_ok());
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
            max_seqs = max_seqs.max(sched.runner().n_sequences());
            step += 1;
            if !busy && step > 40 {
                break;
            }
            assert!(step < 10_000, "the scheduler does not finish");
        }
        assert!(max_seqs <= slots, "{max_seqs} sequences in {slots} slots");
        let mut compared = 0;
        let mut total = 0;
        for (i, (req, rx)) in requests.iter().zip(rxs).enumerate() {
            let events: Vec<Event> = rx.unwrap().try_iter().collect();
            let (last, toks) = events.split_last().expect("a Finished event");
            let toks: Vec<u32> = toks
                .iter()
                .map(|e| match e {
                    Event::Token(t) => *t,
                    e => panic!("request {i}: unexpected {e:?}"),
                })
                .collect();
            let Event::Finished(Finished { reason, .. }) = last else {
                panic!("request {i}: last event {last:?}");
            };
            assert_eq!(*reason, FinishReason::Length, "{cache:?} request {i}");
            assert_eq!(toks.len(), req.max_tokens, "{cache:?} request {i}");
            assert!(toks.iter().all(|&t| t < vocab));
            if req.sampling.temperature > 0.0 {
                continue;
            }
            let what = format!("{cache:?} request {i}");
            compared += check_against_cpu(&cpu, &cache, &req.prompt, &toks, chunk, &what);
            total += toks.len();
        }
        eprintln!("{cache:?}: {compared}/{total} greedy tokens had a clear CPU margin and matched");
        assert!(
            compared >= total / 4,
            "{cache:?}: only {compared}/{total} tokens compared"
        );
        let r = sched.runner();
        assert!(sched.is_idle());
        assert_eq!(r.n_sequences(), 0, "{cache:?}: sequences left");
        assert_eq!(r.blocks_in_use(), 0, "{cache:?}: blocks leaked");
        assert_eq!(sched.stats().requests_finished, n as u64);
        let preemptions = sched.stats().preemptions_total;
        eprintln!("{cache:?}: {preemptions} preemptions");
        // With f16 every token takes pool blocks, so the even requests must have outgrown the
        // pool (KIVI keeps its window's tokens outside the pool: it may or may not run out).
        if cache == CacheConfig::F16 {
            assert!(preemptions > 0, "{cache:?}: the pool never ran out");
        }
    }
}
