//! CUDA backend for kivi: the KIVI and f16 KV caches on an NVIDIA GPU, with fused kernels
//! (quantize-and-pack on append, flash-decoding attention that reads the packed cache directly).
//!
//! Kernels are `.cu` files next to their Rust launchers, compiled with NVRTC at run time for the
//! device's architecture and cached on disk by a hash of source and options
//! (`~/.cache/kivi/cuda/<module>-<hash>.ptx`). A templated kernel with many variants (decode
//! attention) gets one module per variant, compiled when first launched; [`kernel_modules`]
//! lists them all, and `tests/compile.rs` compiles each with NVRTC alone (no GPU). The CUDA
//! libraries are loaded dynamically: building needs no CUDA toolkit, and a machine without a
//! driver gets [`Error::NoDriver`] from [`Gpu::new`] while the CPU backend keeps working.

mod activation;
pub mod cache;
mod graph;
pub mod model;
pub mod profile;
pub mod runner;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::{CompileOptions, Ptx};

pub use activation::Activation;
pub use cache::{GpuBatch, GpuCache, KernelResources};
pub use graph::GraphStats;
pub use model::{random_model, CudaBackend, CudaModel, HalfType};
pub use runner::{GpuRunner, RunnerTimes};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no CUDA driver found: {0}")]
    NoDriver(String),
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
    #[error("CUDA kernel compilation failed: {0}")]
    Compile(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Core(#[from] kivi_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One GPU: context, the stream every kernel runs on, and the compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: (i32, i32),
    /// Loaded modules by name, each with the functions looked up so far: a launch finds its
    /// kernel here without a driver call (`cuModuleGetFunction`) or a C string.
    modules: Mutex<HashMap<String, LoadedModule>>,
}

struct LoadedModule {
    module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
}

impl Gpu {
    /// Opens device `ordinal`. Fails with [`Error::NoDriver`] when the CUDA driver library (or
    /// NVRTC) cannot be loaded, and with [`Error::NoDevice`] when the driver sees no device.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        // SAFETY: only tries to dlopen the libraries; no CUDA call is made.
        let (has_driver, has_nvrtc) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
            )
        };
        if !has_driver {
            return Err(Error::NoDriver(
                "libcuda.so could not be loaded (is an NVIDIA driver installed?)".into(),
            ));
        }
        if !has_nvrtc {
            return Err(Error::NoDriver(
                "libnvrtc.so could not be loaded (add the CUDA toolkit's lib64 folder to \
                 LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| Error::NoDevice(e.to_string()))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice(format!(
                "device {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoDevice(e.to_string()))?;
        let arch = ctx.compute_capability()?;
        // One stream for everything, created (not the legacy default stream, which cannot be
        // captured into CUDA graphs); with a single stream, cudarc's per-buffer events that
        // order work across streams are pure host overhead.
        // SAFETY: every launch, copy and allocation of this crate goes to `stream`, so no
        // buffer is ever used on two streams.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            arch,
            modules: Mutex::new(HashMap::new()),
        }))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Device name and compute capability, for reports.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown".into());
        format!("{name} (sm_{}{})", self.arch.0, self.arch.1)
    }

    /// Bytes of the device's L2 cache (50 MiB when the driver does not say).
    pub fn l2_bytes(&self) -> usize {
        self.ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .unwrap_or(50 << 20)
            .max(0) as usize
    }

    /// Keeps memory released by stream-ordered frees in the device's default pool instead of
    /// handing it back to the driver at every synchronization: a step's activations are then
    /// reused by the next step instead of being mapped again (the pool's size stays at its
    /// high-water mark, which cuMemGetInfo reports as used).
    pub fn retain_freed_memory(&self) -> Result<()> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread()?;
        let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
        let mut threshold = u64::MAX;
        // SAFETY: plain driver calls on this context's device; `pool` is written by the first
        // call before it is read, and the attribute takes a pointer to a u64.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), self.ctx.cu_device()).result()?;
            sys::cuMemPoolSetAttribute(
                pool.assume_init(),
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result()?;
        }
        Ok(())
    }

    /// Hands the unused memory of the device's default pool back to the driver (after a
    /// synchronization), so that the next measurement starts from what is really held.
    pub fn trim_pool(&self) -> Result<()> {
        use cudarc::driver::sys;
        self.synchronize()?;
        self.ctx.bind_to_thread()?;
        let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
        // SAFETY: plain driver calls on this context's device; `pool` is written before use.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), self.ctx.cu_device()).result()?;
            sys::cuMemPoolTrimTo(pool.assume_init(), 0).result()?;
        }
        Ok(())
    }

    /// `(used, total)` device memory in bytes, the driver's view (cuMemGetInfo): every process
    /// and context on the device.
    pub fn memory_info(&self) -> Result<(u64, u64)> {
        let (free, total) = self.ctx.mem_get_info()?;
        Ok(((total - free) as u64, total as u64))
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Kernel `name` of the module compiled from `source` (compiled once per process, PTX cached
    /// on disk across processes).
    pub fn function(&self, module: &str, source: &str, name: &str) -> Result<CudaFunction> {
        self.function_with(module, source, &[], name)
    }

    /// As [`Gpu::function`], for a module compiled from `source` with the preprocessor
    /// `defines` (`-DNAME=VALUE`): one module per variant of a templated kernel, so that a run
    /// compiles only the variants it launches. `module` names the variant.
    pub fn function_with(
        &self,
        module: &str,
        source: &str,
        defines: &[String],
        name: &str,
    ) -> Result<CudaFunction> {
        let mut modules = self.modules.lock().expect("module cache poisoned");
        if !modules.contains_key(module) {
            let ptx = self.compile(module, source, defines)?;
            let m = self.ctx.load_module(Ptx::from_src(ptx))?;
            modules.insert(
                module.to_string(),
                LoadedModule {
                    module: m,
                    functions: HashMap::new(),
                },
            );
        }
        let m = modules.get_mut(module).expect("inserted above");
        if let Some(f) = m.functions.get(name) {
            return Ok(f.clone());
        }
        let f = m.module.load_function(name)?;
        // A launch may take all the shared memory the device gives a CTA beyond the kernel's
        // static arrays, not only the default 48 KiB in all (the staged attention kernels hold
        // up to ~41 KiB of static arrays besides their scores).
        use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
        let optin = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let fixed = f.get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
        if optin > fixed {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                optin - fixed,
            )?;
        }
        if let Some(pct) = carveout_percent() {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                pct,
            )?;
        }
        m.functions.insert(name.to_string(), f.clone());
        Ok(f)
    }

    fn compile(&self, module: &str, source: &str, defines: &[String]) -> Result<String> {
        let options = compile_options(self.arch, defines);
        let key = fnv1a(&[source.as_bytes(), options.join(" ").as_bytes()]);
        let path = cache_dir().map(|d| d.join(format!("{module}-{key:016x}.ptx")));
        if let Some(p) = &path {
            if let Ok(ptx) = std::fs::read_to_string(p) {
                return Ok(ptx);
            }
        }
        let ptx = nvrtc_compile(module, source, options)?;
        if let Some(p) = &path {
            // A failed write only costs a recompilation next time.
            if let Some(dir) = p.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &ptx).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
        Ok(ptx)
    }
}

