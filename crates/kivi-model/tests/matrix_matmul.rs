//! `Matrix::matmul` on every type and every kernel path this CPU has: SIMD == scalar (within
//! float rounding), and both == dequantize-then-f64 reference within the 8-bit activation
//! quantization budget. Random ggml blocks, odd row counts, n = 1, 3, 17, 64.

use std::sync::Arc;

use half::f16;
use kivi_model::matrix::{dequantize, KernelPath, Matrix};
use kivi_model::tensor::{DType, RawTensor, Storage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ALL: [DType; 9] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q8_0,
    DType::Q4_K,
    DType::Q6_K,
];

fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// Random bytes for `[rows][cols]` of `dtype` with finite, realistic scale fields.
fn random_tensor(rng: &mut StdRng, dtype: DType, rows: usize, cols: usize) -> RawTensor {
    let n = rows * cols;
    let bytes: Vec<u8> = match dtype {
        DType::F32 => (0..n)
            .flat_map(|_| rng.gen_range(-1.0f32..1.0).to_le_bytes())
            .collect(),
        DType::F16 => (0..n)
            .flat_map(|_| {
                f16::from_f32(rng.gen_range(-1.0f32..1.0))
                    .to_bits()
                    .to_le_bytes()
            })
            .collect(),
        DType::BF16 => (0..n)
            .flat_map(|_| {
                half::bf16::from_f32(rng.gen_range(-1.0f32..1.0))
                    .to_bits()
                    .to_le_bytes()
            })
            .collect(),
        _ => {
            let bb = dtype.block_bytes();
            let mut b: Vec<u8> = (0..n / dtype.block_size() * bb)
                .map(|_| rng.gen())
                .collect();
            for blk in b.chunks_exact_mut(bb) {
                match dtype {
                    DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => {
                        put_f16(blk, 0, rng.gen_range(-0.1..0.1))
                    }
                    DType::Q4_1 => {
                        put_f16(blk, 0, rng.gen_range(0.0..0.1));
                        put_f16(blk, 2, rng.gen_range(-0.8..0.0));
                    }
                    DType::Q4_K => {
                        put_f16(blk, 0, rng.gen_range(0.0..0.01));
                        put_f16(blk, 2, rng.gen_range(0.0..0.01));
                    }
                    DType::Q6_K => put_f16(blk, 208, rng.gen_range(0.0..0.01)),
                    _ => unreachable!(),
                }
            }
            b
        }
    };
    RawTensor {
        name: format!("w_{}", dtype.name()),
        dtype,
        shape: vec![rows, cols],
        data: Storage::Owned(Arc::new(bytes)),
    }
}

/// Column counts to test: odd and even block counts (the 512-bit kernel pairs blocks).
fn cols_list(dtype: DType) -> &'static [usize] {
    match dtype.block_size() {
        256 => &[512, 768],
        32 => &[160, 192],
        _ => &[77, 96], // 77: not a multiple of 8 or 16, exercises the SIMD tails
    }
}

/// f64 reference on dequantized weights and the exact (unquantized) activations, plus the
/// error budget: `sum_c |w[r][c]| * max_c |x[i][c]| / 254` for 8-bit activations.
fn reference(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    quantized_act: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; n * rows];
    let mut tol = vec![0.0; n * rows];
    for i in 0..n {
        let xi = &x[i * cols..(i + 1) * cols];
        let xmax = xi.iter().fold(0.0f64, |a, v| a.max(v.abs() as f64));
        for r in 0..rows {
            let wr = &w[r * cols..(r + 1) * cols];
            y[i * rows + r] = wr.iter().zip(xi).map(|(a, b)| *a as f64 * *b as f64).sum();
            let l1: f64 = wr.iter().map(|a| a.abs() as f64).sum();
            let l1x: f64 = wr
                .iter()
                .zip(xi)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            tol[i * rows + r] = if quantized_act {
                l1 * xmax / 254.0 * 1.01
            } else {
                0.0
            } + 1e-5 * l1x
                + 1e-6;
        }
    }
    (y, tol)
}

#[test]
fn matmul_matches_f64_reference_on_every_path() {
    let mut rng = StdRng::seed_from_u64(7);
    for (dtype, cols) in ALL
        .iter()
        .flat_map(|&d| cols_list(d).iter().map(move |&c| (d, c)))
    {
        let rows = 37;
        let t = random_tensor(&mut rng, dtype, rows, cols);
        let wf = dequantize(&t).unwrap();
        let m = Matrix::from_raw(t).unwrap();
        assert_eq!((m.rows, m.cols), (rows, cols));
        for n in [1, 3, 17, 64] {
            let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let quantized = dtype.block_size() > 1;
            let (want, tol) = reference(&wf, rows, cols, &x, n, quantized);
            for path in KernelPath::available() {
                let mut out = vec![f32::NAN; n * rows + 3];
                m.matmul_with(path, &x, n, &mut out);
                for j in 0..n * rows {
                    let err = (out[j] as f64 - want[j]).abs();
                    assert!(
                        err <= tol[j],
                        "{dtype:?} {path:?} n={n} [{}][{}]: {} vs {} (tol {})",
                        j / rows,
                        j % rows,
                        out[j],
                        want[j],
                        tol[j]
                    );
                }
                assert!(
                    out[n * rows..].iter().all(|v| v.is_nan()),
                    "{dtype:?} {path:?}: wrote past out"
                );
            }
        }
    }
}

