//! The CUDA backend's forward-pass ops against the CPU backend's, on fresh random inputs, and
//! end-to-end greedy tokens of the one model definition on both backends.
//!
//! Op tests: GPU outputs are poisoned with NaN before each run (an unwritten element fails) and
//! must match the CPU op within a relative error bound per dtype (f32 ops: 1e-5; GEMMs with f16
//! inputs: 2e-3, the rounding of the activations to f16). End to end: both backends load the same
//! f16 random weights; with the CPU's greedy tokens fed to both, the GPU's argmax must equal the
//! CPU's at every step where the CPU's top-2 margin is above the f16 error of the logits. The
//! bf16 backend (`HalfType::Bf16`) the same way, with bounds for bf16's 8-bit significand.
//! Without a CUDA device the tests print `skipped: no CUDA device` and pass.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use half::bf16;
use kivi_core::{new_cache, CacheConfig, CacheShape, KiviConfig, SeqId};
use kivi_cuda::{Activation, CudaBackend, Gpu, GpuCache, HalfType};
use kivi_model::backend::{Backend, Cpu, Rope};
use kivi_model::config::{Arch, Config, RopeStyle};
use kivi_model::llama::{BatchItem, Llama, Logits, Model, Naming};
use kivi_model::random::{preset, RandomWeights};
use kivi_model::runner::SampleSpec;
use kivi_model::tensor::{DType, RawTensor, Storage, TensorSource};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu() -> Option<Arc<Gpu>> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn fresh_rng(name: &str) -> StdRng {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("{name}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn randn(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(-scale..scale)).collect()
}

/// Inputs go through the backend (`Backend::vector`), as its matmul requires.
fn up(b: &CudaBackend, v: &[f32]) -> Activation {
    b.vector(v.to_vec()).unwrap().into()
}

/// A device buffer of `n` NaNs.
fn poisoned(b: &CudaBackend, n: usize) -> Activation {
    up(b, &vec![f32::NAN; n])
}

fn down(b: &CudaBackend, x: &CudaSlice<f32>) -> Vec<f32> {
    b.to_host(x).unwrap()
}

/// `v` rounded to `half`, as an F16 or BF16 tensor `[rows][cols]`.
fn half_tensor(half: HalfType, name: &str, rows: usize, cols: usize, v: &[f32]) -> RawTensor {
    let bytes: Vec<u8> = v
        .iter()
        .flat_map(|&x| half.from_f32(x).to_le_bytes())
        .collect();
    RawTensor {
        name: name.into(),
        dtype: match half {
            HalfType::F16 => DType::F16,
            HalfType::Bf16 => DType::BF16,
        },
        shape: vec![rows, cols],
        data: Storage::Owned(Arc::new(bytes)),
    }
}

fn f16_tensor(name: &str, rows: usize, cols: usize, v: &[f32]) -> RawTensor {
    half_tensor(HalfType::F16, name, rows, cols, v)
}

fn bf16_tensor(name: &str, rows: usize, cols: usize, v: &[f32]) -> RawTensor {
    half_tensor(HalfType::Bf16, name, rows, cols, v)
}

fn check(name: &str, got: &[f32], want: &[f32], bound: f64) {
    let e = rel_err(got, want);
    eprintln!("{name}: relative error {e:.2e} (bound {bound:.0e})");
    assert!(e <= bound, "{name}: relative error {e:.3e} > {bound:.0e}");
}

#[test]
fn elementwise_and_row_ops_match_cpu() {
    let Some(g) = gpu() else { return };
    let b = CudaBackend::new(g).unwrap();
    let mut r = fresh_rng("elementwise_and_row_ops_match_cpu");
    // 577: rows that are not whole float4s (the norms' scalar path).
    for &(rows, width) in &[(1usize, 576usize), (7, 4096), (33, 1536), (3, 577)] {
        let x = randn(&mut r, rows * width, 3.0);
        let y = randn(&mut r, rows * width, 3.0);
        let w = randn(&mut r, width, 1.5);

        // rmsnorm
        let mut want = vec![0f32; rows * width];
        Cpu.rmsnorm(&mut want, &x, &w, 1e-5).unwrap();
        let mut got = poisoned(&b, rows * width);
        b.rmsnorm(&mut got, &up(&b, &x), &up(&b, &w), 1e-5).unwrap();
        check("rmsnorm", &down(&b, &got), &want, 1e-5);

        // add_rmsnorm: x += y (stored), then the norm of the sum
        let mut want_x = x.clone();
        let mut want = vec![0f32; rows * width];
        Cpu.add_rmsnorm(&mut want_x, &y, &mut want, &w, 1e-5)
            .unwrap();
        let (mut got_x, mut got) = (up(&b, &x), poisoned(&b, rows * width));
        b.add_rmsnorm(&mut got_x, &up(&b, &y), &mut got, &up(&b, &w), 1e-5)
            .unwrap();
        check("add_rmsnorm sum", &down(&b, &got_x), &want_x, 0.0);
        check("add_rmsnorm", &down(&b, &got), &want, 1e-5);

        // swiglu, add, add_bias
        let mut want = x.clone();
        Cpu.swiglu(&mut want, &y).unwrap();
        let mut got = up(&b, &x);
        b.swiglu(&mut got, &up(&b, &y)).unwrap();
        check("swiglu", &down(&b, &got), &want, 1e-5);

        let mut want = x.clone();
        Cpu.add(&mut want, &y).unwrap();
        let mut got = up(&b, &x);
        b.add(&mut got, &up(&b, &y)).unwrap();
        check("add", &down(&b, &got), &want, 1e-6);

        let mut want = x.clone();
        Cpu.add_bias(&mut want, &w).unwrap();
        let mut got = up(&b, &x);
        b.add_bias(&mut got, &up(&b, &w)).unwrap();
        check("add_bias", &down(&b, &got), &want, 1e-6);

        // gather_rows
        let picks = [0..rows.min(2), rows - 1..rows];
        let want = Cpu.gather_rows(&x, width, &picks).unwrap();
        let got = b.gather_rows(&up(&b, &x), width, &picks).unwrap();
        check("gather_rows", &down(&b, &got), &want, 0.0);

        // argmax: distinct values, exact
        let got = b.argmax(&up(&b, &x), rows, width).unwrap();
        for (i, &t) in got.iter().enumerate() {
            let row = &x[i * width..(i + 1) * width];
            let want = (0..width)
                .max_by(|&a, &c| row[a].total_cmp(&row[c]).then(c.cmp(&a)))
                .unwrap();
            assert_eq!(t as usize, want, "argmax row {i}");
        }
    }
}

#[test]
fn matmul_after_rmsnorm_and_swiglu_matches_cpu() {
    // rmsnorm and swiglu leave the f16 copy the next GEMMs read; the copy must follow every
    // later write of that activation and never stand in for another buffer.
    let Some(g) = gpu() else { return };
    let b = CudaBackend::new(g).unwrap();
    let mut r = fresh_rng("matmul_after_rmsnorm_and_swiglu_matches_cpu");
    let (rows, h, f) = (9usize, 576usize, 1536usize);
    let wv = randn(&mut r, f * h, (3.0 / h as f32).sqrt());
    let (cpu_w, gpu_w) = (
        Cpu.matrix(f16_tensor("w", f, h, &wv)).unwrap(),
        b.matrix(f16_tensor("w", f, h, &wv)).unwrap(),
    );
    let wd = randn(&mut r, h * f, (3.0 / f as f32).sqrt());
    let (cpu_wd, gpu_wd) = (
        Cpu.matrix(f16_tensor("wd", h, f, &wd)).unwrap(),
        b.matrix(f16_tensor("wd", h, f, &wd)).unwrap(),
    );
    let x = randn(&mut r, rows * h, 3.0);
    let norm = randn(&mut r, h, 1.5);
    let matmul_both = |name: &str, gx: &Activation, cx: &Vec<f32>, wide: bool| {
        let (cw, gw, n_out) = if wide {
            (&cpu_w, &gpu_w, f)
        } else {
            (&cpu_wd, &gpu_wd, h)
        };
        let mut want = vec![0f32; rows * n_out];
        Cpu.matmul(cw, cx, rows, &mut want).unwrap();
        let mut got = poisoned(&b, rows * n_out);
        b.matmul(gw, gx, rows, &mut got).unwrap();
        check(name, &down(&b, &got), &want, 2e-3);
        got
    };
    // rmsnorm -> two GEMMs reading its copy.
    let mut cxb = vec![0f32; rows * h];
    Cpu.rmsnorm(&mut cxb, &x, &norm, 1e-5).unwrap();
    let mut gxb = poisoned(&b, rows * h);
    b.rmsnorm(&mut gxb, &up(&b, &x), &up(&b, &norm), 1e-5)
        .unwrap();
    let gate = matmul_both("matmul after rmsnorm", &gxb, &cxb, true);
    matmul_both("second matmul after rmsnorm", &gxb, &cxb, true);
    // Another buffer of the same length is not the normed one.
    let other = randn(&mut r, rows * h, 2.0);
    matmul_both("matmul of another buffer", &up(&b, &other), &other, true);
    // The normed activation changed after its copy was made.
    b.rmsnorm(&mut gxb, &up(&b, &x), &up(&b, &norm), 1e-5)
        .unwrap();
    let y = randn(&mut r, rows * h, 1.0);
    b.add(&mut gxb, &up(&b, &y)).unwrap();
    Cpu.add(&mut cxb, &y).unwrap();
    matmul_both("matmul after rmsnorm then add", &gxb, &cxb, true);
    // swiglu -> the down GEMM reads its copy.
    let mut cgate = down(&b, &gate);
    let upv = randn(&mut r, rows * f, 1.0);
    Cpu.swiglu(&mut cgate, &upv).unwrap();
    let mut ggate = gate;
    b.swiglu(&mut ggate, &up(&b, &upv)).unwrap();
    matmul_both("matmul after swiglu", &ggate, &cgate, false);
}

#[test]
fn device_sampling_follows_the_reference_distribution() {
    // Peaked, flat and LM-like rows; temperature only, top-p, top-k + top-p, greedy. Every
    // sampled token must be inside the cut and the frequencies within 5 sigma of the f64
    // reference.
    let Some(g) = gpu() else { return };
    let b = CudaBackend::new(g).unwrap();
    let mut r = fresh_rng("device_sampling_follows_the_reference_distribution");
    let vocab = 1000;
    let mut rows: Vec<Vec<f32>> = vec![
        randn(&mut r, vocab, 6.0),
        randn(&mut r, vocab, 0.5),
        randn(&mut r, vocab, 4.0),
    ];
    for x in rows[2].iter_mut() {
        if r.gen_bool(0.01) {
            *x += 10.0;
        }
    }
    rows[1][17] = f32::NAN; // never sampled
    let logits = up(&b, &rows.concat());
    let cases = [
        (0usize, 0.8f32, 0usize, 0.9f32),
        (0, 0.8, 20, 0.8),
        (1, 0.8, 0, 0.7),
        (1, 0.8, 300, 0.95),
        (2, 1.0, 0, 1.0),
        (2, 0.7, 40, 0.9),
    ];
    let n = 20_000;
    for &(row, t, top_k, top_p) in &cases {
        let specs: Vec<(usize, SampleSpec)> = (0..n)
            .map(|_| {
                let spec = SampleSpec {
                    temperature: t,
                    top_k,
                    top_p,
                    u: r.gen::<f32>(),
                };
                (row, spec)
            })
            .collect();
        let got = b.sample_rows(&logits, vocab, &specs).unwrap();
        let l: Vec<f32> = rows[row]
            .iter()
            .map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x })
            .collect();
        let (want, cum) = kivi_engine::sampler::reference_probs(&l, t, top_k, top_p);
        let mut counts = vec![0usize; vocab];
        for &tok in &got {
            counts[tok as usize] += 1;
        }
        for i in 0..vocab {
            let borderline = (cum[i] - top_p as f64).abs() < 1e-4;
            let f = counts[i] as f64 / n as f64;
            if want[i] == 0.0 && !borderline {
                assert_eq!(
                    counts[i], 0,
                    "row {row} T {t} k {top_k} p {top_p}: token {i} outside the cut"
                );
            }
            let sigma = (want[i] * (1.0 - want[i]) / n as f64).sqrt();
            assert!(
                borderline || (f - want[i]).abs() <= 5.0 * sigma + 2e-3,
                "row {row} T {t} k {top_k} p {top_p} token {i}: {f} vs {}",
                want[i]
            );
        }
        eprintln!("sampling row {row} T {t} top-k {top_k} top-p {top_p}: {n} draws match");
    }
    // Greedy through the same kernel: the first index of the maximum.
    let specs: Vec<(usize, SampleSpec)> = (0..3)
        .map(|row| {
            let spec = SampleSpec {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                u: 0.5,
            };
            (row, spec)
        })
        .collect();
    let got = b.sample_rows(&logits, vocab, &specs).unwrap();
    for (row, &tok) in got.iter().enumerate() {
        assert_eq!(
            tok,
            kivi_engine::sampler::argmax(&rows[row]),
            "greedy row {row}"
        );
    }
}

