//! OpenAI request parsing and response bodies.
//!
//! [`parse_chat_request`] and [`parse_completion_request`] are pure functions of the request
//! body: they check JSON syntax, types and ranges that do not depend on the model, and return
//! an [`ApiError`] (OpenAI's 400 format, naming the field) for anything wrong. Checks that need
//! the model (prompt length against the context, token ids against the vocabulary) are done by
//! the server after tokenizing.
//!
//! Unknown top-level fields are ignored, as OpenAI-compatible servers do (clients send `user`,
//! `metadata`, ...), but a known field whose value asks for something this server does not do
//! (`n > 1`, `logprobs`, tools, penalties, `logit_bias`) is rejected rather than silently ignored.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// One chat message after validation: `role` is `system`, `user` or `assistant`
/// (`developer` is read as `system`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Generation parameters shared by both endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct GenParams {
    /// `max_tokens` / `max_completion_tokens`; None = until the context is full.
    pub max_tokens: Option<usize>,
    /// In [0, 2]; 0 = greedy.
    pub temperature: f32,
    /// In (0, 1].
    pub top_p: f32,
    /// 0 = no cut (an extension, as in vLLM).
    pub top_k: usize,
    /// None = a fresh seed per request.
    pub seed: Option<u64>,
    /// Stop strings, matched on the generated text; not returned.
    pub stop: Vec<String>,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Keep generating after an end-of-sequence token (an extension, as in vLLM).
    pub ignore_eos: bool,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: Vec::new(),
            stream: false,
            include_usage: false,
            ignore_eos: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub params: GenParams,
}

/// A completion prompt: text, or token ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub params: GenParams,
}

/// Parses a `POST /v1/chat/completions` body.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let obj = parse_object(body)?;
    let messages = match obj.get("messages") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "messages",
                "`messages` is required",
            ))
        }
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "messages",
                "`messages` must be an array",
            ))
        }
    };
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must not be empty",
        ));
    }
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    reject_unsupported(
        &obj,
        &[
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "audio",
            "prediction",
        ],
    )?;
    if let Some(v) = obj.get("response_format").filter(|v| !v.is_null()) {
        let kind = v.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            return Err(ApiError::invalid_param(
                "response_format",
                "only `response_format: {\"type\": \"text\"}` is supported",
            ));
        }
    }
    if get_bool(&obj, "logprobs")?.unwrap_or(false) || non_null(&obj, "top_logprobs") {
        return Err(ApiError::invalid_param(
            "logprobs",
            "`logprobs` is not supported",
        ));
    }
    let mut params = parse_params(&obj)?;
    if let Some(n) = get_uint(&obj, "max_completion_tokens")? {
        params.max_tokens = Some(positive_tokens("max_completion_tokens", n)?);
    }
    Ok(ChatRequest {
        model: get_str(&obj, "model")?,
        messages,
        params,
    })
}

/// Parses a `POST /v1/completions` body.
pub fn parse_completion_request(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let obj = parse_object(body)?;
    let prompt = match obj.get("prompt") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param("prompt", "`prompt` is required"))
        }
        Some(v) => parse_prompt(v)?,
    };
    if get_bool(&obj, "echo")?.unwrap_or(false) {
        return Err(ApiError::invalid_param("echo", "`echo` is not supported"));
    }
    if non_null(&obj, "logprobs") {
        return Err(ApiError::invalid_param(
            "logprobs",
            "`logprobs` is not supported",
        ));
    }
    if let Some(s) = get_str(&obj, "suffix")? {
        if !s.is_empty() {
            return Err(ApiError::invalid_param(
                "suffix",
                "`suffix` is not supported",
            ));
        }
    }
    if let Some(b) = get_uint(&obj, "best_of")? {
        if b != 1 {
            return Err(ApiError::invalid_param("best_of", "`best_of` must be 1"));
        }
    }
    Ok(CompletionRequest {
        model: get_str(&obj, "model")?,
        prompt,
        params: parse_params(&obj)?,
    })
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    match value {
        Value::Object(obj) => Ok(obj),
        _ => Err(ApiError::invalid("the body must be a JSON object")),
    }
}

