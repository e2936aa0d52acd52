//! Every SIMD kernel against its scalar twin, on random shapes and data.
#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use half::f16;
use kivi_core::attn::{cpu, k_scores, v_accumulate, ChanSeg, Isa, SegData, TokSeg};
use kivi_core::quant::{codes_per_word, max_code};
use proptest::prelude::*;
use rand::Rng;

fn close(a: &[f32], b: &[f32]) -> bool {
    let scale = 1.0 + b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 2e-5 * scale)
}

/// An f32 sum of `n_terms` products against its f64 value `s`: within 1e-4 relative, or within
/// the f32 accumulation bound (about n·eps·Σ|terms|), which is what applies when the terms
/// cancel and |s| is small.
fn near_f64(got: f32, s: f64, abs_sum: f64, n_terms: usize) -> bool {
    let err = (got as f64 - s).abs();
    err < 1e-4 * (1.0 + s.abs()) || err <= (n_terms + 2) as f64 * f32::EPSILON as f64 * abs_sum
}

fn f16s(r: &mut rand::rngs::StdRng, n: usize, lo: f32, hi: f32) -> Vec<f16> {
    (0..n).map(|_| f16::from_f32(r.gen_range(lo..hi))).collect()
}

fn bits_group() -> impl Strategy<Value = (u8, usize)> {
    (
        prop_oneof![Just(2u8), Just(4), Just(8)],
        prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
    )
        .prop_map(|(b, m)| (b, codes_per_word(b).max(8) * m))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn f16_kernels_match_scalar(hd in prop_oneof![Just(8usize), Just(24), Just(32), Just(40), Just(64), Just(72), Just(128), Just(256)],
                                extra in 0usize..3, t0 in 0usize..5, n in 0usize..40, seed in any::<u64>()) {
        let mut r = rng(seed);
        let stride = hd * (1 + extra);
        let rows = f16s(&mut r, (t0 + n + 1) * stride, -3.0, 3.0);
        let q = uniform(&mut r, hd, -1.0, 1.0);
        let p = uniform(&mut r, n, 0.0, 1.0);
        let init = uniform(&mut r, hd, -1.0, 1.0);
        let seg = SegData::F16 { rows: &rows, stride };
        let mut want = vec![0f32; n];
        cpu::k_f16(&q, &rows, stride, t0, n, &mut want);
        let mut want_v = init.clone();
        cpu::v_f16(&p, &rows, stride, t0, n, &mut want_v);
        for isa in Isa::all_supported() {
            let mut got = vec![0f32; n];
            k_scores(isa, &q, &seg, t0, n, &mut got);
            prop_assert!(close(&got, &want), "{:?} k_f16", isa);
            let mut got_v = init.clone();
            v_accumulate(isa, &p, &seg, t0, n, &mut got_v);
            prop_assert!(close(&got_v, &want_v), "{:?} v_f16", isa);
        }
    }

    #[test]
    fn per_channel_key_kernels_match_scalar((bits, g) in bits_group(), hd in 1usize..70, groups in 1usize..6,
                                            t0 in 0usize..200, n in 0usize..200, seed in any::<u64>()) {
        let mut r = rng(seed);
        let fpi = codes_per_word(bits);
        let bt = groups * g;
        let (t0, n) = (t0 % bt, n % (bt + 1));
        let n = n.min(bt - t0);
        let wpr = bt / fpi;
        let codes: Vec<u32> = (0..hd * wpr).map(|_| r.gen()).collect();
        let scales = f16s(&mut r, hd * groups, 0.0, 0.5);
        let mins = f16s(&mut r, hd * groups, -2.0, 0.0);
        let seg = ChanSeg { codes: &codes, scales: &scales, mins: &mins, words_per_row: wpr, groups_per_row: groups, bits, group: g };
        let q = uniform(&mut r, hd, -1.0, 1.0);
        let mut want = vec![0f32; n];
        cpu::k_chan(&q, &seg, t0, n, &mut want);
        // the scalar kernel itself against a per-element dequantization
        for (i, w) in want.iter().enumerate() {
            let t = t0 + i;
            let (mut s, mut s_abs) = (0.0f64, 0.0f64);
            for d in 0..hd {
                let c = kivi_core::quant::reference::unpack_ref(&codes[d * wpr..], bits, t);
                let m = (t / g) * hd + d;
                let term = q[d] as f64 * (c as f64 * scales[m].to_f64() + mins[m].to_f64());
                s += term;
                s_abs += term.abs();
            }
            prop_assert!(near_f64(*w, s, s_abs, hd));
        }
        // the integer twin of the VNNI kernel against the same per-element form: its error is
        // the 16-bit query quantization, at most hd·alpha/2·max_code per score
        let twin_bits = matches!(bits, 2 | 4);
        let mut want_q16 = vec![0f32; n];
        if twin_bits {
            cpu::k_chan_q16(&q, &seg, t0, n, &mut want_q16);
        }
        for (i, w) in want_q16.iter().enumerate().filter(|_| twin_bits) {
            let t = t0 + i;
            let mut iq = vec![0i32; hd];
            let (alpha, _) = cpu::quantize_query_q16(&q, &seg, t / g, &mut iq);
            let bound = hd as f32 * 0.5 * max_code(bits) as f32 * alpha + 1e-5 * (1.0 + want[i].abs());
            prop_assert!((w - want[i]).abs() <= bound, "q16 key err {} > {}", (w - want[i]).abs(), bound);
        }
        for isa in Isa::all_supported() {
            let mut got = vec![0f32; n];
            k_scores(isa, &q, &SegData::Chan(seg), t0, n, &mut got);
            let twin = if isa == Isa::Avx512Vnni && cpu::k_chan_q16_shape(hd, &seg) { &want_q16 } else { &want };
            prop_assert!(close(&got, twin), "{:?} k_chan bits {} g {}", isa, bits, g);
        }
        // values per channel (research mode): scalar against the per-element form
        let p = uniform(&mut r, n, 0.0, 1.0);
        let mut acc = vec![0f32; hd];
        cpu::v_chan(&p, &seg, t0, n, &mut acc);
        for (d, a) in acc.iter().enumerate() {
            let (mut s, mut s_abs) = (0.0f64, 0.0f64);
            for (i, &pi) in p.iter().enumerate() {
                let t = t0 + i;
                let c = kivi_core::quant::reference::unpack_ref(&codes[d * wpr..], bits, t);
                let m = (t / g) * hd + d;
                let term = pi as f64 * (c as f64 * scales[m].to_f64() + mins[m].to_f64());
                s += term;
                s_abs += term.abs();
            }
            prop_assert!(near_f64(*a, s, s_abs, n));
        }
    }

    #[test]
    fn per_token_value_kernels_match_scalar((bits, g) in bits_group(), gpt in 1usize..5, t0 in 0usize..50,
                                            n in 0usize..60, seed in any::<u64>()) {
        per_token_value_case(bits, g, gpt, t0, n, seed)?;

    }
}