#[test]
fn embed_and_matmul_match_cpu() {
    let Some(g) = gpu() else { return };
    let b = CudaBackend::new(g.clone()).unwrap();
    // The small-batch kernel (the default): rows 1 and 2 (the row counts it specializes)
    // through gemv_small, which reads the 16-bit input copy as cuBLAS does; 3-9 and 17 rows,
    // and 580 columns (not whole 16-byte chunks), through cuBLAS. `b` runs cuBLAS throughout.
    let mut b = b;
    b.set_small_gemv(false);
    let gemv = CudaBackend::new(g).unwrap();
    let mut r = fresh_rng("embed_and_matmul_match_cpu");
    let mut shapes = vec![
        (576usize, 576usize, 1usize),
        (4096, 4096, 17),
        (1000, 580, 1),
    ];
    shapes.extend((1..=9).map(|rows| (1536, 576, rows)));
    for &(out_dim, in_dim, rows) in &shapes {
        let wv = randn(&mut r, out_dim * in_dim, (3.0 / in_dim as f32).sqrt());
        let cpu_w = Cpu.matrix(f16_tensor("w", out_dim, in_dim, &wv)).unwrap();
        let gpu_w = b.matrix(f16_tensor("w", out_dim, in_dim, &wv)).unwrap();
        let x = randn(&mut r, rows * in_dim, 2.0);
        let mut want = vec![0f32; rows * out_dim];
        Cpu.matmul(&cpu_w, &x, rows, &mut want).unwrap();
        let mut got = poisoned(&b, rows * out_dim);
        b.matmul(&gpu_w, &up(&b, &x), rows, &mut got).unwrap();
        check(
            &format!("matmul f16 {out_dim}x{in_dim}, {rows} rows"),
            &down(&b, &got),
            &want,
            2e-3,
        );
        let gemv_w = gemv.matrix(f16_tensor("w", out_dim, in_dim, &wv)).unwrap();
        let mut got = poisoned(&gemv, rows * out_dim);
        gemv.matmul(&gemv_w, &up(&gemv, &x), rows, &mut got)
            .unwrap();
        let bound = 2e-3;
        check(
            &format!("matmul f16 {out_dim}x{in_dim}, {rows} rows, small-batch kernel"),
            &down(&gemv, &got),
            &want,
            bound,
        );

        // embed: rows of the same f16 table; exact (both widen f16 to f32)
        check_embed("embed", &b, &cpu_w, &gpu_w, rows, &mut r);
    }
}

