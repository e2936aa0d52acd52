//! The KIVI cache (kivi.md §2–§3, Algorithm 1), generalised to any number of tokens per append.
//!
//! Per layer and sequence, positions are laid out as
//! `[sink tokens (f16) | quantized stream (blocks) | full-precision window (f16)]`, separately for
//! keys and values (their boundaries differ):
//! - a per-channel tensor (KIVI's keys) collects tokens in an f16 residual; when it holds exactly
//!   R tokens they are quantized as R/G whole groups along tokens and the residual empties
//!   (attention sees 1..R f16 keys during a decode step, 0..R-1 between steps);
//! - a per-token tensor (KIVI's values) keeps a FIFO of the last R tokens; when a token arrives at
//!   a full window the oldest one is quantized (attention sees R+1 f16 values during decode:
//!   R stored + the new one).
//!
//! R = 0: every stream token is quantized. Per-token tensors quantize each token on arrival.
//! Per-channel tensors keep the f16 copy of the current partial group (< G tokens) as a *staging*
//! buffer and re-quantize that group with its current statistics on every append, so attention
//! always reads quantized values, and appending token by token gives the same codes as appending
//! the whole group at once. The staging buffer is real memory and is counted in
//! `full_precision_bytes`, but it is never attended.
//!
//! Every token is rounded to f16 when it enters the cache; quantization reads those f16 values
//! (as the reference, which quantizes its fp16 residual). Appending `n` tokens runs the policy
//! token by token, so the contents are identical for any split of the same tokens into appends.

use std::collections::BTreeMap;

use half::f16;

use super::block::{Block, BlockLayout, BlockPool};
use crate::attn::{self, ChanSeg, Heads, Isa, Seg, SegData, SeqView, TokSeg};
use crate::quant::{self, codes_per_word};
use crate::{
    AttendItem, Axis, CacheConfig, CacheShape, Error, KiviConfig, KvCache, MemoryUsage, Result,
    SeqId,
};

/// Tokens per flash-decoding chunk (rounded to whole blocks).
const CHUNK_TOKENS: usize = 512;

/// Quantized stream plus f16 window of one tensor (keys or values) of one sequence.
#[derive(Default)]
struct Stream {
    /// Stream tokens stored in blocks (per-channel with R = 0: including the partial group).
    nq: usize,
    /// f16 window, token-major `[slot][Hkv][D]`: residual (per-channel), ring of R slots
    /// (per-token), or staging of the partial group (per-channel, R = 0).
    win: Vec<f16>,
    /// Ring start (per-token only).
    head: usize,
    /// Tokens in the window.
    len: usize,
}

struct SeqState {
    /// Tokens stored (sinks + stream).
    n: usize,
    /// `[min(n, S)][Hkv][D]`
    sink_k: Vec<f16>,
    sink_v: Vec<f16>,
    blocks: Vec<Block>,
    k: Stream,
    v: Stream,
}

impl SeqState {
    fn empty() -> SeqState {
        SeqState {
            n: 0,
            sink_k: Vec::new(),
            sink_v: Vec::new(),
            blocks: Vec::new(),
            k: Stream::default(),
            v: Stream::default(),
        }
    }
}

/// KIVI cache for all layers and sequences. See the module docs for the policy.
pub struct KiviCache {
    config: CacheConfig,
    kc: KiviConfig,
    shape: CacheShape,
    layout: BlockLayout,
    layers: Vec<BTreeMap<SeqId, SeqState>>,
    pool: BlockPool,
    next_id: u64,
    isa: Isa,
}

impl KiviCache {
    pub fn new(kc: KiviConfig, shape: CacheShape) -> Result<Self> {
        kc.validate(&shape)?;
        if kc.key4_layers != 0 || kc.key4_auto != 0 {
            return Err(Error::InvalidConfig(
                "per-layer key bits: build the cache with new_cache (a MixedLayerCache)".into(),
            ));
        }
        let layout = BlockLayout::new(&kc, &shape);
        Ok(KiviCache {
            config: CacheConfig::Kivi(kc),
            kc,
            shape,
            layout,
            layers: (0..shape.n_layer).map(|_| BTreeMap::new()).collect(),
            pool: BlockPool::new(layout),
            next_id: 0,
            isa: Isa::detect(),
        })
    }

