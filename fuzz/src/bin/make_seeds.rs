//! Builds the seed corpus: `make_seeds <corpus dir> [model.gguf ...]`. For each real model given,
//! a small GGUF with its metadata (arrays cut to 300 elements) and its first tensor infos
//! (shapes shrunk to one block), the first 4 KB and 64 KB of the file, and its chat template;
//! plus tiny complete models (GGUF and safetensors directories) that load end to end.
//! `fuzz/seeds.sh` runs it on the models in ~/.cache/kivi/models.

use std::path::{Path, PathBuf};

use kivi_fuzz::{gguf_tensor_names, hf_tensor_name, tiny_config, tiny_model_gguf};
use kivi_model::chat::CHATML_TEMPLATE;
use kivi_model::gguf::{Gguf, GgufWriter, MetaValue};
use kivi_model::random::RandomWeights;
use kivi_model::tensor::{DType, TensorSource};

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("corpus dir");
    std::fs::write(d.join(name), bytes).expect("write seed");
}

fn cut(v: &MetaValue) -> MetaValue {
    match v {
        MetaValue::Array(a) => MetaValue::Array(a.iter().take(300).map(cut).collect()),
        other => other.clone(),
    }
}

/// A small GGUF with `src`'s metadata and first 24 tensor infos, shapes shrunk to 2 rows of one
/// block, same types.
fn shrunk(src: &Gguf) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.version(src.version);
    for (k, v) in &src.metadata {
        w.metadata(k.clone(), cut(v));
    }
    for t in src.tensors.iter().take(24) {
        let shape = if t.shape.len() == 1 {
            vec![t.dtype.block_size()]
        } else {
            vec![2, t.dtype.block_size()]
        };
        let n_bytes =
            shape.iter().product::<usize>() / t.dtype.block_size() * t.dtype.block_bytes();
        let data = (0..n_bytes).map(|i| (i * 37 % 251) as u8).collect();
        w.tensor(t.name.clone(), t.dtype, &shape, data);
    }
    w.to_bytes().expect("shrunk GGUF serializes")
}

fn every_type_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    let s = |x: &str| MetaValue::String(x.into());
    w.metadata("u8", MetaValue::U8(7))
        .metadata("i8", MetaValue::I8(-7))
        .metadata("u16", MetaValue::U16(700))
        .metadata("i16", MetaValue::I16(-700))
        .metadata("u32", MetaValue::U32(70000))
        .metadata("i32", MetaValue::I32(-70000))
        .metadata("f32", MetaValue::F32(0.5))
        .metadata("bool", MetaValue::Bool(true))
        .metadata("string", s("héllo"))
        .metadata("u64", MetaValue::U64(1 << 40))
        .metadata("i64", MetaValue::I64(-(1 << 40)))
        .metadata("f64", MetaValue::F64(-0.25))
        .metadata(
            "arr",
            MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)]),
        )
        .metadata(
            "nested",
            MetaValue::Array(vec![
                MetaValue::Array(vec![s("a"), s("b")]),
                MetaValue::Array(vec![s("c")]),
            ]),
        )
        .alignment(64);
    w.tensor("f32", DType::F32, &[2, 3], vec![0; 24]);
    w.tensor("q8", DType::Q8_0, &[1, 32], vec![1; 34]);
    w.raw_tensor("q5k", 13, &[256], vec![2; 176]);
    w.to_bytes().expect("serializes")
}

