//! Whole-model hostile files: a tiny but complete Llama GGUF (it loads end to end through
//! `loader::load`), then damaged one way per case: truncated inside every section, absurd
//! counts, offsets past the end, huge dimensions, NaN/Inf weights, wrong tensor types,
//! duplicate names. Each case must be an error (never a panic) whose message names the field;
//! the messages are the ones docs/reliability.md lists (`cargo test --release --test
//! hostile_files -- --nocapture` prints them).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use kivi_core::{CacheConfig, CacheShape};
use kivi_model::gguf::{GgufLayout, GgufWriter, MetaValue};
use kivi_model::llama::Logits;
use kivi_model::random::{preset, RandomWeights};
use kivi_model::tensor::{DType, TensorSource};

fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hostile-{tag}-{}-{n}.gguf", std::process::id()))
}

struct Tensor {
    name: String,
    ggml_type: u32,
    /// Outermost first.
    shape: Vec<u64>,
    data: Vec<u8>,
}

/// The parts of a tiny model (2 layers, hidden 32, vocab 64, F32), before serialization.
struct Parts {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<Tensor>,
}

fn tiny_parts() -> Parts {
    let mut c = preset("tiny").unwrap();
    c.hidden = 32;
    c.n_head = 2;
    c.n_kv_head = 1;
    c.head_dim = 16;
    c.ffn = 64;
    c.vocab = 64;
    let w = RandomWeights::new(&c, DType::F32, 11).unwrap();
    let u = |x: usize| MetaValue::U32(x as u32);
    let s = |x: &str| MetaValue::String(x.into());
    let tokens: Vec<MetaValue> = (0..c.vocab)
        .map(|i| {
            s(&if i == 0 {
                "<|endoftext|>".to_string()
            } else {
                format!("t{i}")
            })
        })
        .collect();
    let metadata = vec![
        ("general.architecture".into(), s("llama")),
        ("llama.block_count".into(), u(c.n_layer)),
        ("llama.embedding_length".into(), u(c.hidden)),
        ("llama.attention.head_count".into(), u(c.n_head)),
        ("llama.attention.head_count_kv".into(), u(c.n_kv_head)),
        ("llama.feed_forward_length".into(), u(c.ffn)),
        ("llama.context_length".into(), u(c.context_len)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            MetaValue::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), MetaValue::Array(tokens)),
        ("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(0)),
    ];
    let mut names = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".into(),
        "output.weight".into(),
    ];
    for i in 0..c.n_layer {
        for n in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            names.push(format!("blk.{i}.{n}.weight"));
        }
    }
    let tensors = names
        .into_iter()
        .map(|name| {
            let t = w.tensor(&name).unwrap();
            Tensor {
                name,
                ggml_type: 0,
                shape: t.shape.iter().map(|&d| d as u64).collect(),
                data: t.data.bytes().to_vec(),
            }
        })
        .collect();
    Parts { metadata, tensors }
}

fn serialize(p: &Parts) -> (Vec<u8>, GgufLayout) {
    let mut w = GgufWriter::new();
    for (k, v) in &p.metadata {
        w.metadata(k.clone(), v.clone());
    }
    for t in &p.tensors {
        w.raw_tensor(t.name.clone(), t.ggml_type, &t.shape, t.data.clone());
    }
    w.to_bytes_with_layout().unwrap()
}

fn load(bytes: &[u8]) -> kivi_model::Result<kivi_model::loader::LoadedModel> {
    let p = temp_path("m");
    std::fs::write(&p, bytes).unwrap();
    let r = kivi_model::loader::load(&p);
    let _ = std::fs::remove_file(&p);
    r
}

/// Loads `bytes`, which must fail with a message containing every one of `needles`.
#[track_caller]
fn expect_err(case: &str, bytes: &[u8], needles: &[&str]) {
    match load(bytes) {
        Ok(_) => panic!("{case}: loaded"),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("| {case} | `{msg}` |");
            for n in needles {
                assert!(msg.contains(n), "{case}: {msg:?} lacks {n:?}");
            }
        }
    }
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn tensor_index(p: &Parts, name: &str) -> usize {
    p.tensors.iter().position(|t| t.name == name).unwrap()
}

fn meta_index(p: &Parts, key: &str) -> usize {
    p.metadata.iter().position(|(k, _)| k == key).unwrap()
}

