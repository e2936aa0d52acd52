//! x86-64 kernels (AVX2 + FMA + F16C, optionally VNNI), each the SIMD twin of a `_ref`
//! function in `q8.rs` (integer blocks) or `mod.rs` (`dot_f32_ref`). Selected at runtime
//! (`is_x86_feature_detected!`), never by `target-cpu`.
//!
//! All kernels share one shape: `rows_*(w, row_bytes, xs, out, n, i0)` computes, for every
//! weight row `r` in `w` and activation row `k < N`, `out[r * n + i0 + k] = W[r] · xs[k]`.
//! The weight block is loaded and unpacked once and used for the `N` activation rows.
//! Integer dot products of 32 bytes (unsigned weights × signed activations) are `maddubs` +
//! `madd` (AVX2) or one `vpdpbusd` (VNNI, `M = 1` VEX / `M = 2` EVEX encoding).
//!
//! # Safety
//!
//! The `pub unsafe fn`s document their contract; the private `unsafe fn`s share theirs: the CPU
//! has the features of their `#[target_feature]`, `w` holds whole rows of `row_bytes`, each
//! activation row holds at least one weight row's worth of blocks and `out` has room for
//! `n` values per weight row. Callers in `mod.rs` check the features once (`matmul_with`) and
//! size the buffers; each call site has a `// SAFETY:` line.

// The AVX-VNNI and AVX-512 intrinsics are stable since Rust 1.89 (the toolchain here is 1.95);
// the workspace `rust-version` (1.80) predates them and should be raised to 1.89.
#![allow(clippy::incompatible_msrv)]

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::q8::{BlockQ8, BlockQ8K};
use crate::tensor::DType;

/// AVX2, FMA and F16C: the base of every SIMD kernel here.
pub fn has_avx2() -> bool {
    static F: OnceLock<bool> = OnceLock::new();
    *F.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vnni {
    /// AVX-VNNI (VEX `vpdpbusd ymm`).
    Vex,
    /// AVX-512 VNNI + VL (EVEX `vpdpbusd ymm`).
    Evex,
}

pub fn vnni_flavour() -> Option<Vnni> {
    static F: OnceLock<Option<Vnni>> = OnceLock::new();
    *F.get_or_init(|| {
        if !has_avx2() {
            None
        } else if is_x86_feature_detected!("avxvnni") {
            Some(Vnni::Vex)
        } else if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
            Some(Vnni::Evex)
        } else {
            None
        }
    })
}

/// Software prefetch distance into the weight stream. Decode streams ~100 MB of weights per
/// token; the hardware prefetcher alone left 2 threads at ~8.6 GB/s, prefetching 1-2 KiB ahead
/// gave +45% (whole-token decode 11.3 -> 7.7 ms, SmolLM2 shapes, docs/benchmarks.md).
const PREFETCH_BYTES: usize = 1536;

/// Prefetches the weight bytes `PREFETCH_BYTES` ahead of `p` (a hint: may point past the end).
#[inline(always)]
unsafe fn prefetch(p: *const u8) {
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
}

const T_Q4_0: u8 = 0;
const T_Q4_1: u8 = 1;
const T_Q5_0: u8 = 2;
const T_Q8_0: u8 = 3;
const T_Q4_K: u8 = 4;
const T_Q6_K: u8 = 5;
const T_F32: u8 = 6;
const T_F16: u8 = 7;
const T_BF16: u8 = 8;

#[inline(always)]
unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline(always)]
unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Two consecutive f16 at `p` as f32.
#[inline(always)]
unsafe fn f16x2(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

#[inline(always)]
unsafe fn f16x1(p: *const u8) -> f32 {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const u16).read_unaligned() as i32));
    _mm_cvtss_f32(v)
}

/// Sum over groups of 4 of `u[j] * x[j]` (u unsigned, x signed) into 8 i32 lanes.
#[inline(always)]
unsafe fn dot_u8i8<const M: u8>(u: __m256i, x: __m256i) -> __m256i {
    match M {
        1 => _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x),
        2 => _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x),
        _ => _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)),
    }
}