/// Several matrices of one input (`Backend::matmuls`: q/k/v, gate/up): one `gemv_small` launch
/// at one or two rows, one matmul each otherwise; every output against the CPU's, outputs
/// poisoned first, 1-3 matrices of unequal heights.
#[test]
fn fused_matmuls_match_cpu() {
    let Some(g) = gpu() else { return };
    let b = CudaBackend::new(g).unwrap();
    let mut r = fresh_rng("fused_matmuls_match_cpu");
    for (heights, cols) in [
        (vec![576usize, 192, 192], 576usize),
        (vec![1536, 1536], 576),
        (vec![4096, 1024, 1024], 4096),
        (vec![1000], 576),
    ] {
        for rows in 1..=3 {
            let x = randn(&mut r, rows * cols, 2.0);
            let ws: Vec<Vec<f32>> = heights
                .iter()
                .map(|&h| randn(&mut r, h * cols, (3.0 / cols as f32).sqrt()))
                .collect();
            let gpu_w: Vec<_> = ws
                .iter()
                .zip(&heights)
                .map(|(w, &h)| b.matrix(f16_tensor("w", h, cols, w)).unwrap())
                .collect();
            let mut outs: Vec<Activation> =
                heights.iter().map(|&h| poisoned(&b, rows * h)).collect();
            let gx = up(&b, &x);
            {
                let mut pairs: Vec<(&_, &mut Activation)> =
                    gpu_w.iter().zip(outs.iter_mut()).collect();
                b.matmuls(&gx, rows, &mut pairs).unwrap();
            }
            for ((w, &h), out) in ws.iter().zip(&heights).zip(&outs) {
                let cpu_w = Cpu.matrix(f16_tensor("w", h, cols, w)).unwrap();
                let mut want = vec![0f32; rows * h];
                Cpu.matmul(&cpu_w, &x, rows, &mut want).unwrap();
                check(
                    &format!("matmuls {heights:?}x{cols}, {rows} rows, matrix of {h}"),
                    &down(&b, out),
                    &want,
                    2e-3,
                );
            }
        }
    }
}

