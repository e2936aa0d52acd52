//! The KV cache on the GPU (KIVI or f16) and the launchers of its kernels (`cache.cu`).
//!
//! Semantics are [`kivi_core::KvCache`]'s, for a batch of sequences ("slots") at a time:
//! [`GpuCache::attend`] lets every new token attend causally over the stored tokens (quantized
//! or f16, as stored) plus the new tokens up to itself in f32, and [`GpuCache::append`] then stores
//! the new tokens with the KIVI policy (key flush in whole R-token chunks, value FIFO of R
//! tokens; R = 0 re-quantizes the partial key group on every append). The quantized bytes are
//! the CPU cache's: same codes, same LSB-first words, same f16 scales and mins.
//!
//! Storage is paged (vLLM style): a pool of blocks of [`BLOCK_TOKENS`] token positions, sized by
//! a memory budget ([`GpuCache::with_budget`]). A block holds the quantized keys and values
//! (codes, scales, mins; the f16 cache: the K and V rows) of its positions in every layer, and
//! the kernels find position `p` of a sequence in block `table[slot][p / BLOCK_TOKENS]`. Blocks
//! are taken when a step needs them ([`GpuCache::batch`]) and returned by
//! [`GpuCache::remove_sequence`]. KIVI's f16 key and value windows (R tokens each) are
//! preallocated per slot, outside the pool.
//!
//! KIVI sink tokens (`sink_tokens` = S): a sequence's first S positions stay in f16 rows per
//! slot, outside the stream; the stream after them is stored and attended exactly as a
//! sequence without sinks (every kernel but the sink ones counts its positions from the first
//! token after the sinks), and `kivi_attn_sinks` adds the sink positions' attention as one more
//! split of the reduction.
//!
//! Supported: keys per-channel and values per-token (KIVI), 2 or 4 bits, G a multiple of 32,
//! head_dim 64 or 128, sink tokens; the f16 cache with head_dim 64 or 128.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use half::f16;
use kivi_core::{Axis, CacheConfig, CacheShape, KiviConfig, MemoryUsage};

use crate::{Error, Gpu, Result};

const SOURCE: &str = include_str!("cache.cu");
const MODULE: &str = "cache";
/// Threads of a four-warp attention CTA (one-warp CTAs: 32).
const ATTN_THREADS: u32 = 128;
/// Threads per CTA of the per-token append kernels (`kivi_quantize_values`, `kivi_write_window`,
/// `kivi_append_decode`): one CTA per token; `quantize_value_token` needs whole warps.
const APPEND_THREADS: u32 = 128;
/// Splits are sized for this many attention CTAs per SM: one-warp CTAs of one head (~20
/// resident), and all others (four-warp CTAs; one-warp CTAs of 2-4 heads, whose fixed cost per
/// CTA is larger). A split sweep on the H200 (docs/benchmarks.md "Session 8": 128-2048 tokens,
/// B = 1, 8, 32, T = 1K-32K, MHA and GQA) put the fastest four-warp splits at 256-512 CTAs in
/// all; 8 per SM (the previous target) made GQA B = 1, T = 16K 1.7x slower.
const ONE_WARP_CTAS_PER_SM: usize = 16;
const CTAS_PER_SM: usize = 4;
/// Floats of padding after each query head's row of a split's scores in CTAs of several heads:
/// 8 puts the rows of the four heads that lanes (g, t) write at once (g + 16m of head t) in 32
/// different banks, where rows of 2048 floats put them in one (a 4-way conflict on every score
/// store, 48 extra shared-memory wavefronts per 128-token key block, Nsight Compute, session 21).
const SCORE_ROW_PAD: usize = 8;
/// f16: 2 (session 12 sweep of 1 / 2 / 4 on the H200, µs: MHA B = 8 T = 1K 44.6 (4: 54.5),
/// T = 4K 139 (155); GQA B = 32 T = 1K 48 (66), T = 4K 148 (173), B = 8 T = 16K 145 (170),
/// B = 1 T = 16K 37 (46); slower only at MHA B = 1 T = 16K 87 (79), GQA B = 8 T = 4K 58 (49)).
/// (Batches with at least as many (token, head group) pairs as SMs take 1: see `attend`.)
const F16_CTAS_PER_SM: usize = 2;
/// GQA: a CTA serves all the query heads of a KV head (up to 4), reading its keys and values
/// once, unless the batch's attention reads at most this fraction of the L2 cache in cache
/// bytes: small batches are bound by each warp's chain of dependent instructions, not by bytes,
/// and one head per CTA gives 4x the CTAs to spread it, each KV head's bytes then read 4x, from
/// L2 while they fit. Measured on the H200 (50 MB L2; 32/8/128, B = 1-32, T = 1K-32K, f16 and
/// KIVI-2/4): one-head CTAs 1.02-1.86x faster up to 25 MB (B = 1, T = 4K KIVI-2 41.6 -> 27.1
/// us), 1.2-2x slower from 33 MB on. (Session 27: `kivi bench attention` now puts four-head CTAs
/// ahead from B = 1 T = 2K on, up to 2x, hot or cold L2; but inside the model, Mistral-7B shapes,
/// they were slower: B = 1 KIVI-2 decode 3-5 % fewer tok/s at depths 2K-32K, the attention op
/// 35 against 29 us per layer at 16K and 39 against 33 at B = 8 T = 4K. Kept until a benchmark
/// reproduces the model's timings; docs/benchmarks.md "CUDA decode attention (H200)".)
const ONE_HEAD_MAX_L2_FRACTION: (usize, usize) = (1, 2);
/// One-warp CTAs are chosen for batches of at least this many (token, KV head) pairs whose
/// sequences hold at most `one_warp_max_len` tokens (measured on the H200: faster there, up to
/// 1.4x; slower at B = 1 and for long GQA sequences).
const ONE_WARP_MIN_PAIRS: usize = 64;
const ONE_WARP_MAX_LEN: usize = 4096;

/// The longest sequence for which one-warp CTAs are chosen, per attention module (head_dim,
/// key and value bits, query heads per CTA) and number of (token, KV head group) pairs: past
/// it the four-warp kernels, whose blocks four warps share, are faster. Measured on the H200
/// (session 26, `kivi bench attention` with `KIVI_CUDA_WARPS=1` and `=4`, two rounds each,
/// 32/32/128 and 32/8/128, B = 8-1024, T = 330-3072; docs/benchmarks.md): 2-bit four-head CTAs
/// 1.07-1.58x faster on four warps from T = 512 on (one warp 1.3x faster at T = 330, B >= 256);
/// 2-bit one-head 1.0-1.24x from T = 1K with at least 1024 pairs (with fewer, one warp wins
/// up to 15 % at T = 1K); 4-bit one-head (plain 4-bit packing then) 1.01-1.52x from T = 1K
/// with 1024 pairs (with fewer, from T = 2K). Other modules (head_dim 64, mixed bits, 2-3 heads
/// per CTA) keep ONE_WARP_MAX_LEN: the same sweep at 9/3/64 found no consistent winner below it.
/// 4-bit kernels since their codes are interleaved (session 29, KIVI-4, B = 64 / 256 / 1024,
/// T = 256-3072 context tokens plus the new one; one warp's speed-up): one-head 1.04 / 1.22 /
/// 1.34x at T = 256, 0.93 / 1.09 / 1.21x at 330, 0.83 / 0.94 / 1.03x at 512, 0.96x at B = 1024
/// T = 1K; four-head 1.04 / 1.36 / 1.39x at 256, 0.97 / 1.22 / 1.26x at 330, 0.60 / 0.76 /
/// 1.00x at 512; four warps 1.04-1.47x faster from T = 1K on.
fn one_warp_max_len(d: usize, kb: u8, vb: u8, ng: usize, pairs: usize) -> usize {
    match (d, kb, vb, ng) {
        (128, 2, 2, 4) => 512,
        (128, 2, 2, 1) if pairs >= 1024 => 1024,
        (128, 4, 4, 1) if pairs >= 32768 => 520,
        (128, 4, 4, 1) if pairs >= 8192 => 512,
        (128, 4, 4, 4) if pairs >= 2048 => 512,
        (128, 4, 4, 1) | (128, 4, 4, 4) => 300,
        _ => ONE_WARP_MAX_LEN,
    }
}
/// Positions per split of one-warp CTAs of several query heads at most (longer ones are split
/// again, evenly): the warp takes its blocks one after another, so fewer, longer CTAs than the
/// GPU holds wait on each block's loads. Measured on the H200 (session 22, 32/8/128, KIVI-2):
/// B = 64 T = 3K 2 splits of 1664 positions 147.5 us, 4 of 1024 121.1; B = 128 T = 2K 2 of
/// 2048 220.6, 3 of 1024 158.1; but B = 128 T = 1K one split of 1152 69.0, two 99.2 (a split of
/// one position and the combination).
const ONE_WARP_HEADS_MAX_SPLIT: usize = 1280;
/// The f16 cache's blocks go through the tensor cores (`F16_TC` in cache.cu) only for batches
/// whose longest sequence is longer than this (shorter: a module compiled without that path,
/// see `attn_variant`). Measured on the H200 (session 12, us, CUDA-core
/// rows -> tensor cores): GQA B = 32 T = 32K 1196 -> 1048, B = 8 T = 16K 211 -> 170, MHA B = 8
/// T = 16K 562 -> 511; but MHA B = 256 T = 330 (serving) 352 -> 399, B = 8 T = 1K 51 -> 55.
const F16_TC_MIN_LEN: usize = 1024;
/// Token positions per pool block (`BLOCK_TOKENS` in cache.cu). 128: a multiple of every
/// supported group size (G divides head_dim <= 128 and is a multiple of 32), so a key group
/// never straddles blocks; attention splits are whole blocks, whose ids a CTA keeps in shared
/// memory (at most 16 per split); a block of one (layer, KV head) is 2-8 KiB contiguous of
/// KIVI codes, long enough for full-speed DRAM reads; and the block table stays small (128 KiB
/// for 256 sequences of 16K tokens). The cost: at most 127 positions of slack per sequence.
pub const BLOCK_TOKENS: usize = 128;
/// Longest split: the split's scores live in shared memory (`NG * split * 4` bytes); a
/// multiple of [`BLOCK_TOKENS`] (`MAX_SPLIT` in cache.cu).
const MAX_SPLIT: usize = 2048;
/// Query tokens per CTA of the prefill attention kernel (`PF_ROWS` in cache.cu).
const PREFILL_ROWS: usize = 64;
/// Initial block-table width (blocks per sequence); it doubles when a sequence needs more.
const TABLE_WIDTH: usize = 32;
/// Most KIVI sink tokens per sequence (a warp reads them one after the other).
const MAX_SINKS: usize = 1024;

/// Default quantized positions from which a split's partial last block goes through the
/// tensor cores (`GpuCache::set_tensor_core_partial`).
const TC_PARTIAL_MIN: usize = 32;

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
    table: u64,
    table_stride: u64,
    kq_block: u64,
    kq_head: u64,
    ksm_block: u64,
    ksm_head: u64,
    vq_block: u64,
    vq_head: u64,
    vsm_block: u64,
    vsm_head: u64,
    kwin_unit: u64,
    kwin_head: u64,
    vwin_unit: u64,
    vwin_head: u64,
    n_kv: i32,
    head_dim: i32,
    group: i32,
    resid: i32,
    k_bits: i32,
    v_bits: i32,
    kwin_mod: i32,
    is_f16: i32,
    ksink: u64,
    vsink: u64,
    sink_unit: u64,
    sink_head: u64,
    sinks: i32,
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
    out: u64,
    tickets: u64,
    n_head: i32,
    nsplit: i32,
    split_len: i32,
    sc_stride: i32,
    scale_log2: f32,
    tensor_cores: i32,
    tc_multiple: i32,
    tc_partial_min: i32,
    prefill: i32,
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for AttnParams {}

/// An attention kernel variant: key bits, value bits (16: the f16 cache), query heads and warps
/// per CTA, how the f16 cache's blocks run, and the stages of its shared-memory ring.
type VariantKey = (u8, u8, usize, usize, F16Path, usize);

/// How an attention module runs the f16 cache's blocks (KIVI modules: always `Tensor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum F16Path {
    /// On the tensor cores.
    Tensor,
    /// On the tensor cores, at a register cap of 3 CTAs per SM instead of 4 (`F16_MIN_CTAS=3`):
    /// for grids that fit one wave at that cap (`F16_FEW_CTAS_PER_SM`).
    TensorFew,
    /// CUDA-core rows (`F16_TC=0`): batches of short sequences (`F16_TC_MIN_LEN`).
    Simt,
}

/// f16 grids of at most this many CTAs per SM take `F16Path::TensorFew`: they run in one wave
/// whatever the cap, and 168 registers hold more loads in flight than 128. Measured on the H200
/// (session 16, µs, 4-CTA -> 3-CTA cap): GQA B = 1 T = 32K 49.6 -> 47.5, B = 8 T = 4K 46.9 ->
/// 45.7, B = 1 T = 16K 33.2 -> 31.7; but in several waves B = 8 T = 16K 135 -> 168.
const F16_FEW_CTAS_PER_SM: usize = 3;

