//! Activation quantization (the `vec_dot_type` of ggml) and the scalar `_ref` dot products
//! of one weight row with quantized activations. The SIMD kernels in `avx2.rs` compute the
//! same decomposition and are tested against these.
//!
//! Every legacy block type is rewritten as `w = dw * u + mw` with `u` an unsigned integer:
//! Q4_0: `u` = nibble, `mw = -8 dw`; Q4_1: `mw = m`; Q5_0: `u` = 5-bit, `mw = -16 dw`;
//! Q8_0: signed `u`, `mw = 0`. Then `sum_k w_k x_k = dw dx sum(u q) + mw s` with
//! `s = dx sum(q)` stored in the activation block (like ggml's `block_q8_1`).

use super::dequant::{f16_at, get_scale_min_k4, QK, QK_K};

/// 32 activations: `x ≈ d * qs`, `s = d * sum(qs)`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8>() == 40);

impl Default for BlockQ8 {
    fn default() -> Self {
        BlockQ8 {
            d: 0.0,
            s: 0.0,
            qs: [0; QK],
        }
    }
}

/// 256 activations (ggml's `block_q8_K`): `x ≈ d * qs`, `bsums[k] = sum(qs[16k..16k+16])`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

/// Symmetric 8-bit quantization of `x` (a multiple of 32 long) into `y`.
pub fn quantize_row_q8_ref(x: &[f32], y: &mut [BlockQ8]) {
    for (x, y) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in y.qs.iter_mut().zip(x) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        y.d = d;
        y.s = d * sum as f32;
    }
}

/// Symmetric 8-bit quantization of `x` (a multiple of 256 long) into `y`, with 16-sums.
pub fn quantize_row_q8k_ref(x: &[f32], y: &mut [BlockQ8K]) {
    for (x, y) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in y.qs.iter_mut().zip(x) {
            *q = (v * id).round_ties_even() as i8;
        }
        for (k, s) in y.bsums.iter_mut().enumerate() {
            *s = y.qs[16 * k..16 * k + 16].iter().map(|&q| q as i16).sum();
        }
        y.d = d;
    }
}

/// Q4_0 row · Q8 activations.
pub fn vec_dot_q4_0_ref(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0.0f32;
    for (b, x) in w.chunks_exact(18).zip(x) {
        let d = f16_at(b, 0);
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (b[2 + j] & 0x0F) as i32 * x.qs[j] as i32;
            isum += (b[2 + j] >> 4) as i32 * x.qs[j + 16] as i32;
        }
        acc += d * x.d * isum as f32 + (-8.0 * d) * x.s;
    }
    acc
}

/// Q4_1 row · Q8 activations.
pub fn vec_dot_q4_1_ref(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0.0f32;
    for (b, x) in w.chunks_exact(20).zip(x) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (b[4 + j] & 0x0F) as i32 * x.qs[j] as i32;
            isum += (b[4 + j] >> 4) as i32 * x.qs[j + 16] as i32;
        }
        acc += d * x.d * isum as f32 + m * x.s;
    }
    acc
}

/// Q5_0 row · Q8 activations.
pub fn vec_dot_q5_0_ref(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0.0f32;
    for (b, x) in w.chunks_exact(22).zip(x) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let mut isum = 0i32;
        for j in 0..16 {
            let u0 = (b[6 + j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
            let u1 = (b[6 + j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
            isum += u0 as i32 * x.qs[j] as i32 + u1 as i32 * x.qs[j + 16] as i32;
        }
        acc += d * x.d * isum as f32 + (-16.0 * d) * x.s;
    }
    acc
}

/// Q8_0 row · Q8 activations.
pub fn vec_dot_q8_0_ref(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0.0f32;
    for (b, x) in w.chunks_exact(34).zip(x) {
        let d = f16_at(b, 0);
        let isum: i32 = (0..QK)
            .map(|j| (b[2 + j] as i8) as i32 * x.qs[j] as i32)
            .sum();
        acc += d * x.d * isum as f32;
    }
    acc
}

/// Q4_K row · Q8_K activations.
pub fn vec_dot_q4_k_ref(w: &[u8], x: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    for (b, x) in w.chunks_exact(144).zip(x) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qs) = (&b[4..16], &b[16..144]);
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..4 {
            let (sc1, m1) = get_scale_min_k4(2 * j, scales);
            let (sc2, m2) = get_scale_min_k4(2 * j + 1, scales);
            let (mut s1, mut s2) = (0i32, 0i32);
            for l in 0..32 {
                s1 += (qs[32 * j + l] & 0x0F) as i32 * x.qs[64 * j + l] as i32;
                s2 += (qs[32 * j + l] >> 4) as i32 * x.qs[64 * j + 32 + l] as i32;
            }
            isum += sc1 as i32 * s1 + sc2 as i32 * s2;
            let b1 = x.bsums[4 * j] as i32 + x.bsums[4 * j + 1] as i32;
            let b2 = x.bsums[4 * j + 2] as i32 + x.bsums[4 * j + 3] as i32;
            msum += m1 as i32 * b1 + m2 as i32 * b2;
        }
        acc += d * x.d * isum as f32 - dmin * x.d * msum as f32;
    }
    acc
}

/// Q6_K row · Q8_K activations.
pub fn vec_dot_q6_k_ref(w: &[u8], x: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    for (b, x) in w.chunks_exact(210).zip(x) {
        let d = f16_at(b, 208);
        let mut isum = 0i32;
        for n in 0..2 {
            let (ql, qh) = (&b[64 * n..64 * n + 64], &b[128 + 32 * n..128 + 32 * n + 32]);
            let xq = &x.qs[128 * n..128 * n + 128];
            let mut s = [0i32; 8];
            for l in 0..32 {
                let g = l / 16;
                let u1 = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                let u2 = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                let u3 = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                let u4 = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                s[g] += u1 as i32 * xq[l] as i32;
                s[g + 2] += u2 as i32 * xq[l + 32] as i32;
                s[g + 4] += u3 as i32 * xq[l + 64] as i32;
                s[g + 6] += u4 as i32 * xq[l + 96] as i32;
            }
            for (k, s) in s.iter().enumerate() {
                let sc = b[192 + 8 * n + k] as i8 as i32;
                isum += sc * (s - 32 * x.bsums[8 * n + k] as i32);
            }
        }
        acc += d * x.d * isum as f32;
    }
    acc
}