    /// Empties `layer` for every sequence (blocks back to the pool); the sequences stay
    /// registered. [`super::MixedLayerCache`] drops the copy of a layer it did not choose.
    pub fn clear_layer(&mut self, layer: usize) {
        if let Some(states) = self.layers.get_mut(layer) {
            for st in states.values_mut() {
                for b in std::mem::take(&mut st.blocks) {
                    self.pool.release(b);
                }
                *st = SeqState::empty();
            }
        }
    }

    /// Uses `isa` for attention instead of the detected one (tests, measurements).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    pub fn layout(&self) -> &BlockLayout {
        &self.layout
    }

    /// Bytes reserved: whole blocks (held by sequences and free in the pool), f16 buffer
    /// capacities. [`KvCache::memory`] reports the bytes used by stored tokens.
    pub fn memory_reserved(&self) -> MemoryUsage {
        let (bc, bs, bm) = self.layout.bytes();
        let mut m = MemoryUsage::default();
        let free = self.pool.free_blocks() as u64;
        m.code_bytes = bc * free;
        m.scale_bytes = bs * free;
        m.min_bytes = bm * free;
        for layer in &self.layers {
            for st in layer.values() {
                let nb = st.blocks.len() as u64;
                m.code_bytes += bc * nb;
                m.scale_bytes += bs * nb;
                m.min_bytes += bm * nb;
                let f16s = st.sink_k.capacity()
                    + st.sink_v.capacity()
                    + st.k.win.capacity()
                    + st.v.win.capacity();
                m.full_precision_bytes += 2 * f16s as u64;
                m.tokens += st.n as u64;
            }
        }
        m
    }

    /// Stored form of one sequence (tests): `(sinks, key stream quantized, key window,
    /// value stream quantized, value window)` token counts.
    pub fn seq_layout(&self, layer: usize, seq: SeqId) -> Result<[usize; 5]> {
        let st = self.state(layer, seq)?;
        let attended = |s: &Stream, axis: Axis| {
            if axis == Axis::PerChannel && self.kc.residual_len == 0 {
                0
            } else {
                s.len
            }
        };
        Ok([
            st.n.min(self.kc.sink_tokens),
            st.k.nq,
            attended(&st.k, self.kc.k_axis),
            st.v.nq,
            attended(&st.v, self.kc.v_axis),
        ])
    }

    /// Dequantized stored keys and values of one sequence, `[n][Hkv][D]` each, in f32 (tests and
    /// diagnostics; attention never builds this).
    pub fn dequantized(&self, layer: usize, seq: SeqId) -> Result<(Vec<f32>, Vec<f32>)> {
        let st = self.state(layer, seq)?;
        let (nh, hd) = (self.shape.n_kv_head, self.shape.head_dim);
        let mut k = vec![0f32; st.n * nh * hd];
        let mut v = vec![0f32; st.n * nh * hd];
        for (key, out) in [(true, &mut k), (false, &mut v)] {
            for h in 0..nh {
                let segs = self.segments(st, key, h);
                for seg in segs {
                    // Read each token through the scalar value kernel with weight 1.
                    for t in 0..seg.len {
                        let row = &mut out[((seg.start + t) * nh + h) * hd..][..hd];
                        attn::v_accumulate(Isa::Scalar, &[1.0], &seg.data, t, 1, row);
                    }
                }
            }
        }
        Ok((k, v))
    }

    fn state(&self, layer: usize, seq: SeqId) -> Result<&SeqState> {
        self.check_layer(layer)?;
        self.layers[layer]
            .get(&seq)
            .ok_or(Error::UnknownSequence(seq))
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.shape.n_layer {
            return Err(Error::Layer {
                layer,
                n_layer: self.shape.n_layer,
            });
        }
        Ok(())
    }

    /// Stored segments (sinks, quantized blocks, attended window) of one tensor and KV head.
    fn segments<'a>(&'a self, st: &'a SeqState, key: bool, h: usize) -> Vec<Seg<'a>> {
        let (nh, hd) = (self.shape.n_kv_head, self.shape.head_dim);
        let row = nh * hd;
        let l = &self.layout;
        let part = l.part(key);
        let (stream, sink) = if key {
            (&st.k, &st.sink_k)
        } else {
            (&st.v, &st.sink_v)
        };
        let r = self.kc.residual_len;
        let s_n = st.n.min(self.kc.sink_tokens);
        let mut segs = Vec::new();
        if s_n > 0 {
            let data = SegData::F16 {
                rows: &sink[h * hd..],
                stride: row,
            };
            segs.push(Seg {
                start: 0,
                len: s_n,
                data,
            });
        }
        let bt = l.block_tokens;
        let mut pos = s_n;
        for (bi, block) in st.blocks.iter().enumerate() {
            let lo = bi * bt;
            if lo >= stream.nq {
                break;
            }
            let len = bt.min(stream.nq - lo);
            let p = block.part(l, key, h);
            let data = match part.axis {
                Axis::PerChannel => SegData::Chan(ChanSeg {
                    codes: p.codes,
                    scales: p.scales,
                    mins: p.mins,
                    words_per_row: part.words_per_row,
                    groups_per_row: part.groups_per_row,
                    bits: part.bits,
                    group: l.group,
                }),
                Axis::PerToken => SegData::Tok(TokSeg {
                    codes: p.codes,
                    scales: p.scales,
                    mins: p.mins,
                    bits: part.bits,
                    group: l.group,
                }),
            };
            segs.push(Seg {
                start: pos,
                len,
                data,
            });
            pos += len;
        }
        let attended = !(part.axis == Axis::PerChannel && r == 0);
        if attended && stream.len > 0 {
            // Ring order: slots head.., then 0..head (per-channel windows have head = 0).
            let cap = if part.axis == Axis::PerToken {
                r
            } else {
                usize::MAX
            };
            let n1 = stream.len.min(cap - stream.head);
            let data = SegData::F16 {
                rows: &stream.win[stream.head * row + h * hd..],
                stride: row,
            };
            segs.push(Seg {
                start: pos,
                len: n1,
                data,
            });
            pos += n1;
            if stream.len > n1 {
                let data = SegData::F16 {
                    rows: &stream.win[h * hd..],
                    stride: row,
                };
                segs.push(Seg {
                    start: pos,
                    len: stream.len - n1,
                    data,
                });
                pos += stream.len - n1;
            }
        }
        debug_assert_eq!(pos, st.n);
        segs
    }

    fn view<'a>(&'a self, st: &'a SeqState, k_new: &'a [f32], v_new: &'a [f32]) -> SeqView<'a> {
        let (nh, hd) = (self.shape.n_kv_head, self.shape.head_dim);
        let n_new = k_new.len() / (nh * hd);
        let mut k = Vec::with_capacity(nh);
        let mut v = Vec::with_capacity(nh);
        for h in 0..nh {
            for (key, dst, new) in [(true, &mut k, k_new), (false, &mut v, v_new)] {
                let mut segs = self.segments(st, key, h);
                let data = SegData::F32 {
                    rows: &new[h * hd..],
                    stride: nh * hd,
                };
                segs.push(Seg {
                    start: st.n,
                    len: n_new,
                    data,
                });
                dst.push(segs);
            }
        }
        let bt = self.layout.block_tokens;
        let chunk = bt * (CHUNK_TOKENS / bt).max(1);
        let first = self.kc.sink_tokens + chunk;
        SeqView {
            n_old: st.n,
            n_new,
            k,
            v,
            bounds: attn::chunk_bounds(st.n + n_new, first, chunk),
        }
    }

    fn check_attend(
        &self,
        n_head: usize,
        q: &[f32],
        k_new: &[f32],
        v_new: &[f32],
        out: &[f32],
    ) -> Result<usize> {
        super::check_attend_shapes(&self.shape, n_head, q, k_new, v_new, out)
    }
}