/// `rows` random rows of a `[n][cols]` table through both backends' embed: exact (both widen
/// the 16-bit values to f32).
fn check_embed(
    name: &str,
    b: &CudaBackend,
    cpu_w: &<Cpu as Backend>::Weight,
    gpu_w: &kivi_cuda::model::GpuMatrix,
    rows: usize,
    r: &mut StdRng,
) {
    let (n, cols) = (gpu_w.rows, gpu_w.cols);
    let tokens: Vec<u32> = (0..rows).map(|_| r.gen_range(0..n as u32)).collect();
    let mut want = vec![0f32; rows * cols];
    Cpu.embed(cpu_w, &tokens, &mut want).unwrap();
    let mut got = poisoned(b, rows * cols);
    b.embed(gpu_w, &tokens, &mut got).unwrap();
    check(name, &down(b, &got), &want, 0.0);
}

#[test]
fn bf16_backend_matches_cpu_and_holds_what_f16_overflows() {
    let Some(g) = gpu() else { return };
    let b = CudaBackend::with_half(g.clone(), HalfType::Bf16).unwrap();
    let f16b = CudaBackend::new(g).unwrap();
    let mut r = fresh_rng("bf16_backend_matches_cpu_and_holds_what_f16_overflows");
    let (out_dim, in_dim, rows) = (1536usize, 576usize, 7usize);
    let wv = randn(&mut r, out_dim * in_dim, (3.0 / in_dim as f32).sqrt());
    // A bf16 checkpoint's bits go up as they are; an f16 one is converted (rounded to bf16).
    let rounded: Vec<f32> = wv.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    let cpu_w = Cpu.matrix(bf16_tensor("w", out_dim, in_dim, &wv)).unwrap();
    let from_bf16 = b.matrix(bf16_tensor("w", out_dim, in_dim, &wv)).unwrap();
    let from_f16 = b
        .matrix(f16_tensor("w", out_dim, in_dim, &rounded))
        .unwrap();
    // GEMM inputs rounded to bf16 (2^-9 relative): the dot products' error stays near 2^-9.
    let bound = 8e-3;
    for scale in [2.0f32, 3.0e5] {
        // 3e5: beyond f16's 65504 (activations of that size occur in some Qwen2 layers).
        let x: Vec<f32> = randn(&mut r, rows * in_dim, scale);
        let mut want = vec![0f32; rows * out_dim];
        Cpu.matmul(&cpu_w, &x, rows, &mut want).unwrap();
        for (what, w) in [("bf16 weights", &from_bf16), ("f16 weights", &from_f16)] {
            let mut got = poisoned(&b, rows * out_dim);
            b.matmul(w, &up(&b, &x), rows, &mut got).unwrap();
            check(
                &format!("bf16 matmul ({what}), inputs x {scale:e}"),
                &down(&b, &got),
                &want,
                bound,
            );
        }
        // After rmsnorm, the copy it leaves for the next GEMM is bf16 too.
        let norm = randn(&mut r, in_dim, 1.5);
        let mut cxb = vec![0f32; rows * in_dim];
        Cpu.rmsnorm(&mut cxb, &x, &norm, 1e-5).unwrap();
        let mut gxb = poisoned(&b, rows * in_dim);
        b.rmsnorm(&mut gxb, &up(&b, &x), &up(&b, &norm), 1e-5)
            .unwrap();
        Cpu.matmul(&cpu_w, &cxb, rows, &mut want).unwrap();
        let mut got = poisoned(&b, rows * out_dim);
        b.matmul(&from_bf16, &gxb, rows, &mut got).unwrap();
        check("bf16 matmul after rmsnorm", &down(&b, &got), &want, bound);
    }
    // The f16 backend cannot hold 3e5: cuBLAS reads its GEMM input as f16, which saturates.
    let many = 16;
    let x = vec![3.0e5f32; many * in_dim];
    let f16_w = f16b.matrix(f16_tensor("w", out_dim, in_dim, &wv)).unwrap();
    let mut got = poisoned(&f16b, many * out_dim);
    f16b.matmul(&f16_w, &up(&f16b, &x), many, &mut got).unwrap();
    assert!(
        down(&f16b, &got).iter().any(|v| !v.is_finite()),
        "f16 GEMM inputs of 3e5 should overflow"
    );
    check_embed("bf16 embed", &b, &cpu_w, &from_bf16, rows, &mut r);
}

