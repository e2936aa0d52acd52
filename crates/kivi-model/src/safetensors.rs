//! Hugging Face model directories: `config.json` plus `model.safetensors`, or
//! `model.safetensors.index.json` and the shards its `weight_map` names. Each shard is memory
//! mapped; tensors come out as [`RawTensor`]s borrowing the map.
//!
//! The files are treated as hostile, like GGUF (see `gguf.rs`): the header length is checked
//! against the file size before anything is read, the header is parsed in order so duplicate
//! names are caught, every tensor's `data_offsets` must hold exactly `shape × dtype` bytes and
//! lie inside the data section, tensors may neither overlap nor leave holes (the format
//! requires the data to be fully covered), names must be unique across shards, and the index
//! may only name plain file names that exist in the directory and agree with the shards'
//! contents. Errors are [`ModelError::Format`] with `format: "safetensors"` and a field naming
//! the file and what was being read.
//!
//! File layout: `header_len u64 LE | header JSON (header_len bytes) | data`, the header mapping
//! each tensor name to `{"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}`
//! (offsets relative to the data section) plus an optional `"__metadata__"` string map.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::gguf::map_file;
use crate::tensor::{DType, RawTensor, Storage, TensorSource};
use crate::{ModelError, Result};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Largest safetensors header accepted (the reference implementation's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// Largest `config.json` / index file read.
pub const MAX_JSON_LEN: u64 = 64 << 20;

/// One tensor of a shard.
#[derive(Clone, Debug)]
pub struct SafetensorsTensorInfo {
    pub name: String,
    /// `None` for dtypes this crate does not compute with (I8, F64, F8_E4M3, ...); asking for
    /// such a tensor gives [`ModelError::UnsupportedType`].
    pub dtype: Option<DType>,
    /// The dtype as written in the header (`"BF16"`).
    pub dtype_name: String,
    /// Outermost first (safetensors' own order).
    pub shape: Vec<usize>,
    /// Index into [`SafetensorsDir::shard_paths`].
    pub shard: usize,
    /// Absolute byte range in the shard file.
    pub range: Range<usize>,
}

struct Shard {
    path: PathBuf,
    mmap: Arc<Mmap>,
}

/// An opened Hugging Face model directory.
pub struct SafetensorsDir {
    /// `config.json`, as parsed (always a JSON object).
    pub config: serde_json::Value,
    /// Every tensor of every shard, sorted by name.
    pub tensors: Vec<SafetensorsTensorInfo>,
    dir: PathBuf,
    shards: Vec<Shard>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for SafetensorsDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsDir")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn format_err(field: impl Into<String>, detail: impl fmt::Display, path: &Path) -> ModelError {
    ModelError::format(
        "safetensors",
        field,
        format!("{detail} (in {})", path.display()),
    )
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |error| ModelError::Io {
        path: path.display().to_string(),
        error,
    }
}

impl SafetensorsDir {
    /// Opens `dir`: reads `config.json`, then `model.safetensors` if present, otherwise
    /// `model.safetensors.index.json` and its shards. Maps every shard and validates every
    /// header; no tensor data is read.
    pub fn open(dir: &Path) -> Result<SafetensorsDir> {
        let config_path = dir.join(CONFIG_FILE);
        let config: serde_json::Value = serde_json::from_slice(&read_json_file(&config_path)?)
            .map_err(|e| format_err(CONFIG_FILE, format!("invalid JSON: {e}"), &config_path))?;
        if !config.is_object() {
            return Err(format_err(
                CONFIG_FILE,
                "top level is not a JSON object",
                &config_path,
            ));
        }

        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        let (shard_names, weight_map) = if single.is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else if index_path.is_file() {
            let (names, map) = read_index(dir, &index_path)?;
            (names, Some(map))
        } else {
            return Err(format_err(
                "weights",
                format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
                dir,
            ));
        };

        let mut shards = Vec::with_capacity(shard_names.len());
        let mut tensors: Vec<SafetensorsTensorInfo> = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for (shard_idx, shard_name) in shard_names.iter().enumerate() {
            let path = dir.join(shard_name);
            let (mmap, infos) = open_shard(&path, shard_name, shard_idx)?;
            for info in infos {
                if let Some(&j) = by_name.get(&info.name) {
                    let other = &shard_names[tensors[j].shard];
                    return Err(format_err(
                        format!("{shard_name} tensor {:?}", info.name),
                        format!("duplicate tensor name: also in {other}"),
                        dir,
                    ));
                }
                if let Some(map) = &weight_map {
                    match map.get(&info.name) {
                        Some(s) if s == shard_name => {}
                        Some(s) => {
                            return Err(format_err(
                                format!("{INDEX_FILE} weight_map[{:?}]", info.name),
                                format!("names shard {s}, but the tensor is in {shard_name}"),
                                dir,
                            ))
                        }
                        None => {
                            return Err(format_err(
                                format!("{shard_name} tensor {:?}", info.name),
                                format!("not listed in {INDEX_FILE}'s weight_map"),
                                dir,
                            ))
                        }
                    }
                }
                by_name.insert(info.name.clone(), tensors.len());
                tensors.push(info);
            }
            shards.push(Shard {
                path,
                mmap: Arc::new(mmap),
            });
        }
        if let Some(map) = &weight_map {
            // Every listed tensor must have been found in its shard.
            let mut missing: Vec<(&String, &String)> = map
                .iter()
                .filter(|(name, _)| !by_name.contains_key(*name))
                .collect();
            missing.sort();
            if let Some((name, shard)) = missing.first() {
                return Err(format_err(
                    format!("{INDEX_FILE} weight_map[{name:?}]"),
                    format!(
                        "names shard {shard}, which has no such tensor ({} listed tensors missing)",
                        missing.len()
                    ),
                    dir,
                ));
            }
        }

        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafetensorsDir {
            config,
            tensors,
            dir: dir.to_path_buf(),
            shards,
            by_name,
        })
    }

    /// `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shard files, in the order [`SafetensorsTensorInfo::shard`] indexes.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    pub fn tensor_info(&self, name: &str) -> Option<&SafetensorsTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
}

