//! `kivi bench attention --device cuda`: one layer's decode attention (one new token per
//! sequence over a filled cache) for several shapes, batches, contexts and caches; time (CUDA
//! events, warm-up, median) and achieved bandwidth over the bytes the kernel must read.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use kivi_core::{CacheConfig, CacheShape};
use kivi_cuda::model::GpuMatrix;
use kivi_cuda::{Activation, CudaBackend, Gpu, GpuCache};
use kivi_engine::kv_spec::{format_kv, parse_kv};
use kivi_model::backend::Backend;
use rand::{Rng, SeedableRng};

#[derive(Args)]
pub struct BenchAttentionArgs {
    /// Device to run on (cuda only: the CPU kernels are measured by
    /// `cargo bench -p kivi-core --bench attention`).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Head shapes as n_head/n_kv_head/head_dim, comma-separated.
    #[arg(long, default_value = "32/32/128,32/8/128")]
    pub shapes: String,
    /// Batch sizes (sequences), comma-separated.
    #[arg(long, default_value = "1,8,32")]
    pub batch: String,
    /// Context lengths (tokens in the cache), comma-separated.
    #[arg(long, default_value = "1024,4096,16384,32768")]
    pub context: String,
    /// Caches to compare, comma-separated (each as in --kv).
    #[arg(long, default_value = "f16,kivi2,kivi4")]
    pub caches: String,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 15)]
    pub reps: usize,
    /// Attention calls per timed repetition.
    #[arg(long, default_value_t = 10)]
    pub inner: usize,
    /// Cold L2: before every call, overwrite a buffer of twice the L2 cache and time the call
    /// alone, as in a model's decode step, where the layer's weights have flushed its cache
    /// from L2 (without it a cache smaller than L2 is read from L2 after the first call).
    #[arg(long)]
    pub cold: bool,
    /// Before every call, the model's matrix product over a random `[N][4096]` 16-bit weight of
    /// about this many MiB, one row per sequence (the GEMV at small batches, cuBLAS above), and
    /// the call timed alone: the GPU's state as a decode step leaves it between a layer's
    /// projections and its attention (L2 holding weights, SMs fresh from another kernel).
    #[arg(long, value_name = "MIB")]
    pub between: Option<usize>,
    /// Layers in the cache, all filled; timed call i reads layer i mod N, so that with N
    /// layers whose caches together exceed L2 each call finds its cache cold, as in a model.
    #[arg(long, default_value_t = 1)]
    pub layers: usize,
    /// The cache's block pool in GiB (default: just the blocks the batch needs). A model's
    /// pool fills most of the GPU, which spreads each layer's heads over more memory pages.
    #[arg(long, value_name = "GIB")]
    pub pool_gib: Option<f64>,
    /// Fill the sequences in turns of this many tokens each, as a scheduler's chunked prefill
    /// does (their blocks then interleave in the pool); default: one sequence after another.
    #[arg(long, value_name = "TOKENS")]
    pub fill_chunk: Option<usize>,
    /// Tokens per split (default: chosen to fill the GPU).
    #[arg(long)]
    pub split: Option<usize>,
    /// Also write one JSON object per measurement to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
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

fn parse_shape(s: &str) -> Result<(usize, usize, usize)> {
    let v: Vec<usize> = parse_list(&s.replace('/', ","), "shape")?;
    match v[..] {
        [h, kv, d] if h > 0 && kv > 0 && h % kv == 0 && d > 0 => Ok((h, kv, d)),
        _ => {
            bail!("bad shape `{s}`: want n_head/n_kv_head/head_dim with n_kv_head dividing n_head")
        }
    }
}

