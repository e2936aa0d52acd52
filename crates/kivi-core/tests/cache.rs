//! The KIVI and f16 caches: streaming policy, stored contents and attention against the f64
//! references, multi-token appends, GQA, configuration errors, memory accounting.

mod common;

use common::*;
use kivi_core::cache::reference::stored_ref;
use kivi_core::{
    new_cache, AttendItem, Axis, CacheConfig, CacheShape, Error, F16Cache, Isa, KiviCache,
    KiviConfig, KvCache,
};
use proptest::prelude::*;
use rand::Rng;

fn shape(n_kv_head: usize, head_dim: usize) -> CacheShape {
    CacheShape {
        n_layer: 2,
        n_kv_head,
        head_dim,
    }
}

fn cfg(bits: u8, g: usize, r: usize) -> KiviConfig {
    KiviConfig {
        k_bits: bits,
        v_bits: bits,
        group_size: g,
        residual_len: r,
        ..Default::default()
    }
}

// --------------------------------------------------------------------------------------------
// Streaming policy (kivi.md §2, §3, §9)

/// `[sinks, k quantized, k window, v quantized, v window]` after a prompt of `l` tokens.
fn layout_after(c: KiviConfig, l: usize) -> [usize; 5] {
    let mut cache = KiviCache::new(c, shape(1, 32)).unwrap();
    let s = cache.add_sequence();
    let mut r = rng(l as u64);
    let x = kv_data(&mut r, l, 1, 32);
    cache.append(0, s, &x, &x).unwrap();
    cache.seq_layout(0, s).unwrap()
}

#[test]
fn prefill_split_l_less_than_r() {
    // L < R: nothing quantized, everything in the windows.
    assert_eq!(layout_after(cfg(2, 16, 64), 40), [0, 0, 40, 0, 40]);
}

#[test]
fn prefill_split_l_multiple_of_r() {
    // L = kR: all keys quantized, the last R values in the window.
    assert_eq!(layout_after(cfg(2, 16, 64), 128), [0, 128, 0, 64, 64]);
}

#[test]
fn prefill_split_l_kr_plus_r() {
    // L = kR + r (300 = 2*128 + 44 as in kivi.md §2): 256 keys quantized, 44 in f16.
    assert_eq!(layout_after(cfg(2, 32, 128), 300), [0, 256, 44, 172, 128]);
    assert_eq!(layout_after(cfg(2, 16, 64), 150), [0, 128, 22, 86, 64]);
}

#[test]
fn decode_steps_key_flush_at_r_and_value_pop_every_step() {
    let (g, rr) = (16, 64);
    let mut cache = KiviCache::new(cfg(2, g, rr), shape(1, 32)).unwrap();
    let s = cache.add_sequence();
    let mut r = rng(7);
    let l = 150; // 128 keys quantized + 22 in f16
    let x = kv_data(&mut r, l + 200, 1, 32);
    cache.append(0, s, &x[..l * 32], &x[..l * 32]).unwrap();
    for step in 0..100 {
        let n = l + step;
        let lay = cache.seq_layout(0, s).unwrap();
        // keys: quantized in whole R chunks, window 0..R-1 between steps
        assert_eq!(lay[1], n / rr * rr, "step {step}");
        assert_eq!(lay[2], n % rr, "step {step}");
        // values: window of exactly R once n > R, one more quantized each step
        assert_eq!(lay[3], n - rr, "step {step}");
        assert_eq!(lay[4], rr);
        let t = &x[n * 32..(n + 1) * 32];
        cache.append(0, s, t, t).unwrap();
    }
    // The flush happens on the step that brings the window to exactly R.
    let mut c2 = KiviCache::new(cfg(2, g, rr), shape(1, 32)).unwrap();
    let s2 = c2.add_sequence();
    c2.append(0, s2, &x[..191 * 32], &x[..191 * 32]).unwrap();
    assert_eq!(c2.seq_layout(0, s2).unwrap()[1..3], [128, 63]);
    c2.append(0, s2, &x[191 * 32..192 * 32], &x[191 * 32..192 * 32])
        .unwrap();
    assert_eq!(c2.seq_layout(0, s2).unwrap()[1..3], [192, 0]);
}

