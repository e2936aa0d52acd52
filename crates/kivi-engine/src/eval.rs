//! Decode-mode quality evaluation: every configuration reads the same tokens in lockstep, and each
//! scored token's distribution is compared with the f16-cache baseline's.
//!
//! KIVI's prefill attention is exact, so a one-shot teacher-forced pass over a text cannot show
//! the quantization. Here the text streams through the cache in chunks of `chunk` tokens: each
//! chunk attends to its own tokens exactly and to everything older through the (quantized) cache.
//! `chunk = 1` is exact decode semantics; larger chunks are faster and slightly optimistic (up to
//! `chunk - 1` recent tokens are seen in full precision, on top of KIVI's own window).

use kivi_core::{CacheConfig, CacheShape, KvCache, SeqId};
use kivi_model::llama::{BatchItem, Logits, Model};
use kivi_model::{ModelError, Result};

use crate::kv_spec::format_kv;
use crate::sampler::argmax;

#[derive(Clone, Debug, Default)]
pub struct EvalResult {
    pub kv: String,
    pub ppl: f64,
    /// Relative change of perplexity against the f16 cache, in percent.
    pub delta_ppl_pct: f64,
    /// Mean KL(p_f16 || p_config) over scored tokens, in nats.
    pub kl: f64,
    /// Share of scored tokens whose argmax equals the f16 cache's.
    pub top1: f64,
    /// Share of scored tokens whose argmax equals the next token of the text.
    pub accuracy: f64,
    /// Stored bits per quantized element (codes + f16 scale + f16 min); 16 for f16.
    pub bits_per_element: f64,
    /// Measured cache bytes × 8 / (tokens × layers × 2 × kv_dim), residual window included.
    pub effective_bits: f64,
    pub tokens_scored: usize,
    /// What the cache chose at run time ([`KvCache::runtime_choices`]).
    pub choices: Option<String>,
}

struct Accum {
    nll: f64,
    kl: f64,
    top1: usize,
    correct: usize,
}

/// Log-softmax in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// Scores `tokens[1..]` under every cache in `caches` (an f16 baseline runs first, always), as one
/// stream. Same as [`eval_ppl_windows`] with one window.
pub fn eval_ppl(
    model: &Model,
    tokens: &[u32],
    caches: &[CacheConfig],
    chunk: usize,
    progress: impl FnMut(usize),
) -> Result<Vec<EvalResult>> {
    eval_ppl_windows(model, tokens, caches, chunk, 1, progress)
}

/// Splits `tokens` into `windows` consecutive windows of equal length (the remainder is dropped)
/// and scores every window as its own sequence, all windows in one batch per step (the weights are
/// read once for all of them). Each window starts with an empty cache, so its first tokens have
/// little context: with W windows, W - 1 more tokens are scored with a short context than in one
/// stream. `progress` receives the number of tokens processed so far.
pub fn eval_ppl_windows(
    model: &Model,
    tokens: &[u32],
    caches: &[CacheConfig],
    chunk: usize,
    windows: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<EvalResult>> {
    let c = &model.config;
    let vocab = c.vocab;
    let windows = windows.max(1);
    let win = tokens.len() / windows;
    if win < 2 {
        return Err(ModelError::Tokenizer(format!(
            "{} tokens cannot make {windows} windows of at least 2 tokens",
            tokens.len()
        )));
    }
    if win > c.context_len {
        return Err(ModelError::ContextOverflow {
            prompt: win,
            context: c.context_len,
        });
    }
    let texts: Vec<&[u32]> = tokens.chunks_exact(win).take(windows).collect();
    let mut configs = vec![CacheConfig::F16];
    configs.extend(caches.iter().filter(|c| **c != CacheConfig::F16).cloned());
    let shape = CacheShape {
        n_layer: c.n_layer,
        n_kv_head: c.n_kv_head,
        head_dim: c.head_dim,
    };
    let mut kv: Vec<Box<dyn KvCache>> = configs
        .iter()
        .map(|cfg| kivi_core::new_cache(cfg, shape))
        .collect::<std::result::Result<_, _>>()?;
    let seqs: Vec<Vec<SeqId>> = kv
        .iter_mut()
        .map(|cache| (0..texts.len()).map(|_| cache.add_sequence()).collect())
        .collect();
    let mut acc: Vec<Accum> = configs
        .iter()
        .map(|_| Accum {
            nll: 0.0,
            kl: 0.0,
            top1: 0,
            correct: 0,
        })
        .collect();
    let mut scored = 0;
    let mut start = 0;
    while start + 1 < win {
        let end = (start + chunk.max(1)).min(win - 1);
        // all[config][window] = logits [end - start][vocab]
        let mut all: Vec<Vec<Vec<f32>>> = Vec::with_capacity(configs.len());
        for (cache, ids) in kv.iter_mut().zip(&seqs) {
            let items: Vec<BatchItem> = texts
                .iter()
                .zip(ids)
                .map(|(t, &seq)| BatchItem {
                    seq,
                    tokens: &t[start..end],
                    logits: Logits::All,
                })
                .collect();
            all.push(model.forward_batch(&items, cache.as_mut())?);
        }
        for (w, text) in texts.iter().enumerate() {
            for i in 0..end - start {
                let target = text[start + i + 1] as usize;
                let row = |cfg: usize| &all[cfg][w][i * vocab..(i + 1) * vocab];
                let base = log_softmax(row(0));
                let base_top = argmax(row(0));
                for (cfg, a) in acc.iter_mut().enumerate() {
                    let lp = if cfg == 0 {
                        base.clone()
                    } else {
                        log_softmax(row(cfg))
                    };
                    a.nll -= lp[target];
                    a.kl += base
                        .iter()
                        .zip(&lp)
                        .map(|(p, q)| p.exp() * (p - q))
                        .sum::<f64>();
                    let top = argmax(row(cfg));
                    a.top1 += usize::from(top == base_top);
                    a.correct += usize::from(top as usize == target);
                }
            }
        }
        scored += (end - start) * texts.len();
        start = end;
        progress(end * texts.len());
    }
    let n = scored.max(1) as f64;
    let base_ppl = (acc[0].nll / n).exp();
    Ok(configs
        .iter()
        .zip(&acc)
        .zip(&kv)
        .map(|((cfg, a), cache)| {
            let ppl = (a.nll / n).exp();
            let mem = cache.memory();
            let elems = mem.tokens as f64 * (2 * c.kv_dim()) as f64;
            EvalResult {
                kv: format_kv(cfg),
                ppl,
                delta_ppl_pct: 100.0 * (ppl / base_ppl - 1.0),
                kl: a.kl / n,
                top1: a.top1 as f64 / n,
                accuracy: a.correct as f64 / n,
                bits_per_element: match cfg {
                    CacheConfig::F16 => 16.0,
                    CacheConfig::Kivi(k) => {
                        let (kb, vb) = k.bits_per_element(c.n_layer);
                        (kb + vb) / 2.0
                    }
                },
                effective_bits: mem.total_bytes() as f64 * 8.0 / elems.max(1.0),
                tokens_scored: scored,
                choices: cache.runtime_choices(),
            }
        })
        .collect())
}
