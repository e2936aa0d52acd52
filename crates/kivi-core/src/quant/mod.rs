//! Asymmetric group quantization with a float zero point (kivi.md §1.1) and LSB-first packing
//! into u32 words (kivi.md §1.3).
//!
//! One group of `G` values `x` gets an f16 `min` and an f16 `scale`, and each value a code in
//! `[0, 2^b - 1]`; dequantization is `code * scale + min` in f32.
//!
//! Rounding of the stored parameters (a deliberate refinement of the reference, which rounds
//! everything to nearest in fp16):
//! - `min` is the largest f16 `<= min(x)` (rounded down), so `x - min >= 0` always;
//! - `scale` is the smallest f16 `>= (max(x) - min) / (2^b - 1)` (rounded up), computed from the
//!   already rounded `min`, so `(x - min) / scale <= 2^b - 1` always.
//!
//! Codes are then `round_half_even((x - min) / scale)` computed in f32 against the stored
//! (f16-rounded) `min` and `scale`, so dequantization uses exactly the stored values and every
//! element reconstructs within `scale / 2` of its input (plus f32 rounding), clamping never bites.
//! A constant group whose value is an f16 gets `scale = 0`, all codes 0, and reconstructs exactly;
//! never NaN.
//!
//! Bits 2, 4, 8; `32 / b` codes per word (`fpi` in kivi.md): element `j` of a word sits in bits
//! `[j*b, (j+1)*b)`.

pub mod reference;

use half::f16;

use crate::{Error, Result};

/// Codes per u32 word (`fpi`): 16 at 2 bits, 8 at 4 bits, 4 at 8 bits.
pub const fn codes_per_word(bits: u8) -> usize {
    32 / bits as usize
}

/// Largest code, `2^b - 1`.
pub const fn max_code(bits: u8) -> u32 {
    (1u32 << bits) - 1
}

/// Stored parameters of one group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    pub scale: f16,
    pub min: f16,
}

/// Next f16 towards +inf (finite inputs only).
fn f16_next_up(h: f16) -> f16 {
    let b = h.to_bits();
    if b == 0x8000 || b == 0 {
        f16::from_bits(0x0001)
    } else if b & 0x8000 == 0 {
        f16::from_bits(b + 1)
    } else {
        f16::from_bits(b - 1)
    }
}

/// Next f16 towards -inf (finite inputs only).
fn f16_next_down(h: f16) -> f16 {
    let b = h.to_bits();
    if b == 0 || b == 0x8000 {
        f16::from_bits(0x8001)
    } else if b & 0x8000 == 0 {
        f16::from_bits(b - 1)
    } else {
        f16::from_bits(b + 1)
    }
}

/// Largest f16 `<= v`. `v` must be finite and `>= -65504`.
pub fn f16_round_down(v: f64) -> f16 {
    let h = f16::from_f64(v);
    if h.to_f64() > v {
        f16_next_down(h)
    } else {
        h
    }
}

/// Smallest f16 `>= v`. `v` must be finite and `<= 65504`.
pub fn f16_round_up(v: f64) -> f16 {
    let h = f16::from_f64(v);
    if h.to_f64() < v {
        f16_next_up(h)
    } else {
        h
    }
}

/// Group parameters for values that are finite and within the f16 range (see [`check_input`]).
pub fn group_params(x: &[f32], bits: u8) -> GroupParams {
    debug_assert!(!x.is_empty());
    let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        mn = mn.min(v);
        mx = mx.max(v);
    }
    let min = f16_round_down(mn as f64);
    // Exact in f64: both are f32/f16 values.
    let range = mx as f64 - min.to_f64();
    let scale = if range == 0.0 {
        f16::ZERO
    } else {
        f16_round_up(range / max_code(bits) as f64)
    };
    GroupParams { scale, min }
}

/// Code of one value against stored parameters.
#[inline]
pub fn quantize_value(x: f32, p: GroupParams, bits: u8) -> u32 {
    let s = p.scale.to_f32();
    if s == 0.0 {
        return 0;
    }
    let c = ((x - p.min.to_f32()) / s).round_ties_even();
    c.clamp(0.0, max_code(bits) as f32) as u32
}

/// `code * scale + min` in f32.
#[inline]
pub fn dequantize_value(code: u32, p: GroupParams) -> f32 {
    code as f32 * p.scale.to_f32() + p.min.to_f32()
}

/// Quantizes one group: writes one code per element into `codes` and returns the parameters.
pub fn quantize_group(x: &[f32], bits: u8, codes: &mut [u32]) -> GroupParams {
    debug_assert_eq!(x.len(), codes.len());
    let p = group_params(x, bits);
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = quantize_value(v, p, bits);
    }
    p
}

