//! Continuous batching over one model and one paged KV cache.
//!
//! [`Engine`] is the thread-safe front (submit, cancel, stats, shutdown); its loop runs on a
//! rayon pool thread and drives a [`Scheduler`], which the benchmarks and tests can also drive
//! directly on the calling thread.
//!
//! Scheduling, one forward pass per [`Scheduler::step`]:
//! 1. Admission, first come first served: the oldest waiting request joins the running batch when
//!    the KV budget has room for its whole prompt (plus its fixed full-precision window) next to
//!    the running sequences' next step, and fewer than `max_running` run.
//! 2. Planning, oldest request first: every running sequence contributes its next chunk — one
//!    token when decoding, a prefill chunk otherwise — while `max_batch_tokens` allows. Before a
//!    chunk is taken, the pool blocks its append needs are checked against the budget; when
//!    they are missing, the newest running sequence is preempted (recompute: its blocks go back
//!    to the pool and it waits at the front of the queue with its prompt and generated tokens).
//!    So a step never fails for memory.
//! 3. One [`Runner::forward`] over the planned chunks, then sampling for the sequences that
//!    are caught up, events to the sinks, finished sequences freed. Only caught-up sequences ask
//!    for an output: greedy ones for a token (a GPU runner picks it on the device), sampled ones
//!    for their logits.
//!
//! The scheduler drives any [`Runner`] (a model bound to its KV cache): [`CpuRunner`] (the
//! default; [`Scheduler::new`]) or the GPU's (`kivi_cuda::GpuRunner`, [`Scheduler::with_runner`]).
//! So does [`Engine`]: [`Engine::start`] over the CPU model, [`Engine::start_with`] over the
//! runner a factory makes (`kivi serve --device cuda`: the GPU's).
//!
//! Greedy determinism: a sequence's token stream is `prompt ++ generated`, and the boundaries at
//! which it is fed to the model depend on that sequence alone: the prompt in chunks of
//! `prefill_chunk` tokens from position 0, then one token per step. Since a row's result does
//! not depend on the other rows of a batch (see `Model::forward_batch`), a sequence computes
//! exactly the same logits whatever runs beside it. A preempted sequence is recomputed with the
//! same boundaries (generated tokens replayed one per step, batched with the other decodes), so
//! its cache and logits after recompute are bit-identical to before, and its sampler (kept across
//! preemption) continues where it was: greedy and seeded sampling give the same tokens.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kivi_core::{CacheConfig, KvCache, SeqId};
use kivi_model::config::Config;
use kivi_model::llama::Model;
use kivi_model::runner::{CpuRunner, Runner, SampleSpec, StepItem, StepOutput, Want};

use rayon::prelude::*;

use crate::sampler::{Sampler, SamplingParams};

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub cache: CacheConfig,
    /// KV-cache memory budget in bytes (all layers and sequences); None = no limit.
    pub kv_memory_bytes: Option<u64>,
    /// Most sequences in the running batch.
    pub max_running: usize,
    /// Most requests waiting for admission; beyond it submit() returns SubmitError::QueueFull.
    pub max_waiting: usize,
    /// Most tokens in one forward pass (decode tokens + prefill chunk tokens): bounds activations.
    pub max_batch_tokens: usize,
    /// Prompt tokens per prefill chunk; 0 = `max_batch_tokens - max_running` (so a chunk always
    /// fits beside a full batch of decodes). Capped at that value.
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    /// f16 cache, no budget, 64 running, 256 waiting, 512 tokens per pass.
    fn default() -> Self {
        EngineConfig {
            cache: CacheConfig::F16,
            kv_memory_bytes: None,
            max_running: 64,
            max_waiting: 256,
            max_batch_tokens: 512,
            prefill_chunk: 0,
        }
    }
}

