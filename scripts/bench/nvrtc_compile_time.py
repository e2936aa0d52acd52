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


def main():
    lib = ctypes.CDLL(os.environ.get("LIBNVRTC", "libnvrtc.so.13"))
    path, opts = sys.argv[1], [o.encode() for o in sys.argv[2:]]
    prog = ctypes.c_void_p()
    src = open(path, "rb").read()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    arr = (ctypes.c_char_p * len(opts))(*opts)
    t = time.perf_counter()
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    seconds = time.perf_counter() - t
    n = ctypes.c_size_t()
    if rc:
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(f"compile failed ({rc}):\n{log.value.decode()}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    entries = re.findall(r"\.entry (\w+)", ptx.value.decode())
    print(f"{seconds:.1f} s, {n.value} bytes of PTX, {len(entries)} kernels: {' '.join(entries)}")


if __name__ == "__main__":
    main()
