//! x86-64 kernels (AVX2+FMA+F16C and AVX-512F), chosen at run time. Each has a scalar twin in
//! [`super::cpu`] with the same signature; tests compare them on random data.
//!
//! Code extraction: a vector of 8 (AVX2) or 16 (AVX-512) consecutive codes is built from the
//! packed words by broadcasting (or permuting) the words into lanes, shifting each lane right by
//! its bit offset and masking: `(word >> (j*b)) & (2^b - 1)` as in kivi.md §1.3.
//!
//! Shapes supported by the SIMD paths (others fall back to the scalar twin, per call):
//! - `k_chan`: group size G a multiple of the lane count (8 / 16) and at most 128;
//! - `v_tok`: G a multiple of the lane count and `head_dim / lanes` in {2, 4, 8, 16}.
//!
//! # Safety
//!
//! Every `unsafe fn` here is private and shares one contract: the CPU has the features of its
//! `#[target_feature]` (the safe `pub fn` wrappers call `assert_supported` first), and every
//! pointer it forms from its slice arguments stays inside them (the wrappers `assert!` the
//! lengths; each call site has a `// SAFETY:` line saying which asserts cover it). The tests in
//! `tests/kernels.rs` and the `kv_cache` fuzz target compare each kernel with its scalar twin,
//! and both ran under AddressSanitizer (docs/reliability.md).

// Kernels index several fixed-size arrays in lockstep (accumulators, lanes, queries).
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use half::f16;

use super::{cpu, ChanSeg, Isa, TokSeg};
use crate::quant::{codes_per_word, max_code};

/// Largest head_dim of the SIMD key kernels (stack buffer for the folded query).
const MAX_HEAD_DIM: usize = 512;

/// Panics if `isa` is not supported by this CPU: the `unsafe` calls below rely on it.
fn assert_supported(isa: Isa) {
    static BEST: OnceLock<Isa> = OnceLock::new();
    let best = *BEST.get_or_init(Isa::best_supported);
    let ok = isa.rank() <= best.rank();
    assert!(
        ok,
        "{isa:?} kernels requested on a CPU without the features"
    );
}

#[inline]
#[target_feature(enable = "f16c")]
unsafe fn h2f(h: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
}

// ---------------------------------------------------------------------------------------------
// f16 rows

/// `out[i] = q · rows[t0 + i]`, SIMD version of [`cpu::k_f16`].
pub fn k_f16(
    isa: Isa,
    q: &[f32],
    rows: &[f16],
    stride: usize,
    t0: usize,
    n: usize,
    out: &mut [f32],
) {
    assert_supported(isa);
    let d = q.len();
    assert!(n == 0 || rows.len() >= (t0 + n - 1) * stride + d);
    assert!(out.len() >= n);
    match isa.base() {
        // SAFETY: the CPU has the features (checked above); every row read is in bounds of
        // `rows` and every write in bounds of `out` (checked above).
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { k_f16_avx512(q, rows, stride, t0, n, out) },
        // SAFETY: as above.
        Isa::Avx2 => unsafe { k_f16_avx2(q, rows, stride, t0, n, out) },
        Isa::Scalar => cpu::k_f16(q, rows, stride, t0, n, out),
    }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn k_f16_avx512(
    q: &[f32],
    rows: &[f16],
    stride: usize,
    t0: usize,
    n: usize,
    out: &mut [f32],
) {
    let d = q.len();
    let dv = d / 16 * 16;
    let qp = q.as_ptr();
    let rp = rows.as_ptr() as *const u16;
    let row = |t: usize| rp.add((t0 + t) * stride);
    let mut i = 0;
    while i + 4 <= n {
        let (r0, r1, r2, r3) = (row(i), row(i + 1), row(i + 2), row(i + 3));
        let mut a = [_mm512_setzero_ps(); 4];
        let mut j = 0;
        while j < dv {
            let qv = _mm512_loadu_ps(qp.add(j));
            let ld =
                |r: *const u16| _mm512_cvtph_ps(_mm256_loadu_si256(r.add(j) as *const __m256i));
            a[0] = _mm512_fmadd_ps(qv, ld(r0), a[0]);
            a[1] = _mm512_fmadd_ps(qv, ld(r1), a[1]);
            a[2] = _mm512_fmadd_ps(qv, ld(r2), a[2]);
            a[3] = _mm512_fmadd_ps(qv, ld(r3), a[3]);
            j += 16;
        }
        for (r, (rp, acc)) in [r0, r1, r2, r3].into_iter().zip(a).enumerate() {
            let mut s = _mm512_reduce_add_ps(acc);
            for jj in dv..d {
                s += q[jj] * h2f(f16::from_bits(*rp.add(jj)));
            }
            out[i + r] = s;
        }
        i += 4;
    }
    while i < n {
        let r0 = row(i);
        let mut a = _mm512_setzero_ps();
        let mut j = 0;
        while j < dv {
            let kv = _mm512_cvtph_ps(_mm256_loadu_si256(r0.add(j) as *const __m256i));
            a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(j)), kv, a);
            j += 16;
        }
        let mut s = _mm512_reduce_add_ps(a);
        for jj in dv..d {
            s += q[jj] * h2f(f16::from_bits(*r0.add(jj)));
        }
        out[i] = s;
        i += 1;
    }
}

#[inline]
#[target_feature(enable = "avx")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_f16_avx2(q: &[f32], rows: &[f16], stride: usize, t0: usize, n: usize, out: &mut [f32]) {
    let d = q.len();
    let dv = d / 8 * 8;
    let qp = q.as_ptr();
    let rp = rows.as_ptr() as *const u16;
    let row = |t: usize| rp.add((t0 + t) * stride);
    let mut i = 0;
    while i + 4 <= n {
        let (r0, r1, r2, r3) = (row(i), row(i + 1), row(i + 2), row(i + 3));
        let mut a = [_mm256_setzero_ps(); 4];
        let mut j = 0;
        while j < dv {
            let qv = _mm256_loadu_ps(qp.add(j));
            let ld = |r: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(r.add(j) as *const __m128i));
            a[0] = _mm256_fmadd_ps(qv, ld(r0), a[0]);
            a[1] = _mm256_fmadd_ps(qv, ld(r1), a[1]);
            a[2] = _mm256_fmadd_ps(qv, ld(r2), a[2]);
            a[3] = _mm256_fmadd_ps(qv, ld(r3), a[3]);
            j += 8;
        }
        for (r, (rp, acc)) in [r0, r1, r2, r3].into_iter().zip(a).enumerate() {
            let mut s = hsum256(acc);
            for jj in dv..d {
                s += q[jj] * h2f(f16::from_bits(*rp.add(jj)));
            }
            out[i + r] = s;
        }
        i += 4;
    }
    while i < n {
        let r0 = row(i);
        let mut a = _mm256_setzero_ps();
        let mut j = 0;
        while j < dv {
            let kv = _mm256_cvtph_ps(_mm_loadu_si128(r0.add(j) as *const __m128i));
            a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(j)), kv, a);
            j += 8;
        }
        let mut s = hsum256(a);
        for jj in dv..d {
            s += q[jj] * h2f(f16::from_bits(*r0.add(jj)));
        }
        out[i] = s;
        i += 1;
    }
}

/// `acc += Σ_i p[i] · rows[t0 + i]`, SIMD version of [`cpu::v_f16`].
pub fn v_f16(
    isa: Isa,
    p: &[f32],
    rows: &[f16],
    stride: usize,
    t0: usize,
    n: usize,
    acc: &mut [f32],
) {
    assert_supported(isa);
    let d = acc.len();
    assert!(n == 0 || rows.len() >= (t0 + n - 1) * stride + d);
    assert!(p.len() >= n);
    match (isa.base(), d) {
        // SAFETY (all arms): the CPU has the features (checked above); reads of `rows` and `p`
        // are in bounds (checked above) and `acc` has exactly `d` = lanes * NV elements.
        (Isa::Avx512, 64) => unsafe { v_f16_avx512::<4>(p, rows, stride, t0, n, acc) },
        (Isa::Avx512, 128) => unsafe { v_f16_avx512::<8>(p, rows, stride, t0, n, acc) },
        (Isa::Avx512, 256) => unsafe { v_f16_avx512::<16>(p, rows, stride, t0, n, acc) },
        (Isa::Avx512 | Isa::Avx2, 32) => unsafe { v_f16_avx2::<4>(p, rows, stride, t0, n, acc) },
        (Isa::Avx2, 64) => unsafe { v_f16_avx2::<8>(p, rows, stride, t0, n, acc) },
        (Isa::Avx2, 128) => unsafe { v_f16_avx2::<16>(p, rows, stride, t0, n, acc) },
        _ => cpu::v_f16(p, rows, stride, t0, n, acc),
    }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn v_f16_avx512<const NV: usize>(
    p: &[f32],
    rows: &[f16],
    stride: usize,
    t0: usize,
    n: usize,
    acc: &mut [f32],
) {
    let rp = rows.as_ptr() as *const u16;
    let ap = acc.as_mut_ptr();
    let mut a = [_mm512_setzero_ps(); NV];
    for (j, aj) in a.iter_mut().enumerate() {
        *aj = _mm512_loadu_ps(ap.add(16 * j));
    }
    for (i, &w) in p[..n].iter().enumerate() {
        let r = rp.add((t0 + i) * stride);
        let wv = _mm512_set1_ps(w);
        for (j, aj) in a.iter_mut().enumerate() {
            let x = _mm512_cvtph_ps(_mm256_loadu_si256(r.add(16 * j) as *const __m256i));
            *aj = _mm512_fmadd_ps(wv, x, *aj);
        }
    }
    for (j, aj) in a.iter().enumerate() {
        _mm512_storeu_ps(ap.add(16 * j), *aj);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn v_f16_avx2<const NV: usize>(
    p: &[f32],
    rows: &[f16],
    stride: usize,
    t0: usize,
    n: usize,
    acc: &mut [f32],
) {
    let rp = rows.as_ptr() as *const u16;
    let ap = acc.as_mut_ptr();
    let mut a = [_mm256_setzero_ps(); NV];
    for (j, aj) in a.iter_mut().enumerate() {
        *aj = _mm256_loadu_ps(ap.add(8 * j));
    }
    for (i, &w) in p[..n].iter().enumerate() {
        let r = rp.add((t0 + i) * stride);
        let wv = _mm256_set1_ps(w);
        for (j, aj) in a.iter_mut().enumerate() {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(r.add(8 * j) as *const __m128i));
            *aj = _mm256_fmadd_ps(wv, x, *aj);
        }
    }
    for (j, aj) in a.iter().enumerate() {
        _mm256_storeu_ps(ap.add(8 * j), *aj);
    }
}

// ---------------------------------------------------------------------------------------------
// Code extraction

/// Lane constants for 16 codes of `bits` bits starting at a word boundary or half word.
struct Lanes16 {
    idx: __m512i,
    shifts: __m512i,
    mask: __m512i,
    nwords: usize,
    /// Lookup-table base for 2/4-bit codes: entry `e` holds the code in the low `b` bits of `e`
    /// (`e & 3` at 2 bits: the 4-bit index also holds the next code; `e` at 4 bits).
    iota: __m512,
}

/// `e & 3` and `e` for e in 0..16.
const IOTA: [[f32; 16]; 2] = [
    [
        0., 1., 2., 3., 0., 1., 2., 3., 0., 1., 2., 3., 0., 1., 2., 3.,
    ],
    [
        0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
    ],
];

/// Per-lane word index and shift for 16 codes: `idx[l] = l / fpi`, `shift[l] = (l % fpi) * b`.
const LANE_TABLES: [([i32; 16], [i32; 16]); 3] = {
    let mut t = [([0i32; 16], [0i32; 16]); 3];
    let mut k = 0;
    while k < 3 {
        let bits = [2usize, 4, 8][k];
        let fpi = 32 / bits;
        let mut l = 0;
        while l < 16 {
            t[k].0[l] = (l / fpi) as i32;
            t[k].1[l] = ((l % fpi) * bits) as i32;
            l += 1;
        }
        k += 1;
    }
    t
};

impl Lanes16 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn new(bits: u8) -> Self {
        let (idx, sh) = &LANE_TABLES[match bits {
            2 => 0,
            4 => 1,
            _ => 2,
        }];
        Lanes16 {
            idx: _mm512_loadu_si512(idx.as_ptr() as *const _),
            shifts: _mm512_loadu_si512(sh.as_ptr() as *const _),
            mask: _mm512_set1_epi32(max_code(bits) as i32),
            nwords: 16 / codes_per_word(bits).min(16),
            iota: _mm512_loadu_ps(IOTA[(bits == 4) as usize].as_ptr()),
        }
    }

    /// Codes `16k .. 16k+16` of a row whose words start at `wp` (`wp` points at the word that
    /// holds code `16k`), as f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(&self, wp: *const u32) -> __m512 {
        let v = if self.nwords == 1 {
            _mm512_set1_epi32(*wp as i32)
        } else {
            let w = _mm512_maskz_loadu_epi32((1u16 << self.nwords) - 1, wp as *const i32);
            _mm512_permutexvar_epi32(self.idx, w)
        };
        _mm512_cvtepi32_ps(_mm512_and_si512(
            _mm512_srlv_epi32(v, self.shifts),
            self.mask,
        ))
    }

    /// Codes `16k .. 16k+16` looked up in `lut` (2/4-bit only): the code of lane `l` sits in the
    /// low bits of the shifted word, and `vpermps` uses only the low 4 bits of each index, so no
    /// mask and no int→float conversion are needed: `lut[code]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn lookup(&self, wp: *const u32, lut: __m512) -> __m512 {
        let v = if self.nwords == 1 {
            _mm512_set1_epi32(*wp as i32)
        } else {
            let w = _mm512_maskz_loadu_epi32((1u16 << self.nwords) - 1, wp as *const i32);
            _mm512_permutexvar_epi32(self.idx, w)
        };
        _mm512_permutexvar_ps(_mm512_srlv_epi32(v, self.shifts), lut)
    }
}

