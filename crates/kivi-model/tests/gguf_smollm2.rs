//! The GGUF reader on the real SmolLM2-135M-Instruct Q4_1 file. Expected values were read once
//! with the Python `gguf` package's `GGUFReader` (0.19.0) and hard-coded here; tensor bytes are
//! compared through an FNV-1a hash computed by the same script.
//!
//! Needs `$KIVI_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf` (default `~/.cache/kivi`); prints
//! `skipped: model not found` and passes when the file is absent.

use std::path::PathBuf;

use kivi_model::gguf::{Gguf, MetaValue};
use kivi_model::tensor::{DType, TensorSource};

/// (name, shape, type, absolute offset, bytes, FNV-1a hash)
type Expected = (&'static str, &'static [usize], DType, u64, u64, u64);

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> Option<PathBuf> {
    let cache = match std::env::var_os("KIVI_CACHE").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/kivi"),
    };
    let p = cache.join("models").join(FILE);
    p.is_file().then_some(p)
}

macro_rules! open_or_skip {
    () => {
        match model_path() {
            Some(p) => Gguf::open(&p).expect("open SmolLM2"),
            None => {
                println!("skipped: model not found");
                return;
            }
        }
    };
}

/// FNV-1a, 64-bit.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[test]
fn smollm2_header_and_metadata() {
    let g = open_or_skip!();
    assert_eq!(g.version, 3);
    assert_eq!(g.file_size(), 98_362_432);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_offset(), 1_785_664);
    assert_eq!(g.metadata.len(), 33);

    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(
        g.get_str("general.name").unwrap(),
        "Smollm2 135M 8k Lc100K Mix1 Ep2"
    );
    assert_eq!(g.get_str_array("general.languages").unwrap(), vec!["en"]);
    assert_eq!(g.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(g.get_u64("llama.context_length").unwrap(), 8192);
    assert_eq!(g.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(g.get_u64("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(g.get_u64("llama.attention.head_count").unwrap(), 9);
    assert_eq!(g.get_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(g.get_u64("llama.vocab_size").unwrap(), 49152);
    assert_eq!(g.get_u64("llama.rope.dimension_count").unwrap(), 64);
    assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 100_000.0);
    // 0x3727c5ac: 1e-5 rounded to f32.
    assert_eq!(
        g.get_f32("llama.attention.layer_norm_rms_epsilon")
            .unwrap()
            .to_bits(),
        0x3727_c5ac
    );
    assert_eq!(g.get_u64("general.file_type").unwrap(), 3);
    assert_eq!(g.get_u64("general.quantization_version").unwrap(), 2);
    assert!(!g.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    assert!(!g.get_bool("tokenizer.ggml.add_space_prefix").unwrap());
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert_eq!(g.get_u64("tokenizer.ggml.bos_token_id").unwrap(), 1);
    assert_eq!(g.get_u64("tokenizer.ggml.eos_token_id").unwrap(), 2);
    assert_eq!(g.get_u64("tokenizer.ggml.unknown_token_id").unwrap(), 0);
    assert_eq!(g.get_u64("tokenizer.ggml.padding_token_id").unwrap(), 2);
    assert!(g
        .get_str("tokenizer.chat_template")
        .unwrap()
        .starts_with("{% for message in messages %}"));

    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(
        &tokens[..3],
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    );
    assert_eq!(tokens[1000], "()");
    assert_eq!(tokens[49151], "ectable");
    let merges = g.get_str_array("tokenizer.ggml.merges").unwrap();
    assert_eq!(merges.len(), 48900);
    assert_eq!(&merges[..3], &["Ġ t", "Ġ a", "i n"]);
    assert_eq!(merges[48899], "ect able");
    let types = g.get_i32_array("tokenizer.ggml.token_type").unwrap();
    assert_eq!(types.len(), 49152);
    assert_eq!(
        &types[..20],
        &[3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1]
    );
    assert!(
        matches!(g.get("tokenizer.ggml.token_type"), Some(MetaValue::Array(a)) if matches!(a[0], MetaValue::I32(3)))
    );
}

#[test]
fn smollm2_tensors() {
    let g = open_or_skip!();
    assert_eq!(g.tensors.len(), 272);
    assert!(g.unsupported.is_empty());
    let count = |d: DType| g.tensors.iter().filter(|t| t.dtype == d).count();
    assert_eq!(
        (count(DType::Q4_1), count(DType::F32), count(DType::Q8_0)),
        (210, 61, 1)
    );
    let names: Vec<&str> = g.tensors.iter().take(4).map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "token_embd.weight",
            "blk.0.attn_norm.weight",
            "blk.0.ffn_down.weight",
            "blk.0.ffn_gate.weight"
        ]
    );
    // Tied embeddings: no output.weight.
    assert!(!g.contains("output.weight"));

    // (name, shape, type, absolute offset, bytes, FNV-1a of the bytes or of first+last 4 KiB)
    let expected: [Expected; 5] = [
        (
            "token_embd.weight",
            &[49152, 576],
            DType::Q8_0,
            1_785_664,
            30_081_024,
            0xd87c_5bfd_66cf_fd0b,
        ),
        (
            "blk.0.attn_k.weight",
            &[192, 576],
            DType::Q4_1,
            33_530_176,
            69_120,
            0x2138_6841_56e0_20d7,
        ),
        (
            "blk.0.attn_norm.weight",
            &[576],
            DType::F32,
            31_866_688,
            2304,
            0x2fd1_9cd8_8444_8866,
        ),
        (
            "blk.29.ffn_down.weight",
            &[576, 1536],
            DType::Q4_1,
            80_630_848,
            552_960,
            0xb55f_3a80_ad78_20af,
        ),
        (
            "output_norm.weight",
            &[576],
            DType::F32,
            98_360_128,
            2304,
            0xea81_4bed_6299_e304,
        ),
    ];
    for (name, shape, dtype, offset, n_bytes, hash) in expected {
        let info = g.tensor_info(name).unwrap();
        assert_eq!(
            (info.shape.as_slice(), info.dtype, info.offset, info.n_bytes),
            (shape, dtype, offset, n_bytes),
            "{name}"
        );
        let t = g.tensor(name).unwrap();
        assert_eq!((t.shape.as_slice(), t.dtype), (shape, dtype));
        let b = t.data.bytes();
        assert_eq!(b.len() as u64, n_bytes);
        let h = if b.len() > 600_000 {
            fnv1a(&[&b[..4096], &b[b.len() - 4096..]].concat())
        } else {
            fnv1a(b)
        };
        assert_eq!(h, hash, "{name}");
    }
    let norm = g.tensor("output_norm.weight").unwrap();
    let first: Vec<f32> = norm.data.bytes()[..16]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(first, [1.757_812_5, 1.820_312_5, 1.781_25, 1.601_562_5]);

    // Every layer's tensors are present with the shapes the config implies.
    for l in 0..30 {
        let shape = |n: &str| {
            g.tensor_info(&format!("blk.{l}.{n}"))
                .unwrap()
                .shape
                .clone()
        };
        assert_eq!(shape("attn_q.weight"), [576, 576]);
        assert_eq!(shape("attn_k.weight"), [192, 576]);
        assert_eq!(shape("attn_v.weight"), [192, 576]);
        assert_eq!(shape("attn_output.weight"), [576, 576]);
        assert_eq!(shape("ffn_gate.weight"), [1536, 576]);
        assert_eq!(shape("ffn_up.weight"), [1536, 576]);
        assert_eq!(shape("ffn_down.weight"), [576, 1536]);
        assert_eq!(shape("attn_norm.weight"), [576]);
        assert_eq!(shape("ffn_norm.weight"), [576]);
    }
    // Tensors tile the data section: sizes sum to 96,576,768 bytes and the last ends at EOF.
    let total: u64 = g.tensors.iter().map(|t| t.n_bytes).sum();
    assert_eq!(total, 96_576_768);
    let end = g
        .tensors
        .iter()
        .map(|t| t.offset + t.n_bytes)
        .max()
        .unwrap();
    assert_eq!(end, g.file_size());
}
