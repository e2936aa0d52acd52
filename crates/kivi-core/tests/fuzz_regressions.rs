//! Inputs the `fuzz/` targets found (issue #8), kept as ordinary tests. Each says what the
//! fuzzer saw and what the fix was.

use kivi_core::{new_cache, CacheConfig, CacheShape, Error, KiviConfig};

/// kv_cache target: a cache of 0 layers was accepted; `add_sequence` then returned an id that
/// `remove_sequence` did not know (sequences live in the layers), so a caller's cleanup failed.
/// Fix: `n_layer == 0` is an invalid configuration for both caches.
#[test]
fn zero_layer_cache_is_rejected() {
    let shape = CacheShape {
        n_layer: 0,
        n_kv_head: 1,
        head_dim: 32,
    };
    for cfg in [CacheConfig::F16, CacheConfig::Kivi(KiviConfig::default())] {
        match new_cache(&cfg, shape) {
            Err(Error::InvalidConfig(m)) => assert!(m.contains("n_layer"), "{m}"),
            Err(e) => panic!("{cfg:?}: wrong error {e}"),
            Ok(_) => panic!("{cfg:?}: a 0-layer cache was accepted"),
        }
    }
    // One layer is fine, and a sequence added can be removed exactly once.
    for cfg in [CacheConfig::F16, CacheConfig::Kivi(KiviConfig::default())] {
        let mut c = new_cache(
            &cfg,
            CacheShape {
                n_layer: 1,
                ..shape
            },
        )
        .unwrap();
        let s = c.add_sequence();
        c.remove_sequence(s).unwrap();
        assert!(matches!(
            c.remove_sequence(s),
            Err(Error::UnknownSequence(_))
        ));
    }
}
