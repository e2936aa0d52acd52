//! Opens a model from a path: a GGUF file or a Hugging Face safetensors directory, with its
//! tokenizer and chat template.

use std::path::Path;

use crate::backend::{Backend, Cpu};
use crate::chat::ChatTemplate;
use crate::config::Config;
use crate::gguf::Gguf;
use crate::llama::{Llama, Naming};
use crate::safetensors::SafetensorsDir;
use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result};

pub struct Loaded<B: Backend> {
    /// File or directory name, for messages.
    pub name: String,
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
}

/// A model loaded for the CPU.
pub type LoadedModel = Loaded<Cpu>;

/// Loads a GGUF file (`*.gguf`) or a safetensors directory (`config.json` + `*.safetensors`).
pub fn load(path: &Path) -> Result<LoadedModel> {
    load_on(Cpu, path)
}

/// [`load`] onto any backend.
pub fn load_on<B: Backend>(backend: B, path: &Path) -> Result<Loaded<B>> {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let io_err = |e: std::io::Error| ModelError::Io {
        path: path.display().to_string(),
        error: e,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    let (model, tokenizer, chat_template) = if meta.is_dir() {
        let dir = SafetensorsDir::open(path)?;
        let tokenizer = Tokenizer::from_dir(path)?;
        let chat_template = ChatTemplate::from_dir(path, &tokenizer)?;
        let model = Llama::load_on(
            backend,
            &dir,
            Naming::HuggingFace,
            Config::from_hf(dir.config())?,
        )?;
        (model, tokenizer, chat_template)
    } else {
        let gguf = Gguf::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let chat_template = ChatTemplate::from_gguf(&gguf, &tokenizer)?;
        let model = Llama::load_on(backend, &gguf, Naming::Gguf, Config::from_gguf(&gguf)?)?;
        (model, tokenizer, chat_template)
    };
    check_vocab(&model, &tokenizer)?;
    Ok(Loaded {
        name,
        model,
        tokenizer,
        chat_template,
    })
}

/// Every id the tokenizer can produce must index the embedding.
fn check_vocab<B: Backend>(model: &Llama<B>, tok: &Tokenizer) -> Result<()> {
    if tok.vocab_size() > model.config.vocab {
        return Err(ModelError::Tokenizer(format!(
            "tokenizer has {} tokens but the model's embedding has {} rows",
            tok.vocab_size(),
            model.config.vocab
        )));
    }
    Ok(())
}
