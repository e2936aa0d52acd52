//! GGUF v2/v3 reader over a memory map. Every count, length and offset read from the file is
//! checked against the file size before anything is allocated or indexed.
//!
//! API CONTRACT (other modules code against this; the implementation is filled in separately):

use std::collections::BTreeMap;
use std::path::Path;

use crate::tensor::{DType, RawTensor, TensorSource};
use crate::{ModelError, Result};

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

/// Where one tensor lives in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// Outermost first (reversed from GGUF's `ne` order).
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
}

impl Gguf {
    pub fn open(_path: &Path) -> Result<Gguf> {
        Err(ModelError::format("GGUF", "reader", "not implemented yet"))
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
    /// Any integer type that fits in u64 (errors name the key).
    pub fn get_u64(&self, _key: &str) -> Result<u64> {
        unimplemented!()
    }
    /// Any float or integer type, as f32.
    pub fn get_f32(&self, _key: &str) -> Result<f32> {
        unimplemented!()
    }
    pub fn get_str(&self, _key: &str) -> Result<&str> {
        unimplemented!()
    }
    pub fn get_str_array(&self, _key: &str) -> Result<Vec<&str>> {
        unimplemented!()
    }
    pub fn get_f32_array(&self, _key: &str) -> Result<Vec<f32>> {
        unimplemented!()
    }
    pub fn get_i32_array(&self, _key: &str) -> Result<Vec<i32>> {
        unimplemented!()
    }
}

impl TensorSource for Gguf {
    fn tensor(&self, name: &str) -> Result<RawTensor> {
        Err(ModelError::MissingTensor(name.to_string()))
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| t.name == name)
    }
}
