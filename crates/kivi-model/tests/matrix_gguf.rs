//! `Matrix` on real GGUF tensors (SmolLM2-135M Q4_1/Q8_0, Qwen2.5-Coder-1.5B Q4_K/Q6_K) when the
//! files are in `~/.cache/kivi/models` (`scripts/fetch-models.sh`); skipped otherwise.

use std::path::PathBuf;

use kivi_model::gguf::Gguf;
use kivi_model::matrix::{dequantize, KernelPath, Matrix};
use kivi_model::tensor::TensorSource;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn model(file: &str) -> Option<Gguf> {
    let dir = std::env::var_os("KIVI_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kivi")
        });
    let path = dir.join("models").join(file);
    if !path.exists() {
        eprintln!("skipping: {} not found", path.display());
        return None;
    }
    Some(Gguf::open(&path).unwrap())
}

fn check(g: &Gguf, name: &str) {
    let t = g.tensor(name).unwrap();
    let w = dequantize(&t).unwrap();
    let m = Matrix::from_raw(t).unwrap();
    let (rows, cols) = (m.rows, m.cols);
    let mut rng = StdRng::seed_from_u64(9);
    // Rows that look like RMS-normed activations, with a few outlier channels.
    let n = 3;
    let x: Vec<f32> = (0..n * cols)
        .map(|i| rng.gen_range(-1.0..1.0) * if i % 97 == 0 { 20.0 } else { 1.0 })
        .collect();
    let mut row = vec![0.0; cols];
    for r in [0, rows / 2, rows - 1] {
        m.row_f32(r, &mut row);
        assert_eq!(&row[..], &w[r * cols..(r + 1) * cols], "{name} row {r}");
    }
    for path in KernelPath::available() {
        let mut out = vec![0.0; n * rows];
        m.matmul_with(path, &x, n, &mut out);
        let mut worst = 0.0f64;
        for i in 0..n {
            let xi = &x[i * cols..(i + 1) * cols];
            let xmax = xi.iter().fold(0.0f64, |a, v| a.max(v.abs() as f64));
            for r in (0..rows).step_by((rows / 97).max(1)) {
                let wr = &w[r * cols..(r + 1) * cols];
                let want: f64 = wr.iter().zip(xi).map(|(a, b)| *a as f64 * *b as f64).sum();
                let l1: f64 = wr.iter().map(|a| a.abs() as f64).sum();
                let tol = l1 * xmax / 254.0 + 1e-4;
                let err = (out[i * rows + r] as f64 - want).abs();
                assert!(
                    err <= tol,
                    "{name} {path:?} [{i}][{r}]: {} vs {want} (tol {tol})",
                    out[i * rows + r]
                );
                worst = worst.max(err / tol);
            }
        }
        eprintln!(
            "{name} {:?} [{rows}][{cols}] {path:?}: worst err/budget {worst:.3}",
            m.dtype
        );
    }
}

#[test]
fn smollm2_q4_1_and_q8_0_tensors() {
    let Some(g) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    for name in [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.29.ffn_down.weight",
    ] {
        check(&g, name);
    }
}

#[test]
fn qwen_k_quant_tensors() {
    let Some(g) = model("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf") else {
        return;
    };
    for name in [
        "blk.0.attn_q.weight",
        "blk.0.ffn_down.weight",
        "blk.0.ffn_gate.weight",
    ] {
        if g.contains(name) {
            check(&g, name);
        }
    }
}
