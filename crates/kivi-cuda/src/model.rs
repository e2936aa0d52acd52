//! The Llama forward pass on the GPU: [`CudaBackend`] implements `kivi_model`'s [`Backend`]
//! (the model itself is `kivi_model::llama::Llama`, written once for both backends).
//!
//! Weights are dequantized to a 16-bit type ([`HalfType`]: f16, or bf16 for models whose
//! activations exceed f16's range) at load (any GGUF or safetensors type the CPU reads, on the
//! host) and uploaded; GEMMs are cuBLAS (16-bit inputs, f32 accumulation and output);
//! activations are f32 between ops (GEMM inputs are rounded to the 16-bit type on the way in);
//! attention is [`GpuCache`]'s flash-decoding kernel over the f16 or KIVI cache. Sequences are
//! cache slots: `SeqId(slot)`.

use std::ops::Range;
use std::sync::Arc;
use std::sync::Mutex;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};
use kivi_core::SeqId;
use kivi_model::backend::{Backend, Rope};
use kivi_model::config::{Config, RopeStyle};
use kivi_model::llama::{LayerWeights, Llama, QkvBias, Weights};
use kivi_model::matrix::dequantize;
use kivi_model::runner::SampleSpec;
use kivi_model::tensor::{DType, RawTensor};
use kivi_model::ModelError;

use crate::activation::{Activation, ActivationPool};
use crate::cache::{GpuBatch, GpuCache};
use crate::graph::{GraphStats, Graphs, Op, Submit};
use crate::profile::{ProfileMode, Profiler, StepKind};
use crate::{Error, Gpu};

pub(crate) const SOURCE: &str = include_str!("model.cu");
pub(crate) const MODULE: &str = "model";
/// Token sampling: its own module, compiled on first use.
pub(crate) const SAMPLE_SOURCE: &str = include_str!("sample.cu");
pub(crate) const SAMPLE_MODULE: &str = "sample";
const ROW_THREADS: u32 = 256;
/// Matmuls of at most this many rows (and inputs of at most [`GEMV_MAX_INPUT_BYTES`]) run
/// `gemv_small` instead of cuBLAS (`GEMV_MAX_ROWS` in model.cu; `KIVI_CUDA_GEMV=0` to use
/// cuBLAS). Measured on the H200, Llama-2-7B batch 1 with CUDA graphs: GEMMs 4.36 vs 4.82 ms of
/// GPU time per pass, 191 vs 180 tok/s; SmolLM2-135M 712 vs 582 tok/s.
const GEMV_MAX_ROWS: usize = 2;
/// The 16-bit input rows `gemv_small` stages in shared memory (the default 48 KiB a launch may
/// take without opting in to more).
const GEMV_MAX_INPUT_BYTES: usize = 48 << 10;
/// Whether sampled tokens are drawn on the GPU (`sample.cu`, the default) rather than on the
/// host from a logits row copied back (`KIVI_CUDA_DEVICE_SAMPLING=0`). Same distribution
/// (tested against f64 reference frequencies); for the same draw the GPU picks in token order,
/// the host in logit order, so the two give other tokens for the same seed.
pub fn device_sampling_default() -> bool {
    std::env::var_os("KIVI_CUDA_DEVICE_SAMPLING").is_none_or(|v| v != "0")
}

/// Heads per CTA of the `rope_heads` kernel (`ROPE_HEADS` in model.cu), and its largest head_dim
/// (`2 * ROPE_MAX_HALF`); it takes head dims that are multiples of 8.
pub const ROPE_HEADS: usize = 8;
const ROPE_MAX_HEAD_DIM: usize = 256;

/// The model on a GPU.
pub type CudaModel = Llama<CudaBackend>;

/// A `[rows][cols]` weight matrix on the GPU, in the backend's [`HalfType`].
pub struct GpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: CudaSlice<u16>,
}

/// The 16-bit copy of a GEMM input (cuBLAS reads the [`HalfType`]; activations are f32).
#[derive(Default)]
struct Gemm16 {
    buf: Option<CudaSlice<u16>>,
    /// `(device address, elements)` of the f32 activation `buf` already holds: rmsnorm and
    /// swiglu write their output's copy as they go, so the GEMMs after them (q, k, v; gate, up;
    /// down; logits) convert nothing. Every other op that writes an activation clears it.
    holds: Option<(u64, usize)>,
}

impl Gemm16 {
    /// Whether the buffer must grow to hold `n` elements.
    fn too_small(&self, n: usize) -> bool {
        self.buf.as_ref().is_none_or(|b| b.len() < n)
    }

    /// The buffer's address, grown to at least `n` elements (the caller ended any open graph
    /// segment first if [`Gemm16::too_small`]: the old buffer is freed).
    fn reserve(&mut self, s: &Arc<cudarc::driver::CudaStream>, n: usize) -> R<u64> {
        if self.too_small(n) {
            self.buf = Some(s.alloc_zeros::<u16>(n.max(1)).map_err(err)?);
            self.holds = None;
        }
        Ok(self.buf.as_ref().expect("allocated above").device_ptr(s).0)
    }
}