/// Makes sure block `idx` exists.
fn ensure_block(blocks: &mut Vec<Block>, pool: &mut BlockPool, idx: usize) {
    while blocks.len() <= idx {
        blocks.push(pool.alloc());
    }
}

/// Quantizes tokens `src_t0..src_t0 + n` (n <= G) of the token-major f16 window `src` as the
/// per-channel group starting at stream position `p0` (a multiple of G), for every head/channel.
#[allow(clippy::too_many_arguments)]
fn quant_chan_group(
    blocks: &mut Vec<Block>,
    pool: &mut BlockPool,
    l: &BlockLayout,
    key: bool,
    src: &[f16],
    src_t0: usize,
    n: usize,
    p0: usize,
) {
    let (nh, hd, g, bt) = (l.n_kv_head, l.head_dim, l.group, l.block_tokens);
    let part = *l.part(key);
    let fpi = codes_per_word(part.bits);
    let (bi, off) = (p0 / bt, p0 % bt);
    ensure_block(blocks, pool, bi);
    let mut x = vec![0f32; n];
    let mut codes = vec![0u32; g];
    for h in 0..nh {
        let p = blocks[bi].part_mut(l, key, h);
        for d in 0..hd {
            for (t, xv) in x.iter_mut().enumerate() {
                *xv = src[((src_t0 + t) * nh + h) * hd + d].to_f32();
            }
            codes.fill(0);
            let gp = quant::quantize_group(&x, part.bits, &mut codes[..n]);
            let w0 = d * part.words_per_row + off / fpi;
            quant::pack(&codes, part.bits, &mut p.codes[w0..w0 + g / fpi]);
            let m = (off / g) * hd + d;
            p.scales[m] = gp.scale;
            p.mins[m] = gp.min;
        }
    }
}