/// `[selector][len u32][bytes]` records (see the safetensors_dir target).
fn records(files: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![];
    for (sel, bytes) in files {
        out.push(*sel);
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

fn safetensors(tensors: &[(String, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = vec![];
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}

fn hf_seeds(dir: &Path) {
    for qwen2 in [false, true] {
        let cfg = tiny_config(qwen2);
        let w = RandomWeights::new(&cfg, DType::F16, 3).unwrap();
        let tensors: Vec<(String, &str, Vec<usize>, Vec<u8>)> = gguf_tensor_names(cfg.n_layer)
            .into_iter()
            .filter_map(|n| w.tensor(&n).ok())
            .map(|t| {
                (
                    hf_tensor_name(&t.name),
                    "F16",
                    t.shape.clone(),
                    t.data.bytes().to_vec(),
                )
            })
            .collect();
        let config = serde_json::json!({
            "architectures": [if qwen2 { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": if qwen2 { "qwen2" } else { "llama" },
            "hidden_size": cfg.hidden, "intermediate_size": cfg.ffn,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "rms_norm_eps": 1e-5,
            "rope_theta": cfg.rope_theta, "max_position_embeddings": 256,
            "vocab_size": cfg.vocab, "tie_word_embeddings": false
        });
        let config = serde_json::to_vec(&config).unwrap();
        let tag = if qwen2 { "qwen2" } else { "llama" };
        let single = records(&[(0, config.clone()), (1, safetensors(&tensors))]);
        put(
            dir,
            "safetensors_dir",
            &format!("tiny-{tag}-single"),
            &single,
        );
        // Two shards and an index.
        let (a, b) = tensors.split_at(tensors.len() / 2);
        let mut map = serde_json::Map::new();
        for t in a {
            map.insert(t.0.clone(), "model-00001-of-00002.safetensors".into());
        }
        for t in b {
            map.insert(t.0.clone(), "model-00002-of-00002.safetensors".into());
        }
        let index =
            serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": map})).unwrap();
        let sharded = records(&[
            (0, config),
            (2, index),
            (3, safetensors(a)),
            (4, safetensors(b)),
        ]);
        put(
            dir,
            "safetensors_dir",
            &format!("tiny-{tag}-sharded"),
            &sharded,
        );
    }
}

fn chat_seed(template: &str) -> Vec<u8> {
    let mut s = template.as_bytes().to_vec();
    s.extend_from_slice(b"\0<s>\0</s>\0\x00You are helpful.\0\x01Hello\0\x02Hi there\0\x81Thanks");
    s
}

fn main() {
    let mut args = std::env::args_os().skip(1);
    let dir = PathBuf::from(
        args.next()
            .expect("usage: make_seeds <corpus dir> [model.gguf ...]"),
    );
    put(
        &dir,
        "gguf_open",
        "tiny-llama-f32",
        &tiny_model_gguf(DType::F32, false),
    );
    put(
        &dir,
        "gguf_open",
        "tiny-qwen2-f16",
        &tiny_model_gguf(DType::F16, true),
    );
    put(&dir, "gguf_open", "every-type", &every_type_gguf());
    put(&dir, "chat_template", "chatml", &chat_seed(CHATML_TEMPLATE));
    hf_seeds(&dir);
    let bodies: [&[u8]; 6] = [
        br#"{"model":"kivi","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello"}],"max_tokens":16,"temperature":0.7,"top_p":0.9,"stop":["\n\n"],"stream":true,"stream_options":{"include_usage":true}}"#,
        br#"{"messages":[{"role":"user","content":[{"type":"text","text":"Hi"}]}],"seed":42,"max_completion_tokens":8}"#,
        br#"{"messages":[{"role":"developer","content":"x"},{"role":"assistant","content":null}],"top_k":40,"ignore_eos":true}"#,
        br#"{"model":"kivi","prompt":"Once upon a time","max_tokens":32,"temperature":0}"#,
        br#"{"prompt":[1,2,3,4],"stop":"END","logit_bias":{},"presence_penalty":0}"#,
        br#"{"prompt":["a"],"n":1,"best_of":1}"#,
    ];
    for (i, b) in bodies.iter().enumerate() {
        put(&dir, "server_request", &format!("body-{i}"), b);
    }
    for model in args {
        let path = PathBuf::from(&model);
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let g = Gguf::open(&path).expect("open model");
        put(&dir, "gguf_open", &format!("{stem}-shrunk"), &shrunk(&g));
        let bytes = std::fs::read(&path).expect("read model");
        for kb in [4usize, 64] {
            let n = (kb << 10).min(bytes.len());
            put(
                &dir,
                "gguf_open",
                &format!("{stem}-first-{kb}k"),
                &bytes[..n],
            );
        }
        if let Ok(t) = g.get_str("tokenizer.chat_template") {
            put(&dir, "chat_template", &stem, &chat_seed(t));
        }
        println!("seeds from {}", path.display());
    }
}