impl EngineConfig {
    /// `(max_running, prefill_chunk)` as the scheduler uses them: at least one of each, and a
    /// prefill chunk always fits beside a full batch of decode tokens.
    pub fn effective_limits(&self) -> (usize, usize) {
        let tokens = self.max_batch_tokens.max(1);
        let running = self.max_running.clamp(1, tokens.saturating_sub(1).max(1));
        let room = tokens.saturating_sub(running).max(1);
        let chunk = match self.prefill_chunk {
            0 => room,
            c => c.min(room),
        };
        (running, chunk)
    }
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Generated tokens at most (>= 1). Generation also stops when the context is full
    /// (FinishReason::Length).
    pub max_tokens: usize,
    /// Temperature/top_k/top_p/seed, per request.
    pub sampling: SamplingParams,
    /// Sampling one of these ends generation with FinishReason::Stop; it is NOT sent as a Token.
    pub stop_tokens: Vec<u32>,
}

/// Identifies a submitted request; increasing in submission order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// What a request's sink receives.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// One generated token.
    Token(u32),
    /// Always the last event of a request.
    Finished(Finished),
}

/// The end of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From submit() to the first Token (None if no token was generated).
    pub time_to_first_token: Option<Duration>,
    /// Times the sequence was preempted (recomputed) to free KV memory.
    pub preemptions: u32,
}

/// Why a request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was sampled (not sent).
    Stop,
    /// `max_tokens` reached, the context window is full, or the sequence alone outgrew the KV
    /// memory budget.
    Length,
    /// Cancelled by [`Engine::cancel`] or by the sink returning false.
    Cancelled,
    /// The model failed on this request (message for the user).
    Error(String),
}

/// Why [`Engine::submit`] refused a request. Display texts are user-facing messages.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    /// Empty prompt, prompt + 1 > context length, max_tokens == 0, prompt needs more KV memory
    /// than the whole budget, token id >= vocab.
    #[error("{0}")]
    Invalid(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// A snapshot of the engine's state and counters.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    /// Pool blocks held by sequences plus the sequences' fixed full-precision windows, in
    /// block units (rounded up).
    pub kv_blocks_used: usize,
    /// Budget in blocks; 0 when there is no budget.
    pub kv_blocks_total: usize,
    /// `KvCache::memory().total_bytes()`
    pub kv_bytes_used: u64,
    /// `KvCache::memory_reserved().total_bytes()`
    pub kv_bytes_reserved: u64,
    pub kv_bytes_budget: Option<u64>,
    /// Prompt tokens prefilled so far (all requests; recomputation not counted again).
    pub prompt_tokens_total: u64,
    pub generated_tokens_total: u64,
    pub preemptions_total: u64,
    pub requests_finished: u64,
}

/// Receives a request's events on the engine thread; returns false to cancel the request.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

// ------------------------------------------------------------------------------------------------
// Scheduler: the single-threaded core.

/// A request in the scheduler.
struct Seq {
    id: RequestId,
    prompt: Vec<u32>,
    max_tokens: usize,
    stop_tokens: Vec<u32>,
    /// Kept across preemption so seeded sampling continues where it was.
    sampler: Sampler,
    sink: Sink,
    generated: Vec<u32>,
    /// The cache sequence while admitted.
    cache_seq: Option<SeqId>,
    /// Tokens of `prompt ++ generated` stored in the cache.
    fed: usize,
    /// Prompt tokens counted in the stats already (recompute is not counted twice).
    prompt_counted: usize,
    submitted: Instant,
    first_token: Option<Duration>,
    preemptions: u32,
}

impl Seq {
    fn total_len(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }
    /// The next chunk to feed: `fed..end`.
    fn next_chunk_end(&self, chunk: usize) -> usize {
        let p = self.prompt.len();
        if self.fed < p {
            (self.fed + chunk).min(p)
        } else {
            self.fed + 1
        }
    }
}

/// Counters kept by the scheduler.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    prompt_tokens: u64,
    generated_tokens: u64,
    preemptions: u64,
    finished: u64,
}

/// The scheduling core: owns the runner (model + cache) and every request. Not thread-safe;
/// [`Engine`] wraps it. On the CPU it must be driven from a rayon pool thread for speed (the
/// model's kernels are rayon-parallel).
pub struct Scheduler<R: Runner = CpuRunner> {
    runner: R,
    config: EngineConfig,
    max_running: usize,
    prefill_chunk: usize,
    /// Front = next to admit; preempted sequences go back to the front.
    waiting: VecDeque<Seq>,
    /// Sorted by request id (arrival): the last one is preempted first.
    running: Vec<Seq>,
    counters: Counters,
    /// Peak of `memory_reserved().total_bytes()` seen after a step.
    peak_reserved: u64,
    /// Where [`Engine`] readers see the stats; refreshed before each Finished event so a
    /// client that got its answer reads the memory its request freed.
    published: Option<Arc<Mutex<EngineStats>>>,
}

