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

    /// Picks the next token from `logits` (`[vocab]`).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        // Candidates sorted by logit, cut to top-k.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = if p.top_k == 0 {
            logits.len()
        } else {
            p.top_k.min(logits.len())
        };
        let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_logit_desc);
            idx.truncate(k);
        }
        idx.sort_unstable_by(by_logit_desc);
        // Softmax over the candidates at temperature T (max-subtracted for stability).
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        // Nucleus: the smallest prefix whose mass reaches top_p.
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.gen::<f32>() * total;
        for (i, &pr) in probs.iter().enumerate() {
            r -= pr;
            if r <= 0.0 {
                return idx[i];
            }
        }
        idx[probs.len() - 1]
    }
}

/// Index of the largest logit (the first one on ties); NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
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
