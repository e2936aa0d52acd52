//! Loading Llama-family models (GGUF and Hugging Face safetensors), their weight kernels,
//! tokenizers and chat templates, and the forward pass over any [`kivi_core::KvCache`].

pub mod backend;
pub mod chat;
pub mod config;
pub mod error;
pub mod gguf;
pub mod llama;
pub mod loader;
pub mod matrix;
pub mod random;
pub mod runner;
pub mod safetensors;
pub mod tensor;
pub mod tokenizer;

pub use error::{ModelError, Result};