/// A kernel module the backend can load: its name, source and preprocessor defines.
#[derive(Clone, Debug)]
pub struct KernelModule {
    pub name: String,
    pub source: &'static str,
    pub defines: Vec<String>,
}

/// Every module the backend compiles: the element-wise model kernels, the sampler, the cache's
/// append / prefill / reduce kernels, and each decode-attention variant (one module each).
pub fn kernel_modules() -> Vec<KernelModule> {
    let mut modules: Vec<KernelModule> = [model::HalfType::F16, model::HalfType::Bf16]
        .into_iter()
        .map(|half| {
            let (name, defines) = half.module();
            KernelModule {
                name: name.into(),
                source: model::SOURCE,
                defines,
            }
        })
        .collect();
    modules.extend([KernelModule {
        name: model::SAMPLE_MODULE.into(),
        source: model::SAMPLE_SOURCE,
        defines: Vec::new(),
    }]);
    modules.extend(cache::kernel_modules());
    modules
}

/// Whether NVRTC (libnvrtc) can be loaded: kernels then compile even without a GPU or driver.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles `source` to PTX for compute capability `arch` with the backend's options, no disk
/// cache (needs NVRTC, not a GPU): tests check every kernel module compiles.
pub fn compile_uncached(
    module: &str,
    source: &str,
    arch: (i32, i32),
    defines: &[String],
) -> Result<String> {
    nvrtc_compile(module, source, compile_options(arch, defines))
}

fn compile_options(arch: (i32, i32), defines: &[String]) -> Vec<String> {
    let mut options = vec![
        format!("--gpu-architecture=compute_{}{}", arch.0, arch.1),
        "-std=c++17".to_string(),
    ];
    options.extend(defines.iter().cloned());
    // Kernel tuning experiments: `KIVI_CUDA_DEFINES="-DSTAGE_CODES=0 -DQUANT_MIN_CTAS=4"`
    // overrides the kernels' compile-time knobs (part of the PTX cache key).
    if let Ok(defines) = std::env::var("KIVI_CUDA_DEFINES") {
        options.extend(
            defines
                .split_whitespace()
                .filter(|d| d.starts_with("-D"))
                .map(str::to_string),
        );
    }
    options
}

fn nvrtc_compile(module: &str, source: &str, options: Vec<String>) -> Result<String> {
    let opts = CompileOptions {
        options,
        name: Some(format!("{module}.cu")),
        ..Default::default()
    };
    Ok(cudarc::nvrtc::compile_ptx_with_opts(source, opts)
        .map_err(|e| Error::Compile(format!("{module}.cu: {e:?}")))?
        .to_src())
}

/// `$KIVI_CUDA_CACHE`, else `$XDG_CACHE_HOME/kivi/cuda`, else `~/.cache/kivi/cuda`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KIVI_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("kivi/cuda"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kivi/cuda"))
}

/// FNV-1a, 64-bit: a stable hash for the on-disk kernel cache.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `KIVI_CUDA_CARVEOUT` (0-100): every kernel's preferred shared-memory share of L1, so that
/// kernels of different shared-memory needs do not make the SMs change the split between
/// launches (an experiment; unset: the driver's choice per kernel).
fn carveout_percent() -> Option<i32> {
    static PCT: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();
    *PCT.get_or_init(|| {
        std::env::var("KIVI_CUDA_CARVEOUT")
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|p| (0..=100).contains(p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_every_part() {
        let a = fnv1a(&[b"src", b"opts"]);
        assert_ne!(a, fnv1a(&[b"src", b"opts2"]));
        assert_ne!(a, fnv1a(&[b"sr", b"copts"]));
        assert_eq!(a, fnv1a(&[b"src", b"opts"]));
    }

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        // On a machine without a GPU this must be a clean error; with one, a working device.
        match Gpu::new(0) {
            Ok(g) => assert!(!g.describe().is_empty()),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with("no CUDA driver found") || msg.starts_with("no CUDA device"),
                    "{msg}"
                );
            }
        }
    }
}
