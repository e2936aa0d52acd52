//! Text form of a cache configuration, used by `--kv` everywhere:
//!
//! ```text
//! f16                      the baseline
//! kivi2 | kivi4 | kivi8    KIVI with K and V at that width (G = 32, R = 128)
//! k2v4                     independent key / value bits
//! ...:g16 :r64 :sink4      group size, residual length, f16 sink tokens
//! ...:kt :vc               keys per-token / values per-channel (the paper's Table 1 ablation)
//! ...:k4@0-1+29            these layers' keys at 4 bits (per-layer allocation; k2 elsewhere)
//! ...:k4@auto10            10 layers' keys at 4 bits, the most sensitive, measured on the fly
//! ```
//! e.g. `kivi2:g16:r0`, `k4v2:sink4`, `kivi2:sink4:k4@0-1`. Overrides from separate flags are applied on top.

use kivi_core::{Axis, CacheConfig, KiviConfig};

/// Parses a `--kv` spec. Errors explain the expected syntax.
pub fn parse_kv(spec: &str) -> Result<CacheConfig, String> {
    let spec = spec.trim().to_ascii_lowercase();
    let mut parts = spec.split(':');
    let head = parts.next().unwrap_or_default();
    if head == "f16" || head == "fp16" {
        if parts.next().is_some() {
            return Err(format!("`{spec}`: the f16 cache takes no options"));
        }
        return Ok(CacheConfig::F16);
    }
    let mut cfg = KiviConfig::default();
    let bits = |s: &str| -> Result<u8, String> {
        s.parse::<u8>()
            .map_err(|_| format!("`{spec}`: `{s}` is not a bit width"))
    };
    if let Some(b) = head.strip_prefix("kivi") {
        let b = bits(b)?;
        cfg.k_bits = b;
        cfg.v_bits = b;
    } else if let Some(rest) = head.strip_prefix('k') {
        let (k, v) = rest
            .split_once('v')
            .ok_or_else(|| format!("`{spec}`: expected f16, kivi2, kivi4 or k<bits>v<bits>"))?;
        cfg.k_bits = bits(k)?;
        cfg.v_bits = bits(v)?;
    } else {
        return Err(format!(
            "`{spec}`: expected f16, kivi2, kivi4 or k<bits>v<bits>"
        ));
    }
    for opt in parts {
        let num = |p: &str| -> Result<usize, String> {
            opt[p.len()..]
                .parse()
                .map_err(|_| format!("`{spec}`: bad number in `{opt}`"))
        };
        match opt {
            "kt" => cfg.k_axis = Axis::PerToken,
            "kc" => cfg.k_axis = Axis::PerChannel,
            "vt" => cfg.v_axis = Axis::PerToken,
            "vc" => cfg.v_axis = Axis::PerChannel,
            o if o.starts_with("sink") => cfg.sink_tokens = num("sink")?,
            o if o.starts_with("k4@auto") => {
                cfg.key4_auto = opt[7..]
                    .parse()
                    .map_err(|_| format!("`{spec}`: bad number in `{opt}` (k4@auto<N>, N < 256)"))?
            }
            o if o.starts_with("k4@") => cfg.key4_layers = parse_layers(&spec, &o[3..])?,
            o if o.starts_with('g') => cfg.group_size = num("g")?,
            o if o.starts_with('r') => cfg.residual_len = num("r")?,
            _ => {
                return Err(format!(
                    "`{spec}`: unknown option `{opt}` (g<N>, r<N>, sink<N>, kt, vc, k4@<layers>)"
                ))
            }
        }
    }
    Ok(CacheConfig::Kivi(cfg))
}

/// `0-1+29` -> bits 0, 1 and 29 (layers below 64).
fn parse_layers(spec: &str, list: &str) -> Result<u64, String> {
    let bad = || format!("`{spec}`: `{list}` is not a layer list such as 0-1+29 (layers 0..63)");
    let mut mask = 0u64;
    for part in list.split('+') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let a: u32 = a.parse().map_err(|_| bad())?;
        let b: u32 = b.parse().map_err(|_| bad())?;
        if a > b || b > 63 {
            return Err(bad());
        }
        for l in a..=b {
            mask |= 1 << l;
        }
    }
    Ok(mask)
}

