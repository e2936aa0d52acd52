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
    // The OS's reason once, not once per level of the error chain.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("os error").count(), 1, "{stderr}");
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
    // Checked before the prompt is echoed: nothing on stdout.
    assert!(
        out.stdout.is_empty(),
        "{} bytes on stdout",
        out.stdout.len()
    );
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

/// One HTTP/1.1 request over a fresh connection; the whole response as text.
fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to kivi serve");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serve_random_weights_on_the_cpu_answers_with_byte_tokens_and_stops_on_sigterm() {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kivi"))
        .args([
            "serve",
            "--device",
            "cpu",
            "--random-weights",
            "--arch",
            "tiny",
        ])
        .args(["--kv", "kivi2:g16", "--port", "0", "--kv-memory", "4M"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kivi serve");
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut start = String::new();
    let addr = loop {
        let line = stderr
            .next()
            .expect("kivi serve ended before listening")
            .unwrap();
        start.push_str(&line);
        if let Some(at) = line.find("http://") {
            break line[at + 7..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
        }
    };
    assert!(
        start.contains("[device] cpu") && start.contains("random-tiny"),
        "{start}"
    );
    assert!(start.contains("KV budget 0.004 GiB"), "{start}");
    // The byte tokenizer: "hello" is 5 prompt tokens (no BOS); greedy answers repeat exactly.
    let body = r#"{"prompt": "hello", "max_tokens": 7, "temperature": 0}"#;
    let first = http(&addr, "POST", "/v1/completions", body);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        first.contains(r#""prompt_tokens":5,"completion_tokens":7"#),
        "{first}"
    );
    let text = |r: &str| {
        r[r.find(r#""text""#).unwrap()..]
            .split(',')
            .next()
            .unwrap()
            .to_string()
    };
    let again = http(&addr, "POST", "/v1/completions", body);
    assert_eq!(text(&first), text(&again));
    let bad = http(&addr, "POST", "/v1/completions", r#"{"prompt": [256]}"#);
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let metrics = http(&addr, "GET", "/metrics", "");
    assert!(metrics.contains("\nkivi_kv_blocks_used 0\n"), "{metrics}");
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let rest: Vec<String> = stderr.map_while(Result::ok).collect();
    assert!(child.wait().unwrap().success(), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("kivi serve: stopped")),
        "{rest:?}"
    );
}

#[test]
fn serve_on_cuda_without_a_gpu_or_room_is_a_clean_error() {
    // No GPU (CI): the device error. A GPU: a 1-byte KV cache is too small. Either way, no server.
    let out = kivi(&[
        "serve",
        "--device",
        "cuda",
        "--random-weights",
        "--arch",
        "tiny",
        "--port",
        "0",
        "--kv-memory",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let needle = if stderr.contains("[device] cuda") {
        "too small"
    } else {
        "--device cuda needs"
    };
    assert_clean_failure(&out, needle);
}
