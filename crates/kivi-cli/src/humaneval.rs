//! `kivi eval humaneval`: HumanEval pass@1 (greedy) for several caches over the same problems.
//! Candidate programs run in a sandboxed subprocess (see `kivi_engine::humaneval`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use kivi_core::CacheConfig;
use kivi_engine::engine::{Event, FinishReason, Request, RequestId, Scheduler, Sink};
use kivi_engine::humaneval::{
    extract_code, has_complete_block, instruction, load_problems, program, run_sandboxed,
    sandbox_description, Outcome,
};
use kivi_engine::kv_spec::{format_kv, parse_kv};
use kivi_engine::{EngineConfig, SamplingParams};
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
    /// Problems generated at once (continuous batching).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Write every (cache, problem) result as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What a request's sink collected.
#[derive(Default)]
struct Generated {
    ids: Vec<u32>,
    text: String,
    error: Option<String>,
    ended: bool,
}

impl Generated {
    fn finished(&self) -> bool {
        self.ended
    }
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
    let tokenizer = Arc::new(m.tokenizer);
    let chat_template = m.chat_template;
    let name = m.name;
    let model = Arc::new(m.model);
    let workdir = std::env::temp_dir().join(format!("kivi-humaneval-{}", std::process::id()));
    let timeout = Duration::from_secs(a.timeout);
    println!(
        "HumanEval {}..{} of {} ({}), model {}, greedy, at most {} new tokens; sandbox: {}",
        a.first,
        end,
        all.len(),
        path.display(),
        name,
        a.max_new_tokens,
        sandbox_description()
    );
    let prompts: Vec<Vec<u32>> = problems
        .iter()
        .map(|p| {
            let text = chat_template.render(&[ChatMessage::user(instruction(p))], true)?;
            Ok(tokenizer.encode(&text, true)?)
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
        // All problems go through the continuous-batching scheduler at once (greedy output is the
        // same as one at a time; the batch shares each weight read).
        let mut sched = Scheduler::new(
            model.clone(),
            EngineConfig {
                cache: *cfg,
                max_running: a.batch.max(1),
                max_waiting: problems.len(),
                ..EngineConfig::default()
            },
        )?;
        let outputs: Vec<Arc<Mutex<Generated>>> = prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| {
                let out = Arc::new(Mutex::new(Generated::default()));
                let (sink_out, tok) = (out.clone(), tokenizer.clone());
                let mut stream = tok.stream();
                let sink: Sink = Box::new(move |ev| {
                    let mut o = sink_out.lock().expect("no panics while held");
                    match ev {
                        Event::Token(t) => {
                            o.ids.push(t);
                            o.text.push_str(&stream.push(t));
                            // Stop once the answer's code block is closed.
                            !has_complete_block(&o.text)
                        }
                        Event::Finished(f) => {
                            o.ended = true;
                            o.text.push_str(&stream.finish());
                            o.error = match f.reason {
                                FinishReason::Error(e) => Some(e),
                                _ => None,
                            };
                            false
                        }
                    }
                });
                let request = Request {
                    prompt: prompt.clone(),
                    max_tokens: a.max_new_tokens,
                    sampling: SamplingParams::default(),
                    stop_tokens: eos.clone(),
                };
                sched
                    .validate(&request)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", problems[i].task_id))?;
                sched.add(RequestId(i as u64), request, sink, Instant::now());
                Ok(out)
            })
            .collect::<Result<_>>()?;
        let mut done = 0;
        while sched.step() {
            let finished = outputs
                .iter()
                .filter(|o| o.lock().expect("no panics while held").finished())
                .count();
            bar.inc((finished - done) as u64);
            done = finished;
        }
        for (p, out) in problems.iter().zip(&outputs) {
            let g = std::mem::take(&mut *out.lock().expect("no panics while held"));
            if let Some(e) = g.error {
                bail!("{}: generation failed: {e}", p.task_id);
            }
            let outcome = run_sandboxed(&program(p, &extract_code(&g.text)), &workdir, timeout)
                .context("running a candidate program (is python3 installed?)")?;
            let ok = outcome == Outcome::Passed;
            passed += usize::from(ok);
            tokens += g.ids.len();
            records.push(Record {
                kv: kv.clone(),
                task_id: p.task_id.clone(),
                passed: ok,
                outcome: match &outcome {
                    Outcome::Passed => "passed".into(),
                    Outcome::TimedOut => "timed out".into(),
                    Outcome::Failed(m) => format!("failed: {m}"),
                },
                generated_tokens: g.ids.len(),
                response: g.text,
            });
        }
        bar.inc((problems.len() - done) as u64);
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
