//! Host time of picking one token from a logits row: greedy, temperature only, top-p, top-k +
//! top-p, at the vocabularies of Llama 2 (32000), SmolLM2 (49152) and Qwen2 (151936). On a GPU
//! every sampled sequence's row is sampled on the host each step, so at batch B this time is
//! paid B times per step (in parallel over sequences: see the engine).
//!
//! Against, in the same run, the previous sampler (`sort_all`: the whole vocabulary sorted by
//! logit whenever top-k does not cut it; greedy: a one-pass argmax carrying the index).
//!
//! `cargo bench -p kivi-engine --bench sampler`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kivi_engine::sampler::{Sampler, SamplingParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Logits shaped like a language model's: a few large values over a long tail.
fn lm_logits(vocab: usize, seed: u64) -> Vec<f32> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..vocab)
        .map(|_| {
            let x: f32 = r.gen_range(-4.0..4.0);
            if r.gen_bool(0.001) {
                x + 12.0
            } else {
                x
            }
        })
        .collect()
}

/// The argmax before it became two vectorisable passes (commit 5d0b0f6).
fn argmax_one_pass(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The sampler before it stopped sorting what the cuts cannot keep (commit 5d0b0f6).
fn sort_all(p: SamplingParams, rng: &mut StdRng, logits: &[f32]) -> u32 {
    if p.temperature <= 0.0 || p.top_k == 1 {
        return argmax_one_pass(logits);
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = if p.top_k == 0 {
        logits.len()
    } else {
        p.top_k.min(logits.len())
    };
    let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_logit_desc);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_logit_desc);
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f32> = idx
        .iter()
        .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
        .collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= sum);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, &pr) in probs.iter().enumerate() {
            acc += pr;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut r = rng.gen::<f32>() * total;
    for (i, &pr) in probs.iter().enumerate() {
        r -= pr;
        if r <= 0.0 {
            return idx[i];
        }
    }
    idx[probs.len() - 1]
}

fn bench(c: &mut Criterion) {
    let cases = [
        ("greedy", 0.0, 0, 1.0),
        ("temperature", 0.8, 0, 1.0),
        ("top_p_0.95", 0.8, 0, 0.95),
        ("top_k_40_top_p_0.9", 0.7, 40, 0.9),
    ];
    let mut g = c.benchmark_group("sample");
    for vocab in [32000usize, 49152, 151936] {
        let logits = lm_logits(vocab, vocab as u64);
        for &(name, temperature, top_k, top_p) in &cases {
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                seed: 1,
            };
            let mut s = Sampler::new(params);
            g.bench_with_input(BenchmarkId::new(name, vocab), &logits, |b, l| {
                b.iter(|| s.sample(l))
            });
            let mut rng = StdRng::seed_from_u64(1);
            let id = BenchmarkId::new(format!("{name}/sort_all"), vocab);
            g.bench_with_input(id, &logits, |b, l| b.iter(|| sort_all(params, &mut rng, l)));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
