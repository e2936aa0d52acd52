//! The server over real HTTP on loopback, with the engine on the default model
//! (SmolLM2-135M-Instruct; `skipped: model not found` without it). The client is a raw TCP one
//! written here, so the tests check the bytes on the wire (status lines, chunked SSE framing).
//!
//! Tests run one at a time (a lock): each starts its own engine and server, and the engine's loop
//! holds a rayon pool thread while it lives.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kivi_engine::engine::{Engine, EngineConfig, EngineStats};
use kivi_engine::kv_spec::parse_kv;
use kivi_engine::{GenerateParams, SamplingParams, Session};
use kivi_model::chat::{ChatMessage, ChatTemplate};
use kivi_model::llama::Model;
use kivi_model::tokenizer::Tokenizer;
use kivi_server::{AppState, ServerConfig};
use serde_json::{json, Value};

/// The cache the servers under test use.
const KV: &str = "kivi2";

// ---- Model and server ------------------------------------------------------------------------

struct Shared {
    model: Arc<Model>,
    tokenizer: Tokenizer,
    template_source: String,
    bos: String,
    eos: String,
}

fn model_path() -> Option<PathBuf> {
    let cache = std::env::var_os("KIVI_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kivi")))?;
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}

fn shared() -> Option<&'static Shared> {
    static SHARED: OnceLock<Option<Shared>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let m = kivi_model::loader::load(&model_path()?).expect("loading SmolLM2");
            Some(Shared {
                model: Arc::new(m.model),
                tokenizer: m.tokenizer,
                template_source: m.chat_template.source().to_string(),
                bos: m.chat_template.bos_token().to_string(),
                eos: m.chat_template.eos_token().to_string(),
            })
        })
        .as_ref()
}

fn template(s: &Shared) -> ChatTemplate {
    ChatTemplate::new(s.template_source.clone(), s.bos.clone(), s.eos.clone()).unwrap()
}

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

struct TestServer {
    addr: SocketAddr,
    engine: Engine,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    _serial: MutexGuard<'static, ()>,
}

#[derive(Default)]
struct Options {
    api_key: Option<&'static str>,
    max_running: Option<usize>,
    max_waiting: Option<usize>,
    body_limit: Option<usize>,
    kv_memory: Option<u64>,
}

impl TestServer {
    fn start(opts: Options) -> Option<TestServer> {
        let Some(s) = shared() else {
            eprintln!("skipped: model not found (run scripts/fetch-models.sh)");
            return None;
        };
        let guard = serial();
        let defaults = EngineConfig::default();
        let config = EngineConfig {
            cache: parse_kv(KV).unwrap(),
            max_running: opts.max_running.unwrap_or(defaults.max_running),
            max_waiting: opts.max_waiting.unwrap_or(defaults.max_waiting),
            kv_memory_bytes: opts.kv_memory,
            ..defaults
        };
        let engine = Engine::start(s.model.clone(), config).unwrap();
        let state = AppState::new(
            engine.clone(),
            s.tokenizer.clone(),
            template(s),
            ServerConfig {
                model_name: "smollm2-test".into(),
                api_key: opts.api_key.map(str::to_string),
                body_limit: opts.body_limit.unwrap_or(kivi_server::DEFAULT_BODY_LIMIT),
            },
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                kivi_server::serve(listener, state, async move {
                    let _ = stopped.await;
                })
                .await
            })
        });
        Some(TestServer {
            addr,
            engine,
            stop: Some(stop),
            thread: Some(thread),
            _serial: guard,
        })
    }

    /// Graceful shutdown: stop accepting, finish what is in flight, stop the engine.
    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread").expect("server result");
        }
        self.engine.shutdown();
    }

    /// Waits until the engine has nothing running or waiting and holds no KV memory.
    fn wait_idle(&self) -> EngineStats {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.engine.stats();
            if s.running == 0 && s.waiting == 0 && s.kv_bytes_used == 0 && s.kv_blocks_used == 0 {
                return s;
            }
            assert!(Instant::now() < deadline, "engine not idle: {s:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.shutdown();
        } else if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

// ---- A raw HTTP/1.1 client -------------------------------------------------------------------

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

fn write_request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) and close before reading a large body: ignore write errors.
    let _ = stream.write_all(body);
}

fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').expect("header line");
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    (status, headers)
}

/// One chunk of a chunked body; None at the last (zero) chunk or EOF.
fn read_chunk(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
    if size == 0 {
        return None;
    }
    let mut buf = vec![0; size + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(size);
    Some(buf)
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    write_request(&mut stream, method, path, headers, body);
    let mut r = BufReader::new(stream);
    let (status, headers) = read_head(&mut r);
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(c) = read_chunk(&mut r) {
            body.extend(c);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    HttpResponse {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn post_json(addr: SocketAddr, path: &str, body: &Value) -> HttpResponse {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// A streaming response read event by event.
struct SseStream {
    reader: BufReader<TcpStream>,
    status: u16,
    headers: Vec<(String, String)>,
    buf: String,
}

impl SseStream {
    fn open(addr: SocketAddr, path: &str, body: &Value) -> SseStream {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        write_request(
            &mut stream,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader);
        SseStream {
            reader,
            status,
            headers,
            buf: String::new(),
        }
    }

    /// The next `data:` payload (keep-alive comments skipped); None at the end of the body.
    fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                return Some(data.join("\n"));
            }
            let chunk = read_chunk(&mut self.reader)?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Every remaining payload, up to and including `[DONE]`.
    fn rest(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data() {
            let done = d == "[DONE]";
            out.push(d);
            if done {
                break;
            }
        }
        out
    }
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "whatever",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap()
}

// ---- Tests -----------------------------------------------------------------------------------

#[test]
fn chat_completion_non_streaming() {
    let Some(srv) = TestServer::start(Options::default()) else {
        return;
    };
    let s = shared().unwrap();
    let question = "What is the capital of France?";
    let r = post_json(
        srv.addr,
        "/v1/chat/completions",
        &chat_body(question, json!({"max_tokens": 24})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "smollm2-test");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    let reason = choice["finish_reason"].as_str().unwrap();
    let usage = &v["usage"];
    // Independent count: the template rendered and tokenized here.
    let text = template(s)
        .render(&[ChatMessage::user(question)], true)
        .unwrap();
    let prompt_tokens = s.tokenizer.encode(&text, true).unwrap().len();
    assert_eq!(usage["prompt_tokens"], prompt_tokens);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion));
    assert_eq!(reason == "length", completion == 24, "{v}");
    assert_eq!(usage["total_tokens"], prompt_tokens as u64 + completion);
    // Independent reference: the single-sequence Session, greedy, same cache and prefill chunks.
    let prompt = s.tokenizer.encode(&text, true).unwrap();
    let mut session = Session::new(&s.model, &parse_kv(KV).unwrap()).unwrap();
    let params = GenerateParams {
        max_tokens: 24,
        sampling: SamplingParams::default(),
        prefill_chunk: EngineConfig::default().effective_limits().1,
        stop_at_eos: true,
    };
    let (ids, _) = session
        .generate(&prompt, &params, s.tokenizer.eos_ids(), |_| true)
        .unwrap();
    let ids: Vec<u32> = ids
        .into_iter()
        .filter(|t| !s.tokenizer.is_eos(*t))
        .collect();
    assert_eq!(content, s.tokenizer.decode(&ids).unwrap());
    assert_eq!(completion as usize, ids.len());
    srv.wait_idle();
}

#[test]
fn streaming_matches_non_streaming_and_reports_usage() {
    let Some(srv) = TestServer::start(Options::default()) else {
        return;
    };
    let prompt = "Tell me about the ocean.";
    let plain = post_json(
        srv.addr,
        "/v1/chat/completions",
        &chat_body(prompt, json!({"max_tokens": 20})),
    )
    .json();
    let mut sse = SseStream::open(
        srv.addr,
        "/v1/chat/completions",
        &chat_body(
            prompt,
            json!({"max_tokens": 20, "stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(sse.status, 200);
    let ct = sse
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .unwrap();
    assert!(ct.1.starts_with("text/event-stream"), "{ct:?}");
    let datas = sse.rest();
    assert_eq!(datas.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    let mut finish = None;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        if let Some(choice) = c["choices"].get(0) {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"], plain["usage"]);
    for c in &chunks[..chunks.len() - 1] {
        assert!(c["usage"].is_null(), "{c}");
    }
    // Greedy: the same text and finish reason as the non-streamed answer.
    assert_eq!(text, plain["choices"][0]["message"]["content"]);
    assert_eq!(
        finish.as_deref(),
        plain["choices"][0]["finish_reason"].as_str()
    );

    // Completions streaming: same framing, `text` pieces.
    let mut sse = SseStream::open(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stream": true}),
    );
    let datas = sse.rest();
    assert_eq!(datas.last().unwrap(), "[DONE]");
    let streamed: String = datas[..datas.len() - 1]
        .iter()
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            assert_eq!(v["object"], "text_completion");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    let plain = post_json(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    )
    .json();
    assert_eq!(streamed, plain["choices"][0]["text"]);
    assert!(streamed.contains("Paris"), "{streamed}");
    srv.wait_idle();
}

#[test]
fn stop_strings_cut_the_text_across_tokens() {
    let Some(srv) = TestServer::start(Options::default()) else {
        return;
    };
    let prompt = "Once upon a time, in a small village,";
    let base = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let full = post_json(srv.addr, "/v1/completions", &base).json();
    let full_text = full["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(full["usage"]["completion_tokens"], 24);
    // A stop string from the middle of the text that does not start on a token boundary
    // (3 characters straddling the middle), and one that never occurs.
    let chars: Vec<char> = full_text.chars().collect();
    let mid = chars.len() / 2;
    let stop: String = chars[mid - 1..mid + 2].iter().collect();
    let cut = &full_text[..full_text.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut body = base.clone();
        body["stop"] = json!(["never-in-the-text", stop]);
        body["stream"] = json!(stream);
        let (text, reason) = if stream {
            let mut sse = SseStream::open(srv.addr, "/v1/completions", &body);
            let mut text = String::new();
            let mut reason = String::new();
            for d in sse.rest().iter().filter(|d| *d != "[DONE]") {
                let v: Value = serde_json::from_str(d).unwrap();
                text.push_str(v["choices"][0]["text"].as_str().unwrap());
                if let Some(r) = v["choices"][0]["finish_reason"].as_str() {
                    reason = r.to_string();
                }
            }
            (text, reason)
        } else {
            let v = post_json(srv.addr, "/v1/completions", &body).json();
            assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 24);
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        };
        assert_eq!(
            text, cut,
            "stop {stop:?} in {full_text:?} (stream {stream})"
        );
        assert_eq!(reason, "stop");
    }
    // The sequence was cancelled when the stop string matched: nothing keeps running.
    srv.wait_idle();
}

#[test]
fn client_disconnect_frees_the_sequence() {
    let Some(srv) = TestServer::start(Options::default()) else {
        return;
    };
    let long = json!({"max_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut sse = SseStream::open(
        srv.addr,
        "/v1/chat/completions",
        &chat_body("Write a very long story.", long),
    );
    for _ in 0..4 {
        assert!(sse.next_data().is_some());
    }
    let during = srv.engine.stats();
    assert_eq!(during.running, 1);
    assert!(during.kv_bytes_used > 0);
    drop(sse);
    let t = Instant::now();
    let after = srv.wait_idle();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        after.generated_tokens_total < 1000,
        "kept generating after the disconnect: {after:?}"
    );

    // A non-streaming request whose client goes away is cancelled too.
    let mut stream = TcpStream::connect(srv.addr).unwrap();
    let body = chat_body(
        "Write a very long story.",
        json!({"max_tokens": 4000, "ignore_eos": true}),
    );
    write_request(
        &mut stream,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.engine.stats().running == 0 {
        assert!(Instant::now() < deadline, "request never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(stream);
    let before = srv.engine.stats().generated_tokens_total;
    let after = srv.wait_idle();
    assert!(after.generated_tokens_total - before < 500, "{after:?}");
    let m = request(srv.addr, "GET", "/metrics", &[], b"").body;
    assert_eq!(metric(&m, "kivi_client_disconnects_total"), 2.0);
    assert_eq!(metric(&m, "kivi_kv_bytes_used"), 0.0);
    assert_eq!(metric(&m, "kivi_requests_running"), 0.0);
}

#[test]
fn bad_requests_get_openai_errors() {
    let Some(srv) = TestServer::start(Options {
        body_limit: Some(64 << 10),
        ..Default::default()
    }) else {
        return;
    };
    let ctx = shared().unwrap().model.config.context_len;
    let long_prompt = "hello ".repeat(ctx + 10);
    let user = |extra: Value| chat_body("hi", extra).to_string();
    let json_ct = ("Content-Type", "application/json");
    /// (method, path, headers, body, status, param)
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        String,
        u16,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            "{\"messages\": [".into(),
            400,
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            "[1,2]".into(),
            400,
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            "{}".into(),
            400,
            Some("messages"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            r#"{"messages":"hi"}"#.into(),
            400,
            Some("messages"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            r#"{"messages":[{"role":"robot","content":"x"}]}"#.into(),
            400,
            Some("messages[0].role"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            user(json!({"max_tokens": 0})),
            400,
            Some("max_tokens"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            user(json!({"max_tokens": ctx + 1})),
            400,
            Some("max_tokens"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            user(json!({"max_tokens": "10"})),
            400,
            Some("max_tokens"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            user(json!({"temperature": 9})),
            400,
            Some("temperature"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            user(json!({"top_p": 0})),
            400,
            Some("top_p"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            user(json!({"n": 3})),
            400,
            Some("n"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![json_ct],
            user(json!({"stop": 7})),
            400,
            Some("stop"),
        ),
        (
            "POST",
            "/v1/completions",
            vec![json_ct],
            json!({"prompt": long_prompt}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "POST",
            "/v1/completions",
            vec![json_ct],
            json!({"prompt": [1, 999999]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "POST",
            "/v1/completions",
            vec![json_ct],
            json!({"prompt": ""}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "POST",
            "/v1/completions",
            vec![("Content-Type", "text/plain")],
            json!({"prompt": "x"}).to_string(),
            415,
            None,
        ),
        (
            "POST",
            "/v1/completions",
            vec![json_ct],
            json!({"prompt": "x".repeat(100 << 10)}).to_string(),
            413,
            None,
        ),
        (
            "GET",
            "/v1/chat/completions",
            vec![],
            String::new(),
            405,
            None,
        ),
        ("GET", "/v2/nothing", vec![], String::new(), 404, None),
    ];
    for (method, path, headers, body, status, param) in cases {
        let r = request(srv.addr, method, path, &headers, body.as_bytes());
        let what = format!("{method} {path} {}", &body[..body.len().min(80)]);
        assert_eq!(r.status, status, "{what}: {}", r.body);
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("application/json"),
            "{what}"
        );
        let v = r.json();
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        assert!(e["type"].is_string(), "{what}: {v}");
        assert!(
            e.get("code").is_some() && e.get("param").is_some(),
            "{what}: {v}"
        );
        assert_eq!(e["param"].as_str(), param, "{what}: {v}");
    }
    // The long prompt is a context error, with OpenAI's code.
    let r = post_json(srv.addr, "/v1/completions", &json!({"prompt": long_prompt}));
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    // Still healthy, and nothing was left in the engine.
    assert_eq!(request(srv.addr, "GET", "/health", &[], b"").status, 200);
    let s = srv.wait_idle();
    assert_eq!(s.requests_finished, 0);
}

#[test]
fn api_key_is_required() {
    let Some(srv) = TestServer::start(Options {
        api_key: Some("s3cret-key"),
        ..Default::default()
    }) else {
        return;
    };
    let body = chat_body("hi", json!({"max_tokens": 2})).to_string();
    let json_ct = ("Content-Type", "application/json");
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-ke"),
        Some("s3cret-key"),
    ] {
        let mut headers = vec![json_ct];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        let r = request(
            srv.addr,
            "POST",
            "/v1/chat/completions",
            &headers,
            body.as_bytes(),
        );
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        for path in ["/v1/models", "/metrics"] {
            let r = request(srv.addr, "GET", path, &headers[1..], b"");
            assert_eq!(r.status, 401, "{path} {auth:?}");
        }
    }
    let ok = [json_ct, ("Authorization", "Bearer s3cret-key")];
    let r = request(
        srv.addr,
        "POST",
        "/v1/chat/completions",
        &ok,
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(srv.addr, "GET", "/v1/models", &ok[1..], b"");
    assert_eq!(r.json()["data"][0]["id"], "smollm2-test");
    // Health checks need no key.
    assert_eq!(request(srv.addr, "GET", "/health", &[], b"").status, 200);
}

#[test]
fn full_queue_gets_429_then_recovers() {
    let Some(srv) = TestServer::start(Options {
        max_running: Some(1),
        max_waiting: Some(1),
        ..Default::default()
    }) else {
        return;
    };
    let long = |stream| {
        chat_body(
            "Write a very long story.",
            json!({"max_tokens": 4000, "ignore_eos": true, "stream": stream}),
        )
    };
    // One running...
    let mut running = SseStream::open(srv.addr, "/v1/chat/completions", &long(true));
    assert!(running.next_data().is_some());
    // (The engine's waiting count can lag its admission by a step.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.engine.stats().waiting != 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    // ...one waiting (its headers come at once; its first event only when it runs)...
    let waiting = SseStream::open(srv.addr, "/v1/chat/completions", &long(true));
    assert_eq!(waiting.status, 200);
    let s = srv.engine.stats();
    assert_eq!((s.running, s.waiting), (1, 1), "{s:?}");
    // ...and the next one is refused.
    let r = post_json(srv.addr, "/v1/chat/completions", &long(false));
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "queue_full");
    assert!(r.header("retry-after").is_some());
    let m = request(srv.addr, "GET", "/metrics", &[], b"").body;
    assert_eq!(metric(&m, "kivi_requests_waiting"), 1.0);
    assert_eq!(
        metric(
            &m,
            r#"kivi_http_requests_total{endpoint="chat_completions",status="429"}"#
        ),
        1.0
    );
    // Both clients leave: everything is freed, and a new request is served.
    drop(running);
    drop(waiting);
    srv.wait_idle();
    let r = post_json(
        srv.addr,
        "/v1/chat/completions",
        &chat_body("hi", json!({"max_tokens": 3})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn graceful_shutdown_finishes_streams_in_flight() {
    let Some(mut srv) = TestServer::start(Options::default()) else {
        return;
    };
    let mut sse = SseStream::open(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0,
                "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert!(sse.next_data().is_some());
    let addr = srv.addr;
    let reader = std::thread::spawn(move || sse.rest());
    srv.shutdown();
    let datas = reader.join().unwrap();
    assert_eq!(datas.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&datas[datas.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 30);
    // No longer accepting.
    assert!(TcpStream::connect(addr).is_err());
    assert_eq!(srv.engine.stats().running, 0);
}

#[test]
fn metrics_report_kv_blocks_under_a_budget() {
    let Some(srv) = TestServer::start(Options {
        kv_memory: Some(64 << 20),
        ..Default::default()
    }) else {
        return;
    };
    let scrape = || request(srv.addr, "GET", "/metrics", &[], b"").body;
    let idle = scrape();
    let total = metric(&idle, "kivi_kv_blocks_total");
    assert!(total > 0.0, "{idle}");
    assert_eq!(metric(&idle, "kivi_kv_blocks_free"), total);
    assert_eq!(metric(&idle, "kivi_kv_bytes_budget"), (64u64 << 20) as f64);
    let mut sse = SseStream::open(
        srv.addr,
        "/v1/chat/completions",
        &chat_body(
            "Write a very long story.",
            json!({"max_tokens": 4000, "ignore_eos": true, "stream": true}),
        ),
    );
    for _ in 0..3 {
        assert!(sse.next_data().is_some());
    }
    let busy = scrape();
    let used = metric(&busy, "kivi_kv_blocks_used");
    assert!(used > 0.0, "{busy}");
    assert_eq!(metric(&busy, "kivi_kv_blocks_free"), total - used);
    assert!(metric(&busy, "kivi_kv_bytes_used") > 0.0);
    assert_eq!(metric(&busy, "kivi_requests_running"), 1.0);
    assert!(metric(&busy, "kivi_time_to_first_token_seconds_count") >= 1.0);
    drop(sse);
    srv.wait_idle();
    let after = scrape();
    assert_eq!(metric(&after, "kivi_kv_blocks_used"), 0.0);
    assert_eq!(metric(&after, "kivi_kv_blocks_free"), total);
    // 3 events: the role chunk, then 2 tokens at least.
    assert!(metric(&after, "kivi_generation_tokens_total") >= 2.0);
}
