//! GGUF v2/v3 reader over a memory map, and a small writer for synthetic files.
//!
//! A GGUF file comes from strangers, so the reader treats every count, length and offset as
//! hostile: each is checked against the bytes left in the file and against fixed limits before
//! anything is allocated or indexed, all arithmetic is checked, and a file truncated at any byte
//! is an error. Errors are [`ModelError::Format`] with `format: "GGUF"` and a `field` naming
//! what was being read (`metadata[17] key "tokenizer.ggml.tokens"`, `tensor_infos[3]
//! "blk.0.attn_q.weight"`); the detail ends with the file's path.
//!
//! Layout (little-endian; v2 and v3 differ only in that v3 may be big-endian, which we reject):
//!
//! ```text
//! "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count × (key: string | value_type u32 | value)
//! tensor_count × (name: string | n_dims u32 | ne[n_dims] u64 | ggml_type u32 | offset u64)
//! padding to `general.alignment` (default 32) | tensor data (offsets relative to here)
//! string = len u64 | UTF-8 bytes;  array = elem_type u32 | len u64 | elements
//! ```
//!
//! Tensors whose ggml type this crate cannot compute with (Q5_K, IQ*, ...) are still sized and
//! bounds-checked at open and listed in [`Gguf::unsupported`]; asking for one gives
//! [`ModelError::UnsupportedType`]. A type id with no known size cannot be bounds-checked, so it
//! fails at open, naming the tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::tensor::{DType, RawTensor, Storage, TensorSource};
use crate::{ModelError, Result};

/// `general.alignment` when the key is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest `general.alignment` accepted (must also be a power of two).
pub const MAX_ALIGNMENT: u64 = 1 << 20;
/// Most tensors one file may declare.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata keys one file may declare.
pub const MAX_KV: u64 = 1 << 20;
/// Most dimensions of one tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays (an array of scalars has depth 1).
pub const MAX_ARRAY_DEPTH: usize = 4;
/// Most metadata array elements in one file, all arrays together. Each becomes a
/// [`MetaValue`] in memory, so this bounds the allocation a small hostile file can cause.
/// Real tokenizers need under a million (vocab + merges + scores + types).
pub const MAX_META_VALUES: u64 = 1 << 23;
/// Longest metadata key (the GGUF spec's limit).
pub const MAX_KEY_LEN: u64 = 65_535;
/// Longest tensor name (ggml itself allows 63 bytes).
pub const MAX_TENSOR_NAME_LEN: u64 = 256;

const MAGIC: &[u8; 4] = b"GGUF";
/// Smallest possible metadata entry: empty-length key (8) + type (4) + one-byte value (1).
const MIN_KV_BYTES: u64 = 13;
/// Smallest possible tensor info: name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 32;

/// GGUF metadata value type ids.
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

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

