//! The same Llama weights as a Hugging Face safetensors directory (NEOX RoPE, original Q/K rows)
//! and in GGUF naming with llama.cpp's Q/K row permutation (adjacent-pair RoPE) give the same
//! logits: checks `Config::from_hf`, the HF tensor names and our handling of the permutation.

use kivi_core::{CacheConfig, CacheShape};
use kivi_model::config::Config;
use kivi_model::llama::{Logits, Model, Naming};
use kivi_model::random::{preset, RandomWeights};
use kivi_model::safetensors::SafetensorsDir;
use kivi_model::tensor::{DType, TensorSource};
use rand::Rng;
use safetensors::tensor::{Dtype, TensorView};

/// Inverse of llama.cpp's `permute`: GGUF row `(h, 2j + s)` is HF row `(h, s * d/2 + j)`.
fn unpermute(gguf: &[u8], rows: usize, cols: usize, heads: usize) -> Vec<u8> {
    let d = rows / heads;
    let row_bytes = cols * 4;
    let mut hf = vec![0u8; gguf.len()];
    for h in 0..heads {
        for j in 0..d / 2 {
            for s in 0..2 {
                let from = (h * d + 2 * j + s) * row_bytes;
                let to = (h * d + s * d / 2 + j) * row_bytes;
                hf[to..to + row_bytes].copy_from_slice(&gguf[from..from + row_bytes]);
            }
        }
    }
    hf
}

#[test]
fn hf_directory_and_permuted_gguf_agree() {
    let c = preset("tiny").unwrap();
    let gguf_src = RandomWeights::new(&c, DType::F32, rand::random()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut put = |hf: String, gguf: &str, unpermute_heads: Option<usize>| {
        let t = gguf_src.tensor(gguf).unwrap();
        let bytes = match unpermute_heads {
            Some(heads) => unpermute(t.data.bytes(), t.shape[0], t.shape[1], heads),
            None => t.data.bytes().to_vec(),
        };
        tensors.push((hf, t.shape.clone(), bytes));
    };
    put(
        "model.embed_tokens.weight".into(),
        "token_embd.weight",
        None,
    );
    put("model.norm.weight".into(), "output_norm.weight", None);
    put("lm_head.weight".into(), "output.weight", None);
    for i in 0..c.n_layer {
        let (hf, g) = (format!("model.layers.{i}."), format!("blk.{i}."));
        put(
            hf.clone() + "input_layernorm.weight",
            &(g.clone() + "attn_norm.weight"),
            None,
        );
        put(
            hf.clone() + "self_attn.q_proj.weight",
            &(g.clone() + "attn_q.weight"),
            Some(c.n_head),
        );
        put(
            hf.clone() + "self_attn.k_proj.weight",
            &(g.clone() + "attn_k.weight"),
            Some(c.n_kv_head),
        );
        put(
            hf.clone() + "self_attn.v_proj.weight",
            &(g.clone() + "attn_v.weight"),
            None,
        );
        put(
            hf.clone() + "self_attn.o_proj.weight",
            &(g.clone() + "attn_output.weight"),
            None,
        );
        put(
            hf.clone() + "post_attention_layernorm.weight",
            &(g.clone() + "ffn_norm.weight"),
            None,
        );
        put(
            hf.clone() + "mlp.gate_proj.weight",
            &(g.clone() + "ffn_gate.weight"),
            None,
        );
        put(
            hf.clone() + "mlp.up_proj.weight",
            &(g.clone() + "ffn_up.weight"),
            None,
        );
        put(
            hf.clone() + "mlp.down_proj.weight",
            &(g.clone() + "ffn_down.weight"),
            None,
        );
    }
    let dir = std::env::temp_dir().join(format!(
        "kivi-hf-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, shape, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": c.hidden, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
        "num_hidden_layers": c.n_layer, "intermediate_size": c.ffn, "vocab_size": c.vocab,
        "max_position_embeddings": c.context_len, "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let hf_dir = SafetensorsDir::open(&dir).unwrap();
    let hf_config = Config::from_hf(hf_dir.config()).unwrap();
    let hf = Model::load(&hf_dir, Naming::HuggingFace, hf_config.clone()).unwrap();
    let gguf = Model::load(&gguf_src, Naming::Gguf, c.clone()).unwrap();

    let mut rng = rand::thread_rng();
    let tokens: Vec<u32> = (0..19).map(|_| rng.gen_range(0..c.vocab as u32)).collect();
    let run = |m: &Model, cfg: &Config| {
        let shape = CacheShape {
            n_layer: cfg.n_layer,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
        };
        let mut cache = kivi_core::new_cache(&CacheConfig::F16, shape).unwrap();
        let seq = cache.add_sequence();
        let mut out = m
            .forward(&tokens[..12], cache.as_mut(), seq, Logits::All)
            .unwrap();
        for &t in &tokens[12..] {
            out.extend(m.forward(&[t], cache.as_mut(), seq, Logits::Last).unwrap());
        }
        out
    };
    let (a, b) = (run(&hf, &hf_config), run(&gguf, &c));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= 1e-3 * scale.max(1.0),
        "max |diff| {diff} (logit scale {scale})"
    );
    // And the permutation matters: the HF rows read with GGUF RoPE would be wrong.
    let mut wrong = hf_config.clone();
    wrong.rope_style = c.rope_style;
    let broken = Model::load(&hf_dir, Naming::HuggingFace, wrong.clone()).unwrap();
    let w = run(&broken, &wrong);
    let diff_wrong = w
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff_wrong > 100.0 * diff.max(1e-6),
        "rope layout had no effect: {diff_wrong}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
