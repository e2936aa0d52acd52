//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use crate::gguf::Gguf;
use crate::{ModelError, Result};

/// Architectures we run. Qwen2 is Llama plus QKV biases and half-split (NEOX) RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn from_name(name: &str) -> Result<Arch> {
        match name {
            "llama" | "mistral" | "LlamaForCausalLM" | "MistralForCausalLM" => Ok(Arch::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Arch::Qwen2),
            other => Err(ModelError::UnknownArch(other.to_string())),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// How RoPE pairs up the channels of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate adjacent pairs `(x[2i], x[2i+1])`. GGUF Llama files use this: llama.cpp's converter
    /// permutes the Q/K rows of the Hugging Face checkpoint so that this equals HF's rotation.
    Interleaved,
    /// Rotate `(x[i], x[i + d/2])`: Hugging Face Llama checkpoints and Qwen2 everywhere.
    Neox,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context_len: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub qkv_bias: bool,
}

/// Upper bounds that keep a hostile file from making us allocate absurd buffers.
const MAX_DIM: u64 = 1 << 20;
const MAX_LAYERS: u64 = 1024;
const MAX_CONTEXT: u64 = 1 << 24;

fn bounded(name: &str, v: u64, max: u64) -> Result<usize> {
    if v == 0 || v > max {
        return Err(ModelError::format(
            "model",
            name,
            format!("{v} is out of range 1..={max}"),
        ));
    }
    Ok(v as usize)
}

impl Config {
    pub fn from_gguf(g: &Gguf) -> Result<Config> {
        let arch_name = g.architecture()?.to_string();
        let arch = Arch::from_name(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let n_layer = bounded("block_count", g.get_u64(&key("block_count"))?, MAX_LAYERS)?;
        let hidden = bounded(
            "embedding_length",
            g.get_u64(&key("embedding_length"))?,
            MAX_DIM,
        )?;
        let n_head = bounded(
            "attention.head_count",
            g.get_u64(&key("attention.head_count"))?,
            MAX_DIM,
        )?;
        let n_kv_head = match g.get_u64(&key("attention.head_count_kv")) {
            Ok(v) => bounded("attention.head_count_kv", v, MAX_DIM)?,
            Err(ModelError::MissingMetadata(_)) => n_head,
            Err(e) => return Err(e),
        };
        let ffn = bounded(
            "feed_forward_length",
            g.get_u64(&key("feed_forward_length"))?,
            MAX_DIM,
        )?;
        let context_len = bounded(
            "context_length",
            g.get_u64(&key("context_length"))?,
            MAX_CONTEXT,
        )?;
        let rms_eps = g.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        let rope_theta = match g.get_f32(&key("rope.freq_base")) {
            Ok(v) => v,
            Err(ModelError::MissingMetadata(_)) => 10_000.0,
            Err(e) => return Err(e),
        };
        let head_dim = match g.get_u64(&key("attention.key_length")) {
            Ok(v) => bounded("attention.key_length", v, MAX_DIM)?,
            Err(ModelError::MissingMetadata(_)) => hidden / n_head,
            Err(e) => return Err(e),
        };
        let vocab = match g.get_u64(&key("vocab_size")) {
            Ok(v) => bounded("vocab_size", v, 1 << 24)?,
            Err(ModelError::MissingMetadata(_)) => {
                let n = g.get_str_array("tokenizer.ggml.tokens")?.len();
                bounded("tokenizer.ggml.tokens", n as u64, 1 << 24)?
            }
            Err(e) => return Err(e),
        };
        let cfg = Config {
            arch,
            n_layer,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            ffn,
            vocab,
            context_len,
            rms_eps,
            rope_theta,
            rope_style: match arch {
                Arch::Llama => RopeStyle::Interleaved,
                Arch::Qwen2 => RopeStyle::Neox,
            },
            qkv_bias: arch == Arch::Qwen2,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf(json: &serde_json::Value) -> Result<Config> {
        let arch_name = json["architectures"]
            .get(0)
            .and_then(|v| v.as_str())
            .or_else(|| json["model_type"].as_str())
            .ok_or_else(|| ModelError::MissingMetadata("config.json: architectures".into()))?;
        let arch = Arch::from_name(arch_name)?;
        let get = |k: &str| -> Result<u64> {
            json[k]
                .as_u64()
                .ok_or_else(|| ModelError::MissingMetadata(format!("config.json: {k}")))
        };
        let getf = |k: &str, default: f64| json[k].as_f64().unwrap_or(default) as f32;
        let hidden = bounded("hidden_size", get("hidden_size")?, MAX_DIM)?;
        let n_head = bounded("num_attention_heads", get("num_attention_heads")?, MAX_DIM)?;
        let n_kv_head = match get("num_key_value_heads") {
            Ok(v) => bounded("num_key_value_heads", v, MAX_DIM)?,
            Err(_) => n_head,
        };
        let head_dim = match get("head_dim") {
            Ok(v) => bounded("head_dim", v, MAX_DIM)?,
            Err(_) => hidden / n_head,
        };
        let cfg = Config {
            arch,
            n_layer: bounded("num_hidden_layers", get("num_hidden_layers")?, MAX_LAYERS)?,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            ffn: bounded("intermediate_size", get("intermediate_size")?, MAX_DIM)?,
            vocab: bounded("vocab_size", get("vocab_size")?, 1 << 24)?,
            context_len: bounded(
                "max_position_embeddings",
                get("max_position_embeddings")?,
                MAX_CONTEXT,
            )?,
            rms_eps: getf("rms_norm_eps", 1e-6),
            rope_theta: getf("rope_theta", 10_000.0),
            rope_style: RopeStyle::Neox,
            qkv_bias: arch == Arch::Qwen2 || json["attention_bias"].as_bool() == Some(true),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, d: String| Err(ModelError::format("model", f, d));
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(
                "head_count_kv",
                format!(
                    "{} query heads not divisible by {} KV heads",
                    self.n_head, self.n_kv_head
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} is odd; RoPE needs pairs", self.head_dim),
            );
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(
                "rms_epsilon",
                format!("{} is not a valid epsilon", self.rms_eps),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(
                "rope.freq_base",
                format!("{} is not a valid RoPE base", self.rope_theta),
            );
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}
