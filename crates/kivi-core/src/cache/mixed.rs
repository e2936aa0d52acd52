//! Per-layer bit allocation: a [`KvCache`] whose chosen layers store keys at 4 bits and the
//! others at 2, built from two [`KiviCache`]s that each serve their own layers. Each layer still
//! has one packing and one fused kernel; only the dispatch is per layer.
//!
//! The layers are listed (`KiviConfig::key4_layers`) or chosen on the fly
//! (`KiviConfig::key4_auto = N`): while the first sequence's first [`MEASURE_TOKENS`] tokens
//! (after the sinks) arrive, both parts store every layer and attention reads the 4-bit part;
//! then each layer is scored by the RMS error that 2-bit keys cause in its attention logits
//! q·k/sqrt(d) on those tokens ([`quant::logit_error_rms`]: an absolute error, what the
//! softmax sees), the N highest keep 4-bit keys, and each layer's other copy is dropped.
//! Measured on SmolLM2 (docs/quality.md): the layers ranked highest are the ones where 4-bit
//! keys lower the KL most; the keys' relative quantization error alone is flat over layers.

use std::sync::Mutex;

use super::KiviCache;
use crate::{
    quant, AttendItem, CacheConfig, CacheShape, Error, KiviConfig, KvCache, MemoryUsage, Result,
    SeqId,
};

/// Tokens after the sinks on which layers are scored (`key4_auto`).
pub const MEASURE_TOKENS: usize = 128;

pub struct MixedLayerCache {
    config: CacheConfig,
    kc: KiviConfig,
    shape: CacheShape,
    /// Layers routed to `high` (final once `pending` is None).
    mask: u64,
    /// Serves the layers outside the mask (keys at `k_bits`).
    low: KiviCache,
    /// Serves the layers in the mask (keys at 4 bits).
    high: KiviCache,
    n_high: usize,
    /// `key4_auto` before the choice: both parts store every layer.
    pending: Option<Measure>,
}

/// The queries and keys of the measured sequence, per layer, until every layer is scored.
struct Measure {
    seq: Option<SeqId>,
    /// `attend` only has `&self`.
    q: Mutex<Queries>,
    /// `[tokens][n_kv_head][head_dim]` per layer.
    k: Vec<Vec<f32>>,
    score: Vec<Option<f64>>,
}

impl MixedLayerCache {
    pub fn new(kc: KiviConfig, shape: CacheShape) -> Result<Self> {
        kc.validate(&shape)?;
        if kc.key4_layers == 0 && kc.key4_auto == 0 {
            return Err(Error::InvalidConfig(
                "MixedLayerCache needs layers with 4-bit keys (key4_layers or key4_auto)".into(),
            ));
        }
        let low = KiviConfig {
            key4_layers: 0,
            key4_auto: 0,
            ..kc
        };
        let high = KiviConfig { k_bits: 4, ..low };
        let n = shape.n_layer;
        let (n_high, pending) = if kc.key4_auto != 0 {
            let measure = Measure {
                seq: None,
                q: Mutex::new(Queries {
                    n_head: 0,
                    per_layer: vec![Vec::new(); n],
                }),
                k: vec![Vec::new(); n],
                score: vec![None; n],
            };
            (kc.key4_auto as usize, Some(measure))
        } else {
            ((0..n).filter(|&l| kc.key_bits(l) == 4).count(), None)
        };
        Ok(MixedLayerCache {
            config: CacheConfig::Kivi(kc),
            kc,
            shape,
            mask: kc.key4_layers,
            low: KiviCache::new(low, shape)?,
            high: KiviCache::new(high, shape)?,
            n_high,
            pending,
        })
    }

    /// Layers with 4-bit keys: None while they are being chosen (`key4_auto`).
    pub fn key4_layers(&self) -> Option<u64> {
        self.pending.is_none().then_some(self.mask)
    }

    fn in_high(&self, layer: usize) -> bool {
        self.pending.is_some() || (layer < 64 && self.mask >> layer & 1 == 1)
    }

    fn part(&self, layer: usize) -> &KiviCache {
        if self.in_high(layer) {
            &self.high
        } else {
            &self.low
        }
    }

    /// Keeps the measured sequence's queries of `layer` (up to the tokens scored).
    fn record_queries(&self, layer: usize, n_head: usize, seq: SeqId, q: &[f32]) {
        let Some(m) = &self.pending else { return };
        if m.seq != Some(seq) || m.score.get(layer).is_none_or(|s| s.is_some()) {
            return;
        }
        let row = n_head * self.shape.head_dim;
        let cap = (self.kc.sink_tokens + MEASURE_TOKENS) * row;
        let mut qs = m.q.lock().unwrap_or_else(|e| e.into_inner());
        qs.n_head = n_head;
        let buf = &mut qs.per_layer[layer];
        let take = cap.saturating_sub(buf.len()).min(q.len());
        buf.extend_from_slice(&q[..take]);
    }

