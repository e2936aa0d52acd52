//! Helpers shared by the fuzz targets and the seed builder: scratch files (the loaders take
//! paths, and the fuzz targets go through the same public API the real loader uses), a driver
//! that touches everything a parsed GGUF exposes, and tiny well-formed models for seeds.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kivi_model::gguf::{Gguf, GgufWriter, MetaValue};
use kivi_model::random::{preset, RandomWeights};
use kivi_model::tensor::{DType, TensorSource};

/// A per-process scratch directory on tmpfs (falls back to the temp dir).
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("kivi-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    })
}

/// Writes `bytes` to `name` inside the scratch directory and returns its path.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    std::fs::write(&path, bytes).expect("write scratch file");
    path
}

/// Calls every accessor of an open GGUF on every key and tensor, and reads every tensor's
/// bytes (first and last), the way a loader or `kivi inspect` would.
pub fn exercise_gguf(g: &Gguf) {
    let _ = g.architecture();
    let _ = (g.file_size(), g.alignment(), g.data_offset(), g.path());
    let keys: Vec<String> = g.metadata.keys().cloned().collect();
    for k in &keys {
        let _ = g.get_u64(k);
        let _ = g.get_f32(k);
        let _ = g.get_str(k);
        let _ = g.get_bool(k);
        let _ = g.get_str_array(k);
        let _ = g.get_f32_array(k);
        let _ = g.get_i32_array(k);
        if let Some(v) = g.get(k) {
            let _ = (v.type_name(), v.as_u64(), v.as_i32(), v.as_f32());
            let _ = (v.as_str(), v.as_bool(), v.as_array().map(|a| a.len()));
        }
    }
    let names: Vec<String> = g
        .tensors
        .iter()
        .map(|t| t.name.clone())
        .chain(g.unsupported.iter().map(|t| t.name.clone()))
        .collect();
    for name in &names {
        assert!(g.contains(name));
        let _ = g.tensor_info(name);
        if let Ok(t) = g.tensor(name) {
            let bytes = t.data.bytes();
            if let (Some(a), Some(b)) = (bytes.first(), bytes.last()) {
                std::hint::black_box((*a, *b));
            }
        }
    }
    let _ = g.tensor("no such tensor");
}

