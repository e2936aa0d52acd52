#!/usr/bin/env python3
"""Independent numpy reference forward pass for Llama-family GGUF models (`llama`, `qwen2`).

It shares no code with the Rust engine: weights are read with the PyPI `gguf` package
(GGUFReader + gguf.quants.dequantize) and every quantized matrix is dequantized to float
once at load time. Activations are never quantized; attention is exact softmax attention.
This is the oracle the Rust tests compare against (see make_fixture.py).

Model, per token position p (T positions, hidden size d):
    x = token_embd[id]
    for each layer:
        h = rmsnorm(x) * attn_norm
        q, k, v = h Wq^T (+bq), h Wk^T (+bk), h Wv^T (+bv)       # (+b) only for qwen2
        q, k = rope(q, p), rope(k, p)
        a = softmax(q k^T / sqrt(head_dim), causal) v             # GQA: q head h uses kv head h // (n_head / n_kv)
        x = x + a Wo^T
        h = rmsnorm(x) * ffn_norm
        x = x + (silu(h Wgate^T) * (h Wup^T)) Wdown^T
    logits = (rmsnorm(x) * output_norm) Wout^T                    # Wout = output.weight or tied token_embd.weight

RoPE layout:
  * arch `llama`: llama.cpp "normal" rope, rotating ADJACENT pairs (x[2i], x[2i+1]); the HF->GGUF
    converter permuted the Q/K rows so that this equals HF's half-split rotation.
  * arch `qwen2`: NEOX rope, rotating (x[i], x[i + n_rot/2]).
  In both: angle = p * base^(-2i / n_rot), i = 0 .. n_rot/2 - 1.

Matrices: GGUF stores a linear layer as ggml shape [in, out] (ne0 fastest); as a numpy array after
dequantize it is (out, in) = (rows, cols), so y = x @ W.T. Checked at load time with the
embedding, which must be (vocab, hidden).

Usage:
    python3 forward.py MODEL.gguf --ids 504,3575,282,4649,314 -n 24
    python3 forward.py MODEL.gguf --prompt "The capital of France is" -n 24     # needs `tokenizers`
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import argparse
import sys
import time

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class Model:
    def __init__(self, path, dtype=np.float32, verbose=True):
        t0 = time.time()
        self.path = path
        self.dtype = np.dtype(dtype)
        r = GGUFReader(path)
        self.reader = r
        a = _field(r, "general.architecture")
        if a not in ("llama", "qwen2"):
            raise ValueError(f"unsupported architecture {a!r} (only llama, qwen2)")
        self.arch = a
        self.n_layer = int(_field(r, f"{a}.block_count"))
        self.n_embd = int(_field(r, f"{a}.embedding_length"))
        self.n_ff = int(_field(r, f"{a}.feed_forward_length"))
        self.n_head = int(_field(r, f"{a}.attention.head_count"))
        self.n_head_kv = int(_field(r, f"{a}.attention.head_count_kv", self.n_head))
        self.head_dim = int(_field(r, f"{a}.attention.key_length", self.n_embd // self.n_head))
        self.eps = float(_field(r, f"{a}.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(_field(r, f"{a}.rope.freq_base", 10000.0))
        self.n_rot = int(_field(r, f"{a}.rope.dimension_count", self.head_dim))
        self.rope_neox = a == "qwen2"
        # Emulation knobs, OFF for the reference: round matmul inputs through Q8_0 like llama.cpp's
        # integer dot products, and/or store K/V as float16 -- used only to size test tolerances.
        self.act_q8 = False
        self.kv_f16 = False
        for k in (f"{a}.rope.scaling.type", f"{a}.rope.scaling.factor"):
            if k in r.fields and _field(r, k) not in ("none", 1.0, 0.0):
                raise ValueError(f"rope scaling not implemented ({k}={_field(r, k)})")

        tensors = {t.name: t for t in r.tensors}
        self._wtype = {}
        self.tensor_types = {t.name: t.tensor_type.name for t in r.tensors}

        def W(name, required=True):
            t = tensors.get(name)
            if t is None:
                if required:
                    raise KeyError(name)
                return None
            x = dequantize(t.data, t.tensor_type)
            # ggml shape is [ne0, ne1, ...] with ne0 fastest; numpy wants the reverse.
            x = np.asarray(x).reshape(tuple(int(s) for s in reversed(t.shape)))
            x = x.astype(self.dtype, copy=False)
            self._wtype[id(x)] = t.tensor_type.name
            return x

        self.tok_embd = W("token_embd.weight")
        self.n_vocab = self.tok_embd.shape[0]
        assert self.tok_embd.shape == (self.n_vocab, self.n_embd), self.tok_embd.shape
        self.output_norm = W("output_norm.weight")
        out = W("output.weight", required=False)
        self.tied_output = out is None
        self.output = self.tok_embd if out is None else out
        assert self.output.shape == (self.n_vocab, self.n_embd)

        hd, nh, nkv = self.head_dim, self.n_head, self.n_head_kv
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            L = dict(
                attn_norm=W(p + "attn_norm.weight"),
                wq=W(p + "attn_q.weight"), wk=W(p + "attn_k.weight"), wv=W(p + "attn_v.weight"),
                bq=W(p + "attn_q.bias", False), bk=W(p + "attn_k.bias", False), bv=W(p + "attn_v.bias", False),
                wo=W(p + "attn_output.weight"),
                ffn_norm=W(p + "ffn_norm.weight"),
                w_gate=W(p + "ffn_gate.weight"), w_up=W(p + "ffn_up.weight"), w_down=W(p + "ffn_down.weight"),
            )
            assert L["wq"].shape == (nh * hd, self.n_embd), L["wq"].shape
            assert L["wk"].shape == (nkv * hd, self.n_embd), L["wk"].shape
            assert L["wv"].shape == (nkv * hd, self.n_embd), L["wv"].shape
            assert L["wo"].shape == (self.n_embd, nh * hd), L["wo"].shape
            assert L["w_gate"].shape == (self.n_ff, self.n_embd), L["w_gate"].shape
            assert L["w_up"].shape == (self.n_ff, self.n_embd), L["w_up"].shape
            assert L["w_down"].shape == (self.n_embd, self.n_ff), L["w_down"].shape
            self.layers.append(L)
        if verbose:
            print(f"[forward] {os.path.basename(path)}: arch={a} layers={self.n_layer} d={self.n_embd} "
                  f"ff={self.n_ff} heads={nh}/{nkv}x{hd} vocab={self.n_vocab} eps={self.eps:g} "
                  f"rope={'neox' if self.rope_neox else 'normal'} base={self.rope_base:g} n_rot={self.n_rot} "
                  f"tied={self.tied_output} dtype={self.dtype} load={time.time() - t0:.1f}s", file=sys.stderr)

    # ------------------------------------------------------------------ building blocks
    def rmsnorm(self, x, w):
        var = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.eps)).astype(self.dtype) * w

    def rope(self, x, pos):
        """x: (T, n_heads, head_dim), pos: (T,) absolute positions."""
        n_rot = self.n_rot
        half = n_rot // 2
        inv_freq = self.rope_base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)  # (half,)
        ang = pos.astype(np.float64)[:, None] * inv_freq[None, :]  # (T, half)
        cos = np.cos(ang)[:, None, :].astype(self.dtype)
        sin = np.sin(ang)[:, None, :].astype(self.dtype)
        out = x.copy()
        if self.rope_neox:
            x0, x1 = x[..., :half], x[..., half:n_rot]
            out[..., :half] = x0 * cos - x1 * sin
            out[..., half:n_rot] = x0 * sin + x1 * cos
        else:
            x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
            out[..., 0:n_rot:2] = x0 * cos - x1 * sin
            out[..., 1:n_rot:2] = x0 * sin + x1 * cos
        return out

    def _lin(self, x, w, b=None):
        if self.act_q8:  # ggml vec_dot_type: Q8_K (256-blocks) for k-quants, Q8 (32-blocks) otherwise
            x = q8_roundtrip(x, 256 if self._wtype.get(id(w), "").endswith("_K") else 32)
        y = x @ w.T
        return y if b is None else y + b

    # ------------------------------------------------------------------ forward
    def new_cache(self):
        return [dict(k=np.zeros((0, self.n_head_kv, self.head_dim), self.dtype),
                     v=np.zeros((0, self.n_head_kv, self.head_dim), self.dtype)) for _ in range(self.n_layer)]

    def forward(self, ids, cache=None, trace=None):
        """Logits (T, n_vocab) for the new tokens `ids`, attending to everything in `cache` (exact,
        unquantized K/V, updated in place). `trace`, if a list, receives the residual stream after
        the embedding and after each layer (rows = positions)."""
        ids = np.asarray(ids, dtype=np.int64)
        if cache is None:
            cache = self.new_cache()
        T = len(ids)
        past = cache[0]["k"].shape[0]
        pos = np.arange(past, past + T)
        S = past + T
        nh, nkv, hd = self.n_head, self.n_head_kv, self.head_dim
        group = nh // nkv
        scale = 1.0 / np.sqrt(hd)
        # causal mask: query at absolute position past+i may see keys 0..past+i
        mask = np.arange(S)[None, :] > pos[:, None]  # (T, S)

        x = self.tok_embd[ids].astype(self.dtype)
        if trace is not None:
            trace.append(x.copy())
        for li, L in enumerate(self.layers):
            h = self.rmsnorm(x, L["attn_norm"])
            q = self._lin(h, L["wq"], L["bq"]).reshape(T, nh, hd)
            k = self._lin(h, L["wk"], L["bk"]).reshape(T, nkv, hd)
            v = self._lin(h, L["wv"], L["bv"]).reshape(T, nkv, hd)
            q = self.rope(q, pos)
            k = self.rope(k, pos)
            if self.kv_f16:
                k = k.astype(np.float16).astype(self.dtype)
                v = v.astype(np.float16).astype(self.dtype)
            c = cache[li]
            c["k"] = np.concatenate([c["k"], k], axis=0)
            c["v"] = np.concatenate([c["v"], v], axis=0)
            K = c["k"].transpose(1, 0, 2)  # (nkv, S, hd)
            V = c["v"].transpose(1, 0, 2)
            # query head h -> kv head h // group: (nkv, group, T, hd)
            Q = q.transpose(1, 0, 2).reshape(nkv, group, T, hd)
            scores = np.einsum("gqtd,gsd->gqts", Q, K).astype(np.float64) * scale
            scores[..., mask] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(axis=-1, keepdims=True)
            att = np.einsum("gqts,gsd->gqtd", p.astype(self.dtype), V)  # (nkv, group, T, hd)
            att = att.reshape(nh, T, hd).transpose(1, 0, 2).reshape(T, nh * hd)
            x = x + self._lin(att, L["wo"])

            h = self.rmsnorm(x, L["ffn_norm"])
            g = self._lin(h, L["w_gate"])
            u = self._lin(h, L["w_up"])
            act = (g / (1.0 + np.exp(-g.astype(np.float64)))).astype(self.dtype) * u  # silu(g) * u
            x = x + self._lin(act, L["w_down"])
            if trace is not None:
                trace.append(x.copy())
        h = self.rmsnorm(x, self.output_norm)
        return self._lin(h, self.output).astype(np.float32)

    def greedy(self, ids, n_new, stop_ids=()):
        """Greedy continuation with an exact float KV cache. Returns (new_ids, per-step logits)."""
        cache = self.new_cache()
        logits = self.forward(ids, cache)[-1]
        out, steps = [], []
        for _ in range(n_new):
            steps.append(logits)
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if nxt in stop_ids:
                break
            logits = self.forward([nxt], cache)[-1]
        return out, steps


def q8_roundtrip(x, block=32):
    """Quantize rows of x to symmetric 8 bits in blocks (d = amax/127 as f32, q = round(x/d)) and back,
    like the Rust engine's activation quantization (Q8 32-blocks, Q8_K 256-blocks)."""
    shp = x.shape
    b = x.reshape(-1, block).astype(np.float32)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127.0)
    inv = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, np.float32(1.0)), np.float32(0.0))
    q = np.round(b * inv)
    return (q * d).reshape(shp).astype(x.dtype)


def log_softmax(logits):
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ids", help="comma-separated prompt token ids")
    ap.add_argument("--prompt", help="prompt text (tokenized with gguf_tokenizer.py)")
    ap.add_argument("-n", type=int, default=24)
    ap.add_argument("--f64", action="store_true", help="compute in float64")
    args = ap.parse_args()
    m = Model(args.model, np.float64 if args.f64 else np.float32)
    tok = None
    if args.prompt is not None:
        from gguf_tokenizer import load_tokenizer
        tok = load_tokenizer(args.model)
        ids = tok.encode(args.prompt, add_special_tokens=False).ids
    else:
        ids = [int(s) for s in args.ids.split(",")]
    print("prompt ids:", ids)
    out, _ = m.greedy(ids, args.n)
    print("greedy ids:", out)
    if tok is None:
        try:
            from gguf_tokenizer import load_tokenizer
            tok = load_tokenizer(args.model)
        except Exception:
            pass
    if tok is not None:
        print("greedy text:", repr(tok.decode(out, skip_special_tokens=False)))


if __name__ == "__main__":
    main()
