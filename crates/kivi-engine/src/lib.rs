//! Sequences, sampling and the generation loop over a kivi model.

pub mod eval;
pub mod humaneval;
pub mod inspect;
pub mod kv_spec;
pub mod passkey;
pub mod plot;
pub mod sampler;
pub mod session;

pub use sampler::{Sampler, SamplingParams};
pub use session::{GenerateParams, GenerationStats, Session, StopReason};