impl Lanes16 {
    /// Codes as f32 like [`Lanes16::load`]; 2/4-bit codes through the `iota` table (shift +
    /// `vpermps`, no mask and no int→float conversion; spreads the work over ports 0 and 5).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn decode(&self, wp: *const u32, bits: u8) -> __m512 {
        if bits <= 4 {
            self.lookup(wp, self.iota)
        } else {
            self.load(wp)
        }
    }
}

/// Lane constants for 8 codes.
struct Lanes8 {
    shifts: __m256i,
    mask: __m256i,
    bits: u8,
}

/// Per-lane shifts for 8 codes: `((l * b) % 32)` for b = 2, 4, 8.
const LANE8_SHIFTS: [[i32; 8]; 3] = [
    [0, 2, 4, 6, 8, 10, 12, 14],
    [0, 4, 8, 12, 16, 20, 24, 28],
    [0, 8, 16, 24, 0, 8, 16, 24],
];

impl Lanes8 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn new(bits: u8) -> Self {
        let sh = &LANE8_SHIFTS[match bits {
            2 => 0,
            4 => 1,
            _ => 2,
        }];
        Lanes8 {
            shifts: _mm256_loadu_si256(sh.as_ptr() as *const _),
            mask: _mm256_set1_epi32(max_code(bits) as i32),
            bits,
        }
    }

    /// Codes `c .. c+8` (`c` a multiple of 8) of a row of words at `row`, as f32.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(&self, row: *const u32, c: usize) -> __m256 {
        let v = if self.bits == 8 {
            let (w0, w1) = (*row.add(c >> 2) as i32, *row.add((c >> 2) + 1) as i32);
            _mm256_setr_epi32(w0, w0, w0, w0, w1, w1, w1, w1)
        } else {
            let bit = c * self.bits as usize;
            _mm256_set1_epi32((*row.add(bit >> 5) >> (bit & 31)) as i32)
        };
        _mm256_cvtepi32_ps(_mm256_and_si256(
            _mm256_srlv_epi32(v, self.shifts),
            self.mask,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Per-channel quantized keys

/// Scores over a per-channel quantized stretch, SIMD version of [`cpu::k_chan`].
pub fn k_chan(isa: Isa, q: &[f32], seg: &ChanSeg<'_>, t0: usize, n: usize, out: &mut [f32]) {
    assert_supported(isa);
    if n == 0 {
        return;
    }
    let (hd, g) = (q.len(), seg.group);
    let fpi = codes_per_word(seg.bits);
    // Bounds of every access in the group kernels.
    assert!(g % fpi == 0 && seg.words_per_row * fpi == seg.groups_per_row * g);
    assert!((t0 + n - 1) / g < seg.groups_per_row);
    assert!(seg.codes.len() >= hd * seg.words_per_row);
    assert!(hd <= MAX_HEAD_DIM, "head_dim {hd} > {MAX_HEAD_DIM}");
    assert!(seg.scales.len() >= hd * seg.groups_per_row);
    assert!(seg.mins.len() >= hd * seg.groups_per_row);
    assert!(out.len() >= n);
    macro_rules! run {
        ($f:ident, $nb:literal) => {
            // SAFETY: the CPU has the features; the group kernels read rows `d < hd` of whole
            // groups `g < groups_per_row` and write `tmp[..group]` (k_chan_with passes a slice
            // of exactly `group` elements); all asserted above.
            cpu::k_chan_with(q, seg, t0, n, out, |q, s, gi, tmp| unsafe {
                $f::<$nb>(q, s, gi, tmp)
            })
        };
    }
    if isa == Isa::Avx512Vnni && cpu::k_chan_q16_shape(hd, seg) {
        // SAFETY: the CPU has the features; the kernel reads rows d < hd of the 16-byte chunks
        // covering t0..t0+n (inside rows of a multiple of 16 bytes, k_chan_q16_shape), the
        // groups' scales/mins, q[..hd], and writes out[..n]; all asserted above.
        match seg.bits {
            2 => unsafe { k_chan_vnni::<1, 2>(q, seg, t0, n, out, 0) },
            _ => unsafe { k_chan_vnni::<1, 4>(q, seg, t0, n, out, 0) },
        }
        return;
    }
    match (isa.base(), g) {
        (Isa::Avx512, 16) if seg.bits == 2 => run!(k_chan_group_2bit_avx512, 1),
        (Isa::Avx512, 32) if seg.bits == 2 => run!(k_chan_group_2bit_avx512, 2),
        (Isa::Avx512, 64) if seg.bits == 2 => run!(k_chan_group_2bit_avx512, 4),
        (Isa::Avx512, 128) if seg.bits == 2 => run!(k_chan_group_2bit_avx512, 8),
        (Isa::Avx512, 16) if seg.bits == 4 => run!(k_chan_group_4bit_avx512, 1),
        (Isa::Avx512, 32) if seg.bits == 4 => run!(k_chan_group_4bit_avx512, 2),
        (Isa::Avx512, 64) if seg.bits == 4 => run!(k_chan_group_4bit_avx512, 4),
        (Isa::Avx512, 128) if seg.bits == 4 => run!(k_chan_group_4bit_avx512, 8),
        (Isa::Avx512, 16) => run!(k_chan_group_avx512, 1),
        (Isa::Avx512, 32) => run!(k_chan_group_avx512, 2),
        (Isa::Avx512, 64) => run!(k_chan_group_avx512, 4),
        (Isa::Avx512, 128) => run!(k_chan_group_avx512, 8),
        (Isa::Avx2, 8) => run!(k_chan_group_avx2, 1),
        (Isa::Avx2, 16) => run!(k_chan_group_avx2, 2),
        (Isa::Avx2, 32) => run!(k_chan_group_avx2, 4),
        (Isa::Avx2, 64) => run!(k_chan_group_avx2, 8),
        (Isa::Avx2, 128) => run!(k_chan_group_avx2, 16),
        _ => cpu::k_chan(q, seg, t0, n, out),
    }
}

/// Per-group query folding: `qs[d] = q[d]·scale[g,d]` into `qs`, returns `Σ_d q[d]·min[g,d]`.
/// One group's D scales and mins are contiguous (group-major layout).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn fold_query_avx512(q: &[f32], seg: &ChanSeg<'_>, g: usize, qs: &mut [f32]) -> f32 {
    let hd = q.len();
    let (sp, mp) = (
        seg.scales.as_ptr().add(g * hd) as *const u16,
        seg.mins.as_ptr().add(g * hd) as *const u16,
    );
    let (qp, op) = (q.as_ptr(), qs.as_mut_ptr());
    let mut b = _mm512_setzero_ps();
    let mut d = 0;
    while d + 16 <= hd {
        let qv = _mm512_loadu_ps(qp.add(d));
        let sc = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(d) as *const __m256i));
        let mn = _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(d) as *const __m256i));
        _mm512_storeu_ps(op.add(d), _mm512_mul_ps(qv, sc));
        b = _mm512_fmadd_ps(qv, mn, b);
        d += 16;
    }
    let mut bias = _mm512_reduce_add_ps(b);
    while d < hd {
        qs[d] = q[d] * h2f(f16::from_bits(*sp.add(d)));
        bias += q[d] * h2f(f16::from_bits(*mp.add(d)));
        d += 1;
    }
    bias
}

/// One group of `16 * NB` tokens: `tmp[t] = Σ_d (q[d]·scale[g,d])·code[d,t] + Σ_d q[d]·min[g,d]`.
/// Two accumulator sets (even/odd channels) to shorten the FMA dependency chains.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn k_chan_group_avx512<const NB: usize>(
    q: &[f32],
    seg: &ChanSeg<'_>,
    g: usize,
    tmp: &mut [f32],
) {
    let fpi = codes_per_word(seg.bits);
    let lanes = Lanes16::new(seg.bits);
    let gw = g * (16 * NB) / fpi;
    let hd = q.len();
    let mut qs = [0f32; MAX_HEAD_DIM];
    let bias = fold_query_avx512(q, seg, g, &mut qs[..hd]);
    let cp = seg.codes.as_ptr();
    let mut a0 = [_mm512_setzero_ps(); NB];
    let mut a1 = [_mm512_setzero_ps(); NB];
    let mut d = 0;
    if seg.bits <= 4 {
        // Lookup-table decode: lut[c] = qs[d]·c, one multiply per channel and group.
        while d + 2 <= hd {
            let l0 = _mm512_mul_ps(_mm512_set1_ps(qs[d]), lanes.iota);
            let l1 = _mm512_mul_ps(_mm512_set1_ps(qs[d + 1]), lanes.iota);
            let r0 = cp.add(d * seg.words_per_row + gw);
            let r1 = r0.add(seg.words_per_row);
            for b in 0..NB {
                a0[b] = _mm512_add_ps(a0[b], lanes.lookup(r0.add(b * lanes.nwords), l0));
                a1[b] = _mm512_add_ps(a1[b], lanes.lookup(r1.add(b * lanes.nwords), l1));
            }
            d += 2;
        }
    }
    while d + 2 <= hd {
        let qs0 = _mm512_set1_ps(qs[d]);
        let qs1 = _mm512_set1_ps(qs[d + 1]);
        let r0 = cp.add(d * seg.words_per_row + gw);
        let r1 = r0.add(seg.words_per_row);
        for b in 0..NB {
            a0[b] = _mm512_fmadd_ps(qs0, lanes.load(r0.add(b * lanes.nwords)), a0[b]);
            a1[b] = _mm512_fmadd_ps(qs1, lanes.load(r1.add(b * lanes.nwords)), a1[b]);
        }
        d += 2;
    }
    if d < hd {
        let qs0 = _mm512_set1_ps(qs[d]);
        let r0 = cp.add(d * seg.words_per_row + gw);
        for b in 0..NB {
            a0[b] = _mm512_fmadd_ps(qs0, lanes.load(r0.add(b * lanes.nwords)), a0[b]);
        }
    }
    let bias = _mm512_set1_ps(bias);
    let tp = tmp.as_mut_ptr();
    for b in 0..NB {
        _mm512_storeu_ps(
            tp.add(16 * b),
            _mm512_add_ps(_mm512_add_ps(a0[b], a1[b]), bias),
        );
    }
}

/// Index constants of the paired 2-bit decode (two rows per `vpermps`, 16-entry table).
///
/// Rows `x` and `y` (two channels of a key group, or two tokens of a value row) each hold 16
/// codes per word. Lane `j` needs `code_x[j] + 4·code_y[j]` in its low 4 bits:
/// `srlv(x, 2j)` puts `code_x[j]` in bits 0–1, `rorv(y, 2j − 2)` puts `code_y[j]` in bits 2–3,
/// and a bit-select on `0b11` merges them (`vpermps` ignores index bits above 3). The table is
/// `T[a + 4b] = wx·a + wy·b`, one multiply and one FMA from the constants below.
struct Pair2 {
    shift_x: __m512i,
    rot_y: __m512i,
    low2: __m512i,
    /// `e & 3`
    ca: __m512,
    /// `e >> 2`
    cb: __m512,
}

const PAIR2_CB: [f32; 16] = [
    0., 0., 0., 0., 1., 1., 1., 1., 2., 2., 2., 2., 3., 3., 3., 3.,
];

