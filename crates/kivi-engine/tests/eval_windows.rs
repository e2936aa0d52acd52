//! Batched evaluation windows against the one-stream evaluation of each window on its own: the
//! batch must not change any window's logits, so the pooled perplexity, KL and top-1 agreement
//! equal the ones recombined from separate runs.

use kivi_engine::eval::{eval_ppl, eval_ppl_windows};
use kivi_engine::kv_spec::parse_kv;
use kivi_model::llama::{Model, Naming};
use kivi_model::random::{preset, RandomWeights};
use kivi_model::tensor::DType;
use rand::Rng;

#[test]
fn windows_in_one_batch_equal_each_window_alone() {
    let c = preset("tiny").unwrap();
    let model = Model::load(
        &RandomWeights::new(&c, DType::F32, rand::random()).unwrap(),
        Naming::Gguf,
        c,
    )
    .unwrap();
    let mut rng = rand::thread_rng();
    let windows = 3;
    // Windows of len / 3 tokens; the remainder (2 tokens here) is dropped.
    let tokens: Vec<u32> = (0..3 * 70 + 2)
        .map(|_| rng.gen_range(0..model.config.vocab as u32))
        .collect();
    let win = 70;
    let caches = [
        parse_kv("kivi2:g16:r32").unwrap(),
        parse_kv("kivi4:g16:r0").unwrap(),
    ];
    let chunk = rng.gen_range(1..=9);
    let pooled = eval_ppl_windows(&model, &tokens, &caches, chunk, windows, |_| {}).unwrap();
    let alone: Vec<_> = tokens
        .chunks_exact(win)
        .take(windows)
        .map(|w| eval_ppl(&model, w, &caches, chunk, |_| {}).unwrap())
        .collect();
    for (cfg, p) in pooled.iter().enumerate() {
        let n: usize = alone.iter().map(|a| a[cfg].tokens_scored).sum();
        assert_eq!(p.tokens_scored, n);
        assert_eq!(n, windows * (win - 1));
        let nll: f64 = alone
            .iter()
            .map(|a| a[cfg].ppl.ln() * a[cfg].tokens_scored as f64)
            .sum();
        let kl: f64 = alone
            .iter()
            .map(|a| a[cfg].kl * a[cfg].tokens_scored as f64)
            .sum();
        let top1: f64 = alone
            .iter()
            .map(|a| a[cfg].top1 * a[cfg].tokens_scored as f64)
            .sum();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
        assert!(close(p.ppl.ln(), nll / n as f64), "{p:?} vs {alone:?}");
        assert!(close(p.kl, kl / n as f64), "{p:?}");
        assert!(close(p.top1, top1 / n as f64), "{p:?}");
        if cfg > 0 {
            assert!(p.kl > 0.0, "a quantized cache must differ from f16: {p:?}");
        }
    }
    assert!(eval_ppl_windows(&model, &tokens[..5], &caches, 1, 3, |_| {}).is_err());
}
