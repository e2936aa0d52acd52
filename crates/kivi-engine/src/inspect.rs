//! Reading what the KV cache receives: a [`KvCache`] wrapper that records the post-RoPE keys and
//! the values of chosen layers while delegating all storage and attention to an f16 cache, and
//! per-channel statistics over them (the paper's Figure 2: keys have a few outlier channels,
//! values do not).

use kivi_core::{
    AttendItem, CacheConfig, CacheShape, KvCache, MemoryUsage, Result as CoreResult, SeqId,
};
use kivi_model::llama::{Logits, Model};
use kivi_model::{ModelError, Result};

/// Keys and values of one layer, token-major: `[tokens][n_kv_head][head_dim]`, and the queries
/// that attended to them, `[tokens][n_head][head_dim]`.
#[derive(Clone, Debug, Default)]
pub struct LayerKv {
    pub layer: usize,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub q: Vec<f32>,
}

/// An f16 cache that also keeps a full-precision copy of what `append` receives for some layers.
pub struct RecordingCache {
    inner: Box<dyn KvCache>,
    layers: Vec<LayerKv>,
    /// Queries per recorded layer (same order as `layers`); `attend` only has `&self`.
    queries: std::sync::Mutex<Vec<Vec<f32>>>,
}

impl RecordingCache {
    pub fn new(shape: CacheShape, layers: &[usize]) -> CoreResult<Self> {
        let inner = kivi_core::new_cache(&CacheConfig::F16, shape)?;
        let layers: Vec<LayerKv> = layers
            .iter()
            .map(|&layer| LayerKv {
                layer,
                ..Default::default()
            })
            .collect();
        let queries = std::sync::Mutex::new(vec![Vec::new(); layers.len()]);
        Ok(RecordingCache {
            inner,
            layers,
            queries,
        })
    }

    pub fn recorded(&self) -> &[LayerKv] {
        &self.layers
    }

    pub fn into_recorded(self) -> Vec<LayerKv> {
        let queries = self.queries.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut layers = self.layers;
        for (l, q) in layers.iter_mut().zip(queries) {
            l.q = q;
        }
        layers
    }

    fn record_queries(&self, layer: usize, q: &[f32]) {
        let mut queries = self.queries.lock().unwrap_or_else(|e| e.into_inner());
        for (l, rec) in self.layers.iter().zip(queries.iter_mut()) {
            if l.layer == layer {
                rec.extend_from_slice(q);
            }
        }
    }
}

