//! [`GpuRunner`]: the GPU model bound to its [`GpuCache`], for `kivi_engine`'s continuous-batching
//! scheduler (`kivi_model::runner::Runner`).
//!
//! One forward pass per scheduler step. Greedy items get their token from the argmax kernel
//! (one launch for all rows; only the ids cross to the host); sampled items get their logits
//! row copied back. Sequences are cache slots: `SeqId(slot)`.

use std::time::{Duration, Instant};

use kivi_core::{CacheConfig, MemoryUsage, SeqId};
use kivi_model::config::Config;
use kivi_model::llama::{BatchItem, Logits};
use kivi_model::runner::{Runner, StepItem, StepOutput, Want};
use kivi_model::ModelError;

use crate::cache::GpuCache;
use crate::model::CudaModel;

type R<T> = kivi_model::Result<T>;

fn err(e: crate::Error) -> ModelError {
    ModelError::Backend(e.to_string())
}

/// Where the time of [`Runner::forward`] went, summed over calls.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunnerTimes {
    pub steps: u64,
    /// Host time to build the step and queue every kernel (the GPU runs behind it).
    pub launch: Duration,
    /// Whole calls, until the tokens / logits are on the host (the GPU caught up).
    pub total: Duration,
    /// Tokens fed (prefill and decode).
    pub tokens: u64,
}

/// Interim paging view of the slot cache (one block = one slot of `capacity` tokens), until the
/// paged pool of `GpuCache` lands.
struct SlotPaging {
    slots: usize,
    capacity: usize,
    slot_bytes: u64,
    /// Average bytes per stored token, all layers (codes, scales, mins; f16 rows).
    token_bytes: u64,
}

impl SlotPaging {
    fn new(c: &Config, cache: &GpuCache, slots: usize, capacity: usize) -> SlotPaging {
        let (l, hkv, d) = (c.n_layer as u64, c.n_kv_head as u64, c.head_dim as u64);
        let cap = capacity.div_ceil(32) as u64 * 32;
        let (token_bytes, window) = match cache.config() {
            CacheConfig::F16 => (l * hkv * d * 4, 0),
            CacheConfig::Kivi(kc) => {
                let g = kc.group_size as u64;
                let per = d * (kc.k_bits + kc.v_bits) as u64 / 8 + d * 4 / g + (d / g) * 4;
                let w = kc.residual_len.max(kc.group_size) as u64;
                (l * hkv * per, l * hkv * w * d * 4)
            }
        };
        SlotPaging {
            slots,
            capacity,
            slot_bytes: cap * token_bytes + window,
            token_bytes,
        }
    }
}

/// The GPU model and its cache.
pub struct GpuRunner<'m> {
    model: &'m CudaModel,
    cache: GpuCache,
    paging: SlotPaging,
    times: RunnerTimes,
    /// Largest device memory in use (the driver's view: `total - free` of cuMemGetInfo),
    /// sampled while a step's activations are still held.
    peak_device_used: u64,
}

impl<'m> GpuRunner<'m> {
    /// Binds `model` to `cache` (empty, made by `GpuCache::new(.., slots, capacity)`; the
    /// model's shape).
    pub fn new(
        model: &'m CudaModel,
        cache: GpuCache,
        slots: usize,
        capacity: usize,
    ) -> GpuRunner<'m> {
        GpuRunner {
            model,
            paging: SlotPaging::new(&model.config, &cache, slots, capacity),
            cache,
            times: RunnerTimes::default(),
            peak_device_used: 0,
        }
    }

    pub fn cache(&self) -> &GpuCache {
        &self.cache
    }

    pub fn model(&self) -> &'m CudaModel {
        self.model
    }

    pub fn times(&self) -> RunnerTimes {
        self.times
    }

    /// Peak of the device memory in use seen during steps, in bytes (the driver's view: every
    /// allocation of this process and the CUDA context, the weights and the pool included).
    pub fn peak_device_used(&self) -> u64 {
        self.peak_device_used
    }

    fn sample_device_memory(&mut self) {
        if let Ok((free, total)) = self.cache.gpu().context().mem_get_info() {
            self.peak_device_used = self.peak_device_used.max((total - free) as u64);
        }
    }

    fn slot(seq: SeqId) -> usize {
        seq.0 as usize
    }
}