/// Stages of the f16 ring (`F16_STAGES` in cache.cu: each warp streams its blocks through
/// shared memory by cp.async, this many 4 KiB chunks, all but one in flight) in the head-dim-128
/// modules of `F16Path::TensorFew`, and the one-head ones of `F16Path::Tensor` (0: loads into
/// registers). Measured on the H200 (session 17, µs, no ring -> 3 stages): MHA B = 1 T = 16K
/// 74.5 -> 70.7, T = 4K 26.6 -> 24.2, B = 8 T = 1K 39.8 -> 37.3, GQA (one-head CTAs) B = 1 T = 4K
/// 20.6 -> 19.1; 4 stages leave room for only 2 CTAs per SM (MHA B = 1 T = 16K: 83.8). The
/// many-wave grids of `Tensor` were slower with it (GQA B = 32 T = 32K 978 -> 1695, an earlier
/// copy layout). CTAs of several heads copy through L1 (cache.cu `F16_RING_CA`) and take the
/// ring only where a split's blocks divide evenly over the warps (session 18, µs, no ring ->
/// ring, 3 stages: GQA B = 1 T = 32K 47.4 -> 44.2, B = 32 T = 1K 42.4 -> 39.9; seven-block
/// splits, B = 8 T = 4K, 46.0 -> 49.5). They take 4 stages (`F16_STAGES_FEW_HEADS`; GQA B = 1
/// T = 16K 31.2 -> 30.4 (3) -> 28.5 (4) -> 35.0 (6), the others equal at 3 and 4): their grids
/// here have at most 2 CTAs per SM.
const F16_STAGES_FEW: usize = 3;
const F16_STAGES_FEW_HEADS: usize = 4;
const F16_STAGES_MANY: usize = 0;

/// Elements per KV head of one layer's buffers: in one block (codes, scales/mins; the f16
/// cache's rows in `kwin`/`vwin`), or in one slot (KIVI windows).
#[derive(Clone, Copy, Debug, Default)]
struct Geometry {
    kq_head: usize,
    ksm_head: usize,
    kwin_head: usize,
    vq_head: usize,
    vsm_head: usize,
    vwin_head: usize,
}

impl Geometry {
    fn new(config: &CacheConfig, d: usize) -> Geometry {
        let bt = BLOCK_TOKENS;
        match config {
            CacheConfig::F16 => Geometry {
                kwin_head: bt * d,
                vwin_head: bt * d,
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
                    kq_head: bt * d * kc.k_bits as usize / 32,
                    ksm_head: bt / g * d,
                    kwin_head: w * d,
                    vq_head: bt * d * kc.v_bits as usize / 32,
                    vsm_head: bt * (d / g),
                    vwin_head: kc.residual_len.max(1) * d,
                }
            }
        }
    }
}

/// Bytes of the paged part of one block (all layers): (codes, scales, mins, f16 rows).
fn block_parts(config: &CacheConfig, shape: &CacheShape) -> (u64, u64, u64, u64) {
    let g = Geometry::new(config, shape.head_dim);
    let n = (shape.n_layer * shape.n_kv_head) as u64;
    match config {
        CacheConfig::F16 => (0, 0, 0, n * 2 * (g.kwin_head + g.vwin_head) as u64),
        CacheConfig::Kivi(_) => (
            n * 4 * (g.kq_head + g.vq_head) as u64,
            n * 2 * (g.ksm_head + g.vsm_head) as u64,
            n * 2 * (g.ksm_head + g.vsm_head) as u64,
            0,
        ),
    }
}

/// Bytes of one slot's preallocated windows and sink rows, all layers (the f16 cache: none).
fn window_bytes(config: &CacheConfig, shape: &CacheShape) -> u64 {
    match config {
        CacheConfig::F16 => 0,
        CacheConfig::Kivi(kc) => {
            let g = Geometry::new(config, shape.head_dim);
            let sink = kc.sink_tokens * shape.head_dim;
            // f16 bytes of the key and value windows and of the key and value sink rows.
            (shape.n_layer * shape.n_kv_head * 2 * (g.kwin_head + g.vwin_head + 2 * sink)) as u64
        }
    }
}

/// KIVI sink tokens: the first positions of a sequence, kept in f16 outside the stream.
fn sink_tokens(config: &CacheConfig) -> usize {
    match config {
        CacheConfig::F16 => 0,
        CacheConfig::Kivi(kc) => kc.sink_tokens,
    }
}

/// Tokens of a sequence of length `n` after its sink tokens: the stream that the blocks, the
/// windows and every kernel but the sink ones count positions in.
fn stream_len(config: &CacheConfig, n: usize) -> usize {
    n - n.min(sink_tokens(config))
}

/// Tokens of a sequence of length `n` in quantized keys and values: (nqk, nqv); f16: (n, n).
fn quantized_ends(config: &CacheConfig, n: usize) -> (usize, usize) {
    match config {
        CacheConfig::F16 => (n, n),
        CacheConfig::Kivi(kc) => {
            let r = kc.residual_len;
            if r > 0 {
                (n - n % r, n.saturating_sub(r))
            } else {
                (n, n)
            }
        }
    }
}

/// What the driver made of one kernel (see [`GpuCache::attention_kernels`]).
#[derive(Clone, Debug)]
pub struct KernelResources {
    pub name: String,
    /// Registers per thread.
    pub registers: i32,
    /// Local memory per thread, bytes (register spills and dynamically indexed arrays).
    pub local_bytes: i32,
    /// Statically allocated shared memory per CTA, bytes.
    pub shared_bytes: i32,
}

/// One step's flat work lists (uploaded with its [`GpuBatch`]): `(item, key group)` of every
/// key group the append (re)quantizes, `(item, position)` of every value token it quantizes, and
/// the packed index of the first query token of every prefill-attention tile.
#[derive(Debug, Default, PartialEq)]
struct StepWork {
    key_groups: Vec<i32>,
    value_tokens: Vec<i32>,
    prefill_tiles: Vec<i32>,
}

impl StepWork {
    /// Adds item `item`: `n_new` tokens after `n_old` stored ones, packed from token `off`.
    fn add_item(
        &mut self,
        config: &CacheConfig,
        item: i32,
        n_old: usize,
        n_new: usize,
        off: usize,
    ) {
        if n_new > 1 {
            let tiles = (0..n_new).step_by(PREFILL_ROWS).map(|i| (off + i) as i32);
            self.prefill_tiles.extend(tiles);
        }
        if let CacheConfig::Kivi(kc) = config {
            // Quantized keys grow from [0, k0) to [0, k1): every group those new positions touch
            // is (re)quantized (R = 0: the partial last group again, with its current values).
            let (k0, v0) = quantized_ends(config, n_old);
            let (k1, v1) = quantized_ends(config, n_old + n_new);
            let g = kc.group_size;
            if k1 > k0 {
                for group in k0 / g..k1.div_ceil(g) {
                    self.key_groups.extend_from_slice(&[item, group as i32]);
                }
            }
            for p in v0..v1 {
                self.value_tokens.extend_from_slice(&[item, p as i32]);
            }
        }
    }
}

/// Pool blocks a sequence of `n` tokens holds.
fn blocks_for(config: &CacheConfig, n: usize) -> usize {
    let (k, v) = quantized_ends(config, stream_len(config, n));
    k.max(v).div_ceil(BLOCK_TOKENS)
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
    /// KIVI sink rows, `[slot][Hkv][S][D]` f16 (one element when there are none).
    ksink: CudaSlice<u16>,
    vsink: CudaSlice<u16>,
}

/// The host tables of one step (see [`GpuBatch`]), from `(slot, n_old, n_new)` per item.
///
/// With KIVI sink tokens (S > 0) a sequence is `[S sink positions | stream]`, and every kernel
/// but the sink ones works on the stream alone: `stream_items` and `stream_toks` count positions
/// from the first token after the sinks (an item's new sink tokens are left out of its stream
/// part: `n_old`, `n_new` and the packed offset shift; a new sink token's own record gets
/// `i < 0`, so it attends no stream position and is written to no window), while `toks` keeps
/// the absolute positions (RoPE, the sink attention). Without sinks both are the same.
#[derive(Debug, Default, PartialEq)]
struct StepPlan {
    /// `[slot, n_old, n_new, packed offset]` per item, absolute.
    items: Vec<[i32; 4]>,
    /// The same, stream-relative.
    stream_items: Vec<i32>,
    /// `[slot, n_old, i, packed offset, n_new]` per packed token, absolute.
    toks: Vec<i32>,
    /// The same, stream-relative.
    stream_toks: Vec<i32>,
    /// `[packed token, slot, position]` of every new token that is a sink position.
    sink_writes: Vec<i32>,
    work: StepWork,
    n_tokens: usize,
    /// Longest stream (n_old + n_new after the sinks) of any item.
    max_stream_len: usize,
    /// Most stored stream positions (n_old after the sinks) of any item.
    max_stream_old: usize,
}

impl StepPlan {
    fn new(config: &CacheConfig, items: &[(usize, usize, usize)]) -> StepPlan {
        let sinks = sink_tokens(config);
        let mut p = StepPlan::default();
        let mut off = 0usize;
        for (item, &(slot, n_old, n_new)) in items.iter().enumerate() {
            let (slot32, item32) = (slot as i32, item as i32);
            // New tokens at sink positions, and the item's stream part.
            let new_sinks = (n_old + n_new).min(sinks) - n_old.min(sinks);
            let (s_old, s_new, s_off) = (
                stream_len(config, n_old),
                n_new - new_sinks,
                off + new_sinks,
            );
            p.items
                .push([slot32, n_old as i32, n_new as i32, off as i32]);
            p.stream_items
                .extend_from_slice(&[slot32, s_old as i32, s_new as i32, s_off as i32]);
            for i in 0..n_new {
                p.toks.extend_from_slice(&[
                    slot32,
                    n_old as i32,
                    i as i32,
                    off as i32,
                    n_new as i32,
                ]);
                p.stream_toks.extend_from_slice(&[
                    slot32,
                    s_old as i32,
                    i as i32 - new_sinks as i32,
                    s_off as i32,
                    s_new as i32,
                ]);
                if i < new_sinks {
                    p.sink_writes.extend_from_slice(&[
                        (off + i) as i32,
                        slot32,
                        (n_old + i) as i32,
                    ]);
                }
            }
            p.work.add_item(config, item32, s_old, s_new, s_off);
            off += n_new;
            p.max_stream_len = p.max_stream_len.max(s_old + s_new);
            p.max_stream_old = p.max_stream_old.max(s_old);
        }
        p.n_tokens = off;
        p
    }
}

/// A batch of sequences for one step: `(slot, n_old, n_new, first packed token)` per item, on
/// the host and the device. Built by [`GpuCache::batch`]; valid until [`GpuCache::advance`] (its
/// device tables live in the cache and are overwritten by the next batch).
pub struct GpuBatch {
    items: Vec<[i32; 4]>,
    /// Device addresses of the step's tables ([`StepTables`]): items and tokens relative to
    /// the stream after the sinks (see [`StepPlan`]), tokens absolute too.
    dev_items: u64,
    dev_toks: u64,
    dev_stream_toks: u64,
    /// `[packed token, slot, position]` of the new tokens at sink positions.
    dev_sink_writes: u64,
    n_sink_writes: usize,
    /// KIVI: `(item, key group)` of every key group the step's append (re)quantizes, and
    /// `(item, position)` of every value token it quantizes (flat lists: one CTA each, however
    /// unequal the items' token counts).
    dev_key_groups: u64,
    n_key_groups: usize,
    dev_value_tokens: u64,
    n_value_tokens: usize,
    /// Every item brings one token and none is a sink position (a decode step): the append
    /// quantizes its values and writes the windows in one launch (`kivi_append_decode`).
    decode_only: bool,
    /// Packed index of the first query token of every prefill tile (`PF_ROWS` new tokens of an
    /// item with several new tokens), for `kivi_attn_prefill`.
    dev_prefill_tiles: u64,
    n_prefill_tiles: usize,
    /// Packed new tokens of all items.
    pub n_tokens: usize,
    /// Longest attended stream (n_old + n_new, after the sink tokens) of any item.
    pub max_len: usize,
    /// Most stored stream positions (n_old, after the sink tokens) of any item.
    max_old: usize,
}

impl GpuBatch {
    /// Device address of the per-token `(slot, n_old, i, offset, n_new)` records (RoPE reads
    /// positions here).
    pub(crate) fn dev_toks(&self) -> u64 {
        self.dev_toks
    }

    /// `(slot, n_old, n_new)` of each item.
    pub fn items(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.items
            .iter()
            .map(|it| (it[0] as usize, it[1] as usize, it[2] as usize))
    }
}

/// A device table of i32 that keeps its buffer from step to step: reallocated only when a step
/// needs more room, so that a decode loop's steps read their tables at the same addresses (the
/// CUDA graphs of `graph.rs` replay RoPE, which reads the token table, only on equal
/// addresses).
#[derive(Default)]
struct DeviceTable(Option<CudaSlice<i32>>);

