//! The KV caches' entry points (`new_cache` configs, `add_sequence`, `remove_sequence`,
//! `append`, `attend`, `attend_batch`, `seq_len`, `memory`) with arbitrary configurations,
//! shapes, token counts and values (NaN, ±Inf, out-of-f16-range included), on every ISA this
//! CPU has (scalar, AVX2, AVX-512) in lockstep. Checks:
//! - invalid configs and calls are errors, and a failed call leaves the cache unchanged;
//! - every ISA gives the same answer (SIMD kernels vs their scalar twins);
//! - `attend` matches an f64 attention over the cache's stored (dequantized) history plus the
//!   new tokens, and the stored history matches the closed-form model `stored_ref`.
#![no_main]

use arbitrary::Arbitrary;
use kivi_core::attn::reference::attention_ref;
use kivi_core::cache::reference::stored_ref;
use kivi_core::{
    AttendItem, Axis, CacheConfig, CacheShape, F16Cache, Isa, KiviCache, KiviConfig, KvCache, SeqId,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Cfg {
    f16: bool,
    k_bits: u8,
    v_bits: u8,
    group: u8,
    residual: u8,
    k_per_token: bool,
    v_per_channel: bool,
    sink: u8,
    n_layer: u8,
    n_kv_head: u8,
    head_dim: u8,
    gqa: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Fill {
    seed: u32,
    /// Amplitude 2^(amp % 4 - 3): 1/8 .. 1.
    amp: u8,
    /// `(index, which)`: one bad value (NaN, +Inf, -Inf, 1e5, -1e30) or a constant fill.
    special: Option<(u16, u8)>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Add,
    Remove(u8),
    Append {
        layer: u8,
        seq: u8,
        n: u8,
        fill: Fill,
    },
    Attend {
        layer: u8,
        seq: u8,
        n: u8,
        fill: Fill,
    },
    Batch {
        layer: u8,
        items: Vec<(u8, u8)>,
        fill: Fill,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    cfg: Cfg,
    ops: Vec<Op>,
}

/// Most tokens kept per sequence and layer (bounds the f64 reference's cost).
const MAX_TOKENS: usize = 320;

fn values(fill: Fill, n: usize, salt: u32) -> Vec<f32> {
    let amp = (2.0f32).powi((fill.amp % 4) as i32 - 3);
    let mut s = fill.seed.wrapping_mul(0x9E37_79B9) ^ salt.wrapping_mul(0x85EB_CA6B) | 1;
    let mut x: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            amp * ((s >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0)
        })
        .collect();
    if let Some((i, which)) = fill.special {
        if which >= 0xf0 {
            x.iter_mut().for_each(|v| *v = amp); // constant: zero range groups
        } else if !x.is_empty() {
            let i = i as usize % x.len();
            x[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e5, -1e30][which as usize % 5];
        }
    }
    x
}

fn bad(x: &[f32]) -> bool {
    x.iter().any(|v| !v.is_finite() || v.abs() > 65504.0)
}

fn max_err(a: &[f32], b: &[f64]) -> f64 {
    let scale = 1.0 + b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()))
        / scale
}

struct Model {
    shape: CacheShape,
    kivi: Option<KiviConfig>,
    /// Live sequences and, per layer, every K and V row appended to them.
    seqs: Vec<(SeqId, Vec<(Vec<f32>, Vec<f32>)>)>,
}

