//! The server's request parsing (`kivi_server::api::parse_*_request`): any body bytes. Checks
//! that an accepted request satisfies the documented invariants (parameters in range, roles
//! known, stop strings bounded), that a rejected one is a 4xx naming its parameter, and renders
//! accepted chat messages with the ChatML template as the server would.
#![no_main]

use kivi_model::chat::{ChatMessage, ChatTemplate};
use kivi_server::api::{
    parse_chat_request, parse_completion_request, GenParams, MAX_STOP_BYTES, MAX_STOP_STRINGS,
};
use libfuzzer_sys::fuzz_target;

fn check_params(p: &GenParams) {
    assert!((0.0..=2.0).contains(&p.temperature), "temperature {}", p.temperature);
    assert!(p.top_p > 0.0 && p.top_p <= 1.0, "top_p {}", p.top_p);
    assert!(p.max_tokens != Some(0));
    assert!(p.stop.len() <= MAX_STOP_STRINGS);
    assert!(p.stop.iter().all(|s| !s.is_empty() && s.len() <= MAX_STOP_BYTES), "{:?}", p.stop);
}

fn check_err(e: &kivi_server::error::ApiError) {
    assert!(e.status.is_client_error(), "{e:?}");
    assert!(!e.message.is_empty());
}

fuzz_target!(|body: &[u8]| {
    match parse_chat_request(body) {
        Ok(req) => {
            check_params(&req.params);
            assert!(!req.messages.is_empty());
            for m in &req.messages {
                assert!(matches!(m.role.as_str(), "system" | "user" | "assistant"), "{}", m.role);
            }
            let msgs: Vec<ChatMessage> = req
                .messages
                .iter()
                .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                .collect();
            let t = ChatTemplate::new(kivi_model::chat::CHATML_TEMPLATE, "", "<|im_end|>").unwrap();
            t.render(&msgs, true).expect("ChatML renders any accepted messages");
        }
        Err(e) => check_err(&e),
    }
    match parse_completion_request(body) {
        Ok(req) => check_params(&req.params),
        Err(e) => check_err(&e),
    }
});