/// `mask` as runs: bits 0, 1, 29 -> `0-1+29`.
fn format_layers(mask: u64) -> String {
    let mut runs = Vec::new();
    let mut l = 0;
    while l < 64 {
        if mask >> l & 1 == 0 {
            l += 1;
            continue;
        }
        let start = l;
        while l < 64 && mask >> l & 1 == 1 {
            l += 1;
        }
        runs.push(if l - 1 == start {
            format!("{start}")
        } else {
            format!("{start}-{}", l - 1)
        });
    }
    runs.join("+")
}

/// The canonical text form (inverse of [`parse_kv`]).
pub fn format_kv(cfg: &CacheConfig) -> String {
    match cfg {
        CacheConfig::F16 => "f16".into(),
        CacheConfig::Kivi(c) => {
            let mut s = if c.k_bits == c.v_bits {
                format!("kivi{}", c.k_bits)
            } else {
                format!("k{}v{}", c.k_bits, c.v_bits)
            };
            let d = KiviConfig::default();
            if c.group_size != d.group_size {
                s += &format!(":g{}", c.group_size);
            }
            if c.residual_len != d.residual_len {
                s += &format!(":r{}", c.residual_len);
            }
            if c.sink_tokens != 0 {
                s += &format!(":sink{}", c.sink_tokens);
            }
            if c.k_axis == Axis::PerToken {
                s += ":kt";
            }
            if c.v_axis == Axis::PerChannel {
                s += ":vc";
            }
            if c.key4_layers != 0 {
                s += &format!(":k4@{}", format_layers(c.key4_layers));
            }
            if c.key4_auto != 0 {
                s += &format!(":k4@auto{}", c.key4_auto);
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets() {
        assert_eq!(parse_kv("f16").unwrap(), CacheConfig::F16);
        assert_eq!(
            parse_kv("kivi2").unwrap(),
            CacheConfig::Kivi(KiviConfig::kivi2())
        );
        assert_eq!(
            parse_kv("KIVI4").unwrap(),
            CacheConfig::Kivi(KiviConfig::kivi4())
        );
    }

    #[test]
    fn options() {
        let CacheConfig::Kivi(c) = parse_kv("k4v2:g16:r64:sink4:kt:vc").unwrap() else {
            panic!("expected kivi")
        };
        assert_eq!(
            (
                c.k_bits,
                c.v_bits,
                c.group_size,
                c.residual_len,
                c.sink_tokens
            ),
            (4, 2, 16, 64, 4)
        );
        assert_eq!((c.k_axis, c.v_axis), (Axis::PerToken, Axis::PerChannel));
        let CacheConfig::Kivi(c) = parse_kv("kivi2:k4@0-2+40").unwrap() else {
            panic!("expected kivi")
        };
        assert_eq!(c.key4_layers, 0b111 | 1 << 40);
    }

    #[test]
    fn round_trip() {
        for s in [
            "f16",
            "kivi2",
            "kivi4",
            "k4v2",
            "kivi2:g16",
            "kivi2:r0",
            "k2v4:sink4:kt:vc",
            "kivi2:sink4:k4@0-1+29",
            "kivi2:k4@0+2+4-6",
            "kivi2:sink4:k4@auto10",
        ] {
            assert_eq!(format_kv(&parse_kv(s).unwrap()), s);
        }
    }

    #[test]
    fn errors_name_the_problem() {
        for (s, needle) in [
            ("q8", "expected"),
            ("kivi2:x3", "unknown option"),
            ("kivi2:gabc", "bad number"),
            ("kxv2", "not a bit width"),
            ("f16:g32", "no options"),
            ("kivi2:k4@", "layer list"),
            ("kivi2:k4@3-1", "layer list"),
            ("kivi2:k4@64", "layer list"),
        ] {
            let e = parse_kv(s).unwrap_err();
            assert!(e.contains(needle), "{s}: {e}");
        }
    }
}
