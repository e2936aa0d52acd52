//! `kivi eval humaneval`: HumanEval pass@1 (greedy) for several caches over the same problems.
//! Candidate programs run in a sandboxed subprocess (see `kivi_engine::humaneval`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use kivi_core::CacheConfig;
use kivi_engine::humaneval::{
    extract_code, has_complete_block, instruction, load_problems, program, run_sandboxed,
    sandbox_description, Outcome,
};
use kivi_engine::kv_spec::{format_kv, parse_kv};
use kivi_engine::{GenerateParams, Session};
use kivi_model::chat::ChatMessage;
use serde::Serialize;

use crate::ModelArgs;

#[derive(Args)]
pub struct EvalHumanevalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Caches to evaluate, comma-separated (f16 always runs first as the baseline).
    #[arg(long = "caches", default_value = "kivi4,kivi2")]
    pub caches: String,
    /// HumanEval.jsonl(.gz) (default: $KIVI_CACHE/data/humaneval/HumanEval.jsonl.gz, from
    /// scripts/fetch-data.sh).
    #[arg(long)]
    pub problems: Option<PathBuf>,
    /// Evaluate problems `first..first+limit` (all 164 by default).
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    #[arg(long)]
    pub limit: Option<usize>,
    /// Generated tokens at most per problem (generation also stops at a closed code block).
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Seconds each candidate program may run.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Write every (cache, problem) result as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Serialize)]
struct Record {
    kv: String,
    task_id: String,
    passed: bool,
    outcome: String,
    generated_tokens: usize,
    response: String,
}

fn default_problems() -> Result<PathBuf> {
    let cache = std::env::var_os("KIVI_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kivi")))
        .context("neither KIVI_CACHE nor HOME is set")?;
    Ok(cache.join("data/humaneval/HumanEval.jsonl.gz"))
}

pub fn run(a: EvalHumanevalArgs) -> Result<()> {
    let mut caches = vec![CacheConfig::F16];
    for s in a.caches.split(',').filter(|s| !s.trim().is_empty()) {
        let c = parse_kv(s).map_err(anyhow::Error::msg)?;
        if c != CacheConfig::F16 {
            caches.push(c);
        }
    }
    if a.max_new_tokens == 0 || a.timeout == 0 {
        bail!("--max-new-tokens and --timeout must be at least 1");
    }
    let path = match &a.problems {
        Some(p) => p.clone(),
        None => default_problems()?,
    };
    let all = load_problems(&path)
        .map_err(anyhow::Error::msg)
        .context("run scripts/fetch-data.sh to fetch HumanEval")?;
    if a.first >= all.len() {
        bail!("--first {} but there are {} problems", a.first, all.len());
    }
    let end = a.limit.map_or(all.len(), |l| (a.first + l).min(all.len()));
    let problems = &all[a.first..end];
    let m = a.model.load()?;
    let eos = m.tokenizer.eos_ids().to_vec();
    let workdir = std::env::temp_dir().join(format!("kivi-humaneval-{}", std::process::id()));
    let timeout = Duration::from_secs(a.timeout);
    println!(
        "HumanEval {}..{} of {} ({}), model {}, greedy, at most {} new tokens; sandbox: {}",
        a.first,
        end,
        all.len(),
        path.display(),
        m.name,
        a.max_new_tokens,
        sandbox_description()
    );
    let prompts: Vec<Vec<u32>> = problems
        .iter()
        .map(|p| {
            let text = m
                .chat_template
                .render(&[ChatMessage::user(instruction(p))], true)?;
            Ok(m.tokenizer.encode(&text, true)?)
        })
        .collect::<Result<_>>()?;

    let bar = indicatif::ProgressBar::new((problems.len() * caches.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} eta {eta}")
            .expect("static template"),
    );
    let mut records = Vec::new();
    let mut summary = Vec::new();
    for cfg in &caches {
        let kv = format_kv(cfg);
        bar.set_message(kv.clone());
        let t0 = Instant::now();
        let (mut passed, mut tokens) = (0usize, 0usize);
        let mut session = Session::new(&m.model, cfg)?;
        for (p, prompt) in problems.iter().zip(&prompts) {
            session.reset()?;
            let params = GenerateParams {
                max_tokens: a.max_new_tokens,
                prefill_chunk: a.model.prefill_chunk,
                ..GenerateParams::default()
            };
            let mut stream = m.tokenizer.stream();
            let mut response = String::new();
            let (ids, _) = session.generate(prompt, &params, &eos, |t| {
                response.push_str(&stream.push(t));
                !has_complete_block(&response)
            })?;
            response.push_str(&stream.finish());
            let outcome = run_sandboxed(&program(p, &extract_code(&response)), &workdir, timeout)
                .context("running a candidate program (is python3 installed?)")?;
            let ok = outcome == Outcome::Passed;
            passed += usize::from(ok);
            tokens += ids.len();
            records.push(Record {
                kv: kv.clone(),
                task_id: p.task_id.clone(),
                passed: ok,
                outcome: match &outcome {
                    Outcome::Passed => "passed".into(),
                    Outcome::TimedOut => "timed out".into(),
                    Outcome::Failed(m) => format!("failed: {m}"),
                },
                generated_tokens: ids.len(),
                response,
            });
            bar.inc(1);
        }
        summary.push((kv, passed, tokens, t0.elapsed().as_secs_f64()));
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&workdir);

    let n = problems.len();
    let base: Vec<bool> = records.iter().take(n).map(|r| r.passed).collect();
    println!(
        "| cache | pass@1 | passed | Δ vs f16 (points) | same verdict as f16 | tokens | minutes |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (i, (kv, passed, tokens, secs)) in summary.iter().enumerate() {
        let rows = &records[i * n..(i + 1) * n];
        let same = rows
            .iter()
            .zip(&base)
            .filter(|(r, b)| r.passed == **b)
            .count();
        println!(
            "| {kv} | {:.1} % | {passed}/{n} | {:+.1} | {same}/{n} | {tokens} | {:.1} |",
            100.0 * *passed as f64 / n as f64,
            100.0 * (*passed as f64 - summary[0].1 as f64) / n as f64,
            secs / 60.0
        );
    }
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&records)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