#[test]
fn the_intact_file_loads_and_runs() {
    let (bytes, _) = serialize(&tiny_parts());
    let m = load(&bytes).expect("the undamaged tiny model loads");
    let c = &m.model.config;
    let mut cache = kivi_core::new_cache(
        &CacheConfig::F16,
        CacheShape {
            n_layer: c.n_layer,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
        },
    )
    .unwrap();
    let seq = cache.add_sequence();
    let logits = m
        .model
        .forward(&[1, 2, 3], cache.as_mut(), seq, Logits::Last)
        .unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
}

#[test]
fn truncated_inside_every_section() {
    let p = tiny_parts();
    let (bytes, layout) = serialize(&p);
    let tokens = layout.metadata[meta_index(&p, "tokenizer.ggml.tokens")];
    let cuts = [
        ("truncated in the header (tensor_count)", 12, "tensor_count"),
        ("truncated in the header (kv_count)", 20, "kv_count"),
        (
            "truncated in a metadata key",
            layout.metadata[1] + 10,
            "metadata[1] key",
        ),
        (
            "truncated in a metadata array (the vocabulary)",
            tokens + 60,
            "tokenizer.ggml.tokens",
        ),
        (
            "truncated in a tensor info",
            layout.tensor_infos[2] + 20,
            "tensor_infos[2]",
        ),
        (
            "truncated before the data section",
            layout.data_offset,
            "tensor_infos[0]",
        ),
        (
            "truncated in the last tensor's data",
            bytes.len() - 1,
            "extends past the end",
        ),
    ];
    for (case, at, needle) in cuts {
        // Truncation can shorten what a count promises, so the count check may fire first.
        match load(&bytes[..at]) {
            Ok(_) => panic!("{case}: loaded"),
            Err(e) => {
                let msg = e.to_string();
                eprintln!("| {case} | `{msg}` |");
                assert!(
                    msg.contains(needle) || msg.contains("cannot fit"),
                    "{case}: {msg}"
                );
            }
        }
    }
}

#[test]
fn absurd_counts() {
    let p = tiny_parts();
    let (bytes, layout) = serialize(&p);
    let mut b = bytes.clone();
    put_u64(&mut b, 8, u64::MAX);
    expect_err("tensor_count 2^64-1", &b, &["tensor_count", "cannot fit"]);
    let mut b = bytes.clone();
    put_u64(&mut b, 16, 1 << 40);
    expect_err("kv_count 2^40", &b, &["kv_count", "cannot fit"]);
    // The vocabulary array's length field: key length (8) + key + type (4) + elem type (4).
    let i = meta_index(&p, "tokenizer.ggml.tokens");
    let at = layout.metadata[i] + 8 + "tokenizer.ggml.tokens".len() + 4 + 4;
    let mut b = bytes.clone();
    put_u64(&mut b, at, 1 << 62);
    expect_err(
        "vocabulary array length 2^62",
        &b,
        &["tokenizer.ggml.tokens", "array length 4611686018427387904"],
    );
    let mut p = tiny_parts();
    let i = meta_index(&p, "llama.block_count");
    p.metadata[i].1 = MetaValue::U64(1 << 31);
    expect_err("block_count 2^31", &serialize(&p).0, &["block_count"]);
}

#[test]
fn offsets_past_the_end() {
    let p = tiny_parts();
    let (bytes, layout) = serialize(&p);
    let last = layout.tensor_offset_fields.len() - 1;
    let mut b = bytes.clone();
    put_u64(&mut b, layout.tensor_offset_fields[last], 1 << 40);
    expect_err(
        "tensor offset 2^40",
        &b,
        &[&format!("tensor_infos[{last}]"), "extends past the end"],
    );
    let mut b = bytes.clone();
    put_u64(&mut b, layout.tensor_offset_fields[0], u64::MAX - 31);
    expect_err(
        "tensor offset 2^64-32",
        &b,
        &["tensor_infos[0]", "overflows"],
    );
}

#[test]
fn huge_dimensions() {
    let mut p = tiny_parts();
    let i = meta_index(&p, "llama.embedding_length");
    p.metadata[i].1 = MetaValue::U64(1 << 40);
    expect_err(
        "embedding_length 2^40",
        &serialize(&p).0,
        &["embedding_length"],
    );

    let mut p = tiny_parts();
    let i = tensor_index(&p, "token_embd.weight");
    p.tensors[i].shape = vec![1 << 40, 32];
    expect_err(
        "token_embd dims [2^40, 32]",
        &serialize(&p).0,
        &["token_embd.weight", "extends past the end"],
    );

    let mut p = tiny_parts();
    let i = tensor_index(&p, "token_embd.weight");
    p.tensors[i].shape = vec![1 << 32, 1 << 32, 1 << 32];
    expect_err(
        "token_embd dims [2^32, 2^32, 2^32]",
        &serialize(&p).0,
        &["token_embd.weight", "overflows"],
    );
}