/// The 16-bit type of the weights and GEMM inputs on the GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HalfType {
    /// IEEE half: 10 mantissa bits, largest value 65504.
    #[default]
    F16,
    /// bfloat16: f32's range with 7 mantissa bits (models whose activations overflow f16, and
    /// checkpoints stored in bf16).
    Bf16,
}

impl HalfType {
    /// Parses `f16` or `bf16`.
    pub fn parse(s: &str) -> Option<HalfType> {
        match s {
            "f16" => Some(HalfType::F16),
            "bf16" => Some(HalfType::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HalfType::F16 => "f16",
            HalfType::Bf16 => "bf16",
        }
    }

    /// The bits of `x` rounded to this type (nearest even).
    pub fn from_f32(self, x: f32) -> u16 {
        match self {
            HalfType::F16 => f16::from_f32(x).to_bits(),
            HalfType::Bf16 => bf16::from_f32(x).to_bits(),
        }
    }

    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            HalfType::F16 => f16::from_bits(bits).to_f32(),
            HalfType::Bf16 => bf16::from_bits(bits).to_f32(),
        }
    }

    fn cuda_type(self) -> cudaDataType {
        match self {
            HalfType::F16 => cudaDataType::CUDA_R_16F,
            HalfType::Bf16 => cudaDataType::CUDA_R_16BF,
        }
    }

    /// The model kernels' module for this type, and its compile switches.
    pub(crate) fn module(self) -> (&'static str, Vec<String>) {
        match self {
            HalfType::F16 => (MODULE, Vec::new()),
            HalfType::Bf16 => ("model_bf16", vec!["-DHALF_BF16=1".to_string()]),
        }
    }
}

pub struct CudaBackend {
    gpu: Arc<Gpu>,
    blas: CudaBlas,
    half: HalfType,
    /// Matmuls of one or two rows through `gemv_small` (default; `KIVI_CUDA_GEMV=0`: cuBLAS).
    small_gemv: bool,
    /// The model kernels' module (per [`HalfType`]) and its compile switches.
    module: (&'static str, Vec<String>),
    /// 16-bit copy of the current GEMM input. Mutexes (uncontended: one thread drives a model)
    /// rather than RefCells make the model Sync, so a server's engine thread can own a
    /// `GpuRunner` over it.
    x16: Mutex<Gemm16>,
    /// RoPE inverse frequencies on the device (uploaded on first use).
    inv_freq: Mutex<Option<(Vec<f32>, CudaSlice<f32>)>>,
    profiler: Profiler,
    /// Decode steps' fixed-shape ops replayed from CUDA graphs (`graph.rs`; default on,
    /// `KIVI_CUDA_GRAPHS=0` or [`CudaBackend::set_graphs`] to run every op eagerly).
    graphs_on: bool,
    graphs: Mutex<Graphs>,
    pool: Arc<Mutex<ActivationPool>>,
    /// cuBLAS's workspace, ours (so that no GEMM allocates inside a graph capture).
    _blas_workspace: CudaSlice<u8>,
}

/// cuBLAS workspace (NVIDIA's recommendation for Hopper: 32 MiB).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

fn err(e: impl Into<Error>) -> ModelError {
    ModelError::Backend(e.into().to_string())
}

impl From<cudarc::cublas::result::CublasError> for Error {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        Error::Unsupported(format!("cuBLAS: {e:?}"))
    }
}

type R<T> = kivi_model::Result<T>;

