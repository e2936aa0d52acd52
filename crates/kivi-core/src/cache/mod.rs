//! The two [`KvCache`] implementations: [`F16Cache`] (baseline) and [`KiviCache`].

pub mod block;
pub mod f16;
pub mod kivi;
pub mod mixed;
pub mod reference;

pub use self::f16::F16Cache;
pub use self::kivi::KiviCache;
pub use self::mixed::MixedLayerCache;

use crate::{quant, CacheConfig, CacheShape, Error, KvCache, Result};

/// Builds the cache described by `config` (validated first).
pub fn new_cache(config: &CacheConfig, shape: CacheShape) -> Result<Box<dyn KvCache>> {
    Ok(match config {
        CacheConfig::F16 => Box::new(F16Cache::new(shape)?),
        CacheConfig::Kivi(kc) if kc.key4_layers != 0 || kc.key4_auto != 0 => {
            Box::new(MixedLayerCache::new(*kc, shape)?)
        }
        CacheConfig::Kivi(kc) => Box::new(KiviCache::new(*kc, shape)?),
    })
}

/// Checks `attend` arguments; returns `n_new`.
pub(crate) fn check_attend_shapes(
    shape: &CacheShape,
    n_head: usize,
    q: &[f32],
    k_new: &[f32],
    v_new: &[f32],
    out: &[f32],
) -> Result<usize> {
    let op = "attend";
    let (nh, hd) = (shape.n_kv_head, shape.head_dim);
    if n_head == 0 || !n_head.is_multiple_of(nh) {
        let detail = format!("n_head {n_head} is not a positive multiple of n_kv_head {nh}");
        return Err(Error::Shape { op, detail });
    }
    let row = nh * hd;
    if !k_new.len().is_multiple_of(row) || v_new.len() != k_new.len() {
        let detail = format!(
            "k_new ({}) and v_new ({}) must be equal multiples of n_kv_head * head_dim = {row}",
            k_new.len(),
            v_new.len()
        );
        return Err(Error::Shape { op, detail });
    }
    let n_new = k_new.len() / row;
    let qlen = n_new * n_head * hd;
    if q.len() != qlen || out.len() != qlen {
        let detail = format!(
            "q ({}) and out ({}) must hold n_new * n_head * head_dim = {qlen}",
            q.len(),
            out.len()
        );
        return Err(Error::Shape { op, detail });
    }
    if let Some((index, &value)) = q.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(Error::NonFinite {
            what: "q",
            index,
            value,
        });
    }
    quant::check_input("k_new", k_new)?;
    quant::check_input("v_new", v_new)?;
    Ok(n_new)
}

/// Checks `append` arguments (before anything is stored).
pub(crate) fn check_append_shapes(row: usize, k: &[f32], v: &[f32]) -> Result<()> {
    if !k.len().is_multiple_of(row) || v.len() != k.len() {
        let detail = format!(
            "k ({}) and v ({}) must be equal multiples of n_kv_head * head_dim = {row}",
            k.len(),
            v.len()
        );
        return Err(Error::Shape {
            op: "append",
            detail,
        });
    }
    quant::check_input("k", k)?;
    quant::check_input("v", v)
}