impl KvCache for RecordingCache {
    fn shape(&self) -> CacheShape {
        self.inner.shape()
    }
    fn config(&self) -> &CacheConfig {
        self.inner.config()
    }
    fn add_sequence(&mut self) -> SeqId {
        self.inner.add_sequence()
    }
    fn remove_sequence(&mut self, seq: SeqId) -> CoreResult<()> {
        self.inner.remove_sequence(seq)
    }
    fn seq_len(&self, layer: usize, seq: SeqId) -> CoreResult<usize> {
        self.inner.seq_len(layer, seq)
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
    ) -> CoreResult<()> {
        self.record_queries(layer, q);
        self.inner.attend(layer, n_head, seq, q, k_new, v_new, out)
    }
    fn attend_batch(
        &self,
        layer: usize,
        n_head: usize,
        items: &mut [AttendItem<'_>],
    ) -> CoreResult<()> {
        for it in items.iter() {
            self.record_queries(layer, it.q);
        }
        self.inner.attend_batch(layer, n_head, items)
    }
    fn append(&mut self, layer: usize, seq: SeqId, k: &[f32], v: &[f32]) -> CoreResult<()> {
        for l in self.layers.iter_mut().filter(|l| l.layer == layer) {
            l.k.extend_from_slice(k);
            l.v.extend_from_slice(v);
        }
        self.inner.append(layer, seq, k, v)
    }
    fn memory(&self) -> MemoryUsage {
        self.inner.memory()
    }
    fn memory_reserved(&self) -> MemoryUsage {
        self.inner.memory_reserved()
    }
    fn block_bytes(&self) -> u64 {
        self.inner.block_bytes()
    }
    fn blocks_in_use(&self) -> usize {
        self.inner.blocks_in_use()
    }
    fn free_blocks(&self) -> usize {
        self.inner.free_blocks()
    }
    fn blocks_for_tokens(&self, n_tokens: usize) -> usize {
        self.inner.blocks_for_tokens(n_tokens)
    }
    fn blocks_needed(&self, seq: SeqId, n_new: usize) -> CoreResult<usize> {
        self.inner.blocks_needed(seq, n_new)
    }
    fn seq_fixed_bytes(&self) -> u64 {
        self.inner.seq_fixed_bytes()
    }
    fn n_sequences(&self) -> usize {
        self.inner.n_sequences()
    }
    fn trim_free_blocks(&mut self, keep: usize) {
        self.inner.trim_free_blocks(keep)
    }
    fn runtime_choices(&self) -> Option<String> {
        self.inner.runtime_choices()
    }
}

/// Runs `tokens` through `model` in chunks and returns the post-RoPE keys and the values that the
/// cache received in each of `layers`.
pub fn record_kv(
    model: &Model,
    tokens: &[u32],
    layers: &[usize],
    chunk: usize,
) -> Result<Vec<LayerKv>> {
    let c = &model.config;
    if let Some(&bad) = layers.iter().find(|&&l| l >= c.n_layer) {
        return Err(ModelError::Format {
            format: "model",
            field: "layers".into(),
            detail: format!(
                "layer {bad} does not exist: the model has {} layers",
                c.n_layer
            ),
        });
    }
    if tokens.len() > c.context_len {
        return Err(ModelError::ContextOverflow {
            prompt: tokens.len(),
            context: c.context_len,
        });
    }
    let shape = CacheShape {
        n_layer: c.n_layer,
        n_kv_head: c.n_kv_head,
        head_dim: c.head_dim,
    };
    let mut cache = RecordingCache::new(shape, layers)?;
    let seq = cache.add_sequence();
    for piece in tokens.chunks(chunk.max(1)) {
        model.forward(piece, &mut cache, seq, Logits::Last)?;
    }
    Ok(cache.into_recorded())
}

/// One head's `[tokens][head_dim]` slice out of a token-major `[tokens][n_kv_head][head_dim]`.
pub fn head_matrix(x: &[f32], n_kv_head: usize, head_dim: usize, head: usize) -> Vec<f32> {
    x.chunks(n_kv_head * head_dim)
        .flat_map(|t| &t[head * head_dim..(head + 1) * head_dim])
        .copied()
        .collect()
}

/// Per-channel max |x| over tokens of a `[tokens][dim]` matrix.
pub fn channel_absmax(x: &[f32], dim: usize) -> Vec<f32> {
    let mut m = vec![0f32; dim];
    for row in x.chunks(dim) {
        for (a, &v) in m.iter_mut().zip(row) {
            *a = a.max(v.abs());
        }
    }
    m
}

/// Per-channel mean |x| over tokens of a `[tokens][dim]` matrix.
pub fn channel_absmean(x: &[f32], dim: usize) -> Vec<f32> {
    let mut m = vec![0f64; dim];
    let n = (x.len() / dim.max(1)).max(1) as f64;
    for row in x.chunks(dim) {
        for (a, &v) in m.iter_mut().zip(row) {
            *a += v.abs() as f64;
        }
    }
    m.into_iter().map(|a| (a / n) as f32).collect()
}

/// How much the largest channel stands out: the largest per-channel statistic (max |x| or mean
/// |x|) divided by the median over channels.
pub fn outlier_ratio(absmax: &[f32]) -> f64 {
    if absmax.is_empty() {
        return 0.0;
    }
    let mut s = absmax.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let med = s[s.len() / 2] as f64;
    s[s.len() - 1] as f64 / med.max(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_cache_keeps_chosen_layers_and_delegates() {
        let shape = CacheShape {
            n_layer: 3,
            n_kv_head: 2,
            head_dim: 4,
        };
        let mut c = RecordingCache::new(shape, &[1]).unwrap();
        let s = c.add_sequence();
        let k: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..16).map(|i| -(i as f32)).collect();
        for layer in 0..3 {
            c.append(layer, s, &k, &v).unwrap();
        }
        assert_eq!(c.seq_len(1, s).unwrap(), 2);
        assert_eq!(c.recorded().len(), 1);
        assert_eq!(c.recorded()[0].k, k);
        assert_eq!(c.recorded()[0].v, v);
        let h1 = head_matrix(&k, 2, 4, 1);
        assert_eq!(h1, vec![4.0, 5.0, 6.0, 7.0, 12.0, 13.0, 14.0, 15.0]);
        assert_eq!(channel_absmax(&h1, 4), vec![12.0, 13.0, 14.0, 15.0]);
        assert_eq!(channel_absmean(&h1, 4), vec![8.0, 9.0, 10.0, 11.0]);
        assert!((outlier_ratio(&[1.0, 1.0, 1.0, 10.0]) - 10.0).abs() < 1e-9);
    }
}
