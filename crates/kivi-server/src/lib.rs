//! `kivi serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

pub mod api;
pub mod error;
pub mod metrics;
pub mod stop;

pub use error::ApiError;
pub mod server;

pub use server::{router, serve, shutdown_signal, AppState, ServerConfig, DEFAULT_BODY_LIMIT};