/// Per-token value kernels (and the research per-token key kernel) against the scalar kernel
/// and an f64 re-computation, for one random case.
fn per_token_value_case(
    bits: u8,
    g: usize,
    gpt: usize,
    t0: usize,
    n: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut r = rng(seed);
    let fpi = codes_per_word(bits);
    let hd = g * gpt;
    let wpt = hd / fpi;
    let nt = t0 + n;
    let codes: Vec<u32> = (0..nt * wpt).map(|_| r.gen()).collect();
    let scales = f16s(&mut r, nt * gpt, 0.0, 0.5);
    let mins = f16s(&mut r, nt * gpt, -2.0, 0.0);
    let seg = TokSeg {
        codes: &codes,
        scales: &scales,
        mins: &mins,
        bits,
        group: g,
    };
    let p = uniform(&mut r, n, 0.0, 1.0);
    let init = uniform(&mut r, hd, -1.0, 1.0);
    let mut want = init.clone();
    cpu::v_tok(&p, &seg, t0, n, &mut want);
    for d in 0..hd {
        let (mut s, mut s_abs) = (init[d] as f64, init[d].abs() as f64);
        for (i, &pi) in p.iter().enumerate() {
            let t = t0 + i;
            let c = kivi_core::quant::reference::unpack_ref(&codes[t * wpt..], bits, d);
            let m = t * gpt + d / g;
            let term = pi as f64 * (c as f64 * scales[m].to_f64() + mins[m].to_f64());
            s += term;
            s_abs += term.abs();
        }
        prop_assert!(near_f64(want[d], s, s_abs, n + 1));
    }
    // the integer twin of the VNNI kernel: its error is the 16-bit weight quantization, at
    // most alpha/2·max_code per token (alpha = max p·scale of the token's 64-token sub-chunk /
    // 65535)
    let mut want_q16 = init.clone();
    if matches!(bits, 2 | 4) && g.is_multiple_of(16) {
        cpu::v_tok_q16(&p, &seg, t0, n, &mut want_q16);
        let mut bound = 0f32;
        for c in (0..n).step_by(cpu::Q16_VAL_SUB) {
            let hi = n.min(c + cpu::Q16_VAL_SUB);
            let amax = (c..hi)
                .flat_map(|i| (0..gpt).map(move |gi| (i, gi)))
                .map(|(i, gi)| p[i] * scales[(t0 + i) * gpt + gi].to_f32())
                .fold(0f32, f32::max);
            bound += (hi - c) as f32 * 0.5 * max_code(bits) as f32 * amax / cpu::Q16_VAL_MAX;
        }
        for d in 0..hd {
            let e = (want_q16[d] - want[d]).abs();
            prop_assert!(
                e <= bound + 1e-5 * (1.0 + want[d].abs()),
                "q16 value err {} > {}",
                e,
                bound
            );
        }
    }
    for isa in Isa::all_supported() {
        let mut got = init.clone();
        v_accumulate(isa, &p, &SegData::Tok(seg), t0, n, &mut got);
        let twin = if isa == Isa::Avx512Vnni && cpu::v_tok_q16_shape(hd, &seg) {
            &want_q16
        } else {
            &want
        };
        prop_assert!(
            close(&got, twin),
            "{:?} v_tok bits {} g {} hd {}",
            isa,
            bits,
            g,
            hd
        );
    }
    // keys per token (research mode): scalar against the per-element form
    let q = uniform(&mut r, hd, -1.0, 1.0);
    let mut sc = vec![0f32; n];
    cpu::k_tok(&q, &seg, t0, n, &mut sc);
    for (i, w) in sc.iter().enumerate() {
        let t = t0 + i;
        let (mut s, mut s_abs) = (0.0f64, 0.0f64);
        for d in 0..hd {
            let c = kivi_core::quant::reference::unpack_ref(&codes[t * wpt..], bits, d);
            let m = t * gpt + d / g;
            let term = q[d] as f64 * (c as f64 * scales[m].to_f64() + mins[m].to_f64());
            s += term;
            s_abs += term.abs();
        }
        prop_assert!(near_f64(*w, s, s_abs, hd));
    }
    Ok(())
}

