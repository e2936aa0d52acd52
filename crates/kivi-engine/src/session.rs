//! One sequence's life: chunked prefill, then sampled decode steps, over a model and its cache.

use std::time::Instant;

use kivi_core::{CacheConfig, CacheShape, KvCache, SeqId};
use kivi_model::llama::{Logits, Model};
use kivi_model::{ModelError, Result};

use crate::sampler::{Sampler, SamplingParams};

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Prompt tokens per forward pass during prefill (chunked prefill bounds activation memory).
    pub prefill_chunk: usize,
    /// Stop at the model's end-of-sequence tokens.
    pub stop_at_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            prefill_chunk: 512,
            stop_at_eos: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    ContextFull,
    /// The caller's token callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub stop: StopReason,
}

impl GenerationStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn decode_tok_s(&self) -> f64 {
        // The first generated token comes from the prefill's logits.
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// A sequence with its own KV cache; holds every token fed so far (for multi-turn chat).
pub struct Session<'m> {
    model: &'m Model,
    cache: Box<dyn KvCache>,
    seq: SeqId,
    tokens: Vec<u32>,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model, cache: &CacheConfig) -> Result<Self> {
        let c = &model.config;
        let shape = CacheShape {
            n_layer: c.n_layer,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
        };
        let mut cache = kivi_core::new_cache(cache, shape)?;
        let seq = cache.add_sequence();
        Ok(Session {
            model,
            cache,
            seq,
            tokens: Vec::new(),
        })
    }

    /// Tokens fed to the model so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn cache(&self) -> &dyn KvCache {
        self.cache.as_ref()
    }

    /// Forgets everything (new conversation) but keeps the cache's configuration.
    pub fn reset(&mut self) -> Result<()> {
        self.cache.remove_sequence(self.seq)?;
        self.seq = self.cache.add_sequence();
        self.tokens.clear();
        Ok(())
    }

    /// Feeds `tokens` in chunks of `chunk`; returns the logits of the last one.
    pub fn prefill(&mut self, tokens: &[u32], chunk: usize) -> Result<Vec<f32>> {
        self.check_room(tokens.len())?;
        let mut last = Vec::new();
        for piece in tokens.chunks(chunk.max(1)) {
            last = self
                .model
                .forward(piece, self.cache.as_mut(), self.seq, Logits::Last)?;
            self.tokens.extend_from_slice(piece);
        }
        Ok(last)
    }

    /// Feeds `tokens` and returns logits for every one of them (`[n][vocab]`), for evaluation.
    pub fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_room(tokens.len())?;
        let out = self
            .model
            .forward(tokens, self.cache.as_mut(), self.seq, Logits::All)?;
        self.tokens.extend_from_slice(tokens);
        Ok(out)
    }

    fn check_room(&self, n: usize) -> Result<()> {
        let context = self.model.config.context_len;
        if self.tokens.len() + n > context {
            return Err(ModelError::ContextOverflow {
                prompt: self.tokens.len() + n,
                context,
            });
        }
        Ok(())
    }

    /// Feeds `prompt`, then samples up to `max_tokens` tokens, calling `on_token` with each; the
    /// callback returns `false` to stop early. Returns the generated ids and timing.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        eos: &[u32],
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, GenerationStats)> {
        if prompt.is_empty() {
            return Err(ModelError::Tokenizer(
                "empty prompt: nothing to condition on".into(),
            ));
        }
        let context = self.model.config.context_len;
        let t0 = Instant::now();
        let mut logits = self.prefill(prompt, params.prefill_chunk)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut sampler = Sampler::new(params.sampling);
        let mut out = Vec::new();
        let stop = loop {
            if out.len() >= params.max_tokens {
                break StopReason::MaxTokens;
            }
            let next = sampler.sample(&logits);
            out.push(next);
            if params.stop_at_eos && eos.contains(&next) {
                break StopReason::Eos;
            }
            if !on_token(next) {
                break StopReason::Cancelled;
            }
            if out.len() >= params.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.tokens.len() >= context {
                break StopReason::ContextFull;
            }
            logits = self
                .model
                .forward(&[next], self.cache.as_mut(), self.seq, Logits::Last)?;
            self.tokens.push(next);
        };
        let stats = GenerationStats {
            prompt_tokens: prompt.len(),
            generated_tokens: out.len(),
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
            stop,
        };
        Ok((out, stats))
    }
}
