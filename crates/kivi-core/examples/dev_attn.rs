//! Scratch harness: CPU time of one decode attention per cache kind (thread CPU time, robust to a
//! loaded machine; min over REPS batches of ITERS steps). `cargo run --release -p kivi-core --example dev_attn -- <n_head> <n_kv> <hd> <T>`
use std::time::Instant;

use kivi_core::{new_cache, CacheConfig, CacheShape, Isa, KiviConfig};

fn cpu_secs() -> f64 {
    // utime + stime of the whole process, in clock ticks (100 Hz).
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// `DEV_KERNELS=1`: the key and value kernels alone on one 256-token block of one KV head
/// (in L1/L2: pure compute), min ns per call over many calls; `<m> <head_dim>` args.
fn kernels(m: usize, hd: usize) {
    use kivi_core::attn::{k_scores_multi, v_accumulate_multi, ChanSeg, SegData, TokSeg};
    let (bt, g) = (256usize, 32usize);
    let isa = Isa::detect();
    let mut x = 12345u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u32
    };
    let q: Vec<f32> = (0..m * hd).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let p: Vec<f32> = (0..m * bt).map(|i| (i % 13) as f32 / 13.0).collect();
    for bits in [2u8, 4] {
        let fpi = 32 / bits as usize;
        let kc: Vec<u32> = (0..hd * bt / fpi).map(|_| rnd()).collect();
        let vc: Vec<u32> = (0..hd * bt / fpi).map(|_| rnd()).collect();
        let meta: Vec<half::f16> = (0..hd * bt / g)
            .map(|i| half::f16::from_f32((i % 7) as f32 * 0.01))
            .collect();
        let ks = SegData::Chan(ChanSeg {
            codes: &kc,
            scales: &meta,
            mins: &meta,
            words_per_row: bt / fpi,
            groups_per_row: bt / g,
            bits,
            group: g,
        });
        let vs = SegData::Tok(TokSeg {
            codes: &vc,
            scales: &meta,
            mins: &meta,
            bits,
            group: g,
        });
        let mut out = vec![0f32; m * bt];
        let mut acc = vec![0f32; m * hd];
        let time = |f: &mut dyn FnMut()| {
            let mut best = f64::INFINITY;
            for _ in 0..200 {
                let t = Instant::now();
                for _ in 0..20 {
                    f();
                }
                best = best.min(t.elapsed().as_secs_f64() / 20.0);
            }
            best * 1e9
        };
        let kt = time(&mut || k_scores_multi(isa, &q, m, &ks, 0, bt, &mut out, bt));
        let vt = time(&mut || v_accumulate_multi(isa, &p, bt, m, &vs, 0, bt, &mut acc));
        let codes = (m * hd * bt) as f64;
        println!(
            "kernels m {m} hd {hd} bits {bits}: keys {kt:.0} ns ({:.3} ns/16 MAC)  values {vt:.0} ns ({:.3} ns/16 MAC)",
            kt / codes * 16.0,
            vt / codes * 16.0
        );
        std::hint::black_box((&out, &acc));
    }
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    if std::env::var("DEV_KERNELS").is_ok_and(|v| v == "1") {
        return kernels(a[0], a[1]);
    }
    let (n_head, nkv, hd, t) = (a[0], a[1], a[2], a[3]);
    println!("isa {:?}", Isa::detect());
    let row = nkv * hd;
    let k: Vec<f32> = (0..(t + 1) * row)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let q: Vec<f32> = (0..n_head * hd)
        .map(|i| ((i * 31) % 100) as f32 / 300.0)
        .collect();
    for (name, cfg) in [
        ("f16", CacheConfig::F16),
        ("kivi2", CacheConfig::Kivi(KiviConfig::kivi2())),
        ("kivi4", CacheConfig::Kivi(KiviConfig::kivi4())),
    ] {
        // `DEV_CACHE=kivi2` (etc.): only that cache (for profiles).
        if std::env::var("DEV_CACHE").is_ok_and(|c| c != name) {
            continue;
        }
        let shape = CacheShape {
            n_layer: 1,
            n_kv_head: nkv,
            head_dim: hd,
        };
        let mut c = new_cache(&cfg, shape).unwrap();
        let s = c.add_sequence();
        c.append(0, s, &k[..t * row], &k[..t * row]).unwrap();
        let bytes = c.memory().total_bytes();
        let mut out = vec![0f32; q.len()];
        let (kn, vn) = (&k[t * row..], &k[t * row..]);
        let iters: usize = std::env::var("ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        let reps: usize = std::env::var("REPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        // Min over `reps` batches of `iters` steps: the least-disturbed batch on a shared machine.
        let (mut cpu, mut wall) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..reps {
            let c0 = cpu_secs();
            let w0 = Instant::now();
            for _ in 0..iters {
                c.attend(0, n_head, s, &q, kn, vn, &mut out).unwrap();
            }
            cpu = cpu.min((cpu_secs() - c0) / iters as f64);
            wall = wall.min(w0.elapsed().as_secs_f64() / iters as f64);
        }
        println!(
            "{name:6} bytes {:>10} cpu {:.3} ms ({:.2} GB/s per cpu-s)  wall {:.3} ms ({:.2} GB/s)",
            bytes,
            cpu * 1e3,
            bytes as f64 / cpu / 1e9,
            wall * 1e3,
            bytes as f64 / wall / 1e9
        );
    }
}
