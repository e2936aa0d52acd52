//! Sequences, sampling and the generation loop over a kivi model.

pub mod engine;
pub mod eval;
pub mod humaneval;
pub mod inspect;
pub mod kv_spec;
pub mod passkey;
pub mod plot;
pub mod sampler;
pub mod session;

pub use engine::{
    Engine, EngineConfig, EngineStats, Event, FinishReason, Finished, Request, RequestId,
    Scheduler, SubmitError,
};
pub use sampler::{Sampler, SamplingParams};
pub use session::{GenerateParams, GenerationStats, Session, StopReason};