impl Pair2 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn new() -> Self {
        let sx: [i32; 16] = std::array::from_fn(|j| 2 * j as i32);
        let ry: [i32; 16] = std::array::from_fn(|j| ((2 * j as i32) + 30) % 32);
        Pair2 {
            shift_x: _mm512_loadu_si512(sx.as_ptr() as *const _),
            rot_y: _mm512_loadu_si512(ry.as_ptr() as *const _),
            low2: _mm512_set1_epi32(3),
            ca: _mm512_loadu_ps(IOTA[0].as_ptr()),
            cb: _mm512_loadu_ps(PAIR2_CB.as_ptr()),
        }
    }

    /// `T[a + 4b] = wx·a + wy·b`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn table(&self, wx: f32, wy: f32) -> __m512 {
        _mm512_fmadd_ps(
            _mm512_set1_ps(wy),
            self.cb,
            _mm512_mul_ps(_mm512_set1_ps(wx), self.ca),
        )
    }

    /// `T[code_x[j] + 4·code_y[j]]` for the 16 codes of the words at `x` and `y`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn lookup(&self, x: *const u32, y: *const u32, t: __m512) -> __m512 {
        let a = _mm512_srlv_epi32(_mm512_set1_epi32(*x as i32), self.shift_x);
        let b = _mm512_rorv_epi32(_mm512_set1_epi32(*y as i32), self.rot_y);
        // Bit-select: bits of `a` where `low2` is set, of `b` elsewhere.
        let idx = _mm512_ternarylogic_epi32(self.low2, a, b, 0xCA);
        _mm512_permutexvar_ps(idx, t)
    }
}

/// 2-bit keys, one group of `16 * NB` tokens (same result as [`k_chan_group_avx512`]):
/// channels are taken in pairs, each pair's codes decoded by one `vpermps` of a 16-entry table
/// of `qs[d]·a + qs[d+1]·b` (see [`Pair2`]); two accumulator sets (pairs alternate).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn k_chan_group_2bit_avx512<const NB: usize>(
    q: &[f32],
    seg: &ChanSeg<'_>,
    g: usize,
    tmp: &mut [f32],
) {
    debug_assert_eq!(seg.bits, 2);
    let gw = g * NB;
    let wpr = seg.words_per_row;
    let hd = q.len();
    let mut qs = [0f32; MAX_HEAD_DIM];
    let bias = fold_query_avx512(q, seg, g, &mut qs[..hd]);
    let pair = Pair2::new();
    let cp = seg.codes.as_ptr();
    let mut a0 = [_mm512_setzero_ps(); NB];
    let mut a1 = [_mm512_setzero_ps(); NB];
    let mut d = 0;
    while d + 4 <= hd {
        let t0 = pair.table(qs[d], qs[d + 1]);
        let t1 = pair.table(qs[d + 2], qs[d + 3]);
        let r0 = cp.add(d * wpr + gw);
        let (r1, r2, r3) = (r0.add(wpr), r0.add(2 * wpr), r0.add(3 * wpr));
        for b in 0..NB {
            a0[b] = _mm512_add_ps(a0[b], pair.lookup(r0.add(b), r1.add(b), t0));
            a1[b] = _mm512_add_ps(a1[b], pair.lookup(r2.add(b), r3.add(b), t1));
        }
        d += 4;
    }
    if d + 2 <= hd {
        let t0 = pair.table(qs[d], qs[d + 1]);
        let r0 = cp.add(d * wpr + gw);
        let r1 = r0.add(wpr);
        for b in 0..NB {
            a0[b] = _mm512_add_ps(a0[b], pair.lookup(r0.add(b), r1.add(b), t0));
        }
        d += 2;
    }
    if d < hd {
        // Last odd channel: pair it with itself at weight 0.
        let t0 = pair.table(qs[d], 0.0);
        let r0 = cp.add(d * wpr + gw);
        for b in 0..NB {
            a1[b] = _mm512_add_ps(a1[b], pair.lookup(r0.add(b), r0.add(b), t0));
        }
    }
    let bias = _mm512_set1_ps(bias);
    let tp = tmp.as_mut_ptr();
    for b in 0..NB {
        _mm512_storeu_ps(
            tp.add(16 * b),
            _mm512_add_ps(_mm512_add_ps(a0[b], a1[b]), bias),
        );
    }
}

/// 4-bit decode of 16 codes (two words) without a cross-lane permute of the words: the two
/// words are broadcast as one 64-bit value, so lanes alternate between them, and lane `2k` /
/// `2k + 1` take nibble `k` of word 0 / word 1 (`srlv` by `4k`), i.e. codes `k` and `8 + k`.
/// Results come out in that interleaved order; `unperm` restores the natural order once at the
/// end (`vpermps`). `vpermps` reads the low 4 bits of the shifted word: the code itself.
struct Quad4 {
    shifts: __m512i,
    unperm: __m512i,
}

impl Quad4 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn new() -> Self {
        let sh: [i32; 16] = std::array::from_fn(|l| 4 * (l as i32 / 2));
        let un: [i32; 16] = std::array::from_fn(|t| {
            if t < 8 {
                2 * t as i32
            } else {
                2 * (t as i32 - 8) + 1
            }
        });
        Quad4 {
            shifts: _mm512_loadu_si512(sh.as_ptr() as *const _),
            unperm: _mm512_loadu_si512(un.as_ptr() as *const _),
        }
    }

    /// `lut[code]` of the 16 codes in the words `wp[0..2]`, interleaved order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn lookup(&self, wp: *const u32, lut: __m512) -> __m512 {
        let w = _mm512_set1_epi64((wp as *const i64).read_unaligned());
        _mm512_permutexvar_ps(_mm512_srlv_epi32(w, self.shifts), lut)
    }

    /// Interleaved order → natural order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn unpermute(&self, v: __m512) -> __m512 {
        _mm512_permutexvar_ps(self.unperm, v)
    }
}

