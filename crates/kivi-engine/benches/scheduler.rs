//! Host time of one continuous-batching step, without a model: a [`Runner`] that answers every
//! pass at once (greedy token 1) and keeps only sequence lengths. On a GPU the step's host work
//! (admission, batch assembly, token delivery, stop checks) runs while the device waits for
//! the next pass, so this time adds to every decode step of `kivi bench throughput`.
//!
//! `cargo bench -p kivi-engine --bench scheduler`

use std::collections::HashMap;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kivi_core::{CacheConfig, MemoryUsage, SeqId};
use kivi_engine::engine::{EngineConfig, Request, RequestId, Scheduler};
use kivi_engine::sampler::SamplingParams;
use kivi_model::config::Config;
use kivi_model::runner::{Runner, StepItem, StepOutput, Want};

struct InstantRunner {
    config: Config,
    cache: CacheConfig,
    lens: HashMap<SeqId, usize>,
    next: u64,
}

impl Runner for InstantRunner {
    fn model_config(&self) -> &Config {
        &self.config
    }
    fn cache_config(&self) -> &CacheConfig {
        &self.cache
    }
    fn forward(&mut self, items: &[StepItem<'_>]) -> kivi_model::Result<Vec<StepOutput>> {
        Ok(items
            .iter()
            .map(|it| {
                *self.lens.entry(it.seq).or_default() += it.tokens.len();
                match it.want {
                    Want::Nothing => StepOutput::Nothing,
                    Want::Greedy | Want::Logits | Want::Sample(_) => StepOutput::Token(1),
                }
            })
            .collect())
    }
    fn add_sequence(&mut self) -> kivi_model::Result<SeqId> {
        self.next += 1;
        self.lens.insert(SeqId(self.next), 0);
        Ok(SeqId(self.next))
    }
    fn remove_sequence(&mut self, seq: SeqId) -> kivi_model::Result<()> {
        self.lens.remove(&seq);
        Ok(())
    }
    fn seq_len(&self, seq: SeqId) -> kivi_model::Result<usize> {
        Ok(self.lens.get(&seq).copied().unwrap_or(0))
    }
    fn max_sequences(&self) -> Option<usize> {
        None
    }
    fn block_bytes(&self) -> u64 {
        1
    }
    fn blocks_in_use(&self) -> usize {
        0
    }
    fn free_blocks(&self) -> usize {
        0
    }
    fn blocks_for_tokens(&self, _: usize) -> usize {
        0
    }
    fn blocks_needed(&self, _: SeqId, _: usize) -> kivi_model::Result<usize> {
        Ok(0)
    }
    fn seq_fixed_bytes(&self) -> u64 {
        0
    }
    fn n_sequences(&self) -> usize {
        self.lens.len()
    }
    fn trim_free_blocks(&mut self, _: usize) {}
    fn memory(&self) -> MemoryUsage {
        MemoryUsage::default()
    }
    fn memory_reserved(&self) -> MemoryUsage {
        MemoryUsage::default()
    }
}

/// A scheduler with `batch` sequences past their 161-token prompts, decoding.
fn decoding(batch: usize) -> Scheduler<InstantRunner> {
    let runner = InstantRunner {
        config: kivi_model::random::preset("llama2-7b").expect("preset"),
        cache: CacheConfig::F16,
        lens: HashMap::new(),
        next: 0,
    };
    let config = EngineConfig {
        max_running: batch,
        max_waiting: batch,
        max_batch_tokens: batch + 2048,
        prefill_chunk: 2048,
        ..EngineConfig::default()
    };
    let mut s = Scheduler::with_runner(runner, config);
    for i in 0..batch {
        let request = Request {
            prompt: vec![1; 161],
            // Inside Llama-2's 4096-token context: requests keep decoding for 3000 steps.
            max_tokens: 3900,
            sampling: SamplingParams::default(),
            stop_tokens: Vec::new(),
        };
        s.add(
            RequestId(i as u64),
            request,
            Box::new(|_| true),
            Instant::now(),
        );
    }
    // Prefill passes until every sequence decodes.
    while s.n_waiting() > 0 || s.stats().prompt_tokens_total < 161 * batch as u64 {
        s.step();
    }
    s
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler_step_decode");
    g.sample_size(20);
    for batch in [256, 1024] {
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            // A fresh batch every 3000 steps, before any request finishes.
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let mut s = decoding(batch);
                    let n = left.min(3000);
                    let t = Instant::now();
                    for _ in 0..n {
                        assert!(s.step(), "the batch stopped decoding");
                    }
                    total += t.elapsed();
                    left -= n;
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
