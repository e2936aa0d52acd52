//! Tensor element types (one table, like ggml's `type_traits`) and tensor bytes borrowed from a
//! memory map or owned.

use std::ops::Range;
use std::sync::Arc;

/// Element / block types we can load. GGUF ids per ggml.h.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4_K,
    Q6_K,
}

impl DType {
    /// Maps a GGUF `ggml_type` id. Unknown or unsupported ids return `Err(name)` with the
    /// ggml name when we know it, for the error message.
    pub fn from_ggml_id(id: u32) -> Result<DType, String> {
        Ok(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            6 => DType::Q5_0,
            8 => DType::Q8_0,
            12 => DType::Q4_K,
            14 => DType::Q6_K,
            30 => DType::BF16,
            other => {
                let name = match other {
                    7 => "Q5_1",
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    13 => "Q5_K",
                    15 => "Q8_K",
                    16..=23 => "IQ*",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    _ => "unknown",
                };
                return Err(format!("{name} (ggml type id {other})"));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q8_0 => "Q8_0",
            DType::Q4_K => "Q4_K",
            DType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block (1 for plain floats).
    pub fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q8_0 => 32,
            DType::Q4_K | DType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q8_0 => 34,
            DType::Q4_K => 144,
            DType::Q6_K => 210,
        }
    }

    /// Bytes for `n_elements`, or None if `n_elements` is not a whole number of blocks or overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.block_bytes() as u64)
    }
}

/// Bytes of one tensor: a range of a shared memory map, or an owned buffer.
#[derive(Clone)]
pub enum Storage {
    Mapped(Arc<memmap2::Mmap>, Range<usize>),
    Owned(Arc<Vec<u8>>),
}

impl Storage {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m, r) => &m[r.clone()],
            Storage::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({} bytes)", self.bytes().len())
    }
}

/// A tensor as found in a file. `shape` is outermost first: a `[rows][cols]` matrix has
/// `shape == [rows, cols]` (GGUF stores dims innermost first; the loader reverses them).
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Storage,
}

impl RawTensor {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where a model's tensors come from (a GGUF file, a safetensors directory, random weights).
pub trait TensorSource {
    /// The tensor called `name`, or `ModelError::MissingTensor`.
    fn tensor(&self, name: &str) -> crate::Result<RawTensor>;
    fn contains(&self, name: &str) -> bool;
}
