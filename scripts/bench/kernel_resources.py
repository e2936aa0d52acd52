#!/usr/bin/env python3
"""Registers, spills and SASS size of the decode-attention variants, without a GPU: NVRTC
(as the backend compiles them at run time), then ptxas -v for a real architecture.

    TOOLS=$(scripts/fetch-cuda-tools.sh) python3 scripts/bench/kernel_resources.py \\
        [--arch sm_90] [--defines=-DQUANT_MIN_CTAS=6] [--only d128_k2_v2] [--sass DIR]

The driver JIT-compiles the same PTX on the GPU; its register counts matched ptxas 13.5's on the
H200 (d128 k2 v2 g1: 96 registers, 24 B of local memory both). A change that makes a kernel
spill shows here before any device time is spent.
"""
import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile

from nvrtc_compile_time import compile_ptx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "crates/kivi-cuda/src/cache.cu")


def variants():
    # Mirrors kivi_cuda::cache::kernel_modules (the attention part).
    for d in (64, 128):
        for kb, vb in ((2, 2), (4, 4), (2, 4), (4, 2), (16, 16)):
            for ng in (1, 2, 3, 4):
                for w in (4, 1):
                    if w == 1 and kb == 16:
                        continue
                    yield f"d{d}_k{kb}_v{vb}_g{ng}_w{w}", [
                        f"-DATTN_D={d}", f"-DATTN_KB={kb}", f"-DATTN_VB={vb}",
                        f"-DATTN_NG={ng}", f"-DATTN_W={w}",
                    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--defines", default="", help="extra -D options, as KIVI_CUDA_DEFINES")
    ap.add_argument("--only", default="", help="substring of the variant names to keep")
    ap.add_argument("--sass", help="write each variant's SASS (cuobjdump -sass) into this folder")
    a = ap.parse_args()
    tools = os.environ.get("TOOLS") or sys.exit("set TOOLS=$(scripts/fetch-cuda-tools.sh)")
    lib = ctypes.CDLL(os.path.join(tools, "libnvrtc.so.13"))
    src = open(SOURCE, "rb").read()
    compute = "compute_" + a.arch.split("_")[1]
    print(f"| variant ({a.arch}{', ' + a.defines if a.defines else ''}) | registers | spill stores B | spill loads B | static smem B | SASS instructions |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, defines in variants():
            if a.only not in name:
                continue
            options = [f"--gpu-architecture={compute}", "-std=c++17", *defines, *a.defines.split()]
            ptx_path, cubin = os.path.join(tmp, name + ".ptx"), os.path.join(tmp, name + ".cubin")
            open(ptx_path, "wb").write(compile_ptx(lib, src, "cache.cu", options))
            out = subprocess.run([os.path.join(tools, "ptxas"), f"-arch={a.arch}", "-v", "-o", cubin, ptx_path],
                                 capture_output=True, text=True, check=True).stderr
            regs = re.search(r"Used (\d+) registers", out).group(1)
            st = re.search(r"(\d+) bytes spill stores", out).group(1)
            ld = re.search(r"(\d+) bytes spill loads", out).group(1)
            smem = re.search(r"(\d+) bytes smem", out)
            smem = smem.group(1) if smem else "0"
            sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True,
                                  text=True, check=True, env={**os.environ, "PATH": tools + ":" + os.environ.get("PATH", "")}).stdout
            n_instr = len(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+\S", sass, re.M))
            if a.sass:
                os.makedirs(a.sass, exist_ok=True)
                open(os.path.join(a.sass, name + ".sass"), "w").write(sass)
            print(f"| {name} | {regs} | {st} | {ld} | {smem} | {n_instr} |", flush=True)


if __name__ == "__main__":
    main()
