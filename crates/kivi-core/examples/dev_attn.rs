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

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
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