fn parse_message(i: usize, m: &Value) -> Result<Message, ApiError> {
    let param = |field: &str| format!("messages[{i}].{field}");
    let Value::Object(m) = m else {
        return Err(ApiError::invalid_param(
            &format!("messages[{i}]"),
            format!("`messages[{i}]` must be an object"),
        ));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) => r.as_str(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                &param("role"),
                format!("`messages[{i}].role` is required"),
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                &param("role"),
                format!("`messages[{i}].role` must be a string"),
            ))
        }
    };
    let role = match role {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => {
            return Err(ApiError::invalid_param(
                &param("role"),
                format!(
                "unknown role `{}` in messages[{i}]: expected system, developer, user or assistant",
                truncate(other, 64)
            ),
            ))
        }
    };
    if m.get("tool_calls").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid_param(
            &param("tool_calls"),
            "tool calls are not supported",
        ));
    }
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let p = format!("messages[{i}].content[{j}]");
                let kind = part.get("type").and_then(Value::as_str);
                match (kind, part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (Some("text"), _) => {
                        return Err(ApiError::invalid_param(
                            &p,
                            format!("`{p}.text` must be a string"),
                        ))
                    }
                    (Some(other), _) => {
                        return Err(ApiError::invalid_param(
                            &p,
                            format!(
                                "content part type `{}` is not supported (only `text`)",
                                truncate(other, 64)
                            ),
                        ))
                    }
                    (None, _) => {
                        return Err(ApiError::invalid_param(
                            &p,
                            format!("`{p}` must be an object with `type` and `text`"),
                        ))
                    }
                }
            }
            text
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                &param("content"),
                format!("`messages[{i}].content` is required"),
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                &param("content"),
                format!("`messages[{i}].content` must be a string or an array of text parts"),
            ))
        }
    };
    Ok(Message {
        role: role.to_string(),
        content,
    })
}

fn parse_prompt(v: &Value) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            "prompt",
            "`prompt` must be a string, an array of one string, or an array of token ids",
        )
    };
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(items) => match items.as_slice() {
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [] => Err(ApiError::invalid_param("prompt", "`prompt` is empty")),
            items if items.iter().all(Value::is_number) => items
                .iter()
                .map(|t| {
                    t.as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .ok_or_else(bad)
                })
                .collect::<Result<Vec<u32>, _>>()
                .map(Prompt::Tokens),
            items if items.iter().all(Value::is_string) => Err(ApiError::invalid_param(
                "prompt",
                "batched prompts are not supported: send one prompt per request",
            )),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// Sampling, limits, stop and stream fields common to both endpoints.
fn parse_params(obj: &Map<String, Value>) -> Result<GenParams, ApiError> {
    let mut p = GenParams::default();
    if let Some(n) = get_uint(obj, "n")? {
        if n != 1 {
            return Err(ApiError::invalid_param(
                "n",
                "only `n: 1` is supported (one choice per request)",
            ));
        }
    }
    if let Some(n) = get_uint(obj, "max_tokens")? {
        p.max_tokens = Some(positive_tokens("max_tokens", n)?);
    }
    if let Some(t) = get_f64(obj, "temperature")? {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("`temperature` must be in [0, 2], got {t}"),
            ));
        }
        p.temperature = t as f32;
    }
    if let Some(t) = get_f64(obj, "top_p")? {
        if !(t > 0.0 && t <= 1.0) {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("`top_p` must be in (0, 1], got {t}"),
            ));
        }
        p.top_p = t as f32;
    }
    if let Some(k) = obj.get("top_k").filter(|v| !v.is_null()) {
        // vLLM's convention: -1 (or 0) means no cut.
        p.top_k = match k.as_i64() {
            Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            _ => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    "`top_k` must be a positive integer, or -1 for no cut",
                ))
            }
        };
    }
    if let Some(s) = obj.get("seed").filter(|v| !v.is_null()) {
        // OpenAI's seed is any 64-bit integer; negative ones map bit for bit.
        p.seed = Some(match (s.as_u64(), s.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => return Err(ApiError::invalid_param("seed", "`seed` must be an integer")),
        });
    }
    p.stop = parse_stop(obj.get("stop"))?;
    p.stream = get_bool(obj, "stream")?.unwrap_or(false);
    match obj.get("stream_options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            p.include_usage = match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::invalid_param(
                        "stream_options.include_usage",
                        "`stream_options.include_usage` must be a boolean",
                    ))
                }
            };
            if !p.stream {
                return Err(ApiError::invalid_param(
                    "stream_options",
                    "`stream_options` is only allowed with `stream: true`",
                ));
            }
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "stream_options",
                "`stream_options` must be an object",
            ))
        }
    }
    p.ignore_eos = get_bool(obj, "ignore_eos")?.unwrap_or(false);
    for name in ["presence_penalty", "frequency_penalty"] {
        if let Some(v) = get_f64(obj, name)? {
            if v != 0.0 {
                return Err(ApiError::invalid_param(
                    name,
                    format!("`{name}` is not supported (only 0)"),
                ));
            }
        }
    }
    if let Some(v) = obj.get("logit_bias").filter(|v| !v.is_null()) {
        if !v.as_object().is_some_and(Map::is_empty) {
            return Err(ApiError::invalid_param(
                "logit_bias",
                "`logit_bias` is not supported",
            ));
        }
    }
    Ok(p)
}

fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let stops = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid_param(
                        "stop",
                        "`stop` must be a string or an array of strings",
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "stop",
                "`stop` must be a string or an array of strings",
            ))
        }
    };
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param(
            "stop",
            format!("at most {MAX_STOP_STRINGS} stop strings"),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "stop strings must not be empty",
        ));
    }
    if stops.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid_param(
            "stop",
            format!("stop strings must be at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok(stops)
}

fn positive_tokens(name: &str, n: u64) -> Result<usize, ApiError> {
    if n == 0 {
        return Err(ApiError::invalid_param(
            name,
            format!("`{name}` must be at least 1"),
        ));
    }
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

fn reject_unsupported(obj: &Map<String, Value>, names: &[&str]) -> Result<(), ApiError> {
    for name in names {
        if non_null(obj, name) {
            return Err(ApiError::invalid_param(
                name,
                format!("`{name}` is not supported by this server"),
            ));
        }
    }
    Ok(())
}

fn non_null(obj: &Map<String, Value>, name: &str) -> bool {
    obj.get(name).is_some_and(|v| !v.is_null())
}

fn get_uint(obj: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::invalid_param(name, format!("`{name}` must be a non-negative integer"))
        }),
    }
}

fn get_f64(obj: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid_param(name, format!("`{name}` must be a number"))),
    }
}

fn get_bool(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid_param(
            name,
            format!("`{name}` must be a boolean"),
        )),
    }
}

fn get_str(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid_param(
            name,
            format!("`{name}` must be a string"),
        )),
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (for echoing input in messages).
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---- Responses -------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [ChatChoice<'a>; 1],
    pub usage: Usage,
}

#[derive(Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

#[derive(Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

#[derive(Serialize)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice<'a>>,
    /// Present (null) on every chunk when usage was asked for; set on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

#[derive(Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<CompletionChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
pub struct CompletionChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: [ModelCard<'a>; 1],
}