impl DeviceTable {
    /// Copies `data` in (stream-ordered: kernels queued before still read the previous step's
    /// contents) and returns the buffer's address.
    fn upload(&mut self, s: &Arc<cudarc::driver::CudaStream>, data: &[i32]) -> Result<u64> {
        let data = if data.is_empty() { &[0][..] } else { data };
        if self.0.as_ref().is_none_or(|b| b.len() < data.len()) {
            self.0 = Some(s.alloc_zeros::<i32>(data.len().next_power_of_two())?);
        }
        let buf = self.0.as_mut().expect("allocated above");
        s.memcpy_htod(data, &mut buf.slice_mut(..data.len()))?;
        Ok(buf.device_ptr(s).0)
    }
}

/// The device tables of the current step (see [`GpuBatch`]).
#[derive(Default)]
struct StepTables {
    items: DeviceTable,
    toks: DeviceTable,
    stream_toks: DeviceTable,
    sink_writes: DeviceTable,
    key_groups: DeviceTable,
    value_tokens: DeviceTable,
    prefill_tiles: DeviceTable,
}

/// Paged KV cache of up to `max_seqs` sequences, all layers, on one GPU.
pub struct GpuCache {
    gpu: Arc<Gpu>,
    config: CacheConfig,
    shape: CacheShape,
    geo: Geometry,
    layers: Vec<Layer>,
    /// Stored tokens per slot (the same in every layer between steps); None = free slot.
    lens: Vec<Option<usize>>,
    /// Blocks held by each slot, in position order.
    tables: Vec<Vec<u32>>,
    /// Free pool blocks (a stack: the most recently freed is reused first).
    free: Vec<u32>,
    pool_blocks: usize,
    /// Device copy of `tables`: `[slot][table_width]` block ids (unused entries 0, a valid id).
    dev_table: CudaSlice<i32>,
    table_width: usize,
    part_o: Option<CudaSlice<f32>>,
    part_ml: Option<CudaSlice<f32>>,
    /// Per (token, head group) counters of CTAs done, zero between launches: the last CTA
    /// combines the splits (`last_cta_combines` in cache.cu).
    tickets: Option<CudaSlice<i32>>,
    /// Splits combined by the attention kernel's last CTA instead of a reduce launch, when
    /// they fit one wave (`KIVI_CUDA_FUSED_REDUCE=0`: the reduce launch, for comparison).
    fused_reduce: bool,
    /// Decode steps' value quantization and window writes in one launch
    /// (`KIVI_CUDA_FUSED_APPEND=0`: two, for comparison).
    fused_append: bool,
    /// `resident_ctas`' answers.
    resident: std::collections::HashMap<(VariantKey, usize), usize>,
    /// `KIVI_CUDA_TRACE=1`: the attention plans already printed (each distinct one once, to
    /// stderr: which module, split and grid a batch got), None when off.
    traced: Option<std::collections::HashSet<String>>,
    step_tables: StepTables,
    split_override: Option<usize>,
    /// Four-warp splits grown past a last split of window rows only (`absorb_tail`;
    /// `KIVI_CUDA_SPLIT_TAIL=0`: off, for comparison).
    split_tail: bool,
    sm_count: usize,
    /// L2 cache bytes of the device.
    l2_bytes: usize,
    /// Target CTAs per SM of the split choice (`CTAS_PER_SM`; `KIVI_CUDA_CTAS_PER_SM`).
    ctas_per_sm: usize,
    /// The same for the f16 cache (`KIVI_CUDA_F16_CTAS_PER_SM`; None: `F16_CTAS_PER_SM`, or
    /// one per SM for batches of at least as many (token, head group) pairs as SMs).
    f16_ctas_per_sm: Option<usize>,
    /// `F16_TC_MIN_LEN` (`KIVI_CUDA_F16_TC_MIN_LEN`).
    f16_tc_min_len: usize,
    /// `F16_STAGES_FEW`, `F16_STAGES_FEW_HEADS` and `F16_STAGES_MANY`
    /// (`KIVI_CUDA_F16_STAGES_FEW`, `_FEW_HEADS`, `_MANY`: 0, or 2-8).
    f16_stages_few: usize,
    f16_stages_few_heads: usize,
    f16_stages_many: usize,
    /// The f16 ring in CTAs of several heads: None = where a split's blocks divide evenly over
    /// the warps (see `F16_STAGES_FEW`); `KIVI_CUDA_F16_RING_HEADS=1` or `=0` forces.
    f16_ring_heads: Option<bool>,
    /// Cache bytes of one position of one KV head in one layer (codes, scales and mins; f16
    /// rows), which attention reads.
    position_bytes: usize,
    /// Whole quantized blocks through the tensor-core path (`KIVI_CUDA_SIMT=1`: CUDA cores only,
    /// the previous kernel, for comparison).
    tensor_cores: bool,
    /// The tensor-core path takes whole quantized blocks in multiples of this many per split
    /// (default: `default_tc_multiple`).
    tc_multiple: usize,
    /// Splits of two blocks or more are a multiple of this many blocks (four-warp CTAs;
    /// `KIVI_CUDA_SPLIT_UNIT`, default one per warp), so that every warp has as many blocks.
    split_unit: usize,
    /// One-warp attention CTAs (KIVI caches with tensor cores): None = chosen per batch
    /// (see `attend`); `KIVI_CUDA_WARPS=1` or `=4` forces.
    one_warp: Option<bool>,
    /// One query head per CTA for GQA: None = chosen per batch (`ONE_HEAD_MAX_L2_FRACTION`);
    /// `KIVI_CUDA_ONE_HEAD=1` or `=0` forces.
    one_head: Option<bool>,
    /// A split's last, partly filled quantized block goes through the tensor cores too when it
    /// holds at least this many quantized positions (0: never; `KIVI_CUDA_TC_PARTIAL`). None:
    /// `TC_PARTIAL_MIN` (measured on the H200 at 330-token sequences, B = 256 and 1024: the
    /// tensor cores compute all 128 rows of the block; with 4 heads per CTA they win from 42
    /// tokens, GQA B = 1024 14 % faster; with one head the CUDA-core path won below ~70 tokens
    /// until the key loop stopped unrolling fully (session 11: at 32, MHA B = 1024 KIVI-2
    /// R = 32 776 -> 758 us, the other caches equal)).
    tc_partial_min: Option<usize>,
    /// The attention among a multi-token item's new tokens through the tiled prefill kernel
    /// (else the decode kernel per query token; `KIVI_CUDA_PREFILL=0`, for comparison).
    prefill_kernel: bool,
    /// KIVI sink tokens per sequence (0: none; the f16 cache has none).
    sinks: usize,
}

fn unsupported(m: String) -> Error {
    Error::Unsupported(m)
}

/// Whole blocks a four-warp attention CTA sends through the tensor cores at a time (the rest
/// of a split's whole blocks take the CUDA-core path; [`GpuCache::set_tensor_core_multiple`]).
/// One per warp for the f16 cache; one for KIVI: interleaved codes make the CUDA-core path
/// dearer, and every block on the tensor cores measured faster (H200, session 19, 2-bit, µs,
/// one per warp -> one: MHA B = 1 T = 4K 18.9 -> 15.8, B = 32 T = 4K 158.6 -> 132.4; GQA B = 8
/// T = 4K 39.7 -> 35.2, B = 1 T = 1K 14.5 -> 12.2).
fn default_tc_multiple(config: &CacheConfig) -> usize {
    match config {
        CacheConfig::Kivi(_) => 1,
        _ => ATTN_THREADS as usize / 32,
    }
}

/// Word and bit offset of the code at interleaved position `x` (a token of a key block, a
/// channel of a value token) of quad member `member` (a key channel or value token % 4) in a
/// block's codes (`cache.cu`, "Codes are interleaved"): position x = 32 k + s + 8 i is slot s
/// of quarter k, bits 2 i of the member's byte; 4-bit codes are two planes of 8 d words, plane
/// i / 2 at bits 4 (i % 2). `quad` is the member's quad, `quad_row` and `slot_stride` the words of
/// a quad and of a slot in a plane.
fn interleaved_code_at(
    bits: u8,
    d: usize,
    (quad, quad_row, slot_stride): (usize, usize, usize),
    member: usize,
    x: usize,
) -> (usize, usize) {
    let (k, s, i) = (x / 32, x % 8, (x % 32) / 8);
    let (plane, bit) = if bits == 4 {
        (i / 2, 4 * (i % 2))
    } else {
        (0, 2 * i)
    };
    // The word in its row, then the row's 16-byte groups stored chunk-major in units of four
    // rows (cache.cu, `code_word`).
    let w = s * slot_stride + k;
    (
        plane * 8 * d + (quad / 4) * 4 * quad_row + (w / 4) * 16 + (quad % 4) * 4 + w % 4,
        8 * member + bit,
    )
}

/// Word and bit offset of the key code of block position `b`, channel `c` in a block's codes
/// (`cache.cu`, `key_word`).
fn key_code_at(bits: u8, d: usize, b: usize, c: usize) -> (usize, usize) {
    interleaved_code_at(bits, d, (c / 4, 32, 4), c % 4, b)
}

/// The same for the value code of block position `b`, channel `c` (`value_word`).
fn value_code_at(bits: u8, d: usize, b: usize, c: usize) -> (usize, usize) {
    interleaved_code_at(bits, d, (b / 4, d / 4, d / 32), b % 4, c)
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
        if !kc.group_size.is_multiple_of(32) || !BLOCK_TOKENS.is_multiple_of(kc.group_size) {
            return Err(unsupported(format!(
                "the CUDA cache needs group_size a multiple of 32 dividing {BLOCK_TOKENS}, not {}",
                kc.group_size
            )));
        }
        if kc.sink_tokens > MAX_SINKS {
            return Err(unsupported(format!(
                "the CUDA cache keeps at most {MAX_SINKS} sink tokens, not {}",
                kc.sink_tokens
            )));
        }
        if kc.key4_layers != 0 || kc.key4_auto != 0 {
            return Err(unsupported(
                "the CUDA cache has one key bit width for all layers (no k4@ layers)".into(),
            ));
        }
    }
    Ok(())
}

