#!/usr/bin/env python3
"""Hugging Face transformers `generate` throughput in f16 on one GPU: the baseline for
`kivi bench throughput --device cuda` (docs/benchmarks.md, "Throughput (H200, Llama-2-7B shapes)").

Random-weights Llama-2-7B built from `LlamaConfig` (no download), greedy, EOS ignored: every
request has a `--prompt-len`-token random prompt and generates exactly `--output-len` tokens (the
paper's memory/speed script uses 160/338, the ShareGPT means). Memory is capped at
`--gpu-memory-gib` with `torch.cuda.set_per_process_memory_fraction`, so a batch that would need
more fails with out-of-memory, as on an 80 GB card.

For each cache implementation (`dynamic`: HF's default DynamicCache; `static`: StaticCache, which
`generate` may compile with torch.compile; `--no-compile` turns that off) and each batch size:
output tokens/s (batch * output_len / wall time of one `generate`, prefill included), time per
output token, and peak memory (torch.cuda.max_memory_allocated and max_memory_reserved).
The largest batch under the cap is extrapolated from the peak memory of the first and last
batch measured (memory is linear in the batch size).

Usage: python3 scripts/bench/hf_throughput.py --batches 64,256 --caches dynamic,static \
           --out hf.json
"""
import argparse
import gc
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--caches", default="dynamic,static")
    ap.add_argument("--prompt-len", type=int, default=161)
    ap.add_argument("--output-len", type=int, default=338)
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=1e9,
                    help="start no new measurement after this many seconds")
    ap.add_argument("--out")
    a = ap.parse_args()

    try:
        import torch
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        print(f"skipped: {e}")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    t_start = time.perf_counter()
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    cap = a.gpu_memory_gib * (1 << 30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)

    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with dev:
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(0)}; RANDOM WEIGHTS Llama-2-7B shapes, f16, "
          f"weights {weights / 2**30:.2f} GiB, memory cap {a.gpu_memory_gib} GiB; "
          f"prompt {a.prompt_len}, output {a.output_len} (fixed, EOS ignored)", flush=True)

    def generate(batch, new_tokens, cache):
        ids = torch.randint(3, config.vocab_size, (batch, a.prompt_len), device=dev)
        kw = dict(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
        )
        if cache == "static":
            kw["cache_implementation"] = "static"
            if a.no_compile:
                kw["disable_compile"] = True
        with torch.inference_mode():
            out = model.generate(**kw)
        torch.cuda.synchronize()
        assert out.shape == (batch, a.prompt_len + new_tokens), out.shape
        return out

    results = []
    # Warm-up (cuBLAS handles, kernels) outside the timings.
    generate(2, 4, "dynamic")
    print("| cache | batch | output tok | time s | output tok/s | TPOT ms | peak allocated GiB "
          "| peak reserved GiB |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for cache in a.caches.split(","):
        for b in [int(x) for x in a.batches.split(",")]:
            if time.perf_counter() - t_start > a.max_seconds:
                print(f"stopping: --max-seconds {a.max_seconds} reached", flush=True)
                break
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row = {"cache": cache, "batch": b}
            try:
                if cache == "static":
                    # Compilation (if any) happens on the first call for a shape (the cache
                    # length is part of it): one untimed call of the same shape first.
                    t0 = time.perf_counter()
                    generate(b, a.output_len, cache)
                    print(f"(static warm-up call, compilation included: "
                          f"{time.perf_counter() - t0:.1f} s)", flush=True)
                    # Free the warm-up's output and cached blocks before the timed call (on the
                    # H200 at B = 256 the timed call ran out of memory under 80 GiB without it).
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                generate(b, a.output_len, cache)
                secs = time.perf_counter() - t0
                row.update(
                    output_tokens=b * a.output_len, secs=secs,
                    output_tok_s=b * a.output_len / secs,
                    tpot_ms=1e3 * secs / a.output_len,
                    peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                    peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                )
                print(f"| {cache} | {b} | {row['output_tokens']} | {secs:.2f} | "
                      f"{row['output_tok_s']:.0f} | {row['tpot_ms']:.1f} | "
                      f"{row['peak_allocated_bytes'] / 2**30:.2f} | "
                      f"{row['peak_reserved_bytes'] / 2**30:.2f} |", flush=True)
            except torch.OutOfMemoryError:
                row["oom"] = True
                print(f"| {cache} | {b} | out of memory under {a.gpu_memory_gib} GiB |", flush=True)
            results.append(row)
    # Largest batch under the cap, from the peak memory of two measured batches (linear in B).
    max_batch = {}
    for cache in a.caches.split(","):
        pts = [r for r in results if r["cache"] == cache and "peak_allocated_bytes" in r]
        if len(pts) >= 2:
            p0, p1 = pts[0], pts[-1]
            per_seq = (p1["peak_allocated_bytes"] - p0["peak_allocated_bytes"]) / (p1["batch"] - p0["batch"])
            fixed = p0["peak_allocated_bytes"] - per_seq * p0["batch"]
            max_batch[cache] = int((cap - fixed) // per_seq)
            print(f"{cache}: {per_seq / 2**20:.1f} MiB per sequence + {fixed / 2**30:.2f} GiB: "
                  f"largest batch under {a.gpu_memory_gib} GiB (extrapolated) {max_batch[cache]}",
                  flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(0), "weights_bytes": weights,
                       "gpu_memory_gib": a.gpu_memory_gib, "prompt_len": a.prompt_len,
                       "output_len": a.output_len, "max_batch_extrapolated": max_batch,
                       "points": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
