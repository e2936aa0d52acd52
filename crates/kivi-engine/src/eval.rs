//! Decode-mode quality evaluation: every configuration reads the same tokens in lockstep, and each
//! scored token's distribution is compared with the f16-cache baseline's.
//!
//! KIVI's prefill attention is exact, so a one-shot teacher-forced pass over a text cannot show
//! the quantization. Here the text streams through the cache in chunks of `chunk` tokens: each
//! chunk attends to its own tokens exactly and to everything older through the (quantized) cache.
//! `chunk = 1` is exact decode semantics; larger chunks are faster and slightly optimistic (up to
//! `chunk - 1` recent tokens are seen in full precision, on top of KIVI's own window).

use kivi_core::CacheConfig;
use kivi_model::llama::Model;
use kivi_model::Result;

use crate::kv_spec::format_kv;
use crate::sampler::argmax;
use crate::session::Session;

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

/// Scores `tokens[1..]` under every cache in `caches` (an f16 baseline runs first, always).
/// `progress` receives the number of tokens processed so far.
pub fn eval_ppl(
    model: &Model,
    tokens: &[u32],
    caches: &[CacheConfig],
    chunk: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<EvalResult>> {
    let vocab = model.config.vocab;
    let mut configs = vec![CacheConfig::F16];
    configs.extend(caches.iter().filter(|c| **c != CacheConfig::F16).cloned());
    let mut sessions = configs
        .iter()
        .map(|c| Session::new(model, c))
        .collect::<Result<Vec<_>>>()?;
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
    while start + 1 < tokens.len() {
        let end = (start + chunk.max(1)).min(tokens.len() - 1);
        let piece = &tokens[start..end];
        let all: Vec<Vec<f32>> = sessions
            .iter_mut()
            .map(|s| s.score(piece))
            .collect::<Result<_>>()?;
        for i in 0..piece.len() {
            let target = tokens[start + i + 1] as usize;
            let base = log_softmax(&all[0][i * vocab..(i + 1) * vocab]);
            let base_top = argmax(&all[0][i * vocab..(i + 1) * vocab]);
            for (c, logits) in all.iter().enumerate() {
                let row = &logits[i * vocab..(i + 1) * vocab];
                let lp = if c == 0 {
                    base.clone()
                } else {
                    log_softmax(row)
                };
                let a = &mut acc[c];
                a.nll -= lp[target];
                a.kl += base
                    .iter()
                    .zip(&lp)
                    .map(|(p, q)| p.exp() * (p - q))
                    .sum::<f64>();
                let top = argmax(row);
                a.top1 += usize::from(top == base_top);
                a.correct += usize::from(top as usize == target);
            }
        }
        scored += piece.len();
        start = end;
        progress(end);
    }
    let n = scored.max(1) as f64;
    let base_ppl = (acc[0].nll / n).exp();
    let c = &model.config;
    Ok(configs
        .iter()
        .zip(&acc)
        .zip(&sessions)
        .map(|((cfg, a), s)| {
            let ppl = (a.nll / n).exp();
            let mem = s.cache().memory();
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
                        let (kb, vb) = k.bits_per_element();
                        (kb + vb) / 2.0
                    }
                },
                effective_bits: mem.total_bytes() as f64 * 8.0 / elems.max(1.0),
                tokens_scored: scored,
            }
        })
        .collect())
}