/// Checks a request against the model and the budget; `prompt_bytes(n)` is the KV memory a
/// sequence of `n` tokens takes (pool blocks and fixed part).
fn validate(
    c: &Config,
    prompt_bytes: &dyn Fn(usize) -> u64,
    budget: Option<u64>,
    r: &Request,
) -> Result<(), SubmitError> {
    let bad = |m: String| Err(SubmitError::Invalid(m));
    if r.prompt.is_empty() {
        return bad("the prompt is empty".into());
    }
    if r.max_tokens == 0 {
        return bad("max_tokens must be at least 1".into());
    }
    if r.prompt.len() + 1 > c.context_len {
        return bad(format!(
            "the prompt has {} tokens; the context window holds {} (prompt + at least 1 generated)",
            r.prompt.len(),
            c.context_len
        ));
    }
    if let Some(&t) = r.prompt.iter().find(|&&t| t as usize >= c.vocab) {
        return bad(format!(
            "token id {t} is out of the vocabulary ({})",
            c.vocab
        ));
    }
    if let Some(b) = budget {
        let need = prompt_bytes(r.prompt.len());
        if need > b {
            return bad(format!(
                "the prompt needs {need} bytes of KV cache; the whole budget is {b} bytes"
            ));
        }
    }
    Ok(())
}

impl Scheduler<CpuRunner> {
    /// A scheduler over the CPU model with a new cache of `config.cache`.
    pub fn new(model: Arc<Model>, config: EngineConfig) -> kivi_model::Result<Scheduler> {
        let runner = CpuRunner::new(model, &config.cache)?;
        Ok(Scheduler::with_runner(runner, config))
    }

    pub fn model(&self) -> &Arc<Model> {
        self.runner.model()
    }

    pub fn cache(&self) -> &dyn KvCache {
        self.runner.cache()
    }
}

impl<R: Runner> Scheduler<R> {
    /// A scheduler over `runner` (its cache empty). `config.cache` is informational here: the
    /// runner's cache is what runs. `config.kv_memory_bytes` should not exceed the runner's
    /// pool when the pool is fixed (GPU).
    pub fn with_runner(runner: R, config: EngineConfig) -> Scheduler<R> {
        let (max_running, prefill_chunk) = config.effective_limits();
        Scheduler {
            runner,
            config,
            max_running,
            prefill_chunk,
            waiting: VecDeque::new(),
            running: Vec::new(),
            counters: Counters::default(),
            peak_reserved: 0,
            published: None,
        }
    }