#[test]
fn rope_matches_cpu_both_styles() {
    let Some(g) = gpu() else { return };
    let b = CudaBackend::new(g.clone()).unwrap();
    let mut r = fresh_rng("rope_matches_cpu_both_styles");
    // rope_heads (head_dim a multiple of 8) with a last chunk of heads short of ROPE_HEADS or
    // whole, few rows and many; and rope_per_head (head_dim 20).
    let eight = kivi_cuda::model::ROPE_HEADS;
    let cases = [
        (64usize, eight + 1, 3usize, 4usize),
        (128, eight, 1000, 46),
        (128, 2 * eight + 3, 2, 1),
        (20, 3, 5, 6),
    ];
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        for &(d, heads, n_a, n_b) in &cases {
            // (The cache only gives the positions; its head_dim is independent of RoPE's.)
            let shape = CacheShape {
                n_layer: 1,
                n_kv_head: 1,
                head_dim: 64,
            };
            let theta = 10_000f32;
            let rope = Rope {
                style,
                head_dim: d,
                inv_freq: (0..d / 2)
                    .map(|i| theta.powf(-((2 * i) as f32) / d as f32))
                    .collect(),
            };
            // Two sequences at different depths: positions come from each one's length.
            let old_b = 37usize;
            let mut cpu_cache = new_cache(&CacheConfig::F16, shape).unwrap();
            let (sa, sb) = (cpu_cache.add_sequence(), cpu_cache.add_sequence());
            let zeros = vec![0f32; old_b * shape.head_dim];
            cpu_cache.append(0, sb, &zeros, &zeros).unwrap();
            let mut gcache = GpuCache::new(g.clone(), CacheConfig::F16, shape, 2, 2048).unwrap();
            let (ga, gb) = (
                gcache.add_sequence().unwrap(),
                gcache.add_sequence().unwrap(),
            );
            let warm = gcache.batch(&[(gb, old_b)]).unwrap();
            gcache.advance(&warm);
            let n = n_a + n_b;
            let x = randn(&mut r, n * heads * d, 2.0);
            let cpu_step = Cpu
                .begin_step(&mut *cpu_cache, &[(sa, n_a), (sb, n_b)])
                .unwrap();
            let mut want = x.clone();
            Cpu.rope(&mut want, heads, &rope, &cpu_step).unwrap();
            let gpu_step = b
                .begin_step(
                    &mut gcache,
                    &[(SeqId(ga as u64), n_a), (SeqId(gb as u64), n_b)],
                )
                .unwrap();
            let mut got = up(&b, &x);
            b.rope(&mut got, heads, &rope, &gpu_step).unwrap();
            check(
                &format!("rope {style:?} d{d}, {n} rows"),
                &down(&b, &got),
                &want,
                1e-5,
            );
        }
    }
}

