//! The kernel code of `src/cache.cu` on the host emulator (`emu/`), against double-precision
//! references, without a GPU: the tensor-core key and value block paths, the sink attention,
//! and whole attention + append steps (every kernel of `GpuCache::attend` and `append`, sink
//! tokens included) over exactly quantizable data against plain attention; once as the GPU
//! modules are built and once with every measured switch on its other side (the f16 cache on the
//! CUDA cores only, `F16_TC=0`; code masks shifted down, `MASK_IN_PLACE=0 MASK_IN_PLACE4=0`;
//! four-head blocks forming their B operands in the k-steps, `PRE_B=0`; codes read from memory
//! rather than staged, `STAGE_CODES=0`). Needs g++ with C++20 on x86-64; without them the test
//! says `skipped`.

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
    // The default build, and one with the switches' other sides: built at once, run at once.
    let builds: Vec<_> = [
        ("default", ""),
        (
            "switches_off",
            "-DF16_TC=0 -DMASK_IN_PLACE=0 -DMASK_IN_PLACE4=0 -DPRE_B=0 -DSTAGE_CODES=0",
        ),
    ]
    .into_iter()
    .map(|(name, define)| {
        let exe = out.join(format!("emu_test_{name}"));
        let mut cmd = Command::new(&gxx);
        cmd.args(["-std=c++20", "-O2", "-Wno-unknown-pragmas"]);
        cmd.args(define.split_whitespace());
        let child = cmd
            .arg(emu.join("emu_test.cpp"))
            .arg("-o")
            .arg(&exe)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        (name, exe, child)
    })
    .collect();
    let mut exes = Vec::new();
    for (name, exe, child) in builds {
        let build = child.wait_with_output().unwrap();
        if !build.status.success() {
            let err = String::from_utf8_lossy(&build.stderr);
            if err.contains("_Float16") || err.contains("c++20") {
                eprintln!("skipped: {gxx} lacks C++20 or _Float16:\n{err}");
                return;
            }
            panic!("building the emulator test ({name}) failed:\n{err}");
        }
        exes.push((name, exe));
    }
    let runs: Vec<_> = exes
        .iter()
        .map(|(name, exe)| {
            let child = Command::new(exe)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (*name, child)
        })
        .collect();
    for (name, child) in runs {
        let run = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&run.stdout);
        eprintln!("{name}:\n{text}");
        assert!(run.status.success(), "{name}:\n{text}");
        assert!(text.contains("all passed"), "{name}:\n{text}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
