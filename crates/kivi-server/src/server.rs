//! The HTTP side: routes, authentication, and the bridge from an engine request to an HTTP
//! answer (one JSON body, or server-sent events).
//!
//! Every generation goes through [`Engine::submit`] with a sink that pushes events into a tokio
//! channel. The request's [`Generation`] owns the receiving end; when it is dropped before the
//! request finished (the client disconnected, so hyper dropped the handler or the response
//! stream), it cancels the request at once, which frees its KV blocks. The sink also returns
//! false once the receiver is gone.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream;
use kivi_engine::engine::{
    Engine, EngineStats, Event, FinishReason, Request, RequestId, SubmitError,
};
use kivi_engine::SamplingParams;
use kivi_model::chat::{ChatMessage, ChatTemplate};
use kivi_model::tokenizer::{TokenStream, Tokenizer};
use tokio::sync::mpsc;

use crate::api::{self, GenParams, Prompt, Usage};
use crate::error::ApiError;
use crate::metrics::{EngineGauges, Metrics};
use crate::stop::StopMatcher;

/// Largest request body accepted by default (bytes).
pub const DEFAULT_BODY_LIMIT: usize = 2 << 20;

/// What the server needs besides the engine.
pub struct ServerConfig {
    /// The id `/v1/models` lists and responses carry.
    pub model_name: String,
    /// Required as `Authorization: Bearer <key>` on every endpoint but `/health`.
    pub api_key: Option<String>,
    pub body_limit: usize,
}

/// Shared by every request.
pub struct AppState {
    engine: Engine,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    model_name: String,
    context_len: usize,
    api_key: Option<String>,
    body_limit: usize,
    metrics: Metrics,
    /// Unix time the server started (`created` of the model card).
    started: u64,
    /// For request ids and default seeds.
    counter: AtomicU64,
}

