//! Closed-form f64 model of what a KIVI cache stores, independent of the incremental policy in
//! [`super::kivi`]: given all `n` tokens appended so far, which ones are quantized and how.

use crate::quant::reference::quantize_group_ref;
use crate::{Axis, KiviConfig};

/// Dequantized stored form `[n][Hkv][D]` of one tensor after all of `x` (`[n][Hkv][D]` f32) was
/// appended: sinks and windows are the f16 rounding of the input, the rest is quantized.
pub fn stored_ref(
    cfg: &KiviConfig,
    key: bool,
    n_kv_head: usize,
    head_dim: usize,
    x: &[f32],
) -> Vec<f64> {
    let (axis, bits) = if key {
        (cfg.k_axis, cfg.k_bits)
    } else {
        (cfg.v_axis, cfg.v_bits)
    };
    let (g, r) = (cfg.group_size, cfg.residual_len);
    let row = n_kv_head * head_dim;
    let n = x.len() / row;
    let mut out: Vec<f64> = x.iter().map(|&v| half::f16::from_f32(v).to_f64()).collect();
    let s = cfg.sink_tokens.min(n);
    let m = n - s;
    let at = |t: usize, h: usize, d: usize| (s + t) * row + h * head_dim + d;
    match axis {
        Axis::PerChannel => {
            // Whole R-chunks are quantized; with R = 0 everything, the last group possibly partial.
            let nq = if r > 0 { m - m % r } else { m };
            for h in 0..n_kv_head {
                for d in 0..head_dim {
                    let mut t0 = 0;
                    while t0 < nq {
                        let t1 = (t0 + g).min(nq);
                        let vals: Vec<f64> = (t0..t1).map(|t| out[at(t, h, d)]).collect();
                        let q = quantize_group_ref(&vals, bits);
                        for t in t0..t1 {
                            out[at(t, h, d)] = q.recon[t - t0];
                        }
                        t0 = t1;
                    }
                }
            }
        }
        Axis::PerToken => {
            // All but the last R stream tokens are quantized.
            let nq = m.saturating_sub(r);
            for t in 0..nq {
                for h in 0..n_kv_head {
                    for d0 in (0..head_dim).step_by(g) {
                        let vals: Vec<f64> = (d0..d0 + g).map(|d| out[at(t, h, d)]).collect();
                        let q = quantize_group_ref(&vals, bits);
                        for d in d0..d0 + g {
                            out[at(t, h, d)] = q.recon[d - d0];
                        }
                    }
                }
            }
        }
    }
    out
}
