//! Weight matmul on SmolLM2-135M shapes (hidden 576, kv 192, ffn 1536, vocab 49152; Q4_1
//! layers, Q8_0 tied output), random ggml blocks. Variants measured in the same run:
//! every `KernelPath` (Q8-activation integer dot products) and `f32-dequant` (weights
//! dequantized to f32 at load, AVX2 FMA kernel). Also one whole decode token (30 layers +
//! output) and a 64-token prefill chunk.
//!
//!   CARGO_TARGET_DIR=... cargo bench -p kivi-model --bench matmul [-- filter]
//!   KIVI_MATMUL_SUMMARY=1 cargo bench -p kivi-model --bench matmul   (=model: whole token only)
//!
//! The second form skips criterion and prints a table: variants interleaved round by round,
//! best of 15 rounds each (robust when other processes share the cores).
//!
//! n = 1 reports weight GiB/s; n = 64 reports "elements/s" = FLOP/s (2 per multiply-add).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
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

/// A named closure that runs one timed call.
type Variant<'a> = (String, Box<dyn FnMut() + 'a>);

/// Best-of-`rounds` seconds per call for each variant, variants interleaved within a round.
fn best_of(rounds: usize, reps: usize, variants: &mut [Variant<'_>]) -> Vec<f64> {
    let mut best = vec![f64::MAX; variants.len()];
    for _ in 0..rounds {
        for (i, (_, f)) in variants.iter_mut().enumerate() {
            let t0 = Instant::now();
            for _ in 0..reps {
                f();
            }
            best[i] = best[i].min(t0.elapsed().as_secs_f64() / reps as f64);
        }
    }
    best
}

fn summary() {
    let mut rng = StdRng::seed_from_u64(1);
    let paths: Vec<KernelPath> = KernelPath::available()
        .into_iter()
        .filter(|p| *p != KernelPath::Scalar)
        .collect();
    println!(
        "variant timings: best of 15 interleaved rounds; GB/s = quantized weight bytes / time"
    );
    let only_model = std::env::var("KIVI_MATMUL_SUMMARY").is_ok_and(|v| v == "model");
    for n in [1usize, 64] {
        if only_model {
            break;
        }
        for (name, dtype, rows, cols) in [
            ("q4_1 576->576", DType::Q4_1, HIDDEN, HIDDEN),
            ("q4_1 576->192", DType::Q4_1, KV, HIDDEN),
            ("q4_1 576->1536", DType::Q4_1, FFN, HIDDEN),
            ("q4_1 1536->576", DType::Q4_1, HIDDEN, FFN),
            ("q8_0 576->49152", DType::Q8_0, VOCAB, HIDDEN),
        ] {
            let t = random_tensor(&mut rng, dtype, rows, cols);
            let wf = Matrix::from_f32("wf", rows, cols, dequantize(&t).unwrap());
            let m = Matrix::from_raw(t).unwrap();
            let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let out = std::cell::RefCell::new(vec![0.0; n * rows]);
            let mut variants: Vec<Variant<'_>> = Vec::new();
            for &p in &paths {
                let (m, x, out) = (&m, &x, &out);
                variants.push((
                    format!("{p:?}"),
                    Box::new(move || m.matmul_with(p, x, n, &mut out.borrow_mut())),
                ));
            }
            let (wf, x2, out2) = (&wf, &x, &out);
            variants.push((
                "f32-dequant".into(),
                Box::new(move || wf.matmul(x2, n, &mut out2.borrow_mut())),
            ));
            let reps = (2e8 / (rows * cols * n) as f64).ceil().clamp(1.0, 2000.0) as usize;
            let best = best_of(15, reps, &mut variants);
            for ((v, _), s) in variants.iter().zip(best) {
                println!(
                    "n={n:<3} {name:16} {v:12} {:10.1} us {:7.2} GB/s {:7.1} GFLOP/s",
                    s * 1e6,
                    m.n_bytes() as f64 / s / 1e9,
                    2.0 * (rows * cols * n) as f64 / s / 1e9
                );
            }
        }
    }
    // One token of SmolLM2-135M: 30 layers x 7 matmuls + the tied Q8_0 output.
    let layers: Vec<Matrix> = (0..LAYERS)
        .flat_map(|_| LAYER.iter().copied())
        .map(|(r, c)| Matrix::from_raw(random_tensor(&mut rng, DType::Q4_1, r, c)).unwrap())
        .collect();
    let output = Matrix::from_raw(random_tensor(&mut rng, DType::Q8_0, VOCAB, HIDDEN)).unwrap();
    for n in [1usize, 64] {
        let x: Vec<f32> = (0..n * FFN).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let out = std::cell::RefCell::new(vec![0.0; n * VOCAB]);
        let mut variants: Vec<Variant<'_>> = Vec::new();
        for &p in &paths {
            let (layers, output, x, out) = (&layers, &output, &x, &out);
            variants.push((
                format!("{p:?}"),
                Box::new(move || {
                    let mut o = out.borrow_mut();
                    for m in layers {
                        m.matmul_with(p, &x[..n * m.cols], n, &mut o[..n * m.rows]);
                    }
                    // Prefill needs logits for the last token only.
                    output.matmul_with(p, &x[..HIDDEN], 1, &mut o[..VOCAB]);
                }),
            ));
        }
        let best = best_of(
            if n == 1 { 15 } else { 5 },
            if n == 1 { 5 } else { 1 },
            &mut variants,
        );
        for ((v, _), s) in variants.iter().zip(best) {
            println!(
                "{} {v:12} {:8.2} ms/token  -> {:6.1} tok/s (matmuls only)",
                if n == 1 {
                    "decode token     "
                } else {
                    "prefill 64 tokens"
                },
                s * 1e3 / n as f64,
                n as f64 / s
            );
        }
    }
}

criterion_group!(benches, shapes, whole_model);

fn main() {
    if std::env::var_os("KIVI_MATMUL_SUMMARY").is_some() {
        summary();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