/// 16 packed nibbles → 32 bytes: low nibbles (elements 0..15), then high nibbles (16..31).
#[inline(always)]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    let v = _mm256_set_m128i(_mm_srli_epi16::<4>(q), q);
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// 32 bits at `p` → 32 bytes, 0xFF where the bit is set (ggml's `bytes_from_bits_32`).
#[inline(always)]
unsafe fn bytes_from_bits_32(p: *const u8) -> __m256i {
    let x32 = (p as *const i32).read_unaligned();
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Twin of `vec_dot_{q4_0,q4_1,q5_0,q8_0}_ref`.
#[inline(always)]
unsafe fn rows_q8_body<const N: usize, const M: u8, const T: u8>(
    w: &[u8],
    row_bytes: usize,
    xs: [&[BlockQ8]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    let bb = match T {
        T_Q4_0 => 18,
        T_Q4_1 => 20,
        T_Q5_0 => 22,
        _ => 34,
    };
    let nb = row_bytes / bb;
    for x in &xs {
        assert!(x.len() >= nb);
    }
    let xp: [*const BlockQ8; N] = std::array::from_fn(|k| xs[k].as_ptr());
    for (wr, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        let mut acc = [_mm256_setzero_ps(); N];
        let mut macc = [0.0f32; N];
        let wp = wr.as_ptr();
        for b in 0..nb {
            let p = wp.add(b * bb);
            prefetch(p);
            let (d, mw, u, wsign) = match T {
                T_Q4_0 => {
                    let d = f16x1(p);
                    (d, -8.0 * d, nibbles_32(p.add(2)), _mm256_setzero_si256())
                }
                T_Q4_1 => {
                    let (d, m) = f16x2(p);
                    (d, m, nibbles_32(p.add(4)), _mm256_setzero_si256())
                }
                T_Q5_0 => {
                    let d = f16x1(p);
                    let hb = _mm256_and_si256(bytes_from_bits_32(p.add(2)), _mm256_set1_epi8(0x10));
                    (
                        d,
                        -16.0 * d,
                        _mm256_or_si256(nibbles_32(p.add(6)), hb),
                        _mm256_setzero_si256(),
                    )
                }
                _ => {
                    let d = f16x1(p);
                    let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
                    (d, 0.0, _mm256_sign_epi8(q, q), q)
                }
            };
            for k in 0..N {
                let x = &*xp[k].add(b);
                let mut xv = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
                if T == T_Q8_0 {
                    xv = _mm256_sign_epi8(xv, wsign);
                }
                let isum = dot_u8i8::<M>(u, xv);
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * x.d), acc[k]);
                if T != T_Q8_0 {
                    macc[k] += mw * x.s;
                }
            }
        }
        for k in 0..N {
            o[i0 + k] = hsum_ps(acc[k]) + macc[k];
        }
    }
}

