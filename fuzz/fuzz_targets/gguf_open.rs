//! Raw bytes as a GGUF file: the reader (header, metadata of every type, tensor infos, offsets,
//! alignment), every accessor on what it returns, and the whole loader (`loader::load`: tokenizer,
//! chat template, config, model construction), exactly as `kivi` opens a model.
#![no_main]

use kivi_fuzz::{exercise_gguf, scratch_file};
use kivi_model::gguf::Gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = scratch_file("input.gguf", data);
    if let Ok(g) = Gguf::open(&path) {
        exercise_gguf(&g);
        let _ = kivi_model::tokenizer::GgufTokenizerSpec::from_gguf(&g);
        let _ = kivi_model::config::Config::from_gguf(&g);
    }
    if let Ok(m) = kivi_model::loader::load(&path) {
        let ids = m.tokenizer.encode("Hello <|im_start|>world", true);
        if let Ok(ids) = ids {
            assert!(ids.iter().all(|&i| (i as usize) < m.model.config.vocab));
        }
        let _ = m
            .chat_template
            .render(&[kivi_model::chat::ChatMessage::user("hi")], true);
    }
});