impl MetaValue {
    /// The GGUF name of this value's type (`"U32"`, `"STRING"`, `"ARRAY"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "U8",
            MetaValue::I8(_) => "I8",
            MetaValue::U16(_) => "U16",
            MetaValue::I16(_) => "I16",
            MetaValue::U32(_) => "U32",
            MetaValue::I32(_) => "I32",
            MetaValue::U64(_) => "U64",
            MetaValue::I64(_) => "I64",
            MetaValue::F32(_) => "F32",
            MetaValue::F64(_) => "F64",
            MetaValue::Bool(_) => "BOOL",
            MetaValue::String(_) => "STRING",
            MetaValue::Array(_) => "ARRAY",
        }
    }

    /// Any unsigned integer, or a signed one that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits in i32.
    pub fn as_i32(&self) -> Option<i32> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v),
            MetaValue::U32(v) => i32::try_from(v).ok(),
            MetaValue::U64(v) => i32::try_from(v).ok(),
            MetaValue::I64(v) => i32::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any number, as f32 (an F64 outside f32's range gives None).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v as f32),
            MetaValue::I32(v) => Some(v as f32),
            MetaValue::U64(v) => Some(v as f32),
            MetaValue::I64(v) => Some(v as f32),
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => {
                let f = v as f32;
                (f.is_finite() || !v.is_finite()).then_some(f)
            }
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Type and (short) value, for error messages: `I32 (-5)`, `STRING`, `ARRAY of 3`.
    fn describe(&self) -> String {
        match self {
            MetaValue::String(_) => "STRING".to_string(),
            MetaValue::Array(a) => format!("ARRAY of {}", a.len()),
            MetaValue::Bool(b) => format!("BOOL ({b})"),
            MetaValue::U8(v) => format!("U8 ({v})"),
            MetaValue::I8(v) => format!("I8 ({v})"),
            MetaValue::U16(v) => format!("U16 ({v})"),
            MetaValue::I16(v) => format!("I16 ({v})"),
            MetaValue::U32(v) => format!("U32 ({v})"),
            MetaValue::I32(v) => format!("I32 ({v})"),
            MetaValue::U64(v) => format!("U64 ({v})"),
            MetaValue::I64(v) => format!("I64 ({v})"),
            MetaValue::F32(v) => format!("F32 ({v:?})"),
            MetaValue::F64(v) => format!("F64 ({v:?})"),
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => vt::U8,
            MetaValue::I8(_) => vt::I8,
            MetaValue::U16(_) => vt::U16,
            MetaValue::I16(_) => vt::I16,
            MetaValue::U32(_) => vt::U32,
            MetaValue::I32(_) => vt::I32,
            MetaValue::U64(_) => vt::U64,
            MetaValue::I64(_) => vt::I64,
            MetaValue::F32(_) => vt::F32,
            MetaValue::F64(_) => vt::F64,
            MetaValue::Bool(_) => vt::BOOL,
            MetaValue::String(_) => vt::STRING,
            MetaValue::Array(_) => vt::ARRAY,
        }
    }
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

/// A tensor whose ggml type has a known size but no [`DType`] in this crate (Q5_K, IQ4_XS, ...).
/// Its bytes were bounds-checked at open; [`TensorSource::tensor`] refuses it with
/// [`ModelError::UnsupportedType`].
#[derive(Clone, Debug)]
pub struct UnsupportedTensorInfo {
    pub name: String,
    pub ggml_type: u32,
    pub type_name: &'static str,
    /// Outermost first.
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

#[derive(Clone, Copy, Debug)]
enum Slot {
    Supported(usize),
    Unsupported(usize),
}

/// An open GGUF file: parsed metadata and tensor table over a shared read-only memory map.
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensors with a supported type, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Tensors with a known but unsupported type, in file order.
    pub unsupported: Vec<UnsupportedTensorInfo>,
    mmap: Arc<Mmap>,
    path: PathBuf,
    alignment: u64,
    data_offset: u64,
    by_name: HashMap<String, Slot>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("unsupported", &self.unsupported.len())
            .finish()
    }
}

impl Gguf {
    /// Opens, maps and validates `path`. Nothing is read from the tensor data.
    pub fn open(path: &Path) -> Result<Gguf> {
        let io = |error| ModelError::Io {
            path: path.display().to_string(),
            error,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            return Err(ModelError::format(
                "GGUF",
                "magic",
                format!("empty file (in {})", path.display()),
            ));
        }
        let mmap = map_file(&file, path)?;
        let parsed = parse(&mmap, path)?;
        let Parsed {
            version,
            metadata,
            tensors,
            unsupported,
            alignment,
            data_offset,
        } = parsed;
        let mut by_name = HashMap::with_capacity(tensors.len() + unsupported.len());
        for (i, t) in tensors.iter().enumerate() {
            by_name.insert(t.name.clone(), Slot::Supported(i));
        }
        for (i, t) in unsupported.iter().enumerate() {
            by_name.insert(t.name.clone(), Slot::Unsupported(i));
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            unsupported,
            mmap: Arc::new(mmap),
            path: path.to_path_buf(),
            alignment,
            data_offset,
            by_name,
        })
    }

    /// The path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File size in bytes.
    pub fn file_size(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// `general.alignment`, or 32.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The supported tensor called `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        match self.by_name.get(name) {
            Some(Slot::Supported(i)) => self.tensors.get(*i),
            _ => None,
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&MetaValue> {
        self.metadata
            .get(key)
            .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))
    }

    fn wrong_type(&self, key: &str, expected: &str, found: String) -> ModelError {
        ModelError::format(
            "GGUF",
            format!("metadata key {key:?}"),
            format!(
                "expected {expected}, found {found} (in {})",
                self.path.display()
            ),
        )
    }

    /// Any integer type that fits in u64 (errors name the key).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v.describe()))
    }

    /// Any float or integer type, as f32.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f32()
            .ok_or_else(|| self.wrong_type(key, "a number that fits in f32", v.describe()))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "STRING", v.describe()))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool()
            .ok_or_else(|| self.wrong_type(key, "BOOL", v.describe()))
    }

    fn get_array<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        f: impl Fn(&'a MetaValue) -> Option<T>,
    ) -> Result<Vec<T>> {
        let v = self.require(key)?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, &format!("ARRAY of {expected}"), v.describe()))?;
        arr.iter()
            .enumerate()
            .map(|(i, e)| {
                f(e).ok_or_else(|| {
                    self.wrong_type(
                        key,
                        &format!("ARRAY of {expected}"),
                        format!("element {i} of type {}", e.describe()),
                    )
                })
            })
            .collect()
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key, "STRING", MetaValue::as_str)
    }

    /// Array of any numeric type, as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.get_array(key, "numbers", MetaValue::as_f32)
    }

    /// Array of any integer type whose values fit in i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.get_array(key, "integers that fit in i32", MetaValue::as_i32)
    }
}