/// Quantizes one token (`src = [Hkv][D]` f16) per token at stream position `pos`.
fn quant_token(
    blocks: &mut Vec<Block>,
    pool: &mut BlockPool,
    l: &BlockLayout,
    key: bool,
    src: &[f16],
    pos: usize,
) {
    let (nh, hd, g, bt) = (l.n_kv_head, l.head_dim, l.group, l.block_tokens);
    let part = *l.part(key);
    let fpi = codes_per_word(part.bits);
    let (bi, off) = (pos / bt, pos % bt);
    ensure_block(blocks, pool, bi);
    let mut x = vec![0f32; g];
    let mut codes = vec![0u32; g];
    for h in 0..nh {
        let p = blocks[bi].part_mut(l, key, h);
        for gi in 0..hd / g {
            for (xv, s) in x.iter_mut().zip(&src[h * hd + gi * g..][..g]) {
                *xv = s.to_f32();
            }
            let gp = quant::quantize_group(&x, part.bits, &mut codes);
            let w0 = off * part.words_per_row + gi * g / fpi;
            quant::pack(&codes, part.bits, &mut p.codes[w0..w0 + g / fpi]);
            let m = off * part.groups_per_row + gi;
            p.scales[m] = gp.scale;
            p.mins[m] = gp.min;
        }
    }
}