/// A small model of SmolLM2's head layout (head_dim 64, GQA 3:1) with `n_layer` layers.
fn small_config(qwen2: bool, n_layer: usize) -> Config {
    let mut c = preset("smollm2-135m").unwrap();
    c.n_layer = n_layer;
    c.vocab = 4096;
    if qwen2 {
        c.arch = Arch::Qwen2;
        c.rope_style = RopeStyle::Neox;
        c.qkv_bias = true;
    }
    c
}

/// Teacher-forced greedy comparison over `steps` tokens; returns the steps compared.
fn compare_greedy(
    cpu: &Model,
    gpu_model: &Llama<CudaBackend>,
    cache_cfg: CacheConfig,
    prompt: &[u32],
    steps: usize,
    margin_frac: f32,
) -> usize {
    let c = &cpu.config;
    let shape = CacheShape {
        n_layer: c.n_layer,
        n_kv_head: c.n_kv_head,
        head_dim: c.head_dim,
    };
    // The GPU's keys and values come out of f16 GEMMs, the CPU's out of its own: an element at a
    // 2-bit rounding boundary can take the other code on each side, a whole quantization step
    // (a third of its group's range), which moved random-weights logits by up to 5.9e-2 (H200,
    // session 12). A broken kernel moves them by O(1).
    let two_bit = matches!(&cache_cfg, CacheConfig::Kivi(k) if k.k_bits == 2 || k.v_bits == 2);
    let logits_bound = if two_bit { 0.15 } else { 0.05 };
    let mut cpu_cache = new_cache(&cache_cfg, shape).unwrap();
    let cs = cpu_cache.add_sequence();
    let gpu = gpu_model.backend.gpu().clone();
    let mut gcache = GpuCache::new(gpu, cache_cfg, shape, 1, prompt.len() + steps + 1).unwrap();
    let gs = SeqId(gcache.add_sequence().unwrap() as u64);
    let mut input = prompt.to_vec();
    let mut compared = 0;
    let mut worst_logit_err = 0f64;
    for step in 0..steps {
        let want = cpu
            .forward(&input, &mut *cpu_cache, cs, Logits::Last)
            .unwrap();
        let item = BatchItem {
            seq: gs,
            tokens: &input,
            logits: Logits::Last,
        };
        let (dev_logits, rows) = gpu_model
            .forward_rows(&[item], &mut gcache)
            .unwrap()
            .unwrap();
        assert_eq!(rows, vec![1]);
        let got = gpu_model.backend.to_host(&dev_logits).unwrap();
        let got = &got[..c.vocab];
        let e = rel_err(got, &want);
        worst_logit_err = worst_logit_err.max(e);
        let mut sorted = want.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let margin = sorted[0] - sorted[1];
        let scale = sorted[0].abs().max(1.0);
        let cpu_tok = kivi_engine_argmax(&want);
        let gpu_tok = gpu_model.backend.argmax(&dev_logits, 1, c.vocab).unwrap()[0];
        // The f16 rounding of GEMM inputs moves logits by ~1e-3 relative (bf16: ~1e-2); a
        // margin above `margin_frac` of the top logit cannot flip.
        if margin > margin_frac * scale {
            assert_eq!(
                gpu_tok, cpu_tok,
                "{cache_cfg:?} step {step}: GPU token {gpu_tok} != CPU {cpu_tok} (margin {margin})"
            );
            compared += 1;
        }
        assert!(
            e < logits_bound,
            "{cache_cfg:?} step {step}: logits relative error {e:.3e} (bound {logits_bound})"
        );
        input = vec![cpu_tok];
    }
    eprintln!(
        "{cache_cfg:?}: {compared}/{steps} steps compared, worst logits relative error {worst_logit_err:.2e}"
    );
    compared
}

fn kivi_engine_argmax(l: &[f32]) -> u32 {
    (0..l.len())
        .max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a)))
        .unwrap() as u32
}

