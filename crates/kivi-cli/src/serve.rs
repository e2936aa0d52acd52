//! `kivi serve`: the OpenAI-compatible HTTP server (crate `kivi-server`) on the
//! continuous-batching engine, on the CPU or the GPU (`--device`; the engine drives a
//! `kivi_cuda::GpuRunner` there, whose KV cache is one fixed pool inside `--kv-memory`).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use kivi_core::CacheConfig;
use kivi_cuda::{CudaModel, GpuCache, GpuRunner};
use kivi_engine::engine::{Engine, EngineConfig};
use kivi_engine::kv_spec::format_kv;
use kivi_model::chat::ChatTemplate;
use kivi_model::tokenizer::{GgufTokenizerSpec, Tokenizer};
use kivi_model::ModelError;
use kivi_server::{AppState, ServerConfig, DEFAULT_BODY_LIMIT};

use crate::device::{Device, DeviceArgs};
use crate::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer <KEY>` on every endpoint but /health.
    #[arg(long)]
    api_key: Option<String>,
    /// KV-cache memory budget, e.g. 512M, 2G, or bytes. CPU default: no limit. GPU: the whole
    /// GPU cache (the full-precision windows of --max-running slots + the block pool), allocated
    /// at start; default 90% of the device memory free after loading, less the activation
    /// workspace.
    #[arg(long, value_parser = parse_size)]
    kv_memory: Option<u64>,
    /// Most sequences decoded together (on the GPU: the cache's sequence slots).
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Most requests queued for admission; beyond it requests get 429.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Most tokens in one forward pass (decode tokens + a prefill chunk).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Model id reported by /v1/models and in responses (default: the model file's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = DEFAULT_BODY_LIMIT)]
    max_body_bytes: usize,
}

/// `512M`, `2G`, `1.5GiB`, `1000000`: bytes (K/M/G are powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 512M, 2G, 1000000)"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("`{s}` must be a positive size"));
    }
    Ok((v * mult as f64) as u64)
}

/// A tokenizer for `--random-weights` (no model file): byte-level BPE without merges, so text
/// is its UTF-8 bytes as token ids 0..256, and every other id decodes to `<tN>`. No EOS.
fn random_weights_tokenizer(vocab: usize) -> Result<Tokenizer> {
    if vocab < 256 {
        bail!("--random-weights serving needs a vocabulary of at least 256 tokens, not {vocab}");
    }
    // GPT-2's byte-to-character map: printable bytes stand for themselves, the others for
    // characters from U+0100 on, in byte order.
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    let mut tokens: Vec<String> = (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("below U+0200").to_string()
        })
        .collect();
    tokens.extend((256..vocab).map(|i| format!("<t{i}>")));
    let spec = GgufTokenizerSpec {
        model: "gpt2".into(),
        tokens,
        ..Default::default()
    };
    Ok(Tokenizer::from_spec(&spec)?)
}

/// What the server needs from the loaded model.
struct Started {
    engine: Engine,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// The model file's name, or RANDOM WEIGHTS and the preset.
    name: String,
    /// Where it runs and the KV budget, for the start line.
    placement: String,
}

fn start_cpu(a: &ServeArgs, config: EngineConfig) -> Result<Started> {
    let budget = match config.kv_memory_bytes {
        Some(b) => format!("KV budget {:.3} GiB", gib(b)),
        None => "no KV budget".into(),
    };
    let placement = format!("cpu, {budget}");
    if a.device.random_weights {
        let c = a.device.preset()?;
        let tokenizer = random_weights_tokenizer(c.vocab)?;
        let src = kivi_model::random::RandomWeights::new(
            &c,
            kivi_model::tensor::DType::F16,
            a.device.weight_seed,
        )?;
        let model = kivi_model::llama::Model::load(&src, kivi_model::llama::Naming::Gguf, c)?;
        let engine = Engine::start(Arc::new(model), config).context("starting the engine")?;
        return Ok(Started {
            engine,
            tokenizer,
            template: ChatTemplate::chatml(),
            name: format!("random-{}", a.device.arch),
            placement,
        });
    }
    let loaded = a.model.load()?;
    let engine = Engine::start(Arc::new(loaded.model), config).context("starting the engine")?;
    Ok(Started {
        engine,
        tokenizer: loaded.tokenizer,
        template: loaded.chat_template,
        name: loaded.name,
        placement,
    })
}

/// The model on the GPU and an engine over a `GpuRunner` whose cache takes `--kv-memory`
/// (windows of `--max-running` slots + the block pool); the scheduler's budget is the pool.
fn start_cuda(
    a: &ServeArgs,
    gpu: Arc<kivi_cuda::Gpu>,
    mut config: EngineConfig,
) -> Result<Started> {
    // Steps reuse the pool's freed activations instead of mapping them again.
    gpu.retain_freed_memory()?;
    let (model, tokenizer, template, name) =
        crate::device::load_cuda(gpu.clone(), &a.device, a.model.model.clone())?;
    gpu.trim_pool()?;
    let c = model.config.clone();
    let (tokenizer, template, name) = match (tokenizer, template) {
        (Some(t), Some(tm)) => (t, tm, name),
        _ => (
            random_weights_tokenizer(c.vocab)?,
            ChatTemplate::chatml(),
            format!("random-{}", a.device.arch),
        ),
    };
    let (used, total) = gpu.memory_info()?;
    let free = total.saturating_sub(used);
    let workspace = crate::throughput::gpu_workspace(&c, a.max_batch_tokens, a.max_running);
    let kv_bytes = match a.kv_memory {
        Some(b) => b,
        None => (free / 10 * 9)
            .checked_sub(workspace)
            .filter(|&b| b > 0)
            .with_context(|| {
                format!(
                    "{:.2} GiB of device memory free after loading: nothing left for the KV cache \
                 beside the {:.2} GiB activation workspace",
                    gib(free),
                    gib(workspace)
                )
            })?,
    };
    let (cache, slots, shape) = (
        config.cache,
        a.max_running,
        kivi_model::runner::cache_shape(&c),
    );
    // The server's engine owns the model until the process ends.
    let model: &'static CudaModel = Box::leak(Box::new(model));
    let new_runner = move || -> kivi_model::Result<GpuRunner<'static>> {
        let cache = GpuCache::with_budget(gpu.clone(), cache, shape, kv_bytes, slots)
            .map_err(|e| ModelError::Backend(e.to_string()))?;
        // Compile the attention kernels before the first request, not during it.
        cache
            .prepare(model.config.n_head)
            .map_err(|e| ModelError::Backend(e.to_string()))?;
        Ok(GpuRunner::new(model, cache))
    };
    let first = new_runner().context("allocating the GPU KV cache")?;
    let (blocks, block_bytes) = (first.cache().pool_blocks(), first.cache().block_bytes());
    let windows = first.cache().window_bytes_per_seq();
    config.kv_memory_bytes = Some(blocks as u64 * block_bytes);
    let placement = format!(
        "{}, KV cache {:.2} GiB = {slots} slots x {windows} B windows + {blocks} blocks x \
         {block_bytes} B (device memory free after the weights {:.2} GiB, activation \
         workspace {:.2} GiB)",
        model.backend.gpu().describe(),
        gib(kv_bytes),
        gib(free),
        gib(workspace)
    );
    // The first runner, then a new one after an internal failure (the engine drops the old
    // one first, so the pool's memory is free again).
    let mut first = Some(first);
    let make = move || match first.take() {
        Some(r) => Ok(r),
        None => new_runner(),
    };
    let engine = Engine::start_with(make, config).context("starting the engine")?;
    Ok(Started {
        engine,
        tokenizer,
        template,
        name,
        placement,
    })
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_running == 0 || a.max_waiting == 0 || a.max_batch_tokens < 2 {
        bail!("--max-running and --max-waiting must be at least 1, --max-batch-tokens at least 2");
    }
    if a.api_key.as_deref() == Some("") {
        bail!("--api-key must not be empty");
    }
    let cache: CacheConfig = a.model.cache_config()?;
    let kv_label = format_kv(&cache);
    let config = EngineConfig {
        cache,
        kv_memory_bytes: a.kv_memory,
        max_running: a.max_running,
        max_waiting: a.max_waiting,
        max_batch_tokens: a.max_batch_tokens,
        prefill_chunk: a.model.prefill_chunk,
    };
    let started = match a.device.pick()? {
        Device::Cpu => start_cpu(&a, config)?,
        Device::Cuda(gpu) => start_cuda(&a, gpu, config)?,
    };
    let Started {
        engine,
        tokenizer,
        template,
        name,
        placement,
    } = started;
    let model_name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| name.strip_suffix(".gguf").unwrap_or(&name).to_string());
    let state = AppState::new(
        engine.clone(),
        tokenizer,
        template,
        ServerConfig {
            model_name: model_name.clone(),
            api_key: a.api_key.clone(),
            body_limit: a.max_body_bytes,
        },
    );
    // HTTP runs on this (non-pool) thread; the engine's loop and kernels run on the rayon pool.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("listening on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "kivi serve: {model_name} on {placement}, KV cache {kv_label}{}; listening on http://{addr} (Ctrl-C stops)",
            if a.api_key.is_some() { ", API key required" } else { "" }
        );
        let shutdown_engine = engine.clone();
        let shutdown = async move {
            kivi_server::shutdown_signal().await;
            let s = shutdown_engine.stats();
            eprintln!(
                "kivi serve: shutting down; finishing {} running and {} waiting requests (again to quit now)",
                s.running, s.waiting
            );
            tokio::spawn(async {
                kivi_server::shutdown_signal().await;
                eprintln!("kivi serve: stopped without finishing");
                std::process::exit(130);
            });
        };
        kivi_server::serve(listener, state, shutdown)
            .await
            .context("serving")
    });
    // Every HTTP answer is complete here; let the engine stop its loop.
    engine.shutdown();
    served?;
    eprintln!("kivi serve: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_size, random_weights_tokenizer};

    #[test]
    fn the_random_weights_tokenizer_is_bytes_and_named_ids() {
        let t = random_weights_tokenizer(1000).unwrap();
        let text = "héllo, wörld\n\t~ <t300>";
        let ids = t.encode(text, true).unwrap();
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, bytes);
        assert_eq!(t.decode(&ids).unwrap(), text);
        assert_eq!(t.decode(&[104, 105, 300, 999]).unwrap(), "hi<t300><t999>");
        assert!(t.eos_ids().is_empty());
        assert!(random_weights_tokenizer(255).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("64kb"), Ok(64 << 10));
        for bad in ["", "x", "-1G", "0", "nanM"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
