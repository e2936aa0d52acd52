//! Weight matrices in their file's type (F32/F16/BF16 or ggml block-quantized) with fast CPU
//! kernels: multithreaded (rayon over output rows), SIMD with runtime feature detection, a
//! scalar twin for every kernel.
//!
//! How `matmul` works (llama.cpp's scheme): the activation rows are quantized once per call to
//! 8-bit blocks ([`q8::BlockQ8`] for 32-element types, [`q8::BlockQ8K`] for K-quants), then each
//! output is an integer dot product per block, scaled in f32. Plain-float weights use f32 FMA.
//! Weights stay in ggml's on-disk layout (a memory map can be used as is). Prefill (`n > 1`)
//! runs tiles of 4 activation rows per weight row so each weight block is unpacked once per 4
//! tokens while it is in L1.
//!
//! Paths: [`KernelPath::Scalar`] (portable, the `_ref` functions), [`KernelPath::Avx2`]
//! (`maddubs`), [`KernelPath::AvxVnni`] (`vpdpbusd` on 256-bit vectors, VEX or EVEX encoded).
//! [`KernelPath::Avx512Vnni`] (512-bit `vpdpbusd`, two blocks per instruction, activations
//! re-laid contiguous with per-lane scale vectors). `KIVI_FORCE_SCALAR=1` forces the scalar path.

pub mod dequant;
pub mod q8;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

pub use dequant::dequantize_row_ref;
use q8::{BlockQ8, BlockQ8K};

use crate::tensor::{DType, RawTensor, Storage};
use crate::{ModelError, Result};

/// Which kernel family runs. [`KernelPath::detect`] picks the best one this CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Portable Rust: the `_ref` dot products.
    Scalar,
    /// AVX2 + FMA + F16C, `maddubs` integer dot products.
    Avx2,
    /// AVX2 + AVX-VNNI (or AVX-512 VNNI/VL) `vpdpbusd` integer dot products.
    AvxVnni,
    /// AVX-512 F/BW/VL/VNNI: 512-bit `vpdpbusd` over two blocks at a time for the 32-element
    /// block types (K-quants and floats use the AVX2 kernels).
    Avx512Vnni,
}

impl KernelPath {
    /// Every path this CPU can run, slowest first (for tests and benches).
    pub fn available() -> Vec<KernelPath> {
        [
            KernelPath::Scalar,
            KernelPath::Avx2,
            KernelPath::AvxVnni,
            KernelPath::Avx512Vnni,
        ]
        .into_iter()
        .filter(|p| p.is_supported())
        .collect()
    }

