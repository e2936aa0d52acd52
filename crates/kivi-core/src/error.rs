use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid cache configuration: {0}")]
    InvalidConfig(String),
    #[error("non-finite value ({value}) at index {index} in {what}")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f32,
    },
    /// |value| exceeds the largest finite f16 (65504): it cannot be stored in the f16 formats.
    #[error("value {value} at index {index} in {what} is outside the f16 range (|x| <= 65504)")]
    OutOfRange {
        what: &'static str,
        index: usize,
        value: f32,
    },
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("unknown sequence {0:?}")]
    UnknownSequence(crate::SeqId),
    #[error("layer {layer} out of range (cache has {n_layer})")]
    Layer { layer: usize, n_layer: usize },
}
