//! Passkey retrieval (a "needle in a haystack" test): a random 5–7 digit key is hidden at a chosen
//! depth of long filler text, and the model is asked for it at the end.
//!
//! KIVI's prefill attention is exact, so a one-shot prefill of the whole prompt would never read the
//! quantized cache before the question. Here the haystack is prefilled in chunks (`chunk` tokens per
//! forward pass): every chunk reads all older chunks — the needle included, once it is older than
//! the chunk — from the cache in its stored (quantized) form. The question is then fed as its own
//! forward pass and the answer is decoded greedily token by token, so by the time the model answers,
//! the needle is only visible through the cache (unless it lies within the last R tokens, which
//! KIVI keeps in full precision).

use kivi_core::CacheConfig;
use kivi_model::llama::Model;
use kivi_model::Result;
use rand::Rng;

use crate::sampler::SamplingParams;
use crate::session::{GenerateParams, Session};

/// Task description placed before the haystack.
pub const INTRO: &str = "There is an important piece of information hidden inside a lot of \
irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n\n";

/// The question after the haystack; the model continues it with the key.
pub const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";

/// The sentence that hides `key`.
pub fn needle_text(key: &str) -> String {
    format!(" The pass key is {key}. Remember it. {key} is the pass key. ")
}

/// A random key of 5 to 7 digits with no leading zero.
pub fn random_key(rng: &mut impl Rng) -> String {
    let digits = rng.gen_range(5..=7u32);
    let lo = 10u64.pow(digits - 1);
    rng.gen_range(lo..lo * 10).to_string()
}

/// Whether `text` contains `key` as a whole run of digits (so `714320` does not count as `71432`).
pub fn find_key(text: &str, key: &str) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|run| run == key)
}

/// A built prompt: `context` (intro, haystack with the needle) is prefilled in chunks; `question`
/// follows as one forward pass.
#[derive(Clone, Debug)]
pub struct PasskeyPrompt {
    pub context: Vec<u32>,
    pub question: Vec<u32>,
    /// Index of the needle's first token in `context`.
    pub needle_start: usize,
    pub needle_len: usize,
    pub key: String,
    /// Requested depth in [0, 1] (share of the filler before the needle).
    pub depth: f64,
}

impl PasskeyPrompt {
    /// Total tokens (context + question).
    pub fn len(&self) -> usize {
        self.context.len() + self.question.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Depth actually realized: filler tokens before the needle / all filler tokens.
    pub fn actual_depth(&self, intro_len: usize) -> f64 {
        let filler = self.context.len() - intro_len - self.needle_len;
        if filler == 0 {
            return 0.0;
        }
        (self.needle_start - intro_len) as f64 / filler as f64
    }
}

/// Assembles a prompt of exactly `len` tokens from pre-tokenized pieces: `intro`, then filler
/// tokens with `needle` inserted after `depth` of them, then `question`.
///
/// `sentence_start[i]` (length `filler.len() + 1`, optional) says whether a cut before filler token
/// `i` starts a sentence; the needle is moved to the nearest such cut within 64 tokens, so it does
/// not split a word. Errors if the pieces do not fit in `len` or the filler is too short.
pub fn build_prompt(
    intro: &[u32],
    filler: &[u32],
    sentence_start: Option<&[bool]>,
    needle: &[u32],
    question: &[u32],
    len: usize,
    depth: f64,
) -> std::result::Result<(Vec<u32>, usize), String> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(format!("depth {depth} is outside [0, 1]"));
    }
    let fixed = intro.len() + needle.len() + question.len();
    if len <= fixed {
        return Err(format!(
            "length {len} leaves no room for filler (intro, needle and question take {fixed} tokens)"
        ));
    }
    let n_fill = len - fixed;
    if filler.len() < n_fill {
        return Err(format!(
            "the haystack has {} tokens, {n_fill} are needed for length {len}",
            filler.len()
        ));
    }
    if let Some(s) = sentence_start {
        if s.len() != filler.len() + 1 {
            return Err("sentence_start must have filler.len() + 1 entries".into());
        }
    }
    let target = (depth * n_fill as f64).round() as usize;
    let split = match sentence_start {
        None => target,
        Some(s) => {
            let is_cut = |i: usize| i == 0 || i == n_fill || s[i];
            (0..=64usize)
                .flat_map(|d| [target.checked_sub(d), Some(target + d)])
                .flatten()
                .find(|&i| i <= n_fill && is_cut(i))
                .unwrap_or(target)
        }
    };
    let mut context = Vec::with_capacity(len - question.len());
    context.extend_from_slice(intro);
    context.extend_from_slice(&filler[..split]);
    let needle_start = context.len();
    context.extend_from_slice(needle);
    context.extend_from_slice(&filler[split..n_fill]);
    debug_assert_eq!(context.len() + question.len(), len);
    Ok((context, needle_start))
}

