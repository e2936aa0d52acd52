//! Chat-template rendering: any template source, BOS/EOS strings and messages. Must return (a
//! result or an error) without hanging or exhausting memory: `ChatTemplate` sets minijinja's
//! fuel. The input is NUL-separated: `template \0 bos \0 eos \0 [role byte]content \0 ...`.
#![no_main]

use kivi_model::chat::{ChatMessage, ChatTemplate};
use libfuzzer_sys::fuzz_target;

const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let text = |p: Option<&[u8]>| String::from_utf8_lossy(p.unwrap_or_default()).into_owned();
    let source = text(parts.next());
    let bos = text(parts.next());
    let eos = text(parts.next());
    let mut add_generation_prompt = false;
    let messages: Vec<ChatMessage> = parts
        .take(64)
        .map(|p| {
            let (role, content) = match p.split_first() {
                Some((&r, rest)) => {
                    add_generation_prompt ^= r & 0x80 != 0;
                    (ROLES[(r & 0x7f) as usize % ROLES.len()], rest)
                }
                None => ("user", p),
            };
            ChatMessage::new(role, String::from_utf8_lossy(content))
        })
        .collect();
    let Ok(t) = ChatTemplate::new(source, bos, eos) else {
        return;
    };
    let _ = t.render(&messages, add_generation_prompt);
});
