//! Qwen2.5-Coder's real chat template (from the GGUF, via the fixture) renders the ChatML it
//! should: the default system prompt when there is none, the given one otherwise. Expected
//! strings written by hand from the template (and cross-checked with Python's jinja2).

use kivi_model::chat::{ChatMessage, ChatTemplate};

const FIXTURE: &str = include_str!("fixtures/tokenizer_qwen2.5-coder-1.5b-instruct-q4_k_m.json");

fn qwen2() -> ChatTemplate {
    let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let source = fixture["chat_template"].as_str().unwrap();
    ChatTemplate::new(source, "<|endoftext|>", "<|im_end|>").unwrap()
}

#[test]
fn default_system_prompt() {
    let s = qwen2().render(&[ChatMessage::user("hi")], true).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nhi<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn own_system_prompt_multi_turn() {
    let messages = [
        ChatMessage::system("Be brief."),
        ChatMessage::user("hi"),
        ChatMessage::assistant("Hello!"),
        ChatMessage::user("Write fib in Python."),
    ];
    let s = qwen2().render(&messages, true).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nBe brief.<|im_end|>\n\
         <|im_start|>user\nhi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n\
         <|im_start|>user\nWrite fib in Python.<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}