/// Packs `codes` (each `< 2^b`) LSB first: `codes.len() == out.len() * 32 / b`.
pub fn pack(codes: &[u32], bits: u8, out: &mut [u32]) {
    let fpi = codes_per_word(bits);
    debug_assert_eq!(codes.len(), out.len() * fpi);
    for (w, chunk) in out.iter_mut().zip(codes.chunks_exact(fpi)) {
        let mut word = 0u32;
        for (j, &c) in chunk.iter().enumerate() {
            debug_assert!(c <= max_code(bits));
            word |= c << (j * bits as usize);
        }
        *w = word;
    }
}

/// Inverse of [`pack`].
pub fn unpack(words: &[u32], bits: u8, codes: &mut [u32]) {
    let fpi = codes_per_word(bits);
    debug_assert_eq!(codes.len(), words.len() * fpi);
    let mask = max_code(bits);
    for (&w, chunk) in words.iter().zip(codes.chunks_exact_mut(fpi)) {
        for (j, c) in chunk.iter_mut().enumerate() {
            *c = (w >> (j * bits as usize)) & mask;
        }
    }
}

/// Code `i` of a packed row.
#[inline]
pub fn code_at(words: &[u32], bits: u8, i: usize) -> u32 {
    let fpi = codes_per_word(bits);
    (words[i / fpi] >> ((i % fpi) * bits as usize)) & max_code(bits)
}

/// Rejects non-finite values and values outside the f16 range; every cache input passes here.
pub fn check_input(what: &'static str, x: &[f32]) -> Result<()> {
    for (index, &value) in x.iter().enumerate() {
        if !value.is_finite() {
            return Err(Error::NonFinite { what, index, value });
        }
        if value.abs() > f16::MAX.to_f32() {
            return Err(Error::OutOfRange { what, index, value });
        }
    }
    Ok(())
}

/// `k - Q(k)` of keys `[tokens][dim]` quantized to `bits` per channel in groups of `group`
/// consecutive tokens, over the whole groups only: `[used][dim]`, `used` a multiple of `group`.
fn key_residuals(k: &[f32], dim: usize, group: usize, bits: u8) -> Vec<f64> {
    let n = k.len().checked_div(dim).unwrap_or(0);
    let used = n - n % group.max(1);
    if group == 0 {
        return Vec::new();
    }
    let mut dk = vec![0f64; used * dim];
    let (mut col, mut codes) = (vec![0f32; group], vec![0u32; group]);
    for c in 0..dim {
        for g0 in (0..used).step_by(group) {
            for (i, x) in col.iter_mut().enumerate() {
                *x = k[(g0 + i) * dim + c];
            }
            let p = quantize_group(&col, bits, &mut codes);
            for i in 0..group {
                dk[(g0 + i) * dim + c] = col[i] as f64 - dequantize_value(codes[i], p) as f64;
            }
        }
    }
    dk
}

/// RMS error of the attention logits q_i·k_j / sqrt(d) when the keys of one KV head (`k`:
/// `[tokens][head_dim]`) are quantized to `bits` per channel in groups of `group` tokens, over
/// every `stride`-th query of the head's query heads (`q`: `[tokens][n_rep][head_dim]`) and the
/// quantized keys before it (tokens from `skip`, e.g. sinks kept exact, in whole groups). This
/// is what the softmax sees: an absolute logit error, which grows with the query's scale even
/// when the keys' relative error does not.
#[allow(clippy::too_many_arguments)]
pub fn logit_error_rms(
    q: &[f32],
    k: &[f32],
    head_dim: usize,
    n_rep: usize,
    group: usize,
    bits: u8,
    skip: usize,
    stride: usize,
) -> f64 {
    let d = head_dim;
    let n = k.len().checked_div(d).unwrap_or(0);
    if n <= skip {
        return 0.0;
    }
    // dk[t] for tokens skip..skip + used.
    let dk = key_residuals(&k[skip * d..], d, group, bits);
    let used = dk.len() / d;
    let (mut sum, mut count) = (0.0f64, 0u64);
    for i in (skip..n).step_by(stride.max(1)) {
        let visible = (i - skip).min(used);
        for r in 0..n_rep {
            let qi = &q[(i * n_rep + r) * d..(i * n_rep + r + 1) * d];
            for j in 0..visible {
                let e: f64 = (0..d).map(|c| qi[c] as f64 * dk[j * d + c]).sum();
                sum += e * e;
                count += 1;
            }
        }
    }
    if count == 0 {
        0.0
    } else {
        (sum / count as f64 / d as f64).sqrt()
    }
}

