//! Attention over a cache that is stored in pieces: f16 rows, exact f32 rows (the new tokens),
//! per-channel quantized stretches (`[D][T/fpi]` codes, `[D][T/G]` scales/mins) and per-token
//! quantized stretches (`[T][D/fpi]` codes, `[T][D/G]` scales/mins), read in place.
//!
//! A cache describes each sequence as a [`SeqView`]: for every KV head, the keys and the values as
//! ordered lists of [`Seg`]s covering positions `0..n_old + n_new` (keys and values may switch
//! form at different positions, e.g. KIVI's key chunk boundary vs value window), plus chunk
//! boundaries that split the positions for flash-decoding. Work items are
//! (sequence × KV head × chunk); each computes, for all `n_new · n_rep` queries that read this KV
//! head, a partial softmax `(max, sum, Σ p·v)`; partials are merged in chunk order, so results do
//! not depend on thread scheduling.

pub mod cpu;
pub mod reference;
#[cfg(target_arch = "x86_64")]
pub mod simd;

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

/// Per-channel quantized stretch of one KV head: token `t` (relative to the stretch) of channel
/// `d` is code `t` of row `codes[d * words_per_row ..]`, in group `t / group` whose parameters
/// are at `(t / group) * D + d` (group-major, so one group's D scales are contiguous). Rows are
/// sized for whole groups.
#[derive(Clone, Copy, Debug)]
pub struct ChanSeg<'a> {
    /// `[D][words_per_row]`
    pub codes: &'a [u32],
    /// `[groups_per_row][D]`
    pub scales: &'a [f16],
    /// `[groups_per_row][D]`
    pub mins: &'a [f16],
    pub words_per_row: usize,
    pub groups_per_row: usize,
    pub bits: u8,
    pub group: usize,
}

/// Per-token quantized stretch of one KV head: `codes [T][D/fpi]`, `scales`/`mins` `[T][D/G]`.
#[derive(Clone, Copy, Debug)]
pub struct TokSeg<'a> {
    pub codes: &'a [u32],
    pub scales: &'a [f16],
    pub mins: &'a [f16],
    pub bits: u8,
    pub group: usize,
}

/// Storage form of one stretch of tokens.
#[derive(Clone, Copy, Debug)]
pub enum SegData<'a> {
    /// Row `t` at `rows[t * stride ..][..head_dim]`.
    F16 {
        rows: &'a [f16],
        stride: usize,
    },
    /// Exact rows (new tokens), row `t` at `rows[t * stride ..][..head_dim]`.
    F32 {
        rows: &'a [f32],
        stride: usize,
    },
    Chan(ChanSeg<'a>),
    Tok(TokSeg<'a>),
}

/// `len` tokens at positions `start..start + len`.
#[derive(Clone, Copy, Debug)]
pub struct Seg<'a> {
    pub start: usize,
    pub len: usize,
    pub data: SegData<'a>,
}

/// One sequence as the attention sees it.
pub struct SeqView<'a> {
    pub n_old: usize,
    pub n_new: usize,
    /// `[n_kv_head]` ordered key segments covering `0..n_old + n_new`.
    pub k: Vec<Vec<Seg<'a>>>,
    /// `[n_kv_head]` ordered value segments covering `0..n_old + n_new`.
    pub v: Vec<Vec<Seg<'a>>>,
    /// Chunk boundaries: `0 = b[0] < b[1] < … < b[last] = n_old + n_new`.
    pub bounds: Vec<usize>,
}

/// Instruction set used by the kernels, detected once at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512F (plus AVX2/FMA/F16C).
    Avx512,
    /// AVX-512 plus VNNI, VBMI, BW and GFNI: the [`Isa::Avx512`] kernels, except that 2-bit KIVI
    /// codes go through integer dot products (`vpdpbusd`) against a 16-bit quantized query or
    /// softmax weight (`simd.rs`, "2-bit codes through integer dot products").
    Avx512Vnni,
}

