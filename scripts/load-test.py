#!/usr/bin/env python3
"""Load test for `kivi serve`: N concurrent clients for a bounded time, some sending bad requests
or disconnecting mid-answer.

It starts the server itself (so it can read its stderr), or uses --base-url. Steps:
1. Reference pass: every good request kind served alone, one at a time (greedy).
2. Load: --clients workers for --duration seconds. Each picks a request: good (chat or
   completion, streamed or not, some with stop strings), bad (malformed JSON, unknown role,
   out-of-range values, prompt over the context, wrong content type, n=2), or a disconnect
   (a stream dropped after a few chunks, or a non-streamed request abandoned).
3. Checks: every good request answered 200 with exactly the reference text and finish reason;
   every bad one a 4xx with an OpenAI-format JSON error; /health still 200; /metrics shows
   0 running, 0 waiting and 0 KV bytes at the end; the server's stderr has no panic and
   nothing unexpected.
Reports requests/s, generated tokens/s, p50/p99 time to first token and inter-token latency
(client-side, from streamed answers). Exits non-zero if any check fails.

The HTTP client is httpx (installed with the `openai` package; newer releases of it ship it as
`httpx2`).
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import httpx
except ImportError:  # the openai package's newer HTTP client
    import httpx2 as httpx

PROMPTS = [
    "Name three colors.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in one paragraph.",
    "List five animals that live in the ocean.",
    "Give me a short recipe for pancakes.",
    "What is 12 times 7?",
    "Tell me a fun fact about the moon.",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "Here is a list of the planets of the solar system:",
    "In 1492, Christopher Columbus",
    "The recipe for a good cup of tea:",
    "Rust is a programming language that",
]


def good_kinds():
    """Distinct good requests: (endpoint, body without `stream`)."""
    kinds = []
    for i, p in enumerate(PROMPTS):
        max_tokens = [16, 32, 48, 64][i % 4]
        if i < 8:
            body = {"messages": [{"role": "user", "content": p}], "max_tokens": max_tokens}
            endpoint = "/v1/chat/completions"
        else:
            body = {"prompt": p, "max_tokens": max_tokens}
            endpoint = "/v1/completions"
        body["temperature"] = 0
        if i % 5 == 2:
            body["stop"] = ["\n\n", "."]
        kinds.append((endpoint, body))
    return kinds


def bad_requests(context_len):
    """(endpoint, content type, raw body) that must each get a 4xx JSON error."""
    chat = "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    return [
        (chat, "application/json", b'{"messages": [{"role": "user", "content": "hi"}'),
        (chat, "application/json", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode()),
        (chat, "application/json", json.dumps({"messages": user, "max_tokens": 0}).encode()),
        (chat, "application/json", json.dumps({"messages": user, "max_tokens": context_len + 1}).encode()),
        (chat, "application/json", json.dumps({"messages": user, "temperature": 9}).encode()),
        (chat, "application/json", json.dumps({"messages": user, "n": 2}).encode()),
        (chat, "application/json", json.dumps({"messages": "hi"}).encode()),
        (chat, "text/plain", json.dumps({"messages": user}).encode()),
        ("/v1/completions", "application/json",
         json.dumps({"prompt": "hello " * (context_len + 8)}).encode()),
    ]


def text_of(endpoint, obj):
    c = obj["choices"][0]
    return c["message"]["content"] if endpoint.endswith("chat/completions") else c["text"]


def delta_of(endpoint, chunk):
    if not chunk.get("choices"):
        return None, None
    c = chunk["choices"][0]
    piece = c.get("delta", {}).get("content") if endpoint.endswith("chat/completions") else c.get("text")
    return piece, c.get("finish_reason")


async def run_good(client, endpoint, body, stream):
    """Returns (text, finish_reason, completion_tokens, ttft, [itl])."""
    t0 = time.perf_counter()
    if not stream:
        r = await client.post(endpoint, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {r.text[:200]}")
        obj = r.json()
        return text_of(endpoint, obj), obj["choices"][0]["finish_reason"], obj["usage"]["completion_tokens"], None, []
    body = dict(body, stream=True, stream_options={"include_usage": True})
    text, finish, usage, ttft, itl, last = "", None, None, None, [], None
    done = False
    async with client.stream("POST", endpoint, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            piece, f = delta_of(endpoint, chunk)
            if piece:
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    itl.append(now - last)
                last = now
                text += piece
            finish = f or finish
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    if usage is None:
        raise RuntimeError("no usage chunk")
    return text, finish, usage["completion_tokens"], ttft, itl


async def run_bad(client, endpoint, ctype, raw):
    r = await client.post(endpoint, content=raw, headers={"Content-Type": ctype})
    if not 400 <= r.status_code < 500:
        raise RuntimeError(f"bad request got {r.status_code}: {r.text[:200]}")
    err = r.json().get("error", {})
    if not (isinstance(err.get("message"), str) and err.get("type") and "param" in err and "code" in err):
        raise RuntimeError(f"not an OpenAI error body: {r.text[:200]}")


async def run_disconnect(base, rng):
    body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": 256,
            "temperature": 0.8, "ignore_eos": True}
    # A client of its own, so closing it really closes the TCP connection.
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        if rng.random() < 0.7:
            body["stream"] = True
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                want = rng.randint(1, 6)
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        want -= 1
                        if want == 0:
                            break
        else:
            try:
                await asyncio.wait_for(c.post("/v1/chat/completions", json=body), rng.uniform(0.05, 1.0))
            except asyncio.TimeoutError:
                pass


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main_async(args, base):
    limits = httpx.Limits(max_connections=args.clients * 2, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        models = (await client.get("/v1/models")).json()
        context_len = models["data"][0].get("max_model_len", 8192)
        kinds = good_kinds()
        bads = bad_requests(context_len)

        # 1. Reference: each kind alone.
        t = time.perf_counter()
        reference = []
        for endpoint, body in kinds:
            text, finish, ntok, _, _ = await run_good(client, endpoint, body, stream=False)
            reference.append((text, finish, ntok))
        ref_secs = time.perf_counter() - t
        ref_tokens = sum(r[2] for r in reference)
        print(f"reference pass: {len(kinds)} requests alone in {ref_secs:.1f} s", flush=True)

        # 2. Load.
        stats = {"good": 0, "good_failed": 0, "mismatch": 0, "bad": 0, "bad_failed": 0,
                 "disconnect": 0, "disconnect_failed": 0, "tokens": 0}
        ttfts, itls, failures = [], [], []
        deadline = time.perf_counter() + args.duration

        async def worker(w):
            rng = random.Random(args.seed * 1000 + w)
            while time.perf_counter() < deadline:
                x = rng.random()
                if x < args.bad_share:
                    endpoint, ctype, raw = rng.choice(bads)
                    try:
                        await run_bad(client, endpoint, ctype, raw)
                        stats["bad"] += 1
                    except Exception as e:  # noqa: BLE001
                        stats["bad_failed"] += 1
                        failures.append(f"bad request: {e}")
                elif x < args.bad_share + args.disconnect_share:
                    try:
                        await run_disconnect(base, rng)
                        stats["disconnect"] += 1
                    except Exception as e:  # noqa: BLE001
                        stats["disconnect_failed"] += 1
                        failures.append(f"disconnect: {type(e).__name__}: {e}")
                else:
                    k = rng.randrange(len(kinds))
                    endpoint, body = kinds[k]
                    try:
                        text, finish, ntok, ttft, itl = await run_good(
                            client, endpoint, body, stream=rng.random() < 0.6)
                    except Exception as e:  # noqa: BLE001
                        stats["good_failed"] += 1
                        failures.append(f"good request {k}: {type(e).__name__}: {e}")
                        continue
                    stats["good"] += 1
                    stats["tokens"] += ntok
                    if ttft is not None:
                        ttfts.append(ttft)
                    itls.extend(itl)
                    if (text, finish, ntok) != reference[k]:
                        stats["mismatch"] += 1
                        failures.append(f"kind {k}: {(text, finish, ntok)!r} != alone {reference[k]!r}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(args.clients)))
        elapsed = time.perf_counter() - t0

        # 3. After: healthy, idle, KV memory back to zero.
        health = (await client.get("/health")).status_code
        metrics = {}
        for _ in range(100):
            text = (await client.get("/metrics")).text
            metrics = {l.split()[0]: float(l.split()[1]) for l in text.splitlines()
                       if l and not l.startswith("#") and len(l.split()) == 2}
            if (metrics.get("kivi_requests_running") == 0 and metrics.get("kivi_requests_waiting") == 0
                    and metrics.get("kivi_kv_bytes_used") == 0):
                break
            await asyncio.sleep(0.1)

    result = {
        "alone_requests_per_s": round(len(kinds) / ref_secs, 2),
        "alone_generated_tokens_per_s": round(ref_tokens / ref_secs, 1),
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "good_answered": stats["good"],
        "good_failed": stats["good_failed"],
        "greedy_mismatches": stats["mismatch"],
        "bad_rejected_4xx": stats["bad"],
        "bad_wrongly_answered": stats["bad_failed"],
        "disconnects": stats["disconnect"],
        "disconnect_errors": stats["disconnect_failed"],
        "requests_per_s": round(stats["good"] / elapsed, 2),
        "generated_tokens_per_s": round(stats["tokens"] / elapsed, 1),
        "ttft_p50_ms": round(pct(ttfts, 0.5) * 1e3, 1),
        "ttft_p99_ms": round(pct(ttfts, 0.99) * 1e3, 1),
        "itl_p50_ms": round(pct(itls, 0.5) * 1e3, 1),
        "itl_p99_ms": round(pct(itls, 0.99) * 1e3, 1),
        "health_after": health,
        "running_after": metrics.get("kivi_requests_running"),
        "waiting_after": metrics.get("kivi_requests_waiting"),
        "kv_bytes_after": metrics.get("kivi_kv_bytes_used"),
        "server_client_disconnects": metrics.get("kivi_client_disconnects_total"),
    }
    ok = (stats["good_failed"] == 0 and stats["mismatch"] == 0 and stats["bad_failed"] == 0
          and stats["disconnect_failed"] == 0 and stats["good"] > 0 and health == 200
          and result["running_after"] == 0 and result["waiting_after"] == 0
          and result["kv_bytes_after"] == 0)
    for f in failures[:20]:
        print("FAILURE:", f)
    return result, ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="use a running server instead of starting one")
    ap.add_argument("--kivi", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "kivi"))
    ap.add_argument("--model", help="model for the server it starts (default: the server's default)")
    ap.add_argument("--server-args", default="", help="more `kivi serve` arguments, e.g. '--kv f16'")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--bad-share", type=float, default=0.1)
    ap.add_argument("--disconnect-share", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()

    server, log = None, None
    if args.base_url:
        base = args.base_url.rstrip("/")
    else:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        cmd = [args.kivi, "serve", "--port", str(port)] + (["--model", args.model] if args.model else [])
        cmd += args.server_args.split()
        log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        print("server:", " ".join(cmd), flush=True)
        server = subprocess.Popen(cmd, stderr=log, stdout=log)
        base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server is not None and server.poll() is not None:
                sys.exit(f"error: the server exited: {open(log.name).read()}")
            if time.time() > deadline:
                sys.exit("error: no /health answer within 120 s")
            time.sleep(0.2)
        result, ok = asyncio.run(main_async(args, base))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    if server is not None:
        text = open(log.name).read()
        os.unlink(log.name)
        unexpected = [l for l in text.splitlines() if l.strip() and not l.startswith("kivi serve:")]
        result["server_exit_code"] = server.returncode
        result["server_stderr_unexpected_lines"] = len(unexpected)
        result["server_panicked"] = "panicked" in text
        for l in unexpected[:20]:
            print("SERVER STDERR:", l)
        ok = ok and not unexpected and server.returncode == 0
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print("load test:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
