//! GPU cache kernels against the CPU cache (kivi-core), on fresh random inputs.
//!
//! Every step feeds both caches the same tokens: attention outputs must agree within a relative
//! error bound (f32 accumulation on both sides; the GPU output buffer is poisoned with NaN before
//! each run, so an unwritten element fails), and after each append the stored cache, read back
//! and dequantized, must be bit-identical to the CPU's (same codes, scales and mins).
//! Without a CUDA device the tests print `skipped: no CUDA device` and pass.

use std::sync::Arc;

use std::collections::HashMap;

use half::f16;
use kivi_core::{
    new_cache, AttendItem, CacheConfig, CacheShape, F16Cache, KiviCache, KiviConfig, KvCache, SeqId,
};
use kivi_cuda::cache::BLOCK_TOKENS;
use kivi_cuda::{Gpu, GpuCache};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu() -> Option<Arc<Gpu>> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn fresh_rng(name: &str) -> StdRng {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("{name}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// KV-like data: per-channel offsets, outlier channels, constant channels.
fn kv_data(r: &mut StdRng, n: usize, row: usize) -> Vec<f32> {
    let offs: Vec<f32> = (0..row).map(|_| r.gen_range(-2.0..2.0)).collect();
    let amp: Vec<f32> = (0..row)
        .map(|_| match r.gen_range(0..10) {
            0 => 8.0,
            1 => 0.0,
            _ => 1.0,
        })
        .collect();
    (0..n * row)
        .map(|i| offs[i % row] + amp[i % row] * r.gen_range(-1.0f32..1.0))
        .collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let mut num = 0f64;
    let mut den = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

struct Case {
    config: CacheConfig,
    n_kv_head: usize,
    n_head: usize,
    head_dim: usize,
    /// Whole quantized blocks through the tensor cores (else the CUDA-core kernel).
    tensor_cores: bool,
    /// One-warp attention CTAs (KIVI caches on the tensor cores; else four warps).
    one_warp: bool,
    /// Multi-token items' new tokens through the tiled prefill kernel (else the decode kernel
    /// per query token).
    prefill_kernel: bool,
    /// One query head per CTA (else all of a KV head's, up to 4).
    one_head: bool,
}

/// Runs a random schedule of steps (prefill chunks and decode steps, different per sequence) on
/// both caches, checking attention and stored contents after every step.
fn run_case(gpu: &Arc<Gpu>, case: &Case, r: &mut StdRng) {
    let shape = CacheShape {
        n_layer: 2,
        n_kv_head: case.n_kv_head,
        head_dim: case.head_dim,
    };
    let (hkv, d, nh) = (case.n_kv_head, case.head_dim, case.n_head);
    let n_seq = 3;
    let mut cpu = new_cache(&case.config, shape).unwrap();
    let mut gcache = GpuCache::new(gpu.clone(), case.config, shape, n_seq, 1200).unwrap();
    // Short sequences: the tensor-core path one block at a time (by default it waits for a
    // block per warp), so that every configuration here goes through it.
    gcache.set_tensor_core_multiple(1);
    gcache.set_tensor_cores(case.tensor_cores);
    gcache.set_one_warp(Some(case.one_warp));
    gcache.set_one_head(Some(case.one_head));
    gcache.set_prefill_kernel(case.prefill_kernel);
    // Partial quantized blocks: on the tensor cores whatever their size with one-warp CTAs,
    // on the CUDA cores with four (both paths meet whole tensor-core blocks).
    gcache.set_tensor_core_partial(if case.one_warp { 1 } else { 0 });
    let seqs: Vec<SeqId> = (0..n_seq).map(|_| cpu.add_sequence()).collect();
    let slots: Vec<usize> = (0..n_seq).map(|_| gcache.add_sequence().unwrap()).collect();
    let s = gpu.stream().clone();
    let bound = 2e-4;
    let mut worst = 0f64;
    for step in 0..14 {
        // Step sizes: a long chunk sometimes, else single tokens; sequences differ.
        let n_new: Vec<usize> = (0..n_seq)
            .map(|i| match (step + i) % 5 {
                0 => r.gen_range(1..260),
                1 => r.gen_range(2..40),
                _ => 1,
            })
            .collect();
        let items: Vec<(usize, usize)> = slots.iter().copied().zip(n_new.iter().copied()).collect();
        let batch = gcache.batch(&items).unwrap();
        let t: usize = n_new.iter().sum();
        for layer in 0..shape.n_layer {
            let q: Vec<f32> = (0..t * nh * d).map(|_| r.gen_range(-1.0..1.0)).collect();
            let k = kv_data(r, t, hkv * d);
            let v = kv_data(r, t, hkv * d);
            // CPU reference.
            let mut want = vec![0f32; t * nh * d];
            {
                let mut items = Vec::new();
                let mut rest = want.as_mut_slice();
                let mut off = 0;
                for (i, &nn) in n_new.iter().enumerate() {
                    let (head, tail) = rest.split_at_mut(nn * nh * d);
                    rest = tail;
                    items.push(AttendItem {
                        seq: seqs[i],
                        q: &q[off * nh * d..(off + nn) * nh * d],
                        k_new: &k[off * hkv * d..(off + nn) * hkv * d],
                        v_new: &v[off * hkv * d..(off + nn) * hkv * d],
                        out: head,
                    });
                    off += nn;
                }
                cpu.attend_batch(layer, nh, &mut items).unwrap();
            }
            // GPU, output poisoned.
            let dq = s.clone_htod(&q).unwrap();
            let dk = s.clone_htod(&k).unwrap();
            let dv = s.clone_htod(&v).unwrap();
            let mut dout = s.clone_htod(&vec![f32::NAN; t * nh * d]).unwrap();
            gcache
                .attend(layer, nh, &batch, &dq, &dk, &dv, &mut dout)
                .unwrap();
            let got = s.clone_dtoh(&dout).unwrap();
            let e = rel_err(&got, &want);
            worst = worst.max(e);
            assert!(
                e <= bound,
                "attention step {step} layer {layer} n_new {n_new:?}: rel err {e:.3e} > {bound:.0e}"
            );
            // Append on both, then compare the stored contents exactly.
            let mut off = 0;
            for (i, &nn) in n_new.iter().enumerate() {
                cpu.append(
                    layer,
                    seqs[i],
                    &k[off * hkv * d..(off + nn) * hkv * d],
                    &v[off * hkv * d..(off + nn) * hkv * d],
                )
                .unwrap();
                off += nn;
            }
            gcache.append(layer, &batch, &dk, &dv).unwrap();
        }
        gcache.advance(&batch);
        for (i, &slot) in slots.iter().enumerate() {
            assert_eq!(gcache.seq_len(slot), Some(cpu.seq_len(0, seqs[i]).unwrap()));
        }
    }
    eprintln!(
        "{:?} hkv {hkv} nh {nh} d {d} tensor cores {} one warp {} one head {} prefill kernel {}: \
         worst rel err {worst:.2e}",
        case.config, case.tensor_cores, case.one_warp, case.one_head, case.prefill_kernel
    );
}

/// Stored bytes: the GPU cache read back equals the CPU cache's dequantized view, bit for bit.
fn check_stored(gpu: &Arc<Gpu>, kc: KiviConfig, hkv: usize, d: usize, r: &mut StdRng) {
    let shape = CacheShape {
        n_layer: 1,
        n_kv_head: hkv,
        head_dim: d,
    };
    let mut cpu = KiviCache::new(kc, shape).unwrap();
    let mut gcache = GpuCache::new(gpu.clone(), CacheConfig::Kivi(kc), shape, 2, 1100).unwrap();
    let seqs = [cpu.add_sequence(), cpu.add_sequence()];
    let slots = [
        gcache.add_sequence().unwrap(),
        gcache.add_sequence().unwrap(),
    ];
    let s = gpu.stream().clone();
    for step in 0..40 {
        let n_new = [
            if step % 13 == 0 {
                r.gen_range(1..300)
            } else {
                1
            },
            if step % 7 == 3 { r.gen_range(1..70) } else { 1 },
        ];
        let batch = gcache
            .batch(&[(slots[0], n_new[0]), (slots[1], n_new[1])])
            .unwrap();
        let t = n_new[0] + n_new[1];
        let k = kv_data(r, t, hkv * d);
        let v = kv_data(r, t, hkv * d);
        let row = hkv * d;
        cpu.append(0, seqs[0], &k[..n_new[0] * row], &v[..n_new[0] * row])
            .unwrap();
        cpu.append(0, seqs[1], &k[n_new[0] * row..], &v[n_new[0] * row..])
            .unwrap();
        let dk = s.clone_htod(&k).unwrap();
        let dv = s.clone_htod(&v).unwrap();
        gcache.append(0, &batch, &dk, &dv).unwrap();
        gcache.advance(&batch);
        for i in 0..2 {
            let (ck, cv) = cpu.dequantized(0, seqs[i]).unwrap();
            let (gk, gv) = gcache.dequantized(0, slots[i]).unwrap();
            assert_eq!(ck.len(), gk.len());
            for (what, c, g) in [("keys", &ck, &gk), ("values", &cv, &gv)] {
                if let Some(j) = (0..c.len()).find(|&j| c[j].to_bits() != g[j].to_bits()) {
                    let p = j / row;
                    panic!(
                        "{kc:?} step {step} seq {i}: stored {what} differ at token {p} \
                         (of {}), head {}, channel {}: cpu {} gpu {}",
                        c.len() / row,
                        (j % row) / d,
                        j % d,
                        c[j],
                        g[j]
                    );
                }
            }
        }
    }
}

fn kivi(bits: (u8, u8), g: usize, r: usize) -> KiviConfig {
    KiviConfig {
        k_bits: bits.0,
        v_bits: bits.1,
        group_size: g,
        residual_len: r,
        ..KiviConfig::default()
    }
}

fn sinks(kc: KiviConfig, sink_tokens: usize) -> KiviConfig {
    KiviConfig { sink_tokens, ..kc }
}

#[test]
fn stored_bytes_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut r = fresh_rng("stored_bytes_match_cpu");
    for (kc, hkv, d) in [
        (kivi((2, 2), 32, 128), 2, 128),
        (kivi((4, 4), 32, 32), 3, 64),
        (kivi((2, 4), 64, 128), 1, 128),
        (kivi((4, 2), 32, 0), 2, 128),
        (kivi((2, 2), 32, 0), 2, 64),
        (sinks(kivi((4, 2), 64, 128), 4), 2, 128),
        (sinks(kivi((2, 2), 32, 32), 1), 3, 64),
        (sinks(kivi((2, 4), 32, 0), 37), 1, 128),
        // The decode append's CTA-wide value quantization: groups of 16 threads (G = 128) in a
        // partial warp, and more threads' worth of channels than the CTA has (9 heads).
        (kivi((4, 2), 128, 128), 3, 128),
        (kivi((2, 4), 32, 128), 9, 128),
    ] {
        check_stored(&gpu, kc, hkv, d, &mut r);
    }
}

#[test]
fn attention_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut r = fresh_rng("attention_matches_cpu");
    let cases = [
        (CacheConfig::F16, 2, 8, 128),
        (CacheConfig::F16, 3, 9, 64),
        (CacheConfig::Kivi(kivi((2, 2), 32, 128)), 2, 8, 128),
        (CacheConfig::Kivi(kivi((4, 4), 32, 128)), 4, 4, 128),
        (CacheConfig::Kivi(kivi((2, 2), 32, 32)), 3, 9, 64),
        (CacheConfig::Kivi(kivi((4, 2), 64, 64)), 1, 6, 128),
        (CacheConfig::Kivi(kivi((2, 4), 32, 0)), 2, 14, 128),
        // Sink tokens: 4 (the usual), 1, and more than a prefill tile (16) on a short window.
        (
            CacheConfig::Kivi(sinks(kivi((4, 2), 64, 128), 4)),
            2,
            8,
            128,
        ),
        (CacheConfig::Kivi(sinks(kivi((2, 2), 32, 32), 1)), 3, 9, 64),
        (
            CacheConfig::Kivi(sinks(kivi((2, 4), 32, 0), 37)),
            2,
            14,
            128,
        ),
    ];
    // Every case through the tensor-core path with four-warp CTAs of all a KV head's query
    // heads, the KIVI ones with one-warp CTAs too, two through the CUDA-core kernel
    // (KIVI_CUDA_SIMT=1) on whole blocks too; those two also without the prefill kernel (the
    // decode kernel for every query token). GQA cases also with one query head per CTA.
    let runs = cases
        .iter()
        .map(|c| (*c, true, false, false))
        .chain(cases[2..].iter().map(|c| (*c, true, true, false)))
        .chain([
            (cases[2], false, false, false),
            (cases[6], false, false, false),
        ])
        .chain([
            (cases[1], true, false, true),
            (cases[2], true, false, true),
            (cases[4], true, true, true),
            (cases[5], false, false, true),
            (cases[9], false, false, false),
            (cases[7], true, false, true),
        ]);
    for ((config, hkv, nh, d), tensor_cores, one_warp, one_head) in runs {
        run_case(
            &gpu,
            &Case {
                config,
                n_kv_head: hkv,
                n_head: nh,
                head_dim: d,
                tensor_cores,
                one_warp,
                prefill_kernel: tensor_cores,
                one_head,
            },
            &mut r,
        );
    }
}

#[test]
fn long_context_splits_match_cpu() {
    // Long sequences of different lengths: many splits per sequence, forced small and large.
    let Some(gpu) = gpu() else { return };
    let mut r = fresh_rng("long_context_splits_match_cpu");
    // (KIVI-4 with 2048-token splits: the staged one-head kernel's static and dynamic shared
    // memory together pass the default 48 KiB.)
    for config in [
        CacheConfig::F16,
        CacheConfig::Kivi(kivi((2, 2), 32, 128)),
        CacheConfig::Kivi(kivi((4, 4), 32, 128)),
        CacheConfig::Kivi(sinks(kivi((2, 2), 32, 128), 4)),
    ] {
        let (hkv, nh, d) = (2, 8, 128);
        let shape = CacheShape {
            n_layer: 1,
            n_kv_head: hkv,
            head_dim: d,
        };
        let mut cpu = new_cache(&config, shape).unwrap();
        let mut g = GpuCache::new(gpu.clone(), config, shape, 2, 5000).unwrap();
        let seqs = [cpu.add_sequence(), cpu.add_sequence()];
        let slots = [g.add_sequence().unwrap(), g.add_sequence().unwrap()];
        let s = gpu.stream().clone();
        let lens = [r.gen_range(3000..4900), r.gen_range(1..900)];
        let row = hkv * d;
        for i in 0..2 {
            let k = kv_data(&mut r, lens[i], row);
            let v = kv_data(&mut r, lens[i], row);
            cpu.append(0, seqs[i], &k, &v).unwrap();
            let b = g.batch(&[(slots[i], lens[i])]).unwrap();
            g.append(
                0,
                &b,
                &s.clone_htod(&k).unwrap(),
                &s.clone_htod(&v).unwrap(),
            )
            .unwrap();
            g.advance(&b);
        }
        // Splits chosen, forced small and large; CTAs of one query head or of four.
        let runs = [
            (None, None),
            (None, Some(false)),
            (Some(64), Some(true)),
            (Some(64), Some(false)),
            (Some(2048), Some(true)),
            (Some(2048), Some(false)),
        ];
        for (split, one_head) in runs {
            g.set_split_tokens(split);
            g.set_one_head(one_head);
            let q: Vec<f32> = (0..2 * nh * d).map(|_| r.gen_range(-1.0..1.0)).collect();
            let k = kv_data(&mut r, 2, row);
            let v = kv_data(&mut r, 2, row);
            let mut want = vec![0f32; 2 * nh * d];
            let (w0, w1) = want.split_at_mut(nh * d);
            let mut items = [
                AttendItem {
                    seq: seqs[0],
                    q: &q[..nh * d],
                    k_new: &k[..row],
                    v_new: &v[..row],
                    out: w0,
                },
                AttendItem {
                    seq: seqs[1],
                    q: &q[nh * d..],
                    k_new: &k[row..],
                    v_new: &v[row..],
                    out: w1,
                },
            ];
            cpu.attend_batch(0, nh, &mut items).unwrap();
            let b = g.batch(&[(slots[0], 1), (slots[1], 1)]).unwrap();
            let mut dout = s.clone_htod(&vec![f32::NAN; 2 * nh * d]).unwrap();
            g.attend(
                0,
                nh,
                &b,
                &s.clone_htod(&q).unwrap(),
                &s.clone_htod(&k).unwrap(),
                &s.clone_htod(&v).unwrap(),
                &mut dout,
            )
            .unwrap();
            let got = s.clone_dtoh(&dout).unwrap();
            let e = rel_err(&got, &want);
            eprintln!(
                "{config:?} lens {lens:?} split {split:?} one head {one_head:?}: rel err {e:.2e}"
            );
            assert!(
                e <= 2e-4,
                "{config:?} split {split:?} one head {one_head:?}: rel err {e:.3e}"
            );
        }
    }
}

#[test]
fn unsupported_configs_are_errors() {
    let Some(gpu) = gpu() else { return };
    let shape = CacheShape {
        n_layer: 1,
        n_kv_head: 1,
        head_dim: 96,
    };
    assert!(GpuCache::new(gpu.clone(), CacheConfig::F16, shape, 1, 64).is_err());
    let shape = CacheShape {
        head_dim: 128,
        ..shape
    };
    let kc = KiviConfig {
        group_size: 16,
        residual_len: 32,
        ..KiviConfig::default()
    };
    assert!(GpuCache::new(gpu.clone(), CacheConfig::Kivi(kc), shape, 1, 64).is_err());
    let many_sinks = sinks(KiviConfig::default(), 1025);
    assert!(GpuCache::new(gpu, CacheConfig::Kivi(many_sinks), shape, 1, 64).is_err());
}

/// The CPU cache, and what it stores: KIVI's dequantized view; for the f16 cache, the appended
/// rows rounded to f16 (kept here).
enum Reference {
    F16(F16Cache, HashMap<(usize, SeqId), (Vec<f32>, Vec<f32>)>),
    Kivi(Box<KiviCache>),
}

impl Reference {
    fn new(config: CacheConfig, shape: CacheShape) -> Reference {
        match config {
            CacheConfig::F16 => Reference::F16(F16Cache::new(shape).unwrap(), HashMap::new()),
            CacheConfig::Kivi(kc) => Reference::Kivi(Box::new(KiviCache::new(kc, shape).unwrap())),
        }
    }

    fn cache(&mut self) -> &mut dyn KvCache {
        match self {
            Reference::F16(c, _) => c,
            Reference::Kivi(c) => c.as_mut(),
        }
    }

    fn append(&mut self, layer: usize, seq: SeqId, k: &[f32], v: &[f32]) {
        self.cache().append(layer, seq, k, v).unwrap();
        if let Reference::F16(_, rows) = self {
            let round = |x: &f32| f16::from_f32(*x).to_f32();
            let e = rows.entry((layer, seq)).or_default();
            e.0.extend(k.iter().map(round));
            e.1.extend(v.iter().map(round));
        }
    }

    fn remove(&mut self, seq: SeqId) {
        self.cache().remove_sequence(seq).unwrap();
        if let Reference::F16(_, rows) = self {
            rows.retain(|&(_, s), _| s != seq);
        }
    }

    fn stored(&self, layer: usize, seq: SeqId) -> (Vec<f32>, Vec<f32>) {
        match self {
            Reference::F16(_, rows) => rows.get(&(layer, seq)).cloned().unwrap_or_default(),
            Reference::Kivi(c) => c.dequantized(layer, seq).unwrap(),
        }
    }
}

/// One step on both caches: every `(cpu seq, gpu slot, n_new)` item attends in every layer
/// (outputs compared, the GPU's NaN-poisoned) and appends; afterwards the stored contents of
/// every item, read back through the block table, must equal the CPU's bit for bit.
/// Returns the worst relative attention error.
fn step_both(
    gpu: &Arc<Gpu>,
    cpu: &mut Reference,
    gcache: &mut GpuCache,
    items: &[(SeqId, usize, usize)],
    n_head: usize,
    r: &mut StdRng,
) -> f64 {
    let shape = gcache.shape();
    let (hkv, d, nh) = (shape.n_kv_head, shape.head_dim, n_head);
    let row = hkv * d;
    let s = gpu.stream().clone();
    let gitems: Vec<(usize, usize)> = items.iter().map(|&(_, slot, n)| (slot, n)).collect();
    let batch = gcache.batch(&gitems).unwrap();
    let t: usize = items.iter().map(|it| it.2).sum();
    let mut worst = 0f64;
    for layer in 0..shape.n_layer {
        let q: Vec<f32> = (0..t * nh * d).map(|_| r.gen_range(-1.0..1.0)).collect();
        let k = kv_data(r, t, row);
        let v = kv_data(r, t, row);
        let mut want = vec![0f32; t * nh * d];
        {
            let mut cpu_items = Vec::new();
            let mut rest = want.as_mut_slice();
            let mut off = 0;
            for &(seq, _, nn) in items {
                let (head, tail) = rest.split_at_mut(nn * nh * d);
                rest = tail;
                cpu_items.push(AttendItem {
                    seq,
                    q: &q[off * nh * d..(off + nn) * nh * d],
                    k_new: &k[off * row..(off + nn) * row],
                    v_new: &v[off * row..(off + nn) * row],
                    out: head,
                });
                off += nn;
            }
            cpu.cache().attend_batch(layer, nh, &mut cpu_items).unwrap();
        }
        let (dq, dk, dv) = (
            s.clone_htod(&q).unwrap(),
            s.clone_htod(&k).unwrap(),
            s.clone_htod(&v).unwrap(),
        );
        let mut dout = s.clone_htod(&vec![f32::NAN; t * nh * d]).unwrap();
        gcache
            .attend(layer, nh, &batch, &dq, &dk, &dv, &mut dout)
            .unwrap();
        let e = rel_err(&s.clone_dtoh(&dout).unwrap(), &want);
        assert!(
            e <= 2e-4,
            "{:?} layer {layer} items {items:?}: rel err {e:.3e}",
            gcache.config()
        );
        worst = worst.max(e);
        let mut off = 0;
        for &(seq, _, nn) in items {
            cpu.append(
                layer,
                seq,
                &k[off * row..(off + nn) * row],
                &v[off * row..(off + nn) * row],
            );
            off += nn;
        }
        gcache.append(layer, &batch, &dk, &dv).unwrap();
    }
    gcache.advance(&batch);
    for &(seq, slot, _) in items {
        assert_eq!(
            gcache.seq_len(slot),
            Some(cpu.cache().seq_len(0, seq).unwrap())
        );
        for layer in 0..shape.n_layer {
            let (ck, cv) = cpu.stored(layer, seq);
            let (gk, gv) = gcache.dequantized(layer, slot).unwrap();
            for (what, c, g) in [("keys", &ck, &gk), ("values", &cv, &gv)] {
                assert_eq!(c.len(), g.len());
                if let Some(j) = (0..c.len()).find(|&j| c[j].to_bits() != g[j].to_bits()) {
                    panic!(
                        "{:?} layer {layer} slot {slot} (table {:?}): stored {what} differ at \
                         token {} of {}: cpu {} gpu {}",
                        gcache.config(),
                        gcache.block_table(slot),
                        j / row,
                        c.len() / row,
                        c[j],
                        g[j]
                    );
                }
            }
        }
    }
    worst
}

/// Whether a block table is not one ascending run (blocks reused out of order).
fn scattered(table: &[u32]) -> bool {
    table.windows(2).any(|w| w[1] != w[0] + 1)
}

/// A paged cache with a small pool: sequences come and go, so blocks are reused out of order
/// and block tables are scattered; lengths cross block boundaries; the pool runs out (a clean
/// error, nothing taken, the cache still usable); everything returns to the pool at the end.
fn check_paged(
    gpu: &Arc<Gpu>,
    config: CacheConfig,
    hkv: usize,
    nh: usize,
    d: usize,
    r: &mut StdRng,
) {
    let shape = CacheShape {
        n_layer: 2,
        n_kv_head: hkv,
        head_dim: d,
    };
    let max_seqs = 4;
    let pool = 13;
    let probe = GpuCache::new(gpu.clone(), config, shape, 1, 1).unwrap();
    let (block, window) = (probe.block_bytes(), probe.window_bytes_per_seq());
    drop(probe);
    // Too small a budget is an error, not a panic.
    assert!(GpuCache::with_budget(
        gpu.clone(),
        config,
        shape,
        max_seqs as u64 * window,
        max_seqs
    )
    .is_err());
    assert!(GpuCache::with_budget(gpu.clone(), config, shape, 1 << 30, 0).is_err());
    let budget = max_seqs as u64 * window + pool as u64 * block + block / 2;
    let mut g = GpuCache::with_budget(gpu.clone(), config, shape, budget, max_seqs).unwrap();
    g.set_tensor_core_multiple(1);
    assert_eq!(g.pool_blocks(), pool);
    assert_eq!(g.free_blocks(), pool);
    assert_eq!(g.seq_fixed_bytes(), 0);
    let reserved = g.memory_reserved();
    assert_eq!(
        reserved.total_bytes(),
        pool as u64 * block + max_seqs as u64 * window
    );
    let mut cpu = Reference::new(config, shape);
    // Live sequences: (cpu id, gpu slot).
    let mut live: Vec<(SeqId, usize)> = Vec::new();
    let (mut exhausted, mut readded, mut was_scattered) = (0, 0, false);
    let mut freed_slots = Vec::new();
    let mut worst = 0f64;
    for step in 0..40 {
        // Add sequences up to the slot limit; the limit itself is an error.
        if live.len() < max_seqs && (live.len() < 2 || r.gen_range(0..3) == 0) {
            let slot = g.add_sequence().unwrap();
            readded += freed_slots.contains(&slot) as usize;
            live.push((cpu.cache().add_sequence(), slot));
        }
        if live.len() == max_seqs {
            assert!(g.add_sequence().is_err());
        }
        let n_new: Vec<usize> = live
            .iter()
            .map(|_| match r.gen_range(0..6) {
                0 => r.gen_range(100..400),
                1 => r.gen_range(2..130),
                _ => 1,
            })
            .collect();
        let items: Vec<(SeqId, usize, usize)> = live
            .iter()
            .zip(&n_new)
            .map(|(&(seq, slot), &n)| (seq, slot, n))
            .collect();
        let needed: usize = items
            .iter()
            .map(|&(_, slot, n)| g.blocks_needed(slot, n).unwrap())
            .sum();
        for &(seq, slot, n) in &items {
            let len = cpu.cache().seq_len(0, seq).unwrap();
            assert_eq!(
                g.blocks_needed(slot, n).unwrap(),
                g.blocks_for_tokens(len + n) - g.blocks_for_tokens(len)
            );
        }
        if needed > g.free_blocks() {
            // The pool runs out: a clean error that takes nothing; then the longest sequence
            // goes, its blocks return, and the step is retried by the next iteration.
            let (used, free) = (g.blocks_in_use(), g.free_blocks());
            let gitems: Vec<(usize, usize)> = items.iter().map(|&(_, s, n)| (s, n)).collect();
            let err = g
                .batch(&gitems)
                .err()
                .expect("pool exhaustion must be an error");
            assert!(err.to_string().contains("exhausted"), "{err}");
            assert_eq!((g.blocks_in_use(), g.free_blocks()), (used, free));
            exhausted += 1;
            let i = (0..live.len())
                .max_by_key(|&i| g.seq_len(live[i].1).unwrap())
                .unwrap();
            let (seq, slot) = live.swap_remove(i);
            let held = g.block_table(slot).unwrap().len();
            cpu.remove(seq);
            g.remove_sequence(slot).unwrap();
            assert!(g.remove_sequence(slot).is_err());
            assert_eq!(g.blocks_in_use(), used - held);
            freed_slots.push(slot);
            continue;
        }
        let free_before = g.free_blocks();
        worst = worst.max(step_both(gpu, &mut cpu, &mut g, &items, nh, r));
        assert_eq!(g.free_blocks(), free_before - needed, "step {step}");
        let held: usize = live
            .iter()
            .map(|&(_, slot)| g.block_table(slot).unwrap().len())
            .sum();
        assert_eq!(g.blocks_in_use(), held);
        for &(seq, slot) in &live {
            let n = cpu.cache().seq_len(0, seq).unwrap();
            assert_eq!(g.block_table(slot).unwrap().len(), g.blocks_for_tokens(n));
            was_scattered |= scattered(g.block_table(slot).unwrap());
        }
        // Memory accounting agrees with the CPU cache (R = 0 stages the partial key group in
        // a different place: full-precision bytes are compared for R > 0 and f16 only).
        let (cm, gm) = (cpu.cache().memory(), g.memory());
        assert_eq!(
            (cm.code_bytes, cm.scale_bytes, cm.min_bytes, cm.tokens),
            (gm.code_bytes, gm.scale_bytes, gm.min_bytes, gm.tokens)
        );
        if !matches!(config, CacheConfig::Kivi(kc) if kc.residual_len == 0) {
            assert_eq!(cm.full_precision_bytes, gm.full_precision_bytes);
        }
        assert_eq!(g.memory_reserved().tokens, gm.tokens);
        // Now and then a sequence finishes.
        if live.len() > 2 && r.gen_range(0..4) == 0 {
            let (seq, slot) = live.remove(r.gen_range(0..live.len()));
            cpu.remove(seq);
            g.remove_sequence(slot).unwrap();
            freed_slots.push(slot);
        }
    }
    // Exhaustion on demand: a step needing more blocks than are free fails and takes nothing;
    // the cache stays usable.
    if live.is_empty() {
        live.push((cpu.cache().add_sequence(), g.add_sequence().unwrap()));
    }
    let slot = live[0].1;
    let too_many = (g.free_blocks() + 2) * BLOCK_TOKENS;
    assert!(g.blocks_needed(slot, too_many).unwrap() > g.free_blocks());
    let (used, free) = (g.blocks_in_use(), g.free_blocks());
    let err = g
        .batch(&[(slot, too_many)])
        .err()
        .expect("pool exhaustion must be an error");
    assert!(err.to_string().contains("exhausted"), "{err}");
    assert_eq!((g.blocks_in_use(), g.free_blocks()), (used, free));
    exhausted += 1;
    let items: Vec<(SeqId, usize, usize)> =
        live.iter().map(|&(seq, slot)| (seq, slot, 3)).collect();
    let needed: usize = items
        .iter()
        .map(|&(_, slot, n)| g.blocks_needed(slot, n).unwrap())
        .sum();
    if needed <= g.free_blocks() {
        worst = worst.max(step_both(gpu, &mut cpu, &mut g, &items, nh, r));
    } else {
        // Sequences finish until a new one has room for 200 tokens.
        while g.free_blocks() < g.blocks_for_tokens(200) {
            let (seq, slot) = live.remove(0);
            cpu.remove(seq);
            g.remove_sequence(slot).unwrap();
        }
        if live.len() == max_seqs {
            let (seq, slot) = live.remove(0);
            cpu.remove(seq);
            g.remove_sequence(slot).unwrap();
        }
        let slot = g.add_sequence().unwrap();
        let seq = cpu.cache().add_sequence();
        live.push((seq, slot));
        worst = worst.max(step_both(gpu, &mut cpu, &mut g, &[(seq, slot, 200)], nh, r));
    }
    eprintln!(
        "{config:?} hkv {hkv} nh {nh} d {d}: worst rel err {worst:.2e}, pool exhausted {exhausted}x, \
         slots re-added {readded}, scattered tables {was_scattered}"
    );
    assert!(exhausted > 0 && readded > 0 && was_scattered);
    for (seq, slot) in live.drain(..) {
        cpu.remove(seq);
        g.remove_sequence(slot).unwrap();
    }
    assert_eq!(g.n_sequences(), 0);
    assert_eq!(g.blocks_in_use(), 0);
    assert_eq!(g.free_blocks(), pool);
    assert_eq!(g.memory().total_bytes(), 0);
    g.trim_free_blocks(0);
    assert_eq!(g.free_blocks(), pool);
}

#[test]
fn paged_blocks_reused_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut r = fresh_rng("paged_blocks_reused_match_cpu");
    for (config, hkv, nh, d) in [
        (CacheConfig::F16, 2, 8, 128),
        (CacheConfig::Kivi(kivi((2, 2), 32, 128)), 2, 8, 128),
        (CacheConfig::Kivi(kivi((4, 4), 64, 64)), 2, 6, 64),
        (CacheConfig::Kivi(kivi((2, 4), 128, 0)), 1, 4, 128),
        (CacheConfig::Kivi(kivi((4, 2), 32, 96)), 4, 4, 128),
    ] {
        check_paged(&gpu, config, hkv, nh, d, &mut r);
    }
}
