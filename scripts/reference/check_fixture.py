#!/usr/bin/env python3
"""Compare a (perturbed) numpy forward pass against a ref_*.json fixture, the way a Rust test would.

    python3 scripts/reference/check_fixture.py crates/kivi-model/tests/fixtures/ref_smollm2.json \
        [--f32] [--act-q8] [--kv-f16]

--act-q8 rounds every matmul input through Q8_0 (what llama.cpp / the Rust engine do for the
integer dot products); --kv-f16 stores K/V in float16. This sizes the tolerances in the fixture.
It also doubles as a readable specification of the comparisons:
  * last-position logits: max |diff| over the top-40 ids and the 256 fixed ids; mean/std diff;
    overlap of the top-40 id sets
  * per-position argmax agreement where the reference margin >= skip_if_margin_below
  * greedy: teacher-force prompt + reference greedy ids, check argmax at every step whose
    reference margin >= skip_if_margin_below
  * perplexity and top-1 accuracy over the stored 512 ids
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import argparse
import json
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import Model, log_softmax  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fixture")
    ap.add_argument("--f32", action="store_true")
    ap.add_argument("--act-q8", action="store_true")
    ap.add_argument("--kv-f16", action="store_true")
    ap.add_argument("--no-ppl", action="store_true")
    args = ap.parse_args()
    fx = json.load(open(args.fixture))
    cache = os.environ.get("KIVI_CACHE", os.path.expanduser("~/.cache/kivi"))
    m = Model(os.path.join(cache, "models", fx["model"]["file"]), np.float32 if args.f32 else np.float64)
    m.act_q8, m.kv_f16 = args.act_q8, args.kv_f16
    thr = fx["tolerance"]["skip_if_margin_below"]
    f = fx["fixed_ids"]
    fixed = [f["start"] + f["step"] * i for i in range(f["count"])]
    worst = 0.0
    for p in fx["prompts"]:
        ids, gen = p["ids"], p["greedy"]["ids"]
        logits = m.forward(ids + gen)  # one teacher-forced pass covers prompt positions and greedy steps
        T = len(ids)
        last = logits[T - 1]
        d_top = max(abs(last[i] - v) for i, v in p["last"]["top"])
        d_fix = max(abs(last[i] - v) for i, v in zip(fixed, p["last"]["fixed_logits"]))
        # same after removing each side's mean over the vocabulary (a uniform shift does not matter)
        sh = last.mean() - p["last"]["mean"]
        c_top = max(abs(last[i] - sh - v) for i, v in p["last"]["top"])
        c_fix = max(abs(last[i] - sh - v) for i, v in zip(fixed, p["last"]["fixed_logits"]))
        worst = max(worst, d_top, d_fix)
        ours = set(np.argsort(-last)[:40].tolist())
        overlap = len(ours & {i for i, _ in p["last"]["top"]}) / 40
        pos = p["positions"]
        am = np.argmax(logits[:T], axis=-1)
        ok = [am[t] == pos["argmax"][t] for t in range(T) if pos["margin"][t] >= thr]
        bad_any = [t for t in range(T) if am[t] != pos["argmax"][t]]
        g_am = np.argmax(logits[T - 1:T - 1 + len(gen)], axis=-1)
        g_ok = [g_am[s] == gen[s] for s in range(len(gen)) if p["greedy"]["margin"][s] >= thr]
        g_bad_any = [s for s in range(len(gen)) if g_am[s] != gen[s]]
        print(f"[{p['name']}] last: max|d| top40 {d_top:.4f} fixed {d_fix:.4f} "
              f"centered {c_top:.4f}/{c_fix:.4f} mean d {abs(last.mean() - p['last']['mean']):.4f} std d {abs(last.std() - p['last']['std']):.4f} "
              f"top40 overlap {overlap:.3f} | argmax {sum(ok)}/{len(ok)} (margin>={thr}), "
              f"mismatches at any margin {bad_any} | greedy {sum(g_ok)}/{len(g_ok)}, mismatches {g_bad_any}")
    if not args.no_ppl:
        pp = fx["perplexity"]
        ids = pp["ids"]
        logits = m.forward(ids)[:-1]
        tgt = np.asarray(ids[1:])
        nll = -log_softmax(logits)[np.arange(len(tgt)), tgt]
        ppl = float(np.exp(nll.mean()))
        acc = float(np.mean(np.argmax(logits, -1) == tgt))
        ref_nll = np.asarray(pp["nll"])
        am_ok = np.mean([a == b for a, b, mg in zip(np.argmax(logits, -1), pp["argmax"], pp["margin"]) if mg >= thr])
        print(f"[ppl] {ppl:.4f} (ref {pp['ppl']}, rel {ppl / pp['ppl'] - 1:+.4%}) top-1 {acc:.4f} (ref {pp['top1_acc']}) "
              f"max|d nll| {np.abs(nll - ref_nll).max():.4f} argmax agree (margin>={thr}) {am_ok:.4f}")
    print(f"worst last-position logit |diff|: {worst:.4f}")


if __name__ == "__main__":
    main()
