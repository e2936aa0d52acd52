//! Weight matmul on SmolLM2-135M shapes (hidden 576, kv 192, ffn 1536, vocab 49152; Q4_1
//! layers, Q8_0 tied output), random ggml blocks. Variants measured in the same run:
//! every `KernelPath` (Q8-activation integer dot products) and `f32-dequant` (weights
//! dequantized to f32 at load, AVX2 FMA kernel). Also one whole decode token (30 layers +
//! output) and a 64-token prefill chunk.
//!
//!   CARGO_TARGET_DIR=... cargo bench -p kivi-model --bench matmul [-- filter]
//!
//! n = 1 reports weight GiB/s; n = 64 reports "elements/s" = FLOP/s (2 per multiply-add).

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use kivi_model::matrix::{dequantize, KernelPath, Matrix};
use kivi_model::tensor::{DType, RawTensor, Storage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 576;
const KV: usize = 192;
const FFN: usize = 1536;
const VOCAB: usize = 49152;
const LAYERS: usize = 30;

fn random_tensor(rng: &mut StdRng, dtype: DType, rows: usize, cols: usize) -> RawTensor {
    let bb = dtype.block_bytes();
    let n = rows * cols / dtype.block_size();
    let mut b: Vec<u8> = (0..n * bb).map(|_| rng.gen()).collect();
    for blk in b.chunks_exact_mut(bb) {
        let d = f16::from_f32(rng.gen_range(0.001..0.02))
            .to_bits()
            .to_le_bytes();
        blk[..2].copy_from_slice(&d);
        if dtype == DType::Q4_1 {
            let m = f16::from_f32(rng.gen_range(-0.2..0.0))
                .to_bits()
                .to_le_bytes();
            blk[2..4].copy_from_slice(&m);
        }
    }
    RawTensor {
        name: "w".into(),
        dtype,
        shape: vec![rows, cols],
        data: Storage::Owned(Arc::new(b)),
    }
}

fn paths() -> Vec<(String, KernelPath)> {
    KernelPath::available()
        .into_iter()
        .map(|p| (format!("{p:?}"), p))
        .collect()
}

fn shapes(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let cases = [
        ("q4_1_576x576", DType::Q4_1, HIDDEN, HIDDEN),
        ("q4_1_576to192", DType::Q4_1, KV, HIDDEN),
        ("q4_1_576to1536", DType::Q4_1, FFN, HIDDEN),
        ("q4_1_1536to576", DType::Q4_1, HIDDEN, FFN),
        ("q8_0_576to49152", DType::Q8_0, VOCAB, HIDDEN),
    ];
    for n in [1usize, 64] {
        let mut g = c.benchmark_group(format!("matmul_n{n}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        for (name, dtype, rows, cols) in cases {
            let t = random_tensor(&mut rng, dtype, rows, cols);
            let wf = Matrix::from_f32("wf", rows, cols, dequantize(&t).unwrap());
            let m = Matrix::from_raw(t).unwrap();
            let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut out = vec![0.0; n * rows];
            g.throughput(if n == 1 {
                Throughput::Bytes(m.n_bytes() as u64)
            } else {
                Throughput::Elements(2 * (rows * cols * n) as u64)
            });
            for (pname, p) in paths() {
                if p == KernelPath::Scalar && n * rows * cols > 64 * HIDDEN * FFN {
                    continue; // too slow to be interesting
                }
                g.bench_function(BenchmarkId::new(name, &pname), |b| {
                    b.iter(|| m.matmul_with(p, &x, n, &mut out))
                });
            }
            g.bench_function(BenchmarkId::new(name, "f32-dequant"), |b| {
                b.iter(|| wf.matmul(&x, n, &mut out))
            });
        }
        g.finish();
    }
}

/// One layer's weights: q, k, v, o, gate, up, down (rows, cols).
const LAYER: [(usize, usize); 7] = [
    (HIDDEN, HIDDEN),
    (KV, HIDDEN),
    (KV, HIDDEN),
    (HIDDEN, HIDDEN),
    (FFN, HIDDEN),
    (FFN, HIDDEN),
    (HIDDEN, FFN),
];

fn whole_model(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(2);
    let layers: Vec<Matrix> = (0..LAYERS)
        .flat_map(|_| LAYER.iter().map(|&(r, cc)| (r, cc)).collect::<Vec<_>>())
        .map(|(r, cc)| Matrix::from_raw(random_tensor(&mut rng, DType::Q4_1, r, cc)).unwrap())
        .collect();
    let output = Matrix::from_raw(random_tensor(&mut rng, DType::Q8_0, VOCAB, HIDDEN)).unwrap();
    let bytes: usize = layers.iter().map(|m| m.n_bytes()).sum::<usize>() + output.n_bytes();
    let mut g = c.benchmark_group("smollm2_matmuls");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in [1usize, 64] {
        let x: Vec<f32> = (0..n * FFN).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut out = vec![0.0; n * VOCAB];
        g.throughput(if n == 1 {
            Throughput::Bytes(bytes as u64)
        } else {
            Throughput::Elements(n as u64)
        });
        for (pname, p) in paths() {
            if p == KernelPath::Scalar && n > 1 {
                continue;
            }
            let label = if n == 1 {
                "decode_token"
            } else {
                "prefill64_no_output"
            };
            g.bench_function(BenchmarkId::new(label, &pname), |b| {
                b.iter(|| {
                    for m in &layers {
                        m.matmul_with(p, &x[..n * m.cols], n, &mut out[..n * m.rows]);
                    }
                    if n == 1 {
                        output.matmul_with(p, &x[..HIDDEN], 1, &mut out[..VOCAB]);
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, shapes, whole_model);
criterion_main!(benches);
