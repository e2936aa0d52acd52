//! SmolLM2's real chat template (as the GGUF stores it) renders the ChatML it should.
//! Expected strings were written by hand from the template: it injects a default system prompt
//! when the first message is not a system message.

use std::path::PathBuf;

use kivi_model::chat::{ChatMessage, ChatTemplate};
use kivi_model::gguf::Gguf;
use kivi_model::tokenizer::Tokenizer;

const FIXTURE: &str = include_str!("fixtures/tokenizer_SmolLM2-135M-Instruct.Q4_1.json");

fn template_source() -> String {
    let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    fixture["chat_template"].as_str().unwrap().to_string()
}

fn smollm2() -> ChatTemplate {
    ChatTemplate::new(template_source(), "<|im_start|>", "<|im_end|>").unwrap()
}

#[test]
fn default_system_prompt_injected() {
    let s = smollm2()
        .render(&[ChatMessage::user("Hello!")], true)
        .unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHello!<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn own_system_prompt_multi_turn() {
    let messages = [
        ChatMessage::system("You are terse."),
        ChatMessage::user("Hi"),
        ChatMessage::assistant("Hello."),
        ChatMessage::user("Bye"),
    ];
    let t = smollm2();
    let s = t.render(&messages, false).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are terse.<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n\
         <|im_start|>user\nBye<|im_end|>\n"
    );
    let with_prompt = t.render(&messages, true).unwrap();
    assert_eq!(with_prompt, format!("{s}<|im_start|>assistant\n"));
}

#[test]
fn template_from_the_gguf() {
    let cache = match std::env::var_os("KIVI_CACHE") {
        Some(c) => PathBuf::from(c),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".cache/kivi"),
            None => return,
        },
    };
    let path = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        eprintln!("skipped: model not found ({})", path.display());
        return;
    }
    let t = {
        let gguf = Gguf::open(&path).unwrap();
        ChatTemplate::from_gguf(&gguf, &Tokenizer::from_gguf(&gguf).unwrap()).unwrap()
    };
    assert!(!t.is_fallback());
    assert_eq!(t.source(), template_source());
    assert_eq!(t.bos_token(), "<|im_start|>");
    assert_eq!(t.eos_token(), "<|im_end|>");
    let s = t
        .render(&[ChatMessage::user("What is 2+2?")], true)
        .unwrap();
    assert!(s.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
    assert!(s.ends_with("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"));
}
