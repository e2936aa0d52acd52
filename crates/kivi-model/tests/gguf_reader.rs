//! GGUF reader on synthetic files: round trips of every metadata and tensor type, then hostile
//! inputs (truncation at every byte, absurd counts and lengths, bad dims, offsets and types,
//! duplicates) that must give a `Format` error naming the field, and a proptest that mutates
//! random bytes and only asks that nothing panics.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use kivi_model::gguf::{Gguf, GgufLayout, GgufWriter, MetaValue, MAX_META_VALUES};
use kivi_model::tensor::{DType, TensorSource};
use kivi_model::ModelError;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

/// A fresh file path under cargo's per-test-target temp dir.
fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    dir.join(format!("gguf-{tag}-{}-{n}.gguf", std::process::id()))
}

fn open_bytes(bytes: &[u8]) -> kivi_model::Result<Gguf> {
    let p = temp_path("t");
    std::fs::write(&p, bytes).unwrap();
    let r = Gguf::open(&p);
    let _ = std::fs::remove_file(&p);
    r
}

/// Asserts `open` fails with a GGUF `Format` error whose field contains `field` and whose detail
/// contains `detail`; returns the full message.
#[track_caller]
fn expect_format_err(bytes: &[u8], field: &str, detail: &str) -> String {
    match open_bytes(bytes) {
        Ok(_) => panic!("expected an error with field {field:?}, file opened fine"),
        Err(e) => {
            let msg = e.to_string();
            match &e {
                ModelError::Format {
                    format,
                    field: f,
                    detail: d,
                } => {
                    assert_eq!(*format, "GGUF");
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

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn random_bytes(rng: &mut impl Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.gen()).collect()
}

/// One value of every scalar type, random.
fn scalar_values(rng: &mut impl Rng) -> Vec<(&'static str, MetaValue)> {
    vec![
        ("u8", MetaValue::U8(rng.gen())),
        ("i8", MetaValue::I8(rng.gen())),
        ("u16", MetaValue::U16(rng.gen())),
        ("i16", MetaValue::I16(rng.gen())),
        ("u32", MetaValue::U32(rng.gen())),
        ("i32", MetaValue::I32(rng.gen())),
        ("u64", MetaValue::U64(rng.gen())),
        ("i64", MetaValue::I64(rng.gen())),
        ("f32", MetaValue::F32(rng.gen_range(-1e6f32..1e6))),
        ("f64", MetaValue::F64(rng.gen_range(-1e300f64..1e300))),
        ("bool", MetaValue::Bool(rng.gen())),
        (
            "string",
            MetaValue::String(format!("héllo ✓ {}", rng.gen::<u32>())),
        ),
        ("empty_string", MetaValue::String(String::new())),
    ]
}

/// Metadata covering every type, arrays of every type, nested arrays up to the depth limit.
fn all_metadata(rng: &mut impl Rng) -> Vec<(String, MetaValue)> {
    let mut md: Vec<(String, MetaValue)> = vec![
        (
            "general.architecture".into(),
            MetaValue::String("llama".into()),
        ),
        ("llama.block_count".into(), MetaValue::U32(30)),
    ];
    for (name, v) in scalar_values(rng) {
        md.push((format!("test.scalar.{name}"), v.clone()));
        let n = rng.gen_range(1..20);
        let arr = (0..n).map(|_| {
            scalar_values(rng)
                .into_iter()
                .find(|(k, _)| *k == name)
                .unwrap()
                .1
        });
        md.push((
            format!("test.array.{name}"),
            MetaValue::Array(arr.collect()),
        ));
    }
    md.push(("test.array.empty".into(), MetaValue::Array(vec![])));
    let leaf = MetaValue::Array(vec![MetaValue::I32(rng.gen()); 3]);
    let leaf2 = MetaValue::Array(vec![
        MetaValue::String("x".into()),
        MetaValue::String("y".into()),
    ]);
    let nested2 = MetaValue::Array(vec![leaf.clone(), leaf, leaf2, MetaValue::Array(vec![])]);
    let nested3 = MetaValue::Array(vec![nested2.clone(), nested2.clone()]);
    let nested4 = MetaValue::Array(vec![nested3.clone()]);
    md.push(("test.nested.2".into(), nested2));
    md.push(("test.nested.3".into(), nested3));
    md.push(("test.nested.4".into(), nested4));
    md
}

/// Supported types and one unsupported-but-sized one, with shapes that are whole blocks.
fn tensor_specs() -> Vec<(&'static str, u32, Vec<u64>)> {
    // (name, ggml id, shape outermost-first)
    vec![
        ("f32.vec", 0, vec![7]),
        ("f32.mat", 0, vec![3, 5]),
        ("f16.mat", 1, vec![4, 6]),
        ("bf16.4d", 30, vec![2, 3, 2, 5]),
        ("q4_0", 2, vec![3, 64]),
        ("q4_1", 3, vec![2, 32]),
        ("q5_0", 6, vec![1, 96]),
        ("q8_0", 8, vec![5, 32]),
        ("q4_k", 12, vec![2, 256]),
        ("q6_k", 14, vec![1, 512]),
        ("q5_k.unsupported", 13, vec![2, 256]),
    ]
}

fn type_bytes(id: u32, n: u64) -> usize {
    let (bs, bb) = match id {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        8 => (32, 34),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        _ => unreachable!(),
    };
    (n / bs * bb) as usize
}

struct Built {
    bytes: Vec<u8>,
    layout: GgufLayout,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, u32, Vec<u64>, Vec<u8>)>,
}

fn build(seed: u64, version: u32, alignment: u64) -> Built {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let metadata = all_metadata(&mut rng);
    let mut w = GgufWriter::new();
    w.version(version).alignment(alignment);
    for (k, v) in &metadata {
        w.metadata(k.clone(), v.clone());
    }
    let mut tensors = vec![];
    for (name, id, shape) in tensor_specs() {
        let n: u64 = shape.iter().product();
        let data = random_bytes(&mut rng, type_bytes(id, n));
        w.raw_tensor(name, id, &shape, data.clone());
        tensors.push((name.to_string(), id, shape, data));
    }
    let (bytes, layout) = w.to_bytes_with_layout().unwrap();
    Built {
        bytes,
        layout,
        metadata,
        tensors,
    }
}

/// A small valid file (header, a few keys, three tensors) for the hostile tests.
fn small() -> (Vec<u8>, GgufLayout) {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", MetaValue::String("llama".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            MetaValue::Array(vec![MetaValue::String("a".into()); 4]),
        )
        .metadata("flag", MetaValue::Bool(true))
        .tensor("a", DType::F32, &[2, 4], vec![1; 32])
        .tensor("b", DType::Q8_0, &[2, 32], vec![2; 68])
        .tensor("c", DType::F16, &[3], vec![3; 6]);
    w.to_bytes_with_layout().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn round_trip_every_type() {
    for (seed, version, alignment) in [(1, 3, 32), (2, 2, 32), (3, 3, 64), (4, 3, 1), (5, 2, 4096)]
    {
        let seed = seed + rand::random::<u32>() as u64 * 16;
        let b = build(seed, version, alignment);
        let g = open_bytes(&b.bytes).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(g.version, version);
        assert_eq!(g.alignment(), alignment);
        assert_eq!(g.data_offset() as usize, b.layout.data_offset);
        assert_eq!(g.data_offset() % alignment, 0);
        let extra = usize::from(alignment != 32);
        assert_eq!(g.metadata.len(), b.metadata.len() + extra);
        for (k, v) in &b.metadata {
            assert_eq!(g.get(k), Some(v), "seed {seed} key {k}");
        }
        if alignment != 32 {
            assert_eq!(g.get_u64("general.alignment").unwrap(), alignment);
        }
        assert_eq!(g.architecture().unwrap(), "llama");

        assert_eq!(g.tensors.len() + g.unsupported.len(), b.tensors.len());
        for (i, (name, id, shape, data)) in b.tensors.iter().enumerate() {
            assert!(g.contains(name));
            let want_shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            if *id == 13 {
                let u = g.unsupported.iter().find(|u| &u.name == name).unwrap();
                assert_eq!((u.ggml_type, u.type_name), (13, "Q5_K"));
                assert_eq!(u.shape, want_shape);
                assert_eq!(u.n_bytes as usize, data.len());
                let e = g.tensor(name).unwrap_err();
                assert!(matches!(e, ModelError::UnsupportedType(_)), "{e:?}");
                let msg = e.to_string();
                assert!(msg.contains("Q5_K") && msg.contains(name), "{msg}");
                continue;
            }
            let t = g.tensor(name).unwrap();
            assert_eq!(t.name, *name);
            assert_eq!(t.dtype, DType::from_ggml_id(*id).unwrap());
            assert_eq!(t.shape, want_shape);
            assert_eq!(t.data.bytes(), &data[..], "tensor {name}");
            let info = g.tensor_info(name).unwrap();
            assert_eq!(info.offset as usize, b.layout.tensor_data[i]);
            assert_eq!(info.offset % alignment, 0);
            assert_eq!(info.n_bytes as usize, data.len());
        }
        assert!(!g.contains("nope"));
        assert!(matches!(g.tensor("nope"), Err(ModelError::MissingTensor(n)) if n == "nope"));
    }
}

#[test]
fn tensor_outlives_reader() {
    let (bytes, _) = small();
    let t = {
        let g = open_bytes(&bytes).unwrap();
        g.tensor("b").unwrap()
    };
    assert_eq!(t.data.bytes(), &[2u8; 68][..]);
    assert_eq!(t.shape, vec![2, 32]);
}

#[test]
fn get_helpers() {
    let mut w = GgufWriter::new();
    w.metadata("u8", MetaValue::U8(7))
        .metadata("i32.pos", MetaValue::I32(9))
        .metadata("i64.neg", MetaValue::I64(-5))
        .metadata("u64.big", MetaValue::U64(u64::MAX))
        .metadata("f32", MetaValue::F32(1.5))
        .metadata("f64", MetaValue::F64(1e5))
        .metadata("f64.huge", MetaValue::F64(1e300))
        .metadata("s", MetaValue::String("x".into()))
        .metadata("b", MetaValue::Bool(false))
        .metadata(
            "strs",
            MetaValue::Array(vec![
                MetaValue::String("p".into()),
                MetaValue::String("q".into()),
            ]),
        )
        .metadata(
            "f32s",
            MetaValue::Array(vec![MetaValue::F32(0.5), MetaValue::F32(-2.0)]),
        )
        .metadata(
            "u8s",
            MetaValue::Array(vec![MetaValue::U8(1), MetaValue::U8(200)]),
        )
        .metadata(
            "i32s",
            MetaValue::Array(vec![MetaValue::I32(-1), MetaValue::I32(3)]),
        )
        .metadata("u32s.big", MetaValue::Array(vec![MetaValue::U32(u32::MAX)]))
        .metadata("empty", MetaValue::Array(vec![]));
    let g = open_bytes(&w.to_bytes().unwrap()).unwrap();
    assert_eq!(g.get_u64("u8").unwrap(), 7);
    assert_eq!(g.get_u64("i32.pos").unwrap(), 9);
    assert_eq!(g.get_u64("u64.big").unwrap(), u64::MAX);
    assert_eq!(g.get_f32("f32").unwrap(), 1.5);
    assert_eq!(g.get_f32("f64").unwrap(), 1e5);
    assert_eq!(g.get_f32("u8").unwrap(), 7.0);
    assert_eq!(g.get_f32("i64.neg").unwrap(), -5.0);
    assert_eq!(g.get_str("s").unwrap(), "x");
    assert!(!g.get_bool("b").unwrap());
    assert_eq!(g.get_str_array("strs").unwrap(), vec!["p", "q"]);
    assert_eq!(g.get_str_array("empty").unwrap(), Vec::<&str>::new());
    assert_eq!(g.get_f32_array("f32s").unwrap(), vec![0.5, -2.0]);
    assert_eq!(g.get_f32_array("u8s").unwrap(), vec![1.0, 200.0]);
    assert_eq!(g.get_i32_array("i32s").unwrap(), vec![-1, 3]);
    assert_eq!(g.get_i32_array("u8s").unwrap(), vec![1, 200]);

    let missing = g.get_u64("nope").unwrap_err();
    assert!(
        matches!(&missing, ModelError::MissingMetadata(k) if k == "nope"),
        "{missing:?}"
    );
    assert!(matches!(
        g.get_str("nope"),
        Err(ModelError::MissingMetadata(_))
    ));
    assert!(matches!(
        g.get_str_array("nope"),
        Err(ModelError::MissingMetadata(_))
    ));

    let wrong = |r: kivi_model::Result<()>, key: &str, found: &str| {
        let e = r.unwrap_err();
        let msg = e.to_string();
        match e {
            ModelError::Format { field, detail, .. } => {
                assert!(field.contains(key), "{msg}");
                assert!(detail.contains(found), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        println!("{msg}");
    };
    wrong(g.get_u64("i64.neg").map(drop), "i64.neg", "I64 (-5)");
    wrong(g.get_u64("f32").map(drop), "\"f32\"", "F32 (1.5)");
    wrong(g.get_u64("s").map(drop), "\"s\"", "STRING");
    wrong(g.get_f32("s").map(drop), "\"s\"", "STRING");
    wrong(g.get_f32("f64.huge").map(drop), "f64.huge", "F64");
    wrong(g.get_str("u8").map(drop), "\"u8\"", "U8 (7)");
    wrong(g.get_bool("u8").map(drop), "\"u8\"", "U8 (7)");
    wrong(g.get_str_array("s").map(drop), "\"s\"", "STRING");
    wrong(
        g.get_str_array("u8s").map(drop),
        "u8s",
        "element 0 of type U8 (1)",
    );
    wrong(
        g.get_f32_array("strs").map(drop),
        "strs",
        "element 0 of type STRING",
    );
    wrong(
        g.get_i32_array("u32s.big").map(drop),
        "u32s.big",
        "element 0 of type U32 (4294967295)",
    );
    wrong(g.get_i32_array("f32s").map(drop), "f32s", "F32");
}

// ---------------------------------------------------------------------------------------------
// Hostile inputs

#[test]
fn truncated_at_every_byte() {
    let b = build(rand::random(), 3, 32);
    let full = b.bytes.len();
    assert!(open_bytes(&b.bytes).is_ok());
    let p = temp_path("trunc");
    for len in 0..full {
        std::fs::write(&p, &b.bytes[..len]).unwrap();
        match Gguf::open(&p) {
            Ok(_) => panic!("file truncated to {len} of {full} bytes opened"),
            Err(ModelError::Format { .. }) => {}
            Err(e) => panic!("truncated to {len}: unexpected error kind {e:?}"),
        }
    }
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn header_errors() {
    let (good, _) = small();
    assert!(open_bytes(&good).is_ok());

    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGUX");
    expect_format_err(&b, "magic", "expected \"GGUF\", found \"GGUX\"");
    expect_format_err(b"\x89PNG\r\n", "magic", "found \"\\x89PNG\"");
    expect_format_err(b"", "magic", "empty file");
    expect_format_err(b"GG", "magic", "file truncated");

    for (v, detail) in [
        (1, "version 1 is not supported"),
        (0, "unsupported version 0"),
        (4, "unsupported version 4"),
        (0x0300_0000, "big-endian GGUF (version 3)"),
    ] {
        let mut b = good.clone();
        put_u32(&mut b, 4, v);
        expect_format_err(&b, "version", detail);
    }
    for (n, detail) in [
        (u64::MAX, "18446744073709551615 tensors"),
        (1 << 40, "1099511627776 tensors"),
        (1 << 30, "cannot fit"),
    ] {
        let mut b = good.clone();
        put_u64(&mut b, 8, n);
        expect_format_err(&b, "tensor_count", detail);
    }
    for n in [u64::MAX, 1 << 60, 100_000] {
        let mut b = good.clone();
        put_u64(&mut b, 16, n);
        expect_format_err(&b, "kv_count", &format!("{n} metadata entries"));
    }
}

#[test]
fn metadata_errors() {
    let (good, layout) = small();
    // metadata[1] is "tokenizer.ggml.tokens": key at +8, type at +8+21, elem type, then length.
    let key_len = "tokenizer.ggml.tokens".len();
    let m1 = layout.metadata[1];
    let type_at = m1 + 8 + key_len;
    let len_at = type_at + 8;

    let mut b = good.clone();
    put_u64(&mut b, m1, 1 << 60);
    expect_format_err(
        &b,
        "metadata[1] key",
        "string length 1152921504606846976 exceeds",
    );
    let mut b = good.clone();
    put_u64(&mut b, m1, 70_000);
    expect_format_err(&b, "metadata[1] key", "exceeds the limit of 65535");
    let mut b = good.clone();
    put_u64(&mut b, m1, 0);
    expect_format_err(&b, "metadata[1] key \"\"", "empty key");

    let mut b = good.clone();
    put_u64(&mut b, len_at, 1 << 60);
    expect_format_err(
        &b,
        "metadata[1] key \"tokenizer.ggml.tokens\"",
        "array length 1152921504606846976 × 8-byte minimum element size exceeds",
    );
    let mut b = good.clone();
    put_u64(&mut b, len_at, u64::MAX);
    expect_format_err(
        &b,
        "tokenizer.ggml.tokens",
        "array length 18446744073709551615",
    );

    // First element's string length.
    let mut b = good.clone();
    put_u64(&mut b, len_at + 8, u64::MAX - 3);
    expect_format_err(
        &b,
        "tokenizer.ggml.tokens",
        "array element 0: string length",
    );

    let mut b = good.clone();
    put_u32(&mut b, type_at, 99);
    expect_format_err(&b, "tokenizer.ggml.tokens", "unknown value type 99");
    let mut b = good.clone();
    put_u32(&mut b, type_at + 4, 13);
    expect_format_err(&b, "tokenizer.ggml.tokens", "unknown array element type 13");

    // metadata[2] "flag" BOOL: value byte right after the type.
    let m2 = layout.metadata[2];
    let mut b = good.clone();
    b[m2 + 8 + 4 + 4] = 2;
    expect_format_err(
        &b,
        "metadata[2] key \"flag\"",
        "BOOL value 2 is neither 0 nor 1",
    );

    // Invalid UTF-8 in a key.
    let mut b = good.clone();
    b[m2 + 8] = 0xff;
    expect_format_err(&b, "metadata[2] key", "not valid UTF-8");

    // Duplicate keys, nesting too deep, too many array elements.
    let mut w = GgufWriter::new();
    w.metadata("k", MetaValue::U8(1))
        .metadata("j", MetaValue::U8(1))
        .metadata("k", MetaValue::U8(2));
    expect_format_err(
        &w.to_bytes().unwrap(),
        "metadata[2] key \"k\"",
        "duplicate key (first at metadata[0])",
    );

    let mut deep = MetaValue::Array(vec![MetaValue::U8(1)]);
    for _ in 0..4 {
        deep = MetaValue::Array(vec![deep]);
    }
    let mut w = GgufWriter::new();
    w.metadata("deep", deep);
    expect_format_err(
        &w.to_bytes().unwrap(),
        "\"deep\"",
        "arrays nested 5 deep exceed the limit of 4",
    );

    // An array longer than the per-file element budget fails before anything is allocated.
    let mut w = GgufWriter::new();
    w.metadata("a", MetaValue::Array(vec![MetaValue::U8(0)]));
    let (mut b, layout) = w.to_bytes_with_layout().unwrap();
    let n = MAX_META_VALUES + 1;
    put_u64(&mut b, layout.metadata[0] + 8 + 1 + 4 + 4, n);
    b.resize(b.len() + n as usize, 0);
    expect_format_err(
        &b,
        "metadata[0] key \"a\"",
        "array length 8388609 exceeds the 8388608 metadata array elements left of the per-file limit",
    );
}

#[test]
fn alignment_errors() {
    for (v, detail) in [
        (MetaValue::U32(0), "alignment 0 is not a power of two"),
        (MetaValue::U32(3), "alignment 3 is not a power of two"),
        (
            MetaValue::U64(1 << 40),
            "alignment 1099511627776 is not a power of two in 1..=1048576",
        ),
        (
            MetaValue::F32(32.0),
            "expected an unsigned integer, found F32 (32.0)",
        ),
        (MetaValue::I32(-32), "found I32 (-32)"),
    ] {
        let mut w = GgufWriter::new();
        w.metadata("general.alignment", v)
            .tensor("a", DType::F32, &[1], vec![0; 4]);
        expect_format_err(&w.to_bytes().unwrap(), "general.alignment", detail);
    }
}

#[test]
fn tensor_info_errors() {
    let one = |f: &dyn Fn(&mut GgufWriter)| {
        let mut w = GgufWriter::new();
        w.tensor("ok", DType::F32, &[2], vec![0; 8]);
        f(&mut w);
        w.to_bytes().unwrap()
    };
    let b = one(&|w| {
        w.raw_tensor("five", 0, &[1, 1, 1, 1, 2], vec![0; 8]);
    });
    expect_format_err(&b, "tensor_infos[1] \"five\"", "n_dims 5 is outside 1..=4");
    let b = one(&|w| {
        w.raw_tensor("scalar", 0, &[], vec![0; 4]);
    });
    expect_format_err(
        &b,
        "tensor_infos[1] \"scalar\"",
        "n_dims 0 is outside 1..=4",
    );
    let b = one(&|w| {
        w.raw_tensor("zero", 0, &[4, 0], vec![]);
    });
    expect_format_err(&b, "\"zero\"", "dimension ne[0] = 0");
    let b = one(&|w| {
        w.raw_tensor("neg", 0, &[1 << 63, 1], vec![]);
    });
    expect_format_err(
        &b,
        "\"neg\"",
        "dimension ne[1] = 9223372036854775808 is outside",
    );
    let b = one(&|w| {
        w.raw_tensor("overflow", 0, &[1 << 40, 1 << 40], vec![]);
    });
    expect_format_err(
        &b,
        "\"overflow\"",
        "element count of dims [1099511627776, 1099511627776] overflows",
    );
    let b = one(&|w| {
        w.raw_tensor("bytes_overflow", 0, &[1 << 31, 1 << 31], vec![]);
    });
    expect_format_err(&b, "\"bytes_overflow\"", "byte size of dims");
    let b = one(&|w| {
        w.raw_tensor("huge", 0, &[1 << 30, 1 << 30], vec![0; 16]);
    });
    expect_format_err(
        &b,
        "tensor_infos[1] \"huge\"",
        "extends past the end of the file",
    );
    let b = one(&|w| {
        w.raw_tensor("partial_block", 2, &[2, 33], vec![0; 36]);
    });
    expect_format_err(
        &b,
        "\"partial_block\"",
        "row length ne[0] = 33 is not a multiple of the Q4_0 block size 32",
    );
    let b = one(&|w| {
        w.raw_tensor("mystery", 99, &[4], vec![0; 16]);
    });
    expect_format_err(
        &b,
        "tensor_infos[1] \"mystery\"",
        "unknown ggml type id 99: the tensor's size cannot be computed",
    );
    let b = one(&|w| {
        w.raw_tensor("retired", 4, &[32], vec![0; 20]);
    });
    expect_format_err(&b, "\"retired\"", "unknown ggml type id 4");
    let b = one(&|w| {
        w.raw_tensor("ok", 0, &[2], vec![0; 8]);
    });
    expect_format_err(
        &b,
        "tensor_infos[1] \"ok\"",
        "duplicate tensor name (first at tensor_infos[0])",
    );
    let b = one(&|w| {
        w.raw_tensor("", 0, &[2], vec![0; 8]);
    });
    expect_format_err(&b, "tensor_infos[1]", "empty tensor name");
    let b = one(&|w| {
        w.raw_tensor("x".repeat(300), 0, &[2], vec![0; 8]);
    });
    expect_format_err(
        &b,
        "tensor_infos[1] name",
        "string length 300 exceeds the limit of 256",
    );

    // Offsets: misaligned, past the end, overflowing, overlapping.
    let (good, layout) = small();
    let off_b = layout.tensor_offset_fields[1];
    let mut b = good.clone();
    put_u64(&mut b, off_b, 1);
    expect_format_err(
        &b,
        "tensor_infos[1] \"b\"",
        "offset 1 is not a multiple of the alignment 32",
    );
    let mut b = good.clone();
    put_u64(&mut b, off_b, 1 << 40);
    expect_format_err(
        &b,
        "tensor_infos[1] \"b\"",
        "extends past the end of the file",
    );
    let mut b = good.clone();
    put_u64(&mut b, off_b, u64::MAX - 31);
    expect_format_err(&b, "tensor_infos[1] \"b\"", "overflows");
    let mut b = good.clone();
    put_u64(&mut b, off_b, 0);
    expect_format_err(
        &b,
        "tensor_infos[1] \"b\"",
        "overlaps tensor_infos[0] \"a\"",
    );
    let mut b = good.clone();
    put_u64(&mut b, layout.tensor_offset_fields[2], 64);
    expect_format_err(
        &b,
        "tensor_infos[2] \"c\"",
        "overlaps tensor_infos[1] \"b\"",
    );
    // n_dims patched to absurd values.
    let mut b = good.clone();
    put_u32(&mut b, layout.tensor_n_dims[0], u32::MAX);
    expect_format_err(
        &b,
        "tensor_infos[0] \"a\"",
        "n_dims 4294967295 is outside 1..=4",
    );
    // Data section start past the end: cut the file right after the infos.
    let infos_end = layout.tensor_offset_fields[2] + 8;
    if infos_end % 32 != 0 {
        expect_format_err(
            &good[..infos_end + 1],
            "data section",
            "past the end of the file",
        );
    }
    expect_format_err(&good[..infos_end], "", "past the end of the file");
}

// ---------------------------------------------------------------------------------------------
// Random mutations

/// Opens `bytes`; when that succeeds, reads every tensor and touches all its bytes.
fn open_and_read_all(bytes: &[u8], path: &std::path::Path) {
    std::fs::write(path, bytes).unwrap();
    if let Ok(g) = Gguf::open(path) {
        let names: Vec<String> = g.tensors.iter().map(|t| t.name.clone()).collect();
        for name in names {
            let t = g.tensor(&name).unwrap();
            let n: u64 = t.data.bytes().iter().map(|&x| x as u64).sum();
            std::hint::black_box(n);
            assert!(t.n_elements() > 0);
        }
        for u in &g.unsupported {
            assert!(g.tensor(&u.name).is_err());
        }
        for k in g.metadata.keys() {
            let _ = (g.get_u64(k), g.get_f32(k), g.get_str(k), g.get_str_array(k));
            let _ = (g.get_f32_array(k), g.get_i32_array(k), g.get_bool(k));
        }
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    /// Set the byte at (position fraction of the header area) to a value.
    SetHeader(f64, u8),
    /// Set any byte.
    SetAny(f64, u8),
    /// Write a u64 (little-endian) at a header position: lengths, counts and offsets.
    U64Header(f64, u64),
    Truncate(f64),
    Insert(f64, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(1 << 32),
        Just(1 << 63),
        any::<u64>(),
        0u64..100_000
    ];
    prop_oneof![
        4 => (0.0..1.0f64, any::<u8>()).prop_map(|(p, v)| Mutation::SetHeader(p, v)),
        1 => (0.0..1.0f64, any::<u8>()).prop_map(|(p, v)| Mutation::SetAny(p, v)),
        2 => (0.0..1.0f64, interesting).prop_map(|(p, v)| Mutation::U64Header(p, v)),
        1 => (0.0..1.0f64).prop_map(Mutation::Truncate),
        1 => (0.0..1.0f64, any::<u8>()).prop_map(|(p, v)| Mutation::Insert(p, v)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn mutated_files_never_panic(seed in any::<u64>(), muts in prop::collection::vec(mutation(), 1..6)) {
        let b = build(seed, 3, 32);
        let mut bytes = b.bytes;
        let header_len = b.layout.data_offset;
        for m in muts {
            let at = |p: f64, n: usize| ((p * n as f64) as usize).min(n.saturating_sub(1));
            match m {
                Mutation::SetHeader(p, v) => { let i = at(p, header_len.min(bytes.len())); if i < bytes.len() { bytes[i] = v; } }
                Mutation::SetAny(p, v) => { let i = at(p, bytes.len()); if i < bytes.len() { bytes[i] = v; } }
                Mutation::U64Header(p, v) => {
                    let i = at(p, header_len.min(bytes.len()));
                    if i + 8 <= bytes.len() { put_u64(&mut bytes, i, v); }
                }
                Mutation::Truncate(p) => { let i = at(p, bytes.len()); bytes.truncate(i); }
                Mutation::Insert(p, v) => { let i = at(p, header_len.min(bytes.len())); bytes.insert(i, v); }
            }
        }
        let p = temp_path("fuzz");
        open_and_read_all(&bytes, &p);
        let _ = std::fs::remove_file(&p);
    }
}