/// 4-bit keys, one group of `16 * NB` tokens (same result as [`k_chan_group_avx512`]): a
/// 16-entry table `qs[d]·c` per channel, codes decoded by [`Quad4`].
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn k_chan_group_4bit_avx512<const NB: usize>(
    q: &[f32],
    seg: &ChanSeg<'_>,
    g: usize,
    tmp: &mut [f32],
) {
    debug_assert_eq!(seg.bits, 4);
    let gw = g * 2 * NB;
    let wpr = seg.words_per_row;
    let hd = q.len();
    let mut qs = [0f32; MAX_HEAD_DIM];
    let bias = fold_query_avx512(q, seg, g, &mut qs[..hd]);
    let quad = Quad4::new();
    let iota = _mm512_loadu_ps(IOTA[1].as_ptr());
    let cp = seg.codes.as_ptr();
    let mut a0 = [_mm512_setzero_ps(); NB];
    let mut a1 = [_mm512_setzero_ps(); NB];
    let mut d = 0;
    while d + 2 <= hd {
        let l0 = _mm512_mul_ps(_mm512_set1_ps(qs[d]), iota);
        let l1 = _mm512_mul_ps(_mm512_set1_ps(qs[d + 1]), iota);
        let r0 = cp.add(d * wpr + gw);
        let r1 = r0.add(wpr);
        for b in 0..NB {
            a0[b] = _mm512_add_ps(a0[b], quad.lookup(r0.add(2 * b), l0));
            a1[b] = _mm512_add_ps(a1[b], quad.lookup(r1.add(2 * b), l1));
        }
        d += 2;
    }
    if d < hd {
        let l0 = _mm512_mul_ps(_mm512_set1_ps(qs[d]), iota);
        let r0 = cp.add(d * wpr + gw);
        for b in 0..NB {
            a0[b] = _mm512_add_ps(a0[b], quad.lookup(r0.add(2 * b), l0));
        }
    }
    let bias = _mm512_set1_ps(bias);
    let tp = tmp.as_mut_ptr();
    for b in 0..NB {
        let v = quad.unpermute(_mm512_add_ps(a0[b], a1[b]));
        _mm512_storeu_ps(tp.add(16 * b), _mm512_add_ps(v, bias));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_chan_group_avx2<const NB: usize>(
    q: &[f32],
    seg: &ChanSeg<'_>,
    g: usize,
    tmp: &mut [f32],
) {
    let fpi = codes_per_word(seg.bits);
    let lanes = Lanes8::new(seg.bits);
    let gw = g * (8 * NB) / fpi;
    let hd = q.len();
    let mut qs = [0f32; MAX_HEAD_DIM];
    let (sp, mp) = (
        seg.scales.as_ptr().add(g * hd),
        seg.mins.as_ptr().add(g * hd),
    );
    let mut bias = 0f32;
    for d in 0..hd {
        qs[d] = q[d] * h2f(*sp.add(d));
        bias += q[d] * h2f(*mp.add(d));
    }
    let cp = seg.codes.as_ptr();
    let mut a0 = [_mm256_setzero_ps(); NB];
    let mut a1 = [_mm256_setzero_ps(); NB];
    let mut d = 0;
    while d + 2 <= hd {
        let qs0 = _mm256_set1_ps(qs[d]);
        let qs1 = _mm256_set1_ps(qs[d + 1]);
        let r0 = cp.add(d * seg.words_per_row + gw);
        let r1 = r0.add(seg.words_per_row);
        for b in 0..NB {
            a0[b] = _mm256_fmadd_ps(qs0, lanes.load(r0, 8 * b), a0[b]);
            a1[b] = _mm256_fmadd_ps(qs1, lanes.load(r1, 8 * b), a1[b]);
        }
        d += 2;
    }
    if d < hd {
        let qs0 = _mm256_set1_ps(qs[d]);
        let r0 = cp.add(d * seg.words_per_row + gw);
        for b in 0..NB {
            a0[b] = _mm256_fmadd_ps(qs0, lanes.load(r0, 8 * b), a0[b]);
        }
    }
    let bias = _mm256_set1_ps(bias);
    let tp = tmp.as_mut_ptr();
    for b in 0..NB {
        _mm256_storeu_ps(
            tp.add(8 * b),
            _mm256_add_ps(_mm256_add_ps(a0[b], a1[b]), bias),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Per-token quantized values

/// `acc += Σ_i p[i]·v[t0 + i]` over a per-token quantized stretch, SIMD version of
/// [`cpu::v_tok`].
pub fn v_tok(isa: Isa, p: &[f32], seg: &TokSeg<'_>, t0: usize, n: usize, acc: &mut [f32]) {
    assert_supported(isa);
    let (hd, g) = (acc.len(), seg.group);
    let fpi = codes_per_word(seg.bits);
    assert!(hd % g == 0 && g % fpi == 0);
    assert!(seg.codes.len() >= (t0 + n) * (hd / fpi));
    assert!(seg.scales.len() >= (t0 + n) * (hd / g) && seg.mins.len() >= (t0 + n) * (hd / g));
    assert!(p.len() >= n);
    if isa == Isa::Avx512Vnni && cpu::v_tok_q16_shape(hd, seg) && cpu::all_nonnegative(&p[..n]) {
        // SAFETY: the CPU has the features; codes/scales/mins of tokens t0..t0+n, p[..n] and
        // acc[..hd] are in bounds (asserted above); hd = 64 * NV.
        match (hd, seg.bits) {
            (64, 2) => unsafe { v_tok_vnni::<1, 1, 2>(p, 0, seg, t0, n, acc) },
            (64, _) => unsafe { v_tok_vnni::<1, 1, 4>(p, 0, seg, t0, n, acc) },
            (_, 2) => unsafe { v_tok_vnni::<1, 2, 2>(p, 0, seg, t0, n, acc) },
            _ => unsafe { v_tok_vnni::<1, 2, 4>(p, 0, seg, t0, n, acc) },
        }
        return;
    }
    match (isa.base(), hd, g % 16 == 0, g % 8 == 0) {
        // SAFETY (all arms): the CPU has the features; codes/scales/mins of tokens
        // `t0..t0+n` and `acc[..hd]` are in bounds (asserted above); groups are whole multiples
        // of the lane count, so one lane vector lies in one group.
        (Isa::Avx512, 32, true, _) => match g {
            // SAFETY (these arms): as above; VPG = g / 16 (g is a multiple of 16 dividing hd).
            16 => unsafe { v_tok_avx512::<2, 1>(p, seg, t0, n, acc) },
            _ => unsafe { v_tok_avx512::<2, 2>(p, seg, t0, n, acc) },
        },
        (Isa::Avx512, 64, true, _) => match g {
            // SAFETY (these arms): as above; VPG = g / 16 (g is a multiple of 16 dividing hd).
            16 => unsafe { v_tok_avx512::<4, 1>(p, seg, t0, n, acc) },
            32 => unsafe { v_tok_avx512::<4, 2>(p, seg, t0, n, acc) },
            _ => unsafe { v_tok_avx512::<4, 4>(p, seg, t0, n, acc) },
        },
        (Isa::Avx512, 128, true, _) => match g {
            // SAFETY (these arms): as above; VPG = g / 16 (g is a multiple of 16 dividing hd).
            16 => unsafe { v_tok_avx512::<8, 1>(p, seg, t0, n, acc) },
            32 => unsafe { v_tok_avx512::<8, 2>(p, seg, t0, n, acc) },
            64 => unsafe { v_tok_avx512::<8, 4>(p, seg, t0, n, acc) },
            _ => unsafe { v_tok_avx512::<8, 8>(p, seg, t0, n, acc) },
        },
        (Isa::Avx512, 256, true, _) => match g {
            // SAFETY (these arms): as above; VPG = g / 16 (g is a multiple of 16 dividing hd).
            16 => unsafe { v_tok_avx512::<16, 1>(p, seg, t0, n, acc) },
            32 => unsafe { v_tok_avx512::<16, 2>(p, seg, t0, n, acc) },
            64 => unsafe { v_tok_avx512::<16, 4>(p, seg, t0, n, acc) },
            128 => unsafe { v_tok_avx512::<16, 8>(p, seg, t0, n, acc) },
            _ => unsafe { v_tok_avx512::<16, 16>(p, seg, t0, n, acc) },
        },
        (Isa::Avx2, 16, _, true) => unsafe { v_tok_avx2::<2>(p, seg, t0, n, acc) },
        (Isa::Avx2, 32, _, true) => unsafe { v_tok_avx2::<4>(p, seg, t0, n, acc) },
        (Isa::Avx2, 64, _, true) => unsafe { v_tok_avx2::<8>(p, seg, t0, n, acc) },
        (Isa::Avx2, 128, _, true) => unsafe { v_tok_avx2::<16>(p, seg, t0, n, acc) },
        _ => cpu::v_tok(p, seg, t0, n, acc),
    }
}

/// Prefetches (into L1) the cache lines of `len` bytes from `p` (no access: `p` may dangle).
#[inline]
#[target_feature(enable = "sse")]
unsafe fn prefetch_lines(p: *const u8, len: usize) {
    let mut o = 0;
    while o < len {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8);
        o += 64;
    }
}

/// Prefetches (into L1) `count` per-token value rows from token `t`: their codes (`wpt` words
/// each) and f16 scales and mins (`gpt` each). No access: the pointers may run past the segment.
#[inline]
#[target_feature(enable = "sse")]
unsafe fn prefetch_value_rows(
    codes: *const u32,
    scales: *const u16,
    mins: *const u16,
    wpt: usize,
    gpt: usize,
    t: usize,
    count: usize,
) {
    prefetch_lines(codes.wrapping_add(t * wpt) as *const u8, count * wpt * 4);
    prefetch_lines(scales.wrapping_add(t * gpt) as *const u8, count * gpt * 2);
    prefetch_lines(mins.wrapping_add(t * gpt) as *const u8, count * gpt * 2);
}

/// Software prefetch (into L2) of a quantized segment's codes, scales and mins, issued one
/// segment (block) ahead by the driver: each block's per-head parts are only 2–16 KB, too short
/// for the hardware prefetcher to ramp up. f16/f32 rows are left to the hardware prefetcher.
pub fn prefetch_seg(seg: &super::SegData<'_>) {
    let parts = |c: &[u32], s: &[f16], m: &[f16]| {
        // SAFETY: prefetches only hint the cache; the ranges are inside live slices.
        unsafe {
            prefetch_lines_l2(c.as_ptr() as *const u8, c.len() * 4);
            prefetch_lines_l2(s.as_ptr() as *const u8, s.len() * 2);
            prefetch_lines_l2(m.as_ptr() as *const u8, m.len() * 2);
        }
    };
    match seg {
        super::SegData::Chan(c) => parts(c.codes, c.scales, c.mins),
        super::SegData::Tok(t) => parts(t.codes, t.scales, t.mins),
        _ => {}
    }
}

#[inline]
#[target_feature(enable = "sse")]
unsafe fn prefetch_lines_l2(p: *const u8, len: usize) {
    let mut o = 0;
    while o < len.min(1 << 16) {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(o) as *const i8);
        o += 64;
    }
}

/// Tokens per sub-chunk of the value kernel's prepass.
const V_SUB: usize = 64;

/// `NV` vectors of 16 channels per token, `VPG` vectors per group (`G = 16·VPG`, so the group
/// of every vector is a compile-time constant and the unrolled loops keep tables and
/// accumulators in registers).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn v_tok_avx512<const NV: usize, const VPG: usize>(
    p: &[f32],
    seg: &TokSeg<'_>,
    t0: usize,
    n: usize,
    acc: &mut [f32],
) {
    let hd = NV * 16;
    let g = seg.group;
    let fpi = codes_per_word(seg.bits);
    let (wpt, gpt) = (hd / fpi, hd / g);
    let lanes = Lanes16::new(seg.bits);
    // Group of each 16-lane vector, and whether it starts a group (no divisions in the loops).
    debug_assert_eq!(g, 16 * VPG);
    let gof: [usize; NV] = std::array::from_fn(|j| j / VPG);
    let gstart: [bool; NV] = std::array::from_fn(|j| j % VPG == 0);
    let (cp, sp, mp) = (
        seg.codes.as_ptr(),
        seg.scales.as_ptr() as *const u16,
        seg.mins.as_ptr() as *const u16,
    );
    let ap = acc.as_mut_ptr();
    let mut a = [_mm512_setzero_ps(); NV];
    let mut min_acc = [0f32; 16];
    // ps[i * gpt + gi] = p[i] * scale[t0 + i, gi], computed 16 at a time (gpt divides 16 since
    // gpt = hd / g with hd <= 256 and g a multiple of 16).
    let mut ps = [0f32; V_SUB * 16];
    let mut pidx = [0i32; 16];
    for (l, x) in pidx.iter_mut().enumerate() {
        *x = (l / gpt) as i32;
    }
    let pidx = _mm512_loadu_si512(pidx.as_ptr() as *const _);
    let pmask: __mmask16 = ((1u32 << (16 / gpt)) - 1) as u16;
    let mut macc = _mm512_setzero_ps();
    let mut i0 = 0;
    while i0 < n {
        let cnt = V_SUB.min(n - i0);
        let m = cnt * gpt;
        // Software prefetch of the next sub-chunk's codes and scales/mins: the hardware
        // prefetcher restarts at every block (8 KB per KV head) and at page boundaries.
        let nx = (n - i0 - cnt).min(V_SUB);
        prefetch_value_rows(cp, sp, mp, wpt, gpt, t0 + i0 + cnt, nx);
        let mut j = 0;
        while j + 16 <= m {
            let pv = _mm512_maskz_loadu_ps(pmask, p.as_ptr().add(i0 + j / gpt));
            let pv = _mm512_permutexvar_ps(pidx, pv);
            let off = (t0 + i0) * gpt + j;
            let sc = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(off) as *const __m256i));
            let mn = _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(off) as *const __m256i));
            _mm512_storeu_ps(ps.as_mut_ptr().add(j), _mm512_mul_ps(pv, sc));
            macc = _mm512_fmadd_ps(pv, mn, macc);
            j += 16;
        }
        while j < m {
            let w = p[i0 + j / gpt];
            let off = (t0 + i0) * gpt + j;
            ps[j] = w * h2f(f16::from_bits(*sp.add(off)));
            min_acc[j % gpt] += w * h2f(f16::from_bits(*mp.add(off)));
            j += 1;
        }
        if seg.bits == 2 {
            // Tokens in pairs: one `vpermps` of a 16-entry table per two codes (see [`Pair2`]);
            // an odd last token is paired with itself at weight 0.
            let pair = Pair2::new();
            let mut i = 0;
            while i < cnt {
                let i1 = if i + 1 < cnt { i + 1 } else { i };
                let (rx, ry) = (cp.add((t0 + i0 + i) * wpt), cp.add((t0 + i0 + i1) * wpt));
                let (px, py) = (ps.as_ptr().add(i * gpt), ps.as_ptr().add(i1 * gpt));
                let wy = |gi: usize| if i1 > i { *py.add(gi) } else { 0.0 };
                let mut lut = _mm512_setzero_ps();
                for (jv, aj) in a.iter_mut().enumerate() {
                    if gstart[jv] {
                        lut = pair.table(*px.add(gof[jv]), wy(gof[jv]));
                    }
                    *aj = _mm512_add_ps(*aj, pair.lookup(rx.add(jv), ry.add(jv), lut));
                }
                i += 2;
            }
        } else if seg.bits == 4 {
            // 16-entry table p·scale·[0..16] per token and group, codes decoded by [`Quad4`]
            // (accumulators in interleaved channel order until the end).
            let quad = Quad4::new();
            let iota = _mm512_loadu_ps(IOTA[1].as_ptr());
            for i in 0..cnt {
                let row = cp.add((t0 + i0 + i) * wpt);
                let pr = ps.as_ptr().add(i * gpt);
                let mut lut = _mm512_setzero_ps();
                for (jv, aj) in a.iter_mut().enumerate() {
                    if gstart[jv] {
                        lut = _mm512_mul_ps(_mm512_set1_ps(*pr.add(gof[jv])), iota);
                    }
                    *aj = _mm512_add_ps(*aj, quad.lookup(row.add(2 * jv), lut));
                }
            }
            if i0 + cnt >= n {
                for aj in a.iter_mut() {
                    *aj = quad.unpermute(*aj);
                }
            }
        } else if seg.bits <= 4 {
            // Lookup-table decode: lut = p·scale·[codes], one multiply per token and group.
            for i in 0..cnt {
                let row = cp.add((t0 + i0 + i) * wpt);
                let pr = ps.as_ptr().add(i * gpt);
                let mut lut = _mm512_setzero_ps();
                for (jv, aj) in a.iter_mut().enumerate() {
                    if gstart[jv] {
                        lut = _mm512_mul_ps(_mm512_set1_ps(*pr.add(gof[jv])), lanes.iota);
                    }
                    *aj = _mm512_add_ps(*aj, lanes.lookup(row.add(jv * lanes.nwords), lut));
                }
            }
        } else {
            for i in 0..cnt {
                let row = cp.add((t0 + i0 + i) * wpt);
                let pr = ps.as_ptr().add(i * gpt);
                for (jv, aj) in a.iter_mut().enumerate() {
                    let c = lanes.load(row.add(jv * lanes.nwords));
                    *aj = _mm512_fmadd_ps(_mm512_set1_ps(*pr.add(gof[jv])), c, *aj);
                }
            }
        }
        i0 += cnt;
    }
    let mut mv = [0f32; 16];
    _mm512_storeu_ps(mv.as_mut_ptr(), macc);
    for (l, x) in mv.iter().enumerate() {
        min_acc[l % gpt] += x;
    }
    for (j, aj) in a.iter().enumerate() {
        let m = _mm512_set1_ps(min_acc[gof[j]]);
        let cur = _mm512_loadu_ps(ap.add(16 * j));
        _mm512_storeu_ps(ap.add(16 * j), _mm512_add_ps(cur, _mm512_add_ps(*aj, m)));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn v_tok_avx2<const NV: usize>(
    p: &[f32],
    seg: &TokSeg<'_>,
    t0: usize,
    n: usize,
    acc: &mut [f32],
) {
    let hd = NV * 8;
    let g = seg.group;
    let fpi = codes_per_word(seg.bits);
    let (wpt, gpt) = (hd / fpi, hd / g);
    let lanes = Lanes8::new(seg.bits);
    let gof: [usize; NV] = std::array::from_fn(|j| j * 8 / g);
    let (cp, sp, mp) = (seg.codes.as_ptr(), seg.scales.as_ptr(), seg.mins.as_ptr());
    let ap = acc.as_mut_ptr();
    let mut a = [_mm256_setzero_ps(); NV];
    let mut min_acc = [0f32; 16];
    let mut ps = [0f32; 16];
    for (i, &w) in p[..n].iter().enumerate() {
        let t = t0 + i;
        for gi in 0..gpt {
            ps[gi] = w * h2f(*sp.add(t * gpt + gi));
            min_acc[gi] += w * h2f(*mp.add(t * gpt + gi));
        }
        let row = cp.add(t * wpt);
        for (j, aj) in a.iter_mut().enumerate() {
            let c = lanes.load(row, 8 * j);
            *aj = _mm256_fmadd_ps(_mm256_set1_ps(ps[gof[j]]), c, *aj);
        }
    }
    for (j, aj) in a.iter().enumerate() {
        let m = _mm256_set1_ps(min_acc[gof[j]]);
        let cur = _mm256_loadu_ps(ap.add(8 * j));
        _mm256_storeu_ps(ap.add(8 * j), _mm256_add_ps(cur, _mm256_add_ps(*aj, m)));
    }
}

// ---------------------------------------------------------------------------------------------
// GQA: several queries (the query heads sharing one KV head) per decoded code

/// Scores of `m` queries over a per-channel quantized stretch, decoding each code once.
/// Returns `false` (nothing written) for shapes without a multi-query kernel.
#[allow(clippy::too_many_arguments)]
pub fn k_chan_multi(
    isa: Isa,
    q: &[f32],
    m: usize,
    seg: &ChanSeg<'_>,
    t0: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) -> bool {
    assert_supported(isa);
    if isa.base() != Isa::Avx512 || m == 0 {
        return false;
    }
    if n == 0 {
        return true;
    }
    let (hd, g) = (q.len() / m, seg.group);
    let fpi = codes_per_word(seg.bits);
    assert!(q.len() == m * hd && hd <= MAX_HEAD_DIM);
    assert!(g % fpi == 0 && seg.words_per_row * fpi == seg.groups_per_row * g);
    assert!((t0 + n - 1) / g < seg.groups_per_row);
    assert!(seg.codes.len() >= hd * seg.words_per_row);
    assert!(seg.scales.len() >= hd * seg.groups_per_row);
    assert!(seg.mins.len() >= hd * seg.groups_per_row);
    assert!(out.len() >= (m - 1) * out_stride + n);
    if isa == Isa::Avx512Vnni && cpu::k_chan_q16_shape(hd, seg) {
        // SAFETY: as in `k_chan` (bounds asserted above for all m queries and output rows).
        match (m, seg.bits) {
            (1, 2) => unsafe { k_chan_vnni::<1, 2>(q, seg, t0, n, out, out_stride) },
            (2, 2) => unsafe { k_chan_vnni::<2, 2>(q, seg, t0, n, out, out_stride) },
            (3, 2) => unsafe { k_chan_vnni::<3, 2>(q, seg, t0, n, out, out_stride) },
            (_, 2) => unsafe { k_chan_vnni::<4, 2>(q, seg, t0, n, out, out_stride) },
            (1, _) => unsafe { k_chan_vnni::<1, 4>(q, seg, t0, n, out, out_stride) },
            (2, _) => unsafe { k_chan_vnni::<2, 4>(q, seg, t0, n, out, out_stride) },
            (3, _) => unsafe { k_chan_vnni::<3, 4>(q, seg, t0, n, out, out_stride) },
            _ => unsafe { k_chan_vnni::<4, 4>(q, seg, t0, n, out, out_stride) },
        }
        return true;
    }
    macro_rules! go {
        ($m:literal, $nb:literal) => {{
            let mut tmp = [0f32; $m * 16 * $nb];
            let mut t = t0;
            while t < t0 + n {
                let gi = t / g;
                let g0 = gi * g;
                let hi = (t0 + n).min(g0 + g);
                // SAFETY: the CPU has AVX-512 (asserted); the kernel reads rows d < hd of the
                // whole group gi < groups_per_row, the group's scales/mins and q[..m*hd], and
                // writes tmp[..m*g]; all bounds asserted above.
                unsafe { k_chan_group_multi_avx512::<$m, $nb>(q, seg, gi, &mut tmp) };
                for r in 0..$m {
                    let src = &tmp[r * g + (t - g0)..r * g + (hi - g0)];
                    out[r * out_stride + (t - t0)..][..hi - t].copy_from_slice(src);
                }
                t = hi;
            }
        }};
    }
    match (m, g) {
        (2, 16) => go!(2, 1),
        (3, 16) => go!(3, 1),
        (4, 16) => go!(4, 1),
        (2, 32) => go!(2, 2),
        (3, 32) => go!(3, 2),
        (4, 32) => go!(4, 2),
        (2, 64) => go!(2, 4),
        (3, 64) => go!(3, 4),
        (4, 64) => go!(4, 4),
        (2, 128) => go!(2, 8),
        _ => return false,
    }
    true
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn k_chan_group_multi_avx512<const M: usize, const NB: usize>(
    q: &[f32],
    seg: &ChanSeg<'_>,
    g: usize,
    tmp: &mut [f32],
) {
    let fpi = codes_per_word(seg.bits);
    let lanes = Lanes16::new(seg.bits);
    let gw = g * (16 * NB) / fpi;
    let hd = q.len() / M;
    let mut qs = [[0f32; MAX_HEAD_DIM]; M];
    let mut bias = [0f32; M];
    for r in 0..M {
        bias[r] = fold_query_avx512(&q[r * hd..(r + 1) * hd], seg, g, &mut qs[r][..hd]);
    }
    let cp = seg.codes.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); NB]; M];
    for d in 0..hd {
        let row = cp.add(d * seg.words_per_row + gw);
        for b in 0..NB {
            let c = lanes.decode(row.add(b * lanes.nwords), seg.bits);
            for r in 0..M {
                acc[r][b] = _mm512_fmadd_ps(_mm512_set1_ps(qs[r][d]), c, acc[r][b]);
            }
        }
    }
    let tp = tmp.as_mut_ptr();
    for r in 0..M {
        let bv = _mm512_set1_ps(bias[r]);
        for b in 0..NB {
            _mm512_storeu_ps(tp.add(r * 16 * NB + 16 * b), _mm512_add_ps(acc[r][b], bv));
        }
    }
}

