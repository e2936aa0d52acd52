//! KIVI core: asymmetric 2/4/8-bit group quantization, the KIVI KV cache (keys per-channel,
//! values per-token, a full-precision window of recent tokens) and attention that reads the
//! packed cache directly.
//!
//! This crate knows nothing about models. A model hands it post-RoPE keys and values per layer
//! and asks for attention of new query tokens over everything the sequence has seen.
//!
//! Layout conventions (row-major, innermost last):
//! - `q`:   `[n_new][n_head][head_dim]` f32
//! - `k`,`v`: `[n_new][n_kv_head][head_dim]` f32
//! - `out`: `[n_new][n_head][head_dim]` f32
//!
//! Query head `h` reads KV head `h / (n_head / n_kv_head)` (GQA/MQA, same grouping as HF's
//! `repeat_kv`), without copying K/V.

pub mod attn;
pub mod cache;
pub mod config;
pub mod error;
pub mod quant;

pub use attn::Isa;
pub use cache::{new_cache, F16Cache, KiviCache, MixedLayerCache};
pub use config::{Axis, CacheConfig, CacheShape, KiviConfig};
pub use error::{Error, Result};

/// Identifies one sequence inside a [`KvCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Exact bytes held by a cache (or one sequence of it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Packed quantization codes (u32 words).
    pub code_bytes: u64,
    /// f16 scales.
    pub scale_bytes: u64,
    /// f16 minimums (zero points).
    pub min_bytes: u64,
    /// Full-precision (f16) tokens: the KIVI residual window, sink tokens, or the whole f16 cache.
    pub full_precision_bytes: u64,
    /// Tokens stored, summed over layers and sequences (a 10-token sequence in a 30-layer cache
    /// counts 300): `tokens * 2 * n_kv_head * head_dim` elements are cached.
    pub tokens: u64,
}

impl MemoryUsage {
    pub fn total_bytes(&self) -> u64 {
        self.code_bytes + self.scale_bytes + self.min_bytes + self.full_precision_bytes
    }
}

/// One sequence's attention request inside a batched call.
pub struct AttendItem<'a> {
    pub seq: SeqId,
    /// `[n_new][n_head][head_dim]`
    pub q: &'a [f32],
    /// `[n_new][n_kv_head][head_dim]`, post-RoPE; attended exactly (full precision).
    pub k_new: &'a [f32],
    /// `[n_new][n_kv_head][head_dim]`
    pub v_new: &'a [f32],
    /// `[n_new][n_head][head_dim]`
    pub out: &'a mut [f32],
}

/// A per-layer KV cache for many sequences. Both the f16 baseline and KIVI implement it, so a
/// model is written once over `dyn KvCache`.
///
/// Semantics of one step with `n_new` tokens (prefill, chunked prefill, decode, speculation):
/// 1. [`KvCache::attend`]: query token `i` (position `seq_len + i`) attends causally over every
///    token already in the cache (read in its stored form: quantized or full precision) plus new
///    tokens `0..=i` in exact precision. Scale `1/sqrt(head_dim)`, f32 accumulation, stable softmax.
/// 2. [`KvCache::append`]: the new tokens are stored, and the KIVI streaming policy runs
///    (key flush in whole R-token chunks, value FIFO of R tokens).
///
/// This reproduces the reference implementation exactly for one-token decode (the new token is
/// attended in full precision before it can be quantized) and for prefill (exact attention),
/// and extends it to any number of tokens per step.
pub trait KvCache: Send + Sync {
    fn shape(&self) -> CacheShape;
    fn config(&self) -> &CacheConfig;

    /// Registers a new, empty sequence.
    fn add_sequence(&mut self) -> SeqId;
    /// Drops a sequence and releases its storage.
    fn remove_sequence(&mut self, seq: SeqId) -> Result<()>;
    /// Tokens stored for `seq` in `layer`.
    fn seq_len(&self, layer: usize, seq: SeqId) -> Result<usize>;

    /// Attention for the new tokens of one sequence (see the trait docs). Does not modify the cache.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: usize,
        n_head: usize,
        seq: SeqId,
        q: &[f32],
        k_new: &[f32],
        v_new: &[f32],
        out: &mut [f32],
    ) -> Result<()>;

    /// Attention for several sequences at once (continuous batching). Implementations spread the
    /// work over threads; the default runs them one after the other.
    fn attend_batch(
        &self,
        layer: usize,
        n_head: usize,
        items: &mut [AttendItem<'_>],
    ) -> Result<()> {
        for it in items.iter_mut() {
            self.attend(layer, n_head, it.seq, it.q, it.k_new, it.v_new, it.out)?;
        }
        Ok(())
    }

    /// Stores `n_new = k.len() / (n_kv_head * head_dim)` tokens for `seq` in `layer`.
    fn append(&mut self, layer: usize, seq: SeqId, k: &[f32], v: &[f32]) -> Result<()>;

    /// Exact bytes held by the whole cache, all layers and sequences: storage used by the stored
    /// tokens (codes, scales and mins of quantized tokens at word/group granularity, f16 rows),
    /// excluding unused slack of preallocated blocks (see [`KvCache::memory_reserved`]).
    fn memory(&self) -> MemoryUsage;

    /// Bytes reserved, including the unused part of preallocated blocks and freed blocks kept
    /// for reuse. `tokens` is the same as in [`KvCache::memory`].
    fn memory_reserved(&self) -> MemoryUsage {
        self.memory()
    }

    // ---- Paging: what a scheduler needs to keep the cache inside a memory budget ----
    //
    // Storage of a sequence = pool blocks (one layer each, all the same size) + a fixed part
    // outside the pool (KIVI's full-precision windows and sink tokens, reserved at full size).
    // `blocks_in_use() * block_bytes() + sequences * seq_fixed_bytes()` bounds
    // `memory_reserved()` minus the free list, and appends never take more blocks than
    // `blocks_needed` said.

    /// Bytes of one pool block.
    fn block_bytes(&self) -> u64;
    /// Pool blocks held by sequences (all layers).
    fn blocks_in_use(&self) -> usize;
    /// Pool blocks kept for reuse (released by removed sequences).
    fn free_blocks(&self) -> usize;
    /// Pool blocks (all layers) a sequence holding `n_tokens` tokens needs.
    fn blocks_for_tokens(&self, n_tokens: usize) -> usize;
    /// Pool blocks (all layers) that appending `n_new` tokens to `seq` will take from the pool.
    fn blocks_needed(&self, seq: SeqId, n_new: usize) -> Result<usize> {
        let n = self.seq_len(0, seq)?;
        Ok(self.blocks_for_tokens(n + n_new) - self.blocks_for_tokens(n))
    }
    /// Bytes one sequence holds outside pool blocks at most, all layers (KIVI: the f16 key and
    /// value windows and sink tokens, reserved at their full size on first use; f16: 0).
    fn seq_fixed_bytes(&self) -> u64;
    /// Sequences currently registered.
    fn n_sequences(&self) -> usize;
    /// Frees pool blocks kept for reuse beyond `keep` (a budget keeps the free list inside it).
    fn trim_free_blocks(&mut self, keep: usize);

    /// What the cache chose at run time, for reports (e.g. which layers got 4-bit keys).
    fn runtime_choices(&self) -> Option<String> {
        None
    }
}