/// Runs the streaming policy for one stream token `x` (`[Hkv][D]` f16).
fn push_stream(
    s: &mut Stream,
    blocks: &mut Vec<Block>,
    pool: &mut BlockPool,
    l: &BlockLayout,
    kc: &KiviConfig,
    key: bool,
    x: &[f16],
) {
    let r = kc.residual_len;
    let g = l.group;
    let row = x.len();
    if s.win.capacity() == 0 {
        // Reserved once at full size: the scheduler's budget counts it (`seq_fixed_bytes`).
        s.win
            .reserve_exact(window_tokens(l.part(key).axis, r, g) * row);
    }
    match l.part(key).axis {
        Axis::PerChannel => {
            s.win.extend_from_slice(x);
            s.len += 1;
            if r > 0 {
                if s.len == r {
                    for gi in 0..r / g {
                        quant_chan_group(blocks, pool, l, key, &s.win, gi * g, g, s.nq + gi * g);
                    }
                    s.nq += r;
                    s.win.clear();
                    s.len = 0;
                }
            } else {
                let g0 = s.nq + 1 - s.len;
                s.nq += 1;
                quant_chan_group(blocks, pool, l, key, &s.win, 0, s.len, g0);
                if s.len == g {
                    s.win.clear();
                    s.len = 0;
                }
            }
        }
        Axis::PerToken => {
            if r == 0 {
                quant_token(blocks, pool, l, key, x, s.nq);
                s.nq += 1;
            } else if s.len < r {
                // Filling up: head stays 0 until the first pop.
                s.win.extend_from_slice(x);
                s.len += 1;
            } else {
                // Full: quantize the oldest, reuse its slot for the new token.
                let slot = s.head;
                quant_token(blocks, pool, l, key, &s.win[slot * row..][..row], s.nq);
                s.nq += 1;
                s.win[slot * row..][..row].copy_from_slice(x);
                s.head = (s.head + 1) % r;
            }
        }
    }
}

/// f16 window slots of one stream: the per-channel residual (R, or the partial group when
/// R = 0) or the per-token ring (R).
fn window_tokens(axis: Axis, r: usize, g: usize) -> usize {
    match axis {
        Axis::PerChannel if r == 0 => g,
        _ => r,
    }
}

/// Stream tokens quantized (stored in blocks) once `m` stream tokens have been appended.
fn quantized_tokens(axis: Axis, r: usize, m: usize) -> usize {
    match axis {
        Axis::PerChannel if r > 0 => m / r * r,
        Axis::PerToken => m.saturating_sub(r),
        Axis::PerChannel => m,
    }
}

/// Used bytes of one stream: (codes, scales, mins, f16 window).
fn stream_bytes(s: &Stream, l: &BlockLayout, key: bool) -> (u64, u64, u64, u64) {
    let part = l.part(key);
    let (nh, hd, g) = (l.n_kv_head as u64, l.head_dim as u64, l.group as u64);
    let fpi = codes_per_word(part.bits) as u64;
    let nq = s.nq as u64;
    let (words, metas) = match part.axis {
        Axis::PerChannel => (nh * hd * nq.div_ceil(fpi), nh * hd * nq.div_ceil(g)),
        Axis::PerToken => (nq * nh * (hd / fpi), nq * nh * (hd / g)),
    };
    (4 * words, 2 * metas, 2 * metas, 2 * s.len as u64 * nh * hd)
}

impl KvCache for KiviCache {
    fn shape(&self) -> CacheShape {
        self.shape
    }

    fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        for layer in &mut self.layers {
            layer.insert(id, SeqState::empty());
        }
        id
    }

    fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        if !self.layers.first().is_some_and(|l| l.contains_key(&seq)) {
            return Err(Error::UnknownSequence(seq));
        }
        for layer in &mut self.layers {
            if let Some(st) = layer.remove(&seq) {
                for b in st.blocks {
                    self.pool.release(b);
                }
            }
        }
        Ok(())
    }

    fn seq_len(&self, layer: usize, seq: SeqId) -> Result<usize> {
        Ok(self.state(layer, seq)?.n)
    }

    fn attend(
        &self,
        layer: usize,
        n_head: usize,
        seq: SeqId,
        q: &[f32],
        k_new: &[f32],
        v_new: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        // One sequence is a batch of one: same checks, same driver.
        let mut item = [AttendItem {
            seq,
            q,
            k_new,
            v_new,
            out,
        }];
        self.attend_batch(layer, n_head, &mut item)
    }

    fn attend_batch(
        &self,
        layer: usize,
        n_head: usize,
        items: &mut [AttendItem<'_>],
    ) -> Result<()> {
        let mut views = Vec::with_capacity(items.len());
        let mut qs = Vec::with_capacity(items.len());
        let mut outs = Vec::with_capacity(items.len());
        for it in items.iter_mut() {
            let n_new = self.check_attend(n_head, it.q, it.k_new, it.v_new, it.out)?;
            let st = self.state(layer, it.seq)?;
            if n_new == 0 {
                continue;
            }
            views.push(self.view(st, it.k_new, it.v_new));
            qs.push(it.q);
            outs.push(&mut *it.out);
        }
        let heads = Heads {
            n_head,
            n_kv_head: self.shape.n_kv_head,
            head_dim: self.shape.head_dim,
        };
        attn::attend_views(self.isa, heads, &views, &qs, &mut outs);
        Ok(())
    }

    fn append(&mut self, layer: usize, seq: SeqId, k: &[f32], v: &[f32]) -> Result<()> {
        self.check_layer(layer)?;
        let row = self.shape.n_kv_head * self.shape.head_dim;
        super::check_append_shapes(row, k, v)?;
        let st = self.layers[layer]
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence(seq))?;
        let (l, kc) = (&self.layout, &self.kc);
        let mut k16 = vec![f16::ZERO; row];
        let mut v16 = vec![f16::ZERO; row];
        for (kt, vt) in k.chunks_exact(row).zip(v.chunks_exact(row)) {
            for (a, b) in k16.iter_mut().zip(kt) {
                *a = f16::from_f32(*b);
            }
            for (a, b) in v16.iter_mut().zip(vt) {
                *a = f16::from_f32(*b);
            }
            if st.n < kc.sink_tokens {
                if st.sink_k.capacity() == 0 {
                    st.sink_k.reserve_exact(kc.sink_tokens * row);
                    st.sink_v.reserve_exact(kc.sink_tokens * row);
                }
                st.sink_k.extend_from_slice(&k16);
                st.sink_v.extend_from_slice(&v16);
            } else {
                push_stream(&mut st.k, &mut st.blocks, &mut self.pool, l, kc, true, &k16);
                push_stream(
                    &mut st.v,
                    &mut st.blocks,
                    &mut self.pool,
                    l,
                    kc,
                    false,
                    &v16,
                );
            }
            st.n += 1;
        }
        Ok(())
    }

    fn memory(&self) -> MemoryUsage {
        let mut m = MemoryUsage::default();
        let row = (self.shape.n_kv_head * self.shape.head_dim) as u64;
        for layer in &self.layers {
            for st in layer.values() {
                let s_n = st.n.min(self.kc.sink_tokens) as u64;
                m.full_precision_bytes += 2 * 2 * s_n * row;
                for (s, key) in [(&st.k, true), (&st.v, false)] {
                    let (c, sc, mn, fp) = stream_bytes(s, &self.layout, key);
                    m.code_bytes += c;
                    m.scale_bytes += sc;
                    m.min_bytes += mn;
                    m.full_precision_bytes += fp;
                }
                m.tokens += st.n as u64;
            }
        }
        m
    }

    fn memory_reserved(&self) -> MemoryUsage {
        KiviCache::memory_reserved(self)
    }

    fn block_bytes(&self) -> u64 {
        let (c, s, m) = self.layout.bytes();
        c + s + m
    }

    fn blocks_in_use(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.values())
            .map(|st| st.blocks.len())
            .sum()
    }

    fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }

    fn blocks_for_tokens(&self, n_tokens: usize) -> usize {
        let (kc, bt) = (&self.kc, self.layout.block_tokens);
        let m = n_tokens.saturating_sub(kc.sink_tokens);
        let nq_k = quantized_tokens(kc.k_axis, kc.residual_len, m);
        let nq_v = quantized_tokens(kc.v_axis, kc.residual_len, m);
        nq_k.max(nq_v).div_ceil(bt) * self.shape.n_layer
    }

    fn seq_fixed_bytes(&self) -> u64 {
        let kc = &self.kc;
        let (r, g) = (kc.residual_len, kc.group_size);
        let slots =
            2 * kc.sink_tokens + window_tokens(kc.k_axis, r, g) + window_tokens(kc.v_axis, r, g);
        let row = self.shape.n_kv_head * self.shape.head_dim;
        (2 * slots * row * self.shape.n_layer) as u64
    }

    fn n_sequences(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len())
    }

    fn trim_free_blocks(&mut self, keep: usize) {
        self.pool.trim(keep);
    }
}