/// `acc[r] += Σ_i p[r * p_stride + i]·v[t0 + i]` for `m` weight rows over a per-token quantized
/// stretch, decoding each code once. Returns `false` (nothing written) for shapes without a
/// multi-row kernel.
#[allow(clippy::too_many_arguments)]
pub fn v_tok_multi(
    isa: Isa,
    p: &[f32],
    p_stride: usize,
    m: usize,
    seg: &TokSeg<'_>,
    t0: usize,
    n: usize,
    acc: &mut [f32],
) -> bool {
    assert_supported(isa);
    if isa.base() != Isa::Avx512 || m == 0 {
        return false;
    }
    let (hd, g) = (acc.len() / m, seg.group);
    let fpi = codes_per_word(seg.bits);
    if g % 16 != 0 {
        return false;
    }
    assert!(acc.len() == m * hd && hd % g == 0 && g % fpi == 0);
    assert!(seg.codes.len() >= (t0 + n) * (hd / fpi));
    assert!(seg.scales.len() >= (t0 + n) * (hd / g) && seg.mins.len() >= (t0 + n) * (hd / g));
    assert!(n == 0 || p.len() >= (m - 1) * p_stride + n);
    if isa == Isa::Avx512Vnni
        && cpu::v_tok_q16_shape(hd, seg)
        && (0..m).all(|r| cpu::all_nonnegative(&p[r * p_stride..][..n]))
    {
        // SAFETY (every call below): as in `v_tok`, for the m weight rows and acc[..m*hd]
        // (asserted above); each call gets rows r..r+rows of the weights and the accumulator.
        // Rows per call: at head_dim 64 up to three (four as two pairs), at 128 up to two (a
        // pair's accumulators exceed the registers, yet it beats one row at a time: 1.2x for
        // four rows); balanced.
        let most = if hd == 64 { 3 } else { 2 };
        for (r, rows) in super::balanced_chunks(m, most) {
            let (pr, acc_r) = (&p[r * p_stride..], &mut acc[r * hd..(r + rows) * hd]);
            match (hd, rows, seg.bits) {
                (64, 1, 2) => unsafe { v_tok_vnni::<1, 1, 2>(pr, p_stride, seg, t0, n, acc_r) },
                (64, 2, 2) => unsafe { v_tok_vnni::<2, 1, 2>(pr, p_stride, seg, t0, n, acc_r) },
                (64, 3, 2) => unsafe { v_tok_vnni::<3, 1, 2>(pr, p_stride, seg, t0, n, acc_r) },
                (64, 1, _) => unsafe { v_tok_vnni::<1, 1, 4>(pr, p_stride, seg, t0, n, acc_r) },
                (64, 2, _) => unsafe { v_tok_vnni::<2, 1, 4>(pr, p_stride, seg, t0, n, acc_r) },
                (64, _, _) => unsafe { v_tok_vnni::<3, 1, 4>(pr, p_stride, seg, t0, n, acc_r) },
                (_, 1, 2) => unsafe { v_tok_vnni::<1, 2, 2>(pr, p_stride, seg, t0, n, acc_r) },
                (_, _, 2) => unsafe { v_tok_vnni::<2, 2, 2>(pr, p_stride, seg, t0, n, acc_r) },
                (_, 1, _) => unsafe { v_tok_vnni::<1, 2, 4>(pr, p_stride, seg, t0, n, acc_r) },
                _ => unsafe { v_tok_vnni::<2, 2, 4>(pr, p_stride, seg, t0, n, acc_r) },
            }
        }
        return true;
    }
    match (m, hd) {
        // SAFETY (all arms): the CPU has AVX-512 (asserted); codes/scales/mins of tokens
        // t0..t0+n, the m weight rows and acc[..m*hd] are in bounds (asserted above); g is a
        // multiple of 16 so one lane vector lies in one group.
        (2, 32) => unsafe { v_tok_multi_avx512::<2, 2>(p, p_stride, seg, t0, n, acc) },
        (3, 32) => unsafe { v_tok_multi_avx512::<3, 2>(p, p_stride, seg, t0, n, acc) },
        (4, 32) => unsafe { v_tok_multi_avx512::<4, 2>(p, p_stride, seg, t0, n, acc) },
        (2, 64) => unsafe { v_tok_multi_avx512::<2, 4>(p, p_stride, seg, t0, n, acc) },
        (3, 64) => unsafe { v_tok_multi_avx512::<3, 4>(p, p_stride, seg, t0, n, acc) },
        (4, 64) => unsafe { v_tok_multi_avx512::<4, 4>(p, p_stride, seg, t0, n, acc) },
        (2, 128) => unsafe { v_tok_multi_avx512::<2, 8>(p, p_stride, seg, t0, n, acc) },
        (3, 128) => unsafe { v_tok_multi_avx512::<3, 8>(p, p_stride, seg, t0, n, acc) },
        _ => return false,
    }
    true
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn v_tok_multi_avx512<const M: usize, const NV: usize>(
    p: &[f32],
    p_stride: usize,
    seg: &TokSeg<'_>,
    t0: usize,
    n: usize,
    acc: &mut [f32],
) {
    let hd = NV * 16;
    let g = seg.group;
    let fpi = codes_per_word(seg.bits);
    let (wpt, gpt) = (hd / fpi, hd / g);
    let lanes = Lanes16::new(seg.bits);
    // Group of each 16-lane vector, and whether it starts a group (no divisions in the loops).
    let gof: [usize; NV] = std::array::from_fn(|j| j * 16 / g);
    let (cp, sp, mp) = (
        seg.codes.as_ptr(),
        seg.scales.as_ptr() as *const u16,
        seg.mins.as_ptr() as *const u16,
    );
    let mut a = [[_mm512_setzero_ps(); NV]; M];
    let mut min_acc = [[0f32; 16]; M];
    let mut ps = [[0f32; V_SUB * 16]; M];
    let mut pidx = [0i32; 16];
    for (l, x) in pidx.iter_mut().enumerate() {
        *x = (l / gpt) as i32;
    }
    let pidx = _mm512_loadu_si512(pidx.as_ptr() as *const _);
    let pmask: __mmask16 = ((1u32 << (16 / gpt)) - 1) as u16;
    let mut macc = [_mm512_setzero_ps(); M];
    let mut i0 = 0;
    while i0 < n {
        let cnt = V_SUB.min(n - i0);
        let mm = cnt * gpt;
        for r in 0..M {
            let pr = p.as_ptr().add(r * p_stride + i0);
            let mut j = 0;
            while j + 16 <= mm {
                let pv = _mm512_permutexvar_ps(pidx, _mm512_maskz_loadu_ps(pmask, pr.add(j / gpt)));
                let off = (t0 + i0) * gpt + j;
                let sc = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(off) as *const __m256i));
                let mn = _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(off) as *const __m256i));
                _mm512_storeu_ps(ps[r].as_mut_ptr().add(j), _mm512_mul_ps(pv, sc));
                macc[r] = _mm512_fmadd_ps(pv, mn, macc[r]);
                j += 16;
            }
            while j < mm {
                let w = *pr.add(j / gpt);
                let off = (t0 + i0) * gpt + j;
                ps[r][j] = w * h2f(f16::from_bits(*sp.add(off)));
                min_acc[r][j % gpt] += w * h2f(f16::from_bits(*mp.add(off)));
                j += 1;
            }
        }
        for i in 0..cnt {
            let row = cp.add((t0 + i0 + i) * wpt);
            for jv in 0..NV {
                let c = lanes.decode(row.add(jv * lanes.nwords), seg.bits);
                for r in 0..M {
                    let w = _mm512_set1_ps(ps[r][i * gpt + gof[jv]]);
                    a[r][jv] = _mm512_fmadd_ps(w, c, a[r][jv]);
                }
            }
        }
        i0 += cnt;
    }
    let ap = acc.as_mut_ptr();
    for r in 0..M {
        let mut mv = [0f32; 16];
        _mm512_storeu_ps(mv.as_mut_ptr(), macc[r]);
        for (l, x) in mv.iter().enumerate() {
            min_acc[r][l % gpt] += x;
        }
        for jv in 0..NV {
            let mvv = _mm512_set1_ps(min_acc[r][gof[jv]]);
            let dst = ap.add(r * hd + 16 * jv);
            _mm512_storeu_ps(
                dst,
                _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_add_ps(a[r][jv], mvv)),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax exponentials

/// `x[i] = exp(x[i] - shift)`, returns the sum; SIMD version of [`cpu::exp_shift_sum`].
pub fn exp_shift_sum(isa: Isa, x: &mut [f32], shift: f32) -> f32 {
    assert_supported(isa);
    match isa.base() {
        // SAFETY: the CPU has the features; the kernels access x[..x.len()] only.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { exp_shift_sum_avx512(x, shift) },
        // SAFETY: as above.
        Isa::Avx2 => unsafe { exp_shift_sum_avx2(x, shift) },
        Isa::Scalar => cpu::exp_shift_sum(x, shift),
    }
}

#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_shift_sum_avx512(x: &mut [f32], shift: f32) -> f32 {
    use cpu::expc::*;
    let n = x.len();
    let p = x.as_mut_ptr();
    let sh = _mm512_set1_ps(shift);
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_sub_ps(_mm512_loadu_ps(p.add(i)), sh);
        let under = _mm512_cmp_ps_mask(v, _mm512_set1_ps(LO), _CMP_LT_OQ);
        let v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(LO)), _mm512_set1_ps(HI));
        let k = _mm512_roundscale_ps(
            _mm512_mul_ps(v, _mm512_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(C1), v);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(C2), r);
        let mut y = _mm512_set1_ps(P[0]);
        for c in &P[1..] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(*c));
        }
        let y = _mm512_fmadd_ps(
            _mm512_mul_ps(y, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let e = _mm512_scalef_ps(y, k);
        let e = _mm512_maskz_mov_ps(!under, e);
        _mm512_storeu_ps(p.add(i), e);
        acc = _mm512_add_ps(acc, e);
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(acc);
    while i < n {
        x[i] = cpu::exp_approx(x[i] - shift);
        sum += x[i];
        i += 1;
    }
    sum
}

#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shift_sum_avx2(x: &mut [f32], shift: f32) -> f32 {
    use cpu::expc::*;
    let n = x.len();
    let p = x.as_mut_ptr();
    let sh = _mm256_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_sub_ps(_mm256_loadu_ps(p.add(i)), sh);
        let keep = _mm256_cmp_ps(v, _mm256_set1_ps(LO), _CMP_GE_OQ);
        let v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
        let k = _mm256_round_ps(
            _mm256_mul_ps(v, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(C1), v);
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(C2), r);
        let mut y = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_fmadd_ps(
            _mm256_mul_ps(y, r),
            r,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)),
            23,
        );
        let e = _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow)), keep);
        _mm256_storeu_ps(p.add(i), e);
        acc = _mm256_add_ps(acc, e);
        i += 8;
    }
    let mut sum = hsum256(acc);
    while i < n {
        x[i] = cpu::exp_approx(x[i] - shift);
        sum += x[i];
        i += 1;
    }
    sum
}