/// Grid for a grid-stride elementwise kernel over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// A backend with f16 weights and GEMM inputs.
    pub fn new(gpu: Arc<Gpu>) -> crate::Result<CudaBackend> {
        Self::with_half(gpu, HalfType::F16)
    }

    /// A backend whose weights and GEMM inputs are `half`.
    pub fn with_half(gpu: Arc<Gpu>, half: HalfType) -> crate::Result<CudaBackend> {
        let blas = CudaBlas::new(gpu.stream().clone())?;
        let workspace = gpu.stream().alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)?;
        {
            let (ptr, _guard) = workspace.device_ptr(gpu.stream());
            // SAFETY: the workspace is a live device buffer of the given size, owned by the
            // backend as long as the handle.
            unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut _,
                    BLAS_WORKSPACE_BYTES,
                )
                .result()?
            };
        }
        let module = half.module();
        // Compile (or load) the kernels now, so that timing never includes it.
        gpu.function_with(module.0, SOURCE, &module.1, "rmsnorm")?;
        let profiler = Profiler::new(gpu.context().clone(), gpu.stream().clone());
        let gpu_stream = gpu.stream().clone();
        Ok(CudaBackend {
            gpu,
            blas,
            half,
            small_gemv: std::env::var_os("KIVI_CUDA_GEMV").is_none_or(|v| v != "0"),
            module,
            x16: Mutex::new(Gemm16::default()),
            inv_freq: Mutex::new(None),
            profiler,
            graphs_on: std::env::var_os("KIVI_CUDA_GRAPHS").is_none_or(|v| v != "0"),
            graphs: Mutex::new(Graphs::new(gpu_stream)),
            pool: Arc::new(Mutex::new(ActivationPool::default())),
            _blas_workspace: workspace,
        })
    }

    /// GPU time per op (off unless enabled; see [`Profiler`]).
    pub fn profiler(&self) -> &Profiler {
        &self.profiler
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn gemm16(&self) -> std::sync::MutexGuard<'_, Gemm16> {
        self.x16.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An op is about to write an activation: the 16-bit copy no longer matches any.
    fn activation_written(&self) {
        self.gemm16().holds = None;
    }

    /// The 16-bit type of the weights and GEMM inputs.
    pub fn half(&self) -> HalfType {
        self.half
    }

    /// Matmuls of at most 2 rows through the small-batch kernel (`gemv_small`, the default) or
    /// cuBLAS (false; also `KIVI_CUDA_GEMV=0`).
    pub fn set_small_gemv(&mut self, on: bool) {
        self.small_gemv = on;
    }

    /// Replays decode steps' fixed-shape ops from CUDA graphs (true, the default) or launches
    /// every op as it comes (false; also `KIVI_CUDA_GRAPHS=0`).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs_on = on;
        if !on {
            self.graphs_state().clear();
        }
    }

    /// What the CUDA graphs did so far.
    pub fn graph_stats(&self) -> GraphStats {
        self.graphs_state().stats()
    }

    fn graphs_state(&self) -> std::sync::MutexGuard<'_, Graphs> {
        self.graphs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one fixed-shape op: launched now, into the open capture, or queued for its
    /// segment's graph (see `graph.rs`).
    fn run(&self, op: Op) -> R<()> {
        if self.graphs_state().submit(&op) == Submit::Queued {
            return Ok(());
        }
        match self.launch_op(&op) {
            Ok(()) => Ok(()),
            Err(e) => {
                let mut g = self.graphs_state();
                if !g.capturing() {
                    return Err(e);
                }
                // Refused inside a capture: none of the segment's ops ran; run them as usual.
                let ops = g.abort_capture();
                drop(g);
                ops.iter().try_for_each(|o| self.launch_op(o))
            }
        }
    }

    /// Ends the open graph segment before stream work that is not an [`Op`] (attention,
    /// copies, allocations, reading results back).
    fn end_segment(&self) -> R<()> {
        let mut g = self.graphs_state();
        let _span = g.active().then(|| self.profiler.span("graph"));
        let ops = g.boundary().map_err(err)?;
        drop(g);
        ops.iter().try_for_each(|o| self.launch_op(o))
    }

    /// The address of the 16-bit GEMM input buffer, grown to `n` elements (ending the open
    /// graph segment first if it must grow: its ops may use the old buffer).
    fn x16_for(&self, n: usize) -> R<(std::sync::MutexGuard<'_, Gemm16>, u64)> {
        if self.gemm16().too_small(n) {
            self.end_segment()?;
        }
        let mut g16 = self.gemm16();
        let ptr = g16.reserve(self.gpu.stream(), n)?;
        Ok((g16, ptr))
    }

    /// The 16-bit copy of GEMM input `x` (`n_in` values): converted now unless rmsnorm or swiglu
    /// left it; `outs` are about to be written (a copy that described one of them is stale).
    fn gemm_input(&self, x: &Activation, n_in: usize, outs: &[u64]) -> R<u64> {
        let x_addr = x.device_ptr(self.gpu.stream()).0;
        let (mut g16, x16) = self.x16_for(n_in)?;
        let converted = g16.holds == Some((x_addr, n_in));
        if g16.holds.is_some_and(|(a, _)| outs.contains(&a)) {
            g16.holds = None;
        }
        drop(g16);
        if !converted {
            let _span = self.profiler.span("to_half");
            self.run(Op::ToHalf {
                x: x_addr,
                x16,
                n: n_in as i64,
            })?;
        }
        Ok(x16)
    }

    /// `out = rmsnorm(x (+ y unless y is 0)) * w` over the rows of `x_len` values (see
    /// `rmsnorm` in model.cu), leaving the 16-bit copy of `out` for the next GEMMs.
    fn norm(
        &self,
        out: &mut Activation,
        x: u64,
        y: u64,
        x_len: usize,
        w: &CudaSlice<f32>,
        eps: f32,
    ) -> R<()> {
        let h = w.len();
        let rows = x_len.min(out.len()) / h;
        if rows == 0 {
            return Ok(());
        }
        let _span = self.profiler.span("rmsnorm");
        let s = self.gpu.stream();
        let out_addr = out.device_ptr(s).0;
        let (mut g16, out16) = self.x16_for(rows * h)?;
        g16.holds = Some((out_addr, rows * h));
        drop(g16);
        self.run(Op::RmsNorm {
            out: out_addr,
            out16,
            x,
            y,
            w: w.device_ptr(s).0,
            h: h as i32,
            rows: rows as u32,
            eps,
        })
    }

    /// Whether a matmul of `rows` rows of `cols` goes through `gemv_small`.
    fn gemv_fits(&self, rows: usize, cols: usize) -> bool {
        self.small_gemv
            && rows <= GEMV_MAX_ROWS
            && cols.is_multiple_of(8)
            && rows * cols * 2 <= GEMV_MAX_INPUT_BYTES
    }

    /// Launches one op on the stream (the only place the forward pass's fixed-shape kernels
    /// and GEMMs are launched, whether eagerly or into a graph capture).
    fn launch_op(&self, op: &Op) -> R<()> {
        let s = self.gpu.stream();
        let row_cfg = |rows: u32| LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY (every arm): an op is built by the backend method of the same name from live
        // buffers whose sizes it checked, and launched before any of them is freed or reused
        // (a queued op runs at its segment's end, inside the same forward pass).
        let launched = match *op {
            Op::RmsNorm {
                out,
                out16,
                x,
                y,
                w,
                h,
                rows,
                eps,
            } => {
                let f = self.f("rmsnorm")?;
                unsafe {
                    s.launch_builder(&f)
                        .arg(&out)
                        .arg(&out16)
                        .arg(&x)
                        .arg(&y)
                        .arg(&w)
                        .arg(&h)
                        .arg(&eps)
                        .launch(row_cfg(rows))
                }
            }
            Op::ToHalf { x, x16, n } => {
                let f = self.f("to_half")?;
                unsafe {
                    s.launch_builder(&f)
                        .arg(&x)
                        .arg(&x16)
                        .arg(&n)
                        .launch(elementwise((n as usize).div_ceil(4)))
                }
            }
            Op::Gemm {
                w,
                x16,
                out,
                n_out,
                rows,
                cols,
            } => {
                // Row-major out[rows][n_out] = x[rows][cols] · Wᵀ is, column-major,
                // out (n_out × rows) = Wᵀ(n_out × cols) · x (cols × rows), W read as
                // (cols × n_out).
                let (alpha, beta) = (1.0f32, 0.0f32);
                return unsafe {
                    cudarc::cublas::result::gemm_ex(
                        *self.blas.handle(),
                        cublasOperation_t::CUBLAS_OP_T,
                        cublasOperation_t::CUBLAS_OP_N,
                        n_out,
                        rows,
                        cols,
                        (&alpha) as *const f32 as *const _,
                        w as *const _,
                        self.half.cuda_type(),
                        cols,
                        x16 as *const _,
                        self.half.cuda_type(),
                        cols,
                        (&beta) as *const f32 as *const _,
                        out as *mut _,
                        cudaDataType::CUDA_R_32F,
                        n_out,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(err);
            }
            Op::Gemv {
                w,
                out,
                n_out,
                x16,
                rows,
                cols,
            } => {
                let f = self.f("gemv_small")?;
                let ctas: u32 = n_out.iter().map(|&n| (n as u32).div_ceil(8)).sum();
                let cfg = LaunchConfig {
                    grid_dim: (ctas, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: (rows * cols * 2) as u32,
                };
                unsafe {
                    s.launch_builder(&f)
                        .arg(&w[0])
                        .arg(&w[1])
                        .arg(&w[2])
                        .arg(&out[0])
                        .arg(&out[1])
                        .arg(&out[2])
                        .arg(&n_out[0])
                        .arg(&n_out[1])
                        .arg(&n_out[2])
                        .arg(&x16)
                        .arg(&rows)
                        .arg(&cols)
                        .launch(cfg)
                }
            }
            Op::AddBias { x, b, width, n } => {
                let f = self.f("add_bias")?;
                unsafe {
                    s.launch_builder(&f)
                        .arg(&x)
                        .arg(&b)
                        .arg(&width)
                        .arg(&n)
                        .launch(elementwise(n as usize))
                }
            }
            Op::Rope {
                x,
                toks,
                inv_freq,
                heads,
                head_dim,
                neox,
                rows,
                vector,
            } => {
                let f = self.f(if vector {
                    "rope_heads"
                } else {
                    "rope_per_head"
                })?;
                let cfg = if vector {
                    LaunchConfig {
                        grid_dim: (rows, (heads as u32).div_ceil(ROPE_HEADS as u32), 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    }
                } else {
                    LaunchConfig {
                        grid_dim: (rows, heads as u32, 1),
                        block_dim: ((head_dim / 2) as u32, 1, 1),
                        shared_mem_bytes: 0,
                    }
                };
                unsafe {
                    s.launch_builder(&f)
                        .arg(&x)
                        .arg(&toks)
                        .arg(&inv_freq)
                        .arg(&heads)
                        .arg(&head_dim)
                        .arg(&neox)
                        .launch(cfg)
                }
            }
            Op::Swiglu {
                gate,
                gate16,
                up,
                n,
            } => {
                let f = self.f("swiglu")?;
                unsafe {
                    s.launch_builder(&f)
                        .arg(&gate)
                        .arg(&gate16)
                        .arg(&up)
                        .arg(&n)
                        .launch(elementwise((n as usize).div_ceil(4)))
                }
            }
            Op::Add { x, y, n } => {
                let f = self.f("add_inplace")?;
                unsafe {
                    s.launch_builder(&f)
                        .arg(&x)
                        .arg(&y)
                        .arg(&n)
                        .launch(elementwise(n as usize))
                }
            }
        };
        launched.map(|_| ()).map_err(err)
    }

    fn f(&self, name: &str) -> R<CudaFunction> {
        let (module, defines) = &self.module;
        self.gpu
            .function_with(module, SOURCE, defines, name)
            .map_err(err)
    }

    /// A `[rows][cols]` matrix of values in the backend's [`HalfType`] (bits).
    pub fn upload_half(&self, rows: usize, cols: usize, values: &[u16]) -> R<GpuMatrix> {
        assert_eq!(values.len(), rows * cols);
        self.end_segment()?;
        let data = self.gpu.stream().clone_htod(values).map_err(err)?;
        Ok(GpuMatrix { rows, cols, data })
    }

    /// A `[rows][cols]` matrix of deterministic pseudo-random 16-bit values in
    /// `center ± spread` (random-weights mode).
    pub fn random_matrix(
        &self,
        rows: usize,
        cols: usize,
        center: f32,
        spread: f32,
        seed: u64,
    ) -> R<GpuMatrix> {
        let n = rows * cols;
        self.end_segment()?;
        let s = self.gpu.stream();
        let mut data = s.alloc_zeros::<u16>(n.max(1)).map_err(err)?;
        let f = self.f("fill_random_half")?;
        let n64 = n as i64;
        // SAFETY: data holds n elements.
        unsafe {
            s.launch_builder(&f)
                .arg(&mut data)
                .arg(&n64)
                .arg(&center)
                .arg(&spread)
                .arg(&seed)
                .launch(elementwise(n))
                .map_err(err)?
        };
        Ok(GpuMatrix { rows, cols, data })
    }

    /// Copies a device buffer to the host.
    pub fn to_host(&self, x: &CudaSlice<f32>) -> R<Vec<f32>> {
        self.end_segment()?;
        self.gpu.stream().clone_dtoh(x).map_err(err)
    }

    /// Index of the largest value of each of the `rows` rows of `logits` (`[rows][vocab]`),
    /// computed on the GPU; only the indices are copied back.
    pub fn argmax(&self, logits: &CudaSlice<f32>, rows: usize, vocab: usize) -> R<Vec<u32>> {
        if rows == 0 {
            return Ok(Vec::new());
        }
        self.end_segment()?;
        let _span = self.profiler.span("argmax");
        let s = self.gpu.stream();
        let mut out = s.alloc_zeros::<u32>(rows).map_err(err)?;
        let f = self.f("argmax_rows")?;
        let v = vocab as i32;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        assert!(logits.len() >= rows * vocab);
        // SAFETY: logits holds rows * vocab values, out rows.
        unsafe {
            s.launch_builder(&f)
                .arg(logits)
                .arg(&v)
                .arg(&mut out)
                .launch(cfg)
                .map_err(err)?
        };
        s.clone_dtoh(&out).map_err(err)
    }

    /// Samples one token per `(row, spec)` from `logits` (`[rows][vocab]`) on the GPU
    /// (sample.cu: temperature, top-k, top-p, the uniform draw `spec.u`); only the ids come
    /// back.
    pub fn sample_rows(
        &self,
        logits: &CudaSlice<f32>,
        vocab: usize,
        rows: &[(usize, SampleSpec)],
    ) -> R<Vec<u32>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        assert!(rows.iter().all(|&(r, _)| (r + 1) * vocab <= logits.len()));
        self.end_segment()?;
        let _span = self.profiler.span("sample");
        // `SampleRow` in sample.cu: row, temperature, top_k, top_p, u (4 bytes each).
        let packed: Vec<u32> = rows
            .iter()
            .flat_map(|&(r, p)| {
                [
                    r as u32,
                    p.temperature.to_bits(),
                    p.top_k.min(i32::MAX as usize) as u32,
                    p.top_p.to_bits(),
                    p.u.clamp(0.0, 1.0).to_bits(),
                ]
            })
            .collect();
        let s = self.gpu.stream();
        let dev_rows = s.clone_htod(&packed).map_err(err)?;
        let mut out = s.alloc_zeros::<u32>(rows.len()).map_err(err)?;
        let f = self
            .gpu
            .function(SAMPLE_MODULE, SAMPLE_SOURCE, "sample_rows")
            .map_err(err)?;
        let v = vocab as i32;
        let cfg = LaunchConfig {
            grid_dim: (rows.len() as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every row index is a row of logits (asserted); dev_rows holds 5 words per
        // sampled row, out one id.
        unsafe {
            s.launch_builder(&f)
                .arg(logits)
                .arg(&v)
                .arg(&dev_rows)
                .arg(&mut out)
                .launch(cfg)
                .map_err(err)?
        };
        s.clone_dtoh(&out).map_err(err)
    }
}

/// Random weights on the GPU with the shapes of `config` and the scales of
/// `kivi_model::random::RandomWeights` (norms near 1, matrices ~ 1/sqrt(fan_in)); the values
/// differ from the host generator's. For speed and memory measurements: label the output.
pub fn random_model(backend: CudaBackend, config: Config, seed: u64) -> R<CudaModel> {
    let c = &config;
    let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
    let mut seed_n = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut next = || {
        seed_n = seed_n.wrapping_add(0x9e37_79b9_7f4a_7c15);
        seed_n
    };
    let w = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let b = &backend;
    let vector = |len: usize, center: f32, spread: f32, s: u64| -> R<CudaSlice<f32>> {
        let m = b.random_matrix(1, len, center, spread, s)?;
        let host: Vec<u16> = b.gpu.stream().clone_dtoh(&m.data).map_err(err)?;
        let v: Vec<f32> = host[..len].iter().map(|&x| b.half.to_f32(x)).collect();
        b.vector(v)
    };
    let mut layers = Vec::with_capacity(c.n_layer);
    for _ in 0..c.n_layer {
        layers.push(LayerWeights {
            attn_norm: vector(h, 1.0, 0.1, next())?,
            wq: b.random_matrix(q, h, 0.0, w(h), next())?,
            wk: b.random_matrix(kv, h, 0.0, w(h), next())?,
            wv: b.random_matrix(kv, h, 0.0, w(h), next())?,
            bias: if c.qkv_bias {
                Some(QkvBias {
                    q: vector(q, 0.0, 0.5, next())?,
                    k: vector(kv, 0.0, 0.5, next())?,
                    v: vector(kv, 0.0, 0.5, next())?,
                })
            } else {
                None
            },
            wo: b.random_matrix(h, q, 0.0, w(q), next())?,
            ffn_norm: vector(h, 1.0, 0.1, next())?,
            w_gate: b.random_matrix(f, h, 0.0, w(h), next())?,
            w_up: b.random_matrix(f, h, 0.0, w(h), next())?,
            w_down: b.random_matrix(h, f, 0.0, w(f), next())?,
        });
    }
    let weights = Weights {
        tok_embd: b.random_matrix(c.vocab, h, 0.0, 1.0, next())?,
        out_norm: vector(h, 1.0, 0.1, next())?,
        output: Some(b.random_matrix(c.vocab, h, 0.0, w(h), next())?),
        layers,
    };
    Ok(Llama::from_weights(backend, config, weights))
}

impl Backend for CudaBackend {
    type Act = Activation;
    type Weight = GpuMatrix;
    type Vector = CudaSlice<f32>;
    type Cache = GpuCache;
    type Step = GpuBatch;

    fn matrix(&self, t: RawTensor) -> R<GpuMatrix> {
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
        // Stored in the backend's own type: the bits as they are; anything else through f32.
        let same = matches!(
            (t.dtype, self.half),
            (DType::F16, HalfType::F16) | (DType::BF16, HalfType::Bf16)
        );
        let values: Vec<u16> = if same {
            let b = t.data.bytes();
            if b.len() != rows * cols * 2 {
                return Err(ModelError::format(
                    "tensor",
                    t.name.clone(),
                    format!(
                        "{} bytes for a {} [{rows}][{cols}] matrix",
                        b.len(),
                        t.dtype.name()
                    ),
                ));
            }
            b.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        } else {
            dequantize(&t)?
                .iter()
                .map(|&x| self.half.from_f32(x))
                .collect()
        };
        self.upload_half(rows, cols, &values)
    }

    fn vector(&self, v: Vec<f32>) -> R<CudaSlice<f32>> {
        self.end_segment()?;
        self.activation_written(); // may reuse a freed activation's address
        self.gpu.stream().clone_htod(&v).map_err(err)
    }

    fn weight_bytes(&self, w: &GpuMatrix) -> usize {
        w.rows * w.cols * 2
    }

    fn zeros(&self, len: usize) -> R<Activation> {
        self.end_segment()?;
        self.activation_written(); // may reuse a freed activation's address
        let len = len.max(1);
        let s = self.gpu.stream();
        let reused = self
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(len);
        let buf = match reused {
            Some(mut b) => {
                s.memset_zeros(&mut b).map_err(err)?;
                b
            }
            None => s.alloc_zeros::<f32>(len).map_err(err)?,
        };
        Ok(Activation::pooled(buf, &self.pool))
    }

    fn seq_len(&self, cache: &GpuCache, seq: SeqId) -> R<usize> {
        cache
            .seq_len(seq.0 as usize)
            .ok_or(ModelError::Cache(kivi_core::Error::UnknownSequence(seq)))
    }

    fn begin_step(&self, cache: &mut GpuCache, items: &[(SeqId, usize)]) -> R<GpuBatch> {
        let decode = items.iter().all(|&(_, n)| n <= 1);
        let kind = if decode {
            StepKind::Decode
        } else {
            StepKind::Mixed
        };
        // Decode steps replay graphs per batch size; GPU profiling times every op on its own.
        let rows: usize = items.iter().map(|&(_, n)| n).sum();
        let key =
            (self.graphs_on && decode && self.profiler.mode() != ProfileMode::Gpu).then_some(rows);
        self.graphs_state().begin(key);
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_step(rows);
        self.profiler.begin_step(kind);
        let _span = self.profiler.span("step upload");
        let items: Vec<(usize, usize)> = items.iter().map(|&(s, n)| (s.0 as usize, n)).collect();
        cache.batch(&items).map_err(err)
    }

    fn end_step(&self, cache: &mut GpuCache, step: GpuBatch) -> R<()> {
        self.end_segment()?;
        cache.advance(&step);
        Ok(())
    }

    fn flush(&self) -> R<()> {
        let ops = self.graphs_state().finish().map_err(err)?;
        ops.iter().try_for_each(|o| self.launch_op(o))
    }

    fn embed(&self, table: &GpuMatrix, tokens: &[u32], out: &mut Activation) -> R<()> {
        self.end_segment()?;
        self.activation_written();
        let _span = self.profiler.span("embed");
        let s = self.gpu.stream();
        let toks = s.clone_htod(tokens).map_err(err)?;
        let f = self.f("embed_half")?;
        let hidden = table.cols as i32;
        assert!(out.len() >= tokens.len() * table.cols);
        let cfg = LaunchConfig {
            grid_dim: (tokens.len() as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: token ids were checked < vocab (the table's rows) by the forward pass; out
        // holds tokens.len() rows.
        unsafe {
            s.launch_builder(&f)
                .arg(&table.data)
                .arg(&toks)
                .arg(&mut **out)
                .arg(&hidden)
                .launch(cfg)
                .map_err(err)?
        };
        Ok(())
    }

    fn rmsnorm(&self, out: &mut Activation, x: &Activation, w: &CudaSlice<f32>, eps: f32) -> R<()> {
        self.norm(out, x.device_ptr(self.gpu.stream()).0, 0, x.len(), w, eps)
    }

    fn add_rmsnorm(
        &self,
        x: &mut Activation,
        y: &Activation,
        out: &mut Activation,
        w: &CudaSlice<f32>,
        eps: f32,
    ) -> R<()> {
        self.activation_written(); // x changes
        let s = self.gpu.stream();
        let len = x.len().min(y.len());
        self.norm(out, x.device_ptr(s).0, y.device_ptr(s).0, len, w, eps)
    }

    /// `x` must come from this backend (an op's output, [`Backend::zeros`] or
    /// [`Backend::vector`]): the 16-bit copy rmsnorm and swiglu leave is matched by address, and
    /// only the backend's own allocations and ops invalidate it.
    fn matmul(&self, w: &GpuMatrix, x: &Activation, rows: usize, out: &mut Activation) -> R<()> {
        let n_in = rows * w.cols;
        if rows == 0 {
            return Ok(());
        }
        assert!(x.len() >= n_in && out.len() >= rows * w.rows);
        let s = self.gpu.stream();
        let out_addr = out.device_ptr(s).0;
        let x16 = self.gemm_input(x, n_in, &[out_addr])?;
        let (w_addr, n_out, r, cols) = (
            w.data.device_ptr(s).0,
            w.rows as i32,
            rows as i32,
            w.cols as i32,
        );
        if self.gemv_fits(rows, w.cols) {
            let _span = self.profiler.span("gemv");
            return self.run(Op::Gemv {
                w: [w_addr, 0, 0],
                out: [out_addr, 0, 0],
                n_out: [n_out, 0, 0],
                x16,
                rows: r,
                cols,
            });
        }
        let _span = self.profiler.span("gemm");
        self.run(Op::Gemm {
            w: w_addr,
            x16,
            out: out_addr,
            n_out,
            rows: r,
            cols,
        })
    }

    /// Two or three matrices of one input through `gemv_small` take one launch (q/k/v,
    /// gate/up at one or two rows); otherwise one matmul each.
    fn matmuls(
        &self,
        x: &Activation,
        rows: usize,
        outs: &mut [(&GpuMatrix, &mut Activation)],
    ) -> R<()> {
        let cols = outs.first().map_or(0, |(w, _)| w.cols);
        let one_launch = (2..=3).contains(&outs.len())
            && rows > 0
            && outs.iter().all(|(w, _)| w.cols == cols)
            && self.gemv_fits(rows, cols);
        if !one_launch {
            return outs
                .iter_mut()
                .try_for_each(|(w, out)| self.matmul(w, x, rows, out));
        }
        let n_in = rows * cols;
        let s = self.gpu.stream();
        let (mut w_addr, mut out_addr, mut n_out) = ([0u64; 3], [0u64; 3], [0i32; 3]);
        for (i, (w, out)) in outs.iter().enumerate() {
            assert!(x.len() >= n_in && out.len() >= rows * w.rows);
            w_addr[i] = w.data.device_ptr(s).0;
            out_addr[i] = out.device_ptr(s).0;
            n_out[i] = w.rows as i32;
        }
        let x16 = self.gemm_input(x, n_in, &out_addr[..outs.len()])?;
        let _span = self.profiler.span("gemv");
        self.run(Op::Gemv {
            w: w_addr,
            out: out_addr,
            n_out,
            x16,
            rows: rows as i32,
            cols: cols as i32,
        })
    }

    fn add_bias(&self, x: &mut Activation, b: &CudaSlice<f32>) -> R<()> {
        let n = x.len() / b.len() * b.len();
        self.activation_written();
        let _span = self.profiler.span("add_bias");
        let s = self.gpu.stream();
        self.run(Op::AddBias {
            x: x.device_ptr(s).0,
            b: b.device_ptr(s).0,
            width: b.len() as i32,
            n: n as i64,
        })
    }

    fn rope(&self, x: &mut Activation, heads: usize, rope: &Rope, step: &GpuBatch) -> R<()> {
        let rows = step.n_tokens;
        let d = rope.head_dim;
        if rows == 0 {
            return Ok(());
        }
        assert!(x.len() >= rows * heads * d);
        self.activation_written();
        let _span = self.profiler.span("rope");
        let s = self.gpu.stream();
        let inv_freq = {
            let mut cached = self.inv_freq.lock().unwrap_or_else(|e| e.into_inner());
            if cached.as_ref().is_none_or(|(h, _)| *h != rope.inv_freq) {
                drop(cached);
                self.end_segment()?; // a copy, and the old table is freed
                cached = self.inv_freq.lock().unwrap_or_else(|e| e.into_inner());
                let dev = s.clone_htod(&rope.inv_freq).map_err(err)?;
                *cached = Some((rope.inv_freq.clone(), dev));
            }
            let ptr = cached.as_ref().expect("uploaded above").1.device_ptr(s).0;
            ptr
        };
        // A CTA per (token, ROPE_HEADS heads), 16-byte accesses, each angle once per CTA.
        let x_addr = x.device_ptr(s).0;
        self.run(Op::Rope {
            x: x_addr,
            toks: step.dev_toks(),
            inv_freq,
            heads: heads as i32,
            head_dim: d as i32,
            neox: (rope.style == RopeStyle::Neox) as i32,
            rows: rows as u32,
            vector: d.is_multiple_of(8) && d <= ROPE_MAX_HEAD_DIM && x_addr.is_multiple_of(16),
        })
    }

    fn attend_append(
        &self,
        cache: &mut GpuCache,
        step: &GpuBatch,
        layer: usize,
        n_head: usize,
        q: &Activation,
        k: &Activation,
        v: &Activation,
        out: &mut Activation,
    ) -> R<()> {
        self.end_segment()?;
        self.activation_written();
        let span = self.profiler.span("attend");
        cache
            .attend(layer, n_head, step, q, k, v, out)
            .map_err(err)?;
        drop(span);
        let _span = self.profiler.span("append");
        cache.append(layer, step, k, v).map_err(err)
    }

    fn swiglu(&self, gate: &mut Activation, up: &Activation) -> R<()> {
        let _span = self.profiler.span("swiglu");
        let n = gate.len().min(up.len());
        let s = self.gpu.stream();
        let gate_addr = gate.device_ptr(s).0;
        let (mut g16, gate16) = self.x16_for(n)?;
        g16.holds = Some((gate_addr, n));
        drop(g16);
        self.run(Op::Swiglu {
            gate: gate_addr,
            gate16,
            up: up.device_ptr(s).0,
            n: n as i64,
        })
    }

    fn add(&self, x: &mut Activation, y: &Activation) -> R<()> {
        self.activation_written();
        let _span = self.profiler.span("add");
        let s = self.gpu.stream();
        self.run(Op::Add {
            x: x.device_ptr(s).0,
            y: y.device_ptr(s).0,
            n: x.len().min(y.len()) as i64,
        })
    }

    fn gather_rows(&self, x: &Activation, width: usize, rows: &[Range<usize>]) -> R<Activation> {
        let idx: Vec<i32> = rows
            .iter()
            .flat_map(|r| r.clone())
            .map(|i| i as i32)
            .collect();
        let mut out = self.zeros(idx.len() * width)?;
        if idx.is_empty() {
            return Ok(out);
        }
        assert!(idx.iter().all(|&i| (i as usize + 1) * width <= x.len()));
        self.activation_written();
        let _span = self.profiler.span("gather_rows");
        let s = self.gpu.stream();
        let dev_idx = s.clone_htod(&idx).map_err(err)?;
        let f = self.f("gather_rows")?;
        let w = width as i32;
        let cfg = LaunchConfig {
            grid_dim: (idx.len() as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every index is a row of x (asserted); out holds idx.len() rows.
        unsafe {
            s.launch_builder(&f)
                .arg(&**x)
                .arg(&dev_idx)
                .arg(&mut *out)
                .arg(&w)
                .launch(cfg)
                .map_err(err)?
        };
        Ok(out)
    }
}
