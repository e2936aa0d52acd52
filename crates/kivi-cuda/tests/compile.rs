//! Every kernel module compiles with NVRTC, the backend's options and defines, for sm_90 (the
//! H200) and sm_80: needs only libnvrtc, not a GPU (`scripts/fetch-nvrtc.sh` fetches it), so CI
//! catches a kernel that does not compile. Without NVRTC the test says `skipped`.

use kivi_cuda::{compile_uncached, kernel_modules, nvrtc_present};

#[test]
fn every_kernel_module_compiles() {
    if !nvrtc_present() {
        eprintln!("skipped: NVRTC (libnvrtc) not found; scripts/fetch-nvrtc.sh fetches it");
        return;
    }
    let modules = kernel_modules();
    // The cache module, the model kernels, the sampler and one module per attention variant.
    assert!(modules.len() > 70, "{} modules", modules.len());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let modules = &modules;
                s.spawn(move || {
                    let mut failures = Vec::new();
                    for m in modules.iter().skip(t).step_by(threads) {
                        for arch in [(9, 0), (8, 0)] {
                            match compile_uncached(&m.name, m.source, arch, &m.defines) {
                                // An attention variant defines exactly one kernel.
                                Ok(ptx) if m.name.contains("_attn_d") => {
                                    let entries = ptx.matches(".entry ").count();
                                    if entries != 1 || !ptx.contains(".entry kivi_attn(") {
                                        failures.push(format!("{}: {entries} entries", m.name));
                                    }
                                }
                                Ok(ptx) => {
                                    if !ptx.contains(".entry ") {
                                        failures.push(format!("{}: no kernel", m.name));
                                    }
                                }
                                Err(e) => failures
                                    .push(format!("{} sm_{}{}: {e}", m.name, arch.0, arch.1)),
                            }
                        }
                    }
                    failures
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "{failures:#?}");
    eprintln!(
        "{} kernel modules compiled for sm_90 and sm_80",
        modules.len()
    );
}
