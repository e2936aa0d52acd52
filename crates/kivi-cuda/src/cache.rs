//! The KV cache on the GPU (KIVI or f16) and the launchers of its kernels (`cache.cu`).
//!
//! Semantics are [`kivi_core::KvCache`]'s, for a batch of sequences ("slots") at a time:
//! [`GpuCache::attend`] lets every new token attend causally over the stored tokens (quantized
//! or f16, as stored) plus the new tokens up to itself in f32, and [`GpuCache::append`] then stores
//! the new tokens with the KIVI policy (key flush in whole R-token chunks, value FIFO of R
//! tokens; R = 0 re-quantizes the partial key group on every append). The quantized bytes are
//! the CPU cache's: same codes, same LSB-first words, same f16 scales and mins.
//!
//! Supported: keys per-channel and values per-token (KIVI), 2 or 4 bits, G a multiple of 32,
//! head_dim 64 or 128, no sink tokens; the f16 cache with head_dim 64 or 128.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use half::f16;
use kivi_core::{Axis, CacheConfig, CacheShape, KiviConfig};

use crate::{Error, Gpu, Result};

const SOURCE: &str = include_str!("cache.cu");
const MODULE: &str = "cache";
/// Threads per attention CTA (`WARPS * 32` in cache.cu).
const ATTN_THREADS: u32 = 128;
/// Longest split: the split's scores live in shared memory (`NG * split * 4` bytes).
const MAX_SPLIT: usize = 2048;
const MIN_SPLIT: usize = 64;

/// Mirror of `CacheBufs` in cache.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CacheBufs {
    kq: u64,
    ks: u64,
    km: u64,
    kwin: u64,
    vq: u64,
    vs: u64,
    vm: u64,
    vwin: u64,
    kq_slot: u64,
    kq_head: u64,
    ksm_slot: u64,
    ksm_head: u64,
    kwin_slot: u64,
    kwin_head: u64,
    vq_slot: u64,
    vq_head: u64,
    vsm_slot: u64,
    vsm_head: u64,
    vwin_slot: u64,
    vwin_head: u64,
    n_kv: i32,
    head_dim: i32,
    group: i32,
    resid: i32,
    k_bits: i32,
    v_bits: i32,
    kwin_mod: i32,
    is_f16: i32,
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for CacheBufs {}

/// Mirror of `AttnParams` in cache.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnParams {
    c: CacheBufs,
    q: u64,
    knew: u64,
    vnew: u64,
    toks: u64,
    part_o: u64,
    part_ml: u64,
    n_head: i32,
    nsplit: i32,
    split_len: i32,
    scale_log2: f32,
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for AttnParams {}

/// Element counts of one layer's buffers, and strides (elements) per slot and per KV head.
#[derive(Clone, Copy, Debug, Default)]
struct Geometry {
    kq_head: usize,
    ksm_head: usize,
    kwin_head: usize,
    vq_head: usize,
    vsm_head: usize,
    vwin_head: usize,
}

struct Layer {
    kq: CudaSlice<u32>,
    ks: CudaSlice<u16>,
    km: CudaSlice<u16>,
    kwin: CudaSlice<u16>,
    vq: CudaSlice<u32>,
    vs: CudaSlice<u16>,
    vm: CudaSlice<u16>,
    vwin: CudaSlice<u16>,
}

/// A batch of sequences for one step: `(slot, n_old, n_new, first packed token)` per item, on
/// the host and the device. Built by [`GpuCache::batch`]; valid until [`GpuCache::advance`].
pub struct GpuBatch {
    items: Vec<[i32; 4]>,
    dev_items: CudaSlice<i32>,
    dev_toks: CudaSlice<i32>,
    /// Packed new tokens of all items.
    pub n_tokens: usize,
    max_new: usize,
    /// Longest attended length (n_old + n_new) of any item.
    pub max_len: usize,
}

