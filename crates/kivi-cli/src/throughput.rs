//! `kivi bench throughput`: the KIVI paper's batching experiment (Figure 5). For each cache, a
//! sweep over batch size until the KV memory budget is full; at each batch size, `B` requests run
//! together through the continuous-batching scheduler, generation ignores EOS (fixed output
//! lengths), and we report output tokens/s, time per output token and peak memory.
//!
//! Workloads (token ids are random: speed does not depend on content):
//! - `sharegpt`: the paper's ShareGPT shape. Prompt and output lengths are drawn, per request,
//!   from log-normal distributions with means `--prompt-len` (161) and `--output-len` (338) and
//!   log-space sigma 0.5, clipped to [mean/8, 4 * mean]; seeded, and request `i` has the same
//!   lengths in every batch size and cache (the batch of `B` is a prefix of the batch of `2B`).
//! - `fixed`: every request has exactly `--prompt-len` / `--output-len` tokens.
//! - `long`: fixed 4096 in / 512 out (override with the same flags to scale it down on CPU).
//!
//! `--device cuda` runs the same scheduler over the GPU model (`kivi_cuda::GpuRunner`) under a
//! total GPU memory budget (`--gpu-memory`, weights included; the KV budget is what is left after
//! the weights and the activation workspace), and reports peak memory two ways: our accounting
//! (weights + workspace + KV held) and the driver's (cuMemGetInfo, the whole process).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use kivi_core::CacheConfig;
use kivi_cuda::{CudaModel, GpuCache, GpuRunner};
use kivi_engine::engine::Sink;
use kivi_engine::kv_spec::{format_kv, parse_kv};
use kivi_engine::plot::{line_chart, Series, PALETTE};
use kivi_engine::{EngineConfig, Event, Request, RequestId, SamplingParams, Scheduler};
use kivi_model::config::Config;
use kivi_model::llama::{Model, Naming};
use kivi_model::random::{preset, RandomWeights};
use kivi_model::runner::{cache_shape, Runner};
use kivi_model::tensor::DType;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    Sharegpt,
    Fixed,
    Long,
}

#[derive(Args)]
pub struct BenchThroughputArgs {
    /// GGUF file or safetensors directory (default: SmolLM2-135M-Instruct).
    #[arg(long, conflicts_with = "random_weights")]
    pub model: Option<PathBuf>,
    /// Use seeded random weights with the shapes of `--arch` (no model file; clearly labelled).
    #[arg(long)]
    pub random_weights: bool,
    /// Random-weight shape preset: llama2-7b, llama3-8b, mistral-7b, smollm2-135m, tiny.
    #[arg(long, default_value = "smollm2-135m")]
    pub arch: String,
    /// --device cuda: 16-bit type of the weights and GEMM inputs (f16 or bf16).
    #[arg(long, default_value = "f16", value_parser = ["f16", "bf16"])]
    pub gpu_dtype: String,
    /// Caches to compare, comma-separated (each as in --kv).
    #[arg(long, default_value = "f16,kivi2:r32,kivi2,kivi4")]
    pub kv: String,
    /// KV-cache memory budget: bytes, or with a KiB/MiB/GiB (or K/M/G) suffix (CPU).
    #[arg(long, default_value = "64MiB")]
    pub kv_memory: String,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// --device cuda: total GPU memory allowed, weights included (G = GiB). The KV budget is
    /// this minus the weights, the activation workspace and the CUDA context (printed).
    #[arg(long, default_value = "80GB")]
    pub gpu_memory: String,
    /// --device cuda: prompt tokens per prefill chunk; a pass holds the batch's decode tokens
    /// plus one chunk.
    #[arg(long, default_value_t = 2048)]
    pub gpu_prefill_chunk: usize,
    #[arg(long, value_enum, default_value_t = Workload::Sharegpt)]
    pub workload: Workload,
    /// Mean (sharegpt) or exact prompt length; default 161 (sharegpt, fixed) or 4096 (long).
    #[arg(long)]
    pub prompt_len: Option<usize>,
    /// Mean (sharegpt) or exact output length; default 338 (sharegpt, fixed) or 512 (long).
    #[arg(long)]
    pub output_len: Option<usize>,
    /// Batch sizes to run (comma-separated); default: 1, 2, 4, ... and the largest that fits.
    #[arg(long)]
    pub batch: Option<String>,
    /// Largest batch size considered.
    #[arg(long, default_value_t = 256)]
    pub max_batch: usize,
    /// Most tokens per forward pass (decode tokens + prefill chunk).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Seed of the workload (lengths and token ids).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// --device cuda: time every op of the forward pass on the GPU (CUDA events; adds a little
    /// host work per op) and print, after each point, the GPU time per pass by op.
    #[arg(long)]
    pub profile: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write `<prefix>-memory.png` and `<prefix>-throughput.png` (peak memory and throughput vs
    /// batch size, the paper's Figure 5).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Parses `64MiB`, `1.5GiB`, `100000`, `8G`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .with_context(|| format!("bad byte count `{s}`"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        u => bail!("bad unit `{u}` in `{s}` (use B, KiB, MiB or GiB)"),
    };
    let b = v * mult as f64;
    if !(b.is_finite() && b >= 1.0) {
        bail!("byte count `{s}` must be at least 1 byte");
    }
    Ok(b as u64)
}

