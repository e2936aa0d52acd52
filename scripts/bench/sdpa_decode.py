#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention on an f16 KV cache: the comparison for
`kivi bench attention --device cuda` (same shapes: one new query token per sequence over a cache
of T tokens). Run both in the same device call, then this script merges the two into one table:

    kivi bench attention --device cuda --json kivi.jsonl
    python3 scripts/bench/sdpa_decode.py --kivi-json kivi.jsonl --json sdpa.jsonl

Time: CUDA events around `inner` calls, median of `reps`, after warm-up (`--cold` and
`--between MIB`, as `kivi bench attention`'s: a buffer of twice the L2 overwritten, or a matrix
product of MIB MiB, before each call, timed alone).
Bytes: K and V of the cache (f16) plus q and out. GQA shapes run with enable_gqa=True (no K/V copies); the default
backend selection is used (the backend that ran is reported when PyTorch can tell).
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F


def parse_shapes(s):
    out = []
    for x in s.split(","):
        h, kv, d = (int(v) for v in x.split("/"))
        out.append((h, kv, d))
    return out


def time_sdpa(h, kv, d, b, t, reps, inner, gen, flush=None, between=None):
    q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16, generator=gen)
    k = torch.randn(b, kv, t, d, device="cuda", dtype=torch.float16, generator=gen)
    v = torch.randn(b, kv, t, d, device="cuda", dtype=torch.float16, generator=gen)
    gqa = h != kv

    def call():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    times = []
    if flush is not None or between is not None:
        inner = 1
    x = None
    if between is not None:
        x = torch.randn(b, between.shape[1], device="cuda", dtype=torch.float16, generator=gen)
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        if between is not None:
            _ = x @ between.t()  # (its result is not needed: only its run before the call)
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            call()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / inner)
    out = call()
    assert torch.isfinite(out).all()
    nbytes = 2 * b * kv * t * d * 2 + 2 * b * h * d * 2
    del q, k, v, out
    torch.cuda.empty_cache()
    return statistics.median(times), nbytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="32/32/128,32/8/128")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--context", default="1024,4096,16384,32768")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--kivi-json", help="kivi bench attention --json output to merge")
    ap.add_argument("--json", help="write SDPA measurements here (JSON lines)")
    ap.add_argument("--cold", action="store_true",
                    help="overwrite twice the L2 before each call and time it alone")
    ap.add_argument("--between", type=int, metavar="MIB",
                    help="a [N][4096] f16 matrix product of about MIB MiB (one row per sequence) "
                         "before each call, timed alone (as kivi bench attention --between)")
    a = ap.parse_args()
    flush = None
    if a.cold:
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        flush = torch.empty(2 * max(l2, 1 << 20), device="cuda", dtype=torch.uint8)
    between = None
    if a.between:
        between = torch.randn((a.between << 20) // 8192, 4096, device="cuda", dtype=torch.float16,
                              generator=gen) * 0.02
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cudnn {torch.backends.cudnn.version()}")
    sdpa = {}
    jf = open(a.json, "w") if a.json else None
    for (h, kv, d) in parse_shapes(a.shapes):
        for b in (int(x) for x in a.batch.split(",")):
            for t in (int(x) for x in a.context.split(",")):
                us, nbytes = time_sdpa(h, kv, d, b, t, a.reps, a.inner, gen, flush, between)
                sdpa[(h, kv, d, b, t)] = (us, nbytes)
                if jf:
                    jf.write(json.dumps(dict(n_head=h, n_kv_head=kv, head_dim=d, batch=b,
                                             context=t, cache="sdpa-f16", us=us,
                                             bytes=nbytes)) + "\n")
    kivi = {}
    if a.kivi_json:
        for line in open(a.kivi_json):
            r = json.loads(line)
            key = (r["n_head"], r["n_kv_head"], r["head_dim"], r["batch"], r["context"])
            kivi.setdefault(key, {})[r["cache"]] = (r["us"], r["bytes"])
    caches = sorted({c for v in kivi.values() for c in v}, key=lambda c: (c != "f16", c))
    head = "| heads | B | T | SDPA µs (GB/s) | " + " | ".join(
        f"{c} µs (GB/s) | {c} vs SDPA" for c in caches) + " |"
    print(head)
    print("|" + "---|" * (4 + 2 * len(caches)))
    for key, (us, nbytes) in sdpa.items():
        h, kv, d, b, t = key
        row = f"| {h}/{kv}/{d} | {b} | {t} | {us:.1f} ({nbytes / us / 1e3:.0f}) |"
        for c in caches:
            if c in kivi.get(key, {}):
                kus, kb = kivi[key][c]
                row += f" {kus:.1f} ({kb / kus / 1e3:.0f}) | {us / kus:.2f}x |"
            else:
                row += " - | - |"
        print(row)


if __name__ == "__main__":
    main()