impl GpuBatch {
    /// Per-token `(slot, n_old, i, offset)` records on the device (RoPE reads positions here).
    pub(crate) fn dev_toks(&self) -> &CudaSlice<i32> {
        &self.dev_toks
    }

    /// `(slot, n_old, n_new)` of each item.
    pub fn items(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.items
            .iter()
            .map(|it| (it[0] as usize, it[1] as usize, it[2] as usize))
    }
}

/// KV cache of `slots` sequences of at most `capacity` tokens each, all layers, on one GPU.
pub struct GpuCache {
    gpu: Arc<Gpu>,
    config: CacheConfig,
    shape: CacheShape,
    capacity: usize,
    geo: Geometry,
    layers: Vec<Layer>,
    /// Stored tokens per slot (the same in every layer between steps); None = free slot.
    lens: Vec<Option<usize>>,
    part_o: Option<CudaSlice<f32>>,
    part_ml: Option<CudaSlice<f32>>,
    split_override: Option<usize>,
    sm_count: usize,
}

fn unsupported(m: String) -> Error {
    Error::Unsupported(m)
}

/// Checks the configurations the kernels implement.
pub fn check_supported(config: &CacheConfig, shape: &CacheShape) -> Result<()> {
    if ![64, 128].contains(&shape.head_dim) {
        return Err(unsupported(format!(
            "the CUDA cache supports head_dim 64 and 128, not {}",
            shape.head_dim
        )));
    }
    if let CacheConfig::Kivi(kc) = config {
        kc.validate(shape)?;
        if kc.k_axis != Axis::PerChannel || kc.v_axis != Axis::PerToken {
            return Err(unsupported(
                "the CUDA cache supports keys per-channel and values per-token (KIVI) only".into(),
            ));
        }
        if !matches!(kc.k_bits, 2 | 4) || !matches!(kc.v_bits, 2 | 4) {
            return Err(unsupported(
                "the CUDA cache supports 2- and 4-bit codes".into(),
            ));
        }
        if !kc.group_size.is_multiple_of(32) {
            return Err(unsupported(format!(
                "the CUDA cache needs group_size a multiple of 32, not {}",
                kc.group_size
            )));
        }
        if kc.sink_tokens != 0 {
            return Err(unsupported(
                "the CUDA cache does not keep sink tokens".into(),
            ));
        }
    }
    Ok(())
}

