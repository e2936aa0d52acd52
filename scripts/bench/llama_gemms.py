#!/usr/bin/env python3
"""Time of the weight GEMMs of one Llama-2-7B decode step on this GPU (torch/cuBLAS, f16 inputs,
f32 accumulation), for the analysis of `kivi bench throughput --device cuda`: per layer
q, k, v, o (4096x4096), gate and up (11008x4096), down (4096x11008), plus the output matrix
(32000x4096), each against N activation rows. Reports ms per step (32 layers + output) and
TFLOP/s, for f16 outputs (torch's default) and f32 outputs (what kivi's cuBLAS calls write).

Usage: python3 scripts/bench/llama_gemms.py --rows 64,256,1024
"""
import argparse

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64,256,1024")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    dev = torch.device("cuda")
    hidden, ffn, vocab, layers = 4096, 11008, 32000, 32
    shapes = [(hidden, hidden)] * 4 + [(ffn, hidden)] * 2 + [(hidden, ffn)]
    ws = {s: torch.randn(s, device=dev, dtype=torch.float16) * 0.02 for s in set(shapes)}
    w_out = torch.randn((vocab, hidden), device=dev, dtype=torch.float16) * 0.02
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| rows | out dtype | ms per step (32 layers + output) | TFLOP/s |")
    print("|---|---|---|---|")
    for n in [int(x) for x in a.rows.split(",")]:
        xs = {c: torch.randn((n, c), device=dev, dtype=torch.float16) for c in (hidden, ffn)}
        flop = 2 * n * (layers * sum(r * c for r, c in shapes) + vocab * hidden)
        for out in (torch.float16, torch.float32):
            def step():
                for _ in range(layers):
                    for s in shapes:
                        y = torch.mm(xs[s[1]], ws[s].t(), out_dtype=out) if out == torch.float32 \
                            else torch.mm(xs[s[1]], ws[s].t())
                torch.mm(xs[hidden], w_out.t())
                return y
            try:
                step()
            except (TypeError, RuntimeError):  # no out_dtype in this torch: skip the row
                continue
            torch.cuda.synchronize()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(a.reps):
                step()
            t1.record()
            torch.cuda.synchronize()
            ms = t0.elapsed_time(t1) / a.reps
            print(f"| {n} | {str(out).split('.')[-1]} | {ms:.2f} | {flop / ms / 1e9:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