/// Scores of `m` queries over f16 rows, converting each row once (GQA; the f16 baseline gets
/// the same treatment as KIVI). Returns `false` for unsupported shapes.
#[allow(clippy::too_many_arguments)]
pub fn k_f16_multi(
    isa: Isa,
    q: &[f32],
    m: usize,
    rows: &[f16],
    stride: usize,
    t0: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) -> bool {
    assert_supported(isa);
    if isa.base() != Isa::Avx512 || m == 0 {
        return false;
    }
    let d = q.len() / m;
    if !d.is_multiple_of(16) || d > MAX_HEAD_DIM {
        return false;
    }
    assert!(q.len() == m * d);
    assert!(n == 0 || rows.len() >= (t0 + n - 1) * stride + d);
    assert!(n == 0 || out.len() >= (m - 1) * out_stride + n);
    match m {
        // SAFETY (all arms): the CPU has AVX-512 (asserted); rows t0..t0+n, q[..m*d] and the m
        // output rows are in bounds (asserted above); d is a multiple of 16.
        2 => unsafe { k_f16_multi_avx512::<2>(q, rows, stride, t0, n, out, out_stride) },
        3 => unsafe { k_f16_multi_avx512::<3>(q, rows, stride, t0, n, out, out_stride) },
        4 => unsafe { k_f16_multi_avx512::<4>(q, rows, stride, t0, n, out, out_stride) },
        _ => return false,
    }
    true
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn k_f16_multi_avx512<const M: usize>(
    q: &[f32],
    rows: &[f16],
    stride: usize,
    t0: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let d = q.len() / M;
    let qp = q.as_ptr();
    let rp = rows.as_ptr() as *const u16;
    let op = out.as_mut_ptr();
    for i in 0..n {
        let r = rp.add((t0 + i) * stride);
        let mut a = [_mm512_setzero_ps(); M];
        let mut j = 0;
        while j < d {
            let kv = _mm512_cvtph_ps(_mm256_loadu_si256(r.add(j) as *const __m256i));
            for qi in 0..M {
                a[qi] = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(qi * d + j)), kv, a[qi]);
            }
            j += 16;
        }
        for qi in 0..M {
            *op.add(qi * out_stride + i) = _mm512_reduce_add_ps(a[qi]);
        }
    }
}

/// `acc[r] += Σ_i p[r * p_stride + i]·rows[t0 + i]` for `m` weight rows, converting each row
/// once. Returns `false` for unsupported shapes.
#[allow(clippy::too_many_arguments)]
pub fn v_f16_multi(
    isa: Isa,
    p: &[f32],
    p_stride: usize,
    m: usize,
    rows: &[f16],
    stride: usize,
    t0: usize,
    n: usize,
    acc: &mut [f32],
) -> bool {
    assert_supported(isa);
    if isa.base() != Isa::Avx512 || m == 0 {
        return false;
    }
    let d = acc.len() / m;
    assert!(acc.len() == m * d);
    assert!(n == 0 || rows.len() >= (t0 + n - 1) * stride + d);
    assert!(n == 0 || p.len() >= (m - 1) * p_stride + n);
    match (m, d) {
        // SAFETY (all arms): the CPU has AVX-512 (asserted); rows t0..t0+n, the m weight rows
        // and acc[..m*d] are in bounds (asserted above); d = 16 * NV.
        (2, 64) => unsafe { v_f16_multi_avx512::<2, 4>(p, p_stride, rows, stride, t0, n, acc) },
        (3, 64) => unsafe { v_f16_multi_avx512::<3, 4>(p, p_stride, rows, stride, t0, n, acc) },
        (4, 64) => unsafe { v_f16_multi_avx512::<4, 4>(p, p_stride, rows, stride, t0, n, acc) },
        (2, 128) => unsafe { v_f16_multi_avx512::<2, 8>(p, p_stride, rows, stride, t0, n, acc) },
        (3, 128) => unsafe { v_f16_multi_avx512::<3, 8>(p, p_stride, rows, stride, t0, n, acc) },
        _ => return false,
    }
    true
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn v_f16_multi_avx512<const M: usize, const NV: usize>(
    p: &[f32],
    p_stride: usize,
    rows: &[f16],
    stride: usize,
    t0: usize,
    n: usize,
    acc: &mut [f32],
) {
    let d = NV * 16;
    let rp = rows.as_ptr() as *const u16;
    let ap = acc.as_mut_ptr();
    let pp = p.as_ptr();
    let mut a = [[_mm512_setzero_ps(); NV]; M];
    for i in 0..n {
        let r = rp.add((t0 + i) * stride);
        let mut w = [_mm512_setzero_ps(); M];
        for qi in 0..M {
            w[qi] = _mm512_set1_ps(*pp.add(qi * p_stride + i));
        }
        for j in 0..NV {
            let x = _mm512_cvtph_ps(_mm256_loadu_si256(r.add(16 * j) as *const __m256i));
            for qi in 0..M {
                a[qi][j] = _mm512_fmadd_ps(w[qi], x, a[qi][j]);
            }
        }
    }
    for qi in 0..M {
        for j in 0..NV {
            let dst = ap.add(qi * d + 16 * j);
            _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), a[qi][j]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2- and 4-bit codes through integer dot products (AVX-512 VNNI + VBMI + BW + GFNI)
//
// `vpdpbusd` adds, per dword lane, the products of 4 unsigned bytes with 4 signed bytes. The
// float side (the folded key query `q·scale`, or the value weights `p·scale`) is quantized to 16
// bits and split into a high and a low byte (two `vpdpbusd`, recombined as `256·hi + lo`); the
// codes are arranged so that the 4 bytes of a lane hold the same token (keys) or channel
// (values) of 4 channels (tokens), and `vgf2p8affineqb` moves code k of each byte (bits 2k,
// 2k+1; nibble k for 4 bits) to the low bits and clears the rest, in one µop. Per 64 2-bit
// codes: about 1/4 byte permute, 1 affine and 2 dot products, against ~10 µops of the float
// lookup kernels. The integer twins in `cpu.rs` (`k_chan_q16`, `v_tok_q16`) define the results.

/// `vgf2p8affineqb` matrices: result bit 0 = bit 2k, bit 1 = bit 2k+1 (row of result bit i in
/// byte 7 - i of the matrix).
const GF_CODE2: [u64; 4] = {
    let mut m = [0u64; 4];
    let mut k = 0;
    while k < 4 {
        m[k] = (1u64 << (2 * k)) << 56 | (1u64 << (2 * k + 1)) << 48;
        k += 1;
    }
    m
};

/// `vgf2p8affineqb` matrices for 4-bit codes: result bits 0-3 = bits 4k .. 4k+3 (nibble k).
const GF_CODE4: [u64; 2] = {
    let mut m = [0u64; 2];
    let mut k = 0;
    while k < 2 {
        let mut b = 0;
        while b < 4 {
            m[k] |= (1u64 << (4 * k + b)) << (8 * (7 - b));
            b += 1;
        }
        k += 1;
    }
    m
};

/// The code extraction matrices of `BITS`-bit codes (2 or 4): entry k takes code k of each byte
/// (entries `8 / BITS` and up are unused).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,gfni")]
unsafe fn gf_matrices<const BITS: usize>() -> [__m512i; 4] {
    std::array::from_fn(|k| match BITS {
        2 => _mm512_set1_epi64(GF_CODE2[k] as i64),
        _ => _mm512_set1_epi64(GF_CODE4[k % 2] as i64),
    })
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_index<T, const N: usize>(t: &[T; N]) -> __m512i {
    const { assert!(N * std::mem::size_of::<T>() == 64) };
    _mm512_loadu_si512(t.as_ptr() as *const _)
}

// Permute indices of the VNNI kernels (compile-time tables; see the kernels for the layouts).

/// Key table builder: output byte `16k + j` of 16 channels' i32 codes of slots 0 (`a`) and 1
/// (`b`): `j` in `[hi(a), hi(b), lo(a), lo(b)]` × 4 channels of quad k (hi = byte 1, lo = byte 0).
const K_TAB_IDX: [u8; 64] = {
    let mut t = [0u8; 64];
    let mut o = 0;
    while o < 64 {
        let (k, j) = (o / 16, o % 16);
        let (part, slot, ch) = (j / 8, (j / 4) % 2, 4 * k + j % 4);
        t[o] = (64 * slot + 4 * ch + (part == 0) as usize) as u8;
        o += 1;
    }
    t
};

/// Key chunk arrangement: lane `L = 2i + s`, byte `ch` <- row `ch` (16 bytes each), column
/// `8s + i`.
const K_ARR_IDX: [u8; 64] = {
    let mut t = [0u8; 64];
    let mut o = 0;
    while o < 64 {
        let (l, ch) = (o / 4, o % 4);
        t[o] = (16 * ch + 8 * (l % 2) + l / 2) as u8;
        o += 1;
    }
    t
};

/// Key epilogue, stage 1 (`s` = 0, 1): `u[2i + kk] = f_kk[2i + s]`. The same permutation is the
/// whole 4-bit key epilogue (`s` = h): token `16h + e` is lane `2(e/2) + h` of code `e % 2`'s
/// result (byte column `8h + e/2`, nibble `e % 2`).
const K_OUT1_IDX: [[i32; 16]; 2] = {
    let mut t = [[0i32; 16]; 2];
    let mut s = 0;
    while s < 2 {
        let mut e = 0;
        while e < 16 {
            t[s][e] = (16 * (e % 2) + 2 * (e / 2) + s) as i32;
            e += 1;
        }
        s += 1;
    }
    t
};

/// Key epilogue, stage 2 (`h` = 0, 1): token `4i' + k` of `i = 4h + i'` from `u` (k < 2) or `w`.
const K_OUT2_IDX: [[i32; 16]; 2] = {
    let mut t = [[0i32; 16]; 2];
    let mut h = 0;
    while h < 2 {
        let mut e = 0;
        while e < 16 {
            let (i, k) = (4 * h + e / 4, e % 4);
            t[h][e] = (16 * (k / 2) + 2 * i + k % 2) as i32;
            e += 1;
        }
        h += 1;
    }
    t
};

/// Value weight tables, per code width (2, 4 bits), `NV - 1` (head_dim 64 / 128), log2 of groups
/// per token (1, 2, 4) and 64-byte half: output byte `u·32 + part·16 + 4s + tt` <- byte (part ==
/// hi) of the i32 code of token `tt`, group `(c·u + c/4·s) / g`, where a 16-byte column range u
/// of a token row holds `c` channels (64 of 2 bits, 32 of 4; `NV` or `2·NV` ranges).
const V_TAB_IDX: [[[[[u8; 64]; 2]; 3]; 2]; 2] = {
    let mut t = [[[[[0u8; 64]; 2]; 3]; 2]; 2];
    let mut w = 0;
    while w < 2 {
        let c = 64 >> w;
        let mut nv = 1;
        while nv <= 2 {
            let mut lg = 0;
            while lg < 3 {
                let gpt = 1 << lg;
                let g = 64 * nv / gpt;
                let mut o = 0;
                while o < 128 {
                    let (u, part, s, tt) = (o / 32, (o / 16) % 2, (o / 4) % 4, o % 4);
                    if u < nv << w {
                        t[w][nv - 1][lg][o / 64][o % 64] =
                            (4 * (tt * gpt + (c * u + c / 4 * s) / g) + (part == 0) as usize) as u8;
                    }
                    o += 1;
                }
                lg += 1;
            }
            nv += 1;
        }
        w += 1;
    }
    t
};

/// Value row arrangement, per `NV - 1` and vector v: lane `L = 4i + s`, byte `tt` <- row `tt`,
/// column `16v + 4s + i` (rows of `16·NV` bytes: one vector for NV = 1, two for NV = 2).
const V_ARR_IDX: [[[u8; 64]; 2]; 2] = {
    let mut t = [[[0u8; 64]; 2]; 2];
    let mut nv = 1;
    while nv <= 2 {
        let mut v = 0;
        while v < nv {
            let mut o = 0;
            while o < 64 {
                let (l, tt) = (o / 4, o % 4);
                let col = 16 * v + 4 * (l % 4) + l / 4;
                t[nv - 1][v][o] = (16 * nv * tt + col) as u8;
                o += 1;
            }
            v += 1;
        }
        nv += 1;
    }
    t
};

/// 4-bit value epilogue (`h` = 0, 1): channel `16h + e` of a column range is lane `4i + s` of
/// code k's result, `s = 2h + e / 8`, `i = (e % 8) / 2`, `k = e % 2`.
const V4_OUT_IDX: [[i32; 16]; 2] = {
    let mut t = [[0i32; 16]; 2];
    let mut h = 0;
    while h < 2 {
        let mut e = 0;
        while e < 16 {
            t[h][e] = (16 * (e % 2) + 4 * ((e % 8) / 2) + 2 * h + e / 8) as i32;
            e += 1;
        }
        h += 1;
    }
    t
};

/// Value epilogue, stage 1 (`sb` = 0, 1): element `8 s2 + 2i + kk` <- `f_kk[4i + 2 sb + s2]`.
const V_OUT1_IDX: [[i32; 16]; 2] = {
    let mut t = [[0i32; 16]; 2];
    let mut sb = 0;
    while sb < 2 {
        let mut e = 0;
        while e < 16 {
            let (s2, i, kk) = (e / 8, (e / 2) % 4, e % 2);
            t[sb][e] = (16 * kk + 4 * i + 2 * sb + s2) as i32;
            e += 1;
        }
        sb += 1;
    }
    t
};

/// Value epilogue, stage 2 (`s2` = 0, 1): channel `4i + k` from the two stage-1 vectors.
const V_OUT2_IDX: [[i32; 16]; 2] = {
    let mut t = [[0i32; 16]; 2];
    let mut s2 = 0;
    while s2 < 2 {
        let mut e = 0;
        while e < 16 {
            let (i, k) = (e / 4, e % 4);
            t[s2][e] = (16 * (k / 2) + 8 * s2 + 2 * i + k % 2) as i32;
            e += 1;
        }
        s2 += 1;
    }
    t
};

/// Group `g`'s folded key query of each of `M` queries (`q = [M][hd]`, hd a multiple of 16, at
/// most [`MAX_HEAD_DIM`]) quantized to i16 (as i32, written to `iq[r][..hd]`), see
/// [`cpu::quantize_query_q16`]; returns `(alpha, bias)` per query. Scales and mins are converted
/// once for all queries.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn quantize_queries_q16_avx512<const M: usize>(
    q: &[f32],
    seg: &ChanSeg<'_>,
    g: usize,
    iq: [*mut i32; M],
) -> [(f32, f32); M] {
    let hd = q.len() / M;
    let (sp, mp) = (
        seg.scales.as_ptr().add(g * hd) as *const u16,
        seg.mins.as_ptr().add(g * hd) as *const u16,
    );
    let qp = q.as_ptr();
    // Scratch, written before it is read (no zeroing: this runs once per group).
    let mut qs = [[MaybeUninit::<__m512>::uninit(); MAX_HEAD_DIM / 16]; M];
    let (mut b, mut amax) = ([_mm512_setzero_ps(); M], [_mm512_setzero_ps(); M]);
    for v in 0..hd / 16 {
        let sc = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(16 * v) as *const __m256i));
        let mn = _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(16 * v) as *const __m256i));
        for r in 0..M {
            let qv = _mm512_loadu_ps(qp.add(r * hd + 16 * v));
            let x = _mm512_mul_ps(qv, sc);
            qs[r][v].write(x);
            b[r] = _mm512_fmadd_ps(qv, mn, b[r]);
            amax[r] = _mm512_max_ps(amax[r], _mm512_abs_ps(x));
        }
    }
    std::array::from_fn(|r| {
        let amax = _mm512_reduce_max_ps(amax[r]);
        let inv = _mm512_set1_ps(if amax > 0.0 {
            cpu::Q16_KEY_MAX / amax
        } else {
            0.0
        });
        for v in 0..hd / 16 {
            let x = _mm512_cvtps_epi32(_mm512_mul_ps(qs[r][v].assume_init(), inv));
            _mm512_storeu_si512(iq[r].add(16 * v) as *mut _, x);
        }
        (amax / cpu::Q16_KEY_MAX, _mm512_reduce_add_ps(b[r]))
    })
}