/// How much `bits`-bit per-channel quantization (groups of `group` consecutive tokens) disturbs
/// keys `[tokens][dim]`: ‖K − Q(K)‖ / ‖K − K̄‖ over whole groups, K̄ the per-channel mean. The
/// error of a score q·k relative to the spread of scores over tokens scales with it, so a layer
/// with a large value gains most from more key bits. 0 when fewer than `group` tokens.
pub fn key_quant_error(keys: &[f32], dim: usize, group: usize, bits: u8) -> f64 {
    let dk = key_residuals(keys, dim, group, bits);
    let used = dk.len().checked_div(dim).unwrap_or(0);
    if used == 0 {
        return 0.0;
    }
    let err: f64 = dk.iter().map(|e| e * e).sum();
    let mut spread = 0.0f64;
    for c in 0..dim {
        let mean = (0..used).map(|t| keys[t * dim + c] as f64).sum::<f64>() / used as f64;
        spread += (0..used)
            .map(|t| (keys[t * dim + c] as f64 - mean).powi(2))
            .sum::<f64>();
    }
    if spread == 0.0 {
        0.0
    } else {
        (err / spread).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_sensitivity_measures() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(rand::random());
        let (d, n_rep, n) = (8, 2, 64);
        // Codes 0..=3 of scale 1 and min = the channel index (every group of 32 tokens starts
        // with codes 0 and 3): 2-bit quantization is exact, so both measures are 0.
        let exact: Vec<f32> = (0..n * d)
            .map(|i| {
                let code = match (i / d) % 32 {
                    0 => 0,
                    1 => 3,
                    _ => r.gen_range(0..4),
                };
                code as f32 + (i % d) as f32
            })
            .collect();
        let q: Vec<f32> = (0..n * n_rep * d).map(|_| r.gen_range(-1.0..1.0)).collect();
        assert_eq!(key_quant_error(&exact, d, 32, 2), 0.0);
        assert_eq!(logit_error_rms(&q, &exact, d, n_rep, 32, 2, 0, 1), 0.0);
        // Random keys: a real error, below the bound of half a step per element; the logit error
        // is linear in the query.
        let k: Vec<f32> = (0..n * d).map(|_| r.gen_range(-1.0..1.0)).collect();
        let e = key_quant_error(&k, d, 32, 2);
        assert!(e > 0.05 && e < 1.0, "relative error {e}");
        let base = logit_error_rms(&q, &k, d, n_rep, 32, 2, 4, 1);
        let q3: Vec<f32> = q.iter().map(|x| 3.0 * x).collect();
        let tripled = logit_error_rms(&q3, &k, d, n_rep, 32, 2, 4, 1);
        assert!(
            base > 0.0 && (tripled / base - 3.0).abs() < 1e-9,
            "{base} {tripled}"
        );
        // Fewer tokens than a group after the skipped ones: nothing is quantized.
        assert_eq!(
            logit_error_rms(&q[..20 * n_rep * d], &k[..20 * d], d, n_rep, 32, 2, 4, 1),
            0.0
        );
    }

    #[test]
    fn pack_is_lsb_first() {
        let codes: Vec<u32> = (0..16).map(|i| i % 4).collect();
        let mut w = [0u32; 1];
        pack(&codes, 2, &mut w);
        // element j at bits [2j, 2j+2): 0,1,2,3 repeating -> 0b11100100 per byte = 0xE4.
        assert_eq!(w[0], 0xE4E4_E4E4);
        let mut w4 = [0u32; 1];
        pack(&[1, 2, 3, 4, 5, 6, 7, 15], 4, &mut w4);
        assert_eq!(w4[0], 0xF765_4321);
        let mut w8 = [0u32; 1];
        pack(&[0x11, 0x22, 0x33, 0xff], 8, &mut w8);
        assert_eq!(w8[0], 0xff33_2211);
    }

    #[test]
    fn directed_f16_rounding() {
        for v in [
            0.1f64,
            -0.1,
            1.0 + 1e-9,
            -1.0 - 1e-9,
            65504.0,
            -65504.0,
            0.0,
            1e-9,
            -1e-9,
        ] {
            let d = f16_round_down(v).to_f64();
            let u = f16_round_up(v).to_f64();
            assert!(d <= v && v <= u, "{v}: {d} {u}");
            assert!(f16_next_up(f16_round_down(v)).to_f64() > v || d == v);
            assert!(f16_next_down(f16_round_up(v)).to_f64() < v || u == v);
        }
    }

    #[test]
    fn constant_group_is_exact_and_finite() {
        for bits in [2, 4, 8] {
            let x = [0.75f32; 32];
            let mut c = [9u32; 32];
            let p = quantize_group(&x, bits, &mut c);
            assert_eq!(p.scale, f16::ZERO);
            assert!(c.iter().all(|&c| c == 0));
            assert_eq!(dequantize_value(0, p), 0.75);
            // A constant that is not an f16 still reconstructs (within f16 precision), no NaN.
            let y = [0.1f32; 32];
            let p = quantize_group(&y, bits, &mut c);
            let r = dequantize_value(c[0], p);
            assert!(r.is_finite() && (r - 0.1).abs() <= 1e-4, "{r}");
        }
    }

    #[test]
    fn rejects_non_finite_and_out_of_range() {
        assert!(matches!(
            check_input("k", &[0.0, f32::NAN]),
            Err(Error::NonFinite { index: 1, .. })
        ));
        assert!(check_input("k", &[f32::INFINITY]).is_err());
        assert!(matches!(
            check_input("v", &[7e4]),
            Err(Error::OutOfRange { index: 0, .. })
        ));
        assert!(check_input("v", &[65504.0, -65504.0]).is_ok());
    }
}
