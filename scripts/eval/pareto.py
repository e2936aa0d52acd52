#!/usr/bin/env python3
"""Pareto plot (SVG, no dependencies): ΔPPL against bits per element for every configuration of a
`kivi eval ppl --out` JSON file, with llama.cpp's q8_0 / q4_0 cache results on SmolLM2-135M (from
issue 4) marked.

    scripts/eval/pareto.py RESULTS.json [MORE.json ...] OUT.svg
"""
import json
import math
import sys

LLAMA_CPP = [("llama.cpp q8_0", 8.5, 0.10), ("llama.cpp q4_0", 4.5, 4.4)]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    rows = [r for f in sys.argv[1:-1] for r in json.load(open(f)) if r["kv"] != "f16"]
    W, H, L, T, R, B = 760, 520, 70, 40, 200, 50
    xs = [r["bits_per_element"] for r in rows] + [p[1] for p in LLAMA_CPP]
    x0, x1 = 2.0, max(xs) + 0.5
    # log-scaled y: ΔPPL in percent, floored at 0.05 %
    def fy(d):
        return math.log10(max(d, 0.05))
    ys = [fy(r["delta_ppl_pct"]) for r in rows] + [fy(p[2]) for p in LLAMA_CPP]
    y0, y1 = math.floor(min(ys)), math.ceil(max(ys))

    def px(x):
        return L + (x - x0) / (x1 - x0) * (W - L - R)

    def py(y):
        return T + (y1 - y) / (y1 - y0) * (H - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="20" font-size="14">ΔPPL vs f16 cache against stored bits per element '
           f'({rows[0]["tokens"]} tokens, chunk {rows[0].get("chunk", "?")})</text>']
    for e in range(y0, y1 + 1):
        y = py(e)
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{10 ** e:g} %</text>')
    for b in range(int(x0), int(x1) + 1):
        x = px(b)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{T}" y2="{H - B}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="middle">{b}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">'
               'bits per element (codes + f16 scale and min)</text>')
    for r in rows:
        x, y = px(r["bits_per_element"]), py(fy(r["delta_ppl_pct"]))
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#31688e"/>')
        out.append(f'<text x="{x + 6:.1f}" y="{y + 4:.1f}">{r["kv"]} '
                   f'({r["delta_ppl_pct"]:+.1f} %)</text>')
    for name, b, d in LLAMA_CPP:
        x, y = px(b), py(fy(d))
        out.append(f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="#d73027"/>')
        out.append(f'<text x="{x + 6:.1f}" y="{y + 4:.1f}" fill="#d73027">{name} (+{d} %)</text>')
    out.append("</svg>")
    open(sys.argv[-1], "w").write("\n".join(out))


if __name__ == "__main__":
    main()
