//! `kivi eval passkey`: passkey retrieval accuracy per (length, depth) for several caches, with a
//! heatmap PNG. See `kivi_engine::passkey` for the prompt and for why the haystack is prefilled in
//! chunks.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kivi_core::CacheConfig;
use kivi_engine::kv_spec::{format_kv, parse_kv};
use kivi_engine::passkey::{
    answer, build_prompt, find_key, needle_text, random_key, PasskeyPrompt, INTRO, QUESTION,
};
use kivi_engine::plot::{red_green, text_width, Canvas, BLACK, GREY, WHITE};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::ModelArgs;

#[derive(Args)]
pub struct EvalPasskeyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Caches to evaluate, comma-separated (f16 always runs first as the baseline).
    #[arg(long = "caches", default_value = "kivi4,kivi2")]
    pub caches: String,
    /// Directory of haystack `.txt` files (default: $KIVI_CACHE/data/paulgraham, from
    /// scripts/fetch-data.sh).
    #[arg(long)]
    pub haystack: Option<PathBuf>,
    /// Prompt lengths in tokens, comma-separated (`k` suffix = ×1024).
    #[arg(long, default_value = "1k,2k,4k")]
    pub lengths: String,
    /// Instead of --lengths: 1K, 2K, 4K, ... doubling up to this length (included).
    #[arg(long)]
    pub max_len: Option<String>,
    /// Needle depths in percent of the haystack, comma-separated.
    #[arg(long, default_value = "0,25,50,75,100")]
    pub depths: String,
    /// Prompts (fresh random keys) per (length, depth).
    #[arg(long, default_value_t = 1)]
    pub trials: usize,
    /// Seed for the keys (the same prompts are used for every cache).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Haystack tokens per prefill forward pass; chunks read older chunks from the cache.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Tokens to decode greedily after the question.
    #[arg(long, default_value_t = 8)]
    pub new_tokens: usize,
    /// Write every trial as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write a heatmap (rows: lengths, columns: depths, one panel per cache) as PNG.
    #[arg(long)]
    pub png: Option<PathBuf>,
}

fn parse_len(s: &str) -> Result<usize> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mul) = match s.strip_suffix('k') {
        Some(n) => (n, 1024),
        None => (s.as_str(), 1),
    };
    let n: usize = num
        .parse()
        .with_context(|| format!("`{s}` is not a length (e.g. 2048 or 2k)"))?;
    if n == 0 {
        bail!("lengths must be positive");
    }
    Ok(n * mul)
}

fn lengths(a: &EvalPasskeyArgs) -> Result<Vec<usize>> {
    if let Some(max) = &a.max_len {
        let max = parse_len(max)?;
        let mut v = Vec::new();
        let mut l = 1024;
        while l < max {
            v.push(l);
            l *= 2;
        }
        v.push(max);
        return Ok(v);
    }
    a.lengths.split(',').map(parse_len).collect()
}

fn depths(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|d| {
            let p: f64 = d
                .trim()
                .parse()
                .with_context(|| format!("`{d}` is not a depth in percent"))?;
            if !(0.0..=100.0).contains(&p) {
                bail!("depth {p} is outside 0..100 (percent)");
            }
            Ok(p / 100.0)
        })
        .collect()
}

/// The haystack: every `.txt` file of `dir`, sorted by name, joined with blank lines, until about
/// `chars` characters.
fn read_haystack(dir: &std::path::Path, chars: usize) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| {
            format!(
                "reading the haystack directory {} (run scripts/fetch-data.sh)",
                dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "no .txt files in {} (run scripts/fetch-data.sh)",
            dir.display()
        );
    }
    let mut text = String::new();
    for f in &files {
        let t = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        text.push_str(t.trim());
        text.push_str("\n\n");
        if text.len() >= chars {
            break;
        }
    }
    Ok(text)
}

struct Trial {
    kv: String,
    len: usize,
    depth: f64,
    trial: usize,
    key: String,
    needle_at: usize,
    answer: String,
    correct: bool,
}