    /// Keeps `stats` up to date whenever a request finishes (see [`Engine::stats`]).
    pub fn publish_stats_to(&mut self, stats: Arc<Mutex<EngineStats>>) {
        self.published = Some(stats);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The model and cache this scheduler drives.
    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// Gives the runner back (its cache empty once the scheduler is idle).
    pub fn into_runner(self) -> R {
        self.runner
    }

    /// Prompt tokens per prefill chunk (a run alone with `Session` must use the same).
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// Checks a request (see [`SubmitError::Invalid`]).
    pub fn validate(&self, request: &Request) -> Result<(), SubmitError> {
        let r = &self.runner;
        let bytes =
            |n: usize| r.blocks_for_tokens(n) as u64 * r.block_bytes() + r.seq_fixed_bytes();
        validate(
            r.model_config(),
            &bytes,
            self.config.kv_memory_bytes,
            request,
        )
    }

    /// Queues a validated request at the back.
    pub fn add(&mut self, id: RequestId, request: Request, sink: Sink, submitted: Instant) {
        self.waiting.push_back(Seq {
            id,
            sampler: Sampler::new(request.sampling),
            prompt: request.prompt,
            max_tokens: request.max_tokens,
            stop_tokens: request.stop_tokens,
            sink,
            generated: Vec::new(),
            cache_seq: None,
            fed: 0,
            prompt_counted: 0,
            submitted,
            first_token: None,
            preemptions: 0,
        });
    }

    /// Cancels a waiting or running request; false if it is not here (finished or unknown).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            let s = self.waiting.remove(i).expect("index from position");
            self.finish(s, FinishReason::Cancelled);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let s = self.running.remove(i);
            self.finish(s, FinishReason::Cancelled);
            return true;
        }
        false
    }

    /// No request waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn n_running(&self) -> usize {
        self.running.len()
    }

    /// Peak `memory_reserved()` of the cache seen at the end of a step, in bytes.
    pub fn peak_kv_reserved(&self) -> u64 {
        self.peak_reserved
    }

    pub fn stats(&self) -> EngineStats {
        let cache = &self.runner;
        let bb = cache.block_bytes().max(1);
        let fixed = cache.n_sequences() as u64 * cache.seq_fixed_bytes();
        EngineStats {
            waiting: self.waiting.len(),
            running: self.running.len(),
            kv_blocks_used: cache.blocks_in_use() + fixed.div_ceil(bb) as usize,
            kv_blocks_total: self.config.kv_memory_bytes.map_or(0, |b| (b / bb) as usize),
            kv_bytes_used: cache.memory().total_bytes(),
            kv_bytes_reserved: cache.memory_reserved().total_bytes(),
            kv_bytes_budget: self.config.kv_memory_bytes,
            prompt_tokens_total: self.counters.prompt_tokens,
            generated_tokens_total: self.counters.generated_tokens,
            preemptions_total: self.counters.preemptions,
            requests_finished: self.counters.finished,
        }
    }

    /// Bytes the budget still allows (u64::MAX without a budget).
    fn free_bytes(&self) -> u64 {
        let Some(budget) = self.config.kv_memory_bytes else {
            return u64::MAX;
        };
        let c = &self.runner;
        let used = c.blocks_in_use() as u64 * c.block_bytes()
            + c.n_sequences() as u64 * c.seq_fixed_bytes();
        budget.saturating_sub(used)
    }

    /// Keeps the pool's free list inside the budget: reserved memory (blocks held and free,
    /// windows of live sequences) never exceeds it.
    fn trim_pool(&mut self) {
        if self.config.kv_memory_bytes.is_some() {
            let keep = (self.free_bytes() / self.runner.block_bytes().max(1)) as usize;
            if self.runner.free_blocks() > keep {
                self.runner.trim_free_blocks(keep);
            }
        }
    }

    /// Bytes of pool blocks `seq`'s next chunk (`n` tokens) takes.
    fn chunk_bytes(&self, s: &Seq, n: usize) -> u64 {
        let seq = s.cache_seq.expect("running sequences are in the cache");
        let blocks = self.runner.blocks_needed(seq, n).unwrap_or(usize::MAX / 2);
        blocks as u64 * self.runner.block_bytes()
    }

    /// Sends the final event and frees the sequence's blocks.
    fn finish(&mut self, mut s: Seq, reason: FinishReason) {
        if let Some(seq) = s.cache_seq.take() {
            let _ = self.runner.remove_sequence(seq);
        }
        self.counters.finished += 1;
        if let Some(out) = &self.published {
            *out.lock().unwrap_or_else(|e| e.into_inner()) = self.stats();
        }
        (s.sink)(Event::Finished(Finished {
            reason,
            prompt_tokens: s.prompt.len(),
            generated_tokens: s.generated.len(),
            time_to_first_token: s.first_token,
            preemptions: s.preemptions,
        }));
    }

    /// Frees a running sequence's blocks and puts it at the front of the queue.
    fn preempt(&mut self, idx: usize) {
        let mut s = self.running.remove(idx);
        if let Some(seq) = s.cache_seq.take() {
            let _ = self.runner.remove_sequence(seq);
        }
        s.fed = 0;
        s.preemptions += 1;
        self.counters.preemptions += 1;
        self.waiting.push_front(s);
    }

    /// Admits waiting requests (also done by [`Scheduler::step`]), oldest first, while the budget has room for their prompt next to
    /// the running sequences' next step.
    pub fn admit(&mut self) {
        let (bb, fixed) = (self.runner.block_bytes(), self.runner.seq_fixed_bytes());
        // What the running sequences take in their next step (decode or prefill chunk).
        let mut reserved: u64 = self
            .running
            .iter()
            .map(|s| self.chunk_bytes(s, s.next_chunk_end(self.prefill_chunk) - s.fed))
            .sum();
        while self.running.len() < self.max_running {
            let Some(s) = self.waiting.front() else { break };
            // Recompute needs everything fed before (prompt and generated tokens but the last).
            let n = s.total_len().max(s.prompt.len());
            let need = self.runner.blocks_for_tokens(n) as u64 * bb + fixed;
            // Alone, it always goes in (a prompt that fits was checked at submit; a sequence
            // that outgrew the whole budget ends with Length in `step`): progress is certain.
            if !self.running.is_empty() && need.saturating_add(reserved) > self.free_bytes() {
                break;
            }
            if let Some(max) = self.runner.max_sequences() {
                if self.runner.n_sequences() >= max {
                    break;
                }
            }
            // A cache with no free sequence slot: wait for one to finish.
            let Ok(seq) = self.runner.add_sequence() else {
                break;
            };
            reserved += need;
            let mut s = self.waiting.pop_front().expect("front exists");
            s.cache_seq = Some(seq);
            let at = self.running.partition_point(|r| r.id < s.id);
            self.running.insert(at, s);
        }
    }

    /// Runs one forward pass over the running batch (admitting and preempting first). Returns
    /// false when there was nothing to do.
    pub fn step(&mut self) -> bool {
        self.admit();
        self.trim_pool();
        if self.running.is_empty() {
            return false;
        }
        // Plan: (index in running, end of chunk), oldest first.
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut tokens_left = self.config.max_batch_tokens.max(1);
        let mut free = self.free_bytes();
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let end = s.next_chunk_end(self.prefill_chunk);
            let n = end - s.fed;
            if n > tokens_left {
                i += 1;
                continue;
            }
            let bytes = self.chunk_bytes(s, n);
            if bytes > free {
                // Preempt the newest sequence (possibly this one) and retry.
                let victim = self.running.len() - 1;
                if victim == i && i == 0 {
                    // Alone and still too big: it can never grow inside the budget.
                    let s = self.running.remove(0);
                    self.finish(s, FinishReason::Length);
                    continue;
                }
                let victim_bytes = self.cache_bytes_of(victim);
                self.preempt(victim);
                free += victim_bytes;
                continue;
            }
            free -= bytes;
            tokens_left -= n;
            plan.push((i, end));
            i += 1;
        }
        if plan.is_empty() {
            return !self.is_idle();
        }
        // A runner that samples on its device gets each sampled item's parameters and the
        // uniform draw its seeded sampler makes for this token (drawn here, once).
        let on_device = self.runner.samples_on_device();
        let draws: Vec<Option<f32>> = plan
            .iter()
            .map(|&(i, end)| {
                let s = &mut self.running[i];
                (on_device && end >= s.total_len() && !s.sampler.is_greedy())
                    .then(|| s.sampler.draw())
            })
            .collect();
        let items: Vec<StepItem<'_>> = plan
            .iter()
            .zip(&draws)
            .map(|(&(i, end), draw)| {
                let s = &self.running[i];
                let p = s.prompt.len();
                let tokens = if end <= p {
                    &s.prompt[s.fed..end]
                } else {
                    &s.generated[s.fed - p..end - p]
                };
                // Caught up after this chunk: the next token is due.
                let params = s.sampler.params();
                let want = if end < s.total_len() {
                    Want::Nothing
                } else if s.sampler.is_greedy() {
                    Want::Greedy
                } else if let Some(u) = *draw {
                    Want::Sample(SampleSpec {
                        temperature: params.temperature,
                        top_k: params.top_k,
                        top_p: params.top_p,
                        u,
                    })
                } else {
                    Want::Logits
                };
                StepItem {
                    seq: s.cache_seq.expect("running sequences are in the cache"),
                    tokens,
                    want,
                }
            })
            .collect();
        let result = self.runner.forward(&items);
        drop(items);
        match result {
            Ok(logits) => self.after_forward(&plan, logits, &draws),
            Err(e) => {
                // Every sequence of the batch may be half-written: end them all with the error.
                let msg = e.to_string();
                let mut idx: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                idx.sort_unstable();
                for &i in idx.iter().rev() {
                    let s = self.running.remove(i);
                    self.finish(s, FinishReason::Error(msg.clone()));
                }
            }
        }
        self.trim_pool();
        let reserved = self.runner.memory_reserved().total_bytes();
        self.peak_reserved = self.peak_reserved.max(reserved);
        true
    }

    /// Pool and window bytes `running[i]` holds (what preempting it gives back to the budget).
    fn cache_bytes_of(&self, i: usize) -> u64 {
        let c = &self.runner;
        let seq = self.running[i]
            .cache_seq
            .expect("running sequences are in the cache");
        let n = c.seq_len(seq).unwrap_or(0);
        c.blocks_for_tokens(n) as u64 * c.block_bytes() + c.seq_fixed_bytes()
    }

    /// `draws`: the uniform draw already made for each plan entry sampled on the device (a
    /// runner that answers with the logits row instead is sampled here with that draw).
    fn after_forward(
        &mut self,
        plan: &[(usize, usize)],
        outputs: Vec<StepOutput>,
        draws: &[Option<f32>],
    ) {
        let context = self.runner.model_config().context_len;
        // Sampled tokens first, all sequences in parallel: a GPU pass at batch B brings B rows
        // of logits, and each sequence has its own sampler (and seeded RNG), so the tokens do
        // not depend on the order.
        let mut sampled: Vec<Option<u32>> = vec![None; self.running.len()];
        {
            type Row<'a> = Option<(&'a [f32], Option<f32>)>;
            let mut row_of: Vec<Row<'_>> = vec![None; self.running.len()];
            for ((&(i, end), out), &draw) in plan.iter().zip(&outputs).zip(draws) {
                if let StepOutput::Logits(l) = out {
                    if end >= self.running[i].total_len() {
                        row_of[i] = Some((l, draw));
                    }
                }
            }
            /// A sampler, its row, the draw made for it (if any), where the token goes.
            type Job<'a> = (&'a mut Sampler, &'a [f32], Option<f32>, &'a mut Option<u32>);
            let mut jobs: Vec<Job<'_>> = self
                .running
                .iter_mut()
                .zip(&row_of)
                .zip(sampled.iter_mut())
                .filter_map(|((s, row), out)| row.map(|(l, d)| (&mut s.sampler, l, d, out)))
                .collect();
            jobs.par_iter_mut().for_each(|(sampler, l, draw, out)| {
                **out = Some(match *draw {
                    Some(u) => sampler.sample_with(l, u),
                    None => sampler.sample(l),
                })
            });
        }
        let mut done: Vec<(usize, FinishReason)> = Vec::new();
        for (&(i, end), out) in plan.iter().zip(outputs) {
            let s = &mut self.running[i];
            let p = s.prompt.len();
            if s.prompt_counted < end.min(p) {
                self.counters.prompt_tokens += (end.min(p) - s.prompt_counted) as u64;
                s.prompt_counted = end.min(p);
            }
            s.fed = end;
            if s.fed < s.total_len() {
                continue; // prefill or recompute: no new token yet
            }
            let next = match out {
                StepOutput::Token(t) => t,
                StepOutput::Logits(_) => sampled[i].expect("sampled above"),
                StepOutput::Nothing => {
                    done.push((
                        i,
                        FinishReason::Error("the model returned no output".into()),
                    ));
                    continue;
                }
            };
            if s.stop_tokens.contains(&next) {
                done.push((i, FinishReason::Stop));
                continue;
            }
            s.generated.push(next);
            self.counters.generated_tokens += 1;
            if s.first_token.is_none() {
                s.first_token = Some(s.submitted.elapsed());
            }
            if !(s.sink)(Event::Token(next)) {
                done.push((i, FinishReason::Cancelled));
            } else if s.generated.len() >= s.max_tokens || s.fed >= context {
                done.push((i, FinishReason::Length));
            }
        }
        done.sort_unstable_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, reason) in done {
            let s = self.running.remove(i);
            if reason == FinishReason::Cancelled {
                // The sink said the client is gone: no further events, not even Finished.
                let mut s = s;
                if let Some(seq) = s.cache_seq.take() {
                    let _ = self.runner.remove_sequence(seq);
                }
                self.counters.finished += 1;
            } else {
                self.finish(s, reason);
            }
        }
    }

    /// Ends every request with `reason` (after an internal failure), leaving an empty cache.
    fn abort_all(&mut self, reason: FinishReason) {
        let all: Vec<Seq> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        for s in all {
            self.finish(s, reason.clone());
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Engine: the thread-safe front.

/// Requests and commands handed from callers to the loop.
#[derive(Default)]
struct Inbox {
    new: Vec<(RequestId, Request, Sink, Instant)>,
    cancels: Vec<RequestId>,
    shutting_down: bool,
    stopped: bool,
}

struct Shared {
    model_config: Config,
    config: EngineConfig,
    /// KV bytes of a sequence of `n` tokens (pool blocks and fixed part), `n = 0..context`, for
    /// submit-time checks; empty without a budget.
    seq_bytes: Vec<u64>,
    inbox: Mutex<Inbox>,
    /// Signals the loop (new work, shutdown) and shutdown() (stopped).
    wake: Condvar,
    stats: Arc<Mutex<EngineStats>>,
    next_id: AtomicU64,
}

impl Shared {
    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        // A poisoned lock only means a panic elsewhere; the inbox is still consistent.
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn stats(&self) -> MutexGuard<'_, EngineStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops the loop when the last [`Engine`] handle is dropped.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let mut inbox = self.shared.inbox();
        inbox.shutting_down = true;
        self.shared.wake.notify_all();
    }
}

thread_local! {
    static ON_ENGINE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Continuous-batching engine. Cheap to clone (Arc inside); Send + Sync. The scheduler loop runs
/// on a rayon pool thread (rayon::spawn): running the model off the pool makes decode 2.5x slower.
#[derive(Clone)]
pub struct Engine {
    handle: Arc<Handle>,
}

impl Engine {
    /// Starts the loop on the global rayon pool, over the CPU model with a new cache of
    /// `config.cache`.
    pub fn start(model: Arc<Model>, config: EngineConfig) -> kivi_model::Result<Engine> {
        let cache = config.cache;
        Engine::start_with(move || CpuRunner::new(model.clone(), &cache), config)
    }

    /// Starts the loop on the global rayon pool over the runner `make_runner` returns (e.g. the
    /// GPU's). It is called once here and again after an internal failure, once the failed
    /// runner is dropped (a GPU pool may hold most of the device's memory); if that call
    /// fails the engine stops. `config.kv_memory_bytes` should not exceed a fixed pool's size.
    pub fn start_with<R, F>(mut make_runner: F, config: EngineConfig) -> kivi_model::Result<Engine>
    where
        R: Runner + Send + 'static,
        F: FnMut() -> kivi_model::Result<R> + Send + 'static,
    {
        let runner = make_runner()?;
        let model_config = runner.model_config().clone();
        let seq_bytes = match config.kv_memory_bytes {
            None => Vec::new(),
            Some(_) => (0..model_config.context_len)
                .map(|n| {
                    runner.blocks_for_tokens(n) as u64 * runner.block_bytes()
                        + runner.seq_fixed_bytes()
                })
                .collect(),
        };
        let mut scheduler = Scheduler::with_runner(runner, config.clone());
        let stats = Arc::new(Mutex::new(scheduler.stats()));
        scheduler.publish_stats_to(stats.clone());
        let shared = Arc::new(Shared {
            model_config,
            stats,
            config,
            seq_bytes,
            inbox: Mutex::new(Inbox::default()),
            wake: Condvar::new(),
            next_id: AtomicU64::new(0),
        });
        let loop_shared = shared.clone();
        rayon::spawn(move || {
            ON_ENGINE_THREAD.with(|f| f.set(true));
            run_loop(&loop_shared, scheduler, &mut make_runner);
            ON_ENGINE_THREAD.with(|f| f.set(false));
        });
        Ok(Engine {
            handle: Arc::new(Handle { shared }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// Queues a request. `sink` is called on the engine thread with every event, in order; it must
    /// not block (push into a channel). When it returns false (the client went away) the request
    /// is cancelled at once and its KV blocks are freed; no further events are sent.
    pub fn submit(&self, request: Request, sink: Sink) -> Result<RequestId, SubmitError> {
        let sh = self.shared();
        let bytes = |n: usize| sh.seq_bytes.get(n).copied().unwrap_or(u64::MAX);
        validate(
            &sh.model_config,
            &bytes,
            sh.config.kv_memory_bytes,
            &request,
        )?;
        let mut inbox = sh.inbox();
        if inbox.shutting_down {
            return Err(SubmitError::ShuttingDown);
        }
        let waiting = inbox.new.len() + sh.stats().waiting;
        if waiting >= sh.config.max_waiting {
            return Err(SubmitError::QueueFull(waiting));
        }
        let id = RequestId(sh.next_id.fetch_add(1, Ordering::Relaxed));
        inbox.new.push((id, request, sink, Instant::now()));
        sh.wake.notify_all();
        Ok(id)
    }

    /// Cancels a waiting or running request (no-op if finished); its sink gets
    /// Finished{reason: Cancelled}.
    pub fn cancel(&self, id: RequestId) {
        let sh = self.shared();
        sh.inbox().cancels.push(id);
        sh.wake.notify_all();
    }

    pub fn stats(&self) -> EngineStats {
        let sh = self.shared();
        let mut s = sh.stats().clone();
        s.waiting += sh.inbox().new.len();
        s
    }

    /// The configuration of the model the engine runs (context length, vocabulary).
    pub fn model_config(&self) -> &Config {
        &self.shared().model_config
    }

    /// Stops accepting (submit -> ShuttingDown), lets every accepted request finish, then stops
    /// the loop and returns. Idempotent. Called from a sink (the engine thread) it only stops
    /// accepting and returns at once.
    pub fn shutdown(&self) {
        let sh = self.shared();
        let mut inbox = sh.inbox();
        inbox.shutting_down = true;
        sh.wake.notify_all();
        if ON_ENGINE_THREAD.with(|f| f.get()) {
            return;
        }
        while !inbox.stopped {
            inbox = sh.wake.wait(inbox).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn run_loop<R: Runner>(
    sh: &Shared,
    mut sched: Scheduler<R>,
    make_runner: &mut dyn FnMut() -> kivi_model::Result<R>,
) {
    loop {
        {
            let mut inbox = sh.inbox();
            loop {
                for (id, req, sink, at) in inbox.new.drain(..) {
                    sched.add(id, req, sink, at);
                }
                for id in inbox.cancels.drain(..) {
                    sched.cancel(id);
                }
                // Admit now so that submit()'s queue-full check sees the exact queue.
                sched.admit();
                *sh.stats() = sched.stats();
                if !sched.is_idle() {
                    break;
                }
                *sh.stats() = sched.stats();
                if inbox.shutting_down {
                    inbox.stopped = true;
                    sh.wake.notify_all();
                    return;
                }
                inbox = sh.wake.wait(inbox).unwrap_or_else(|e| e.into_inner());
            }
        }
        // A panic (a bug, or a panicking sink) must not hang every client: end all requests.
        let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| sched.step()));
        if stepped.is_err() {
            let reason = FinishReason::Error("internal error in the engine".into());
            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| sched.abort_all(reason)));
            // The failed runner goes first: a GPU pool may hold most of the device's memory.
            drop(sched);
            sched = match make_runner() {
                Ok(fresh) => {
                    let mut fresh = Scheduler::with_runner(fresh, sh.config.clone());
                    fresh.publish_stats_to(sh.stats.clone());
                    fresh
                }
                Err(_) => {
                    sh.inbox().stopped = true;
                    sh.wake.notify_all();
                    return;
                }
            };
        }
        *sh.stats() = sched.stats();
    }
}
