//! Portable scalar kernels: the `_ref` twins of the SIMD kernels in [`super::simd`], always
//! compiled, used on CPUs without AVX2/AVX-512 and with `KIVI_FORCE_SCALAR=1`.
//!
//! Every kernel works on one KV head and one query (or one row of softmax weights) and reads the
//! stored form directly. Dequantization is fused (kivi.md §4.1):
//! - keys per channel: `score[t] = Σ_d (q[d]·scale[d,g])·code[d,t] + Σ_d q[d]·min[d,g]`;
//! - values per token: `acc[d] += Σ_t (p[t]·scale[t,g])·code[t,d] + Σ_t p[t]·min[t,g]`.

use half::f16;

use super::{ChanSeg, TokSeg};
use crate::quant::{codes_per_word, max_code};

/// `out[i] = Σ_d q[d]·rows[(t0+i)·stride + d]` for `i < n`.
pub fn k_f16(q: &[f32], rows: &[f16], stride: usize, t0: usize, n: usize, out: &mut [f32]) {
    let d = q.len();
    for (i, o) in out[..n].iter_mut().enumerate() {
        let r = &rows[(t0 + i) * stride..][..d];
        *o = q.iter().zip(r).map(|(a, b)| a * b.to_f32()).sum();
    }
}

/// Same as [`k_f16`] for exact f32 rows (the new tokens).
pub fn k_f32(q: &[f32], rows: &[f32], stride: usize, t0: usize, n: usize, out: &mut [f32]) {
    let d = q.len();
    for (i, o) in out[..n].iter_mut().enumerate() {
        let r = &rows[(t0 + i) * stride..][..d];
        *o = q.iter().zip(r).map(|(a, b)| a * b).sum();
    }
}

/// `acc[d] += Σ_i p[i]·rows[(t0+i)·stride + d]`.
pub fn v_f16(p: &[f32], rows: &[f16], stride: usize, t0: usize, n: usize, acc: &mut [f32]) {
    let d = acc.len();
    for (i, &w) in p[..n].iter().enumerate() {
        let r = &rows[(t0 + i) * stride..][..d];
        for (a, b) in acc.iter_mut().zip(r) {
            *a += w * b.to_f32();
        }
    }
}

/// Same as [`v_f16`] for exact f32 rows.
pub fn v_f32(p: &[f32], rows: &[f32], stride: usize, t0: usize, n: usize, acc: &mut [f32]) {
    let d = acc.len();
    for (i, &w) in p[..n].iter().enumerate() {
        let r = &rows[(t0 + i) * stride..][..d];
        for (a, b) in acc.iter_mut().zip(r) {
            *a += w * b;
        }
    }
}

/// Scores of one whole per-channel group `g` (`group` tokens) into `tmp[..group]`.
pub fn k_chan_group(q: &[f32], seg: &ChanSeg<'_>, g: usize, tmp: &mut [f32]) {
    let gs = seg.group;
    let bits = seg.bits;
    let fpi = codes_per_word(bits);
    let mask = max_code(bits);
    let tmp = &mut tmp[..gs];
    tmp.fill(0.0);
    let mut bias = 0.0f32;
    for (d, &qd) in q.iter().enumerate() {
        let meta = g * q.len() + d;
        let qs = qd * seg.scales[meta].to_f32();
        bias += qd * seg.mins[meta].to_f32();
        let row = &seg.codes[d * seg.words_per_row + g * gs / fpi..][..gs / fpi];
        for (w, out) in row.iter().zip(tmp.chunks_exact_mut(fpi)) {
            for (j, o) in out.iter_mut().enumerate() {
                *o += qs * ((w >> (j * bits as usize)) & mask) as f32;
            }
        }
    }
    for o in tmp.iter_mut() {
        *o += bias;
    }
}

/// Scores for tokens `t0..t0+n` of a per-channel quantized stretch.
pub fn k_chan(q: &[f32], seg: &ChanSeg<'_>, t0: usize, n: usize, out: &mut [f32]) {
    k_chan_with(q, seg, t0, n, out, k_chan_group)
}

