//! The ops a Llama-family forward pass needs, behind one trait, so that the model is written once
//! ([`crate::llama::Llama::forward_rows`]) and runs on the CPU ([`Cpu`], here) or on a GPU
//! (`kivi_cuda::CudaBackend`). ggml/llm.c style: the forward reads top to bottom, the backend
//! owns buffers, weights, kernels and the KV cache.
//!
//! Activations are row-major `[rows][cols]` buffers of f32 (a backend may round to a narrower type
//! inside an op, e.g. f16 GEMM inputs on the GPU). Weights are `[out][in]` matrices.

use std::ops::Range;

use kivi_core::{AttendItem, KvCache, SeqId};
use rayon::prelude::*;

use crate::config::RopeStyle;
use crate::matrix::{dequantize, Matrix};
use crate::tensor::RawTensor;
use crate::Result;

/// RoPE parameters shared by every layer.
#[derive(Clone, Debug)]
pub struct Rope {
    pub style: RopeStyle,
    pub head_dim: usize,
    /// Inverse frequencies, `[head_dim / 2]`.
    pub inv_freq: Vec<f32>,
}

pub trait Backend {
    /// A row-major f32 activation buffer.
    type Act;
    /// A `[out][in]` weight matrix.
    type Weight;
    /// A weight vector (norm weights, biases).
    type Vector;
    /// The KV cache attention reads and appends to.
    type Cache: ?Sized;
    /// One forward step's bookkeeping: rows of each sequence, their positions.
    type Step;

    /// Takes a host tensor (any supported type, shape already checked) as a weight matrix.
    fn matrix(&self, t: RawTensor) -> Result<Self::Weight>;
    fn vector(&self, v: Vec<f32>) -> Result<Self::Vector>;
    /// Bytes the weight occupies in this backend's memory.
    fn weight_bytes(&self, w: &Self::Weight) -> usize;

    /// A zeroed buffer of `len` values.
    fn zeros(&self, len: usize) -> Result<Self::Act>;
    /// Tokens stored for `seq` in the cache.
    fn seq_len(&self, cache: &Self::Cache, seq: SeqId) -> Result<usize>;
    /// Starts a step: `n_new` tokens for each `(seq, n_new)`, rows packed in this order.
    fn begin_step(&self, cache: &mut Self::Cache, items: &[(SeqId, usize)]) -> Result<Self::Step>;
    /// Ends a step after every layer's attention (the new tokens now count as stored).
    fn end_step(&self, cache: &mut Self::Cache, step: Self::Step) -> Result<()>;
    /// Submits any work the backend holds back (the GPU backend queues a decode step's ops
    /// to replay them as CUDA graphs): called at the end of a forward pass, before its output
    /// is handed out.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// `out[t] = table[tokens[t]]` (rows of `table` as f32).
    fn embed(&self, table: &Self::Weight, tokens: &[u32], out: &mut Self::Act) -> Result<()>;
    /// `out[t] = x[t] / sqrt(mean(x[t]²) + eps) * w`, rows of `w.len()` values.
    fn rmsnorm(&self, out: &mut Self::Act, x: &Self::Act, w: &Self::Vector, eps: f32)
        -> Result<()>;
    /// `out[i] = W · x[i]` for the first `rows` rows of `x`.
    fn matmul(
        &self,
        w: &Self::Weight,
        x: &Self::Act,
        rows: usize,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// `x += y`, then `out = rmsnorm(x) * w` (a residual add and the norm after it: one launch
    /// on backends that can).
    fn add_rmsnorm(
        &self,
        x: &mut Self::Act,
        y: &Self::Act,
        out: &mut Self::Act,
        w: &Self::Vector,
        eps: f32,
    ) -> Result<()> {
        self.add(x, y)?;
        self.rmsnorm(out, x, w, eps)
    }
    /// `out = W · x` for each `(W, out)` of `outs`, all reading the first `rows` rows of `x`
    /// (q/k/v, gate/up): one launch on backends that can; by default one matmul each.
    fn matmuls(
        &self,
        x: &Self::Act,
        rows: usize,
        outs: &mut [(&Self::Weight, &mut Self::Act)],
    ) -> Result<()> {
        outs.iter_mut()
            .try_for_each(|(w, out)| self.matmul(w, x, rows, out))
    }
    /// Adds `b` to every row of `x`.
    fn add_bias(&self, x: &mut Self::Act, b: &Self::Vector) -> Result<()>;
    /// Rotates each head of `x` (`[rows][heads][head_dim]`) by its row's position.
    fn rope(&self, x: &mut Self::Act, heads: usize, rope: &Rope, step: &Self::Step) -> Result<()>;
    /// Attention of the step's new tokens over `layer`'s cache (see [`KvCache`]'s semantics),
    /// then stores the new keys and values.
    #[allow(clippy::too_many_arguments)]
    fn attend_append(
        &self,
        cache: &mut Self::Cache,
        step: &Self::Step,
        layer: usize,
        n_head: usize,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// `gate = silu(gate) * up`.
    fn swiglu(&self, gate: &mut Self::Act, up: &Self::Act) -> Result<()>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Act, y: &Self::Act) -> Result<()>;
    /// Rows `rows` of `x` (rows of `width` values), concatenated.
    fn gather_rows(&self, x: &Self::Act, width: usize, rows: &[Range<usize>]) -> Result<Self::Act>;
}

/// The CPU backend: the `Matrix` weight kernels (quantized GGUF types, AVX-512/AMX when
/// present), rayon, and any [`KvCache`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// Rows and positions of one CPU step.
pub struct CpuStep {
    items: Vec<(SeqId, Range<usize>)>,
    pos: Vec<usize>,
}

impl Backend for Cpu {
    type Act = Vec<f32>;
    type Weight = Matrix;
    type Vector = Vec<f32>;
    type Cache = dyn KvCache;
    type Step = CpuStep;

