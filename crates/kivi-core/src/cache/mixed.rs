//! Per-layer bit allocation: a [`KvCache`] whose layers in `KiviConfig::key4_layers` store keys
//! at 4 bits and the others at 2, built from two [`KiviCache`]s that each serve their own layers.
//! Each layer still has one packing and one fused kernel; only the dispatch is per layer.

use super::KiviCache;
use crate::{
    AttendItem, CacheConfig, CacheShape, Error, KiviConfig, KvCache, MemoryUsage, Result, SeqId,
};

pub struct MixedLayerCache {
    config: CacheConfig,
    shape: CacheShape,
    mask: u64,
    /// Serves the layers outside the mask (keys at `k_bits`).
    low: KiviCache,
    /// Serves the layers in the mask (keys at 4 bits).
    high: KiviCache,
    n_high: usize,
}

impl MixedLayerCache {
    pub fn new(kc: KiviConfig, shape: CacheShape) -> Result<Self> {
        kc.validate(&shape)?;
        if kc.key4_layers == 0 {
            return Err(Error::InvalidConfig(
                "MixedLayerCache needs at least one layer with 4-bit keys".into(),
            ));
        }
        let low = KiviConfig {
            key4_layers: 0,
            ..kc
        };
        let high = KiviConfig { k_bits: 4, ..low };
        let n_high = (0..shape.n_layer).filter(|&l| kc.key_bits(l) == 4).count();
        Ok(MixedLayerCache {
            config: CacheConfig::Kivi(kc),
            shape,
            mask: kc.key4_layers,
            low: KiviCache::new(low, shape)?,
            high: KiviCache::new(high, shape)?,
            n_high,
        })
    }

    fn part(&self, layer: usize) -> &KiviCache {
        if layer < 64 && self.mask >> layer & 1 == 1 {
            &self.high
        } else {
            &self.low
        }
    }

    fn part_mut(&mut self, layer: usize) -> &mut KiviCache {
        if layer < 64 && self.mask >> layer & 1 == 1 {
            &mut self.high
        } else {
            &mut self.low
        }
    }
}

fn add(a: MemoryUsage, b: MemoryUsage) -> MemoryUsage {
    MemoryUsage {
        code_bytes: a.code_bytes + b.code_bytes,
        scale_bytes: a.scale_bytes + b.scale_bytes,
        min_bytes: a.min_bytes + b.min_bytes,
        full_precision_bytes: a.full_precision_bytes + b.full_precision_bytes,
        tokens: a.tokens + b.tokens,
    }
}

impl KvCache for MixedLayerCache {
    fn shape(&self) -> CacheShape {
        self.shape
    }
    fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn add_sequence(&mut self) -> SeqId {
        // Both parts see the same calls in the same order, so they hand out the same ids.
        let id = self.low.add_sequence();
        let same = self.high.add_sequence();
        debug_assert_eq!(id, same);
        id
    }
    fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.low.remove_sequence(seq)?;
        self.high.remove_sequence(seq)
    }
    fn seq_len(&self, layer: usize, seq: SeqId) -> Result<usize> {
        self.part(layer).seq_len(layer, seq)
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
        self.part(layer)
            .attend(layer, n_head, seq, q, k_new, v_new, out)
    }
    fn attend_batch(
        &self,
        layer: usize,
        n_head: usize,
        items: &mut [AttendItem<'_>],
    ) -> Result<()> {
        self.part(layer).attend_batch(layer, n_head, items)
    }
    fn append(&mut self, layer: usize, seq: SeqId, k: &[f32], v: &[f32]) -> Result<()> {
        self.part_mut(layer).append(layer, seq, k, v)
    }

    // Each part stores only its own layers, so the sums count every stored layer once.
    fn memory(&self) -> MemoryUsage {
        add(self.low.memory(), self.high.memory())
    }
    fn memory_reserved(&self) -> MemoryUsage {
        add(
            KvCache::memory_reserved(&self.low),
            KvCache::memory_reserved(&self.high),
        )
    }

    /// The larger block (4-bit keys): `blocks_in_use * block_bytes` stays an upper bound.
    fn block_bytes(&self) -> u64 {
        self.low.block_bytes().max(self.high.block_bytes())
    }
    fn blocks_in_use(&self) -> usize {
        self.low.blocks_in_use() + self.high.blocks_in_use()
    }
    fn free_blocks(&self) -> usize {
        self.low.free_blocks() + self.high.free_blocks()
    }
    fn blocks_for_tokens(&self, n_tokens: usize) -> usize {
        // The parts count blocks for all layers; a layer's share is the same in every layer.
        let n = self.shape.n_layer;
        let low = self.low.blocks_for_tokens(n_tokens) / n;
        let high = self.high.blocks_for_tokens(n_tokens) / n;
        low * (n - self.n_high) + high * self.n_high
    }
    fn seq_fixed_bytes(&self) -> u64 {
        // f16 windows and sinks: the same size in both parts, per layer.
        self.low.seq_fixed_bytes()
    }
    fn n_sequences(&self) -> usize {
        self.low.n_sequences()
    }
    fn trim_free_blocks(&mut self, keep: usize) {
        let keep_low = keep.min(self.low.free_blocks());
        self.low.trim_free_blocks(keep_low);
        self.high.trim_free_blocks(keep - keep_low);
    }
}
