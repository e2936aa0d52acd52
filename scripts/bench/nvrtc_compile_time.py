#!/usr/bin/env python3
"""Times NVRTC compiling one CUDA source to PTX, as the kivi-cuda backend does at run time
(no GPU needed): prints seconds, PTX bytes and the kernels (.entry) it defines.

    LIBNVRTC=$(scripts/fetch-nvrtc.sh)/libnvrtc.so.13 \\
      python3 scripts/bench/nvrtc_compile_time.py crates/kivi-cuda/src/cache.cu \\
      --gpu-architecture=compute_90 -std=c++17 [-DATTN_D=128 -DATTN_KB=2 ...]
"""
import ctypes
import os
import re
import sys
import time


def compile_ptx(lib, src, name, options):
    """PTX of `src` (bytes) compiled by NVRTC (`lib`, a ctypes CDLL) with `options` (str);
    exits with NVRTC's log on failure. Shared with kernel_resources.py."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, name.encode(), 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [o.encode() for o in options]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    if rc:
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(f"NVRTC failed ({rc}):\n{log.value.decode()}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value


def main():
    lib = ctypes.CDLL(os.environ.get("LIBNVRTC", "libnvrtc.so.13"))
    path = sys.argv[1]
    t = time.perf_counter()
    ptx = compile_ptx(lib, open(path, "rb").read(), os.path.basename(path), sys.argv[2:])
    seconds = time.perf_counter() - t
    entries = re.findall(r"\.entry (\w+)", ptx.decode())
    print(f"{seconds:.1f} s, {len(ptx)} bytes of PTX, {len(entries)} kernels: {' '.join(entries)}")


if __name__ == "__main__":
    main()
