//! The forward pass on tiny random models against an independent f64 re-computation (full
//! recompute each step, exact attention), and cache/chunking invariants.

use kivi_core::{CacheConfig, CacheShape, KiviConfig, KvCache};
use kivi_model::config::{Config, RopeStyle};
use kivi_model::llama::{BatchItem, Logits, Model, Naming};
use kivi_model::random::{preset, RandomWeights};
use kivi_model::tensor::{DType, TensorSource};
use kivi_model::ModelError;
use rand::Rng;

fn weights(src: &RandomWeights, name: &str) -> Vec<f64> {
    let t = src.tensor(name).unwrap();
    t.data
        .bytes()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
        .collect()
}

/// Naive f64 forward over all `tokens` from scratch; logits of every position `[n][vocab]`.
fn reference_forward(c: &Config, src: &RandomWeights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let (h, d) = (c.hidden, c.head_dim);
    let n = tokens.len();
    let matvec = |w: &[f64], x: &[f64], rows: usize| -> Vec<f64> {
        (0..rows)
            .map(|r| (0..x.len()).map(|i| w[r * x.len() + i] * x[i]).sum())
            .collect()
    };
    let rms = |x: &[f64], w: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + c.rms_eps as f64).sqrt();
        x.iter().zip(w).map(|(a, b)| a * inv * b).collect()
    };
    let rope = |x: &mut [f64], pos: usize| {
        for head in x.chunks_exact_mut(d) {
            for i in 0..d / 2 {
                let theta = pos as f64 * (c.rope_theta as f64).powf(-2.0 * i as f64 / d as f64);
                let (a, b) = match c.rope_style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + d / 2),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * theta.cos() - x1 * theta.sin();
                head[b] = x0 * theta.sin() + x1 * theta.cos();
            }
        }
    };
    let emb = weights(src, "token_embd.weight");
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    for l in 0..c.n_layer {
        let w = |n: &str| weights(src, &format!("blk.{l}.{n}"));
        let (wq, wk, wv, wo) = (
            w("attn_q.weight"),
            w("attn_k.weight"),
            w("attn_v.weight"),
            w("attn_output.weight"),
        );
        let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
        for (p, x) in xs.iter().enumerate() {
            let xn = rms(x, &w("attn_norm.weight"));
            let (mut q, mut k, mut v) = (
                matvec(&wq, &xn, c.q_dim()),
                matvec(&wk, &xn, c.kv_dim()),
                matvec(&wv, &xn, c.kv_dim()),
            );
            if c.qkv_bias {
                for (a, b) in q.iter_mut().zip(w("attn_q.bias")) {
                    *a += b;
                }
                for (a, b) in k.iter_mut().zip(w("attn_k.bias")) {
                    *a += b;
                }
                for (a, b) in v.iter_mut().zip(w("attn_v.bias")) {
                    *a += b;
                }
            }
            rope(&mut q, p);
            rope(&mut k, p);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let group = c.n_head / c.n_kv_head;
        for i in 0..n {
            let mut att = vec![0.0; c.q_dim()];
            for hq in 0..c.n_head {
                let kvh = hq / group;
                let q = &qs[i][hq * d..(hq + 1) * d];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d).map(|e| q[e] * ks[j][kvh * d + e]).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for j in 0..=i {
                    let p = (scores[j] - m).exp() / z;
                    for e in 0..d {
                        att[hq * d + e] += p * vs[j][kvh * d + e];
                    }
                }
            }
            let o = matvec(&wo, &att, h);
            for (a, b) in xs[i].iter_mut().zip(o) {
                *a += b;
            }
            let xn = rms(&xs[i], &w("ffn_norm.weight"));
            let g = matvec(&w("ffn_gate.weight"), &xn, c.ffn);
            let u = matvec(&w("ffn_up.weight"), &xn, c.ffn);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(&w("ffn_down.weight"), &act, h);
            for (a, b) in xs[i].iter_mut().zip(down) {
                *a += b;
            }
        }
    }
    let out = weights(src, "output.weight");
    xs.iter()
        .map(|x| matvec(&out, &rms(x, &weights(src, "output_norm.weight")), c.vocab))
        .collect()
}

