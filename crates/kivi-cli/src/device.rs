//! `--device` and `--random-weights` for `kivi generate` and `kivi bench model`: device choice,
//! and generation / benchmarking of the one model definition (`kivi_model::llama::Llama`) on
//! the CUDA backend.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use kivi_core::{CacheConfig, CacheShape, SeqId};
use kivi_cuda::{CudaBackend, CudaModel, GpuCache};
use kivi_engine::{GenerateParams, GenerationStats, Sampler, StopReason};
use kivi_model::config::Config;
use kivi_model::llama::{BatchItem, Logits};

/// Where the model runs.
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// auto (CUDA when a driver and a GPU are present, else CPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Random weights with the shapes of `--arch` instead of a model file (speed and memory
    /// measurements; output is labelled RANDOM WEIGHTS; EOS is ignored).
    #[arg(long)]
    pub random_weights: bool,
    /// Shape preset for --random-weights: llama2-7b, llama3-8b, mistral-7b, smollm2-135m, tiny.
    #[arg(long, default_value = "smollm2-135m")]
    pub arch: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 1)]
    pub weight_seed: u64,
    /// 16-bit type of the weights and GEMM inputs on the GPU: f16, or bf16 (f32's range: for
    /// models whose activations overflow f16, e.g. some Qwen2 checkpoints).
    #[arg(long, default_value = "f16", value_parser = ["f16", "bf16"])]
    pub gpu_dtype: String,
}

pub enum Device {
    Cpu,
    Cuda(Arc<kivi_cuda::Gpu>),
}

impl DeviceArgs {
    /// Resolves `--device`, saying on stderr which device runs and why.
    pub fn pick(&self) -> Result<Device> {
        let picked = self.pick_device()?;
        if matches!(picked, Device::Cpu) && self.gpu_dtype != "f16" {
            eprintln!(
                "[device] note: --gpu-dtype {} applies to the GPU only (the CPU computes in f32)",
                self.gpu_dtype
            );
        }
        Ok(picked)
    }

    fn pick_device(&self) -> Result<Device> {
        match self.device.as_str() {
            "cpu" => {
                eprintln!("[device] cpu");
                Ok(Device::Cpu)
            }
            "cuda" => match kivi_cuda::Gpu::new(0) {
                Ok(g) => {
                    eprintln!("[device] cuda: {}", g.describe());
                    Ok(Device::Cuda(g))
                }
                Err(e) => bail!("{e} (--device cuda needs an NVIDIA driver and GPU; --device cpu runs on the CPU)"),
            },
            "auto" => match kivi_cuda::Gpu::new(0) {
                Ok(g) => {
                    eprintln!("[device] cuda: {} (auto; --device cpu to use the CPU)", g.describe());
                    Ok(Device::Cuda(g))
                }
                Err(e) => {
                    eprintln!("[device] cpu (auto: {e})");
                    Ok(Device::Cpu)
                }
            },
            other => bail!("unknown --device `{other}` (auto, cpu, cuda)"),
        }
    }

    pub fn preset(&self) -> Result<Config> {
        Ok(kivi_model::random::preset(&self.arch)?)
    }
}

/// The GPU cache shape of a model.
fn cache_shape(c: &Config) -> CacheShape {
    CacheShape {
        n_layer: c.n_layer,
        n_kv_head: c.n_kv_head,
        head_dim: c.head_dim,
    }
}

/// Greedy, and sampling with the sampler's own draw, on the GPU (only the token id comes back);
/// with `on_device` false (`KIVI_CUDA_DEVICE_SAMPLING=0`) the logits are copied back and the
/// engine's sampler (temperature, top-k, top-p) picks.
fn pick_token(
    model: &CudaModel,
    logits: &cudarc::driver::CudaSlice<f32>,
    sampler: &mut Option<Sampler>,
    on_device: bool,
) -> Result<u32> {
    let vocab = model.config.vocab;
    Ok(match sampler {
        None => model.backend.argmax(logits, 1, vocab)?[0],
        Some(s) if on_device => {
            let p = s.params();
            let spec = kivi_model::runner::SampleSpec {
                temperature: p.temperature,
                top_k: p.top_k,
                top_p: p.top_p,
                u: s.draw(),
            };
            model.backend.sample_rows(logits, vocab, &[(0, spec)])?[0]
        }
        Some(s) => {
            let host = model.backend.to_host(logits)?;
            s.sample(&host[..vocab])
        }
    })
}