impl Model {
    fn pick(&self, s: u8) -> Option<usize> {
        if s >= 0xf0 || self.seqs.is_empty() {
            None
        } else {
            Some(s as usize % self.seqs.len())
        }
    }
    /// Expected stored history of a sequence, f64.
    fn stored(&self, k: &[f32], v: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let (nh, hd) = (self.shape.n_kv_head, self.shape.head_dim);
        match &self.kivi {
            Some(c) => (
                stored_ref(c, true, nh, hd, k),
                stored_ref(c, false, nh, hd, v),
            ),
            None => {
                let r = |x: &[f32]| x.iter().map(|&a| half::f16::from_f32(a).to_f64()).collect();
                (r(k), r(v))
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let c = &input.cfg;
    let pick_bits = |b: u8| {
        if b >= 0xfa {
            b % 9
        } else {
            [2, 4, 8][b as usize % 3]
        }
    };
    let group = if c.group >= 0xfa {
        c.group as usize % 7
    } else {
        1usize << (c.group % 8)
    };
    let kc = KiviConfig {
        k_bits: pick_bits(c.k_bits),
        v_bits: pick_bits(c.v_bits),
        group_size: group,
        residual_len: if c.residual >= 0xfa {
            3
        } else {
            group * (c.residual as usize % 5)
        },
        k_axis: if c.k_per_token {
            Axis::PerToken
        } else {
            Axis::PerChannel
        },
        v_axis: if c.v_per_channel {
            Axis::PerChannel
        } else {
            Axis::PerToken
        },
        sink_tokens: c.sink as usize % 9,
    };
    let shape = CacheShape {
        n_layer: c.n_layer as usize % 4,
        n_kv_head: c.n_kv_head as usize % 5,
        head_dim: c.head_dim as usize % 136,
    };
    let n_head = if c.gqa >= 0xfa {
        c.gqa as usize % 7
    } else {
        shape.n_kv_head * (c.gqa as usize % 4 + 1)
    };
    let config = if c.f16 {
        CacheConfig::F16
    } else {
        CacheConfig::Kivi(kc)
    };

    // One cache per ISA; all must accept or reject the config alike.
    let isas = Isa::all_supported();
    let built: Vec<kivi_core::Result<Box<dyn KvCache>>> = isas
        .iter()
        .map(|&isa| -> kivi_core::Result<Box<dyn KvCache>> {
            Ok(match config {
                CacheConfig::F16 => Box::new(F16Cache::new(shape)?.with_isa(isa)),
                CacheConfig::Kivi(kc) => Box::new(KiviCache::new(kc, shape)?.with_isa(isa)),
            })
        })
        .collect();
    let via_new = kivi_core::new_cache(&config, shape);
    assert_eq!(via_new.is_ok(), built[0].is_ok());
    if built.iter().any(|b| b.is_err()) {
        assert!(built.iter().all(|b| b.is_err()));
        return;
    }
    let mut caches: Vec<Box<dyn KvCache>> = built.into_iter().map(|b| b.unwrap()).collect();
    let (nh, hd, nl) = (shape.n_kv_head, shape.head_dim, shape.n_layer);
    let row = nh * hd;
    let mut model = Model {
        shape,
        kivi: if c.f16 { None } else { Some(kc) },
        seqs: vec![],
    };

    for (step, op) in input.ops.iter().take(48).enumerate() {
        let salt = step as u32;
        match op {
            Op::Add => {
                if model.seqs.len() >= 6 {
                    continue;
                }
                let ids: Vec<SeqId> = caches.iter_mut().map(|c| c.add_sequence()).collect();
                assert!(ids.iter().all(|&i| i == ids[0]));
                assert!(
                    model.seqs.iter().all(|(s, _)| *s != ids[0]),
                    "seq id reused"
                );
                model.seqs.push((ids[0], vec![(vec![], vec![]); nl]));
            }
            Op::Remove(s) => match model.pick(*s) {
                Some(i) => {
                    let (id, _) = model.seqs.remove(i);
                    for c in caches.iter_mut() {
                        c.remove_sequence(id).expect("remove a live sequence");
                        assert!(c.remove_sequence(id).is_err(), "removed twice");
                        assert!(c.seq_len(0, id).is_err());
                    }
                }
                None => {
                    for c in caches.iter_mut() {
                        assert!(c.remove_sequence(SeqId(u64::MAX - *s as u64)).is_err());
                    }
                }
            },
            Op::Append {
                layer,
                seq,
                n,
                fill,
            } => {
                let layer = *layer as usize % (nl + 1);
                let n = *n as usize % 41;
                let k = values(*fill, n * row, salt);
                let mut v = values(*fill, n * row, salt ^ 0x5555);
                if n > 0 && fill.seed & 1 == 1 {
                    v.pop(); // a shape error
                }
                let target = model.pick(*seq);
                let id = target.map_or(SeqId(u64::MAX), |i| model.seqs[i].0);
                let len_before = target
                    .filter(|_| layer < nl)
                    .map(|i| model.seqs[i].1[layer].0.len());
                let too_long = len_before.is_some_and(|l| l / row.max(1) + n > MAX_TOKENS);
                if too_long {
                    continue;
                }
                let expect_ok =
                    target.is_some() && layer < nl && v.len() == k.len() && !bad(&k) && !bad(&v);
                for c in caches.iter_mut() {
                    let r = c.append(layer, id, &k, &v);
                    assert_eq!(r.is_ok(), expect_ok, "append: {r:?}");
                }
                if expect_ok {
                    let (hk, hv) = &mut model.seqs[target.unwrap()].1[layer];
                    hk.extend_from_slice(&k);
                    hv.extend_from_slice(&v);
                }
            }
            Op::Attend {
                layer,
                seq,
                n,
                fill,
            } => {
                let layer = *layer as usize % (nl + 1);
                let n = *n as usize % 9;
                let target = model.pick(*seq);
                let id = target.map_or(SeqId(u64::MAX), |i| model.seqs[i].0);
                let q = values(*fill, n * n_head * hd, salt ^ 0x1234);
                let kn = values(
                    Fill {
                        special: None,
                        ..*fill
                    },
                    n * row,
                    salt ^ 0x2345,
                );
                let vn = values(
                    Fill {
                        special: None,
                        ..*fill
                    },
                    n * row,
                    salt ^ 0x3456,
                );
                let expect_ok = target.is_some()
                    && layer < nl
                    && n_head > 0
                    && n_head % nh == 0
                    && q.iter().all(|x| x.is_finite());
                let mut outs = vec![];
                for c in caches.iter() {
                    let mut out = vec![0f32; q.len()];
                    let r = c.attend(layer, n_head, id, &q, &kn, &vn, &mut out);
                    assert_eq!(r.is_ok(), expect_ok, "attend: {r:?}");
                    outs.push(out);
                }
                if !expect_ok || n == 0 {
                    continue;
                }
                assert!(
                    outs[0].iter().all(|x| x.is_finite()),
                    "non-finite attention output"
                );
                if bad(&q) {
                    continue; // 1e5 in q: valid, but too peaked to compare closely
                }
                let (hk, hv) = &model.seqs[target.unwrap()].1[layer];
                let (mut k64, mut v64) = model.stored(hk, hv);
                k64.extend(kn.iter().map(|&x| x as f64));
                v64.extend(vn.iter().map(|&x| x as f64));
                let q64: Vec<f64> = q.iter().map(|&x| x as f64).collect();
                let want = attention_ref(&q64, &k64, &v64, n_head, nh, hd, hk.len() / row);
                for (isa, out) in isas.iter().zip(&outs) {
                    let e = max_err(out, &want);
                    assert!(
                        e < 2e-3,
                        "{isa:?}: attend differs from the f64 reference by {e}"
                    );
                    let d = max_err(out, &outs[0].iter().map(|&x| x as f64).collect::<Vec<_>>());
                    assert!(d < 1e-4, "{isa:?} differs from scalar by {d}");
                }
            }
            Op::Batch { layer, items, fill } => {
                let layer = *layer as usize % (nl + 1);
                let specs: Vec<(SeqId, usize)> = items
                    .iter()
                    .take(4)
                    .map(|&(s, n)| {
                        let id = model.pick(s).map_or(SeqId(u64::MAX), |i| model.seqs[i].0);
                        (id, n as usize % 5)
                    })
                    .collect();
                let data: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = specs
                    .iter()
                    .enumerate()
                    .map(|(j, &(_, n))| {
                        let f = Fill {
                            special: None,
                            ..*fill
                        };
                        let j = j as u32 * 3;
                        (
                            values(f, n * n_head * hd, salt ^ j),
                            values(f, n * row, salt ^ (j + 1)),
                            values(f, n * row, salt ^ (j + 2)),
                        )
                    })
                    .collect();
                if specs.is_empty() {
                    continue; // nothing to check: either answer is fine
                }
                let known = specs.iter().all(|(id, _)| id.0 != u64::MAX);
                let expect_ok = known && layer < nl && n_head > 0 && n_head % nh == 0;
                for c in caches.iter() {
                    let mut outs: Vec<Vec<f32>> =
                        data.iter().map(|d| vec![0f32; d.0.len()]).collect();
                    let mut batch: Vec<AttendItem<'_>> = specs
                        .iter()
                        .zip(&data)
                        .zip(outs.iter_mut())
                        .map(|((&(seq, _), (q, k, v)), out)| AttendItem {
                            seq,
                            q,
                            k_new: k,
                            v_new: v,
                            out,
                        })
                        .collect();
                    let r = c.attend_batch(layer, n_head, &mut batch);
                    assert_eq!(r.is_ok(), expect_ok, "attend_batch: {r:?}");
                    if !expect_ok {
                        continue;
                    }
                    // Each item equals a single attend.
                    for ((&(seq, _), (q, k, v)), out) in specs.iter().zip(&data).zip(&outs) {
                        let mut one = vec![0f32; q.len()];
                        c.attend(layer, n_head, seq, q, k, v, &mut one)
                            .expect("single attend");
                        let d = max_err(out, &one.iter().map(|&x| x as f64).collect::<Vec<_>>());
                        assert!(d < 1e-5, "attend_batch item differs from attend by {d}");
                    }
                }
            }
        }
        // Lengths agree with the model after every step, and memory accounting is sane.
        for (id, layers) in &model.seqs {
            for (l, (hk, _)) in layers.iter().enumerate() {
                for c in caches.iter() {
                    assert_eq!(c.seq_len(l, *id).unwrap(), hk.len() / row.max(1));
                }
            }
        }
        let m0 = caches[0].memory();
        for c in caches.iter() {
            assert_eq!(c.memory(), m0);
            assert!(c.memory_reserved().total_bytes() >= m0.total_bytes());
        }
        let stored_tokens: usize = model
            .seqs
            .iter()
            .flat_map(|(_, ls)| ls.iter().map(|(k, _)| k.len() / row.max(1)))
            .sum();
        assert_eq!(m0.tokens, stored_tokens as u64);
    }
});
