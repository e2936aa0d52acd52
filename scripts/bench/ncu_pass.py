#!/usr/bin/env python3
"""Per-kernel GPU time over one decode pass, from Nsight Compute's CSV.

Input: the output of `ncu --metrics gpu__time_duration.sum --csv ... kivi bench throughput ...`
with `KIVI_CUDA_GRAPHS=0` (one file per run, e.g. per cache). The pass runs from the first
attention launch to the one `--layers` launches later, so each kernel of a pass counts once.
Prints each kernel's calls, total and per-call time, and the pass's sum. Session 28's command
(docs/benchmarks.md, "CUDA end-to-end (H200)" -> "Session 28"), on the GPU machine:

    KIVI_CUDA_GRAPHS=0 ncu --launch-skip 2400 --launch-count 600 --cache-control none \
      --clock-control none --metrics gpu__time_duration.sum --csv kivi bench throughput \
      --device cuda --random-weights --arch mistral-7b --kv kivi2 --workload fixed \
      --prompt-len 4096 --output-len 24 --batch 1 --max-batch 1 > kivi2.csv
    python3 scripts/bench/ncu_pass.py --layers 32 f16.csv kivi2.csv
"""
import argparse
import collections
import csv
import io


def rows(path):
    lines = [l for l in open(path, encoding="utf-8", errors="replace") if l.startswith('"')]
    r = list(csv.reader(io.StringIO("".join(lines))))
    if not r:
        return []
    h = r[0]
    ik, iv, im = h.index("Kernel Name"), h.index("Metric Value"), h.index("Metric Name")
    return [(x[ik], float(x[iv].replace(",", "")) / 1000) for x in r[1:]
            if x[im] == "gpu__time_duration.sum"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="attention launches per pass")
    ap.add_argument("--attention", default="kivi_attn", help="the attention kernel's name")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    for path in a.files:
        seq = rows(path)
        att = [i for i, (k, _) in enumerate(seq) if k == a.attention]
        if len(att) <= a.layers:
            print(f"{path}: {len(att)} attention launches, fewer than a pass ({a.layers} + 1)")
            continue
        tot = collections.defaultdict(lambda: [0, 0.0])
        for k, us in seq[att[0]:att[a.layers]]:
            tot[k][0] += 1
            tot[k][1] += us
        print(f"{path}: one pass, {len(seq)} kernels profiled")
        for k, (n, us) in sorted(tot.items(), key=lambda x: -x[1][1]):
            print(f"  {k:<28} {n:4d} calls {us:9.1f} us  {us / n:7.2f} us/call")
        print(f"  {'sum':<28} {sum(v[1] for v in tot.values()):25.1f} us")


if __name__ == "__main__":
    main()
