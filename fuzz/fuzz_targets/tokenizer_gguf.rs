//! Tokenizer construction from GGUF metadata (`tokenizer.ggml.*`), then encode/decode of
//! arbitrary text and ids with it. The metadata is structured (written with `GgufWriter` and
//! read back through `Gguf::open`, the loader's path) so the fuzzer spends its time in the
//! tokenizer builder rather than the GGUF framing.
#![no_main]

use arbitrary::Arbitrary;
use kivi_fuzz::{byte_symbol, scratch_file};
use kivi_model::chat::{ChatMessage, ChatTemplate};
use kivi_model::gguf::{Gguf, GgufWriter, MetaValue};
use kivi_model::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Kind {
    Gpt2,
    Llama,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Pre {
    Known(u8),
    Other(String),
}

const PRES: &[&str] = &[
    "default",
    "llama-bpe",
    "llama3",
    "qwen2",
    "smollm",
    "gpt2",
    "deepseek-llm",
    "starcoder",
];

#[derive(Arbitrary, Debug)]
struct Input {
    kind: Kind,
    pre: Option<Pre>,
    /// Start from the 256 byte-level symbols (or `<0xNN>` byte tokens for SentencePiece).
    byte_vocab: bool,
    tokens: Vec<String>,
    /// `None`: key absent. Values are taken modulo 8 unless `raw_types`.
    token_types: Option<Vec<i8>>,
    raw_types: bool,
    scores: Option<Vec<f32>>,
    /// Pairs of token indices (modulo the vocabulary) written as `"a b"`, or raw strings.
    merges: Vec<(u16, u16)>,
    raw_merges: Vec<String>,
    ids: [Option<u32>; 5],
    flags: [Option<bool>; 3],
    gemma: bool,
    template: Option<String>,
    text: String,
    decode_ids: Vec<u32>,
}

fuzz_target!(|input: Input| {
    let sp = matches!(input.kind, Kind::Llama);
    let mut tokens: Vec<String> = Vec::new();
    if input.byte_vocab {
        if sp {
            tokens.push("<unk>".into());
            tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        } else {
            tokens.extend((0..=255u8).map(|b| byte_symbol(b).to_string()));
        }
    }
    tokens.extend(input.tokens.iter().take(512).cloned());
    let n = tokens.len();
    let mut w = GgufWriter::new();
    let s = |x: &str| MetaValue::String(x.to_string());
    let strs = |v: &[String]| MetaValue::Array(v.iter().map(|x| s(x)).collect());
    if input.gemma {
        w.metadata("general.architecture", s("gemma3"));
    }
    let model = match &input.kind {
        Kind::Gpt2 => "gpt2".to_string(),
        Kind::Llama => "llama".to_string(),
        Kind::Other(o) => o.clone(),
    };
    w.metadata("tokenizer.ggml.model", s(&model));
    match &input.pre {
        Some(Pre::Known(i)) => {
            w.metadata("tokenizer.ggml.pre", s(PRES[*i as usize % PRES.len()]));
        }
        Some(Pre::Other(p)) => {
            w.metadata("tokenizer.ggml.pre", s(p));
        }
        None => {}
    }
    w.metadata("tokenizer.ggml.tokens", strs(&tokens));
    if let Some(types) = &input.token_types {
        let types: Vec<MetaValue> = (0..n)
            .map(|i| {
                let t = types.get(i % types.len().max(1)).copied().unwrap_or(1) as i32;
                MetaValue::I32(if input.raw_types { t } else { t.rem_euclid(8) })
            })
            .collect();
        w.metadata("tokenizer.ggml.token_type", MetaValue::Array(types));
    }
    if let Some(scores) = &input.scores {
        let scores: Vec<MetaValue> = (0..n)
            .map(|i| MetaValue::F32(scores.get(i).copied().unwrap_or(-(i as f32))))
            .collect();
        w.metadata("tokenizer.ggml.scores", MetaValue::Array(scores));
    }
    if n > 0 && (!input.merges.is_empty() || !input.raw_merges.is_empty()) {
        let mut merges: Vec<String> = input
            .merges
            .iter()
            .take(512)
            .map(|&(a, b)| format!("{} {}", tokens[a as usize % n], tokens[b as usize % n]))
            .collect();
        merges.extend(input.raw_merges.iter().take(64).cloned());
        w.metadata("tokenizer.ggml.merges", strs(&merges));
    }
    let id_keys = ["bos", "eos", "eot", "eom", "unknown"];
    for (k, id) in id_keys.iter().zip(input.ids) {
        if let Some(id) = id {
            // Mostly in range, sometimes not.
            let id = if n > 0 && id & 0x8000_0000 == 0 {
                id % n as u32
            } else {
                id
            };
            w.metadata(format!("tokenizer.ggml.{k}_token_id"), MetaValue::U32(id));
        }
    }
    for (k, f) in ["add_bos_token", "add_eos_token", "add_space_prefix"]
        .iter()
        .zip(input.flags)
    {
        if let Some(f) = f {
            w.metadata(format!("tokenizer.ggml.{k}"), MetaValue::Bool(f));
        }
    }
    if let Some(t) = &input.template {
        w.metadata("tokenizer.chat_template", s(t));
    }
    let Ok(bytes) = w.to_bytes() else { return };
    let path = scratch_file("tokenizer.gguf", &bytes);
    let g = Gguf::open(&path).expect("the writer's files open");
    let Ok(tok) = Tokenizer::from_gguf(&g) else {
        return;
    };
    let vocab = tok.vocab_size();
    for add_special in [false, true] {
        if let Ok(ids) = tok.encode(&input.text, add_special) {
            for &id in &ids {
                assert!(
                    (id as usize) < vocab,
                    "id {id} outside the vocabulary {vocab}"
                );
            }
            let _ = tok.decode(&ids);
            let _ = tok.decode_with(&ids, true);
        }
    }
    let _ = tok.decode(&input.decode_ids);
    let mut stream = tok.stream();
    for &id in input.decode_ids.iter().take(256) {
        let _ = stream.try_push(id);
    }
    let _ = stream.finish();
    for &id in input.decode_ids.iter().take(16) {
        let _ = (tok.id_to_token(id), tok.is_eos(id));
    }
    let _ = (tok.bos_id(), tok.eos_id(), tok.eos_ids(), tok.adds_bos());
    let _ = tok.token_to_id(&input.text);
    if let Ok(t) = ChatTemplate::from_gguf(&g, &tok) {
        let _ = t.render(&[ChatMessage::user(input.text.clone())], true);
    }
});
