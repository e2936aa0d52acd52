//! Quantization and packing against the f64 reference (`quant::reference`).

use half::f16;
use kivi_core::quant::reference::{quantize_group_ref, unpack_ref};
use kivi_core::quant::{self, codes_per_word, max_code};
use proptest::prelude::*;

fn bits() -> impl Strategy<Value = u8> {
    prop_oneof![Just(2u8), Just(4u8), Just(8u8)]
}

/// Group values: f16-representable (as the cache feeds them), various ranges, sometimes constant.
fn group() -> impl Strategy<Value = Vec<f32>> {
    (
        1usize..=128,
        -1000.0f32..1000.0,
        0.0f32..50.0,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(n, center, spread, constant, seed)| {
            let mut s = seed;
            (0..n)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                    let x = if constant {
                        center
                    } else {
                        center + spread * u as f32
                    };
                    f16::from_f32(x).to_f32()
                })
                .collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Parameters equal the reference exactly; codes equal it except within 1e-6 of a rounding
    /// tie; every element reconstructs within scale/2 (+ f32 rounding); never NaN.
    #[test]
    fn group_matches_reference(x in group(), bits in bits()) {
        let mut codes = vec![0u32; x.len()];
        let p = quant::quantize_group(&x, bits, &mut codes);
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let r = quantize_group_ref(&x64, bits);
        prop_assert_eq!(p.min.to_f64(), r.min);
        prop_assert_eq!(p.scale.to_f64(), r.scale);
        for (i, &v) in x.iter().enumerate() {
            prop_assert!(codes[i] <= max_code(bits));
            if codes[i] != r.codes[i] {
                let t = (x64[i] - r.min) / r.scale;
                prop_assert!((t - t.floor() - 0.5).abs() < 1e-6, "code {} vs ref {} at t={}", codes[i], r.codes[i], t);
            }
            let y = quant::dequantize_value(codes[i], p);
            prop_assert!(y.is_finite());
            let bound = r.scale / 2.0 + 1e-6 * (1.0 + v.abs() as f64);
            prop_assert!((y as f64 - v as f64).abs() <= bound, "{} -> {} (scale {})", v, y, r.scale);
        }
        if x.iter().all(|&v| v == x[0]) {
            // constant group: exact
            prop_assert_eq!(p.scale.to_f32(), 0.0);
            prop_assert!(codes.iter().all(|&c| quant::dequantize_value(c, p) == x[0]));
        }
    }

    /// Arbitrary f32 inputs (not f16-representable): still within scale/2, finite.
    #[test]
    fn arbitrary_f32_within_half_scale(x in prop::collection::vec(-60000.0f32..60000.0, 1..64), bits in bits()) {
        let mut codes = vec![0u32; x.len()];
        let p = quant::quantize_group(&x, bits, &mut codes);
        let bound = p.scale.to_f64() / 2.0;
        for (&v, &c) in x.iter().zip(&codes) {
            let y = quant::dequantize_value(c, p) as f64;
            prop_assert!((y - v as f64).abs() <= bound + 1e-6 * (1.0 + v.abs() as f64));
        }
    }

    /// Pack then unpack is the identity, and the bit order matches the reference reader.
    #[test]
    fn pack_unpack_roundtrip(bits in bits(), words in 1usize..8, seed in any::<u64>()) {
        let fpi = codes_per_word(bits);
        let mut s = seed;
        let codes: Vec<u32> = (0..words * fpi).map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 33) as u32) & max_code(bits)
        }).collect();
        let mut w = vec![0u32; words];
        quant::pack(&codes, bits, &mut w);
        let mut back = vec![0u32; codes.len()];
        quant::unpack(&w, bits, &mut back);
        prop_assert_eq!(&back, &codes);
        for (i, &c) in codes.iter().enumerate() {
            prop_assert_eq!(unpack_ref(&w, bits, i), c);
            prop_assert_eq!(quant::code_at(&w, bits, i), c);
        }
    }
}

#[test]
fn constant_groups_every_bit_width() {
    for bits in [2, 4, 8] {
        for c in [0.0f32, -3.5, 1024.0, 65504.0, -65504.0, 6e-8] {
            let x = vec![c; 32];
            let mut codes = vec![7u32; 32];
            let p = quant::quantize_group(&x, bits, &mut codes);
            for &code in &codes {
                let y = quant::dequantize_value(code, p);
                assert_eq!(y, f16::from_f32(c).to_f32(), "bits {bits} c {c}");
            }
        }
    }
}

#[test]
fn error_bound_per_bit_width() {
    // Uniform data in [0, 1]: the max error is about range / (2 (2^b - 1)).
    let x: Vec<f32> = (0..32).map(|i| i as f32 / 31.0).collect();
    for (bits, expect) in [(2u8, 1.0 / 6.0), (4, 1.0 / 30.0), (8, 1.0 / 510.0)] {
        let mut codes = vec![0u32; 32];
        let p = quant::quantize_group(&x, bits, &mut codes);
        let err = x
            .iter()
            .zip(&codes)
            .map(|(&v, &c)| (quant::dequantize_value(c, p) - v).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= expect * 1.01, "bits {bits}: err {err} > {expect}");
        assert!(
            err >= expect * 0.5,
            "bits {bits}: err {err} suspiciously small"
        );
    }
}
