//! The warp-level kernel code of `src/cache.cu` on the host emulator (`emu/`): the tensor-core
//! key and value block paths (default and `FOLD_SCALES=1`) and the sink attention, against a
//! double-precision reference, without a GPU. Needs g++ with C++20; without it the test says
//! `skipped`. Also the whole attention step (every kernel of `GpuCache::attend` and `append`, sink
//! tokens included) over exactly quantizable data, against plain attention.

use std::path::Path;
use std::process::Command;

#[test]
fn kernel_code_matches_the_reference_on_the_emulator() {
    let gxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    if Command::new(&gxx).arg("--version").output().is_err() {
        eprintln!("skipped: no C++ compiler ({gxx}) for the kernel emulator");
        return;
    }
    let emu = Path::new(env!("CARGO_MANIFEST_DIR")).join("emu");
    let out = std::env::temp_dir().join(format!("kivi-emu-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    for fold in [0, 1] {
        let exe = out.join(format!("emu_test_{fold}"));
        let build = Command::new(&gxx)
            .args(["-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas"])
            .arg(format!("-DFOLD_SCALES={fold}"))
            .arg(emu.join("emu_test.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap();
        if !build.status.success() {
            let err = String::from_utf8_lossy(&build.stderr);
            if err.contains("barrier") || err.contains("_Float16") || err.contains("c++20") {
                eprintln!("skipped: {gxx} lacks C++20 std::barrier or _Float16:\n{err}");
                return;
            }
            panic!("building the emulator test (FOLD_SCALES={fold}) failed:\n{err}");
        }
        let run = Command::new(&exe).output().unwrap();
        let text = String::from_utf8_lossy(&run.stdout);
        eprintln!("{text}");
        assert!(run.status.success(), "FOLD_SCALES={fold}:\n{text}");
        assert!(text.contains("all passed"), "{text}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