/// `key = value` metadata of a tiny byte-level BPE tokenizer: the 256 byte symbols of GPT-2's
/// byte-to-unicode map, a few merges and ChatML control tokens.
pub fn tiny_bpe_tokenizer_metadata() -> Vec<(String, MetaValue)> {
    let mut tokens: Vec<String> = (0u32..256)
        .map(|b| byte_symbol(b as u8).to_string())
        .collect();
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let first_special = tokens.len() as u32;
    tokens.extend(specials.iter().map(|s| s.to_string()));
    let mut types = vec![1i32; tokens.len()];
    for t in types.iter_mut().skip(first_special as usize) {
        *t = 3;
    }
    let strs =
        |v: &[String]| MetaValue::Array(v.iter().map(|s| MetaValue::String(s.clone())).collect());
    vec![
        (
            "tokenizer.ggml.model".into(),
            MetaValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".into(),
            MetaValue::String("smollm".into()),
        ),
        ("tokenizer.ggml.tokens".into(), strs(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            strs(&merges.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            MetaValue::U32(first_special),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            MetaValue::U32(first_special + 2),
        ),
        (
            "tokenizer.chat_template".into(),
            MetaValue::String(kivi_model::chat::CHATML_TEMPLATE.into()),
        ),
    ]
}

/// GPT-2's byte-to-unicode map (printable bytes map to themselves).
pub fn byte_symbol(b: u8) -> char {
    let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable {
        return char::from(b);
    }
    // The other 68 bytes map to U+0100.. in byte order.
    let rank = (0u32..b as u32)
        .filter(|&x| {
            let x = x as u8;
            !((b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE)
        })
        .count() as u32;
    char::from_u32(0x100 + rank).expect("valid char")
}

/// The `tiny` preset shrunk further (1 layer, hidden 32, 2 heads, 1 KV head, FFN 64, vocab
/// 64) so seeds stay a few KB.
pub fn tiny_config(qwen2: bool) -> kivi_model::config::Config {
    let mut cfg = preset(if qwen2 { "tiny-qwen2" } else { "tiny" }).expect("preset");
    cfg.n_layer = 1;
    cfg.hidden = 32;
    cfg.n_head = 2;
    cfg.n_kv_head = 1;
    cfg.head_dim = 16;
    cfg.ffn = 64;
    cfg.vocab = 64;
    cfg
}

/// Names of every tensor a Llama/Qwen2 model of `n_layer` layers may have, GGUF naming.
pub fn gguf_tensor_names(n_layer: usize) -> Vec<String> {
    let mut names = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".into(),
        "output.weight".into(),
    ];
    for i in 0..n_layer {
        for n in [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_q.bias",
            "attn_k.bias",
            "attn_v.bias",
            "attn_output.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ] {
            names.push(format!("blk.{i}.{n}"));
        }
    }
    names
}

/// The same tensor under Hugging Face naming.
pub fn hf_tensor_name(gguf: &str) -> String {
    let map = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("attn_norm.weight", "input_layernorm.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"),
        ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_v.weight", "self_attn.v_proj.weight"),
        ("attn_q.bias", "self_attn.q_proj.bias"),
        ("attn_k.bias", "self_attn.k_proj.bias"),
        ("attn_v.bias", "self_attn.v_proj.bias"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ("ffn_gate.weight", "mlp.gate_proj.weight"),
        ("ffn_up.weight", "mlp.up_proj.weight"),
        ("ffn_down.weight", "mlp.down_proj.weight"),
    ];
    if let Some(rest) = gguf.strip_prefix("blk.") {
        let (i, n) = rest.split_once('.').expect("blk.N.name");
        let n = map.iter().find(|(g, _)| *g == n).expect("known name").1;
        return format!("model.layers.{i}.{n}");
    }
    map.iter()
        .find(|(g, _)| *g == gguf)
        .expect("known name")
        .1
        .to_string()
}

/// A complete tiny Llama ([`tiny_config`], vocab 264 from the tokenizer) as a GGUF with a
/// tokenizer and chat template: a seed that gets past every check of the loader.
pub fn tiny_model_gguf(dtype: DType, qwen2: bool) -> Vec<u8> {
    let mut cfg = tiny_config(qwen2);
    let tok = tiny_bpe_tokenizer_metadata();
    cfg.vocab = match &tok[2].1 {
        MetaValue::Array(a) => a.len(),
        _ => unreachable!(),
    };
    let weights = RandomWeights::new(&cfg, dtype, 7).expect("random weights");
    let arch = if qwen2 { "qwen2" } else { "llama" };
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", MetaValue::String(arch.into()));
    let key = |k: &str| format!("{arch}.{k}");
    let u = |x: usize| MetaValue::U32(x as u32);
    w.metadata(key("block_count"), u(cfg.n_layer));
    w.metadata(key("embedding_length"), u(cfg.hidden));
    w.metadata(key("attention.head_count"), u(cfg.n_head));
    w.metadata(key("attention.head_count_kv"), u(cfg.n_kv_head));
    w.metadata(key("feed_forward_length"), u(cfg.ffn));
    w.metadata(key("context_length"), u(cfg.context_len));
    w.metadata(
        key("attention.layer_norm_rms_epsilon"),
        MetaValue::F32(cfg.rms_eps),
    );
    w.metadata(key("rope.freq_base"), MetaValue::F32(cfg.rope_theta));
    for (k, v) in tok {
        w.metadata(k, v);
    }
    let names = gguf_tensor_names(cfg.n_layer);
    for name in names {
        if let Ok(t) = weights.tensor(&name) {
            w.tensor(name, t.dtype, &t.shape, t.data.bytes().to_vec());
        }
    }
    w.to_bytes().expect("tiny model serializes")
}
