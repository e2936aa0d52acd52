#!/usr/bin/env python3
"""The official `openai` Python client against a running `kivi serve`.

Usage: test-openai.py BASE_URL   (e.g. http://127.0.0.1:8000)

Waits for /health, then checks a chat completion, a streamed one (same greedy text, usage
reported), a completion, the model list, and that bad parameters come back as the client's
BadRequestError. Prints `N passed, N failed` and exits non-zero on any failure.
"""

import sys
import time
import urllib.error
import urllib.request

import openai

base = sys.argv[1].rstrip("/")
deadline = time.time() + 120
while True:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            if r.status == 200:
                break
    except (urllib.error.URLError, OSError):
        pass
    if time.time() > deadline:
        sys.exit(f"error: {base}/health did not answer within 120 s")
    time.sleep(0.2)

client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
messages = [{"role": "user", "content": "Name three colors."}]
results = {"passed": 0, "failed": 0}


def check(name, fn):
    try:
        fn()
        results["passed"] += 1
        print(f"ok: {name}")
    except Exception as e:  # noqa: BLE001 - report every failure and go on
        results["failed"] += 1
        print(f"FAILED: {name}: {type(e).__name__}: {e}")


state = {}


def models():
    ids = [m.id for m in client.models.list().data]
    assert len(ids) == 1 and ids[0], ids
    state["model"] = ids[0]


def chat():
    r = client.chat.completions.create(
        model=state.get("model", "default"), messages=messages, max_tokens=24, temperature=0
    )
    c = r.choices[0]
    assert r.object == "chat.completion", r.object
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content.strip(), c.message.content
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 24, u
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
    state["chat"] = (c.message.content, c.finish_reason, u.completion_tokens)
    print(f"   chat answer: {c.message.content!r}")


def chat_stream():
    stream = client.chat.completions.create(
        model=state.get("model", "default"),
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, n_chunks = "", None, None, 0
    for chunk in stream:
        n_chunks += 1
        assert chunk.object == "chat.completion.chunk", chunk.object
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert n_chunks > 3, n_chunks
    want_text, want_finish, want_tokens = state["chat"]
    assert text == want_text, (text, want_text)
    assert finish == want_finish, (finish, want_finish)
    assert usage is not None and usage.completion_tokens == want_tokens, usage


def completion():
    r = client.completions.create(
        model=state.get("model", "default"),
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
    )
    assert "Paris" in r.choices[0].text, r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")


def bad_request():
    for kwargs in ({"max_tokens": 0}, {"temperature": 5}, {"n": 2}):
        try:
            client.chat.completions.create(
                model=state.get("model", "default"), messages=messages, **kwargs
            )
        except openai.BadRequestError as e:
            assert e.status_code == 400
            assert e.body and e.body.get("message"), e.body
        else:
            raise AssertionError(f"{kwargs} was accepted")


for name, fn in [
    ("models.list", models),
    ("chat.completions.create", chat),
    ("chat.completions.create(stream=True)", chat_stream),
    ("completions.create", completion),
    ("bad parameters -> BadRequestError", bad_request),
]:
    check(name, fn)

print(f"openai client: {results['passed']} passed, {results['failed']} failed")
sys.exit(1 if results["failed"] else 0)
