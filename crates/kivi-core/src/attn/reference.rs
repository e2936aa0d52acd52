//! Plain-loop f64 attention: the oracle for every attention test.

/// Causal attention in f64.
///
/// - `q`: `[n_q][n_head][head_dim]`
/// - `k`, `v`: `[n_past + n_q][n_kv_head][head_dim]`
///
/// Query `i` attends positions `0..=n_past + i`; query head `h` reads KV head
/// `h / (n_head / n_kv_head)`. Returns `[n_q][n_head][head_dim]`.
pub fn attention_ref(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    n_past: usize,
) -> Vec<f64> {
    let n_q = q.len() / (n_head * head_dim);
    let group = n_head / n_kv_head;
    let mut out = vec![0.0; q.len()];
    for i in 0..n_q {
        let n_vis = n_past + i + 1;
        for h in 0..n_head {
            let kh = h / group;
            let qi = &q[(i * n_head + h) * head_dim..][..head_dim];
            let mut s: Vec<f64> = (0..n_vis)
                .map(|t| {
                    let kt = &k[(t * n_kv_head + kh) * head_dim..][..head_dim];
                    qi.iter().zip(kt).map(|(a, b)| a * b).sum::<f64>() / (head_dim as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut z = 0.0;
            for x in s.iter_mut() {
                *x = (*x - m).exp();
                z += *x;
            }
            let o = &mut out[(i * n_head + h) * head_dim..][..head_dim];
            for (t, p) in s.iter().enumerate() {
                let vt = &v[(t * n_kv_head + kh) * head_dim..][..head_dim];
                for (a, b) in o.iter_mut().zip(vt) {
                    *a += p / z * b;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_token_returns_its_value() {
        let q = [1.0, 2.0];
        let k = [0.5, -1.0];
        let v = [3.0, 4.0];
        assert_eq!(attention_ref(&q, &k, &v, 1, 1, 2, 0), vec![3.0, 4.0]);
    }

    #[test]
    fn two_tokens_by_hand() {
        // q·k0 = 0, q·k1 = 2·sqrt(2) -> scaled 2; weights 1/(1+e^2), e^2/(1+e^2).
        let s2 = 2f64.sqrt();
        let q = [s2, s2];
        let k = [0.0, 0.0, 1.0, 1.0];
        let v = [1.0, 0.0, 0.0, 1.0];
        let o = attention_ref(&q, &k, &v, 1, 1, 2, 1);
        let e = 2f64.exp();
        assert!((o[0] - 1.0 / (1.0 + e)).abs() < 1e-12);
        assert!((o[1] - e / (1.0 + e)).abs() < 1e-12);
    }
}
