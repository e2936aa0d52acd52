#!/usr/bin/env python3
"""A HuggingFace `tokenizers` tokenizer rebuilt from the vocabulary embedded in a GGUF file.

Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is handled. The pre-tokenizer follows
`tokenizer.ggml.pre`, matching both the original HF tokenizer.json and llama.cpp's llama-vocab.cpp:

  * `smollm` (SmolLM2): split every digit on its own (HF: Digits(individual_digits=True)),
    then the GPT-2 regex  's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    (llama.cpp: regex_exprs = {"\\p{N}", <gpt2 regex>}).
  * `qwen2`: the Qwen2 regex (digits one by one, contractions case-insensitive, newline runs).
  * `gpt2` / `default`: the GPT-2 regex.

Tokens whose token_type is CONTROL (3) -- <|endoftext|>, <|im_start|>, <|im_end|>, ... -- are added
as special tokens, so they are matched whole in the text (llama.cpp `parse_special = true`).
No BOS/EOS is ever added here; callers add what they need.

Note: transformers' own GGUF tokenizer loader (5.x) does not know the `smollm` pre-type and falls
back to the plain GPT-2 split, which merges digits ("2024" -> one piece): that is NOT what
SmolLM2 was trained with, so we do not use it.
"""
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern):
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)


def load_tokenizer(path):
    r = GGUFReader(path)

    def get(k, d=None):
        f = r.fields.get(k)
        return d if f is None else f.contents()

    if get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) vocabularies are handled, not {get('tokenizer.ggml.model')!r}")
    pre = get("tokenizer.ggml.pre", "default")
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in vocabulary"

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre == "smollm":
        split = [pre_tokenizers.Digits(individual_digits=True), _split(GPT2_SPLIT)]
    elif pre == "qwen2":
        split = [_split(QWEN2_SPLIT)]
    elif pre in ("gpt2", "default"):
        split = [_split(GPT2_SPLIT)]
    else:
        raise ValueError(f"pre-tokenizer {pre!r} not handled")
    tok.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(special)
    tok.pre_type = pre  # for reporting
    return tok


if __name__ == "__main__":
    t = load_tokenizer(sys.argv[1])
    for text in sys.argv[2:]:
        ids = t.encode(text, add_special_tokens=False).ids
        print(ids, [t.id_to_token(i) for i in ids])
