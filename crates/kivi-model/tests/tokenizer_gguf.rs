//! GGUF tokenizers against token ids from an independent reference (Hugging Face transformers'
//! GGUF converter; `scripts/fixtures/gen_tokenizer_fixtures.py` wrote the fixtures): SmolLM2
//! (byte-level BPE, pre `smollm`), Qwen2.5-Coder (pre `qwen2`) and Gemma 3 (SentencePiece, BOS).
//! Needs the models in `$KIVI_CACHE/models` (default `~/.cache/kivi`;
//! `scripts/fetch-models.sh [smollm2|qwen|gemma3]`);
//! each test prints `skipped: model not found` without its model.

use std::path::PathBuf;

use kivi_model::gguf::Gguf;
use kivi_model::tokenizer::Tokenizer;

const SMOLLM2: &str = include_str!("fixtures/tokenizer_SmolLM2-135M-Instruct.Q4_1.json");
const QWEN2: &str = include_str!("fixtures/tokenizer_qwen2.5-coder-1.5b-instruct-q4_k_m.json");
const GEMMA3: &str = include_str!("fixtures/tokenizer_gemma-3-270m-q4_k_m.json");

fn model_path(file: &str) -> Option<PathBuf> {
    let cache = match std::env::var_os("KIVI_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/kivi"),
    };
    let path = cache.join("models").join(file);
    path.is_file().then_some(path)
}

fn load(fixture: &str) -> Option<(Tokenizer, serde_json::Value)> {
    let fixture: serde_json::Value = serde_json::from_str(fixture).unwrap();
    let file = fixture["model"].as_str().unwrap();
    let Some(path) = model_path(file) else {
        eprintln!("skipped: model not found ({file})");
        return None;
    };
    let gguf = Gguf::open(&path).unwrap();
    Some((Tokenizer::from_gguf(&gguf).unwrap(), fixture))
}

fn ids_match_reference(fixture: &str) {
    let Some((tok, fixture)) = load(fixture) else {
        return;
    };
    let mut failures = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, true).unwrap();
        if got != want {
            failures.push(format!("{text:?}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of the reference encodings differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn round_trip_and_stream(fixture: &str) {
    let Some((tok, fixture)) = load(fixture) else {
        return;
    };
    let mut texts: Vec<String> = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    texts.push("Ünïcödé ∑∫√ ⟨ket⟩ 𝔘𝔫𝔦 — “quotes” ‘single’ …".into());
    texts.push("    indented\n\t\tcode\r\n  \n".into());
    texts.push("ﬁ ligature, 한국어, العربية, עברית, ελληνικά, кириллица".into());
    for text in &texts {
        // Without BOS (Gemma adds one); special tokens written in the text still parse.
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(&tok.decode(&ids).unwrap(), text);
        let mut stream = tok.stream();
        let mut out = String::new();
        for &id in &ids {
            let piece = stream.push(id);
            assert!(!piece.contains('\u{FFFD}'), "{text:?}: piece {piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&stream.finish());
        assert_eq!(&out, text);
    }
}

#[test]
fn smollm2_ids_match_reference() {
    ids_match_reference(SMOLLM2);
}

#[test]
fn smollm2_round_trip_and_stream() {
    round_trip_and_stream(SMOLLM2);
}

#[test]
fn smollm2_special_ids() {
    let Some((tok, fixture)) = load(SMOLLM2) else {
        return;
    };
    assert_eq!(
        tok.vocab_size(),
        fixture["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(tok.bos_id(), Some(1));
    assert!(!tok.adds_bos(), "SmolLM2 adds no BOS");
    assert_eq!(tok.eos_ids(), &[0, 2], "<|endoftext|> and <|im_end|>");
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![1]);
    assert_eq!(
        tok.decode_with(&[1, 4093, 198, 6004, 2], true).unwrap(),
        "user\nhi"
    );
}

#[test]
fn qwen2_ids_match_reference() {
    ids_match_reference(QWEN2);
}

#[test]
fn qwen2_round_trip_and_stream() {
    round_trip_and_stream(QWEN2);
}

#[test]
fn qwen2_special_ids() {
    let Some((tok, fixture)) = load(QWEN2) else {
        return;
    };
    assert_eq!(
        tok.vocab_size(),
        fixture["vocab_size"].as_u64().unwrap() as usize
    );
    assert!(!tok.adds_bos(), "Qwen2 adds no BOS");
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let endoftext = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(tok.eos_id(), Some(im_end));
    assert!(tok.is_eos(im_end) && tok.is_eos(endoftext));
}

#[test]
fn gemma3_ids_match_reference() {
    ids_match_reference(GEMMA3);
}

#[test]
fn gemma3_round_trip_and_stream() {
    round_trip_and_stream(GEMMA3);
}

#[test]
fn gemma3_special_ids() {
    let Some((tok, fixture)) = load(GEMMA3) else {
        return;
    };
    assert_eq!(
        tok.vocab_size(),
        fixture["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(tok.bos_id(), Some(2));
    assert!(tok.adds_bos());
    assert_eq!(tok.encode("hi", true).unwrap()[0], 2);
    assert_eq!(
        tok.encode("<bos>hi", true).unwrap(),
        tok.encode("hi", true).unwrap(),
        "no double BOS"
    );
    assert_eq!(tok.eos_id(), Some(1));
    let end_of_turn = tok.token_to_id("<end_of_turn>").unwrap();
    assert!(tok.is_eos(1) && tok.is_eos(end_of_turn));
}