#[test]
fn greedy_tokens_equal_cpu_on_random_weights() {
    let Some(g) = gpu() else { return };
    let mut r = fresh_rng("greedy_tokens_equal_cpu_on_random_weights");
    for qwen2 in [false, true] {
        let config = small_config(qwen2, 4);
        let seed = r.gen();
        let src = RandomWeights::new(&config, DType::F16, seed).unwrap();
        let cpu = Model::load(&src, Naming::Gguf, config.clone()).unwrap();
        let gpu_model = Llama::load_on(
            CudaBackend::new(g.clone()).unwrap(),
            &src,
            Naming::Gguf,
            config.clone(),
        )
        .unwrap();
        let prompt: Vec<u32> = (0..150)
            .map(|_| r.gen_range(0..config.vocab as u32))
            .collect();
        for cache in [
            CacheConfig::F16,
            CacheConfig::Kivi(KiviConfig {
                k_bits: 4,
                v_bits: 4,
                ..KiviConfig::default()
            }),
            CacheConfig::Kivi(KiviConfig::default()),
            // The quality doc's best per bit: 4-bit keys, 2-bit values, G = 64, 4 sinks.
            CacheConfig::Kivi(KiviConfig {
                k_bits: 4,
                v_bits: 2,
                group_size: 64,
                sink_tokens: 4,
                ..KiviConfig::default()
            }),
        ] {
            let steps = 40;
            let compared = compare_greedy(&cpu, &gpu_model, cache, &prompt, steps, 0.02);
            assert!(
                compared >= steps / 4,
                "qwen2={qwen2} {cache:?}: only {compared}/{steps} steps had a clear margin"
            );
        }
    }
}

/// The bf16 backend end to end: both backends load the same bf16 weights (random f16 weights
/// rounded to bf16, as a bf16 checkpoint would hold them), the CPU with f32 activations.
#[test]
fn greedy_tokens_equal_cpu_on_random_bf16_weights() {
    let Some(g) = gpu() else { return };
    let mut r = fresh_rng("greedy_tokens_equal_cpu_on_random_bf16_weights");
    let config = small_config(true, 4);
    let src = RandomWeights::new(&config, DType::F16, r.gen()).unwrap();
    let src = Rounded {
        src: &src,
        half: HalfType::Bf16,
    };
    let cpu = Model::load(&src, Naming::Gguf, config.clone()).unwrap();
    let backend = CudaBackend::with_half(g, HalfType::Bf16).unwrap();
    let gpu_model = Llama::load_on(backend, &src, Naming::Gguf, config.clone()).unwrap();
    let prompt: Vec<u32> = (0..150)
        .map(|_| r.gen_range(0..config.vocab as u32))
        .collect();
    // KIVI-4, not KIVI-2: the attention kernels are the f16 run's; what is new here is the
    // GEMMs, and 2-bit codes would turn bf16's larger K/V differences into flipped codes.
    let kivi4 = KiviConfig {
        k_bits: 4,
        v_bits: 4,
        ..KiviConfig::default()
    };
    for cache in [CacheConfig::F16, CacheConfig::Kivi(kivi4)] {
        let steps = 60;
        let compared = compare_greedy(&cpu, &gpu_model, cache, &prompt, steps, 0.05);
        assert!(
            compared >= steps / 6,
            "bf16 {cache:?}: only {compared}/{steps} steps had a clear margin"
        );
    }
}

/// A tensor source whose matrices are another's, dequantized and rounded to `half` on the host
/// (stored as F16 or BF16 tensors): the CPU reference then computes with exactly the weights
/// the GPU holds (f32 activations).
struct Rounded<'a> {
    src: &'a dyn TensorSource,
    half: HalfType,
}

impl TensorSource for Rounded<'_> {
    fn tensor(&self, name: &str) -> kivi_model::Result<RawTensor> {
        let t = self.src.tensor(name)?;
        if t.shape.len() != 2 {
            return Ok(t);
        }
        let v = kivi_model::matrix::dequantize(&t)?;
        let (rows, cols) = (t.shape[0], t.shape[1]);
        Ok(half_tensor(self.half, name, rows, cols, &v))
    }
    fn contains(&self, name: &str) -> bool {
        self.src.contains(name)
    }
}

/// SmolLM2 (Q4_1 GGUF at `$KIVI_SMOLLM2_GGUF`), when present: the GPU against the CPU backend
/// running the same weights as f16.
#[test]
fn greedy_tokens_equal_cpu_on_smollm2() {
    let Some(g) = gpu() else { return };
    let path = std::env::var_os("KIVI_SMOLLM2_GGUF").map(std::path::PathBuf::from);
    let Some(path) = path.filter(|p| p.exists()) else {
        eprintln!("skipped: KIVI_SMOLLM2_GGUF not set or missing");
        return;
    };
    let gguf = kivi_model::gguf::Gguf::open(&path).unwrap();
    let config = Config::from_gguf(&gguf).unwrap();
    let tokenizer = kivi_model::tokenizer::Tokenizer::from_gguf(&gguf).unwrap();
    let as_f16 = Rounded {
        src: &gguf,
        half: HalfType::F16,
    };
    let cpu = Model::load(&as_f16, Naming::Gguf, config.clone()).unwrap();
    let gpu_model =
        Llama::load_on(CudaBackend::new(g).unwrap(), &gguf, Naming::Gguf, config).unwrap();
    let prompt = tokenizer
        .encode(
            "The capital of France is Paris. The capital of Germany is",
            true,
        )
        .unwrap();
    for cache in [CacheConfig::F16, CacheConfig::Kivi(KiviConfig::default())] {
        let compared = compare_greedy(&cpu, &gpu_model, cache, &prompt, 32, 0.02);
        assert!(compared >= 8, "{cache:?}: only {compared} steps compared");
    }
}