impl Isa {
    /// Best supported ISA; `KIVI_FORCE_SCALAR=1` forces the portable path, `KIVI_ISA=avx2` /
    /// `KIVI_ISA=avx512` cap it at AVX2 / AVX-512 without the integer 2- and 4-bit kernels (for
    /// measurements).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var("KIVI_FORCE_SCALAR").is_ok_and(|v| v == "1") {
                return Isa::Scalar;
            }
            let cap = std::env::var("KIVI_ISA").unwrap_or_default();
            let best = Isa::best_supported();
            match (cap.as_str(), best) {
                ("scalar", _) => Isa::Scalar,
                ("avx2", Isa::Avx512 | Isa::Avx512Vnni) => Isa::Avx2,
                ("avx512", Isa::Avx512Vnni) => Isa::Avx512,
                _ => best,
            }
        })
    }

    /// Best ISA this CPU supports, ignoring the environment.
    pub fn best_supported() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 && is_x86_feature_detected!("avx512f") {
                let vnni = is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vbmi")
                    && is_x86_feature_detected!("gfni");
                return if vnni { Isa::Avx512Vnni } else { Isa::Avx512 };
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every ISA usable on this CPU (for tests comparing kernels with their scalar twins).
    pub fn all_supported() -> Vec<Isa> {
        let best = Isa::best_supported().rank();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| i.rank() <= best)
            .collect()
    }

    /// Order of the ISAs: each one's CPU features include those of the lower ones.
    pub(crate) fn rank(self) -> u8 {
        match self {
            Isa::Scalar => 0,
            Isa::Avx2 => 1,
            Isa::Avx512 => 2,
            Isa::Avx512Vnni => 3,
        }
    }

    /// The ISA of the float kernels: [`Isa::Avx512Vnni`] uses the [`Isa::Avx512`] ones for
    /// everything but 2-bit codes.
    pub fn base(self) -> Isa {
        match self {
            Isa::Avx512Vnni => Isa::Avx512,
            isa => isa,
        }
    }
}

/// Scores `out[i] = q · k[t0 + i]` for `i < n`, `k` read from `seg` in its stored form.
pub fn k_scores(isa: Isa, q: &[f32], seg: &SegData<'_>, t0: usize, n: usize, out: &mut [f32]) {
    match (isa, seg) {
        (_, SegData::F32 { rows, stride }) => cpu::k_f32(q, rows, *stride, t0, n, out),
        (_, SegData::Tok(s)) => cpu::k_tok(q, s, t0, n, out),
        (Isa::Scalar, SegData::F16 { rows, stride }) => cpu::k_f16(q, rows, *stride, t0, n, out),
        (Isa::Scalar, SegData::Chan(s)) => cpu::k_chan(q, s, t0, n, out),
        #[cfg(target_arch = "x86_64")]
        (isa, SegData::F16 { rows, stride }) => simd::k_f16(isa, q, rows, *stride, t0, n, out),
        #[cfg(target_arch = "x86_64")]
        (isa, SegData::Chan(s)) => simd::k_chan(isa, q, s, t0, n, out),
        #[cfg(not(target_arch = "x86_64"))]
        (_, SegData::F16 { rows, stride }) => cpu::k_f16(q, rows, *stride, t0, n, out),
        #[cfg(not(target_arch = "x86_64"))]
        (_, SegData::Chan(s)) => cpu::k_chan(q, s, t0, n, out),
    }
}

/// `acc += Σ_i p[i] · v[t0 + i]`, `v` read from `seg` in its stored form.
pub fn v_accumulate(isa: Isa, p: &[f32], seg: &SegData<'_>, t0: usize, n: usize, acc: &mut [f32]) {
    match (isa, seg) {
        (_, SegData::F32 { rows, stride }) => cpu::v_f32(p, rows, *stride, t0, n, acc),
        (_, SegData::Chan(s)) => cpu::v_chan(p, s, t0, n, acc),
        (Isa::Scalar, SegData::F16 { rows, stride }) => cpu::v_f16(p, rows, *stride, t0, n, acc),
        (Isa::Scalar, SegData::Tok(s)) => cpu::v_tok(p, s, t0, n, acc),
        #[cfg(target_arch = "x86_64")]
        (isa, SegData::F16 { rows, stride }) => simd::v_f16(isa, p, rows, *stride, t0, n, acc),
        #[cfg(target_arch = "x86_64")]
        (isa, SegData::Tok(s)) => simd::v_tok(isa, p, s, t0, n, acc),
        #[cfg(not(target_arch = "x86_64"))]
        (_, SegData::F16 { rows, stride }) => cpu::v_f16(p, rows, *stride, t0, n, acc),
        #[cfg(not(target_arch = "x86_64"))]
        (_, SegData::Tok(s)) => cpu::v_tok(p, s, t0, n, acc),
    }
}