/// Walks the groups covering `t0..t0+n`, computing whole groups with `group_fn` and copying the
/// requested tokens (a partial trailing group computes on codes that are allocated but unused).
pub(crate) fn k_chan_with(
    q: &[f32],
    seg: &ChanSeg<'_>,
    t0: usize,
    n: usize,
    out: &mut [f32],
    mut group_fn: impl FnMut(&[f32], &ChanSeg<'_>, usize, &mut [f32]),
) {
    let gs = seg.group;
    let mut tmp = [0f32; 1024];
    let mut t = t0;
    let end = t0 + n;
    while t < end {
        let g = t / gs;
        let g0 = g * gs;
        let hi = end.min(g0 + gs);
        if gs <= tmp.len() && !(t == g0 && hi == g0 + gs) {
            group_fn(q, seg, g, &mut tmp);
            out[t - t0..hi - t0].copy_from_slice(&tmp[t - g0..hi - g0]);
        } else if gs <= tmp.len() {
            group_fn(q, seg, g, &mut out[t - t0..hi - t0]);
        } else {
            // Huge groups: token by token.
            for tt in t..hi {
                out[tt - t0] = k_chan_token(q, seg, tt);
            }
        }
        t = hi;
    }
}

fn k_chan_token(q: &[f32], seg: &ChanSeg<'_>, t: usize) -> f32 {
    let g = t / seg.group;
    let fpi = codes_per_word(seg.bits);
    let mut s = 0.0;
    for (d, &qd) in q.iter().enumerate() {
        let meta = g * q.len() + d;
        let w = seg.codes[d * seg.words_per_row + t / fpi];
        let c = (w >> ((t % fpi) * seg.bits as usize)) & max_code(seg.bits);
        s += qd * (c as f32 * seg.scales[meta].to_f32() + seg.mins[meta].to_f32());
    }
    s
}

/// Scores for tokens `t0..t0+n` of a per-token quantized stretch (research mode for keys):
/// `score[t] = Σ_g scale[t,g]·Σ_{d∈g} q[d]·code[t,d] + Σ_g min[t,g]·Σ_{d∈g} q[d]`.
pub fn k_tok(q: &[f32], seg: &TokSeg<'_>, t0: usize, n: usize, out: &mut [f32]) {
    let hd = q.len();
    let gs = seg.group;
    let fpi = codes_per_word(seg.bits);
    let (wpt, gpt) = (hd / fpi, hd / gs);
    let mask = max_code(seg.bits);
    for (i, o) in out[..n].iter_mut().enumerate() {
        let t = t0 + i;
        let words = &seg.codes[t * wpt..][..wpt];
        let mut s = 0.0f32;
        for g in 0..gpt {
            let mut dot = 0.0f32;
            let mut qsum = 0.0f32;
            for d in g * gs..(g + 1) * gs {
                let c = (words[d / fpi] >> ((d % fpi) * seg.bits as usize)) & mask;
                dot += q[d] * c as f32;
                qsum += q[d];
            }
            s += seg.scales[t * gpt + g].to_f32() * dot + seg.mins[t * gpt + g].to_f32() * qsum;
        }
        *o = s;
    }
}

/// `acc[d] += Σ_i p[i]·v[t0+i, d]` for a per-token quantized stretch (KIVI's values).
pub fn v_tok(p: &[f32], seg: &TokSeg<'_>, t0: usize, n: usize, acc: &mut [f32]) {
    let hd = acc.len();
    let gs = seg.group;
    let bits = seg.bits;
    let fpi = codes_per_word(bits);
    let (wpt, gpt) = (hd / fpi, hd / gs);
    let mask = max_code(bits);
    let mut min_acc = [0f32; 256];
    debug_assert!(gpt <= min_acc.len());
    for (i, &w) in p[..n].iter().enumerate() {
        let t = t0 + i;
        let words = &seg.codes[t * wpt..][..wpt];
        for g in 0..gpt {
            let ps = w * seg.scales[t * gpt + g].to_f32();
            min_acc[g] += w * seg.mins[t * gpt + g].to_f32();
            let gw = &words[g * gs / fpi..(g + 1) * gs / fpi];
            let ga = &mut acc[g * gs..(g + 1) * gs];
            for (word, a) in gw.iter().zip(ga.chunks_exact_mut(fpi)) {
                for (j, aj) in a.iter_mut().enumerate() {
                    *aj += ps * ((word >> (j * bits as usize)) & mask) as f32;
                }
            }
        }
    }
    for (g, &m) in min_acc[..gpt].iter().enumerate() {
        for a in &mut acc[g * gs..(g + 1) * gs] {
            *a += m;
        }
    }
}

/// `acc[d] += Σ_i p[i]·v[t0+i, d]` for a per-channel quantized stretch (research mode for values):
/// per channel and group, `scale·Σ p·code + min·Σ p`.
pub fn v_chan(p: &[f32], seg: &ChanSeg<'_>, t0: usize, n: usize, acc: &mut [f32]) {
    let gs = seg.group;
    let fpi = codes_per_word(seg.bits);
    let mask = max_code(seg.bits);
    let hd = acc.len();
    for (d, a) in acc.iter_mut().enumerate() {
        let row = &seg.codes[d * seg.words_per_row..][..seg.words_per_row];
        let mut t = t0;
        let end = t0 + n;
        while t < end {
            let g = t / gs;
            let hi = end.min((g + 1) * gs);
            let (mut pc, mut psum) = (0.0f32, 0.0f32);
            for tt in t..hi {
                let pt = p[tt - t0];
                let c = (row[tt / fpi] >> ((tt % fpi) * seg.bits as usize)) & mask;
                pc += pt * c as f32;
                psum += pt;
            }
            let meta = g * hd + d;
            *a += seg.scales[meta].to_f32() * pc + seg.mins[meta].to_f32() * psum;
            t = hi;
        }
    }
}

/// Cephes `expf` constants shared with the SIMD versions (digits as published).
#[allow(clippy::excessive_precision)]
pub(crate) mod expc {
    pub const LO: f32 = -87.3;
    pub const HI: f32 = 88.3;
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const C1: f32 = 0.693359375;
    pub const C2: f32 = -2.121_944_4e-4;
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5.000_000_1e-1,
    ];
}

