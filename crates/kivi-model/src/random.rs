//! Deterministic random weights with real model shapes, for tests and for speed/memory
//! measurements of models we have no file for. Everything that uses them says so.

use std::collections::HashMap;
use std::sync::Arc;

use half::f16;
use rand::{Rng, SeedableRng};

use crate::config::{Arch, Config, RopeStyle};
use crate::tensor::{DType, RawTensor, Storage, TensorSource};
use crate::{ModelError, Result};

/// Named shapes for `--random-weights --arch NAME`.
pub fn preset(name: &str) -> Result<Config> {
    let llama = |n_layer, hidden, n_head, n_kv_head, ffn, vocab, context_len, rope_theta| Config {
        arch: Arch::Llama,
        n_layer,
        hidden,
        n_head,
        n_kv_head,
        head_dim: hidden / n_head,
        ffn,
        vocab,
        context_len,
        rms_eps: 1e-5,
        rope_theta,
        rope_style: RopeStyle::Interleaved,
        qkv_bias: false,
    };
    Ok(match name {
        "llama2-7b" => llama(32, 4096, 32, 32, 11008, 32000, 4096, 10_000.0),
        "llama3-8b" => llama(32, 4096, 32, 8, 14336, 128_256, 8192, 500_000.0),
        "mistral-7b" => llama(32, 4096, 32, 8, 14336, 32000, 32768, 1_000_000.0),
        "smollm2-135m" => llama(30, 576, 9, 3, 1536, 49152, 8192, 100_000.0),
        "tiny" => llama(2, 64, 4, 2, 128, 256, 1024, 10_000.0),
        "tiny-qwen2" => Config {
            arch: Arch::Qwen2,
            rope_style: RopeStyle::Neox,
            qkv_bias: true,
            ..llama(2, 64, 4, 2, 128, 256, 1024, 1_000_000.0)
        },
        other => {
            return Err(ModelError::UnknownArch(format!(
                "{other} (random-weight presets: llama2-7b, llama3-8b, mistral-7b, smollm2-135m, tiny, tiny-qwen2)"
            )))
        }
    })
}

/// GGUF-named tensors filled with seeded uniform noise, scaled like a trained model's
/// (norm weights near 1, matrices ~ 1/sqrt(fan_in)) so activations stay in a sane range.
pub struct RandomWeights {
    tensors: HashMap<String, RawTensor>,
}

impl RandomWeights {
    pub fn new(config: &Config, dtype: DType, seed: u64) -> Result<RandomWeights> {
        if !matches!(dtype, DType::F32 | DType::F16) {
            return Err(ModelError::UnsupportedType(format!(
                "{} for random weights (use F32 or F16)",
                dtype.name()
            )));
        }
        let c = config;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        let mut add = |name: String, shape: Vec<usize>, center: f32, spread: f32| {
            let n: usize = shape.iter().product();
            let bytes = match dtype {
                DType::F16 => (0..n)
                    .flat_map(|_| {
                        f16::from_f32(center + rng.gen_range(-spread..spread)).to_le_bytes()
                    })
                    .collect(),
                _ => (0..n)
                    .flat_map(|_| (center + rng.gen_range(-spread..spread)).to_le_bytes())
                    .collect(),
            };
            let t = RawTensor {
                name: name.clone(),
                dtype,
                shape,
                data: Storage::Owned(Arc::new(bytes)),
            };
            tensors.insert(name, t);
        };
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        let w = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
        add("token_embd.weight".into(), vec![c.vocab, h], 0.0, 1.0);
        add("output_norm.weight".into(), vec![h], 1.0, 0.1);
        add("output.weight".into(), vec![c.vocab, h], 0.0, w(h));
        for i in 0..c.n_layer {
            let b = |n: &str| format!("blk.{i}.{n}");
            add(b("attn_norm.weight"), vec![h], 1.0, 0.1);
            add(b("attn_q.weight"), vec![q, h], 0.0, w(h));
            add(b("attn_k.weight"), vec![kv, h], 0.0, w(h));
            add(b("attn_v.weight"), vec![kv, h], 0.0, w(h));
            if c.qkv_bias {
                add(b("attn_q.bias"), vec![q], 0.0, 0.5);
                add(b("attn_k.bias"), vec![kv], 0.0, 0.5);
                add(b("attn_v.bias"), vec![kv], 0.0, 0.5);
            }
            add(b("attn_output.weight"), vec![h, q], 0.0, w(q));
            add(b("ffn_norm.weight"), vec![h], 1.0, 0.1);
            add(b("ffn_gate.weight"), vec![f, h], 0.0, w(h));
            add(b("ffn_up.weight"), vec![f, h], 0.0, w(h));
            add(b("ffn_down.weight"), vec![h, f], 0.0, w(f));
        }
        Ok(RandomWeights { tensors })
    }
}

impl TensorSource for RandomWeights {
    fn tensor(&self, name: &str) -> Result<RawTensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
