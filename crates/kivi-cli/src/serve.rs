//! `kivi serve`: the OpenAI-compatible HTTP server (crate `kivi-server`) on the
//! continuous-batching engine.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use kivi_engine::engine::{Engine, EngineConfig};
use kivi_engine::kv_spec::format_kv;
use kivi_server::{AppState, ServerConfig, DEFAULT_BODY_LIMIT};

use crate::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer <KEY>` on every endpoint but /health.
    #[arg(long)]
    api_key: Option<String>,
    /// KV-cache memory budget, e.g. 512M, 2G, or bytes (default: no limit).
    #[arg(long, value_parser = parse_size)]
    kv_memory: Option<u64>,
    /// Most sequences decoded together.
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

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_running == 0 || a.max_waiting == 0 || a.max_batch_tokens < 2 {
        bail!("--max-running and --max-waiting must be at least 1, --max-batch-tokens at least 2");
    }
    if a.api_key.as_deref() == Some("") {
        bail!("--api-key must not be empty");
    }
    let cache = a.model.cache_config()?;
    let loaded = a.model.load()?;
    let model_name = a.served_model_name.clone().unwrap_or_else(|| {
        loaded
            .name
            .strip_suffix(".gguf")
            .unwrap_or(&loaded.name)
            .to_string()
    });
    let kv_label = format_kv(&cache);
    let config = EngineConfig {
        cache,
        kv_memory_bytes: a.kv_memory,
        max_running: a.max_running,
        max_waiting: a.max_waiting,
        max_batch_tokens: a.max_batch_tokens,
        prefill_chunk: a.model.prefill_chunk,
    };
    let engine = Engine::start(Arc::new(loaded.model), config).context("starting the engine")?;
    let state = AppState::new(
        engine.clone(),
        loaded.tokenizer,
        loaded.chat_template,
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
            "kivi serve: {model_name}, KV cache {kv_label}{}; listening on http://{addr} (Ctrl-C stops)",
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
    use super::parse_size;

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
