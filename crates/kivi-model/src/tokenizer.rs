//! Text ↔ token ids, built on the `tokenizers` crate (pure Rust: `fancy-regex`, no oniguruma).
//!
//! Two sources:
//! - a GGUF file's `tokenizer.ggml.*` metadata ([`GgufTokenizerSpec`]): byte-level BPE
//!   (`tokenizer.ggml.model == "gpt2"`) with the split regex that `tokenizer.ggml.pre` names, as in
//!   llama.cpp's `llama-vocab.cpp`, or SentencePiece (`"llama"`), rebuilt as a byte-fallback BPE
//!   whose merges come from the token scores, the way Hugging Face's GGUF converter does it;
//! - a Hugging Face directory's `tokenizer.json` (+ `tokenizer_config.json`, `config.json`,
//!   `generation_config.json` for BOS/EOS).
//!
//! Control (token type 3) and user-defined (type 4) tokens are added tokens: they are matched
//! whole in the input text, so `<|im_start|>` is one id.
//!
//! [`Tokenizer`] is cheap to clone (the vocabulary sits behind an `Arc`); [`TokenStream`] turns a
//! stream of generated ids into text without splitting a UTF-8 character across two pieces.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::gguf::{Gguf, MetaValue};
use crate::{ModelError, Result};

/// GGUF token types (llama.cpp `llama_token_type`).
pub const TOKEN_TYPE_NORMAL: i32 = 1;
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
pub const TOKEN_TYPE_CONTROL: i32 = 3;
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
pub const TOKEN_TYPE_UNUSED: i32 = 5;
pub const TOKEN_TYPE_BYTE: i32 = 6;

/// Llama 3 (`llama-bpe`), from its `tokenizer.json`.
const SPLIT_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: Llama 3's regex with single digits, from its `tokenizer.json`.
const SPLIT_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tokens that end a turn or a document in the families kivi runs; each present one joins
/// [`Tokenizer::eos_ids`] next to the file's own EOS.
const END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
];

/// Everything a GGUF says about its tokenizer, as plain data (so tests can build one in memory).
#[derive(Clone, Debug, Default)]
pub struct GgufTokenizerSpec {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the split regex family of a byte-level BPE (`smollm`, `qwen2`, ...).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (empty: all normal).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores` (SentencePiece; empty for BPE).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges`, `"a b"` each, best first (BPE; empty for SentencePiece).
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` / `eom_token_id`: more end-of-turn ids, when present.
    pub eot_id: Option<u32>,
    pub eom_id: Option<u32>,
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`; `None` means the model kind's default (SentencePiece: yes).
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece; default yes).
    pub add_space_prefix: Option<bool>,
    /// `general.architecture`: Gemma's SentencePiece vocabularies need their own rules.
    pub architecture: Option<String>,
}