/// CUDA graphs (the default) against the same model launching every op eagerly: a batch that
/// changes size (sequences finish, a prefill joins mid-run) must give the same logits at every
/// step, on graphs that were really replayed, including the replay of a batch size recorded
/// before a prefill moved the step's tables (ops compared, then launched one by one). Bit for
/// bit: every kernel sums in a fixed order (attention added its warps' value partials with
/// shared-memory atomics until session 9: two eager runs then differed by up to 2.2e-4 in the
/// logits, once f16 roundings had turned a last-bit difference into an f16 ulp), and a graph
/// runs exactly the kernels with exactly the arguments of the eager launches. A KIVI cache, so
/// that quantization (appends flushing key groups) runs between replays.
#[test]
fn graph_replay_gives_the_logits_of_eager_launches() {
    let Some(g) = gpu() else { return };
    let mut r = fresh_rng("graph_replay_gives_the_logits_of_eager_launches");
    let config = small_config(true, 3);
    let src = RandomWeights::new(&config, DType::F16, r.gen()).unwrap();
    let load = || {
        Llama::load_on(
            CudaBackend::new(g.clone()).unwrap(),
            &src,
            Naming::Gguf,
            config.clone(),
        )
        .unwrap()
    };
    let graphs = load();
    let mut eager = load();
    eager.backend.set_graphs(false);
    let shape = CacheShape {
        n_layer: config.n_layer,
        n_kv_head: config.n_kv_head,
        head_dim: config.head_dim,
    };
    let cache_cfg = CacheConfig::Kivi(KiviConfig {
        residual_len: 32,
        ..KiviConfig::default()
    });
    let mut caches: Vec<GpuCache> = (0..2)
        .map(|_| GpuCache::new(g.clone(), cache_cfg, shape, 4, 256).unwrap())
        .collect();
    let mut tokens = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| r.gen_range(0..config.vocab as u32))
            .collect()
    };
    // (slot, tokens to feed next) per live sequence; slots are the same in both caches.
    let mut live: Vec<(u64, Vec<u32>)> = Vec::new();
    let add = |caches: &mut Vec<GpuCache>, live: &mut Vec<(u64, Vec<u32>)>, prompt| {
        let slots: Vec<usize> = caches
            .iter_mut()
            .map(|c| c.add_sequence().unwrap())
            .collect();
        assert_eq!(slots[0], slots[1]);
        live.push((slots[0] as u64, prompt));
    };
    for n in [5, 17, 40] {
        add(&mut caches, &mut live, tokens(n));
    }
    let mut steps_checked = 0;
    // Phases: decode steps of 3 rows, one sequence leaves, 2 rows, a prefill joins, 3 rows.
    for step in 0..26 {
        if step == 10 {
            let (slot, _) = live.remove(1);
            caches
                .iter_mut()
                .for_each(|c| c.remove_sequence(slot as usize).unwrap());
        }
        if step == 17 {
            add(&mut caches, &mut live, tokens(70));
        }
        let items: Vec<BatchItem<'_>> = live
            .iter()
            .map(|(slot, toks)| BatchItem {
                seq: SeqId(*slot),
                tokens: toks,
                logits: Logits::Last,
            })
            .collect();
        let mut got = Vec::new();
        for (model, cache) in [&graphs, &eager].into_iter().zip(caches.iter_mut()) {
            let (logits, rows) = model.forward_rows(&items, cache).unwrap().unwrap();
            assert_eq!(rows, vec![1; items.len()]);
            got.push(model.backend.to_host(&logits).unwrap());
        }
        for (row, (g_row, e_row)) in got[0]
            .chunks_exact(config.vocab)
            .zip(got[1].chunks_exact(config.vocab))
            .enumerate()
        {
            let differing = g_row
                .iter()
                .zip(e_row)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differing,
                0,
                "step {step} row {row} ({} rows): {differing} logits differ between graph replay \
                 and eager (relative error {:.3e})",
                items.len(),
                rel_err(g_row, e_row)
            );
        }
        steps_checked += 1;
        let next: Vec<Vec<u32>> = got[1]
            .chunks_exact(config.vocab)
            .map(|row| vec![kivi_engine_argmax(row)])
            .collect();
        for ((_, toks), t) in live.iter_mut().zip(next) {
            *toks = t;
        }
    }
    let stats = graphs.backend.graph_stats();
    eprintln!("graphs: {stats}; {steps_checked} steps bit-identical to eager launches");
    assert!(stats.captured > 0 && stats.replayed > 0, "{stats}");
    assert_eq!(stats.capture_errors, 0, "{stats}");
    assert_eq!(
        eager.backend.graph_stats(),
        kivi_cuda::GraphStats::default()
    );
}