/// Generates on the GPU: chunked prefill, then one token per step; `on_token` returns false to
/// stop. One sequence, a cache sized for prompt + max_tokens.
pub fn generate_cuda(
    model: &CudaModel,
    cache_cfg: &CacheConfig,
    prompt: &[u32],
    params: &GenerateParams,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, GenerationStats)> {
    let c = &model.config;
    if prompt.is_empty() {
        bail!("empty prompt");
    }
    let total = (prompt.len() + params.max_tokens).min(c.context_len);
    if prompt.len() > c.context_len {
        bail!(
            "prompt of {} tokens does not fit the context window of {} tokens",
            prompt.len(),
            c.context_len
        );
    }
    let gpu = model.backend.gpu().clone();
    let mut cache = GpuCache::new(gpu.clone(), *cache_cfg, cache_shape(c), 1, total)?;
    cache.prepare(c.n_head)?;
    let seq = SeqId(cache.add_sequence()? as u64);
    let mut sampler = (params.sampling.temperature > 0.0).then(|| Sampler::new(params.sampling));
    let sample_on_device = kivi_cuda::model::device_sampling_default();
    let t0 = Instant::now();
    let mut next = 0;
    for chunk in prompt.chunks(params.prefill_chunk.max(1)) {
        let item = BatchItem {
            seq,
            tokens: chunk,
            logits: Logits::Last,
        };
        let (logits, _) = model
            .forward_rows(&[item], &mut cache)?
            .expect("chunk is not empty");
        if chunk.as_ptr_range().end == prompt.as_ptr_range().end {
            next = pick_token(model, &logits, &mut sampler, sample_on_device)?;
        }
    }
    gpu.synchronize()?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut out = Vec::new();
    let stop = loop {
        if params.stop_at_eos && eos.contains(&next) {
            break StopReason::Eos;
        }
        out.push(next);
        if !on_token(next) {
            break StopReason::Cancelled;
        }
        if out.len() >= params.max_tokens {
            break StopReason::MaxTokens;
        }
        if prompt.len() + out.len() >= c.context_len {
            break StopReason::ContextFull;
        }
        let item = BatchItem {
            seq,
            tokens: std::slice::from_ref(&next),
            logits: Logits::Last,
        };
        let (logits, _) = model.forward_rows(&[item], &mut cache)?.expect("one token");
        next = pick_token(model, &logits, &mut sampler, sample_on_device)?;
    };
    let stats = GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: out.len(),
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
        stop,
    };
    Ok((out, stats))
}

/// `kivi bench model --device cuda`: prefill and decode tokens/s per cache and depth.
#[allow(clippy::too_many_arguments)]
pub fn bench_cuda(
    model: &CudaModel,
    caches: &[CacheConfig],
    depths: &[usize],
    prompt_tokens: usize,
    gen_tokens: usize,
    prefill_chunk: usize,
    ids: &mut dyn FnMut(usize) -> Vec<u32>,
    label: &str,
) -> Result<()> {
    let c = &model.config;
    let gpu = model.backend.gpu().clone();
    println!(
        "model: {label}, {}, prompt {prompt_tokens} tok, decode {gen_tokens} tok, weights f16 ({:.2} GB)",
        gpu.describe(),
        model.weight_bytes() as f64 / 1e9
    );
    println!("| cache | depth | prefill tok/s | decode tok/s | decode ms/tok |");
    println!("|---|---|---|---|---|");
    for &depth in depths {
        let fill = ids(depth);
        let prompt = ids(prompt_tokens);
        let gen = ids(gen_tokens);
        for cfg in caches {
            let cap = depth + prompt_tokens + gen_tokens;
            let mut cache = GpuCache::new(gpu.clone(), *cfg, cache_shape(c), 1, cap)?;
            cache.prepare(c.n_head)?;
            let seq = SeqId(cache.add_sequence()? as u64);
            let run = |tokens: &[u32], chunk: usize, cache: &mut GpuCache| -> Result<()> {
                for part in tokens.chunks(chunk.max(1)) {
                    let item = BatchItem {
                        seq,
                        tokens: part,
                        logits: Logits::Last,
                    };
                    let (logits, _) = model.forward_rows(&[item], cache)?.expect("not empty");
                    // The token a generator would pick; also waits for the GPU.
                    model.backend.argmax(&logits, 1, c.vocab)?;
                }
                Ok(())
            };
            run(&fill, prefill_chunk, &mut cache)?;
            let t = Instant::now();
            run(&prompt, prefill_chunk, &mut cache)?;
            let prefill = prompt_tokens as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            run(&gen, 1, &mut cache)?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "| {} | {depth} | {prefill:.1} | {:.1} | {:.3} |",
                kivi_engine::kv_spec::format_kv(cfg),
                gen_tokens as f64 / secs,
                secs * 1e3 / gen_tokens as f64
            );
        }
    }
    eprintln!("CUDA graphs: {}", model.backend.graph_stats());
    Ok(())
}

/// Loads the model for the GPU: a file (weights converted to `--gpu-dtype` and uploaded) or
/// random weights made on the GPU.
pub fn load_cuda(
    gpu: Arc<kivi_cuda::Gpu>,
    dev: &DeviceArgs,
    path: Option<std::path::PathBuf>,
) -> Result<(
    CudaModel,
    Option<kivi_model::tokenizer::Tokenizer>,
    Option<kivi_model::chat::ChatTemplate>,
    String,
)> {
    let half = kivi_cuda::HalfType::parse(&dev.gpu_dtype)
        .ok_or_else(|| anyhow::anyhow!("--gpu-dtype {}: f16 or bf16", dev.gpu_dtype))?;
    let backend = CudaBackend::with_half(gpu, half)?;
    if dev.random_weights {
        let config = dev.preset()?;
        let model = kivi_cuda::random_model(backend, config, dev.weight_seed)?;
        return Ok((model, None, None, format!("RANDOM WEIGHTS {}", dev.arch)));
    }
    let path = match path {
        Some(p) => p,
        None => crate::fetch::default_model_path()?,
    };
    let m = kivi_model::loader::load_on(backend, &path)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
    Ok((m.model, Some(m.tokenizer), Some(m.chat_template), m.name))
}
