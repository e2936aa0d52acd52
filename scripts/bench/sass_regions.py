#!/usr/bin/env python3
"""Where a decode-attention kernel's SASS instructions come from, by source line of `attn_split`
(no GPU needed): NVRTC with -lineinfo, ptxas, then `nvdisasm -gi`, whose inlining chains give
each instruction's line in `attn_split` (an inlined helper's instructions count at its call
site). Prints the totals per `// ----` section of `attn_split` and the heaviest lines.

    TOOLS=$(scripts/fetch-cuda-tools.sh) python3 scripts/bench/sass_regions.py d128_k2_v2_g1_w1 \\
        [--defines=-DKEY_I8_UNROLL=4] [--top 25]

Why: code that every CTA walks through once costs instruction fetch, which Nsight Compute
showed as the first stall of the one-warp kernels (docs/benchmarks.md, "Session 11"); this
table found the 1627-instruction key loop that every decode CTA ran for its window rows.
"""
import argparse
import collections
import ctypes
import os
import re
import subprocess
import sys
import tempfile

from nvrtc_compile_time import compile_ptx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "crates/kivi-cuda/src/cache.cu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", help="as kernel_resources.py names it: d128_k2_v2_g1_w1")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--defines", default="", help="extra -D options, as KIVI_CUDA_DEFINES")
    ap.add_argument("--top", type=int, default=20, help="heaviest source lines to list")
    ap.add_argument("--opcodes", type=int, help="also count the opcodes of this attn_split line's instructions")
    a = ap.parse_args()
    m = re.fullmatch(r"d(\d+)_k(\d+)_v(\d+)_g(\d+)_w(\d+)", a.variant)
    if not m:
        sys.exit("variant: dD_kKB_vVB_gNG_wW, e.g. d128_k2_v2_g1_w1")
    d, kb, vb, ng, w = m.groups()
    tools = os.environ.get("TOOLS") or sys.exit("set TOOLS=$(scripts/fetch-cuda-tools.sh)")
    lib = ctypes.CDLL(os.path.join(tools, "libnvrtc.so.13"))
    src = open(SOURCE, "rb").read()
    lines = src.decode().split("\n")
    # attn_split's body: from its signature to the next top-level function.
    start = next(i for i, l in enumerate(lines) if "void attn_split_partials(" in l) + 1
    end = next(i for i in range(start, len(lines)) if re.match(r"(template|extern|__device__|#define ATTN)", lines[i]))
    sections = [(i + 1, l.strip()[3:].strip()) for i, l in enumerate(lines[:end]) if i >= start - 1 and l.strip().startswith("// ----")]
    options = [f"--gpu-architecture=compute_{a.arch.split('_')[1]}", "-std=c++17", "-lineinfo",
               f"-DATTN_D={d}", f"-DATTN_KB={kb}", f"-DATTN_VB={vb}", f"-DATTN_NG={ng}", f"-DATTN_W={w}",
               *a.defines.split()]
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        open(ptx, "wb").write(compile_ptx(lib, src, "cache.cu", options))
        subprocess.run([os.path.join(tools, "ptxas"), f"-arch={a.arch}", "-lineinfo", "-o", cubin, ptx], check=True)
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-gi", "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    # Each instruction follows its chain of `//## File ..., line N [inlined at ..., line M]`
    # comments; its attn_split line is the last one of the chain inside attn_split's body.
    per_line = collections.Counter()
    opcodes = collections.Counter()
    chain, cur, total = [], None, 0
    for l in sass.splitlines():
        if l.lstrip().startswith("//##"):
            chain += [int(x) for x in re.findall(r"line (\d+)", l)]
            continue
        if re.match(r"\s+/\*[0-9a-f]{4,}\*/", l):
            if chain:
                inside = [x for x in chain if start <= x <= end]
                cur = inside[-1] if inside else None
                chain = []
            per_line[cur] += 1
            total += 1
            if cur is not None and cur == a.opcodes:
                op = re.sub(r"^\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?", "", l).split()[0]
                opcodes[op.split(".")[0]] += 1
    print(f"{a.variant}{' ' + a.defines if a.defines else ''}: {total} SASS instructions")
    print("| attn_split section (from line) | instructions |\n|---|---|")
    bounds = [s for s, _ in sections] + [end + 1]
    print(f"| before the first section | {sum(c for n, c in per_line.items() if n is not None and n < bounds[0])} |")
    for (s, name), e in zip(sections, bounds[1:]):
        print(f"| {name} ({s}) | {sum(c for n, c in per_line.items() if n is not None and s <= n < e)} |")
    print(f"| outside attn_split | {per_line[None]} |")
    print(f"\nheaviest lines:\n| line | instructions | source |\n|---|---|---|")
    for n, c in sorted(((n, c) for n, c in per_line.items() if n is not None), key=lambda x: -x[1])[: a.top]:
        print(f"| {n} | {c} | `{lines[n - 1].strip()[:80]}` |")
    if a.opcodes:
        print(f"\nopcodes of line {a.opcodes}: " + ", ".join(f"{o} {c}" for o, c in opcodes.most_common()))


if __name__ == "__main__":
    main()