    fn matrix(&self, t: RawTensor) -> Result<Matrix> {
        Matrix::from_raw(t)
    }
    fn vector(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        Ok(v)
    }
    fn weight_bytes(&self, w: &Matrix) -> usize {
        w.n_bytes()
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0f32; len])
    }
    fn seq_len(&self, cache: &(dyn KvCache + 'static), seq: SeqId) -> Result<usize> {
        Ok(cache.seq_len(0, seq)?)
    }
    fn begin_step(
        &self,
        cache: &mut (dyn KvCache + 'static),
        items: &[(SeqId, usize)],
    ) -> Result<CpuStep> {
        let mut step = CpuStep {
            items: Vec::with_capacity(items.len()),
            pos: Vec::new(),
        };
        let mut row = 0;
        for &(seq, n) in items {
            let p0 = cache.seq_len(0, seq)?;
            step.pos.extend(p0..p0 + n);
            step.items.push((seq, row..row + n));
            row += n;
        }
        Ok(step)
    }
    fn end_step(&self, _cache: &mut (dyn KvCache + 'static), _step: CpuStep) -> Result<()> {
        Ok(())
    }

    fn embed(&self, table: &Matrix, tokens: &[u32], out: &mut Vec<f32>) -> Result<()> {
        for (row, &t) in out.chunks_exact_mut(table.cols).zip(tokens) {
            table.row_f32(t as usize, row);
        }
        Ok(())
    }
    fn rmsnorm(&self, out: &mut Vec<f32>, x: &Vec<f32>, w: &Vec<f32>, eps: f32) -> Result<()> {
        rmsnorm(out, x, w, eps);
        Ok(())
    }
    fn matmul(&self, w: &Matrix, x: &Vec<f32>, rows: usize, out: &mut Vec<f32>) -> Result<()> {
        w.matmul(x, rows, out);
        Ok(())
    }
    fn add_bias(&self, x: &mut Vec<f32>, b: &Vec<f32>) -> Result<()> {
        for row in x.chunks_exact_mut(b.len()) {
            add_in_place(row, b);
        }
        Ok(())
    }
    fn rope(&self, x: &mut Vec<f32>, heads: usize, rope: &Rope, step: &CpuStep) -> Result<()> {
        let d = rope.head_dim;
        let half = d / 2;
        let style = rope.style;
        let n = step.pos.len();
        x[..n * heads * d]
            .par_chunks_mut(heads * d)
            .zip(step.pos.par_iter())
            .for_each(|(tok, &p)| {
                let p = p as f32;
                let (sin, cos): (Vec<f32>, Vec<f32>) =
                    rope.inv_freq.iter().map(|f| (p * f).sin_cos()).unzip();
                for head in tok.chunks_exact_mut(d) {
                    for i in 0..half {
                        let (a, b) = match style {
                            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                            RopeStyle::Neox => (i, i + half),
                        };
                        let (x0, x1) = (head[a], head[b]);
                        head[a] = x0 * cos[i] - x1 * sin[i];
                        head[b] = x0 * sin[i] + x1 * cos[i];
                    }
                }
            });
        Ok(())
    }
    fn attend_append(
        &self,
        cache: &mut (dyn KvCache + 'static),
        step: &CpuStep,
        layer: usize,
        n_head: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let shape = cache.shape();
        let kvd = shape.n_kv_head * shape.head_dim;
        let qd = n_head * shape.head_dim;
        {
            let mut out_rest = &mut out[..];
            let mut attend = Vec::with_capacity(step.items.len());
            for (seq, r) in &step.items {
                let (o, rest) = std::mem::take(&mut out_rest).split_at_mut(r.len() * qd);
                out_rest = rest;
                attend.push(AttendItem {
                    seq: *seq,
                    q: &q[r.start * qd..r.end * qd],
                    k_new: &k[r.start * kvd..r.end * kvd],
                    v_new: &v[r.start * kvd..r.end * kvd],
                    out: o,
                });
            }
            cache.attend_batch(layer, n_head, &mut attend)?;
        }
        for (seq, r) in &step.items {
            if !r.is_empty() {
                cache.append(
                    layer,
                    *seq,
                    &k[r.start * kvd..r.end * kvd],
                    &v[r.start * kvd..r.end * kvd],
                )?;
            }
        }
        Ok(())
    }
    fn swiglu(&self, gate: &mut Vec<f32>, up: &Vec<f32>) -> Result<()> {
        swiglu_in_place(gate, up);
        Ok(())
    }
    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        add_in_place(x, y);
        Ok(())
    }
    fn gather_rows(&self, x: &Vec<f32>, width: usize, rows: &[Range<usize>]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(rows.iter().map(|r| r.len()).sum::<usize>() * width);
        for r in rows {
            out.extend_from_slice(&x[r.start * width..r.end * width]);
        }
        Ok(out)
    }
}

/// Dequantizes a vector tensor to f32, rejecting non-finite values.
pub(crate) fn finite_vector(t: &RawTensor) -> Result<Vec<f32>> {
    let v = dequantize(t)?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(crate::ModelError::format(
            "model",
            t.name.clone(),
            format!("non-finite value at {i}"),
        ));
    }
    Ok(v)
}

/// `out[t] = x[t] / sqrt(mean(x[t]²) + eps) * w` for each row `t`.
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let h = w.len();
    for (o, xr) in out.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, xv), wv) in o.iter_mut().zip(xr).zip(w) {
            *o = xv * inv * wv;
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `gate = silu(gate) * up`; threads only pay off for prefill-sized inputs.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    let f = |(g, u): (&mut f32, &f32)| *g = silu(*g) * u;
    if gate.len() >= 1 << 16 {
        gate.par_iter_mut().zip(up.par_iter()).for_each(f);
    } else {
        gate.iter_mut().zip(up).for_each(f);
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