impl GgufTokenizerSpec {
    /// Reads the `tokenizer.ggml.*` keys. Only `model` and `tokens` are required.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let opt_str_array = |key: &str| -> Result<Vec<String>> {
            match gguf.get(key) {
                None => Ok(Vec::new()),
                Some(_) => Ok(gguf
                    .get_str_array(key)?
                    .into_iter()
                    .map(str::to_owned)
                    .collect()),
            }
        };
        let opt_id = |key: &str| -> Result<Option<u32>> {
            match gguf.get(key) {
                None => Ok(None),
                Some(_) => {
                    let v = gguf.get_u64(key)?;
                    u32::try_from(v).map(Some).map_err(|_| {
                        ModelError::format("GGUF", key, format!("token id {v} out of range"))
                    })
                }
            }
        };
        let opt_bool = |key: &str| -> Result<Option<bool>> {
            match gguf.get(key) {
                None => Ok(None),
                Some(MetaValue::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(ModelError::format(
                    "GGUF",
                    key,
                    format!("expected a bool, found {other:?}"),
                )),
            }
        };
        let model = match gguf.get("tokenizer.ggml.model") {
            Some(_) => gguf.get_str("tokenizer.ggml.model")?.to_owned(),
            None => return Err(ModelError::MissingMetadata("tokenizer.ggml.model".into())),
        };
        let pre = match gguf.get("tokenizer.ggml.pre") {
            Some(_) => Some(gguf.get_str("tokenizer.ggml.pre")?.to_owned()),
            None => None,
        };
        if gguf.get("tokenizer.ggml.tokens").is_none() {
            return Err(ModelError::MissingMetadata("tokenizer.ggml.tokens".into()));
        }
        let token_types = match gguf.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(_) => gguf.get_i32_array("tokenizer.ggml.token_type")?,
        };
        let scores = match gguf.get("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(_) => gguf.get_f32_array("tokenizer.ggml.scores")?,
        };
        Ok(GgufTokenizerSpec {
            model,
            pre,
            tokens: opt_str_array("tokenizer.ggml.tokens")?,
            token_types,
            scores,
            merges: opt_str_array("tokenizer.ggml.merges")?,
            bos_id: opt_id("tokenizer.ggml.bos_token_id")?,
            eos_id: opt_id("tokenizer.ggml.eos_token_id")?,
            eot_id: opt_id("tokenizer.ggml.eot_token_id")?,
            eom_id: opt_id("tokenizer.ggml.eom_token_id")?,
            unk_id: opt_id("tokenizer.ggml.unknown_token_id")?,
            add_bos: opt_bool("tokenizer.ggml.add_bos_token")?,
            add_eos: opt_bool("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: opt_bool("tokenizer.ggml.add_space_prefix")?,
            architecture: match gguf.get("general.architecture") {
                Some(_) => Some(gguf.architecture()?.to_owned()),
                None => None,
            },
        })
    }

    fn is_gemma(&self) -> bool {
        self.model == "llama"
            && self
                .architecture
                .as_deref()
                .is_some_and(|a| a.starts_with("gemma"))
    }

    /// Tokens as the BPE vocabulary spells them. Gemma stores a token of several spaces as
    /// spaces, where its text (spaces replaced by `▁`) needs `▁▁`; Hugging Face's converter
    /// renames them the same way.
    fn vocab_tokens(&self) -> Vec<String> {
        if !self.is_gemma() {
            return self.tokens.clone();
        }
        self.tokens
            .iter()
            .map(|t| {
                if t.contains(' ') && t.trim().is_empty() {
                    "▁".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect()
    }

    fn token_type(&self, id: usize) -> i32 {
        self.token_types
            .get(id)
            .copied()
            .unwrap_or(TOKEN_TYPE_NORMAL)
    }

    fn check(&self) -> Result<()> {
        let n = self.tokens.len();
        if n == 0 {
            return Err(tok_err("the vocabulary is empty"));
        }
        if !self.token_types.is_empty() && self.token_types.len() != n {
            return Err(tok_err(format!(
                "{} token types for {n} tokens",
                self.token_types.len()
            )));
        }
        if !self.scores.is_empty() && self.scores.len() != n {
            return Err(tok_err(format!(
                "{} scores for {n} tokens",
                self.scores.len()
            )));
        }
        for (what, id) in [
            ("bos", self.bos_id),
            ("eos", self.eos_id),
            ("eot", self.eot_id),
            ("eom", self.eom_id),
            ("unk", self.unk_id),
        ] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(tok_err(format!(
                        "{what} token id {id} outside the vocabulary of {n}"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn tok_err(msg: impl Into<String>) -> ModelError {
    ModelError::Tokenizer(msg.into())
}

fn tk_err(context: &str, e: tokenizers::Error) -> ModelError {
    ModelError::Tokenizer(format!("{context}: {e}"))
}

/// A tokenizer plus the ids generation needs (BOS, the set of EOS ids).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bos: Option<u32>,
    /// The file's own EOS id (`eos_token_id`, or `tokenizer_config.json`'s `eos_token`).
    eos_id: Option<u32>,
    /// Sorted, no duplicates.
    eos: Vec<u32>,
    /// Prepend `bos` on `encode(.., add_special = true)` (GGUF tokenizers; a `tokenizer.json`
    /// does this itself through its post-processor).
    add_bos: bool,
    /// Append this on `encode(.., add_special = true)` (GGUF `add_eos_token`).
    add_eos: Option<u32>,
    /// Ids are `0..n_vocab` (computed once: `tokenizers` rebuilds a map to count).
    n_vocab: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.n_vocab)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl Tokenizer {
    /// From a GGUF file's metadata.
    pub fn from_gguf(gguf: &Gguf) -> Result<Tokenizer> {
        Tokenizer::from_spec(&GgufTokenizerSpec::from_gguf(gguf)?)
    }

    /// From `tokenizer.ggml.*` pieces.
    pub fn from_spec(spec: &GgufTokenizerSpec) -> Result<Tokenizer> {
        spec.check()?;
        let (mut inner, default_add_bos) = match spec.model.as_str() {
            "gpt2" => (build_byte_level_bpe(spec)?, false),
            "llama" => (build_sentencepiece(spec)?, true),
            other => {
                return Err(tok_err(format!(
                    "unsupported GGUF tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };
        let mut special = Vec::new();
        let mut user = Vec::new();
        let spelled = spec.vocab_tokens();
        for (id, token) in spec.tokens.iter().enumerate() {
            if spelled[id] != *token {
                // Renamed in the vocabulary (Gemma's space runs): matched by BPE, not whole.
                continue;
            }
            match spec.token_type(id) {
                TOKEN_TYPE_CONTROL => {
                    special.push(AddedToken::from(token.clone(), true).normalized(false))
                }
                TOKEN_TYPE_USER_DEFINED => {
                    user.push(AddedToken::from(token.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        // Control tokens that the file does not mark (old converters) but that are the BOS/EOS.
        for id in [spec.bos_id, spec.eos_id, spec.eot_id, spec.eom_id]
            .into_iter()
            .flatten()
        {
            let t = id as usize;
            if spec.token_type(t) == TOKEN_TYPE_NORMAL && spec.model == "gpt2" {
                special.push(AddedToken::from(spec.tokens[t].clone(), true).normalized(false));
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);
        let n = spec.tokens.len();
        if inner.get_vocab_size(true) != n {
            return Err(tok_err(format!(
                "vocabulary of {n} tokens became {} after adding special tokens (duplicate tokens?)",
                inner.get_vocab_size(true)
            )));
        }

        let mut eos = BTreeSet::new();
        eos.extend(spec.eos_id);
        eos.extend(spec.eot_id);
        eos.extend(spec.eom_id);
        for (id, token) in spec.tokens.iter().enumerate() {
            let ty = spec.token_type(id);
            if (ty == TOKEN_TYPE_CONTROL
                || ty == TOKEN_TYPE_USER_DEFINED
                || spec.token_types.is_empty())
                && END_TOKENS.contains(&token.as_str())
            {
                eos.insert(id as u32);
            }
        }
        let add_bos = spec.add_bos.unwrap_or(default_add_bos) && spec.bos_id.is_some();
        let add_eos = if spec.add_eos.unwrap_or(false) {
            spec.eos_id
        } else {
            None
        };
        Ok(Tokenizer {
            inner: Arc::new(inner),
            bos: spec.bos_id,
            eos_id: spec.eos_id,
            eos: eos.into_iter().collect(),
            add_bos,
            add_eos,
            n_vocab: n,
        })
    }

    /// From a Hugging Face model directory: `tokenizer.json`, with BOS/EOS from
    /// `tokenizer_config.json`, `config.json` and `generation_config.json` where present.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| tk_err(&path.display().to_string(), e))?;
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            match std::fs::read_to_string(&p) {
                Ok(s) => serde_json::from_str(&s).map(Some).map_err(|e| {
                    ModelError::format("JSON", p.display().to_string(), e.to_string())
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(ModelError::Io {
                    path: p.display().to_string(),
                    error: e,
                }),
            }
        };
        let tok_config = read_json("tokenizer_config.json")?;
        let config = read_json("config.json")?;
        let gen_config = read_json("generation_config.json")?;

        // "bos_token": "<s>" or {"content": "<s>", ...}
        let token_id = |v: Option<&serde_json::Value>| -> Option<u32> {
            let s = match v? {
                serde_json::Value::String(s) => s.as_str(),
                serde_json::Value::Object(o) => o.get("content")?.as_str()?,
                _ => return None,
            };
            inner.token_to_id(s)
        };
        let ids = |v: Option<&serde_json::Value>| -> Vec<u32> {
            match v {
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
                }
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut bos = tok_config
            .as_ref()
            .and_then(|c| token_id(c.get("bos_token")));
        let mut eos_id = tok_config
            .as_ref()
            .and_then(|c| token_id(c.get("eos_token")));
        let mut eos = BTreeSet::new();
        eos.extend(eos_id);
        for c in [&config, &gen_config].into_iter().flatten() {
            if bos.is_none() {
                bos = ids(c.get("bos_token_id")).first().copied();
            }
            let more = ids(c.get("eos_token_id"));
            eos_id = eos_id.or(more.first().copied());
            eos.extend(more);
        }
        for added in inner.get_added_tokens_decoder().values() {
            if added.special && END_TOKENS.contains(&added.content.as_str()) {
                if let Some(id) = inner.token_to_id(&added.content) {
                    eos.insert(id);
                }
            }
        }
        let n_vocab = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        Ok(Tokenizer {
            inner: Arc::new(inner),
            bos,
            eos_id,
            eos: eos.into_iter().collect(),
            add_bos: false,
            add_eos: None,
            n_vocab,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their ids.
    /// With `add_special`, adds what the model wants around a sequence (BOS for most
    /// SentencePiece models; nothing for SmolLM2 or Qwen2), but never a second BOS in front of
    /// a text that already starts with it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special)
            .map_err(|e| tk_err("encode", e))?;
        let body = enc.get_ids();
        let mut ids = Vec::with_capacity(body.len() + 2);
        if add_special && self.add_bos {
            if let Some(bos) = self.bos {
                if body.first() != Some(&bos) {
                    ids.push(bos);
                }
            }
        }
        ids.extend_from_slice(body);
        if add_special {
            ids.extend(self.add_eos);
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens included (`decode(encode(s)) == s`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Text of `ids`; `skip_special` leaves out control tokens such as `<|im_end|>`.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(tok_err(format!(
                "token id {bad} outside the vocabulary of {n}"
            )));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| tk_err("decode", e))
    }

    /// A streaming detokenizer for generated ids.
    pub fn stream(&self) -> TokenStream {
        TokenStream {
            tok: self.clone(),
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Every id that ends generation: the model's EOS plus end-of-turn tokens it has.
    /// The model's own EOS id (one of [`Tokenizer::eos_ids`]).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Sorted, without duplicates.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.binary_search(&id).is_ok()
    }

    /// Whether `encode(.., true)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.n_vocab
    }

    /// The token's string as the vocabulary spells it (`Ġthe` for byte-level BPE).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Streaming detokenizer: [`TokenStream::push`] returns the text that the new id completes.
///
/// It decodes a short window of recent ids and emits what grew, holding text back while it
/// ends in an incomplete UTF-8 sequence (U+FFFD), e.g. an emoji whose 4 bytes span 2 tokens.
/// The window keeps decoder context (SentencePiece's leading-space strip) consistent.
#[derive(Clone, Debug)]
pub struct TokenStream {
    tok: Tokenizer,
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix: usize,
    /// Ids before this one have been emitted.
    read: usize,
}

impl TokenStream {
    /// Adds one id; returns the text it completes, empty while a character is still partial.
    /// An id outside the vocabulary is dropped and yields nothing (see [`TokenStream::try_push`]).
    pub fn push(&mut self, id: u32) -> String {
        self.try_push(id).ok().flatten().unwrap_or_default()
    }

    /// Adds one id; `Ok(None)` while the text is incomplete. An id outside the vocabulary is an
    /// error and is not added.
    pub fn try_push(&mut self, id: u32) -> Result<Option<String>> {
        if id as usize >= self.tok.vocab_size() {
            return Err(tok_err(format!(
                "token id {id} outside the vocabulary of {}",
                self.tok.vocab_size()
            )));
        }
        self.ids.push(id);
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            let text = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(text))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (an incomplete character comes out as U+FFFD); empty if
    /// nothing is.
    pub fn finish(&mut self) -> String {
        if self.read == self.ids.len() {
            return String::new();
        }
        let window = &self.ids[self.prefix..];
        let held = &self.ids[self.prefix..self.read];
        let (Ok(before), Ok(now)) = (self.tok.decode(held), self.tok.decode(window)) else {
            return String::new();
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        let start = if now.is_char_boundary(before.len()) {
            before.len()
        } else {
            0
        };
        now[start..].to_string()
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// Byte-level BPE (`tokenizer.ggml.model == "gpt2"`).
fn build_byte_level_bpe(spec: &GgufTokenizerSpec) -> Result<tokenizers::Tokenizer> {
    let pre = spec.pre.as_deref().unwrap_or("default");
    let bytes = || {
        PreTokenizerWrapper::ByteLevel(tokenizers::pre_tokenizers::byte_level::ByteLevel::new(
            false, false, false,
        ))
    };
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let pattern = SplitPattern::Regex(re.to_string());
        Ok(PreTokenizerWrapper::Split(
            Split::new(pattern, SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| tk_err("split regex", e))?,
        ))
    };
    // llama.cpp's grouping of `tokenizer.ggml.pre` names (llm_tokenizer_bpe).
    let (pre_tokenizer, ignore_merges, nfc) = match pre {
        // GPT-2's regex (ByteLevel's own, with use_regex).
        "default" | "gpt-2" | "gpt2" | "olmo" | "mpt" | "jais" => (
            PreTokenizerWrapper::ByteLevel(tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, false, true)),
            false,
            false,
        ),
        // Single digits first, then GPT-2's regex: SmolLM2's tokenizer.json is
        // Sequence[Digits(individual_digits), ByteLevel(use_regex)].
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => (
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(tokenizers::pre_tokenizers::byte_level::ByteLevel::new(
                    false, false, true,
                )),
            ])),
            false,
            false,
        ),
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez" => (
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![split(SPLIT_QWEN2)?, bytes()])),
            false,
            // Qwen2's tokenizer.json normalizes to NFC (llama.cpp does not).
            true,
        ),
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "dbrx" | "smaug-bpe" => (
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![split(SPLIT_LLAMA3)?, bytes()])),
            // Llama 3's tokenizer.json sets ignore_merges: a whole word in the vocabulary wins.
            true,
            false,
        ),
        other => {
            return Err(tok_err(format!(
                "unsupported byte-level BPE pre-tokenizer `{other}` (supported: smollm, qwen2, llama-bpe, default and their aliases)"
            )))
        }
    };

    let vocab = vocab_map(spec)?;
    let merges = spec
        .merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // Byte-level tokens never contain a plain space (it is spelled `Ġ`).
            let mut parts = m.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                _ => Err(tok_err(format!("merge {i} `{m}` is not two tokens"))),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges);
    if let Some(unk) = spec.unk_id {
        builder = builder.unk_token(spec.tokens[unk as usize].clone());
    }
    let bpe = builder.build().map_err(|e| tk_err("BPE", e))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    if nfc {
        tok.with_normalizer(Some(NormalizerWrapper::NFC(NFC)));
    }
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    Ok(tok)
}

fn vocab_map(spec: &GgufTokenizerSpec) -> Result<Vocab> {
    let tokens = spec.vocab_tokens();
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        // A duplicate keeps its first id; llama.cpp does the same (text_to_token).
        vocab.entry(token.clone()).or_insert(id as u32);
    }
    if vocab.len() != spec.tokens.len() {
        // Make every id reachable in id_to_token: rename later duplicates (they are unused).
        let mut seen = HashSet::new();
        vocab.clear();
        for (id, token) in tokens.iter().enumerate() {
            let key = if seen.insert(token.clone()) {
                token.clone()
            } else {
                format!("[DUPLICATE_{id}]{token}")
            };
            vocab.insert(key, id as u32);
        }
    }
    Ok(vocab)
}

/// SentencePiece (`tokenizer.ggml.model == "llama"`) as a byte-fallback BPE whose merges come
/// from the scores, as Hugging Face's converter builds it (`generate_merges`).
fn build_sentencepiece(spec: &GgufTokenizerSpec) -> Result<tokenizers::Tokenizer> {
    if spec.scores.is_empty() && spec.merges.is_empty() {
        return Err(tok_err("SentencePiece vocabulary without scores or merges"));
    }
    let vocab = vocab_map(spec)?;
    let merges: Vec<(String, String)> = if !spec.merges.is_empty() {
        spec.merges
            .iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect()
    } else if spec.is_gemma() {
        // Gemma's scores do not follow its merge order; the order of the tokens does (HF).
        let order: Vec<f32> = (0..spec.tokens.len()).map(|i| -(i as f32)).collect();
        merges_from_scores(&spec.vocab_tokens(), &order, &vocab)
    } else {
        merges_from_scores(&spec.vocab_tokens(), &spec.scores, &vocab)
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = spec.unk_id {
        builder = builder.unk_token(spec.tokens[unk as usize].clone());
    }
    let bpe = builder.build().map_err(|e| tk_err("BPE", e))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let mut decoders = vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(|e| tk_err("decoder", e))?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if spec.add_space_prefix.unwrap_or(true) {
        tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(Metaspace::new(
            '▁',
            PrependScheme::First,
            false,
        ))));
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    } else {
        tok.with_normalizer(Some(NormalizerWrapper::Replace(
            Replace::new(" ", "▁").map_err(|e| tk_err("normalizer", e))?,
        )));
    }
    tok.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(
        decoders,
    ))));
    Ok(tok)
}

/// Every split of a token into two tokens of the vocabulary is a merge, ranked by the merged
/// token's score (higher first), then the pieces' lengths in characters (longer first), then
/// token order and the pieces' ids: Hugging Face's `generate_merges`, whose stable sort this
/// reproduces.
fn merges_from_scores(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    struct Merge<'a> {
        score: f32,
        len_l: usize,
        len_r: usize,
        token: usize,
        ids: (u32, u32),
        l: &'a str,
        r: &'a str,
    }
    let mut merges = Vec::new();
    for (token, text) in tokens.iter().enumerate() {
        let score = scores.get(token).copied().unwrap_or(0.0);
        for (split, _) in text.char_indices().skip(1) {
            let (l, r) = text.split_at(split);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push(Merge {
                    score,
                    len_l: l.chars().count(),
                    len_r: r.chars().count(),
                    token,
                    ids: (li, ri),
                    l,
                    r,
                });
            }
        }
    }
    merges.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.len_l.cmp(&a.len_l))
            .then(b.len_r.cmp(&a.len_r))
            .then(a.token.cmp(&b.token))
            .then(a.ids.cmp(&b.ids))
    });
    merges
        .into_iter()
        .map(|m| (m.l.to_string(), m.r.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary that can spell anything: the 256 byte symbols, a few merges, and
    /// ChatML control tokens.
    pub(crate) fn tiny_byte_level(pre: &str) -> GgufTokenizerSpec {
        let mut tokens: Vec<String> = vec![
            "<|endoftext|>".into(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
        ];
        let mut types = vec![TOKEN_TYPE_CONTROL; 3];
        let alphabet = byte_alphabet();
        for c in &alphabet {
            tokens.push(c.to_string());
            types.push(TOKEN_TYPE_NORMAL);
        }
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2",
        ];
        for m in merges {
            tokens.push(m.replace(' ', ""));
            types.push(TOKEN_TYPE_NORMAL);
        }
        GgufTokenizerSpec {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens,
            token_types: types,
            merges: merges.iter().map(|s| s.to_string()).collect(),
            bos_id: Some(1),
            eos_id: Some(2),
            unk_id: Some(0),
            add_bos: Some(false),
            ..Default::default()
        }
    }

    /// GPT-2's bytes_to_unicode, in byte order.
    fn byte_alphabet() -> Vec<char> {
        let mut out = Vec::new();
        let mut n = 0u32;
        for b in 0u32..256 {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            if printable {
                out.push(char::from_u32(b).unwrap());
            } else {
                out.push(char::from_u32(256 + n).unwrap());
                n += 1;
            }
        }
        out
    }

    #[test]
    fn tiny_byte_level_round_trip_and_specials() {
        for pre in ["smollm", "qwen2", "llama-bpe", "default"] {
            let tok = Tokenizer::from_spec(&tiny_byte_level(pre)).unwrap();
            assert_eq!(tok.vocab_size(), 3 + 256 + 10);
            let ids = tok
                .encode("<|im_start|>hello world<|im_end|>", true)
                .unwrap();
            assert_eq!(ids.first(), Some(&1), "{pre}");
            assert_eq!(ids.last(), Some(&2), "{pre}");
            let hello = tok.token_to_id("hello").unwrap();
            let world = tok.token_to_id("Ġworld").unwrap();
            assert_eq!(ids, vec![1, hello, world, 2], "{pre}");
            for s in [
                "héllo wörld 🦀\n\n  x\t",
                "fn main() { println!(\"{}\", 12345); }",
                "",
            ] {
                assert_eq!(
                    tok.decode(&tok.encode(s, true).unwrap()).unwrap(),
                    s,
                    "{pre}"
                );
            }
        }
    }

    #[test]
    fn digits_follow_the_pre_tokenizer() {
        let smol = Tokenizer::from_spec(&tiny_byte_level("smollm")).unwrap();
        let gpt2 = Tokenizer::from_spec(&tiny_byte_level("default")).unwrap();
        let one = smol.token_to_id("1").unwrap();
        let two = smol.token_to_id("2").unwrap();
        let twelve = smol.token_to_id("12").unwrap();
        assert_eq!(smol.encode("12", false).unwrap(), vec![one, two]);
        assert_eq!(gpt2.encode("12", false).unwrap(), vec![twelve]);
    }

    #[test]
    fn eos_set_and_bos() {
        let tok = Tokenizer::from_spec(&tiny_byte_level("smollm")).unwrap();
        assert_eq!(tok.bos_id(), Some(1));
        assert!(!tok.adds_bos());
        assert_eq!(tok.eos_ids(), &[0, 2]);
        let mut spec = tiny_byte_level("smollm");
        spec.add_bos = Some(true);
        let tok = Tokenizer::from_spec(&spec).unwrap();
        assert_eq!(tok.encode("hello", true).unwrap()[0], 1);
        assert_eq!(
            tok.encode("<|im_start|>hello", true)
                .unwrap()
                .iter()
                .filter(|&&i| i == 1)
                .count(),
            1
        );
        assert_ne!(tok.encode("hello", false).unwrap()[0], 1);
    }

    #[test]
    fn unsupported_models_are_named() {
        let mut spec = tiny_byte_level("smollm");
        spec.model = "bert".into();
        let e = Tokenizer::from_spec(&spec).unwrap_err().to_string();
        assert!(e.contains("bert"), "{e}");
        let e = Tokenizer::from_spec(&tiny_byte_level("chameleon"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chameleon"), "{e}");
    }

    #[test]
    fn stream_holds_split_characters() {
        let tok = Tokenizer::from_spec(&tiny_byte_level("smollm")).unwrap();
        let text = "a🦀 hello 世界!";
        let ids = tok.encode(text, false).unwrap();
        let mut stream = tok.stream();
        let mut out = String::new();
        let mut pieces = 0;
        for &id in &ids {
            let t = stream.push(id);
            assert!(!t.contains('\u{FFFD}'));
            if !t.is_empty() {
                out.push_str(&t);
                pieces += 1;
            }
        }
        out.push_str(&stream.finish());
        assert!(stream.try_push(1 << 30).is_err());
        assert_eq!(out, text);
        assert!(
            pieces < ids.len(),
            "multi-byte characters span several byte tokens"
        );
    }

    /// A Hugging Face directory: `tokenizer.json` written from the tiny GGUF tokenizer, BOS/EOS
    /// from `tokenizer_config.json` and `config.json`, and its chat template.
    #[test]
    fn from_dir_reads_json_and_configs() {
        let gguf_tok = Tokenizer::from_spec(&tiny_byte_level("smollm")).unwrap();
        let dir = std::env::temp_dir().join(format!("kivi-tok-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        gguf_tok
            .inner()
            .save(dir.join("tokenizer.json"), false)
            .unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
                "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}"#,
        )
        .unwrap();
        std::fs::write(dir.join("config.json"), r#"{"eos_token_id": [2, 0]}"#).unwrap();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.vocab_size(), gguf_tok.vocab_size());
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_id(), Some(2));
        assert_eq!(tok.eos_ids(), &[0, 2]);
        let text = "<|im_start|>hello world 12 🦀<|im_end|>";
        assert_eq!(
            tok.encode(text, true).unwrap(),
            gguf_tok.encode(text, true).unwrap()
        );
        assert_eq!(tok.decode(&tok.encode(text, true).unwrap()).unwrap(), text);
        let chat = crate::chat::ChatTemplate::from_dir(&dir, &tok).unwrap();
        assert!(!chat.is_fallback());
        let s = chat
            .render(&[crate::chat::ChatMessage::user("hi")], false)
            .unwrap();
        assert_eq!(s, "<|im_start|>hi<|im_end|>");
        // No template anywhere: ChatML, and it says so.
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "<|im_end|>"}"#,
        )
        .unwrap();
        let chat = crate::chat::ChatTemplate::from_dir(&dir, &tok).unwrap();
        assert!(chat.is_fallback());
        assert_eq!(
            chat.bos_token(),
            "<|im_start|>",
            "falls back to the tokenizer's BOS"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        // A missing tokenizer.json is a tokenizer error naming the file.
        let e = Tokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }

    #[test]
    fn sentencepiece_from_scores() {
        // <unk> <s> </s>, byte tokens, then pieces with scores.
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..256 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TOKEN_TYPE_BYTE);
            scores.push(0.0);
        }
        for (i, p) in [
            "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁hello", "▁w",
            "or", "▁wor", "ld", "▁world",
        ]
        .iter()
        .enumerate()
        {
            tokens.push(p.to_string());
            types.push(TOKEN_TYPE_NORMAL);
            scores.push(-(i as f32));
        }
        // Make longer pieces better than their parts.
        let n = tokens.len();
        for (i, t) in tokens.iter().enumerate() {
            if i > 258 {
                scores[i] = t.chars().count() as f32 - (n - i) as f32 * 1e-3;
            }
        }
        let spec = GgufTokenizerSpec {
            model: "llama".into(),
            tokens,
            token_types: types,
            scores,
            bos_id: Some(1),
            eos_id: Some(2),
            unk_id: Some(0),
            ..Default::default()
        };
        let tok = Tokenizer::from_spec(&spec).unwrap();
        assert!(tok.adds_bos());
        let ids = tok.encode("hello world", true).unwrap();
        let hello = tok.token_to_id("▁hello").unwrap();
        let world = tok.token_to_id("▁world").unwrap();
        assert_eq!(ids, vec![1, hello, world]);
        // Byte fallback for characters outside the vocabulary.
        let ids = tok.encode("hello é", false).unwrap();
        assert!(
            ids.contains(&(3 + 0xC3)) && ids.contains(&(3 + 0xA9)),
            "{ids:?}"
        );
        assert_eq!(tok.decode(&ids).unwrap(), "hello é");
    }
}
