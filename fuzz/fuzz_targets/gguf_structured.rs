//! Structured GGUF files: metadata of every value type (nested arrays included), tensor infos
//! with any type id, dims and alignment, built with `GgufWriter` and then damaged by a few
//! byte patches, so the fuzzer reaches the checks behind a well-formed header quickly.
#![no_main]

use arbitrary::Arbitrary;
use kivi_fuzz::{exercise_gguf, scratch_file};
use kivi_model::gguf::{Gguf, GgufWriter, MetaValue};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Homogeneous by construction: every element takes the first one's variant.
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

fn meta(v: &Value, depth: usize) -> MetaValue {
    match v {
        Value::U8(x) => MetaValue::U8(*x),
        Value::I8(x) => MetaValue::I8(*x),
        Value::U16(x) => MetaValue::U16(*x),
        Value::I16(x) => MetaValue::I16(*x),
        Value::U32(x) => MetaValue::U32(*x),
        Value::I32(x) => MetaValue::I32(*x),
        Value::F32(x) => MetaValue::F32(*x),
        Value::Bool(x) => MetaValue::Bool(*x),
        Value::Str(s) => MetaValue::String(s.clone()),
        Value::U64(x) => MetaValue::U64(*x),
        Value::I64(x) => MetaValue::I64(*x),
        Value::F64(x) => MetaValue::F64(*x),
        Value::Array(items) if depth < 6 => {
            let items: Vec<MetaValue> = items.iter().map(|i| meta(i, depth + 1)).collect();
            // Keep arrays homogeneous (the writer checks): drop elements of another type.
            let first = items.first().map(|m| std::mem::discriminant(m));
            MetaValue::Array(
                items
                    .into_iter()
                    .filter(|m| Some(std::mem::discriminant(m)) == first)
                    .collect(),
            )
        }
        Value::Array(_) => MetaValue::Array(vec![]),
    }
}

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Raw(String),
}

const KNOWN_KEYS: &[&str] = &[
    "general.architecture",
    "general.alignment",
    "llama.block_count",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.feed_forward_length",
    "llama.context_length",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.freq_base",
    "llama.attention.key_length",
    "llama.vocab_size",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
];

#[derive(Arbitrary, Debug)]
struct Tensor {
    name: String,
    ggml_type: u8,
    dims: Vec<u16>,
    /// Bytes of data; the real size its dims imply is used when `exact` is set.
    data_len: u16,
    exact: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    v2: bool,
    align_log2: u8,
    metadata: Vec<(Key, Value)>,
    tensors: Vec<Tensor>,
    /// `(position, byte)` patches applied to the serialized file.
    patches: Vec<(u16, u8)>,
    truncate: Option<u16>,
}

fn type_size(id: u32, n: u64) -> u64 {
    let (block, bytes) = match id {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        8 => (32, 34),
        12 => (256, 144),
        14 => (256, 210),
        13 => (256, 176),
        _ => (1, 1),
    };
    n.div_ceil(block).saturating_mul(bytes)
}

fuzz_target!(|input: Input| {
    let mut w = GgufWriter::new();
    w.version(if input.v2 { 2 } else { 3 });
    w.alignment(1u64 << (input.align_log2 % 13));
    for (k, v) in input.metadata.iter().take(64) {
        let key = match k {
            Key::Known(i) => KNOWN_KEYS[*i as usize % KNOWN_KEYS.len()].to_string(),
            Key::Raw(s) => s.clone(),
        };
        w.metadata(key, meta(v, 0));
    }
    for t in input.tensors.iter().take(16) {
        let dims: Vec<u64> = t.dims.iter().take(5).map(|&d| d as u64).collect();
        let n = dims.iter().fold(1u64, |a, &d| a.saturating_mul(d));
        let len = if t.exact {
            type_size(t.ggml_type as u32, n).min(1 << 20)
        } else {
            t.data_len as u64
        };
        let data = (0..len).map(|i| (i * 31 + 7) as u8).collect();
        w.raw_tensor(t.name.clone(), t.ggml_type as u32 % 48, &dims, data);
    }
    let Ok(mut bytes) = w.to_bytes() else { return };
    for &(pos, b) in &input.patches {
        if !bytes.is_empty() {
            let i = pos as usize % bytes.len();
            bytes[i] = b;
        }
    }
    if let Some(t) = input.truncate {
        bytes.truncate(t as usize);
    }
    let path = scratch_file("structured.gguf", &bytes);
    if let Ok(g) = Gguf::open(&path) {
        exercise_gguf(&g);
        let _ = kivi_model::tokenizer::GgufTokenizerSpec::from_gguf(&g);
        let _ = kivi_model::config::Config::from_gguf(&g);
    }
});