pub fn run(a: EvalPasskeyArgs) -> Result<()> {
    let caches: Vec<CacheConfig> = a
        .caches
        .split(',')
        .map(|s| parse_kv(s).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    let mut configs = vec![CacheConfig::F16];
    configs.extend(caches.into_iter().filter(|c| *c != CacheConfig::F16));
    let lengths = lengths(&a)?;
    let depths = depths(&a.depths)?;
    if a.trials == 0 || a.chunk == 0 || a.new_tokens == 0 {
        bail!("--trials, --chunk and --new-tokens must be at least 1");
    }
    let dir = match &a.haystack {
        Some(d) => d.clone(),
        None => crate::fetch::cache_dir()?.join("data").join("paulgraham"),
    };
    let max_len = *lengths.iter().max().expect("at least one length");
    let hay = read_haystack(&dir, max_len * 8)?;
    let m = a.model.load()?;
    let context = m.model.config.context_len;
    if max_len > context {
        bail!("length {max_len} is beyond the model's context window of {context} tokens");
    }
    let tok = &m.tokenizer;
    let intro = tok.encode(INTRO, true)?;
    let question = tok.encode(QUESTION, false)?;
    let filler = tok.encode(&hay, false)?;
    // A cut before token i starts a sentence if token i-1 ends one.
    let mut starts = vec![true; filler.len() + 1];
    for (i, t) in filler.iter().enumerate() {
        let s = tok.decode(&[*t])?;
        let s = s.trim_end_matches(' ');
        starts[i + 1] = s.ends_with(['.', '!', '?', '\n']);
    }

    // The same prompts for every cache.
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut prompts: Vec<(usize, usize, PasskeyPrompt)> = Vec::new(); // (len, trial, prompt)
    for &len in &lengths {
        for &depth in &depths {
            for trial in 0..a.trials {
                let key = random_key(&mut rng);
                let needle = tok.encode(&needle_text(&key), false)?;
                let (ctx, at) = build_prompt(
                    &intro,
                    &filler,
                    Some(&starts),
                    &needle,
                    &question,
                    len,
                    depth,
                )
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("building the length-{len} prompt"))?;
                let p = PasskeyPrompt {
                    context: ctx,
                    question: question.clone(),
                    needle_start: at,
                    needle_len: needle.len(),
                    key,
                    depth,
                };
                prompts.push((len, trial, p));
            }
        }
    }

    let total: u64 =
        (prompts.iter().map(|(l, _, _)| *l as u64).sum::<u64>()) * configs.len() as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} tokens, {per_sec}, eta {eta} {msg}",
        )
        .expect("static template"),
    );
    let eos = tok.eos_ids().to_vec();
    // Long runs (hours on a CPU) report each prompt when no progress bar can be drawn, and keep
    // the JSON current, so an interrupted run keeps what it measured.
    let log_lines = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let n_prompts = prompts.len() * configs.len();
    let mut trials = Vec::new();
    for cfg in &configs {
        let kv = format_kv(cfg);
        for (len, trial, p) in &prompts {
            bar.set_message(format!("{kv} len {len} depth {:.0}%", p.depth * 100.0));
            let ids = answer(&m.model, cfg, p, a.chunk, a.new_tokens, &eos)?;
            let text = tok.decode(&ids)?;
            trials.push(Trial {
                kv: kv.clone(),
                len: *len,
                depth: p.depth,
                trial: *trial,
                key: p.key.clone(),
                needle_at: p.needle_start,
                correct: find_key(&text, &p.key),
                answer: text,
            });
            bar.inc(*len as u64);
            if log_lines {
                let t = trials.last().expect("pushed above");
                eprintln!(
                    "[{}/{n_prompts}] {kv} length {len} depth {:.0} %: {}",
                    trials.len(),
                    p.depth * 100.0,
                    if t.correct { "found" } else { "missed" }
                );
            }
            if let Some(out) = &a.out {
                write_json(out, &trials, a.chunk, &m.name)?;
            }
        }
    }
    bar.finish_and_clear();

    let names: Vec<String> = configs.iter().map(format_kv).collect();
    let acc = |kv: &str, len: usize, depth: f64| -> f64 {
        let c: Vec<&Trial> = trials
            .iter()
            .filter(|t| t.kv == kv && t.len == len && t.depth == depth)
            .collect();
        c.iter().filter(|t| t.correct).count() as f64 / c.len().max(1) as f64
    };
    println!(
        "passkey retrieval, {} ({} trial(s) per cell, prefill chunk {}, haystack {}): accuracy %",
        m.name,
        a.trials,
        a.chunk,
        dir.display()
    );
    let header: String = depths
        .iter()
        .map(|d| format!(" depth {:.0} % |", d * 100.0))
        .collect();
    println!("| cache | length |{header} mean |");
    println!("|---|---|{}---|", "---|".repeat(depths.len()));
    for kv in &names {
        for &len in &lengths {
            let cells: Vec<f64> = depths.iter().map(|&d| acc(kv, len, d)).collect();
            let row: String = cells
                .iter()
                .map(|c| format!(" {:.0} |", 100.0 * c))
                .collect();
            let mean = cells.iter().sum::<f64>() / cells.len() as f64;
            println!("| {kv} | {len} |{row} {:.0} |", 100.0 * mean);
        }
    }
    for kv in &names {
        let all: Vec<&Trial> = trials.iter().filter(|t| &t.kv == kv).collect();
        let ok = all.iter().filter(|t| t.correct).count();
        println!(
            "{kv}: {ok}/{} correct ({:.0} %)",
            all.len(),
            100.0 * ok as f64 / all.len() as f64
        );
    }

    if let Some(out) = &a.out {
        write_json(out, &trials, a.chunk, &m.name)?;
    }
    if let Some(png) = &a.png {
        let grid: Vec<Vec<Vec<f64>>> = names
            .iter()
            .map(|kv| {
                lengths
                    .iter()
                    .map(|&l| depths.iter().map(|&d| acc(kv, l, d)).collect())
                    .collect()
            })
            .collect();
        heatmap(&names, &lengths, &depths, &grid, &m.name)
            .save_png(png)
            .with_context(|| format!("writing {}", png.display()))?;
    }
    Ok(())
}

