//! Chat templates: the Jinja template a model ships (GGUF `tokenizer.chat_template`, or
//! `tokenizer_config.json`'s `chat_template`) rendered with `minijinja`, set up the way Hugging
//! Face's `apply_chat_template` sets up Jinja2: `trim_blocks`, `lstrip_blocks`, loop controls,
//! Python string methods (`minijinja-contrib` pycompat), `raise_exception`, `strftime_now`, and a
//! `tojson` that writes what Python's `json.dumps(ensure_ascii=False)` writes.
//!
//! A model without a template gets ChatML ([`ChatTemplate::chatml`]); [`ChatTemplate::is_fallback`]
//! says so, so callers can tell the user.

use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::gguf::Gguf;
use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result};

/// ChatML, the fallback (what SmolLM2 and Qwen2 use, minus their default system prompts).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// minijinja fuel for one render: one unit per instruction, plus the bytes the template
/// produces and the items its filters visit (1/64 unit per byte). A template comes from a model
/// file, i.e. a stranger: without a budget, `{% for a in range(99999) %}{% for b in
/// range(99999) %}` runs for hours; with the budget it fails with an out-of-fuel error in about
/// a second. Real templates need far less: SmolLM2's and Qwen2.5's render 200 messages of 2 KB
/// within it (`tests/fuzz_regressions.rs`).
pub const TEMPLATE_FUEL: u64 = 10_000_000;

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (templates may know more, e.g. `tool`).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The name the CLI uses.
pub type Message = ChatMessage;

/// A compiled chat template with the BOS/EOS strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    fallback: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; syntax errors are [`ModelError::Template`].
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        // Also bounded by minijinja itself: parser nesting (150), render recursion (500),
        // `range` (100 000 items), repeated strings.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(template_err)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(template_err)?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            fallback: false,
        })
    }

    /// ChatML, for models that ship no template.
    pub fn chatml() -> Self {
        let mut t =
            ChatTemplate::new(CHATML_TEMPLATE, "", "<|im_end|>").expect("ChatML template compiles");
        t.fallback = true;
        t
    }

    /// `tokenizer.chat_template` from a GGUF, with `bos_token`/`eos_token` spelled from the
    /// tokenizer's BOS and first EOS id; ChatML when the file has no template.
    pub fn from_gguf(gguf: &Gguf, tokenizer: &Tokenizer) -> Result<Self> {
        let (bos, eos) = special_strings(tokenizer);
        match gguf.get("tokenizer.chat_template") {
            None => Ok(ChatTemplate::chatml_with(bos, eos)),
            Some(_) => ChatTemplate::new(gguf.get_str("tokenizer.chat_template")?, bos, eos),
        }
    }

    /// `chat_template` from a Hugging Face directory (`tokenizer_config.json`, or a
    /// `chat_template.jinja` file); ChatML when neither has one.
    /// `bos_token`/`eos_token` come from `tokenizer_config.json`, else from `tokenizer`.
    pub fn from_dir(dir: &Path, tokenizer: &Tokenizer) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| {
                ModelError::format("JSON", cfg_path.display().to_string(), e.to_string())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => {
                return Err(ModelError::Io {
                    path: cfg_path.display().to_string(),
                    error: e,
                })
            }
        };
        let (tok_bos, tok_eos) = special_strings(tokenizer);
        let token = |key: &str| -> String {
            let fallback = if key == "bos_token" {
                &tok_bos
            } else {
                &tok_eos
            };
            match cfg.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Object(o)) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string(),
                _ => fallback.clone(),
            }
        };
        // A string, or a list of {name, template} where "default" is the chat one.
        let from_cfg = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let source = match from_cfg {
            Some(s) => Some(s),
            None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        match source {
            Some(s) => ChatTemplate::new(s, token("bos_token"), token("eos_token")),
            None => Ok(ChatTemplate::chatml_with(
                token("bos_token"),
                token("eos_token"),
            )),
        }
    }

    /// ChatML with the model's BOS/EOS strings (EOS defaults to `<|im_end|>`).
    fn chatml_with(bos: String, eos: String) -> Self {
        let mut t = ChatTemplate::chatml();
        t.bos_token = bos;
        if !eos.is_empty() {
            t.eos_token = eos;
        }
        t
    }

    /// Renders `messages`; with `add_generation_prompt`, ends with the assistant header.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, Value::UNDEFINED)
    }

    /// As [`ChatTemplate::render`], with extra template variables (e.g. `tools`,
    /// `enable_thinking`) merged into the context.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: Value,
    ) -> Result<String> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(template_err)?;
        let base = context! {
            messages => messages_value(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let ctx = if extra.is_undefined() {
            base
        } else {
            context! { ..extra, ..base }
        };
        tmpl.render(ctx).map_err(template_err)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when the model had no template and this is ChatML.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// The tokenizer's BOS and EOS as text (empty when it has none).
fn special_strings(tokenizer: &Tokenizer) -> (String, String) {
    let spell = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    (spell(tokenizer.bos_id()), spell(tokenizer.eos_id()))
}

fn messages_value(messages: &[ChatMessage]) -> Value {
    messages
        .iter()
        .map(|m| Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
        .collect()
}

fn template_err(e: Error) -> ModelError {
    // minijinja's Display names the error kind; add the detail and the line where known.
    let mut msg = e.to_string();
    if let Some(line) = e.line() {
        if !msg.contains("line") {
            msg.push_str(&format!(" (line {line})"));
        }
    }
    ModelError::Template(msg)
}

fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("template raised: {msg}"),
    ))
}