/// Runs one prompt under one cache: chunked prefill of the context, the question as one forward
/// pass, then `new_tokens` greedy tokens. Returns the generated ids.
pub fn answer(
    model: &Model,
    cache: &CacheConfig,
    prompt: &PasskeyPrompt,
    chunk: usize,
    new_tokens: usize,
    eos: &[u32],
) -> Result<Vec<u32>> {
    let mut session = Session::new(model, cache)?;
    session.prefill(&prompt.context, chunk)?;
    let params = GenerateParams {
        max_tokens: new_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        prefill_chunk: prompt.question.len().max(1),
        stop_at_eos: true,
    };
    let (ids, _) = session.generate(&prompt.question, &params, eos, |_| true)?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn pieces() -> (Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>) {
        let intro = vec![1, 2, 3, 4];
        let filler: Vec<u32> = (1000..5000).collect();
        let needle = vec![7, 8, 9];
        let question = vec![5, 6];
        (intro, filler, needle, question)
    }

    #[test]
    fn needle_at_requested_depth_and_length_exact() {
        let (intro, filler, needle, question) = pieces();
        for len in [64, 500, 1000, 4000] {
            for depth in [0.0, 0.25, 0.5, 0.75, 1.0] {
                let (ctx, at) =
                    build_prompt(&intro, &filler, None, &needle, &question, len, depth).unwrap();
                assert_eq!(ctx.len() + question.len(), len);
                assert_eq!(&ctx[..intro.len()], &intro[..]);
                assert_eq!(&ctx[at..at + needle.len()], &needle[..]);
                let n_fill = len - intro.len() - needle.len() - question.len();
                let before = at - intro.len();
                assert!(
                    (before as f64 - depth * n_fill as f64).abs() <= 0.5,
                    "{len} {depth}"
                );
                // The filler is used in order, without gaps or repeats.
                let fill: Vec<u32> = ctx[intro.len()..]
                    .iter()
                    .copied()
                    .filter(|t| *t >= 1000)
                    .collect();
                assert_eq!(fill, filler[..n_fill]);
                let p = PasskeyPrompt {
                    context: ctx,
                    question: question.clone(),
                    needle_start: at,
                    needle_len: needle.len(),
                    key: String::new(),
                    depth,
                };
                assert_eq!(p.len(), len);
                assert!((p.actual_depth(intro.len()) - depth).abs() < 0.01);
            }
        }
    }

    #[test]
    fn needle_snaps_to_sentence_starts() {
        let (intro, filler, needle, question) = pieces();
        let mut starts = vec![false; filler.len() + 1];
        for i in (0..starts.len()).step_by(50) {
            starts[i] = true;
        }
        let (ctx, at) = build_prompt(
            &intro,
            &filler,
            Some(&starts),
            &needle,
            &question,
            1009,
            0.5,
        )
        .unwrap();
        let before = at - intro.len();
        assert_eq!(before % 50, 0);
        assert!(before.abs_diff(500) <= 25);
        assert_eq!(&ctx[at..at + 3], &needle[..]);
    }

    #[test]
    fn rejects_bad_requests() {
        let (intro, filler, needle, question) = pieces();
        assert!(build_prompt(&intro, &filler, None, &needle, &question, 9, 0.5).is_err());
        assert!(build_prompt(&intro, &filler, None, &needle, &question, 100, 1.5).is_err());
        assert!(build_prompt(&intro, &filler, None, &needle, &question, 100, -0.1).is_err());
        assert!(build_prompt(&intro, &filler[..50], None, &needle, &question, 100, 0.5).is_err());
    }

    #[test]
    fn random_keys_are_found_only_whole() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        for _ in 0..200 {
            let key = random_key(&mut rng);
            assert!((5..=7).contains(&key.len()), "{key}");
            assert!(!key.starts_with('0'));
            assert!(find_key(&format!(" {key}. Remember it."), &key));
            assert!(find_key(&key, &key));
            assert!(find_key(&format!("is {key}"), &key));
            assert!(!find_key(&format!(" {key}0"), &key));
            assert!(!find_key(&format!(" 1{key}"), &key));
            assert!(!find_key(&key[..key.len() - 1], &key));
            assert!(!find_key(" the pass key", &key));
            assert!(needle_text(&key).matches(&key).count() == 2);
        }
    }
}
