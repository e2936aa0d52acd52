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
use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::{bf16, f16};
use kivi_core::SeqId;
use kivi_model::backend::{Backend, Rope};
use kivi_model::config::{Config, RopeStyle};
use kivi_model::llama::{LayerWeights, Llama, QkvBias, Weights};
use kivi_model::matrix::dequantize;
use kivi_model::runner::SampleSpec;
use kivi_model::tensor::{DType, RawTensor};
use kivi_model::ModelError;

use crate::cache::{GpuBatch, GpuCache};
use crate::profile::{Profiler, StepKind};
use crate::{Error, Gpu};

pub(crate) const SOURCE: &str = include_str!("model.cu");
pub(crate) const MODULE: &str = "model";
/// Token sampling: its own module, compiled on first use.
pub(crate) const SAMPLE_SOURCE: &str = include_str!("sample.cu");
pub(crate) const SAMPLE_MODULE: &str = "sample";
const ROW_THREADS: u32 = 256;
/// With `KIVI_CUDA_GEMV=1`, matmuls of at most this many rows run `gemv_small`
/// (`GEMV_MAX_ROWS` in model.cu) instead of cuBLAS. Opt-in: on the H200 it cut the host's time
/// per launch from ~15 us (cuBLAS) to ~4 us, but its GPU time is worse than cuBLAS's (Llama-2-7B
/// decode B = 1: 6.8 vs 6.2 ms per token; B = 4: 11.9 vs 6.4 ms, re-reading x from L1 per row).
const GEMV_MAX_ROWS: usize = 8;
/// RoPE over at least this many rows runs one CTA per token (see `rope`).
pub const ROPE_PER_TOKEN_ROWS: usize = 1024;

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
    /// The buffer, grown to at least `n` elements.
    fn reserve(&mut self, s: &Arc<cudarc::driver::CudaStream>, n: usize) -> R<&mut CudaSlice<u16>> {
        if self.buf.as_ref().is_none_or(|b| b.len() < n) {
            self.buf = Some(s.alloc_zeros::<u16>(n.max(1)).map_err(err)?);
            self.holds = None;
        }
        Ok(self.buf.as_mut().expect("allocated above"))
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
    /// Matmuls of few rows through `gemv_small` (`KIVI_CUDA_GEMV=1`; default: cuBLAS).
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
}

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
        let module = half.module();
        // Compile (or load) the kernels now, so that timing never includes it.
        gpu.function_with(module.0, SOURCE, &module.1, "rmsnorm")?;
        let profiler = Profiler::new(gpu.context().clone(), gpu.stream().clone());
        Ok(CudaBackend {
            gpu,
            blas,
            half,
            small_gemv: std::env::var_os("KIVI_CUDA_GEMV").is_some_and(|v| v == "1"),
            module,
            x16: Mutex::new(Gemm16::default()),
            inv_freq: Mutex::new(None),
            profiler,
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

    /// Matmuls of at most 8 rows through the small-batch kernel (`gemv_small`) instead of
    /// cuBLAS (also `KIVI_CUDA_GEMV=1`; off by default: slower on the GPU, see `GEMV_MAX_ROWS`).
    pub fn set_small_gemv(&mut self, on: bool) {
        self.small_gemv = on;
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
        self.gpu.stream().clone_dtoh(x).map_err(err)
    }

    /// Index of the largest value of each of the `rows` rows of `logits` (`[rows][vocab]`),
    /// computed on the GPU; only the indices are copied back.
    pub fn argmax(&self, logits: &CudaSlice<f32>, rows: usize, vocab: usize) -> R<Vec<u32>> {
        if rows == 0 {
            return Ok(Vec::new());
        }
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

    fn launch_elementwise(&self, name: &str, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> R<()> {
        let n = x.len().min(y.len());
        let f = self.f(name)?;
        let n64 = n as i64;
        // SAFETY: both buffers hold at least n values.
        unsafe {
            self.gpu
                .stream()
                .launch_builder(&f)
                .arg(x)
                .arg(y)
                .arg(&n64)
                .launch(elementwise(n))
                .map_err(err)?
        };
        Ok(())
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
    type Act = CudaSlice<f32>;
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
        self.activation_written(); // may reuse a freed activation's address
        self.gpu.stream().clone_htod(&v).map_err(err)
    }

    fn weight_bytes(&self, w: &GpuMatrix) -> usize {
        w.rows * w.cols * 2
    }

    fn zeros(&self, len: usize) -> R<CudaSlice<f32>> {
        self.activation_written(); // may reuse a freed activation's address
        self.gpu
            .stream()
            .alloc_zeros::<f32>(len.max(1))
            .map_err(err)
    }

    fn seq_len(&self, cache: &GpuCache, seq: SeqId) -> R<usize> {
        cache
            .seq_len(seq.0 as usize)
            .ok_or(ModelError::Cache(kivi_core::Error::UnknownSequence(seq)))
    }

    fn begin_step(&self, cache: &mut GpuCache, items: &[(SeqId, usize)]) -> R<GpuBatch> {
        let kind = if items.iter().all(|&(_, n)| n <= 1) {
            StepKind::Decode
        } else {
            StepKind::Mixed
        };
        self.profiler.begin_step(kind);
        let _span = self.profiler.span("step upload");
        let items: Vec<(usize, usize)> = items.iter().map(|&(s, n)| (s.0 as usize, n)).collect();
        cache.batch(&items).map_err(err)
    }

    fn end_step(&self, cache: &mut GpuCache, step: GpuBatch) -> R<()> {
        cache.advance(&step);
        Ok(())
    }

    fn embed(&self, table: &GpuMatrix, tokens: &[u32], out: &mut CudaSlice<f32>) -> R<()> {
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
                .arg(out)
                .arg(&hidden)
                .launch(cfg)
                .map_err(err)?
        };
        Ok(())
    }

    fn rmsnorm(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
    ) -> R<()> {
        let h = w.len();
        let rows = x.len().min(out.len()) / h;
        if rows == 0 {
            return Ok(());
        }
        let _span = self.profiler.span("rmsnorm");
        let f = self.f("rmsnorm")?;
        let hi = h as i32;
        let s = self.gpu.stream();
        let out_addr = out.device_ptr(s).0;
        let mut g16 = self.gemm16();
        let out16 = g16.reserve(s, rows * h)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: out and x hold `rows` rows of h values, out16 as many, w holds h.
        unsafe {
            s.launch_builder(&f)
                .arg(out)
                .arg(&mut *out16)
                .arg(x)
                .arg(w)
                .arg(&hi)
                .arg(&eps)
                .launch(cfg)
                .map_err(err)?
        };
        g16.holds = Some((out_addr, rows * h));
        Ok(())
    }

    /// `x` must come from this backend (an op's output, [`Backend::zeros`] or
    /// [`Backend::vector`]): the 16-bit copy rmsnorm and swiglu leave is matched by address, and
    /// only the backend's own allocations and ops invalidate it.
    fn matmul(
        &self,
        w: &GpuMatrix,
        x: &CudaSlice<f32>,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> R<()> {
        let n_in = rows * w.cols;
        if rows == 0 {
            return Ok(());
        }
        assert!(x.len() >= n_in && out.len() >= rows * w.rows);
        let s = self.gpu.stream();
        if rows <= GEMV_MAX_ROWS && w.cols.is_multiple_of(8) && self.small_gemv {
            // Reads x as f32: no 16-bit copy needed; `out` is written, so a copy that
            // described it is stale.
            let out_addr = out.device_ptr(s).0;
            let mut g16 = self.gemm16();
            if g16.holds.is_some_and(|(a, _)| a == out_addr) {
                g16.holds = None;
            }
            drop(g16);
            let _span = self.profiler.span("gemv");
            let f = self.f("gemv_small")?;
            let (r, n_out, cols) = (rows as i32, w.rows as i32, w.cols as i32);
            let cfg = LaunchConfig {
                grid_dim: (w.rows.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: w holds w.rows x w.cols values (cols a multiple of 8: whole 16-byte
            // chunks per row), x at least rows x cols, out at least rows x w.rows (asserted).
            unsafe {
                s.launch_builder(&f)
                    .arg(&w.data)
                    .arg(x)
                    .arg(out)
                    .arg(&r)
                    .arg(&n_out)
                    .arg(&cols)
                    .launch(cfg)
                    .map_err(err)?
            };
            return Ok(());
        }
        let x_addr = x.device_ptr(s).0;
        let out_addr = out.device_ptr(s).0;
        let mut g16 = self.gemm16();
        let converted = g16.holds == Some((x_addr, n_in));
        if g16.holds.is_some_and(|(a, _)| a == out_addr) {
            g16.holds = None; // about to be overwritten
        }
        let x16 = g16.reserve(s, n_in)?;
        if !converted {
            let _span = self.profiler.span("to_half");
            let f = self.f("to_half")?;
            let n64 = n_in as i64;
            // SAFETY: x holds n_in values, x16 at least n_in.
            unsafe {
                s.launch_builder(&f)
                    .arg(x)
                    .arg(&mut *x16)
                    .arg(&n64)
                    .launch(elementwise(n_in))
                    .map_err(err)?
            };
        }
        let _span = self.profiler.span("gemm");
        // Row-major out[rows][w.rows] = x[rows][cols] · Wᵀ is, column-major,
        // out (w.rows × rows) = Wᵀ(w.rows × cols) · x (cols × rows) with W read as (cols × w.rows).
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (wp, _g1) = w.data.device_ptr(s);
        let (xp, _g2) = x16.device_ptr(s);
        let (op, _g3) = out.device_ptr_mut(s);
        // SAFETY: the pointers are live device buffers of the sizes asserted above, on the
        // stream the handle is bound to; alpha/beta are f32 as the compute type requires.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                w.rows as i32,
                rows as i32,
                w.cols as i32,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                self.half.cuda_type(),
                w.cols as i32,
                xp as *const _,
                self.half.cuda_type(),
                w.cols as i32,
                (&beta) as *const f32 as *const _,
                op as *mut _,
                cudaDataType::CUDA_R_32F,
                w.rows as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .map_err(err)?
        };
        Ok(())
    }

    fn add_bias(&self, x: &mut CudaSlice<f32>, b: &CudaSlice<f32>) -> R<()> {
        let n = x.len() / b.len() * b.len();
        self.activation_written();
        let _span = self.profiler.span("add_bias");
        let f = self.f("add_bias")?;
        let (width, n64) = (b.len() as i32, n as i64);
        // SAFETY: x holds n values; b holds `width`.
        unsafe {
            self.gpu
                .stream()
                .launch_builder(&f)
                .arg(x)
                .arg(b)
                .arg(&width)
                .arg(&n64)
                .launch(elementwise(n))
                .map_err(err)?
        };
        Ok(())
    }

    fn rope(&self, x: &mut CudaSlice<f32>, heads: usize, rope: &Rope, step: &GpuBatch) -> R<()> {
        let rows = step.n_tokens;
        let d = rope.head_dim;
        if rows == 0 {
            return Ok(());
        }
        assert!(x.len() >= rows * heads * d);
        self.activation_written();
        let _span = self.profiler.span("rope");
        let s = self.gpu.stream();
        let mut cached = self.inv_freq.lock().unwrap_or_else(|e| e.into_inner());
        if cached.as_ref().is_none_or(|(h, _)| *h != rope.inv_freq) {
            let dev = s.clone_htod(&rope.inv_freq).map_err(err)?;
            *cached = Some((rope.inv_freq.clone(), dev));
        }
        let inv_freq = &cached.as_ref().expect("uploaded above").1;
        // Many rows: one CTA per token (each angle computed once, not once per head); few: one
        // per (token, head), to fill the GPU. Measured on the H200 (Llama-2-7B, 32 heads):
        // per token 1.31 vs 1.45 ms per pass at 1047 rows and 2.1 vs 4.0 at ~3100, but 1.13 vs
        // 0.60 at 261.
        let per_token = rows >= ROPE_PER_TOKEN_ROWS;
        let f = self.f(if per_token { "rope" } else { "rope_per_head" })?;
        let (h, di, neox) = (
            heads as i32,
            d as i32,
            (rope.style == RopeStyle::Neox) as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, if per_token { 1 } else { heads as u32 }, 1),
            block_dim: ((d / 2) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x holds rows * heads * d values; toks holds 5 ints per row.
        unsafe {
            s.launch_builder(&f)
                .arg(x)
                .arg(step.dev_toks())
                .arg(inv_freq)
                .arg(&h)
                .arg(&di)
                .arg(&neox)
                .launch(cfg)
                .map_err(err)?
        };
        Ok(())
    }

    fn attend_append(
        &self,
        cache: &mut GpuCache,
        step: &GpuBatch,
        layer: usize,
        n_head: usize,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> R<()> {
        self.activation_written();
        let span = self.profiler.span("attend");
        cache
            .attend(layer, n_head, step, q, k, v, out)
            .map_err(err)?;
        drop(span);
        let _span = self.profiler.span("append");
        cache.append(layer, step, k, v).map_err(err)
    }

    fn swiglu(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> R<()> {
        let _span = self.profiler.span("swiglu");
        let n = gate.len().min(up.len());
        let s = self.gpu.stream();
        let gate_addr = gate.device_ptr(s).0;
        let mut g16 = self.gemm16();
        let gate16 = g16.reserve(s, n)?;
        let f = self.f("swiglu")?;
        let n64 = n as i64;
        // SAFETY: gate and up hold at least n values, gate16 as many.
        unsafe {
            s.launch_builder(&f)
                .arg(&mut *gate)
                .arg(&mut *gate16)
                .arg(up)
                .arg(&n64)
                .launch(elementwise(n))
                .map_err(err)?
        };
        g16.holds = Some((gate_addr, n));
        Ok(())
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> R<()> {
        self.activation_written();
        let _span = self.profiler.span("add");
        self.launch_elementwise("add_inplace", x, y)
    }

    fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        width: usize,
        rows: &[Range<usize>],
    ) -> R<CudaSlice<f32>> {
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
                .arg(x)
                .arg(&dev_idx)
                .arg(&mut out)
                .arg(&w)
                .launch(cfg)
                .map_err(err)?
        };
        Ok(out)
    }
}