/// `strftime_now(format)`: the current UTC time, Python `strftime` codes
/// `%Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j %%` (and `%-d`, `%-m`, ...).
fn strftime_now(format: String) -> std::result::Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(strftime_utc(secs, &format))
}

pub(crate) fn strftime_utc(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod % 3600 / 60, sod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |v: i64, w: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0w$}")
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&num(y.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(m, 2)),
            Some('d') => out.push_str(&num(d, 2)),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('H') => out.push_str(&num(hh, 2)),
            Some('I') => out.push_str(&num((hh + 11) % 12 + 1, 2)),
            Some('M') => out.push_str(&num(mm, 2)),
            Some('S') => out.push_str(&num(ss, 2)),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 → (year, month, day).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson` as Hugging Face defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_py_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_py_json(
    v: &Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&v.to_string()),
        ValueKind::String => {
            out.push_str(&serde_json::to_string(v.as_str().unwrap_or_default()).unwrap_or_default())
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_py_json(item, indent, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                let k = key
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| key.to_string());
                out.push_str(&serde_json::to_string(&k).unwrap_or_default());
                out.push_str(": ");
                write_py_json(&v.get_item(key)?, indent, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => out.push_str(&serde_json::to_string(&v.to_string()).unwrap_or_default()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::chatml();
        assert!(t.is_fallback());
        let s = t.render(&[ChatMessage::user("hi")], true).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let s = t.render(&[ChatMessage::user("hi")], false).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n");
    }

    #[test]
    fn syntax_and_raise_errors_are_template_errors() {
        let e = ChatTemplate::new("{% for %}", "", "").unwrap_err();
        assert!(matches!(e, ModelError::Template(_)), "{e}");
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}ok",
            "",
            "",
        )
        .unwrap();
        let e = t.render(&[ChatMessage::assistant("x")], false).unwrap_err();
        assert!(
            matches!(&e, ModelError::Template(m) if m.contains("Conversation roles must alternate")),
            "{e}"
        );
        assert_eq!(t.render(&[ChatMessage::user("x")], false).unwrap(), "ok");
    }

    #[test]
    fn python_methods_trim_blocks_bos() {
        let t = ChatTemplate::new(
            "{{ bos_token }}\n{% for m in messages %}\n  {{ m.role.upper() }}: {{ m['content'].strip() }}|\n  {% if m.role == 'user' %}\n!{% endif %}\n{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let s = t
            .render(
                &[ChatMessage::user("  hi  "), ChatMessage::assistant("yo")],
                false,
            )
            .unwrap();
        // What Python's jinja2 (trim_blocks, lstrip_blocks) renders.
        assert_eq!(s, "<s>\n  USER: hi|\n!  ASSISTANT: yo|\n");
    }

    #[test]
    fn tojson_like_python() {
        let t = ChatTemplate::new(
            "{{ messages | tojson }}|{{ {'a': [1, 'é<'] } | tojson(indent=2) }}",
            "",
            "",
        )
        .unwrap();
        let s = t.render(&[ChatMessage::user("x")], false).unwrap();
        assert_eq!(
            s,
            "[{\"content\": \"x\", \"role\": \"user\"}]|{\n  \"a\": [\n    1,\n    \"é<\"\n  ]\n}"
        );
    }

    #[test]
    fn strftime() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime_utc(t, "%d %b %Y"), "29 Feb 2024");
        assert_eq!(
            strftime_utc(t, "%A %B %-d, %H:%M:%S %j %y %%"),
            "Thursday February 29, 13:05:09 060 24 %"
        );
        assert_eq!(strftime_utc(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
        let tmpl = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "").unwrap();
        assert_eq!(tmpl.render(&[], false).unwrap().len(), 4);
    }
}
