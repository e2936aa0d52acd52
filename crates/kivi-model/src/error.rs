use thiserror::Error;

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum ModelError {
    // (Not named `source`: thiserror would make it the error's source, and a chain printed with
    // `{:#}` would repeat the I/O message.)
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    /// A malformed or hostile file. `field` names what was being read.
    #[error("invalid {format} file: {field}: {detail}")]
    Format {
        format: &'static str,
        field: String,
        detail: String,
    },
    #[error("unsupported tensor type {0}")]
    UnsupportedType(String),
    #[error("unknown architecture `{0}` (supported: llama, qwen2)")]
    UnknownArch(String),
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("missing metadata `{0}`")]
    MissingMetadata(String),
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt of {prompt} tokens does not fit the context window of {context} tokens")]
    ContextOverflow { prompt: usize, context: usize },
    #[error(transparent)]
    Cache(#[from] kivi_core::Error),
    /// An error of a compute backend (e.g. the CUDA driver), as its message.
    #[error("{0}")]
    Backend(String),
}

impl ModelError {
    pub fn format(
        format: &'static str,
        field: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        ModelError::Format {
            format,
            field: field.into(),
            detail: detail.into(),
        }
    }
}
