//! Safetensors directory loader: random tensors written with the reference `safetensors` crate
//! (single file and sharded with an index) read back exactly; then hostile headers, indexes and
//! truncations that must give errors naming the file and field.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use kivi_model::safetensors::SafetensorsDir;
use kivi_model::tensor::{DType, TensorSource};
use kivi_model::ModelError;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("st-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const CONFIG: &str =
    r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2}"#;

#[derive(Clone)]
struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn random_tensors(rng: &mut impl Rng, prefix: &str, n: usize) -> Vec<T> {
    let dtypes = [(Dtype::F32, 4), (Dtype::F16, 2), (Dtype::BF16, 2)];
    (0..n)
        .map(|i| {
            let (dtype, size) = dtypes[rng.gen_range(0..dtypes.len())];
            let shape: Vec<usize> = match rng.gen_range(0..3) {
                0 => vec![rng.gen_range(1..40)],
                1 => vec![rng.gen_range(1..12), rng.gen_range(1..12)],
                _ => vec![2, rng.gen_range(1..5), rng.gen_range(1..7)],
            };
            let n: usize = shape.iter().product();
            let data = (0..n * size).map(|_| rng.gen()).collect();
            T {
                name: format!("{prefix}.{i}.weight"),
                dtype,
                shape,
                data,
            }
        })
        .collect()
}

fn write_st(path: &Path, tensors: &[T]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn check_all(st: &SafetensorsDir, tensors: &[T]) {
    for t in tensors {
        assert!(st.contains(&t.name));
        let r = st.tensor(&t.name).unwrap();
        let want = match t.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            _ => unreachable!(),
        };
        assert_eq!(r.name, t.name);
        assert_eq!(r.dtype, want);
        assert_eq!(r.shape, t.shape);
        assert_eq!(r.data.bytes(), &t.data[..], "{}", t.name);
    }
}

/// A file with a hand-written header.
fn raw_st(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

/// A directory with config.json and `model.safetensors` = `bytes`.
fn dir_with(bytes: &[u8]) -> PathBuf {
    let d = temp_dir("hostile");
    std::fs::write(d.join("config.json"), CONFIG).unwrap();
    std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    d
}

#[track_caller]
fn expect_err(dir: &Path, field: &str, detail: &str) -> String {
    match SafetensorsDir::open(dir) {
        Ok(_) => panic!("expected an error with field {field:?}, opened fine"),
        Err(e) => {
            let msg = e.to_string();
            match &e {
                ModelError::Format {
                    format,
                    field: f,
                    detail: d,
                } => {
                    assert_eq!(*format, "safetensors");
                    assert!(f.contains(field), "field {f:?} lacks {field:?} ({msg})");
                    assert!(d.contains(detail), "detail {d:?} lacks {detail:?} ({msg})");
                }
                other => panic!("expected Format error, got {other:?}"),
            }
            println!("{msg}");
            msg
        }
    }
}

#[test]
fn single_file_round_trip() {
    let seed = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let d = temp_dir("single");
    std::fs::write(d.join("config.json"), CONFIG).unwrap();
    let tensors = random_tensors(&mut rng, "model.layers", 12);
    // Plus one unsupported dtype and one scalar.
    let mut all = tensors;
    let i8_data: Vec<u8> = (0..6).map(|_| rng.gen()).collect();
    let extra = [T {
        name: "int8".into(),
        dtype: Dtype::I8,
        shape: vec![2, 3],
        data: i8_data,
    }];
    all.push(T {
        name: "scalar".into(),
        dtype: Dtype::F32,
        shape: vec![],
        data: vec![0, 0, 128, 63],
    });
    write_st(
        &d.join("model.safetensors"),
        &[&all[..], &extra[..]].concat(),
    );

    let st = SafetensorsDir::open(&d).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    assert_eq!(st.config()["hidden_size"], 64);
    assert_eq!(st.config()["architectures"][0], "LlamaForCausalLM");
    assert_eq!(
        st.shard_paths(),
        vec![d.join("model.safetensors").as_path()]
    );
    assert_eq!(st.tensors.len(), all.len() + 1);
    assert!(st.tensors.windows(2).all(|w| w[0].name < w[1].name));
    check_all(&st, &all);
    let scalar = st.tensor("scalar").unwrap();
    assert_eq!((scalar.shape.len(), scalar.n_elements()), (0, 1));

    let info = st.tensor_info("int8").unwrap();
    assert_eq!(
        (info.dtype, info.dtype_name.as_str(), info.shape.clone()),
        (None, "I8", vec![2, 3])
    );
    let e = st.tensor("int8").unwrap_err();
    assert!(
        matches!(&e, ModelError::UnsupportedType(m) if m.contains("I8") && m.contains("int8")),
        "{e}"
    );
    assert!(matches!(st.tensor("nope"), Err(ModelError::MissingTensor(n)) if n == "nope"));
    assert!(!st.contains("nope"));

    // Tensors keep their map alive after the directory is dropped.
    let t = st.tensor(&all[0].name).unwrap();
    drop(st);
    assert_eq!(t.data.bytes(), &all[0].data[..]);
}

fn write_sharded(d: &Path, shards: &[Vec<T>]) -> serde_json::Value {
    let n = shards.len();
    let mut map = serde_json::Map::new();
    for (i, ts) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        write_st(&d.join(&file), ts);
        for t in ts {
            map.insert(t.name.clone(), file.clone().into());
        }
    }
    serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map})
}