    /// Whether this CPU can run the path (feature detection is cached; no allocation).
    pub fn is_supported(self) -> bool {
        match self {
            KernelPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => x86::has_avx2(),
            #[cfg(target_arch = "x86_64")]
            KernelPath::AvxVnni => x86::vnni_flavour().is_some(),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni => x86::has_avx512vnni(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest available path, or `Scalar` when `KIVI_FORCE_SCALAR=1`. Detected once.
    pub fn detect() -> KernelPath {
        static PATH: OnceLock<KernelPath> = OnceLock::new();
        *PATH.get_or_init(|| {
            if std::env::var("KIVI_FORCE_SCALAR").is_ok_and(|v| v == "1") {
                KernelPath::Scalar
            } else {
                *KernelPath::available().last().unwrap()
            }
        })
    }
}

/// A `[rows][cols]` weight matrix (PyTorch `nn.Linear` layout: `y = W x`).
pub struct Matrix {
    pub name: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    data: Storage,
    row_bytes: usize,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Matrix({} {} [{}][{}])",
            self.name,
            self.dtype.name(),
            self.rows,
            self.cols
        )
    }
}

/// Activations of up to `n` rows, in the type the weight kernels want.
enum Act<'a> {
    F32(&'a [f32]),
    Q8(&'a [BlockQ8]),
    /// Q8 activations laid out for the 512-bit kernel (`Avx512Vnni`, even blocks per row).
    Wide(&'a Wide),
    Q8K(&'a [BlockQ8K]),
}

#[derive(Default)]
struct Scratch {
    q8: Vec<BlockQ8>,
    q8k: Vec<BlockQ8K>,
    out_t: Vec<f32>,
    wide: Wide,
}

/// `[n]` activation rows for `x86::rows_q8_avx512`: `qs` `[n][cols]`, `sc`/`sm` `[n][8 * blocks]`.
#[derive(Default)]
struct Wide {
    qs: Vec<i8>,
    sc: Vec<f32>,
    sm: Vec<f32>,
}

impl Wide {
    fn fill(&mut self, blocks: &[BlockQ8]) {
        self.qs.clear();
        self.sc.clear();
        self.sm.clear();
        for b in blocks {
            self.qs.extend_from_slice(&b.qs);
            self.sc.extend_from_slice(&[b.d; 8]);
            self.sm.extend_from_slice(&[b.s / 8.0; 8]);
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Output rows per rayon task: enough work per task (`MIN_MACS`) to hide the fork/join cost,
/// and a few tasks per thread for balance. Multiples of 4 rows.
const MIN_MACS: usize = 1 << 16;

impl Matrix {
    /// Takes a 2-D tensor; checks that its bytes match its shape and type.
    pub fn from_raw(t: RawTensor) -> Result<Matrix> {
        let (rows, cols) = match t.shape[..] {
            [r, c] => (r, c),
            [c] => (1, c),
            _ => {
                return Err(ModelError::TensorShape {
                    name: t.name,
                    expected: vec![0, 0],
                    found: t.shape,
                })
            }
        };
        let bs = t.dtype.block_size();
        if cols % bs != 0 {
            return Err(ModelError::format(
                "tensor",
                t.name,
                format!(
                    "{} columns is not a multiple of the {} block size {bs}",
                    cols,
                    t.dtype.name()
                ),
            ));
        }
        let row_bytes = cols / bs * t.dtype.block_bytes();
        let want = row_bytes.checked_mul(rows);
        if want != Some(t.data.bytes().len()) {
            return Err(ModelError::format(
                "tensor",
                t.name,
                format!(
                    "{} bytes for a {} [{rows}][{cols}] matrix, expected {want:?}",
                    t.data.bytes().len(),
                    t.dtype.name()
                ),
            ));
        }
        Ok(Matrix {
            name: t.name,
            dtype: t.dtype,
            rows,
            cols,
            data: t.data,
            row_bytes,
        })
    }

    /// An F32 matrix from row-major values (random-weight models, tests).
    pub fn from_f32(name: impl Into<String>, rows: usize, cols: usize, w: Vec<f32>) -> Matrix {
        assert_eq!(
            w.len(),
            rows * cols,
            "from_f32: {} values for [{rows}][{cols}]",
            w.len()
        );
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        Matrix {
            name: name.into(),
            dtype: DType::F32,
            rows,
            cols,
            data: Storage::Owned(Arc::new(bytes)),
            row_bytes: cols * 4,
        }
    }

    /// The raw bytes of row `row` (ggml layout).
    pub fn row_bytes(&self, row: usize) -> &[u8] {
        &self.data.bytes()[row * self.row_bytes..(row + 1) * self.row_bytes]
    }

    /// `out[i][r] = sum_c x[i][c] * W[r][c]` for `i < n`; `x` is `[n][cols]`, `out` is `[n][rows]`.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_with(KernelPath::detect(), x, n, out)
    }

    /// [`Matrix::matmul`] on a given kernel path (must be one of [`KernelPath::available`]).
    pub fn matmul_with(&self, path: KernelPath, x: &[f32], n: usize, out: &mut [f32]) {
        assert!(
            x.len() >= n * self.cols,
            "{}: x has {} values, need {n}x{}",
            self.name,
            x.len(),
            self.cols
        );
        assert!(
            out.len() >= n * self.rows,
            "{}: out has {} values, need {n}x{}",
            self.name,
            out.len(),
            self.rows
        );
        if n == 0 || self.rows == 0 {
            return;
        }
        assert!(
            path.is_supported(),
            "kernel path {path:?} not supported on this CPU"
        );
        let x = &x[..n * self.cols];
        let out = &mut out[..n * self.rows];
        let mut fresh = None;
        SCRATCH.with(|cell| {
            // A nested call on this thread (rayon work stealing) gets its own buffers.
            let mut guard = cell.try_borrow_mut();
            let scratch = match guard.as_deref_mut() {
                Ok(s) => s,
                Err(_) => fresh.insert(Scratch::default()),
            };
            let act = match self.dtype {
                DType::F32 | DType::F16 | DType::BF16 => Act::F32(x),
                DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q8_0 => {
                    let nb = n * self.cols / dequant::QK;
                    scratch.q8.resize(nb, BlockQ8::default());
                    quantize_q8(path, x, &mut scratch.q8);
                    if path == KernelPath::Avx512Vnni && (self.cols / dequant::QK).is_multiple_of(2)
                    {
                        scratch.wide.fill(&scratch.q8);
                        Act::Wide(&scratch.wide)
                    } else {
                        Act::Q8(&scratch.q8)
                    }
                }
                DType::Q4_K | DType::Q6_K => {
                    let nb = n * self.cols / dequant::QK_K;
                    scratch.q8k.resize(nb, BlockQ8K::default());
                    q8::quantize_row_q8k_ref(x, &mut scratch.q8k);
                    Act::Q8K(&scratch.q8k)
                }
            };
            if n == 1 {
                self.run(path, &act, 1, out);
            } else {
                // Tasks own contiguous `[rows][n]` slices; transpose to `[n][rows]` after.
                scratch.out_t.resize(n * self.rows, 0.0);
                self.run(path, &act, n, &mut scratch.out_t);
                for (r, o) in scratch.out_t.chunks_exact(n).enumerate() {
                    for (i, v) in o.iter().enumerate() {
                        out[i * self.rows + r] = *v;
                    }
                }
            }
        });
    }

    /// Computes `out_t[r][i]` (`[rows][n]`) over rayon tasks of whole rows.
    fn run(&self, path: KernelPath, act: &Act, n: usize, out_t: &mut [f32]) {
        let macs = self.rows * self.cols * n;
        let threads = rayon::current_num_threads().max(1);
        let tasks = (macs / MIN_MACS).clamp(1, threads * 4);
        if tasks <= 1 || threads == 1 {
            self.run_rows(path, act, n, 0, out_t);
            return;
        }
        let chunk = self.rows.div_ceil(tasks).next_multiple_of(4);
        out_t
            .par_chunks_mut(chunk * n)
            .enumerate()
            .for_each(|(t, o)| {
                self.run_rows(path, act, n, t * chunk, o);
            });
    }

    /// Rows `r0 .. r0 + out.len() / n` into `out` (`[rows][n]`), 4 activation rows per tile.
    fn run_rows(&self, path: KernelPath, act: &Act, n: usize, r0: usize, out: &mut [f32]) {
        let nr = out.len() / n;
        let w = &self.data.bytes()[r0 * self.row_bytes..(r0 + nr) * self.row_bytes];
        let mut i = 0;
        while i < n {
            // The 512-bit kernel has 32 registers: 8 activation rows per weight block there.
            let step = match (act, n - i) {
                (Act::Wide(_), 8..) => 8,
                (_, 4..) => 4,
                _ => 1,
            };
            match act {
                Act::F32(x) => {
                    let c = self.cols;
                    let row = |k: usize| &x[(i + k) * c..(i + k + 1) * c];
                    if step == 4 {
                        rows_f32(
                            path,
                            self.dtype,
                            w,
                            self.row_bytes,
                            [row(0), row(1), row(2), row(3)],
                            out,
                            n,
                            i,
                        );
                    } else {
                        rows_f32(path, self.dtype, w, self.row_bytes, [row(0)], out, n, i);
                    }
                }
                Act::Q8(x) => {
                    let c = self.cols / dequant::QK;
                    let row = |k: usize| &x[(i + k) * c..(i + k + 1) * c];
                    if step == 4 {
                        rows_q8(
                            path,
                            self.dtype,
                            w,
                            self.row_bytes,
                            [row(0), row(1), row(2), row(3)],
                            out,
                            n,
                            i,
                        );
                    } else {
                        rows_q8(path, self.dtype, w, self.row_bytes, [row(0)], out, n, i);
                    }
                }
                #[cfg(target_arch = "x86_64")]
                Act::Wide(x) => {
                    let c = self.cols;
                    let row = |k: usize| x86::WideRow {
                        qs: &x.qs[(i + k) * c..(i + k + 1) * c],
                        sc: &x.sc[(i + k) * c / 4..(i + k + 1) * c / 4],
                        sm: &x.sm[(i + k) * c / 4..(i + k + 1) * c / 4],
                    };
                    let (dt, rb) = (self.dtype, self.row_bytes);
                    // SAFETY: `Act::Wide` is only built on the Avx512Vnni path, which
                    // matmul_with checked is available; rows are whole, slices sized above.
                    unsafe {
                        if step == 8 {
                            x86::rows_q8_avx512::<8>(
                                dt,
                                w,
                                rb,
                                std::array::from_fn(row),
                                out,
                                n,
                                i,
                            );
                        } else if step == 4 {
                            x86::rows_q8_avx512::<4>(
                                dt,
                                w,
                                rb,
                                std::array::from_fn(row),
                                out,
                                n,
                                i,
                            );
                        } else {
                            x86::rows_q8_avx512(dt, w, rb, [row(0)], out, n, i);
                        }
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                Act::Wide(_) => unreachable!(),
                Act::Q8K(x) => {
                    let c = self.cols / dequant::QK_K;
                    let row = |k: usize| &x[(i + k) * c..(i + k + 1) * c];
                    if step == 4 {
                        rows_q8k(
                            path,
                            self.dtype,
                            w,
                            self.row_bytes,
                            [row(0), row(1), row(2), row(3)],
                            out,
                            n,
                            i,
                        );
                    } else {
                        rows_q8k(path, self.dtype, w, self.row_bytes, [row(0)], out, n, i);
                    }
                }
            }
            i += step;
        }
    }

    /// Row `row` as f32 (embedding lookup).
    pub fn row_f32(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "{}: row {row} of {}", self.name, self.rows);
        dequantize_row_ref(self.dtype, self.row_bytes(row), &mut out[..self.cols]);
    }

    /// Bytes of weights this matrix holds in memory (or maps).
    pub fn n_bytes(&self) -> usize {
        self.data.bytes().len()
    }
}

/// Dequantizes a whole tensor of any supported type to f32 (vectors: norms, biases).
pub fn dequantize(t: &RawTensor) -> Result<Vec<f32>> {
    let n = t.n_elements();
    let want = t.dtype.bytes_for(n as u64);
    if want != Some(t.data.bytes().len() as u64) {
        return Err(ModelError::format(
            "tensor",
            t.name.clone(),
            format!(
                "{} bytes for {n} {} elements, expected {want:?}",
                t.data.bytes().len(),
                t.dtype.name()
            ),
        ));
    }
    let mut y = vec![0.0; n];
    dequantize_row_ref(t.dtype, t.data.bytes(), &mut y);
    Ok(y)
}

fn quantize_q8(path: KernelPath, x: &[f32], y: &mut [BlockQ8]) {
    #[cfg(target_arch = "x86_64")]
    if path != KernelPath::Scalar {
        // SAFETY: `path` is only non-scalar when AVX2/FMA were detected (checked in matmul_with).
        unsafe { x86::quantize_row_q8_avx2(x, y) };
        return;
    }
    let _ = path;
    q8::quantize_row_q8_ref(x, y);
}

/// Scalar rows kernel: `out[r * n + i0 + k] = dot(W[r], xs[k])`.
fn rows_ref<T: ?Sized, const N: usize>(
    w: &[u8],
    row_bytes: usize,
    xs: [&T; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
    dot: impl Fn(&[u8], &T) -> f32,
) {
    for (wr, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        for k in 0..N {
            o[i0 + k] = dot(wr, xs[k]);
        }
    }
}

fn dot_f32_ref(dtype: DType, w: &[u8], x: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    match dtype {
        DType::F32 => {
            for (c, x) in w.chunks_exact(4).zip(x) {
                acc += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * x;
            }
        }
        DType::F16 => {
            for (c, x) in w.chunks_exact(2).zip(x) {
                acc += half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32() * x;
            }
        }
        DType::BF16 => {
            for (c, x) in w.chunks_exact(2).zip(x) {
                acc += half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32() * x;
            }
        }
        _ => unreachable!(),
    }
    acc
}

#[allow(clippy::too_many_arguments)]
fn rows_f32<const N: usize>(
    path: KernelPath,
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    xs: [&[f32]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if path != KernelPath::Scalar {
        // SAFETY: non-scalar paths imply AVX2+FMA+F16C (checked in matmul_with); slices are
        // sized by the caller: `w` whole rows, each `xs[k]` `cols` long, `out` `[rows][n]`.
        unsafe { x86::rows_float(dtype, w, row_bytes, xs, out, n, i0) };
        return;
    }
    let _ = path;
    rows_ref(w, row_bytes, xs, out, n, i0, |w, x| {
        dot_f32_ref(dtype, w, x)
    });
}

#[allow(clippy::too_many_arguments)]
fn rows_q8<const N: usize>(
    path: KernelPath,
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    xs: [&[BlockQ8]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if path != KernelPath::Scalar {
        let vnni = matches!(path, KernelPath::AvxVnni | KernelPath::Avx512Vnni);
        // SAFETY: as in rows_f32; `vnni` only when `x86::vnni_flavour()` found it.
        unsafe { x86::rows_q8(dtype, vnni, w, row_bytes, xs, out, n, i0) };
        return;
    }
    let _ = path;
    let dot = match dtype {
        DType::Q4_0 => q8::vec_dot_q4_0_ref,
        DType::Q4_1 => q8::vec_dot_q4_1_ref,
        DType::Q5_0 => q8::vec_dot_q5_0_ref,
        DType::Q8_0 => q8::vec_dot_q8_0_ref,
        _ => unreachable!(),
    };
    rows_ref(w, row_bytes, xs, out, n, i0, dot);
}

#[allow(clippy::too_many_arguments)]
fn rows_q8k<const N: usize>(
    path: KernelPath,
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    xs: [&[BlockQ8K]; N],
    out: &mut [f32],
    n: usize,
    i0: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if path != KernelPath::Scalar {
        // SAFETY: as in rows_f32.
        unsafe { x86::rows_q8k(dtype, w, row_bytes, xs, out, n, i0) };
        return;
    }
    let _ = path;
    let dot = match dtype {
        DType::Q4_K => q8::vec_dot_q4_k_ref,
        DType::Q6_K => q8::vec_dot_q6_k_ref,
        _ => unreachable!(),
    };
    rows_ref(w, row_bytes, xs, out, n, i0, dot);
}
