//! `kivi eval ppl`: perplexity, ΔPPL, KL from the f16 cache, top-1 agreement and bits per element
//! for many cache configurations over the same tokens, in one run.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kivi_core::CacheConfig;
use kivi_engine::eval::eval_ppl_windows;
use kivi_engine::kv_spec::parse_kv;

use crate::ModelArgs;

#[derive(Args)]
pub struct EvalPplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to score.
    #[arg(long)]
    pub file: PathBuf,
    /// Caches to evaluate, comma-separated (f16 always runs as the baseline).
    #[arg(long = "caches", default_value = "kivi4,k4v2,kivi2")]
    pub caches: String,
    /// Tokens per forward pass: 1 = exact decode semantics; larger is faster (see docs).
    #[arg(long, default_value_t = 16)]
    pub chunk: usize,
    /// Score at most this many tokens.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Split the tokens into this many consecutive windows, each its own sequence, scored
    /// together in one batch (faster per token; each window starts without context).
    #[arg(long, default_value_t = 1)]
    pub windows: usize,
    /// Start the text at the first occurrence of this string (e.g. "Chapter 1").
    #[arg(long)]
    pub start_at: Option<String>,
    /// Write the results as JSON (one object per configuration).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: EvalPplArgs) -> Result<()> {
    let caches: Vec<CacheConfig> = a
        .caches
        .split(',')
        .map(|s| parse_kv(s).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    if a.chunk == 0 || a.max_tokens < 2 || a.windows == 0 {
        bail!("--chunk and --windows must be >= 1 and --max-tokens >= 2");
    }
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let text = match &a.start_at {
        Some(s) => {
            let i = text
                .find(s.as_str())
                .with_context(|| format!("`{s}` not found in {}", a.file.display()))?;
            &text[i..]
        }
        None => &text[..],
    };
    let m = a.model.load()?;
    let mut tokens = m.tokenizer.encode(text, false)?;
    tokens.truncate(
        a.max_tokens
            .min(m.model.config.context_len.saturating_mul(a.windows)),
    );
    if tokens.len() < 2 {
        bail!("{} has fewer than 2 tokens", a.file.display());
    }
    let bar = indicatif::ProgressBar::new(tokens.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} tokens, {per_sec}, eta {eta}",
        )
        .expect("static template"),
    );
    let results = eval_ppl_windows(&m.model, &tokens, &caches, a.chunk, a.windows, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    println!(
        "{}: {} tokens scored in {} window(s), chunk {}, model {}",
        a.file.display(),
        results[0].tokens_scored,
        a.windows,
        a.chunk,
        m.name
    );
    println!("| cache | bits/elem | eff. bits | PPL | ΔPPL | mean KL | top-1 agree | accuracy |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.2} | {:.2} | {:.3} | {:+.2} % | {:.4} | {:.1} % | {:.1} % |",
            r.kv,
            r.bits_per_element,
            r.effective_bits,
            r.ppl,
            r.delta_ppl_pct,
            r.kl,
            100.0 * r.top1,
            100.0 * r.accuracy
        );
    }
    for r in results.iter().filter(|r| r.choices.is_some()) {
        println!("{}: {}", r.kv, r.choices.as_deref().unwrap_or_default());
    }
    if let Some(out) = &a.out {
        let json: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "kv": r.kv, "ppl": r.ppl, "delta_ppl_pct": r.delta_ppl_pct, "kl": r.kl,
                    "top1": r.top1, "accuracy": r.accuracy, "bits_per_element": r.bits_per_element,
                    "effective_bits": r.effective_bits, "tokens": r.tokens_scored, "chunk": a.chunk,
                    "choices": r.choices,
                })
            })
            .collect();
        std::fs::write(out, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
