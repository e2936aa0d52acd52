//! `dequantize_row_*_ref` against the `gguf` Python package's numpy dequantizers, on random
//! blocks of every type (fixture written by `scripts/fixtures/gen_dequant_fixtures.py`).

use std::sync::Arc;

use kivi_model::matrix::{dequantize, dequantize_row_ref, Matrix};
use kivi_model::tensor::{DType, RawTensor, Storage};

struct Record {
    dtype: DType,
    n: usize,
    bytes: Vec<u8>,
    want: Vec<f32>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn records() -> Vec<Record> {
    let b = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/dequant.bin"
    ))
    .unwrap();
    assert_eq!(&b[..8], b"KIVIDQ01");
    let count = u32_at(&b, 8) as usize;
    let mut off = 12;
    let mut out = Vec::new();
    for _ in 0..count {
        let dtype = DType::from_ggml_id(u32_at(&b, off)).unwrap();
        let n = u32_at(&b, off + 4) as usize;
        let nb = u32_at(&b, off + 8) as usize;
        off += 12;
        let bytes = b[off..off + nb].to_vec();
        off += nb;
        let want = b[off..off + 4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        off += 4 * n;
        out.push(Record {
            dtype,
            n,
            bytes,
            want,
        });
    }
    assert_eq!(off, b.len());
    out
}

#[test]
fn fixture_covers_every_type() {
    let got: Vec<DType> = records().iter().map(|r| r.dtype).collect();
    use DType::*;
    for t in [F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K] {
        assert!(got.contains(&t), "{t:?} missing from the fixture");
    }
}

#[test]
fn dequantize_ref_matches_gguf_py_bit_exact() {
    for r in records() {
        assert_eq!(
            r.dtype.bytes_for(r.n as u64),
            Some(r.bytes.len() as u64),
            "{:?}",
            r.dtype
        );
        let mut y = vec![f32::NAN; r.n];
        dequantize_row_ref(r.dtype, &r.bytes, &mut y);
        for (i, (g, w)) in y.iter().zip(&r.want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{:?}[{i}]: kivi {g} gguf-py {w}",
                r.dtype
            );
        }
    }
}

#[test]
fn dequantize_tensor_and_row_f32_match_ref() {
    for r in records() {
        let t = RawTensor {
            name: format!("{:?}", r.dtype),
            dtype: r.dtype,
            shape: vec![r.n],
            data: Storage::Owned(Arc::new(r.bytes.clone())),
        };
        let y = dequantize(&t).unwrap();
        assert_eq!(y.len(), r.n);
        assert!(
            y.iter()
                .zip(&r.want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{:?}",
            r.dtype
        );

        // The same bytes as a [rows][cols] matrix: row_f32 is a slice of the whole.
        let bs = r.dtype.block_size();
        let cols = if r.n % (2 * bs) == 0 && r.n / (2 * bs) >= 1 {
            r.n / 2
        } else {
            r.n
        };
        let rows = r.n / cols;
        let t2 = RawTensor {
            shape: vec![rows, cols],
            ..t
        };
        let m = Matrix::from_raw(t2).unwrap();
        assert_eq!(m.n_bytes(), r.bytes.len());
        let mut row = vec![0.0; cols];
        for i in 0..rows {
            m.row_f32(i, &mut row);
            assert!(
                row.iter()
                    .zip(&r.want[i * cols..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{:?} row {i}",
                r.dtype
            );
        }
    }
}

#[test]
fn dequantize_rejects_wrong_length() {
    let t = RawTensor {
        name: "bad".into(),
        dtype: DType::Q4_1,
        shape: vec![64],
        data: Storage::Owned(Arc::new(vec![0u8; 39])),
    };
    assert!(dequantize(&t).is_err());
}
