//! Cache configuration: what is stored and how.

use crate::{Error, Result};

/// Axis along which groups of `group_size` elements share one scale and min.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// One group = `group_size` consecutive tokens of one channel (KIVI's keys).
    PerChannel,
    /// One group = `group_size` consecutive channels of one token, inside a head (KIVI's values).
    PerToken,
}

/// Geometry of the cache: independent of any model file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    pub n_layer: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// KIVI settings. Defaults are the paper's: 2-bit, G = 32, R = 128, K per-channel, V per-token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KiviConfig {
    pub k_bits: u8,
    pub v_bits: u8,
    /// G: elements per quantization group.
    pub group_size: usize,
    /// R: full-precision window. Keys flush in whole R-token chunks; values are a FIFO of R tokens.
    /// 0 means every token is quantized.
    pub residual_len: usize,
    pub k_axis: Axis,
    pub v_axis: Axis,
    /// The first `sink_tokens` tokens of each sequence are kept in f16 forever (attention sinks).
    pub sink_tokens: usize,
    /// Layers (bit i = layer i, layers < 64) whose keys are stored at 4 bits instead of
    /// `k_bits` (per-layer bit allocation; `new_cache` builds a [`crate::cache::MixedLayerCache`]).
    pub key4_layers: u64,
    /// This many layers store keys at 4 bits, chosen on the fly: the layers whose 2-bit keys
    /// disturb the attention logits most on the first sequence's first tokens (see
    /// [`crate::cache::MixedLayerCache`]). Exclusive with `key4_layers`.
    pub key4_auto: u8,
}

impl Default for KiviConfig {
    fn default() -> Self {
        KiviConfig {
            k_bits: 2,
            v_bits: 2,
            group_size: 32,
            residual_len: 128,
            k_axis: Axis::PerChannel,
            v_axis: Axis::PerToken,
            sink_tokens: 0,
            key4_layers: 0,
            key4_auto: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheConfig {
    /// Every token in f16: the baseline.
    F16,
    Kivi(KiviConfig),
}

impl KiviConfig {
    pub fn kivi2() -> Self {
        Self::default()
    }
    pub fn kivi4() -> Self {
        KiviConfig {
            k_bits: 4,
            v_bits: 4,
            ..Self::default()
        }
    }

    /// Rejects combinations the cache cannot store, naming the offending parameter.
    pub fn validate(&self, shape: &CacheShape) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        for (name, b) in [("k_bits", self.k_bits), ("v_bits", self.v_bits)] {
            if ![2, 4, 8].contains(&b) {
                return bad(format!("{name} = {b}: supported bit widths are 2, 4 and 8"));
            }
        }
        let g = self.group_size;
        if g == 0 {
            return bad("group_size must be > 0".into());
        }
        for b in [self.k_bits, self.v_bits] {
            let per_word = 32 / b as usize;
            if !g.is_multiple_of(per_word) {
                return bad(format!(
                    "group_size {g} is not a multiple of {per_word} (codes per u32 word at {b} bits)"
                ));
            }
        }
        // A cache of no layers could not remember its sequences (they live in the layers).
        if shape.n_layer == 0 || shape.head_dim == 0 || shape.n_kv_head == 0 {
            return bad("n_layer, head_dim and n_kv_head must be > 0".into());
        }
        let per_token_used = self.k_axis == Axis::PerToken || self.v_axis == Axis::PerToken;
        if per_token_used && !shape.head_dim.is_multiple_of(g) {
            return bad(format!(
                "head_dim {} is not a multiple of group_size {g}",
                shape.head_dim
            ));
        }
        if self.key4_layers != 0 || self.key4_auto != 0 {
            if self.key4_layers != 0 && self.key4_auto != 0 {
                return bad(
                    "4-bit key layers are either listed or chosen on the fly, not both".into(),
                );
            }
            if self.key4_auto != 0 && shape.n_layer > 64 {
                return bad(format!(
                    "4-bit key layers are chosen among at most 64 layers, not {}",
                    shape.n_layer
                ));
            }
            if self.key4_auto as usize > shape.n_layer {
                return bad(format!(
                    "{} layers with 4-bit keys asked of a model with {}",
                    self.key4_auto, shape.n_layer
                ));
            }
            if self.k_bits != 2 {
                return bad(format!(
                    "layers with 4-bit keys need k_bits = 2 elsewhere, not {}",
                    self.k_bits
                ));
            }
            if shape.n_layer < 64 && self.key4_layers >> shape.n_layer != 0 {
                return bad(format!(
                    "4-bit key layers {:#x} name layers beyond the model's {}",
                    self.key4_layers, shape.n_layer
                ));
            }
        }
        if !self.residual_len.is_multiple_of(g) {
            return bad(format!(
                "residual_len {} is not a multiple of group_size {g}",
                self.residual_len
            ));
        }
        Ok(())
    }

    /// Average stored bits per quantized element (codes + f16 scale + f16 min), keys and values,
    /// over the `n_layer` layers of a model (layers in `key4_layers` store keys at 4 bits).
    pub fn bits_per_element(&self, n_layer: usize) -> (f64, f64) {
        let meta = 32.0 / self.group_size as f64;
        let hi = (self.key4_layers.count_ones() as usize + self.key4_auto as usize).min(n_layer);
        let k_bits = if n_layer == 0 {
            self.k_bits as f64
        } else {
            (self.k_bits as f64 * (n_layer - hi) as f64 + 4.0 * hi as f64) / n_layer as f64
        };
        (k_bits + meta, self.v_bits as f64 + meta)
    }

    /// Key bits of `layer` (layers chosen on the fly, `key4_auto`, are not known here).
    pub fn key_bits(&self, layer: usize) -> u8 {
        if layer < 64 && self.key4_layers >> layer & 1 == 1 {
            4
        } else {
            self.k_bits
        }
    }
}
