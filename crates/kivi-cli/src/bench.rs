//! `kivi bench model`: prefill and decode speed at several context depths, for several caches,
//! measured in one run (llama-bench's `-p/-n/-d` protocol).

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use kivi_core::CacheConfig;
use kivi_engine::kv_spec::{format_kv, parse_kv};
use kivi_engine::Session;
use rand::{Rng, SeedableRng};

use crate::ModelArgs;

#[derive(Args)]
pub struct BenchModelArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
    /// Caches to compare, comma-separated (each as in --kv).
    #[arg(long, default_value = "f16,kivi2,kivi4")]
    pub caches: String,
    /// Context depths (tokens already in the cache), comma-separated.
    #[arg(long, default_value = "0,4096")]
    pub depth: String,
    /// Prompt tokens timed for prefill.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens timed for decode.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
}

fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|_| anyhow::anyhow!("bad {what} `{x}`"))
        })
        .collect()
}

pub fn bench_model(a: BenchModelArgs) -> Result<()> {
    let caches: Vec<CacheConfig> = a
        .caches
        .split(',')
        .map(|s| parse_kv(s).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    let depths: Vec<usize> = parse_list(&a.depth, "depth")?;
    if a.prompt_tokens == 0 || a.gen_tokens == 0 {
        bail!("--prompt-tokens and --gen-tokens must be at least 1");
    }
    let dev = a.device.pick()?;
    if a.device.random_weights || matches!(dev, crate::device::Device::Cuda(_)) {
        return bench_other(&a, dev, &caches, &depths);
    }
    let m = a.model.load()?;
    let cfg = &m.model.config;
    let max_depth = depths.iter().max().copied().unwrap_or(0);
    if max_depth + a.prompt_tokens + a.gen_tokens > cfg.context_len {
        bail!(
            "depth {max_depth} + {} + {} tokens exceed the context of {}",
            a.prompt_tokens,
            a.gen_tokens,
            cfg.context_len
        );
    }
    // Token ids drawn from the vocabulary with a fixed seed: speed does not depend on content.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let vocab = m.tokenizer.vocab_size().min(cfg.vocab) as u32;
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.gen_range(0..vocab)).collect() };
    let threads = rayon::current_num_threads();
    println!(
        "model: {} ({}), {threads} threads, prompt {} tok, decode {} tok",
        m.name,
        cfg.arch.name(),
        a.prompt_tokens,
        a.gen_tokens
    );
    cpu_table(&m.model, &a, &caches, &depths, &mut ids)
}

/// Random weights (CPU or GPU) and files on the GPU.
fn bench_other(
    a: &BenchModelArgs,
    dev: crate::device::Device,
    caches: &[CacheConfig],
    depths: &[usize],
) -> Result<()> {
    let max_depth = depths.iter().max().copied().unwrap_or(0);
    let check = |context_len: usize| -> Result<()> {
        if max_depth + a.prompt_tokens + a.gen_tokens > context_len {
            bail!(
                "depth {max_depth} + {} + {} tokens exceed the context of {context_len}",
                a.prompt_tokens,
                a.gen_tokens,
            );
        }
        Ok(())
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    match dev {
        crate::device::Device::Cuda(gpu) => {
            let (model, tok, _, name) =
                crate::device::load_cuda(gpu, &a.device, a.model.model.clone())?;
            check(model.config.context_len)?;
            let vocab = tok.map_or(model.config.vocab, |t| {
                t.vocab_size().min(model.config.vocab)
            }) as u32;
            let mut ids =
                |n: usize| -> Vec<u32> { (0..n).map(|_| rng.gen_range(0..vocab)).collect() };
            crate::device::bench_cuda(
                &model,
                caches,
                depths,
                a.prompt_tokens,
                a.gen_tokens,
                a.model.prefill_chunk,
                &mut ids,
                &name,
            )
        }
        crate::device::Device::Cpu => {
            let config = a.device.preset()?;
            check(config.context_len)?;
            let src = kivi_model::random::RandomWeights::new(
                &config,
                kivi_model::tensor::DType::F16,
                a.device.weight_seed,
            )?;
            let model =
                kivi_model::llama::Model::load(&src, kivi_model::llama::Naming::Gguf, config)?;
            let vocab = model.config.vocab as u32;
            let mut ids =
                |n: usize| -> Vec<u32> { (0..n).map(|_| rng.gen_range(0..vocab)).collect() };
            println!(
                "model: RANDOM WEIGHTS {} (f16), cpu, {} threads, prompt {} tok, decode {} tok",
                a.device.arch,
                rayon::current_num_threads(),
                a.prompt_tokens,
                a.gen_tokens
            );
            cpu_table(&model, a, caches, depths, &mut ids)
        }
    }
}

/// Prefill and decode speed of `model` on the CPU per (depth, cache), as a table on stdout.
fn cpu_table(
    model: &kivi_model::llama::Model,
    a: &BenchModelArgs,
    caches: &[CacheConfig],
    depths: &[usize],
    ids: &mut impl FnMut(usize) -> Vec<u32>,
) -> Result<()> {
    println!("| cache | depth | prefill tok/s | decode tok/s | KV bytes at end |");
    println!("|---|---|---|---|---|");
    for &depth in depths {
        let (fill, prompt, gen) = (ids(depth), ids(a.prompt_tokens), ids(a.gen_tokens));
        for cache in caches {
            let mut s = Session::new(model, cache)?;
            s.prefill(&fill, a.model.prefill_chunk)?;
            let t = Instant::now();
            s.prefill(&prompt, a.model.prefill_chunk)?;
            let prefill = a.prompt_tokens as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            for &tok in &gen {
                s.prefill(&[tok], 1)?;
            }
            let decode = a.gen_tokens as f64 / t.elapsed().as_secs_f64();
            println!(
                "| {} | {depth} | {prefill:.1} | {decode:.1} | {} |",
                format_kv(cache),
                s.cache().memory().total_bytes()
            );
        }
    }
    Ok(())
}