impl GpuCache {
    /// Allocates the whole cache: `slots` sequences of up to `capacity` tokens (rounded up to a
    /// multiple of 32 and of G).
    pub fn new(
        gpu: Arc<Gpu>,
        config: CacheConfig,
        shape: CacheShape,
        slots: usize,
        capacity: usize,
    ) -> Result<Self> {
        check_supported(&config, &shape)?;
        let (hkv, d) = (shape.n_kv_head, shape.head_dim);
        let unit = match config {
            CacheConfig::F16 => 32,
            CacheConfig::Kivi(kc) => kc.group_size.max(32),
        };
        let cap = capacity.max(1).div_ceil(unit) * unit;
        let geo = match config {
            CacheConfig::F16 => Geometry {
                kwin_head: cap * d,
                vwin_head: cap * d,
                ..Default::default()
            },
            CacheConfig::Kivi(kc) => {
                let g = kc.group_size;
                let w = if kc.residual_len > 0 {
                    kc.residual_len
                } else {
                    g
                };
                Geometry {
                    kq_head: cap * d / (32 / kc.k_bits as usize),
                    ksm_head: cap / g * d,
                    kwin_head: w * d,
                    vq_head: cap * d / (32 / kc.v_bits as usize),
                    vsm_head: cap * (d / g),
                    vwin_head: kc.residual_len.max(1) * d,
                }
            }
        };
        let s = gpu.stream().clone();
        let n = |per_head: usize| (slots * hkv * per_head).max(1);
        let mut layers = Vec::with_capacity(shape.n_layer);
        for _ in 0..shape.n_layer {
            layers.push(Layer {
                kq: s.alloc_zeros::<u32>(n(geo.kq_head))?,
                ks: s.alloc_zeros::<u16>(n(geo.ksm_head))?,
                km: s.alloc_zeros::<u16>(n(geo.ksm_head))?,
                kwin: s.alloc_zeros::<u16>(n(geo.kwin_head))?,
                vq: s.alloc_zeros::<u32>(n(geo.vq_head))?,
                vs: s.alloc_zeros::<u16>(n(geo.vsm_head))?,
                vm: s.alloc_zeros::<u16>(n(geo.vsm_head))?,
                vwin: s.alloc_zeros::<u16>(n(geo.vwin_head))?,
            });
        }
        let sm_count = gpu
            .context()
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .unwrap_or(132)
            .max(1) as usize;
        // Compile (or load) the kernels now, so that timing never includes it.
        gpu.function(MODULE, SOURCE, "kivi_attn_reduce")?;
        Ok(GpuCache {
            gpu,
            config,
            shape,
            capacity: cap,
            geo,
            layers,
            lens: vec![None; slots],
            part_o: None,
            part_ml: None,
            split_override: None,
            sm_count,
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }
    pub fn shape(&self) -> CacheShape {
        self.shape
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Forces the tokens per attention split (None: chosen from the batch to fill the GPU).
    pub fn set_split_tokens(&mut self, split: Option<usize>) {
        self.split_override = split;
    }

    /// Takes a free slot for a new, empty sequence.
    pub fn add_sequence(&mut self) -> Result<usize> {
        let slot = self.lens.iter().position(|l| l.is_none()).ok_or_else(|| {
            unsupported(format!(
                "all {} GPU cache slots are in use",
                self.lens.len()
            ))
        })?;
        self.lens[slot] = Some(0);
        Ok(slot)
    }

    pub fn remove_sequence(&mut self, slot: usize) -> Result<()> {
        match self.lens.get_mut(slot) {
            Some(l @ Some(_)) => {
                *l = None;
                Ok(())
            }
            _ => Err(unsupported(format!("slot {slot} holds no sequence"))),
        }
    }

    /// Stored tokens of `slot`.
    pub fn seq_len(&self, slot: usize) -> Option<usize> {
        self.lens.get(slot).copied().flatten()
    }

    /// Describes one step: `n_new` tokens for each `(slot, n_new)`, packed in this order.
    pub fn batch(&self, items: &[(usize, usize)]) -> Result<GpuBatch> {
        let mut host_items = Vec::with_capacity(items.len());
        let mut toks = Vec::new();
        let (mut off, mut max_new, mut max_len) = (0usize, 0usize, 0usize);
        for &(slot, n_new) in items {
            let n_old = self
                .seq_len(slot)
                .ok_or_else(|| unsupported(format!("slot {slot} holds no sequence")))?;
            if n_old + n_new > self.capacity {
                return Err(unsupported(format!(
                    "slot {slot}: {} tokens exceed the GPU cache capacity {}",
                    n_old + n_new,
                    self.capacity
                )));
            }
            host_items.push([slot as i32, n_old as i32, n_new as i32, off as i32]);
            for i in 0..n_new {
                toks.extend_from_slice(&[slot as i32, n_old as i32, i as i32, off as i32]);
            }
            off += n_new;
            max_new = max_new.max(n_new);
            max_len = max_len.max(n_old + n_new);
        }
        let s = self.gpu.stream();
        let dev_items = s.clone_htod(&pad(host_items.concat()))?;
        let dev_toks = s.clone_htod(&pad(toks))?;
        Ok(GpuBatch {
            items: host_items,
            dev_items,
            dev_toks,
            n_tokens: off,
            max_new,
            max_len,
        })
    }

    /// Records the batch's new tokens as stored (call once per step, after every layer's
    /// [`GpuCache::append`]).
    pub fn advance(&mut self, batch: &GpuBatch) {
        for it in &batch.items {
            if let Some(Some(l)) = self.lens.get_mut(it[0] as usize) {
                *l = it[1] as usize + it[2] as usize;
            }
        }
    }

    fn bufs(&self, layer: usize) -> CacheBufs {
        let l = &self.layers[layer];
        let s = self.gpu.stream();
        let p = |x: u64| x;
        let (hkv, d) = (self.shape.n_kv_head as u64, self.shape.head_dim as i32);
        let g = &self.geo;
        let mut c = CacheBufs {
            kq: p(l.kq.device_ptr(s).0),
            ks: p(l.ks.device_ptr(s).0),
            km: p(l.km.device_ptr(s).0),
            kwin: p(l.kwin.device_ptr(s).0),
            vq: p(l.vq.device_ptr(s).0),
            vs: p(l.vs.device_ptr(s).0),
            vm: p(l.vm.device_ptr(s).0),
            vwin: p(l.vwin.device_ptr(s).0),
            kq_slot: hkv * g.kq_head as u64,
            kq_head: g.kq_head as u64,
            ksm_slot: hkv * g.ksm_head as u64,
            ksm_head: g.ksm_head as u64,
            kwin_slot: hkv * g.kwin_head as u64,
            kwin_head: g.kwin_head as u64,
            vq_slot: hkv * g.vq_head as u64,
            vq_head: g.vq_head as u64,
            vsm_slot: hkv * g.vsm_head as u64,
            vsm_head: g.vsm_head as u64,
            vwin_slot: hkv * g.vwin_head as u64,
            vwin_head: g.vwin_head as u64,
            n_kv: hkv as i32,
            head_dim: d,
            ..Default::default()
        };
        match self.config {
            CacheConfig::F16 => {
                c.is_f16 = 1;
                c.resid = self.capacity as i32;
                c.kwin_mod = self.capacity as i32;
                c.group = 32;
                c.k_bits = 16;
                c.v_bits = 16;
            }
            CacheConfig::Kivi(kc) => {
                c.group = kc.group_size as i32;
                c.resid = kc.residual_len as i32;
                c.kwin_mod = if kc.residual_len > 0 {
                    kc.residual_len
                } else {
                    kc.group_size
                } as i32;
                c.k_bits = kc.k_bits as i32;
                c.v_bits = kc.v_bits as i32;
            }
        }
        c
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        self.gpu.function(MODULE, SOURCE, name)
    }

    /// Query heads per attention CTA: the largest of 4, 3, 2, 1 dividing the group size.
    fn heads_per_cta(n_rep: usize) -> usize {
        [4, 3, 2, 1]
            .into_iter()
            .find(|g| n_rep.is_multiple_of(*g))
            .unwrap_or(1)
    }

    /// Tokens per split for a batch: enough CTAs to fill the GPU several times over.
    fn split_tokens(&self, batch: &GpuBatch, ctas_per_split: usize) -> usize {
        if let Some(s) = self.split_override {
            return s.div_ceil(32).max(1) * 32;
        }
        let target = 8 * self.sm_count;
        let wanted = target.div_ceil(ctas_per_split.max(1)).max(1);
        let s = batch.max_len.div_ceil(wanted).div_ceil(32) * 32;
        s.clamp(MIN_SPLIT, MAX_SPLIT)
    }

    /// Attention of the batch's new tokens (see the module docs). `q`: `[T][n_head][D]`,
    /// `k_new`/`v_new`: `[T][Hkv][D]`, `out`: `[T][n_head][D]`, all f32, T = `batch.n_tokens`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &mut self,
        layer: usize,
        n_head: usize,
        batch: &GpuBatch,
        q: &CudaSlice<f32>,
        k_new: &CudaSlice<f32>,
        v_new: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (hkv, d) = (self.shape.n_kv_head, self.shape.head_dim);
        self.check_layer(layer)?;
        if n_head == 0 || !n_head.is_multiple_of(hkv) {
            return Err(unsupported(format!(
                "n_head {n_head} is not a multiple of n_kv_head {hkv}"
            )));
        }
        let t = batch.n_tokens;
        if t == 0 {
            return Ok(());
        }
        if q.len() < t * n_head * d
            || out.len() < t * n_head * d
            || k_new.len() < t * hkv * d
            || v_new.len() < t * hkv * d
        {
            return Err(unsupported("attend: buffer shorter than the batch".into()));
        }
        let ng = Self::heads_per_cta(n_head / hkv);
        let nchunk = n_head / hkv / ng;
        let split = self.split_tokens(batch, hkv * nchunk * t);
        let nsplit = batch.max_len.div_ceil(split);
        let parts = t * n_head * nsplit;
        let s = self.gpu.stream().clone();
        if self.part_o.as_ref().is_none_or(|p| p.len() < parts * d) {
            self.part_o = Some(s.alloc_zeros::<f32>(parts * d)?);
        }
        if self.part_ml.as_ref().is_none_or(|p| p.len() < parts * 2) {
            self.part_ml = Some(s.alloc_zeros::<f32>(parts * 2)?);
        }
        let (kb, vb) = match self.config {
            CacheConfig::F16 => (16, 16),
            CacheConfig::Kivi(kc) => (kc.k_bits, kc.v_bits),
        };
        let name = format!("kivi_attn_d{d}_k{kb}_v{vb}_g{ng}");
        let f = self.function(&name)?;
        let part_o = self.part_o.as_ref().expect("allocated above");
        let part_ml = self.part_ml.as_ref().expect("allocated above");
        let params = AttnParams {
            c: self.bufs(layer),
            q: q.device_ptr(&s).0,
            knew: k_new.device_ptr(&s).0,
            vnew: v_new.device_ptr(&s).0,
            toks: batch.dev_toks.device_ptr(&s).0,
            part_o: part_o.device_ptr(&s).0,
            part_ml: part_ml.device_ptr(&s).0,
            n_head: n_head as i32,
            nsplit: nsplit as i32,
            split_len: split as i32,
            scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
        };
        let smem = (2 * ng * d + 2 * ng + 8 + ng * split) * 4;
        let cfg = LaunchConfig {
            grid_dim: (nsplit as u32, (hkv * nchunk) as u32, t as u32),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the params point at live buffers of the sizes checked above; the kernel reads
        // only positions below each token's attended length, all inside the slot's capacity.
        unsafe { s.launch_builder(&f).arg(&params).launch(cfg)? };
        let r = self.function("kivi_attn_reduce")?;
        let cfg = LaunchConfig {
            grid_dim: (n_head as u32, t as u32, 1),
            block_dim: (d as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (nh, ns, hd) = (n_head as i32, nsplit as i32, d as i32);
        // SAFETY: part buffers hold t * n_head * nsplit entries, out t * n_head * d.
        unsafe {
            s.launch_builder(&r)
                .arg(part_o)
                .arg(part_ml)
                .arg(out)
                .arg(&nh)
                .arg(&ns)
                .arg(&hd)
                .launch(cfg)?
        };
        Ok(())
    }

    /// Stores the batch's new tokens in `layer` (the KIVI policy; see the module docs).
    pub fn append(
        &mut self,
        layer: usize,
        batch: &GpuBatch,
        k_new: &CudaSlice<f32>,
        v_new: &CudaSlice<f32>,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let (hkv, d) = (self.shape.n_kv_head, self.shape.head_dim);
        let t = batch.n_tokens;
        if t == 0 {
            return Ok(());
        }
        if k_new.len() < t * hkv * d || v_new.len() < t * hkv * d {
            return Err(unsupported("append: buffer shorter than the batch".into()));
        }
        let s = self.gpu.stream().clone();
        let c = self.bufs(layer);
        let n_items = batch.items.len() as u32;
        if let CacheConfig::Kivi(kc) = self.config {
            let (g, r) = (kc.group_size, kc.residual_len);
            // Most groups / tokens any item quantizes in this append.
            let (mut groups, mut vtoks) = (0usize, 0usize);
            for it in &batch.items {
                let (n0, n1) = (it[1] as usize, (it[1] + it[2]) as usize);
                let (q0, q1) = if r > 0 {
                    (n0 - n0 % r, n1 - n1 % r)
                } else {
                    (n0, n1)
                };
                groups = groups.max(q1.div_ceil(g).saturating_sub(q0 / g));
                let (v0, v1) = if r > 0 {
                    (n0.saturating_sub(r), n1.saturating_sub(r))
                } else {
                    (n0, n1)
                };
                vtoks = vtoks.max(v1 - v0);
            }
            if groups > 0 {
                let f = self.function("kivi_quantize_keys")?;
                let cfg = LaunchConfig {
                    grid_dim: (groups as u32, hkv as u32, n_items),
                    block_dim: (d as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: every index is bounded by the slot capacity checked in `batch`.
                unsafe {
                    s.launch_builder(&f)
                        .arg(&c)
                        .arg(&batch.dev_items)
                        .arg(k_new)
                        .launch(cfg)?
                };
            }
            if vtoks > 0 {
                let f = self.function("kivi_quantize_values")?;
                let cfg = LaunchConfig {
                    grid_dim: (vtoks as u32, n_items, 1),
                    block_dim: ((hkv * (d / g)) as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: as above.
                unsafe {
                    s.launch_builder(&f)
                        .arg(&c)
                        .arg(&batch.dev_items)
                        .arg(v_new)
                        .launch(cfg)?
                };
            }
        }
        let f = self.function("kivi_write_window")?;
        let cfg = LaunchConfig {
            grid_dim: (batch.max_new as u32, hkv as u32, n_items),
            block_dim: (d as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above; window slots are taken modulo the window size.
        unsafe {
            s.launch_builder(&f)
                .arg(&c)
                .arg(&batch.dev_items)
                .arg(k_new)
                .arg(v_new)
                .launch(cfg)?
        };
        Ok(())
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.shape.n_layer {
            return Err(unsupported(format!(
                "layer {layer} out of range ({} layers)",
                self.shape.n_layer
            )));
        }
        Ok(())
    }

    /// Stored keys and values of one sequence as the attention reads them, `[n][Hkv][D]` f32
    /// each (quantized tokens dequantized, window tokens from f16); tests and diagnostics.
    pub fn dequantized(&self, layer: usize, slot: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_layer(layer)?;
        let n = self
            .seq_len(slot)
            .ok_or_else(|| unsupported(format!("slot {slot} holds no sequence")))?;
        let (hkv, d) = (self.shape.n_kv_head, self.shape.head_dim);
        let s = self.gpu.stream();
        let l = &self.layers[layer];
        let get16 = |b: &CudaSlice<u16>, per_head: usize| -> Result<Vec<u16>> {
            let v = s.clone_dtoh(&b.slice(slot * hkv * per_head..(slot + 1) * hkv * per_head))?;
            Ok(v)
        };
        let get32 = |b: &CudaSlice<u32>, per_head: usize| -> Result<Vec<u32>> {
            let v = s.clone_dtoh(&b.slice(slot * hkv * per_head..(slot + 1) * hkv * per_head))?;
            Ok(v)
        };
        let h2f = |x: u16| f16::from_bits(x).to_f32();
        let g = self.geo;
        let kwin = get16(&l.kwin, g.kwin_head)?;
        let vwin = get16(&l.vwin, g.vwin_head)?;
        let mut k = vec![0f32; n * hkv * d];
        let mut v = vec![0f32; n * hkv * d];
        match self.config {
            CacheConfig::F16 => {
                for p in 0..n {
                    for h in 0..hkv {
                        for c in 0..d {
                            k[(p * hkv + h) * d + c] = h2f(kwin[h * g.kwin_head + p * d + c]);
                            v[(p * hkv + h) * d + c] = h2f(vwin[h * g.vwin_head + p * d + c]);
                        }
                    }
                }
            }
            CacheConfig::Kivi(kc) => {
                let KiviConfig {
                    k_bits,
                    v_bits,
                    group_size: gs,
                    residual_len: r,
                    ..
                } = kc;
                let (kq, ks, km) = (
                    get32(&l.kq, g.kq_head)?,
                    get16(&l.ks, g.ksm_head)?,
                    get16(&l.km, g.ksm_head)?,
                );
                let (vq, vs, vm) = (
                    get32(&l.vq, g.vq_head)?,
                    get16(&l.vs, g.vsm_head)?,
                    get16(&l.vm, g.vsm_head)?,
                );
                let nqk = if r > 0 { n - n % r } else { n };
                let nqv = if r > 0 { n.saturating_sub(r) } else { n };
                let (kf, vf) = (32 / k_bits as usize, 32 / v_bits as usize);
                let wpd = 32 / kf;
                for p in 0..n {
                    for h in 0..hkv {
                        for c in 0..d {
                            let o = (p * hkv + h) * d + c;
                            k[o] = if p < nqk {
                                let w =
                                    kq[h * g.kq_head + ((p / 32) * d + c) * wpd + (p % 32) / kf];
                                let code =
                                    (w >> ((p % kf) * k_bits as usize)) & ((1 << k_bits) - 1);
                                let m = h * g.ksm_head + (p / gs) * d + c;
                                code as f32 * h2f(ks[m]) + h2f(km[m])
                            } else {
                                h2f(kwin[h * g.kwin_head + (p % r) * d + c])
                            };
                            v[o] = if p < nqv {
                                let w = vq[h * g.vq_head + p * (d / vf) + c / vf];
                                let code =
                                    (w >> ((c % vf) * v_bits as usize)) & ((1 << v_bits) - 1);
                                let m = h * g.vsm_head + p * (d / gs) + c / gs;
                                code as f32 * h2f(vs[m]) + h2f(vm[m])
                            } else {
                                h2f(vwin[h * g.vwin_head + (p % r) * d + c])
                            };
                        }
                    }
                }
            }
        }
        Ok((k, v))
    }

    /// Bytes one decode step of `layer` must read for the sequences of `batch` (the floor of a
    /// memory-bound kernel): stored codes, scales, mins and f16 rows of every attended token, the
    /// new tokens, q and the output.
    pub fn decode_bytes(&self, batch: &GpuBatch, n_head: usize) -> u64 {
        let (hkv, d) = (self.shape.n_kv_head as u64, self.shape.head_dim as u64);
        let mut bytes = 0u64;
        for it in &batch.items {
            let n = it[1] as u64;
            let n_new = it[2] as u64;
            bytes += n_new * (2 * hkv * d * 4 + 2 * n_head as u64 * d * 4);
            bytes += match self.config {
                CacheConfig::F16 => 2 * n * hkv * d * 2,
                CacheConfig::Kivi(kc) => {
                    let (g, r) = (kc.group_size as u64, kc.residual_len as u64);
                    let nqk = if r > 0 { n - n % r } else { n };
                    let nqv = if r > 0 { n.saturating_sub(r) } else { n };
                    let kq = nqk * hkv * d * kc.k_bits as u64 / 8 + nqk.div_ceil(g) * hkv * d * 4;
                    let vq = nqv * hkv * d * kc.v_bits as u64 / 8 + nqv * hkv * (d / g) * 4;
                    kq + vq + ((n - nqk) + (n - nqv)) * hkv * d * 2
                }
            };
        }
        bytes
    }
}

/// Device buffers cannot be empty: one padding element.
fn pad(mut v: Vec<i32>) -> Vec<i32> {
    if v.is_empty() {
        v.push(0);
    }
    v
}