impl TensorSource for SafetensorsDir {
    fn tensor(&self, name: &str) -> Result<RawTensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        let shard = &self.shards[info.shard];
        let dtype = info.dtype.ok_or_else(|| {
            ModelError::UnsupportedType(format!(
                "{} of tensor `{name}` in {}",
                info.dtype_name,
                shard.path.display()
            ))
        })?;
        Ok(RawTensor {
            name: info.name.clone(),
            dtype,
            shape: info.shape.clone(),
            data: Storage::Mapped(shard.mmap.clone(), info.range.clone()),
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}

/// Reads a whole JSON file of at most [`MAX_JSON_LEN`] bytes.
fn read_json_file(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    if len > MAX_JSON_LEN {
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        return Err(format_err(
            name,
            format!("{len} bytes exceeds the limit of {MAX_JSON_LEN} for a JSON file"),
            path,
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(MAX_JSON_LEN)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    Ok(buf)
}

/// A JSON object's entries in file order, duplicates kept (serde_json's maps would silently keep
/// only the last).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Entries, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = m.next_entry::<String, serde_json::Value>()? {
                    v.push(entry);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads the index: returns the distinct shard file names (sorted) and the weight map.
fn read_index(dir: &Path, path: &Path) -> Result<(Vec<String>, HashMap<String, String>)> {
    #[derive(Deserialize)]
    struct IndexFile {
        weight_map: Entries,
    }
    let index: IndexFile = serde_json::from_slice(&read_json_file(path)?)
        .map_err(|e| format_err(INDEX_FILE, format!("invalid index JSON: {e}"), path))?;
    if index.weight_map.0.is_empty() {
        return Err(format_err(
            format!("{INDEX_FILE} weight_map"),
            "weight_map is empty",
            path,
        ));
    }
    let mut map = HashMap::with_capacity(index.weight_map.0.len());
    let mut shards: Vec<String> = Vec::new();
    for (name, value) in index.weight_map.0 {
        let field = || format!("{INDEX_FILE} weight_map[{name:?}]");
        let Some(shard) = value.as_str() else {
            return Err(format_err(
                field(),
                format!("expected a file name, found {value}"),
                path,
            ));
        };
        if !is_plain_file_name(shard) {
            return Err(format_err(
                field(),
                format!("shard {shard:?} is not a plain file name inside the model directory"),
                path,
            ));
        }
        if !dir.join(shard).is_file() {
            return Err(format_err(
                field(),
                format!("shard {shard:?} does not exist in {}", dir.display()),
                path,
            ));
        }
        if !shards.iter().any(|s| s == shard) {
            shards.push(shard.to_string());
        }
        if map.insert(name.clone(), shard.to_string()).is_some() {
            return Err(format_err(
                field(),
                "tensor listed twice in weight_map",
                path,
            ));
        }
    }
    shards.sort();
    Ok((shards, map))
}

/// A single normal path component: no separators, not `.`/`..`, not absolute, no NUL.
fn is_plain_file_name(s: &str) -> bool {
    let mut comps = Path::new(s).components();
    matches!(
        (comps.next(), comps.next()),
        (Some(std::path::Component::Normal(c)), None) if c == s
    ) && !s.contains(['/', '\\', '\0'])
}

/// Bits per element of every safetensors dtype.
fn dtype_bits(name: &str) -> Option<u64> {
    Some(match name {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
        | "F8_E5M2FNUZ" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

fn dtype_of(name: &str) -> Option<DType> {
    match name {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        _ => None,
    }
}

/// Maps and validates one shard file.
fn open_shard(
    path: &Path,
    file_name: &str,
    shard_idx: usize,
) -> Result<(Mmap, Vec<SafetensorsTensorInfo>)> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let hfield = format!("{file_name} header length");
    if len < 8 {
        return Err(format_err(
            hfield,
            format!("file is {len} bytes, too short for the 8-byte header length"),
            path,
        ));
    }
    let mmap = map_file(&file, path)?;
    let buf: &[u8] = &mmap;
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&buf[..8]);
    let header_len = u64::from_le_bytes(n8);
    let after = len - 8;
    if header_len > after {
        return Err(format_err(
            hfield,
            format!("header length {header_len} exceeds the {after} bytes after it in the file"),
            path,
        ));
    }
    if header_len > MAX_HEADER_LEN {
        return Err(format_err(
            hfield,
            format!("header length {header_len} exceeds the limit of {MAX_HEADER_LEN}"),
            path,
        ));
    }
    let data_start = 8 + header_len as usize;
    let data_len = (len - 8 - header_len) as usize;
    let field = format!("{file_name} header");
    let header = std::str::from_utf8(&buf[8..data_start])
        .map_err(|e| format_err(&*field, format!("not valid UTF-8: {e}"), path))?;
    let entries: Entries = serde_json::from_str(header)
        .map_err(|e| format_err(&*field, format!("invalid JSON: {e}"), path))?;

    let mut infos: Vec<SafetensorsTensorInfo> = Vec::with_capacity(entries.0.len());
    let mut seen: HashMap<String, ()> = HashMap::with_capacity(entries.0.len());
    let mut extents: Vec<(usize, usize, usize)> = Vec::with_capacity(entries.0.len());
    let mut saw_metadata = false;
    for (name, value) in entries.0 {
        if name == "__metadata__" {
            if saw_metadata {
                return Err(format_err(&*field, "duplicate __metadata__", path));
            }
            saw_metadata = true;
            let ok = value
                .as_object()
                .is_some_and(|m| m.values().all(|v| v.is_string()));
            if !ok {
                return Err(format_err(
                    format!("{field} __metadata__"),
                    "expected an object of strings",
                    path,
                ));
            }
            continue;
        }
        let tfield = format!("{file_name} tensor {name:?}");
        if seen.insert(name.clone(), ()).is_some() {
            return Err(format_err(
                tfield,
                "duplicate tensor name in the header",
                path,
            ));
        }
        let bad = |d: String| format_err(tfield.clone(), d, path);
        let obj = value
            .as_object()
            .ok_or_else(|| bad(format!("expected an object, found {value}")))?;
        let dtype_name = obj
            .get("dtype")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("missing or non-string \"dtype\"".into()))?;
        let bits =
            dtype_bits(dtype_name).ok_or_else(|| bad(format!("unknown dtype {dtype_name:?}")))?;
        let shape_v = obj
            .get("shape")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("missing or non-array \"shape\"".into()))?;
        let mut shape = Vec::with_capacity(shape_v.len().min(64));
        for (j, d) in shape_v.iter().enumerate() {
            let d = d
                .as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| bad(format!("shape[{j}] = {d} is not a non-negative integer")))?;
            shape.push(d);
        }
        let offs = obj
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("missing \"data_offsets\" or not a [begin, end] pair".into()))?;
        let (Some(begin), Some(end)) = (offs[0].as_u64(), offs[1].as_u64()) else {
            return Err(bad(format!(
                "data_offsets {} are not non-negative integers",
                value["data_offsets"]
            )));
        };
        let n_bytes = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(bits))
            .filter(|b| b % 8 == 0)
            .map(|b| b / 8)
            .ok_or_else(|| {
                bad(format!(
                    "shape {shape:?} of {dtype_name} overflows or is not a whole number of bytes"
                ))
            })?;
        if begin > end {
            return Err(bad(format!("data_offsets [{begin}, {end}] are reversed")));
        }
        if end > data_len as u64 {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] extend past the {data_len}-byte data section"
            )));
        }
        if end - begin != n_bytes {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] hold {} bytes, but shape {shape:?} of {dtype_name} needs {n_bytes}",
                end - begin
            )));
        }
        let (begin, end) = (begin as usize, end as usize);
        extents.push((begin, end, infos.len()));
        infos.push(SafetensorsTensorInfo {
            name,
            dtype: dtype_of(dtype_name),
            dtype_name: dtype_name.to_string(),
            shape,
            shard: shard_idx,
            range: data_start + begin..data_start + end,
        });
    }

    // The data must be covered exactly: no overlaps, no holes, nothing after the last tensor.
    extents.sort_unstable();
    let mut covered = 0usize;
    let mut prev: Option<usize> = None;
    for &(begin, end, i) in &extents {
        let name = &infos[i].name;
        if begin < covered {
            let other = prev.map_or(String::new(), |p| format!(" {:?}", infos[p].name));
            return Err(format_err(
                format!("{file_name} tensor {name:?}"),
                format!("data_offsets [{begin}, {end}] overlap tensor{other} (ends at {covered})"),
                path,
            ));
        }
        if begin > covered {
            return Err(format_err(
                format!("{file_name} tensor {name:?}"),
                format!("data_offsets [{begin}, {end}] leave bytes [{covered}, {begin}) of the data unused"),
                path,
            ));
        }
        covered = end;
        prev = Some(i);
    }
    if covered != data_len {
        return Err(format_err(
            format!("{file_name} header"),
            format!("the last tensor ends at {covered}, but the data section has {data_len} bytes"),
            path,
        ));
    }
    Ok((mmap, infos))
}