impl Runner for GpuRunner<'_> {
    fn model_config(&self) -> &Config {
        &self.model.config
    }

    fn cache_config(&self) -> &CacheConfig {
        self.cache.config()
    }

    fn forward(&mut self, items: &[StepItem<'_>]) -> R<Vec<StepOutput>> {
        let t0 = Instant::now();
        let batch: Vec<BatchItem<'_>> = items
            .iter()
            .map(|it| BatchItem {
                seq: it.seq,
                tokens: it.tokens,
                logits: match it.want {
                    Want::Nothing => Logits::None,
                    Want::Greedy | Want::Logits => Logits::Last,
                },
            })
            .collect();
        let result = self.model.forward_rows(&batch, &mut self.cache)?;
        self.times.launch += t0.elapsed();
        self.times.steps += 1;
        self.times.tokens += items.iter().map(|it| it.tokens.len() as u64).sum::<u64>();
        let Some((logits, rows)) = result else {
            return Ok(vec![StepOutput::Nothing; items.len()]);
        };
        self.sample_device_memory();
        let vocab = self.model.config.vocab;
        let m: usize = rows.iter().sum();
        let greedy = if items.iter().any(|it| it.want == Want::Greedy) {
            self.model.backend.argmax(&logits, m, vocab)?
        } else {
            Vec::new()
        };
        let stream = self.cache.gpu().stream().clone();
        let mut out = Vec::with_capacity(items.len());
        let mut row = 0;
        for (it, &r) in items.iter().zip(&rows) {
            out.push(match (it.want, r) {
                (Want::Nothing, _) | (_, 0) => StepOutput::Nothing,
                (Want::Greedy, _) => StepOutput::Token(greedy[row]),
                (Want::Logits, _) => StepOutput::Logits(
                    stream
                        .clone_dtoh(&logits.slice(row * vocab..(row + 1) * vocab))
                        .map_err(|e| err(e.into()))?,
                ),
            });
            row += r;
        }
        if greedy.is_empty() {
            // Nothing above waited for the GPU when no row was copied back.
            self.cache.gpu().synchronize().map_err(err)?;
        }
        self.times.total += t0.elapsed();
        Ok(out)
    }

    fn add_sequence(&mut self) -> R<SeqId> {
        Ok(SeqId(self.cache.add_sequence().map_err(err)? as u64))
    }

    fn remove_sequence(&mut self, seq: SeqId) -> R<()> {
        self.cache.remove_sequence(Self::slot(seq)).map_err(err)
    }

    fn seq_len(&self, seq: SeqId) -> R<usize> {
        self.cache
            .seq_len(Self::slot(seq))
            .ok_or(ModelError::Cache(kivi_core::Error::UnknownSequence(seq)))
    }

    fn max_sequences(&self) -> Option<usize> {
        Some(self.paging.slots)
    }

    fn block_bytes(&self) -> u64 {
        self.paging.slot_bytes
    }
    fn blocks_in_use(&self) -> usize {
        // A slot counts once it holds a token (blocks_needed charges the first token).
        (0..self.paging.slots)
            .filter(|&s| self.cache.seq_len(s).is_some_and(|n| n > 0))
            .count()
    }
    fn free_blocks(&self) -> usize {
        0
    }
    fn blocks_for_tokens(&self, n_tokens: usize) -> usize {
        (n_tokens > 0) as usize
    }
    fn blocks_needed(&self, seq: SeqId, n_new: usize) -> R<usize> {
        let n = self.seq_len(seq)?;
        if n + n_new > self.paging.capacity {
            return Ok(usize::MAX / 4);
        }
        Ok(self.blocks_for_tokens(n + n_new) - self.blocks_for_tokens(n))
    }
    fn seq_fixed_bytes(&self) -> u64 {
        0
    }
    fn n_sequences(&self) -> usize {
        (0..self.paging.slots)
            .filter(|&s| self.cache.seq_len(s).is_some())
            .count()
    }
    fn trim_free_blocks(&mut self, _keep: usize) {}
    fn memory(&self) -> MemoryUsage {
        let tokens: usize = (0..self.paging.slots)
            .filter_map(|s| self.cache.seq_len(s))
            .sum();
        let c = &self.model.config;
        MemoryUsage {
            full_precision_bytes: tokens as u64 * self.paging.token_bytes,
            tokens: (tokens * c.n_layer) as u64,
            ..Default::default()
        }
    }
    fn memory_reserved(&self) -> MemoryUsage {
        MemoryUsage {
            full_precision_bytes: self.blocks_in_use() as u64 * self.paging.slot_bytes,
            ..self.memory()
        }
    }
}