fn new_cache(c: &Config, cfg: CacheConfig) -> Box<dyn KvCache> {
    kivi_core::new_cache(
        &cfg,
        CacheShape {
            n_layer: c.n_layer,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
        },
    )
    .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn random_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = rand::thread_rng();
    (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
}

#[test]
fn f16_cache_matches_f64_reference_llama_and_qwen2() {
    for arch in ["tiny", "tiny-qwen2"] {
        let c = preset(arch).unwrap();
        let src = RandomWeights::new(&c, DType::F32, rand::random()).unwrap();
        let model = Model::load(&src, Naming::Gguf, c.clone()).unwrap();
        let tokens = random_tokens(23, c.vocab);
        let reference = reference_forward(&c, &src, &tokens);
        // Prefill 15 tokens at once, then 8 one-token decode steps reading the f16 cache.
        let mut cache = new_cache(&c, CacheConfig::F16);
        let seq = cache.add_sequence();
        let pre = model
            .forward(&tokens[..15], cache.as_mut(), seq, Logits::All)
            .unwrap();
        for i in 0..15 {
            let d = max_abs_diff(&pre[i * c.vocab..(i + 1) * c.vocab], &reference[i]);
            assert!(d < 2e-3, "{arch} prefill pos {i}: max |diff| {d}");
        }
        for i in 15..23 {
            let l = model
                .forward(&tokens[i..i + 1], cache.as_mut(), seq, Logits::Last)
                .unwrap();
            let d = max_abs_diff(&l, &reference[i]);
            // K/V of earlier tokens were rounded to f16 in the cache.
            assert!(d < 2e-2, "{arch} decode pos {i}: max |diff| {d}");
        }
    }
}

#[test]
fn kivi_cache_tracks_reference_and_is_exact_inside_the_window() {
    let c = preset("tiny").unwrap();
    let src = RandomWeights::new(&c, DType::F32, rand::random()).unwrap();
    let model = Model::load(&src, Naming::Gguf, c.clone()).unwrap();
    let tokens = random_tokens(100, c.vocab);
    let reference = reference_forward(&c, &src, &tokens);
    let mut errs = vec![];
    for (bits, tol) in [(4u8, 0.5f64), (2, 2.0)] {
        let kivi = KiviConfig {
            k_bits: bits,
            v_bits: bits,
            group_size: 16,
            residual_len: 32,
            ..KiviConfig::default()
        };
        let mut cache = new_cache(&c, CacheConfig::Kivi(kivi));
        let seq = cache.add_sequence();
        // Prompt of 20 < R: nothing quantized, prefill logits equal the reference.
        let pre = model
            .forward(&tokens[..20], cache.as_mut(), seq, Logits::All)
            .unwrap();
        assert!(max_abs_diff(&pre[19 * c.vocab..], &reference[19]) < 2e-3);
        let mut worst: f64 = 0.0;
        for i in 20..100 {
            let l = model
                .forward(&tokens[i..i + 1], cache.as_mut(), seq, Logits::Last)
                .unwrap();
            worst = worst.max(max_abs_diff(&l, &reference[i]));
        }
        eprintln!("{bits}-bit: worst logit error {worst} over 80 decode steps");
        assert!(worst < tol, "{bits}-bit worst logit error {worst}");
        errs.push(worst);
        assert!(
            cache.memory().code_bytes > 0,
            "{bits}-bit: nothing was quantized"
        );
    }
    assert!(
        errs[0] < errs[1],
        "4-bit ({}) should be closer than 2-bit ({})",
        errs[0],
        errs[1]
    );
}

#[test]
fn chunked_prefill_matches_one_shot_prefill() {
    // Chunks read older tokens from the f16 cache instead of exact f32: only rounding differs.
    let c = preset("tiny").unwrap();
    let src = RandomWeights::new(&c, DType::F32, rand::random()).unwrap();
    let model = Model::load(&src, Naming::Gguf, c.clone()).unwrap();
    let tokens = random_tokens(48, c.vocab);
    let run = |chunk: usize| {
        let mut cache = new_cache(&c, CacheConfig::F16);
        let seq = cache.add_sequence();
        let mut last = vec![];
        for piece in tokens.chunks(chunk) {
            last = model
                .forward(piece, cache.as_mut(), seq, Logits::Last)
                .unwrap();
        }
        last
    };
    let one_shot = run(48);
    for chunk in [1, 5, 16] {
        let l = run(chunk);
        let d = l
            .iter()
            .zip(&one_shot)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d < 2e-2, "chunk {chunk}: max |diff| {d}");
    }
}

#[test]
fn context_overflow_is_an_error() {
    let c = preset("tiny").unwrap();
    let src = RandomWeights::new(&c, DType::F32, 1).unwrap();
    let model = Model::load(&src, Naming::Gguf, c.clone()).unwrap();
    let mut cache = new_cache(&c, CacheConfig::F16);
    let seq = cache.add_sequence();
    let too_long = vec![1u32; c.context_len + 1];
    match model.forward(&too_long, cache.as_mut(), seq, Logits::Last) {
        Err(ModelError::ContextOverflow { prompt, context }) => {
            assert_eq!((prompt, context), (c.context_len + 1, c.context_len))
        }
        other => panic!("expected ContextOverflow, got {:?}", other.map(|v| v.len())),
    }
}

#[test]
fn wrong_tensor_shape_is_an_error_naming_it() {
    let c = preset("tiny").unwrap();
    let src = RandomWeights::new(&c, DType::F32, 1).unwrap();
    let mut wrong = c.clone();
    wrong.ffn += 1;
    let err = Model::load(&src, Naming::Gguf, wrong)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("blk.0.ffn_gate.weight"), "{err}");
}