#[test]
fn per_token_value_kernels_cancellation_case() {
    // Found by the proptest above: 8-bit codes whose key score sums to nearly zero. The f32
    // kernel is exact to its accumulation error, which scales with the sum of |terms|, not |sum|.
    per_token_value_case(8, 64, 4, 31, 55, 2135826271033342597).unwrap();
}

#[test]
fn this_machine_uses_simd() {
    // Not a correctness test: documents which path the tests above exercised.
    eprintln!(
        "supported: {:?}, detected: {:?}",
        Isa::all_supported(),
        Isa::detect()
    );
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        assert!(matches!(
            Isa::best_supported(),
            Isa::Avx512 | Isa::Avx512Vnni
        ));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// GQA kernels (several queries per decoded code) against the scalar kernels query by query.
    #[test]
    fn multi_query_kernels_match_scalar((bits, g) in bits_group(), m in 1usize..9, gpt in 1usize..5,
                                        groups in 1usize..5, t0 in 0usize..100, n in 0usize..100, seed in any::<u64>()) {
        let mut r = rng(seed);
        let fpi = codes_per_word(bits);
        let hd = g * gpt;
        // per-channel keys
        let bt = groups * g;
        let (t0c, nc) = (t0 % bt, n % (bt + 1));
        let nc = nc.min(bt - t0c);
        let wpr = bt / fpi;
        let codes: Vec<u32> = (0..hd * wpr).map(|_| r.gen()).collect();
        let scales = f16s(&mut r, hd * groups, 0.0, 0.5);
        let mins = f16s(&mut r, hd * groups, -2.0, 0.0);
        let seg = SegData::Chan(ChanSeg { codes: &codes, scales: &scales, mins: &mins, words_per_row: wpr, groups_per_row: groups, bits, group: g });
        let q = uniform(&mut r, m * hd, -1.0, 1.0);
        let stride = nc + 3;
        let cseg = match &seg { SegData::Chan(s) => *s, _ => unreachable!() };
        let mut want = vec![0f32; m * stride];
        let mut want_q16 = vec![0f32; m * stride];
        for i in 0..m {
            cpu::k_chan(&q[i * hd..(i + 1) * hd], &cseg, t0c, nc, &mut want[i * stride..]);
            if matches!(bits, 2 | 4) {
                cpu::k_chan_q16(&q[i * hd..(i + 1) * hd], &cseg, t0c, nc, &mut want_q16[i * stride..]);
            }
        }
        for isa in Isa::all_supported() {
            let mut got = vec![0f32; m * stride];
            kivi_core::attn::k_scores_multi(isa, &q, m, &seg, t0c, nc, &mut got, stride);
            let twin = if isa == Isa::Avx512Vnni && cpu::k_chan_q16_shape(hd, &cseg) { &want_q16 } else { &want };
            prop_assert!(close(&got, twin), "{:?} k multi m {} bits {} g {}", isa, m, bits, g);
        }
        // per-token values
        let nt = t0 + n;
        let wpt = hd / fpi;
        let vcodes: Vec<u32> = (0..nt * wpt).map(|_| r.gen()).collect();
        let vs = f16s(&mut r, nt * gpt, 0.0, 0.5);
        let vm = f16s(&mut r, nt * gpt, -2.0, 0.0);
        let tseg = TokSeg { codes: &vcodes, scales: &vs, mins: &vm, bits, group: g };
        let pst = n + 2;
        let p = uniform(&mut r, m * pst, 0.0, 1.0);
        let init = uniform(&mut r, m * hd, -1.0, 1.0);
        let mut want = init.clone();
        let mut want_q16 = init.clone();
        for i in 0..m {
            cpu::v_tok(&p[i * pst..], &tseg, t0, n, &mut want[i * hd..(i + 1) * hd]);
            if matches!(bits, 2 | 4) {
                cpu::v_tok_q16(&p[i * pst..], &tseg, t0, n, &mut want_q16[i * hd..(i + 1) * hd]);
            }
        }
        // f16 rows (GQA path of the baseline)
        let frows = f16s(&mut r, nt * hd, -2.0, 2.0);
        let fseg = SegData::F16 { rows: &frows, stride: hd };
        let fq = uniform(&mut r, m * hd, -1.0, 1.0);
        let mut fwant_k = vec![0f32; m * pst];
        let mut fwant_v = init.clone();
        for i in 0..m {
            cpu::k_f16(&fq[i * hd..(i + 1) * hd], &frows, hd, t0, n, &mut fwant_k[i * pst..]);
            cpu::v_f16(&p[i * pst..], &frows, hd, t0, n, &mut fwant_v[i * hd..(i + 1) * hd]);
        }
        for isa in Isa::all_supported() {
            let mut gk = vec![0f32; m * pst];
            kivi_core::attn::k_scores_multi(isa, &fq, m, &fseg, t0, n, &mut gk, pst);
            prop_assert!(close(&gk, &fwant_k), "{:?} f16 k multi m {} hd {}", isa, m, hd);
            let mut gv = init.clone();
            kivi_core::attn::v_accumulate_multi(isa, &p, pst, m, &fseg, t0, n, &mut gv);
            prop_assert!(close(&gv, &fwant_v), "{:?} f16 v multi m {} hd {}", isa, m, hd);
        }
        for isa in Isa::all_supported() {
            let mut got = init.clone();
            kivi_core::attn::v_accumulate_multi(isa, &p, pst, m, &SegData::Tok(tseg), t0, n, &mut got);
            let twin = if isa == Isa::Avx512Vnni && cpu::v_tok_q16_shape(hd, &tseg) { &want_q16 } else { &want };
            prop_assert!(close(&got, twin), "{:?} v multi m {} bits {} g {} hd {}", isa, m, bits, g, hd);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The softmax exponential on every ISA against f64 `exp`.
    #[test]
    fn exp_kernels_match_f64(x in prop::collection::vec(-120.0f32..0.0, 0..70), shift in -3.0f32..3.0) {
        for isa in Isa::all_supported() {
            let mut y: Vec<f32> = x.iter().map(|v| v + shift).collect();
            let sum = kivi_core::attn::exp_shift_sum(isa, &mut y, shift);
            let mut want_sum = 0.0f64;
            for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
                let arg = ((xi + shift) - shift) as f64;
                let w = if arg < -87.3 { 0.0 } else { arg.exp() };
                want_sum += w;
                prop_assert!((yi as f64 - w).abs() <= 5e-7 * w + 1e-37, "{:?} [{}] exp({}) = {} vs {}", isa, i, arg, yi, w);
            }
            prop_assert!((sum as f64 - want_sum).abs() <= 1e-5 * want_sum + 1e-30);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// 2- and 4-bit shapes of the AVX-512 VNNI kernels (the generic tests above reach them
    /// rarely): the kernels against their integer twins, the twins against the float kernels
    /// within the 16-bit quantization bound.
    #[test]
    fn vnni_kernels_match_integer_twins(bits in prop_oneof![Just(2u8), Just(4)],
                                        g in prop_oneof![Just(16usize), Just(32), Just(64), Just(128)],
                                        hd in prop_oneof![Just(16usize), Just(32), Just(64), Just(128), Just(256)],
                                        m in 1usize..9, chunks in 1usize..5, t0 in 0usize..300, n in 0usize..300,
                                        seed in any::<u64>()) {
        let mut r = rng(seed);
        // per-channel keys: rows of whole groups and a multiple of 16 bytes (64 tokens of 2
        // bits, 32 of 4)
        let (fpi, chunk) = (codes_per_word(bits), 128 / bits as usize);
        let bound = |alpha: f32, n: usize| n as f32 * 0.5 * max_code(bits) as f32 * alpha;
        let bt = (chunk * chunks).div_ceil(g) * g;
        let bt = bt.div_ceil(chunk) * chunk;
        let groups = bt / g;
        let (t0c, nc) = (t0 % bt, n % (bt + 1));
        let nc = nc.min(bt - t0c);
        let wpr = bt / fpi;
        let codes: Vec<u32> = (0..hd * wpr).map(|_| r.gen()).collect();
        let scales = f16s(&mut r, hd * groups, 0.0, 0.5);
        let mins = f16s(&mut r, hd * groups, -2.0, 0.0);
        let seg = ChanSeg { codes: &codes, scales: &scales, mins: &mins, words_per_row: wpr, groups_per_row: groups, bits, group: g };
        let q = uniform(&mut r, m * hd, -1.0, 1.0);
        let stride = nc + 1;
        let (mut want, mut want_f) = (vec![0f32; m * stride], vec![0f32; m * stride]);
        for i in 0..m {
            cpu::k_chan_q16(&q[i * hd..(i + 1) * hd], &seg, t0c, nc, &mut want[i * stride..]);
            cpu::k_chan(&q[i * hd..(i + 1) * hd], &seg, t0c, nc, &mut want_f[i * stride..]);
            for j in 0..nc {
                let mut iq = vec![0i32; hd];
                let (alpha, _) = cpu::quantize_query_q16(&q[i * hd..(i + 1) * hd], &seg, (t0c + j) / g, &mut iq);
                let (a, b) = (want[i * stride + j], want_f[i * stride + j]);
                prop_assert!((a - b).abs() <= bound(alpha, hd) + 1e-5 * (1.0 + b.abs()));
            }
        }
        for isa in Isa::all_supported() {
            let mut got = vec![0f32; m * stride];
            kivi_core::attn::k_scores_multi(isa, &q, m, &SegData::Chan(seg), t0c, nc, &mut got, stride);
            let twin = if isa == Isa::Avx512Vnni && cpu::k_chan_q16_shape(hd, &seg) { &want } else { &want_f };
            prop_assert!(close(&got, twin), "{:?} keys bits {} m {} g {} hd {} t0 {} n {}", isa, bits, m, g, hd, t0c, nc);
        }
        // per-token values
        if hd % g == 0 && hd / g <= 4 {
            let gpt = hd / g;
            let nt = t0 + n;
            let wpt = hd / fpi;
            let vcodes: Vec<u32> = (0..nt * wpt).map(|_| r.gen()).collect();
            let vs = f16s(&mut r, nt * gpt, 0.0, 0.5);
            let vm = f16s(&mut r, nt * gpt, -2.0, 0.0);
            let tseg = TokSeg { codes: &vcodes, scales: &vs, mins: &vm, bits, group: g };
            let pst = n + 2;
            // softmax-like weights: a few large, most small
            let p: Vec<f32> = (0..m * pst).map(|_| r.gen_range(-12.0f32..0.0).exp()).collect();
            let init = uniform(&mut r, m * hd, -1.0, 1.0);
            let (mut want, mut want_f) = (init.clone(), init.clone());
            for i in 0..m {
                cpu::v_tok_q16(&p[i * pst..], &tseg, t0, n, &mut want[i * hd..(i + 1) * hd]);
                cpu::v_tok(&p[i * pst..], &tseg, t0, n, &mut want_f[i * hd..(i + 1) * hd]);
            }
            for isa in Isa::all_supported() {
                let mut got = init.clone();
                kivi_core::attn::v_accumulate_multi(isa, &p, pst, m, &SegData::Tok(tseg), t0, n, &mut got);
                let twin = if isa == Isa::Avx512Vnni && cpu::v_tok_q16_shape(hd, &tseg) { &want } else { &want_f };
                prop_assert!(close(&got, twin), "{:?} values bits {} m {} g {} hd {} t0 {} n {}", isa, bits, m, g, hd, t0, n);
            }
        }
    }
}
