//! The f16 baseline cache: every token stored in f16, attention in f32 with the same driver,
//! threading and SIMD kernels as KIVI (a fair baseline).
//!
//! Storage per layer and sequence: fixed blocks of [`F16_BLOCK_TOKENS`] tokens, each
//! `k, v: [Hkv][BT][D]` f16 (head-major inside a block, so one KV head's rows are contiguous).

use std::collections::BTreeMap;

use half::f16;

use crate::attn::{self, Heads, Isa, Seg, SegData, SeqView};
use crate::{AttendItem, CacheConfig, CacheShape, Error, KvCache, MemoryUsage, Result, SeqId};

/// Tokens per f16 block.
pub const F16_BLOCK_TOKENS: usize = 256;
/// Tokens per flash-decoding chunk (same as KIVI's default).
const CHUNK_TOKENS: usize = 512;

struct F16Block {
    /// `[Hkv][BT][D]`
    k: Box<[f16]>,
    v: Box<[f16]>,
}

#[derive(Default)]
struct SeqState {
    n: usize,
    blocks: Vec<F16Block>,
}

pub struct F16Cache {
    config: CacheConfig,
    shape: CacheShape,
    layers: Vec<BTreeMap<SeqId, SeqState>>,
    free: Vec<F16Block>,
    next_id: u64,
    isa: Isa,
}

impl F16Cache {
    pub fn new(shape: CacheShape) -> Result<Self> {
        if shape.head_dim == 0 || shape.n_kv_head == 0 {
            return Err(Error::InvalidConfig(
                "head_dim and n_kv_head must be > 0".into(),
            ));
        }
        Ok(F16Cache {
            config: CacheConfig::F16,
            shape,
            layers: (0..shape.n_layer).map(|_| BTreeMap::new()).collect(),
            free: Vec::new(),
            next_id: 0,
            isa: Isa::detect(),
        })
    }

    /// Uses `isa` for attention instead of the detected one (tests, measurements).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    fn block_elems(&self) -> usize {
        self.shape.n_kv_head * F16_BLOCK_TOKENS * self.shape.head_dim
    }

    fn state(&self, layer: usize, seq: SeqId) -> Result<&SeqState> {
        if layer >= self.shape.n_layer {
            return Err(Error::Layer {
                layer,
                n_layer: self.shape.n_layer,
            });
        }
        self.layers[layer]
            .get(&seq)
            .ok_or(Error::UnknownSequence(seq))
    }

    fn view<'a>(&self, st: &'a SeqState, k_new: &'a [f32], v_new: &'a [f32]) -> SeqView<'a> {
        let (nh, hd) = (self.shape.n_kv_head, self.shape.head_dim);
        let n_new = k_new.len() / (nh * hd);
        let bt = F16_BLOCK_TOKENS;
        let mut k = Vec::with_capacity(nh);
        let mut v = Vec::with_capacity(nh);
        for h in 0..nh {
            for (is_k, dst, new) in [(true, &mut k, k_new), (false, &mut v, v_new)] {
                let mut segs = Vec::with_capacity(st.blocks.len() + 1);
                for (bi, b) in st.blocks.iter().enumerate() {
                    let len = bt.min(st.n - bi * bt);
                    let data = if is_k { &b.k } else { &b.v };
                    let rows = &data[h * bt * hd..(h + 1) * bt * hd];
                    segs.push(Seg {
                        start: bi * bt,
                        len,
                        data: SegData::F16 { rows, stride: hd },
                    });
                }
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
        SeqView {
            n_old: st.n,
            n_new,
            k,
            v,
            bounds: attn::chunk_bounds(st.n + n_new, CHUNK_TOKENS, CHUNK_TOKENS),
        }
    }

    /// Bytes reserved by whole blocks (held and free).
    pub fn memory_reserved(&self) -> MemoryUsage {
        let per_block = (2 * 2 * self.block_elems()) as u64;
        let mut m = MemoryUsage {
            full_precision_bytes: per_block * self.free.len() as u64,
            ..Default::default()
        };
        for layer in &self.layers {
            for st in layer.values() {
                m.full_precision_bytes += per_block * st.blocks.len() as u64;
                m.tokens += st.n as u64;
            }
        }
        m
    }
}

impl KvCache for F16Cache {
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
            layer.insert(id, SeqState::default());
        }
        id
    }

    fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        if !self.layers.first().is_some_and(|l| l.contains_key(&seq)) {
            return Err(Error::UnknownSequence(seq));
        }
        for layer in &mut self.layers {
            if let Some(st) = layer.remove(&seq) {
                self.free.extend(st.blocks);
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
            let n_new =
                super::check_attend_shapes(&self.shape, n_head, it.q, it.k_new, it.v_new, it.out)?;
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
        self.state(layer, seq)?;
        let (nh, hd) = (self.shape.n_kv_head, self.shape.head_dim);
        super::check_append_shapes(nh * hd, k, v)?;
        let elems = self.block_elems();
        let bt = F16_BLOCK_TOKENS;
        let st = self.layers[layer]
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence(seq))?;
        for (kt, vt) in k.chunks_exact(nh * hd).zip(v.chunks_exact(nh * hd)) {
            let (bi, slot) = (st.n / bt, st.n % bt);
            if bi == st.blocks.len() {
                let b = self.free.pop().unwrap_or_else(|| F16Block {
                    k: vec![f16::ZERO; elems].into_boxed_slice(),
                    v: vec![f16::ZERO; elems].into_boxed_slice(),
                });
                st.blocks.push(b);
            }
            let b = &mut st.blocks[bi];
            for h in 0..nh {
                let dst = (h * bt + slot) * hd;
                for (o, x) in b.k[dst..dst + hd].iter_mut().zip(&kt[h * hd..(h + 1) * hd]) {
                    *o = f16::from_f32(*x);
                }
                for (o, x) in b.v[dst..dst + hd].iter_mut().zip(&vt[h * hd..(h + 1) * hd]) {
                    *o = f16::from_f32(*x);
                }
            }
            st.n += 1;
        }
        Ok(())
    }

    fn memory(&self) -> MemoryUsage {
        let row = (self.shape.n_kv_head * self.shape.head_dim) as u64;
        let mut m = MemoryUsage::default();
        for layer in &self.layers {
            for st in layer.values() {
                m.full_precision_bytes += 2 * 2 * st.n as u64 * row;
                m.tokens += st.n as u64;
            }
        }
        m
    }

    fn memory_reserved(&self) -> MemoryUsage {
        F16Cache::memory_reserved(self)
    }

    fn block_bytes(&self) -> u64 {
        (2 * 2 * self.block_elems()) as u64
    }

    fn blocks_in_use(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.values())
            .map(|st| st.blocks.len())
            .sum()
    }

    fn free_blocks(&self) -> usize {
        self.free.len()
    }

    fn blocks_for_tokens(&self, n_tokens: usize) -> usize {
        n_tokens.div_ceil(F16_BLOCK_TOKENS) * self.shape.n_layer
    }

    fn seq_fixed_bytes(&self) -> u64 {
        0
    }

    fn n_sequences(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len())
    }

    fn trim_free_blocks(&mut self, keep: usize) {
        self.free.truncate(keep);
        self.free.shrink_to(keep);
    }
}