#[test]
fn sharded_round_trip() {
    let seed = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let d = temp_dir("sharded");
    std::fs::write(d.join("config.json"), CONFIG).unwrap();
    let shards: Vec<Vec<T>> = (0..3)
        .map(|i| random_tensors(&mut rng, &format!("s{i}"), 5))
        .collect();
    let index = write_sharded(&d, &shards);
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let st = SafetensorsDir::open(&d).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    assert_eq!(st.shard_paths().len(), 3);
    assert_eq!(st.tensors.len(), 15);
    for (i, ts) in shards.iter().enumerate() {
        check_all(&st, ts);
        for t in ts {
            let info = st.tensor_info(&t.name).unwrap();
            assert!(st.shard_paths()[info.shard]
                .ends_with(format!("model-{:05}-of-00003.safetensors", i + 1)));
        }
    }

    // A single model.safetensors wins over the index (as in transformers).
    let single = random_tensors(&mut rng, "single", 2);
    write_st(&d.join("model.safetensors"), &single);
    let st = SafetensorsDir::open(&d).unwrap();
    assert_eq!(st.tensors.len(), 2);
    check_all(&st, &single);
}

#[test]
fn hostile_headers() {
    let ok = raw_st(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    SafetensorsDir::open(&dir_with(&ok)).unwrap();

    let mut b = ok.clone();
    b[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    expect_err(
        &dir_with(&b),
        "model.safetensors header length",
        "header length 1152921504606846976 exceeds the",
    );
    let mut b = ok.clone();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(&dir_with(&b), "header length", "exceeds the");
    expect_err(
        &dir_with(&[1, 2, 3]),
        "header length",
        "file is 3 bytes, too short",
    );
    expect_err(&dir_with(&[]), "header length", "file is 0 bytes");

    // Header over the size limit (sparse file, so nothing big is written).
    let d = dir_with(&[]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("model.safetensors"))
        .unwrap();
    f.set_len(200_000_000).unwrap();
    drop(f);
    let mut head = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("model.safetensors"))
        .unwrap();
    std::io::Write::write_all(&mut head, &100_000_001u64.to_le_bytes()).unwrap();
    drop(head);
    expect_err(&d, "header length", "exceeds the limit of 100000000");

    let cases: &[(&str, &[u8], &str, &str)] = &[
        ("{", &[], "model.safetensors header", "invalid JSON"),
        ("[1,2]", &[], "model.safetensors header", "invalid JSON"),
        ("\u{7f}\u{7f}", &[], "header", "invalid JSON"),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            &[0; 16],
            "tensor \"a\"",
            "duplicate tensor name",
        ),
        (
            r#"{"a":{"dtype":"F12","shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 8],
            "tensor \"a\"",
            "unknown dtype \"F12\"",
        ),
        (
            r#"{"a":{"shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 8],
            "tensor \"a\"",
            "missing or non-string \"dtype\"",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
            &[0; 8],
            "tensor \"a\"",
            "shape[0] = -2 is not a non-negative integer",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}"#,
            &[0; 8],
            "tensor \"a\"",
            "shape[0] = 2.5",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,8]}}"#,
            &[0; 8],
            "tensor \"a\"",
            "overflows",
        ),
        (
            r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
            &[0; 2],
            "tensor \"a\"",
            "not a whole number of bytes",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#,
            &[0; 8],
            "tensor \"a\"",
            "not a [begin, end] pair",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,-8]}}"#,
            &[0; 8],
            "tensor \"a\"",
            "are not non-negative integers",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            &[0; 8],
            "tensor \"a\"",
            "are reversed",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,1000]}}"#,
            &[0; 8],
            "tensor \"a\"",
            "data_offsets [0, 1000] extend past the 8-byte data section",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551608,18446744073709551615]}}"#,
            &[0; 8],
            "tensor \"a\"",
            "extend past",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
            "tensor \"a\"",
            "hold 8 bytes, but shape [3] of F32 needs 12",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            &[0; 12],
            "tensor \"b\"",
            "overlap tensor \"a\"",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            &[0; 12],
            "tensor \"b\"",
            "leave bytes [4, 8) of the data unused",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 12],
            "model.safetensors header",
            "the last tensor ends at 4, but the data section has 12 bytes",
        ),
        (
            r#"{"__metadata__":{"x":1},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 4],
            "__metadata__",
            "expected an object of strings",
        ),
        (r#"{"a":[1,2]}"#, &[], "tensor \"a\"", "expected an object"),
    ];
    for (header, data, field, detail) in cases {
        expect_err(&dir_with(&raw_st(header, data)), field, detail);
    }
    // Invalid UTF-8 in the header.
    let mut b = raw_st(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    b[10] = 0xff;
    expect_err(&dir_with(&b), "model.safetensors header", "not valid UTF-8");
    // __metadata__ and an empty file are fine.
    let b = raw_st(r#"{"__metadata__":{"format":"pt"}}"#, &[]);
    assert_eq!(
        SafetensorsDir::open(&dir_with(&b)).unwrap().tensors.len(),
        0
    );
}

#[test]
fn truncated_shard_at_every_byte() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let d = temp_dir("trunc");
    std::fs::write(d.join("config.json"), CONFIG).unwrap();
    write_st(
        &d.join("model.safetensors"),
        &random_tensors(&mut rng, "t", 4),
    );
    let full = std::fs::read(d.join("model.safetensors")).unwrap();
    SafetensorsDir::open(&d).unwrap();
    for len in 0..full.len() {
        std::fs::write(d.join("model.safetensors"), &full[..len]).unwrap();
        match SafetensorsDir::open(&d) {
            Ok(_) => panic!("truncated to {len} of {} bytes opened", full.len()),
            Err(ModelError::Format { .. }) => {}
            Err(e) => panic!("truncated to {len}: {e:?}"),
        }
    }
}