/// `exp(x)` by range reduction `x = n·ln2 + r` and a degree-6 polynomial in `r` (Cephes expf);
/// inputs below -87.3 give 0.
#[inline]
pub fn exp_approx(x: f32) -> f32 {
    use expc::*;
    if x < LO {
        return 0.0;
    }
    let x = x.min(HI);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * C1 - n * C2;
    let mut y = P[0];
    for c in &P[1..] {
        y = y * r + c;
    }
    let y = y * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `x[i] = exp(x[i] - shift)`, returns the sum.
pub fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = exp_approx(*v - shift);
        sum += *v;
    }
    sum
}

// ---------------------------------------------------------------------------------------------
// Integer twins of the AVX-512 VNNI 2- and 4-bit kernels (`simd.rs`): same quantization of the
// query / weights, same integer sums, same float epilogue, so the SIMD kernels can be compared
// with them to float rounding; their own error against the exact dequantized form is bounded in
// `tests/kernels.rs`.

/// Largest 16-bit code of a folded key query (signed: `|iq| <= 32767`).
pub const Q16_KEY_MAX: f32 = 32767.0;
/// Largest 16-bit code of a value weight (unsigned: `0 <= iq <= 65535`).
pub const Q16_VAL_MAX: f32 = 65535.0;
/// Tokens per value weight quantization (one scale per sub-chunk of the stretch).
pub const Q16_VAL_SUB: usize = 64;

/// Shapes of per-channel key stretches that the VNNI kernel handles: 2- or 4-bit codes, groups
/// of a multiple of 32 tokens, rows of a multiple of 16 bytes (64 tokens of 2 bits, 32 of 4),
/// head_dim a multiple of 16 up to 512.
pub fn k_chan_q16_shape(hd: usize, seg: &ChanSeg<'_>) -> bool {
    matches!(seg.bits, 2 | 4)
        && seg.group.is_multiple_of(32)
        && seg.words_per_row.is_multiple_of(4)
        && hd.is_multiple_of(16)
        && (16..=512).contains(&hd)
}

/// Shapes of per-token value stretches that the VNNI kernel handles: 2- or 4-bit codes,
/// head_dim 64 or 128, groups of a multiple of 16 channels, at most 4 groups per token.
pub fn v_tok_q16_shape(hd: usize, seg: &TokSeg<'_>) -> bool {
    matches!(seg.bits, 2 | 4)
        && seg.group.is_multiple_of(16)
        && hd.is_multiple_of(seg.group)
        && hd / seg.group <= 4
        && matches!(hd, 64 | 128)
}

/// The VNNI value kernel needs non-negative weights (softmax numerators are): no sign bit set
/// (an OR over the bits, which vectorises; `-0.0` counts as negative).
pub fn all_nonnegative(p: &[f32]) -> bool {
    p.iter().fold(0u32, |a, &x| a | x.to_bits()) >> 31 == 0
}

