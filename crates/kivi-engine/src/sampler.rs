//! Token sampling: greedy, temperature, top-k, top-p (nucleus), seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    /// Whether [`Sampler::sample`] is the argmax (no randomness): a GPU can pick on the device.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0 || self.params.top_k == 1
    }

    pub fn params(&self) -> SamplingParams {
        self.params
    }

    /// The uniform draw in [0, 1) that [`Sampler::sample`] would use for its next token (a
    /// device sampling the token itself gets it, so the seeded stream stays the same).
    pub fn draw(&mut self) -> f32 {
        self.rng.gen::<f32>()
    }

    /// Picks the next token from `logits` (`[vocab]`): the softmax at the temperature over the
    /// top-k logits, cut to the smallest set of highest-probability tokens whose mass reaches
    /// top-p.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() || logits.is_empty() {
            return argmax(logits);
        }
        let u = self.draw();
        self.sample_with(logits, u)
    }

    /// [`Sampler::sample`] with the uniform draw `u` in [0, 1) given (drawn earlier with
    /// [`Sampler::draw`]).
    ///
    /// Nothing is sorted that the cuts cannot keep: top-k is a selection (linear), and the
    /// nucleus is looked for among the top 64 candidates, then 4x more until their mass
    /// suffices, so a peaked distribution sorts a few dozen logits instead of the vocabulary.
    pub fn sample_with(&self, logits: &[f32], u: f32) -> u32 {
        let p = self.params;
        if p.temperature <= 0.0 || p.top_k == 1 || logits.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let mut cand: Vec<u32> = (0..logits.len() as u32).collect();
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            cand.truncate(p.top_k);
        }
        // Softmax weights at temperature T (max-subtracted for stability), unnormalised.
        let max = cand
            .iter()
            .map(|&i| logits[i as usize])
            .max_by(f32::total_cmp)
            .expect("at least one candidate");
        let weight = |i: u32| ((logits[i as usize] - max) / p.temperature).exp();
        let mut w: Vec<f32> = cand.iter().map(|&i| weight(i)).collect();
        let total: f32 = w.iter().sum();
        if p.top_p < 1.0 {
            // The nucleus: the smallest prefix, by logit, whose mass reaches top_p.
            let mut m = 64.min(cand.len());
            loop {
                if m < cand.len() {
                    cand.select_nth_unstable_by(m - 1, by_logit_desc);
                }
                cand[..m].sort_unstable_by(by_logit_desc);
                let mut acc = 0.0;
                let keep = cand[..m].iter().position(|&i| {
                    acc += weight(i) / total;
                    acc >= p.top_p
                });
                match keep {
                    Some(k) => {
                        cand.truncate(k + 1);
                        break;
                    }
                    // Rounding left the whole set short of top_p: keep it all.
                    None if m == cand.len() => break,
                    None => m = (4 * m).min(cand.len()),
                }
            }
            w = cand.iter().map(|&i| weight(i)).collect();
        }
        let kept: f32 = w.iter().sum();
        let mut r = u * kept;
        for (&i, &wi) in cand.iter().zip(&w) {
            r -= wi;
            if r <= 0.0 {
                return i;
            }
        }
        *cand.last().expect("at least one candidate")
    }
}

/// Index of the largest logit (the first one on ties); NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    // Two simple passes (a max the compiler vectorises, then its first position) beat one pass
    // carrying the index: measured 3.8 -> ~1 ns per logit.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let best = if max > f32::NEG_INFINITY {
        logits.iter().position(|&v| v == max)
    } else {
        logits.iter().position(|v| !v.is_nan()) // all -inf (or NaN): the first that is not NaN
    };
    best.unwrap_or(0) as u32
}