impl AppState {
    pub fn new(
        engine: Engine,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        config: ServerConfig,
    ) -> Arc<AppState> {
        let context_len = engine.model_config().context_len;
        Arc::new(AppState {
            engine,
            tokenizer,
            template,
            model_name: config.model_name,
            context_len,
            api_key: config.api_key,
            body_limit: config.body_limit,
            metrics: Metrics::default(),
            started: unix_now(),
            counter: AtomicU64::new(0),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.started)
    }

    /// A seed for requests that give none: differs per request.
    fn fresh_seed(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // SplitMix64 finalizer: spreads consecutive counters over the seed space.
        let mut z = nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Engine stats as metric gauges.
pub fn gauges(s: &EngineStats) -> EngineGauges {
    EngineGauges {
        waiting: s.waiting,
        running: s.running,
        kv_blocks_used: s.kv_blocks_used,
        kv_blocks_total: s.kv_blocks_total,
        kv_bytes_used: s.kv_bytes_used,
        kv_bytes_reserved: s.kv_bytes_reserved,
        kv_bytes_budget: s.kv_bytes_budget,
        prompt_tokens_total: s.prompt_tokens_total,
        generated_tokens_total: s.generated_tokens_total,
        preemptions_total: s.preemptions_total,
        requests_finished: s.requests_finished,
    }
}

/// All routes, with authentication, request counting and the body limit.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(state.body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth_and_count,
        ))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` resolves, then finishes the requests
/// in flight (streams included) and returns. The engine is not shut down here.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/v1/models" => "models",
        "/health" => "health",
        "/metrics" => "metrics",
        _ => "other",
    }
}

/// Checks the API key (all but `/health`) and counts answers by endpoint and status.
async fn auth_and_count(
    State(state): State<Arc<AppState>>,
    req: HttpRequest,
    next: Next,
) -> Response {
    let endpoint = endpoint_label(req.uri().path());
    let resp = match &state.api_key {
        Some(key) if endpoint != "health" && !authorized(req.headers(), key) => {
            ApiError::unauthorized().into_response()
        }
        _ => next.run(req).await,
    };
    state
        .metrics
        .count_request(endpoint, resp.status().as_u16());
    resp
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let token = match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => &value[7..],
        _ => return false,
    };
    constant_time_eq(token, key.as_bytes())
}

/// Equality whose time does not depend on where the inputs differ (only on their lengths).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    diff == 0
}

async fn health() -> impl IntoResponse {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#.to_string())
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&gauges(&state.engine.stats()));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let list = api::ModelList {
        object: "list",
        data: [api::ModelCard {
            id: &state.model_name,
            object: "model",
            created: state.started,
            owned_by: "kivi",
            max_model_len: state.context_len,
        }],
    };
    json_response(StatusCode::OK, to_json(&list))
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("response types serialize")
}

/// The body of a JSON POST: checks the content type and maps body errors (too large, broken
/// connection) to JSON errors.
fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::invalid(format!(
                "Content-Type must be application/json, got `{}`",
                ct.chars().take(64).collect::<String>()
            ))
            .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
        }
    }
    body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is too large".to_string()
        } else {
            format!("could not read the request body: {e}")
        };
        ApiError::invalid(message).with_status(status)
    })
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = json_body(&headers, body)?;
    let req = api::parse_chat_request(&body)?;
    let messages: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
        .collect();
    let st = state.clone();
    let prompt = off_runtime(move || {
        let text = st.template.render(&messages, true).map_err(|e| {
            ApiError::invalid_param("messages", format!("the chat template failed: {e}"))
        })?;
        tokenize(&st, &text)
    })
    .await?;
    let gen = Generation::start(&state, prompt, &req.params, "messages", arrived)?;
    let id = state.next_id("chatcmpl");
    if req.params.stream {
        Ok(stream_chat(state, gen, id, req.params.include_usage))
    } else {
        let (text, reason, usage) = gen.collect().await?;
        let body = api::ChatCompletion {
            id: &id,
            object: "chat.completion",
            created: unix_now(),
            model: &state.model_name,
            choices: [api::ChatChoice {
                index: 0,
                message: api::AssistantMessage {
                    role: "assistant",
                    content: &text,
                },
                logprobs: None,
                finish_reason: reason,
            }],
            usage,
        };
        Ok(json_response(StatusCode::OK, to_json(&body)))
    }
}

fn tokenize(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    state
        .tokenizer
        .encode(text, true)
        .map_err(|e| ApiError::internal(format!("tokenizing the prompt: {e}")))
}

/// Runs `f` on tokio's blocking pool: rendering and tokenizing a prompt of up to the body limit
/// (megabytes) must not stall the runtime thread that streams every other answer.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("preparing the prompt failed: {e}")))?
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = json_body(&headers, body)?;
    let req = api::parse_completion_request(&body)?;
    let prompt = match req.prompt {
        Prompt::Text(text) => {
            let st = state.clone();
            off_runtime(move || tokenize(&st, &text)).await?
        }
        Prompt::Tokens(ids) => {
            let vocab = state.engine.model_config().vocab;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary ({vocab} tokens)"),
                ));
            }
            ids
        }
    };
    let gen = Generation::start(&state, prompt, &req.params, "prompt", arrived)?;
    let id = state.next_id("cmpl");
    if req.params.stream {
        Ok(stream_completion(state, gen, id, req.params.include_usage))
    } else {
        let (text, reason, usage) = gen.collect().await?;
        let body = api::Completion {
            id: &id,
            object: "text_completion",
            created: unix_now(),
            model: &state.model_name,
            choices: vec![api::CompletionChoice {
                index: 0,
                text: &text,
                logprobs: None,
                finish_reason: Some(reason),
            }],
            usage: Some(Some(usage)),
        };
        Ok(json_response(StatusCode::OK, to_json(&body)))
    }
}

/// What a generation yields next.
enum Step {
    Text(String),
    End { reason: &'static str, usage: Usage },
    Failed(ApiError),
}

/// One request in the engine, seen from the HTTP side: detokenizes, matches stop strings,
/// records latencies, and cancels the request if dropped before it finished.
struct Generation {
    state: Arc<AppState>,
    id: RequestId,
    rx: mpsc::UnboundedReceiver<Event>,
    detok: TokenStream,
    stops: StopMatcher,
    prompt_tokens: usize,
    completion_tokens: usize,
    arrived: Instant,
    last_token: Option<Instant>,
    /// The engine is done with the request (finished, or cancelled by us).
    done: bool,
    /// Returned by the next call to `next` (after the last text).
    end: Option<Step>,
}

impl Generation {
    /// Checks the prompt and limits against the model, then submits. `prompt_param` names the
    /// request field errors about the prompt point at.
    fn start(
        state: &Arc<AppState>,
        prompt: Vec<u32>,
        params: &GenParams,
        prompt_param: &str,
        arrived: Instant,
    ) -> Result<Generation, ApiError> {
        let ctx = state.context_len;
        let n = prompt.len();
        if n == 0 {
            return Err(ApiError::invalid_param(prompt_param, "the prompt is empty"));
        }
        if n >= ctx {
            return Err(ApiError::invalid_param(
                prompt_param,
                format!(
                    "the prompt is {n} tokens but this model's context is {ctx} tokens \
                     (and at least one token must be generated)"
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let max_tokens = match params.max_tokens {
            None => ctx - n,
            Some(m) if m > ctx - n => {
                return Err(ApiError::invalid_param(
                    "max_tokens",
                    format!(
                        "this model's context is {ctx} tokens; you asked for {m} tokens to be \
                         generated after a {n}-token prompt (at most {} fit)",
                        ctx - n
                    ),
                )
                .with_code("context_length_exceeded"))
            }
            Some(m) => m,
        };
        let request = Request {
            prompt,
            max_tokens,
            sampling: SamplingParams {
                temperature: params.temperature,
                top_k: params.top_k,
                top_p: params.top_p,
                seed: params.seed.unwrap_or_else(|| state.fresh_seed()),
            },
            stop_tokens: if params.ignore_eos {
                Vec::new()
            } else {
                state.tokenizer.eos_ids().to_vec()
            },
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Box::new(move |event: Event| tx.send(event).is_ok());
        let id = state.engine.submit(request, sink).map_err(|e| match e {
            SubmitError::QueueFull(_) => ApiError::queue_full(e.to_string()),
            SubmitError::Invalid(msg) => ApiError::invalid_param(prompt_param, msg),
            SubmitError::ShuttingDown => ApiError::unavailable(e.to_string()),
        })?;
        Ok(Generation {
            state: state.clone(),
            id,
            rx,
            detok: state.tokenizer.stream(),
            stops: StopMatcher::new(params.stop.clone()),
            prompt_tokens: n,
            completion_tokens: 0,
            arrived,
            last_token: None,
            done: false,
            end: None,
        })
    }

    fn usage(&self) -> Usage {
        Usage::new(self.prompt_tokens, self.completion_tokens)
    }

    /// The next piece of text (never empty), the end, or a failure. After `End` or `Failed`,
    /// it returns `None`.
    async fn next(&mut self) -> Option<Step> {
        if let Some(end) = self.end.take() {
            return Some(end);
        }
        if self.done {
            return None;
        }
        loop {
            let Some(event) = self.rx.recv().await else {
                // The engine dropped the sink without a Finished event (it stopped).
                self.done = true;
                return Some(Step::Failed(ApiError::internal(
                    "the engine stopped before the request finished",
                )));
            };
            match event {
                Event::Token(token) => {
                    let now = Instant::now();
                    let m = &self.state.metrics;
                    match self.last_token {
                        None => m.time_to_first_token.observe(now - self.arrived),
                        Some(t) => m.inter_token_latency.observe(now - t),
                    }
                    self.last_token = Some(now);
                    self.completion_tokens += 1;
                    let piece = self.detok.push(token);
                    let released = self.stops.push(&piece);
                    if released.stopped {
                        // Free the sequence now; its Finished(Cancelled) is not waited for.
                        self.state.engine.cancel(self.id);
                        self.done = true;
                        return Some(self.text_then(released.text, "stop"));
                    }
                    if !released.text.is_empty() {
                        return Some(Step::Text(released.text));
                    }
                }
                Event::Finished(f) => {
                    self.done = true;
                    let reason = match f.reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                        FinishReason::Cancelled => {
                            return Some(Step::Failed(ApiError::unavailable(
                                "the request was cancelled by the server",
                            )))
                        }
                        FinishReason::Error(msg) => {
                            return Some(Step::Failed(ApiError::internal(format!(
                                "generation failed: {msg}"
                            ))))
                        }
                    };
                    let tail = self.detok.finish();
                    let released = self.stops.push(&tail);
                    let (text, reason) = if released.stopped {
                        (released.text, "stop")
                    } else {
                        (released.text + &self.stops.finish(), reason)
                    };
                    return Some(self.text_then(text, reason));
                }
            }
        }
    }

    /// `text` now (if any) and the end on the next call.
    fn text_then(&mut self, text: String, reason: &'static str) -> Step {
        let end = Step::End {
            reason,
            usage: self.usage(),
        };
        if text.is_empty() {
            end
        } else {
            self.end = Some(end);
            Step::Text(text)
        }
    }

    /// The whole answer: text, finish reason, usage.
    async fn collect(mut self) -> Result<(String, &'static str, Usage), ApiError> {
        let mut text = String::new();
        while let Some(step) = self.next().await {
            match step {
                Step::Text(t) => text.push_str(&t),
                Step::End { reason, usage } => return Ok((text, reason, usage)),
                Step::Failed(e) => return Err(e),
            }
        }
        Err(ApiError::internal("generation ended without a result"))
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            // The client went away: free the sequence now rather than at its next token.
            self.state.engine.cancel(self.id);
            self.state
                .metrics
                .disconnects
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An SSE stream of `data: {json}` events and a final `data: [DONE]`.
fn sse_response<F>(gen: Generation, render: F) -> Response
where
    F: FnMut(Step) -> Vec<String> + Send + 'static,
{
    struct State<F> {
        /// None once it ended.
        gen: Option<Generation>,
        render: F,
        done_sent: bool,
    }
    let init = State {
        gen: Some(gen),
        render,
        done_sent: false,
    };
    let events = stream::unfold(init, |mut st| async move {
        if st.done_sent {
            return None;
        }
        let step = match st.gen.as_mut() {
            Some(g) => g.next().await,
            None => None,
        };
        let Some(step) = step else {
            st.gen = None;
            st.done_sent = true;
            return Some((vec!["[DONE]".to_string()], st));
        };
        if !matches!(step, Step::Text(_)) {
            st.gen = None;
        }
        let out = (st.render)(step);
        Some((out, st))
    });
    let flat = futures_util::StreamExt::flat_map(events, |datas| {
        stream::iter(
            datas
                .into_iter()
                .map(|d| Ok::<_, Infallible>(SseEvent::default().data(d))),
        )
    });
    Sse::new(flat)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response()
}

fn stream_chat(state: Arc<AppState>, gen: Generation, id: String, include_usage: bool) -> Response {
    let created = unix_now();
    // With include_usage every chunk carries `usage: null`, and a last chunk with no choices
    // carries the totals (OpenAI's format).
    let usage_field = include_usage.then_some(None);
    let chunk = move |delta: Option<api::Delta>, finish: Option<&'static str>, usage| {
        to_json(&api::ChatChunk {
            id: &id,
            object: "chat.completion.chunk",
            created,
            model: &state.model_name,
            choices: delta
                .map(|delta| api::ChunkChoice {
                    index: 0,
                    delta,
                    logprobs: None,
                    finish_reason: finish,
                })
                .into_iter()
                .collect(),
            usage,
        })
    };
    let mut first = true;
    let render = move |step: Step| -> Vec<String> {
        let mut out = Vec::new();
        if std::mem::take(&mut first) {
            let role = api::Delta {
                role: Some("assistant"),
                content: Some(""),
            };
            out.push(chunk(Some(role), None, usage_field));
        }
        match step {
            Step::Text(t) => {
                let delta = api::Delta {
                    role: None,
                    content: Some(&t),
                };
                out.push(chunk(Some(delta), None, usage_field));
            }
            Step::End { reason, usage } => {
                out.push(chunk(
                    Some(api::Delta::default()),
                    Some(reason),
                    usage_field,
                ));
                if include_usage {
                    out.push(chunk(None, None, Some(Some(usage))));
                }
            }
            Step::Failed(e) => out.push(e.to_json()),
        }
        out
    };
    sse_response(gen, render)
}

fn stream_completion(
    state: Arc<AppState>,
    gen: Generation,
    id: String,
    include_usage: bool,
) -> Response {
    let created = unix_now();
    let chunk = move |text: &str, finish: Option<&'static str>, usage: Option<Option<Usage>>| {
        let choices = if usage.is_some_and(|u| u.is_some()) {
            Vec::new()
        } else {
            vec![api::CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: finish,
            }]
        };
        to_json(&api::Completion {
            id: &id,
            object: "text_completion",
            created,
            model: &state.model_name,
            choices,
            usage,
        })
    };
    let usage_field = include_usage.then_some(None);
    let render = move |step: Step| -> Vec<String> {
        match step {
            Step::Text(t) => vec![chunk(&t, None, usage_field)],
            Step::End { reason, usage } => {
                let mut out = vec![chunk("", Some(reason), usage_field)];
                if include_usage {
                    out.push(chunk("", None, Some(Some(usage))));
                }
                out
            }
            Step::Failed(e) => vec![e.to_json()],
        }
    };
    sse_response(gen, render)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_key_check() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "sekret"));
        h.insert(header::AUTHORIZATION, "Bearer sekret".parse().unwrap());
        assert!(authorized(&h, "sekret"));
        h.insert(header::AUTHORIZATION, "bearer sekret".parse().unwrap());
        assert!(authorized(&h, "sekret"));
        for bad in [
            "Bearer sekreT",
            "Bearer sekret2",
            "Bearer ",
            "Basic sekret",
            "sekret",
        ] {
            h.insert(header::AUTHORIZATION, bad.parse().unwrap());
            assert!(!authorized(&h, "sekret"), "{bad}");
        }
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b"b"));
    }
}