/// Every trial so far, one object each.
fn write_json(out: &std::path::Path, trials: &[Trial], chunk: usize, model: &str) -> Result<()> {
    let json: Vec<serde_json::Value> = trials
        .iter()
        .map(|t| {
            serde_json::json!({
                "kv": t.kv, "len": t.len, "depth": t.depth, "trial": t.trial, "key": t.key,
                "needle_at": t.needle_at, "answer": t.answer, "correct": t.correct,
                "chunk": chunk, "model": model,
            })
        })
        .collect();
    std::fs::write(out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))
}

/// One panel per cache: rows are lengths (top: shortest), columns depths; cells coloured red (0 %)
/// to green (100 %) and labelled with the accuracy.
fn heatmap(
    names: &[String],
    lengths: &[usize],
    depths: &[f64],
    grid: &[Vec<Vec<f64>>],
    model: &str,
) -> Canvas {
    let (cw, ch, s) = (56usize, 30usize, 2usize);
    let left = 70;
    let top = 60;
    let panel_w = cw * depths.len();
    let panel_gap = 30;
    let width = left + names.len() * (panel_w + panel_gap) + 10;
    let height = top + ch * lengths.len() + 50;
    let title = format!("PASSKEY ACCURACY (%), {model}");
    let mut c = Canvas::new(width.max(text_width(&title, s) + 20), height, WHITE);
    c.text(10, 8, &title, s, BLACK);
    c.text(10, top - 14, "LEN", 1, GREY);
    for (r, &len) in lengths.iter().enumerate() {
        c.text(10, top + r * ch + ch / 2 - 7, &len.to_string(), s, BLACK);
    }
    for (p, name) in names.iter().enumerate() {
        let x0 = left + p * (panel_w + panel_gap);
        c.text(x0, top - 30, name, s, BLACK);
        for (r, row) in grid[p].iter().enumerate() {
            for (col, &v) in row.iter().enumerate() {
                let (x, y) = (x0 + col * cw, top + r * ch);
                c.fill_rect(x, y, cw, ch, red_green(v));
                c.frame(x, y, cw, ch, WHITE);
                let label = format!("{:.0}", 100.0 * v);
                c.text(
                    x + (cw - text_width(&label, s)) / 2,
                    y + ch / 2 - 7,
                    &label,
                    s,
                    BLACK,
                );
            }
        }
        for (col, d) in depths.iter().enumerate() {
            let label = format!("{:.0}%", d * 100.0);
            let x = x0 + col * cw + (cw.saturating_sub(text_width(&label, 1))) / 2;
            c.text(x, top + ch * lengths.len() + 6, &label, 1, BLACK);
        }
        c.text(x0, top + ch * lengths.len() + 22, "NEEDLE DEPTH", 1, GREY);
    }
    c
}