impl TensorSource for Gguf {
    fn tensor(&self, name: &str) -> Result<RawTensor> {
        match self.by_name.get(name) {
            Some(Slot::Supported(i)) => {
                let t = &self.tensors[*i];
                // Bounds were checked against the map's length at open, so these fit in usize.
                let start = t.offset as usize;
                let end = start + t.n_bytes as usize;
                Ok(RawTensor {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data: Storage::Mapped(self.mmap.clone(), start..end),
                })
            }
            Some(Slot::Unsupported(i)) => {
                let t = &self.unsupported[*i];
                Err(ModelError::UnsupportedType(format!(
                    "{} (ggml type id {}) of tensor `{}` in {}",
                    t.type_name,
                    t.ggml_type,
                    t.name,
                    self.path.display()
                )))
            }
            None => Err(ModelError::MissingTensor(name.to_string())),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}

/// Maps `file` (opened read-only from `path`) into memory: the crate's one `unsafe` block,
/// shared by the GGUF and safetensors loaders. Callers check for an empty file first.
pub(crate) fn map_file(file: &File, path: &Path) -> Result<Mmap> {
    // SAFETY: the file is opened read-only and the map is never written through. As with any
    // memory map, another process truncating or rewriting the file while it is mapped can
    // change the bytes under us or fault on access; like every mmap-based loader we accept that.
    unsafe { Mmap::map(file) }.map_err(|error| ModelError::Io {
        path: path.display().to_string(),
        error,
    })
}

// ---------------------------------------------------------------------------------------------
// ggml type table

/// Name, elements per block and bytes per block of every ggml type id that can appear in a
/// file (ggml's `type_traits`). Retired ids (4, 5, 31-33, 36-38) and Q8_1 (an in-memory
/// vec_dot type whose size differs between ggml and gguf-py) have no entry: they cannot be
/// sized, so a tensor using them fails at open.
fn ggml_type_info(id: u32) -> Option<(&'static str, u64, u64)> {
    Some(match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        40 => ("NVFP4", 64, 36),
        41 => ("Q1_0", 128, 18),
        _ => return None,
    })
}

/// The ggml type id of a [`DType`] (inverse of [`DType::from_ggml_id`]).
pub fn ggml_type_id(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q5_0 => 6,
        DType::Q8_0 => 8,
        DType::Q4_K => 12,
        DType::Q6_K => 14,
        DType::BF16 => 30,
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Errors below the field level are plain strings; the caller adds the field and the path.
type Detail = String;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], Detail> {
        if n as u64 > self.remaining() {
            return Err(format!(
                "file truncated: {what} needs {n} bytes at offset {}, but the file is {} bytes",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], Detail> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> std::result::Result<u8, Detail> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> std::result::Result<u16, Detail> {
        self.array(what).map(u16::from_le_bytes)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, Detail> {
        self.array(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, Detail> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length-prefixed UTF-8 string of at most `max_len` bytes.
    fn string(&mut self, max_len: u64) -> std::result::Result<String, Detail> {
        let len = self.u64("string length")?;
        if len > max_len {
            return Err(format!(
                "string length {len} exceeds the limit of {max_len} bytes"
            ));
        }
        if len > self.remaining() {
            return Err(format!(
                "string length {len} exceeds the {} bytes left in the file",
                self.remaining()
            ));
        }
        let bytes = self.take(len as usize, "string")?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(format!(
                "string is not valid UTF-8 (bad byte at index {})",
                e.valid_up_to()
            )),
        }
    }
}

/// Smallest encoded size of one value of type `ty`, or None for an unknown type.
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        vt::U8 | vt::I8 | vt::BOOL => 1,
        vt::U16 | vt::I16 => 2,
        vt::U32 | vt::I32 | vt::F32 => 4,
        vt::U64 | vt::I64 | vt::F64 => 8,
        vt::STRING => 8,
        vt::ARRAY => 12,
        _ => return None,
    })
}

/// Reads one value of type `ty` nested inside `depth` arrays; `budget` is the number of array
/// elements still allowed in this file.
fn read_value(
    c: &mut Cursor,
    ty: u32,
    depth: usize,
    budget: &mut u64,
) -> std::result::Result<MetaValue, Detail> {
    Ok(match ty {
        vt::U8 => MetaValue::U8(c.u8("U8 value")?),
        vt::I8 => MetaValue::I8(c.u8("I8 value")? as i8),
        vt::U16 => MetaValue::U16(c.u16("U16 value")?),
        vt::I16 => MetaValue::I16(c.u16("I16 value")? as i16),
        vt::U32 => MetaValue::U32(c.u32("U32 value")?),
        vt::I32 => MetaValue::I32(c.u32("I32 value")? as i32),
        vt::U64 => MetaValue::U64(c.u64("U64 value")?),
        vt::I64 => MetaValue::I64(c.u64("I64 value")? as i64),
        vt::F32 => MetaValue::F32(f32::from_bits(c.u32("F32 value")?)),
        vt::F64 => MetaValue::F64(f64::from_bits(c.u64("F64 value")?)),
        vt::BOOL => match c.u8("BOOL value")? {
            0 => MetaValue::Bool(false),
            1 => MetaValue::Bool(true),
            b => return Err(format!("BOOL value {b} is neither 0 nor 1")),
        },
        vt::STRING => MetaValue::String(c.string(u64::MAX)?),
        vt::ARRAY => {
            let level = depth + 1;
            if level > MAX_ARRAY_DEPTH {
                return Err(format!(
                    "arrays nested {level} deep exceed the limit of {MAX_ARRAY_DEPTH}"
                ));
            }
            let elem_ty = c.u32("array element type")?;
            let min = min_value_bytes(elem_ty)
                .ok_or_else(|| format!("unknown array element type {elem_ty}"))?;
            let n = c.u64("array length")?;
            let rem = c.remaining();
            if !matches!(n.checked_mul(min), Some(need) if need <= rem) {
                return Err(format!(
                    "array length {n} × {min}-byte minimum element size exceeds the {rem} bytes \
                     left in the file"
                ));
            }
            if n > *budget {
                return Err(format!(
                    "array length {n} exceeds the {budget} metadata array elements left of the \
                     per-file limit of {MAX_META_VALUES}"
                ));
            }
            *budget -= n;
            let mut v = Vec::with_capacity(n as usize);
            for j in 0..n {
                let e = read_value(c, elem_ty, level, budget)
                    .map_err(|e| format!("array element {j}: {e}"))?;
                v.push(e);
            }
            MetaValue::Array(v)
        }
        other => return Err(format!("unknown value type {other}")),
    })
}

/// A tensor info as read, before it is checked against the data section.
struct RawInfo {
    name: String,
    /// GGUF order: innermost first.
    ne: Vec<u64>,
    ggml_type: u32,
    offset: u64,
}

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    unsupported: Vec<UnsupportedTensorInfo>,
    alignment: u64,
    data_offset: u64,
}

fn parse(buf: &[u8], path: &Path) -> Result<Parsed> {
    let err = |field: String, detail: Detail| {
        ModelError::format("GGUF", field, format!("{detail} (in {})", path.display()))
    };
    let len = buf.len() as u64;
    let mut c = Cursor { buf, pos: 0 };

    // Header.
    let magic = c.take(4, "magic").map_err(|d| err("magic".into(), d))?;
    if magic != MAGIC {
        return Err(err(
            "magic".into(),
            format!("expected \"GGUF\", found \"{}\"", magic.escape_ascii()),
        ));
    }
    let version = c.u32("version").map_err(|d| err("version".into(), d))?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(err(
                "version".into(),
                "version 1 is not supported (only 2 and 3; v1 used 32-bit counts)".into(),
            ))
        }
        v if v & 0xffff == 0 && matches!(v.swap_bytes(), 2 | 3) => {
            return Err(err(
                "version".into(),
                format!(
                    "big-endian GGUF (version {}) is not supported",
                    v.swap_bytes()
                ),
            ))
        }
        v => {
            return Err(err(
                "version".into(),
                format!("unsupported version {v} (supported: 2, 3)"),
            ))
        }
    }
    let tensor_count = c
        .u64("tensor_count")
        .map_err(|d| err("tensor_count".into(), d))?;
    let kv_count = c.u64("kv_count").map_err(|d| err("kv_count".into(), d))?;
    let rem = c.remaining();
    if kv_count > MAX_KV || kv_count * MIN_KV_BYTES > rem {
        return Err(err(
            "kv_count".into(),
            format!(
                "{kv_count} metadata entries (at least {MIN_KV_BYTES} bytes each) cannot fit in \
                 the {rem} bytes left in the file (limit {MAX_KV})"
            ),
        ));
    }
    if tensor_count > MAX_TENSORS || tensor_count * MIN_TENSOR_INFO_BYTES > rem {
        return Err(err(
            "tensor_count".into(),
            format!(
                "{tensor_count} tensors (at least {MIN_TENSOR_INFO_BYTES} bytes of info each) \
                 cannot fit in the {rem} bytes left in the file (limit {MAX_TENSORS})"
            ),
        ));
    }

    // Metadata.
    let mut metadata = BTreeMap::new();
    let mut first_seen: HashMap<String, u64> = HashMap::new();
    let mut budget = MAX_META_VALUES;
    for i in 0..kv_count {
        let key = c
            .string(MAX_KEY_LEN)
            .map_err(|d| err(format!("metadata[{i}] key"), d))?;
        let field = || format!("metadata[{i}] key {key:?}");
        if key.is_empty() {
            return Err(err(field(), "empty key".into()));
        }
        if let Some(j) = first_seen.get(&key) {
            return Err(err(
                field(),
                format!("duplicate key (first at metadata[{j}])"),
            ));
        }
        let ty = c.u32("value type").map_err(|d| err(field(), d))?;
        let value = read_value(&mut c, ty, 0, &mut budget).map_err(|d| err(field(), d))?;
        first_seen.insert(key.clone(), i);
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let field = || "metadata key \"general.alignment\"".to_string();
            let a = v.as_u64().ok_or_else(|| {
                err(
                    field(),
                    format!("expected an unsigned integer, found {}", v.describe()),
                )
            })?;
            if !a.is_power_of_two() || a > MAX_ALIGNMENT {
                return Err(err(
                    field(),
                    format!("alignment {a} is not a power of two in 1..={MAX_ALIGNMENT}"),
                ));
            }
            a
        }
    };

    // Tensor infos.
    let mut infos: Vec<RawInfo> = Vec::with_capacity(tensor_count as usize);
    let mut names: HashMap<String, u64> = HashMap::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = c
            .string(MAX_TENSOR_NAME_LEN)
            .map_err(|d| err(format!("tensor_infos[{i}] name"), d))?;
        let field = || format!("tensor_infos[{i}] {name:?}");
        if name.is_empty() {
            return Err(err(field(), "empty tensor name".into()));
        }
        if let Some(j) = names.get(&name) {
            return Err(err(
                field(),
                format!("duplicate tensor name (first at tensor_infos[{j}])"),
            ));
        }
        let n_dims = c.u32("n_dims").map_err(|d| err(field(), d))?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(err(
                field(),
                format!("n_dims {n_dims} is outside 1..={MAX_DIMS}"),
            ));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for j in 0..n_dims {
            let d = c.u64("dimension").map_err(|d| err(field(), d))?;
            if d == 0 || d > i64::MAX as u64 {
                return Err(err(
                    field(),
                    format!("dimension ne[{j}] = {d} is outside 1..=2^63-1"),
                ));
            }
            ne.push(d);
        }
        let ggml_type = c.u32("ggml type").map_err(|d| err(field(), d))?;
        let offset = c.u64("offset").map_err(|d| err(field(), d))?;
        names.insert(name.clone(), i);
        infos.push(RawInfo {
            name,
            ne,
            ggml_type,
            offset,
        });
    }

    let infos_end = c.pos as u64;
    let data_offset = infos_end.div_ceil(alignment) * alignment;
    if tensor_count > 0 && data_offset > len {
        return Err(err(
            "data section".into(),
            format!(
                "starts at {data_offset} (tensor infos end at {infos_end}, aligned to \
                 {alignment}), past the end of the file ({len} bytes)"
            ),
        ));
    }

    // Size and place every tensor.
    let mut tensors = Vec::new();
    let mut unsupported = Vec::new();
    let mut extents: Vec<(u64, u64, usize)> = Vec::with_capacity(infos.len());
    for (i, info) in infos.iter().enumerate() {
        let field = || format!("tensor_infos[{i}] {:?}", info.name);
        let (type_name, block, block_bytes) = ggml_type_info(info.ggml_type).ok_or_else(|| {
            err(
                field(),
                format!(
                    "unknown ggml type id {}: the tensor's size cannot be computed",
                    info.ggml_type
                ),
            )
        })?;
        let n_elements = info.ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let Some(n_elements) = n_elements else {
            return Err(err(
                field(),
                format!("element count of dims {:?} overflows", info.ne),
            ));
        };
        if info.ne[0] % block != 0 {
            return Err(err(
                field(),
                format!(
                    "row length ne[0] = {} is not a multiple of the {type_name} block size {block}",
                    info.ne[0]
                ),
            ));
        }
        let n_bytes = (n_elements / block)
            .checked_mul(block_bytes)
            .ok_or_else(|| {
                err(
                    field(),
                    format!("byte size of dims {:?} ({type_name}) overflows", info.ne),
                )
            })?;
        if info.offset % alignment != 0 {
            return Err(err(
                field(),
                format!(
                    "offset {} is not a multiple of the alignment {alignment}",
                    info.offset
                ),
            ));
        }
        let start = data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(err(
                field(),
                format!("offset {} + size {n_bytes} overflows", info.offset),
            ));
        };
        if end > len {
            return Err(err(
                field(),
                format!(
                    "data [{start}, {end}) ({n_bytes} bytes of {type_name}) extends past the end \
                     of the file ({len} bytes)"
                ),
            ));
        }
        let mut shape = Vec::with_capacity(info.ne.len());
        for &d in info.ne.iter().rev() {
            let d = usize::try_from(d)
                .map_err(|_| err(field(), format!("dimension {d} does not fit in usize")))?;
            shape.push(d);
        }
        extents.push((start, end, i));
        match DType::from_ggml_id(info.ggml_type) {
            Ok(dtype) => tensors.push(TensorInfo {
                name: info.name.clone(),
                dtype,
                shape,
                offset: start,
                n_bytes,
            }),
            Err(_) => unsupported.push(UnsupportedTensorInfo {
                name: info.name.clone(),
                ggml_type: info.ggml_type,
                type_name,
                shape,
                offset: start,
                n_bytes,
            }),
        }
    }

    // No two tensors may share bytes.
    extents.sort_unstable();
    for w in extents.windows(2) {
        let (s0, e0, i0) = w[0];
        let (s1, e1, i1) = w[1];
        if s1 < e0 {
            return Err(err(
                format!("tensor_infos[{i1}] {:?}", infos[i1].name),
                format!(
                    "data [{s1}, {e1}) overlaps tensor_infos[{i0}] {:?} at [{s0}, {e0})",
                    infos[i0].name
                ),
            ));
        }
    }

    Ok(Parsed {
        version,
        metadata,
        tensors,
        unsupported,
        alignment,
        data_offset,
    })
}