/// Group `g`'s folded query `qs[d] = q[d]·scale[g,d]` quantized to `iq[d] = round(qs[d] / alpha)`
/// with `alpha = max|qs| / 32767`; returns `(alpha, Σ_d q[d]·min[g,d])`.
pub fn quantize_query_q16(q: &[f32], seg: &ChanSeg<'_>, g: usize, iq: &mut [i32]) -> (f32, f32) {
    let hd = q.len();
    let mut qs = vec![0f32; hd];
    let (mut amax, mut bias) = (0f32, 0f32);
    for d in 0..hd {
        qs[d] = q[d] * seg.scales[g * hd + d].to_f32();
        bias += q[d] * seg.mins[g * hd + d].to_f32();
        amax = amax.max(qs[d].abs());
    }
    let inv = if amax > 0.0 { Q16_KEY_MAX / amax } else { 0.0 };
    for d in 0..hd {
        iq[d] = (qs[d] * inv).round_ties_even() as i32;
    }
    (amax / Q16_KEY_MAX, bias)
}

/// Twin of the VNNI key kernel: `score[t] = alpha_g · Σ_d iq_g[d]·code[d,t] + bias_g`.
pub fn k_chan_q16(q: &[f32], seg: &ChanSeg<'_>, t0: usize, n: usize, out: &mut [f32]) {
    let hd = q.len();
    let (bits, fpi, mask) = (
        seg.bits as usize,
        codes_per_word(seg.bits),
        max_code(seg.bits),
    );
    let mut iq = vec![0i32; hd];
    let mut cur = (usize::MAX, 0f32, 0f32);
    for (i, o) in out[..n].iter_mut().enumerate() {
        let t = t0 + i;
        let g = t / seg.group;
        if cur.0 != g {
            let (a, b) = quantize_query_q16(q, seg, g, &mut iq[..hd]);
            cur = (g, a, b);
        }
        let mut sum = 0i32;
        for (d, &x) in iq.iter().enumerate() {
            let w = seg.codes[d * seg.words_per_row + t / fpi];
            sum += x * ((w >> (bits * (t % fpi))) & mask) as i32;
        }
        *o = cur.1.mul_add(sum as f32, cur.2);
    }
}

/// Twin of the VNNI value kernel: per sub-chunk of [`Q16_VAL_SUB`] tokens (from `t0`),
/// `w[t,g] = p[t]·scale[t,g]` is quantized to `iq = round(w / alpha)`, `alpha = max w / 65535`,
/// and `acc[d] += alpha · Σ_t iq[t,g(d)]·code[t,d]` (f32 fused multiply-add per sub-chunk); the
/// mins as in [`v_tok`]. Weights must be non-negative ([`all_nonnegative`]).
pub fn v_tok_q16(p: &[f32], seg: &TokSeg<'_>, t0: usize, n: usize, acc: &mut [f32]) {
    let hd = acc.len();
    let gs = seg.group;
    let (bits, fpi, mask) = (
        seg.bits as usize,
        codes_per_word(seg.bits),
        max_code(seg.bits),
    );
    let (wpt, gpt) = (hd / fpi, hd / gs);
    let mut facc = vec![0f32; hd];
    let mut min_acc = vec![0f32; gpt];
    let mut ps = vec![0f32; Q16_VAL_SUB * gpt];
    let mut i0 = 0;
    while i0 < n {
        let cnt = Q16_VAL_SUB.min(n - i0);
        let mut amax = 0f32;
        for i in 0..cnt {
            let t = t0 + i0 + i;
            for g in 0..gpt {
                ps[i * gpt + g] = p[i0 + i] * seg.scales[t * gpt + g].to_f32();
                min_acc[g] += p[i0 + i] * seg.mins[t * gpt + g].to_f32();
                amax = amax.max(ps[i * gpt + g]);
            }
        }
        let inv = if amax > 0.0 { Q16_VAL_MAX / amax } else { 0.0 };
        let alpha = amax / Q16_VAL_MAX;
        for d in 0..hd {
            let mut sum = 0i32;
            for i in 0..cnt {
                let w = seg.codes[(t0 + i0 + i) * wpt + d / fpi];
                let iq = (ps[i * gpt + d / gs] * inv).round_ties_even() as i32;
                sum += iq * ((w >> (bits * (d % fpi))) & mask) as i32;
            }
            facc[d] = alpha.mul_add(sum as f32, facc[d]);
        }
        i0 += cnt;
    }
    for d in 0..hd {
        acc[d] += facc[d] + min_acc[d / gs];
    }
}