pub fn bench_attention(a: BenchAttentionArgs) -> Result<()> {
    if a.device != "cuda" {
        bail!(
            "`kivi bench attention` runs on --device cuda; the CPU attention kernels are measured \
             by `cargo bench -p kivi-core --bench attention`"
        );
    }
    let shapes: Vec<_> = a
        .shapes
        .split(',')
        .map(parse_shape)
        .collect::<Result<_>>()?;
    let batches: Vec<usize> = parse_list(&a.batch, "batch")?;
    let contexts: Vec<usize> = parse_list(&a.context, "context")?;
    let caches: Vec<CacheConfig> = a
        .caches
        .split(',')
        .map(|s| parse_kv(s).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    if a.reps == 0 || a.inner == 0 || a.layers == 0 {
        bail!("--reps, --inner and --layers must be at least 1");
    }
    if a.fill_chunk == Some(0) {
        bail!("--fill-chunk must be at least 1");
    }
    let gpu = Gpu::new(0)?;
    println!(
        "device: {}; one layer's decode attention, 1 new token per sequence; median of {} x {} calls{}",
        gpu.describe(),
        a.reps,
        if a.cold || a.between.is_some() { 1 } else { a.inner },
        match (a.cold, a.between) {
            (_, Some(mib)) => format!(", each after a {mib} MiB matrix product"),
            (true, None) => ", L2 flushed before each".to_string(),
            (false, None) => String::new(),
        }
    );
    if a.layers > 1 || a.pool_gib.is_some() || a.fill_chunk.is_some() {
        println!(
            "cache: {} layer(s), call i reads layer i mod {}; pool {}; filled {}",
            a.layers,
            a.layers,
            a.pool_gib
                .map_or("as needed".into(), |g| format!("{g} GiB")),
            a.fill_chunk
                .map_or("one sequence after another".into(), |c| format!(
                    "{c} tokens of each sequence in turn"
                ))
        );
    }
    let mut json = match &a.json {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    // What the driver compiled (a spill shows as local memory).
    for &(nh, hkv, d) in &shapes {
        for cache in &caches {
            let shape = CacheShape {
                n_layer: 1,
                n_kv_head: hkv,
                head_dim: d,
            };
            let g = GpuCache::new(gpu.clone(), *cache, shape, 1, 1)?;
            for k in g.attention_kernels(nh)? {
                println!(
                    "kernel {} ({nh}/{hkv}/{d}, {}): {} registers, {} B local, {} B static shared",
                    k.name,
                    format_kv(cache),
                    k.registers,
                    k.local_bytes,
                    k.shared_bytes
                );
            }
        }
    }
    println!("| heads (q/kv/d) | B | T | cache | time µs | GB read | GB/s | vs f16 |");
    println!("|---|---|---|---|---|---|---|---|");
    for &(nh, hkv, d) in &shapes {
        for &b in &batches {
            for &t in &contexts {
                let mut f16_us = None;
                for cache in &caches {
                    let (us, bytes) = measure(&gpu, cache, (nh, hkv, d), b, t, &a)?;
                    let gbs = bytes as f64 / (us * 1e-6) / 1e9;
                    if matches!(cache, CacheConfig::F16) {
                        f16_us = Some(us);
                    }
                    let ratio = f16_us.map_or("".to_string(), |f| format!("{:.2}x", f / us));
                    println!(
                        "| {nh}/{hkv}/{d} | {b} | {t} | {} | {us:.1} | {:.3} | {gbs:.0} | {ratio} |",
                        format_kv(cache),
                        bytes as f64 / 1e9
                    );
                    if let Some(f) = json.as_mut() {
                        use std::io::Write;
                        writeln!(
                            f,
                            "{{\"n_head\":{nh},\"n_kv_head\":{hkv},\"head_dim\":{d},\"batch\":{b},\
                             \"context\":{t},\"cache\":\"{}\",\"us\":{us:.3},\"bytes\":{bytes}}}",
                            format_kv(cache)
                        )?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Median time (µs) of one decode attention call, and the bytes it must read.
fn measure(
    gpu: &Arc<Gpu>,
    config: &CacheConfig,
    (nh, hkv, d): (usize, usize, usize),
    b: usize,
    t: usize,
    a: &BenchAttentionArgs,
) -> Result<(f64, u64)> {
    let shape = CacheShape {
        n_layer: a.layers,
        n_kv_head: hkv,
        head_dim: d,
    };
    let mut cache = match a.pool_gib {
        Some(g) => GpuCache::with_budget(
            gpu.clone(),
            *config,
            shape,
            (g * (1u64 << 30) as f64) as u64,
            b,
        )?,
        None => GpuCache::new(gpu.clone(), *config, shape, b, t + 1)?,
    };
    cache.set_split_tokens(a.split);
    let s = gpu.stream().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Fill every sequence with t tokens, appended in chunks of random data (whole sequences in
    // turn, or --fill-chunk tokens of each sequence in turn).
    let chunk = 1024.min(t.max(1));
    let row = hkv * d;
    let kc: Vec<f32> = (0..chunk * row).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let vc: Vec<f32> = (0..chunk * row).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let (dk, dv) = (s.clone_htod(&kc)?, s.clone_htod(&vc)?);
    let slots: Vec<usize> = (0..b)
        .map(|_| cache.add_sequence())
        .collect::<Result<_, _>>()?;
    let turn = a.fill_chunk.unwrap_or(t.max(1));
    let mut filled = vec![0usize; b];
    while filled.iter().any(|&n| n < t) {
        for (&slot, n) in slots.iter().zip(filled.iter_mut()) {
            let end = t.min(*n + turn);
            while *n < end {
                let m = chunk.min(end - *n);
                let batch = cache.batch(&[(slot, m)])?;
                for layer in 0..a.layers {
                    cache.append(layer, &batch, &dk, &dv)?;
                }
                cache.advance(&batch);
                *n += m;
            }
        }
    }
    let items: Vec<(usize, usize)> = slots.iter().map(|&slot| (slot, 1)).collect();
    let batch = cache.batch(&items)?;
    let q: Vec<f32> = (0..b * nh * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let kn: Vec<f32> = (0..b * row).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let (dq, dkn, dvn) = (s.clone_htod(&q)?, s.clone_htod(&kn)?, s.clone_htod(&kn)?);
    let mut out = s.alloc_zeros::<f32>(b * nh * d)?;
    for layer in 0..3 {
        cache.attend(layer % a.layers, nh, &batch, &dq, &dkn, &dvn, &mut out)?;
    }
    gpu.synchronize()?;
    let ctx = gpu.context().clone();
    let flag = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    // (Cold: 2x the L2 bytes, written before each call; its time is outside the events.)
    let mut flush = if a.cold {
        Some(s.alloc_zeros::<u8>(2 * gpu.l2_bytes().max(1 << 20))?)
    } else {
        None
    };
    let mut product = match a.between {
        Some(mib) => Some(BetweenProduct::new(gpu, mib, b)?),
        None => None,
    };
    let inner = if a.cold || product.is_some() {
        1
    } else {
        a.inner
    };
    let mut times = Vec::with_capacity(a.reps);
    for rep in 0..a.reps {
        let layer = rep % a.layers;
        if let Some(f) = flush.as_mut() {
            s.memset_zeros(f)?;
        }
        if let Some(p) = product.as_mut() {
            p.run()?;
        }
        let start = ctx.new_event(flag)?;
        let end = ctx.new_event(flag)?;
        start.record(&s)?;
        for _ in 0..inner {
            cache.attend(layer, nh, &batch, &dq, &dkn, &dvn, &mut out)?;
        }
        end.record(&s)?;
        times.push(start.elapsed_ms(&end)? as f64 * 1e3 / inner as f64);
    }
    let got = s.clone_dtoh(&out)?;
    if got.iter().any(|x| !x.is_finite()) {
        bail!("non-finite attention output");
    }
    times.sort_by(|x, y| x.total_cmp(y));
    Ok((times[times.len() / 2], cache.decode_bytes(&batch, nh)))
}

/// The matrix product `--between` runs before each timed call: the model's own op (GEMV at up
/// to a few rows, cuBLAS above) on the attention's stream.
struct BetweenProduct {
    backend: CudaBackend,
    w: GpuMatrix,
    x: Activation,
    out: Activation,
    rows: usize,
}

impl BetweenProduct {
    const COLS: usize = 4096;

    fn new(gpu: &Arc<Gpu>, mib: usize, rows: usize) -> Result<BetweenProduct> {
        let mut backend = CudaBackend::new(gpu.clone())?;
        backend.set_graphs(false);
        let n_out = (mib.max(1) << 20) / (2 * Self::COLS);
        let w = backend.random_matrix(n_out, Self::COLS, 0.0, 0.02, 1)?;
        let x = backend.zeros(rows * Self::COLS)?;
        let out = backend.zeros(rows * n_out)?;
        Ok(BetweenProduct {
            backend,
            w,
            x,
            out,
            rows,
        })
    }

    fn run(&mut self) -> Result<()> {
        self.backend
            .matmul(&self.w, &self.x, self.rows, &mut self.out)?;
        self.backend.flush()?;
        Ok(())
    }
}