#[test]
fn first_decode_after_prefill_reads_quantized_and_new_key_exact() {
    // After a prefill of L = 70 (R = 32, G = 16): 64 keys quantized, 6 f16; 38 values quantized.
    // The decode step attends [64 quantized | 6 f16 | new exact] keys and
    // [38 quantized | 32 f16 | new exact] values; compare with the f64 model.
    let c = cfg(2, 16, 32);
    let (nh, hd, n_head) = (2, 32, 4);
    let mut cache = KiviCache::new(c, shape(nh, hd)).unwrap();
    let s = cache.add_sequence();
    let mut r = rng(70);
    let k = kv_data(&mut r, 71, nh, hd);
    let v = kv_data(&mut r, 71, nh, hd);
    let row = nh * hd;
    cache.append(0, s, &k[..70 * row], &v[..70 * row]).unwrap();
    assert_eq!(cache.seq_layout(0, s).unwrap(), [0, 64, 6, 38, 32]);
    let q = uniform(&mut r, n_head * hd, -0.5, 0.5);
    let mut out = vec![0f32; q.len()];
    let (kn, vn) = (&k[70 * row..], &v[70 * row..]);
    cache.attend(0, n_head, s, &q, kn, vn, &mut out).unwrap();
    let want = expected_attention(
        Some(&c),
        n_head,
        nh,
        hd,
        &k[..70 * row],
        &v[..70 * row],
        &q,
        kn,
        vn,
    );
    assert!(max_err(&out, &want) < 2e-5, "{}", max_err(&out, &want));
    cache.append(0, s, kn, vn).unwrap();
    assert_eq!(cache.seq_layout(0, s).unwrap(), [0, 64, 7, 39, 32]);
}

// --------------------------------------------------------------------------------------------
// Random configurations against the f64 model

#[derive(Debug, Clone)]
struct Case {
    cfg: KiviConfig,
    n_kv_head: usize,
    n_rep: usize,
    head_dim: usize,
    prompt: usize,
    steps: Vec<usize>,
    seed: u64,
}

fn axis() -> impl Strategy<Value = Axis> {
    prop_oneof![3 => Just(Axis::PerChannel), 1 => Just(Axis::PerToken)]
}

fn case() -> impl Strategy<Value = Case> {
    (
        (
            prop_oneof![Just(2u8), Just(4), Just(8)],
            prop_oneof![Just(2u8), Just(4), Just(8)],
        ),
        prop_oneof![Just(16usize), Just(32)],
        0usize..3,
        (
            axis(),
            prop_oneof![3 => Just(Axis::PerToken), 1 => Just(Axis::PerChannel)],
        ),
        prop_oneof![3 => Just(0usize), 1 => 1usize..5],
        (1usize..=3, 1usize..=3, 1usize..=2),
        0usize..5,
        prop::collection::vec(1usize..5, 0..12),
        any::<u64>(),
    )
        .prop_map(
            |((kb, vb), g, rm, (ka, va), sinks, (nkv, nrep, hdm), pm, steps, seed)| {
                let r = rm * g;
                let cfg = KiviConfig {
                    k_bits: kb,
                    v_bits: vb,
                    group_size: g,
                    residual_len: r,
                    k_axis: ka,
                    v_axis: va,
                    sink_tokens: sinks,
                    key4_layers: 0,
                    key4_auto: 0,
                };
                // prompt lengths around multiples of R (or G)
                let unit = if r > 0 { r } else { g };
                let prompt = [0, unit - 1, unit, 2 * unit + 3, 3 * unit + unit / 2][pm] + sinks;
                Case {
                    cfg,
                    n_kv_head: nkv,
                    n_rep: nrep,
                    head_dim: g * hdm,
                    prompt,
                    steps,
                    seed,
                }
            },
        )
}

/// The relative attention error allowed on `isa`. The float paths round in f32: at most 2.0e-6
/// in 1000 cases. The VNNI kernels multiply 2- and 4-bit codes by 16-bit fixed-point operands
/// (the scale-folded query, `alpha = max|q s| / 32767`, and the softmax weights): a score of a
/// 64-channel head is off by up to 64 * max_code * alpha / 2 (the same in units of the key
/// range for both widths), ~1e-2 for these keys (channels of amplitude 8), and outputs by up to
/// 5.3e-5 in the same 1000 cases (the saved case, from CI) and 9.3e-5 with 8x larger queries
/// (`key4_layers_chosen_on_the_fly_by_logit_error`). Either bound is far below what a wrong
/// code, scale, min or window row gives (~1e-1).
fn attention_bound(isa: Isa) -> f64 {
    if isa == Isa::Avx512Vnni {
        5e-4
    } else {
        5e-5
    }
}

