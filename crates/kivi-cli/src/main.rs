//! `kivi`: run Llama-family models with a KIVI-compressed KV cache.

mod bench;
mod bench_attention;
mod device;
mod eval;
mod fetch;
mod humaneval;
mod inspect;
mod passkey;
mod serve;
mod throughput;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kivi_core::{Axis, CacheConfig, KvCache};
use kivi_engine::kv_spec::{format_kv, parse_kv};
use kivi_engine::{GenerateParams, GenerationStats, SamplingParams, Session};
use kivi_model::chat::ChatMessage as Message;
use kivi_model::loader::{load, LoadedModel};

#[derive(Parser)]
#[command(
    name = "kivi",
    version,
    about = "LLM inference with a KIVI 2/4-bit KV cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt, streaming text to stdout.
    Generate(GenerateArgs),
    /// Interactive chat using the model's chat template (`/reset` starts over, `/exit` quits).
    Chat(ChatArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Quality evaluation of KV cache configurations.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Plot per-channel magnitudes of post-RoPE keys and values (the KIVI paper's Figure 2).
    Inspect(inspect::InspectArgs),
    /// OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /metrics) on the
    /// continuous-batching engine.
    Serve(serve::ServeArgs),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Perplexity, ΔPPL, KL and top-1 agreement against the f16 cache, decode-mode.
    Ppl(eval::EvalPplArgs),
    /// Passkey retrieval accuracy per (length, depth) in a Paul Graham haystack, with a heatmap.
    Passkey(passkey::EvalPasskeyArgs),
    /// HumanEval pass@1 (greedy) per cache; candidate code runs in a sandboxed subprocess.
    Humaneval(humaneval::EvalHumanevalArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode tokens/s at several context depths, for several caches.
    Model(bench::BenchModelArgs),
    /// One layer's decode attention on the GPU: f16 vs KIVI caches, time and GB/s.
    Attention(bench_attention::BenchAttentionArgs),
    /// Throughput vs batch size under a KV memory budget, per cache (the paper's Figure 5).
    Throughput(throughput::BenchThroughputArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// GGUF file or Hugging Face safetensors directory. Default: SmolLM2-135M-Instruct (fetched
    /// on first use into $KIVI_CACHE, default ~/.cache/kivi).
    #[arg(long)]
    model: Option<PathBuf>,
    /// KV cache: f16, kivi2, kivi4, k<b>v<b>, with options :g<G> :r<R> :sink<S> :kt :vc.
    #[arg(long, default_value = "kivi2")]
    kv: String,
    /// Override key bits (2, 4, 8).
    #[arg(long)]
    k_bits: Option<u8>,
    /// Override value bits (2, 4, 8).
    #[arg(long)]
    v_bits: Option<u8>,
    /// Override the quantization group size G.
    #[arg(long)]
    group_size: Option<usize>,
    /// Override the full-precision window R (0 = quantize everything).
    #[arg(long)]
    residual: Option<usize>,
    /// Keep the first N tokens of each sequence in f16.
    #[arg(long)]
    sink_tokens: Option<usize>,
    /// Prompt tokens per forward pass during prefill.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
}

#[derive(Args)]
struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = no top-k cut.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating after an end-of-sequence token (benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print prefill/decode tokens per second and KV cache bytes to stderr at the end.
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: device::DeviceArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as one user message.
    #[arg(long)]
    chat_template: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// System prompt (default: the template's own, if any).
    #[arg(long)]
    system: Option<String>,
}

impl ModelArgs {
    fn cache_config(&self) -> Result<CacheConfig> {
        let mut cfg = parse_kv(&self.kv).map_err(anyhow::Error::msg)?;
        let overrides = [
            self.k_bits.is_some(),
            self.v_bits.is_some(),
            self.group_size.is_some(),
            self.residual.is_some(),
            self.sink_tokens.is_some(),
        ];
        if let CacheConfig::Kivi(c) = &mut cfg {
            c.k_bits = self.k_bits.unwrap_or(c.k_bits);
            c.v_bits = self.v_bits.unwrap_or(c.v_bits);
            c.group_size = self.group_size.unwrap_or(c.group_size);
            c.residual_len = self.residual.unwrap_or(c.residual_len);
            c.sink_tokens = self.sink_tokens.unwrap_or(c.sink_tokens);
        } else if overrides.iter().any(|&o| o) {
            bail!("--k-bits/--v-bits/--group-size/--residual/--sink-tokens need a KIVI cache (--kv kivi2 ...)");
        }
        Ok(cfg)
    }

    fn load(&self) -> Result<LoadedModel> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => fetch::default_model_path()?,
        };
        load(&path).with_context(|| format!("loading {}", path.display()))
    }
}

impl SamplingArgs {
    fn params(&self, prefill_chunk: usize) -> Result<GenerateParams> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("--temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
        if prefill_chunk == 0 {
            bail!("--prefill-chunk must be at least 1");
        }
        Ok(GenerateParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            prefill_chunk,
            stop_at_eos: !self.ignore_eos,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = cli.threads {
        pool = pool.num_threads(n.max(1));
    }
    if let Err(e) = pool.build_global() {
        eprintln!("error: setting up the thread pool: {e}");
        return ExitCode::FAILURE;
    }
    // Run the command on a pool thread: each matmul and attention call then forks from a
    // worker (cheap) instead of handing work across threads and sleeping (decode makes
    // ~300 parallel calls per token).
    let result = match cli.command {
        // The server's HTTP thread must not be a pool thread: the engine's loop and kernels
        // need every pool thread.
        Command::Serve(a) => serve::run(a),
        command => rayon::scope(|_| run(command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Generate(a) => generate(a),
        Command::Chat(a) => chat(a),
        Command::Bench(BenchCommand::Model(a)) => bench::bench_model(a),
        Command::Bench(BenchCommand::Attention(a)) => bench_attention::bench_attention(a),
        Command::Bench(BenchCommand::Throughput(a)) => throughput::run(a),
        Command::Eval(EvalCommand::Ppl(a)) => eval::run(a),
        Command::Eval(EvalCommand::Passkey(a)) => passkey::run(a),
        Command::Eval(EvalCommand::Humaneval(a)) => humaneval::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Serve(a) => serve::run(a),
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    let cache_cfg = a.model.cache_config()?;
    let mut params = a.sampling.params(a.model.prefill_chunk)?;
    let dev = a.device.pick()?;
    if a.device.random_weights {
        // Speed and memory do not depend on the weights as long as generation ignores EOS.
        params.stop_at_eos = false;
        return generate_random(&a, dev, &cache_cfg, &params);
    }
    if let device::Device::Cuda(gpu) = dev {
        let (model, tok, tmpl, _) = device::load_cuda(gpu, &a.device, a.model.model.clone())?;
        let (tok, tmpl) = (
            tok.expect("file models have a tokenizer"),
            tmpl.expect("and a template"),
        );
        let text = if a.chat_template {
            tmpl.render(&[Message::user(&a.prompt)], true)?
        } else {
            a.prompt.clone()
        };
        let prompt = tok.encode(&text, true)?;
        check_prompt_fits(prompt.len(), model.config.context_len)?;
        let mut stream = tok.stream();
        let mut stdout = std::io::stdout().lock();
        if !a.chat_template {
            write!(stdout, "{}", a.prompt)?;
        }
        let (_, stats) =
            device::generate_cuda(&model, &cache_cfg, &prompt, &params, tok.eos_ids(), |t| {
                let piece = stream.push(t);
                write!(stdout, "{piece}")
                    .and_then(|_| stdout.flush())
                    .is_ok()
            })?;
        writeln!(stdout, "{}", stream.finish())?;
        if a.sampling.stats {
            print_gpu_stats(&stats, &cache_cfg, "");
            eprintln!("CUDA graphs: {}", model.backend.graph_stats());
        }
        return Ok(());
    }
    let m = a.model.load()?;
    let mut session = Session::new(&m.model, &cache_cfg)?;
    let text = if a.chat_template {
        m.chat_template.render(&[Message::user(&a.prompt)], true)?
    } else {
        a.prompt.clone()
    };
    let prompt = m.tokenizer.encode(&text, true)?;
    check_prompt_fits(prompt.len(), m.model.config.context_len)?;
    let eos = m.tokenizer.eos_ids().to_vec();
    let mut stream = m.tokenizer.stream();
    let mut stdout = std::io::stdout().lock();
    if !a.chat_template {
        write!(stdout, "{}", a.prompt)?;
    }
    let (_, stats) = session.generate(&prompt, &params, &eos, |t| {
        let piece = stream.push(t);
        write!(stdout, "{piece}")
            .and_then(|_| stdout.flush())
            .is_ok()
    })?;
    writeln!(stdout, "{}", stream.finish())?;
    if a.sampling.stats {
        print_stats(&stats, session.cache(), &cache_cfg, &m);
    }
    Ok(())
}

/// Before the prompt is echoed: a prompt over the context window is an error, not a screenful
/// of the user's own text followed by one (the error the model would give).
fn check_prompt_fits(prompt: usize, context: usize) -> Result<()> {
    if prompt > context {
        return Err(kivi_model::ModelError::ContextOverflow { prompt, context }.into());
    }
    Ok(())
}

/// `--random-weights`: no tokenizer, so the prompt's bytes are the token ids and the output is
/// token ids, all labelled RANDOM WEIGHTS.
fn generate_random(
    a: &GenerateArgs,
    dev: device::Device,
    cache_cfg: &CacheConfig,
    params: &kivi_engine::GenerateParams,
) -> Result<()> {
    let label = format!("RANDOM WEIGHTS ({})", a.device.arch);
    let config = a.device.preset()?;
    let prompt: Vec<u32> = a
        .prompt
        .bytes()
        .map(|b| b as u32 % config.vocab as u32)
        .collect();
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{label}: prompt = the {} bytes of --prompt as token ids; generated token ids:",
        prompt.len()
    )?;
    let mut emit = |t: u32| write!(stdout, "{t} ").and_then(|_| stdout.flush()).is_ok();
    let stats = match dev {
        device::Device::Cuda(gpu) => {
            let (model, ..) = device::load_cuda(gpu, &a.device, None)?;
            device::generate_cuda(&model, cache_cfg, &prompt, params, &[], &mut emit)?.1
        }
        device::Device::Cpu => {
            let src = kivi_model::random::RandomWeights::new(
                &config,
                kivi_model::tensor::DType::F16,
                a.device.weight_seed,
            )?;
            let model =
                kivi_model::llama::Model::load(&src, kivi_model::llama::Naming::Gguf, config)?;
            let mut session = Session::new(&model, cache_cfg)?;
            session.generate(&prompt, params, &[], &mut emit)?.1
        }
    };
    writeln!(stdout)?;
    if a.sampling.stats {
        print_gpu_stats(&stats, cache_cfg, &label);
    }
    Ok(())
}

fn print_gpu_stats(s: &GenerationStats, cfg: &CacheConfig, label: &str) {
    eprintln!(
        "\n[stats] {label}{}prompt {} tok, prefill {:.1} tok/s | generated {} tok, decode {:.1} tok/s | stop: {:?} | KV cache {}",
        if label.is_empty() { "" } else { ": " },
        s.prompt_tokens,
        s.prefill_tok_s(),
        s.generated_tokens,
        s.decode_tok_s(),
        s.stop,
        format_kv(cfg)
    );
}

fn chat(a: ChatArgs) -> Result<()> {
    let cache_cfg = a.model.cache_config()?;
    let params = a.sampling.params(a.model.prefill_chunk)?;
    let m = a.model.load()?;
    let mut session = Session::new(&m.model, &cache_cfg)?;
    let mut messages: Vec<Message> = a.system.iter().map(Message::system).collect();
    let eos = m.tokenizer.eos_ids().to_vec();
    eprintln!(
        "kivi chat: {} ({}), KV cache {}. /reset starts over, /exit or Ctrl-D quits.",
        m.name,
        m.model.config.arch.name(),
        format_kv(&cache_cfg)
    );
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.truncate(usize::from(a.system.is_some()));
                session.reset()?;
                continue;
            }
            _ => {}
        }
        messages.push(Message::user(input));
        let text = m.chat_template.render(&messages, true)?;
        let all = m.tokenizer.encode(&text, true)?;
        // Reuse the cache when the conversation so far is a prefix of the new prompt.
        let fed = session.tokens();
        let new = if all.len() > fed.len() && all[..fed.len()] == *fed {
            all[fed.len()..].to_vec()
        } else {
            session.reset()?;
            all
        };
        let mut stream = m.tokenizer.stream();
        let mut reply_ids = Vec::new();
        let mut stdout = std::io::stdout().lock();
        let result = session.generate(&new, &params, &eos, |t| {
            reply_ids.push(t);
            let piece = stream.push(t);
            write!(stdout, "{piece}")
                .and_then(|_| stdout.flush())
                .is_ok()
        });
        let stats = match result {
            Ok((_, stats)) => stats,
            Err(e) => {
                // A full context is not fatal for the conversation: say so and start over.
                eprintln!("\nerror: {e}. Use /reset to start a new conversation.");
                messages.pop();
                continue;
            }
        };
        writeln!(stdout, "{}", stream.finish())?;
        messages.push(Message::assistant(&m.tokenizer.decode(&reply_ids)?));
        if a.sampling.stats {
            print_stats(&stats, session.cache(), &cache_cfg, &m);
        }
    }
    Ok(())
}

fn print_stats(s: &GenerationStats, cache: &dyn KvCache, cfg: &CacheConfig, m: &LoadedModel) {
    let mem = cache.memory();
    let c = &m.model.config;
    let f16_bytes = mem.tokens * (2 * c.kv_dim() * 2) as u64;
    let kv = format_kv(cfg);
    let axes = match cfg {
        CacheConfig::Kivi(k) if k.k_axis != Axis::PerChannel || k.v_axis != Axis::PerToken => {
            " (ablation axes)"
        }
        _ => "",
    };
    eprintln!(
        "\n[stats] prompt {} tok, prefill {:.1} tok/s | generated {} tok, decode {:.1} tok/s | stop: {:?}",
        s.prompt_tokens,
        s.prefill_tok_s(),
        s.generated_tokens,
        s.decode_tok_s(),
        s.stop
    );
    eprintln!(
        "[stats] KV cache {kv}{axes}: {} bytes for {} tokens x {} layers (codes {}, scales {}, mins {}, f16 {}); f16 cache would be {} bytes ({:.2}x)",
        mem.total_bytes(),
        mem.tokens / c.n_layer as u64,
        c.n_layer,
        mem.code_bytes,
        mem.scale_bytes,
        mem.min_bytes,
        mem.full_precision_bytes,
        f16_bytes,
        f16_bytes as f64 / mem.total_bytes().max(1) as f64,
    );
}
