//! The `kivi` binary end to end: generation with each cache on the default model, and clear
//! errors (non-zero exit, no panic) for bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn kivi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kivi"))
        .args(args)
        .output()
        .expect("running kivi")
}

fn default_model() -> Option<PathBuf> {
    let cache = std::env::var_os("KIVI_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kivi")))?;
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}

fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "panic instead of an error: {stderr}"
    );
    assert!(stderr.contains("error:"), "no error message: {stderr}");
    assert!(
        stderr.contains(needle),
        "error should mention `{needle}`: {stderr}"
    );
}

#[test]
fn capital_of_france_is_paris_with_every_cache() {
    let Some(model) = default_model() else {
        eprintln!("skipped: model not found (run scripts/fetch-models.sh)");
        return;
    };
    for kv in ["f16", "kivi4", "kivi2"] {
        let out = kivi(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "The capital of France is",
            "--kv",
            kv,
            "--max-tokens",
            "12",
            "--stats",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{kv}: {stderr}");
        assert!(
            stdout.starts_with("The capital of France is"),
            "{kv}: {stdout}"
        );
        assert!(stdout.contains("Paris"), "{kv}: {stdout}");
        assert!(
            stderr.contains("decode") && stderr.contains("KV cache"),
            "{kv}: no stats: {stderr}"
        );
    }
}

#[test]
fn kivi_cache_is_smaller_than_f16_after_the_window() {
    let Some(model) = default_model() else {
        eprintln!("skipped: model not found");
        return;
    };
    // 300 tokens: beyond R = 128, so KIVI has quantized most of them.
    let bytes = |kv: &str| -> u64 {
        let out = kivi(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--kv",
            kv,
            "--max-tokens",
            "300",
            "--ignore-eos",
            "--stats",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("KV cache"))
            .expect("stats line")
            .to_string();
        line.split(": ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (f16, kivi2, kivi4) = (bytes("f16"), bytes("kivi2"), bytes("kivi4"));
    // 4 prompt + 299 fed generated tokens (the last one sampled is never fed back)
    // x 30 layers x (K and V) x 192 channels x 2 bytes.
    assert_eq!(f16, 303 * 30 * 2 * 192 * 2);
    assert!(
        kivi2 < kivi4 && kivi4 < f16,
        "f16 {f16}, kivi4 {kivi4}, kivi2 {kivi2}"
    );
    assert!(
        (f16 as f64 / kivi2 as f64) > 2.0,
        "f16 {f16} vs kivi2 {kivi2}"
    );
}

#[test]
fn missing_model_file() {
    let out = kivi(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert_clean_failure(&out, "/nonexistent/model.gguf");
}

#[test]
fn corrupt_and_truncated_model_files() {
    let dir = std::env::temp_dir().join(format!("kivi-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.gguf");
    std::fs::write(
        &garbage,
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761u32) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_clean_failure(
        &kivi(&[
            "generate",
            "--model",
            garbage.to_str().unwrap(),
            "--prompt",
            "hi",
        ]),
        "GGUF",
    );
    if let Some(model) = default_model() {
        let bytes = std::fs::read(&model).unwrap();
        for cut in [10, 1000, 1_000_000, bytes.len() - 1] {
            let t = dir.join(format!("cut{cut}.gguf"));
            std::fs::write(&t, &bytes[..cut]).unwrap();
            assert_clean_failure(
                &kivi(&["generate", "--model", t.to_str().unwrap(), "--prompt", "hi"]),
                "GGUF",
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn prompt_longer_than_the_context() {
    let Some(model) = default_model() else {
        eprintln!("skipped: model not found");
        return;
    };
    let prompt = "hello ".repeat(9000);
    let out = kivi(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &prompt,
    ]);
    assert_clean_failure(&out, "context window");
}

#[test]
fn bad_arguments() {
    let Some(model) = default_model() else {
        eprintln!("skipped: model not found");
        return;
    };
    let m = model.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", m, "--prompt", "x"];
        args.extend_from_slice(extra);
        kivi(&args)
    };
    assert_clean_failure(&run(&["--kv", "kivi3"]), "bit widths");
    assert_clean_failure(&run(&["--kv", "bogus"]), "expected f16");
    assert_clean_failure(&run(&["--kv", "kivi2:g24"]), "group_size");
    assert_clean_failure(&run(&["--kv", "kivi2:r48"]), "residual_len");
    assert_clean_failure(&run(&["--kv", "f16", "--residual", "64"]), "KIVI");
    assert_clean_failure(&run(&["--top-p", "0"]), "top-p");
}

#[test]
fn serve_rejects_bad_arguments_before_listening() {
    let Some(model) = default_model() else {
        eprintln!("skipped: model not found");
        return;
    };
    let m = model.to_str().unwrap();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--model", m, "--port", "0"];
        args.extend_from_slice(extra);
        kivi(&args)
    };
    assert_clean_failure(&serve(&["--max-running", "0"]), "--max-running");
    assert_clean_failure(&serve(&["--api-key", ""]), "--api-key");
    assert_clean_failure(&serve(&["--kv", "bogus"]), "expected f16");
    assert_clean_failure(&serve(&["--host", "256.1.1.1"]), "listening on");
    let out = serve(&["--kv-memory", "lots"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
}