#[test]
fn simd_paths_match_scalar() {
    let mut rng = StdRng::seed_from_u64(11);
    for (dtype, cols) in ALL
        .iter()
        .flat_map(|&d| cols_list(d).iter().map(move |&c| (d, c)))
    {
        for rows in [1, 5, 130, 261] {
            let m = Matrix::from_raw(random_tensor(&mut rng, dtype, rows, cols)).unwrap();
            for n in [1, 3, 17, 64] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut base = vec![0.0; n * rows];
                m.matmul_with(KernelPath::Scalar, &x, n, &mut base);
                for path in KernelPath::available() {
                    let mut out = vec![0.0; n * rows];
                    m.matmul_with(path, &x, n, &mut out);
                    for (j, (a, b)) in out.iter().zip(&base).enumerate() {
                        let tol = 2e-5 * (cols as f32).sqrt() * (1.0 + b.abs());
                        assert!(
                            (a - b).abs() <= tol,
                            "{dtype:?} {path:?} rows={rows} n={n} [{j}]: {a} vs scalar {b}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn tiled_rows_equal_single_rows() {
    // Prefill tiles 4 activation rows per weight row; each row must come out exactly as decode.
    let mut rng = StdRng::seed_from_u64(3);
    for (dtype, cols) in ALL
        .iter()
        .flat_map(|&d| cols_list(d).iter().map(move |&c| (d, c)))
    {
        let rows = 19;
        let m = Matrix::from_raw(random_tensor(&mut rng, dtype, rows, cols)).unwrap();
        let n = 9;
        let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        for path in KernelPath::available() {
            let mut all = vec![0.0; n * rows];
            m.matmul_with(path, &x, n, &mut all);
            for i in 0..n {
                let mut one = vec![0.0; rows];
                m.matmul_with(path, &x[i * cols..(i + 1) * cols], 1, &mut one);
                assert_eq!(
                    &all[i * rows..(i + 1) * rows],
                    &one[..],
                    "{dtype:?} {path:?} row {i}"
                );
            }
        }
    }
}

#[test]
fn large_matrix_uses_threads_and_agrees() {
    // Big enough to be split over rayon tasks (576 -> 1536, like SmolLM2's FFN).
    let mut rng = StdRng::seed_from_u64(5);
    for dtype in [DType::Q4_1, DType::Q8_0, DType::Q4_K, DType::F16] {
        let cols = if dtype.block_size() == 256 { 512 } else { 576 };
        let rows = 1537;
        let m = Matrix::from_raw(random_tensor(&mut rng, dtype, rows, cols)).unwrap();
        for n in [1, 6] {
            let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut base = vec![0.0; n * rows];
            m.matmul_with(KernelPath::Scalar, &x, n, &mut base);
            let mut out = vec![0.0; n * rows];
            m.matmul(&x, n, &mut out);
            for (a, b) in out.iter().zip(&base) {
                assert!(
                    (a - b).abs() <= 1e-3 * (1.0 + b.abs()),
                    "{dtype:?} n={n}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn from_f32_matmul() {
    let (rows, cols) = (3, 5);
    let w: Vec<f32> = (0..15).map(|v| v as f32).collect();
    let m = Matrix::from_f32("w", rows, cols, w);
    assert_eq!((m.dtype, m.n_bytes()), (DType::F32, 60));
    let x = [1.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5];
    for path in KernelPath::available() {
        let mut out = [0.0; 6];
        m.matmul_with(path, &x, 2, &mut out);
        assert_eq!(out, [4.0, 14.0, 24.0, 5.0, 17.5, 30.0], "{path:?}");
    }
    let mut row = [0.0; 5];
    m.row_f32(2, &mut row);
    assert_eq!(row, [10.0, 11.0, 12.0, 13.0, 14.0]);
}

#[test]
fn from_raw_checks_shape_and_bytes() {
    let mk = |dtype: DType, shape: Vec<usize>, len: usize| RawTensor {
        name: "t".into(),
        dtype,
        shape,
        data: Storage::Owned(Arc::new(vec![0u8; len])),
    };
    assert!(Matrix::from_raw(mk(DType::Q4_1, vec![2, 64], 80)).is_ok());
    assert!(Matrix::from_raw(mk(DType::Q4_1, vec![2, 64], 81)).is_err());
    assert!(Matrix::from_raw(mk(DType::Q4_1, vec![2, 48], 60)).is_err());
    assert!(Matrix::from_raw(mk(DType::Q4_K, vec![1, 256], 144)).is_ok());
    assert!(Matrix::from_raw(mk(DType::F32, vec![2, 2, 2], 32)).is_err());
}