/// `BITS`-bit keys (2 or 4) of `M` queries (`q = [M][hd]`) over tokens `t0..t0+n`, by chunks
/// of 16 bytes of each channel row (64 tokens of 2 bits, 32 of 4 bits; two halves, each inside
/// one group): per 4 channels, the 4 rows' chunks are loaded into one vector and byte-permuted
/// so that dword lane `2i + s` holds byte column `8s + i` of the 4 channels (tokens `32s + 4i ..
/// +4` of 2 bits, `16s + 2i .. +2` of 4 bits); code k of each byte then feeds `vpdpbusd` against
/// the 4 channels' query bytes of half s (broadcast as one qword per half pair from a per-chunk
/// table). Result = [`cpu::k_chan_q16`].
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
unsafe fn k_chan_vnni<const M: usize, const BITS: usize>(
    q: &[f32],
    seg: &ChanSeg<'_>,
    t0: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    const { assert!(BITS == 2 || BITS == 4) };
    // Tokens per 16-byte chunk of a row, codes per byte.
    let (chunk, per_byte) = (128 / BITS, 8 / BITS);
    let hd = q.len() / M;
    let (g, wpr) = (seg.group, seg.words_per_row);
    // Scratch below is written before it is read (no zeroing: the call may cover one block).
    // Quantized queries, one group per slot (see `held`).
    let mut iq = [[[MaybeUninit::<i32>::uninit(); MAX_HEAD_DIM]; 2]; M];
    // (alpha, bias) of each slot's query, and of the current table's two halves.
    let (mut qpar, mut tpar) = ([[(0f32, 0f32); 2]; M], [[(0f32, 0f32); 2]; M]);
    // Groups of the current chunk's halves, and the group whose query each slot of iq holds.
    let (mut cur, mut held) = ([usize::MAX; 2], [usize::MAX; 2]);
    // Per query and 4 channels: 16 bytes [hi(slot 0), hi(slot 1), lo(slot 0), lo(slot 1)].
    let mut tab = [[MaybeUninit::<u8>::uninit(); 4 * MAX_HEAD_DIM]; M];
    let mut tmp = [MaybeUninit::<f32>::uninit(); 64 * 4];
    let tidx = load_index(&K_TAB_IDX);
    let aidx = load_index(&K_ARR_IDX);
    // 2 bits: lane (2i + s, code k) = token 32s + 4i + k, two vpermt2ps stages to natural order.
    let u_idx = [load_index(&K_OUT1_IDX[0]), load_index(&K_OUT1_IDX[1])];
    let o_idx = [load_index(&K_OUT2_IDX[0]), load_index(&K_OUT2_IDX[1])];
    // 4 bits: lane (2i + s, code k) = token 16s + 2i + k, one vpermt2ps per 16 tokens (u_idx).
    let mats = gf_matrices::<BITS>();
    let cp = seg.codes.as_ptr();
    let end = t0 + n;
    let mut t = t0;
    while t < end {
        let c = t / chunk;
        let c0 = chunk * c;
        let hi = end.min(c0 + chunk);
        let gs = [c0 / g, (c0 + chunk / 2) / g];
        if cur != gs {
            // Slot 1 gets its own group only when the halves' groups differ (never for 4 bits);
            // otherwise both halves read slot 0.
            let s1 = (gs[1] != gs[0]) as usize;
            for h in 0..=s1 {
                if held[h] != gs[h] {
                    let dst = std::array::from_fn(|r| iq[r][h].as_mut_ptr() as *mut i32);
                    let par = quantize_queries_q16_avx512::<M>(q, seg, gs[h], dst);
                    for r in 0..M {
                        qpar[r][h] = par[r];
                    }
                    held[h] = gs[h];
                }
            }
            cur = gs;
            for r in 0..M {
                tpar[r] = [qpar[r][0], qpar[r][s1]];
                for v in 0..hd / 16 {
                    let a = _mm512_loadu_si512(iq[r][0].as_ptr().add(16 * v) as *const _);
                    let b = _mm512_loadu_si512(iq[r][s1].as_ptr().add(16 * v) as *const _);
                    let x = _mm512_permutex2var_epi8(a, tidx, b);
                    _mm512_storeu_si512(tab[r].as_mut_ptr().add(64 * v) as *mut _, x);
                }
            }
        }
        let mut ah = [[_mm512_setzero_si512(); 4]; M];
        let mut al = [[_mm512_setzero_si512(); 4]; M];
        let base = cp.add(4 * c);
        for cq in 0..hd / 4 {
            let r0 = base.add(4 * cq * wpr);
            let ld = |i: usize| _mm_loadu_si128(r0.add(i * wpr) as *const __m128i);
            let x = _mm512_castsi128_si512(ld(0));
            let x = _mm512_inserti32x4::<1>(x, ld(1));
            let x = _mm512_inserti32x4::<2>(x, ld(2));
            let x = _mm512_inserti32x4::<3>(x, ld(3));
            let y = _mm512_permutexvar_epi8(aidx, x);
            for k in 0..per_byte {
                let ck = _mm512_gf2p8affine_epi64_epi8::<0>(y, mats[k]);
                for r in 0..M {
                    let tp = tab[r].as_ptr().add(16 * cq) as *const i64;
                    let qh = _mm512_set1_epi64(tp.read_unaligned());
                    let ql = _mm512_set1_epi64(tp.add(1).read_unaligned());
                    ah[r][k] = _mm512_dpbusd_epi32(ah[r][k], ck, qh);
                    al[r][k] = _mm512_dpbusd_epi32(al[r][k], ql, ck);
                }
            }
        }
        for r in 0..M {
            let pair = |a: f32, b: f32| {
                let bits = (a.to_bits() as u64) | (b.to_bits() as u64) << 32;
                _mm512_castsi512_ps(_mm512_set1_epi64(bits as i64))
            };
            let alpha = pair(tpar[r][0].0, tpar[r][1].0);
            let bias = pair(tpar[r][0].1, tpar[r][1].1);
            let f: [__m512; 4] = std::array::from_fn(|k| {
                if k >= per_byte {
                    return _mm512_setzero_ps();
                }
                let tot = _mm512_add_epi32(_mm512_slli_epi32::<8>(ah[r][k]), al[r][k]);
                _mm512_fmadd_ps(alpha, _mm512_cvtepi32_ps(tot), bias)
            });
            if BITS == 2 {
                for s in 0..2 {
                    let u = _mm512_permutex2var_ps(f[0], u_idx[s], f[1]);
                    let w = _mm512_permutex2var_ps(f[2], u_idx[s], f[3]);
                    for h in 0..2 {
                        let o = _mm512_permutex2var_ps(u, o_idx[h], w);
                        _mm512_storeu_ps(
                            tmp.as_mut_ptr().add(64 * r + 32 * s + 16 * h) as *mut f32,
                            o,
                        );
                    }
                }
            } else {
                for h in 0..2 {
                    let o = _mm512_permutex2var_ps(f[0], u_idx[h], f[1]);
                    _mm512_storeu_ps(tmp.as_mut_ptr().add(64 * r + 16 * h) as *mut f32, o);
                }
            }
            // tmp[64 r .. 64 r + 64] was just written.
            let src = std::slice::from_raw_parts(
                tmp.as_ptr().add(64 * r + (t - c0)) as *const f32,
                hi - t,
            );
            out[r * out_stride + (t - t0)..][..hi - t].copy_from_slice(src);
        }
        t = hi;
    }
}