// ---------------------------------------------------------------------------------------------
// Writer

/// Byte positions inside a file built by [`GgufWriter`], for tests that patch fields.
#[derive(Clone, Debug, Default)]
pub struct GgufLayout {
    /// Start of each metadata entry (its key length), in the order written.
    pub metadata: Vec<usize>,
    /// Start of each tensor info (its name length).
    pub tensor_infos: Vec<usize>,
    /// Position of each tensor info's `n_dims` field.
    pub tensor_n_dims: Vec<usize>,
    /// Position of each tensor info's `offset` field.
    pub tensor_offset_fields: Vec<usize>,
    /// Absolute start of each tensor's data.
    pub tensor_data: Vec<usize>,
    /// Start of the data section.
    pub data_offset: usize,
}

struct WriterTensor {
    name: String,
    ggml_type: u32,
    /// Outermost first.
    shape: Vec<u64>,
    data: Vec<u8>,
}

/// Builds GGUF files: synthetic test inputs and random-weight models. Well-formed as long as
/// each tensor's `data` has the size its shape and type imply (not checked, so tests can also
/// build broken files) and arrays are homogeneous (checked).
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<WriterTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter::new()
    }
}

impl GgufWriter {
    /// Version 3, alignment 32, no metadata, no tensors.
    pub fn new() -> GgufWriter {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: vec![],
            tensors: vec![],
        }
    }

    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Data alignment; also written as `general.alignment` (U32) unless it is 32 or the key was
    /// added explicitly. Must be a power of two for the layout to be computed.
    pub fn alignment(&mut self, alignment: u64) -> &mut Self {
        self.alignment = alignment;
        self
    }

    /// Adds a key (duplicates are written as given).
    pub fn metadata(&mut self, key: impl Into<String>, value: MetaValue) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Adds a tensor; `shape` is outermost first, `data` its raw bytes.
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: &[usize],
        data: Vec<u8>,
    ) -> &mut Self {
        let shape = shape.iter().map(|&d| d as u64).collect();
        self.tensors.push(WriterTensor {
            name: name.into(),
            ggml_type: ggml_type_id(dtype),
            shape,
            data,
        });
        self
    }

    /// Adds a tensor with any ggml type id and any dims (outermost first).
    pub fn raw_tensor(
        &mut self,
        name: impl Into<String>,
        ggml_type: u32,
        shape: &[u64],
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors.push(WriterTensor {
            name: name.into(),
            ggml_type,
            shape: shape.to_vec(),
            data,
        });
        self
    }

    /// The file's bytes and where its fields are.
    pub fn to_bytes_with_layout(&self) -> Result<(Vec<u8>, GgufLayout)> {
        let bad = |d: String| ModelError::format("GGUF", "writer", d);
        if !self.alignment.is_power_of_two() {
            return Err(bad(format!(
                "alignment {} is not a power of two",
                self.alignment
            )));
        }
        let a = self.alignment as usize;
        let pad = |n: usize| n.div_ceil(a) * a;
        let mut metadata: Vec<(&str, &MetaValue)> =
            self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let align_value = MetaValue::U32(self.alignment as u32);
        if self.alignment != DEFAULT_ALIGNMENT
            && !self.metadata.iter().any(|(k, _)| k == "general.alignment")
        {
            metadata.push(("general.alignment", &align_value));
        }

        let mut out = Vec::new();
        let mut layout = GgufLayout::default();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            layout.metadata.push(out.len());
            write_string(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            write_value(&mut out, value).map_err(|d| bad(format!("key {key:?}: {d}")))?;
        }
        let mut offset = 0usize;
        let mut rel_offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            layout.tensor_infos.push(out.len());
            write_string(&mut out, &t.name);
            layout.tensor_n_dims.push(out.len());
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            layout.tensor_offset_fields.push(out.len());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            rel_offsets.push(offset);
            offset = pad(offset + t.data.len());
        }
        out.resize(pad(out.len()), 0);
        layout.data_offset = out.len();
        for (t, rel) in self.tensors.iter().zip(rel_offsets) {
            out.resize(layout.data_offset + rel, 0);
            layout.tensor_data.push(out.len());
            out.extend_from_slice(&t.data);
        }
        Ok((out, layout))
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(self.to_bytes_with_layout()?.0)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|error| ModelError::Io {
            path: path.display().to_string(),
            error,
        })
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &MetaValue) -> std::result::Result<(), String> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => write_string(out, s),
        MetaValue::Array(items) => {
            // An empty array's element type is not observable; write U8.
            let elem_ty = items.first().map_or(vt::U8, MetaValue::type_id);
            if let Some(j) = items.iter().position(|e| e.type_id() != elem_ty) {
                return Err(format!(
                    "array element {j} is {}, element 0 is {}: arrays must be homogeneous",
                    items[j].type_name(),
                    items[0].type_name()
                ));
            }
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for e in items {
                write_value(out, e)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ggml size table agrees with `DType` for every supported type, and `ggml_type_id`
    /// inverts `DType::from_ggml_id`.
    #[test]
    fn type_table_matches_dtype() {
        for id in 0..64u32 {
            if let Ok(dt) = DType::from_ggml_id(id) {
                let (name, bs, bb) = ggml_type_info(id).expect("supported type must be sized");
                assert_eq!(name, dt.name());
                assert_eq!(bs, dt.block_size() as u64, "{name}");
                assert_eq!(bb, dt.block_bytes() as u64, "{name}");
                assert_eq!(ggml_type_id(dt), id);
            }
        }
    }
}
