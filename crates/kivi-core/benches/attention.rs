//! Decode attention (one new token per sequence) over a stored sequence: f16 cache vs KIVI-2 vs
//! KIVI-4, for the SmolLM2 shape (9 query heads, 3 KV heads, head_dim 64) and the Llama-2-7B
//! shape (32/32/128), at 1K, 4K and 16K stored tokens. Throughput is the bytes of cache the
//! attention reads (`KvCache::memory().total_bytes()` of the one layer). A streaming-read group
//! gives the machine's memory bandwidth for context.
//!
//! Run: `cargo bench -p kivi-core --bench attention` (KIVI_FORCE_SCALAR=1 / KIVI_ISA=avx2 to
//! measure the other paths).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kivi_core::{new_cache, CacheConfig, CacheShape, KiviConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

struct Shape {
    name: &'static str,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "smollm2",
        n_head: 9,
        n_kv_head: 3,
        head_dim: 64,
    },
    Shape {
        name: "llama2-7b",
        n_head: 32,
        n_kv_head: 32,
        head_dim: 128,
    },
];
const LENS: [usize; 3] = [1024, 4096, 16384];

fn kv_like(r: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i % 61) as f32 * 0.05 - 1.5) + r.gen_range(-1.0f32..1.0))
        .collect()
}

fn decode_attention(c: &mut Criterion) {
    let configs = [
        ("f16", CacheConfig::F16),
        ("kivi2", CacheConfig::Kivi(KiviConfig::kivi2())),
        ("kivi4", CacheConfig::Kivi(KiviConfig::kivi4())),
    ];
    for s in &SHAPES {
        let mut group = c.benchmark_group(format!("decode_attention/{}", s.name));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        let row = s.n_kv_head * s.head_dim;
        let mut r = StdRng::seed_from_u64(1);
        let max = *LENS.last().unwrap();
        let k = kv_like(&mut r, (max + 1) * row);
        let v = kv_like(&mut r, (max + 1) * row);
        let q: Vec<f32> = (0..s.n_head * s.head_dim)
            .map(|_| r.gen_range(-0.3f32..0.3))
            .collect();
        for &t in &LENS {
            for (name, cfg) in &configs {
                let shape = CacheShape {
                    n_layer: 1,
                    n_kv_head: s.n_kv_head,
                    head_dim: s.head_dim,
                };
                let mut cache = new_cache(cfg, shape).unwrap();
                let seq = cache.add_sequence();
                cache.append(0, seq, &k[..t * row], &v[..t * row]).unwrap();
                let bytes = cache.memory().total_bytes();
                group.throughput(Throughput::Bytes(bytes));
                let (kn, vn) = (&k[t * row..(t + 1) * row], &v[t * row..(t + 1) * row]);
                let mut out = vec![0f32; q.len()];
                group.bench_function(BenchmarkId::new(*name, t), |b| {
                    b.iter(|| {
                        cache
                            .attend(0, s.n_head, seq, black_box(&q), kn, vn, &mut out)
                            .unwrap();
                        black_box(&out);
                    })
                });
            }
        }
        group.finish();
    }
}

/// All 30 layers of SmolLM2-135M at 16K tokens, one decode step (the realistic case: the f16
/// cache of all layers, 378 MB, no longer fits the last-level cache; one layer's 12.6 MB does).
fn decode_attention_all_layers(c: &mut Criterion) {
    let s = &SHAPES[0];
    let (n_layer, t) = (30, 16384);
    let configs = [
        ("f16", CacheConfig::F16),
        ("kivi2", CacheConfig::Kivi(KiviConfig::kivi2())),
        ("kivi4", CacheConfig::Kivi(KiviConfig::kivi4())),
    ];
    let mut group = c.benchmark_group("decode_attention_30_layers/smollm2");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    let row = s.n_kv_head * s.head_dim;
    let mut r = StdRng::seed_from_u64(2);
    let k = kv_like(&mut r, (t + 1) * row);
    let v = kv_like(&mut r, (t + 1) * row);
    let q: Vec<f32> = (0..s.n_head * s.head_dim)
        .map(|_| r.gen_range(-0.3f32..0.3))
        .collect();
    for (name, cfg) in &configs {
        let shape = CacheShape {
            n_layer,
            n_kv_head: s.n_kv_head,
            head_dim: s.head_dim,
        };
        let mut cache = new_cache(cfg, shape).unwrap();
        let seq = cache.add_sequence();
        for layer in 0..n_layer {
            cache
                .append(layer, seq, &k[..t * row], &v[..t * row])
                .unwrap();
        }
        group.throughput(Throughput::Bytes(cache.memory().total_bytes()));
        let (kn, vn) = (&k[t * row..], &v[t * row..]);
        let mut out = vec![0f32; q.len()];
        group.bench_function(BenchmarkId::new(*name, t), |b| {
            b.iter(|| {
                for layer in 0..n_layer {
                    cache
                        .attend(layer, s.n_head, seq, black_box(&q), kn, vn, &mut out)
                        .unwrap();
                }
                black_box(&out);
            })
        });
    }
    group.finish();
}

/// Streaming read of 1 GiB of u64 (sum), one thread and all threads.
fn memory_bandwidth(c: &mut Criterion) {
    let n = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut group = c.benchmark_group("memory_bandwidth");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes((n * 8) as u64));
    group.bench_function("read_1GiB/1thread", |b| {
        b.iter(|| black_box(buf.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
    });
    group.bench_function("read_1GiB/all_threads", |b| {
        b.iter(|| {
            black_box(
                buf.par_chunks(1 << 20)
                    .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                    .reduce(|| 0, u64::wrapping_add),
            )
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    decode_attention,
    decode_attention_all_layers,
    memory_bandwidth
);
criterion_main!(benches);