/// `BITS`-bit values (2 or 4), `M` weight rows (`p[r * p_stride ..]`), head_dim `64·NV`: per
/// sub-chunk of [`cpu::Q16_VAL_SUB`] tokens the weights `p·scale` are quantized to u16 and laid
/// out per 4 tokens as `[vector][hi | lo][quarter][token]` bytes; per 4 tokens and 16-byte
/// column range u of their rows (`NV` ranges of 2 bits, `2·NV` of 4 bits), the rows are
/// byte-permuted so that dword lane `4i + s` holds byte column `16u + 4s + i` of the 4 tokens
/// (channels `64u + 16s + 4i .. +4` of 2 bits, `32u + 8s + 2i .. +2` of 4 bits), and code k of
/// each byte feeds `vpdpbusd` against the 4 tokens' weight bytes of quarter s
/// (`vbroadcasti32x4`). Result = [`cpu::v_tok_q16`].
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
unsafe fn v_tok_vnni<const M: usize, const NV: usize, const BITS: usize>(
    p: &[f32],
    p_stride: usize,
    seg: &TokSeg<'_>,
    t0: usize,
    n: usize,
    acc: &mut [f32],
) {
    const SUB: usize = cpu::Q16_VAL_SUB;
    const { assert!((BITS == 2 || BITS == 4) && (NV == 1 || NV == 2)) };
    let hd = 64 * NV;
    // 16-byte column ranges of a token row, codes per byte: `nvec · per_byte = 4·NV` results.
    let (nvec, per_byte) = (NV * BITS / 2, 8 / BITS);
    let g = seg.group;
    let (wpt, gpt) = (hd * BITS / 32, hd / g);
    let (cp, sp, mp) = (
        seg.codes.as_ptr(),
        seg.scales.as_ptr() as *const u16,
        seg.mins.as_ptr() as *const u16,
    );
    // Float sums per (column range u, code k), at u·per_byte + k.
    let mut fa = [[_mm512_setzero_ps(); 8]; M];
    let mut min_acc = [[0f32; 16]; M];
    let mut macc = [_mm512_setzero_ps(); M];
    // Scratch, written before it is read (no zeroing: the call may cover one block).
    // p·scale of the sub-chunk, [token][group], padded to whole 4-token quads.
    let mut ps = [[MaybeUninit::<f32>::uninit(); SUB * 4 + 16]; M];
    // Per 4 tokens: 32 bytes of weight codes per column range.
    let mut wt = [[[MaybeUninit::<u8>::uninit(); 128]; SUB / 4]; M];
    let mut pidx = [0i32; 16];
    for (l, x) in pidx.iter_mut().enumerate() {
        *x = (l / gpt) as i32;
    }
    let pidx = _mm512_loadu_si512(pidx.as_ptr() as *const _);
    let pmask: __mmask16 = ((1u32 << (16 / gpt)) - 1) as u16;
    let qmask: __mmask16 = ((1u32 << (4 * gpt)) - 1) as u16;
    let lg = gpt.trailing_zeros() as usize;
    let widx: [__m512i; 2] =
        std::array::from_fn(|h| load_index(&V_TAB_IDX[BITS / 4][NV - 1][lg][h]));
    let aidx: [__m512i; 2] = std::array::from_fn(|v| load_index(&V_ARR_IDX[NV - 1][v % NV]));
    // 4 bits: one column range's four 16-byte row pieces in one vector, as 2-bit NV = 1 rows.
    let aidx4 = load_index(&V_ARR_IDX[0][0]);
    let mats = gf_matrices::<BITS>();
    let mut i0 = 0;
    while i0 < n {
        let cnt = SUB.min(n - i0);
        let mm = cnt * gpt;
        let nx = (n - i0 - cnt).min(SUB);
        prefetch_value_rows(cp, sp, mp, wpt, gpt, t0 + i0 + cnt, nx);
        let quads = cnt.div_ceil(4);
        // w = p·scale per token and group (scales and mins converted once for all M rows).
        let pr: [*const f32; M] = std::array::from_fn(|r| p.as_ptr().add(r * p_stride + i0));
        let psr: [*mut f32; M] = std::array::from_fn(|r| ps[r].as_mut_ptr() as *mut f32);
        let mut mx = [_mm512_setzero_ps(); M];
        let mut mxs = [0f32; M];
        let mut j = 0;
        while j + 16 <= mm {
            let off = (t0 + i0) * gpt + j;
            let sc = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(off) as *const __m256i));
            let mn = _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(off) as *const __m256i));
            for r in 0..M {
                let pv = _mm512_maskz_loadu_ps(pmask, pr[r].add(j / gpt));
                let pv = _mm512_permutexvar_ps(pidx, pv);
                let x = _mm512_mul_ps(pv, sc);
                _mm512_storeu_ps(psr[r].add(j), x);
                mx[r] = _mm512_max_ps(mx[r], x);
                macc[r] = _mm512_fmadd_ps(pv, mn, macc[r]);
            }
            j += 16;
        }
        let mut alpha = [0f32; M];
        for r in 0..M {
            let mut j = j;
            while j < mm {
                let w = *pr[r].add(j / gpt);
                let off = (t0 + i0) * gpt + j;
                let x = w * h2f(f16::from_bits(*sp.add(off)));
                *psr[r].add(j) = x;
                mxs[r] = mxs[r].max(x);
                min_acc[r][j % gpt] += w * h2f(f16::from_bits(*mp.add(off)));
                j += 1;
            }
            while j < 4 * quads * gpt {
                *psr[r].add(j) = 0.0;
                j += 1;
            }
            // Quantize: u16 codes, laid out per 4 tokens (`widx`).
            let amax = _mm512_reduce_max_ps(mx[r]).max(mxs[r]);
            let inv = _mm512_set1_ps(if amax > 0.0 {
                cpu::Q16_VAL_MAX / amax
            } else {
                0.0
            });
            alpha[r] = amax / cpu::Q16_VAL_MAX;
            for t4 in 0..quads {
                let x = _mm512_maskz_loadu_ps(qmask, psr[r].add(4 * t4 * gpt));
                let z = _mm512_cvtps_epi32(_mm512_mul_ps(x, inv));
                let dst = wt[r][t4].as_mut_ptr() as *mut __m512i;
                _mm512_storeu_si512(dst, _mm512_permutexvar_epi8(widx[0], z));
                if nvec > 2 {
                    _mm512_storeu_si512(dst.add(1), _mm512_permutexvar_epi8(widx[1], z));
                }
            }
        }
        let mut ih = [[_mm512_setzero_si512(); 8]; M];
        let mut il = [[_mm512_setzero_si512(); 8]; M];
        let mut tail = [0u32; 4 * 16];
        for t4 in 0..quads {
            let mut rows = cp.add((t0 + i0 + 4 * t4) * wpt);
            let valid = cnt - 4 * t4;
            if valid < 4 {
                // Last, partial quad: zero rows past the stretch (their weights are 0 too).
                std::ptr::copy_nonoverlapping(rows, tail.as_mut_ptr(), valid * wpt);
                rows = tail.as_ptr();
            }
            let y: [__m512i; 4] = if BITS == 4 {
                std::array::from_fn(|u| {
                    if u >= nvec {
                        return _mm512_setzero_si512();
                    }
                    let ld = |tt: usize| _mm_loadu_si128(rows.add(tt * wpt + 4 * u) as *const _);
                    let x = _mm512_castsi128_si512(ld(0));
                    let x = _mm512_inserti32x4::<1>(x, ld(1));
                    let x = _mm512_inserti32x4::<2>(x, ld(2));
                    let x = _mm512_inserti32x4::<3>(x, ld(3));
                    _mm512_permutexvar_epi8(aidx4, x)
                })
            } else if NV == 1 {
                let x = _mm512_loadu_si512(rows as *const _);
                [_mm512_permutexvar_epi8(aidx[0], x); 4]
            } else {
                let x0 = _mm512_loadu_si512(rows as *const _);
                let x1 = _mm512_loadu_si512(rows.add(16) as *const _);
                std::array::from_fn(|v| {
                    if v < NV {
                        _mm512_permutex2var_epi8(x0, aidx[v], x1)
                    } else {
                        _mm512_setzero_si512()
                    }
                })
            };
            for u in 0..nvec {
                for k in 0..per_byte {
                    let ck = _mm512_gf2p8affine_epi64_epi8::<0>(y[u], mats[k]);
                    for r in 0..M {
                        let wp = wt[r][t4].as_ptr().add(32 * u) as *const __m128i;
                        let wh = _mm512_broadcast_i32x4(_mm_loadu_si128(wp));
                        let wl = _mm512_broadcast_i32x4(_mm_loadu_si128(wp.add(1)));
                        let j = u * per_byte + k;
                        ih[r][j] = _mm512_dpbusd_epi32(ih[r][j], wh, ck);
                        il[r][j] = _mm512_dpbusd_epi32(il[r][j], wl, ck);
                    }
                }
            }
        }
        for r in 0..M {
            let a = _mm512_set1_ps(alpha[r]);
            for j in 0..nvec * per_byte {
                let tot = _mm512_add_epi32(_mm512_slli_epi32::<8>(ih[r][j]), il[r][j]);
                fa[r][j] = _mm512_fmadd_ps(a, _mm512_cvtepi32_ps(tot), fa[r][j]);
            }
        }
        i0 += cnt;
    }
    // 2 bits: lane (4i + s, code k) of range v = channel 64v + 16s + 4i + k, two vpermt2ps
    // stages; 4 bits: lane (4i + s, code k) of range u = channel 32u + 8s + 2i + k, one.
    let s1 = [load_index(&V_OUT1_IDX[0]), load_index(&V_OUT1_IDX[1])];
    let s2 = [load_index(&V_OUT2_IDX[0]), load_index(&V_OUT2_IDX[1])];
    let o4 = [load_index(&V4_OUT_IDX[0]), load_index(&V4_OUT_IDX[1])];
    let ap = acc.as_mut_ptr();
    for r in 0..M {
        let mut mv = [0f32; 16];
        _mm512_storeu_ps(mv.as_mut_ptr(), macc[r]);
        for (l, x) in mv.iter().enumerate() {
            min_acc[r][l % gpt] += x;
        }
        let add_out = |ch: usize, o: __m512| {
            let m = _mm512_set1_ps(min_acc[r][ch / g]);
            let dst = ap.add(r * hd + ch);
            _mm512_storeu_ps(
                dst,
                _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_add_ps(o, m)),
            );
        };
        if BITS == 2 {
            for v in 0..NV {
                let f = &fa[r][4 * v..4 * v + 4];
                for sb in 0..2 {
                    let x01 = _mm512_permutex2var_ps(f[0], s1[sb], f[1]);
                    let x23 = _mm512_permutex2var_ps(f[2], s1[sb], f[3]);
                    for h in 0..2 {
                        let o = _mm512_permutex2var_ps(x01, s2[h], x23);
                        add_out(64 * v + 16 * (2 * sb + h), o);
                    }
                }
            }
        } else {
            for u in 0..nvec {
                for h in 0..2 {
                    let o = _mm512_permutex2var_ps(fa[r][2 * u], o4[h], fa[r][2 * u + 1]);
                    add_out(32 * u + 16 * h, o);
                }
            }
        }
    }
}