/// The distribution [`Sampler`] draws from, in f64 from the definition (a full sort, no
/// selection, no search): token probabilities of the softmax at `temperature` over the `top_k`
/// largest logits (0: all), cut to the fewest highest-probability tokens whose mass reaches
/// `top_p`, renormalised; and each token's cumulative mass in logit order up to and including it
/// (NaN outside the top-k), so that a test can skip the one token whose membership rounding
/// decides. The independent reference for the host and device samplers' tests.
pub fn reference_probs(
    logits: &[f32],
    temperature: f32,
    top_k: usize,
    top_p: f32,
) -> (Vec<f64>, Vec<f64>) {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if top_k > 0 {
        idx.truncate(top_k);
    }
    let max = logits[idx[0]] as f64;
    let w: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / temperature as f64).exp())
        .collect();
    let z: f64 = w.iter().sum();
    let n = logits.len();
    let (mut probs, mut cum) = (vec![0f64; n], vec![f64::NAN; n]);
    let (mut acc, mut kept) = (0.0, Vec::new());
    for (&i, &wi) in idx.iter().zip(&w) {
        acc += wi / z;
        cum[i] = acc;
        kept.push((i, wi));
        if acc >= top_p as f64 {
            break;
        }
    }
    let zk: f64 = kept.iter().map(|k| k.1).sum();
    for (i, wi) in kept {
        probs[i] = wi / zk;
    }
    (probs, cum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-5.0..5.0)).collect()
    }

    #[test]
    fn greedy_picks_the_max() {
        for seed in 0..20 {
            let l = random_logits(1000, rand::random::<u64>() ^ seed);
            let m = l.iter().cloned().fold(f32::MIN, f32::max);
            let mut s = Sampler::new(SamplingParams::default());
            assert_eq!(l[s.sample(&l) as usize], m);
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_never_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 0.5]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::INFINITY, 2.0, f32::INFINITY]), 0);
        // Against a one-pass scan on random rows with repeated values.
        let mut rng = StdRng::seed_from_u64(rand::random());
        for _ in 0..200 {
            let l: Vec<f32> = (0..rng.gen_range(1..300))
                .map(|_| rng.gen_range(-3..3) as f32)
                .collect();
            let mut best = 0;
            for (i, &v) in l.iter().enumerate() {
                if v > l[best] {
                    best = i;
                }
            }
            assert_eq!(argmax(&l), best as u32, "{l:?}");
        }
    }

    #[test]
    fn top_k_only_returns_the_k_best() {
        let l = random_logits(500, rand::random());
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[4];
        let mut s = Sampler::new(SamplingParams {
            temperature: 2.0,
            top_k: 5,
            top_p: 1.0,
            seed: rand::random(),
        });
        for _ in 0..500 {
            assert!(l[s.sample(&l) as usize] >= kth);
        }
    }

    #[test]
    fn frequencies_follow_softmax() {
        // Three tokens with known probabilities at T = 1: compare empirical frequencies.
        let l = [0.0f32, 1.0, 2.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        let expected: Vec<f64> = l.iter().map(|&x| (x as f64).exp() / z).collect();
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: rand::random(),
        });
        let mut counts = [0usize; 3];
        let n = 40_000;
        for _ in 0..n {
            counts[s.sample(&l) as usize] += 1;
        }
        for i in 0..3 {
            let f = counts[i] as f64 / n as f64;
            assert!(
                (f - expected[i]).abs() < 0.015,
                "token {i}: {f} vs {}",
                expected[i]
            );
        }
    }

    #[test]
    fn top_k_top_p_frequencies_match_f64_reference() {
        // Peaked logits (a nucleus of a few tokens) and flat ones (a nucleus of hundreds: past
        // the first 64 candidates), with and without top-k.
        let seed = rand::random::<u64>();
        eprintln!("top_k_top_p_frequencies_match_f64_reference: seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        for (spread, top_k, top_p) in [
            (6.0f32, 0, 0.9f32),
            (6.0, 20, 0.8),
            (0.5, 0, 0.7),
            (0.5, 300, 0.95),
        ] {
            let l: Vec<f32> = (0..400).map(|_| rng.gen_range(-spread..spread)).collect();
            let params = SamplingParams {
                temperature: 0.8,
                top_k,
                top_p,
                seed: rng.gen(),
            };
            let (want, cum) = reference_probs(&l, params.temperature, top_k, top_p);
            let mut s = Sampler::new(params);
            let n = 60_000;
            let mut counts = vec![0usize; l.len()];
            for _ in 0..n {
                counts[s.sample(&l) as usize] += 1;
            }
            for i in 0..l.len() {
                let borderline = (cum[i] - top_p as f64).abs() < 1e-4;
                let f = counts[i] as f64 / n as f64;
                if want[i] == 0.0 && !borderline {
                    assert_eq!(counts[i], 0, "token {i} outside the cut was sampled");
                }
                let sigma = (want[i] * (1.0 - want[i]) / n as f64).sqrt();
                assert!(
                    borderline || (f - want[i]).abs() <= 5.0 * sigma + 1e-3,
                    "spread {spread} top_k {top_k} top_p {top_p} token {i}: {f} vs {}",
                    want[i]
                );
            }
        }
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // p = [0.665, 0.245, 0.090] at T = 1; top_p 0.6 keeps only the first.
        let l = [2.0f32, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.6,
            seed: rand::random(),
        });
        for _ in 0..1000 {
            assert_eq!(s.sample(&l), 0);
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let l = random_logits(300, 7);
        let p = SamplingParams {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.95,
            seed: rand::random(),
        };
        let (mut a, mut b) = (Sampler::new(p), Sampler::new(p));
        let ta: Vec<u32> = (0..50).map(|_| a.sample(&l)).collect();
        let tb: Vec<u32> = (0..50).map(|_| b.sample(&l)).collect();
        assert_eq!(ta, tb);
    }
}
