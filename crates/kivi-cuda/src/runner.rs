//! [`GpuRunner`]: the GPU model bound to its [`GpuCache`], for `kivi_engine`'s continuous-batching
//! scheduler (`kivi_model::runner::Runner`).
//!
//! One forward pass per scheduler step. Greedy items get their token from the argmax kernel
//! (one launch for all rows; only the ids cross to the host); sampled items get their logits
//! row copied back. Sequences are cache slots: `SeqId(slot)`.

use std::time::{Duration, Instant};

use kivi_core::{CacheConfig, MemoryUsage, SeqId};
use kivi_model::backend::Backend;
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

/// The GPU model and its cache.
pub struct GpuRunner<'m> {
    model: &'m CudaModel,
    cache: GpuCache,
    times: RunnerTimes,
    /// Largest device memory in use (the driver's view: `total - free` of cuMemGetInfo),
    /// sampled while a step's activations are still held.
    peak_device_used: u64,
    /// Sampled items get their token from the GPU (`sample.cu`; the default) or from the host
    /// sampler on a logits row copied back (`KIVI_CUDA_DEVICE_SAMPLING=0` or
    /// [`GpuRunner::set_device_sampling`]).
    device_sampling: bool,
}

impl<'m> GpuRunner<'m> {
    /// Binds `model` to `cache` (empty; the model's shape).
    pub fn new(model: &'m CudaModel, cache: GpuCache) -> GpuRunner<'m> {
        GpuRunner {
            model,
            cache,
            times: RunnerTimes::default(),
            peak_device_used: 0,
            device_sampling: crate::model::device_sampling_default(),
        }
    }

    /// Samples on the GPU (true) or copies sampled items' logits rows back (false).
    pub fn set_device_sampling(&mut self, on: bool) {
        self.device_sampling = on;
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
                    Want::Greedy | Want::Logits | Want::Sample(_) => Logits::Last,
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
        // Rows sampled here, and rows to sample on the host: gathered on the device, copied
        // back in one transfer.
        let (mut on_device, mut wanted) = (Vec::new(), Vec::new());
        let mut row = 0;
        for (it, &r) in items.iter().zip(&rows) {
            match it.want {
                _ if r == 0 => {}
                Want::Sample(spec) if self.device_sampling => on_device.push((row, spec)),
                Want::Logits | Want::Sample(_) => wanted.push(row..row + 1),
                Want::Nothing | Want::Greedy => {}
            }
            row += r;
        }
        let mut device_tokens = self
            .model
            .backend
            .sample_rows(&logits, vocab, &on_device)?
            .into_iter();
        let mut sampled = if wanted.is_empty() {
            Vec::new()
        } else {
            let picked = self.model.backend.gather_rows(&logits, vocab, &wanted)?;
            self.model.backend.to_host(&picked)?
        }
        .into_iter();
        let mut out = Vec::with_capacity(items.len());
        let mut row = 0;
        for (it, &r) in items.iter().zip(&rows) {
            out.push(match (it.want, r) {
                (Want::Nothing, _) | (_, 0) => StepOutput::Nothing,
                (Want::Greedy, _) => StepOutput::Token(greedy[row]),
                (Want::Sample(_), _) if self.device_sampling => {
                    StepOutput::Token(device_tokens.next().expect("one per sampled row"))
                }
                (Want::Logits | Want::Sample(_), _) => {
                    StepOutput::Logits(sampled.by_ref().take(vocab).collect())
                }
            });
            row += r;
        }
        if greedy.is_empty() {
            // Nothing above waited for the GPU when no row was copied back.
            self.cache.gpu().synchronize().map_err(err)?;
        }
        self.times.total += t0.elapsed();
        self.model.backend.profiler().end_step();
        Ok(out)
    }

    fn samples_on_device(&self) -> bool {
        self.device_sampling
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
        Some(self.cache.max_seqs())
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
    fn blocks_needed(&self, seq: SeqId, n_new: usize) -> R<usize> {
        self.cache
            .blocks_needed(Self::slot(seq), n_new)
            .map_err(err)
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