/// Runs a case: prefill then decode/speculative steps of the given sizes; at every step checks
/// the attention against the f64 model and the stored contents against the closed form.
fn run_case(c: &Case, isa: Isa) -> Result<(), TestCaseError> {
    let (nh, hd) = (c.n_kv_head, c.head_dim);
    let n_head = nh * c.n_rep;
    let row = nh * hd;
    let total = c.prompt + c.steps.iter().sum::<usize>();
    let mut r = rng(c.seed);
    let k = kv_data(&mut r, total, nh, hd);
    let v = kv_data(&mut r, total, nh, hd);
    let mut cache = KiviCache::new(c.cfg, shape(nh, hd)).unwrap().with_isa(isa);
    let s = cache.add_sequence();
    let mut n = 0;
    for step in std::iter::once(c.prompt).chain(c.steps.iter().cloned()) {
        if step == 0 {
            continue;
        }
        let (kn, vn) = (&k[n * row..(n + step) * row], &v[n * row..(n + step) * row]);
        let q = uniform(&mut r, step * n_head * hd, -0.6, 0.6);
        let mut out = vec![0f32; q.len()];
        cache.attend(1, n_head, s, &q, kn, vn, &mut out).unwrap();
        let want = expected_attention(
            Some(&c.cfg),
            n_head,
            nh,
            hd,
            &k[..n * row],
            &v[..n * row],
            &q,
            kn,
            vn,
        );
        let e = max_err(&out, &want);
        prop_assert!(
            e < attention_bound(isa),
            "attention error {} at n={} step={}",
            e,
            n,
            step
        );
        cache.append(1, s, kn, vn).unwrap();
        n += step;
        prop_assert_eq!(cache.seq_len(1, s).unwrap(), n);
        prop_assert_eq!(cache.seq_len(0, s).unwrap(), 0);
        let (dk, dv) = cache.dequantized(1, s).unwrap();
        let (wk, wv) = (
            stored_ref(&c.cfg, true, nh, hd, &k[..n * row]),
            stored_ref(&c.cfg, false, nh, hd, &v[..n * row]),
        );
        let ek = max_err(&dk, &wk);
        let ev = max_err(&dv, &wv);
        prop_assert!(
            ek < 1e-6 && ev < 1e-6,
            "stored error k {} v {} at n={}",
            ek,
            ev,
            n
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn kivi_matches_f64_model(c in case()) {
        run_case(&c, Isa::detect())?;
    }

    #[test]
    fn kivi_scalar_path_matches_f64_model(c in case()) {
        run_case(&c, Isa::Scalar)?;
    }

    /// Appending in arbitrary chunks gives bit-identical contents, memory and attention to
    /// appending token by token.
    #[test]
    fn multi_token_append_equals_one_by_one(c in case(), splits in prop::collection::vec(1usize..40, 1..10)) {
        let (nh, hd) = (c.n_kv_head, c.head_dim);
        let row = nh * hd;
        let total: usize = splits.iter().sum();
        let mut r = rng(c.seed);
        let k = kv_data(&mut r, total + 1, nh, hd);
        let v = kv_data(&mut r, total + 1, nh, hd);
        let mut a = KiviCache::new(c.cfg, shape(nh, hd)).unwrap();
        let mut b = KiviCache::new(c.cfg, shape(nh, hd)).unwrap();
        let (sa, sb) = (a.add_sequence(), b.add_sequence());
        let mut n = 0;
        for &m in &splits {
            a.append(0, sa, &k[n * row..(n + m) * row], &v[n * row..(n + m) * row]).unwrap();
            n += m;
        }
        for t in 0..total {
            b.append(0, sb, &k[t * row..(t + 1) * row], &v[t * row..(t + 1) * row]).unwrap();
        }
        prop_assert_eq!(a.seq_layout(0, sa).unwrap(), b.seq_layout(0, sb).unwrap());
        let (ak, av) = a.dequantized(0, sa).unwrap();
        let (bk, bv) = b.dequantized(0, sb).unwrap();
        prop_assert!(ak.iter().zip(&bk).all(|(x, y)| x.to_bits() == y.to_bits()));
        prop_assert!(av.iter().zip(&bv).all(|(x, y)| x.to_bits() == y.to_bits()));
        prop_assert_eq!(a.memory(), b.memory());
        let n_head = nh * c.n_rep;
        let q = uniform(&mut r, n_head * hd, -1.0, 1.0);
        let (kn, vn) = (&k[total * row..], &v[total * row..]);
        let mut oa = vec![0f32; q.len()];
        let mut ob = vec![0f32; q.len()];
        a.attend(0, n_head, sa, &q, kn, vn, &mut oa).unwrap();
        b.attend(0, n_head, sb, &q, kn, vn, &mut ob).unwrap();
        prop_assert!(oa.iter().zip(&ob).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// The f16 cache against exact f64 attention (inputs not rounded): error of f16 storage only.
    #[test]
    fn f16_cache_vs_exact(nkv in 1usize..4, nrep in 1usize..4, hd in prop_oneof![Just(24usize), Just(64), Just(128)],
                          prompt in 0usize..1300, steps in prop::collection::vec(1usize..4, 1..4), seed in any::<u64>()) {
        let n_head = nkv * nrep;
        let row = nkv * hd;
        let total = prompt + steps.iter().sum::<usize>();
        let mut r = rng(seed);
        let k = kv_data(&mut r, total, nkv, hd);
        let v = kv_data(&mut r, total, nkv, hd);
        let mut cache = F16Cache::new(shape(nkv, hd)).unwrap();
        let s = cache.add_sequence();
        let mut n = 0;
        for step in std::iter::once(prompt).chain(steps) {
            if step == 0 { continue; }
            let (kn, vn) = (&k[n * row..(n + step) * row], &v[n * row..(n + step) * row]);
            if step > 64 {
                // long prompt: store only (the f64 reference of a long prefill is O(L^2) slow)
                cache.append(0, s, kn, vn).unwrap();
                n += step;
                continue;
            }
            let q = uniform(&mut r, step * n_head * hd, -0.5, 0.5);
            let mut out = vec![0f32; q.len()];
            cache.attend(0, n_head, s, &q, kn, vn, &mut out).unwrap();
            // Against the f16-rounded history: only f32 arithmetic error.
            let want = expected_attention(None, n_head, nkv, hd, &k[..n * row], &v[..n * row], &q, kn, vn);
            prop_assert!(max_err(&out, &want) < 2e-5, "f16-rounded ref err {}", max_err(&out, &want));
            // Against exact attention on unrounded inputs: within f16 storage error.
            let exact: Vec<f64> = {
                let k64: Vec<f64> = k[..(n + step) * row].iter().map(|&x| x as f64).collect();
                let v64: Vec<f64> = v[..(n + step) * row].iter().map(|&x| x as f64).collect();
                let q64: Vec<f64> = q.iter().map(|&x| x as f64).collect();
                kivi_core::attn::reference::attention_ref(&q64, &k64, &v64, n_head, nkv, hd, n)
            };
            prop_assert!(max_err(&out, &exact) < 3e-3, "exact err {}", max_err(&out, &exact));
            cache.append(0, s, kn, vn).unwrap();
            n += step;
        }
        let m = cache.memory();
        prop_assert_eq!(m.full_precision_bytes, (2 * 2 * n * row) as u64);
        prop_assert_eq!(m.tokens, n as u64);
    }
}

/// Long sequences (several blocks and flash-decoding chunks, sinks), a batch of sequences of
/// different lengths through `attend_batch`, every ISA.
#[test]
fn long_sequences_batched_every_isa() {
    let c = KiviConfig {
        sink_tokens: 4,
        ..KiviConfig::kivi2()
    };
    let (nh, hd, n_head) = (3, 64, 9);
    let row = nh * hd;
    let lens = [1500usize, 517, 130];
    let mut r = rng(99);
    let data: Vec<(Vec<f32>, Vec<f32>)> = lens
        .iter()
        .map(|&l| {
            (
                kv_data(&mut r, l + 2, nh, hd),
                kv_data(&mut r, l + 2, nh, hd),
            )
        })
        .collect();
    for isa in Isa::all_supported() {
        let mut cache = KiviCache::new(c, shape(nh, hd)).unwrap().with_isa(isa);
        let mut f16c = F16Cache::new(shape(nh, hd)).unwrap().with_isa(isa);
        let seqs: Vec<_> = lens
            .iter()
            .map(|_| (cache.add_sequence(), f16c.add_sequence()))
            .collect();
        for ((s, fs), ((k, v), &l)) in seqs.iter().zip(data.iter().zip(&lens)) {
            cache.append(0, *s, &k[..l * row], &v[..l * row]).unwrap();
            f16c.append(0, *fs, &k[..l * row], &v[..l * row]).unwrap();
        }
        // two new tokens per sequence (speculative), batched
        let qs: Vec<Vec<f32>> = lens
            .iter()
            .map(|_| uniform(&mut r, 2 * n_head * hd, -0.5, 0.5))
            .collect();
        let mut outs: Vec<Vec<f32>> = qs.iter().map(|q| vec![0f32; q.len()]).collect();
        let mut fouts = outs.clone();
        let mut items: Vec<AttendItem> = seqs
            .iter()
            .zip(&data)
            .zip(&lens)
            .zip(&qs)
            .zip(outs.iter_mut())
            .map(|((((s, (k, v)), &l), q), out)| AttendItem {
                seq: s.0,
                q,
                k_new: &k[l * row..],
                v_new: &v[l * row..],
                out,
            })
            .collect();
        cache.attend_batch(0, n_head, &mut items).unwrap();
        let mut fitems: Vec<AttendItem> = seqs
            .iter()
            .zip(&data)
            .zip(&lens)
            .zip(&qs)
            .zip(fouts.iter_mut())
            .map(|((((s, (k, v)), &l), q), out)| AttendItem {
                seq: s.1,
                q,
                k_new: &k[l * row..],
                v_new: &v[l * row..],
                out,
            })
            .collect();
        f16c.attend_batch(0, n_head, &mut fitems).unwrap();
        for i in 0..lens.len() {
            let (k, v) = &data[i];
            let l = lens[i];
            let want = expected_attention(
                Some(&c),
                n_head,
                nh,
                hd,
                &k[..l * row],
                &v[..l * row],
                &qs[i],
                &k[l * row..],
                &v[l * row..],
            );
            let e = max_err(&outs[i], &want);
            assert!(e < 5e-5, "{isa:?} seq {i}: kivi err {e}");
            let fw = expected_attention(
                None,
                n_head,
                nh,
                hd,
                &k[..l * row],
                &v[..l * row],
                &qs[i],
                &k[l * row..],
                &v[l * row..],
            );
            let fe = max_err(&fouts[i], &fw);
            assert!(fe < 2e-5, "{isa:?} seq {i}: f16 err {fe}");
            // batched == single
            let mut single = vec![0f32; qs[i].len()];
            cache
                .attend(
                    0,
                    n_head,
                    seqs[i].0,
                    &qs[i],
                    &k[l * row..],
                    &v[l * row..],
                    &mut single,
                )
                .unwrap();
            assert_eq!(single, outs[i]);
        }
        // KIVI-2 really is lossy here: the f16 and KIVI outputs differ (the test could fail).
        assert!(outs[0]
            .iter()
            .zip(&fouts[0])
            .any(|(a, b)| (a - b).abs() > 1e-4));
    }
}

#[test]
fn gqa_head_mapping() {
    // KV head j holds constant value vectors j+1 (constant groups reconstruct exactly), so query
    // head h must output h / (n_head / n_kv_head) + 1 everywhere.
    let (nh, hd, n_head) = (3, 32, 6);
    let row = nh * hd;
    for config in [
        CacheConfig::F16,
        CacheConfig::Kivi(cfg(2, 16, 16)),
        CacheConfig::Kivi(cfg(4, 16, 0)),
    ] {
        let mut cache = new_cache(&config, shape(nh, hd)).unwrap();
        let s = cache.add_sequence();
        let l = 50;
        let mut r = rng(5);
        let k = kv_data(&mut r, l + 1, nh, hd);
        let v: Vec<f32> = (0..(l + 1) * row)
            .map(|i| ((i % row) / hd + 1) as f32)
            .collect();
        cache.append(0, s, &k[..l * row], &v[..l * row]).unwrap();
        let q = uniform(&mut r, n_head * hd, -1.0, 1.0);
        let mut out = vec![0f32; q.len()];
        cache
            .attend(0, n_head, s, &q, &k[l * row..], &v[l * row..], &mut out)
            .unwrap();
        for h in 0..n_head {
            for d in 0..hd {
                let want = (h / 2 + 1) as f32;
                assert!(
                    (out[h * hd + d] - want).abs() < 1e-5,
                    "{config:?} head {h}: {}",
                    out[h * hd + d]
                );
            }
        }
    }
}

#[test]
fn sinks_stay_f16_forever() {
    let c = KiviConfig {
        sink_tokens: 5,
        ..cfg(2, 16, 32)
    };
    let mut cache = KiviCache::new(c, shape(1, 16)).unwrap();
    let s = cache.add_sequence();
    let mut r = rng(3);
    let x = kv_data(&mut r, 300, 1, 16);
    cache.append(0, s, &x, &x).unwrap();
    let lay = cache.seq_layout(0, s).unwrap();
    // stream of 295 tokens: keys 288 quantized + 7, values 263 + 32
    assert_eq!(lay, [5, 288, 7, 263, 32]);
    let (dk, _) = cache.dequantized(0, s).unwrap();
    for i in 0..5 * 16 {
        assert_eq!(dk[i], half::f16::from_f32(x[i]).to_f32());
    }
    assert!(dk[5 * 16..]
        .iter()
        .zip(&x[5 * 16..])
        .any(|(a, b)| (a - b).abs() > 1e-2));
}

#[test]
fn r_zero_quantizes_everything_including_partial_groups() {
    let c = cfg(2, 16, 0);
    let mut cache = KiviCache::new(c, shape(2, 32)).unwrap();
    let s = cache.add_sequence();
    let mut r = rng(11);
    let x = kv_data(&mut r, 21, 2, 32);
    for t in 0..21 {
        cache
            .append(0, s, &x[t * 64..(t + 1) * 64], &x[t * 64..(t + 1) * 64])
            .unwrap();
        // keys: all t+1 tokens in blocks (the last group partial), values all quantized
        assert_eq!(cache.seq_layout(0, s).unwrap(), [0, t + 1, 0, t + 1, 0]);
        let (dk, _) = cache.dequantized(0, s).unwrap();
        let want = stored_ref(&c, true, 2, 32, &x[..(t + 1) * 64]);
        assert!(max_err(&dk, &want) < 1e-6);
    }
    // the staging copy of the partial group (5 tokens) is counted as f16 bytes
    assert_eq!(cache.memory().full_precision_bytes, 5 * 64 * 2);
}

// --------------------------------------------------------------------------------------------
// Errors

#[test]
fn invalid_configurations_rejected() {
    let sh = shape(2, 64);
    let bad = [
        KiviConfig {
            k_bits: 3,
            ..Default::default()
        },
        KiviConfig {
            v_bits: 16,
            ..Default::default()
        },
        KiviConfig {
            k_bits: 1,
            ..Default::default()
        },
        KiviConfig {
            group_size: 0,
            ..Default::default()
        },
        KiviConfig {
            group_size: 8,
            ..Default::default()
        }, // 2-bit needs multiples of 16
        KiviConfig {
            k_bits: 4,
            v_bits: 4,
            group_size: 4,
            residual_len: 8,
            ..Default::default()
        },
        KiviConfig {
            group_size: 48,
            residual_len: 96,
            ..Default::default()
        }, // 64 % 48
        KiviConfig {
            residual_len: 100,
            ..Default::default()
        }, // R % G
    ];
    for c in bad {
        let r = new_cache(&CacheConfig::Kivi(c), sh);
        assert!(matches!(r, Err(Error::InvalidConfig(_))), "{c:?} accepted");
    }
    for sh0 in [shape(0, 64), shape(2, 0)] {
        assert!(new_cache(&CacheConfig::Kivi(KiviConfig::default()), sh0).is_err());
        assert!(new_cache(&CacheConfig::F16, sh0).is_err());
    }
    // head_dim % G only matters for per-token tensors
    let chan_only = KiviConfig {
        v_axis: Axis::PerChannel,
        group_size: 48,
        residual_len: 96,
        ..Default::default()
    };
    assert!(new_cache(&CacheConfig::Kivi(chan_only), sh).is_ok());
    // the defaults and KIVI-4 work for common shapes
    for hd in [64, 128] {
        assert!(new_cache(&CacheConfig::Kivi(KiviConfig::kivi2()), shape(3, hd)).is_ok());
        assert!(new_cache(&CacheConfig::Kivi(KiviConfig::kivi4()), shape(3, hd)).is_ok());
    }
}

#[test]
fn bad_calls_rejected_without_side_effects() {
    for config in [CacheConfig::F16, CacheConfig::Kivi(KiviConfig::default())] {
        let mut cache = new_cache(&config, shape(2, 64)).unwrap();
        let s = cache.add_sequence();
        let ok = vec![0.5f32; 128];
        let mut nan = ok.clone();
        nan[77] = f32::NAN;
        assert!(matches!(
            cache.append(0, s, &nan, &ok),
            Err(Error::NonFinite { index: 77, .. })
        ));
        let mut big = ok.clone();
        big[3] = 1e6;
        assert!(matches!(
            cache.append(0, s, &ok, &big),
            Err(Error::OutOfRange { index: 3, .. })
        ));
        assert_eq!(cache.seq_len(0, s).unwrap(), 0);
        assert!(matches!(
            cache.append(0, s, &ok[..100], &ok[..100]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            cache.append(2, s, &ok, &ok),
            Err(Error::Layer { .. })
        ));
        assert!(matches!(
            cache.append(0, kivi_core::SeqId(99), &ok, &ok),
            Err(Error::UnknownSequence(_))
        ));
        let q = vec![0.1f32; 4 * 64];
        let mut out = vec![0f32; 4 * 64];
        assert!(matches!(
            cache.attend(0, 3, s, &q[..192], &ok, &ok, &mut out[..192]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            cache.attend(0, 4, s, &q, &ok, &ok, &mut out[..10]),
            Err(Error::Shape { .. })
        ));
        assert!(cache.attend(0, 4, s, &q, &nan, &ok, &mut out).is_err());
        cache.attend(0, 4, s, &q, &ok, &ok, &mut out).unwrap();
        assert!(out.iter().all(|&x| (x - 0.5).abs() < 1e-6));
        cache.remove_sequence(s).unwrap();
        assert!(cache.remove_sequence(s).is_err());
        assert!(cache.seq_len(0, s).is_err());
    }
}

// --------------------------------------------------------------------------------------------
// Memory accounting

#[test]
fn memory_accounting_is_exact() {
    // KIVI-2, G = 32, R = 128, Hkv = 2, D = 128, L = 1000:
    // keys: 896 quantized (7 chunks), 104 f16; values: 872 quantized, 128 f16.
    let (nh, hd) = (2u64, 128u64);
    let mut cache = new_cache(&CacheConfig::Kivi(KiviConfig::kivi2()), shape(2, 128)).unwrap();
    let s = cache.add_sequence();
    let mut r = rng(1);
    let x = kv_data(&mut r, 1000, 2, 128);
    cache.append(1, s, &x, &x).unwrap();
    let m = cache.memory();
    let k_codes = nh * hd * (896 / 16) * 4;
    let v_codes = 872 * nh * (hd / 16) * 4;
    let k_meta = nh * hd * (896 / 32) * 2;
    let v_meta = 872 * nh * (hd / 32) * 2;
    assert_eq!(m.code_bytes, k_codes + v_codes);
    assert_eq!(m.scale_bytes, k_meta + v_meta);
    assert_eq!(m.min_bytes, k_meta + v_meta);
    assert_eq!(m.full_precision_bytes, (104 + 128) * nh * hd * 2);
    assert_eq!(m.tokens, 1000);
    // 3 bits per quantized key element (2 + 32/32*... = 2 + 2*16/32)
    let k_bits = (k_codes + 2 * k_meta) * 8;
    assert_eq!(k_bits, 3 * 896 * nh * hd);
    // reserved >= used; whole blocks of 256 tokens: 4 blocks
    let res = cache.memory_reserved();
    assert!(res.total_bytes() >= m.total_bytes());
    assert_eq!(res.code_bytes, 4 * (256 * nh * hd * 2 * 2 / 8));
    // removing the sequence releases everything
    cache.remove_sequence(s).unwrap();
    assert_eq!(cache.memory().total_bytes(), 0);
    // R = 0 per-channel keys with a partial word: used codes round up to whole words
    let c0 = KiviConfig {
        residual_len: 0,
        ..KiviConfig::kivi4()
    };
    let mut c = new_cache(&CacheConfig::Kivi(c0), shape(1, 64)).unwrap();
    let s = c.add_sequence();
    let y = kv_data(&mut r, 37, 1, 64);
    c.append(0, s, &y, &y).unwrap();
    let m = c.memory();
    // keys: 64 channels * ceil(37/8) words; values: 37 tokens * 8 words
    assert_eq!(m.code_bytes, (64 * 5 + 37 * 8) * 4);
    // keys: 64 * ceil(37/32) groups; values: 37 * 2 groups
    assert_eq!(m.scale_bytes, (64 * 2 + 37 * 2) * 2);
    // staging of the partial key group: 5 tokens
    assert_eq!(m.full_precision_bytes, 5 * 64 * 2);
}

#[test]
fn blocks_are_reused_after_remove() {
    let mut cache = KiviCache::new(KiviConfig::kivi2(), shape(2, 64)).unwrap();
    let mut r = rng(2);
    let x = kv_data(&mut r, 600, 2, 64);
    let a = cache.add_sequence();
    cache.append(0, a, &x, &x).unwrap();
    let before = cache.memory_reserved();
    cache.remove_sequence(a).unwrap();
    let b = cache.add_sequence();
    cache.append(0, b, &x, &x).unwrap();
    assert_eq!(cache.memory_reserved().code_bytes, before.code_bytes);
    // and the reused blocks give the same contents as fresh ones
    let mut fresh = KiviCache::new(KiviConfig::kivi2(), shape(2, 64)).unwrap();
    let f = fresh.add_sequence();
    fresh.append(0, f, &x, &x).unwrap();
    assert_eq!(
        cache.dequantized(0, b).unwrap(),
        fresh.dequantized(0, f).unwrap()
    );
    let _ = r.gen::<u8>();
}

#[test]
fn per_layer_key_bits_follow_the_mask() {
    // Layers 1 and 3 with 4-bit keys, the others 2-bit: every layer's attention matches the f64
    // model of its own configuration, through prefill chunks and decode steps of two sequences;
    // the memory and block accounting add up per layer.
    let (nh, hd, n_rep) = (2, 32, 2);
    let n_layer = 4;
    let shape = CacheShape {
        n_layer,
        n_kv_head: nh,
        head_dim: hd,
    };
    let kc = KiviConfig {
        key4_layers: 0b1010,
        ..cfg(2, 32, 64)
    };
    let mut cache = new_cache(&CacheConfig::Kivi(kc), shape).unwrap();
    assert_eq!(cache.config(), &CacheConfig::Kivi(kc));
    let per_layer = |l: usize| KiviConfig {
        k_bits: kc.key_bits(l),
        key4_layers: 0,
        ..kc
    };
    assert_eq!(
        (0..n_layer).map(|l| kc.key_bits(l)).collect::<Vec<_>>(),
        [2, 4, 2, 4]
    );
    let mut r = rng(41);
    let row = nh * hd;
    let seqs = [cache.add_sequence(), cache.add_sequence()];
    let total = [300, 231];
    let data: Vec<[Vec<f32>; 2]> = total
        .iter()
        .map(|&n| [kv_data(&mut r, n, nh, hd), kv_data(&mut r, n, nh, hd)])
        .collect();
    let mut n = [0usize; 2];
    for step in [150, 1, 1, 70, 1, 9] {
        for (i, &s) in seqs.iter().enumerate() {
            let step = step.min(total[i] - n[i]);
            let [k, v] = &data[i];
            let (kn, vn) = (
                &k[n[i] * row..(n[i] + step) * row],
                &v[n[i] * row..(n[i] + step) * row],
            );
            for layer in 0..n_layer {
                let q = uniform(&mut r, step * nh * n_rep * hd, -0.6, 0.6);
                let mut out = vec![0f32; q.len()];
                cache
                    .attend(layer, nh * n_rep, s, &q, kn, vn, &mut out)
                    .unwrap();
                let want = expected_attention(
                    Some(&per_layer(layer)),
                    nh * n_rep,
                    nh,
                    hd,
                    &k[..n[i] * row],
                    &v[..n[i] * row],
                    &q,
                    kn,
                    vn,
                );
                let e = max_err(&out, &want);
                let bound = attention_bound(Isa::detect());
                assert!(e < bound, "layer {layer} seq {i} n {}: error {e}", n[i]);
                cache.append(layer, s, kn, vn).unwrap();
            }
            n[i] += step;
        }
    }
    // Memory: each layer as a plain cache of its own configuration would hold.
    let mut want = 0;
    for layer in 0..n_layer {
        let mut single = KiviCache::new(per_layer(layer), shape).unwrap();
        for (i, [k, v]) in data.iter().enumerate() {
            let s = single.add_sequence();
            single
                .append(layer, s, &k[..n[i] * row], &v[..n[i] * row])
                .unwrap();
        }
        want += single.memory().total_bytes();
    }
    assert_eq!(cache.memory().total_bytes(), want);
    let blocks: usize = n.iter().map(|&l| cache.blocks_for_tokens(l)).sum();
    assert_eq!(cache.blocks_in_use(), blocks);
    for s in seqs {
        cache.remove_sequence(s).unwrap();
    }
    assert_eq!((cache.blocks_in_use(), cache.n_sequences()), (0, 0));
    assert_eq!(cache.memory().total_bytes(), 0);
    // Choosing among more than 64 layers (the mask's width) is refused, not wrapped.
    let deep = CacheShape {
        n_layer: 65,
        ..shape
    };
    let auto1 = KiviConfig {
        key4_layers: 0,
        key4_auto: 1,
        ..kc
    };
    assert!(matches!(
        new_cache(&CacheConfig::Kivi(auto1), deep),
        Err(Error::InvalidConfig(_))
    ));
    // A plain KiviCache refuses a mask; so do masks beyond the model and non-2-bit keys.
    assert!(KiviCache::new(kc, shape).is_err());
    for bad in [
        KiviConfig {
            key4_layers: 1 << 4,
            ..kc
        },
        KiviConfig { k_bits: 4, ..kc },
        KiviConfig {
            key4_layers: 0,
            key4_auto: 5,
            ..kc
        },
    ] {
        assert!(matches!(
            new_cache(&CacheConfig::Kivi(bad), shape),
            Err(Error::InvalidConfig(_))
        ));
    }
}

#[test]
fn key4_layers_chosen_on_the_fly_by_logit_error() {
    // Four layers, one chosen for 4-bit keys: the layer whose queries are 8x larger (so its
    // 2-bit keys disturb the logits most). Before the choice every layer reads 4-bit keys;
    // after it, each layer matches the f64 model of its own bits, and only the chosen layer's
    // 4-bit copy is kept.
    use kivi_core::cache::mixed::MEASURE_TOKENS;
    use kivi_core::MixedLayerCache;
    let (nh, hd, n_rep, n_layer, loud) = (2, 32, 2, 4, 2);
    let shape = CacheShape {
        n_layer,
        n_kv_head: nh,
        head_dim: hd,
    };
    let kc = KiviConfig {
        key4_auto: 1,
        sink_tokens: 4,
        ..cfg(2, 32, 32)
    };
    let mut cache = MixedLayerCache::new(kc, shape).unwrap();
    let with_bits = |b: u8| KiviConfig {
        k_bits: b,
        key4_auto: 0,
        ..kc
    };
    let mut r = rng(43);
    let row = nh * hd;
    let unused = cache.add_sequence();
    cache.remove_sequence(unused).unwrap(); // the measured sequence is the next one
    let s = cache.add_sequence();
    let total = 4 + MEASURE_TOKENS + 40;
    let (k, v) = (
        kv_data(&mut r, total, nh, hd),
        kv_data(&mut r, total, nh, hd),
    );
    let mut n = 0;
    for step in [100, 1, 31, 1, 3, 1, 1, 20] {
        assert_eq!(
            cache.key4_layers().is_none(),
            n < 4 + MEASURE_TOKENS,
            "n {n}"
        );
        let (kn, vn) = (&k[n * row..(n + step) * row], &v[n * row..(n + step) * row]);
        for layer in 0..n_layer {
            let amp = if layer == loud { 4.8 } else { 0.6 };
            let q = uniform(&mut r, step * nh * n_rep * hd, -amp, amp);
            let mut out = vec![0f32; q.len()];
            cache
                .attend(layer, nh * n_rep, s, &q, kn, vn, &mut out)
                .unwrap();
            let bits = match cache.key4_layers() {
                None => 4,
                Some(mask) if mask >> layer & 1 == 1 => 4,
                Some(_) => 2,
            };
            let want = expected_attention(
                Some(&with_bits(bits)),
                nh * n_rep,
                nh,
                hd,
                &k[..n * row],
                &v[..n * row],
                &q,
                kn,
                vn,
            );
            let e = max_err(&out, &want);
            let bound = attention_bound(Isa::detect());
            assert!(
                e < bound,
                "layer {layer} n {n} ({bits}-bit keys): error {e}"
            );
            cache.append(layer, s, kn, vn).unwrap();
        }
        n += step;
    }
    assert_eq!(cache.key4_layers(), Some(1 << loud));
    let mut want = 0;
    for layer in 0..n_layer {
        let b = if layer == loud { 4 } else { 2 };
        let mut single = KiviCache::new(with_bits(b), shape).unwrap();
        let t = single.add_sequence();
        single
            .append(layer, t, &k[..n * row], &v[..n * row])
            .unwrap();
        want += single.memory().total_bytes();
    }
    assert_eq!(cache.memory().total_bytes(), want);
    assert_eq!(cache.blocks_in_use(), cache.blocks_for_tokens(n));
    cache.remove_sequence(s).unwrap();
    assert_eq!(
        (cache.blocks_in_use(), cache.memory().total_bytes()),
        (0, 0)
    );
}