    /// Keeps the measured sequence's keys of `layer`; scores the layer once it has enough
    /// tokens, and chooses when every layer has a score.
    fn record_keys(&mut self, layer: usize, seq: SeqId, k: &[f32]) {
        let (sinks, group) = (self.kc.sink_tokens, self.kc.group_size);
        let (d, hkv) = (self.shape.head_dim, self.shape.n_kv_head);
        let Some(m) = &mut self.pending else { return };
        if m.seq != Some(seq) || m.score[layer].is_some() {
            return;
        }
        let cap = (sinks + MEASURE_TOKENS) * hkv * d;
        let take = cap.saturating_sub(m.k[layer].len()).min(k.len());
        m.k[layer].extend_from_slice(&k[..take]);
        if m.k[layer].len() < cap {
            return;
        }
        let queries = m.q.get_mut().unwrap_or_else(|e| e.into_inner());
        let n_head = queries.n_head;
        let qs = std::mem::take(&mut queries.per_layer[layer]);
        let ks = std::mem::take(&mut m.k[layer]);
        m.score[layer] = Some(layer_score(&qs, &ks, n_head, hkv, d, group, sinks));
        if m.score.iter().all(|s| s.is_some()) {
            let mut order: Vec<(usize, f64)> = m
                .score
                .iter()
                .enumerate()
                .map(|(l, s)| (l, s.unwrap_or(0.0)))
                .collect();
            order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            self.mask = order
                .iter()
                .take(self.n_high)
                .fold(0u64, |mask, &(l, _)| mask | 1 << l);
            self.pending = None;
            for l in 0..self.shape.n_layer {
                if self.mask >> l & 1 == 1 {
                    self.low.clear_layer(l);
                } else {
                    self.high.clear_layer(l);
                }
            }
        }
    }
}

#[derive(Default)]
struct Queries {
    n_head: usize,
    /// `[tokens][n_head][head_dim]` per layer.
    per_layer: Vec<Vec<f32>>,
}

/// RMS logit error of 2-bit keys over the KV heads of one layer (`q`: `[t][n_head][d]`, `k`:
/// `[t][hkv][d]`, the same tokens).
fn layer_score(
    q: &[f32],
    k: &[f32],
    n_head: usize,
    hkv: usize,
    d: usize,
    group: usize,
    sinks: usize,
) -> f64 {
    if n_head == 0 || hkv == 0 || !n_head.is_multiple_of(hkv) {
        return 0.0;
    }
    let n_rep = n_head / hkv;
    let tokens = (q.len() / (n_head * d)).min(k.len() / (hkv * d));
    let mut sum = 0.0;
    for h in 0..hkv {
        let qh: Vec<f32> = (0..tokens)
            .flat_map(|t| &q[(t * n_head + h * n_rep) * d..(t * n_head + (h + 1) * n_rep) * d])
            .copied()
            .collect();
        let kh: Vec<f32> = (0..tokens)
            .flat_map(|t| &k[(t * hkv + h) * d..(t * hkv + h + 1) * d])
            .copied()
            .collect();
        sum += quant::logit_error_rms(&qh, &kh, d, n_rep, group, 2, sinks, 1).powi(2);
    }
    (sum / hkv as f64).sqrt()
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
        if let Some(m) = &mut self.pending {
            m.seq.get_or_insert(id);
        }
        id
    }
    fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.low.remove_sequence(seq)?;
        self.high.remove_sequence(seq)?;
        if let Some(m) = &mut self.pending {
            if m.seq == Some(seq) {
                // Measure the next sequence that arrives (layers already scored stay scored).
                m.seq = None;
                m.k.iter_mut().for_each(Vec::clear);
                let qs = m.q.get_mut().unwrap_or_else(|e| e.into_inner());
                qs.per_layer.iter_mut().for_each(Vec::clear);
            }
        }
        Ok(())
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
            .attend(layer, n_head, seq, q, k_new, v_new, out)?;
        self.record_queries(layer, n_head, seq, q);
        Ok(())
    }
    fn attend_batch(
        &self,
        layer: usize,
        n_head: usize,
        items: &mut [AttendItem<'_>],
    ) -> Result<()> {
        self.part(layer).attend_batch(layer, n_head, items)?;
        for it in items.iter() {
            self.record_queries(layer, n_head, it.seq, it.q);
        }
        Ok(())
    }
    fn append(&mut self, layer: usize, seq: SeqId, k: &[f32], v: &[f32]) -> Result<()> {
        if self.pending.is_some() {
            self.low.append(layer, seq, k, v)?;
            self.high.append(layer, seq, k, v)?;
            self.record_keys(layer, seq, k);
            return Ok(());
        }
        if self.in_high(layer) {
            self.high.append(layer, seq, k, v)
        } else {
            self.low.append(layer, seq, k, v)
        }
    }

    // Each layer is stored by one part (by both while choosing), so the sums count what is held.
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
        if self.pending.is_some() {
            return self.low.blocks_for_tokens(n_tokens) + self.high.blocks_for_tokens(n_tokens);
        }
        // The parts count blocks for all layers; a layer's share is the same in every layer.
        let n = self.shape.n_layer;
        let low = self.low.blocks_for_tokens(n_tokens) / n;
        let high = self.high.blocks_for_tokens(n_tokens) / n;
        low * (n - self.n_high) + high * self.n_high
    }
    fn seq_fixed_bytes(&self) -> u64 {
        // f16 windows and sinks: the same size in both parts, per layer (twice while choosing).
        let fixed = self.low.seq_fixed_bytes();
        if self.pending.is_some() {
            2 * fixed
        } else {
            fixed
        }
    }
    fn n_sequences(&self) -> usize {
        self.low.n_sequences()
    }
    fn runtime_choices(&self) -> Option<String> {
        if self.kc.key4_auto == 0 {
            return None;
        }
        Some(match self.key4_layers() {
            None => "4-bit key layers not chosen yet (fewer tokens than measured)".into(),
            Some(mask) => {
                let layers: Vec<String> = (0..self.shape.n_layer)
                    .filter(|&l| mask >> l & 1 == 1)
                    .map(|l| l.to_string())
                    .collect();
                format!("4-bit keys on layers {}", layers.join(", "))
            }
        })
    }
    fn trim_free_blocks(&mut self, keep: usize) {
        let keep_low = keep.min(self.low.free_blocks());
        self.low.trim_free_blocks(keep_low);
        self.high.trim_free_blocks(keep - keep_low);
    }
}