/// `(prompt, output)` lengths of request `i` (independent of the batch size).
fn lengths(w: Workload, prompt: usize, output: usize, seed: u64, i: usize) -> (usize, usize) {
    if w != Workload::Sharegpt {
        return (prompt, output);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
    let mut draw = |mean: usize| {
        // Log-normal with the given mean: mu = ln(mean) - sigma^2 / 2 (Box-Muller normal).
        let sigma = 0.5f64;
        let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let x = ((mean as f64).ln() - sigma * sigma / 2.0 + sigma * z).exp();
        (x.round() as usize).clamp((mean / 8).max(1), 4 * mean)
    };
    (draw(prompt), draw(output))
}

struct Point {
    batch: usize,
    output_tokens: usize,
    secs: f64,
    tok_s: f64,
    tpot_ms: f64,
    peak_kv: u64,
    peak_total: u64,
    preemptions: u64,
    /// GPU only: the driver's view of peak device memory in use (cuMemGetInfo).
    peak_device: Option<u64>,
    /// GPU only: forward passes, and the share of their time the host spent queueing work.
    steps: u64,
    launch_share: Option<f64>,
}

/// Results of one cache: its configuration, the largest batch that fits, the points.
type CacheResult = (CacheConfig, usize, Vec<Point>);

pub fn run(a: BenchThroughputArgs) -> Result<()> {
    let caches: Vec<CacheConfig> =
        a.kv.split(',')
            .map(|s| parse_kv(s).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?;
    let budget = parse_bytes(&a.kv_memory)?;
    let (dp, dout) = match a.workload {
        Workload::Long => (4096, 512),
        _ => (161, 338),
    };
    let (prompt_len, output_len) = (a.prompt_len.unwrap_or(dp), a.output_len.unwrap_or(dout));
    if prompt_len == 0 || output_len == 0 || a.max_batch == 0 {
        bail!("--prompt-len, --output-len and --max-batch must be at least 1");
    }
    if a.device == "cuda" {
        return run_cuda(&a, &caches, prompt_len, output_len);
    }
    if a.device != "cpu" {
        bail!("unknown --device `{}` (cpu, cuda)", a.device);
    }
    let (model, name) = if a.random_weights {
        let c = preset(&a.arch)?;
        let src = RandomWeights::new(&c, DType::F16, a.seed)?;
        let m = Model::load(&src, Naming::Gguf, c)?;
        (m, format!("RANDOM WEIGHTS ({} shapes, f16)", a.arch))
    } else {
        let path = match &a.model {
            Some(p) => p.clone(),
            None => crate::fetch::default_model_path()?,
        };
        let m = kivi_model::loader::load(&path)
            .with_context(|| format!("loading {}", path.display()))?;
        (m.model, m.name)
    };
    let model = Arc::new(model);
    let cfg = model.config.clone();
    let weights = model.weight_bytes() as u64;
    let reqs = workload_requests(&a, prompt_len, output_len, cfg.context_len)?;
    let threads = rayon::current_num_threads();
    println!(
        "model: {name}, {threads} threads, workload {:?} (prompt {prompt_len}, output \
         {output_len}{}), KV budget {budget} B ({:.1} MiB), weights {:.1} MiB, seed {}",
        a.workload,
        if a.workload == Workload::Sharegpt {
            " means, log-normal sigma 0.5"
        } else {
            ""
        },
        budget as f64 / 1048576.0,
        weights as f64 / 1048576.0,
        a.seed
    );
    print_header(false);
    let mut results = Vec::new();
    for cache in &caches {
        let config = EngineConfig {
            cache: *cache,
            kv_memory_bytes: Some(budget),
            max_running: a.max_batch,
            max_waiting: usize::MAX,
            max_batch_tokens: a.max_batch_tokens,
            prefill_chunk: 0,
        };
        // Largest batch whose every sequence fits at its final length at once (no preemption).
        let probe = Scheduler::new(model.clone(), config.clone())?;
        let c = probe.cache();
        let mut used = 0u64;
        let mut max_fit = 0;
        for &(p, o) in &reqs {
            used += c.blocks_for_tokens(p + o - 1) as u64 * c.block_bytes() + c.seq_fixed_bytes();
            if used > budget {
                break;
            }
            max_fit += 1;
        }
        drop(probe);
        let batches = match &a.batch {
            Some(list) => parse_batches(list)?,
            None => doubling_to(max_fit),
        };
        let mut points = Vec::new();
        for &b in &batches {
            if b == 0 || b > a.max_batch {
                bail!(
                    "batch size {b} is outside 1..=--max-batch ({})",
                    a.max_batch
                );
            }
            let pt = run_batch(&model, &config, &reqs[..b], a.seed, weights)?;
            print_point(cache, &pt);
            points.push(pt);
        }
        results.push((*cache, max_fit, points));
    }
    let meta = json!({
        "model": name,
        "device": "cpu",
        "threads": threads,
        "workload": format!("{:?}", a.workload),
        "prompt_len": prompt_len,
        "output_len": output_len,
        "kv_budget_bytes": budget,
        "weight_bytes": weights,
        "max_batch_tokens": a.max_batch_tokens,
        "seed": a.seed,
    });
    report(&a, &results, meta)
}

fn print_header(gpu: bool) {
    if gpu {
        println!(
            "| cache | batch | output tok | time s | output tok/s | TPOT ms | peak KV GiB | peak \
             memory GiB (ours) | peak memory GiB (driver) | steps | host launch share | \
             preemptions |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    } else {
        println!(
            "| cache | batch | output tok | time s | output tok/s | TPOT ms | peak KV MiB | peak \
             weights+KV MiB | preemptions |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
    }
}

fn print_point(cache: &CacheConfig, pt: &Point) {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match pt.peak_device {
        Some(dev) => println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {:.0} % | {} |",
            format_kv(cache),
            pt.batch,
            pt.output_tokens,
            pt.secs,
            pt.tok_s,
            pt.tpot_ms,
            gib(pt.peak_kv),
            gib(pt.peak_total),
            gib(dev),
            pt.steps,
            100.0 * pt.launch_share.unwrap_or(0.0),
            pt.preemptions
        ),
        None => println!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} | {} |",
            format_kv(cache),
            pt.batch,
            pt.output_tokens,
            pt.secs,
            pt.tok_s,
            pt.tpot_ms,
            pt.peak_kv as f64 / 1048576.0,
            pt.peak_total as f64 / 1048576.0,
            pt.preemptions
        ),
    }
}

/// Summary table, JSON and plots.
fn report(a: &BenchThroughputArgs, results: &[CacheResult], meta: serde_json::Value) -> Result<()> {
    let gpu = a.device == "cuda";
    let (unit, div) = if gpu {
        ("GiB", (1u64 << 30) as f64)
    } else {
        ("MiB", 1048576.0)
    };

    // Summary: each cache at its best batch, against f16 in the same run.
    println!();
    println!(
        "| cache | max batch (fits) | best tok/s (batch) | vs f16 | peak {unit} at f16's max \
         batch | f16 / this |"
    );
    println!("|---|---|---|---|---|---|");
    let best = |pts: &[Point]| {
        pts.iter()
            .max_by(|x, y| x.tok_s.total_cmp(&y.tok_s))
            .map(|p| (p.tok_s, p.batch))
    };
    let f16 = results.iter().find(|r| r.0 == CacheConfig::F16);
    let f16_best = f16.and_then(|r| best(&r.2)).map(|b| b.0);
    let f16_max = f16.map(|r| r.1);
    let peak_at = |pts: &[Point], b: usize| pts.iter().find(|p| p.batch == b).map(|p| p.peak_total);
    let f16_peak = f16.and_then(|r| f16_max.and_then(|b| peak_at(&r.2, b)));
    for (cache, max_fit, pts) in results {
        let (tok_s, at) = best(pts).unwrap_or((0.0, 0));
        let ratio = f16_best.map_or("-".into(), |f| format!("{:.2}x", tok_s / f));
        let peak = f16_max.and_then(|b| peak_at(pts, b));
        let mem_ratio = match (f16_peak, peak) {
            (Some(f), Some(p)) => format!("{:.2}x", f as f64 / p as f64),
            _ => "-".into(),
        };
        println!(
            "| {} | {max_fit} | {tok_s:.1} ({at}) | {ratio} | {} | {mem_ratio} |",
            format_kv(cache),
            peak.map_or("-".into(), |p| format!("{:.2}", p as f64 / div)),
        );
    }

    if let Some(path) = &a.out {
        let mut j = meta;
        j["caches"] = json!(results
            .iter()
            .map(|(c, max_fit, pts)| json!({
                "cache": format_kv(c),
                "max_batch": max_fit,
                "points": pts.iter().map(|p| json!({
                    "batch": p.batch,
                    "output_tokens": p.output_tokens,
                    "secs": p.secs,
                    "output_tok_s": p.tok_s,
                    "tpot_ms": p.tpot_ms,
                    "peak_kv_bytes": p.peak_kv,
                    "peak_weights_kv_bytes": p.peak_total,
                    "preemptions": p.preemptions,
                    "peak_device_bytes": p.peak_device,
                    "steps": p.steps,
                    "host_launch_share": p.launch_share,
                })).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>());
        std::fs::write(path, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(prefix) = &a.plot {
        let series = |f: &dyn Fn(&Point) -> f64| -> Vec<Series> {
            results
                .iter()
                .enumerate()
                .map(|(i, (c, _, pts))| Series {
                    name: format_kv(c),
                    color: PALETTE[i % PALETTE.len()],
                    points: pts.iter().map(|p| (p.batch as f64, f(p))).collect(),
                })
                .collect()
        };
        let mem = line_chart(
            if gpu {
                "Peak GPU memory vs batch size"
            } else {
                "Peak memory (weights + KV) vs batch size"
            },
            "batch size",
            unit,
            &series(&|p| p.peak_total as f64 / div),
        );
        let thr = line_chart(
            "Throughput vs batch size",
            "batch size",
            "output tokens/s",
            &series(&|p| p.tok_s),
        );
        for (suffix, canvas) in [("memory", mem), ("throughput", thr)] {
            let path = PathBuf::from(format!("{}-{suffix}.png", prefix.display()));
            canvas
                .save_png(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Bytes of the activations of one GPU forward pass of `tokens` tokens with `rows` logits rows:
/// the buffers `Llama::forward_rows` and `CudaBackend` allocate (f32 activations, the f16 GEMM
/// input copy, logits) and the attention partials, plus 256 MiB for allocator rounding.
pub(crate) fn gpu_workspace(c: &Config, tokens: usize, rows: usize) -> u64 {
    let (t, m) = (tokens as u64, rows as u64);
    let (h, qd, kvd, f, v) = (
        c.hidden as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.ffn as u64,
        c.vocab as u64,
    );
    // x, xb, tmp, q, att, k, v, gate, up; picked and normed rows, logits.
    let f32s = t * (3 * h + 2 * qd + 2 * kvd + 2 * f) + m * (2 * h + v);
    let f16s = t * h.max(f).max(qd);
    // Flash-decoding partials (o and m/l per split); at most a few splits per token here.
    let parts = t * c.n_head as u64 * 4 * (c.head_dim as u64 + 2);
    4 * f32s + 2 * f16s + 4 * parts + (256 << 20)
}

/// `--device cuda`: the sweep on the GPU model.
fn run_cuda(
    a: &BenchThroughputArgs,
    caches: &[CacheConfig],
    prompt_len: usize,
    output_len: usize,
) -> Result<()> {
    let gpu = kivi_cuda::Gpu::new(0)
        .map_err(|e| anyhow::anyhow!("{e} (--device cuda needs an NVIDIA driver and GPU)"))?;
    gpu.retain_freed_memory()?;
    let dev = crate::device::DeviceArgs {
        device: "cuda".into(),
        random_weights: a.random_weights,
        arch: a.arch.clone(),
        weight_seed: a.seed,
        gpu_dtype: a.gpu_dtype.clone(),
    };
    let (model, _, _, name) = crate::device::load_cuda(gpu.clone(), &dev, a.model.clone())?;
    gpu.trim_pool()?;
    if a.profile {
        model.backend.profiler().set_enabled(true);
    }
    let cfg = model.config.clone();
    let weights = model.weight_bytes() as u64;
    let (used_base, device_total) = gpu.memory_info()?;
    let total = parse_bytes(&a.gpu_memory)?;
    let chunk = a.gpu_prefill_chunk.max(1);
    let workspace = gpu_workspace(&cfg, a.max_batch + chunk, a.max_batch);
    // The driver's view after loading: weights + CUDA context + cuBLAS + kernels.
    let context = used_base.saturating_sub(weights);
    let Some(kv_budget) = total.checked_sub(used_base + workspace).filter(|&b| b > 0) else {
        bail!(
            "--gpu-memory {} leaves nothing for the KV cache: weights {weights} B, context \
             {context} B, activation workspace {workspace} B",
            a.gpu_memory
        );
    };
    if total > device_total {
        bail!(
            "--gpu-memory {} is more than the device has ({device_total} B)",
            a.gpu_memory
        );
    }
    let reqs = workload_requests(a, prompt_len, output_len, cfg.context_len)?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "model: {name} on {}, workload {:?} (prompt {prompt_len}, output {output_len}{}), seed {}",
        gpu.describe(),
        a.workload,
        if a.workload == Workload::Sharegpt {
            " means, log-normal sigma 0.5"
        } else {
            ""
        },
        a.seed
    );
    println!(
        "GPU memory budget {:.2} GiB = weights {:.2} GiB + CUDA context/cuBLAS {:.2} GiB + \
         activation workspace {:.2} GiB (passes of up to {} tokens: the batch's decodes + a \
         {chunk}-token prefill chunk) + KV {:.2} GiB; device total {:.1} GiB",
        gib(total),
        gib(weights),
        gib(context),
        gib(workspace),
        a.max_batch + chunk,
        gib(kv_budget),
        gib(device_total)
    );
    print_header(true);
    let mut results = Vec::new();
    for cache in caches {
        // Largest batch whose every sequence fits at its final length at once (no preemption):
        // each takes its slot's f16 windows and the pool blocks of its tokens.
        let cost = GpuCost::probe(&model, cache)?;
        gpu.trim_pool()?;
        model.backend.profiler().take(); // not the probe's passes
        let max_fit = (1..=reqs.len())
            .take_while(|&b| cost.bytes(&reqs[..b]) <= kv_budget)
            .last()
            .unwrap_or(0);
        let batches: Vec<usize> = match &a.batch {
            Some(list) => parse_batches(list)?
                .into_iter()
                .filter(|&b| b <= max_fit)
                .chain((max_fit > 0).then_some(max_fit))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
            None => doubling_to(max_fit),
        };
        let mut points = Vec::new();
        for &b in &batches {
            if b == 0 {
                bail!("batch size 0");
            }
            // One failed point (e.g. out of memory) must not lose the others.
            match run_batch_cuda(&model, cache, &cost, &reqs[..b], a.seed, chunk, weights) {
                Ok(pt) => {
                    print_point(cache, &pt);
                    points.push(pt);
                }
                Err(e) => println!("| {} | {b} | failed: {e:#} |", format_kv(cache)),
            }
            eprintln!("CUDA graphs so far: {}", model.backend.graph_stats());
            let profile = model.backend.profiler().take();
            if a.profile {
                eprintln!(
                    "{} time by op, {} B = {b}:\n{}",
                    if profile.host { "Host" } else { "GPU" },
                    format_kv(cache),
                    profile.table()
                );
            }
            gpu.trim_pool()?;
        }
        results.push((*cache, max_fit, points));
    }
    let meta = json!({
        "model": name,
        "device": gpu.describe(),
        "workload": format!("{:?}", a.workload),
        "prompt_len": prompt_len,
        "output_len": output_len,
        "gpu_memory_budget_bytes": total,
        "kv_budget_bytes": kv_budget,
        "weight_bytes": weights,
        "context_bytes": context,
        "workspace_bytes": workspace,
        "prefill_chunk": chunk,
        "seed": a.seed,
    });
    report(a, &results, meta)
}

/// What a cache configuration takes on the GPU, from a one-sequence probe cache.
struct GpuCost {
    block_bytes: u64,
    window_bytes: u64,
    /// Pool blocks of a sequence of n tokens, for n = 0..=longest request.
    blocks: Vec<usize>,
}

impl GpuCost {
    fn probe(model: &CudaModel, cache: &CacheConfig) -> Result<GpuCost> {
        let c = &model.config;
        let probe = GpuCache::new(model.backend.gpu().clone(), *cache, cache_shape(c), 1, 1)?;
        Ok(GpuCost {
            block_bytes: probe.block_bytes(),
            window_bytes: probe.window_bytes_per_seq(),
            blocks: (0..=c.context_len)
                .map(|n| probe.blocks_for_tokens(n))
                .collect(),
        })
    }

    /// Pool blocks of `reqs` at their final lengths (the last generated token is not stored).
    fn pool_blocks(&self, reqs: &[(usize, usize)]) -> usize {
        reqs.iter().map(|&(p, o)| self.blocks[p + o - 1]).sum()
    }

    /// KV bytes of `reqs` at their final lengths: windows and pool blocks.
    fn bytes(&self, reqs: &[(usize, usize)]) -> u64 {
        reqs.len() as u64 * self.window_bytes + self.pool_blocks(reqs) as u64 * self.block_bytes
    }
}

/// Runs `reqs` together on the GPU (one wave, `max_running` = all of them), with a cache of
/// exactly their size at their final lengths (the allocation grows with the batch, as a
/// framework's would; the driver's view of memory then measures it).
fn run_batch_cuda(
    model: &CudaModel,
    cache: &CacheConfig,
    cost: &GpuCost,
    reqs: &[(usize, usize)],
    seed: u64,
    chunk: usize,
    weights: u64,
) -> Result<Point> {
    let b = reqs.len();
    let gpu = model.backend.gpu().clone();
    let shape = cache_shape(&model.config);
    let gcache = GpuCache::with_budget(gpu.clone(), *cache, shape, cost.bytes(reqs), b)?;
    // Kernels compile on first use: before the clock starts.
    gcache.prepare(model.config.n_head)?;
    let runner = GpuRunner::new(model, gcache);
    let pool = runner.cache().pool_blocks() as u64 * runner.block_bytes();
    let windows = b as u64 * cost.window_bytes;
    let config = EngineConfig {
        cache: *cache,
        kv_memory_bytes: Some(pool),
        max_running: b,
        max_waiting: usize::MAX,
        max_batch_tokens: b + chunk,
        prefill_chunk: chunk,
    };
    let mut sched = Scheduler::with_runner(runner, config);
    // KV held: every slot's windows (preallocated) and the pool blocks in use.
    let mut peak_kv = windows;
    let d = drive(&mut sched, reqs, seed, |s| {
        let r = s.runner();
        peak_kv = peak_kv.max(windows + r.blocks_in_use() as u64 * r.block_bytes());
    })?;
    let st = sched.stats();
    let runner = sched.into_runner();
    let times = runner.times();
    let workspace = gpu_workspace(&model.config, b + chunk, b);
    Ok(Point {
        batch: b,
        output_tokens: d.output_tokens,
        secs: d.secs,
        tok_s: d.output_tokens as f64 / d.secs,
        tpot_ms: d.tpot_ms,
        peak_kv,
        peak_total: weights + workspace + peak_kv,
        preemptions: st.preemptions_total,
        peak_device: Some(runner.peak_device_used()),
        steps: times.steps,
        launch_share: Some(times.launch.as_secs_f64() / times.total.as_secs_f64().max(1e-9)),
    })
}

/// Runs `reqs` together (one wave, `max_running` = all of them) on this thread.
fn run_batch(
    model: &Arc<Model>,
    config: &EngineConfig,
    reqs: &[(usize, usize)],
    seed: u64,
    weights: u64,
) -> Result<Point> {
    let config = EngineConfig {
        max_running: reqs.len(),
        ..config.clone()
    };
    let mut sched = Scheduler::new(model.clone(), config)?;
    let d = drive(&mut sched, reqs, seed, |_| {})?;
    let st = sched.stats();
    let peak_kv = sched.peak_kv_reserved();
    Ok(Point {
        batch: reqs.len(),
        output_tokens: d.output_tokens,
        secs: d.secs,
        tok_s: d.output_tokens as f64 / d.secs,
        tpot_ms: d.tpot_ms,
        peak_kv,
        peak_total: weights + peak_kv,
        preemptions: st.preemptions_total,
        peak_device: None,
        steps: 0,
        launch_share: None,
    })
}

/// What one run of a batch measured.
struct Drive {
    output_tokens: usize,
    secs: f64,
    tpot_ms: f64,
}

/// Submits `reqs` (random prompts, greedy, EOS ignored) and steps the scheduler until all are
/// done, calling `after_step` after every step.
fn drive<R: Runner>(
    sched: &mut Scheduler<R>,
    reqs: &[(usize, usize)],
    seed: u64,
    mut after_step: impl FnMut(&Scheduler<R>),
) -> Result<Drive> {
    let vocab = sched.runner().model_config().vocab as u32;
    // Token times per request, for the time per output token.
    let times: Arc<Mutex<Vec<Vec<Instant>>>> = Arc::new(Mutex::new(vec![Vec::new(); reqs.len()]));
    let t0 = Instant::now();
    for (i, &(p, o)) in reqs.iter().enumerate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(1 + i as u64));
        let request = Request {
            prompt: (0..p).map(|_| rng.gen_range(0..vocab)).collect(),
            max_tokens: o,
            sampling: SamplingParams::default(),
            stop_tokens: vec![], // ignore EOS: fixed output lengths
        };
        sched
            .validate(&request)
            .map_err(|e| anyhow::anyhow!("request {i}: {e}"))?;
        let times = times.clone();
        let sink: Sink = Box::new(move |e| {
            if let Event::Token(_) = e {
                times.lock().unwrap()[i].push(Instant::now());
            }
            true
        });
        sched.add(RequestId(i as u64), request, sink, t0);
    }
    while sched.step() {
        after_step(sched);
    }
    let secs = t0.elapsed().as_secs_f64();
    if !sched.is_idle() {
        bail!("the scheduler stopped with requests left (a request cannot be admitted)");
    }
    let times = times.lock().unwrap();
    let output_tokens: usize = times.iter().map(|t| t.len()).sum();
    let tpots: Vec<f64> = times
        .iter()
        .filter(|t| t.len() > 1)
        .map(|t| (t[t.len() - 1] - t[0]).as_secs_f64() / (t.len() - 1) as f64)
        .collect();
    let tpot_ms = 1e3 * tpots.iter().sum::<f64>() / tpots.len().max(1) as f64;
    Ok(Drive {
        output_tokens,
        secs,
        tpot_ms,
    })
}

/// The workload's `(prompt, output)` lengths of `--max-batch` requests, each checked to fit the
/// model's context.
fn workload_requests(
    a: &BenchThroughputArgs,
    prompt_len: usize,
    output_len: usize,
    context_len: usize,
) -> Result<Vec<(usize, usize)>> {
    let reqs: Vec<(usize, usize)> = (0..a.max_batch)
        .map(|i| lengths(a.workload, prompt_len, output_len, a.seed, i))
        .collect();
    if let Some(&(p, o)) = reqs.iter().find(|(p, o)| p + o > context_len) {
        bail!("a request of {p} + {o} tokens exceeds the context of {context_len} tokens");
    }
    Ok(reqs)
}

/// `--batch 16,128,256` as numbers.
fn parse_batches(list: &str) -> Result<Vec<usize>> {
    list.split(',')
        .map(|x| x.trim().parse().with_context(|| format!("bad batch `{x}`")))
        .collect()
}

/// The default sweep: 1, 2, 4, ... up to `max_fit`, and `max_fit` itself (empty when 0).
fn doubling_to(max_fit: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |b| Some(b * 2))
        .take_while(|&b| b <= max_fit)
        .collect();
    if max_fit > 0 && v.last() != Some(&max_fit) {
        v.push(max_fit);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
    }

    #[test]
    fn batch_sweeps() {
        assert_eq!(doubling_to(0), Vec::<usize>::new());
        assert_eq!(doubling_to(1), vec![1]);
        assert_eq!(doubling_to(8), vec![1, 2, 4, 8]);
        assert_eq!(
            doubling_to(261),
            vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 261]
        );
        assert_eq!(parse_batches("16, 128,256").unwrap(), vec![16, 128, 256]);
        assert!(parse_batches("16,x").is_err());
        assert!(parse_batches("").is_err());
    }

    #[test]
    fn sharegpt_lengths_have_the_requested_means() {
        let n = 4000;
        let (mut sp, mut so) = (0usize, 0usize);
        for i in 0..n {
            let (p, o) = lengths(Workload::Sharegpt, 161, 338, 7, i);
            assert!((20..=644).contains(&p) && (42..=1352).contains(&o));
            sp += p;
            so += o;
        }
        let (mp, mo) = (sp as f64 / n as f64, so as f64 / n as f64);
        // Clipping moves the mean by well under 2 %.
        assert!((mp / 161.0 - 1.0).abs() < 0.04, "prompt mean {mp}");
        assert!((mo / 338.0 - 1.0).abs() < 0.04, "output mean {mo}");
        assert_eq!(
            lengths(Workload::Sharegpt, 161, 338, 7, 5),
            lengths(Workload::Sharegpt, 161, 338, 7, 5)
        );
    }
}