#[test]
fn hostile_directories() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let setup = |tag: &str| {
        let d = temp_dir(tag);
        std::fs::write(d.join("config.json"), CONFIG).unwrap();
        d
    };
    let a = random_tensors(&mut rng, "a", 2);
    let b = random_tensors(&mut rng, "b", 2);
    let index = |pairs: &[(&str, &str)]| {
        let map: serde_json::Map<String, serde_json::Value> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        serde_json::json!({ "weight_map": map }).to_string()
    };
    let both = |d: &Path| {
        write_st(&d.join("s1.safetensors"), &a);
        write_st(&d.join("s2.safetensors"), &b);
    };

    // Missing config, no weights, config not an object.
    let d = temp_dir("noconfig");
    match SafetensorsDir::open(&d) {
        Err(ModelError::Io { path, .. }) => assert!(path.ends_with("config.json")),
        other => panic!("{other:?}"),
    }
    let d = setup("noweights");
    expect_err(
        &d,
        "weights",
        "neither model.safetensors nor model.safetensors.index.json found",
    );
    std::fs::write(d.join("config.json"), "[1]").unwrap();
    std::fs::write(d.join("model.safetensors"), raw_st("{}", &[])).unwrap();
    expect_err(&d, "config.json", "top level is not a JSON object");
    std::fs::write(d.join("config.json"), "{,}").unwrap();
    expect_err(&d, "config.json", "invalid JSON");

    // Index naming a missing shard.
    let d = setup("missing");
    write_st(&d.join("s1.safetensors"), &a);
    let idx = index(&[
        (&a[0].name, "s1.safetensors"),
        (&a[1].name, "s1.safetensors"),
        ("b.0.weight", "s2.safetensors"),
    ]);
    std::fs::write(d.join("model.safetensors.index.json"), idx).unwrap();
    expect_err(
        &d,
        "weight_map[\"b.0.weight\"]",
        "shard \"s2.safetensors\" does not exist",
    );

    // Path traversal and other non-plain names.
    for evil in [
        "../s1.safetensors",
        "/etc/passwd",
        "sub/s1.safetensors",
        "..",
        ".",
        "",
    ] {
        let d = setup("evil");
        write_st(&d.join("s1.safetensors"), &a);
        let idx = index(&[(&a[0].name, evil), (&a[1].name, "s1.safetensors")]);
        std::fs::write(d.join("model.safetensors.index.json"), idx).unwrap();
        expect_err(
            &d,
            &format!("weight_map[{:?}]", a[0].name),
            "is not a plain file name",
        );
    }

    // Same tensor in two shards.
    let d = setup("dup");
    write_st(&d.join("s1.safetensors"), &a);
    write_st(&d.join("s2.safetensors"), &[&a[..1], &b[..]].concat());
    let mut pairs: Vec<(&str, &str)> = a
        .iter()
        .map(|t| (t.name.as_str(), "s1.safetensors"))
        .collect();
    pairs.extend(b.iter().map(|t| (t.name.as_str(), "s2.safetensors")));
    std::fs::write(d.join("model.safetensors.index.json"), index(&pairs)).unwrap();
    expect_err(
        &d,
        &format!("s2.safetensors tensor {:?}", a[0].name),
        "duplicate tensor name: also in s1.safetensors",
    );

    // weight_map disagrees with the shards.
    let d = setup("wrongshard");
    both(&d);
    let idx = index(&[
        (&a[0].name, "s2.safetensors"),
        (&a[1].name, "s1.safetensors"),
        (&b[0].name, "s2.safetensors"),
        (&b[1].name, "s2.safetensors"),
    ]);
    std::fs::write(d.join("model.safetensors.index.json"), idx).unwrap();
    expect_err(
        &d,
        &format!("weight_map[{:?}]", a[0].name),
        "names shard s2.safetensors, but the tensor is in s1.safetensors",
    );

    let d = setup("unlisted");
    both(&d);
    let idx = index(&[
        (&a[0].name, "s1.safetensors"),
        (&b[0].name, "s2.safetensors"),
        (&b[1].name, "s2.safetensors"),
    ]);
    std::fs::write(d.join("model.safetensors.index.json"), idx).unwrap();
    expect_err(
        &d,
        &format!("s1.safetensors tensor {:?}", a[1].name),
        "not listed in model.safetensors.index.json's weight_map",
    );

    let d = setup("ghost");
    both(&d);
    let mut pairs: Vec<(&str, &str)> = a
        .iter()
        .map(|t| (t.name.as_str(), "s1.safetensors"))
        .collect();
    pairs.extend(b.iter().map(|t| (t.name.as_str(), "s2.safetensors")));
    pairs.push(("ghost.weight", "s2.safetensors"));
    std::fs::write(d.join("model.safetensors.index.json"), index(&pairs)).unwrap();
    expect_err(
        &d,
        "weight_map[\"ghost.weight\"]",
        "names shard s2.safetensors, which has no such tensor",
    );

    // Malformed indexes.
    let d = setup("badindex");
    both(&d);
    let p = d.join("model.safetensors.index.json");
    std::fs::write(&p, r#"{"metadata": {}}"#).unwrap();
    expect_err(
        &d,
        "model.safetensors.index.json",
        "missing field `weight_map`",
    );
    std::fs::write(&p, r#"{"weight_map": {}}"#).unwrap();
    expect_err(&d, "weight_map", "weight_map is empty");
    std::fs::write(&p, r#"{"weight_map": {"x": 3}}"#).unwrap();
    expect_err(&d, "weight_map[\"x\"]", "expected a file name, found 3");
    let dup = format!(
        r#"{{"weight_map": {{"{0}": "s1.safetensors", "{0}": "s1.safetensors"}}}}"#,
        a[0].name
    );
    std::fs::write(&p, dup).unwrap();
    expect_err(
        &d,
        &format!("weight_map[{:?}]", a[0].name),
        "tensor listed twice in weight_map",
    );
    std::fs::write(&p, "not json").unwrap();
    expect_err(&d, "model.safetensors.index.json", "invalid index JSON");
}