/// Twin of `vec_dot_q4_k_ref` / `vec_dot_q6_k_ref`.
#[inline(always)]
unsafe fn rows_q8k_body<const N: usize, const T: u8>(
    w: &[u8],
    row_bytes: usize,
    xs: [&[BlockQ8K]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    let bb = if T == T_Q4_K { 144 } else { 210 };
    let nb = row_bytes / bb;
    for x in &xs {
        assert!(x.len() >= nb);
    }
    let xp: [*const BlockQ8K; N] = std::array::from_fn(|k| xs[k].as_ptr());
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    for (wr, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        let mut acc = [_mm256_setzero_ps(); N];
        let wp = wr.as_ptr();
        for b in 0..nb {
            let p = wp.add(b * bb);
            for l in (0..bb).step_by(64) {
                prefetch(p.add(l));
            }
            let mut sumi = [_mm256_setzero_si256(); N];
            if T == T_Q4_K {
                let (d, dmin) = f16x2(p);
                let sc = std::slice::from_raw_parts(p.add(4), 12);
                let mut scales = [0u8; 8];
                let mut mins = [0u8; 8];
                for j in 0..8 {
                    (scales[j], mins[j]) = super::dequant::get_scale_min_k4(j, sc);
                }
                let mn = _mm_cvtepu8_epi16(_mm_loadl_epi64(mins.as_ptr() as *const __m128i));
                let mins16 =
                    _mm256_set_m128i(_mm_unpackhi_epi16(mn, mn), _mm_unpacklo_epi16(mn, mn));
                for j in 0..4 {
                    let q = _mm256_loadu_si256(p.add(16 + 32 * j) as *const __m256i);
                    let lo = _mm256_and_si256(q, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                    let s1 = _mm256_set1_epi16(scales[2 * j] as i16);
                    let s2 = _mm256_set1_epi16(scales[2 * j + 1] as i16);
                    for k in 0..N {
                        let xq = (*xp[k].add(b)).qs.as_ptr().add(64 * j);
                        let x1 = _mm256_loadu_si256(xq as *const __m256i);
                        let x2 = _mm256_loadu_si256(xq.add(32) as *const __m256i);
                        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x1), s1);
                        let p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x2), s2);
                        sumi[k] = _mm256_add_epi32(sumi[k], _mm256_add_epi32(p1, p2));
                    }
                }
                for k in 0..N {
                    let x = &*xp[k].add(b);
                    let bs = _mm256_loadu_si256(x.bsums.as_ptr() as *const __m256i);
                    let msum = _mm256_madd_epi16(bs, mins16);
                    acc[k] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(sumi[k]),
                        _mm256_set1_ps(d * x.d),
                        acc[k],
                    );
                    acc[k] = _mm256_fnmadd_ps(
                        _mm256_cvtepi32_ps(msum),
                        _mm256_set1_ps(dmin * x.d),
                        acc[k],
                    );
                }
            } else {
                let d = f16x1(p.add(208));
                let sc = p.add(192) as *const i8;
                for h in 0..2 {
                    let ql0 = _mm256_loadu_si256(p.add(64 * h) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
                    let u = [
                        _mm256_or_si256(
                            _mm256_and_si256(ql0, m4),
                            _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(ql1, m4),
                            _mm256_slli_epi16::<4>(_mm256_and_si256(
                                _mm256_srli_epi16::<2>(qh),
                                m2,
                            )),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                            _mm256_slli_epi16::<4>(_mm256_and_si256(
                                _mm256_srli_epi16::<4>(qh),
                                m2,
                            )),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                            _mm256_slli_epi16::<4>(_mm256_and_si256(
                                _mm256_srli_epi16::<6>(qh),
                                m2,
                            )),
                        ),
                    ];
                    let mut s = [_mm256_setzero_si256(); 4];
                    for (g, s) in s.iter_mut().enumerate() {
                        let a = *sc.add(8 * h + 2 * g) as i16;
                        let b = *sc.add(8 * h + 2 * g + 1) as i16;
                        *s = _mm256_set_m128i(_mm_set1_epi16(b), _mm_set1_epi16(a));
                    }
                    for k in 0..N {
                        let xq = (*xp[k].add(b)).qs.as_ptr().add(128 * h);
                        for g in 0..4 {
                            let xv = _mm256_loadu_si256(xq.add(32 * g) as *const __m256i);
                            let pg = _mm256_madd_epi16(_mm256_maddubs_epi16(u[g], xv), s[g]);
                            sumi[k] = _mm256_add_epi32(sumi[k], pg);
                        }
                    }
                }
                let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc as *const __m128i));
                for k in 0..N {
                    let x = &*xp[k].add(b);
                    let bs = _mm256_loadu_si256(x.bsums.as_ptr() as *const __m256i);
                    let corr = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bs, scales16));
                    let s = _mm256_sub_epi32(sumi[k], corr);
                    acc[k] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * x.d), acc[k]);
                }
            }
        }
        for k in 0..N {
            o[i0 + k] = hsum_ps(acc[k]);
        }
    }
}

/// 8 weights at element `c` of row `p` as f32.
#[inline(always)]
unsafe fn load8<const T: u8>(p: *const u8, c: usize) -> __m256 {
    match T {
        T_F32 => _mm256_loadu_ps((p as *const f32).add(c)),
        T_F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * c) as *const __m128i)),
        _ => {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * c) as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        }
    }
}

