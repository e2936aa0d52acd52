//! A model bound to its KV cache: what a continuous-batching scheduler drives.
//!
//! The scheduler (`kivi_engine::engine::Scheduler`) only needs to run a batch of sequences'
//! new tokens, get back each caught-up sequence's next token (greedy) or logits (sampled), add
//! and remove sequences, and ask the cache's paging questions to stay inside a memory budget.
//! [`Runner`] is that surface. [`CpuRunner`] is the CPU model with any [`KvCache`];
//! `kivi_cuda::GpuRunner` is the GPU model with its cache, where greedy picks stay on the device
//! (only token ids cross to the host) and only sampled rows' logits are copied back.

use std::sync::Arc;

use kivi_core::{CacheConfig, CacheShape, KvCache, MemoryUsage, SeqId};

use crate::config::Config;
use crate::llama::{BatchItem, Logits, Model};
use crate::Result;

/// What a batch item needs from its last row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Want {
    /// Nothing (a prefill chunk that is not the prompt's last): no logits are computed.
    Nothing,
    /// The index of the largest logit (greedy decoding).
    Greedy,
    /// The logits row itself (sampling).
    Logits,
    /// A token sampled where the logits are (only asked of a runner whose
    /// [`Runner::samples_on_device`] is true); a runner may answer with the logits row instead.
    Sample(SampleSpec),
}

/// Sampling parameters of one item and the uniform draw in [0, 1) its seeded sampler made for
/// this token: the softmax at `temperature` over the `top_k` largest logits (0: all), cut to the
/// fewest highest-probability tokens whose mass reaches `top_p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleSpec {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub u: f32,
}

/// One sequence's new tokens in [`Runner::forward`].
#[derive(Clone, Copy, Debug)]
pub struct StepItem<'a> {
    pub seq: SeqId,
    /// Tokens at positions `seq_len(seq)..`.
    pub tokens: &'a [u32],
    pub want: Want,
}

/// What [`Runner::forward`] returns for an item.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOutput {
    Nothing,
    /// The greedy token. A runner may answer a [`Want::Greedy`] item with its logits instead
    /// (the CPU runner does: the caller's sampler then takes the argmax).
    Token(u32),
    Logits(Vec<f32>),
}

/// A model and its KV cache, driven one batched forward pass at a time.
///
/// The paging queries have [`KvCache`]'s names and meanings: storage of a sequence = pool
/// blocks (all the same size) + a fixed part outside the pool.
pub trait Runner {
    /// The model's configuration (context length, vocabulary, shapes).
    fn model_config(&self) -> &Config;
    fn cache_config(&self) -> &CacheConfig;

    /// Runs every item's tokens through the model in one pass (appending them to the cache)
    /// and returns one output per item, in order. On error the cache is unchanged when the
    /// inputs were bad (checked first); after a device failure the items' sequences may be
    /// half-written.
    fn forward(&mut self, items: &[StepItem<'_>]) -> Result<Vec<StepOutput>>;

    /// Whether [`Want::Sample`] items get their token from the runner (a GPU sampling next to
    /// the logits) rather than their logits row.
    fn samples_on_device(&self) -> bool {
        false
    }

    /// Registers a new, empty sequence; fails when the cache holds no more sequences.
    fn add_sequence(&mut self) -> Result<SeqId>;
    fn remove_sequence(&mut self, seq: SeqId) -> Result<()>;
    /// Tokens stored for `seq`.
    fn seq_len(&self, seq: SeqId) -> Result<usize>;
    /// Most sequences the cache holds at once (None: no limit but memory).
    fn max_sequences(&self) -> Option<usize>;

    fn block_bytes(&self) -> u64;
    fn blocks_in_use(&self) -> usize;
    fn free_blocks(&self) -> usize;
    fn blocks_for_tokens(&self, n_tokens: usize) -> usize;
    fn blocks_needed(&self, seq: SeqId, n_new: usize) -> Result<usize>;
    fn seq_fixed_bytes(&self) -> u64;
    fn n_sequences(&self) -> usize;
    fn trim_free_blocks(&mut self, keep: usize);
    /// Bytes the stored tokens take.
    fn memory(&self) -> MemoryUsage;
    /// Bytes reserved (held blocks whole, free blocks kept, windows).
    fn memory_reserved(&self) -> MemoryUsage;
}

/// The cache shape a model needs.
pub fn cache_shape(c: &Config) -> CacheShape {
    CacheShape {
        n_layer: c.n_layer,
        n_kv_head: c.n_kv_head,
        head_dim: c.head_dim,
    }
}

/// The CPU model with any [`KvCache`] (f16 or KIVI). Outputs logits for every item that wants
/// something, greedy included: the host has them anyway, and the caller's argmax keeps its
/// tie-breaking.
pub struct CpuRunner {
    model: Arc<Model>,
    cache: Box<dyn KvCache>,
}

impl CpuRunner {
    /// The model with a new, empty cache of `config`.
    pub fn new(model: Arc<Model>, config: &CacheConfig) -> Result<CpuRunner> {
        let cache = kivi_core::new_cache(config, cache_shape(&model.config))?;
        Ok(CpuRunner { model, cache })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn cache(&self) -> &dyn KvCache {
        self.cache.as_ref()
    }
}

impl Runner for CpuRunner {
    fn model_config(&self) -> &Config {
        &self.model.config
    }
    fn cache_config(&self) -> &CacheConfig {
        self.cache.config()
    }

    fn forward(&mut self, items: &[StepItem<'_>]) -> Result<Vec<StepOutput>> {
        let batch: Vec<BatchItem<'_>> = items
            .iter()
            .map(|it| BatchItem {
                seq: it.seq,
                tokens: it.tokens,
                logits: match it.want {
                    Want::Nothing => Logits::None,
                    Want::Greedy | Want::Logits | Want::Sample(_) => Logits::Last,
                },
            })
            .collect();
        let logits = self.model.forward_batch(&batch, self.cache.as_mut())?;
        Ok(items
            .iter()
            .zip(logits)
            .map(|(it, l)| match it.want {
                Want::Nothing => StepOutput::Nothing,
                Want::Greedy | Want::Logits | Want::Sample(_) => StepOutput::Logits(l),
            })
            .collect())
    }

    fn add_sequence(&mut self) -> Result<SeqId> {
        Ok(self.cache.add_sequence())
    }
    fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        Ok(self.cache.remove_sequence(seq)?)
    }
    fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.cache.seq_len(0, seq)?)
    }
    fn max_sequences(&self) -> Option<usize> {
        None
    }
    fn block_bytes(&self) -> u64 {
        self.cache.block_bytes()
    }
    fn blocks_in_use(&self) -> usize {
        self.cache.blocks_in_use()
    }
    fn free_blocks(&self) -> usize {
        self.cache.free_blocks()
    }
    fn blocks_for_tokens(&self, n_tokens: usize) -> usize {
        self.cache.blocks_for_tokens(n_tokens)
    }
    fn blocks_needed(&self, seq: SeqId, n_new: usize) -> Result<usize> {
        Ok(self.cache.blocks_needed(seq, n_new)?)
    }
    fn seq_fixed_bytes(&self) -> u64 {
        self.cache.seq_fixed_bytes()
    }
    fn n_sequences(&self) -> usize {
        self.cache.n_sequences()
    }
    fn trim_free_blocks(&mut self, keep: usize) {
        self.cache.trim_free_blocks(keep)
    }
    fn memory(&self) -> MemoryUsage {
        self.cache.memory()
    }
    fn memory_reserved(&self) -> MemoryUsage {
        self.cache.memory_reserved()
    }
}