#[test]
fn nan_and_inf_weights() {
    // In a norm vector: refused at load, naming the tensor.
    for (case, bad) in [
        ("NaN in output_norm", f32::NAN),
        ("+Inf in output_norm", f32::INFINITY),
    ] {
        let mut p = tiny_parts();
        let i = tensor_index(&p, "output_norm.weight");
        p.tensors[i].data[12..16].copy_from_slice(&bad.to_le_bytes());
        expect_err(
            case,
            &serialize(&p).0,
            &["output_norm.weight", "non-finite value at 3"],
        );
    }
    // In a matrix: matrices are not scanned at load (that would read every weight of a
    // multi-GB file), but the first forward pass that produces a non-finite key or value is an
    // error from the cache, not a NaN that spreads or a panic.
    let mut p = tiny_parts();
    let i = tensor_index(&p, "blk.0.attn_k.weight");
    for j in 0..32 {
        let at = 4 * j;
        p.tensors[i].data[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let m = load(&serialize(&p).0).expect("matrices are not scanned at load");
    let c = &m.model.config;
    let mut cache = kivi_core::new_cache(
        &CacheConfig::F16,
        CacheShape {
            n_layer: c.n_layer,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
        },
    )
    .unwrap();
    let seq = cache.add_sequence();
    let e = m
        .model
        .forward(&[1, 2], cache.as_mut(), seq, Logits::Last)
        .expect_err("NaN keys are refused");
    eprintln!("| NaN in a matrix (blk.0.attn_k.weight), at the first forward | `{e}` |");
    assert!(e.to_string().contains("non-finite"), "{e}");
}

#[test]
fn wrong_tensor_types() {
    // A type this crate does not compute with, size consistent: refused when the model needs it.
    let mut p = tiny_parts();
    let i = tensor_index(&p, "blk.0.attn_q.weight");
    p.tensors[i].ggml_type = 26; // I32: same byte size as F32
    expect_err(
        "attn_q stored as I32",
        &serialize(&p).0,
        &["unsupported tensor type", "blk.0.attn_q.weight"],
    );
    // A type id ggml never had: refused at open (its size cannot be checked).
    let mut p = tiny_parts();
    let i = tensor_index(&p, "output.weight");
    p.tensors[i].ggml_type = 99;
    expect_err(
        "output.weight type id 99",
        &serialize(&p).0,
        &["output.weight", "unknown ggml type id 99"],
    );
    // A quantized type whose data is too short for the dims (F32 bytes relabelled Q8_0 keep
    // their length, so the dims must be wrong for it): a size mismatch is past-the-end or a
    // shape error, never a read out of bounds.
    let mut p = tiny_parts();
    let i = tensor_index(&p, "token_embd.weight");
    p.tensors[i].ggml_type = 8;
    p.tensors[i].shape = vec![64, 64];
    expect_err(
        "token_embd relabelled Q8_0 with dims [64, 64]",
        &serialize(&p).0,
        &["token_embd.weight"],
    );
    // A vocabulary of the wrong type.
    let mut p = tiny_parts();
    let i = meta_index(&p, "tokenizer.ggml.tokens");
    p.metadata[i].1 = MetaValue::Array(vec![MetaValue::U32(1); 64]);
    expect_err(
        "tokenizer.ggml.tokens as an array of U32",
        &serialize(&p).0,
        &["tokenizer.ggml.tokens"],
    );
}

#[test]
fn duplicate_names() {
    let mut p = tiny_parts();
    let dup = Tensor {
        name: "output.weight".into(),
        ggml_type: 0,
        shape: vec![1, 32],
        data: vec![0; 128],
    };
    p.tensors.push(dup);
    let n = p.tensors.len() - 1;
    expect_err(
        "tensor output.weight twice",
        &serialize(&p).0,
        &[&format!("tensor_infos[{n}]"), "duplicate tensor name"],
    );
    let mut p = tiny_parts();
    p.metadata
        .push(("llama.block_count".into(), MetaValue::U32(2)));
    expect_err(
        "metadata key llama.block_count twice",
        &serialize(&p).0,
        &["llama.block_count", "duplicate key"],
    );
}