/// `x[i] = exp(x[i] - shift)` (for `x[i] <= shift`), returns the sum. Vectorised Cephes-style
/// `expf` (relative error ~2e-7); the scalar path uses the same polynomial.
pub fn exp_shift_sum(isa: Isa, x: &mut [f32], shift: f32) -> f32 {
    match isa {
        Isa::Scalar => cpu::exp_shift_sum(x, shift),
        #[cfg(target_arch = "x86_64")]
        _ => simd::exp_shift_sum(isa, x, shift),
        #[cfg(not(target_arch = "x86_64"))]
        _ => cpu::exp_shift_sum(x, shift),
    }
}

/// Largest score (NaN ignored, `-inf` for none), in 16 independent lanes so that it vectorises
/// (a single running maximum is a serial dependency chain, ~1 ns per score).
fn max_score(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let tail = chunks.remainder().iter();
    lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Geometry shared by all sequences of one call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// Computes attention for every sequence: `qs[s]` and `outs[s]` are `[n_new][n_head][head_dim]`.
pub fn attend_views(
    isa: Isa,
    heads: Heads,
    views: &[SeqView<'_>],
    qs: &[&[f32]],
    outs: &mut [&mut [f32]],
) {
    let Heads {
        n_head,
        n_kv_head,
        head_dim,
    } = heads;
    let n_rep = n_head / n_kv_head;
    // Work items: (sequence, kv head, chunk).
    let mut items = Vec::new();
    for (s, view) in views.iter().enumerate() {
        for h in 0..n_kv_head {
            for c in 0..view.bounds.len() - 1 {
                items.push((s, h, c));
            }
        }
    }
    let work = |&(s, h, c): &(usize, usize, usize)| -> Vec<f32> {
        partial(isa, heads, &views[s], qs[s], h, c, n_rep)
    };
    let partials: Vec<Vec<f32>> = if items.len() == 1 || rayon::current_num_threads() == 1 {
        items.iter().map(work).collect()
    } else {
        items.par_iter().with_max_len(1).map(work).collect()
    };
    // Merge the chunks of each (sequence, kv head) in order.
    let stride = head_dim + 2;
    let mut idx = 0;
    for (s, view) in views.iter().enumerate() {
        let n_chunks = view.bounds.len() - 1;
        let out = &mut *outs[s];
        for h in 0..n_kv_head {
            let parts = &partials[idx..idx + n_chunks];
            idx += n_chunks;
            for i in 0..view.n_new {
                for r in 0..n_rep {
                    let mi = i * n_rep + r;
                    let m = parts
                        .iter()
                        .map(|p| p[mi * stride])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let o = &mut out[(i * n_head + h * n_rep + r) * head_dim..][..head_dim];
                    o.fill(0.0);
                    let mut l = 0.0f32;
                    for p in parts {
                        let p = &p[mi * stride..][..stride];
                        if p[1] == 0.0 {
                            continue;
                        }
                        let f = (p[0] - m).exp();
                        l += p[1] * f;
                        for (a, b) in o.iter_mut().zip(&p[2..]) {
                            *a += f * b;
                        }
                    }
                    let inv = 1.0 / l;
                    for a in o.iter_mut() {
                        *a *= inv;
                    }
                }
            }
        }
    }
}

/// Partial softmax of all queries reading KV head `h` over chunk `c`:
/// `[n_new * n_rep][max, sum, acc[head_dim]]`. The `n_rep` query heads of one token share the
/// causal limit and go through the kernels together (GQA: codes decoded once for all of them).
fn partial(
    isa: Isa,
    heads: Heads,
    view: &SeqView<'_>,
    q: &[f32],
    h: usize,
    c: usize,
    n_rep: usize,
) -> Vec<f32> {
    let hd = heads.head_dim;
    let (a, b) = (view.bounds[c], view.bounds[c + 1]);
    let len = b - a;
    let m = view.n_new * n_rep;
    let stride = hd + 2;
    let mut res = vec![0f32; m * stride];
    let mut scores = vec![0f32; n_rep * len];
    let mut acc = vec![0f32; n_rep * hd];
    let inv_sqrt = 1.0 / (hd as f32).sqrt();
    let mut qs = vec![0f32; n_rep * hd];
    for i in 0..view.n_new {
        // Causal limit of query token i: positions < n_old + i + 1.
        let hi_i = (view.n_old + i + 1).min(b);
        if hi_i <= a {
            continue;
        }
        // Query heads h*n_rep .. (h+1)*n_rep of token i are contiguous in q.
        let qrows = &q[(i * heads.n_head + h * n_rep) * hd..][..n_rep * hd];
        for (d, s) in qs.iter_mut().zip(qrows) {
            *d = s * inv_sqrt;
        }
        for (j, seg) in view.k[h].iter().enumerate() {
            let lo = a.max(seg.start);
            let hi = hi_i.min(seg.start + seg.len);
            if lo < hi {
                // Next block of keys, or after the last one the first block of values.
                match view.k[h].get(j + 1) {
                    Some(nx) if nx.start < hi_i => prefetch(isa, &nx.data),
                    _ => {
                        if let Some(v0) = view.v[h].iter().find(|s| s.start + s.len > a) {
                            prefetch(isa, &v0.data);
                        }
                    }
                }
                let out = &mut scores[lo - a..];
                k_scores_multi(
                    isa,
                    &qs,
                    n_rep,
                    &seg.data,
                    lo - seg.start,
                    hi - lo,
                    out,
                    len,
                );
            }
        }
        let n_valid = hi_i - a;
        for r in 0..n_rep {
            let sc = &mut scores[r * len..][..n_valid];
            let mx = max_score(sc);
            let sum = exp_shift_sum(isa, sc, mx);
            let out = &mut res[(i * n_rep + r) * stride..][..2];
            out[0] = mx;
            out[1] = sum;
        }
        acc.fill(0.0);
        for (j, seg) in view.v[h].iter().enumerate() {
            let lo = a.max(seg.start);
            let hi = hi_i.min(seg.start + seg.len);
            if lo < hi {
                if let Some(nx) = view.v[h].get(j + 1).filter(|s| s.start < hi_i) {
                    prefetch(isa, &nx.data);
                }
                let p = &scores[lo - a..];
                v_accumulate_multi(
                    isa,
                    p,
                    len,
                    n_rep,
                    &seg.data,
                    lo - seg.start,
                    hi - lo,
                    &mut acc,
                );
            }
        }
        for r in 0..n_rep {
            res[(i * n_rep + r) * stride + 2..][..hd].copy_from_slice(&acc[r * hd..][..hd]);
        }
    }
    res
}

/// Hints the cache to load a quantized segment ahead of its kernel (no-op for f16/f32 rows and
/// on the scalar path).
/// `KIVI_NO_PREFETCH=1` turns it off (for measurements).
fn prefetch(isa: Isa, seg: &SegData<'_>) {
    static OFF: OnceLock<bool> = OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("KIVI_NO_PREFETCH").is_ok_and(|v| v == "1"));
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && !off {
        simd::prefetch_seg(seg);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (isa, seg, off);
}

/// Most queries (or weight rows) one call of the multi-query kernels takes: their accumulators
/// fill the vector registers.
const MULTI_MAX: usize = 4;

/// `m` rows split into the fewest chunks of at most `most`, as even as possible (6 by 4: 3 + 3),
/// as `(first row, rows)`.
pub(crate) fn balanced_chunks(m: usize, most: usize) -> impl Iterator<Item = (usize, usize)> {
    let per = m.div_ceil(m.div_ceil(most).max(1)).max(1);
    (0..m).step_by(per).map(move |r| (r, per.min(m - r)))
}

/// Scores of `m` queries (`q = [m][head_dim]`) at once: `out[r * out_stride + i] = q_r · k[t0+i]`.
/// Per-channel quantized keys decode each code once for all queries, f16 rows convert each
/// row once (AVX-512, both caches get the same GQA treatment); other forms loop over the queries.
#[allow(clippy::too_many_arguments)]
pub fn k_scores_multi(
    isa: Isa,
    q: &[f32],
    m: usize,
    seg: &SegData<'_>,
    t0: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let hd = q.len() / m;
    if m > MULTI_MAX {
        // More queries than the kernels' accumulators hold (e.g. Qwen2's 6 or 7 per KV head):
        // balanced chunks of at most MULTI_MAX, each still decoding its codes once.
        for (c0, mm) in balanced_chunks(m, MULTI_MAX) {
            let o = &mut out[c0 * out_stride..];
            k_scores_multi(
                isa,
                &q[c0 * hd..(c0 + mm) * hd],
                mm,
                seg,
                t0,
                n,
                o,
                out_stride,
            );
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    match (isa.base(), seg, m) {
        (Isa::Avx512, SegData::Chan(s), 2..=4)
            if simd::k_chan_multi(isa, q, m, s, t0, n, out, out_stride) =>
        {
            return
        }
        (Isa::Avx512, SegData::F16 { rows, stride }, 2..=4)
            if simd::k_f16_multi(isa, q, m, rows, *stride, t0, n, out, out_stride) =>
        {
            return
        }
        _ => {}
    }
    for r in 0..m {
        k_scores(
            isa,
            &q[r * hd..][..hd],
            seg,
            t0,
            n,
            &mut out[r * out_stride..],
        );
    }
}

/// `acc[r] += Σ_i p[r * p_stride + i] · v[t0 + i]` for `m` weight rows at once
/// (`acc = [m][head_dim]`). Per-token quantized values decode each code once for all rows, f16
/// rows convert once (AVX-512); other forms loop over the rows.
#[allow(clippy::too_many_arguments)]
pub fn v_accumulate_multi(
    isa: Isa,
    p: &[f32],
    p_stride: usize,
    m: usize,
    seg: &SegData<'_>,
    t0: usize,
    n: usize,
    acc: &mut [f32],
) {
    let hd = acc.len() / m;
    if m > MULTI_MAX {
        // As in `k_scores_multi`: balanced chunks of at most MULTI_MAX rows.
        for (c0, mm) in balanced_chunks(m, MULTI_MAX) {
            let a = &mut acc[c0 * hd..(c0 + mm) * hd];
            v_accumulate_multi(isa, &p[c0 * p_stride..], p_stride, mm, seg, t0, n, a);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    match (isa.base(), seg, m) {
        (Isa::Avx512, SegData::Tok(s), 2..=4)
            if simd::v_tok_multi(isa, p, p_stride, m, s, t0, n, acc) =>
        {
            return
        }
        (Isa::Avx512, SegData::F16 { rows, stride }, 2..=4)
            if simd::v_f16_multi(isa, p, p_stride, m, rows, *stride, t0, n, acc) =>
        {
            return
        }
        _ => {}
    }
    for r in 0..m {
        v_accumulate(
            isa,
            &p[r * p_stride..],
            seg,
            t0,
            n,
            &mut acc[r * hd..][..hd],
        );
    }
}

/// Chunk boundaries for flash-decoding: `first` (the end of the first chunk, e.g. after sink
/// tokens + one chunk), then every `chunk` positions, up to `total`.
pub fn chunk_bounds(total: usize, first: usize, chunk: usize) -> Vec<usize> {
    let mut b = vec![0];
    let mut x = first.max(1);
    while x < total {
        b.push(x);
        x += chunk;
    }
    b.push(total);
    b
}