/// `forward_batch` over a mixed batch (decodes, prefill chunks of several sizes, one empty item)
/// gives every sequence bit-identical logits and cache contents to running it alone with
/// `forward`: the weight kernels compute each activation row the same way whatever the batch
/// (tiles of 8/4/1 rows use one accumulator per row, same block order) and attention is per item.
#[test]
fn forward_batch_is_bit_identical_to_one_at_a_time() {
    let mut rng = rand::thread_rng();
    for (arch, dtype) in [("tiny", DType::F32), ("tiny-qwen2", DType::F16)] {
        let c = preset(arch).unwrap();
        let src = RandomWeights::new(&c, dtype, rand::random()).unwrap();
        let model = Model::load(&src, Naming::Gguf, c.clone()).unwrap();
        let kivi = KiviConfig {
            group_size: 16,
            residual_len: 32,
            ..KiviConfig::kivi2()
        };
        for cfg in [CacheConfig::F16, CacheConfig::Kivi(kivi)] {
            let mut batched = new_cache(&c, cfg);
            let mut single = new_cache(&c, cfg);
            // Histories of different lengths (some crossing KIVI flushes), built alone in both.
            let n_seq = 7;
            let mut seqs = Vec::new();
            for _ in 0..n_seq {
                let (a, b) = (batched.add_sequence(), single.add_sequence());
                let hist = random_tokens(rng.gen_range(0..90), c.vocab);
                for piece in hist.chunks(rng.gen_range(1..40)) {
                    model
                        .forward(piece, batched.as_mut(), a, Logits::Last)
                        .unwrap();
                    model
                        .forward(piece, single.as_mut(), b, Logits::Last)
                        .unwrap();
                }
                seqs.push((a, b));
            }
            for round in 0..4 {
                // New tokens per sequence: decode (1), prefill chunks, or nothing.
                let news: Vec<Vec<u32>> = (0..n_seq)
                    .map(|i| match (i + round) % 4 {
                        0 | 1 => random_tokens(1, c.vocab),
                        2 => random_tokens(rng.gen_range(2..30), c.vocab),
                        _ if i == 3 => vec![],
                        _ => random_tokens(rng.gen_range(5..12), c.vocab),
                    })
                    .collect();
                let all = round % 2 == 0;
                let mode = |i: usize| {
                    if all && i.is_multiple_of(2) {
                        Logits::All
                    } else {
                        Logits::Last
                    }
                };
                let items: Vec<BatchItem> = seqs
                    .iter()
                    .zip(&news)
                    .enumerate()
                    .map(|(i, (&(a, _), t))| BatchItem {
                        seq: a,
                        tokens: t,
                        logits: mode(i),
                    })
                    .collect();
                let got = model.forward_batch(&items, batched.as_mut()).unwrap();
                for (i, (&(_, b), t)) in seqs.iter().zip(&news).enumerate() {
                    let want = model.forward(t, single.as_mut(), b, mode(i)).unwrap();
                    let same = got[i].len() == want.len()
                        && got[i]
                            .iter()
                            .zip(&want)
                            .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{arch} {cfg:?} round {round} item {i}: logits differ");
                }
            }
            // Same stored contents: attend a fresh query over each sequence in both caches.
            for &(a, b) in &seqs {
                assert_eq!(
                    batched.seq_len(0, a).unwrap(),
                    single.seq_len(0, b).unwrap()
                );
            }
            assert_eq!(batched.memory(), single.memory());
        }
    }
}

#[test]
fn forward_batch_checks_everything_before_touching_the_cache() {
    let c = preset("tiny").unwrap();
    let src = RandomWeights::new(&c, DType::F32, rand::random()).unwrap();
    let model = Model::load(&src, Naming::Gguf, c.clone()).unwrap();
    let mut cache = new_cache(&c, CacheConfig::F16);
    let (a, b) = (cache.add_sequence(), cache.add_sequence());
    let good = random_tokens(5, c.vocab);
    let bad = vec![c.vocab as u32];
    let item = |seq, tokens| BatchItem {
        seq,
        tokens,
        logits: Logits::Last,
    };
    let e = model.forward_batch(&[item(a, &good), item(b, &bad)], cache.as_mut());
    assert!(matches!(e, Err(ModelError::Tokenizer(_))), "{e:?}");
    let e = model.forward_batch(&[item(a, &good), item(a, &good)], cache.as_mut());
    assert!(e.is_err(), "a sequence twice in one batch must be refused");
    let long = random_tokens(c.context_len + 1, c.vocab);
    let e = model.forward_batch(&[item(a, &good), item(b, &long)], cache.as_mut());
    assert!(
        matches!(e, Err(ModelError::ContextOverflow { .. })),
        "{e:?}"
    );
    assert_eq!(
        cache.seq_len(0, a).unwrap(),
        0,
        "a failed batch stored nothing"
    );
    assert_eq!(cache.memory().tokens, 0);
}
