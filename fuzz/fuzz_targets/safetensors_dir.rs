//! A Hugging Face model directory: `config.json`, `model.safetensors` or an index with shards,
//! `tokenizer.json`. The input is a list of files, each `[name selector u8][len u32 LE][bytes]`
//! (so seeds can be written by hand, see `make_seeds`). Opens it with `SafetensorsDir::open`,
//! reads every tensor, then builds the config and the model as `loader::load` does.
#![no_main]

use kivi_fuzz::scratch_dir;
use kivi_model::config::Config;
use kivi_model::llama::{Model, Naming};
use kivi_model::safetensors::SafetensorsDir;
use kivi_model::tensor::TensorSource;
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir().join("hf");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let mut rest = data;
    while rest.len() >= 5 {
        let name = NAMES[rest[0] as usize % NAMES.len()];
        let len = u32::from_le_bytes(rest[1..5].try_into().unwrap()) as usize;
        rest = &rest[5..];
        let len = len.min(rest.len());
        std::fs::write(dir.join(name), &rest[..len]).expect("scratch file");
        rest = &rest[len..];
    }
    let Ok(st) = SafetensorsDir::open(&dir) else {
        return;
    };
    let _ = st.shard_paths();
    for t in &st.tensors {
        assert!(st.tensor_info(&t.name).is_some());
        if let Ok(raw) = st.tensor(&t.name) {
            let b = raw.data.bytes();
            assert_eq!(b.len(), t.range.len());
            if let (Some(x), Some(y)) = (b.first(), b.last()) {
                std::hint::black_box((*x, *y));
            }
        }
    }
    if let Ok(cfg) = Config::from_hf(st.config()) {
        let _ = Model::load(&st, Naming::HuggingFace, cfg);
    }
    if let Ok(tok) = kivi_model::tokenizer::Tokenizer::from_dir(&dir) {
        let _ = tok.encode("Hello, world! 123", true);
        let _ = kivi_model::chat::ChatTemplate::from_dir(&dir, &tok)
            .and_then(|t| t.render(&[kivi_model::chat::ChatMessage::user("hi")], true));
    }
});
