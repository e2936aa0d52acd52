//! The kernel code of `src/cache.cu` on the host emulator (`emu/`), against double-precision
//! references, without a GPU: the tensor-core key and value block paths, the sink attention, and whole attention + append steps (every kernel of
//! `GpuCache::attend` and `append`, sink tokens included) over exactly quantizable data against
//! plain attention. Needs g++ with C++20 on x86-64; without them the test says `skipped`.

use std::path::Path;
use std::process::Command;

#[test]
fn kernel_code_matches_the_reference_on_the_emulator() {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("skipped: the kernel emulator's fibers switch stacks with x86-64 code");
        return;
    }
    let gxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    if Command::new(&gxx).arg("--version").output().is_err() {
        eprintln!("skipped: no C++ compiler ({gxx}) for the kernel emulator");
        return;
    }
    let emu = Path::new(env!("CARGO_MANIFEST_DIR")).join("emu");
    let out = std::env::temp_dir().join(format!("kivi-emu-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let exe = out.join("emu_test");
    let build = Command::new(&gxx)
        .args(["-std=c++20", "-O2", "-Wno-unknown-pragmas"])
        .arg(emu.join("emu_test.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    if !build.status.success() {
        let err = String::from_utf8_lossy(&build.stderr);
        if err.contains("_Float16") || err.contains("c++20") {
            eprintln!("skipped: {gxx} lacks C++20 or _Float16:\n{err}");
            return;
        }
        panic!("building the emulator test failed:\n{err}");
    }
    let run = Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    eprintln!("{text}");
    assert!(run.status.success(), "{text}");
    assert!(text.contains("all passed"), "{text}");
    let _ = std::fs::remove_dir_all(&out);
}