/// A launch of a 2-D grid of one-dimensional CTAs, without dynamic shared memory.
fn grid_2d((x, y): (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

impl GpuCache {
    /// A cache for `slots` sequences of up to `capacity` tokens each: [`GpuCache::with_budget`]
    /// with the budget of `slots` windows and `slots * blocks_for_tokens(capacity)` blocks (at
    /// least one). The pool is shared: one sequence may grow past `capacity` while others are
    /// shorter.
    pub fn new(
        gpu: Arc<Gpu>,
        config: CacheConfig,
        shape: CacheShape,
        slots: usize,
        capacity: usize,
    ) -> Result<Self> {
        check_supported(&config, &shape)?;
        let (c, s, m, f) = block_parts(&config, &shape);
        let blocks = (slots * blocks_for(&config, capacity.max(1))).max(1) as u64;
        let budget = slots as u64 * window_bytes(&config, &shape) + blocks * (c + s + m + f);
        Self::with_budget(gpu, config, shape, budget, slots)
    }

    /// A cache inside `budget_bytes` of GPU memory for at most `max_seqs` sequences at a time:
    /// the f16 windows of `max_seqs` slots are preallocated, the rest of the budget becomes the
    /// block pool (`(budget - max_seqs * window_bytes_per_seq) / block_bytes` blocks).
    pub fn with_budget(
        gpu: Arc<Gpu>,
        config: CacheConfig,
        shape: CacheShape,
        budget_bytes: u64,
        max_seqs: usize,
    ) -> Result<Self> {
        check_supported(&config, &shape)?;
        if max_seqs == 0 || max_seqs > i32::MAX as usize {
            return Err(unsupported(format!(
                "the GPU cache needs 1 to {} sequence slots, not {max_seqs}",
                i32::MAX
            )));
        }
        let (c, s, m, f) = block_parts(&config, &shape);
        let block = c + s + m + f;
        let windows = max_seqs as u64 * window_bytes(&config, &shape);
        if budget_bytes < windows.saturating_add(block) {
            return Err(unsupported(format!(
                "a GPU cache budget of {budget_bytes} bytes ({:.3} GiB) is too small: the windows \
                 of {max_seqs} sequences take {windows} bytes and one block {block} bytes",
                gib(budget_bytes)
            )));
        }
        let pool_blocks = (budget_bytes - windows) / block;
        if pool_blocks > i32::MAX as u64 {
            return Err(unsupported(format!(
                "{pool_blocks} GPU cache blocks: more than the block table can address"
            )));
        }
        let pool_blocks = pool_blocks as usize;
        let (hkv, d) = (shape.n_kv_head, shape.head_dim);
        let geo = Geometry::new(&config, d);
        let st = gpu.stream().clone();
        let oom = |e: cudarc::driver::DriverError| {
            unsupported(format!(
                "cannot allocate the GPU cache ({:.3} GiB: {pool_blocks} blocks of {block} bytes, \
                 {windows} bytes of windows): {e}",
                gib(pool_blocks as u64 * block + windows)
            ))
        };
        let paged = |per_head: usize| (pool_blocks * hkv * per_head).max(1);
        let (kwin_units, vwin_units) = match config {
            CacheConfig::F16 => (pool_blocks, pool_blocks),
            CacheConfig::Kivi(_) => (max_seqs, max_seqs),
        };
        let sinks = sink_tokens(&config);
        let sink_elems = (max_seqs * hkv * sinks * d).max(1);
        let mut layers = Vec::with_capacity(shape.n_layer);
        for _ in 0..shape.n_layer {
            layers.push(Layer {
                kq: st.alloc_zeros::<u32>(paged(geo.kq_head)).map_err(oom)?,
                ks: st.alloc_zeros::<u16>(paged(geo.ksm_head)).map_err(oom)?,
                km: st.alloc_zeros::<u16>(paged(geo.ksm_head)).map_err(oom)?,
                kwin: st
                    .alloc_zeros::<u16>((kwin_units * hkv * geo.kwin_head).max(1))
                    .map_err(oom)?,
                vq: st.alloc_zeros::<u32>(paged(geo.vq_head)).map_err(oom)?,
                vs: st.alloc_zeros::<u16>(paged(geo.vsm_head)).map_err(oom)?,
                vm: st.alloc_zeros::<u16>(paged(geo.vsm_head)).map_err(oom)?,
                vwin: st
                    .alloc_zeros::<u16>((vwin_units * hkv * geo.vwin_head).max(1))
                    .map_err(oom)?,
                ksink: st.alloc_zeros::<u16>(sink_elems).map_err(oom)?,
                vsink: st.alloc_zeros::<u16>(sink_elems).map_err(oom)?,
            });
        }
        let table_width = TABLE_WIDTH;
        let dev_table = st.alloc_zeros::<i32>(max_seqs * table_width).map_err(oom)?;
        let sm_count = gpu
            .context()
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .unwrap_or(132)
            .max(1) as usize;
        let l2_bytes = gpu.l2_bytes();
        let position_bytes = (block / (shape.n_layer * hkv * BLOCK_TOKENS).max(1) as u64) as usize;
        // Compile (or load) the kernels now, so that timing never includes it.
        gpu.function(MODULE, SOURCE, "kivi_attn_reduce")?;
        Ok(GpuCache {
            gpu,
            config,
            shape,
            geo,
            layers,
            lens: vec![None; max_seqs],
            tables: vec![Vec::new(); max_seqs],
            free: (0..pool_blocks as u32).rev().collect(),
            pool_blocks,
            dev_table,
            table_width,
            part_o: None,
            part_ml: None,
            tickets: None,
            fused_reduce: std::env::var("KIVI_CUDA_FUSED_REDUCE").map_or(true, |v| v != "0"),
            fused_append: std::env::var("KIVI_CUDA_FUSED_APPEND").map_or(true, |v| v != "0"),
            resident: Default::default(),
            traced: (std::env::var("KIVI_CUDA_TRACE").as_deref() == Ok("1")).then(Default::default),
            step_tables: StepTables::default(),
            split_override: None,
            split_tail: std::env::var("KIVI_CUDA_SPLIT_TAIL").map_or(true, |v| v != "0"),
            sm_count,
            l2_bytes,
            ctas_per_sm: std::env::var("KIVI_CUDA_CTAS_PER_SM")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(CTAS_PER_SM, |c| c.clamp(1, 64)),
            f16_ctas_per_sm: std::env::var("KIVI_CUDA_F16_CTAS_PER_SM")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map(|c| c.clamp(1, 64)),
            f16_tc_min_len: std::env::var("KIVI_CUDA_F16_TC_MIN_LEN")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(F16_TC_MIN_LEN),
            f16_stages_few: stages_from_env("KIVI_CUDA_F16_STAGES_FEW", F16_STAGES_FEW),
            f16_stages_few_heads: stages_from_env(
                "KIVI_CUDA_F16_STAGES_FEW_HEADS",
                F16_STAGES_FEW_HEADS,
            ),
            f16_stages_many: stages_from_env("KIVI_CUDA_F16_STAGES_MANY", F16_STAGES_MANY),
            f16_ring_heads: match std::env::var("KIVI_CUDA_F16_RING_HEADS").as_deref() {
                Ok("1") => Some(true),
                Ok("0") => Some(false),
                _ => None,
            },
            position_bytes,
            tensor_cores: std::env::var_os("KIVI_CUDA_SIMT").is_none_or(|v| v != "1"),
            split_unit: std::env::var("KIVI_CUDA_SPLIT_UNIT")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(ATTN_THREADS as usize / 32, |b| {
                    b.clamp(1, MAX_SPLIT / BLOCK_TOKENS)
                }),
            tc_multiple: std::env::var("KIVI_CUDA_TC_MULTIPLE")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(default_tc_multiple(&config), |b| {
                    b.clamp(1, MAX_SPLIT / BLOCK_TOKENS)
                }),
            one_warp: match std::env::var("KIVI_CUDA_WARPS").as_deref() {
                Ok("1") => Some(true),
                Ok("4") => Some(false),
                _ => None,
            },
            one_head: match std::env::var("KIVI_CUDA_ONE_HEAD").as_deref() {
                Ok("1") => Some(true),
                Ok("0") => Some(false),
                _ => None,
            },
            prefill_kernel: std::env::var_os("KIVI_CUDA_PREFILL").is_none_or(|v| v != "0"),
            tc_partial_min: std::env::var("KIVI_CUDA_TC_PARTIAL")
                .ok()
                .and_then(|v| v.parse().ok()),
            sinks,
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }
    pub fn shape(&self) -> CacheShape {
        self.shape
    }
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
    /// Sequence slots (the most sequences at a time).
    pub fn max_seqs(&self) -> usize {
        self.lens.len()
    }

    /// Forces the tokens per attention split (None: chosen from the batch to fill the GPU);
    /// rounded up to whole blocks, at most 2048.
    pub fn set_split_tokens(&mut self, split: Option<usize>) {
        self.split_override = split;
    }

    /// Selects the decode path for whole quantized blocks: tensor cores (the default) or CUDA
    /// cores only (the previous kernel; also `KIVI_CUDA_SIMT=1`). Both read the same layout.
    pub fn set_tensor_cores(&mut self, on: bool) {
        self.tensor_cores = on;
    }

    /// Blocks the tensor-core path takes at a time per split (1 to the blocks of the longest
    /// split, 16; default: `default_tc_multiple`; also `KIVI_CUDA_TC_MULTIPLE`), and the unit
    /// splits are rounded to. Tests set 1 so that short sequences exercise it too.
    pub fn set_tensor_core_multiple(&mut self, blocks: usize) {
        self.tc_multiple = blocks.clamp(1, MAX_SPLIT / BLOCK_TOKENS);
        self.split_unit = self.tc_multiple;
    }

    /// A split's last, partly filled quantized block goes through the tensor cores when it holds
    /// at least `min_tokens` quantized positions (0: never, the CUDA-core path takes it).
    pub fn set_tensor_core_partial(&mut self, min_tokens: usize) {
        self.tc_partial_min = Some(min_tokens);
    }

    /// Forces one-warp (`Some(true)`) or four-warp (`Some(false)`) attention CTAs for KIVI
    /// caches on the tensor-core path; None (the default) chooses per batch: one warp when the
    /// batch has enough (token, KV head) pairs to fill the GPU with one split each.
    pub fn set_one_warp(&mut self, one_warp: Option<bool>) {
        self.one_warp = one_warp;
    }

    /// Forces one query head per attention CTA (`Some(true)`) or all of a KV head's, up to 4
    /// (`Some(false)`); None (the default) chooses per batch: one for small batches.
    pub fn set_one_head(&mut self, one_head: Option<bool>) {
        self.one_head = one_head;
    }

    /// Selects how a multi-token item's queries attend its new tokens: the tiled prefill kernel
    /// (the default) or the decode kernel per query token (also `KIVI_CUDA_PREFILL=0`).
    pub fn set_prefill_kernel(&mut self, on: bool) {
        self.prefill_kernel = on;
    }

    /// Compiles (or loads from the disk cache) every attention kernel this cache may launch for
    /// `n_head` query heads, so that no timed or served step pays for it: kernels are compiled
    /// on first use, one module per variant.
    pub fn prepare(&self, n_head: usize) -> Result<()> {
        self.attention_kernels(n_head).map(|_| ())
    }

    /// Registers, local memory (spills and dynamically indexed arrays) and static shared memory
    /// of the attention kernels this cache launches for `n_head` query heads, as the driver
    /// compiled them (the kernels are tuned at the launch bounds' register limit: a change
    /// that spills shows here first).
    pub fn attention_kernels(&self, n_head: usize) -> Result<Vec<KernelResources>> {
        let (hkv, d) = (self.shape.n_kv_head, self.shape.head_dim);
        if n_head == 0 || !n_head.is_multiple_of(hkv) {
            return Err(unsupported(format!(
                "n_head {n_head} is not a multiple of n_kv_head {hkv}"
            )));
        }
        let (kb, vb) = match self.config {
            CacheConfig::F16 => (16, 16),
            CacheConfig::Kivi(kc) => (kc.k_bits, kc.v_bits),
        };
        let grouped = Self::heads_per_cta(n_head / hkv);
        let mut kernels = Vec::new();
        for ng in if grouped > 1 {
            vec![grouped, 1]
        } else {
            vec![1]
        } {
            kernels.push((
                format!("kivi_attn_d{d}_k{kb}_v{vb}_g{ng}"),
                self.attn_function(
                    kb,
                    vb,
                    ng,
                    4,
                    F16Path::Tensor,
                    self.f16_stages(kb, F16Path::Tensor, ng, true),
                )?,
            ));
            if kb < 16 {
                kernels.push((
                    format!("kivi_attn_d{d}_k{kb}_v{vb}_g{ng}_w1"),
                    self.attn_function(kb, vb, ng, 1, F16Path::Tensor, 0)?,
                ));
            } else {
                kernels.push((
                    format!("kivi_attn_d{d}_k{kb}_v{vb}_g{ng}_c3"),
                    self.attn_function(
                        kb,
                        vb,
                        ng,
                        4,
                        F16Path::TensorFew,
                        self.f16_stages(kb, F16Path::TensorFew, ng, true),
                    )?,
                ));
                kernels.push((
                    format!("kivi_attn_d{d}_k{kb}_v{vb}_g{ng}_simt"),
                    self.attn_function(kb, vb, ng, 4, F16Path::Simt, 0)?,
                ));
            }
        }
        for name in [format!("kivi_attn_prefill_d{d}"), "kivi_attn_reduce".into()] {
            let f = self.function(&name)?;
            kernels.push((name, f));
        }
        kernels
            .into_iter()
            .map(|(name, f)| {
                Ok(KernelResources {
                    registers: f.num_regs()?,
                    local_bytes: f.local_size_bytes()?,
                    shared_bytes: f.shared_size_bytes()?,
                    name,
                })
            })
            .collect()
    }

    /// Takes a free slot for a new, empty sequence.
    pub fn add_sequence(&mut self) -> Result<usize> {
        let slot = self.lens.iter().position(|l| l.is_none()).ok_or_else(|| {
            unsupported(format!(
                "all {} GPU cache sequence slots are in use",
                self.lens.len()
            ))
        })?;
        self.lens[slot] = Some(0);
        Ok(slot)
    }

    /// Drops a sequence and returns its blocks to the pool.
    pub fn remove_sequence(&mut self, slot: usize) -> Result<()> {
        match self.lens.get_mut(slot) {
            Some(l @ Some(_)) => {
                *l = None;
                let blocks = std::mem::take(&mut self.tables[slot]);
                self.free.extend(blocks.iter().rev());
                Ok(())
            }
            _ => Err(unsupported(format!("slot {slot} holds no sequence"))),
        }
    }

    /// Stored tokens of `slot`.
    pub fn seq_len(&self, slot: usize) -> Option<usize> {
        self.lens.get(slot).copied().flatten()
    }

    /// Pool blocks held by `slot`, in position order (position p is in `[p / BLOCK_TOKENS]`).
    pub fn block_table(&self, slot: usize) -> Option<&[u32]> {
        self.seq_len(slot)?;
        Some(&self.tables[slot])
    }

    // ---- Paging (the names and meanings of kivi_core::KvCache's; a block spans all layers) ----

    /// Bytes of one pool block (all layers).
    pub fn block_bytes(&self) -> u64 {
        let (c, s, m, f) = block_parts(&self.config, &self.shape);
        c + s + m + f
    }
    /// Blocks in the pool (in use and free).
    pub fn pool_blocks(&self) -> usize {
        self.pool_blocks
    }
    /// Pool blocks held by sequences.
    pub fn blocks_in_use(&self) -> usize {
        self.pool_blocks - self.free.len()
    }
    /// Pool blocks not held by any sequence (the pool is preallocated: all of them can be taken).
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    /// Pool blocks a sequence holding `n_tokens` tokens needs.
    pub fn blocks_for_tokens(&self, n_tokens: usize) -> usize {
        blocks_for(&self.config, n_tokens)
    }
    /// Pool blocks that a step appending `n_new` tokens to `slot` will take from the pool.
    pub fn blocks_needed(&self, slot: usize, n_new: usize) -> Result<usize> {
        let n = self
            .seq_len(slot)
            .ok_or_else(|| unsupported(format!("slot {slot} holds no sequence")))?;
        Ok(self
            .blocks_for_tokens(n + n_new)
            .saturating_sub(self.tables[slot].len()))
    }
    /// Bytes a sequence holds outside pool blocks: 0, the windows are preallocated per slot
    /// (see [`GpuCache::window_bytes_per_seq`]) and counted in the budget up front.
    pub fn seq_fixed_bytes(&self) -> u64 {
        0
    }
    /// Bytes of one slot's preallocated f16 key and value windows, all layers (f16 cache: 0).
    pub fn window_bytes_per_seq(&self) -> u64 {
        window_bytes(&self.config, &self.shape)
    }
    /// Sequences currently registered.
    pub fn n_sequences(&self) -> usize {
        self.lens.iter().filter(|l| l.is_some()).count()
    }
    /// A no-op: the pool is allocated once for the whole budget; free blocks stay reserved.
    pub fn trim_free_blocks(&mut self, _keep: usize) {}

    /// Bytes used by the live sequences' stored tokens (codes, scales and mins of quantized
    /// tokens at word/group granularity, f16 rows of the windows and of the f16 cache), like
    /// [`kivi_core::KvCache::memory`]; excludes block slack and unused windows.
    pub fn memory(&self) -> MemoryUsage {
        let (hkv, d) = (self.shape.n_kv_head as u64, self.shape.head_dim as u64);
        let layers = self.shape.n_layer as u64;
        let mut m = MemoryUsage::default();
        for &n_all in self.lens.iter().flatten() {
            m.tokens += n_all as u64 * layers;
            // The sink rows, then the stream after them.
            let n = stream_len(&self.config, n_all) as u64;
            m.full_precision_bytes += layers * 2 * (n_all as u64 - n) * hkv * d * 2;
            match self.config {
                CacheConfig::F16 => m.full_precision_bytes += layers * 2 * n * hkv * d * 2,
                CacheConfig::Kivi(kc) => {
                    let (nqk, nqv) = quantized_ends(&self.config, n as usize);
                    let (nqk, nqv, g) = (nqk as u64, nqv as u64, kc.group_size as u64);
                    let (kf, vf) = (32 / kc.k_bits as u64, 32 / kc.v_bits as u64);
                    let metas = hkv * d * nqk.div_ceil(g) + nqv * hkv * (d / g);
                    m.code_bytes += layers * 4 * (hkv * d * nqk.div_ceil(kf) + nqv * hkv * d / vf);
                    m.scale_bytes += layers * 2 * metas;
                    m.min_bytes += layers * 2 * metas;
                    m.full_precision_bytes += layers * 2 * ((n - nqk) + (n - nqv)) * hkv * d;
                }
            }
        }
        m
    }

    /// Bytes allocated for the cache: the whole pool and every slot's windows. `tokens` is the
    /// same as in [`GpuCache::memory`].
    pub fn memory_reserved(&self) -> MemoryUsage {
        let (c, s, m, f) = block_parts(&self.config, &self.shape);
        let b = self.pool_blocks as u64;
        MemoryUsage {
            code_bytes: b * c,
            scale_bytes: b * s,
            min_bytes: b * m,
            full_precision_bytes: b * f + self.max_seqs() as u64 * self.window_bytes_per_seq(),
            tokens: self.memory().tokens,
        }
    }

    /// Describes one step: `n_new` tokens for each `(slot, n_new)`, packed in this order, and
    /// takes the pool blocks the step's appends need. Fails (taking nothing) when a slot is not
    /// live or listed twice, or the pool has too few free blocks.
    pub fn batch(&mut self, items: &[(usize, usize)]) -> Result<GpuBatch> {
        let mut seen = vec![false; self.lens.len()];
        let mut needed = 0usize;
        let mut plan_items = Vec::with_capacity(items.len());
        for &(slot, n_new) in items {
            let n_old = self
                .seq_len(slot)
                .ok_or_else(|| unsupported(format!("slot {slot} holds no sequence")))?;
            if std::mem::replace(&mut seen[slot], true) {
                return Err(unsupported(format!("slot {slot} is twice in one step")));
            }
            if n_old + n_new > i32::MAX as usize / 2 {
                return Err(unsupported(format!(
                    "slot {slot}: {} tokens are too many",
                    n_old + n_new
                )));
            }
            needed += self.blocks_needed(slot, n_new)?;
            plan_items.push((slot, n_old, n_new));
        }
        if needed > self.free.len() {
            return Err(unsupported(format!(
                "GPU cache pool exhausted: the step needs {needed} more blocks, {} of {} are free",
                self.free.len(),
                self.pool_blocks
            )));
        }
        if needed > 0 {
            self.take_blocks(items)?;
        }
        let StepPlan {
            items: host_items,
            stream_items,
            toks,
            stream_toks,
            sink_writes,
            work,
            n_tokens,
            max_stream_len,
            max_stream_old,
        } = StepPlan::new(&self.config, &plan_items);
        let s = self.gpu.stream().clone();
        let StepWork {
            key_groups,
            value_tokens,
            prefill_tiles,
        } = work;
        let (n_key_groups, n_value_tokens) = (key_groups.len() / 2, value_tokens.len() / 2);
        let n_prefill_tiles = prefill_tiles.len();
        let t = &mut self.step_tables;
        let dev_items = t.items.upload(&s, &stream_items)?;
        let dev_toks = t.toks.upload(&s, &toks)?;
        let dev_stream_toks = if self.sinks > 0 {
            t.stream_toks.upload(&s, &stream_toks)?
        } else {
            dev_toks
        };
        let dev_sink_writes = if sink_writes.is_empty() {
            0
        } else {
            t.sink_writes.upload(&s, &sink_writes)?
        };
        let dev_key_groups = t.key_groups.upload(&s, &key_groups)?;
        let dev_value_tokens = t.value_tokens.upload(&s, &value_tokens)?;
        let dev_prefill_tiles = t.prefill_tiles.upload(&s, &prefill_tiles)?;
        Ok(GpuBatch {
            items: host_items,
            dev_items,
            dev_toks,
            dev_stream_toks,
            dev_sink_writes,
            n_sink_writes: sink_writes.len() / 3,
            dev_key_groups,
            n_key_groups,
            dev_value_tokens,
            n_value_tokens,
            decode_only: sink_writes.is_empty()
                && plan_items.iter().all(|&(_, _, n_new)| n_new == 1),
            dev_prefill_tiles,
            n_prefill_tiles,
            n_tokens,
            max_len: max_stream_len,
            max_old: max_stream_old,
        })
    }

    /// Gives each item the blocks it lacks (the caller checked there are enough) and uploads the
    /// changed rows of the block table (all of it when the table must grow).
    fn take_blocks(&mut self, items: &[(usize, usize)]) -> Result<()> {
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        let mut width = self.table_width;
        for &(slot, n_new) in items {
            let want = self.blocks_for_tokens(self.lens[slot].unwrap_or(0) + n_new);
            let t = &mut self.tables[slot];
            if t.len() >= want {
                continue;
            }
            while t.len() < want {
                t.push(self.free.pop().expect("checked by the caller"));
            }
            (lo, hi) = (lo.min(slot), hi.max(slot + 1));
            width = width.max(want);
        }
        if lo >= hi {
            return Ok(());
        }
        let s = self.gpu.stream().clone();
        if width > self.table_width {
            self.table_width = width.next_power_of_two();
            self.dev_table = s.alloc_zeros::<i32>(self.lens.len() * self.table_width)?;
            (lo, hi) = (0, self.lens.len());
        }
        let w = self.table_width;
        let mut rows = vec![0i32; (hi - lo) * w];
        for (slot, row) in (lo..hi).zip(rows.chunks_exact_mut(w)) {
            for (r, &b) in row.iter_mut().zip(&self.tables[slot]) {
                *r = b as i32;
            }
        }
        s.memcpy_htod(&rows, &mut self.dev_table.slice_mut(lo * w..hi * w))?;
        Ok(())
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
        let (hkv, d) = (self.shape.n_kv_head as u64, self.shape.head_dim as i32);
        let g = &self.geo;
        let pool = self.pool_blocks as u64;
        let mut c = CacheBufs {
            kq: l.kq.device_ptr(s).0,
            ks: l.ks.device_ptr(s).0,
            km: l.km.device_ptr(s).0,
            kwin: l.kwin.device_ptr(s).0,
            vq: l.vq.device_ptr(s).0,
            vs: l.vs.device_ptr(s).0,
            vm: l.vm.device_ptr(s).0,
            vwin: l.vwin.device_ptr(s).0,
            ksink: l.ksink.device_ptr(s).0,
            vsink: l.vsink.device_ptr(s).0,
            sink_unit: hkv * (self.sinks * self.shape.head_dim) as u64,
            sink_head: (self.sinks * self.shape.head_dim) as u64,
            sinks: self.sinks as i32,
            table: self.dev_table.device_ptr(s).0,
            table_stride: self.table_width as u64,
            // Paged arenas are head-major ([Hkv][block][..]): a KV head's consecutive blocks
            // are contiguous, as a whole sequence was before paging.
            kq_block: g.kq_head as u64,
            kq_head: pool * g.kq_head as u64,
            ksm_block: g.ksm_head as u64,
            ksm_head: pool * g.ksm_head as u64,
            vq_block: g.vq_head as u64,
            vq_head: pool * g.vq_head as u64,
            vsm_block: g.vsm_head as u64,
            vsm_head: pool * g.vsm_head as u64,
            n_kv: hkv as i32,
            head_dim: d,
            ..Default::default()
        };
        (c.kwin_unit, c.kwin_head, c.vwin_unit, c.vwin_head) = match self.config {
            // The f16 rows are paged: head-major too.
            CacheConfig::F16 => (
                g.kwin_head as u64,
                pool * g.kwin_head as u64,
                g.vwin_head as u64,
                pool * g.vwin_head as u64,
            ),
            // KIVI windows: [slot][Hkv][W][D].
            CacheConfig::Kivi(_) => (
                hkv * g.kwin_head as u64,
                g.kwin_head as u64,
                hkv * g.vwin_head as u64,
                g.vwin_head as u64,
            ),
        };
        match self.config {
            CacheConfig::F16 => {
                c.is_f16 = 1;
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

    /// The defines of one decode-attention variant (cache.cu `kivi_attn`) and its module name.
    /// `path` (f16 cache only): `Simt` compiles with `F16_TC=0` (the CUDA-core rows alone take
    /// 92 registers and no spills, where the module with both paths takes 128 and spills);
    /// `TensorFew` with `F16_MIN_CTAS=3`; `stages` > 0 (f16 tensor-core paths): the f16 ring.
    fn attn_variant(
        d: usize,
        kb: u8,
        vb: u8,
        ng: usize,
        warps: usize,
        path: F16Path,
        stages: usize,
    ) -> (String, Vec<String>) {
        let mut defines = [
            ("D", d),
            ("KB", kb.into()),
            ("VB", vb.into()),
            ("NG", ng),
            ("W", warps),
        ]
        .map(|(k, v)| format!("-DATTN_{k}={v}"))
        .to_vec();
        let mut name = format!("{MODULE}_attn_d{d}_k{kb}_v{vb}_g{ng}_w{warps}");
        if kb == 16 {
            match path {
                F16Path::Tensor => {}
                F16Path::TensorFew => {
                    defines.push("-DF16_MIN_CTAS=3".into());
                    name.push_str("_c3");
                }
                F16Path::Simt => {
                    defines.push("-DF16_TC=0".into());
                    name.push_str("_simt");
                }
            }
            if stages > 0 && path != F16Path::Simt {
                defines.push(format!("-DF16_STAGES={stages}"));
                name.push_str(&format!("_s{stages}"));
            }
        }
        (name, defines)
    }

    /// The decode-attention kernel for this cache's head dim, `kb`/`vb` key/value bits (16:
    /// the f16 cache), `ng` query heads and `warps` warps per CTA: one module per variant,
    /// compiled on first use (cache.cu `kivi_attn`).
    fn attn_function(
        &self,
        kb: u8,
        vb: u8,
        ng: usize,
        warps: usize,
        path: F16Path,
        stages: usize,
    ) -> Result<CudaFunction> {
        let (module, defines) =
            Self::attn_variant(self.shape.head_dim, kb, vb, ng, warps, path, stages);
        self.gpu
            .function_with(&module, SOURCE, &defines, "kivi_attn")
    }

    /// CTAs of an attention variant (`key`: bits, heads, warps, f16 path, ring stages) with `smem`
    /// bytes of dynamic shared memory that the whole GPU holds at once (the driver's occupancy,
    /// asked once per variant and size).
    fn resident_ctas(&mut self, f: &CudaFunction, key: VariantKey, smem: usize) -> Result<usize> {
        if let Some(&n) = self.resident.get(&(key, smem)) {
            return Ok(n);
        }
        let (_, _, _, warps, _, _) = key;
        let per_sm =
            f.occupancy_max_active_blocks_per_multiprocessor((warps * 32) as u32, smem, None)?;
        let n = per_sm as usize * self.sm_count;
        self.resident.insert((key, smem), n);
        Ok(n)
    }

    /// Stages of the f16 ring in the `kb`-bit `ng`-head modules of `path` (`f16_ring_stages`),
    /// for splits whose whole stored blocks divide `evenly` over the warps or not: CTAs of several
    /// heads take the ring only then (`f16_ring_heads` can force it either way).
    fn f16_stages(&self, kb: u8, path: F16Path, ng: usize, evenly: bool) -> usize {
        let stages = f16_ring_stages(
            kb,
            path,
            ng,
            self.shape.head_dim,
            self.f16_stages_few,
            self.f16_stages_few_heads,
            self.f16_stages_many,
        );
        if ng > 1 && !self.f16_ring_heads.unwrap_or(evenly) {
            0
        } else {
            stages
        }
    }

    fn heads_per_cta(n_rep: usize) -> usize {
        [4, 3, 2, 1]
            .into_iter()
            .find(|g| n_rep.is_multiple_of(*g))
            .unwrap_or(1)
    }

    /// Tokens per split for a batch: enough CTAs to fill the GPU a few times over, in whole
    /// blocks (a split's block ids fit the kernel's shared-memory table). `tc_unit`: blocks the
    /// tensor-core path takes at a time; a split of two blocks or more is a multiple of it, so
    /// that no whole block is left to the CUDA-core path (measured on the H200: GQA B = 32,
    /// T = 4K KIVI-2 1.34x slower at 896-token splits than at 2048).
    fn split_tokens(
        &self,
        batch: &GpuBatch,
        ctas_per_split: usize,
        ctas_per_sm: usize,
        tc_unit: usize,
    ) -> usize {
        let s = match self.split_override {
            Some(s) => s.div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS,
            None => {
                // Rounded up (measured on the H200: rounding to the nearest block made f16 MHA
                // B = 8, T = 4K 15 % slower, more CTAs than the GPU runs in 2.5 waves).
                let target = ctas_per_sm * self.sm_count;
                let wanted = target.div_ceil(ctas_per_split.max(1)).max(1);
                let blocks = batch.max_len.div_ceil(wanted).div_ceil(BLOCK_TOKENS);
                let unit = tc_unit.max(1);
                let blocks = if blocks >= 2 {
                    blocks.div_ceil(unit) * unit
                } else {
                    blocks
                };
                let s = (blocks * BLOCK_TOKENS).clamp(BLOCK_TOKENS, MAX_SPLIT);
                if unit > 1 && self.split_tail {
                    let min_splits = self.sm_count.div_ceil(ctas_per_split.max(1));
                    absorb_tail(s, batch.max_len, unit * BLOCK_TOKENS, min_splits)
                } else {
                    s
                }
            }
        };
        s.clamp(BLOCK_TOKENS, MAX_SPLIT)
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
        let read_bytes = t * batch.max_len * hkv * self.position_bytes;
        let (num, den) = ONE_HEAD_MAX_L2_FRACTION;
        let one_head = self
            .one_head
            .unwrap_or(read_bytes * den <= self.l2_bytes * num);
        let ng = if one_head {
            1
        } else {
            Self::heads_per_cta(n_head / hkv)
        };
        let nchunk = n_head / hkv / ng;
        // Many short sequences (batched serving) are bound by instruction issue, not bytes: with
        // one warp per CTA each warp takes whole blocks on the tensor cores (a four-warp CTA
        // would leave warps idle on 1-3 blocks) and ~20 independent warps share an SM.
        let pairs = hkv * nchunk * t;
        let quant = !matches!(self.config, CacheConfig::F16);
        let (kb, vb) = match self.config {
            CacheConfig::F16 => (16, 16),
            CacheConfig::Kivi(kc) => (kc.k_bits, kc.v_bits),
        };
        let one_warp = quant
            && self.tensor_cores
            && self.one_warp.unwrap_or(
                pairs >= ONE_WARP_MIN_PAIRS
                    && batch.max_len <= one_warp_max_len(d, kb, vb, ng, pairs),
            );
        let split = if one_warp {
            let per_sm = if ng == 1 {
                ONE_WARP_CTAS_PER_SM
            } else {
                self.ctas_per_sm
            };
            let split = self.split_tokens(batch, pairs, per_sm, 1);
            if ng > 1 && self.split_override.is_none() {
                even_split(split, batch.max_len, ONE_WARP_HEADS_MAX_SPLIT)
            } else {
                split
            }
        } else {
            let unit = if quant && self.tensor_cores {
                self.tc_multiple.max(self.split_unit)
            } else {
                1
            };
            let per_sm = if quant {
                self.ctas_per_sm
            } else {
                // A batch that fills every SM once is split only as far as MAX_SPLIT needs:
                // measured on the H200 (session 16, µs, 2 -> 1 per SM): GQA B = 32 T = 1K
                // 46.9 -> 44.2, MHA B = 8 T = 1K 41.5 -> 41.1, longer contexts within 1 %.
                self.f16_ctas_per_sm.unwrap_or(if pairs >= self.sm_count {
                    1
                } else {
                    F16_CTAS_PER_SM
                })
            };
            self.split_tokens(batch, pairs, per_sm, unit)
        };
        // The sink attention's partials take one more split slot, after the decode kernel's; the
        // prefill kernel's one more, the last.
        let prefill = self.prefill_kernel && batch.n_prefill_tiles > 0;
        let decode_splits = batch.max_len.div_ceil(split);
        let sink_slot = decode_splits;
        let nsplit = decode_splits + usize::from(self.sinks > 0) + usize::from(prefill);
        let direct = nsplit == 1 && self.sinks == 0;
        let f16_tc = !quant && self.tensor_cores && batch.max_len > self.f16_tc_min_len;
        let ctas = decode_splits * hkv * nchunk * t;
        let path = if quant {
            F16Path::Tensor
        } else if !f16_tc {
            F16Path::Simt
        } else if ctas <= F16_FEW_CTAS_PER_SM * self.sm_count {
            F16Path::TensorFew
        } else {
            F16Path::Tensor
        };
        let warps = if one_warp {
            1
        } else {
            ATTN_THREADS as usize / 32
        };
        // Whole stored blocks in a full split (a batch shorter than one split has fewer).
        let split_blocks = split.min(batch.max_old) / BLOCK_TOKENS;
        let stages = self.f16_stages(kb, path, ng, split_blocks.is_multiple_of(warps));
        let f = self.attn_function(kb, vb, ng, warps, path, stages)?;
        // q, one value-sum slot per warp, max/sum, scores, the f16 rings (`attn_split`'s layout).
        let sc_stride = split + if ng > 1 { SCORE_ROW_PAD } else { 0 };
        let smem = (ng * d + warps * ng * d + (2 * ng + 8).next_multiple_of(4) + ng * sc_stride)
            * 4
            + warps * stages * 32 * d;
        // Decode splits only, in one wave of CTAs: the kernel's last CTA per (token, head group)
        // combines them, with no reduce launch. (Measured on the H200, docs/benchmarks.md
        // "Session 16": 2-10 % faster in one wave; with more waves the combining CTAs hold their
        // slots from the next ones, and the reduce launch was 1.5-7 % faster.)
        let fused = !direct
            && self.fused_reduce
            && self.sinks == 0
            && !prefill
            && ctas <= self.resident_ctas(&f, (kb, vb, ng, warps, path, stages), smem)?;
        if let Some(traced) = self.traced.as_mut() {
            let plan = format!(
                "attention plan: {t} tokens, longest {} positions, {n_head}/{hkv}/{d}, {kb}/{vb} \
                 bits: {ng} head(s) and {warps} warp(s) per CTA, split {split} x {decode_splits}, \
                 {ctas} CTAs, {} ({path:?}, {stages} ring stages)",
                batch.max_len,
                if direct {
                    "direct"
                } else if fused {
                    "combined by the last CTA"
                } else {
                    "reduce launch"
                }
            );
            // (At most 4096 kept: a long run prints each plan once for a while, then again.)
            if traced.len() >= 4096 {
                traced.clear();
            }
            if traced.insert(plan.clone()) {
                eprintln!("{plan}");
            }
        }
        let parts = t * n_head * nsplit;
        let s = self.gpu.stream().clone();
        if self.part_o.as_ref().is_none_or(|p| p.len() < parts * d) {
            self.part_o = Some(s.alloc_zeros::<f32>(parts * d)?);
        }
        if self.part_ml.as_ref().is_none_or(|p| p.len() < parts * 2) {
            self.part_ml = Some(s.alloc_zeros::<f32>(parts * 2)?);
        }
        let groups = t * hkv * nchunk;
        if fused && self.tickets.as_ref().is_none_or(|c| c.len() < groups) {
            self.tickets = Some(s.alloc_zeros::<i32>(groups)?);
        }
        let part_o = self.part_o.as_ref().expect("allocated above");
        let part_ml = self.part_ml.as_ref().expect("allocated above");
        let params = AttnParams {
            c: self.bufs(layer),
            q: q.device_ptr(&s).0,
            knew: k_new.device_ptr(&s).0,
            vnew: v_new.device_ptr(&s).0,
            toks: batch.dev_stream_toks,
            part_o: part_o.device_ptr(&s).0,
            part_ml: part_ml.device_ptr(&s).0,
            // One split and no prefill part, or splits it combines: the kernel writes the
            // output, no reduce launch.
            out: if direct || fused {
                out.device_ptr(&s).0
            } else {
                0
            },
            tickets: match (&self.tickets, fused) {
                (Some(c), true) => c.device_ptr(&s).0,
                _ => 0,
            },
            n_head: n_head as i32,
            nsplit: nsplit as i32,
            split_len: split as i32,
            sc_stride: sc_stride as i32,
            scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
            tensor_cores: i32::from(self.tensor_cores && (quant || f16_tc)),
            tc_multiple: if one_warp { 1 } else { self.tc_multiple as i32 },
            tc_partial_min: self
                .tc_partial_min
                .unwrap_or(TC_PARTIAL_MIN)
                .min(BLOCK_TOKENS) as i32,
            prefill: i32::from(prefill),
        };
        let cfg = LaunchConfig {
            grid_dim: (decode_splits as u32, (hkv * nchunk) as u32, t as u32),
            block_dim: (if one_warp { 32 } else { ATTN_THREADS }, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        if decode_splits > 0 {
            // SAFETY: the params point at live buffers of the sizes checked above; the kernel
            // reads only positions below each token's attended length: window slots, or blocks
            // of the slot's table row (`batch` gave it blocks for every stored position).
            unsafe { s.launch_builder(&f).arg(&params).launch(cfg)? };
        }
        if self.sinks > 0 {
            let f = self.function(&format!("kivi_attn_sinks_d{d}"))?;
            let cfg = grid_2d((t as u32, n_head as u32), 32);
            let slot = sink_slot as i32;
            // SAFETY: as above; each token reads the sink rows of its slot below its stored
            // length and the step's new rows of its own item (absolute records), and writes its
            // partial in split `slot` < nsplit.
            unsafe {
                s.launch_builder(&f)
                    .arg(&params)
                    .arg(&batch.dev_toks)
                    .arg(&slot)
                    .launch(cfg)?
            };
        }
        if prefill {
            let f = self.function(&format!("kivi_attn_prefill_d{d}"))?;
            let cfg = grid_2d((batch.n_prefill_tiles as u32, n_head as u32), 128);
            // SAFETY: as above; each tile's tokens and keys are new tokens of one item (rows
            // of q / k_new / v_new), its partials the last split of those tokens.
            unsafe {
                s.launch_builder(&f)
                    .arg(&params)
                    .arg(&batch.dev_prefill_tiles)
                    .launch(cfg)?
            };
        }
        if direct || fused {
            return Ok(());
        }
        let r = self.function("kivi_attn_reduce")?;
        let cfg = grid_2d((n_head as u32, t as u32), 32);
        let (nh, ns, hd) = (n_head as i32, nsplit as i32, d as i32);
        let prefill_slot = if prefill { nsplit as i32 - 1 } else { -1 };
        // SAFETY: part buffers hold t * n_head * nsplit entries, out t * n_head * d.
        unsafe {
            s.launch_builder(&r)
                .arg(part_o)
                .arg(part_ml)
                .arg(out)
                .arg(&nh)
                .arg(&ns)
                .arg(&hd)
                .arg(&batch.dev_stream_toks)
                .arg(&prefill_slot)
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
        if batch.n_sink_writes > 0 {
            let f = self.function("kivi_write_sinks")?;
            let cfg = grid_2d((batch.n_sink_writes as u32, hkv as u32), d as u32);
            // SAFETY: each record names a live slot and a position below the sink count, and a
            // packed token of the batch (rows of k_new / v_new).
            unsafe {
                s.launch_builder(&f)
                    .arg(&c)
                    .arg(&batch.dev_sink_writes)
                    .arg(k_new)
                    .arg(v_new)
                    .launch(cfg)?
            };
        }
        if batch.n_key_groups > 0 {
            let f = self.function("kivi_quantize_keys")?;
            // Four threads per channel (the kernel's shuffles need whole warps: D % 32 == 0).
            let cfg = grid_2d((batch.n_key_groups as u32, hkv as u32), 4 * d as u32);
            // SAFETY: every position written is below n_old + n_new, whose blocks `batch`
            // took and entered in the device block table; the records index its items.
            unsafe {
                s.launch_builder(&f)
                    .arg(&c)
                    .arg(&batch.dev_items)
                    .arg(&batch.dev_key_groups)
                    .arg(k_new)
                    .launch(cfg)?
            };
        }
        // A decode step: the values leaving full windows are quantized by the window kernel's
        // own CTAs, before they overwrite those slots (one launch less per layer and step).
        let fused = self.fused_append && batch.decode_only && batch.n_value_tokens > 0;
        if batch.n_value_tokens > 0 && !fused {
            let f = self.function("kivi_quantize_values")?;
            let cfg = grid_2d((batch.n_value_tokens as u32, 1), APPEND_THREADS);
            // SAFETY: as above.
            unsafe {
                s.launch_builder(&f)
                    .arg(&c)
                    .arg(&batch.dev_items)
                    .arg(&batch.dev_value_tokens)
                    .arg(v_new)
                    .launch(cfg)?
            };
        }
        let f = self.function(if fused {
            "kivi_append_decode"
        } else {
            "kivi_write_window"
        })?;
        let cfg = grid_2d((t as u32, 1), APPEND_THREADS);
        // SAFETY: as above; window slots are taken modulo the window size (stream-relative
        // records: a sink token's position is negative and written nowhere); kivi_append_decode
        // quantizes the one value position each token's item leaves its window, in its block.
        unsafe {
            s.launch_builder(&f)
                .arg(&c)
                .arg(&batch.dev_stream_toks)
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
        let n_all = self
            .seq_len(slot)
            .ok_or_else(|| unsupported(format!("slot {slot} holds no sequence")))?;
        // Sink rows first, then the stream (positions counted after the sinks).
        let n_sink = n_all - stream_len(&self.config, n_all);
        let n = n_all - n_sink;
        let (hkv, d) = (self.shape.n_kv_head, self.shape.head_dim);
        let s = self.gpu.stream();
        let l = &self.layers[layer];
        let blocks = &self.tables[slot];
        // The slot's blocks of a paged buffer (head-major arena: `[Hkv][pool][per_head]`),
        // gathered as `[block of the sequence][Hkv][per_head]`.
        let pool = self.pool_blocks;
        fn gather<T: DeviceRepr + Clone + Default>(
            s: &Arc<cudarc::driver::CudaStream>,
            b: &CudaSlice<T>,
            blocks: &[u32],
            hkv: usize,
            pool: usize,
            per_head: usize,
        ) -> Result<Vec<T>> {
            let mut out = Vec::with_capacity(blocks.len() * hkv * per_head);
            for &blk in blocks {
                for h in 0..hkv {
                    let o = (h * pool + blk as usize) * per_head;
                    out.extend(s.clone_dtoh(&b.slice(o..o + per_head))?);
                }
            }
            Ok(out)
        }
        let paged16 =
            |b: &CudaSlice<u16>, per_head: usize| gather(s, b, blocks, hkv, pool, per_head);
        let paged32 =
            |b: &CudaSlice<u32>, per_head: usize| gather(s, b, blocks, hkv, pool, per_head);
        let window = |b: &CudaSlice<u16>, per_head: usize| -> Result<Vec<u16>> {
            Ok(s.clone_dtoh(&b.slice(slot * hkv * per_head..(slot + 1) * hkv * per_head))?)
        };
        let h2f = |x: u16| f16::from_bits(x).to_f32();
        let g = self.geo;
        let bt = BLOCK_TOKENS;
        let mut k = vec![0f32; n * hkv * d];
        let mut v = vec![0f32; n * hkv * d];
        let (mut sink_k, mut sink_v) = (Vec::new(), Vec::new());
        if n_sink > 0 {
            let per_slot = hkv * self.sinks * d;
            let rows = |b: &CudaSlice<u16>| -> Result<Vec<f32>> {
                let raw = s.clone_dtoh(&b.slice(slot * per_slot..(slot + 1) * per_slot))?;
                // [Hkv][S][D] -> [position][Hkv][D], the stored positions only.
                let mut out = vec![0f32; n_sink * hkv * d];
                for p in 0..n_sink {
                    for h in 0..hkv {
                        for c in 0..d {
                            out[(p * hkv + h) * d + c] = h2f(raw[(h * self.sinks + p) * d + c]);
                        }
                    }
                }
                Ok(out)
            };
            sink_k = rows(&l.ksink)?;
            sink_v = rows(&l.vsink)?;
        }
        match self.config {
            CacheConfig::F16 => {
                let kf = paged16(&l.kwin, g.kwin_head)?;
                let vf = paged16(&l.vwin, g.vwin_head)?;
                for p in 0..n {
                    for h in 0..hkv {
                        let src = ((p / bt) * hkv + h) * g.kwin_head + (p % bt) * d;
                        let dst = (p * hkv + h) * d;
                        for c in 0..d {
                            k[dst + c] = h2f(kf[src + c]);
                            v[dst + c] = h2f(vf[src + c]);
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
                let kwin = window(&l.kwin, g.kwin_head)?;
                let vwin = window(&l.vwin, g.vwin_head)?;
                let (kq, ks, km) = (
                    paged32(&l.kq, g.kq_head)?,
                    paged16(&l.ks, g.ksm_head)?,
                    paged16(&l.km, g.ksm_head)?,
                );
                let (vq, vs, vm) = (
                    paged32(&l.vq, g.vq_head)?,
                    paged16(&l.vs, g.vsm_head)?,
                    paged16(&l.vm, g.vsm_head)?,
                );
                let (nqk, nqv) = quantized_ends(&self.config, n);
                for p in 0..n {
                    let (blk, b) = (p / bt, p % bt);
                    for h in 0..hkv {
                        let bh = blk * hkv + h;
                        for c in 0..d {
                            let o = (p * hkv + h) * d + c;
                            k[o] = if p < nqk {
                                let (word, shift) = key_code_at(k_bits, d, b, c);
                                let code =
                                    (kq[bh * g.kq_head + word] >> shift) & ((1 << k_bits) - 1);
                                let m = bh * g.ksm_head + (b / gs) * d + c;
                                code as f32 * h2f(ks[m]) + h2f(km[m])
                            } else {
                                h2f(kwin[h * g.kwin_head + (p % r) * d + c])
                            };
                            v[o] = if p < nqv {
                                let (word, shift) = value_code_at(v_bits, d, b, c);
                                let code =
                                    (vq[bh * g.vq_head + word] >> shift) & ((1 << v_bits) - 1);
                                let m = bh * g.vsm_head + b * (d / gs) + c / gs;
                                code as f32 * h2f(vs[m]) + h2f(vm[m])
                            } else {
                                h2f(vwin[h * g.vwin_head + (p % r) * d + c])
                            };
                        }
                    }
                }
            }
        }
        sink_k.extend(k);
        sink_v.extend(v);
        Ok((sink_k, sink_v))
    }

    /// Bytes one decode step of `layer` must read for the sequences of `batch` (the floor of a
    /// memory-bound kernel): stored codes, scales, mins and f16 rows of every attended token, the
    /// new tokens, q and the output.
    pub fn decode_bytes(&self, batch: &GpuBatch, n_head: usize) -> u64 {
        let (hkv, d) = (self.shape.n_kv_head as u64, self.shape.head_dim as u64);
        let mut bytes = 0u64;
        for it in &batch.items {
            let n_all = it[1] as usize;
            let n = stream_len(&self.config, n_all) as u64;
            let n_new = it[2] as u64;
            bytes += n_new * (2 * hkv * d * 4 + 2 * n_head as u64 * d * 4);
            bytes += 2 * (n_all as u64 - n) * hkv * d * 2;
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

/// The cache's kernel modules: the append / prefill / reduce kernels, and every decode-attention
/// variant a cache can launch (head dims 64 and 128; 2/4-bit keys and values, or f16; 1-4
/// query heads per CTA; four-warp CTAs, and one-warp CTAs for KIVI caches; the f16 cache's
/// three `F16Path`s, with their default ring stages, and several-head ones without the ring too).
pub(crate) fn kernel_modules() -> Vec<crate::KernelModule> {
    let mut modules = vec![crate::KernelModule {
        name: MODULE.into(),
        source: SOURCE,
        defines: Vec::new(),
    }];
    for d in [64, 128] {
        for (kb, vb) in [(2, 2), (4, 4), (2, 4), (4, 2), (16, 16)] {
            for ng in 1..=4 {
                for warps in [4, 1] {
                    if warps == 1 && kb == 16 {
                        continue;
                    }
                    for path in [F16Path::Tensor, F16Path::TensorFew, F16Path::Simt] {
                        if path != F16Path::Tensor && kb != 16 {
                            continue;
                        }
                        let stages = f16_ring_stages(
                            kb,
                            path,
                            ng,
                            d,
                            F16_STAGES_FEW,
                            F16_STAGES_FEW_HEADS,
                            F16_STAGES_MANY,
                        );
                        // Several heads per CTA: with and without the ring (`f16_stages`).
                        let without = if ng > 1 && stages > 0 { Some(0) } else { None };
                        for stages in std::iter::once(stages).chain(without) {
                            let (name, defines) =
                                GpuCache::attn_variant(d, kb, vb, ng, warps, path, stages);
                            modules.push(crate::KernelModule {
                                name,
                                source: SOURCE,
                                defines,
                            });
                        }
                    }
                }
            }
        }
    }
    modules
}

/// Stages of the f16 ring of a module of `kb`-bit keys (16: the f16 cache) and `ng` heads per
/// CTA: `few` (`few_heads` for several heads) for the f16 cache's head-dim-128 modules of
/// `F16Path::TensorFew`, `many` for its one-head ones of `F16Path::Tensor`, else 0.
fn f16_ring_stages(
    kb: u8,
    path: F16Path,
    ng: usize,
    head_dim: usize,
    few: usize,
    few_heads: usize,
    many: usize,
) -> usize {
    match path {
        _ if kb != 16 || head_dim != 128 => 0,
        F16Path::TensorFew if ng == 1 => few,
        F16Path::TensorFew => few_heads,
        F16Path::Tensor if ng == 1 => many,
        F16Path::Tensor | F16Path::Simt => 0,
    }
}

/// Tokens per split for four-warp CTAs (splits of two blocks or more in multiples of
/// `unit_tokens`): when the last of the splits of `len` tokens would hold one block or less,
/// the first larger multiple, up to MAX_SPLIT, whose last split holds more (or that covers
/// `len` alone), as long as it leaves at least `min_splits` splits; else `split`. Those last
/// tokens are the sequence's window rows and new token: a CTA of their own costs a whole
/// prologue and a split to combine, and its CTAs can spill into another wave. Measured on the
/// H200 (session 26, four warps, µs): 32/8/128 B = 32 T = 1K KIVI-4 46.8 at 512-token splits
/// (512 + 512 + 1) against 33.8 at one split, T = 3K 75.8 (1536 + 1536 + 1) against 60.7
/// (2048 + 1025); without the `min_splits` bound (one CTA per SM at least) B = 1 lost up to
/// 1.7x (T = 1K: nine splits of 128 became one).
fn absorb_tail(split: usize, len: usize, unit_tokens: usize, min_splits: usize) -> usize {
    let mut s = split;
    loop {
        let n = len.div_ceil(s);
        if n < min_splits {
            return split;
        }
        if n <= 1 || len - (n - 1) * s > BLOCK_TOKENS {
            return s;
        }
        let next = (s / unit_tokens + 1) * unit_tokens;
        if next > MAX_SPLIT {
            return split;
        }
        s = next;
    }
}

/// `split` if it is at most `max_split` positions; else the fewest splits of at most
/// `max_split` that cover `len` positions, as even as whole blocks allow (cutting at `max_split`
/// itself can leave a last split of one position, with a CTA and a combination of its own).
fn even_split(split: usize, len: usize, max_split: usize) -> usize {
    if split <= max_split {
        return split;
    }
    let n = len.div_ceil(max_split);
    len.div_ceil(n).div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS
}

/// Ring stages from an environment variable: 0 (no ring) or 2-8 (one chunk in use, the others
/// in flight); `default` if unset or not a number.
fn stages_from_env(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(default, |s| if s < 2 { 0 } else { s.min(8) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absorb_tail_takes_the_first_unit_multiple_without_a_window_only_tail() {
        use rand::Rng;
        let mut rng = fresh_rng("absorb_tail");
        let tail = |len: usize, s: usize| len - (len.div_ceil(s) - 1) * s;
        for _ in 0..5000 {
            let len = rng.gen_range(1..12_000usize);
            let unit = BLOCK_TOKENS * [1, 2, 4][rng.gen_range(0..3)];
            let split = if rng.gen_bool(0.2) {
                BLOCK_TOKENS
            } else {
                unit * rng.gen_range(1..=MAX_SPLIT / unit)
            };
            let min_splits = rng.gen_range(1..20usize);
            let s = absorb_tail(split, len, unit, min_splits);
            // Candidates in order: `split`, then every unit multiple above it up to MAX_SPLIT;
            // the answer is the first whose last split is more than a block (or the only one),
            // if no candidate before it leaves fewer than min_splits splits; else `split`.
            let candidates: Vec<usize> = std::iter::once(split)
                .chain((split / unit + 1..=MAX_SPLIT / unit).map(|k| k * unit))
                .collect();
            let mut want = split;
            for &c in &candidates {
                if len.div_ceil(c) < min_splits {
                    break;
                }
                if len <= c || tail(len, c) > BLOCK_TOKENS {
                    want = c;
                    break;
                }
            }
            assert_eq!(s, want, "{len} {split} {unit} {min_splits}");
        }
        // The measured cases: 1025 tokens of 256 (token, head group) pairs in one split, 3073
        // in 2048 + 1025; a batch of one keeps its nine splits of 128 at 1025 tokens.
        assert_eq!(absorb_tail(512, 1025, 512, 1), 1536);
        assert_eq!(absorb_tail(1536, 3073, 512, 1), 2048);
        assert_eq!(absorb_tail(2048, 8193, 512, 1), 2048);
        assert_eq!(absorb_tail(128, 1025, 512, 5), 128);
        assert_eq!(absorb_tail(1024, 16385, 512, 5), 1536);
    }

    #[test]
    fn even_split_covers_with_the_fewest_capped_blocks() {
        use rand::Rng;
        let mut rng = fresh_rng("even_split");
        for _ in 0..2000 {
            let len = rng.gen_range(1..40_000usize);
            let max_split = BLOCK_TOKENS * rng.gen_range(1..17usize);
            let split = BLOCK_TOKENS * rng.gen_range(1..17usize);
            let s = even_split(split, len, max_split);
            if split <= max_split {
                assert_eq!(s, split);
                continue;
            }
            let fewest = len.div_ceil(max_split);
            assert!(
                s.is_multiple_of(BLOCK_TOKENS) && s <= max_split,
                "{len} {max_split}: {s}"
            );
            assert_eq!(len.div_ceil(s), fewest, "{len} {max_split}: {s}");
            // Even: the shortest whole-block split that covers len in that many.
            assert!((s - BLOCK_TOKENS) * fewest < len, "{len} {max_split}: {s}");
        }
        // The case that made the cap even: 1025 positions under a 1024 cap are 2 x 640, not 1024 + 1.
        assert_eq!(even_split(1152, 1025, 1024), 640);
        assert_eq!(even_split(1664, 3073, 1280), 1152);
    }

    /// A generator seeded from the clock (the seed is printed, so a failure can be replayed).
    fn fresh_rng(test: &str) -> rand::rngs::StdRng {
        use rand::SeedableRng;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        eprintln!("{test}: seed {seed}");
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    #[test]
    fn constants_match_the_kernel_source() {
        assert!(SOURCE.contains(&format!("#define BLOCK_TOKENS {BLOCK_TOKENS}\n")));
        assert!(SOURCE.contains(&format!("#define MAX_SPLIT {MAX_SPLIT}\n")));
        assert!(MAX_SPLIT.is_multiple_of(BLOCK_TOKENS));
        // Every supported group size divides a block (G a multiple of 32 dividing D <= 128).
        for g in [32, 64, 128] {
            assert!(BLOCK_TOKENS.is_multiple_of(g));
        }
    }

    #[test]
    fn step_work_lists_every_unit_once() {
        // Against brute force over positions: a key group is listed iff one of its positions
        // becomes (or, R = 0, stays partly) quantized this step; a value token iff it becomes
        // quantized; tiles cover each multi-token item's tokens once, PREFILL_ROWS at a time.
        use rand::Rng;
        let mut r = fresh_rng("step_work_lists_every_unit_once");
        for _ in 0..200 {
            let g = [32, 64, 128][r.gen_range(0..3)];
            let resid = [0, g, 2 * g, 128][r.gen_range(0..4)];
            let config = if r.gen_bool(0.2) {
                CacheConfig::F16
            } else {
                CacheConfig::Kivi(KiviConfig {
                    group_size: g,
                    residual_len: resid,
                    ..KiviConfig::default()
                })
            };
            let items: Vec<(usize, usize)> = (0..r.gen_range(1..6))
                .map(|_| {
                    let n_new = if r.gen_bool(0.5) {
                        1
                    } else {
                        r.gen_range(0..300)
                    };
                    (r.gen_range(0..600), n_new)
                })
                .collect();
            let mut work = StepWork::default();
            let mut off = 0;
            for (i, &(n_old, n_new)) in items.iter().enumerate() {
                work.add_item(&config, i as i32, n_old, n_new, off);
                off += n_new;
            }
            let pairs = |v: &[i32]| -> Vec<(usize, usize)> {
                v.chunks(2)
                    .map(|c| (c[0] as usize, c[1] as usize))
                    .collect()
            };
            let (mut want_keys, mut want_values, mut want_tiles) = (vec![], vec![], vec![]);
            let mut off = 0;
            for (i, &(n_old, n_new)) in items.iter().enumerate() {
                let n1 = n_old + n_new;
                if let CacheConfig::Kivi(_) = config {
                    let quantized = |p: usize, n: usize| -> (bool, bool) {
                        // Keys: whole R-chunks (R = 0: all); values: all but the last R.
                        let key = p < if resid > 0 { n - n % resid } else { n };
                        (key, p + resid < n)
                    };
                    for group in 0..n1.div_ceil(g) {
                        // (R = 0: the new positions; the group's older ones come along.)
                        let touched = (group * g..(group + 1) * g)
                            .any(|p| quantized(p, n1).0 && !quantized(p, n_old).0);
                        if touched {
                            want_keys.push((i, group));
                        }
                    }
                    for p in 0..n1 {
                        if quantized(p, n1).1 && !quantized(p, n_old).1 {
                            want_values.push((i, p));
                        }
                    }
                }
                if n_new > 1 {
                    want_tiles.extend((off..off + n_new).step_by(PREFILL_ROWS).map(|t| t as i32));
                }
                off += n_new;
            }
            assert_eq!(pairs(&work.key_groups), want_keys, "{config:?} {items:?}");
            assert_eq!(
                pairs(&work.value_tokens),
                want_values,
                "{config:?} {items:?}"
            );
            assert_eq!(work.prefill_tiles, want_tiles, "{items:?}");
        }
    }

    #[test]
    fn step_plan_splits_sink_tokens_from_the_stream() {
        // Every packed token is either a sink write (position < S) or a stream token whose
        // stream position is its position - S, and whose packed row the stream records find
        // (offset + i); a sink token's stream record attends nothing (i < 0). Without sinks
        // the stream records are the absolute ones.
        use rand::Rng;
        let mut r = fresh_rng("step_plan_splits_sink_tokens_from_the_stream");
        for _ in 0..300 {
            let sinks = [0, 1, 4, 17][r.gen_range(0..4)];
            let config = CacheConfig::Kivi(KiviConfig {
                residual_len: [0, 32, 128][r.gen_range(0..3)],
                sink_tokens: sinks,
                ..KiviConfig::default()
            });
            let items: Vec<(usize, usize, usize)> = (0..r.gen_range(1..5))
                .map(|slot| {
                    let n_old = [0, r.gen_range(0..20), r.gen_range(0..400)][r.gen_range(0..3)];
                    (slot, n_old, r.gen_range(1..40))
                })
                .collect();
            let plan = StepPlan::new(&config, &items);
            let mut off = 0;
            let mut sink_writes = Vec::new();
            let mut work = StepWork::default();
            let (mut max_stream, mut max_old) = (0, 0);
            for (item, &(slot, n_old, n_new)) in items.iter().enumerate() {
                assert_eq!(
                    plan.items[item],
                    [slot as i32, n_old as i32, n_new as i32, off as i32]
                );
                let si = &plan.stream_items[4 * item..4 * item + 4];
                assert_eq!(si[0], slot as i32);
                assert_eq!(si[1] as usize, n_old.saturating_sub(sinks));
                for i in 0..n_new {
                    let z = off + i;
                    let pos = n_old + i;
                    let abs = &plan.toks[5 * z..5 * z + 5];
                    assert_eq!(
                        abs,
                        [
                            slot as i32,
                            n_old as i32,
                            i as i32,
                            off as i32,
                            n_new as i32
                        ]
                    );
                    let st = &plan.stream_toks[5 * z..5 * z + 5];
                    assert_eq!(&st[..2], &si[..2]);
                    assert_eq!((st[3], st[4]), (si[3], si[2]));
                    if pos < sinks {
                        sink_writes.extend_from_slice(&[z as i32, slot as i32, pos as i32]);
                        assert!(st[1] + st[2] < 0, "a sink token attends no stream position");
                    } else {
                        assert_eq!((st[1] + st[2]) as usize, pos - sinks);
                        assert_eq!((st[3] + st[2]) as usize, z, "its packed row");
                    }
                }
                let s_new = si[2] as usize;
                assert_eq!(
                    s_new,
                    (n_old + n_new).saturating_sub(sinks) - n_old.saturating_sub(sinks)
                );
                work.add_item(&config, item as i32, si[1] as usize, s_new, si[3] as usize);
                max_stream = max_stream.max(si[1] as usize + s_new);
                max_old = max_old.max(n_old.saturating_sub(sinks));
                off += n_new;
            }
            assert_eq!(plan.sink_writes, sink_writes);
            assert_eq!(plan.work, work);
            assert_eq!(
                (plan.n_tokens, plan.max_stream_len, plan.max_stream_old),
                (off, max_stream, max_old)
            );
            if sinks == 0 {
                assert_eq!(plan.toks, plan.stream_toks);
            }
        }
    }

    #[test]
    fn block_accounting() {
        let shape = CacheShape {
            n_layer: 3,
            n_kv_head: 2,
            head_dim: 128,
        };
        let kc = KiviConfig {
            k_bits: 2,
            v_bits: 4,
            group_size: 32,
            residual_len: 128,
            ..KiviConfig::default()
        };
        let kivi = CacheConfig::Kivi(kc);
        // Keys: 128 tokens x 128 channels x 2 bits, scales and mins per 32 tokens; values:
        // 4 bits, scales and mins per 32 channels; per layer and KV head.
        let (c, s, m, f) = block_parts(&kivi, &shape);
        assert_eq!(c, 6 * (128 * 128 * 2 / 8 + 128 * 128 * 4 / 8));
        assert_eq!((s, m, f), (6 * (4 * 128 + 128 * 4) * 2, s, 0));
        assert_eq!(window_bytes(&kivi, &shape), 6 * 2 * 128 * 128 * 2);
        assert_eq!(
            block_parts(&CacheConfig::F16, &shape).3,
            6 * 2 * 128 * 128 * 2
        );
        assert_eq!(window_bytes(&CacheConfig::F16, &shape), 0);
        // R = 128: nothing quantized before 128 tokens; then whole 128-token key chunks.
        assert_eq!(blocks_for(&kivi, 0), 0);
        assert_eq!(blocks_for(&kivi, 255), 1);
        assert_eq!(blocks_for(&kivi, 256), 2);
        assert_eq!(blocks_for(&kivi, 257), 2);
        assert_eq!(blocks_for(&CacheConfig::F16, 129), 2);
        let r0 = CacheConfig::Kivi(KiviConfig {
            residual_len: 0,
            ..kc
        });
        assert_eq!(blocks_for(&r0, 1), 1);
        assert_eq!(blocks_for(&r0, 128), 1);
        assert_eq!(blocks_for(&r0, 129), 2);
        // Sink tokens: f16 rows per slot, and the blocks count the stream after them.
        let sink4 = CacheConfig::Kivi(KiviConfig {
            residual_len: 0,
            sink_tokens: 4,
            ..kc
        });
        assert_eq!(
            window_bytes(&sink4, &shape),
            // R = 0: a G-row key staging window, a one-row value window, 4 key and 4 value
            // sink rows.
            6 * 2 * (32 * 128 + 128 + 2 * 4 * 128)
        );
        assert_eq!(blocks_for(&sink4, 4), 0);
        assert_eq!(blocks_for(&sink4, 5), 1);
        assert_eq!(blocks_for(&sink4, 132), 1);
        assert_eq!(blocks_for(&sink4, 133), 2);
    }
}