/// Twin of `dot_f32_ref`.
#[inline(always)]
unsafe fn rows_float_body<const N: usize, const T: u8>(
    w: &[u8],
    row_bytes: usize,
    xs: [&[f32]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    let cols = row_bytes / if T == T_F32 { 4 } else { 2 };
    for x in &xs {
        assert!(x.len() >= cols);
    }
    let c16 = cols / 16 * 16;
    for (wr, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        let p = wr.as_ptr();
        let mut a0 = [_mm256_setzero_ps(); N];
        let mut a1 = [_mm256_setzero_ps(); N];
        let mut c = 0;
        while c < c16 {
            prefetch(p.add(c * if T == T_F32 { 4 } else { 2 }));
            let w0 = load8::<T>(p, c);
            let w1 = load8::<T>(p, c + 8);
            for k in 0..N {
                let x = xs[k].as_ptr().add(c);
                a0[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), a0[k]);
                a1[k] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), a1[k]);
            }
            c += 16;
        }
        for k in 0..N {
            let mut s = hsum_ps(_mm256_add_ps(a0[k], a1[k]));
            for (c, xv) in xs[k].iter().enumerate().take(cols).skip(c16) {
                let wv = match T {
                    T_F32 => (p as *const f32).add(c).read_unaligned(),
                    T_F16 => f16x1(p.add(2 * c)),
                    _ => {
                        f32::from_bits(((p.add(2 * c) as *const u16).read_unaligned() as u32) << 16)
                    }
                };
                s += wv * xv;
            }
            o[i0 + k] = s;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q8_avx2<const N: usize, const T: u8>(
    w: &[u8],
    rb: usize,
    xs: [&[BlockQ8]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    rows_q8_body::<N, 0, T>(w, rb, xs, out, n, i0)
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn rows_q8_avxvnni<const N: usize, const T: u8>(
    w: &[u8],
    rb: usize,
    xs: [&[BlockQ8]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    rows_q8_body::<N, 1, T>(w, rb, xs, out, n, i0)
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn rows_q8_avx512vnni<const N: usize, const T: u8>(
    w: &[u8],
    rb: usize,
    xs: [&[BlockQ8]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    rows_q8_body::<N, 2, T>(w, rb, xs, out, n, i0)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q8k_avx2<const N: usize, const T: u8>(
    w: &[u8],
    rb: usize,
    xs: [&[BlockQ8K]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    rows_q8k_body::<N, T>(w, rb, xs, out, n, i0)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_float_avx2<const N: usize, const T: u8>(
    w: &[u8],
    rb: usize,
    xs: [&[f32]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    rows_float_body::<N, T>(w, rb, xs, out, n, i0)
}

/// Weight rows of a 32-element block type · Q8 activations.
///
/// # Safety
/// AVX2+FMA+F16C must be available (and VNNI when `vnni`); `w` holds whole rows of
/// `row_bytes`, each `xs[k]` at least one row of blocks, `out` `n` values per row.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rows_q8<const N: usize>(
    dtype: DType,
    vnni: bool,
    w: &[u8],
    rb: usize,
    xs: [&[BlockQ8]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    macro_rules! go {
        ($t:expr) => {
            match if vnni { vnni_flavour() } else { None } {
                Some(Vnni::Vex) => rows_q8_avxvnni::<N, { $t }>(w, rb, xs, out, n, i0),
                Some(Vnni::Evex) => rows_q8_avx512vnni::<N, { $t }>(w, rb, xs, out, n, i0),
                None => rows_q8_avx2::<N, { $t }>(w, rb, xs, out, n, i0),
            }
        };
    }
    match dtype {
        DType::Q4_0 => go!(T_Q4_0),
        DType::Q4_1 => go!(T_Q4_1),
        DType::Q5_0 => go!(T_Q5_0),
        DType::Q8_0 => go!(T_Q8_0),
        _ => unreachable!("rows_q8 on {dtype:?}"),
    }
}

/// Weight rows of a K-quant type · Q8_K activations. Safety as [`rows_q8`].
pub unsafe fn rows_q8k<const N: usize>(
    dtype: DType,
    w: &[u8],
    rb: usize,
    xs: [&[BlockQ8K]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    match dtype {
        DType::Q4_K => rows_q8k_avx2::<N, T_Q4_K>(w, rb, xs, out, n, i0),
        DType::Q6_K => rows_q8k_avx2::<N, T_Q6_K>(w, rb, xs, out, n, i0),
        _ => unreachable!("rows_q8k on {dtype:?}"),
    }
}

/// Weight rows of F32/F16/BF16 · f32 activations. Safety as [`rows_q8`].
pub unsafe fn rows_float<const N: usize>(
    dtype: DType,
    w: &[u8],
    rb: usize,
    xs: [&[f32]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    match dtype {
        DType::F32 => rows_float_avx2::<N, T_F32>(w, rb, xs, out, n, i0),
        DType::F16 => rows_float_avx2::<N, T_F16>(w, rb, xs, out, n, i0),
        DType::BF16 => rows_float_avx2::<N, T_BF16>(w, rb, xs, out, n, i0),
        _ => unreachable!("rows_float on {dtype:?}"),
    }
}

/// Twin of `quantize_row_q8_ref` (same rounding: ties to even).
///
/// # Safety
/// AVX2+FMA must be available; `x.len() >= 32 * y.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_q8_avx2(x: &[f32], y: &mut [BlockQ8]) {
    assert!(x.len() >= 32 * y.len());
    let sign = _mm256_set1_ps(-0.0);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, y) in y.iter_mut().enumerate() {
        let p = x.as_ptr().add(32 * b);
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let mx = _mm256_max_ps(
            _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
            _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps::<1>(mx));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        let amax = _mm_cvtss_f32(m);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let mut q = [_mm256_setzero_si256(); 4];
        for (q, v) in q.iter_mut().zip(v) {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(v, id),
            );
            *q = _mm256_cvtps_epi32(r);
        }
        let sum = hsum_epi32(_mm256_add_epi32(
            _mm256_add_epi32(q[0], q[1]),
            _mm256_add_epi32(q[2], q[3]),
        ));
        let a = _mm256_packs_epi32(q[0], q[1]);
        let c = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, c), perm);
        _mm256_storeu_si256(y.qs.as_mut_ptr() as *mut __m256i, bytes);
        y.d = d;
        y.s = d * sum as f32;
    }
}

/// AVX-512 VNNI (+BW, VL): the 512-bit legacy-block kernel can run.
pub fn has_avx512vnni() -> bool {
    static F: OnceLock<bool> = OnceLock::new();
    *F.get_or_init(|| {
        has_avx2()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// One activation row laid out for [`rows_q8_avx512`]: `qs` all `cols` values contiguous;
/// per pair of blocks `p`, `sc[16p..16p+16] = [d_2p ×8, d_2p+1 ×8]` and
/// `sm[16p..16p+16] = [s_2p/8 ×8, s_2p+1/8 ×8]` (so the lane sum of `mw × sm` is `Σ mw s`).
#[derive(Clone, Copy)]
pub struct WideRow<'a> {
    pub qs: &'a [i8],
    pub sc: &'a [f32],
    pub sm: &'a [f32],
}

/// Two 16-byte nibble arrays → 64 bytes `[b0 0..15, b0 16..31, b1 0..15, b1 16..31]`.
#[inline(always)]
unsafe fn nibbles_64(q0: *const u8, q1: *const u8, perm: __m512i, m4: __m512i) -> __m512i {
    let q = _mm256_set_m128i(
        _mm_loadu_si128(q1 as *const __m128i),
        _mm_loadu_si128(q0 as *const __m128i),
    );
    let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16::<4>(q));
    _mm512_and_si512(_mm512_permutexvar_epi64(perm, v), m4)
}

/// Two blocks per 512-bit `vpdpbusd`, scales applied per 256-bit half. Twin of the
/// `vec_dot_{q4_0,q4_1,q5_0,q8_0}_ref` functions (Q8_0 uses the unsigned `w + 128` form:
/// `mw = -128 dw`). Needs an even number of blocks per row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_q8_avx512_body<const N: usize, const T: u8>(
    w: &[u8],
    row_bytes: usize,
    xs: [WideRow<'_>; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    let bb = match T {
        T_Q4_0 => 18,
        T_Q4_1 => 20,
        T_Q5_0 => 22,
        _ => 34,
    };
    let nb = row_bytes / bb;
    assert!(nb.is_multiple_of(2));
    let np = nb / 2;
    for x in &xs {
        assert!(x.qs.len() >= 32 * nb && x.sc.len() >= 16 * np && x.sm.len() >= 16 * np);
    }
    let perm = _mm512_setr_epi64(0, 1, 4, 5, 2, 3, 6, 7);
    let m4 = _mm512_set1_epi8(0x0F);
    let bias = _mm512_set1_epi8(-128);
    let idx_d = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    let idx_m = _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3);
    let idx_01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (wr, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        let mut acc = [_mm512_setzero_ps(); N];
        let wp = wr.as_ptr();
        for pr in 0..np {
            let p0 = wp.add(2 * pr * bb);
            let p1 = p0.add(bb);
            prefetch(p0);
            // Scales: both blocks' f16 fields through one `vcvtph2ps`, then broadcast per half.
            let (dw, mw, u) = match T {
                T_Q4_1 => {
                    let dm0 = (p0 as *const i32).read_unaligned();
                    let dm1 = (p1 as *const i32).read_unaligned();
                    let v = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_set_epi32(0, 0, dm1, dm0)));
                    let dw = _mm512_permutexvar_ps(idx_d, v);
                    let mw = _mm512_permutexvar_ps(idx_m, v);
                    (dw, mw, nibbles_64(p0.add(4), p1.add(4), perm, m4))
                }
                _ => {
                    let d0 = (p0 as *const u16).read_unaligned() as i32;
                    let d1 = (p1 as *const u16).read_unaligned() as i32;
                    let v =
                        _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(d0 | (d1 << 16))));
                    let dw = _mm512_permutexvar_ps(idx_01, v);
                    match T {
                        T_Q4_0 => (
                            dw,
                            _mm512_mul_ps(dw, _mm512_set1_ps(-8.0)),
                            nibbles_64(p0.add(2), p1.add(2), perm, m4),
                        ),
                        T_Q5_0 => {
                            let h0 = (p0.add(2) as *const u32).read_unaligned() as u64;
                            let h1 = (p1.add(2) as *const u32).read_unaligned() as u64;
                            let u = nibbles_64(p0.add(6), p1.add(6), perm, m4);
                            let u =
                                _mm512_mask_add_epi8(u, h0 | (h1 << 32), u, _mm512_set1_epi8(0x10));
                            (dw, _mm512_mul_ps(dw, _mm512_set1_ps(-16.0)), u)
                        }
                        _ => {
                            let q0 = _mm256_loadu_si256(p0.add(2) as *const __m256i);
                            let q1 = _mm256_loadu_si256(p1.add(2) as *const __m256i);
                            let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q0), q1);
                            (
                                dw,
                                _mm512_mul_ps(dw, _mm512_set1_ps(-128.0)),
                                _mm512_xor_si512(v, bias),
                            )
                        }
                    }
                }
            };
            for k in 0..N {
                let xv = _mm512_loadu_si512(xs[k].qs.as_ptr().add(64 * pr) as *const _);
                let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv);
                let dd = _mm512_mul_ps(dw, _mm512_loadu_ps(xs[k].sc.as_ptr().add(16 * pr)));
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), dd, acc[k]);
                acc[k] =
                    _mm512_fmadd_ps(mw, _mm512_loadu_ps(xs[k].sm.as_ptr().add(16 * pr)), acc[k]);
            }
        }
        for k in 0..N {
            o[i0 + k] = _mm512_reduce_add_ps(acc[k]);
        }
    }
}

/// Weight rows of a 32-element block type (even block count) · wide Q8 activations.
///
/// # Safety
/// [`has_avx512vnni`] must be true; `w` holds whole rows of `row_bytes`, each `xs[k]` one
/// activation row, `out` `n` values per row.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rows_q8_avx512<const N: usize>(
    dtype: DType,
    w: &[u8],
    rb: usize,
    xs: [WideRow<'_>; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    match dtype {
        DType::Q4_0 => rows_q8_avx512_body::<N, T_Q4_0>(w, rb, xs, out, n, i0),
        DType::Q4_1 => rows_q8_avx512_body::<N, T_Q4_1>(w, rb, xs, out, n, i0),
        DType::Q5_0 => rows_q8_avx512_body::<N, T_Q5_0>(w, rb, xs, out, n, i0),
        DType::Q8_0 => rows_q8_avx512_body::<N, T_Q8_0>(w, rb, xs, out, n, i0),
        _ => unreachable!("rows_q8_avx512 on {dtype:?}"),
    }
}
