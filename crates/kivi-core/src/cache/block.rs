//! Fixed-size blocks of quantized tokens and the pool they come from.
//!
//! A block holds `block_tokens` tokens (a whole number of R-token key chunks, or of G-token
//! groups when R = 0) of the quantized key stream and the same number of tokens of the quantized
//! value stream, for every KV head of one layer and sequence:
//!
//! | part | per-channel layout | per-token layout |
//! |---|---|---|
//! | codes (u32) | `[Hkv][D][BT/fpi]` | `[Hkv][BT][D/fpi]` |
//! | scales, mins (f16) | `[Hkv][BT/G][D]` | `[Hkv][BT][D/G]` |
//!
//! Block `i` of a sequence holds key-stream tokens `i*BT..(i+1)*BT` and value-stream tokens
//! `i*BT..(i+1)*BT` (keys and values are quantized at different times). Every block of a cache
//! has the same size, so a paged allocator (one pool, blocks by index) can replace [`BlockPool`]
//! without changing the layout. Sizes are `usize` (64-bit).

use half::f16;

use crate::quant::codes_per_word;
use crate::{Axis, CacheShape, KiviConfig};

/// Layout of one tensor's part (keys or values) inside a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartLayout {
    pub axis: Axis,
    pub bits: u8,
    /// u32 words per KV head.
    pub words_per_head: usize,
    /// Scales (and as many mins) per KV head.
    pub meta_per_head: usize,
    /// Per-channel: words per channel row (`BT/fpi`); per-token: words per token (`D/fpi`).
    pub words_per_row: usize,
    /// Per-channel: groups per channel row (`BT/G`); per-token: groups per token (`D/G`).
    pub groups_per_row: usize,
}

impl PartLayout {
    fn new(axis: Axis, bits: u8, bt: usize, head_dim: usize, g: usize) -> Self {
        let fpi = codes_per_word(bits);
        let (words_per_row, groups_per_row, rows) = match axis {
            Axis::PerChannel => (bt / fpi, bt / g, head_dim),
            Axis::PerToken => (head_dim / fpi, head_dim / g, bt),
        };
        PartLayout {
            axis,
            bits,
            words_per_head: rows * words_per_row,
            meta_per_head: rows * groups_per_row,
            words_per_row,
            groups_per_row,
        }
    }
}

/// Geometry of every block of one cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    /// BT: tokens per block.
    pub block_tokens: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub group: usize,
    pub k: PartLayout,
    pub v: PartLayout,
}

impl BlockLayout {
    /// Tokens per block: the largest multiple of the flush unit (R, or G when R = 0) that is at
    /// most 256 tokens, and at least one unit.
    pub fn new(cfg: &KiviConfig, shape: &CacheShape) -> Self {
        let unit = if cfg.residual_len > 0 {
            cfg.residual_len
        } else {
            cfg.group_size
        };
        let bt = unit * (256 / unit).max(1);
        let (hd, g) = (shape.head_dim, cfg.group_size);
        BlockLayout {
            block_tokens: bt,
            n_kv_head: shape.n_kv_head,
            head_dim: hd,
            group: g,
            k: PartLayout::new(cfg.k_axis, cfg.k_bits, bt, hd, g),
            v: PartLayout::new(cfg.v_axis, cfg.v_bits, bt, hd, g),
        }
    }

    pub fn words(&self) -> usize {
        (self.k.words_per_head + self.v.words_per_head) * self.n_kv_head
    }
    pub fn metas(&self) -> usize {
        2 * (self.k.meta_per_head + self.v.meta_per_head) * self.n_kv_head
    }
    /// Bytes of one block: (codes, scales, mins).
    pub fn bytes(&self) -> (u64, u64, u64) {
        let m = ((self.k.meta_per_head + self.v.meta_per_head) * self.n_kv_head * 2) as u64;
        ((self.words() * 4) as u64, m, m)
    }
    pub fn part(&self, key: bool) -> &PartLayout {
        if key {
            &self.k
        } else {
            &self.v
        }
    }
}

/// One block: `words = [k codes | v codes]`, `meta = [k scales | k mins | v scales | v mins]`.
pub struct Block {
    pub words: Box<[u32]>,
    pub meta: Box<[f16]>,
}

/// Mutable or shared views of one part (keys or values) of a block, for KV head `h`.
pub struct PartRef<'a> {
    pub codes: &'a [u32],
    pub scales: &'a [f16],
    pub mins: &'a [f16],
}

pub struct PartMut<'a> {
    pub codes: &'a mut [u32],
    pub scales: &'a mut [f16],
    pub mins: &'a mut [f16],
}

impl Block {
    fn ranges(l: &BlockLayout, key: bool, h: usize) -> (usize, usize, usize, usize, usize) {
        let nh = l.n_kv_head;
        let (kw, km) = (l.k.words_per_head * nh, l.k.meta_per_head * nh);
        let p = l.part(key);
        let (w0, m0) = if key { (0, 0) } else { (kw, 2 * km) };
        let mt = p.meta_per_head * nh;
        let w = w0 + h * p.words_per_head;
        let s = m0 + h * p.meta_per_head;
        (w, p.words_per_head, s, s + mt, p.meta_per_head)
    }

    pub fn part(&self, l: &BlockLayout, key: bool, h: usize) -> PartRef<'_> {
        let (w, nw, s, m, nm) = Self::ranges(l, key, h);
        PartRef {
            codes: &self.words[w..w + nw],
            scales: &self.meta[s..s + nm],
            mins: &self.meta[m..m + nm],
        }
    }

    pub fn part_mut(&mut self, l: &BlockLayout, key: bool, h: usize) -> PartMut<'_> {
        let (w, nw, s, m, nm) = Self::ranges(l, key, h);
        let (scales, mins) = self.meta.split_at_mut(m);
        PartMut {
            codes: &mut self.words[w..w + nw],
            scales: &mut scales[s..s + nm],
            mins: &mut mins[..nm],
        }
    }
}

/// Free list of blocks of one layout. Blocks released by removed sequences are reused.
pub struct BlockPool {
    layout: BlockLayout,
    free: Vec<Block>,
}

impl BlockPool {
    pub fn new(layout: BlockLayout) -> Self {
        BlockPool {
            layout,
            free: Vec::new(),
        }
    }

    pub fn alloc(&mut self) -> Block {
        self.free.pop().unwrap_or_else(|| Block {
            words: vec![0u32; self.layout.words()].into_boxed_slice(),
            meta: vec![f16::ZERO; self.layout.metas()].into_boxed_slice(),
        })
    }

    pub fn release(&mut self, mut b: Block) {
        // Stale codes would never be read (attention stops at the stored count), but a reused
        // block must not depend on its history: partial words are rewritten whole anyway.
        b.words.fill(0);
        self.free.push(b);
    }

    /// Frees the blocks kept for reuse beyond `keep`.
    pub fn trim(&mut self, keep: usize) {
        self.free.truncate(keep);
        self.free.shrink_to(keep);
    }

    /// Blocks kept for reuse.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
}
