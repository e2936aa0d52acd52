//! Inputs the `fuzz/` targets found or that their review called for (issue #8), kept as
//! ordinary tests. Each says what it guards against and what the fix was.

use kivi_model::chat::{ChatMessage, ChatTemplate};

fn fixture_template(file: &str) -> String {
    let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["chat_template"].as_str().unwrap().to_string()
}

/// A chat template comes from the model file. Before the fix (minijinja's fuel was off), this
/// one ran ~10^10 loop iterations: a hang. Now it stops with an out-of-fuel error.
#[test]
fn runaway_template_runs_out_of_fuel() {
    let sources = [
        "{% for a in range(99999) %}{% for b in range(99999) %}{{ a }}{% endfor %}{% endfor %}",
        // 10 GB of output: a 100 KB string written 99 999 times.
        "{% set s = 'x' * 100000 %}{% for i in range(99999) %}{{ s }}{% endfor %}",
        // Recursion through a macro.
        "{% macro f(n) %}{{ f(n + 1) }}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    ];
    for src in sources {
        let t = ChatTemplate::new(src, "", "").unwrap();
        let e = t
            .render(&[ChatMessage::user("hi")], true)
            .expect_err("a runaway template must fail");
        let msg = e.to_string();
        assert!(
            msg.contains("fuel") || msg.contains("recursion"),
            "{src}: {msg}"
        );
    }
}

/// The fuel budget is far above what real templates need: SmolLM2's and Qwen2.5's templates
/// with 200 messages of 2 KB each render completely.
#[test]
fn fuel_is_ample_for_long_real_conversations() {
    let content = "Lorem ipsum dolor sit amet, 12345. ".repeat(58); // ~2 KB
    let mut messages = vec![ChatMessage::system("You are helpful.")];
    for i in 0..200 {
        messages.push(if i % 2 == 0 {
            ChatMessage::user(content.clone())
        } else {
            ChatMessage::assistant(content.clone())
        });
    }
    for (file, bos, eos) in [
        (
            "tokenizer_SmolLM2-135M-Instruct.Q4_1.json",
            "<|im_start|>",
            "<|im_end|>",
        ),
        (
            "tokenizer_qwen2.5-coder-1.5b-instruct-q4_k_m.json",
            "<|endoftext|>",
            "<|im_end|>",
        ),
    ] {
        let t = ChatTemplate::new(fixture_template(file), bos, eos).unwrap();
        let out = t.render(&messages, true).unwrap();
        assert!(out.len() > 200 * content.len(), "{file}");
        assert_eq!(out.matches("<|im_start|>").count(), 202, "{file}");
    }
    let out = ChatTemplate::chatml().render(&messages, true).unwrap();
    assert_eq!(out.matches("<|im_end|>").count(), 201);
}
