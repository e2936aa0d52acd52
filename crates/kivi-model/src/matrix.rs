//! Weight matrices in their file's type (F32/F16/BF16 or ggml block-quantized) with fast CPU
//! kernels: multithreaded, SIMD with runtime feature detection, a scalar twin for tests.
//!
//! API CONTRACT (the forward pass codes against this; the implementation is filled in separately):

use crate::tensor::{DType, RawTensor};
use crate::Result;

/// A `[rows][cols]` weight matrix (PyTorch `nn.Linear` layout: `y = W x`).
pub struct Matrix {
    pub name: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    /// Takes a 2-D tensor; checks that its bytes match its shape and type.
    pub fn from_raw(_t: RawTensor) -> Result<Matrix> {
        unimplemented!()
    }

    /// `out[i][r] = sum_c x[i][c] * W[r][c]` for `i < n`; `x` is `[n][cols]`, `out` is `[n][rows]`.
    pub fn matmul(&self, _x: &[f32], _n: usize, _out: &mut [f32]) {
        unimplemented!()
    }

    /// Row `row` as f32 (embedding lookup).
    pub fn row_f32(&self, _row: usize, _out: &mut [f32]) {
        unimplemented!()
    }

    /// Bytes of weights this matrix holds in memory (or maps).
    pub fn n_bytes(&self) -> usize {
        unimplemented!()
    }
}

/// Dequantizes a whole tensor of any supported type to f32 (vectors: norms, biases).
pub fn dequantize(_t: &RawTensor) -> Result<Vec<f32>> {
    unimplemented!()
}