#[derive(Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Context length in tokens (vLLM's field name).
    pub max_model_len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_err(body: &str) -> ApiError {
        parse_chat_request(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn minimal_chat_request_and_defaults() {
        let r = parse_chat_request(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
            .unwrap();
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!(
            r.messages,
            vec![Message {
                role: "user".into(),
                content: "hi".into()
            }]
        );
        assert_eq!(r.params, GenParams::default());
    }

    #[test]
    fn content_parts_developer_role_and_all_params() {
        let r = parse_chat_request(
            br#"{"messages":[{"role":"developer","content":"be brief"},
                 {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                 "max_completion_tokens":7,"temperature":0,"top_p":0.5,"top_k":-1,"seed":-1,
                 "stop":["x","yz"],"stream":true,"stream_options":{"include_usage":true},
                 "n":1,"presence_penalty":0,"user":"ignored","logit_bias":{}}"#,
        )
        .unwrap();
        assert_eq!(r.messages[0].role, "system");
        assert_eq!(r.messages[1].content, "ab");
        let p = r.params;
        assert_eq!(p.max_tokens, Some(7));
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_p, 0.5);
        assert_eq!(p.top_k, 0);
        assert_eq!(p.seed, Some(u64::MAX));
        assert_eq!(p.stop, vec!["x".to_string(), "yz".to_string()]);
        assert!(p.stream && p.include_usage);
    }

    #[test]
    fn bad_chat_requests_name_the_field() {
        let cases = [
            ("{", None),
            ("[]", None),
            ("{}", Some("messages")),
            (r#"{"messages":{}}"#, Some("messages")),
            (r#"{"messages":[]}"#, Some("messages")),
            (r#"{"messages":[1]}"#, Some("messages[0]")),
            (
                r#"{"messages":[{"content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"messages":[{"role":"wizard","content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"messages":[{"role":"user"}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"messages":[{"role":"user","content":5}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                Some("messages[0].content[0]"),
            ),
        ];
        for (body, param) in cases {
            let e = chat_err(body);
            assert_eq!(e.status.as_u16(), 400, "{body}");
            assert_eq!(e.kind, "invalid_request_error");
            assert_eq!(e.param.as_deref(), param, "{body}: {e}");
        }
    }

    #[test]
    fn out_of_range_and_unsupported_params_are_rejected() {
        let m = r#""messages":[{"role":"user","content":"x"}]"#;
        for (extra, param) in [
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""max_tokens":-3"#, "max_tokens"),
            (r#""max_tokens":"12""#, "max_tokens"),
            (r#""max_tokens":1.5"#, "max_tokens"),
            (r#""max_completion_tokens":0"#, "max_completion_tokens"),
            (r#""temperature":2.5"#, "temperature"),
            (r#""temperature":-0.1"#, "temperature"),
            (r#""temperature":"hot""#, "temperature"),
            (r#""top_p":0"#, "top_p"),
            (r#""top_p":1.01"#, "top_p"),
            (r#""top_k":-2"#, "top_k"),
            (r#""n":2"#, "n"),
            (r#""stream":"yes""#, "stream"),
            (
                r#""stream_options":{"include_usage":true}"#,
                "stream_options",
            ),
            (r#""stop":5"#, "stop"),
            (r#""stop":[""]"#, "stop"),
            (r#""stop":["a",1]"#, "stop"),
            (r#""seed":1.5"#, "seed"),
            (r#""logprobs":true"#, "logprobs"),
            (r#""tools":[{"type":"function"}]"#, "tools"),
            (r#""frequency_penalty":0.5"#, "frequency_penalty"),
            (r#""logit_bias":{"1":5}"#, "logit_bias"),
            (
                r#""response_format":{"type":"json_object"}"#,
                "response_format",
            ),
        ] {
            let body = format!("{{{m},{extra}}}");
            let e = chat_err(&body);
            assert_eq!(e.status.as_u16(), 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
            assert!(
                e.to_json().starts_with(r#"{"error":{"message":"#),
                "{}",
                e.to_json()
            );
        }
        let many: Vec<String> = (0..=MAX_STOP_STRINGS)
            .map(|i| format!("\"s{i}\""))
            .collect();
        let e = chat_err(&format!("{{{m},\"stop\":[{}]}}", many.join(",")));
        assert_eq!(e.param.as_deref(), Some("stop"));
    }

    #[test]
    fn completion_prompts() {
        let p = |body: &str| parse_completion_request(body.as_bytes()).map(|r| r.prompt);
        assert_eq!(p(r#"{"prompt":"a"}"#), Ok(Prompt::Text("a".into())));
        assert_eq!(p(r#"{"prompt":["a"]}"#), Ok(Prompt::Text("a".into())));
        assert_eq!(
            p(r#"{"prompt":[1,2,3]}"#),
            Ok(Prompt::Tokens(vec![1, 2, 3]))
        );
        for bad in [
            r#"{}"#,
            r#"{"prompt":3}"#,
            r#"{"prompt":[]}"#,
            r#"{"prompt":["a","b"]}"#,
            r#"{"prompt":[1,-2]}"#,
            r#"{"prompt":[1,4294967296]}"#,
            r#"{"prompt":[1,"a"]}"#,
            r#"{"prompt":"a","echo":true}"#,
            r#"{"prompt":"a","best_of":3}"#,
            r#"{"prompt":"a","logprobs":2}"#,
        ] {
            let e = parse_completion_request(bad.as_bytes()).expect_err(bad);
            assert_eq!(e.status.as_u16(), 400, "{bad}");
            assert!(e.param.is_some(), "{bad}");
        }
    }

    #[test]
    fn error_json_is_openai_shaped() {
        let e = ApiError::invalid_param("top_p", "bad \"quote\"");
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["message"], "bad \"quote\"");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "top_p");
        assert!(v["error"]["code"].is_null());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..256))| {
            let _ = parse_chat_request(&bytes);
            let _ = parse_completion_request(&bytes);
        });
        // Deep nesting is refused by serde_json's recursion limit, not by a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_chat_request(deep.as_bytes()).is_err());
    }
}
