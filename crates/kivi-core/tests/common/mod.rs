//! Shared helpers: random data, the f64 expectation of one attention step.
#![allow(dead_code)]

use kivi_core::attn::reference::attention_ref;
use kivi_core::cache::reference::stored_ref;
use kivi_core::KiviConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` tokens `[n][n_kv_head][head_dim]` of KV-like data: per-channel offsets and a few outlier
/// channels (like real keys), some exactly constant channels.
pub fn kv_data(r: &mut StdRng, n: usize, n_kv_head: usize, head_dim: usize) -> Vec<f32> {
    let row = n_kv_head * head_dim;
    let offs: Vec<f32> = (0..row).map(|_| r.gen_range(-2.0..2.0)).collect();
    let amp: Vec<f32> = (0..row)
        .map(|_| match r.gen_range(0..10) {
            0 => 8.0,
            1 => 0.0, // constant channel
            _ => 1.0,
        })
        .collect();
    (0..n * row)
        .map(|i| offs[i % row] + amp[i % row] * r.gen_range(-1.0f32..1.0))
        .collect()
}

pub fn uniform(r: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(lo..hi)).collect()
}

/// f64 expectation of `attend`: the stored history (closed-form model of the cache) followed by
/// the new tokens in exact precision.
#[allow(clippy::too_many_arguments)]
pub fn expected_attention(
    cfg: Option<&KiviConfig>,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    hist_k: &[f32],
    hist_v: &[f32],
    q: &[f32],
    k_new: &[f32],
    v_new: &[f32],
) -> Vec<f64> {
    let (mut k, mut v): (Vec<f64>, Vec<f64>) = match cfg {
        Some(c) => (
            stored_ref(c, true, n_kv_head, head_dim, hist_k),
            stored_ref(c, false, n_kv_head, head_dim, hist_v),
        ),
        None => (
            hist_k
                .iter()
                .map(|&x| half::f16::from_f32(x).to_f64())
                .collect(),
            hist_v
                .iter()
                .map(|&x| half::f16::from_f32(x).to_f64())
                .collect(),
        ),
    };
    k.extend(k_new.iter().map(|&x| x as f64));
    v.extend(v_new.iter().map(|&x| x as f64));
    let q64: Vec<f64> = q.iter().map(|&x| x as f64).collect();
    let n_past = hist_k.len() / (n_kv_head * head_dim);
    attention_ref(&q64, &k, &v, n_head, n_kv_head, head_dim, n_past)
}

/// Max |a - b| relative to `1 + max|b|`.
pub fn max_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = 1.0 + b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()))
        / scale
}
