//! Plain-loop f64 reference of the quantization format: the spec the fast code is tested against.
//!
//! It shares no code with [`crate::quant`]: the directed f16 rounding is done by binade
//! arithmetic instead of bit twiddling, codes by f64 division, and unpacking by shifts on u64.

/// f16 spacing at `v`: `2^(max(floor(log2|v|), -14) - 10)`.
fn f16_ulp(v: f64) -> f64 {
    let a = v.abs();
    let e = if a == 0.0 {
        -14
    } else {
        (a.log2().floor() as i32).max(-14)
    };
    // log2 can be off by one right at powers of two: fix by checking the binade.
    let e = if a >= 2f64.powi(e + 1) {
        e + 1
    } else if e > -14 && a < 2f64.powi(e) {
        e - 1
    } else {
        e
    };
    2f64.powi(e - 10)
}

/// Largest f16 value `<= v` (as f64).
pub fn f16_floor_ref(v: f64) -> f64 {
    let u = f16_ulp(v);
    (v / u).floor() * u
}

/// Smallest f16 value `>= v` (as f64).
pub fn f16_ceil_ref(v: f64) -> f64 {
    let u = f16_ulp(v);
    (v / u).ceil() * u
}

/// Result of quantizing one group in the reference.
#[derive(Clone, Debug)]
pub struct RefGroup {
    pub min: f64,
    pub scale: f64,
    pub codes: Vec<u32>,
    /// `code * scale + min`
    pub recon: Vec<f64>,
}

/// Quantizes one group of (already f16-representable or arbitrary) values with `bits` bits.
pub fn quantize_group_ref(x: &[f64], bits: u8) -> RefGroup {
    let levels = 2f64.powi(bits as i32) - 1.0;
    let mn = x.iter().cloned().fold(f64::INFINITY, f64::min);
    let mx = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let min = f16_floor_ref(mn);
    let scale = if mx - min == 0.0 {
        0.0
    } else {
        f16_ceil_ref((mx - min) / levels)
    };
    let mut codes = Vec::with_capacity(x.len());
    let mut recon = Vec::with_capacity(x.len());
    for &v in x {
        let c = if scale == 0.0 {
            0.0
        } else {
            let t = (v - min) / scale;
            // round half to even
            let f = t.floor();
            let r = if t - f > 0.5 || (t - f == 0.5 && f % 2.0 != 0.0) {
                f + 1.0
            } else {
                f
            };
            r.clamp(0.0, levels)
        };
        codes.push(c as u32);
        recon.push(c * scale + min);
    }
    RefGroup {
        min,
        scale,
        codes,
        recon,
    }
}

/// Code `i` of an LSB-first packed row of `bits`-bit codes.
pub fn unpack_ref(words: &[u32], bits: u8, i: usize) -> u32 {
    let bit = i as u64 * bits as u64;
    let w = words[(bit / 32) as usize] as u64;
    ((w >> (bit % 32)) & ((1u64 << bits) - 1)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_rounding_matches_known_values() {
        assert_eq!(f16_floor_ref(0.1), 0.0999755859375);
        assert_eq!(f16_ceil_ref(0.1), 0.10003662109375);
        assert_eq!(f16_floor_ref(1.0), 1.0);
        assert_eq!(f16_floor_ref(-1.0000001), -1.0009765625);
        assert_eq!(f16_ceil_ref(65504.0), 65504.0);
        assert_eq!(f16_floor_ref(1e-9), 0.0);
        assert_eq!(f16_ceil_ref(1e-9), 2f64.powi(-24));
    }
}
